//! The cluster worker's logic against an in-process front (`shmrelay_worker::testing`) and a
//! channel standing in for the NATS thread: what it answers, what it asks of NATS, and what
//! it does with NATS's events, connected or not.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use shmrelay_cluster::bridge::{Command, Event, PushOutcome};
use shmrelay_cluster::counters::{state, Counters};
use shmrelay_cluster::Node;
use shmrelay_worker::protocol::tag;
use shmrelay_worker::testing::{attach, FakeFront};
use shmrelay_worker::{Codec, ConnId, Worker};
use tokio::sync::mpsc;

struct Rig {
    worker: Worker,
    front: FakeFront,
    node: Node,
    commands: mpsc::Receiver<Command>,
    counters: Arc<Counters>,
}

fn rig() -> Rig {
    let (worker, front) = attach(0, Codec::LengthPrefixed, 1 << 16);
    let (tx, commands) = mpsc::channel(64);
    let counters = Arc::new(Counters::default());
    let node = Node::new("n1", 0, tx, counters.clone());
    Rig {
        worker,
        front,
        node,
        commands,
        counters,
    }
}

impl Rig {
    fn open(&mut self, conn: ConnId) {
        self.front.push(tag::OPEN, conn, 0, b"peer");
        self.worker.poll_once(&mut self.node).unwrap();
    }

    fn say(&mut self, conn: ConnId, text: &str) {
        self.front.push(
            tag::DATA,
            conn,
            0,
            &Codec::LengthPrefixed.encode(text.as_bytes()),
        );
        self.worker.poll_once(&mut self.node).unwrap();
    }

    fn close(&mut self, conn: ConnId) {
        self.front.push(tag::CLOSE, conn, 0, b"");
        self.worker.poll_once(&mut self.node).unwrap();
    }

    fn event(&mut self, event: Event) {
        let node = &mut self.node;
        self.worker.with_out(|out| node.on_event(event, out));
    }

    /// Frames sent to connections since the last call, as (conn, text); closes left out.
    fn sent(&mut self) -> Vec<(ConnId, String)> {
        self.front
            .replies()
            .into_iter()
            .filter(|r| r.tag == tag::SEND)
            .map(|r| (r.conn, String::from_utf8(r.body).unwrap()))
            .collect()
    }

    fn asked(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(c) = self.commands.try_recv() {
            v.push(format!("{c:?}"));
        }
        v
    }
}

const A: ConnId = ConnId::new(0, 1, 1);
const B: ConnId = ConnId::new(0, 1, 2);

#[test]
fn interest_follows_local_subscribers() {
    let mut r = rig();
    r.open(A);
    r.open(B);
    r.say(A, "sub news");
    r.say(B, "sub news");
    assert_eq!(r.sent(), [(A, "ok".into()), (B, "ok".into())]);
    let asked = r.asked();
    assert_eq!(
        asked.iter().filter(|c| c.starts_with("Subscribe")).count(),
        1,
        "one NATS subscription per topic: {asked:?}"
    );
    r.say(A, "unsub news");
    assert!(!r.asked().iter().any(|c| c.starts_with("Unsubscribe")));
    r.close(B);
    assert!(r.asked().iter().any(|c| c.starts_with("Unsubscribe")));
}

#[test]
fn publishing_while_nats_is_down_delivers_locally_and_says_so() {
    let mut r = rig();
    r.open(A);
    r.open(B);
    r.say(A, "sub t");
    r.say(B, "sub t");
    r.sent();
    r.say(A, "pub t hello");
    let mut sent = r.sent();
    let reply = sent.pop().unwrap();
    assert_eq!(
        reply,
        (
            A,
            "err cluster unavailable (2 delivered on this worker)".to_owned()
        )
    );
    sent.sort();
    assert_eq!(sent, [(A, "t hello".to_owned()), (B, "t hello".to_owned())]);
    assert_eq!(r.counters.errors.load(Ordering::Relaxed), 1);
    r.counters.state.store(state::CONNECTED, Ordering::Relaxed);
    r.say(B, "pub t again");
    let sent = r.sent();
    assert_eq!(sent.last().unwrap(), &(B, "ok 2".to_owned()));
    assert!(r.asked().iter().any(|c| c.starts_with("Publish")));
}

#[test]
fn pushes_ids_and_reply_order() {
    let mut r = rig();
    r.open(A);
    r.open(B);
    r.say(A, "whoami");
    assert_eq!(r.sent(), [(A, "id n1/0/0.1.1".to_owned())]);
    // To a connection of this very worker: no NATS needed.
    r.say(A, "push n1/0/0.2.1 hi");
    assert_eq!(r.sent(), [(B, "hi".to_owned()), (A, "ok".to_owned())]);
    r.close(B);
    r.sent();
    r.say(A, "push n1/0/0.2.1 hi");
    assert_eq!(r.sent(), [(A, "err gone n1/0/0.2.1".to_owned())]);
    r.say(A, "push nonsense hi");
    assert_eq!(r.sent(), [(A, "err bad id nonsense".to_owned())]);
    // Another node while NATS is down: an error at once.
    r.say(A, "push n2/0/0.2.1 hi");
    assert_eq!(
        r.sent(),
        [(A, "err cluster unavailable n2/0/0.2.1".to_owned())]
    );
    // Connected: the reply waits for the round trip, and holds the next one behind it.
    r.counters.state.store(state::CONNECTED, Ordering::Relaxed);
    r.say(A, "push n2/0/0.2.1 hi");
    r.say(A, "whoami");
    assert!(r.sent().is_empty(), "replies held behind the push");
    let asked = r.asked();
    let token: u64 = asked
        .iter()
        .find(|c| c.starts_with("Push"))
        .and_then(|c| c.split("token: ").nth(1))
        .and_then(|t| t.split(',').next())
        .and_then(|t| t.parse().ok())
        .expect("a Push command");
    r.event(Event::PushDone {
        token,
        outcome: PushOutcome::Unknown,
    });
    assert_eq!(
        r.sent(),
        [
            (A, "err unknown n2/0/0.2.1".to_owned()),
            (A, "id n1/0/0.1.1".to_owned())
        ]
    );
}

#[test]
fn events_from_nats_reach_local_connections() {
    let mut r = rig();
    r.open(A);
    r.open(B);
    r.say(A, "sub t");
    r.say(B, "presence t");
    r.sent();
    r.event(Event::Topic {
        topic: b"t".to_vec(),
        payload: b"from afar".to_vec(),
    });
    r.event(Event::Presence {
        topic: b"t".to_vec(),
        event: b"join t n2/0/0.9.1".to_vec(),
    });
    assert_eq!(
        r.sent(),
        [
            (A, "t from afar".to_owned()),
            (B, "join t n2/0/0.9.1".to_owned())
        ]
    );
    r.asked();
    r.event(Event::PushIn {
        payload: b"n1/0/0.1.1 direct".to_vec(),
        reply: Some("_INBOX.x".into()),
    });
    r.event(Event::PushIn {
        payload: b"n1/0/0.7.1 direct".to_vec(),
        reply: Some("_INBOX.y".into()),
    });
    assert_eq!(r.sent(), [(A, "direct".to_owned())]);
    let asked = r.asked();
    assert!(
        asked[0].contains("_INBOX.x") && asked[0].contains("[111, 107]"),
        "{asked:?}"
    ); // "ok"
    assert!(
        asked[1].contains("_INBOX.y") && asked[1].contains("[103, 111, 110, 101]"),
        "{asked:?}"
    ); // "gone"
    r.event(Event::WhoAsk {
        topic: b"t".to_vec(),
        reply: "_INBOX.z".into(),
    });
    let asked = r.asked();
    let members = "n1/0/0.1.1".as_bytes();
    assert!(asked[0].contains(&format!("{members:?}")), "{asked:?}");
}
