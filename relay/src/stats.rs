//! The stats segment: counters every relay process writes in shared memory and `relayctl`
//! reads through a read-only mapping, so inspecting a relay never disturbs its data path.
//!
//! One file per instance, `/dev/shm/shmrelay.<instance>.stats`, mode 0600, fixed layout:
//! a [`StatsHeader`], then [`MAX_FRONTS`] [`FrontStats`], then [`MAX_WORKERS`] [`WorkerStats`].
//! Each block has a single writer (the front, or the supervisor for workers), so counters are
//! plain relaxed atomics; readers get a consistent-enough snapshot for display. The structs
//! and their offsets are pinned in [`crate::layout`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::{Mmap, MmapOptions, MmapRaw};

pub use crate::layout::IO_ERROR_CLASSES;
pub use crate::layout::{
    FrontStats, ProcessStats, StatsHeader, WorkerStats, ADDR_SLOTS, COUNTERS_BYTES, MAX_FRONTS,
    MAX_WORKERS, REASONS, RTT_BUCKETS, STATS_MAGIC, STATS_SIZE, STATS_VERSION,
};
use crate::layout::{ADDRS_AT, FRONTS_AT, FRONT_BYTES, FRONT_PROCS_AT, WORKERS_AT, WORKER_BYTES};

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum RejectReason {
    /// The global connection cap.
    ConnLimit = 0,
    /// The per-source-address cap.
    PerAddress = 1,
    /// The accept-rate bucket was empty.
    Rate = 2,
    /// Overloaded: request rings full.
    Overload = 3,
    /// No worker could take the connection (pool failed).
    NoWorker = 4,
}

impl RejectReason {
    /// Every reason, in index order.
    pub const ALL: [RejectReason; 5] = [
        RejectReason::ConnLimit,
        RejectReason::PerAddress,
        RejectReason::Rate,
        RejectReason::Overload,
        RejectReason::NoWorker,
    ];

    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::ConnLimit => "conn_limit",
            RejectReason::PerAddress => "per_address",
            RejectReason::Rate => "rate",
            RejectReason::Overload => "overload",
            RejectReason::NoWorker => "no_worker",
        }
    }
}

/// The errno class of a socket call that failed and closed its connection (`io_error`):
/// which side gave up, so operators can tell a client's reset from this host's timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum IoErrorClass {
    /// `ECONNRESET`: the peer aborted the connection (it sent an RST: it closed with unread
    /// data, set a zero linger, or its own kernel gave up).
    Reset = 0,
    /// `ETIMEDOUT`: this host's kernel gave up on the peer (retransmissions unacknowledged for
    /// `TCP_USER_TIMEOUT`, or keepalive probes unanswered).
    TimedOut = 1,
    /// `EPIPE`: written after the connection was shut down.
    BrokenPipe = 2,
    /// `ECONNREFUSED`, `EHOSTUNREACH`, `ENETUNREACH`, `ENETDOWN`: an ICMP error on the path.
    Unreachable = 3,
    /// `ENOMEM`, `ENOBUFS`: the kernel had no memory for the socket.
    NoMemory = 4,
    /// Anything else.
    Other = 5,
}

impl IoErrorClass {
    /// Every class, in index order.
    pub const ALL: [IoErrorClass; IO_ERROR_CLASSES] = [
        IoErrorClass::Reset,
        IoErrorClass::TimedOut,
        IoErrorClass::BrokenPipe,
        IoErrorClass::Unreachable,
        IoErrorClass::NoMemory,
        IoErrorClass::Other,
    ];

    /// The class of a failed socket call's error.
    ///
    /// ```
    /// use shmrelay::stats::IoErrorClass;
    /// let e = std::io::Error::from_raw_os_error(libc::ETIMEDOUT);
    /// assert_eq!(IoErrorClass::of(&e), IoErrorClass::TimedOut);
    /// assert_eq!(IoErrorClass::of(&std::io::Error::other("x")), IoErrorClass::Other);
    /// ```
    pub fn of(e: &io::Error) -> IoErrorClass {
        match e.raw_os_error() {
            Some(libc::ECONNRESET) => IoErrorClass::Reset,
            Some(libc::ETIMEDOUT) => IoErrorClass::TimedOut,
            Some(libc::EPIPE) => IoErrorClass::BrokenPipe,
            Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::ENETDOWN) => {
                IoErrorClass::Unreachable
            }
            Some(libc::ENOMEM | libc::ENOBUFS) => IoErrorClass::NoMemory,
            _ => IoErrorClass::Other,
        }
    }

    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoErrorClass::Reset => "reset",
            IoErrorClass::TimedOut => "timed_out",
            IoErrorClass::BrokenPipe => "broken_pipe",
            IoErrorClass::Unreachable => "unreachable",
            IoErrorClass::NoMemory => "no_memory",
            IoErrorClass::Other => "other",
        }
    }
}

/// Counts a socket error that closes its connection as `io_error`, by class, and logs its
/// errno (debug level: at scale there may be many).
pub fn count_io_error(fs: &FrontStats, e: &io::Error) {
    let class = IoErrorClass::of(e);
    add(&fs.io_errors[class as usize], 1);
    tracing::debug!(error = %e, class = class.as_str(), "socket error: closing (io_error)");
}

/// One worker slot's state, as the supervisor sees it; serialised (in reports' `--json`
/// output) as its [`as_str`](WorkerState::as_str) name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u32)]
pub enum WorkerState {
    Stopped = 0,
    Running = 1,
    /// Waiting out its restart backoff.
    Restarting = 2,
    /// Crashed too often: connections are refused.
    Failed = 3,
    /// Not consuming a non-empty ring.
    Hung = 4,
}

impl WorkerState {
    /// From the stored code.
    pub fn from_code(c: u32) -> WorkerState {
        match c {
            1 => WorkerState::Running,
            2 => WorkerState::Restarting,
            3 => WorkerState::Failed,
            4 => WorkerState::Hung,
            _ => WorkerState::Stopped,
        }
    }

    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Stopped => "stopped",
            WorkerState::Running => "running",
            WorkerState::Restarting => "restarting",
            WorkerState::Failed => "failed",
            WorkerState::Hung => "hung",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

enum Map {
    Rw(MmapRaw),
    Ro(Mmap),
    /// A private copy (a snapshot read from the operators' view): nobody else can write it.
    Owned(Box<[Block]>),
}

/// Unit of a private copy: 128-aligned like the blocks of the layout.
#[derive(Clone, Copy)]
#[repr(C, align(128))]
struct Block([u8; 128]);

const _: () = assert!(STATS_SIZE % 128 == 0);

/// A mapped stats segment, or a private copy of one.
pub struct Stats {
    map: Map,
    file: Option<File>,
}

// SAFETY: the mapping holds only atomics; any thread may use them.
unsafe impl Send for Stats {}
// SAFETY: as for Send.
unsafe impl Sync for Stats {}

impl Stats {
    /// Creates and initialises the segment at `path` (exclusive, mode 0600).
    ///
    /// # Errors
    ///
    /// The file exists, or creating, sizing or mapping it failed.
    pub fn create(path: &Path, fronts: usize, workers: usize) -> io::Result<Stats> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        allocate(&file)?;
        let stats = Stats::map_rw(file)?;
        stats.init(fronts, workers);
        Ok(stats)
    }

    /// Creates and initialises the control segment in an anonymous memfd, sealed against
    /// resizing: only processes it is handed to (the fronts) can map it, nobody can open it by
    /// name, and nobody can shrink it under a mapping (SIGBUS).
    ///
    /// # Errors
    ///
    /// Creating, sizing, sealing or mapping it failed.
    pub fn create_memfd(fronts: usize, workers: usize) -> io::Result<Stats> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(
            "shmrelay-control",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        allocate(&file)?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals))?;
        let stats = Stats::map_rw(file)?;
        stats.init(fronts, workers);
        Ok(stats)
    }

    /// A private, zeroed copy of the layout, filled from `bytes` (the first `bytes.len()`
    /// bytes of a segment, at most [`STATS_SIZE`]). Nothing it reads can change under it.
    pub fn from_bytes(bytes: &[u8]) -> Stats {
        let mut blocks = vec![Block([0; 128]); STATS_SIZE / 128].into_boxed_slice();
        let n = bytes.len().min(STATS_SIZE);
        // SAFETY: `blocks` is STATS_SIZE contiguous bytes we own exclusively; `n` is at most
        // that and at most `bytes.len()`; the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, n);
        }
        Stats {
            map: Map::Owned(blocks),
            file: None,
        }
    }

    /// Copies the first `len` bytes of the segment (clamped to [`STATS_SIZE`]) into `out`.
    ///
    /// A mapped segment is copied by the kernel with `pread` from its fd, not through the
    /// mapping: other processes update it concurrently with atomics of several sizes, which a
    /// copy in Rust could only read with (mixed-size) racing loads. Values may be torn for
    /// display; readers bound what they use.
    ///
    /// # Errors
    ///
    /// The `pread` error.
    pub fn copy_prefix(&self, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let len = len.min(STATS_SIZE);
        out.clear();
        out.resize(len, 0);
        match (&self.file, &self.map) {
            (_, Map::Owned(b)) => {
                // SAFETY: the private copy is STATS_SIZE bytes nobody else can write; `len` is
                // at most that; `out` holds `len` bytes and does not overlap it.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.as_ptr() as *const u8, out.as_mut_ptr(), len);
                }
                Ok(())
            }
            (Some(f), _) => std::os::unix::fs::FileExt::read_exact_at(f, out, 0),
            (None, _) => Err(io::Error::other("a stats segment without an fd")),
        }
    }

    /// Validates a copy made with [`from_bytes`](Stats::from_bytes) (magic and version).
    ///
    /// # Errors
    ///
    /// Not a stats segment of this layout.
    pub fn check(&self) -> io::Result<()> {
        self.validate()
    }

    fn init(&self, fronts: usize, workers: usize) {
        let h = self.header();
        h.version.store(STATS_VERSION, Ordering::Relaxed);
        h.fronts.store(fronts as u32, Ordering::Relaxed);
        h.workers.store(workers as u32, Ordering::Relaxed);
        h.supervisor_pid
            .store(std::process::id(), Ordering::Relaxed);
        h.started_unix_ms.store(unix_ms(), Ordering::Relaxed);
        h.supervisor_active_ns
            .store(shm_ring::monotonic_ns(), Ordering::Relaxed);
        // Release: pairs with the Acquire load in `validate`; the fields above are visible to
        // anyone who sees the magic.
        h.magic.store(STATS_MAGIC, Ordering::Release);
    }

    /// Maps an inherited segment read-write (fronts).
    ///
    /// # Errors
    ///
    /// Mapping failed or the segment is not a valid stats segment.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Stats> {
        let stats = Stats::map_rw(File::from(fd))?;
        stats.validate()?;
        Ok(stats)
    }

    /// Maps the segment at `path` read-only (tests; tools read a private copy with
    /// [`crate::view::View::read`], which nobody can shrink under them). Opened with
    /// [`crate::names::open_checked`].
    ///
    /// # Errors
    ///
    /// Opening or mapping failed, or the segment is not a valid stats segment.
    pub fn open_readonly(path: &Path) -> io::Result<Stats> {
        let file = crate::names::open_checked(path, false).map_err(|e| {
            let kind = e.kind();
            io::Error::new(kind, e.to_string())
        })?;
        check_len(&file)?;
        // SAFETY: read-only shared mapping of a file of exactly STATS_SIZE bytes (checked) that
        // its owner never shrinks; we only ever load through it.
        let map = unsafe { MmapOptions::new().len(STATS_SIZE).map(&file)? };
        let stats = Stats {
            map: Map::Ro(map),
            file: Some(file),
        };
        stats.validate()?;
        Ok(stats)
    }

    fn map_rw(file: File) -> io::Result<Stats> {
        check_len(&file)?;
        let map = MmapOptions::new().len(STATS_SIZE).map_raw(&file)?;
        Ok(Stats {
            map: Map::Rw(map),
            file: Some(file),
        })
    }

    fn validate(&self) -> io::Result<()> {
        let h = self.header();
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        // Acquire: pairs with the Release store in `create`.
        if h.magic.load(Ordering::Acquire) != STATS_MAGIC {
            return Err(bad("not a shmrelay stats segment (bad magic)".into()));
        }
        let v = h.version.load(Ordering::Relaxed);
        if v != STATS_VERSION {
            return Err(bad(format!(
                "stats layout version {v}, this binary reads {STATS_VERSION}"
            )));
        }
        Ok(())
    }

    fn base(&self) -> *const u8 {
        match &self.map {
            Map::Rw(m) => m.as_ptr(),
            Map::Ro(m) => m.as_ptr(),
            Map::Owned(b) => b.as_ptr() as *const u8,
        }
    }

    /// The fd, to hand to a front.
    ///
    /// # Panics
    ///
    /// On a private copy ([`from_bytes`](Stats::from_bytes)), which has no fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file
            .as_ref()
            .expect("a private stats copy has no fd")
            .as_fd()
    }

    /// Instance header.
    pub fn header(&self) -> &StatsHeader {
        // SAFETY: the mapping is STATS_SIZE bytes, page-aligned; the header is at offset 0 and
        // every bit pattern is valid for a struct of atomics.
        unsafe { &*(self.base() as *const StatsHeader) }
    }

    /// Front `i`'s block (`i < MAX_FRONTS`).
    pub fn front(&self, i: usize) -> &FrontStats {
        assert!(i < MAX_FRONTS);
        // SAFETY: in bounds by the assert and the fixed layout; 128-aligned; any bits valid.
        unsafe { &*(self.base().add(FRONTS_AT + i * FRONT_BYTES) as *const FrontStats) }
    }

    /// Worker `i`'s block (`i < MAX_WORKERS`).
    pub fn worker(&self, i: usize) -> &WorkerStats {
        assert!(i < MAX_WORKERS);
        // SAFETY: as in `front`.
        unsafe { &*(self.base().add(WORKERS_AT + i * WORKER_BYTES) as *const WorkerStats) }
    }

    /// Process metrics (pid, restarts, memory, fds) of front `i`, kept by the supervisor.
    pub fn front_process(&self, i: usize) -> &ProcessStats {
        assert!(i < MAX_FRONTS);
        // SAFETY: as in `front`.
        unsafe { &*(self.base().add(FRONT_PROCS_AT + i * WORKER_BYTES) as *const ProcessStats) }
    }

    /// Front `front`'s connection count in address slot `slot` (`< ADDR_SLOTS`).
    pub fn addr_slot(&self, front: usize, slot: usize) -> &AtomicU32 {
        assert!(front < MAX_FRONTS && slot < ADDR_SLOTS);
        // SAFETY: in bounds by the assert, inside the mapping, 4-aligned; any bits valid.
        unsafe {
            &*(self.base().add(ADDRS_AT + (front * ADDR_SLOTS + slot) * 4) as *const AtomicU32)
        }
    }

    /// Connections from address slot `slot` across the first `fronts` fronts.
    pub fn addr_count(&self, fronts: usize, slot: usize) -> u64 {
        (0..fronts)
            .map(|f| self.addr_slot(f, slot).load(Ordering::Relaxed) as u64)
            .sum()
    }
}

fn check_len(file: &File) -> io::Result<()> {
    let len = file.metadata()?.len();
    // The operators' view (see `crate::view`) is the layout followed by its own tail.
    if len != STATS_SIZE as u64 && len < crate::view::PUBLISHED_MIN as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("stats segment is {len} bytes, expected {STATS_SIZE}"),
        ));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Takes `n` from a counter that only goes down by what was added before, saturating at 0: a
/// counter that somehow reads lower than it should (a lost update, a front's slots zeroed at
/// its death) can never wrap to 2^64 - 1.
#[inline]
pub fn sub_saturating(c: &AtomicU64, n: u64) {
    let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

/// Adds to a counter (single writer per block, so the add never contends).
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Sizes a new segment file and allocates its memory now: a short /dev/shm or memory fails
/// here, not later with SIGBUS at a first touch.
fn allocate(file: &File) -> io::Result<()> {
    file.set_len(STATS_SIZE as u64)?;
    nix::fcntl::fallocate(
        file,
        nix::fcntl::FallocateFlags::empty(),
        0,
        STATS_SIZE as i64,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_and_read_back() {
        let path = std::env::temp_dir().join(format!("shmrelay-stats-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let s = Stats::create(&path, 2, 3).unwrap();
        add(&s.front(1).accepts, 5);
        add(
            &s.front(1).closes[shmrelay_worker::CloseReason::ClientEof as usize],
            2,
        );
        let ro = Stats::open_readonly(&path).unwrap();
        assert_eq!(ro.header().fronts.load(Ordering::Relaxed), 2);
        assert_eq!(ro.header().workers.load(Ordering::Relaxed), 3);
        assert_eq!(ro.front(1).accepts.load(Ordering::Relaxed), 5);
        assert_eq!(ro.front(1).closes[1].load(Ordering::Relaxed), 2);
        std::fs::write(&path, b"short").unwrap();
        assert!(Stats::open_readonly(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn counters_that_go_down_saturate_at_zero() {
        let c = AtomicU64::new(1);
        sub_saturating(&c, 1);
        assert_eq!(c.load(Ordering::Relaxed), 0);
        // Zeroed behind the front's back, then a close: 0, never 2^64 - 1.
        sub_saturating(&c, 1);
        assert_eq!(c.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn control_segment_is_a_sealed_memfd() {
        let s = Stats::create_memfd(1, 1).unwrap();
        let f = s.file.as_ref().unwrap();
        let e = f.set_len(0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "shrinking is sealed");
        assert_eq!(s.header().magic.load(Ordering::Relaxed), STATS_MAGIC);
        let mut copy = Vec::new();
        add(&s.front(0).accepts, 9);
        s.copy_prefix(COUNTERS_BYTES, &mut copy).unwrap();
        let back = Stats::from_bytes(&copy);
        back.check().unwrap();
        assert_eq!(back.front(0).accepts.load(Ordering::Relaxed), 9);
    }
}
