//! Pub/sub, direct pushes and presence across shmrelay nodes over NATS.
//!
//! One relay per host; on each, the pub/sub workers run `cluster-worker` (this crate's
//! binary). Each worker keeps its own clients' subscriptions and holds one NATS connection
//! (async-nats on a one-thread tokio runtime in a background thread, [`Bridge`]); the
//! relay's fronts and supervisor never touch NATS. A worker subscribes to a topic's subject
//! while it has local subscribers to it, so a publish crosses to exactly the workers (of any
//! node) that want it. See the crate README for the deployment picture and the guarantees.
//!
//! The pieces: [`Settings`] (from the supervisor's environment), [`Bridge`] (the NATS
//! thread), [`Node`] (the commands and the local state, a [`shmrelay_worker::Handler`]),
//! [`serve`] (the event loop), [`ReplyOrder`] (per-connection reply order across round trips),
//! [`ClusterId`] and [`Subjects`] (names).
//!
//! # Example: the binary's whole `main`
//!
//! ```no_run
//! use shmrelay_cluster::{serve, Bridge, Node, Settings};
//! use shmrelay_worker::Worker;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let settings = Settings::from_env()?;
//!     let mut worker = Worker::from_env()?;
//!     let bridge = Bridge::start(&settings, worker.index())?;
//!     let mut node = Node::new(&settings.node, worker.index(), bridge.commands.clone(), bridge.counters.clone());
//!     serve(&mut worker, &mut node, &bridge)?; // returns on SIGTERM
//!     Ok(())
//! }
//! ```
//!
//! See also: `shmrelay_worker::examples::PubSub` (the same commands on one worker, no NATS).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bridge;
pub mod counters;
pub mod id;
pub mod node;
pub mod replies;
pub mod run;
pub mod settings;

pub use bridge::Bridge;
pub use counters::Counters;
pub use id::{ClusterId, Subjects};
pub use node::Node;
pub use replies::ReplyOrder;
pub use run::serve;
pub use settings::Settings;
