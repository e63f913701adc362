//! Writing one record into reserved space: the [`WriteGrant`] and the closure API
//! ([`Producer::push_with`]), which share one inlined path that keeps the reservation in
//! registers.
//!
//! Why the path is `#[inline(always)]` and every panic and slow path is `#[cold]`: a
//! reservation returned through memory (an out-of-line `reserve` writing a `Result<WriteGrant>`
//! the caller reloads) costs a store-to-load forwarding stall per record, which across cores
//! waits for the previous record's stores to lines the consumer owns; inlined, the grant lives
//! in registers and the per-record path is a handful of arithmetic instructions and the
//! header's stores. `#[inline]` alone was not enough: in a larger caller (the round-trip loop
//! of `relaybench ring`) LLVM kept `reserve_up_to` out of line, 49 instructions per call
//! (callgrind).

use super::{Meta, Producer};
use crate::error::ReserveError;
use crate::layout::{record_size, AUX_SIZE, LEN_AUX, RECORD_HEADER_SIZE, TAG_PAD};
use crate::storage::RingStorage;

/// Space reserved in the ring: a `&mut [u8]` inside the data area (shared memory for a
/// [`ShmRing`](crate::ShmRing)). Dropping it without committing abandons it.
pub struct WriteGrant<'a, S: RingStorage> {
    pub(super) producer: &'a mut Producer<S>,
    /// Bytes skipped before the record (the end of the data area, at a wrap).
    pub(super) pad: u64,
    /// Payload bytes available.
    pub(super) len: usize,
}

impl<S: RingStorage> WriteGrant<'_, S> {
    /// Ring position of the record this grant will become.
    pub fn position(&self) -> u64 {
        self.producer.tail + self.pad
    }

    /// Writes the record header, making the first `len` bytes a record. It becomes visible at
    /// the next [`Producer::publish`]. Returns the record's position.
    ///
    /// # Panics
    ///
    /// If `len` exceeds the grant or `meta.tag` is the reserved padding tag: both are bugs in
    /// the caller, not conditions of the ring.
    #[inline(always)]
    pub fn commit(self, len: usize, meta: Meta) -> u64 {
        if len > self.len {
            commit_too_long(len, self.len);
        }
        check_tag(meta.tag);
        // SAFETY: `fit` reserved `pad` bytes of padding and `reserved_size(self.len)` bytes
        // after them, and `len <= self.len` (checked above).
        unsafe { self.producer.write_record(self.pad, len, meta) }
    }
}

impl<S: RingStorage> std::ops::Deref for WriteGrant<'_, S> {
    type Target = [u8];
    #[inline(always)]
    fn deref(&self) -> &[u8] {
        // SAFETY: the range is inside the data area, reserved for this producer alone until it
        // publishes; the grant borrows the producer, so no other grant aliases it.
        unsafe { std::slice::from_raw_parts(self.producer.payload_ptr(self.position()), self.len) }
    }
}

impl<S: RingStorage> std::ops::DerefMut for WriteGrant<'_, S> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; exclusive because the grant is borrowed mutably.
        unsafe {
            std::slice::from_raw_parts_mut(self.producer.payload_ptr(self.position()), self.len)
        }
    }
}

impl<S: RingStorage> Producer<S> {
    /// Writes one record of exactly `len` payload bytes: `fill` gets the payload's space in
    /// the ring (`&mut [u8]` of `len` bytes, shared memory for a [`ShmRing`](crate::ShmRing))
    /// and the record is committed with `meta` when it returns. The record becomes visible at
    /// the next [`publish`](Producer::publish). Returns its position.
    ///
    /// The same as [`reserve`](Producer::reserve) + [`WriteGrant::commit`], in one inlined
    /// call: the fastest way to write records whose length is known up front. When the ring
    /// is full, `fill` is not called (and is dropped): check with
    /// [`has_space`](Producer::has_space) or [`wait_for_space`](Producer::wait_for_space)
    /// first if it must run; a `push_with` right after `has_space(len)` returned true cannot
    /// fail with `Full`.
    ///
    /// # Errors
    ///
    /// As [`reserve`](Producer::reserve).
    ///
    /// # Panics
    ///
    /// If `meta.tag` is the reserved padding tag (before reserving anything).
    ///
    /// # Examples
    ///
    /// ```
    /// use shm_ring::{HeapRing, Meta};
    ///
    /// let (mut tx, mut rx) = HeapRing::channel(4096).unwrap();
    /// let seq: u64 = 7;
    /// tx.push_with(16, Meta::tag(1).conn(3), |buf| {
    ///     buf[..8].copy_from_slice(&seq.to_le_bytes());
    ///     buf[8..].fill(0xAB);
    /// })
    /// .unwrap();
    /// tx.publish();
    ///
    /// let rec = rx.records().unwrap().next().unwrap().unwrap();
    /// assert_eq!((rec.tag(), rec.conn(), rec.len()), (1, 3, 16));
    /// assert_eq!(rec.payload()[..8], 7u64.to_le_bytes());
    /// ```
    #[inline(always)]
    pub fn push_with<F: FnOnce(&mut [u8])>(
        &mut self,
        len: usize,
        meta: Meta,
        fill: F,
    ) -> Result<u64, ReserveError> {
        check_tag(meta.tag);
        let mut grant = self.reserve(len)?;
        fill(&mut grant);
        let pad = grant.pad;
        // SAFETY: the reservation just made holds `pad` bytes of padding and a record of
        // `len` payload bytes after them.
        Ok(unsafe { self.write_record(pad, len, meta) })
    }

    /// Copies `payload` into a new record (for small control records and copies; data that
    /// can be produced in place goes through [`push_with`](Producer::push_with) or
    /// [`reserve`](Producer::reserve) to avoid the copy).
    ///
    /// # Errors
    ///
    /// As [`reserve`](Producer::reserve).
    #[inline]
    pub fn push(&mut self, meta: Meta, payload: &[u8]) -> Result<u64, ReserveError> {
        self.push_with(payload.len(), meta, |b| b.copy_from_slice(payload))
    }

    /// The payload's first byte of the record that starts at position `pos`.
    #[inline(always)]
    pub(super) fn payload_ptr(&self, pos: u64) -> *mut u8 {
        let off = (pos & self.mask) as usize + RECORD_HEADER_SIZE;
        // SAFETY: callers pass the position of a reserved record, which `fit` placed inside
        // the data area: off + len <= capacity.
        unsafe { self.data.add(off) }
    }

    /// Writes the padding (if any), the record header and, if `meta.aux` is not zero, the
    /// `aux` word after the payload of a `len`-byte record after `pad` bytes of padding, and
    /// moves the tail past it. Returns the record's position.
    ///
    /// # Safety
    ///
    /// `fit` reserved `pad` bytes from the tail and `reserved_size(len)` bytes after them, and
    /// no publish happened since; `meta.tag` is not [`TAG_PAD`]; `len` is below [`LEN_AUX`]
    /// (every reservation is: `max_payload` keeps it there).
    #[inline(always)]
    pub(super) unsafe fn write_record(&mut self, pad: u64, len: usize, meta: Meta) -> u64 {
        if pad >= RECORD_HEADER_SIZE as u64 {
            // SAFETY: the caller's reservation covers the padding.
            unsafe { self.write_padding(pad) };
        }
        let pos = self.tail + pad;
        let at = (pos & self.mask) as usize;
        let body = record_size(len);
        let has_aux = meta.aux != 0;
        let first = header_word(
            len as u32 | if has_aux { LEN_AUX } else { 0 },
            meta.tag,
            meta.flags,
        );
        // SAFETY: the caller's reservation covers reserved_size(len) = body + 8 free,
        // contiguous bytes at `pos`, which is 8-aligned (positions and record sizes are
        // multiples of 8): the two header words at 0 and 8 and the aux word at `body`. Two
        // word stores rather than one of the struct: a volatile store of the struct went
        // through the stack field by field (callgrind: 18 instructions per record, now 4).
        unsafe {
            let rec = self.data.add(at).cast::<u64>();
            rec.write_volatile(first);
            rec.add(1).write_volatile(meta.conn);
            if has_aux {
                self.data
                    .add(at + body as usize)
                    .cast::<u64>()
                    .write_volatile(meta.aux);
            }
        }
        self.tail = pos + body + if has_aux { AUX_SIZE as u64 } else { 0 };
        self.stats.records = self.stats.records.wrapping_add(1);
        self.stats.bytes = self.stats.bytes.wrapping_add(len as u64);
        pos
    }

    /// Fills the end of the data area with a padding record (once per lap of the ring).
    ///
    /// # Safety
    ///
    /// `pad` >= 16 bytes from the tail to the end of the data area are reserved.
    #[cold]
    #[inline(never)]
    unsafe fn write_padding(&mut self, pad: u64) {
        let first = header_word((pad - RECORD_HEADER_SIZE as u64) as u32, TAG_PAD, 0);
        // SAFETY: the padding starts at the current tail, 8-aligned, with `pad` >= 16 bytes up
        // to the end of the data area, all of it free (the caller's contract).
        unsafe {
            let rec = self
                .data
                .add((self.tail & self.mask) as usize)
                .cast::<u64>();
            rec.write_volatile(first);
            rec.add(1).write_volatile(0);
        }
    }
}

/// The first 8 bytes of a [`RecordHeader`](crate::layout::RecordHeader) (`len`, `tag`,
/// `flags` in native byte order) as one word.
#[inline(always)]
fn header_word(len: u32, tag: u16, flags: u16) -> u64 {
    let mut w = [0u8; 8];
    w[..4].copy_from_slice(&len.to_ne_bytes());
    w[4..6].copy_from_slice(&tag.to_ne_bytes());
    w[6..].copy_from_slice(&flags.to_ne_bytes());
    u64::from_ne_bytes(w)
}

/// Panics if `tag` is the ring's padding tag; the message is out of line.
#[inline(always)]
fn check_tag(tag: u16) {
    if tag == TAG_PAD {
        reserved_tag();
    }
}

#[cold]
#[inline(never)]
fn reserved_tag() -> ! {
    panic!("tag {TAG_PAD:#x} is reserved for padding")
}

#[cold]
#[inline(never)]
fn commit_too_long(len: usize, granted: usize) -> ! {
    panic!("commit of {len} bytes on a grant of {granted}")
}
