//! The provided-buffer ring of `uring-echo`: the buffers the kernel fills for multishot
//! receives, lent to a connection until the frames in them are sent, then given back.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::Submitter;

/// `IOU_PBUF_RING_INC`: the kernel consumes each buffer incrementally (Linux 6.12).
const IOU_PBUF_RING_INC: u16 = 2;

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
/// Invariant: the kernel writes a buffer only past its `consumed` bytes, and only while it is
/// `in_kernel` (pushed and published, not yet finished in a completion). Bytes below
/// `consumed` were handed over in completions, so they can be read and sent from without a
/// race; a buffer goes back to the kernel (and `consumed` to 0) only when the kernel is done
/// with it and no segment refers to it (`refs`).
///
/// Without incremental consumption every completion finishes its buffer. With it
/// (`IOU_PBUF_RING_INC`, Linux 6.12) the kernel fills one buffer with several receives, of any
/// connections, and says so with `IORING_CQE_F_BUF_MORE` until it is full.
pub struct BufRing {
    ring: NonNull<RawBuf>,
    ring_bytes: usize,
    bufs: NonNull<u8>,
    bufs_bytes: usize,
    count: u16,
    size: u32,
    /// Next entry to fill, free-running (the kernel masks it with `count - 1`).
    tail: u16,
    in_kernel: Vec<bool>,
    consumed: Vec<u32>,
    refs: Vec<u32>,
    nheld: usize,
    /// Registered with `IOU_PBUF_RING_INC`.
    incremental: bool,
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
    /// Maps the ring and the buffers, registers them as buffer group `group` (consumed
    /// incrementally if `incremental`) and gives every buffer to the kernel. `count` must be a
    /// power of two up to 32768.
    ///
    /// # Errors
    ///
    /// The mappings fail, or the kernel refuses the registration (EINVAL before 5.19, or
    /// before 6.12 with `incremental`).
    pub fn new(
        submitter: &Submitter<'_>,
        count: u16,
        size: u32,
        group: u16,
        incremental: bool,
    ) -> io::Result<Self> {
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
            in_kernel: vec![false; usize::from(count)],
            consumed: vec![0; usize::from(count)],
            refs: vec![0; usize::from(count)],
            nheld: usize::from(count),
            incremental,
            group,
        };
        let flags = if incremental { IOU_PBUF_RING_INC } else { 0 };
        // SAFETY: the ring mapping is page-aligned, `count` entries long, and lives until
        // `Drop`, which unregisters it first.
        unsafe {
            submitter.register_buf_ring_with_flags(ring.as_ptr() as u64, count, group, flags)?
        };
        for bid in 0..count {
            me.settle(bid);
        }
        me.publish();
        Ok(me)
    }

    /// A completion handed over `len` more bytes of buffer `bid`; `more` is its
    /// `IORING_CQE_F_BUF_MORE` (the kernel keeps filling the buffer). Returns where in the
    /// buffer those bytes start. Settle the buffer with [`settle`](Self::settle) afterwards.
    ///
    /// # Panics
    ///
    /// `bid` is not in the kernel's hands, or the bytes overrun it: the kernel broke the
    /// protocol.
    pub fn received(&mut self, bid: u16, len: usize, more: bool) -> usize {
        let i = usize::from(bid);
        assert!(self.in_kernel[i], "buffer {bid} handed out while not lent");
        let off = self.consumed[i] as usize;
        assert!(off + len <= self.size as usize, "buffer {bid} overrun");
        self.consumed[i] = (off + len) as u32;
        if !more {
            self.in_kernel[i] = false;
            self.nheld += 1;
        }
        off
    }

    /// `len` bytes at `off` of buffer `bid`, all of them handed over by completions.
    pub fn data(&self, bid: u16, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.consumed[usize::from(bid)] as usize);
        // SAFETY: the range is below `consumed`, which the kernel no longer writes (type
        // invariant) until the buffer is given back, which needs `&mut self` and so ends this
        // borrow; it is inside the buffer mapping (`consumed` <= `size`).
        unsafe {
            std::slice::from_raw_parts(
                self.bufs
                    .as_ptr()
                    .add(usize::from(bid) * self.size as usize + off),
                len,
            )
        }
    }

    /// A segment now refers to buffer `bid`.
    pub fn hold(&mut self, bid: u16) {
        self.refs[usize::from(bid)] += 1;
    }

    /// A segment referring to buffer `bid` is gone (sent or dropped).
    pub fn release(&mut self, bid: u16) {
        let r = &mut self.refs[usize::from(bid)];
        assert!(*r > 0, "buffer {bid} released more often than held");
        *r -= 1;
        self.settle(bid);
    }

    /// Gives buffer `bid` back to the kernel (visible to it at the next `publish`) if the
    /// kernel is done with it and nothing refers to it.
    pub fn settle(&mut self, bid: u16) {
        let i = usize::from(bid);
        if self.in_kernel[i] || self.refs[i] > 0 {
            return;
        }
        self.in_kernel[i] = true;
        self.consumed[i] = 0;
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

    /// Address of byte `off` of buffer `bid` (below what completions handed over), for an
    /// iovec.
    pub fn addr(&self, bid: u16, off: usize) -> *const u8 {
        self.data(bid, 0, off).as_ptr_range().end
    }

    /// What `len` received bytes cost in buffer space, for a connection's pending count: just
    /// those bytes when the kernel goes on filling the buffer with other receives, the whole
    /// buffer when it took one receive alone (nothing else can use it until it is sent).
    pub fn weight(&self, len: usize) -> usize {
        if self.incremental {
            len
        } else {
            self.size as usize
        }
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
