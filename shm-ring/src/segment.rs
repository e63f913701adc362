//! Rings in shared memory: creating a segment, attaching to one, passing it between processes.
//!
//! A segment holds exactly one ring: the 1 KiB header, then the data area. It is either an
//! anonymous memfd (sealed against resizing, handed to other processes as an fd) or a file under
//! `/dev/shm` (mode 0600) that tools can find by name. A named file's whole size is allocated
//! at creation with `fallocate`, so a full tmpfs is an error then, never a SIGBUS later. A
//! memfd lives on the kernel's internal tmpfs, which has no size limit to run into: its pages
//! are taken when first touched, by whichever process writes there, so an idle or lightly used
//! ring costs its header and the pages its records reached, not its capacity (a relay with
//! hundreds of rings). No mapping pre-faults the data area either.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memmap2::{Mmap, MmapOptions, MmapRaw};
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::error::{AttachError, CreateError};
use crate::layout::{self, RingHeader, HEADER_SIZE, LAYOUT_VERSION, MAGIC};
use crate::storage::{init_header, RingStorage};
use crate::sync::Ordering;

/// A ring in a shared memory segment.
///
/// # Safety of the mapping
///
/// The mapping is shared with other processes, which may write anything into it at any time.
/// Only the ring code reads it, through atomics (header) and through validated, bounds-checked
/// offsets (data); see [`RingStorage`]. A segment is never resized after creation (memfds are
/// sealed; named segments are created and sized by the supervisor, which owns them), so the
/// mapping never extends past the end of the file.
///
/// # Examples
///
/// ```
/// use shm_ring::{Consumer, Meta, Producer, ShmRing};
/// use std::sync::Arc;
///
/// let ring = Arc::new(ShmRing::create_memfd("doc", 4096).unwrap());
/// // Another process would attach with `ShmRing::open_fd` on an inherited or received fd.
/// let mut tx = Producer::new(ring.clone()).unwrap();
/// let mut rx = Consumer::new(ring).unwrap();
/// tx.push(Meta::tag(1), b"across processes").unwrap();
/// tx.publish();
/// assert_eq!(rx.records().unwrap().next().unwrap().unwrap().payload(), b"across processes");
/// ```
pub struct ShmRing {
    /// Read-write: the whole segment, or only the header page for a reader (`ro` set).
    map: MmapRaw,
    /// A reader's read-only view of the whole segment, through which it reaches the data
    /// area: a write to the data through it faults instead of corrupting the peer's records.
    ro: Option<Mmap>,
    file: File,
    path: Option<PathBuf>,
    capacity: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access to it is governed by the ring
// protocol, not by threads.
unsafe impl Send for ShmRing {}
// SAFETY: as for Send; the header is atomics and the data area is handed out by the protocol.
unsafe impl Sync for ShmRing {}

impl ShmRing {
    /// Creates a ring in a new anonymous memfd (named `name` in /proc/PID/fd only).
    ///
    /// # Errors
    ///
    /// [`CreateError::BadCapacity`], [`CreateError::NoSpace`] when shared memory is short,
    /// [`CreateError::Io`] otherwise.
    pub fn create_memfd(name: &str, capacity: usize) -> Result<ShmRing, CreateError> {
        check_capacity(capacity)?;
        let io_err = |source: io::Error| CreateError::Io {
            name: name.to_owned(),
            source,
        };
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(|e| io_err(e.into()))?;
        let file = File::from(fd);
        // Sized, not allocated: pages come as records reach them (see the module doc).
        file.set_len((HEADER_SIZE + capacity) as u64)
            .map_err(io_err)?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| io_err(e.into()))?;
        Self::init(file, None, capacity)
    }

    /// Creates a ring in a new file at `path` (normally under `/dev/shm`), mode 0600. Fails if
    /// the file exists: two owners never share a name by accident.
    ///
    /// # Errors
    ///
    /// [`CreateError::Exists`] if the name is taken; otherwise as
    /// [`create_memfd`](ShmRing::create_memfd).
    pub fn create_at(path: &Path, capacity: usize) -> Result<ShmRing, CreateError> {
        check_capacity(capacity)?;
        let name = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => CreateError::Exists(name.clone()),
                _ => CreateError::Io {
                    name: name.clone(),
                    source,
                },
            })?;
        if let Err(e) = allocate(&file, &name, capacity) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Self::init(file, Some(path.to_owned()), capacity)
    }

    fn init(file: File, path: Option<PathBuf>, capacity: usize) -> Result<ShmRing, CreateError> {
        let size = HEADER_SIZE + capacity;
        let name = path
            .as_ref()
            .map_or("memfd".into(), |p| p.display().to_string());
        let map = map_rw(&file, size).map_err(|source| CreateError::Io { name, source })?;
        let ring = ShmRing {
            map,
            ro: None,
            file,
            path,
            capacity,
        };
        // The file is new and zero-filled, which is a valid (all-zero) header.
        init_header(ring.header(), capacity as u64, HEADER_SIZE as u64);
        Ok(ring)
    }

    /// Attaches to the ring in an inherited or received fd, waiting up to `timeout` for its
    /// creator to finish initialising it.
    ///
    /// # Errors
    ///
    /// The [`AttachError`] that names what is wrong: not initialised, bad magic, version or
    /// size mismatch, or an I/O error.
    pub fn open_fd(fd: OwnedFd, timeout: Duration) -> Result<ShmRing, AttachError> {
        Self::attach(File::from(fd), None, timeout, false)
    }

    /// Attaches as the ring's **reader**: the header (positions, sleep words, user words)
    /// is mapped read-write, the data area read-only (`PROT_READ`), so this process can
    /// never write a record, by mistake or otherwise. Only a [`Consumer`](crate::Consumer)
    /// (and [`RingView`]-like reads) can use such a ring; [`Producer::new`](crate::Producer::new)
    /// refuses it with [`AttachError::ReadOnly`].
    ///
    /// # Errors
    ///
    /// As [`open_fd`](ShmRing::open_fd).
    pub fn open_fd_reader(fd: OwnedFd, timeout: Duration) -> Result<ShmRing, AttachError> {
        Self::attach(File::from(fd), None, timeout, true)
    }

    /// Attaches to the ring in the file at `path`; see [`open_fd`](ShmRing::open_fd).
    ///
    /// # Errors
    ///
    /// As [`open_fd`](ShmRing::open_fd).
    pub fn open_path(path: &Path, timeout: Duration) -> Result<ShmRing, AttachError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Self::attach(file, Some(path.to_owned()), timeout, false)
    }

    fn attach(
        file: File,
        path: Option<PathBuf>,
        timeout: Duration,
        reader: bool,
    ) -> Result<ShmRing, AttachError> {
        let file_len = wait_initialised(&file, timeout)?;
        let (map, ro) = if reader {
            // The header alone read-write (the kernel rounds it to a page, which also covers
            // the first data bytes: no pointer to them is ever derived from this mapping).
            let map = map_rw(&file, HEADER_SIZE)?;
            // SAFETY: a read-only shared mapping of a segment that is never resized (sealed
            // memfd, or a file the supervisor owns); its bytes are only reached through raw
            // pointers (`RingStorage::data`), never held as references. Not pre-faulted: the
            // pages a ring's records never reached cost nothing.
            let ro = unsafe { MmapOptions::new().len(file_len as usize).map(&file)? };
            (map, Some(ro))
        } else {
            (map_rw(&file, file_len as usize)?, None)
        };
        // SAFETY: the mapping is at least HEADER_SIZE bytes (checked by wait_initialised) and
        // page-aligned; every bit pattern is a valid RingHeader (all fields are atomics).
        let header = unsafe { &*(map.as_ptr() as *const RingHeader) };
        let capacity = check_identity(header, file_len)?;
        Ok(ShmRing {
            map,
            ro,
            file,
            path,
            capacity,
        })
    }

    /// True if this process mapped the data area read-only ([`open_fd_reader`](ShmRing::open_fd_reader)).
    pub fn is_reader(&self) -> bool {
        self.ro.is_some()
    }

    /// The segment's fd, to pass to a child process or over a Unix socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The file's path, for a named segment.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Removes a named segment's file (the mapping stays valid until dropped).
    ///
    /// # Errors
    ///
    /// The `unlink` error; a memfd has nothing to remove and returns Ok.
    pub fn unlink(&self) -> io::Result<()> {
        match &self.path {
            Some(p) => std::fs::remove_file(p),
            None => Ok(()),
        }
    }

    /// Empties the ring by moving both positions back to zero and clearing the sleep and user
    /// words, e.g. after a peer corrupted it. Only for a ring that nobody uses at the moment:
    /// both sides must attach afresh afterwards (a live handle would see its position jump
    /// backwards and report the ring corrupt).
    pub fn reset(&self) {
        let h = self.header();
        h.head.store(0, Ordering::Relaxed);
        h.tail.store(0, Ordering::Relaxed);
        h.consumer_sleep.store(0, Ordering::Relaxed);
        h.producer_sleep.store(0, Ordering::Relaxed);
        for w in &h.user.0 {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// The user words of the header: 16 x u64 that the ring gives no meaning to.
    pub fn user_words(&self) -> &[crate::sync::AtomicU64; 16] {
        &self.header().user.0
    }
}

// SAFETY: the header was initialised (by `init`) or validated (by `attach`: magic, version,
// size); the data area is `capacity` bytes after the 1 KiB header inside the mapping, 8-aligned;
// `capacity` was validated and is kept privately.
unsafe impl RingStorage for ShmRing {
    fn header(&self) -> &RingHeader {
        // SAFETY: the mapping is at least HEADER_SIZE bytes, page-aligned, and any bit pattern
        // is a valid header.
        unsafe { &*(self.map.as_ptr() as *const RingHeader) }
    }
    fn data(&self) -> *mut u8 {
        match &self.ro {
            // SAFETY: HEADER_SIZE + capacity == mapping length (checked at attach). The
            // pointer is to read-only memory: `data_writable` says so, and the only writer of
            // a data area, `Producer`, refuses such a storage.
            Some(ro) => unsafe { ro.as_ptr().add(HEADER_SIZE) as *mut u8 },
            // SAFETY: HEADER_SIZE + capacity == mapping length (checked at create and attach).
            None => unsafe { self.map.as_mut_ptr().add(HEADER_SIZE) },
        }
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn data_writable(&self) -> bool {
        self.ro.is_none()
    }
}

/// A read-only mapping of a ring, for tools: reads positions and counters without taking a
/// side and without being able to disturb the ring.
pub struct RingView {
    map: Mmap,
    capacity: usize,
}

/// What [`RingView::snapshot`] read: hints, consistent enough for display.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingSnapshot {
    pub capacity: u64,
    pub head: u64,
    pub tail: u64,
    pub producer: SideSnapshot,
    pub consumer: SideSnapshot,
    pub consumer_sleeping: bool,
    pub producer_sleeping: bool,
}

/// One side's liveness and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SideSnapshot {
    pub pid: u32,
    pub attach_count: u32,
    pub active_ns: u64,
    pub records: u64,
    pub bytes: u64,
    pub full_events: u64,
    pub wakeups_sent: u64,
    pub parks: u64,
    pub high_water: u64,
}

impl RingView {
    /// Maps the ring at `path` read-only.
    ///
    /// # Errors
    ///
    /// As [`ShmRing::open_path`] (without waiting for initialisation).
    pub fn open(path: &Path) -> Result<RingView, AttachError> {
        // Never blocks (a FIFO at the name opens at once and fails the size check) and never
        // follows a link: tools open names in a directory every user can write.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)?;
        let file_len = wait_initialised(&file, Duration::ZERO)?;
        // SAFETY: a read-only shared mapping of a file that is never shrunk while the relay
        // owns it; a concurrent `gc` could unlink it, which keeps the pages alive.
        let map = unsafe { MmapOptions::new().len(file_len as usize).map(&file)? };
        // SAFETY: as in `ShmRing::attach`; only loads are done through this reference, which
        // read-only memory permits.
        let header = unsafe { &*(map.as_ptr() as *const RingHeader) };
        let capacity = check_identity(header, file_len)?;
        Ok(RingView { map, capacity })
    }

    /// Reads positions and counters.
    pub fn snapshot(&self) -> RingSnapshot {
        // SAFETY: validated in `open`; the mapping lives as long as self.
        let h = unsafe { &*(self.map.as_ptr() as *const RingHeader) };
        let side = |s: &layout::Side| SideSnapshot {
            pid: s.pid.load(Ordering::Relaxed),
            attach_count: s.attach_count.load(Ordering::Relaxed),
            active_ns: s.active_ns.load(Ordering::Relaxed),
            records: s.records.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            full_events: s.full_events.load(Ordering::Relaxed),
            wakeups_sent: s.wakeups_sent.load(Ordering::Relaxed),
            parks: s.parks.load(Ordering::Relaxed),
            high_water: s.high_water.load(Ordering::Relaxed),
        };
        RingSnapshot {
            capacity: self.capacity as u64,
            head: h.head.load(Ordering::Relaxed),
            tail: h.tail.load(Ordering::Relaxed),
            producer: side(&h.producer),
            consumer: side(&h.consumer),
            consumer_sleeping: h.consumer_sleep.load(Ordering::Relaxed) == 1,
            producer_sleeping: h.producer_sleep.load(Ordering::Relaxed) == 1,
        }
    }

    /// The user words (see [`ShmRing::user_words`]).
    pub fn user_word(&self, i: usize) -> u64 {
        // SAFETY: validated in `open`.
        let h = unsafe { &*(self.map.as_ptr() as *const RingHeader) };
        h.user.0[i].load(Ordering::Relaxed)
    }
}

fn check_capacity(capacity: usize) -> Result<(), CreateError> {
    if layout::valid_capacity(capacity as u64) {
        Ok(())
    } else {
        Err(CreateError::BadCapacity(capacity as u64))
    }
}

fn allocate(file: &File, name: &str, capacity: usize) -> Result<(), CreateError> {
    let size = (HEADER_SIZE + capacity) as u64;
    file.set_len(size).map_err(|source| CreateError::Io {
        name: name.to_owned(),
        source,
    })?;
    fallocate(file, FallocateFlags::empty(), 0, size as libc::off_t).map_err(|e| {
        let source = io::Error::from(e);
        if e == nix::errno::Errno::ENOSPC || e == nix::errno::Errno::ENOMEM {
            CreateError::NoSpace {
                name: name.to_owned(),
                size,
                source,
            }
        } else {
            CreateError::Io {
                name: name.to_owned(),
                source,
            }
        }
    })
}

fn map_rw(file: &File, len: usize) -> io::Result<MmapRaw> {
    // SAFETY: MmapRaw hands out only a raw pointer, never a reference, so concurrent writes by
    // other processes do not alias any Rust reference; the file is never shrunk (sealed or
    // owned by the supervisor), so no access past its end can SIGBUS. Not pre-faulted: pages
    // are touched as records reach them (the header at once).
    MmapOptions::new().len(len).map_raw(file)
}

/// Waits (bounded) until the file is large enough for a header and the magic is set; returns
/// the file length.
fn wait_initialised(file: &File, timeout: Duration) -> Result<u64, AttachError> {
    let start = Instant::now();
    loop {
        let len = file.metadata()?.len();
        if len >= HEADER_SIZE as u64 {
            let mut magic = [0u8; 8];
            std::os::unix::fs::FileExt::read_exact_at(file, &mut magic, 0)?;
            if u64::from_le_bytes(magic) != 0 {
                return Ok(len);
            }
        }
        if start.elapsed() >= timeout {
            return Err(AttachError::NotInitialised {
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Validates magic, version and size; returns the capacity.
fn check_identity(h: &RingHeader, file_len: u64) -> Result<usize, AttachError> {
    // Acquire: pairs with the Release store of the magic in `init_header`.
    let magic = h.id.magic.load(Ordering::Acquire);
    if magic != MAGIC {
        return Err(AttachError::BadMagic { found: magic });
    }
    let version = h.id.version.load(Ordering::Relaxed);
    if version != LAYOUT_VERSION {
        return Err(AttachError::VersionMismatch {
            found: version,
            expected: LAYOUT_VERSION,
        });
    }
    let capacity = h.id.capacity.load(Ordering::Relaxed);
    let data_offset = h.id.data_offset.load(Ordering::Relaxed);
    let expected = capacity.saturating_add(HEADER_SIZE as u64);
    if !layout::valid_capacity(capacity)
        || data_offset != HEADER_SIZE as u64
        || file_len != expected
    {
        return Err(AttachError::SizeMismatch { file_len, expected });
    }
    Ok(capacity as usize)
}

/// Sends `fds` with a few bytes of `data` over a Unix socket (SCM_RIGHTS).
///
/// # Errors
///
/// The `sendmsg` error.
pub fn send_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [io::IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives bytes and up to `max_fds` fds sent with [`send_fds`]. The fds arrive close-on-exec.
///
/// # Errors
///
/// The `recvmsg` error, or `InvalidData` if the control message was truncated.
pub fn recv_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    // Room for the cmsghdr plus the fds, generously aligned.
    let mut cmsg = vec![0u8; 64 + std::mem::size_of::<RawFd>() * max_fds.max(1)];
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg
        .cmsgs()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "control message truncated"))?
    {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these fds in our table for us alone.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Consumer, Meta, Producer};
    use std::sync::Arc;

    fn tmp_path(tag: &str) -> PathBuf {
        PathBuf::from(format!(
            "/dev/shm/shm-ring-test-{}-{tag}",
            std::process::id()
        ))
    }

    #[test]
    fn named_segment_is_private_and_exclusive() {
        let p = tmp_path("excl");
        let _ = std::fs::remove_file(&p);
        let ring = ShmRing::create_at(&p, 4096).unwrap();
        let mode = std::fs::metadata(&p).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        assert!(matches!(
            ShmRing::create_at(&p, 4096),
            Err(CreateError::Exists(_))
        ));
        let again = ShmRing::open_path(&p, Duration::ZERO).unwrap();
        assert_eq!(again.capacity(), 4096);
        ring.unlink().unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn attach_errors_are_distinct() {
        let p = tmp_path("errs");
        let _ = std::fs::remove_file(&p);
        // Uninitialised: right size, zero magic.
        std::fs::write(&p, vec![0u8; HEADER_SIZE + 4096]).unwrap();
        let e = ShmRing::open_path(&p, Duration::from_millis(20))
            .err()
            .unwrap();
        assert!(matches!(e, AttachError::NotInitialised { .. }), "{e}");
        // Too short to hold a header at all: also "not initialised yet".
        std::fs::write(&p, [1u8; 10]).unwrap();
        assert!(matches!(
            ShmRing::open_path(&p, Duration::ZERO),
            Err(AttachError::NotInitialised { .. })
        ));
        // Bad magic.
        std::fs::write(&p, vec![0xAB; HEADER_SIZE + 4096]).unwrap();
        assert!(matches!(
            ShmRing::open_path(&p, Duration::ZERO),
            Err(AttachError::BadMagic { .. })
        ));
        std::fs::remove_file(&p).unwrap();

        let ring = ShmRing::create_at(&p, 4096).unwrap();
        ring.header()
            .id
            .version
            .store(LAYOUT_VERSION + 1, Ordering::Relaxed);
        let e = ShmRing::open_path(&p, Duration::ZERO).err().unwrap();
        assert!(
            matches!(
                e,
                AttachError::VersionMismatch {
                    found: 3,
                    expected: 2
                }
            ),
            "{e}"
        );
        ring.header()
            .id
            .version
            .store(LAYOUT_VERSION, Ordering::Relaxed);
        ring.header().id.capacity.store(8192, Ordering::Relaxed);
        let e = ShmRing::open_path(&p, Duration::ZERO).err().unwrap();
        assert!(matches!(e, AttachError::SizeMismatch { .. }), "{e}");
        ring.header().id.capacity.store(3000, Ordering::Relaxed);
        assert!(matches!(
            ShmRing::open_path(&p, Duration::ZERO),
            Err(AttachError::SizeMismatch { .. })
        ));
        ring.unlink().unwrap();
    }

    #[test]
    fn memfd_is_sealed_and_passes_over_a_socket() {
        let ring = ShmRing::create_memfd("seal", 4096).unwrap();
        // Growing or shrinking a sealed memfd fails.
        assert!(ring.file.set_len(100).is_err());
        assert!(ring.file.set_len(1 << 20).is_err());
        let (a, b) = UnixStream::pair().unwrap();
        send_fds(&a, b"ring", &[ring.fd()]).unwrap();
        let mut buf = [0u8; 8];
        let (n, mut fds) = recv_fds(&b, &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"ring");
        let other = Arc::new(ShmRing::open_fd(fds.pop().unwrap(), Duration::ZERO).unwrap());
        let mut tx = Producer::new(Arc::new(ring)).unwrap();
        let mut rx = Consumer::new(other).unwrap();
        tx.push(Meta::tag(3), b"via scm_rights").unwrap();
        tx.publish();
        let rec = rx.records().unwrap().next().unwrap().unwrap();
        assert_eq!(rec.payload(), b"via scm_rights");
    }

    #[test]
    fn view_reads_counters_read_only() {
        let p = tmp_path("view");
        let _ = std::fs::remove_file(&p);
        let ring = Arc::new(ShmRing::create_at(&p, 4096).unwrap());
        let mut tx = Producer::new(ring.clone()).unwrap();
        tx.push(Meta::tag(1), &[7; 100]).unwrap();
        tx.publish();
        let snap = RingView::open(&p).unwrap().snapshot();
        assert_eq!(snap.capacity, 4096);
        assert_eq!(snap.tail, 16 + 104); // header, payload padded to 8, no aux word
        assert_eq!(snap.producer.records, 1);
        assert_eq!(snap.producer.bytes, 100);
        assert_eq!(snap.producer.pid, std::process::id());
        ring.unlink().unwrap();
    }

    #[test]
    fn bad_capacity_is_refused() {
        assert!(matches!(
            ShmRing::create_memfd("x", 5000),
            Err(CreateError::BadCapacity(5000))
        ));
    }
}
