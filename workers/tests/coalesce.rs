//! Issue 14 at the SDK level: replies to a pipelined batch of one connection's frames go out as
//! one coalesced record whose entries still carry each request's position, anything else ends
//! the run, and reservations are written in place and committed or abandoned.

use shmrelay_worker::protocol::{flags, tag};
use shmrelay_worker::testing::{self, FakeFront, Reply};
use shmrelay_worker::{Codec, ConnId, Handler, Out};

const CAP: usize = 1 << 16;
/// A reservation longer than a record of a 1 MiB ring.
const BIG: usize = 600_000;

fn conn(slot: u32) -> ConnId {
    ConnId::new(0, 1, slot)
}

/// One DATA record holding `frames` (as a read from the socket would), and the request
/// position each frame ends at.
fn push_frames(f: &mut FakeFront, c: ConnId, frames: &[&[u8]]) -> Vec<u64> {
    let mut wire = Vec::new();
    let mut ends = Vec::new();
    for fr in frames {
        wire.extend(Codec::LengthPrefixed.encode(fr));
        ends.push(wire.len() as u64);
    }
    let end = f.push(tag::DATA, c, 0, &wire);
    let start = end - wire.len() as u64;
    ends.iter().map(|e| start + e).collect()
}

/// Every reply record as published: (tag, flags, aux, payload length).
fn records(f: &mut FakeFront) -> Vec<(u16, u16, u64)> {
    let mut got = Vec::new();
    for rec in f.rep.records().unwrap() {
        let rec = rec.unwrap();
        got.push((rec.tag(), rec.flags(), rec.aux()));
    }
    got
}

/// Echoes each frame; `push` also pushes `p` to connection 9 before replying; `twice` replies
/// two times.
struct Script;

impl Handler for Script {
    fn on_frame(&mut self, c: ConnId, frame: &[u8], _: bool, out: &mut Out<'_>) {
        match frame {
            b"push" => {
                out.send(conn(9), b"pushed").unwrap();
                out.send(c, b"push").unwrap();
            }
            b"twice" => {
                out.send(c, b"one").unwrap();
                out.send(c, b"two").unwrap();
            }
            b"reserve" => {
                let mut r = out.reserve(c, 100).unwrap();
                r[..8].copy_from_slice(b"reserved");
                r.commit(8).unwrap();
            }
            b"abandon" => {
                let mut r = out.reserve(c, 100).unwrap();
                r[..4].copy_from_slice(b"lost");
                drop(r);
                out.send(c, b"after").unwrap();
            }
            b"close" => out.close(c).unwrap(),
            other => out.send(c, other).unwrap(),
        }
    }
}

fn bodies(replies: &[Reply]) -> Vec<(u16, u64, Vec<u8>)> {
    replies
        .iter()
        .map(|r| (r.tag, r.conn.raw(), r.body.clone()))
        .collect()
}

#[test]
fn a_pipelined_batch_is_one_record_carrying_every_position() {
    let (mut w, mut f) = testing::attach(0, Codec::LengthPrefixed, CAP);
    let frames: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 64]).collect();
    let refs: Vec<&[u8]> = frames.iter().map(|v| &v[..]).collect();
    let ends = push_frames(&mut f, conn(1), &refs);
    w.poll_once(&mut Script).unwrap();
    let recs = records(&mut f);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0], (tag::SEND, flags::BATCH, ends[15]));
    let replies = f.replies();
    assert_eq!(replies.len(), 16);
    for (i, r) in replies.iter().enumerate() {
        assert_eq!((r.conn, r.aux, &r.body), (conn(1), ends[i], &frames[i]));
    }
}

#[test]
fn four_kib_replies_coalesce_in_place() {
    let (mut w, mut f) = testing::attach(0, Codec::LengthPrefixed, 1 << 20);
    let frames: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 4096]).collect();
    let refs: Vec<&[u8]> = frames.iter().map(|v| &v[..]).collect();
    let ends = push_frames(&mut f, conn(1), &refs);
    w.poll_once(&mut Script).unwrap();
    assert_eq!(records(&mut f).len(), 1);
    let replies = f.replies();
    let got: Vec<_> = replies.iter().map(|r| (r.aux, r.body.clone())).collect();
    let want: Vec<_> = ends.iter().copied().zip(frames).collect();
    assert!(got == want);
}

#[test]
fn other_records_end_the_run_and_keep_their_order() {
    let (mut w, mut f) = testing::attach(0, Codec::LengthPrefixed, CAP);
    let ends = push_frames(
        &mut f,
        conn(1),
        &[b"a", b"twice", b"push", b"b", b"close", b"c"],
    );
    w.poll_once(&mut Script).unwrap();
    let recs = records(&mut f);
    let (s, b, c) = (tag::SEND, flags::BATCH, tag::CLOSE);
    assert_eq!(
        recs,
        [
            (s, b, ends[1]), // a, one, two
            (s, 0, ends[2]), // the push to another connection
            (s, b, ends[3]), // push, b
            (c, 0, 0),       // close
            (s, b, ends[5]), // c
        ]
    );
    let r = f.replies();
    let (one, nine) = (conn(1).raw(), conn(9).raw());
    assert_eq!(
        bodies(&r),
        [
            (s, one, b"a".to_vec()),
            (s, one, b"one".to_vec()),
            (s, one, b"two".to_vec()),
            (s, nine, b"pushed".to_vec()),
            (s, one, b"push".to_vec()),
            (s, one, b"b".to_vec()),
            (c, one, vec![]),
            (s, one, b"c".to_vec()),
        ]
    );
    // Two replies to one request carry its position; the push carries the request it was
    // made in.
    let aux: Vec<u64> = r.iter().map(|r| r.aux).collect();
    assert_eq!(
        aux,
        [ends[0], ends[1], ends[1], ends[2], ends[2], ends[3], 0, ends[5]]
    );
}

#[test]
fn runs_do_not_cross_connections() {
    let (mut w, mut f) = testing::attach(0, Codec::Line, CAP);
    let mut ends = Vec::new();
    for (c, text) in [(1, "x\ny\n"), (2, "z\n"), (1, "w\n")] {
        ends.push(f.push(tag::DATA, conn(c), 0, text.as_bytes()));
    }
    w.poll_once(&mut Script).unwrap();
    let recs = records(&mut f);
    assert_eq!(recs.len(), 3, "{recs:?}");
    let r = f.replies();
    let got: Vec<_> = r.iter().map(|r| (r.conn, r.body.clone())).collect();
    assert_eq!(
        got,
        [
            (conn(1), b"x".to_vec()),
            (conn(1), b"y".to_vec()),
            (conn(2), b"z".to_vec()),
            (conn(1), b"w".to_vec()),
        ]
    );
    assert_eq!(r[1].aux, ends[0]);
}

#[test]
fn resp_replies_are_not_coalesced() {
    let (mut w, mut f) = testing::attach(0, Codec::Resp, CAP);
    f.push(tag::DATA, conn(1), 0, b"PING\r\nPING\r\n");
    w.poll_once(&mut shmrelay_worker::kv::Kv::default())
        .unwrap();
    let recs = records(&mut f);
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(recs.iter().all(|r| r.1 & flags::BATCH == 0));
}

#[test]
fn reservations_commit_in_place_or_abandon() {
    let (mut w, mut f) = testing::attach(0, Codec::LengthPrefixed, CAP);
    let ends = push_frames(&mut f, conn(1), &[b"reserve", b"abandon", b"x"]);
    w.poll_once(&mut Script).unwrap();
    let r = f.replies();
    let got: Vec<_> = r.iter().map(|r| (r.aux, r.body.clone())).collect();
    assert_eq!(
        got,
        [
            (ends[0], b"reserved".to_vec()),
            (ends[1], b"after".to_vec()),
            (ends[2], b"x".to_vec()),
        ]
    );
}

/// A reservation outside a frame (a push from `on_open`) is a plain record; one larger than a
/// ring record is split; committing more than was reserved fails and sends nothing.
#[test]
fn reservations_outside_a_run() {
    struct Opener;
    impl Handler for Opener {
        fn on_open(&mut self, c: ConnId, _: &str, out: &mut Out<'_>) {
            let mut r = out.reserve(c, 10).unwrap();
            r[..5].copy_from_slice(b"hello");
            assert!(matches!(
                r.commit(11),
                Err(shmrelay_worker::SendError::TooLarge { .. })
            ));
            let mut r = out.reserve(c, 10).unwrap();
            r[..5].copy_from_slice(b"hello");
            r.commit(5).unwrap();
            let mut r = out.reserve(c, BIG).unwrap();
            r.fill(7);
            r.commit(BIG).unwrap();
        }
        fn on_frame(&mut self, _: ConnId, _: &[u8], _: bool, _: &mut Out<'_>) {}
    }
    // Room for the long reply's pieces: nothing reads the ring while the worker writes.
    let (mut w, mut f) = testing::attach(0, Codec::LengthPrefixed, 1 << 20);
    assert!(BIG > f.req.max_payload());
    f.push(tag::OPEN, conn(1), 0, b"peer");
    w.poll_once(&mut Opener).unwrap();
    let r = f.replies();
    assert_eq!((r[0].flags, &r[0].body[..]), (0, &b"hello"[..]));
    // The long one: pieces flagged MORE, the first led by the whole length.
    let mut msg = Vec::new();
    for p in &r[1..] {
        msg.extend_from_slice(&p.body);
    }
    assert!(r[1].flags & flags::MORE != 0);
    assert_eq!(msg.len(), BIG + 8);
    assert!(msg[8..].iter().all(|&b| b == 7));
}
