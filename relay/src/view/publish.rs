//! Publishing the view: the supervisor creates it under a hidden name, locks it, renames it
//! into place, then copies the counters and a snapshot of every ring into it with `pwrite`.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use shm_ring::{RingStorage, ShmRing};

use super::identity::{same_file, try_lock};
use super::{io_err, published_size, ViewError, RING_WORDS, TAIL_HEADER, VIEW_MAGIC, VIEW_VERSION};
use crate::layout::{ring_word as rw, TailHeader};
use crate::layout::{RING_CONSUMER_SLEEPING, RING_PRODUCER_SLEEPING, RING_PUBLISHED};
use crate::stats::{Stats, COUNTERS_BYTES, STATS_SIZE};
use std::mem::offset_of;

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
