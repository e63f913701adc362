//! Health watch: hung workers, stalled fronts, and memory or fd growth of every process.

use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shmrelay::stats::WorkerState;
use tracing::{error, info, warn};

use super::stall::Look;
use super::{Instance, Role};
use crate::watchdog::{self, Hang};

impl Instance {
    /// Samples every worker's request rings for a hang; reports it and, if configured, kills
    /// the worker (the reaper restarts it, and its replacement gets the waiting frames).
    pub(super) fn watch_hangs(&mut self) {
        let timeout = Duration::from_millis(self.cfg.hang_timeout_ms);
        for w in 0..self.workers {
            let Some(pid) = self.slots.get(&Role::Worker(w)).and_then(|s| s.pid) else {
                continue;
            };
            let mut hung = None;
            let mut recovered = false;
            for f in 0..self.cfg.fronts {
                match self.hangs[f][w].sample(&self.rings[f][w].0, timeout) {
                    Hang::Detected(d) => hung = Some(d),
                    Hang::Recovered => recovered = true,
                    Hang::Fine | Hang::Ongoing => {}
                }
            }
            let ws = self.stats.worker(w);
            if let Some(d) = hung {
                ws.hangs.fetch_add(1, Ordering::Relaxed);
                ws.state.store(WorkerState::Hung as u32, Ordering::Relaxed);
                if self.cfg.kill_hung {
                    error!(worker = w, pid = pid.as_raw(), stuck = ?d, "worker hung: killing it; its replacement gets the waiting frames");
                    let _ = kill(pid, Signal::SIGKILL);
                } else {
                    error!(worker = w, pid = pid.as_raw(), stuck = ?d, "worker hung (kill_hung = false: left running)");
                }
            } else if recovered {
                info!(worker = w, pid = pid.as_raw(), "worker consuming again");
                ws.state
                    .store(WorkerState::Running as u32, Ordering::Relaxed);
            }
        }
    }

    /// A front whose loop stopped publishing activity (SIGSTOP, stuck) for `hang_timeout_ms`
    /// is killed and replaced, like a hung worker: its clients are disconnected and can
    /// reconnect at once to the others (or to its replacement). Time the kernel kept the front
    /// runnable but off the CPU (an overloaded machine, a spent cgroup CPU quota) does not
    /// count (`stall::StallClock`): a starved front is late, not stuck, and killing it would drop
    /// every one of its connections (issue 15: at load 100 a million-connection run lost 47 of
    /// 51 fronts that way). SIGSTOP, a deadlock or a spin are still caught within
    /// `hang_timeout_ms` of the front's own time.
    pub(super) fn watch_fronts(&mut self) {
        let timeout = Duration::from_millis(self.cfg.hang_timeout_ms);
        for f in 0..self.cfg.fronts {
            let Some(s) = self.slots.get(&Role::Front(f)) else {
                continue;
            };
            let Some(pid) = s.pid else { continue };
            let active = self.stats.front(f).active_ns.load(Ordering::Relaxed);
            let moved = active != std::mem::replace(&mut self.front_seen[f], active);
            // `/proc` is read only for a front that looks stalled (stall.rs).
            let Some(stalled) =
                self.front_stall[f].observe(moved, || Look::of(pid.as_raw() as u32))
            else {
                continue;
            };
            if stalled < timeout || s.started.elapsed() < timeout {
                continue;
            }
            // Counts again from the next look that finds it still.
            self.front_stall[f] = Default::default();
            self.stats
                .front_process(f)
                .hangs
                .fetch_add(1, Ordering::Relaxed);
            if self.cfg.kill_hung {
                error!(
                    front = f,
                    pid = pid.as_raw(),
                    ?stalled,
                    "front stalled (no loop activity): killing it; it is replaced"
                );
                let _ = kill(pid, Signal::SIGKILL);
            } else {
                error!(
                    front = f,
                    pid = pid.as_raw(),
                    ?stalled,
                    "front stalled (no loop activity) (kill_hung = false: left running)"
                );
            }
        }
    }

    /// Memory and fd counts of every process, and growth beyond what their work explains.
    pub(super) fn sample_processes(&mut self) {
        let h = self.stats.header();
        let me = std::process::id();
        if let Some(m) = watchdog::process_metrics(me) {
            h.supervisor_rss_kb.store(m.rss_kb, Ordering::Relaxed);
            h.supervisor_fds.store(m.fds, Ordering::Relaxed);
            self.note_growth(None, me, m, 0);
        }
        let roles: Vec<(Role, Pid)> = self
            .slots
            .iter()
            .filter_map(|(r, s)| Some((*r, s.pid?)))
            .collect();
        for (role, pid) in roles {
            let Some(m) = watchdog::process_metrics(pid.as_raw() as u32) else {
                continue;
            };
            let (block, conns) = match role {
                Role::Worker(w) => (self.stats.worker(w), 0),
                Role::Front(f) => (
                    self.stats.front_process(f),
                    self.stats.front(f).conns_open.load(Ordering::Relaxed),
                ),
            };
            block.rss_kb.store(m.rss_kb, Ordering::Relaxed);
            block.fds.store(m.fds, Ordering::Relaxed);
            self.note_growth(Some(role), pid.as_raw() as u32, m, conns);
        }
    }

    fn note_growth(
        &mut self,
        role: Option<Role>,
        pid: u32,
        m: watchdog::ProcessMetrics,
        conns: u64,
    ) {
        // Private memory, not RSS: ring pages are shared and touched as traffic reaches them.
        let (rss, fds) = (m.private_kb, m.fds);
        // A connection legitimately holds one fd and a few KiB (socket buffers are the kernel's).
        let g = match role {
            Some(r) => match self.slots.get_mut(&r) {
                Some(s) => &mut s.growth,
                None => return,
            },
            None => &mut self.supervisor_growth,
        };
        let ev = g.sample(pid, rss, fds, conns, conns * 4);
        let h = self.stats.header();
        let who = role.map_or("supervisor".to_owned(), |r| r.to_string());
        if ev.fds {
            h.fd_growth_events.fetch_add(1, Ordering::Relaxed);
            warn!(
                process = who,
                pid, fds, "open fds grew beyond the baseline: possible fd leak"
            );
        }
        if ev.rss {
            h.rss_growth_events.fetch_add(1, Ordering::Relaxed);
            warn!(
                process = who,
                pid,
                private_kb = rss,
                "private memory doubled beyond the baseline: possible leak"
            );
        }
    }
}
