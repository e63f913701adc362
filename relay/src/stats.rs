//! The stats segment: counters every relay process writes in shared memory and `relayctl`
//! reads through a read-only mapping, so inspecting a relay never disturbs its data path.
//!
//! One file per instance, `/dev/shm/shmrelay.<instance>.stats`, mode 0600, fixed layout:
//! a [`StatsHeader`], then [`MAX_FRONTS`] [`FrontStats`], then [`MAX_WORKERS`] [`WorkerStats`].
//! Each block has a single writer (the front, or the supervisor for workers), so counters are
//! plain relaxed atomics; readers get a consistent-enough snapshot for display.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::{Mmap, MmapOptions, MmapRaw};
use shmrelay_worker::CloseReason;

/// `b"SHMRSTAT"` as a little-endian u64.
pub const STATS_MAGIC: u64 = u64::from_le_bytes(*b"SHMRSTAT");
/// Bumped on any layout change.
pub const STATS_VERSION: u32 = 1;
/// Fronts one instance can have.
pub const MAX_FRONTS: usize = 64;
/// Workers one instance can have.
pub const MAX_WORKERS: usize = 64;
/// Close reasons counted (one slot per [`CloseReason`] code).
pub const REASONS: usize = 16;

/// Instance-wide identity and liveness.
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
    pub _pad: AtomicU32,
    /// Global connection count across fronts (admission control).
    pub conns_total: AtomicU64,
}

/// One front's counters.
#[repr(C, align(128))]
pub struct FrontStats {
    pub pid: AtomicU32,
    pub restarts: AtomicU32,
    pub active_ns: AtomicU64,
    pub conns_open: AtomicU64,
    pub accepts: AtomicU64,
    pub rejects: AtomicU64,
    pub heartbeats: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Frames received from clients (heartbeats excluded).
    pub frames_in: AtomicU64,
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
    pub closes: [AtomicU64; REASONS],
}

/// One worker slot's counters (written by the supervisor).
#[repr(C, align(128))]
pub struct WorkerStats {
    pub pid: AtomicU32,
    pub restarts: AtomicU32,
    pub started_unix_ms: AtomicU64,
    pub crashes: AtomicU64,
}

const HEADER_BYTES: usize = std::mem::size_of::<StatsHeader>();
const FRONT_BYTES: usize = std::mem::size_of::<FrontStats>();
const WORKER_BYTES: usize = std::mem::size_of::<WorkerStats>();
/// Total bytes of the segment.
pub const STATS_SIZE: usize = HEADER_BYTES + MAX_FRONTS * FRONT_BYTES + MAX_WORKERS * WORKER_BYTES;

const _: () = {
    assert!(HEADER_BYTES == 128);
    assert!(FRONT_BYTES == 256);
    assert!(WORKER_BYTES == 128);
    assert!(CloseReason::ALL.len() <= REASONS);
};

enum Map {
    Rw(MmapRaw),
    Ro(Mmap),
}

/// A mapped stats segment.
pub struct Stats {
    map: Map,
    file: File,
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
        file.set_len(STATS_SIZE as u64)?;
        nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            STATS_SIZE as i64,
        )?;
        let stats = Stats::map_rw(file)?;
        let h = stats.header();
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
        Ok(stats)
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

    /// Maps the segment at `path` read-only (tools).
    ///
    /// # Errors
    ///
    /// Opening or mapping failed, or the segment is not a valid stats segment.
    pub fn open_readonly(path: &Path) -> io::Result<Stats> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        check_len(&file)?;
        // SAFETY: read-only shared mapping of a file of exactly STATS_SIZE bytes (checked) that
        // its owner never shrinks; we only ever load through it.
        let map = unsafe { MmapOptions::new().len(STATS_SIZE).map(&file)? };
        let stats = Stats {
            map: Map::Ro(map),
            file,
        };
        stats.validate()?;
        Ok(stats)
    }

    fn map_rw(file: File) -> io::Result<Stats> {
        check_len(&file)?;
        let map = MmapOptions::new().len(STATS_SIZE).map_raw(&file)?;
        Ok(Stats {
            map: Map::Rw(map),
            file,
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
        }
    }

    /// The fd, to hand to a front.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
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
        unsafe { &*(self.base().add(HEADER_BYTES + i * FRONT_BYTES) as *const FrontStats) }
    }

    /// Worker `i`'s block (`i < MAX_WORKERS`).
    pub fn worker(&self, i: usize) -> &WorkerStats {
        assert!(i < MAX_WORKERS);
        // SAFETY: as in `front`.
        unsafe {
            &*(self
                .base()
                .add(HEADER_BYTES + MAX_FRONTS * FRONT_BYTES + i * WORKER_BYTES)
                as *const WorkerStats)
        }
    }
}

fn check_len(file: &File) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len != STATS_SIZE as u64 {
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

/// Adds to a counter (single writer per block, so the add never contends).
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
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
        add(&s.front(1).closes[CloseReason::ClientEof as usize], 2);
        let ro = Stats::open_readonly(&path).unwrap();
        assert_eq!(ro.header().fronts.load(Ordering::Relaxed), 2);
        assert_eq!(ro.header().workers.load(Ordering::Relaxed), 3);
        assert_eq!(ro.front(1).accepts.load(Ordering::Relaxed), 5);
        assert_eq!(ro.front(1).closes[1].load(Ordering::Relaxed), 2);
        std::fs::write(&path, b"short").unwrap();
        assert!(Stats::open_readonly(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
