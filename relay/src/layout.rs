//! The byte layout of the stats segment and of the operators' view file: `#[repr(C)]` structs
//! and, pinned by `offset_of!` asserts, the offset of every field a reader finds by position.
//!
//! The control segment ([`crate::stats::Stats`]) is a [`StatsHeader`], then [`MAX_FRONTS`]
//! [`FrontStats`], [`MAX_WORKERS`] [`WorkerStats`], [`MAX_FRONTS`] process blocks and the
//! per-address connection slots. The view file ([`crate::view`]) is a copy of its first
//! [`COUNTERS_BYTES`], padded to [`STATS_SIZE`], then a [`TailHeader`] and one [`RingRecord`]
//! per ring. Readers of the view copy bytes out of a file another process can write, so they
//! read fields at the offsets below ([`u64_at`]) rather than through references; writers put
//! them at the same offsets. Changing a field's place is a layout change: the asserts fail
//! until [`STATS_VERSION`] or [`VIEW_VERSION`](crate::view::VIEW_VERSION) and the assert are
//! updated together.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicU32, AtomicU64};

use shmrelay_worker::CloseReason;

/// `b"SHMRSTAT"` as a little-endian u64.
pub const STATS_MAGIC: u64 = u64::from_le_bytes(*b"SHMRSTAT");
/// Bumped on any layout change.
pub const STATS_VERSION: u32 = 2;
/// Fronts one instance can have.
pub const MAX_FRONTS: usize = 64;
/// Workers one instance can have.
pub const MAX_WORKERS: usize = 64;
/// Close reasons counted (one slot per [`CloseReason`] code).
pub const REASONS: usize = 16;

/// Instance-wide identity, liveness, global admission state and leak counters.
#[repr(C, align(128))]
pub struct StatsHeader {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub fronts: AtomicU32,
    pub workers: AtomicU32,
    pub supervisor_pid: AtomicU32,
    pub started_unix_ms: AtomicU64,
    /// Supervisor heartbeat (CLOCK_MONOTONIC ns), refreshed every loop.
    pub supervisor_active_ns: AtomicU64,
    /// 1 while draining for shutdown.
    pub draining: AtomicU32,
    /// 1 once the worker pool crashed too often and was marked failed.
    pub pool_failed: AtomicU32,
    /// Connections open across all fronts (the global connection cap counts this).
    pub conns_total: AtomicU64,
    /// Global accept-rate token bucket: `(refill time in ms since start) << 24 | tokens`.
    pub accept_bucket: AtomicU64,
    /// Leak detector: stale segments of dead instances removed at start.
    pub stale_segments_removed: AtomicU64,
    /// Leak detector: connection-table entries without an open socket, or sockets without
    /// an entry, found by the fronts' self-checks.
    pub leaked_conns: AtomicU64,
    /// Leak detector: times a process's open fds grew past its baseline plus the allowance.
    pub fd_growth_events: AtomicU64,
    /// Leak detector: times a process's resident memory grew past its baseline allowance.
    pub rss_growth_events: AtomicU64,
    /// Leak detector: ring reservations abandoned by a dead producer, reclaimed.
    pub reclaimed_reservations: AtomicU64,
    /// Leak detector: processes found running that belong to no slot (orphans), killed.
    pub orphans_killed: AtomicU64,
    pub supervisor_rss_kb: AtomicU64,
    pub supervisor_fds: AtomicU64,
    /// Room to grow without a layout version bump for readers that ignore it.
    pub _reserved: [AtomicU64; 16],
}

/// The [`StatsHeader`] fields `view::peek` reads by offset, pinned.
const _: () = {
    assert!(offset_of!(StatsHeader, magic) == 0);
    assert!(offset_of!(StatsHeader, version) == 8);
    assert!(offset_of!(StatsHeader, fronts) == 12);
    assert!(offset_of!(StatsHeader, workers) == 16);
    assert!(offset_of!(StatsHeader, supervisor_pid) == 20);
    assert!(offset_of!(StatsHeader, started_unix_ms) == 24);
    assert!(offset_of!(StatsHeader, conns_total) == 48);
};

/// Buckets of the round-trip-time histogram: bucket `i` counts samples of `2^i` up to
/// `2^(i+1)` microseconds (bucket 0 also takes 0 and 1 us; the last bucket takes the rest).
pub const RTT_BUCKETS: usize = 16;

/// One front's counters.
#[repr(C, align(128))]
pub struct FrontStats {
    pub pid: AtomicU32,
    pub restarts: AtomicU32,
    pub active_ns: AtomicU64,
    /// Connections in state open.
    pub conns_open: AtomicU64,
    /// Connections in state draining (closing once their replies are flushed).
    pub conns_draining: AtomicU64,
    pub accepts: AtomicU64,
    pub rejects: [AtomicU64; 8],
    /// Heartbeat frames received from clients (answered by the front).
    pub heartbeats: AtomicU64,
    /// Heartbeat frames the front sent to idle clients.
    pub pings_sent: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Frames received from clients (heartbeats excluded).
    pub frames_in: AtomicU64,
    /// Reply records written to clients.
    pub frames_out: AtomicU64,
    /// Bytes read from clients into request rings.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    /// Bytes the front copied in user space (partial frames carried between reads, replies
    /// queued for slow clients). The zero-copy figure is `bytes_copied / (bytes_in + bytes_out)`.
    pub bytes_copied: AtomicU64,
    /// Reply records for connections that no longer exist.
    pub stale_replies: AtomicU64,
    /// Times a connection stopped being read because its worker's request ring was full.
    pub ring_full_stalls: AtomicU64,
    /// Rings found corrupt and quarantined.
    pub corrupt_rings: AtomicU64,
    /// Closes by [`CloseReason`] code.
    pub closes: [AtomicU64; REASONS],
    /// TCP_INFO round-trip-time samples, log2 microsecond buckets.
    pub rtt_hist: [AtomicU64; RTT_BUCKETS],
    /// TCP retransmissions of the connections closed so far (TCP_INFO at close).
    pub retransmits: AtomicU64,
    /// 1 while the front stopped accepting because it is overloaded.
    pub paused: AtomicU64,
    /// Bit `w` set: this front quarantined its rings with worker `w` (corrupt) and waits for
    /// the supervisor to replace the worker and reset them; the supervisor clears the bit.
    pub quarantined: AtomicU64,
    // --- Per-front budgets and push scope (issue 12, items 5, 6, 10, 11) ---
    /// Reply bytes queued for clients right now (gauge), and its high-water mark as seen
    /// after each event was handled (the budget `pending_budget` applied).
    pub queued_bytes: AtomicU64,
    pub queued_peak: AtomicU64,
    /// Connections closed because the front's queued replies passed `pending_budget`.
    pub pending_budget_closes: AtomicU64,
    /// Bytes held in partial-frame buffers right now (gauge), and its high-water mark.
    pub partial_bytes: AtomicU64,
    pub partial_peak: AtomicU64,
    /// Connections closed because the front's partial frames passed `partial_budget`.
    pub partial_budget_closes: AtomicU64,
    /// Connections closed because a frame was not complete within `frame_timeout_ms`.
    pub frame_timeouts: AtomicU64,
    /// Reply records (replies, pushes, closes) a worker addressed to a connection outside its
    /// `push_scope`: dropped.
    pub push_out_of_scope: AtomicU64,
    /// Doorbell wakes that found no work and were throttled (the doorbell left unwatched for
    /// a moment).
    pub doorbell_throttled: AtomicU64,
    /// Times accepting stopped at EMFILE/ENFILE with connections left in the backlog, and
    /// retries of the backlog after fds were freed (a close or the retry timer).
    pub accept_emfile: AtomicU64,
    pub accept_retries: AtomicU64,
    // --- Connections at scale (issue 15) ---
    /// `io_error` closes by the errno class of the failed socket call
    /// ([`IoErrorClass`](crate::stats::IoErrorClass) code): which side gave up, and why.
    pub io_errors: [AtomicU64; IO_ERROR_CLASSES],
    /// Milliseconds this front's loop was late (stopped, starved, a long turn) beyond what
    /// it asked to sleep: its clients' deadlines moved by as much.
    pub lag_ms: AtomicU64,
}

/// Errno classes counted for `io_error` closes (one slot per
/// [`IoErrorClass`](crate::stats::IoErrorClass) code).
pub const IO_ERROR_CLASSES: usize = 6;

/// One worker slot's counters (written by the supervisor).
#[repr(C, align(128))]
pub struct WorkerStats {
    pub pid: AtomicU32,
    pub restarts: AtomicU32,
    pub started_unix_ms: AtomicU64,
    pub crashes: AtomicU64,
    /// A [`WorkerState`](crate::stats::WorkerState) code.
    pub state: AtomicU32,
    pub _pad: AtomicU32,
    /// Hangs detected (a non-empty ring not consumed within the hang timeout).
    pub hangs: AtomicU64,
    pub rss_kb: AtomicU64,
    pub fds: AtomicU64,
    /// Frames dead-lettered: each crashed `dead_letter_after` redelivered generations of this
    /// worker; its connection got an error and was closed, the replacement skipped it.
    pub dead_letters: AtomicU64,
    /// The last dead-lettered frame: its connection id, ...
    pub dead_letter_conn: AtomicU64,
    /// ... its request position (frame end) in the request ring of the connection's front, ...
    pub dead_letter_pos: AtomicU64,
    /// ... and when (Unix ms).
    pub dead_letter_unix_ms: AtomicU64,
    /// Mailbox from the supervisor to the front named in the id: a connection to close for a
    /// dead-lettered frame (0 when empty; the front takes it).
    pub dead_letter_pending: AtomicU64,
}

/// Same layout as [`WorkerStats`], for fronts' process metrics (written by the supervisor).
pub type ProcessStats = WorkerStats;

pub(crate) const HEADER_BYTES: usize = std::mem::size_of::<StatsHeader>();
pub(crate) const FRONT_BYTES: usize = std::mem::size_of::<FrontStats>();
pub(crate) const WORKER_BYTES: usize = std::mem::size_of::<WorkerStats>();
/// Per front, slots of the per-source-address connection counts (addresses are hashed into
/// them; a collision makes two addresses share a cap, which errs on the side of refusing).
/// Each front counts its own connections, so the supervisor can zero a dead front's table.
pub const ADDR_SLOTS: usize = 4096;
pub(crate) const FRONTS_AT: usize = HEADER_BYTES;
pub(crate) const WORKERS_AT: usize = FRONTS_AT + MAX_FRONTS * FRONT_BYTES;
pub(crate) const FRONT_PROCS_AT: usize = WORKERS_AT + MAX_WORKERS * WORKER_BYTES;
pub(crate) const ADDRS_AT: usize = FRONT_PROCS_AT + MAX_FRONTS * WORKER_BYTES;
/// Bytes at the start of the segment that hold counters (everything before the per-address
/// connection slots, which only the fronts' admission uses): what the operators' view copies.
pub const COUNTERS_BYTES: usize = ADDRS_AT;
/// Total bytes of the segment.
pub const STATS_SIZE: usize = ADDRS_AT + MAX_FRONTS * ADDR_SLOTS * 4;

const _: () = {
    assert!(HEADER_BYTES == 256);
    // 512 until issue 12 (budgets, push scope, doorbell and EMFILE counters): 640.
    assert!(FRONT_BYTES == 640);
    assert!(WORKER_BYTES == 128);
    assert!(CloseReason::ALL.len() <= REASONS);
};

/// The header of the view's tail, at [`STATS_SIZE`] in the view file, native-endian words.
#[repr(C)]
pub struct TailHeader {
    /// [`VIEW_MAGIC`](crate::view::VIEW_MAGIC).
    pub magic: u64,
    /// [`VIEW_VERSION`](crate::view::VIEW_VERSION).
    pub version: u32,
    /// Ring records that follow (`fronts * workers * 2`).
    pub rings: u32,
    /// The run's token.
    pub token: u64,
    /// Publish sequence number, +1 per publish.
    pub seq: u64,
    /// When it was published, ms since the Unix epoch.
    pub published_unix_ms: u64,
    /// Fronts and workers the ring records are laid out for.
    pub fronts: u64,
    pub workers: u64,
    /// Zero.
    pub _reserved: [u64; 9],
}

const _: () = {
    assert!(size_of::<TailHeader>() == 128);
    assert!(offset_of!(TailHeader, magic) == 0);
    assert!(offset_of!(TailHeader, version) == 8);
    assert!(offset_of!(TailHeader, rings) == 12);
    assert!(offset_of!(TailHeader, token) == 16);
    assert!(offset_of!(TailHeader, seq) == 24);
    assert!(offset_of!(TailHeader, published_unix_ms) == 32);
    assert!(offset_of!(TailHeader, fronts) == 40);
    assert!(offset_of!(TailHeader, workers) == 48);
};

/// One side of a ring in a [`RingRecord`]: the side's counters from the ring header.
#[repr(C)]
pub struct SideRecord {
    /// The attached process (a u32 pid, widened).
    pub pid: u64,
    /// Times a process attached (a u32, widened).
    pub attach_count: u64,
    /// When the side last published, released or woke its peer (CLOCK_MONOTONIC ns).
    pub active_ns: u64,
    /// Records committed (producer) or consumed (consumer).
    pub records: u64,
    /// Payload bytes of those records.
    pub bytes: u64,
    /// Reservations refused for lack of space.
    pub full_events: u64,
    /// Wakeups this side sent to the other.
    pub wakeups_sent: u64,
    /// Times this side parked.
    pub parks: u64,
    /// Most bytes ever in use, as this side saw it.
    pub high_water: u64,
}

/// A snapshot of one ring in the view's tail, native-endian words; records follow the
/// [`TailHeader`] in `view::ring_index` order.
#[repr(C)]
pub struct RingRecord {
    /// Data area size, bytes.
    pub capacity: u64,
    /// Consumer position (free-running).
    pub head: u64,
    /// Producer position (free-running).
    pub tail: u64,
    /// [`RING_CONSUMER_SLEEPING`], [`RING_PRODUCER_SLEEPING`], [`RING_PUBLISHED`].
    pub flags: u64,
    /// The producing side.
    pub producer: SideRecord,
    /// The consuming side.
    pub consumer: SideRecord,
    /// The ring header's 16 user words.
    pub user: [u64; 16],
    /// Zero.
    pub _reserved: [u64; 2],
}

/// [`RingRecord::flags`]: the consumer announced that it sleeps.
pub const RING_CONSUMER_SLEEPING: u64 = 1;
/// [`RingRecord::flags`]: the producer announced that it sleeps.
pub const RING_PRODUCER_SLEEPING: u64 = 2;
/// [`RingRecord::flags`]: the record holds a snapshot (a record without it is no ring).
pub const RING_PUBLISHED: u64 = 4;

const _: () = {
    assert!(size_of::<SideRecord>() == 9 * 8);
    assert!(size_of::<RingRecord>() == 40 * 8);
    assert!(offset_of!(RingRecord, capacity) == 0);
    assert!(offset_of!(RingRecord, head) == 8);
    assert!(offset_of!(RingRecord, tail) == 16);
    assert!(offset_of!(RingRecord, flags) == 24);
    assert!(offset_of!(RingRecord, producer) == 4 * 8);
    assert!(offset_of!(RingRecord, consumer) == 13 * 8);
    assert!(offset_of!(RingRecord, user) == 22 * 8);
    assert!(offset_of!(SideRecord, pid) == 0);
    assert!(offset_of!(SideRecord, attach_count) == 8);
    assert!(offset_of!(SideRecord, active_ns) == 16);
    assert!(offset_of!(SideRecord, records) == 24);
    assert!(offset_of!(SideRecord, bytes) == 32);
    assert!(offset_of!(SideRecord, full_events) == 40);
    assert!(offset_of!(SideRecord, wakeups_sent) == 48);
    assert!(offset_of!(SideRecord, parks) == 56);
    assert!(offset_of!(SideRecord, high_water) == 64);
};

/// Word indexes of [`RingRecord`] fields (their offsets / 8), for code that handles a record
/// as `[u64; RING_WORDS]`.
pub mod ring_word {
    use super::{RingRecord, SideRecord};
    use std::mem::offset_of;

    pub const CAPACITY: usize = offset_of!(RingRecord, capacity) / 8;
    pub const HEAD: usize = offset_of!(RingRecord, head) / 8;
    pub const TAIL: usize = offset_of!(RingRecord, tail) / 8;
    pub const FLAGS: usize = offset_of!(RingRecord, flags) / 8;
    pub const PRODUCER: usize = offset_of!(RingRecord, producer) / 8;
    pub const CONSUMER: usize = offset_of!(RingRecord, consumer) / 8;
    pub const USER: usize = offset_of!(RingRecord, user) / 8;
    /// Within a side, from [`PRODUCER`] or [`CONSUMER`].
    pub const PID: usize = offset_of!(SideRecord, pid) / 8;
    pub const ATTACH_COUNT: usize = offset_of!(SideRecord, attach_count) / 8;
    pub const ACTIVE_NS: usize = offset_of!(SideRecord, active_ns) / 8;
    pub const RECORDS: usize = offset_of!(SideRecord, records) / 8;
    pub const BYTES: usize = offset_of!(SideRecord, bytes) / 8;
    pub const FULL_EVENTS: usize = offset_of!(SideRecord, full_events) / 8;
    pub const WAKEUPS_SENT: usize = offset_of!(SideRecord, wakeups_sent) / 8;
    pub const PARKS: usize = offset_of!(SideRecord, parks) / 8;
    pub const HIGH_WATER: usize = offset_of!(SideRecord, high_water) / 8;
}

/// The native-endian u64 at byte `at` of `b`; 0 where `b` is too short (a short read).
///
/// # Examples
///
/// ```
/// use shmrelay::layout::{u64_at, TailHeader};
/// let mut tail = [0u8; 128];
/// tail[std::mem::offset_of!(TailHeader, seq)..][..8].copy_from_slice(&7u64.to_ne_bytes());
/// assert_eq!(u64_at(&tail, std::mem::offset_of!(TailHeader, seq)), 7);
/// assert_eq!(u64_at(&tail, 124), 0);
/// ```
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at.saturating_add(8))
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_ne_bytes)
}

/// The native-endian u32 at byte `at` of `b`; 0 where `b` is too short.
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at.saturating_add(4))
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

/// Writes the magics and versions of the stats header and of the view's tail into `bytes`
/// (a whole view file), for tests that fill the rest with garbage.
#[cfg(test)]
pub(crate) fn stamp_view_header(bytes: &mut [u8]) {
    use crate::view::{VIEW_MAGIC, VIEW_VERSION};
    let mut put = |at: usize, v: &[u8]| bytes[at..at + v.len()].copy_from_slice(v);
    put(offset_of!(StatsHeader, magic), &STATS_MAGIC.to_ne_bytes());
    put(
        offset_of!(StatsHeader, version),
        &STATS_VERSION.to_ne_bytes(),
    );
    put(
        STATS_SIZE + offset_of!(TailHeader, magic),
        &VIEW_MAGIC.to_ne_bytes(),
    );
    put(
        STATS_SIZE + offset_of!(TailHeader, version),
        &VIEW_VERSION.to_ne_bytes(),
    );
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::report::tests::TempShm;
    use crate::stats::Stats;

    /// `view::peek` reads the header by offset: it finds each field where the struct has it
    /// (it once read `conns_total` 8 bytes too far, in `accept_bucket`).
    #[test]
    fn peek_reads_the_header_fields_where_the_struct_has_them() {
        let tmp = TempShm::new("layout");
        let path = tmp.0.join("shmrelay.layout.stats");
        let stats = Stats::create(&path, 3, 5).unwrap();
        let h = stats.header();
        h.conns_total.store(42, Ordering::Relaxed);
        h.accept_bucket.store(7, Ordering::Relaxed);
        let p = crate::view::peek(&path).unwrap();
        assert_eq!((p.fronts, p.workers), (3, 5));
        assert_eq!(p.pid, std::process::id());
        assert_eq!(p.connections, 42);
        assert_eq!(p.started_unix_ms, h.started_unix_ms.load(Ordering::Relaxed));
    }

    #[test]
    fn short_reads_are_zero() {
        assert_eq!(u64_at(&[1, 2, 3], 0), 0);
        assert_eq!(u32_at(&[1, 0, 0, 0], 0), 1);
        assert_eq!(u64_at(&[0; 8], usize::MAX), 0);
    }
}
