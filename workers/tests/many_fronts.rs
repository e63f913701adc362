//! A worker of a relay with many fronts (issue 15): `poll_once` skips the fronts with nothing
//! new and publishes only the reply rings written to; neither may lose a request or a reply.

use shmrelay_worker::examples::Echo;
use shmrelay_worker::protocol::tag;
use shmrelay_worker::testing::{self, FakeFront};
use shmrelay_worker::{Codec, ConnId, Handler, Out, Worker};

const CAP: usize = 1 << 16;
/// Fronts attached: low ones, and some from 63 on (published together by the SDK).
const FRONTS: [u8; 5] = [0, 1, 7, 64, 70];

/// Echoes each frame, and pushes `to <front>` to a connection of every other front.
struct Fanout;

impl Handler for Fanout {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _: bool, out: &mut Out<'_>) {
        out.send(conn, frame).unwrap();
        for f in FRONTS.into_iter().filter(|&f| f as usize != conn.front()) {
            let msg = format!("to {f}");
            out.send(ConnId::new(f, 1, 9), msg.as_bytes()).unwrap();
        }
    }
}

fn worker() -> (Worker, Vec<FakeFront>) {
    let (mut w, front0) = testing::attach(0, Codec::LengthPrefixed, CAP);
    let mut fronts = vec![front0];
    for f in &FRONTS[1..] {
        fronts.push(testing::attach_front(&mut w, *f as usize, CAP));
    }
    (w, fronts)
}

fn bodies(front: &mut FakeFront) -> Vec<Vec<u8>> {
    front.replies().into_iter().map(|r| r.body).collect()
}

#[test]
fn replies_and_pushes_reach_every_front_they_were_written_to() {
    let (mut w, mut fronts) = worker();
    // One frame from each front, in turn: every reply ring gets one echo and pushes.
    for (i, f) in FRONTS.into_iter().enumerate() {
        let conn = ConnId::new(f, 1, 5);
        fronts[i].push(tag::DATA, conn, 0, &Codec::LengthPrefixed.encode(b"hi"));
        assert_eq!(w.poll_once(&mut Fanout).unwrap(), 1);
        for (j, g) in FRONTS.into_iter().enumerate() {
            let got = bodies(&mut fronts[j]);
            let want: Vec<Vec<u8>> = if j == i {
                vec![b"hi".to_vec()]
            } else {
                vec![format!("to {g}").into_bytes()]
            };
            assert_eq!(got, want, "front {g} after a frame from front {f}");
        }
    }
    // Nothing waiting anywhere: nothing handled, nothing published.
    assert_eq!(w.poll_once(&mut Fanout).unwrap(), 0);
    for front in &mut fronts {
        assert!(front.replies().is_empty());
    }
    // Outside a frame too.
    w.with_out(|out| {
        out.send(ConnId::new(70, 1, 9), b"tick").unwrap();
        out.send(ConnId::new(7, 1, 9), b"tock").unwrap();
    });
    assert_eq!(bodies(&mut fronts[4]), vec![b"tick".to_vec()]);
    assert_eq!(bodies(&mut fronts[2]), vec![b"tock".to_vec()]);
    assert!(fronts[3].replies().is_empty());
}

#[test]
fn a_batch_cut_short_is_finished_by_the_next_poll() {
    let (mut w, mut fronts) = worker();
    // More records than one batch (256) from one front, published at once: the rest must be
    // handled by the next poll although nothing new was published meanwhile.
    let conn = ConnId::new(7, 1, 5);
    for i in 0..300u32 {
        fronts[2].push(
            tag::DATA,
            conn,
            0,
            &Codec::LengthPrefixed.encode(&i.to_le_bytes()),
        );
    }
    let mut handled = 0;
    for _ in 0..4 {
        handled += w.poll_once(&mut Echo).unwrap();
    }
    assert_eq!(handled, 300);
    let got = bodies(&mut fronts[2]);
    assert_eq!(got.len(), 300);
    for (i, b) in got.iter().enumerate() {
        assert_eq!(b[..], (i as u32).to_le_bytes());
    }
}
