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
            let strays = unknown_children(me, &known);
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

/// This process's children not in `known`, and whether each is a zombie. From the kernel's
/// lists of each thread's children (`/proc/self/task/*/children`: an orphan reparented to this
/// subreaper is on its new parent thread's), so a look costs a read or two instead of the
/// `stat` of every process on the machine (200 reads a second on a quiet one: issue 15);
/// without those files (a kernel without CONFIG_PROC_CHILDREN), every process is scanned.
/// The lists are the kernel's best effort while children come and go: one missed now is
/// found at the next look.
fn unknown_children(me: u32, known: &[u32]) -> Vec<(u32, bool)> {
    let Some(children) = listed_children() else {
        return watchdog::children(me)
            .into_iter()
            .filter(|(pid, _)| !known.contains(pid))
            .collect();
    };
    children
        .into_iter()
        .filter(|pid| !known.contains(pid))
        // One gone meanwhile was reaped: nothing to do.
        .filter_map(|pid| Some((pid, shmrelay::procfs::stat(pid).ok()?.state == 'Z')))
        .collect()
}

/// The pids in `/proc/self/task/*/children`; `None` if the files are not there.
fn listed_children() -> Option<Vec<u32>> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        match std::fs::read_to_string(task.path().join("children")) {
            Ok(list) => pids.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            // The thread exited meanwhile.
            Err(_) => {}
        }
    }
    Some(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_lists_name_the_same_children_as_a_scan() {
        let mut kids: Vec<std::process::Child> = (0..3)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap()
            })
            .collect();
        let me = std::process::id();
        let pids: Vec<u32> = kids.iter().map(|k| k.id()).collect();
        let mut listed: Vec<u32> = listed_children().expect("CONFIG_PROC_CHILDREN");
        listed.retain(|p| pids.contains(p));
        listed.sort_unstable();
        let mut scanned: Vec<u32> = watchdog::children(me)
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| pids.contains(p))
            .collect();
        scanned.sort_unstable();
        assert_eq!(listed, scanned);
        assert_eq!(listed.len(), 3);
        // Known ones are left out; an exited one shows as a zombie until reaped.
        let _ = kids[0].kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found = unknown_children(me, &pids[1..]);
            if found.contains(&(pids[0], true)) || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(found.contains(&(pids[0], true)), "{found:?}");
        assert!(found.iter().all(|(p, _)| !pids[1..].contains(p)));
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}
