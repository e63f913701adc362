//! WebSocket listeners (issue 16) with a real client (`tungstenite`) for the good paths and
//! raw TCP for everything a well-behaved client never sends: each bad handshake gets its HTTP
//! status and each bad frame its close code, and the counters say so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shmrelay::stats::FrontStats;
use shmrelay_tests::{eventually, Relay};
use shmrelay_worker::codec::websocket::{client_frame, opcode, parse_header};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A relay with one websocket listener (the journal worker: echo, plus `journal?` and
/// `close! CODE REASON`).
fn relay(name: &str, extra: &[&str]) -> Relay {
    let mut args = vec![
        "--workers",
        "1",
        "--worker-cmd",
        concat!(env!("CARGO_BIN_EXE_shmrelay"), " worker journal"),
        "--set",
        "codec=websocket",
        "--set",
        "path=/chat",
        "--set",
        "origins=[\"https://ok.example\"]",
        "--set",
        "subprotocols=[\"chat.v2\", \"chat.v1\"]",
    ];
    args.extend_from_slice(extra);
    let r = Relay::start(name, &args);
    // Workers start after `listening on`: wait until a client is served.
    assert!(
        eventually(Duration::from_secs(20), || {
            let mut s = upgrade(r.addr, "");
            send(&mut s, opcode::TEXT, b"ready?");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            matches!(recv(&mut s), Some((opcode::TEXT, p)) if p == b"ready?")
        }),
        "the relay never served a websocket client"
    );
    r
}

fn request(extra: &str) -> String {
    format!(
        "GET /chat HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// A raw client past its handshake (the response checked and read to its end).
fn upgrade(addr: SocketAddr, extra: &str) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(request(extra).as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    s
}

/// Reads an HTTP response head, byte by byte (nothing after it is consumed).
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn send(s: &mut TcpStream, op: u8, payload: &[u8]) {
    s.write_all(&client_frame(op, payload, KEY)).unwrap();
}

/// One frame from the server: `None` at EOF, reset or timeout. Server frames are unmasked.
fn recv(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = Vec::new();
    let h = loop {
        if let Some(h) = parse_header(&head) {
            break h;
        }
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    };
    assert!(h.mask.is_none(), "a server frame must not be masked");
    assert!(h.fin, "the relay sends whole messages");
    let mut p = vec![0u8; h.payload as usize];
    s.read_exact(&mut p).ok()?;
    Some((h.opcode, p))
}

/// The close frame the server sends, skipping anything before it, and whether the TCP
/// connection then closes.
fn close_code(s: &mut TcpStream) -> Option<u16> {
    loop {
        match recv(s)? {
            (opcode::CLOSE, p) if p.len() >= 2 => {
                let code = u16::from_be_bytes([p[0], p[1]]);
                let mut rest = [0u8; 16];
                assert!(
                    matches!(s.read(&mut rest), Ok(0) | Err(_)),
                    "the connection closes after the close frame"
                );
                return Some(code);
            }
            (opcode::CLOSE, _) => return Some(1005),
            _ => {}
        }
    }
}

fn counter(r: &Relay, f: impl Fn(&FrontStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    f(r.stats_now().front(0)).load(Ordering::Relaxed)
}

#[test]
fn every_bad_handshake_gets_its_status_and_is_counted() {
    let r = relay("ws-handshake", &["--set", "frame_timeout_ms=1000"]);
    let good = request("");
    let cases: Vec<(String, u16, usize)> = vec![
        (good.replacen("GET", "POST", 1), 405, 3),
        (good.replacen("/chat", "/other", 1), 404, 2),
        (request("Origin: https://evil.example\r\n"), 403, 1),
        (good.replacen("Upgrade: websocket\r\n", "", 1), 426, 4),
        (good.replacen("Version: 13", "Version: 8", 1), 426, 4),
        (
            good.replacen("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "", 1),
            400,
            0,
        ),
        (
            good.replacen("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=", 1),
            400,
            0,
        ),
        (
            format!("GET /chat HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000)),
            400,
            0,
        ),
        (
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03\r\n\r\n".into(),
            400,
            0,
        ),
    ];
    let mut want = [0u64; 5];
    for (req, status, idx) in cases {
        let mut s = connect(r.addr);
        s.write_all(req.as_bytes()).unwrap();
        let head = read_head(&mut s);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{req:?} got {head:?}"
        );
        if status == 405 {
            assert!(head.contains("Allow: GET\r\n"), "{head}");
        }
        if status == 426 {
            assert!(head.contains("Sec-WebSocket-Version: 13\r\n"), "{head}");
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        want[idx] += 1;
    }
    assert!(
        eventually(Duration::from_secs(5), || {
            (0..5).all(|i| counter(&r, |f| &f.ws_refused[i]) == want[i])
        }),
        "ws_refused counts {want:?}"
    );
    // A request that never completes is closed at the deadline, without a response.
    let mut slow = connect(r.addr);
    slow.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    assert!(matches!(slow.read(&mut buf), Ok(0) | Err(_)));
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "closed within the handshake deadline"
    );
    assert!(eventually(Duration::from_secs(5), || {
        counter(&r, |f| &f.ws_handshake_timeouts) == 1
    }));
}

#[test]
fn a_real_client_round_trips_text_and_binary_with_its_subprotocol() {
    let r = relay("ws-tungstenite", &[]);
    let req = tungstenite::http::Request::builder()
        .uri(format!("ws://{}/chat?room=7", r.addr))
        .header("Host", "relay")
        .header("Origin", "https://ok.example")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tungstenite::handshake::client::generate_key(),
        )
        // No space after the comma: tungstenite compares the answer with the list split at
        // commas, untrimmed (the relay trims).
        .header("Sec-WebSocket-Protocol", "chat.v1,chat.v2")
        .header("Authorization", "Bearer s3cret")
        .header("Cookie", "session=abc")
        .body(())
        .unwrap();
    let (mut ws, resp) = tungstenite::client(req, connect(r.addr)).expect("handshake");
    // The listener's preference order picks chat.v2.
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "chat.v2");
    assert!(resp.headers().get("Sec-WebSocket-Extensions").is_none());
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let text = "héllo wörld ".repeat(1000);
    for m in [
        Message::Text("hi".into()),
        Message::Binary(vec![0, 1, 2, 255]),
        Message::Text(text.clone()),
        Message::Binary(big.clone()),
        Message::Text(String::new()),
    ] {
        ws.send(m.clone()).unwrap();
        assert_eq!(ws.read().unwrap(), m, "echoed with its kind");
    }
    // The worker saw what it needs to authorise the client, and nothing else.
    ws.send(Message::Text("journal?".into())).unwrap();
    let journal = ws.read().unwrap().into_text().unwrap();
    assert!(
        journal.contains(
            "path=/chat?room=7 protocol=chat.v2 authorization=Bearer s3cret cookie=session=abc"
        ),
        "{journal}"
    );
    // A ping is answered by the front with its payload.
    ws.send(Message::Ping(b"p1".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"p1".to_vec()));
    // The client's close is echoed with its code, then the TCP connection closes.
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    }))
    .unwrap();
    match ws.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Away),
        other => panic!("no close frame: {other:?}"),
    }
    assert!(matches!(
        ws.read(),
        Err(tungstenite::Error::ConnectionClosed)
    ));
    assert!(eventually(Duration::from_secs(5), || {
        counter(&r, |f| {
            &f.closes[shmrelay_worker::CloseReason::ClientEof as usize]
        }) >= 1
    }));
}

#[test]
fn fragments_with_a_ping_between_make_one_message() {
    let r = relay("ws-fragments", &[]);
    let mut s = upgrade(r.addr, "");
    let frag = |fin: bool, op: u8, p: &[u8]| {
        let mut f = client_frame(op, p, KEY);
        if !fin {
            f[0] &= 0x7f;
        }
        f
    };
    // Text split inside a two-byte character, a ping between the pieces, one byte at a time.
    let mut wire = frag(false, opcode::TEXT, &"ça va".as_bytes()[..1]);
    wire.extend(client_frame(opcode::PING, b"in between", KEY));
    wire.extend(frag(false, opcode::CONTINUATION, &"ça va".as_bytes()[1..3]));
    wire.extend(frag(true, opcode::CONTINUATION, &"ça va".as_bytes()[3..]));
    for b in &wire {
        s.write_all(&[*b]).unwrap();
    }
    assert_eq!(recv(&mut s), Some((opcode::PONG, b"in between".to_vec())));
    assert_eq!(
        recv(&mut s),
        Some((opcode::TEXT, "ça va".as_bytes().to_vec()))
    );
    // A binary message of 100 KiB in 1000-byte fragments, sent at once.
    let big: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    let mut wire = Vec::new();
    let pieces: Vec<&[u8]> = big.chunks(1000).collect();
    for (i, p) in pieces.iter().enumerate() {
        let op = if i == 0 {
            opcode::BINARY
        } else {
            opcode::CONTINUATION
        };
        wire.extend(frag(i + 1 == pieces.len(), op, p));
    }
    s.write_all(&wire).unwrap();
    assert_eq!(recv(&mut s), Some((opcode::BINARY, big)));
}

/// Each bad frame: its close code, the connection closed, a protocol error counted.
#[test]
fn every_bad_frame_gets_its_close_code() {
    let r = relay("ws-bad-frames", &["--set", "max_frame=1000"]);
    let unmasked = vec![0x81, 0x02, b'h', b'i'];
    let mut rsv = client_frame(opcode::TEXT, b"x", KEY);
    rsv[0] |= 0x20;
    let mut frag_ping = client_frame(opcode::PING, b"", KEY);
    frag_ping[0] &= 0x7f;
    let mut bad_fragment = client_frame(opcode::TEXT, b"a", KEY);
    bad_fragment[0] &= 0x7f;
    bad_fragment.extend(client_frame(opcode::CONTINUATION, b"\xff", KEY));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", unmasked, 1002),
        ("reserved bit", rsv, 1002),
        ("unknown opcode", client_frame(0x3, b"", KEY), 1002),
        (
            "long ping",
            client_frame(opcode::PING, &[0; 126], KEY),
            1002,
        ),
        ("fragmented ping", frag_ping, 1002),
        (
            "continuation alone",
            client_frame(opcode::CONTINUATION, b"a", KEY),
            1002,
        ),
        (
            "bad close code",
            client_frame(opcode::CLOSE, &1005u16.to_be_bytes(), KEY),
            1002,
        ),
        (
            "1-byte close",
            client_frame(opcode::CLOSE, b"\x03", KEY),
            1002,
        ),
        (
            "invalid text",
            client_frame(opcode::TEXT, b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80", KEY),
            1007,
        ),
        ("invalid text in a fragment", bad_fragment, 1007),
        (
            "too large",
            client_frame(opcode::BINARY, &[1; 1001], KEY),
            1009,
        ),
    ];
    let before = counter(&r, |f| &f.protocol_errors);
    let n = cases.len() as u64;
    for (what, wire, code) in cases {
        let mut s = upgrade(r.addr, "");
        // A good message first: it is answered before the close.
        send(&mut s, opcode::BINARY, b"ok");
        assert_eq!(
            recv(&mut s),
            Some((opcode::BINARY, b"ok".to_vec())),
            "{what}"
        );
        s.write_all(&wire).unwrap();
        assert_eq!(close_code(&mut s), Some(code), "{what}");
    }
    assert!(eventually(Duration::from_secs(5), || {
        counter(&r, |f| &f.protocol_errors) - before == n
    }));
}

#[test]
fn a_worker_closes_with_its_code_and_pushes_reach_other_clients() {
    let r = relay("ws-worker-close", &[]);
    let mut s = upgrade(r.addr, "");
    send(&mut s, opcode::TEXT, b"close! 4001 go away now");
    match recv(&mut s) {
        Some((opcode::CLOSE, p)) => {
            assert_eq!(u16::from_be_bytes([p[0], p[1]]), 4001);
            assert_eq!(&p[2..], b"go away now");
        }
        other => panic!("{other:?}"),
    }
    // A code that may not be sent is refused by the SDK, and the worker says so.
    let mut s = upgrade(r.addr, "");
    send(&mut s, opcode::TEXT, b"close! 1005 no");
    assert_eq!(
        recv(&mut s),
        Some((opcode::TEXT, b"err bad close code".to_vec()))
    );

    let ps = Relay::start(
        "ws-pubsub",
        &[
            "--workers",
            "1",
            "--worker-cmd",
            concat!(env!("CARGO_BIN_EXE_shmrelay"), " worker pubsub"),
            "--set",
            "codec=websocket",
        ],
    );
    let mut sub = None;
    assert!(eventually(Duration::from_secs(20), || {
        let mut c = upgrade(ps.addr, "");
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        send(&mut c, opcode::TEXT, b"sub news");
        let ok = recv(&mut c) == Some((opcode::TEXT, b"ok".to_vec()));
        sub = Some(c);
        ok
    }));
    let mut sub = sub.unwrap();
    sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut publisher = upgrade(ps.addr, "");
    send(&mut publisher, opcode::TEXT, b"pub news hello");
    assert_eq!(recv(&mut publisher), Some((opcode::TEXT, b"ok 1".to_vec())));
    // A push is binary unless the worker says otherwise (it answers no message of `sub`).
    assert_eq!(
        recv(&mut sub),
        Some((opcode::BINARY, b"news hello".to_vec()))
    );
}

#[test]
fn idle_clients_are_pinged_and_a_silent_one_is_closed() {
    let r = relay(
        "ws-ping",
        &["--set", "ping_min_ms=300", "--set", "ping_max_ms=300"],
    );
    let mut s = upgrade(r.addr, "");
    // Pinged while idle; the pong keeps it open, ping after ping.
    for _ in 0..3 {
        let (op, p) = recv(&mut s).expect("a ping");
        assert_eq!((op, p.len()), (opcode::PING, 0));
        send(&mut s, opcode::PONG, b"");
    }
    send(&mut s, opcode::TEXT, b"still here");
    assert_eq!(recv(&mut s), Some((opcode::TEXT, b"still here".to_vec())));
    // Silent: closed at the heartbeat timeout with 1001.
    let t = Instant::now();
    assert_eq!(close_code(&mut s), Some(1001));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(eventually(Duration::from_secs(5), || {
        r.closes(shmrelay_worker::CloseReason::HeartbeatTimeout) >= 1
    }));
}

/// 4 KiB messages in and out, pipelined 16 deep on 20 connections (as the length-prefixed
/// codec's test): fewer than 1% of the bytes relayed are copied in user space. Unmasking is in
/// place; the frame headers the front writes are not payload copies.
#[test]
fn four_kib_messages_stay_zero_copy() {
    let r = relay("ws-zero-copy", &[]);
    let totals = |r: &Relay| {
        let s = r.stats();
        let f = s.front(0);
        [&f.bytes_in, &f.bytes_out, &f.bytes_copied].map(|c| c.load(Ordering::Relaxed))
    };
    let start = totals(&r);
    let threads: Vec<_> = (0..20u8)
        .map(|i| {
            let mut s = upgrade(r.addr, "");
            std::thread::spawn(move || {
                let msg = vec![i; 4096];
                for _ in 0..30 {
                    for _ in 0..16 {
                        send(&mut s, opcode::BINARY, &msg);
                    }
                    for _ in 0..16 {
                        assert_eq!(recv(&mut s), Some((opcode::BINARY, msg.clone())));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let want = 20 * 30 * 16 * 4096 * 2;
    assert!(eventually(Duration::from_secs(5), || {
        let end = totals(&r);
        end[0] - start[0] + end[1] - start[1] >= want
    }));
    let end = totals(&r);
    let moved = (end[0] - start[0]) + (end[1] - start[1]);
    let copied = end[2] - start[2];
    eprintln!("websocket 4 KiB: bytes relayed {moved}, copied {copied}");
    assert!(
        copied * 100 < moved,
        "copied {copied} of {moved} bytes ({:.2}%)",
        copied as f64 * 100.0 / moved as f64
    );
}

/// A reply longer than a ring record goes out as one frame in pieces: a ping answered while
/// it is part way out waits for its end, so the stream stays frames.
#[test]
fn pongs_never_split_a_long_reply() {
    let r = relay(
        "ws-long-reply",
        &["--set", "max_frame=65536", "--set", "ring_capacity=262144"],
    );
    let mut s = upgrade(r.addr, "");
    for round in 0..10u8 {
        send(&mut s, opcode::TEXT, b"big! 3000000");
        // The reply's header and first bytes are out: its pieces are still coming.
        let mut head = [0u8; 10];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[..2], [0x81, 127]);
        assert_eq!(u64::from_be_bytes(head[2..].try_into().unwrap()), 3_000_000);
        for i in 0..20u8 {
            send(&mut s, opcode::PING, &[round, i]);
        }
        let mut body = vec![0u8; 3_000_000];
        s.read_exact(&mut body).unwrap();
        assert!(
            body.iter().all(|&b| b == b'x'),
            "a pong inside the reply's payload"
        );
        for i in 0..20u8 {
            assert_eq!(recv(&mut s), Some((opcode::PONG, vec![round, i])));
        }
    }
}
