//! Shared memory is untrusted input: attach errors, and positions, lengths and counters that a
//! broken or hostile peer writes into a live ring. Each case must give the specific error (or,
//! for counters, nothing worse than wrong statistics), never a panic or an out-of-bounds read.
//!
//! The test plays the hostile peer by writing into the segment *file* with `pwrite`, at the
//! offsets documented in `src/layout.rs` (tmpfs pages are shared between the file and every
//! mapping of it, so a live ring sees the bytes at once).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use shm_ring::layout::{
    record_size, reserved_size, LAYOUT_VERSION, LEN_AUX, MAGIC, RECORD_HEADER_SIZE, TAG_PAD,
};
use shm_ring::{
    AttachError, Consumer, CorruptError, Meta, Producer, ReserveError, RingView, ShmRing,
};

// Offsets from src/layout.rs.
const OFF_MAGIC: u64 = 0;
const OFF_VERSION: u64 = 8;
const OFF_CAPACITY: u64 = 16;
const OFF_DATA_OFFSET: u64 = 24;
const OFF_TAIL: u64 = 128;
const OFF_HEAD: u64 = 256;
const OFF_PRODUCER: u64 = 640;
const OFF_CONSUMER: u64 = 768;
const OFF_DATA: u64 = 1024;
/// Within a side: pid (u32), attach count (u32), then active_ns, records, bytes, full_events,
/// wakeups_sent, parks, high_water (u64 each).
const SIDE_PID: u64 = 0;
const SIDE_COUNTERS: std::ops::Range<u64> = 8..72;

type Tx = Producer<Arc<ShmRing>>;
type Rx = Consumer<Arc<ShmRing>>;

/// A named segment under /dev/shm, removed on drop (also when the test fails).
struct Seg {
    path: PathBuf,
    file: File,
}

impl Seg {
    fn path(tag: &str) -> PathBuf {
        PathBuf::from(format!(
            "/dev/shm/shm-ring-corrupt-{}-{tag}",
            std::process::id()
        ))
    }

    /// A new ring of `cap` bytes and a handle on its file.
    fn create(tag: &str, cap: usize) -> (Seg, Arc<ShmRing>) {
        let path = Self::path(tag);
        let _ = std::fs::remove_file(&path);
        let ring = Arc::new(ShmRing::create_at(&path, cap).unwrap());
        (Seg::open(path), ring)
    }

    /// An arbitrary file at the segment path.
    fn raw(tag: &str, bytes: &[u8]) -> Seg {
        let path = Self::path(tag);
        std::fs::write(&path, bytes).unwrap();
        Seg::open(path)
    }

    fn open(path: PathBuf) -> Seg {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        Seg { path, file }
    }

    fn put_u64(&self, off: u64, v: u64) {
        self.file.write_all_at(&v.to_ne_bytes(), off).unwrap();
    }
    fn put_u32(&self, off: u64, v: u32) {
        self.file.write_all_at(&v.to_ne_bytes(), off).unwrap();
    }
    fn put_u16(&self, off: u64, v: u16) {
        self.file.write_all_at(&v.to_ne_bytes(), off).unwrap();
    }

    /// Overwrites the length of the record header at ring position `pos`.
    fn put_record_len(&self, cap: u64, pos: u64, len: u32) {
        self.put_u32(OFF_DATA + (pos & (cap - 1)), len);
    }
    fn put_record_tag(&self, cap: u64, pos: u64, tag: u16) {
        self.put_u16(OFF_DATA + (pos & (cap - 1)) + 4, tag);
    }

    fn attach(&self) -> Result<ShmRing, AttachError> {
        ShmRing::open_path(&self.path, Duration::ZERO)
    }
}

impl Drop for Seg {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Producer and consumer on a new 4 KiB named ring.
fn ring(tag: &str) -> (Seg, Tx, Rx) {
    let (seg, ring) = Seg::create(tag, 4096);
    let tx = Producer::new(ring.clone()).unwrap();
    let rx = Consumer::new(ring).unwrap();
    (seg, tx, rx)
}

fn push_publish(tx: &mut Tx, lens: &[usize]) -> Vec<u64> {
    let pos = lens
        .iter()
        .map(|&n| {
            tx.push(Meta::tag(1).conn(n as u64), &vec![0x5A; n])
                .unwrap()
        })
        .collect();
    tx.publish();
    pos
}

/// Reads everything: the records before the first error, then the error (if any). Checks that
/// the iterator ends after an error.
fn read_all(rx: &mut Rx) -> (Vec<(u64, usize)>, Option<CorruptError>) {
    let mut it = match rx.records() {
        Ok(it) => it,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let mut ok = Vec::new();
    for r in it.by_ref() {
        match r {
            Ok(rec) => ok.push((rec.position(), rec.payload().len())),
            Err(e) => {
                assert!(it.next().is_none(), "the iterator must end after an error");
                return (ok, Some(e));
            }
        }
    }
    (ok, None)
}

fn release_all(rx: &mut Rx) -> u64 {
    let end = rx
        .records()
        .unwrap()
        .map(|r| r.unwrap().end())
        .last()
        .unwrap_or(rx.position());
    rx.release(end);
    end
}

// ------------------------------------------------------------------------------------------
// Attach errors (magic, version, size mismatch and "not initialised" with a zero wait are unit
// tests in segment.rs; these are the rest).

#[test]
fn size_mismatches() {
    let (seg, _ring) = Seg::create("size", 4096);
    // Data offset other than the header size.
    seg.put_u64(OFF_DATA_OFFSET, 2048);
    let e = seg.attach().err().unwrap();
    assert!(
        matches!(
            e,
            AttachError::SizeMismatch {
                file_len: 5120,
                expected: 5120
            }
        ),
        "{e}"
    );
    seg.put_u64(OFF_DATA_OFFSET, 1024);
    assert!(seg.attach().is_ok());

    // Capacities that would overflow or are not a power of two: refused without arithmetic
    // overflow.
    for bad in [0, 4095, 4097, 1 << 41, u64::MAX, u64::MAX - 1023] {
        seg.put_u64(OFF_CAPACITY, bad);
        let e = seg.attach().err().unwrap();
        assert!(
            matches!(e, AttachError::SizeMismatch { .. }),
            "capacity {bad}: {e}"
        );
    }
    seg.put_u64(OFF_CAPACITY, 4096);
    assert!(seg.attach().is_ok());

    // The file grew or shrank behind the header's back.
    seg.file.set_len(1024 + 8192).unwrap();
    let e = seg.attach().err().unwrap();
    assert!(
        matches!(
            e,
            AttachError::SizeMismatch {
                file_len: 9216,
                expected: 5120
            }
        ),
        "{e}"
    );
    seg.file.set_len(1024 + 2048).unwrap();
    let e = seg.attach().err().unwrap();
    assert!(
        matches!(
            e,
            AttachError::SizeMismatch {
                file_len: 3072,
                expected: 5120
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("size mismatch"), "{e}");
    // The read-only view refuses it the same way.
    assert!(matches!(
        RingView::open(&seg.path),
        Err(AttachError::SizeMismatch { .. })
    ));
}

#[test]
fn version_and_magic_are_reported_with_their_values() {
    let (seg, _ring) = Seg::create("version", 4096);
    seg.put_u32(OFF_VERSION, 0);
    let e = seg.attach().err().unwrap();
    assert!(
        matches!(
            e,
            AttachError::VersionMismatch {
                found: 0,
                expected: LAYOUT_VERSION
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("version mismatch"), "{e}");
    assert!(matches!(
        RingView::open(&seg.path),
        Err(AttachError::VersionMismatch { .. })
    ));
    seg.put_u32(OFF_VERSION, LAYOUT_VERSION);

    // A byte-swapped magic (e.g. written by a big-endian peer) is not ours.
    seg.put_u64(OFF_MAGIC, MAGIC.swap_bytes());
    let e = seg.attach().err().unwrap();
    assert!(
        matches!(e, AttachError::BadMagic { found } if found == MAGIC.swap_bytes()),
        "{e}"
    );
    assert!(matches!(
        RingView::open(&seg.path),
        Err(AttachError::BadMagic { .. })
    ));
    seg.put_u64(OFF_MAGIC, MAGIC);
    assert!(seg.attach().is_ok());
}

#[test]
fn attach_errors_through_an_fd() {
    // The same checks on the fd path (memfd passed to a child or over a socket).
    let ring = ShmRing::create_memfd("corrupt-fd", 4096).unwrap();
    let file = File::from(ring.fd().try_clone_to_owned().unwrap());
    let open = || ShmRing::open_fd(ring.fd().try_clone_to_owned().unwrap(), Duration::ZERO);
    assert!(open().is_ok());
    file.write_all_at(&7u32.to_ne_bytes(), OFF_VERSION).unwrap();
    assert!(matches!(
        open(),
        Err(AttachError::VersionMismatch { found: 7, .. })
    ));
    file.write_all_at(&LAYOUT_VERSION.to_ne_bytes(), OFF_VERSION)
        .unwrap();
    file.write_all_at(&8192u64.to_ne_bytes(), OFF_CAPACITY)
        .unwrap();
    assert!(matches!(open(), Err(AttachError::SizeMismatch { .. })));
    file.write_all_at(&4096u64.to_ne_bytes(), OFF_CAPACITY)
        .unwrap();
    file.write_all_at(&1u64.to_ne_bytes(), OFF_MAGIC).unwrap();
    assert!(matches!(open(), Err(AttachError::BadMagic { found: 1 })));
    file.write_all_at(&0u64.to_ne_bytes(), OFF_MAGIC).unwrap();
    assert!(matches!(open(), Err(AttachError::NotInitialised { .. })));
}

#[test]
fn uninitialised_waits_the_bounded_time_then_gives_up() {
    let seg = Seg::raw("uninit", &vec![0u8; 1024 + 4096]);
    let t = Instant::now();
    let e = ShmRing::open_path(&seg.path, Duration::from_millis(100))
        .err()
        .unwrap();
    let took = t.elapsed();
    match e {
        AttachError::NotInitialised { waited } => assert!(waited >= Duration::from_millis(100)),
        e => panic!("{e}"),
    }
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // An empty file (created, not yet sized) is "not initialised" too, as is a missing one an
    // I/O error.
    seg.file.set_len(0).unwrap();
    assert!(matches!(
        seg.attach(),
        Err(AttachError::NotInitialised { .. })
    ));
    assert!(matches!(
        RingView::open(&seg.path),
        Err(AttachError::NotInitialised { .. })
    ));
    let missing = Path::new("/dev/shm/shm-ring-corrupt-does-not-exist");
    assert!(matches!(
        ShmRing::open_path(missing, Duration::ZERO),
        Err(AttachError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound
    ));
}

#[test]
fn attach_succeeds_when_the_creator_finishes_during_the_wait() {
    // A valid segment with the magic still zero: what an opener sees while the creator is
    // between sizing the file and publishing the magic.
    let (seg, _ring) = Seg::create("late", 4096);
    seg.put_u64(OFF_MAGIC, 0);
    let path = seg.path.clone();
    let opener = std::thread::spawn(move || ShmRing::open_path(&path, Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(50));
    seg.put_u64(OFF_MAGIC, MAGIC);
    let ring = opener.join().unwrap().unwrap();
    assert!(Producer::new(Arc::new(ring)).is_ok());
}

#[test]
fn corrupt_positions_refuse_attaching_a_side() {
    let cases: &[(u64, u64)] = &[
        (0, 4096 + 8), // tail beyond head + capacity
        (64, 8),       // head beyond tail
        (0, 12),       // unaligned tail
        (4, 8),        // unaligned head
        (u64::MAX - 7, 0),
        (0, u64::MAX - 7),
    ];
    for (i, &(head, tail)) in cases.iter().enumerate() {
        let (seg, ring) = Seg::create(&format!("attachpos{i}"), 4096);
        seg.put_u64(OFF_HEAD, head);
        seg.put_u64(OFF_TAIL, tail);
        let capacity = 4096;
        match Producer::new(ring.clone()) {
            Err(AttachError::Corrupt(CorruptError::TailOutOfRange {
                tail: t,
                head: h,
                capacity: c,
            })) => {
                assert_eq!((t, h, c), (tail, head, capacity))
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("producer attached to head {head} tail {tail}"),
        }
        match Consumer::new(ring.clone()) {
            Err(AttachError::Corrupt(CorruptError::HeadOutOfRange {
                head: h,
                tail: t,
                capacity: c,
            })) => {
                assert_eq!((h, t, c), (head, tail, capacity))
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("consumer attached to head {head} tail {tail}"),
        }
    }
}

#[test]
fn a_live_peer_holds_its_side_a_dead_one_does_not() {
    let (seg, ring) = Seg::create("inuse", 4096);
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = child.id();
    seg.put_u32(OFF_PRODUCER + SIDE_PID, pid);
    seg.put_u32(OFF_CONSUMER + SIDE_PID, pid);
    match Producer::new(ring.clone()) {
        Err(AttachError::InUse {
            side: "producer",
            pid: p,
        }) => assert_eq!(p, pid),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("attached while a live process holds the producer side"),
    }
    assert!(matches!(
        Consumer::new(ring.clone()),
        Err(AttachError::InUse {
            side: "consumer",
            ..
        })
    ));
    child.kill().unwrap();
    child.wait().unwrap();
    // The holder is dead (and reaped): the side can be taken over.
    let _tx = Producer::new(ring.clone()).unwrap();
    let _rx = Consumer::new(ring).unwrap();
    // Garbage pids (negative as pid_t, or 0) never block either.
    for garbage in [u32::MAX, i32::MAX as u32 + 1] {
        let (seg, ring) = Seg::create("inuse-garbage", 4096);
        seg.put_u32(OFF_PRODUCER + SIDE_PID, garbage);
        assert!(Producer::new(ring).is_ok());
    }
}

// ------------------------------------------------------------------------------------------
// Corrupted positions in a live ring.

#[test]
fn tail_beyond_head_plus_capacity() {
    let (seg, mut tx, mut rx) = ring("tail-far");
    push_publish(&mut tx, &[100]);
    let want = CorruptError::TailOutOfRange {
        tail: 4096 + 8,
        head: 0,
        capacity: 4096,
    };
    seg.put_u64(OFF_TAIL, 4096 + 8);
    assert_eq!(rx.records().err(), Some(want));
    assert_eq!(rx.is_empty().err(), Some(want));
    assert_eq!(rx.wait(Some(Duration::from_millis(1))).err(), Some(want));
    assert_eq!(rx.prepare_park().err(), Some(want));
    rx.finish_park();
    seg.put_u64(OFF_TAIL, u64::MAX - 7);
    assert!(matches!(
        rx.records().err(),
        Some(CorruptError::TailOutOfRange { .. })
    ));
    // The real tail back: everything before the bad value is intact.
    seg.put_u64(OFF_TAIL, 120);
    assert_eq!(read_all(&mut rx), (vec![(0, 100)], None));
    // Exactly head + capacity is a legal tail (a full ring); then it is the unwritten bytes
    // after the real records that must be caught (here zeros: empty records, then whatever
    // the garbage says), still without reading outside the data area.
    seg.put_u64(OFF_TAIL, 4096);
    let (ok, _err) = read_all(&mut rx);
    assert_eq!(ok[0], (0, 100));
    assert!(ok
        .iter()
        .all(|&(pos, len)| pos % 4096 + record_size(len) <= 4096));
}

#[test]
fn tail_going_backwards() {
    let (seg, mut tx, mut rx) = ring("tail-back");
    push_publish(&mut tx, &[8, 8, 8]); // records of 24 bytes: tail 72
    assert_eq!(read_all(&mut rx).0.len(), 3);
    assert_eq!(rx.seen_tail(), 72);
    seg.put_u64(OFF_TAIL, 48);
    let want = CorruptError::TailOutOfRange {
        tail: 48,
        head: 0,
        capacity: 4096,
    };
    assert_eq!(rx.records().err(), Some(want));
    // Also behind the released position.
    seg.put_u64(OFF_TAIL, 72);
    release_all(&mut rx);
    seg.put_u64(OFF_TAIL, 0);
    assert_eq!(
        rx.records().err(),
        Some(CorruptError::TailOutOfRange {
            tail: 0,
            head: 72,
            capacity: 4096
        })
    );
}

#[test]
fn unaligned_tail() {
    let (seg, mut tx, mut rx) = ring("tail-unaligned");
    push_publish(&mut tx, &[8]);
    for bad in [33, 36, 39] {
        seg.put_u64(OFF_TAIL, bad);
        assert_eq!(
            rx.records().err(),
            Some(CorruptError::TailOutOfRange {
                tail: bad,
                head: 0,
                capacity: 4096
            })
        );
    }
}

#[test]
fn head_beyond_tail_on_the_producer_side() {
    let (seg, mut tx, _rx) = ring("head-far");
    push_publish(&mut tx, &[100]); // tail 120
    seg.put_u64(OFF_HEAD, 128);
    let want = CorruptError::HeadOutOfRange {
        head: 128,
        tail: 120,
        capacity: 4096,
    };
    assert_eq!(tx.is_drained().err(), Some(want));
    // Beyond the published tail but within committed, unpublished records: still corrupt.
    tx.push(Meta::tag(1), &[0; 8]).unwrap();
    assert_eq!(tx.is_drained().err(), Some(want));
    tx.publish(); // tail 144
    seg.put_u64(OFF_HEAD, 152);
    let want = CorruptError::HeadOutOfRange {
        head: 152,
        tail: 144,
        capacity: 4096,
    };
    assert_eq!(tx.is_drained().err(), Some(want));
    // The producer reads the head when it runs out of room: fill the ring and ask for more.
    seg.put_u64(OFF_HEAD, 0);
    while tx.push(Meta::tag(1), &[0; 100]).is_ok() {}
    tx.publish();
    let tail = tx.position();
    seg.put_u64(OFF_HEAD, tail + 8);
    let want = CorruptError::HeadOutOfRange {
        head: tail + 8,
        tail,
        capacity: 4096,
    };
    assert_eq!(tx.reserve(100).err(), Some(ReserveError::Corrupt(want)));
    assert_eq!(
        tx.reserve_up_to(1, 2000).err(),
        Some(ReserveError::Corrupt(want))
    );
    assert_eq!(
        tx.wait_for_space(100, Some(Duration::from_millis(1))).err(),
        Some(ReserveError::Corrupt(want))
    );
    assert_eq!(
        tx.prepare_park_for_space(100).err(),
        Some(ReserveError::Corrupt(want))
    );
    tx.finish_park();
    seg.put_u64(OFF_HEAD, u64::MAX - 7);
    assert!(matches!(
        tx.is_drained(),
        Err(CorruptError::HeadOutOfRange { .. })
    ));
}

#[test]
fn head_going_backwards_or_unaligned() {
    let (seg, mut tx, mut rx) = ring("head-back");
    push_publish(&mut tx, &[8, 8, 8]);
    release_all(&mut rx); // head 72
    assert!(tx.is_drained().unwrap());
    seg.put_u64(OFF_HEAD, 48);
    assert_eq!(
        tx.is_drained().err(),
        Some(CorruptError::HeadOutOfRange {
            head: 48,
            tail: 72,
            capacity: 4096
        })
    );
    seg.put_u64(OFF_HEAD, 68);
    assert_eq!(
        tx.is_drained().err(),
        Some(CorruptError::HeadOutOfRange {
            head: 68,
            tail: 72,
            capacity: 4096
        })
    );
    seg.put_u64(OFF_HEAD, 72);
    assert!(tx.is_drained().unwrap());
}

// ------------------------------------------------------------------------------------------
// Corrupted record lengths.

#[test]
fn record_length_crossing_the_end() {
    let (seg, mut tx, mut rx) = ring("crosses");
    // Move to offset 3072 and put two records there: [3072, 3192) and [3192, 3312).
    push_publish(&mut tx, &[1024 - RECORD_HEADER_SIZE; 3]);
    release_all(&mut rx);
    let pos = push_publish(&mut tx, &[100, 100]);
    assert_eq!(pos, [3072, 3192]);
    // The second claims 1000 bytes: 1016 > the 904 left before the end.
    seg.put_record_len(4096, 3192, 1000);
    let (ok, err) = read_all(&mut rx);
    assert_eq!(ok, vec![(3072, 100)]);
    assert_eq!(
        err,
        Some(CorruptError::RecordCrossesEnd {
            pos: 3192,
            len: 1000
        })
    );
    // The largest length there is: no overflow.
    seg.put_record_len(4096, 3192, u32::MAX);
    assert_eq!(
        read_all(&mut rx).1,
        Some(CorruptError::RecordCrossesEnd {
            pos: 3192,
            len: u32::MAX
        })
    );
    // One byte too many for the end (record_size rounds 16 + 889 up to 912 > 904).
    seg.put_record_len(4096, 3192, 889);
    assert_eq!(
        read_all(&mut rx).1,
        Some(CorruptError::RecordCrossesEnd {
            pos: 3192,
            len: 889
        })
    );
    // A length that fits exactly (with a tail at the end), but with an aux word declared
    // after it: 8 bytes too many.
    seg.put_u64(OFF_TAIL, 4096);
    seg.put_record_len(4096, 3192, 888);
    assert_eq!(read_all(&mut rx), (vec![(3072, 100), (3192, 888)], None));
    seg.put_record_len(4096, 3192, 888 | LEN_AUX);
    assert_eq!(
        read_all(&mut rx).1,
        Some(CorruptError::RecordCrossesEnd {
            pos: 3192,
            len: 888 | LEN_AUX
        })
    );
}

#[test]
fn record_past_the_tail() {
    let (seg, mut tx, mut rx) = ring("past-tail");
    let pos = push_publish(&mut tx, &[100, 100]); // [0,120) [120,240), tail 240
    assert_eq!(pos, [0, 120]);
    seg.put_record_len(4096, 120, 105); // needs 128 bytes: 248 > 240
    let (ok, err) = read_all(&mut rx);
    assert_eq!(ok, vec![(0, 100)]);
    assert_eq!(
        err,
        Some(CorruptError::RecordPastTail {
            pos: 120,
            len: 105,
            tail: 240
        })
    );
    // The right length with an aux word declared: 8 bytes past the tail as well.
    seg.put_record_len(4096, 120, 100 | LEN_AUX);
    assert_eq!(
        read_all(&mut rx).1,
        Some(CorruptError::RecordPastTail {
            pos: 120,
            len: 100 | LEN_AUX,
            tail: 240
        })
    );
    // A record beyond the tail is fine as long as it is not published: restore, then publish a
    // tail that cuts the second record in half.
    seg.put_record_len(4096, 120, 100);
    assert_eq!(read_all(&mut rx), (vec![(0, 100), (120, 100)], None));
    release_all(&mut rx);
    tx.push(Meta::tag(1).aux(9), &[0; 200]).unwrap(); // [240, 464): 216 and the aux word
    tx.publish();
    assert_eq!(tx.position(), 464);
    // A tail in the middle of it, then one that cuts off just the aux word: past the tail.
    for tail in [240 + 64, 456] {
        seg.put_u64(OFF_TAIL, tail);
        assert_eq!(
            read_all(&mut rx).1,
            Some(CorruptError::RecordPastTail {
                pos: 240,
                len: 200 | LEN_AUX,
                tail
            })
        );
    }
    seg.put_u64(OFF_TAIL, 464);
    assert_eq!(read_all(&mut rx), (vec![(240, 200)], None));
}

/// Positions with a padding record from `pad_at` to the end and the next record at 4096.
fn ring_with_padding(tag: &str) -> (Seg, Tx, Rx, u64) {
    let (seg, mut tx, mut rx) = ring(tag);
    // [0, 3072) released; then a record that does not fit the 1024 bytes left.
    push_publish(&mut tx, &[1024 - RECORD_HEADER_SIZE; 3]);
    release_all(&mut rx);
    let pos = push_publish(&mut tx, &[1500]);
    assert_eq!(pos, [4096]);
    (seg, tx, rx, 3072)
}

#[test]
fn bad_padding_length() {
    let (seg, _tx, mut rx, pad_at) = ring_with_padding("pad-len");
    assert_eq!(read_all(&mut rx), (vec![(4096, 1500)], None));
    let expected = 4096 - pad_at - RECORD_HEADER_SIZE as u64;
    for bad in [
        0,
        expected as u32 - 8,
        expected as u32 + 8,
        expected as u32 | LEN_AUX,
        u32::MAX,
    ] {
        seg.put_record_len(4096, pad_at, bad);
        assert_eq!(
            read_all(&mut rx),
            (
                vec![],
                Some(CorruptError::BadPadding {
                    pos: pad_at,
                    len: bad,
                    expected
                })
            )
        );
    }
    seg.put_record_len(4096, pad_at, expected as u32);
    assert_eq!(read_all(&mut rx), (vec![(4096, 1500)], None));
}

#[test]
fn padding_tag_in_the_middle_of_the_ring() {
    let (seg, mut tx, mut rx) = ring("pad-middle");
    push_publish(&mut tx, &[100, 100]);
    seg.put_record_tag(4096, 120, TAG_PAD);
    let (ok, err) = read_all(&mut rx);
    assert_eq!(ok, vec![(0, 100)]);
    assert_eq!(
        err,
        Some(CorruptError::BadPadding {
            pos: 120,
            len: 100,
            expected: 4096 - 120 - 16
        })
    );
}

#[test]
fn tail_inside_a_padding_record_or_an_implicit_wrap() {
    // Padding [3072, 4096) but a tail in the middle of it.
    let (seg, _tx, mut rx, pad_at) = ring_with_padding("pad-tail");
    seg.put_u64(OFF_TAIL, pad_at + 512);
    assert_eq!(
        read_all(&mut rx),
        (
            vec![],
            Some(CorruptError::BadPadding {
                pos: pad_at,
                len: 1024 - 16,
                expected: 1024 - 16
            })
        )
    );

    // Records ending 8 bytes before the end: too few for a header, so the producer wraps
    // implicitly. (A tail inside those 8 bytes would be unaligned: see `unaligned_tail`.)
    let (_seg, mut tx, mut rx) = ring("implicit-tail");
    push_publish(&mut tx, &[1008, 1008, 1008, 1000]);
    assert_eq!(release_all(&mut rx), 4096 - 8);
    tx.push(Meta::tag(1), &[1; 40]).unwrap();
    tx.publish();
    assert_eq!(read_all(&mut rx), (vec![(4096, 40)], None));
}

// ------------------------------------------------------------------------------------------
// Counters are hints: garbage in them must not break the data path.

#[test]
fn garbage_counters_do_not_panic() {
    let (seg, ring) = Seg::create("counters", 4096);
    for side in [OFF_PRODUCER, OFF_CONSUMER] {
        for off in SIDE_COUNTERS.step_by(8) {
            seg.put_u64(side + off, u64::MAX);
        }
    }
    let mut tx = Producer::new(ring.clone()).unwrap();
    let mut rx = Consumer::new(ring.clone()).unwrap();
    for _ in 0..3 {
        // Fill the ring (counts full events), drain it, park and wake both ways.
        while tx.push(Meta::tag(1), &[7; 1000]).is_ok() {}
        tx.publish();
        assert!(tx.prepare_park_for_space(1000).unwrap()); // full: would sleep
        tx.finish_park();
        let n = read_all(&mut rx).0.len();
        assert!(n > 0);
        release_all(&mut rx);
        assert!(rx.prepare_park().unwrap());
        rx.finish_park();
        assert!(!rx.wait(Some(Duration::from_millis(1))).unwrap());
        tx.heartbeat();
        rx.heartbeat();
    }
    let snap = RingView::open(&seg.path).unwrap().snapshot();
    assert_eq!(snap.tail, snap.head);
    drop(ring);
}

// ------------------------------------------------------------------------------------------
// Anything at all written into the header positions and the data area: errors, no panic, and
// every record handed out lies inside the data area and before the tail.

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_corruption_never_panics(
        lens in prop::collection::vec(0usize..700, 1..12),
        released in 0usize..12,
        writes in prop::collection::vec((0u64..4096 + 1024, any::<u64>(), 0u8..4), 0..6),
        tail in prop::option::of(prop_oneof![any::<u64>(), 0u64..9000, (0u64..1200).prop_map(|x| x * 8)]),
        head in prop::option::of(prop_oneof![any::<u64>(), (0u64..1200).prop_map(|x| x * 8)]),
    ) {
        let ring = Arc::new(ShmRing::create_memfd("corrupt-fuzz", 4096).unwrap());
        let file = File::from(ring.fd().try_clone_to_owned().unwrap());
        let mut tx = Producer::new(ring.clone()).unwrap();
        let mut rx = Consumer::new(ring.clone()).unwrap();
        for (i, &n) in lens.iter().enumerate() {
            // Every other record with an aux word after its payload.
            let meta = Meta::tag(1).aux(i as u64 % 2);
            if tx.push(meta, &vec![i as u8; n]).is_err() {
                tx.publish();
                release_all(&mut rx);
                let _ = tx.push(meta, &vec![i as u8; n]);
            }
            if i == released {
                tx.publish();
                release_all(&mut rx);
            }
        }
        tx.publish();
        // The hostile writes: anywhere in the data area or the positions, 1 to 8 bytes.
        for &(off, v, width) in &writes {
            let bytes = v.to_ne_bytes();
            let n = 1usize << width; // 1, 2, 4 or 8
            let at = if off < 4096 { OFF_DATA + off } else { [OFF_TAIL, OFF_HEAD][(off % 2) as usize] + off % 8 };
            let n = n.min((OFF_DATA + 4096 - at) as usize);
            file.write_all_at(&bytes[..n], at).unwrap();
        }
        if let Some(t) = tail {
            file.write_all_at(&t.to_ne_bytes(), OFF_TAIL).unwrap();
        }
        if let Some(h) = head {
            file.write_all_at(&h.to_ne_bytes(), OFF_HEAD).unwrap();
        }
        // Consumer: records, each inside the data area and before the tail, or an error.
        let start = rx.position();
        if let Ok(it) = rx.records() {
            let mut last = start;
            for r in it {
                match r {
                    Ok(rec) => {
                        prop_assert!(rec.position() >= last);
                        prop_assert!(rec.position() % 8 == 0);
                        let off = rec.position() % 4096;
                        let size = rec.end() - rec.position();
                        prop_assert!(size >= record_size(rec.payload().len()));
                        prop_assert!(off + size <= 4096);
                        last = rec.end();
                    }
                    Err(_) => break,
                }
            }
            prop_assert!(last <= rx.seen_tail());
        }
        let _ = rx.is_empty();
        let _ = rx.wait(Some(Duration::ZERO));
        // Producer: any call either works or reports corruption.
        for len in [0usize, 100, 2024] {
            match tx.reserve(len) {
                Ok(g) => {
                    prop_assert_eq!(g.len(), len);
                    let off = g.position() % 4096;
                    prop_assert!(off + reserved_size(len) <= 4096);
                    g.commit(len, Meta::tag(2));
                }
                Err(ReserveError::Full) | Err(ReserveError::Corrupt(_)) => {}
                Err(e) => prop_assert!(false, "{}", e),
            }
        }
        tx.publish();
        let _ = tx.is_drained();
        let _ = tx.wait_for_space(2024, Some(Duration::ZERO));
        // A fresh side attaching to the damaged ring: an error or a consistent view.
        drop(tx);
        drop(rx);
        let _ = Producer::new(ring.clone());
        let _ = Consumer::new(ring.clone());
    }
}
