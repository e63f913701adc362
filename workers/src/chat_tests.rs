//! The chat worker's unit tests: a real `Worker` of a websocket listener on fake rings
//! ([`crate::testing`]), text messages written as a front writes them, replies read as a front
//! reads them (each must be a text message).

use serde_json::{json, Value};

use super::*;
use crate::codec::websocket::{opcode, write_header, MAX_HEADER};
use crate::protocol::{flags, tag};
use crate::testing::{attach, FakeFront};
use crate::{Codec, Worker};

struct Bench {
    worker: Worker,
    front: FakeFront,
    chat: Chat,
}

fn conn(slot: u32) -> ConnId {
    ConnId::new(0, 1, slot)
}

impl Bench {
    fn new(limits: ChatLimits) -> Bench {
        let (worker, front) = attach(0, Codec::WebSocket, 1 << 20);
        Bench {
            worker,
            front,
            chat: Chat::new(limits),
        }
    }

    fn poll(&mut self) {
        while self.worker.poll_once(&mut self.chat).unwrap() > 0 {}
    }

    fn open(&mut self, c: ConnId) {
        self.front.push(tag::OPEN, c, 0, b"127.0.0.1:1");
        self.poll();
    }

    fn send(&mut self, c: ConnId, msg: &str) {
        // A DATA record holds the message's frame as the front leaves it (unmasked in place).
        let mut h = [0u8; MAX_HEADER];
        let n = write_header(&mut h, true, opcode::TEXT, msg.len() as u64, Some([0; 4]));
        self.front
            .push(tag::DATA, c, 0, &[&h[..n], msg.as_bytes()].concat());
        self.poll();
    }

    fn close(&mut self, c: ConnId) {
        self.front
            .push(tag::CLOSE, c, CloseReason::ClientEof as u64, b"");
        self.poll();
    }

    /// Every SEND record published so far, as (connection, JSON), in ring order.
    fn replies(&mut self) -> Vec<(ConnId, Value)> {
        let mut got = Vec::new();
        let mut end = None;
        for rec in self.front.rep.records().unwrap() {
            let rec = rec.unwrap();
            end = Some(rec.end());
            if rec.tag() == tag::SEND {
                assert_ne!(rec.flags() & flags::TEXT, 0, "a text message");
                let v: Value = serde_json::from_slice(&rec.payload_to_vec()).unwrap();
                got.push((ConnId::from_raw(rec.conn()), v));
            }
        }
        if let Some(e) = end {
            self.front.rep.release(e);
        }
        got
    }

    /// Replies, asserting they all go to `c`.
    fn replies_to(&mut self, c: ConnId) -> Vec<Value> {
        self.replies()
            .into_iter()
            .map(|(to, v)| {
                assert_eq!(to, c, "unexpected reply {v}");
                v
            })
            .collect()
    }
}

fn join(room: &str, name: &str) -> String {
    json!({"type": "join", "room": room, "name": name}).to_string()
}

fn say(room: &str, text: &str) -> String {
    json!({"type": "say", "room": room, "text": text}).to_string()
}

fn error_code(v: &Value) -> &str {
    assert_eq!(v["type"], "error", "{v}");
    v["code"].as_str().unwrap()
}

#[test]
fn members_of_a_room_get_each_message_in_the_same_order() {
    let mut b = Bench::new(ChatLimits::default());
    let (ada, bob) = (conn(1), conn(2));
    b.open(ada);
    b.open(bob);
    b.send(ada, &join("lobby", "ada"));
    let r = b.replies_to(ada);
    assert_eq!(
        r,
        vec![
            json!({"type": "joined", "room": "lobby", "name": "ada", "members": ["ada"], "history": []})
        ]
    );
    b.send(bob, &join("lobby", "bob"));
    let r = b.replies();
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].0, bob);
    assert_eq!(r[0].1["members"], json!(["ada", "bob"]));
    assert_eq!(
        r[1],
        (
            ada,
            json!({"type": "presence", "room": "lobby", "name": "bob", "event": "join"})
        )
    );
    b.send(ada, &say("lobby", "hi bob"));
    b.send(bob, &say("lobby", "hi ada"));
    let r = b.replies();
    let msg = |from: &str, text: &str, id: u64| json!({"type": "message", "room": "lobby", "from": from, "text": text, "id": id});
    let for_ada: Vec<_> = r
        .iter()
        .filter(|(c, _)| *c == ada)
        .map(|x| x.1.clone())
        .collect();
    let for_bob: Vec<_> = r
        .iter()
        .filter(|(c, _)| *c == bob)
        .map(|x| x.1.clone())
        .collect();
    let both = vec![msg("ada", "hi bob", 0), msg("bob", "hi ada", 1)];
    assert_eq!(for_ada, both);
    assert_eq!(for_bob, both);
}

#[test]
fn a_joiner_gets_the_last_n_messages_oldest_first() {
    let mut b = Bench::new(ChatLimits {
        history: 3,
        ..ChatLimits::default()
    });
    let (ada, cy) = (conn(1), conn(3));
    b.send(ada, &join("r", "ada"));
    for i in 0..5 {
        b.send(ada, &say("r", &format!("m{i}")));
    }
    b.replies();
    b.send(cy, &join("r", "cy"));
    let r = b.replies();
    let joined = &r[0].1;
    assert_eq!(r[0].0, cy);
    let texts: Vec<_> = joined["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m2", "m3", "m4"]);
    assert_eq!(joined["history"][0]["from"], "ada");
}

#[test]
fn leaving_and_closing_tell_the_others_and_end_membership() {
    let mut b = Bench::new(ChatLimits::default());
    let (ada, bob, cy) = (conn(1), conn(2), conn(3));
    for (c, n) in [(ada, "ada"), (bob, "bob"), (cy, "cy")] {
        b.send(c, &join("r", n));
    }
    b.replies();
    b.send(bob, r#"{"type":"leave","room":"r"}"#);
    let r = b.replies();
    let presence = json!({"type": "presence", "room": "r", "name": "bob", "event": "leave"});
    assert!(r.contains(&(ada, presence.clone())), "{r:?}");
    assert!(r.contains(&(cy, presence)), "{r:?}");
    assert!(
        r.contains(&(bob, json!({"type": "left", "room": "r"}))),
        "{r:?}"
    );
    assert_eq!(r.len(), 3);
    // Bob is out: he can neither write to the room nor get its messages.
    b.send(bob, &say("r", "still here?"));
    assert_eq!(error_code(&b.replies_to(bob)[0]), "not_joined");
    b.send(ada, &say("r", "bye bob"));
    let r = b.replies();
    assert!(r.iter().all(|(c, _)| *c != bob), "{r:?}");
    assert_eq!(r.len(), 2);
    // A closed connection leaves every room it was in.
    b.send(cy, &join("other", "cy"));
    b.send(ada, &join("other", "ada"));
    b.replies();
    b.close(cy);
    let r = b.replies();
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r
        .iter()
        .all(|(c, v)| *c == ada && v["event"] == "leave" && v["name"] == "cy"));
    b.send(ada, &say("other", "alone"));
    assert_eq!(b.replies_to(ada).len(), 1);
}

#[test]
fn joining_twice_changes_nothing_but_a_new_name_sticks() {
    let mut b = Bench::new(ChatLimits::default());
    let (ada, bob) = (conn(1), conn(2));
    b.send(ada, &join("r", "ada"));
    b.send(bob, &join("r", "bob"));
    b.replies();
    b.send(bob, &join("r", "robert"));
    let r = b.replies_to(bob);
    assert_eq!(
        r[0]["members"],
        json!(["ada", "robert"]),
        "no second membership"
    );
    b.send(bob, &say("r", "hello"));
    let r = b.replies();
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|(_, v)| v["from"] == "robert"));
}

#[test]
fn bad_requests_are_answered_with_an_error_and_change_nothing() {
    let limits = ChatLimits {
        max_name: 8,
        max_text: 16,
        ..ChatLimits::default()
    };
    let mut b = Bench::new(limits);
    let ada = conn(1);
    let long_text = "x".repeat(17);
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "bad_request"),
        ("\u{0}\u{ff}".into(), "bad_request"),
        (r#"{"type":"dance"}"#.into(), "bad_request"),
        (r#"{"type":"join","room":"r"}"#.into(), "bad_request"),
        (r#"[1,2]"#.into(), "bad_request"),
        (join("", "ada"), "bad_name"),
        (join("r", ""), "bad_name"),
        (join("r", "ada\nbob"), "bad_name"),
        (join("123456789", "ada"), "bad_name"),
        (join("r", "éééé1"), "bad_name"), // 9 bytes
        (say("r", "hi"), "not_joined"),
        (say("r", ""), "too_long"),
        (say("r", &long_text), "too_long"),
    ];
    for (msg, code) in &cases {
        b.send(ada, msg);
        let r = b.replies_to(ada);
        assert_eq!(r.len(), 1, "{msg}: {r:?}");
        assert_eq!(error_code(&r[0]), *code, "{msg}: {}", r[0]);
    }
    assert_eq!(b.chat.rooms(), 0);
    b.send(ada, &join("r", "ada"));
    b.replies();
    b.send(ada, &say("r", &long_text));
    assert_eq!(error_code(&b.replies_to(ada)[0]), "too_long");
    b.send(ada, &say("r", &"é".repeat(8)));
    assert_eq!(b.replies_to(ada)[0]["text"], "é".repeat(8));
}

#[test]
fn rooms_are_bounded_per_connection_and_per_worker() {
    let mut b = Bench::new(ChatLimits {
        rooms_per_conn: 2,
        max_rooms: 3,
        ..ChatLimits::default()
    });
    let (ada, bob) = (conn(1), conn(2));
    b.send(ada, &join("a1", "ada"));
    b.send(ada, &join("a2", "ada"));
    b.send(ada, &join("a3", "ada"));
    let r = b.replies_to(ada);
    assert_eq!(error_code(&r[2]), "too_many_rooms");
    // Rejoining a room it is in is not a new room.
    b.send(ada, &join("a2", "ada"));
    assert_eq!(b.replies_to(ada)[0]["type"], "joined");
    // Bob fills the worker's last place, with history; then leaves it.
    b.send(bob, &join("b1", "bob"));
    b.send(bob, &say("b1", "kept"));
    b.send(bob, r#"{"type":"leave","room":"b1"}"#);
    b.replies();
    assert_eq!(b.chat.rooms(), 3, "an empty room keeps its history");
    b.send(bob, &join("b1", "bob"));
    assert_eq!(b.replies_to(bob)[0]["history"][0]["text"], "kept");
    b.send(bob, r#"{"type":"leave","room":"b1"}"#);
    b.replies();
    // A new room takes the empty room's place; with every room in use, a new one is refused.
    b.send(bob, &join("b2", "bob"));
    assert_eq!(b.replies_to(bob)[0]["type"], "joined");
    assert_eq!(b.chat.rooms(), 3);
    b.send(bob, &join("b3", "bob"));
    assert_eq!(error_code(&b.replies_to(bob)[0]), "too_many_rooms");
    // b2 holds no history: leaving it frees its place at once.
    b.send(bob, r#"{"type":"leave","room":"b2"}"#);
    b.replies();
    b.send(bob, &join("b1", "bob"));
    assert_eq!(b.replies_to(bob)[0]["history"], json!([]), "b1 was evicted");
}

#[test]
fn a_restarted_worker_says_not_joined_so_clients_join_again() {
    let mut b = Bench::new(ChatLimits::default());
    let ada = conn(1);
    // Frames of a connection whose join the previous worker handled.
    b.send(ada, &say("lobby", "after the crash"));
    let r = b.replies_to(ada);
    assert_eq!(error_code(&r[0]), "not_joined");
    assert_eq!(r[0]["room"], "lobby");
    b.close(ada);
    assert!(
        b.replies().is_empty(),
        "a close of an unknown connection is nothing"
    );
}
