//! The byte layout shared by every process that maps a ring. Changing anything here changes
//! [`LAYOUT_VERSION`].
//!
//! ```text
//! offset  line (128 B)        written by          contents
//!      0  identity            creator, once       magic, version, capacity, data offset, flags
//!    128  tail                producer            published write position (free-running u64)
//!    256  head                consumer            released read position (free-running u64)
//!    384  consumer_sleep      consumer / producer 1 = consumer announced it parks (futex word)
//!    512  producer_sleep      producer / consumer 1 = producer announced it waits for space
//!    640  producer side       producer            pid, last activity, records/bytes in, full events, ...
//!    768  consumer side       consumer            pid, last activity, records/bytes out, ...
//!    896  user words          the application     16 x u64 the ring gives no meaning to
//!   1024  data                producer            `capacity` bytes of records
//! ```
//!
//! Positions are byte counts since the ring was created; they never wrap (2^64 bytes is
//! centuries at memory bandwidth). The offset of a position in the data area is
//! `pos & (capacity - 1)`. Invariants a correct peer keeps, and a reader checks:
//! `head <= tail <= head + capacity`, both multiples of [`RECORD_ALIGN`].
//!
//! Every field is an atomic so that any bit pattern is a valid value: the header lives in memory
//! another process can write, so it must never be able to produce an invalid Rust value.

use crate::sync::{AtomicU32, AtomicU64};

/// `b"SHMRING1"` read as a little-endian u64. Written last by the creator.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SHMRING1");
/// Bumped on any change to this module's layout.
pub const LAYOUT_VERSION: u32 = 2;
/// Bytes before the data area.
pub const HEADER_SIZE: usize = 1024;
/// Separation between fields written by different sides. 128 rather than 64 because x86's
/// adjacent-line prefetcher pulls lines in pairs (crossbeam's `CachePadded` does the same).
pub const LINE: usize = 128;
/// Size of [`RecordHeader`]; the payload starts this far into a record.
pub const RECORD_HEADER_SIZE: usize = 16;
/// Size of the `aux` word a record carries after its payload when [`LEN_AUX`] is set.
pub const AUX_SIZE: usize = 8;
/// Bit of [`RecordHeader::len`] that says the record ends with an `aux` word (its payload
/// length is the other bits). Records without one (`aux` zero) are 8 bytes shorter.
pub const LEN_AUX: u32 = 1 << 31;
/// Every record starts on this alignment.
pub const RECORD_ALIGN: usize = 8;
/// Smallest data area a ring may have.
pub const MIN_CAPACITY: usize = 4096;
/// Largest data area a ring may have (1 TiB): keeps every position computation far from overflow.
pub const MAX_CAPACITY: usize = 1 << 40;
/// Largest position a side accepts when it attaches. Positions only grow from there by what is
/// published (2^62 bytes is millennia at memory bandwidth), so no position arithmetic can come
/// near 2^64 — which a hostile peer could otherwise arrange by writing huge positions before we
/// attach (found by fuzzing: `fuzz/regressions/ring_consumer-position-overflow`).
pub const MAX_POSITION: u64 = 1 << 62;
/// Tag reserved by the ring for padding at the wrap. Applications may use any other value.
pub const TAG_PAD: u16 = 0xFFFF;

/// Aligns a field group to its own line.
#[repr(C, align(128))]
#[derive(Default)]
pub struct Line<T>(pub T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Written once by the creator before [`MAGIC`] is published.
#[repr(C)]
#[derive(Default)]
pub struct Identity {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub flags: AtomicU32,
    pub capacity: AtomicU64,
    pub data_offset: AtomicU64,
    pub creator_pid: AtomicU32,
    pub _reserved: AtomicU32,
    pub created_unix_ms: AtomicU64,
}

/// Counters and liveness of one side. Only that side writes them (plain load + store, no
/// read-modify-write); anybody may read them, so every value is a hint, never trusted for memory
/// safety.
#[repr(C)]
#[derive(Default)]
pub struct Side {
    /// pid of the attached process, 0 when none.
    pub pid: AtomicU32,
    /// Bumped on every attach: tells a restarted peer from the old one.
    pub attach_count: AtomicU32,
    /// CLOCK_MONOTONIC nanoseconds of the side's last activity (publish, release or wake).
    pub active_ns: AtomicU64,
    /// Records committed (producer) or consumed (consumer).
    pub records: AtomicU64,
    /// Payload bytes committed or consumed.
    pub bytes: AtomicU64,
    /// Producer: reservations refused because the ring was full. Consumer: unused.
    pub full_events: AtomicU64,
    /// Wakeups this side sent to the other.
    pub wakeups_sent: AtomicU64,
    /// Times this side parked (futex or event loop).
    pub parks: AtomicU64,
    /// Producer: most bytes ever in use. Consumer: unused.
    pub high_water: AtomicU64,
}

/// The ring header, exactly [`HEADER_SIZE`] bytes at the start of the mapping.
#[repr(C)]
pub struct RingHeader {
    pub id: Line<Identity>,
    pub tail: Line<AtomicU64>,
    pub head: Line<AtomicU64>,
    pub consumer_sleep: Line<AtomicU32>,
    pub producer_sleep: Line<AtomicU32>,
    pub producer: Line<Side>,
    pub consumer: Line<Side>,
    pub user: Line<[AtomicU64; 16]>,
    /// Loom cannot see a real futex; a mutex and condvar model its check-then-sleep atomicity.
    #[cfg(loom)]
    pub(crate) futex: crate::wake::LoomFutex,
}

#[cfg(not(loom))]
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RingHeader>() == HEADER_SIZE);
    assert!(align_of::<RingHeader>() == LINE);
    assert!(size_of::<Identity>() <= LINE);
    assert!(size_of::<Side>() <= LINE);
    assert!(offset_of!(RingHeader, tail) == LINE);
    assert!(offset_of!(RingHeader, head) == 2 * LINE);
    assert!(offset_of!(RingHeader, consumer_sleep) == 3 * LINE);
    assert!(offset_of!(RingHeader, producer_sleep) == 4 * LINE);
    assert!(offset_of!(RingHeader, producer) == 5 * LINE);
    assert!(offset_of!(RingHeader, consumer) == 6 * LINE);
    assert!(offset_of!(RingHeader, user) == 7 * LINE);
    assert!(size_of::<RecordHeader>() == RECORD_HEADER_SIZE);
};

impl RingHeader {
    /// A zeroed header on the heap (the state of fresh shared memory), for heap rings and tests.
    pub(crate) fn boxed_zeroed() -> Box<RingHeader> {
        Box::new(RingHeader {
            id: Line::default(),
            tail: Line::default(),
            head: Line::default(),
            consumer_sleep: Line::default(),
            producer_sleep: Line::default(),
            producer: Line::default(),
            consumer: Line::default(),
            user: Line(Default::default()),
            #[cfg(loom)]
            futex: Default::default(),
        })
    }
}

/// What precedes every payload in the data area. Native endianness: both sides are on one host.
///
/// `len` is the payload length, with [`LEN_AUX`] set when the record carries an `aux` word:
/// the record occupies `align8(16 + len)` bytes, plus 8 for that word, which follows the
/// payload's padding (`aux` is only where used: the header of a record without it is 16 bytes,
/// against 24 when every record carried one). `tag` and `flags` belong to the application
/// except [`TAG_PAD`].
///
/// ```text
/// record at pos:  len|LEN_AUX u32, tag u16, flags u16 | conn u64 | payload, padded to 8 | aux u64
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub len: u32,
    pub tag: u16,
    pub flags: u16,
    pub conn: u64,
}

/// Rounds `n` up to [`RECORD_ALIGN`].
#[inline]
pub const fn align_up(n: u64) -> u64 {
    (n + (RECORD_ALIGN as u64 - 1)) & !(RECORD_ALIGN as u64 - 1)
}

/// Ring bytes one record with a payload of `len` bytes and no `aux` word occupies (one with
/// an `aux` word occupies [`AUX_SIZE`] more).
#[inline]
pub const fn record_size(len: usize) -> u64 {
    align_up(RECORD_HEADER_SIZE as u64 + len as u64)
}

/// Ring bytes a reservation of `len` payload bytes needs: the record with room for an `aux`
/// word, which is known only at commit.
#[inline]
pub const fn reserved_size(len: usize) -> u64 {
    record_size(len) + AUX_SIZE as u64
}

/// Checks a capacity read from an untrusted header or asked for by a caller.
pub fn valid_capacity(cap: u64) -> bool {
    cap.is_power_of_two() && cap >= MIN_CAPACITY as u64 && cap <= MAX_CAPACITY as u64
}

/// The largest payload a ring of `capacity` accepts: a record of half the ring always fits an
/// empty ring wherever its positions stand (either the part before or after the wrap is at
/// least half), so a producer waiting for space always makes progress.
/// Also below [`LEN_AUX`], so the length never reaches that bit.
pub const fn max_payload(capacity: usize) -> usize {
    let half = capacity / 2 - RECORD_HEADER_SIZE - AUX_SIZE;
    if half < (LEN_AUX - 1) as usize {
        half
    } else {
        (LEN_AUX - 1) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_sizes_are_aligned() {
        assert_eq!(record_size(0), 16);
        assert_eq!(record_size(1), 24);
        assert_eq!(record_size(8), 24);
        assert_eq!(record_size(9), 32);
        assert_eq!(reserved_size(9), 40);
        for len in 0..100 {
            assert_eq!(record_size(len) % RECORD_ALIGN as u64, 0);
            assert!(record_size(len) >= (RECORD_HEADER_SIZE + len) as u64);
        }
    }

    #[test]
    fn capacities() {
        assert!(valid_capacity(4096));
        assert!(!valid_capacity(4095));
        assert!(!valid_capacity(2048));
        assert!(!valid_capacity(0));
        assert!(!valid_capacity(1 << 41));
        assert_eq!(max_payload(4096), 2048 - 24);
        assert_eq!(max_payload(1 << 40), (1 << 31) - 1);
        assert!(max_payload(1 << 33) as u32 & LEN_AUX == 0);
    }
}
