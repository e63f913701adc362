//! Point-in-time reports of an instance, read from its shared memory through read-only
//! mappings, for `relayctl` and the Prometheus endpoint.
//!
//! Reading a report never writes to the relay's memory and takes no lock the relay could wait
//! on: it copies the operators' view the supervisor publishes ([`View::read`]: the counters
//! and a snapshot of every ring; see [`crate::view`]) into private memory, opened without
//! blocking or trusting it, and bounds every value it uses. Every value is a relaxed load of a counter another process is
//! updating, so a report is consistent enough for display, not an atomic snapshot: for example
//! `records_out` of a ring can briefly exceed what `used` suggests.
//!
//! Rates need two reports: take one, wait, take another and call [`fill_rates`].
//! [`prometheus`] renders a report in the Prometheus text format; [`host`] finds instances,
//! dead instances' segments and orphan files in the shm directory, and removes the dead ones.
//!
//! # Wire format
//!
//! `relayctl stat --json` prints one [`InstanceReport`] as a JSON object, `relayctl top --json`
//! one per line per refresh; `relayctl list --json`, `leaks --json` and `gc --json` print a
//! [`host::ListReport`], [`host::LeaksReport`] and [`host::GcReport`]. The structs in this module
//! *are* the schema: each field's rustdoc gives its meaning and unit, and deserialising the
//! output with these types (as the tests do) is the way to consume it from Rust.
//!
//! Conventions:
//!
//! - Field names are snake_case; enums are lowercase strings (`"request"`, `"alive"`, ...).
//! - Counters (`..._total` in Prometheus) are unsigned integers counted since the instance
//!   started; they never decrease except when the process that writes them restarts (front and
//!   ring counters can then start again from zero).
//! - Units are in the name or the doc: `_secs` seconds, `_ms` milliseconds, `_kb` KiB,
//!   `bytes` bytes, `_per_sec` per second averaged over the interval between two reports.
//! - Maps keyed by reason (`rejects`, `closes`) list every known reason, zeros included, so a
//!   consumer can rely on the keys; a counter slot with no known name appears as `code_N`.
//! - Rate fields are `null` in a report taken on its own, numbers after [`fill_rates`].
//! - New fields may be added; consumers should ignore fields they do not know. Renaming or
//!   removing a field is a breaking change of the schema.
//!
//! A shortened example of an [`InstanceReport`]:
//!
//! ```json
//! {
//!   "name": "edge", "supervisor_pid": 4242, "alive": true, "uptime_secs": 812.4,
//!   "started_unix_ms": 1718000000000, "taken_unix_ms": 1718000812400,
//!   "supervisor_heartbeat_ms": 12, "draining": false, "pool_failed": false,
//!   "connections": 128, "supervisor_rss_kb": 5120, "supervisor_fds": 31,
//!   "rates_interval_secs": 1.0,
//!   "fronts": [{ "index": 0, "pid": 4250, "liveness": "alive", "connections": {"open": 128, "draining": 0},
//!                "accepts": 130, "rejects": {"conn_limit": 0, "...": 0}, "closes": {"client_eof": 2, "...": 0},
//!                "frames_in": 90211, "bytes_in": 9021100, "copied_ratio": 0.0004, "...": "...",
//!                "rates": {"frames_in_per_sec": 1200.0, "...": 0.0} }],
//!   "workers": [{ "index": 0, "pid": 4251, "liveness": "alive", "state": "running", "restarts": 0, "...": 0 }],
//!   "rings": [{ "front": 0, "worker": 0, "direction": "request", "capacity": 4194304, "used": 0,
//!               "fill_percent": 0.0, "producer": {"pid": 4250, "liveness": "alive", "...": 0}, "...": 0 }],
//!   "leaks": { "stale_segments_removed": 0, "stale_rings": [], "...": 0 },
//!   "problems": []
//! }
//! ```

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shm_ring::{RingSnapshot, SideSnapshot};
use shmrelay_worker::CloseReason;

use crate::names::{self, Dir};
use crate::stats::{
    unix_ms, FrontStats, RejectReason, Stats, WorkerState, MAX_FRONTS, MAX_WORKERS, RTT_BUCKETS,
};
use crate::view::View;

pub mod host;
pub(crate) mod prom;

pub use prom::prometheus;

/// A ring side or process that has not touched its ring for longer than this while the ring
/// holds unconsumed bytes is reported [`Liveness::Stalled`].
pub const STALL_AFTER: Duration = Duration::from_secs(1);

/// Why a report could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// No stats segment for this instance in the shm directory.
    #[error("no instance `{name}`: {} does not exist", path.display())]
    NotFound { name: String, path: PathBuf },
    /// The stats segment exists but could not be mapped or is not a valid stats segment
    /// (another layout version, truncated, not initialised).
    #[error("reading the stats segment {}: {source}", path.display())]
    Stats {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether a process is there and making progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// The process exists and is not stopped.
    Alive,
    /// The process exists but makes no progress: it is stopped (SIGSTOP, a debugger), or, for
    /// the consumer of a ring, it has not touched the ring for more than [`STALL_AFTER`] while
    /// the ring holds unconsumed records.
    Stalled,
    /// A pid is recorded but no such process exists (or it is a zombie).
    Dead,
    /// No pid recorded (never attached, or detached cleanly).
    None,
}

impl Liveness {
    /// Stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Stalled => "stalled",
            Liveness::Dead => "dead",
            Liveness::None => "none",
        }
    }
}

/// Direction of a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Front to worker (`.req` file).
    Request,
    /// Worker to front (`.rep` file).
    Reply,
}

impl Direction {
    /// Stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Reply => "reply",
        }
    }

    fn dir(self) -> Dir {
        match self {
            Direction::Request => Dir::Request,
            Direction::Reply => Dir::Reply,
        }
    }
}

/// One instance: `relayctl stat --json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// Instance name (the `NAME` in `shmrelay.NAME.*`).
    pub name: String,
    /// Path of the stats segment read.
    pub stats_path: String,
    /// pid of the supervisor that created the instance.
    pub supervisor_pid: u32,
    /// True while the supervisor process exists (a SIGSTOPped supervisor is still alive; see
    /// `supervisor_heartbeat_ms`).
    pub alive: bool,
    /// Seconds since the supervisor started (for a dead instance: since it had started).
    pub uptime_secs: f64,
    /// When the supervisor started, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// When this report was read, milliseconds since the Unix epoch.
    pub taken_unix_ms: u64,
    /// Milliseconds since the supervisor's loop last stamped its heartbeat (it does so several
    /// times a second while it runs).
    pub supervisor_heartbeat_ms: u64,
    /// The instance is shutting down and draining its connections.
    pub draining: bool,
    /// The worker pool crashed too often and was marked failed: new connections are refused.
    pub pool_failed: bool,
    /// Connections open across all fronts (what the global connection cap counts).
    pub connections: u64,
    /// Resident memory of the supervisor, KiB (0 until first measured).
    pub supervisor_rss_kb: u64,
    /// Open file descriptors of the supervisor (0 until first measured).
    pub supervisor_fds: u64,
    /// Seconds between the two reports the rates were computed from; `null` without rates.
    pub rates_interval_secs: Option<f64>,
    /// One entry per configured front, by index.
    pub fronts: Vec<FrontReport>,
    /// One entry per configured worker slot, by index.
    pub workers: Vec<WorkerReport>,
    /// Two rings (request and reply) per front x worker pair, ordered by front, worker,
    /// direction.
    pub rings: Vec<RingReport>,
    /// Leak detector counters and stale rings.
    pub leaks: LeakReport,
    /// Human-readable findings that need attention (dead instance, failed pool, hung or dead
    /// worker, stalled or dead ring side, leaks). Empty when all is well; `relayctl stat`
    /// exits 1 when it is not.
    pub problems: Vec<String>,
}

/// One front process: connections, admission, framing and byte counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrontReport {
    /// Front index.
    pub index: usize,
    /// pid of the current front process (0: not running).
    pub pid: u32,
    /// Whether that process is there (`stalled`: stopped).
    pub liveness: Liveness,
    /// Times the supervisor restarted this front (0 while its first process runs).
    pub restarts: u32,
    /// Milliseconds since the front's event loop last stamped its activity.
    pub idle_ms: u64,
    /// Connections by state.
    pub connections: ConnectionStates,
    /// Connections accepted.
    pub accepts: u64,
    /// Connections refused at accept, by reason (`conn_limit`, `per_address`, `rate`,
    /// `overload`, `no_worker`).
    pub rejects: BTreeMap<String, u64>,
    /// Connections closed, by reason (`other`, `client_eof`, `idle_timeout`,
    /// `heartbeat_timeout`, `protocol_error`, `worker_request`, `slow_consumer`,
    /// `worker_gone`, `shutdown`, `rejected`, `io_error`).
    pub closes: BTreeMap<String, u64>,
    /// Heartbeat (length 0) frames received from clients and answered by the front.
    pub heartbeats: u64,
    /// Heartbeat frames the front sent to idle clients.
    pub pings_sent: u64,
    /// Malformed or oversized frames (each closed its connection).
    pub protocol_errors: u64,
    /// Frames received from clients, heartbeats excluded.
    pub frames_in: u64,
    /// Reply records written to clients.
    pub frames_out: u64,
    /// Bytes read from clients into request rings.
    pub bytes_in: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// Bytes the front copied in user space (partial frames carried between reads, replies
    /// queued for slow clients).
    pub bytes_copied: u64,
    /// `bytes_copied / (bytes_in + bytes_out)`: 0 is fully zero-copy; 0 with no traffic.
    pub copied_ratio: f64,
    /// Reply records for connections that no longer existed.
    pub stale_replies: u64,
    /// Times a connection stopped being read because its request ring was full.
    pub ring_full_stalls: u64,
    /// Rings found corrupt and quarantined by this front.
    pub corrupt_rings: u64,
    /// TCP retransmissions summed over the TCP_INFO samples.
    pub retransmits: u64,
    /// The front stopped accepting because it is overloaded.
    pub paused: bool,
    /// Round-trip times sampled from TCP_INFO: counts per bucket (not cumulative), in bucket
    /// order; each bucket holds the samples below its `below_us` bound and at or above the
    /// previous bucket's bound.
    pub rtt_histogram: Vec<RttBucket>,
    /// Resident memory of the front process, KiB (0 until first measured).
    pub rss_kb: u64,
    /// Open file descriptors of the front process (0 until first measured).
    pub fds: u64,
    /// Per-second rates; `null` in a report taken on its own.
    pub rates: Option<FrontRates>,
}

/// Connections of one front by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStates {
    /// Open and served.
    pub open: u64,
    /// Closing once their queued replies are flushed.
    pub draining: u64,
}

/// One bucket of the RTT histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RttBucket {
    /// Exclusive upper bound in microseconds; `null` for the last bucket (no bound).
    pub below_us: Option<u64>,
    /// Samples in this bucket.
    pub count: u64,
}

/// A front's rates between two reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FrontRates {
    /// Connections accepted per second.
    pub accepts_per_sec: f64,
    /// Client frames received per second.
    pub frames_in_per_sec: f64,
    /// Reply records written per second.
    pub frames_out_per_sec: f64,
    /// Bytes read from clients per second.
    pub bytes_in_per_sec: f64,
    /// Bytes written to clients per second.
    pub bytes_out_per_sec: f64,
}

/// One worker slot, as the supervisor sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Worker index.
    pub index: usize,
    /// pid of the current worker process (0: none running).
    pub pid: u32,
    /// Whether that process is there (`stalled`: stopped).
    pub liveness: Liveness,
    /// `stopped`, `running`, `restarting` (waiting out its backoff), `failed` (crashed too
    /// often) or `hung` (not consuming a non-empty ring).
    pub state: String,
    /// Times the supervisor restarted this slot's process (0 while its first one runs).
    pub restarts: u32,
    /// Times the process died without being asked to.
    pub crashes: u64,
    /// Hangs detected (a non-empty ring not consumed within the hang timeout).
    pub hangs: u64,
    /// When the current process started, milliseconds since the Unix epoch (0: never).
    pub started_unix_ms: u64,
    /// Resident memory, KiB (0 until first measured).
    pub rss_kb: u64,
    /// Open file descriptors (0 until first measured).
    pub fds: u64,
    /// Frames handed to this worker slot flagged redelivered (they arrived before the current
    /// process attached), summed over its request rings, across restarts.
    #[serde(default)]
    pub redeliveries: u64,
    /// Frames a replacement skipped because its predecessor had already answered them.
    #[serde(default)]
    pub skipped_answered: u64,
    /// Frames dead-lettered: each crashed this worker at its first delivery and at
    /// `dead_letter_after` redeliveries; its connection got an error and was closed.
    #[serde(default)]
    pub dead_letters: u64,
    /// The last dead-lettered frame, if any.
    #[serde(default)]
    pub last_dead_letter: Option<DeadLetter>,
}

/// A dead-lettered frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its connection, `FRONT.GENERATION.SLOT` (empty if it could not be found in the ring).
    pub conn: String,
    /// The front of that connection.
    pub front: usize,
    /// The frame's end in the request ring from that front (a request position).
    pub position: u64,
    /// When it was dead-lettered, milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// One ring (one direction between one front and one worker).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RingReport {
    /// Front index.
    pub front: usize,
    /// Worker index.
    pub worker: usize,
    /// `request` (front -> worker) or `reply` (worker -> front).
    pub direction: Direction,
    /// Where the ring lives: rings are sealed memfds with no path, so this is
    /// `memfd:shmrelay.NAME.fF.wW.req|rep` (the name shown in `/proc/PID/fd`); the numbers are
    /// the supervisor's last published snapshot of it.
    pub path: String,
    /// Why the ring could not be read (missing, corrupt header); every number below is then 0.
    pub error: Option<String>,
    /// Data area size, bytes.
    pub capacity: u64,
    /// Bytes published and not yet released by the consumer (record headers included).
    pub used: u64,
    /// `100 * used / capacity`.
    pub fill_percent: f64,
    /// Most bytes ever in use, as recorded by the producer.
    pub high_water: u64,
    /// Records committed by the producer.
    pub records_in: u64,
    /// Payload bytes committed by the producer.
    pub bytes_in: u64,
    /// Records consumed.
    pub records_out: u64,
    /// Payload bytes consumed.
    pub bytes_out: u64,
    /// Reservations the producer was refused because the ring was full.
    pub full_events: u64,
    /// Wakeups sent by either side to the other (the producer waking a parked consumer, plus
    /// the consumer waking a producer that waited for space).
    pub wakeups: u64,
    /// Times either side parked.
    pub parks: u64,
    /// The consumer announced that it sleeps.
    pub consumer_sleeping: bool,
    /// Request rings: highest request position answered by a reply the front consumed (what a
    /// replacement worker resumes after). Reply rings: `null`.
    pub answered_position: Option<u64>,
    /// The producing process (the front for a request ring, the worker for a reply ring).
    pub producer: SideReport,
    /// The consuming process.
    pub consumer: SideReport,
    /// Per-second rates; `null` in a report taken on its own.
    pub rates: Option<RingRates>,
}

/// One side of a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideReport {
    /// pid of the attached process (0: none).
    pub pid: u32,
    /// `alive`, `stalled`, `dead` or `none` (see [`Liveness`]).
    pub liveness: Liveness,
    /// Times a process attached to this side (a restarted peer bumps it; a replaced worker's
    /// rings are a new generation, counted from zero).
    pub attach_count: u32,
    /// Milliseconds since this side last published, released or woke its peer (since the
    /// host booted if it never did).
    pub idle_ms: u64,
}

/// A ring's rates between two reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RingRates {
    /// Records committed per second.
    pub records_in_per_sec: f64,
    /// Payload bytes committed per second.
    pub bytes_in_per_sec: f64,
    /// Records consumed per second.
    pub records_out_per_sec: f64,
    /// Payload bytes consumed per second.
    pub bytes_out_per_sec: f64,
    /// Full events per second.
    pub full_events_per_sec: f64,
    /// Wakeups per second.
    pub wakeups_per_sec: f64,
}

/// The leak detector's counters (from the stats header) and what this report found itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeakReport {
    /// Stale segments of dead instances the supervisor removed at start (handled).
    pub stale_segments_removed: u64,
    /// Connection-table entries without a socket, or sockets without an entry, found by the
    /// fronts' self-checks (a leak).
    pub leaked_conns: u64,
    /// Times a process's open fds grew past its baseline allowance (a leak suspect).
    pub fd_growth_events: u64,
    /// Times a process's resident memory grew past its baseline allowance (a leak suspect).
    pub rss_growth_events: u64,
    /// Ring reservations abandoned by a dead producer and reclaimed (handled).
    pub reclaimed_reservations: u64,
    /// Orphan processes found and killed (handled).
    pub orphans_killed: u64,
    /// Rings whose producer or consumer pid belongs to no live process.
    pub stale_rings: Vec<StaleRing>,
}

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

/// A ring side that names a pid no longer alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleRing {
    /// Front index.
    pub front: usize,
    /// Worker index.
    pub worker: usize,
    /// Ring direction.
    pub direction: Direction,
    /// `producer` or `consumer`.
    pub side: String,
    /// The dead pid.
    pub pid: u32,
}

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

    fn build(
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
                    state: WorkerState::from_code(ws.state.load(Ordering::Relaxed))
                        .as_str()
                        .to_owned(),
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
                for d in [Direction::Request, Direction::Reply] {
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

    fn find_problems(&self) -> Vec<String> {
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
            if w.state == "hung" || w.state == "failed" {
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
    d: Direction,
    now_ns: u64,
) -> RingReport {
    let path = names::ring_path(instance, f, w, d.dir());
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
    let Some(snap) = view.and_then(|v| v.ring(f, w, d.dir())) else {
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
    if d == Direction::Request {
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

/// Liveness of a process by pid: `none` for 0, `dead` if it does not exist or is a zombie,
/// `stalled` if it is stopped, else `alive`.
pub fn process_liveness(pid: u32) -> Liveness {
    if pid == 0 {
        return Liveness::None;
    }
    match crate::procfs::stat(pid) {
        Ok(s) if s.is_zombie() => Liveness::Dead,
        Ok(s) if s.is_stopped() => Liveness::Stalled,
        Ok(_) => Liveness::Alive,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Liveness::Dead,
        // /proc unavailable or hidden: fall back to kill(pid, 0).
        Err(_) if shm_ring::process_alive(pid) => Liveness::Alive,
        Err(_) => Liveness::Dead,
    }
}

/// Fills the rates of `cur` from the counters' growth since `prev`, taken `interval` earlier.
///
/// Fronts are matched by index and rings by (front, worker, direction); a counter that went
/// down (its process restarted) counts as no growth. An interval of zero leaves `cur`
/// unchanged.
pub fn fill_rates(prev: &InstanceReport, cur: &mut InstanceReport, interval: Duration) {
    let secs = interval.as_secs_f64();
    if secs <= 0.0 {
        return;
    }
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    for f in &mut cur.fronts {
        let Some(p) = prev.fronts.iter().find(|p| p.index == f.index) else {
            continue;
        };
        f.rates = Some(FrontRates {
            accepts_per_sec: rate(p.accepts, f.accepts),
            frames_in_per_sec: rate(p.frames_in, f.frames_in),
            frames_out_per_sec: rate(p.frames_out, f.frames_out),
            bytes_in_per_sec: rate(p.bytes_in, f.bytes_in),
            bytes_out_per_sec: rate(p.bytes_out, f.bytes_out),
        });
    }
    for r in &mut cur.rings {
        let Some(p) = prev
            .rings
            .iter()
            .find(|p| (p.front, p.worker, p.direction) == (r.front, r.worker, r.direction))
        else {
            continue;
        };
        r.rates = Some(RingRates {
            records_in_per_sec: rate(p.records_in, r.records_in),
            bytes_in_per_sec: rate(p.bytes_in, r.bytes_in),
            records_out_per_sec: rate(p.records_out, r.records_out),
            bytes_out_per_sec: rate(p.bytes_out, r.bytes_out),
            full_events_per_sec: rate(p.full_events, r.full_events),
            wakeups_per_sec: rate(p.wakeups, r.wakeups),
        });
    }
    cur.rates_interval_secs = Some(secs);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A temp shm dir for one test; removed on drop.
    pub(crate) struct TempShm(pub PathBuf);

    impl TempShm {
        pub(crate) fn new(tag: &str) -> TempShm {
            let dir = std::env::temp_dir().join(format!(
                "shmrelay-report-{tag}-{}-{}",
                std::process::id(),
                unix_ms()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempShm(dir)
        }
    }

    impl Drop for TempShm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn liveness_of_pids() {
        assert_eq!(process_liveness(0), Liveness::None);
        assert_eq!(process_liveness(std::process::id()), Liveness::Alive);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(process_liveness(pid), Liveness::Dead);
    }

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
        let a = InstanceReport::from_stats("unit-nonexistent", &path, &stats);
        assert!(a.alive);
        assert_eq!(a.fronts.len(), 1);
        assert_eq!(a.workers.len(), 2);
        assert_eq!(a.rings.len(), 4);
        assert!(a.rings.iter().all(|r| r.error.is_some()));
        assert_eq!(a.fronts[0].closes["client_eof"], 2);
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

    /// A view full of garbage (valid magic and version, everything else random), read the way
    /// relayctl and the metrics endpoint read it: a report, rates between two of them, the
    /// Prometheus text. Nothing may panic (this runs with overflow checks).
    #[test]
    fn garbage_in_the_view_never_panics_a_reader() {
        use crate::stats::{STATS_MAGIC, STATS_SIZE, STATS_VERSION};
        use crate::view::{published_size, VIEW_MAGIC, VIEW_VERSION};
        let tmp = TempShm::new("garbage");
        let path = tmp.0.join("shmrelay.g.stats");
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut reports = Vec::new();
        for seed in 0..6 {
            let mut bytes = vec![0u8; published_size(64 * 2)];
            for chunk in bytes.chunks_mut(8) {
                let v = match seed % 3 {
                    0 => next(),
                    1 => u64::MAX - (next() % 4),
                    _ => next() % 1000,
                };
                chunk.copy_from_slice(&v.to_ne_bytes()[..chunk.len()]);
            }
            bytes[0..8].copy_from_slice(&STATS_MAGIC.to_ne_bytes());
            bytes[8..12].copy_from_slice(&STATS_VERSION.to_ne_bytes());
            bytes[STATS_SIZE..STATS_SIZE + 8].copy_from_slice(&VIEW_MAGIC.to_ne_bytes());
            bytes[STATS_SIZE + 8..STATS_SIZE + 12].copy_from_slice(&VIEW_VERSION.to_ne_bytes());
            std::fs::write(&path, &bytes).unwrap();
            let view = View::read(&path).unwrap();
            let r = InstanceReport::build("g", &path, &view.stats, Some(&view), true);
            let text = prometheus(&r);
            assert!(text.contains("shmrelay_up"));
            let _ = serde_json::to_string(&r).unwrap();
            reports.push(r);
        }
        for pair in reports.windows(2) {
            let mut b = pair[1].clone();
            fill_rates(&pair[0], &mut b, Duration::from_millis(1));
            let _ = prometheus(&b);
        }
    }
}
