//! The front watchdog's clock: how long a front has gone without loop activity in its own
//! time, which stops while the kernel keeps the front runnable but off the CPU.
//!
//! Between two looks (the supervisor looks every 100 ms):
//! - a front that is runnable at the second look (`R`: on a CPU, or waiting for one because
//!   the machine is overloaded or its cgroup's CPU quota is spent) is charged only the CPU
//!   time it got. A spinning front burns its CPU and is caught; a starved one gets none and
//!   is not. The run-queue wait of `/proc/PID/schedstat` cannot tell this alone: it only grows
//!   when a wait ends, so a front starved in one piece for longer than the timeout shows no
//!   wait at all until it runs again (the first rule, e39d4ad, killed such fronts);
//! - a front that is not runnable (stopped, sleeping, blocked) is charged the interval minus
//!   the waits for a CPU that ended in it (a front that ran late and then went back to sleep
//!   in its poll has stamped activity anyway, which restarts the clock).
//!
//! Without `/proc` figures (the process is gone, no schedstat) the whole interval counts.
//!
//! `/proc` is read only for a front that looks stalled (no activity since the previous look):
//! the clock starts at the first such look (the interval before it is not charged, so a stall
//! is caught at most one look later), and a front seen active is not looked at. At 56 fronts
//! reading two `/proc` files of each every 100 ms was 1 us of supervisor CPU per heartbeat of
//! a 100,000-connection relay (issue 15).

use std::time::{Duration, Instant};

use shmrelay::procfs::{self, SchedTimes};

/// One look at a front process.
#[derive(Clone, Copy, Debug)]
pub(super) struct Look {
    at: Instant,
    /// Runnable (state `R`) and its scheduler times, if `/proc` had them.
    sched: Option<(bool, SchedTimes)>,
}

impl Look {
    /// Looks at process `pid` now.
    pub(super) fn of(pid: u32) -> Look {
        let state = procfs::stat(pid).ok().map(|s| s.state);
        Look {
            at: Instant::now(),
            sched: state
                .zip(procfs::sched_times(pid))
                .map(|(s, t)| (s == 'R', t)),
        }
    }
}

/// Own time without loop activity since the clock was last restarted.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct StallClock {
    last: Option<Look>,
    stalled: Duration,
}

impl StallClock {
    /// Counts again from `look` (the first look at a front that looks stalled).
    pub(super) fn restart(&mut self, look: Look) {
        *self = StallClock {
            last: Some(look),
            stalled: Duration::ZERO,
        };
    }

    /// One look of the watchdog: `moved` says whether the front's loop-activity stamp changed
    /// since the previous look. A front seen active stops the clock without `/proc` being read;
    /// one that looks stalled is looked at (`look`, which reads `/proc`): the first such look
    /// starts the clock, the next ones charge it. Returns the total charged so far, or `None`
    /// when `/proc` was not read.
    pub(super) fn observe(&mut self, moved: bool, look: impl FnOnce() -> Look) -> Option<Duration> {
        if moved {
            *self = StallClock::default();
            return None;
        }
        let look = look();
        if self.last.is_none() {
            self.restart(look);
            return Some(Duration::ZERO);
        }
        Some(self.advance(look))
    }

    /// Charges the interval since the previous look; returns the total so far.
    pub(super) fn advance(&mut self, look: Look) -> Duration {
        if let Some(last) = self.last {
            let dt = look.at.saturating_duration_since(last.at);
            self.stalled += match (last.sched, look.sched) {
                (Some((_, a)), Some((true, b))) => {
                    Duration::from_nanos(b.on_cpu_ns.saturating_sub(a.on_cpu_ns)).min(dt)
                }
                (Some((_, a)), Some((false, b))) => dt.saturating_sub(Duration::from_nanos(
                    b.run_queue_wait_ns.saturating_sub(a.run_queue_wait_ns),
                )),
                _ => dt,
            };
        }
        self.last = Some(look);
        self.stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Looks every 100 ms for `secs` seconds; `at(i)` gives (runnable, on-CPU ms, waited ms)
    /// at look `i`; returns the clock's total.
    fn run(secs: u64, at: impl Fn(u64) -> Option<(bool, u64, u64)>) -> Duration {
        let t0 = Instant::now();
        let look = |i: u64| Look {
            at: t0 + Duration::from_millis(100 * i),
            sched: at(i).map(|(r, cpu, wait)| {
                (
                    r,
                    SchedTimes {
                        on_cpu_ns: cpu * MS,
                        run_queue_wait_ns: wait * MS,
                    },
                )
            }),
        };
        let mut c = StallClock::default();
        c.restart(look(0));
        let mut total = Duration::ZERO;
        for i in 1..=secs * 10 {
            total = c.advance(look(i));
        }
        total
    }

    #[test]
    fn a_stopped_or_blocked_front_is_charged_the_wall_time() {
        assert_eq!(run(5, |_| Some((false, 7, 3))), Duration::from_secs(5));
    }

    #[test]
    fn a_front_starved_in_one_wait_is_charged_nothing() {
        // Runnable all along, no CPU, and the wait not reported yet (it has not ended).
        assert_eq!(run(10, |_| Some((true, 7, 3))), Duration::ZERO);
    }

    #[test]
    fn a_spinning_front_is_charged_its_cpu_time() {
        // Alone on a CPU: all of it. On a loaded machine: its share.
        assert_eq!(run(5, |i| Some((true, 100 * i, 0))), Duration::from_secs(5));
        assert_eq!(
            run(5, |i| Some((true, 25 * i, 75 * i))),
            Duration::from_millis(1250)
        );
    }

    #[test]
    fn waits_that_ended_are_taken_off_a_front_seen_asleep() {
        // Each 100 ms: waited 60, slept 40, seen asleep.
        assert_eq!(run(5, |i| Some((false, 0, 60 * i))), Duration::from_secs(2));
    }

    #[test]
    fn without_proc_figures_the_wall_time_counts() {
        assert_eq!(run(3, |_| None), Duration::from_secs(3));
        // Figures lost half way (the process went away): from then on.
        assert_eq!(
            run(2, |i| (i <= 10).then_some((true, 0, 0))),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn proc_is_read_only_for_a_front_that_looks_stalled() {
        let now = Instant::now();
        let reads = std::cell::Cell::new(0);
        let look = |ms: u64| {
            reads.set(reads.get() + 1);
            Look {
                at: now + Duration::from_millis(ms),
                sched: None,
            }
        };
        let mut c = StallClock::default();
        // Active at every look: never read.
        for i in 0..50 {
            assert_eq!(c.observe(true, || look(100 * i)), None);
        }
        assert_eq!(reads.get(), 0);
        // Still from 5,000 ms: the first look starts the clock, the next ones charge it.
        assert_eq!(c.observe(false, || look(5000)), Some(Duration::ZERO));
        assert_eq!(
            c.observe(false, || look(5100)),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            c.observe(false, || look(5300)),
            Some(Duration::from_millis(300))
        );
        assert_eq!(reads.get(), 3);
        // Active again: the clock stops, and the next stall counts from its own first look.
        assert_eq!(c.observe(true, || look(5400)), None);
        assert_eq!(c.observe(false, || look(9000)), Some(Duration::ZERO));
        assert_eq!(
            c.observe(false, || look(9100)),
            Some(Duration::from_millis(100))
        );
        assert_eq!(reads.get(), 5);
    }

    #[test]
    fn restart_starts_over() {
        let now = Instant::now();
        let look = |ms: u64| Look {
            at: now + Duration::from_millis(ms),
            sched: None,
        };
        let mut c = StallClock::default();
        // The first look only sets the start.
        assert_eq!(c.advance(look(0)), Duration::ZERO);
        assert_eq!(c.advance(look(300)), Duration::from_millis(300));
        c.restart(look(400));
        assert_eq!(c.advance(look(450)), Duration::from_millis(50));
    }
}
