//! The writing side: reserve space in place, fill it (by `readv` if you like), commit, publish.

use std::time::Duration;

use super::write::WriteGrant;
use super::{claim_side, release_side, wake_peer, SideStats, SPIN_LIMIT};
use crate::error::{AttachError, CorruptError, ReserveError};
use crate::layout::{self, reserved_size, AUX_SIZE, MAX_POSITION, RECORD_HEADER_SIZE};
use crate::storage::RingStorage;
use crate::sync::{fence, Ordering};
use crate::wake::{futex_wait, Doorbell};

/// The single writer of a ring.
///
/// Records are written in place: [`reserve`](Producer::reserve) /
/// [`reserve_up_to`](Producer::reserve_up_to) + [`WriteGrant::commit`] when the length is
/// known only after writing (a `read` into the ring), [`push_with`](Producer::push_with) when
/// it is known up front. They become visible to the consumer only at
/// [`publish`](Producer::publish), so a batch of commits costs one position store (and at most
/// one wakeup).
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
    pub(super) data: *mut u8,
    cap: u64,
    pub(super) mask: u64,
    /// End of the last committed record. Invariant: `published <= tail <= cached_head + cap`.
    pub(super) tail: u64,
    /// The value last stored to the shared tail.
    published: u64,
    /// Last head read from shared memory (validated); lags the real head.
    cached_head: u64,
    doorbell: Doorbell,
    pub(super) stats: SideStats,
    /// This handle's sleep announcement may still stand (see `Consumer::parked`).
    parked: bool,
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
            parked: false,
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
    #[inline(always)]
    pub fn reserve(&mut self, len: usize) -> Result<WriteGrant<'_, S>, ReserveError> {
        self.reserve_up_to(len, len)
    }

    /// Reserves as many payload bytes as are free in one piece, at least `min` and at most
    /// `max`: what a `read` into the ring wants.
    ///
    /// # Errors
    ///
    /// As [`reserve`](Producer::reserve), judged on `min`.
    #[inline(always)]
    pub fn reserve_up_to(
        &mut self,
        min: usize,
        max: usize,
    ) -> Result<WriteGrant<'_, S>, ReserveError> {
        let limit = self.max_payload();
        if min > limit {
            return Err(too_large(min, limit));
        }
        let max = max.clamp(min, limit);
        let need = reserved_size(min);
        let want = reserved_size(max);
        // The fast path reads no shared memory: the cached head usually leaves room.
        let (pad, room) = match self.fit_best(need, want) {
            Some(fit) if fit.1 >= want => fit,
            _ => self.refit(need, want)?,
        };
        // Room for the header and an `aux` word, which is known only at commit.
        let len = max.min((room - (RECORD_HEADER_SIZE + AUX_SIZE) as u64) as usize);
        Ok(WriteGrant {
            producer: self,
            pad,
            len,
        })
    }

    /// [`fit_best`](Producer::fit_best) against a fresh head: the slow path of a reservation,
    /// out of line so that the fast path stays small enough to inline.
    #[cold]
    #[inline(never)]
    fn refit(&mut self, need: u64, want: u64) -> Result<(u64, u64), ReserveError> {
        self.refresh_head()?;
        match self.fit_best(need, want) {
            Some(fit) => Ok(fit),
            None => {
                self.stats.full_events = self.stats.full_events.wrapping_add(1);
                Err(ReserveError::Full)
            }
        }
    }

    /// True if [`reserve`](Producer::reserve) of `len` bytes would succeed now (a reservation
    /// right after a `true` cannot fail: the consumer only ever frees space).
    ///
    /// # Errors
    ///
    /// [`ReserveError::TooLarge`] or [`ReserveError::Corrupt`].
    #[inline]
    pub fn has_space(&mut self, len: usize) -> Result<bool, ReserveError> {
        let limit = self.max_payload();
        if len > limit {
            return Err(too_large(len, limit));
        }
        let need = reserved_size(len);
        if self.fit(need).is_some() {
            return Ok(true);
        }
        self.refresh_head()?;
        Ok(self.fit(need).is_some())
    }

    /// Where a record of `need` bytes can start: `(padding before it, contiguous bytes there)`.
    /// Stays at the current offset when `want` bytes fit there (no padding wasted); otherwise
    /// takes whichever side has more room, so a read into the ring gets the larger piece.
    #[inline(always)]
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
    #[inline(always)]
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
    #[inline]
    pub fn publish(&mut self) {
        if self.tail == self.published {
            return;
        }
        // Release: pairs with the Acquire load of `tail` in `Consumer::refresh_tail`, so the
        // record bytes written before this store are visible to a consumer that sees it.
        self.storage
            .header()
            .tail
            .store(self.tail, Ordering::Release);
        self.published = self.tail;
        // SeqCst fence P2 of the wake protocol (wake.rs): orders the tail store before the
        // load of the sleep word; pairs with the consumer's fence C2 in `prepare_park`.
        fence(Ordering::SeqCst);
        let h = self.storage.header();
        let sleeps = h.consumer_sleep.load(Ordering::Relaxed) == 1;
        let woke = sleeps && wake_peer(&h.consumer_sleep, h, &self.doorbell, &mut self.stats);
        self.stats.after_move(&self.storage.header().producer, woke);
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
        let need = reserved_size(len);
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
        self.parked = true;
        // SeqCst fence C2 (mirrored, see wake.rs): orders the announcement before re-reading
        // the head; pairs with the fence in `Consumer::release`.
        fence(Ordering::SeqCst);
        self.refresh_head()?;
        if self.fit(reserved_size(len)).is_some() {
            self.storage
                .header()
                .producer_sleep
                .swap(0, Ordering::Relaxed);
            self.parked = false;
            return Ok(false);
        }
        self.stats.parks = self.stats.parks.wrapping_add(1);
        Ok(true)
    }

    /// Withdraws the announcement made by
    /// [`prepare_park_for_space`](Producer::prepare_park_for_space) (nothing to do if none
    /// stands). Its liveness stamp comes every 16th park: no reader judges a producer's
    /// stall by it.
    pub fn finish_park(&mut self) {
        if !std::mem::take(&mut self.parked) {
            return;
        }
        let h = self.storage.header();
        h.producer_sleep.swap(0, Ordering::Relaxed);
        self.stats.touch_now_and_then(&h.producer, false);
    }

    /// Records the producer as alive now (for an idle producer; publishing does it too).
    pub fn heartbeat(&mut self) {
        self.stats.touch(&self.storage.header().producer);
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
        self.stats.touch(&self.storage.header().producer);
        release_side(&self.storage.header().producer);
    }
}

/// The error of a reservation larger than the ring can ever hold, built out of line.
#[cold]
#[inline(never)]
fn too_large(len: usize, max: usize) -> ReserveError {
    ReserveError::TooLarge { len, max }
}
