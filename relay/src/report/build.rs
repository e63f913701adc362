//! Building an [`InstanceReport`] from a stats segment and the view the supervisor publishes.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use shm_ring::{RingSnapshot, SideSnapshot};
use shmrelay_worker::CloseReason;

use super::liveness::{process_liveness, Liveness, STALL_AFTER};
use super::{
    ConnectionStates, DeadLetter, FrontReport, InstanceReport, LeakReport, ReportError, RingReport,
    RttBucket, SideReport, StaleRing, WorkerReport,
};
use crate::names::{self, Dir};
use crate::stats::{
    unix_ms, FrontStats, RejectReason, Stats, WorkerState, MAX_FRONTS, MAX_WORKERS, RTT_BUCKETS,
};
use crate::view::View;

impl InstanceReport {
    /// Reads instance `name` from the shm directory ([`names::shm_dir`]).
    ///
    /// # Errors
    ///
    /// [`ReportError::NotFound`] without a stats segment, [`ReportError::Stats`] when it cannot
    /// be mapped or validated. Rings that cannot be read are reported in
    /// [`RingReport::error`], not as an error.
    pub fn read(name: &str) -> Result<InstanceReport, ReportError> {
        let path = names::stats_path(name);
        let view = View::read(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ReportError::NotFound {
                    name: name.to_owned(),
                    path: path.clone(),
                }
            } else {
                ReportError::Stats {
                    path: path.clone(),
                    source: e.into_io(),
                }
            }
        })?;
        Ok(InstanceReport::build(
            name,
            &path,
            &view.stats,
            Some(&view),
            view.live,
        ))
    }

    /// Builds the report from a stats segment without ring snapshots (every ring is reported
    /// with an error); alive while the recorded supervisor pid exists.
    pub fn from_stats(name: &str, stats_path: &Path, stats: &Stats) -> InstanceReport {
        let pid = stats.header().supervisor_pid.load(Ordering::Relaxed);
        let alive = pid != 0 && process_liveness(pid) != Liveness::Dead;
        InstanceReport::build(name, stats_path, stats, None, alive)
    }

    pub(super) fn build(
        name: &str,
        stats_path: &Path,
        stats: &Stats,
        view: Option<&View>,
        alive: bool,
    ) -> InstanceReport {
        let now_ns = shm_ring::monotonic_ns();
        let now_ms = unix_ms();
        let h = stats.header();
        let ld = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // Untrusted counts: clamp to the layout's bounds.
        let nf = (h.fronts.load(Ordering::Relaxed) as usize).min(MAX_FRONTS);
        let nw = (h.workers.load(Ordering::Relaxed) as usize).min(MAX_WORKERS);
        let supervisor_pid = h.supervisor_pid.load(Ordering::Relaxed);
        let started = ld(&h.started_unix_ms);

        let fronts: Vec<FrontReport> = (0..nf).map(|f| front_report(stats, f, now_ns)).collect();
        let workers: Vec<WorkerReport> = (0..nw)
            .map(|w| {
                let ws = stats.worker(w);
                let pid = ws.pid.load(Ordering::Relaxed);
                WorkerReport {
                    index: w,
                    pid,
                    liveness: process_liveness(pid),
                    state: WorkerState::from_code(ws.state.load(Ordering::Relaxed)),
                    restarts: ws.restarts.load(Ordering::Relaxed),
                    crashes: ld(&ws.crashes),
                    hangs: ld(&ws.hangs),
                    started_unix_ms: ld(&ws.started_unix_ms),
                    rss_kb: ld(&ws.rss_kb),
                    fds: ld(&ws.fds),
                    redeliveries: request_words(
                        view,
                        nf,
                        w,
                        shmrelay_worker::protocol::REDELIVERED_WORD,
                    ),
                    skipped_answered: request_words(
                        view,
                        nf,
                        w,
                        shmrelay_worker::protocol::SKIPPED_WORD,
                    ),
                    dead_letters: ld(&ws.dead_letters),
                    last_dead_letter: (ld(&ws.dead_letters) > 0).then(|| {
                        let raw = ld(&ws.dead_letter_conn);
                        let id = shmrelay_worker::ConnId::from_raw(raw);
                        DeadLetter {
                            conn: if raw == 0 {
                                String::new()
                            } else {
                                id.to_string()
                            },
                            front: id.front(),
                            position: ld(&ws.dead_letter_pos),
                            unix_ms: ld(&ws.dead_letter_unix_ms),
                        }
                    }),
                }
            })
            .collect();
        let mut rings = Vec::with_capacity(nf * nw * 2);
        for f in 0..nf {
            for w in 0..nw {
                for d in [Dir::Request, Dir::Reply] {
                    rings.push(ring_report(name, view, f, w, d, now_ns));
                }
            }
        }
        let mut stale_rings = Vec::new();
        for r in &rings {
            for (side, s) in [("producer", &r.producer), ("consumer", &r.consumer)] {
                if s.liveness == Liveness::Dead {
                    stale_rings.push(StaleRing {
                        front: r.front,
                        worker: r.worker,
                        direction: r.direction,
                        side: side.to_owned(),
                        pid: s.pid,
                    });
                }
            }
        }
        let leaks = LeakReport {
            stale_segments_removed: ld(&h.stale_segments_removed),
            leaked_conns: ld(&h.leaked_conns),
            fd_growth_events: ld(&h.fd_growth_events),
            rss_growth_events: ld(&h.rss_growth_events),
            reclaimed_reservations: ld(&h.reclaimed_reservations),
            orphans_killed: ld(&h.orphans_killed),
            stale_rings,
        };
        let mut report = InstanceReport {
            name: name.to_owned(),
            stats_path: stats_path.display().to_string(),
            supervisor_pid,
            alive,
            uptime_secs: now_ms.saturating_sub(started) as f64 / 1000.0,
            started_unix_ms: started,
            taken_unix_ms: now_ms,
            supervisor_heartbeat_ms: ns_to_ms(now_ns.saturating_sub(ld(&h.supervisor_active_ns))),
            draining: h.draining.load(Ordering::Relaxed) != 0,
            pool_failed: h.pool_failed.load(Ordering::Relaxed) != 0,
            connections: ld(&h.conns_total),
            supervisor_rss_kb: ld(&h.supervisor_rss_kb),
            supervisor_fds: ld(&h.supervisor_fds),
            rates_interval_secs: None,
            fronts,
            workers,
            rings,
            leaks,
            problems: Vec::new(),
        };
        report.problems = report.find_problems();
        report
    }
}

fn front_report(stats: &Stats, f: usize, now_ns: u64) -> FrontReport {
    let fs: &FrontStats = stats.front(f);
    let proc = stats.front_process(f);
    let ld = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let pid = match proc.pid.load(Ordering::Relaxed) {
        0 => fs.pid.load(Ordering::Relaxed),
        p => p,
    };
    let rejects = RejectReason::ALL
        .iter()
        .map(|r| (r.as_str().to_owned(), ld(&fs.rejects[*r as usize])))
        .chain(
            (RejectReason::ALL.len()..fs.rejects.len())
                .filter(|&i| ld(&fs.rejects[i]) != 0)
                .map(|i| (format!("code_{i}"), ld(&fs.rejects[i]))),
        )
        .collect();
    let closes = (0..fs.closes.len())
        .filter_map(|i| {
            let n = ld(&fs.closes[i]);
            match CloseReason::ALL.get(i) {
                Some(r) => Some((r.as_str().to_owned(), n)),
                None if n != 0 => Some((format!("code_{i}"), n)),
                None => None,
            }
        })
        .collect();
    let (bytes_in, bytes_out, bytes_copied) =
        (ld(&fs.bytes_in), ld(&fs.bytes_out), ld(&fs.bytes_copied));
    let relayed = bytes_in.saturating_add(bytes_out);
    FrontReport {
        index: f,
        pid,
        liveness: process_liveness(pid),
        restarts: proc
            .restarts
            .load(Ordering::Relaxed)
            .max(fs.restarts.load(Ordering::Relaxed)),
        idle_ms: ns_to_ms(now_ns.saturating_sub(ld(&fs.active_ns))),
        connections: ConnectionStates {
            open: ld(&fs.conns_open),
            draining: ld(&fs.conns_draining),
        },
        accepts: ld(&fs.accepts),
        rejects,
        closes,
        heartbeats: ld(&fs.heartbeats),
        pings_sent: ld(&fs.pings_sent),
        protocol_errors: ld(&fs.protocol_errors),
        frames_in: ld(&fs.frames_in),
        frames_out: ld(&fs.frames_out),
        bytes_in,
        bytes_out,
        bytes_copied,
        copied_ratio: if relayed == 0 {
            0.0
        } else {
            bytes_copied as f64 / relayed as f64
        },
        stale_replies: ld(&fs.stale_replies),
        ring_full_stalls: ld(&fs.ring_full_stalls),
        corrupt_rings: ld(&fs.corrupt_rings),
        retransmits: ld(&fs.retransmits),
        paused: ld(&fs.paused) != 0,
        rtt_histogram: (0..RTT_BUCKETS)
            .map(|i| RttBucket {
                below_us: rtt_bucket_bound(i),
                count: ld(&fs.rtt_hist[i]),
            })
            .collect(),
        rss_kb: ld(&proc.rss_kb),
        fds: ld(&proc.fds),
        rates: None,
        io_errors: crate::stats::IoErrorClass::ALL
            .iter()
            .map(|c| (c.as_str().to_owned(), ld(&fs.io_errors[*c as usize])))
            .collect(),
        lag_ms: ld(&fs.lag_ms),
    }
}

/// Exclusive upper bound (µs) of RTT bucket `i`: the front files a sample of `us`
/// microseconds under `floor(log2(max(us, 1)))`, so bucket `i` holds `[2^i, 2^(i+1))` (bucket 0
/// also holds 0) and the last bucket everything above.
pub fn rtt_bucket_bound(i: usize) -> Option<u64> {
    (i + 1 < RTT_BUCKETS).then(|| 1u64 << (i + 1))
}

/// Sums user word `word` over worker `w`'s request rings.
fn request_words(view: Option<&View>, fronts: usize, w: usize, word: usize) -> u64 {
    let Some(view) = view else { return 0 };
    (0..fronts)
        .filter_map(|f| view.ring(f, w, Dir::Request))
        .map(|r| r.user.get(word).copied().unwrap_or(0))
        .fold(0, u64::saturating_add)
}

fn ring_report(
    instance: &str,
    view: Option<&View>,
    f: usize,
    w: usize,
    d: Dir,
    now_ns: u64,
) -> RingReport {
    let path = names::ring_path(instance, f, w, d);
    let path = format!(
        "memfd:{}",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut r = RingReport {
        front: f,
        worker: w,
        direction: d,
        path,
        error: None,
        capacity: 0,
        used: 0,
        fill_percent: 0.0,
        high_water: 0,
        records_in: 0,
        bytes_in: 0,
        records_out: 0,
        bytes_out: 0,
        full_events: 0,
        wakeups: 0,
        parks: 0,
        consumer_sleeping: false,
        answered_position: None,
        producer: SideReport::none(),
        consumer: SideReport::none(),
        rates: None,
    };
    let Some(snap) = view.and_then(|v| v.ring(f, w, d)) else {
        r.error = Some("not in the published view".to_owned());
        return r;
    };
    let s: RingSnapshot = snap.snapshot;
    // Positions come from another process: a torn or corrupt pair must not produce nonsense.
    let used = s.tail.saturating_sub(s.head).min(s.capacity);
    r.capacity = s.capacity;
    r.used = used;
    r.fill_percent = if s.capacity == 0 {
        0.0
    } else {
        100.0 * used as f64 / s.capacity as f64
    };
    r.high_water = s.producer.high_water.min(s.capacity);
    r.records_in = s.producer.records;
    r.bytes_in = s.producer.bytes;
    r.records_out = s.consumer.records;
    r.bytes_out = s.consumer.bytes;
    r.full_events = s.producer.full_events;
    r.wakeups = s
        .producer
        .wakeups_sent
        .saturating_add(s.consumer.wakeups_sent);
    r.parks = s.producer.parks.saturating_add(s.consumer.parks);
    r.consumer_sleeping = s.consumer_sleeping;
    if d == Dir::Request {
        r.answered_position = snap
            .user
            .get(shmrelay_worker::protocol::ANSWERED_WORD)
            .copied();
    }
    r.producer = side_report(&s.producer, false, used, now_ns);
    r.consumer = side_report(&s.consumer, true, used, now_ns);
    r
}

impl SideReport {
    fn none() -> SideReport {
        SideReport {
            pid: 0,
            liveness: Liveness::None,
            attach_count: 0,
            idle_ms: 0,
        }
    }
}

fn side_report(s: &SideSnapshot, consumer: bool, used: u64, now_ns: u64) -> SideReport {
    let idle_ns = now_ns.saturating_sub(s.active_ns);
    let mut liveness = process_liveness(s.pid);
    if consumer
        && liveness == Liveness::Alive
        && used > 0
        && idle_ns > STALL_AFTER.as_nanos() as u64
    {
        liveness = Liveness::Stalled;
    }
    SideReport {
        pid: s.pid,
        liveness,
        attach_count: s.attach_count,
        idle_ms: ns_to_ms(idle_ns),
    }
}

fn ns_to_ms(ns: u64) -> u64 {
    ns / 1_000_000
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::report::fill_rates;
    use crate::report::tests::TempShm;

    #[test]
    fn rtt_bounds_match_the_fronts_bucketing() {
        assert_eq!(rtt_bucket_bound(0), Some(2));
        assert_eq!(rtt_bucket_bound(9), Some(1024));
        assert_eq!(rtt_bucket_bound(RTT_BUCKETS - 1), None);
    }

    #[test]
    fn report_from_a_fresh_segment_and_rates() {
        // SHMRELAY_SHM_DIR is process-global: the ring paths of this report point into it, but
        // `from_stats` only opens rings by name, which here do not exist and become errors.
        let tmp = TempShm::new("fresh");
        let path = tmp.0.join("shmrelay.unit.stats");
        let stats = Stats::create(&path, 1, 2).unwrap();
        crate::stats::add(&stats.front(0).accepts, 3);
        crate::stats::add(&stats.front(0).bytes_in, 100);
        crate::stats::add(&stats.front(0).bytes_copied, 1);
        crate::stats::add(&stats.front(0).closes[CloseReason::ClientEof as usize], 2);
        let reset = std::io::Error::from_raw_os_error(libc::ECONNRESET);
        crate::stats::count_io_error(stats.front(0), &reset);
        let a = InstanceReport::from_stats("unit-nonexistent", &path, &stats);
        assert!(a.alive);
        assert_eq!(a.fronts.len(), 1);
        assert_eq!(a.workers.len(), 2);
        assert_eq!(a.rings.len(), 4);
        assert!(a.rings.iter().all(|r| r.error.is_some()));
        assert_eq!(a.fronts[0].closes["client_eof"], 2);
        assert_eq!(a.fronts[0].io_errors["reset"], 1);
        assert_eq!(a.fronts[0].io_errors["timed_out"], 0);
        assert_eq!(a.fronts[0].rejects.len(), RejectReason::ALL.len());
        assert!((a.fronts[0].copied_ratio - 0.01).abs() < 1e-9);
        crate::stats::add(&stats.front(0).bytes_in, 500);
        let mut b = InstanceReport::from_stats("unit-nonexistent", &path, &stats);
        fill_rates(&a, &mut b, Duration::from_millis(500));
        let r = b.fronts[0].rates.unwrap();
        assert!((r.bytes_in_per_sec - 1000.0).abs() < 1e-9);
        assert_eq!(b.rates_interval_secs, Some(0.5));
        // The JSON round-trips.
        let json = serde_json::to_string(&b).unwrap();
        let back: InstanceReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
    }
}
