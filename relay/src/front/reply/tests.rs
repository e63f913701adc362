//! `push_batch` against records a hostile worker could write: every way an entry can lie is
//! refused, with only the whole replies before it kept.

use shm_ring::{HeapRing, Meta};
use shmrelay_worker::protocol::{flags, tag, BATCH_ENTRY_HEADER};
use shmrelay_worker::Codec;

use super::{push_batch, Group};

/// An entry: body length, low 32 bits of its position, body.
fn entry(len: u32, pos: u64, body: &[u8]) -> Vec<u8> {
    let mut v = len.to_le_bytes().to_vec();
    v.extend_from_slice(&(pos as u32).to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// Runs `push_batch` on one SEND record of `payload`; returns the result and every byte the
/// group would write (flushed groups first), and the number of flushes.
fn run(
    codec: Codec,
    flag: u16,
    aux: u64,
    payload: &[u8],
) -> (Result<(), &'static str>, Vec<u8>, usize) {
    let (mut tx, mut rx) = HeapRing::channel(1 << 20).unwrap();
    let mut g = tx.reserve(payload.len()).unwrap();
    g[..payload.len()].copy_from_slice(payload);
    g.commit(
        payload.len(),
        Meta::tag(tag::SEND).conn(1).aux(aux).flags(flag),
    );
    tx.publish();
    let rec = rx.records().unwrap().next().unwrap().unwrap();
    let mut group = Group::new();
    let mut wire = Vec::new();
    let mut flushes = 0;
    let r = push_batch(codec, &rec, &mut group, |g| {
        wire.extend(bytes(g));
        g.clear();
        flushes += 1;
    });
    wire.extend(bytes(&mut group));
    (r, wire, flushes)
}

fn bytes(g: &mut Group) -> Vec<u8> {
    let mut out = Vec::new();
    for v in g.iovecs() {
        // SAFETY: the group's iovecs point to its own buffers or to the ring record, which
        // the test keeps alive until after this copy.
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
        });
    }
    out
}

fn framed(codec: Codec, bodies: &[&[u8]]) -> Vec<u8> {
    bodies.iter().flat_map(|b| codec.encode(b)).collect()
}

#[test]
fn entries_are_framed_by_the_front_in_one_pass() {
    let big = vec![9u8; 600];
    let mut p = entry(3, 100, b"abc");
    p.extend(entry(0, 100, b""));
    p.extend(entry(600, 180, &big));
    for codec in [Codec::LengthPrefixed, Codec::Line] {
        let (r, wire, _) = run(codec, flags::BATCH, 180, &p);
        assert_eq!(r, Ok(()));
        assert_eq!(wire, framed(codec, &[b"abc", b"", &big]));
    }
}

#[test]
fn small_replies_of_a_batch_are_one_iovec() {
    let mut p = Vec::new();
    for i in 0..16u64 {
        p.extend(entry(64, 1000 + i * 68, &[i as u8; 64]));
    }
    let (mut tx, mut rx) = HeapRing::channel(1 << 16).unwrap();
    tx.push(
        Meta::tag(tag::SEND)
            .conn(1)
            .aux(1000 + 15 * 68)
            .flags(flags::BATCH),
        &p,
    )
    .unwrap();
    tx.publish();
    let rec = rx.records().unwrap().next().unwrap().unwrap();
    let mut g = Group::new();
    push_batch(Codec::LengthPrefixed, &rec, &mut g, |_| panic!("no flush")).unwrap();
    assert_eq!(g.iovecs().len(), 1);
    assert_eq!(g.messages, 16);
}

#[test]
fn a_full_group_is_flushed_in_the_middle_of_a_record() {
    let body = vec![1u8; 4096];
    let mut p = Vec::new();
    let bodies: Vec<&[u8]> = (0..40).map(|_| &body[..]).collect();
    for i in 0..40u64 {
        p.extend(entry(4096, 10 + i, &body));
    }
    let (r, wire, flushes) = run(Codec::LengthPrefixed, flags::BATCH, 49, &p);
    assert_eq!(r, Ok(()));
    assert!(flushes >= 1);
    assert!(wire == framed(Codec::LengthPrefixed, &bodies));
}

#[test]
fn lies_break_the_record_after_the_whole_replies_before_them() {
    let ok = entry(2, 50, b"ok");
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        // An entry longer than what is left of the record.
        (
            "longer",
            [ok.clone(), entry(0x7fff_ffff, 60, b"xx")].concat(),
            60,
        ),
        // An entry header cut off by the record's end.
        ("cut", [ok.clone(), vec![1, 0, 0]].concat(), 50),
        // Positions going backwards.
        (
            "order",
            [entry(2, 60, b"ok"), entry(1, 50, b"x")].concat(),
            60,
        ),
        // The last entry not at the record's position (it claims an earlier one).
        ("last", [ok.clone(), entry(1, 55, b"x")].concat(), 60),
        // A position above the record's aux (a wrap of the low half).
        ("above", [ok.clone(), entry(1, 61, b"x")].concat(), 60),
    ];
    for (what, p, aux) in cases {
        let (r, wire, _) = run(Codec::LengthPrefixed, flags::BATCH, aux, &p);
        assert!(r.is_err(), "{what}: accepted");
        // Whole replies only: those before the lie (the last entry's position is known to be
        // wrong only at the end of the record).
        let whole: &[&[u8]] = if what == "last" {
            &[b"ok", b"x"]
        } else {
            &[b"ok"]
        };
        assert_eq!(wire, framed(Codec::LengthPrefixed, whole), "{what}");
    }
}

#[test]
fn a_position_below_the_record_start_is_refused() {
    // Low halves that would put the first entry more than `aux` below it.
    let p = entry(1, 1u64 << 32 | 5, b"x");
    let (r, wire, _) = run(Codec::LengthPrefixed, flags::BATCH, 4, &p);
    assert!(r.is_err());
    assert!(wire.is_empty());
}

#[test]
fn batches_where_they_cannot_be_are_refused() {
    let p = entry(1, 7, b"x");
    assert!(run(Codec::Resp, flags::BATCH, 7, &p).0.is_err());
    assert!(
        run(Codec::LengthPrefixed, flags::BATCH | flags::MORE, 7, &p)
            .0
            .is_err()
    );
    assert!(run(Codec::LengthPrefixed, flags::BATCH, 7, &[]).0.is_err());
    assert_eq!(BATCH_ENTRY_HEADER, 8);
}
