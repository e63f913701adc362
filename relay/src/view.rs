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
//!
//! The code is split by concept: `view/publish.rs` writes the view (the supervisor's side),
//! `view/read.rs` copies and validates it (the tools' side), `view/identity.rs` is the lock,
//! the run's token and claiming a dead instance's name.
//!
//! [`Stats::create_memfd`]: crate::stats::Stats::create_memfd
//! [`COUNTERS_BYTES`]: crate::stats::COUNTERS_BYTES

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::layout::{RingRecord, TailHeader};
use crate::names::{Dir, UntrustedFile};
use crate::stats::STATS_SIZE;
use std::mem::size_of;

mod identity;
mod publish;
mod read;

pub use identity::{
    claim_stale, locked, new_token, processes_of_run, same_file, try_lock, Claimed,
};
pub use publish::Publisher;
pub use read::{peek, published_seq, wait_published, Peek, RingSnap, View};

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
pub use shmrelay_worker::protocol::env::RUN as RUN_ENV;

/// Size of a view file with `rings` ring records.
pub fn published_size(rings: usize) -> usize {
    PUBLISHED_MIN + rings * RING_BYTES
}

/// Index of ring (`f`, `w`, `dir`) among `workers` workers.
pub fn ring_index(workers: usize, f: usize, w: usize, dir: Dir) -> usize {
    (f * workers + w) * 2 + usize::from(dir == Dir::Reply)
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

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ViewError + '_ {
    move |source| ViewError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use shm_ring::ShmRing;

    use super::*;
    use crate::stats::Stats;

    pub(super) fn tmpdir(tag: &str) -> PathBuf {
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
}
