//! Push scope: which connections a worker may write to. A worker is somebody else's code,
//! maybe running as another user for another tenant; by default its reply records (replies,
//! pushes, closes) reach only connections accepted on its own listener. `push_scope =
//! "relay"` widens that to every connection of the relay. A record outside the scope is
//! dropped, counted (`push_out_of_scope`) and logged once per worker.

use shmrelay_worker::ConnId;
use tracing::warn;

use super::conn::{ConnKey, Slab};
use crate::config::{Config, PushScope};

pub(super) struct Scope {
    /// Every connection is in scope (`push_scope = "relay"`, or a single listener).
    wide: bool,
    /// Listener of each worker (global index).
    owner: Vec<usize>,
    /// Workers already logged for an out-of-scope record.
    logged: Vec<bool>,
}

impl Scope {
    pub fn new(cfg: &Config) -> Scope {
        let owner = cfg.worker_listeners();
        Scope {
            wide: cfg.push_scope == PushScope::Relay || cfg.listeners().len() <= 1,
            logged: vec![false; owner.len()],
            owner,
        }
    }

    /// True if worker `w` may write to connection `raw`. A connection that is not this
    /// front's or no longer exists is left to the caller (counted as a stale reply there).
    pub fn allows(&self, slab: &mut Slab, me: usize, w: usize, raw: u64) -> bool {
        if self.wide {
            return true;
        }
        let id = ConnId::from_raw(raw);
        if id.front() != me {
            return true;
        }
        match slab.get(ConnKey::of(id)) {
            // A connection's home worker belongs to the listener that accepted it.
            Some(c) => self
                .owner
                .get(c.worker())
                .is_some_and(|&l| self.owner.get(w) == Some(&l)),
            None => true,
        }
    }

    /// Logs the first out-of-scope record of worker `w` (later ones are only counted).
    pub fn note(&mut self, front: usize, w: usize, dropped: u64) {
        if dropped > 0 && !std::mem::replace(&mut self.logged[w], true) {
            warn!(
                front,
                worker = w,
                dropped,
                "worker wrote to connections of another listener (push_scope = \"listener\"): \
                 dropped, and counted in push_out_of_scope"
            );
        }
    }
}
