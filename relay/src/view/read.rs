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
use crate::layout::{ring_word as rw, u32_at, u64_at, StatsHeader, TailHeader};
use crate::layout::{RING_CONSUMER_SLEEPING, RING_PRODUCER_SLEEPING, RING_PUBLISHED};
use crate::names::{self, Dir};
use crate::stats::{Stats, COUNTERS_BYTES, MAX_FRONTS, MAX_WORKERS, STATS_MAGIC, STATS_SIZE};
use std::mem::{offset_of, size_of};

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
    let mut head = [0u8; size_of::<StatsHeader>()];
    if len < head.len() as u64 {
        return Err(ViewError::Size {
            path: path.to_owned(),
            len,
        });
    }
    file.read_exact_at(&mut head, 0).map_err(io_err(path))?;
    p.pid = u32_at(&head, offset_of!(StatsHeader, supervisor_pid));
    p.started_unix_ms = u64_at(&head, offset_of!(StatsHeader, started_unix_ms));
    p.fronts = (u32_at(&head, offset_of!(StatsHeader, fronts)) as usize).min(MAX_FRONTS);
    p.workers = (u32_at(&head, offset_of!(StatsHeader, workers)) as usize).min(MAX_WORKERS);
    p.connections = u64_at(&head, offset_of!(StatsHeader, conns_total));
    if u64_at(&head, offset_of!(StatsHeader, magic)) != STATS_MAGIC {
        return Err(ViewError::Format {
            path: path.to_owned(),
            what: "bad magic".into(),
        });
    }
    if len >= PUBLISHED_MIN as u64 {
        let mut tail = [0u8; offset_of!(TailHeader, token) + 8];
        file.read_exact_at(&mut tail, STATS_SIZE as u64)
            .map_err(io_err(path))?;
        if u64_at(&tail, offset_of!(TailHeader, magic)) == VIEW_MAGIC {
            p.token = u64_at(&tail, offset_of!(TailHeader, token));
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
        let used = offset_of!(TailHeader, workers) + 8;
        if read_at_most(&file, &mut tail, STATS_SIZE as u64).map_err(io_err(path))? < used {
            return Ok(view);
        }
        let w = |o: usize| u64_at(&tail, o);
        if w(offset_of!(TailHeader, magic)) != VIEW_MAGIC
            || u32_at(&tail, offset_of!(TailHeader, version)) != VIEW_VERSION
        {
            return Ok(view);
        }
        view.token = w(offset_of!(TailHeader, token));
        view.published_unix_ms = w(offset_of!(TailHeader, published_unix_ms));
        let fronts = (w(offset_of!(TailHeader, fronts)) as usize).min(MAX_FRONTS);
        let workers = (w(offset_of!(TailHeader, workers)) as usize).min(MAX_WORKERS);
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
    let w = |i: usize| u64_at(b, i * 8);
    if w(rw::FLAGS) & RING_PUBLISHED == 0 {
        return None;
    }
    let side = |o: usize| SideSnapshot {
        pid: w(o + rw::PID) as u32,
        attach_count: w(o + rw::ATTACH_COUNT) as u32,
        active_ns: w(o + rw::ACTIVE_NS),
        records: w(o + rw::RECORDS),
        bytes: w(o + rw::BYTES),
        full_events: w(o + rw::FULL_EVENTS),
        wakeups_sent: w(o + rw::WAKEUPS_SENT),
        parks: w(o + rw::PARKS),
        high_water: w(o + rw::HIGH_WATER),
    };
    let mut user = [0u64; 16];
    for (i, u) in user.iter_mut().enumerate() {
        *u = w(rw::USER + i);
    }
    Some(RingSnap {
        snapshot: RingSnapshot {
            capacity: w(rw::CAPACITY),
            head: w(rw::HEAD),
            tail: w(rw::TAIL),
            consumer_sleeping: w(rw::FLAGS) & RING_CONSUMER_SLEEPING != 0,
            producer_sleeping: w(rw::FLAGS) & RING_PRODUCER_SLEEPING != 0,
            producer: side(rw::PRODUCER),
            consumer: side(rw::CONSUMER),
        },
        user,
    })
}

/// The publish sequence number of the view at `path` (0 if unreadable).
pub fn published_seq(path: &Path) -> u64 {
    let Ok(file) = names::open_checked(path, false) else {
        return 0;
    };
    let mut tail = [0u8; offset_of!(TailHeader, seq) + 8];
    match file.read_exact_at(&mut tail, STATS_SIZE as u64) {
        Ok(()) if u64_at(&tail, offset_of!(TailHeader, magic)) == VIEW_MAGIC => {
            u64_at(&tail, offset_of!(TailHeader, seq))
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
    use super::super::published_size;
    use super::super::tests::tmpdir;
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
        crate::layout::stamp_view_header(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let v = View::read(&path).unwrap();
        assert!(!v.live);
        assert!(v.rings.len() <= 3);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
