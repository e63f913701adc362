//! Issue 12.5: a partial frame must be complete within `frame_timeout_ms` with every codec
//! (`line` and `resp` have no heartbeats, so before this nothing ever closed a connection that
//! sent half a command and went quiet).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shmrelay_tests::Relay;

const SEC: Duration = Duration::from_secs(1);

/// Sends `bytes` on a new connection; returns how long until the relay closed it and what it
/// wrote before.
fn closed_after(addr: SocketAddr, bytes: &[u8]) -> (Duration, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(30 * SEC)).unwrap();
    let t = Instant::now();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no close after {:?}: {e}; got {got:?}", t.elapsed()),
        }
    }
    (t.elapsed(), got)
}

/// (codec, bytes sent, the reply to the whole frame, the error at the timeout)
type Case = (&'static str, &'static [u8], &'static [u8], &'static [u8]);

#[test]
fn line_and_resp_partial_frames_are_closed_at_frame_timeout_ms() {
    let toml = r#"
frame_timeout_ms = 1000

[[listener]]
listen = "127.0.0.1:0"
codec = "line"

[[listener]]
listen = "127.0.0.1:0"
codec = "resp"
"#;
    let (relay, addrs) = Relay::start_config("ftimeout", toml, 2, &[]);
    let cases: [Case; 2] = [
        (
            "line",
            b"hello\nno newline yet",
            b"hello\n",
            b"ERR protocol error: frame not complete within frame_timeout_ms\n",
        ),
        (
            "resp",
            b"*2\r\n$4\r\nECHO\r\n$5\r\nhello\r\n*2\r\n$4\r\nECHO\r\n$5\r\nhel",
            b"*2\r\n$4\r\nECHO\r\n$5\r\nhello\r\n",
            b"-ERR Protocol error: frame not complete within frame_timeout_ms\r\n",
        ),
    ];
    for (i, (codec, sent, reply, error)) in cases.into_iter().enumerate() {
        // A whole frame, then part of one: the echo, then the codec's error at the timeout.
        let (after, got) = closed_after(addrs[i], sent);
        let mut want = reply.to_vec();
        want.extend_from_slice(error);
        eprintln!("{codec}: closed after {after:?}");
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{codec}: the echo, then the codec's error"
        );
        assert!(
            after >= Duration::from_millis(850) && after < 10 * SEC,
            "{codec}: closed after {after:?}, frame_timeout_ms is 1000"
        );
        let f = relay.stats();
        assert_eq!(
            f.front(0).frame_timeouts.load(Ordering::Relaxed),
            i as u64 + 1,
            "{codec}"
        );
    }
}

#[test]
fn a_trickled_command_on_a_routed_resp_pool_is_copied_a_bounded_number_of_times() {
    const LEN: usize = 1 << 20;
    let kv = format!("{} worker kv", env!("CARGO_BIN_EXE_shmrelay"));
    let toml = format!(
        "max_frame = 2097152\n[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"resp\"\nworkers = 2\nworker_cmd = \"{kv}\"\n"
    );
    let (relay, addrs) = Relay::start_config("routed-trickle", &toml, 1, &[]);
    let copied = || relay.stats().front(0).bytes_copied.load(Ordering::Relaxed);
    let mut s = TcpStream::connect(addrs[0]).unwrap();
    s.set_read_timeout(Some(30 * SEC)).unwrap();
    s.set_nodelay(true).unwrap();
    let value = vec![b'v'; LEN];
    let mut cmd = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${LEN}\r\n").into_bytes();
    cmd.extend_from_slice(&value);
    cmd.extend_from_slice(b"\r\n");
    let before = copied();
    for (i, piece) in cmd.chunks(1024).enumerate() {
        s.write_all(piece).unwrap();
        if i % 4 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let mut ok = [0u8; 5];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"+OK\r\n");
    let copies = copied() - before;
    eprintln!(
        "a 1 MiB SET sent 1 KiB at a time to a routed pool: {copies} bytes copied ({:.2}x)",
        copies as f64 / LEN as f64
    );
    // A routed read copies each frame once into its worker's ring; the partial frame is
    // assembled in the connection's buffer, not copied back and forth on every read.
    assert!(copies <= 3 * LEN as u64, "{copies} bytes copied");
    // The value is whole.
    s.write_all(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n").unwrap();
    let mut want = format!("${LEN}\r\n").into_bytes();
    want.extend_from_slice(&value);
    want.extend_from_slice(b"\r\n");
    let mut reply = vec![0u8; want.len()];
    s.read_exact(&mut reply).unwrap();
    assert!(reply == want, "GET big does not return the value");
}

#[test]
fn a_trickled_long_line_is_copied_a_bounded_number_of_times() {
    const LEN: usize = 512 * 1024;
    let toml = "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"line\"\n";
    let (relay, addrs) = Relay::start_config("line-trickle", toml, 1, &[]);
    let copied = || relay.stats().front(0).bytes_copied.load(Ordering::Relaxed);
    let mut s = TcpStream::connect(addrs[0]).unwrap();
    s.set_read_timeout(Some(30 * SEC)).unwrap();
    s.set_nodelay(true).unwrap();
    // A line whose length the codec cannot know until its newline, 1 KiB per write, then a
    // short line in the same write as the end of the long one.
    let mut bytes: Vec<u8> = (0..LEN).map(|i| b'a' + (i % 26) as u8).collect();
    bytes.extend_from_slice(b"\nshort\n");
    let before = copied();
    for (i, piece) in bytes.chunks(1024).enumerate() {
        s.write_all(piece).unwrap();
        if i % 4 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let mut echo = vec![0u8; bytes.len()];
    s.read_exact(&mut echo).unwrap();
    assert!(echo == bytes, "the lines come back whole and in order");
    let copies = copied() - before;
    eprintln!(
        "a 512 KiB line sent 1 KiB at a time: {copies} bytes copied ({:.2}x)",
        copies as f64 / LEN as f64
    );
    // Assembled in the connection's buffer (read in chunks, its size unknown) and copied into
    // the ring once; the echo may add up to one queued copy. Not once per read.
    assert!(copies <= 3 * LEN as u64, "{copies} bytes copied");
}
