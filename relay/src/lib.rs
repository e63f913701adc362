//! shmrelay: a single-host relay for long-lived TCP connections.
//!
//! The `shmrelay` binary is a supervisor that starts front processes (which own the sockets)
//! and worker processes (which own the application logic), connected by lock-free rings in
//! shared memory. This library holds the pieces other tools share: the settings
//! ([`config`]), the segment names ([`names`]), the stats segment `relayctl` reads
//! ([`stats`]) and the front's event loop ([`front`]).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod front;
pub mod layout;
pub mod metrics;
pub mod names;
pub mod procfs;
pub mod report;
pub mod signals;
pub mod stats;
pub mod timer;
pub mod view;
