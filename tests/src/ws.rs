//! WebSocket clients (`tungstenite`) for relays with a `codec = "websocket"` listener, and the
//! one driver of the `ws_echo` example workers (C and Python speak the same protocol).

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub use tungstenite;
use tungstenite::handshake::client::{generate_key, Response};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use crate::{eventually, Relay};

/// A websocket client over a blocking TCP stream.
pub type Ws = tungstenite::WebSocket<TcpStream>;

/// How long a websocket client waits for the relay before a read fails.
const READ_LIMIT: Duration = Duration::from_secs(20);

/// Opens a websocket to `addr` at `path`, with `headers` (say `Authorization`) beside the
/// handshake's own; panics if the handshake fails.
pub fn ws_connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (Ws, Response) {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(READ_LIMIT)).unwrap();
    let mut req = tungstenite::http::Request::builder()
        .uri(format!("ws://{addr}{path}"))
        .header("Host", "relay")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", generate_key());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    tungstenite::client(req.body(()).unwrap(), stream).expect("websocket handshake")
}

/// The next data message (text or binary), skipping pings and pongs; panics on anything else.
pub fn ws_next(ws: &mut Ws) -> Message {
    loop {
        match ws.read() {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => return m,
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            other => panic!("a data message was due: {other:?}"),
        }
    }
}

impl Relay {
    /// Starts `shmrelay` with one websocket listener (`--set codec=websocket`, then `args`)
    /// and waits until its workers serve: a client's text message `ready?` comes back (what
    /// a worker sends on its own before that is skipped).
    pub fn start_websocket(name: &str, args: &[&str]) -> Relay {
        let mut all = vec!["--set", "codec=websocket"];
        all.extend_from_slice(args);
        let relay = Relay::start(name, &all);
        let served = eventually(Duration::from_secs(30), || {
            let (mut ws, _) = ws_connect(relay.addr, "/", &[]);
            ws.get_ref()
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            if ws.send(Message::Text("ready?".into())).is_err() {
                return false;
            }
            loop {
                match ws.read() {
                    Ok(Message::Text(t)) if t == "ready?" => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        });
        assert!(
            served,
            "relay {} never served a websocket client",
            relay.instance
        );
        relay
    }
}

impl Relay {
    /// A relay whose websocket listener (offering the subprotocol `chat.v1`) is served by one
    /// worker running `worker_cmd`, a `ws_echo` example: see [`check_ws_echo_example`].
    pub fn start_ws_echo(name: &str, worker_cmd: &str) -> Relay {
        let args = [
            "--workers",
            "1",
            "--worker-cmd",
            worker_cmd,
            "--set",
            "subprotocols=[\"chat.v1\"]",
        ];
        Relay::start_websocket(name, &args)
    }
}

/// Drives a `ws_echo` example worker (`workers/ffi/examples/ws_echo.c`,
/// `workers/python/examples/ws_echo.py`) behind `relay` with real websocket traffic: the
/// greeting carries the handshake's fields, messages come back with their kind (one at a time
/// and pipelined), refused close codes are answered and the connection goes on, and
/// `close CODE REASON` reaches the client as that close frame. The relay is one
/// [`Relay::start_ws_echo`] started.
pub fn check_ws_echo_example(relay: &Relay) {
    let (mut ws, resp) = ws_connect(
        relay.addr,
        "/chat?room=7",
        &[
            ("Sec-WebSocket-Protocol", "chat.v1"),
            ("Authorization", "Bearer s3cret"),
            ("Cookie", "session=abc"),
            ("Cookie", "theme=dark"),
        ],
    );
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "chat.v1");
    assert_eq!(
        ws_next(&mut ws),
        Message::Text(
            "hello path=/chat?room=7 subprotocol=chat.v1 authorization=Bearer s3cret \
             cookie=session=abc; theme=dark"
                .into()
        ),
        "the greeting shows the handshake's fields"
    );
    // Outside on_open there are no handshake fields.
    ws.send(Message::Text("upgrade?".into())).unwrap();
    assert_eq!(ws_next(&mut ws), Message::Text("None".into()));

    // Each kind comes back as it was sent: text that looks like a command's prefix, binary
    // that is not UTF-8 (and one that reads "close 4001": binary is never a command), empty
    // ones, and messages larger than a ring record.
    let big_text = "héllo wörld ✓ ".repeat(20_000);
    let big_binary: Vec<u8> = (0..400_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let messages = [
        Message::Text("hi".into()),
        Message::Binary(vec![0xff, 0xfe, 0, 1]),
        Message::Binary(b"close 4001 binary".to_vec()),
        Message::Text("closer".into()),
        Message::Text(String::new()),
        Message::Binary(Vec::new()),
        Message::Text(big_text),
        Message::Binary(big_binary),
    ];
    for m in &messages {
        ws.send(m.clone()).unwrap();
        assert_eq!(&ws_next(&mut ws), m, "echoed with its kind");
    }
    // Pipelined: 300 messages of alternating kinds in flight, answered in order.
    let msg = |i: u32| {
        if i % 2 == 0 {
            Message::Text(format!("text {i} ✓"))
        } else {
            Message::Binary([&i.to_be_bytes()[..], &[0xff; 9]].concat())
        }
    };
    for i in 0..300 {
        ws.write(msg(i)).unwrap();
    }
    ws.flush().unwrap();
    for i in 0..300 {
        assert_eq!(ws_next(&mut ws), msg(i), "pipelined message {i}");
    }

    // Codes an endpoint may not send: refused, nothing queued, the connection goes on.
    for bad in ["1005", "1006", "1015", "999", "5000", "70000", "x"] {
        ws.send(Message::Text(format!("close {bad} nope"))).unwrap();
        match ws_next(&mut ws) {
            Message::Text(t) if t.starts_with("close refused: ") => {}
            other => panic!("close {bad}: {other:?}"),
        }
        ws.send(Message::Text("still open?".into())).unwrap();
        assert_eq!(ws_next(&mut ws), Message::Text("still open?".into()));
    }
    // A valid code: the close frame carries it and the reason, after the reply queued before.
    ws.send(Message::Text("before the close".into())).unwrap();
    ws.send(Message::Text("close 4001 bye now".into())).unwrap();
    assert_eq!(ws_next(&mut ws), Message::Text("before the close".into()));
    expect_close(&mut ws, 4001, "bye now");

    // A reason longer than a close frame holds is cut to 123 bytes on a character boundary.
    let (mut ws, _) = ws_connect(relay.addr, "/", &[]);
    let _greeting = ws_next(&mut ws);
    let long = "é".repeat(100);
    ws.send(Message::Text(format!("close 3000 {long}")))
        .unwrap();
    expect_close(&mut ws, 3000, &long[..122]);
}

/// Reads the close frame the relay sends (`code`, `reason`), then the end of the connection.
pub fn expect_close(ws: &mut Ws, code: u16, reason: &str) {
    match ws.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!(f.code, CloseCode::from(code), "close code");
            assert_eq!(f.reason, reason, "close reason");
        }
        other => panic!("a close frame {code} was due: {other:?}"),
    }
    // The client answers the close and the relay closes the TCP connection: whether the
    // client's answer went out before the end of the stream or met a reset is a race.
    loop {
        match ws.read() {
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => return,
            Err(tungstenite::Error::Io(e))
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            other => panic!("the connection was due to close: {other:?}"),
        }
    }
}
