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
use crate::stats::{Stats, COUNTERS_BYTES, STATS_SIZE};

fn encode_ring(ring: &ShmRing, out: &mut Vec<u8>) {
    let h = ring.header();
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut words = [0u64; RING_WORDS];
    words[0] = ring.capacity() as u64;
    words[1] = ld(&h.head.0);
    words[2] = ld(&h.tail.0);
    words[3] = 4
        | u64::from(h.consumer_sleep.load(Ordering::Relaxed) == 1)
        | (u64::from(h.producer_sleep.load(Ordering::Relaxed) == 1) << 1);
    for (o, s) in [(4, &h.producer.0), (13, &h.consumer.0)] {
        words[o] = u64::from(s.pid.load(Ordering::Relaxed));
        words[o + 1] = u64::from(s.attach_count.load(Ordering::Relaxed));
        words[o + 2] = ld(&s.active_ns);
        words[o + 3] = ld(&s.records);
        words[o + 4] = ld(&s.bytes);
        words[o + 5] = ld(&s.full_events);
        words[o + 6] = ld(&s.wakeups_sent);
        words[o + 7] = ld(&s.parks);
        words[o + 8] = ld(&s.high_water);
    }
    for (i, u) in h.user.0.iter().enumerate() {
        words[22 + i] = ld(u);
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
        let head = [
            VIEW_MAGIC,
            u64::from(VIEW_VERSION) | ((self.fronts * self.workers * 2) as u64) << 32,
            self.token,
            self.seq,
            crate::stats::unix_ms(),
            self.fronts as u64,
            self.workers as u64,
        ];
        for v in head {
            self.buf.extend_from_slice(&v.to_ne_bytes());
        }
        self.buf.resize(TAIL_HEADER, 0);
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
