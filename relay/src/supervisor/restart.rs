//! Restarting what died: reaping, the quick-crash backoff, the crash window that marks a
//! worker failed, its retry backoff, SIGUSR1 revive, and recovery after a stable run.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use shm_ring::{RingStorage, ShmRing};
use shmrelay::stats::WorkerState;
use tracing::{error, info, warn};

use super::spawn::wait_ready;
use super::strays::kill_group;
use super::{Instance, Role};

/// Restart delay after the first quick crash; doubles per further quick crash.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A process that ran this long is considered healthy again.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// First retry of a worker marked failed; doubles per further failure, up to
/// `failed_retry_max_ms`.
const FAILED_RETRY_START: Duration = Duration::from_secs(1);

/// Restart delay after `quick_crashes` quick crashes in a row (the first restart is at once).
fn restart_delay(quick_crashes: u32) -> Duration {
    if quick_crashes <= 1 {
        Duration::ZERO
    } else {
        (BACKOFF_START * 2u32.saturating_pow(quick_crashes - 2)).min(BACKOFF_MAX)
    }
}

/// Retry delay of a worker marked failed for the `fail_count`th time (at least 1) since it
/// last ran stably, capped at `max`.
fn failed_retry(fail_count: u32, max: Duration) -> Duration {
    FAILED_RETRY_START
        .saturating_mul(2u32.saturating_pow(fail_count - 1))
        .min(max)
}

/// How a child ended, as an operator reads it: `exited with status 0`, `killed by SIGKILL`.
struct Ended(WaitStatus);

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            WaitStatus::Exited(_, code) => write!(f, "exited with status {code}"),
            WaitStatus::Signaled(_, sig, core) => {
                write!(f, "killed by {}", sig.as_str())?;
                if core {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
            WaitStatus::Stopped(_, sig) => write!(f, "stopped by {}", sig.as_str()),
            WaitStatus::Continued(_) => f.write_str("continued"),
            WaitStatus::StillAlive => f.write_str("still running"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// How many times consumers attached to worker `w`'s request rings, summed over fronts.
pub(super) fn worker_attaches(rings: &[Vec<(ShmRing, ShmRing)>], w: usize) -> u32 {
    rings
        .iter()
        .map(|row| {
            row[w]
                .0
                .header()
                .consumer
                .attach_count
                .load(Ordering::Relaxed)
        })
        .fold(0u32, u32::wrapping_add)
}

impl Instance {
    /// Reaps exited children and schedules their restarts.
    pub(super) fn reap(&mut self) {
        let mut worker_died = false;
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(s) => s,
            };
            let Some(pid) = status.pid() else { continue };
            // Anything else reaped here is a stray (a worker's orphan): nothing to restart.
            let Some(role) = self
                .slots
                .iter()
                .find(|(_, s)| s.pid == Some(pid))
                .map(|(&r, _)| r)
            else {
                continue;
            };
            // A clean exit (status 0) is restarted like any other, with the same pacing, but
            // it is not a crash: it never counts towards `crash_limit` (so never marks the
            // worker failed) nor in the `crashes` statistic.
            let clean = matches!(status, WaitStatus::Exited(_, 0));
            let mut forgiven = 0;
            if let Role::Worker(w) = role {
                worker_died = true;
                // Whatever it started in its process group dies with it.
                kill_group(pid);
                let base = self.slots[&role].attach_base;
                if worker_attaches(&self.rings, w) != base {
                    self.ever_attached = true;
                }
                forgiven = self.note_crash_frames(w);
                // Nothing the dead worker started is left; its replacement gets fresh rings.
                self.kill_strays();
                self.new_generation(w);
            }
            let slot = self.slots.get_mut(&role).expect("found above");
            slot.pid = None;
            let lived = slot.started.elapsed();
            let window = Duration::from_millis(self.cfg.crash_window_ms);
            if !clean {
                slot.crashes.push_back(Instant::now());
                // The crashes a dead-lettered frame caused are counted against the frame.
                for _ in 0..forgiven {
                    slot.crashes.pop_back();
                }
            }
            while slot.crashes.front().is_some_and(|t| t.elapsed() > window) {
                slot.crashes.pop_front();
            }
            if let Role::Worker(w) = role {
                if !clean && slot.crashes.len() as u32 >= self.cfg.crash_limit {
                    slot.failed = true;
                    slot.fail_count += 1;
                    let retry = failed_retry(
                        slot.fail_count,
                        Duration::from_millis(self.cfg.failed_retry_max_ms),
                    );
                    slot.restart_at = Some(Instant::now() + retry);
                    let crashes = slot.crashes.len();
                    let ws = self.stats.worker(w);
                    ws.crashes.fetch_add(1, Ordering::Relaxed);
                    ws.pid.store(0, Ordering::Relaxed);
                    ws.state
                        .store(WorkerState::Failed as u32, Ordering::Relaxed);
                    error!(%role, crashes, ?window, retry_in = ?retry, "crashed too often: marked failed, its clients get an error (retried after the backoff, or now at SIGUSR1)");
                    let all_failed = (0..self.workers)
                        .all(|i| self.slots.get(&Role::Worker(i)).is_some_and(|s| s.failed));
                    if all_failed {
                        self.stats.header().pool_failed.store(1, Ordering::Relaxed);
                        error!("every worker failed: new connections are refused");
                        if !self.ever_attached {
                            self.startup_failure = Some(format!(
                                "every worker failed during start-up (none attached to its rings; last: {role} {}, {crashes} crashes in {window:?})",
                                Ended(status)
                            ));
                        }
                    }
                    continue;
                }
            }
            slot.quick_crashes = if lived >= STABLE_AFTER {
                0
            } else {
                slot.quick_crashes + 1
            };
            let delay = restart_delay(slot.quick_crashes);
            slot.restart_at = Some(Instant::now() + delay);
            match role {
                Role::Worker(w) => {
                    let ws = self.stats.worker(w);
                    if !clean {
                        ws.crashes.fetch_add(1, Ordering::Relaxed);
                    }
                    ws.pid.store(0, Ordering::Relaxed);
                    ws.state
                        .store(WorkerState::Restarting as u32, Ordering::Relaxed);
                    self.reset_quarantined(w);
                }
                Role::Front(f) => {
                    self.forget_front_connections(f);
                    self.reset_front_rings(f);
                }
            }
            let ended = Ended(status);
            if clean {
                info!(%role, pid = pid.as_raw(), ?lived, restart_in = ?delay, "{ended}; restarting (not counted as a crash)");
            } else {
                warn!(%role, pid = pid.as_raw(), ?lived, restart_in = ?delay, "{ended}; restarting");
            }
        }
        if worker_died {
            self.kill_strays();
        }
    }

    pub(super) fn restart_due(&mut self) -> Result<()> {
        let now = Instant::now();
        let due: Vec<Role> = self
            .slots
            .iter()
            .filter(|(_, s)| s.restart_at.is_some_and(|t| t <= now))
            .map(|(&r, _)| r)
            .collect();
        for role in due {
            match self.start(role) {
                Ok(Some(ready)) => {
                    if let Role::Front(f) = role {
                        if let Err(e) = wait_ready(Some(ready), f) {
                            error!(%role, "{e:#}");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    error!(%role, "restart failed: {e:#}");
                    if let Some(s) = self.slots.get_mut(&role) {
                        s.restart_at = Some(now + BACKOFF_MAX);
                    }
                }
            }
        }
        Ok(())
    }

    /// SIGUSR1: every failed worker is retried now, with a clean crash record.
    pub(super) fn revive(&mut self) {
        let now = Instant::now();
        for (role, s) in self.slots.iter_mut() {
            if s.failed && s.pid.is_none() {
                info!(%role, "revived by SIGUSR1: retrying now");
                s.crashes.clear();
                s.fail_count = 0;
                s.restart_at = Some(now);
            }
        }
    }

    /// Workers that attached, and failed workers whose retry has run long enough to count
    /// as healthy again.
    pub(super) fn watch_lifecycles(&mut self) {
        let mut recovered = false;
        for w in 0..self.workers {
            let Some(s) = self.slots.get_mut(&Role::Worker(w)) else {
                continue;
            };
            if s.pid.is_none() {
                continue;
            }
            if !self.ever_attached && worker_attaches(&self.rings, w) != s.attach_base {
                self.ever_attached = true;
            }
            if s.failed && s.started.elapsed() >= STABLE_AFTER {
                info!(
                    worker = w,
                    "failed worker ran stably after its retry: healthy again"
                );
                s.failed = false;
                s.fail_count = 0;
                recovered = true;
            }
        }
        if recovered {
            self.stats.header().pool_failed.store(0, Ordering::Relaxed);
        }
    }

    /// A dead front's connections died with it (the kernel closed them): give their places in
    /// the global admission counts back.
    fn forget_front_connections(&self, f: usize) {
        let fs = self.stats.front(f);
        let open = fs.conns_open.swap(0, Ordering::Relaxed);
        fs.conns_draining.store(0, Ordering::Relaxed);
        let total = &self.stats.header().conns_total;
        let _ = total.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
            Some(t.saturating_sub(open))
        });
        for slot in 0..shmrelay::stats::ADDR_SLOTS {
            self.stats.addr_slot(f, slot).store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_as_a_status_or_a_signal() {
        use nix::sys::signal::Signal;
        use nix::unistd::Pid;
        let p = Pid::from_raw(1960);
        let s = |w| Ended(w).to_string();
        assert_eq!(s(WaitStatus::Exited(p, 0)), "exited with status 0");
        assert_eq!(s(WaitStatus::Exited(p, 3)), "exited with status 3");
        assert_eq!(
            s(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            "killed by SIGKILL"
        );
        assert_eq!(
            s(WaitStatus::Signaled(p, Signal::SIGSEGV, true)),
            "killed by SIGSEGV (core dumped)"
        );
    }

    #[test]
    fn quick_crashes_back_off_from_the_second_restart_up_to_the_cap() {
        let ms = |n| restart_delay(n).as_millis();
        assert_eq!([ms(0), ms(1), ms(2), ms(3), ms(4)], [0, 0, 100, 200, 400]);
        assert_eq!(ms(7), 3200);
        assert_eq!(restart_delay(8), BACKOFF_MAX);
        assert_eq!(restart_delay(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn failed_workers_are_retried_after_a_doubling_delay_up_to_the_maximum() {
        let max = Duration::from_secs(60);
        let s = |n| failed_retry(n, max).as_secs();
        assert_eq!([s(1), s(2), s(3), s(6)], [1, 2, 4, 32]);
        assert_eq!(failed_retry(7, max), max);
        assert_eq!(failed_retry(u32::MAX, max), max);
        assert_eq!(
            failed_retry(3, Duration::from_millis(1500)).as_millis(),
            1500
        );
    }
}
