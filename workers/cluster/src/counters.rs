//! The cluster worker's counters for operators, shared by its NATS thread and its worker loop,
//! and copied into the shared-memory words the relay publishes (`relayctl`, `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

/// `state` values (see `shmrelay_worker::protocol::CLUSTER_WORDS`).
pub mod state {
    /// Not connected to NATS (starting, or reconnecting).
    pub const DISCONNECTED: u64 = 1;
    /// Connected to NATS.
    pub const CONNECTED: u64 = 2;
}

/// Counters since the worker started. Every access is Relaxed: each is a value on its own
/// for display, and `connected` is a hint the worker loop reads without acting on anything
/// else it guards (the NATS client itself decides what a publish does).
#[derive(Debug)]
pub struct Counters {
    /// [`state::CONNECTED`] or [`state::DISCONNECTED`].
    pub state: AtomicU64,
    /// NATS subjects subscribed now.
    pub subjects: AtomicU64,
    /// Messages received from NATS (topic messages, pushes, presence events and queries).
    pub messages_in: AtomicU64,
    /// Messages sent to NATS.
    pub messages_out: AtomicU64,
    /// Cross-node operations that failed: publishes refused while NATS is unreachable or its
    /// queue is full, pushes to unknown or gone connections, timeouts, and messages from NATS
    /// dropped because the worker loop was [`INBOUND`](crate::bridge::INBOUND) behind.
    pub errors: AtomicU64,
    /// Times the connection to NATS was re-established.
    pub reconnects: AtomicU64,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            state: AtomicU64::new(state::DISCONNECTED),
            subjects: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }
}

impl Counters {
    /// Whether NATS is connected now.
    pub fn connected(&self) -> bool {
        self.state.load(Ordering::Relaxed) == state::CONNECTED
    }

    /// Adds one to `c`.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The values in the order of `CLUSTER_WORDS`.
    pub fn values(&self) -> [u64; 6] {
        [
            &self.state,
            &self.subjects,
            &self.messages_in,
            &self.messages_out,
            &self.errors,
            &self.reconnects,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }

    /// Copies the values into the words the relay publishes (Relaxed: operators' display).
    pub fn publish(&self, words: [&AtomicU64; 6]) {
        for (w, v) in words.into_iter().zip(self.values()) {
            w.store(v, Ordering::Relaxed);
        }
    }
}
