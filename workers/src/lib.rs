//! Worker SDK for shmrelay.
//!
//! A worker is any binary that links this crate: the supervisor starts it with its rings in the
//! environment, and [`Worker::run`] calls your [`Handler`] for every connection opened, every
//! frame received (a `&[u8]` borrowed from shared memory: no copy) and every connection closed.
//! Replies, pushes to any live connection and close requests go through [`Out`], which writes
//! them straight into the reply ring.
//!
//! # Example: an echo worker
//!
//! ```no_run
//! use shmrelay_worker::{ConnId, Handler, Out, Worker};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     fn on_frame(&mut self, conn: ConnId, frame: &[u8], _redelivered: bool, out: &mut Out<'_>) {
//!         // Fails only while stopping or on a corrupt ring; the SDK then answers the frame
//!         // with the codec's error reply itself.
//!         let _ = out.send(conn, frame);
//!     }
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     Worker::from_env()?.run(&mut Echo)?; // returns on SIGTERM
//!     Ok(())
//! }
//! ```
//!
//! Workers with an event loop of their own poll [`Worker::doorbell`] and call
//! [`Worker::poll_once`] when it is readable.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod chat;
pub mod codec;
pub mod examples;
pub mod kv;
pub mod protocol;
pub mod slot;
pub mod testing;
mod worker;

pub use codec::websocket::Upgrade;
pub use codec::{Codec, MessageKind};
pub use protocol::{CloseReason, ConnId};
pub use worker::{
    stop_requested, Handler, Out, Reservation, SendError, Worker, WorkerError, DEFAULT_MAX_REPLY,
};

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
