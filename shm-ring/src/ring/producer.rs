//! The writing side: reserve space in place, fill it (by `readv` if you like), commit, publish.

use std::time::Duration;

use super::{activity_ns, claim_side, release_side, Meta, SideStats, SPIN_LIMIT};
use crate::error::{AttachError, CorruptError, ReserveError};
use crate::layout::{self, record_size, RecordHeader, MAX_POSITION, RECORD_HEADER_SIZE, TAG_PAD};
use crate::storage::RingStorage;
use crate::sync::{fence, Ordering};
use crate::wake::{futex_wait, Doorbell};

/// The single writer of a ring.
///
/// Records become visible to the consumer only at [`publish`](Producer::publish), so a batch of
/// commits costs one position store (and at most one wakeup).
///
/// # Examples
///
/// Reserve, write in place, commit fewer bytes than reserved, publish:
///
/// ```
/// use shm_ring::{HeapRing, Meta};
///
/// let (mut tx, mut rx) = HeapRing::channel(4096).unwrap();
/// let mut grant = tx.reserve_up_to(1, 100).unwrap();
/// grant[..5].copy_from_slice(b"hello");
/// grant.commit(5, Meta::tag(7).conn(42));
/// tx.publish();
///
/// let rec = rx.records().unwrap().next().unwrap().unwrap();
/// assert_eq!((rec.tag(), rec.conn(), rec.payload()), (7, 42, &b"hello"[..]));
/// ```
pub struct Producer<S: RingStorage> {
    storage: S,
    data: *mut u8,
    cap: u64,
    mask: u64,
    /// End of the last committed record. Invariant: `published <= tail <= cached_head + cap`.
    tail: u64,
    /// The value last stored to the shared tail.
    published: u64,
    /// Last head read from shared memory (validated); lags the real head.
    cached_head: u64,
    doorbell: Doorbell,
    stats: SideStats,
}

// SAFETY: the raw pointer targets memory owned by `storage`, which moves with the producer; the
// ring protocol, not thread identity, governs access to it.
unsafe impl<S: RingStorage + Send> Send for Producer<S> {}

impl<S: RingStorage> Producer<S> {
    /// Becomes the producer of the ring in `storage`, continuing from its published tail (so a
    /// restarted producer continues where a dead one stopped; records it had reserved or
    /// committed but not published are gone, never half-visible).
    ///
    /// # Errors
    ///
    /// [`AttachError::InUse`] if another live process is the producer;
    /// [`AttachError::Corrupt`] if the positions in shared memory are inconsistent;
    /// [`AttachError::ReadOnly`] if the data area is mapped read-only in this process.
    pub fn new(storage: S) -> Result<Self, AttachError> {
        if !storage.data_writable() {
            return Err(AttachError::ReadOnly);
        }
        let h = storage.header();
        let cap = storage.capacity() as u64;
        let tail = h.tail.load(Ordering::Relaxed);
        // Acquire: pairs with the Release store in `Consumer::release`, so the consumer's reads
        // of the space it released happen before we overwrite it.
        let head = h.head.load(Ordering::Acquire);
        if tail % 8 != 0 || head % 8 != 0 || head > tail || tail - head > cap || tail > MAX_POSITION
        {
            return Err(CorruptError::TailOutOfRange {
                tail,
                head,
                capacity: cap,
            }
            .into());
        }
        claim_side(&h.producer, "producer")?;
        let stats = SideStats::load(&h.producer);
        let data = storage.data();
        Ok(Producer {
            storage,
            data,
            cap,
            mask: cap - 1,
            tail,
            published: tail,
            cached_head: head,
            doorbell: Doorbell::Futex,
            stats,
        })
    }

    /// How to wake the consumer when it announced that it sleeps (default: futex).
    pub fn set_doorbell(&mut self, doorbell: Doorbell) {
        self.doorbell = doorbell;
    }

    /// The largest payload one record can carry: a little under half the capacity.
    pub fn max_payload(&self) -> usize {
        layout::max_payload(self.cap as usize)
    }

    /// Bytes of the data area.
    pub fn capacity(&self) -> usize {
        self.cap as usize
    }

    /// The storage this producer writes to.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Reserves exactly `len` payload bytes.
    ///
    /// # Errors
    ///
    /// [`ReserveError::Full`] when the space is not free now, [`ReserveError::TooLarge`] when it
    /// never will be, [`ReserveError::Corrupt`] when the consumer's position is invalid.
    pub fn reserve(&mut self, len: usize) -> Result<WriteGrant<'_, S>, ReserveError> {
        self.reserve_up_to(len, len)
    }

    /// Reserves as many payload bytes as are free in one piece, at least `min` and at most
    /// `max`: what a `read` into the ring wants.
    ///
    /// # Errors
    ///
    /// As [`reserve`](Producer::reserve), judged on `min`.
    #[inline]
    pub fn reserve_up_to(
        &mut self,
        min: usize,
        max: usize,
    ) -> Result<WriteGrant<'_, S>, ReserveError> {
        let limit = self.max_payload();
        if min > limit {
            return Err(ReserveError::TooLarge {
                len: min,
                max: limit,
            });
        }
        let max = max.clamp(min, limit);
        let need = record_size(min);
        let want = record_size(max);
        let mut fit = self.fit_best(need, want);
        if fit.is_none_or(|(_, room)| room < record_size(max)) {
            self.refresh_head()?;
            fit = self.fit_best(need, want);
        }
        let Some((pad, room)) = fit else {
            self.stats.full_events = self.stats.full_events.wrapping_add(1);
            return Err(ReserveError::Full);
        };
        let len = max.min((room - RECORD_HEADER_SIZE as u64) as usize);
        Ok(WriteGrant {
            producer: self,
            pad,
            len,
        })
    }

    /// True if [`reserve`](Producer::reserve) of `len` bytes would succeed now (a reservation
    /// right after a `true` cannot fail: the consumer only ever frees space).
    ///
    /// # Errors
    ///
    /// [`ReserveError::TooLarge`] or [`ReserveError::Corrupt`].
    pub fn has_space(&mut self, len: usize) -> Result<bool, ReserveError> {
        let limit = self.max_payload();
        if len > limit {
            return Err(ReserveError::TooLarge { len, max: limit });
        }
        let need = record_size(len);
        if self.fit(need).is_none() {
            self.refresh_head()?;
        }
        Ok(self.fit(need).is_some())
    }

    /// Copies `payload` into a new record (for small control records; data goes through
    /// [`reserve`](Producer::reserve) to avoid the copy).
    ///
    /// # Errors
    ///
    /// As [`reserve`](Producer::reserve).
    pub fn push(&mut self, meta: Meta, payload: &[u8]) -> Result<u64, ReserveError> {
        let mut grant = self.reserve(payload.len())?;
        grant.copy_from_slice(payload);
        Ok(grant.commit(payload.len(), meta))
    }

    /// Where a record of `need` bytes can start: `(padding before it, contiguous bytes there)`.
    /// Stays at the current offset when `want` bytes fit there (no padding wasted); otherwise
    /// takes whichever side has more room, so a read into the ring gets the larger piece.
    fn fit_best(&self, need: u64, want: u64) -> Option<(u64, u64)> {
        let free = self.cap - (self.tail - self.cached_head);
        let to_end = self.cap - (self.tail & self.mask);
        let here = free.min(to_end);
        let wrapped = free.saturating_sub(to_end);
        if here >= want || (here >= need && here >= wrapped) {
            Some((0, here))
        } else if wrapped >= need {
            Some((to_end, wrapped))
        } else {
            None
        }
    }

    /// [`fit_best`](Producer::fit_best) for a record of exactly `need` bytes.
    fn fit(&self, need: u64) -> Option<(u64, u64)> {
        self.fit_best(need, need)
    }

    fn refresh_head(&mut self) -> Result<(), CorruptError> {
        // Acquire: pairs with the Release store in `Consumer::release` (see `new`).
        let head = self.storage.header().head.load(Ordering::Acquire);
        if head < self.cached_head || head > self.published || head % 8 != 0 {
            return Err(CorruptError::HeadOutOfRange {
                head,
                tail: self.published,
                capacity: self.cap,
            });
        }
        self.cached_head = head;
        // Measured against a fresh head: with the cached one it would overstate. Heads are
        // read when space runs short, which is when the high-water mark moves.
        self.stats.high_water = self.stats.high_water.max(self.tail - head);
        Ok(())
    }

    /// Makes every committed record visible and wakes the consumer if it sleeps.
    pub fn publish(&mut self) {
        if self.tail == self.published {
            return;
        }
        let h = self.storage.header();
        // Release: pairs with the Acquire load of `tail` in `Consumer::refresh_tail`, so the
        // record bytes written before this store are visible to a consumer that sees it.
        h.tail.store(self.tail, Ordering::Release);
        self.published = self.tail;
        self.stats.active_ns = activity_ns();
        // SeqCst fence P2 of the wake protocol (wake.rs): orders the tail store before the
        // load of the sleep word; pairs with the consumer's fence C2 in `prepare_park`.
        fence(Ordering::SeqCst);
        if h.consumer_sleep.load(Ordering::Relaxed) == 1
            && h.consumer_sleep.swap(0, Ordering::Relaxed) == 1
        {
            self.doorbell.ring(&h.consumer_sleep, h);
            self.stats.wakeups_sent = self.stats.wakeups_sent.wrapping_add(1);
        }
        self.stats.store(&h.producer);
    }

    /// Reads and validates the consumer's position now. A producer that has room rarely reads
    /// it, so corruption of it by the peer would otherwise go unnoticed until the ring fills;
    /// call this periodically to notice it early.
    ///
    /// # Errors
    ///
    /// [`CorruptError::HeadOutOfRange`].
    pub fn check(&mut self) -> Result<(), CorruptError> {
        self.refresh_head()
    }

    /// The consumer's position, read now: every record before it was released.
    ///
    /// # Errors
    ///
    /// [`CorruptError::HeadOutOfRange`] if the consumer's position is invalid.
    pub fn released(&mut self) -> Result<u64, CorruptError> {
        self.refresh_head()?;
        Ok(self.cached_head)
    }

    /// True if the consumer has released everything that was published.
    pub fn is_drained(&mut self) -> Result<bool, CorruptError> {
        self.refresh_head()?;
        Ok(self.cached_head == self.published)
    }

    /// The records this producer published that the consumer has not released yet, read back
    /// in place: what a restarted producer inspects to learn how far its predecessor got.
    ///
    /// # Errors
    ///
    /// [`CorruptError::HeadOutOfRange`] if the consumer's position is invalid.
    pub fn unreleased(&mut self) -> Result<crate::Records<'_>, CorruptError> {
        self.refresh_head()?;
        // SAFETY: `cached_head ..= published` is validated and published, so the bytes are
        // initialised records; only this producer writes the data area, and the iterator
        // borrows it, so nothing overwrites them while they are read.
        Ok(unsafe {
            crate::Records::new(self.data, self.cap, self.cached_head, self.published, None)
        })
    }

    /// Publishes, then waits until a payload of `len` bytes fits: spins briefly, then parks on
    /// the futex (the consumer rings it after releasing). Returns whether it fits now; false
    /// after `timeout`.
    ///
    /// # Errors
    ///
    /// [`ReserveError::TooLarge`] or [`ReserveError::Corrupt`].
    pub fn wait_for_space(
        &mut self,
        len: usize,
        timeout: Option<Duration>,
    ) -> Result<bool, ReserveError> {
        let limit = self.max_payload();
        if len > limit {
            return Err(ReserveError::TooLarge { len, max: limit });
        }
        self.publish();
        let need = record_size(len);
        for _ in 0..SPIN_LIMIT {
            self.refresh_head()?;
            if self.fit(need).is_some() {
                return Ok(true);
            }
            crate::sync::spin_hint();
        }
        if !self.prepare_park_for_space(len)? {
            return Ok(true);
        }
        let h = self.storage.header();
        futex_wait(&h.producer_sleep, 1, timeout, h);
        self.finish_park();
        self.refresh_head()?;
        Ok(self.fit(need).is_some())
    }

    /// For a producer in an event loop: announces that it waits for space for `len` payload
    /// bytes and re-checks. `Ok(true)`: sleep now (poll the doorbell the consumer rings);
    /// `Ok(false)`: space is free already, do not sleep. Call
    /// [`finish_park`](Producer::finish_park) after waking either way.
    ///
    /// # Errors
    ///
    /// [`ReserveError::Corrupt`] if the consumer's position is invalid.
    pub fn prepare_park_for_space(&mut self, len: usize) -> Result<bool, ReserveError> {
        self.publish();
        self.storage
            .header()
            .producer_sleep
            .swap(1, Ordering::Relaxed);
        // SeqCst fence C2 (mirrored, see wake.rs): orders the announcement before re-reading
        // the head; pairs with the fence in `Consumer::release`.
        fence(Ordering::SeqCst);
        self.refresh_head()?;
        if self.fit(record_size(len)).is_some() {
            self.storage
                .header()
                .producer_sleep
                .swap(0, Ordering::Relaxed);
            return Ok(false);
        }
        self.stats.parks = self.stats.parks.wrapping_add(1);
        Ok(true)
    }

    /// Withdraws the announcement made by [`prepare_park_for_space`](Producer::prepare_park_for_space).
    pub fn finish_park(&mut self) {
        let h = self.storage.header();
        h.producer_sleep.swap(0, Ordering::Relaxed);
        self.stats.active_ns = activity_ns();
        self.stats.store(&h.producer);
    }

    /// Records the producer as alive now (for an idle producer; publishing does it too).
    pub fn heartbeat(&mut self) {
        self.stats.active_ns = activity_ns();
        self.stats.store(&self.storage.header().producer);
    }

    /// Gives up the producer side without publishing anything committed since the last
    /// publish (for a ring about to be reset: a normal drop publishes).
    pub fn abandon(self) -> S {
        let this = std::mem::ManuallyDrop::new(self);
        release_side(&this.storage.header().producer);
        // SAFETY: `this` is never used or dropped again; the storage is moved out exactly once.
        unsafe { std::ptr::read(&this.storage) }
    }

    /// Position the next committed record will start at (modulo padding).
    pub fn position(&self) -> u64 {
        self.tail
    }
}

impl<S: RingStorage> Drop for Producer<S> {
    fn drop(&mut self) {
        self.publish();
        release_side(&self.storage.header().producer);
    }
}

/// Space reserved in the ring: a `&mut [u8]` inside the data area (shared memory for a
/// [`ShmRing`](crate::ShmRing)). Dropping it without committing abandons it.
pub struct WriteGrant<'a, S: RingStorage> {
    producer: &'a mut Producer<S>,
    pad: u64,
    len: usize,
}

impl<S: RingStorage> WriteGrant<'_, S> {
    /// Ring position of the record this grant will become.
    pub fn position(&self) -> u64 {
        self.producer.tail + self.pad
    }

    fn payload_ptr(&self) -> *mut u8 {
        let off = (self.position() & self.producer.mask) as usize + RECORD_HEADER_SIZE;
        // SAFETY: `fit` placed the record inside the data area: off + len <= capacity.
        unsafe { self.producer.data.add(off) }
    }

    /// Writes the record header, making the first `len` bytes a record. It becomes visible at
    /// the next [`Producer::publish`]. Returns the record's position.
    ///
    /// # Panics
    ///
    /// If `len` exceeds the grant or `meta.tag` is the reserved padding tag: both are bugs in
    /// the caller, not conditions of the ring.
    #[inline]
    pub fn commit(self, len: usize, meta: Meta) -> u64 {
        assert!(
            len <= self.len,
            "commit of {len} bytes on a grant of {}",
            self.len
        );
        assert!(
            meta.tag != TAG_PAD,
            "tag {TAG_PAD:#x} is reserved for padding"
        );
        let p = self.producer;
        if self.pad >= RECORD_HEADER_SIZE as u64 {
            let pad_hdr = RecordHeader {
                len: (self.pad - RECORD_HEADER_SIZE as u64) as u32,
                tag: TAG_PAD,
                flags: 0,
                conn: 0,
                aux: 0,
            };
            // SAFETY: the padding starts at the current tail, 8-aligned, with `pad` >= 24 bytes
            // up to the end of the data area, all of it free (checked by `fit`).
            unsafe {
                let at = p
                    .data
                    .add((p.tail & p.mask) as usize)
                    .cast::<RecordHeader>();
                at.write_volatile(pad_hdr);
            }
        }
        let pos = p.tail + self.pad;
        let hdr = RecordHeader {
            len: len as u32,
            tag: meta.tag,
            flags: meta.flags,
            conn: meta.conn,
            aux: meta.aux,
        };
        // SAFETY: `fit` guaranteed record_size(len) free, contiguous bytes at `pos`, 8-aligned.
        unsafe {
            p.data
                .add((pos & p.mask) as usize)
                .cast::<RecordHeader>()
                .write_volatile(hdr);
        }
        p.tail = pos + record_size(len);
        p.stats.records = p.stats.records.wrapping_add(1);
        p.stats.bytes = p.stats.bytes.wrapping_add(len as u64);
        pos
    }
}

impl<S: RingStorage> std::ops::Deref for WriteGrant<'_, S> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the range is inside the data area, reserved for this producer alone until it
        // publishes; the grant borrows the producer, so no other grant aliases it.
        unsafe { std::slice::from_raw_parts(self.payload_ptr(), self.len) }
    }
}

impl<S: RingStorage> std::ops::DerefMut for WriteGrant<'_, S> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; exclusive because the grant is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.payload_ptr(), self.len) }
    }
}
