//! The operators' view of an instance, and the instance's identity on the host.
//!
//! The relay acts on a *control* segment (quarantine bits, worker states, connection counts,
//! the accept bucket): an unnamed memfd the supervisor creates and hands to the fronts only
//! ([`Stats::create_memfd`]). No file name leads to it, so a worker or any other process of
//! the same user cannot open it by path.
//!
//! What operators read (`relayctl`, the metrics endpoint) is a separate file,
//! `shmrelay.NAME.stats` in the shm directory, that only the supervisor writes, with `pwrite`
//! (never through a mapping, so truncating it cannot SIGBUS the supervisor), every
//! [`PUBLISH_EVERY`]: a copy of the control segment's counters ([`COUNTERS_BYTES`]), then a
//! tail with the run's token and a snapshot of every ring (rings are sealed memfds now, with
//! no name a tool could open). Nothing the relay decides rests on this file: whatever a
//! process writes into it changes only what operators see until the next publish, and
//! readers copy it into private memory ([`View::read`]) and bound every value they use.
//!
//! # Liveness and identity
//!
//! The live supervisor holds an open-file-description write lock (`F_OFD_SETLK`) on its view
//! file for as long as it runs; the kernel drops it when the process dies, however it dies.
//! Tools test it with `F_OFD_GETLK` (which takes nothing), so a relay is live exactly when
//! its lock is held, whatever PID namespace the tool runs in (locks belong to the inode; pids
//! do not cross namespaces) and whatever pid the file claims. An abstract unix socket would
//! also die with its owner, but it is scoped by network namespace (a tool in another one
//! would see every relay dead) and by nothing else (two relays of one name in two shm
//! directories would collide): a lock on the file in the directory is scoped exactly like the
//! instance.
//!
//! The file appears under its name already initialised and locked: it is created under a
//! hidden temporary name, locked, then renamed into place with `RENAME_NOREPLACE`. Whoever
//! removes a dead instance's view (a starting supervisor, `relayctl gc`) first takes the same
//! lock on the file it found and checks that the name still leads to that file, so a live
//! instance's file is never removed.
//!
//! Every run has a random 64-bit token, written in its view and in the environment of every
//! process it starts ([`RUN_ENV`]): leftovers of a dead run are the processes that carry that
//! run's token, never processes that merely name the instance.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use shm_ring::{RingSnapshot, RingStorage, ShmRing, SideSnapshot};

use crate::layout::{ring_word as rw, u32_at, u64_at, RingRecord, StatsHeader, TailHeader};
use crate::layout::{RING_CONSUMER_SLEEPING, RING_PRODUCER_SLEEPING, RING_PUBLISHED};
use crate::names::{self, Dir, UntrustedFile};
use crate::stats::{Stats, COUNTERS_BYTES, MAX_FRONTS, MAX_WORKERS, STATS_MAGIC, STATS_SIZE};
use std::mem::{offset_of, size_of};

/// `b"SHMRVIEW"`: the tail of a view file.
pub const VIEW_MAGIC: u64 = u64::from_le_bytes(*b"SHMRVIEW");
/// Bumped on any change of the tail's layout.
pub const VIEW_VERSION: u32 = 1;
/// Bytes of the tail header (after the stats layout).
pub const TAIL_HEADER: usize = size_of::<TailHeader>();
/// u64 words per ring record in the tail.
pub const RING_WORDS: usize = size_of::<RingRecord>() / 8;
/// Bytes per ring record.
pub const RING_BYTES: usize = RING_WORDS * 8;
/// The smallest view file: the stats layout and the tail header.
pub const PUBLISHED_MIN: usize = STATS_SIZE + TAIL_HEADER;
/// How often the supervisor publishes.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// Environment variable naming the run (hex token) in every process a relay starts.
pub const RUN_ENV: &str = "SHMRELAY_RUN";

/// Size of a view file with `rings` ring records.
pub fn published_size(rings: usize) -> usize {
    PUBLISHED_MIN + rings * RING_BYTES
}

/// Index of ring (`f`, `w`, `dir`) among `workers` workers.
pub fn ring_index(workers: usize, f: usize, w: usize, dir: Dir) -> usize {
    (f * workers + w) * 2 + usize::from(dir == Dir::Reply)
}

/// A random token for a run (never 0).
pub fn new_token() -> u64 {
    let mut b = [0u8; 8];
    loop {
        // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        let t = u64::from_ne_bytes(b);
        if n == 8 && t != 0 {
            return t;
        }
    }
}

/// Why a view could not be read or an instance not claimed.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The file is not one this user may trust (type, owner, a link).
    #[error(transparent)]
    Untrusted(#[from] UntrustedFile),
    /// Reading or writing it failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Its size is not one a view can have.
    #[error("{} is {len} bytes: not a shmrelay stats view (expected at least {PUBLISHED_MIN})", path.display())]
    Size { path: PathBuf, len: u64 },
    /// Magic or version wrong.
    #[error("{} is not a shmrelay stats view of this version ({what})", path.display())]
    Format { path: PathBuf, what: String },
    /// A live supervisor holds the instance.
    #[error("instance is already running (the lock on {} is held{}); stop it or pick another --instance", path.display(), pid.map_or(String::new(), |p| format!(", supervisor pid {p} by its view")))]
    Live { path: PathBuf, pid: Option<u32> },
    /// Another supervisor took the name while this one was claiming it.
    #[error("{} was created by another supervisor meanwhile: instance is already running", path.display())]
    Raced { path: PathBuf },
}

impl ViewError {
    /// The I/O error kind (`NotFound` when there is no file).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            ViewError::Untrusted(u) => u.kind(),
            ViewError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        }
    }

    /// As an `io::Error` of the same kind and message.
    pub fn into_io(self) -> io::Error {
        io::Error::new(self.kind(), self.to_string())
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ViewError + '_ {
    move |source| ViewError::Io {
        path: path.to_owned(),
        source,
    }
}

fn flock(kind: libc::c_short) -> libc::flock {
    // SAFETY: `flock` is plain data; all-zero is a valid value (start 0, len 0 = whole file).
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l
}

/// Whether some open file description holds a write lock on `file` (the live supervisor's).
/// Takes nothing, so it never disturbs a starting supervisor.
///
/// # Errors
///
/// The `fcntl` error.
pub fn locked(file: &File) -> io::Result<bool> {
    let mut l = flock(libc::F_RDLCK as libc::c_short);
    // SAFETY: F_OFD_GETLK reads and writes one `flock` we own; the fd is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut l) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes the write lock on `file` (opened for writing) without waiting; false if it is held.
///
/// # Errors
///
/// The `fcntl` error other than "held".
pub fn try_lock(file: &File) -> io::Result<bool> {
    let l = flock(libc::F_WRLCK as libc::c_short);
    // SAFETY: F_OFD_SETLK reads one `flock` we own; the fd is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// Whether `path` (not followed) is still the file `file` is open on.
pub fn same_file(path: &Path, file: &File) -> bool {
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

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

fn peek_file(path: &Path, file: &File) -> Result<Peek, ViewError> {
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

fn encode_ring(ring: &ShmRing, out: &mut Vec<u8>) {
    let h = ring.header();
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut words = [0u64; RING_WORDS];
    words[rw::CAPACITY] = ring.capacity() as u64;
    words[rw::HEAD] = ld(&h.head.0);
    words[rw::TAIL] = ld(&h.tail.0);
    let flag = |sleep: &std::sync::atomic::AtomicU32, bit: u64| {
        if sleep.load(Ordering::Relaxed) == 1 {
            bit
        } else {
            0
        }
    };
    words[rw::FLAGS] = RING_PUBLISHED
        | flag(&h.consumer_sleep, RING_CONSUMER_SLEEPING)
        | flag(&h.producer_sleep, RING_PRODUCER_SLEEPING);
    for (o, s) in [(rw::PRODUCER, &h.producer.0), (rw::CONSUMER, &h.consumer.0)] {
        words[o + rw::PID] = u64::from(s.pid.load(Ordering::Relaxed));
        words[o + rw::ATTACH_COUNT] = u64::from(s.attach_count.load(Ordering::Relaxed));
        words[o + rw::ACTIVE_NS] = ld(&s.active_ns);
        words[o + rw::RECORDS] = ld(&s.records);
        words[o + rw::BYTES] = ld(&s.bytes);
        words[o + rw::FULL_EVENTS] = ld(&s.full_events);
        words[o + rw::WAKEUPS_SENT] = ld(&s.wakeups_sent);
        words[o + rw::PARKS] = ld(&s.parks);
        words[o + rw::HIGH_WATER] = ld(&s.high_water);
    }
    for (i, u) in h.user.0.iter().enumerate() {
        words[rw::USER + i] = ld(u);
    }
    for v in words {
        out.extend_from_slice(&v.to_ne_bytes());
    }
}

/// A stale view claimed (locked) for removal: the instance is dead and nobody else can claim
/// it while this is held.
pub struct Claimed {
    file: File,
    path: PathBuf,
    /// What the dead view said (token 0 if unreadable).
    pub peek: Option<Peek>,
}

impl Claimed {
    /// Removes the claimed view if its name still leads to it.
    ///
    /// # Errors
    ///
    /// The unlink error.
    pub fn remove(self) -> io::Result<bool> {
        if !same_file(&self.path, &self.file) {
            return Ok(false);
        }
        std::fs::remove_file(&self.path)?;
        Ok(true)
    }
}

/// Claims the view at `path` if its instance is dead: opens it safely, takes its lock
/// (retrying for `wait` while someone else holds it briefly, such as a `relayctl gc`) and
/// checks the name still leads to it. `Ok(None)` when there is no file.
///
/// # Errors
///
/// [`ViewError::Live`] when a supervisor holds it; [`ViewError::Untrusted`] for a file this
/// user must not trust or remove; I/O errors.
pub fn claim_stale(path: &Path, wait: Duration) -> Result<Option<Claimed>, ViewError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let file = match names::open_checked(path, true) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if try_lock(&file).map_err(io_err(path))? {
            if !same_file(path, &file) {
                // Replaced between open and lock: look again.
                continue;
            }
            let peek = peek_file(path, &file).ok();
            return Ok(Some(Claimed {
                file,
                path: path.to_owned(),
                peek,
            }));
        }
        if std::time::Instant::now() >= deadline {
            let pid = peek_file(path, &file)
                .ok()
                .map(|p| p.pid)
                .filter(|&p| p != 0);
            return Err(ViewError::Live {
                path: path.to_owned(),
                pid,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The supervisor's side: creates the view, holds its lock, publishes into it.
pub struct Publisher {
    file: File,
    path: PathBuf,
    token: u64,
    fronts: usize,
    workers: usize,
    seq: u64,
    buf: Vec<u8>,
}

impl Publisher {
    /// Creates the view at `path` for a run with `token`: written and locked under a hidden
    /// temporary name, then renamed into place only if the name is free.
    ///
    /// # Errors
    ///
    /// [`ViewError::Raced`] if another supervisor created the name first; I/O errors.
    pub fn create(
        path: &Path,
        token: u64,
        control: &Stats,
        fronts: usize,
        workers: usize,
    ) -> Result<Publisher, ViewError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".shmrelay-new.{token:016x}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let mut p = Publisher {
            file,
            path: path.to_owned(),
            token,
            fronts,
            workers,
            seq: 0,
            buf: Vec::new(),
        };
        let size = published_size(fronts * workers * 2) as u64;
        let setup = (|| -> io::Result<()> {
            p.file.set_len(size)?;
            if !try_lock(&p.file)? {
                return Err(io::Error::other("the new view is locked by someone else"));
            }
            p.publish(control, &[])?;
            Ok(())
        })();
        if let Err(e) = setup {
            let _ = std::fs::remove_file(&tmp);
            return Err(ViewError::Io {
                path: tmp,
                source: if e.raw_os_error() == Some(libc::ENOSPC) {
                    io::Error::new(
                        io::ErrorKind::StorageFull,
                        "no space left in the shared-memory directory for the stats view",
                    )
                } else {
                    e
                },
            });
        }
        let (from, to) = (cstr(&tmp)?, cstr(path)?);
        // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_file(&tmp);
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Err(ViewError::Raced {
                    path: path.to_owned(),
                });
            }
            return Err(ViewError::Io {
                path: path.to_owned(),
                source: e,
            });
        }
        Ok(p)
    }

    /// The run's token.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Copies the control segment's counters and a snapshot of every ring into the view.
    /// `rings[f][w]` is (request, reply).
    ///
    /// # Errors
    ///
    /// The `pwrite` error (a full tmpfs, say): the view is stale, the relay unaffected.
    pub fn publish(
        &mut self,
        control: &Stats,
        rings: &[Vec<(ShmRing, ShmRing)>],
    ) -> io::Result<()> {
        control.copy_prefix(COUNTERS_BYTES, &mut self.buf)?;
        self.file.write_all_at(&self.buf, 0)?;
        self.seq += 1;
        self.buf.clear();
        self.buf.resize(TAIL_HEADER, 0);
        let count = (self.fronts * self.workers * 2) as u32;
        let mut put = |at: usize, v: &[u8]| self.buf[at..at + v.len()].copy_from_slice(v);
        put(offset_of!(TailHeader, magic), &VIEW_MAGIC.to_ne_bytes());
        put(offset_of!(TailHeader, version), &VIEW_VERSION.to_ne_bytes());
        put(offset_of!(TailHeader, rings), &count.to_ne_bytes());
        put(offset_of!(TailHeader, token), &self.token.to_ne_bytes());
        put(offset_of!(TailHeader, seq), &self.seq.to_ne_bytes());
        let now = crate::stats::unix_ms();
        put(
            offset_of!(TailHeader, published_unix_ms),
            &now.to_ne_bytes(),
        );
        put(
            offset_of!(TailHeader, fronts),
            &(self.fronts as u64).to_ne_bytes(),
        );
        put(
            offset_of!(TailHeader, workers),
            &(self.workers as u64).to_ne_bytes(),
        );
        for row in rings.iter().take(self.fronts) {
            for (req, rep) in row.iter().take(self.workers) {
                encode_ring(req, &mut self.buf);
                encode_ring(rep, &mut self.buf);
            }
        }
        self.file.write_all_at(&self.buf, STATS_SIZE as u64)
    }

    /// Removes the view if the name still leads to this run's file (never another run's).
    pub fn remove(&self) -> bool {
        same_file(&self.path, &self.file) && std::fs::remove_file(&self.path).is_ok()
    }
}

fn cstr(p: &Path) -> Result<std::ffi::CString, ViewError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| ViewError::Io {
        path: p.to_owned(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
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
/// lags the relay by up to [`PUBLISH_EVERY`]). False if it did not.
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

/// Processes other than `me` whose environment carries run `token`: leftovers of that run
/// (a process is never picked for naming the instance alone).
pub fn processes_of_run(token: u64, me: u32) -> Vec<u32> {
    if token == 0 {
        return Vec::new();
    }
    let needle = format!("{RUN_ENV}={token:016x}");
    crate::procfs::pids()
        .filter(|&pid| pid != me && crate::procfs::environ_has(pid, &needle))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shmrelay-view-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn publish_read_lock_and_claim() {
        let d = tmpdir("pub");
        let path = d.join("shmrelay.x.stats");
        let control = Stats::create_memfd(1, 2).unwrap();
        control.front(0).accepts.store(7, Ordering::Relaxed);
        let rings: Vec<Vec<(ShmRing, ShmRing)>> = vec![(0..2)
            .map(|_| {
                (
                    ShmRing::create_memfd("r", 4096).unwrap(),
                    ShmRing::create_memfd("r", 4096).unwrap(),
                )
            })
            .collect()];
        rings[0][1].0.user_words()[3].store(42, Ordering::Relaxed);
        let mut p = Publisher::create(&path, 0xabc, &control, 1, 2).unwrap();
        p.publish(&control, &rings).unwrap();
        let v = View::read(&path).unwrap();
        assert!(v.live);
        assert_eq!(v.token, 0xabc);
        assert_eq!(v.stats.front(0).accepts.load(Ordering::Relaxed), 7);
        let r = v.ring(0, 1, Dir::Request).unwrap();
        assert_eq!(r.user[3], 42);
        assert_eq!(r.snapshot.capacity, 4096);
        assert!(v.ring(0, 2, Dir::Request).is_none());
        // Live: nobody can claim it, and a second create loses.
        assert!(matches!(
            claim_stale(&path, Duration::ZERO),
            Err(ViewError::Live { .. })
        ));
        assert!(matches!(
            Publisher::create(&path, 1, &control, 1, 2),
            Err(ViewError::Raced { .. })
        ));
        assert!(peek(&path).unwrap().live);
        drop(p);
        // Dead now: claimable, and the claim removes it.
        assert!(!peek(&path).unwrap().live);
        let c = claim_stale(&path, Duration::ZERO).unwrap().unwrap();
        assert_eq!(c.peek.unwrap().token, 0xabc);
        assert!(c.remove().unwrap());
        assert!(claim_stale(&path, Duration::ZERO).unwrap().is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

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
