//! The rings between fronts and workers: created as sealed memfds, reset after a quarantine,
//! and told (FRONT_RESET) when their front died.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use shm_ring::{Doorbell, Meta, ShmRing};
use shmrelay::names::{self, Dir};
use shmrelay_worker::protocol::tag;
use tracing::{error, info, warn};

use super::{Instance, Role};

/// A ring in a new memfd, sealed against shrinking and growing: a worker that truncates its
/// fd gets EPERM instead of SIGBUSing the front and the supervisor.
pub(super) fn new_ring(
    instance: &str,
    f: usize,
    w: usize,
    dir: Dir,
    cap: usize,
) -> Result<ShmRing> {
    let name = names::ring_path(instance, f, w, dir);
    let name = name.file_name().map_or_else(
        || "shmrelay-ring".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    ShmRing::create_memfd(&name, cap).with_context(|| format!("creating ring {name}"))
}

impl Instance {
    /// Replaces workers whose rings a front quarantined (they wrote garbage into shared
    /// memory): kill the worker; once it is dead, reset the pair of rings and hand them back
    /// to the front before the replacement attaches.
    pub(super) fn watch_quarantines(&mut self) {
        for f in 0..self.cfg.fronts {
            // Acquire: pairs with the front's Release when it set the bit after its last use.
            let q = self.stats.front(f).quarantined.load(Ordering::Acquire);
            for w in 0..self.workers {
                if q & (1 << w) == 0 {
                    continue;
                }
                match self.slots.get(&Role::Worker(w)).and_then(|s| s.pid) {
                    Some(pid) => {
                        error!(
                            front = f,
                            worker = w,
                            pid = pid.as_raw(),
                            "the front quarantined this worker's rings: replacing the worker"
                        );
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                    None => self.reset_quarantined(w),
                }
            }
        }
    }

    /// With worker `w` dead, resets every pair of rings a front quarantined with it.
    pub(super) fn reset_quarantined(&mut self, w: usize) {
        for f in 0..self.cfg.fronts {
            let fs = self.stats.front(f);
            if fs.quarantined.load(Ordering::Acquire) & (1 << w) == 0 {
                continue;
            }
            let (req, rep) = &self.rings[f][w];
            req.reset();
            rep.reset();
            self.hangs[f][w].reset();
            self.suspects[f][w] = (0, 0);
            // Release: the front re-attaches once it sees the bit clear, after the reset.
            fs.quarantined.fetch_and(!(1 << w), Ordering::Release);
            info!(front = f, worker = w, "rings reset after quarantine");
        }
    }

    /// Tells every worker that front `f` died, by a FRONT_RESET record in each of its request
    /// rings (the supervisor is the producer while no front is): each worker reports a CLOSE
    /// for every connection of that front. Replies still in the reply rings are dropped by the
    /// new front as stale (its connection ids start at new generations).
    pub(super) fn reset_front_rings(&mut self, f: usize) {
        for w in 0..self.workers {
            let ring = &self.rings[f][w].0;
            let mut tx = match shm_ring::Producer::new(ring) {
                Ok(tx) => tx,
                Err(e) => {
                    error!(front = f, worker = w, "cannot reset the request ring: {e}");
                    continue;
                }
            };
            tx.set_doorbell(Doorbell::Both(self.worker_bells[w].clone()));
            let meta = Meta::tag(tag::FRONT_RESET).conn(f as u64);
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                match tx.push(meta, &[]) {
                    Ok(_) => {
                        tx.publish();
                        break;
                    }
                    Err(shm_ring::ReserveError::Full) if Instant::now() < deadline => {
                        let _ = tx.wait_for_space(0, Some(Duration::from_millis(50)));
                    }
                    Err(e) => {
                        warn!(
                            front = f,
                            worker = w,
                            "worker not told of the dead front's connections: {e}"
                        );
                        break;
                    }
                }
            }
        }
    }
}
