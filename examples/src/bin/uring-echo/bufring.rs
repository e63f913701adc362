//! The provided-buffer ring of `uring-echo`: the buffers the kernel fills for multishot
//! receives, lent to a connection until the frames in them are sent, then given back.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::Submitter;

/// One entry of the ring, as the kernel reads it (`struct io_uring_buf`). The `resv` field of
/// entry 0 is the ring's tail, which only this process writes.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}
const _: () = assert!(std::mem::size_of::<RawBuf>() == 16);
/// Offset of the tail (entry 0's `resv`) from the ring's start.
const TAIL_OFFSET: usize = 14;

/// A registered buffer ring of `count` buffers of `size` bytes (buffer group `group`).
///
/// Invariant: a buffer id is either in the kernel's hands (pushed and published, not yet
/// handed back in a completion) or `held` here; the kernel writes only buffers in its hands,
/// so the bytes of a held buffer can be read and sent from without a race.
pub struct BufRing {
    ring: NonNull<RawBuf>,
    ring_bytes: usize,
    bufs: NonNull<u8>,
    bufs_bytes: usize,
    count: u16,
    size: u32,
    /// Next entry to fill, free-running (the kernel masks it with `count - 1`).
    tail: u16,
    held: Vec<bool>,
    nheld: usize,
    /// The buffer group id receives name.
    pub group: u16,
}

fn map(bytes: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping at an address the kernel picks: no existing memory
    // is affected; the result is checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(NonNull::new(p.cast()).expect("mmap returned null"))
}

impl BufRing {
    /// Maps the ring and the buffers, registers them as buffer group `group` and gives every
    /// buffer to the kernel. `count` must be a power of two up to 32768.
    ///
    /// # Errors
    ///
    /// The mappings fail, or the kernel refuses the registration (EINVAL before 5.19).
    pub fn new(submitter: &Submitter<'_>, count: u16, size: u32, group: u16) -> io::Result<Self> {
        if !count.is_power_of_two() || count > 32768 || size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the buffer count must be a power of two up to 32768, the size above 0",
            ));
        }
        let ring_bytes = usize::from(count) * std::mem::size_of::<RawBuf>();
        let bufs_bytes = usize::from(count) * size as usize;
        let ring = map(ring_bytes)?.cast::<RawBuf>();
        let bufs = match map(bufs_bytes) {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: `ring` was mapped above with this length and nothing refers to it.
                unsafe { libc::munmap(ring.as_ptr().cast(), ring_bytes) };
                return Err(e);
            }
        };
        let mut me = BufRing {
            ring,
            ring_bytes,
            bufs,
            bufs_bytes,
            count,
            size,
            tail: 0,
            held: vec![true; usize::from(count)],
            nheld: usize::from(count),
            group,
        };
        // SAFETY: the ring mapping is page-aligned, `count` entries long, and lives until
        // `Drop`, which unregisters it first.
        unsafe { submitter.register_buf_ring_with_flags(ring.as_ptr() as u64, count, group, 0)? };
        for bid in 0..count {
            me.give_back(bid);
        }
        me.publish();
        Ok(me)
    }

    /// Takes buffer `bid` out of the kernel's hands (its completion named it).
    ///
    /// # Panics
    ///
    /// `bid` is out of range or already held: the kernel broke the protocol.
    pub fn take(&mut self, bid: u16) {
        let h = &mut self.held[usize::from(bid)];
        assert!(!*h, "buffer {bid} handed out twice");
        *h = true;
        self.nheld += 1;
    }

    /// The first `len` bytes of held buffer `bid`.
    pub fn data(&self, bid: u16, len: usize) -> &[u8] {
        assert!(self.held[usize::from(bid)] && len <= self.size as usize);
        // SAFETY: `bid` is held (checked), so the kernel does not write it (type invariant)
        // until `give_back`, which needs `&mut self` and so ends this borrow; the range is
        // inside the buffer mapping.
        unsafe {
            std::slice::from_raw_parts(
                self.bufs
                    .as_ptr()
                    .add(usize::from(bid) * self.size as usize),
                len,
            )
        }
    }

    /// Gives held buffer `bid` back to the kernel (visible to it at the next `publish`).
    pub fn give_back(&mut self, bid: u16) {
        let h = &mut self.held[usize::from(bid)];
        assert!(*h, "buffer {bid} given back twice");
        *h = false;
        self.nheld -= 1;
        let slot = usize::from(self.tail & (self.count - 1));
        let addr = self.bufs.as_ptr() as u64 + u64::from(bid) * u64::from(self.size);
        // SAFETY: `slot` is inside the ring; the kernel reads entries only below the published
        // tail and this one is at or past it. Fields are written through raw pointers, not a
        // reference, because entry 0's `resv` is the tail the kernel reads meanwhile.
        unsafe {
            let e = self.ring.as_ptr().add(slot);
            std::ptr::addr_of_mut!((*e).addr).write(addr);
            std::ptr::addr_of_mut!((*e).len).write(self.size);
            std::ptr::addr_of_mut!((*e).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the entries given back since the last call.
    pub fn publish(&self) {
        // SAFETY: the tail is a 2-byte aligned u16 inside the ring mapping (offset 14); the
        // kernel only reads it, so an atomic view of it is sound.
        let tail = unsafe {
            &*self
                .ring
                .as_ptr()
                .cast::<u8>()
                .add(TAIL_OFFSET)
                .cast::<AtomicU16>()
        };
        // Release: pairs with the kernel's smp_load_acquire of the tail, so the entries written
        // in `give_back` are visible before the tail that covers them.
        tail.store(self.tail, Ordering::Release);
    }

    /// Buffers the kernel can still fill.
    pub fn available(&self) -> usize {
        usize::from(self.count) - self.nheld
    }

    /// Address of byte `off` of held buffer `bid`, for an iovec.
    pub fn addr(&self, bid: u16, off: usize) -> *const u8 {
        self.data(bid, off).as_ptr_range().end
    }

    /// Size of every buffer.
    pub fn size(&self) -> u32 {
        self.size
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both mappings were made in `new` with these lengths. The ring is unmapped
        // only after the io_uring is gone or the group unregistered: `Server` drops the ring
        // (the io_uring) before this (field order).
        unsafe {
            libc::munmap(self.ring.as_ptr().cast(), self.ring_bytes);
            libc::munmap(self.bufs.as_ptr().cast(), self.bufs_bytes);
        }
    }
}
