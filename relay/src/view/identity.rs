//! An instance's identity on the host: the lock its live supervisor holds on its view, the
//! run's token, and claiming (then removing) the view of an instance that is dead.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::read::peek_file;
use super::{io_err, Peek, ViewError, RUN_ENV};
use crate::names;

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
