//! Stopping: drain the fronts, stop the workers and everything they started, remove the view.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use tracing::{info, warn};

use super::strays::kill_group;
use super::{Instance, Role, Slot};

impl Instance {
    /// Drains fronts first (they stop accepting and wait for in-flight replies, which the
    /// workers are still there to produce), then stops the workers, then removes every segment.
    pub(super) fn shutdown(&mut self) {
        self.stats.header().draining.store(1, Ordering::Relaxed);
        for s in self.slots.values_mut() {
            s.restart_at = None;
        }
        let drain = Duration::from_millis(self.cfg.drain_ms);
        self.stop_role(
            |r| matches!(r, Role::Front(_)),
            drain + Duration::from_secs(2),
        );
        let workers: Vec<Pid> = self
            .slots
            .iter()
            .filter(|(r, _)| matches!(r, Role::Worker(_)))
            .filter_map(|(_, s)| s.pid)
            .collect();
        self.stop_role(|r| matches!(r, Role::Worker(_)), Duration::from_secs(3));
        // Nothing a worker started outlives the relay: its process group, then anything that
        // left the group and was reparented here.
        for pid in workers {
            kill_group(pid);
        }
        self.kill_strays();
        self.publish();
        // Only this run's own file: never a file another run put at the name.
        self.publisher.remove();
        info!("stopped; segments removed");
    }

    fn stop_role(&mut self, which: impl Fn(Role) -> bool, grace: Duration) {
        let pids = |slots: &HashMap<Role, Slot>| -> Vec<Pid> {
            slots
                .iter()
                .filter(|(r, _)| which(**r))
                .filter_map(|(_, s)| s.pid)
                .collect()
        };
        for pid in pids(&self.slots) {
            let _ = kill(pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while !pids(&self.slots).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            self.reap_quietly();
        }
        for pid in pids(&self.slots) {
            warn!(pid = pid.as_raw(), "did not stop in time; killing");
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
        self.reap_quietly();
        for s in self.slots.values_mut() {
            if s.pid
                .is_some_and(|p| !shm_ring::process_alive(p.as_raw() as u32))
            {
                s.pid = None;
            }
        }
    }

    fn reap_quietly(&mut self) {
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            let Some(pid) = status.pid() else { break };
            for s in self.slots.values_mut() {
                if s.pid == Some(pid) {
                    s.pid = None;
                }
            }
        }
    }
}
