//! Property tests of the ring against a model.
//!
//! (a) Record encoding: any tag (but the padding tag), flags, connection id, aux word and payload
//!     of any length up to the maximum comes back exactly, wherever in the ring it lands.
//! (b) Arbitrary interleavings of reserve / reserve_up_to / commit (full or shorter) / abandon /
//!     publish / read / release on small rings (4 and 8 KiB, so wrap-around, padding records,
//!     implicit wraps and a full ring happen all the time), checked against a model queue: every
//!     payload byte and header field, the order, the positions, `Full` exactly when no
//!     contiguous piece of free space is large enough, `TooLarge` exactly above `max_payload`,
//!     and `reserve_up_to` granting the whole largest free piece when it cannot grant `max`.
//!
//! Single-threaded: the concurrency of the protocol is loom's and the multi-process tests' job.

use std::collections::VecDeque;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use shm_ring::layout::{
    max_payload, record_size, reserved_size, AUX_SIZE, RECORD_HEADER_SIZE, TAG_PAD,
};
use shm_ring::{Consumer, HeapRing, Meta, Producer, ReserveError, RingStorage, ShmRing};

/// SplitMix64: the payload bytes of record `id` are a function of `id` alone.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn payload_byte(id: u64, i: usize) -> u8 {
    let h = mix(id);
    (h >> ((i % 8) * 8)) as u8 ^ (i / 8) as u8
}

fn fill(id: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = payload_byte(id, i);
    }
}

fn meta_for(id: u64) -> Meta {
    let h = mix(id ^ 0x5555);
    Meta::tag((h % 0xFFFF) as u16) // never TAG_PAD
        .flags((h >> 16) as u16)
        .conn(id)
        .aux(if h & 0x300 == 0 { 0 } else { h }) // a quarter of the records carry no aux word
}

/// Ring bytes of a committed record of `len` payload bytes with `aux`.
fn size_with(len: usize, aux: u64) -> u64 {
    record_size(len) + if aux != 0 { AUX_SIZE as u64 } else { 0 }
}

// ------------------------------------------------------------------------------------------
// (a) record encoding round trip

/// Pushes and releases records of the given lengths, moving the ring's positions.
fn advance<S: RingStorage>(tx: &mut Producer<S>, rx: &mut Consumer<S>, fillers: &[usize]) {
    for &len in fillers {
        tx.push(Meta::tag(0), &vec![0; len]).unwrap();
        tx.publish();
        let end = rx
            .records()
            .unwrap()
            .map(|r| r.unwrap().end())
            .last()
            .unwrap();
        rx.release(end);
    }
}

fn cap_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![Just(4096usize), Just(8192), Just(16384)]
}

proptest! {
    #![proptest_config(Config { cases: 1000, failure_persistence: None, ..Config::default() })]

    /// One record with arbitrary fields and payload, after fillers that leave the positions
    /// anywhere (so it may sit at the start, the middle, the very end, or after a wrap).
    #[test]
    fn record_round_trip(
        (cap, payload) in cap_strategy().prop_flat_map(|cap| {
            (Just(cap), prop::collection::vec(any::<u8>(), 0..=max_payload(cap)))
        }),
        fillers in prop::collection::vec(prop_oneof![0usize..64, 0usize..2000], 0..8),
        tag in 0u16..TAG_PAD,
        flags in any::<u16>(),
        conn in any::<u64>(),
        aux in prop_oneof![Just(0u64), any::<u64>()],
        use_up_to in any::<bool>(),
    ) {
        let (mut tx, mut rx) = HeapRing::channel(cap).unwrap();
        advance(&mut tx, &mut rx, &fillers);
        let start = tx.position();
        let offset = start % cap as u64;

        let meta = Meta { tag, flags, conn, aux };
        let mut grant = if use_up_to {
            tx.reserve_up_to(payload.len(), usize::MAX).unwrap()
        } else {
            tx.reserve(payload.len()).unwrap()
        };
        prop_assert!(grant.len() >= payload.len());
        grant[..payload.len()].copy_from_slice(&payload);
        let gpos = grant.position();
        let pos = grant.commit(payload.len(), meta);
        prop_assert_eq!(pos, gpos);
        // Either in place, or after the wrap (padding or an implicit wrap).
        let to_end = cap as u64 - offset;
        prop_assert!(pos == start || pos == start + to_end, "pos {} start {}", pos, start);
        prop_assert!((pos % cap as u64) + size_with(payload.len(), aux) <= cap as u64);
        tx.publish();

        let mut it = rx.records().unwrap();
        let rec = it.next().unwrap().unwrap();
        prop_assert_eq!(rec.position(), pos);
        prop_assert_eq!(rec.payload_position(), pos + RECORD_HEADER_SIZE as u64);
        prop_assert_eq!(rec.end(), pos + size_with(payload.len(), aux));
        prop_assert_eq!(rec.end() % 8, 0);
        prop_assert_eq!((rec.tag(), rec.flags(), rec.conn(), rec.aux()), (tag, flags, conn, aux));
        prop_assert_eq!(rec.payload(), &payload[..]);
        prop_assert!(it.next().is_none());
        let end = rec.end();
        rx.release(end);
        prop_assert!(rx.is_empty().unwrap());
        prop_assert!(tx.is_drained().unwrap());
    }

    /// A batch of records committed with one publish and read back in one pass.
    #[test]
    fn batch_round_trip(
        recs in prop::collection::vec(
            (0u16..TAG_PAD, any::<u16>(), any::<u64>(), any::<u64>(),
             prop::collection::vec(any::<u8>(), 0..600)),
            1..12),
    ) {
        let (mut tx, mut rx) = HeapRing::channel(8192).unwrap();
        let mut sent = Vec::new();
        for (tag, flags, conn, aux, payload) in &recs {
            let meta = Meta { tag: *tag, flags: *flags, conn: *conn, aux: *aux };
            match tx.push(meta, payload) {
                Ok(pos) => sent.push((pos, meta, payload.clone())),
                Err(ReserveError::Full) => break,
                Err(e) => panic!("{e}"),
            }
        }
        // Nothing is visible before the publish.
        prop_assert!(rx.records().unwrap().next().is_none());
        tx.publish();
        let got: Vec<_> = rx
            .records()
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                (r.position(), Meta { tag: r.tag(), flags: r.flags(), conn: r.conn(), aux: r.aux() },
                 r.payload().to_vec())
            })
            .collect();
        prop_assert_eq!(got, sent);
    }
}

#[test]
#[should_panic(expected = "reserved for padding")]
fn committing_the_padding_tag_panics() {
    let (mut tx, _rx) = HeapRing::channel(4096).unwrap();
    tx.reserve(8).unwrap().commit(8, Meta::tag(TAG_PAD));
}

#[test]
#[should_panic(expected = "commit of 9 bytes on a grant of 8")]
fn committing_more_than_granted_panics() {
    let (mut tx, _rx) = HeapRing::channel(4096).unwrap();
    tx.reserve(8).unwrap().commit(9, Meta::tag(1));
}

#[test]
fn too_large_is_exactly_above_max_payload() {
    for cap in [4096usize, 8192, 1 << 20] {
        let (mut tx, _rx) = HeapRing::channel(cap).unwrap();
        let max = tx.max_payload();
        assert_eq!(max, cap / 2 - RECORD_HEADER_SIZE - AUX_SIZE);
        assert_eq!(reserved_size(max), cap as u64 / 2);
        assert_eq!(
            tx.reserve(max + 1).err(),
            Some(ReserveError::TooLarge { len: max + 1, max })
        );
        assert_eq!(
            tx.reserve_up_to(max + 1, max + 2).err(),
            Some(ReserveError::TooLarge { len: max + 1, max })
        );
        assert_eq!(
            tx.wait_for_space(max + 1, None).err(),
            Some(ReserveError::TooLarge { len: max + 1, max })
        );
        // The largest record fits an empty ring, and a clamped reserve_up_to never exceeds it.
        assert_eq!(tx.reserve(max).unwrap().len(), max);
        assert_eq!(tx.reserve_up_to(0, usize::MAX).unwrap().len(), max);
    }
}

/// The largest record fits an empty ring wherever its positions stand (the promise that makes
/// `wait_for_space` always make progress), on memfd storage as well as heap storage.
#[test]
fn max_record_fits_an_empty_ring_wherever_it_stands() {
    let ring = Arc::new(ShmRing::create_memfd("model-max", 4096).unwrap());
    let mut tx = Producer::new(ring.clone()).unwrap();
    let mut rx = Consumer::new(ring).unwrap();
    let max = tx.max_payload();
    for step in 0..(4096 / 8 + 3) {
        let len = (step * 8) % 200; // moves the offset by record_size(len) each time
        tx.push(Meta::tag(1), &vec![1; len]).unwrap();
        tx.publish();
        let end = rx
            .records()
            .unwrap()
            .map(|r| r.unwrap().end())
            .last()
            .unwrap();
        rx.release(end);
        let id = step as u64;
        let mut g = tx.reserve(max).unwrap();
        fill(id, &mut g);
        g.commit(max, meta_for(id));
        tx.publish();
        let rec = rx.records().unwrap().next().unwrap().unwrap();
        assert_eq!(rec.payload().len(), max);
        assert!(rec
            .payload()
            .iter()
            .enumerate()
            .all(|(i, &b)| b == payload_byte(id, i)));
        let end = rec.end();
        rx.release(end);
    }
}

// ------------------------------------------------------------------------------------------
// (b) interleavings against a model queue

#[derive(Clone, Debug)]
enum Then {
    /// Commit `len - min(cut, len)` bytes (cut 0: the whole grant).
    Commit { cut: usize },
    /// Write junk into the grant and drop it.
    Abandon,
}

#[derive(Clone, Debug)]
enum Op {
    Reserve {
        len: usize,
        then: Then,
    },
    ReserveUpTo {
        min: usize,
        max: usize,
        then: Then,
    },
    Publish,
    /// Reads up to `n` records from the released position (re-reading what is not released).
    Read {
        n: usize,
    },
    /// Reads `n` records and releases up to the end of the last.
    Release {
        n: usize,
    },
    /// The queries: `is_empty`, `is_drained`, `has_new`.
    Check,
}

fn len_strategy(cap: usize) -> impl Strategy<Value = usize> {
    let max = max_payload(cap);
    prop_oneof![
        6 => 0usize..64,
        4 => 0usize..=max,
        1 => Just(0usize),
        1 => Just(max),
        1 => (max - 16)..=(max + 16),
        1 => (max + 1)..=(cap * 2),
    ]
}

fn then_strategy() -> impl Strategy<Value = Then> {
    prop_oneof![
        6 => Just(Then::Commit { cut: 0 }),
        3 => (1usize..=24).prop_map(|cut| Then::Commit { cut }),
        1 => any::<usize>().prop_map(|cut| Then::Commit { cut }),
        2 => Just(Then::Abandon),
    ]
}

fn op_strategy(cap: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (len_strategy(cap), then_strategy()).prop_map(|(len, then)| Op::Reserve { len, then }),
        4 => (len_strategy(cap), len_strategy(cap), then_strategy())
            .prop_map(|(min, max, then)| Op::ReserveUpTo { min, max, then }),
        2 => (0usize..64, then_strategy()).prop_map(|(min, then)| Op::ReserveUpTo {
            min,
            max: usize::MAX,
            then
        }),
        4 => Just(Op::Publish),
        2 => (0usize..6).prop_map(|n| Op::Read { n }),
        4 => (0usize..8).prop_map(|n| Op::Release { n }),
        1 => Just(Op::Release { n: usize::MAX }),
        1 => Just(Op::Check),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, bool, Vec<Op>)> {
    prop_oneof![Just(4096usize), Just(8192)].prop_flat_map(|cap| {
        (
            Just(cap),
            any::<bool>(),
            prop::collection::vec(op_strategy(cap), 1..300),
        )
    })
}

#[derive(Debug)]
struct ModelRec {
    id: u64,
    pos: u64,
    len: usize,
}

impl ModelRec {
    fn end(&self) -> u64 {
        self.pos + size_with(self.len, meta_for(self.id).aux)
    }
}

/// The model: positions and the committed records, nothing else.
struct Model {
    cap: u64,
    head: u64,
    tail: u64,
    /// Committed records not yet released, oldest first; the first `published` are visible.
    queue: VecDeque<ModelRec>,
    published: usize,
    next_id: u64,
}

/// How often each interesting case happened (for the coverage test).
#[derive(Default, Debug)]
struct Coverage {
    commits: u64,
    short_commits: u64,
    abandons: u64,
    full: u64,
    too_large: u64,
    padding_wraps: u64,
    implicit_wraps: u64,
    partial_grants: u64,
    releases: u64,
    max_records: u64,
}

impl Model {
    fn free(&self) -> u64 {
        self.cap - (self.tail - self.head)
    }
    fn to_end(&self) -> u64 {
        self.cap - self.tail % self.cap
    }
    /// Contiguous free bytes at the current tail.
    fn here(&self) -> u64 {
        self.free().min(self.to_end())
    }
    /// Contiguous free bytes from the start of the data area, after a wrap.
    fn wrapped(&self) -> u64 {
        self.free().saturating_sub(self.to_end())
    }
    fn published_tail(&self) -> u64 {
        match self.published {
            0 => self.head,
            n => self.queue[n - 1].end(),
        }
    }
}

fn check_reservation<S: RingStorage>(
    tx: &mut Producer<S>,
    m: &mut Model,
    cov: &mut Coverage,
    min: usize,
    max: Option<usize>,
    then: &Then,
) -> Result<(), TestCaseError> {
    let limit = max_payload(m.cap as usize);
    let res = match max {
        None => tx.reserve(min),
        Some(max) => tx.reserve_up_to(min, max),
    };
    if min > limit {
        prop_assert_eq!(
            res.err(),
            Some(ReserveError::TooLarge {
                len: min,
                max: limit
            })
        );
        cov.too_large += 1;
        return Ok(());
    }
    let need = reserved_size(min);
    let best = m.here().max(m.wrapped());
    let mut grant = match res {
        Err(ReserveError::Full) => {
            // Full only when no contiguous free piece holds the record.
            prop_assert!(
                best < need,
                "Full with {} contiguous bytes free for {}",
                best,
                need
            );
            cov.full += 1;
            return Ok(());
        }
        Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
        Ok(g) => g,
    };
    prop_assert!(
        best >= need,
        "granted {} bytes with only {} free",
        need,
        best
    );
    let pos = grant.position();
    let room = if pos == m.tail {
        m.here()
    } else {
        prop_assert_eq!(
            pos,
            m.tail + m.to_end(),
            "grant neither at the tail nor at the wrap"
        );
        m.wrapped()
    };
    let glen = grant.len();
    prop_assert!(
        reserved_size(glen) <= room,
        "grant of {} in a piece of {}",
        glen,
        room
    );
    match max {
        None => prop_assert_eq!(glen, min),
        Some(max) => {
            let max = max.clamp(min, limit);
            prop_assert!(
                glen >= min && glen <= max,
                "grant {} not in {}..={}",
                glen,
                min,
                max
            );
            if glen < max {
                // Short of max: must be all of the largest free piece.
                prop_assert_eq!(reserved_size(glen), best);
                prop_assert_eq!(room, best);
                cov.partial_grants += 1;
            }
        }
    }
    match then {
        Then::Abandon => {
            grant.fill(0xA5); // and dropped uncommitted at the end of this arm
            cov.abandons += 1;
        }
        Then::Commit { cut } => {
            let len = glen - (*cut).min(glen);
            let id = m.next_id;
            m.next_id += 1;
            fill(id, &mut grant[..len]);
            grant[len..].fill(0xEE); // reserved but not committed: must stay invisible
            let at = grant.commit(len, meta_for(id));
            prop_assert_eq!(at, pos);
            let pad = pos - m.tail;
            if pad >= RECORD_HEADER_SIZE as u64 {
                cov.padding_wraps += 1;
            } else if pad > 0 {
                cov.implicit_wraps += 1;
            }
            cov.commits += 1;
            cov.short_commits += u64::from(len < glen);
            cov.max_records += u64::from(len == limit);
            m.queue.push_back(ModelRec { id, pos, len });
            m.tail = pos + size_with(len, meta_for(id).aux);
            prop_assert_eq!(tx.position(), m.tail);
        }
    }
    Ok(())
}

fn check_record(rec: &shm_ring::Record<'_>, want: &ModelRec) -> Result<(), TestCaseError> {
    let meta = meta_for(want.id);
    prop_assert_eq!(rec.position(), want.pos);
    prop_assert_eq!(rec.end(), want.end());
    prop_assert_eq!(rec.payload().len(), want.len);
    prop_assert_eq!(
        (rec.tag(), rec.flags(), rec.conn(), rec.aux()),
        (meta.tag, meta.flags, meta.conn, meta.aux)
    );
    for (i, &b) in rec.payload().iter().enumerate() {
        prop_assert_eq!(b, payload_byte(want.id, i), "record {} byte {}", want.id, i);
    }
    Ok(())
}

fn run_model<S: RingStorage + Clone>(
    ring: S,
    ops: &[Op],
    cov: &mut Coverage,
) -> Result<(), TestCaseError> {
    let cap = ring.capacity() as u64;
    let mut tx = Producer::new(ring.clone()).unwrap();
    let mut rx = Consumer::new(ring).unwrap();
    let mut m = Model {
        cap,
        head: 0,
        tail: 0,
        queue: VecDeque::new(),
        published: 0,
        next_id: 0,
    };
    for op in ops {
        match op {
            Op::Reserve { len, then } => check_reservation(&mut tx, &mut m, cov, *len, None, then)?,
            Op::ReserveUpTo { min, max, then } => {
                check_reservation(&mut tx, &mut m, cov, *min, Some(*max), then)?
            }
            Op::Publish => {
                tx.publish();
                m.published = m.queue.len();
            }
            Op::Read { n } => {
                let mut it = rx.records().unwrap();
                let take = (*n).min(m.published);
                for want in m.queue.iter().take(take) {
                    let rec = it.next().expect("model has a record here").unwrap();
                    check_record(&rec, want)?;
                }
                if *n >= m.published {
                    prop_assert!(it.next().is_none(), "a record beyond the published ones");
                }
                prop_assert_eq!(rx.seen_tail(), m.published_tail());
            }
            Op::Release { n } => {
                let take = (*n).min(m.published);
                let mut end = None;
                for (rec, want) in rx.records().unwrap().zip(m.queue.iter().take(take)) {
                    let rec = rec.unwrap();
                    check_record(&rec, want)?;
                    end = Some(rec.end());
                }
                if let Some(end) = end {
                    prop_assert_eq!(end, m.queue[take - 1].end());
                    rx.release(end);
                    m.queue.drain(..take);
                    m.published -= take;
                    m.head = end;
                    cov.releases += 1;
                }
                prop_assert_eq!(rx.position(), m.head);
            }
            Op::Check => {
                prop_assert_eq!(rx.has_new(), rx.seen_tail() != m.published_tail());
                prop_assert_eq!(rx.is_empty().unwrap(), m.published == 0);
                prop_assert_eq!(
                    tx.is_drained().unwrap(),
                    m.published == 0 && m.head == m.published_tail()
                );
            }
        }
    }
    // Drain: publish the rest and read every record once more.
    tx.publish();
    m.published = m.queue.len();
    let mut end = m.head;
    let mut it = rx.records().unwrap();
    for want in &m.queue {
        let rec = it.next().expect("model has a record here").unwrap();
        check_record(&rec, want)?;
        end = rec.end();
    }
    prop_assert!(it.next().is_none());
    rx.release(end);
    prop_assert!(tx.is_drained().unwrap());
    Ok(())
}

fn run_scenario(
    cap: usize,
    memfd: bool,
    ops: &[Op],
    cov: &mut Coverage,
) -> Result<(), TestCaseError> {
    if memfd {
        run_model(
            Arc::new(ShmRing::create_memfd("model", cap).unwrap()),
            ops,
            cov,
        )
    } else {
        run_model(HeapRing::new(cap).unwrap(), ops, cov)
    }
}

proptest! {
    #![proptest_config(Config { cases: 1000, failure_persistence: None, ..Config::default() })]

    #[test]
    fn interleavings_match_the_model((cap, memfd, ops) in scenario()) {
        run_scenario(cap, memfd, &ops, &mut Coverage::default())?;
    }
}

/// The model test is only as good as what it reaches: run a fixed-seed sample and check that
/// every interesting case occurred.
#[test]
fn model_reaches_every_case() {
    let mut runner = TestRunner::deterministic();
    let mut cov = Coverage::default();
    let strategy = scenario();
    for _ in 0..64 {
        let (cap, memfd, ops) = strategy.new_tree(&mut runner).unwrap().current();
        run_scenario(cap, memfd, &ops, &mut cov).unwrap();
    }
    eprintln!("{cov:?}");
    assert!(cov.commits > 1000, "{cov:?}");
    assert!(cov.short_commits > 0, "{cov:?}");
    assert!(cov.abandons > 0, "{cov:?}");
    assert!(cov.full > 0, "{cov:?}");
    assert!(cov.too_large > 0, "{cov:?}");
    assert!(cov.padding_wraps > 0, "{cov:?}");
    assert!(cov.implicit_wraps > 0, "{cov:?}");
    assert!(cov.partial_grants > 0, "{cov:?}");
    assert!(cov.releases > 0, "{cov:?}");
    assert!(cov.max_records > 0, "{cov:?}");
}

/// The two wrap forms, forced: a padding record when 16 or more bytes remain (a header), an
/// implicit wrap when fewer remain.
#[test]
fn both_wrap_forms() {
    for left in [8u64, 16, 24, 32, 1000] {
        let (mut tx, mut rx) = HeapRing::channel(4096).unwrap();
        // Fill to `left` bytes before the end with records of at most 1 KiB (no aux word),
        // release them.
        let mut fill = 4096 - left as usize;
        while fill > 0 {
            let chunk = fill.min(1024);
            tx.push(Meta::tag(1), &vec![1; chunk - RECORD_HEADER_SIZE])
                .unwrap();
            fill -= chunk;
        }
        tx.publish();
        let end = rx
            .records()
            .unwrap()
            .map(|r| r.unwrap().end())
            .last()
            .unwrap();
        assert_eq!(end, 4096 - left);
        rx.release(end);
        // A record that does not fit in `left` goes to the start.
        let big = left as usize; // reserved_size(left) > left
        let pos = tx.push(Meta::tag(3), &vec![3; big]).unwrap();
        assert_eq!(pos, 4096, "left {left}");
        tx.publish();
        let recs: Vec<_> = rx.records().unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(recs.len(), 1);
        assert_eq!(
            (recs[0].position(), recs[0].tag(), recs[0].payload()),
            (4096, 3, &vec![3; big][..])
        );
    }
}
