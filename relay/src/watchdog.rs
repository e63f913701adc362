//! What the supervisor watches besides exits: hung workers, and leaks (memory and fd growth,
//! orphaned processes).

use std::time::{Duration, Instant};

use shm_ring::RingStorage;
use shm_ring::ShmRing;
use shmrelay::procfs;

use std::sync::atomic::Ordering;

/// What /proc says of a process's memory and fds.
#[derive(Clone, Copy, Debug)]
pub struct ProcessMetrics {
    /// Resident memory, KiB (shared ring pages it touched included).
    pub rss_kb: u64,
    /// Private resident memory, KiB: what a leak grows (rings are shared and are touched
    /// lazily, so they grow a process's RSS as traffic reaches their pages).
    pub private_kb: u64,
    pub fds: u64,
}

/// Resident memory (KiB) and open fds of a process, from /proc.
pub fn process_metrics(pid: u32) -> Option<ProcessMetrics> {
    let (rss_kb, private_kb) = procfs::rss_and_private_kib(Some(pid)).unwrap_or((0, None));
    let private_kb = private_kb.unwrap_or(rss_kb);
    let fds = procfs::open_fds(Some(pid))?;
    Some(ProcessMetrics {
        rss_kb,
        private_kb,
        fds,
    })
}

/// Tracks one process's memory and fds against a baseline taken once it has settled, and
/// says when either grew past its allowance (once per incident).
#[derive(Default)]
pub struct Growth {
    pid: u32,
    since: Option<Instant>,
    base_rss: u64,
    base_fds: u64,
    rss_flagged: bool,
    fds_flagged: bool,
}

/// What a sample found.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct GrowthEvents {
    pub rss: bool,
    pub fds: bool,
}

impl Growth {
    /// Settling time before the baseline is taken.
    const SETTLE: Duration = Duration::from_secs(5);

    /// Feeds a sample. `expected_fds` and `expected_kb` are what the process legitimately holds
    /// beyond its baseline now (a front's connections).
    pub fn sample(
        &mut self,
        pid: u32,
        rss_kb: u64,
        fds: u64,
        expected_fds: u64,
        expected_kb: u64,
    ) -> GrowthEvents {
        if pid != self.pid {
            *self = Growth {
                pid,
                since: Some(Instant::now()),
                ..Growth::default()
            };
        }
        let since = self.since.get_or_insert_with(Instant::now);
        if since.elapsed() < Self::SETTLE {
            return GrowthEvents::default();
        }
        if self.base_rss == 0 {
            self.base_rss = rss_kb.saturating_sub(expected_kb);
            self.base_fds = fds.saturating_sub(expected_fds);
            return GrowthEvents::default();
        }
        // Allowances: fds are exact but for a little slack; memory may double before anyone
        // should call it a leak.
        let fds_over = fds > self.base_fds + expected_fds + 16;
        let rss_over = rss_kb > 2 * self.base_rss + expected_kb + 64 * 1024;
        let ev = GrowthEvents {
            rss: rss_over && !self.rss_flagged,
            fds: fds_over && !self.fds_flagged,
        };
        self.rss_flagged = rss_over;
        self.fds_flagged = fds_over;
        ev
    }
}

/// Watches one request ring for a consumer that stopped consuming while frames wait.
#[derive(Default)]
pub struct HangWatch {
    last_head: u64,
    stuck_since: Option<Instant>,
    reported: bool,
}

/// The watch's verdict on one sample.
#[derive(Debug, PartialEq, Eq)]
pub enum Hang {
    /// Consuming, or nothing to consume.
    Fine,
    /// Frames waited longer than the timeout without the consumer moving: report once.
    Detected(Duration),
    /// Still hung (already reported).
    Ongoing,
    /// It moved again after a reported hang.
    Recovered,
}

impl HangWatch {
    /// Samples the ring. An idle consumer (empty ring) is never hung, however long it sleeps.
    pub fn sample(&mut self, ring: &ShmRing, timeout: Duration) -> Hang {
        let h = ring.header();
        let head = h.head.load(Ordering::Relaxed);
        let tail = h.tail.load(Ordering::Relaxed);
        if head != self.last_head || tail == head {
            self.last_head = head;
            self.stuck_since = None;
            if std::mem::take(&mut self.reported) {
                return Hang::Recovered;
            }
            return Hang::Fine;
        }
        let Some(since) = self.stuck_since else {
            self.stuck_since = Some(Instant::now());
            return Hang::Fine;
        };
        if since.elapsed() < timeout {
            Hang::Fine
        } else if self.reported {
            Hang::Ongoing
        } else {
            self.reported = true;
            Hang::Detected(since.elapsed())
        }
    }

    /// Forgets the state (after the consumer was replaced).
    pub fn reset(&mut self) {
        *self = HangWatch::default();
    }
}

/// The children of `parent` (from /proc), each with whether it is a zombie (exited, not yet
/// reaped).
pub fn children(parent: u32) -> Vec<(u32, bool)> {
    procfs::pids()
        .filter_map(|pid| {
            let s = procfs::stat(pid).ok()?;
            (s.ppid == parent).then_some((pid, s.state == 'Z'))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_flagged_once_per_incident() {
        let mut g = Growth {
            pid: 7,
            since: Some(Instant::now() - Duration::from_secs(10)),
            ..Growth::default()
        };
        assert_eq!(
            g.sample(7, 10_000, 20, 0, 0),
            GrowthEvents::default(),
            "baseline"
        );
        assert_eq!(
            g.sample(7, 10_000, 30, 0, 0),
            GrowthEvents::default(),
            "within slack"
        );
        assert_eq!(
            g.sample(7, 10_000, 100, 0, 0),
            GrowthEvents {
                rss: false,
                fds: true
            }
        );
        assert_eq!(
            g.sample(7, 10_000, 120, 0, 0),
            GrowthEvents::default(),
            "same incident"
        );
        assert_eq!(
            g.sample(7, 10_000, 100, 90, 0),
            GrowthEvents::default(),
            "expected fds"
        );
        assert_eq!(
            g.sample(7, 200_000, 20, 0, 0),
            GrowthEvents {
                rss: true,
                fds: false
            }
        );
    }

    #[test]
    fn idle_rings_are_never_hung() {
        let ring = ShmRing::create_memfd("hang", 4096).unwrap();
        let mut w = HangWatch::default();
        assert_eq!(w.sample(&ring, Duration::ZERO), Hang::Fine);
        let mut tx = shm_ring::Producer::new(&ring).unwrap();
        tx.push(shm_ring::Meta::tag(1), b"x").unwrap();
        tx.publish();
        assert_eq!(
            w.sample(&ring, Duration::ZERO),
            Hang::Fine,
            "first sight of frames starts the clock"
        );
        assert!(matches!(w.sample(&ring, Duration::ZERO), Hang::Detected(_)));
        assert_eq!(w.sample(&ring, Duration::ZERO), Hang::Ongoing);
        let mut rx = shm_ring::Consumer::new(&ring).unwrap();
        let end = rx.records().unwrap().next().unwrap().unwrap().end();
        rx.release(end);
        assert_eq!(w.sample(&ring, Duration::ZERO), Hang::Recovered);
    }

    #[test]
    fn metrics_of_this_process() {
        let m = process_metrics(std::process::id()).unwrap();
        assert!(m.rss_kb > 0 && m.fds > 0);
        assert!(m.private_kb > 0 && m.private_kb <= m.rss_kb);
    }
}
