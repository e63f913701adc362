//! Reading a view: a private copy of what the supervisor published, every value bounded
//! before it is used, so nothing written into the file can mislead or crash the reader.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use shm_ring::{RingSnapshot, SideSnapshot};

use super::identity::locked;
use super::{
    io_err, ring_index, ViewError, PUBLISHED_MIN, RING_BYTES, TAIL_HEADER, VIEW_MAGIC, VIEW_VERSION,
};
use crate::names::{self, Dir};
use crate::stats::{Stats, COUNTERS_BYTES, MAX_FRONTS, MAX_WORKERS, STATS_MAGIC, STATS_SIZE};

/// What the first bytes of a view say, read without mapping it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peek {
    /// The lock is held: a supervisor runs.
    pub live: bool,
    /// Supervisor pid the file claims (informational only: it proves nothing).
    pub pid: u32,
    pub started_unix_ms: u64,
    pub fronts: usize,
    pub workers: usize,
    pub connections: u64,
    /// The run's token (0 if the tail is unreadable).
    pub token: u64,
    /// Size of the file.
    pub len: u64,
}

/// Opens a view without trusting it and reads its header and liveness; never blocks.
///
/// # Errors
///
/// [`ViewError`] naming what is wrong (missing, not a regular file, another user's, short,
/// bad magic).
pub fn peek(path: &Path) -> Result<Peek, ViewError> {
    let file = names::open_checked(path, false)?;
    peek_file(path, &file)
}

pub(super) fn peek_file(path: &Path, file: &File) -> Result<Peek, ViewError> {
    let live = locked(file).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut p = Peek {
        live,
        len,
        ..Peek::default()
    };
    let mut head = [0u8; 256];
    if len < head.len() as u64 {
        return Err(ViewError::Size {
            path: path.to_owned(),
            len,
        });
    }
    file.read_exact_at(&mut head, 0).map_err(io_err(path))?;
    let u32_at = |o: usize| u32::from_ne_bytes(head[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_ne_bytes(head[o..o + 8].try_into().unwrap_or_default());
    // Offsets of the StatsHeader fields: magic 0, version 8, fronts 12, workers 16, pid 20,
    // started 24, conns_total 56.
    p.pid = u32_at(20);
    p.started_unix_ms = u64_at(24);
    p.fronts = (u32_at(12) as usize).min(MAX_FRONTS);
    p.workers = (u32_at(16) as usize).min(MAX_WORKERS);
    p.connections = u64_at(56);
    if u64_at(0) != STATS_MAGIC {
        return Err(ViewError::Format {
            path: path.to_owned(),
            what: "bad magic".into(),
        });
    }
    if len >= PUBLISHED_MIN as u64 {
        let mut tail = [0u8; 24];
        file.read_exact_at(&mut tail, STATS_SIZE as u64)
            .map_err(io_err(path))?;
        if u64::from_ne_bytes(tail[0..8].try_into().unwrap_or_default()) == VIEW_MAGIC {
            p.token = u64::from_ne_bytes(tail[16..24].try_into().unwrap_or_default());
        }
    }
    Ok(p)
}

/// A ring as the supervisor last published it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingSnap {
    pub snapshot: RingSnapshot,
    /// The ring's 16 user words.
    pub user: [u64; 16],
}

/// A private copy of an instance's view: nothing in it can change while it is used.
pub struct View {
    /// The counters, with the layout of the control segment.
    pub stats: Stats,
    /// The lock is held: the supervisor runs.
    pub live: bool,
    /// The run's token (0 without a tail).
    pub token: u64,
    /// When it was last published, ms since the Unix epoch (0 without a tail).
    pub published_unix_ms: u64,
    /// Fronts and workers the ring records are laid out for.
    pub ring_workers: usize,
    rings: Vec<Option<RingSnap>>,
}

impl View {
    /// Reads the view at `path` into private memory, without blocking or trusting it.
    ///
    /// # Errors
    ///
    /// As [`peek`], and a layout other than this binary's.
    pub fn read(path: &Path) -> Result<View, ViewError> {
        let file = names::open_checked(path, false)?;
        let live = locked(&file).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        if len != STATS_SIZE as u64 && len < PUBLISHED_MIN as u64 {
            return Err(ViewError::Size {
                path: path.to_owned(),
                len,
            });
        }
        let mut buf = vec![0u8; COUNTERS_BYTES];
        // A file shortened meanwhile reads short: what was read counts, the rest stays 0.
        let n = read_at_most(&file, &mut buf, 0).map_err(io_err(path))?;
        let stats = Stats::from_bytes(&buf[..n]);
        stats.check().map_err(|e| ViewError::Format {
            path: path.to_owned(),
            what: e.to_string(),
        })?;
        let mut view = View {
            stats,
            live,
            token: 0,
            published_unix_ms: 0,
            ring_workers: 0,
            rings: Vec::new(),
        };
        if len < PUBLISHED_MIN as u64 {
            return Ok(view);
        }
        let mut tail = [0u8; TAIL_HEADER];
        if read_at_most(&file, &mut tail, STATS_SIZE as u64).map_err(io_err(path))? < 56 {
            return Ok(view);
        }
        let w =
            |i: usize| u64::from_ne_bytes(tail[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        if w(0) != VIEW_MAGIC || (w(1) & 0xffff_ffff) as u32 != VIEW_VERSION {
            return Ok(view);
        }
        view.token = w(2);
        view.published_unix_ms = w(4);
        let fronts = (w(5) as usize).min(MAX_FRONTS);
        let workers = (w(6) as usize).min(MAX_WORKERS);
        let count = fronts * workers * 2;
        let fits = len.saturating_sub(PUBLISHED_MIN as u64) / RING_BYTES as u64;
        let count = count.min(fits as usize);
        let mut rec = vec![0u8; count * RING_BYTES];
        let got = read_at_most(&file, &mut rec, PUBLISHED_MIN as u64).map_err(io_err(path))?;
        view.ring_workers = workers;
        view.rings = rec[..got - got % RING_BYTES]
            .chunks_exact(RING_BYTES)
            .map(decode_ring)
            .collect();
        Ok(view)
    }

    /// Ring (`f`, `w`, `dir`) as last published, if it was.
    pub fn ring(&self, f: usize, w: usize, dir: Dir) -> Option<&RingSnap> {
        if w >= self.ring_workers {
            return None;
        }
        self.rings
            .get(ring_index(self.ring_workers, f, w, dir))?
            .as_ref()
    }
}

fn read_at_most(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn decode_ring(b: &[u8]) -> Option<RingSnap> {
    let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    if w(3) & 4 == 0 {
        return None;
    }
    let side = |o: usize| SideSnapshot {
        pid: w(o) as u32,
        attach_count: w(o + 1) as u32,
        active_ns: w(o + 2),
        records: w(o + 3),
        bytes: w(o + 4),
        full_events: w(o + 5),
        wakeups_sent: w(o + 6),
        parks: w(o + 7),
        high_water: w(o + 8),
    };
    let mut user = [0u64; 16];
    for (i, u) in user.iter_mut().enumerate() {
        *u = w(22 + i);
    }
    Some(RingSnap {
        snapshot: RingSnapshot {
            capacity: w(0),
            head: w(1),
            tail: w(2),
            consumer_sleeping: w(3) & 1 != 0,
            producer_sleeping: w(3) & 2 != 0,
            producer: side(4),
            consumer: side(13),
        },
        user,
    })
}

/// The publish sequence number of the view at `path` (0 if unreadable).
pub fn published_seq(path: &Path) -> u64 {
    let Ok(file) = names::open_checked(path, false) else {
        return 0;
    };
    let mut tail = [0u8; 32];
    match file.read_exact_at(&mut tail, STATS_SIZE as u64) {
        Ok(()) if u64::from_ne_bytes(tail[0..8].try_into().unwrap_or_default()) == VIEW_MAGIC => {
            u64::from_ne_bytes(tail[24..32].try_into().unwrap_or_default())
        }
        _ => 0,
    }
}

/// Waits (up to `limit`) until the supervisor has published the view at `path` twice since
/// the call, so that it shows everything that happened before the call (for tests: the view
/// lags the relay by up to [`PUBLISH_EVERY`](super::PUBLISH_EVERY)). False if it did not.
pub fn wait_published(path: &Path, limit: Duration) -> bool {
    let start = published_seq(path);
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if published_seq(path) >= start + 2 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::super::tests::tmpdir;
    use super::super::{published_size, VIEW_MAGIC, VIEW_VERSION};
    use super::*;

    #[test]
    fn garbage_views_are_errors_or_bounded() {
        let d = tmpdir("garbage");
        let path = d.join("shmrelay.g.stats");
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(View::read(&path), Err(ViewError::Size { .. })));
        // Right size, random bytes with a valid magic and version: reads, and ring counts
        // are bounded by what the file holds.
        let mut bytes: Vec<u8> = (0..published_size(3))
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
            .collect();
        bytes[0..8].copy_from_slice(&STATS_MAGIC.to_ne_bytes());
        bytes[8..12].copy_from_slice(&crate::stats::STATS_VERSION.to_ne_bytes());
        bytes[STATS_SIZE..STATS_SIZE + 8].copy_from_slice(&VIEW_MAGIC.to_ne_bytes());
        bytes[STATS_SIZE + 8..STATS_SIZE + 12].copy_from_slice(&VIEW_VERSION.to_ne_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let v = View::read(&path).unwrap();
        assert!(!v.live);
        assert!(v.rings.len() <= 3);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
