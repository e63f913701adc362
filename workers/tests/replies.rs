//! Issue 12.9 at the SDK level: a reply longer than a ring record is split over records the
//! front can put back together, and a reply that cannot be sent is answered with the codec's
//! error reply instead of nothing.

use std::time::{Duration, Instant};

use shmrelay_worker::protocol::{flags, tag, SPLIT_HEADER};
use shmrelay_worker::testing::{self, FakeFront};
use shmrelay_worker::{Codec, ConnId, Handler, Out};

const CAP: usize = 1 << 16;

struct Replies;

impl Handler for Replies {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _: bool, out: &mut Out<'_>) {
        let n: usize = std::str::from_utf8(frame).unwrap().trim().parse().unwrap();
        let body: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        // Ignored on purpose: the SDK must answer a failed reply itself.
        let _ = out.send(conn, &body);
    }
}

/// A worker on fresh rings, serving in a thread until `stop` is dropped.
fn start(codec: Codec, max_reply: Option<usize>) -> (FakeFront, std::sync::mpsc::Sender<()>) {
    let (mut w, front) = testing::attach(0, codec, CAP);
    if let Some(m) = max_reply {
        w.set_max_reply(m);
    }
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        while rx.try_recv() == Err(std::sync::mpsc::TryRecvError::Empty) {
            if w.poll_once(&mut Replies).unwrap() == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });
    (front, tx)
}

fn conn() -> ConnId {
    ConnId::new(0, 1, 5)
}

/// Sends one request frame; returns the request position its reply must carry.
fn request(f: &mut FakeFront, codec: Codec, text: &str) -> u64 {
    // An inline command for `resp`.
    let text = if codec == Codec::Resp {
        format!("{text}\r\n")
    } else {
        text.to_owned()
    };
    f.push(tag::DATA, conn(), 0, &codec.encode(text.as_bytes()))
}

/// Reads SEND messages like the front, until one without MORE: (message, records, aux seen).
fn reply(f: &mut FakeFront) -> (Vec<u8>, usize, Vec<u64>) {
    let mut msg = Vec::new();
    let mut total = None;
    let mut records = 0;
    let mut auxes = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < end, "no whole reply within 20 s");
        for r in f.replies() {
            assert_eq!(r.tag, tag::SEND);
            assert_eq!(r.conn, conn());
            let mut body = r.body;
            if records == 0 && r.flags & flags::MORE != 0 {
                let t = u64::from_le_bytes(body[..SPLIT_HEADER].try_into().unwrap());
                total = Some(t as usize);
                body.drain(..SPLIT_HEADER);
            }
            msg.extend(body);
            records += 1;
            auxes.push(r.aux);
            if r.flags & flags::MORE == 0 {
                if let Some(t) = total {
                    assert_eq!(t, msg.len(), "split header disagrees with the pieces");
                }
                return (msg, records, auxes);
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

#[test]
fn a_reply_longer_than_the_ring_is_split_and_whole() {
    let (mut f, _stop) = start(Codec::LengthPrefixed, None);
    let max = f.req.max_payload();
    for n in [10, max - 100, max, 3 * CAP + 17] {
        let at = request(&mut f, Codec::LengthPrefixed, &n.to_string());
        let (msg, records, auxes) = reply(&mut f);
        let want: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        assert_eq!(msg.len(), n);
        assert!(msg == want, "reply of {n} bytes differs");
        // Each piece says which request it answers.
        assert!(auxes.iter().all(|&a| a == at), "{auxes:?} vs {at}");
        if n <= max {
            assert_eq!(records, 1);
        } else {
            assert!(records >= n / max, "{records} records for {n} bytes");
        }
    }
}

#[test]
fn a_reply_that_cannot_be_sent_is_answered_with_an_error() {
    for codec in Codec::ALL {
        let (mut f, _stop) = start(codec, Some(1000));
        request(&mut f, codec, "2000");
        let (msg, records, _) = reply(&mut f);
        assert_eq!(records, 1);
        assert_eq!(
            msg,
            codec.error_body("reply failed: reply of 2000 bytes exceeds the maximum of 1000"),
            "{codec}: {}",
            String::from_utf8_lossy(&msg)
        );
        // The next frame is answered normally: nothing shifted.
        request(&mut f, codec, "3");
        assert_eq!(reply(&mut f).0, [0, 1, 2]);
    }
}
