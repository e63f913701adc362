//! The reading side: records in place, validated, released in batches.

use std::cell::Cell;
use std::marker::PhantomData;
use std::time::Duration;

use super::{claim_side, release_side, wake_peer, SideStats, SPIN_LIMIT};
use crate::error::{AttachError, CorruptError};
use crate::layout::{
    record_size, RecordHeader, AUX_SIZE, LEN_AUX, MAX_POSITION, RECORD_HEADER_SIZE, TAG_PAD,
};
use crate::storage::RingStorage;
use crate::sync::{fence, Ordering};
use crate::wake::{futex_wait, Doorbell};

/// The single reader of a ring.
///
/// [`records`](Consumer::records) iterates what is published from the released position on;
/// every record borrows the consumer, so [`release`](Consumer::release), which lets the producer
/// reuse the space, compiles only once no payload slice is alive.
///
/// # Examples
///
/// ```
/// use shm_ring::{HeapRing, Meta};
///
/// let (mut tx, mut rx) = HeapRing::channel(4096).unwrap();
/// for i in 0..3u8 {
///     tx.push(Meta::tag(1).conn(i.into()), &[i; 3]).unwrap();
/// }
/// tx.publish();
///
/// let mut end = None;
/// for rec in rx.records().unwrap() {
///     let rec = rec.unwrap(); // a corrupted ring gives an error, not a panic
///     assert_eq!(rec.payload(), &[rec.conn() as u8; 3]);
///     end = Some(rec.end());
/// }
/// rx.release(end.unwrap()); // one position store for the whole batch
/// ```
pub struct Consumer<S: RingStorage> {
    storage: S,
    data: *const u8,
    cap: u64,
    /// The position last stored to the shared head.
    released: u64,
    /// Last validated tail: `released <= cached_tail <= released + cap`.
    cached_tail: u64,
    /// Records are counted once each as they are first read, though `records` may re-read.
    counted: Counted,
    doorbell: Doorbell,
    stats: SideStats,
    /// This handle's sleep announcement may still stand (`prepare_park` made it and no
    /// `finish_park` withdrew it yet).
    parked: bool,
}

// SAFETY: see `Producer`'s Send impl; the Cells are only touched through `&self` on one thread
// at a time (Consumer is not Sync).
unsafe impl<S: RingStorage + Send> Send for Consumer<S> {}

impl<S: RingStorage> Consumer<S> {
    /// Becomes the consumer of the ring in `storage`, continuing from its released position:
    /// records a dead consumer read but did not release are read again.
    ///
    /// # Errors
    ///
    /// [`AttachError::InUse`] if another live process is the consumer;
    /// [`AttachError::Corrupt`] if the positions in shared memory are inconsistent.
    pub fn new(storage: S) -> Result<Self, AttachError> {
        let h = storage.header();
        let cap = storage.capacity() as u64;
        let head = h.head.load(Ordering::Relaxed);
        // Acquire: pairs with the Release store in `Producer::publish`.
        let tail = h.tail.load(Ordering::Acquire);
        if tail % 8 != 0 || head % 8 != 0 || head > tail || tail - head > cap || tail > MAX_POSITION
        {
            return Err(CorruptError::HeadOutOfRange {
                head,
                tail,
                capacity: cap,
            }
            .into());
        }
        claim_side(&h.consumer, "consumer")?;
        let stats = SideStats::load(&h.consumer);
        let data = storage.data();
        Ok(Consumer {
            storage,
            data,
            cap,
            released: head,
            cached_tail: tail,
            counted: Counted {
                through: Cell::new(head),
                records: Cell::new(0),
                bytes: Cell::new(0),
            },
            doorbell: Doorbell::Futex,
            stats,
            parked: false,
        })
    }

    /// How to wake the producer when it announced that it waits for space (default: futex).
    pub fn set_doorbell(&mut self, doorbell: Doorbell) {
        self.doorbell = doorbell;
    }

    /// Bytes of the data area.
    pub fn capacity(&self) -> usize {
        self.cap as usize
    }

    /// The storage this consumer reads from.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The position released so far; records start here.
    pub fn position(&self) -> u64 {
        self.released
    }

    /// The published tail as of the last `records` or `wait` call.
    pub fn seen_tail(&self) -> u64 {
        self.cached_tail
    }

    /// Iterates the published records from the released position, reading the shared tail
    /// once. Calling it again without releasing yields the same records first.
    ///
    /// # Errors
    ///
    /// [`CorruptError::TailOutOfRange`] if the producer's position is invalid. An invalid
    /// record is reported by the iterator, which then ends.
    pub fn records(&mut self) -> Result<Records<'_>, CorruptError> {
        self.refresh_tail()?;
        // SAFETY: `released ..= cached_tail` was validated by `refresh_tail`; the returned
        // iterator borrows self, so `release` cannot run while its records are alive.
        Ok(unsafe {
            Records::new(
                self.data,
                self.cap,
                self.released,
                self.cached_tail,
                Some(&self.counted),
            )
        })
    }

    /// True if records were published beyond what [`records`](Consumer::records) last saw
    /// (one relaxed load; a hint for event loops).
    pub fn has_new(&self) -> bool {
        self.storage.header().tail.load(Ordering::Relaxed) != self.cached_tail
    }

    /// True if nothing was published beyond what [`records`](Consumer::records) last saw and
    /// every record it saw was released: one relaxed load, no validation (a corrupt tail shows
    /// as "not idle", and [`records`](Consumer::records) then reports it). Lets a consumer of
    /// many rings skip the empty ones cheaply.
    ///
    /// ```
    /// use shm_ring::{HeapRing, Meta};
    ///
    /// let (mut tx, mut rx) = HeapRing::channel(4096).unwrap();
    /// assert!(rx.is_idle());
    /// tx.push(Meta::tag(1), b"hi").unwrap();
    /// tx.publish();
    /// assert!(!rx.is_idle()); // published, not read yet
    /// let end = rx.records().unwrap().next().unwrap().unwrap().end();
    /// assert!(!rx.is_idle()); // read, not released yet
    /// rx.release(end);
    /// assert!(rx.is_idle());
    /// ```
    pub fn is_idle(&self) -> bool {
        !self.has_new() && self.released == self.cached_tail
    }

    /// True if there are published records not yet released.
    pub fn is_empty(&mut self) -> Result<bool, CorruptError> {
        self.refresh_tail()?;
        Ok(self.cached_tail == self.released)
    }

    fn refresh_tail(&mut self) -> Result<(), CorruptError> {
        // Acquire: pairs with the Release store in `Producer::publish`, making the bytes of
        // every record before `tail` visible here.
        let tail = self.storage.header().tail.load(Ordering::Acquire);
        if tail < self.cached_tail || tail - self.released > self.cap || tail % 8 != 0 {
            return Err(CorruptError::TailOutOfRange {
                tail,
                head: self.released,
                capacity: self.cap,
            });
        }
        self.cached_tail = tail;
        Ok(())
    }

    /// Gives the space up to `to` (a record's [`end`](Record::end)) back to the producer, and
    /// wakes it if it waits for space.
    ///
    /// # Panics
    ///
    /// If `to` is not between the released position and the last seen tail: only a position
    /// this consumer handed out is valid.
    #[inline]
    pub fn release(&mut self, to: u64) {
        if to < self.released || to > self.cached_tail || to % 8 != 0 {
            release_out_of_range(to, self.released, self.cached_tail);
        }
        if to == self.released {
            return;
        }
        // Release: pairs with the Acquire loads of `head` in the producer, so our reads of the
        // records before `to` happen before the producer overwrites them.
        self.storage.header().head.store(to, Ordering::Release);
        self.released = to;
        self.stats.records = self.stats.records.wrapping_add(self.counted.records.take());
        self.stats.bytes = self.stats.bytes.wrapping_add(self.counted.bytes.take());
        // SeqCst fence (mirror of P2 in wake.rs): orders the head store before the load of the
        // producer's sleep word; pairs with the fence in `Producer::prepare_park_for_space`.
        fence(Ordering::SeqCst);
        let h = self.storage.header();
        let sleeps = h.producer_sleep.load(Ordering::Relaxed) == 1;
        let woke = sleeps && wake_peer(&h.producer_sleep, h, &self.doorbell, &mut self.stats);
        // A consumer that leaves records unreleased is stamped every time: that is when a
        // reader judges whether it stalls (records waiting, consumer idle).
        let backlog = to != self.cached_tail;
        self.stats
            .after_move(&self.storage.header().consumer, woke || backlog);
    }

    /// Waits for records beyond those [`records`](Consumer::records) last saw: spins briefly,
    /// then announces that it sleeps and parks on the futex. True if there are new records;
    /// false after `timeout` (or a spurious wake).
    ///
    /// # Errors
    ///
    /// [`CorruptError`] if the producer's position is invalid.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<bool, CorruptError> {
        for _ in 0..SPIN_LIMIT {
            if self.has_new() {
                self.refresh_tail()?;
                return Ok(true);
            }
            crate::sync::spin_hint();
        }
        if !self.prepare_park()? {
            return Ok(true);
        }
        let h = self.storage.header();
        futex_wait(&h.consumer_sleep, 1, timeout, h);
        self.finish_park();
        let before = self.cached_tail;
        self.refresh_tail()?;
        Ok(self.cached_tail != before)
    }

    /// For a consumer in an event loop: announces that it sleeps, then re-checks. `Ok(true)`:
    /// nothing new, sleep now (poll the eventfd given to the producer as its doorbell);
    /// `Ok(false)`: records arrived, do not sleep. Call [`finish_park`](Consumer::finish_park)
    /// after waking either way.
    ///
    /// # Errors
    ///
    /// [`CorruptError`] if the producer's position is invalid.
    pub fn prepare_park(&mut self) -> Result<bool, CorruptError> {
        let h = self.storage.header();
        h.consumer_sleep.swap(1, Ordering::Relaxed);
        self.parked = true;
        // SeqCst fence C2 (wake.rs): orders the announcement before re-reading the tail; pairs
        // with fence P2 in `Producer::publish`.
        fence(Ordering::SeqCst);
        let before = self.cached_tail;
        self.refresh_tail()?;
        if self.cached_tail != before {
            self.storage
                .header()
                .consumer_sleep
                .swap(0, Ordering::Relaxed);
            self.parked = false;
            return Ok(false);
        }
        self.stats.parks = self.stats.parks.wrapping_add(1);
        Ok(true)
    }

    /// Withdraws the announcement made by [`prepare_park`](Consumer::prepare_park) (nothing to
    /// do if none stands: an event loop may call it after every sleep).
    ///
    /// The liveness stamp that comes with it costs a clock read, so it is taken only where a
    /// reader judges stalls by it (records wait unreleased) and every 16th park otherwise: an
    /// event loop that wakes for its other work (a front answering heartbeats) parks on every
    /// wake.
    pub fn finish_park(&mut self) {
        if !std::mem::take(&mut self.parked) {
            return;
        }
        let h = self.storage.header();
        h.consumer_sleep.swap(0, Ordering::Relaxed);
        let backlog = self.released != self.cached_tail;
        self.stats.touch_now_and_then(&h.consumer, backlog);
    }

    /// Records the consumer as alive now (an idle consumer's proof of life).
    pub fn heartbeat(&mut self) {
        self.stats.touch(&self.storage.header().consumer);
    }
}

impl<S: RingStorage> Drop for Consumer<S> {
    fn drop(&mut self) {
        self.stats.touch(&self.storage.header().consumer);
        release_side(&self.storage.header().consumer);
    }
}

#[cold]
#[inline(never)]
fn release_out_of_range(to: u64, released: u64, seen_tail: u64) -> ! {
    panic!("release to {to} outside {released}..={seen_tail}")
}

/// One record, read in place.
///
/// Its header fields were copied out of shared memory once and validated from that copy: they
/// cannot change. Its payload stays in shared memory, which a hostile producer may rewrite at
/// any time: a reader that does not trust the producer reaches it only through
/// [`payload_ptr`](Record::payload_ptr) and [`copy_payload`](Record::copy_payload) (raw
/// pointers and copies the compiler cannot assume stable), never through
/// [`payload`](Record::payload).
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    header: RecordHeader,
    /// The `aux` word (0 when the record carries none); `header.len` is the payload length
    /// alone (without [`LEN_AUX`]).
    aux: u64,
    payload: *const u8,
    pos: u64,
    /// Just past the record, as validated (an `aux` word of 0 still counts when present).
    end: u64,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: a Record is a private header copy plus a pointer into a mapping that outlives 'a;
// it only reads through the pointer (raw copies), which is as thread-safe as the `&'a [u8]` it
// replaced.
unsafe impl Send for Record<'_> {}
// SAFETY: as for Send: `&Record` gives nothing but reads.
unsafe impl Sync for Record<'_> {}

impl<'a> Record<'a> {
    /// The application's tag.
    pub fn tag(&self) -> u16 {
        self.header.tag
    }
    /// The application's flags.
    pub fn flags(&self) -> u16 {
        self.header.flags
    }
    /// The connection id (or any 64-bit key) the producer attached.
    pub fn conn(&self) -> u64 {
        self.header.conn
    }
    /// The 64-bit word the producer attached besides the connection.
    pub fn aux(&self) -> u64 {
        self.aux
    }
    /// Payload length, from the private copy of the header (validated against the ring).
    pub fn len(&self) -> usize {
        self.header.len as usize
    }
    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.header.len == 0
    }
    /// The payload as a slice borrowed from the ring, for a consumer whose producer is trusted
    /// not to write a record once published (the relay's worker SDK reading what a front
    /// wrote). Its bounds are fixed; but a producer that does write published bytes makes a
    /// reference over them unsound to hold: readers facing an untrusted producer use
    /// [`payload_ptr`](Record::payload_ptr) or [`copy_payload`](Record::copy_payload).
    pub fn payload(&self) -> &'a [u8] {
        // SAFETY: `len` bytes inside the data area, before the published tail and not yet
        // released (see `Records::new`); stable as long as the producer keeps the protocol,
        // which is this method's documented precondition.
        unsafe { std::slice::from_raw_parts(self.payload, self.header.len as usize) }
    }
    /// The payload's first byte in shared memory; [`len`](Record::len) bytes are readable
    /// from it (they stay mapped while the record's borrow of the consumer lives) but may
    /// change at any time if the producer is hostile. Hand it to the kernel (`writev`) or
    /// copy from it; never make a reference of it.
    pub fn payload_ptr(&self) -> *const u8 {
        self.payload
    }
    /// Copies `dst.len()` payload bytes starting at `offset` into private memory (a copy the
    /// producer cannot change afterwards).
    ///
    /// # Panics
    ///
    /// If `offset + dst.len()` exceeds [`len`](Record::len).
    pub fn copy_payload(&self, offset: usize, dst: &mut [u8]) {
        assert!(
            offset
                .checked_add(dst.len())
                .is_some_and(|e| e <= self.len()),
            "copy of {}..+{} from a payload of {}",
            offset,
            dst.len(),
            self.len()
        );
        // SAFETY: in bounds (checked above against the private length); `dst` is private
        // memory that cannot overlap the shared data area. A raw copy rather than a reference:
        // bytes the producer changes meanwhile only make the copy's content arbitrary.
        unsafe {
            std::ptr::copy_nonoverlapping(self.payload.add(offset), dst.as_mut_ptr(), dst.len())
        }
    }
    /// The whole payload, copied out (see [`copy_payload`](Record::copy_payload)).
    pub fn payload_to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        self.copy_payload(0, &mut v);
        v
    }
    /// Ring position of the record.
    pub fn position(&self) -> u64 {
        self.pos
    }
    /// Ring position of the payload's first byte.
    pub fn payload_position(&self) -> u64 {
        self.pos + RECORD_HEADER_SIZE as u64
    }
    /// Position just past the record: pass it to [`Consumer::release`].
    pub fn end(&self) -> u64 {
        self.end
    }
}

/// Per-consumer record counting that survives re-reads.
pub(crate) struct Counted {
    through: Cell<u64>,
    records: Cell<u64>,
    bytes: Cell<u64>,
}

/// Iterator over published records; see [`Consumer::records`] and
/// [`Producer::unreleased`](crate::Producer::unreleased). After an error it ends.
pub struct Records<'a> {
    data: *const u8,
    cap: u64,
    pos: u64,
    end: u64,
    failed: bool,
    counted: Option<&'a Counted>,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> Records<'a> {
    /// # Safety
    ///
    /// `data` points to a data area of `cap` bytes (a power of two) that stays mapped for `'a`,
    /// and no one writes the bytes of `pos..end` during `'a` (they are published and not
    /// released). `pos` and `end` are multiples of 8 with `end - pos <= cap`.
    pub(crate) unsafe fn new(
        data: *const u8,
        cap: u64,
        pos: u64,
        end: u64,
        counted: Option<&'a Counted>,
    ) -> Self {
        Records {
            data,
            cap,
            pos,
            end,
            failed: false,
            counted,
            _borrow: PhantomData,
        }
    }

    /// Position after the last record returned so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    // `inline`: this crate's one non-generic hot path; without it every record costs a call
    // across the crate boundary that returns a 56-byte Result through memory.
    #[inline]
    fn next_record(&mut self) -> Result<Option<Record<'a>>, CorruptError> {
        let mask = self.cap - 1;
        loop {
            if self.pos == self.end {
                return Ok(None);
            }
            let off = self.pos & mask;
            let to_end = self.cap - off;
            if to_end < RECORD_HEADER_SIZE as u64 {
                // Too little room for a header: the producer wrapped without a padding record.
                if self.pos + to_end > self.end {
                    return Err(CorruptError::BadPadding {
                        pos: self.pos,
                        len: 0,
                        expected: to_end,
                    });
                }
                self.pos += to_end;
                continue;
            }
            // SAFETY: off + 16 <= capacity and off is 8-aligned (positions are validated
            // multiples of 8), so the header lies inside the mapping. read_volatile takes one
            // private copy that all checks below use, so a peer changing it cannot race them.
            let mut hdr = unsafe {
                self.data
                    .add(off as usize)
                    .cast::<RecordHeader>()
                    .read_volatile()
            };
            if hdr.tag == TAG_PAD {
                // A padding record never has an aux word: `LEN_AUX` makes `len` mismatch.
                let expected = to_end - RECORD_HEADER_SIZE as u64;
                if hdr.len as u64 != expected || self.pos + to_end > self.end {
                    return Err(CorruptError::BadPadding {
                        pos: self.pos,
                        len: hdr.len,
                        expected,
                    });
                }
                self.pos += to_end;
                continue;
            }
            let declared = hdr.len;
            hdr.len &= !LEN_AUX;
            let body = record_size(hdr.len as usize);
            let has_aux = declared & LEN_AUX != 0;
            let size = body + if has_aux { AUX_SIZE as u64 } else { 0 };
            if size > to_end {
                return Err(CorruptError::RecordCrossesEnd {
                    pos: self.pos,
                    len: declared,
                });
            }
            if self.pos + size > self.end {
                return Err(CorruptError::RecordPastTail {
                    pos: self.pos,
                    len: declared,
                    tail: self.end,
                });
            }
            let aux = if has_aux {
                // SAFETY: `body + 8 = size <= to_end` (checked above), so the word lies inside
                // the data area, 8-aligned; one private copy, as for the header.
                unsafe {
                    self.data
                        .add((off + body) as usize)
                        .cast::<u64>()
                        .read_volatile()
                }
            } else {
                0
            };
            // SAFETY: the payload lies inside the data area (checked above against the private
            // copy of its length), which stays mapped for 'a; only a pointer is kept.
            let payload = unsafe { self.data.add(off as usize + RECORD_HEADER_SIZE) };
            let rec = Record {
                header: hdr,
                aux,
                payload,
                pos: self.pos,
                end: self.pos + size,
                _borrow: PhantomData,
            };
            self.pos += size;
            if let Some(c) = self.counted {
                if self.pos > c.through.get() {
                    c.through.set(self.pos);
                    c.records.set(c.records.get() + 1);
                    c.bytes.set(c.bytes.get() + hdr.len as u64);
                }
            }
            return Ok(Some(rec));
        }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, CorruptError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_record() {
            Ok(r) => r.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
