//! Taking the instance name: refuse a live instance, clean up what a dead run of it left.

use std::time::Duration;

use anyhow::{anyhow, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shmrelay::{names, view};
use tracing::warn;

/// Kills processes left from the dead run `token` of this instance (those whose environment
/// carries that run's token, never those that merely name the instance); returns how many.
pub(super) fn kill_orphans(instance: &str, token: u64) -> usize {
    let orphans = view::processes_of_run(token, std::process::id());
    for &pid in &orphans {
        warn!(
            pid,
            instance, "killing a process left over from a dead run of this instance"
        );
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    orphans.len()
}

/// Refuses to start over a live instance of the same name (its supervisor holds the lock on
/// its view), or over a file at the name this user must not trust; removes a dead run's files
/// (its view, claimed under the lock, and its other files owned by this user) and returns
/// how many there were and the dead run's token.
pub(super) fn claim_instance(instance: &str) -> Result<(usize, u64)> {
    let path = names::stats_path(instance);
    let claimed = view::claim_stale(&path, Duration::from_millis(500))
        .map_err(|e| anyhow!("instance {instance:?}: {e}"))?;
    let Some(claimed) = claimed else {
        return Ok((0, 0));
    };
    let token = claimed.peek.map_or(0, |p| p.token);
    let mut removed = 0;
    for f in names::instance_files(instance) {
        if f == path || !names::is_own_regular(&f) {
            continue;
        }
        match std::fs::remove_file(&f) {
            Ok(()) => removed += 1,
            Err(e) => warn!("removing {}: {e}", f.display()),
        }
    }
    match claimed.remove() {
        Ok(true) => removed += 1,
        Ok(false) => {}
        Err(e) => warn!("removing {}: {e}", path.display()),
    }
    if removed > 0 {
        warn!(
            instance,
            count = removed,
            "removed segments left by a dead run of this instance"
        );
    }
    Ok((removed, token))
}
