//! Nothing a worker starts outlives it: the supervisor is the subreaper of its descendants,
//! kills a dead worker's process group and any orphan reparented to it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::sync::atomic::Ordering;
use tracing::warn;

use super::Instance;
use crate::watchdog;

/// Makes this process the reaper of every process its children start (orphans of a dead
/// worker are reparented here, not to init, so they can be found and killed).
pub(super) fn own_descendants() -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("PR_SET_CHILD_SUBREAPER");
    }
    Ok(())
}

/// Kills the process group a worker led (it and whatever it started that stayed in it), and
/// waits (up to a second) until no member is left, reaping those that are our children, so
/// that no process of the old group still runs when a replacement starts.
pub(super) fn kill_group(leader: Pid) {
    let group = Pid::from_raw(-leader.as_raw());
    // A group id is not reused while any member lives; with none left this is ESRCH.
    let _ = kill(group, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        // Members whose parent died were reparented here (subreaper): reap them.
        while let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
            waitpid(group, Some(WaitPidFlag::WNOHANG))
        {}
        if kill(group, None) == Err(nix::errno::Errno::ESRCH) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    warn!(
        group = leader.as_raw(),
        "processes of a dead worker's group still there after SIGKILL"
    );
}

impl Instance {
    /// Kills the unknown children of this process (orphans of workers, reparented here as
    /// the subreaper) until none is left; returns how many were killed.
    pub(super) fn kill_strays(&mut self) -> usize {
        let me = std::process::id();
        let mut killed = std::collections::HashSet::new();
        for _ in 0..100 {
            let mut known: Vec<u32> = self
                .slots
                .values()
                .filter_map(|s| s.pid)
                .map(|p| p.as_raw() as u32)
                .collect();
            known.extend(&self.inherited_children);
            let strays: Vec<(u32, bool)> = watchdog::children(me)
                .into_iter()
                .filter(|(pid, _)| !known.contains(pid))
                .collect();
            if strays.is_empty() {
                break;
            }
            for (pid, zombie) in strays {
                if !zombie && killed.insert(pid) {
                    warn!(pid, "killing a process a worker left behind");
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if !killed.is_empty() {
            self.stats
                .header()
                .orphans_killed
                .fetch_add(killed.len() as u64, Ordering::Relaxed);
        }
        killed.len()
    }
}
