//! The SDK side of a websocket listener, against a front in the test's process: the OPEN's
//! handshake fields reach `on_upgrade`, each message's kind reaches `on_message`, control
//! frames and padding in a DATA record are skipped, replies carry their kind (`flags::TEXT`),
//! and a worker's close carries its code and reason.

use shmrelay_worker::codec::websocket::{opcode, write_header, Upgrade, MAX_HEADER};
use shmrelay_worker::protocol::{flags, tag};
use shmrelay_worker::testing;
use shmrelay_worker::{Codec, ConnId, Handler, MessageKind, Out, SendError};

#[derive(Default)]
struct Seen {
    opens: Vec<String>,
    messages: Vec<(MessageKind, Vec<u8>)>,
}

impl Handler for Seen {
    fn on_frame(&mut self, _: ConnId, _: &[u8], _: bool, _: &mut Out<'_>) {
        unreachable!("on_message is implemented")
    }

    fn on_upgrade(&mut self, conn: ConnId, peer: &str, u: &Upgrade<'_>, out: &mut Out<'_>) {
        self.opens.push(format!(
            "{peer} {} {} {} {}",
            u.path, u.subprotocol, u.authorization, u.cookie
        ));
        out.send_text(conn, "welcome").unwrap();
        assert_eq!(
            out.close_with(conn, 1005, "reserved"),
            Err(SendError::InvalidCloseCode(1005))
        );
    }

    fn on_message(&mut self, c: ConnId, m: &[u8], kind: MessageKind, _: bool, out: &mut Out<'_>) {
        self.messages.push((kind, m.to_vec()));
        // `send` answers with the kind of the message; a close picks code and reason.
        out.send(c, m).unwrap();
        if m == b"bye" {
            out.close_with(c, 4000, &"é".repeat(100)).unwrap();
        }
    }
}

/// A frame as it lies in a DATA record: header (mask bit and key meaningless), payload.
fn item(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = [0u8; MAX_HEADER];
    let n = write_header(&mut h, true, op, payload.len() as u64, Some([1, 2, 3, 4]));
    [&h[..n], payload].concat()
}

#[test]
fn kinds_fields_and_closes_travel_both_ways() {
    let (mut w, mut front) = testing::attach(0, Codec::WebSocket, 1 << 16);
    let conn = ConnId::new(0, 3, 9);
    let up = Upgrade {
        path: "/chat?x=1",
        subprotocol: "v1",
        authorization: "Bearer t",
        cookie: "a=b",
    };
    front.push(tag::OPEN, conn, 0, &up.encode_open("127.0.0.1:9"));
    let mut rec = item(opcode::TEXT, "héllo".as_bytes());
    rec.extend(item(opcode::PING, b"ignored"));
    rec.extend([0x80 | opcode::PADDING, 3, 0, 0, 0]);
    rec.extend(item(opcode::BINARY, &[0, 255]));
    rec.extend(item(opcode::CLOSE, &1000u16.to_be_bytes()));
    rec.extend(item(opcode::TEXT, b"bye"));
    front.push(tag::DATA, conn, 0, &rec);
    let mut seen = Seen::default();
    assert_eq!(w.poll_once(&mut seen).unwrap(), 2);
    assert_eq!(seen.opens, ["127.0.0.1:9 /chat?x=1 v1 Bearer t a=b"]);
    assert_eq!(
        seen.messages,
        [
            (MessageKind::Text, "héllo".as_bytes().to_vec()),
            (MessageKind::Binary, vec![0, 255]),
            (MessageKind::Text, b"bye".to_vec()),
        ]
    );
    let got: Vec<_> = front
        .replies()
        .into_iter()
        .map(|r| (r.tag, r.flags & flags::TEXT, r.aux, r.body))
        .collect();
    let text = flags::TEXT;
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(
        (got[0].0, got[0].1, &got[0].3[..]),
        (tag::SEND, text, &b"welcome"[..])
    );
    assert_eq!((got[1].1, &got[1].3[..]), (text, "héllo".as_bytes()));
    assert_eq!((got[2].1, &got[2].3[..]), (0, &[0, 255][..]));
    assert_eq!((got[3].1, &got[3].3[..]), (text, &b"bye"[..]));
    // The close: its code in aux, its reason cut to 123 bytes on a character boundary.
    let (t, _, code, reason) = &got[4];
    assert_eq!((*t, *code), (tag::CLOSE, 4000));
    assert_eq!(reason.len(), 122);
    assert!(std::str::from_utf8(reason).is_ok());
}
