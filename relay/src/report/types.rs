//! The report types: what `relayctl ... --json` prints (see the wire format in [`super`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Liveness;
use crate::names::Dir;
use crate::stats::WorkerState;

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
    /// `io_error` closes by the errno class of the failed socket call: `reset`
    /// (`ECONNRESET`: the client aborted), `timed_out` (`ETIMEDOUT`: this host's kernel gave
    /// up on the client), `broken_pipe`, `unreachable`, `no_memory`, `other`.
    #[serde(default)]
    pub io_errors: BTreeMap<String, u64>,
    /// Milliseconds the front's loop was late (stopped, starved, a long turn): its clients'
    /// deadlines were moved by as much.
    #[serde(default)]
    pub lag_ms: u64,
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
    pub state: WorkerState,
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
    pub direction: Dir,
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

/// A ring side that names a pid no longer alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleRing {
    /// Front index.
    pub front: usize,
    /// Worker index.
    pub worker: usize,
    /// Ring direction.
    pub direction: Dir,
    /// `producer` or `consumer`.
    pub side: String,
    /// The dead pid.
    pub pid: u32,
}
