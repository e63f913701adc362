//! Findings in a report that need an operator's attention (`problems` in `--json`).

use super::{InstanceReport, LeakReport, Liveness};
use crate::stats::WorkerState;

impl LeakReport {
    /// Leaks that are still there or were not handled: `leaked_conns`, `fd_growth_events`,
    /// `rss_growth_events` and stale rings. The handled counters (`stale_segments_removed`,
    /// `reclaimed_reservations`, `orphans_killed`) are history, not problems.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.leaked_conns > 0 {
            p.push(format!(
                "{} leaked connection(s) found by the fronts' self-checks",
                self.leaked_conns
            ));
        }
        if self.fd_growth_events > 0 {
            p.push(format!(
                "{} fd growth event(s): a process's open fds grew past its allowance",
                self.fd_growth_events
            ));
        }
        if self.rss_growth_events > 0 {
            p.push(format!(
                "{} memory growth event(s): a process's resident memory grew past its allowance",
                self.rss_growth_events
            ));
        }
        for s in &self.stale_rings {
            p.push(format!(
                "ring f{}.w{} {}: {} pid {} is dead",
                s.front,
                s.worker,
                s.direction.as_str(),
                s.side,
                s.pid
            ));
        }
        p
    }
}

impl InstanceReport {
    /// The findings of this report; `build` stores them in `problems`.
    pub(super) fn find_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.alive {
            p.push(format!(
                "instance `{}` is dead: no supervisor holds its lock (last pid {}); its \
                 segments are stale (remove them with `relayctl gc`)",
                self.name, self.supervisor_pid
            ));
            return p;
        }
        if self.supervisor_heartbeat_ms > 5_000 {
            p.push(format!(
                "the supervisor (pid {}) has not run its loop for {} ms (stopped?)",
                self.supervisor_pid, self.supervisor_heartbeat_ms
            ));
        }
        if self.pool_failed {
            p.push("the worker pool is marked failed: new connections are refused".to_owned());
        }
        for f in &self.fronts {
            if f.pid != 0 && f.liveness != Liveness::Alive {
                p.push(format!(
                    "front {} (pid {}) is {}",
                    f.index,
                    f.pid,
                    f.liveness.as_str()
                ));
            }
        }
        for w in &self.workers {
            if matches!(w.state, WorkerState::Hung | WorkerState::Failed) {
                p.push(format!("worker {} is {}", w.index, w.state));
            } else if w.pid != 0 && w.liveness != Liveness::Alive {
                p.push(format!(
                    "worker {} (pid {}) is {}",
                    w.index,
                    w.pid,
                    w.liveness.as_str()
                ));
            }
        }
        for r in &self.rings {
            let id = format!("ring f{}.w{} {}", r.front, r.worker, r.direction.as_str());
            if let Some(e) = &r.error {
                p.push(format!("{id}: {e}"));
            }
            for (side, s) in [("producer", &r.producer), ("consumer", &r.consumer)] {
                if s.liveness == Liveness::Stalled {
                    p.push(format!(
                        "{id}: {side} pid {} stalled ({} ms idle, {} bytes waiting)",
                        s.pid, s.idle_ms, r.used
                    ));
                }
            }
        }
        p.extend(self.leaks.problems());
        p
    }
}
