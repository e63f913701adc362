//! tokio-echo and frame-client together, as real processes on loopback; the C epoll echo
//! (examples/c/epoll-echo.c, built here with `cc`) and the io_uring echo (`uring-echo`) pass
//! the same echo tests. Where io_uring is unavailable (ENOSYS, EPERM: `uring-echo` exits 3)
//! the uring tests print a note and pass, unless SHMRELAY_REQUIRE_URING=1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// A running echo server, killed when dropped (also when a test panics).
struct Server {
    child: Child,
    addr: String,
}

/// The echo servers under test: tokio-echo, the C epoll echo and the io_uring echo.
#[derive(Clone, Copy, Debug)]
enum Echo {
    Tokio,
    C,
    Uring,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_echo(Echo::Tokio, extra).expect("tokio-echo starts")
    }

    /// `None` only for `uring-echo` where io_uring is unavailable (and not required).
    fn start_echo(which: Echo, extra: &[&str]) -> Option<Server> {
        let program = match which {
            Echo::Tokio => PathBuf::from(env!("CARGO_BIN_EXE_tokio-echo")),
            Echo::C => c_echo(),
            Echo::Uring => PathBuf::from(env!("CARGO_BIN_EXE_uring-echo")),
        };
        let mut child = Command::new(&program)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program:?}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the listening line");
        if line.is_empty() {
            let status = child.wait().expect("wait for the server");
            if status.code() == Some(3)
                && std::env::var("SHMRELAY_REQUIRE_URING").as_deref() != Ok("1")
            {
                eprintln!("note: io_uring is unavailable here (uring-echo exited 3): uring test skipped (set SHMRELAY_REQUIRE_URING=1 to fail instead)");
                return None;
            }
            panic!("{program:?} exited without listening: {status}");
        }
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no `listening on ADDR` in {line:?}"))
            .to_string();
        assert!(
            !addr.ends_with(":0"),
            "the real port must be printed: {line:?}"
        );
        Some(Server { child, addr })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Compiles examples/c/epoll-echo.c with `cc` (or `$CC`) once per test binary.
fn c_echo() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("c/epoll-echo.c");
            let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("epoll-echo");
            let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
            let status = Command::new(&cc)
                .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
                .arg(&bin)
                .arg(&src)
                .status()
                .unwrap_or_else(|e| panic!("run {cc:?} (a C compiler is needed): {e}"));
            assert!(status.success(), "{cc:?} failed on {src:?}");
            bin
        })
        .clone()
}

fn client(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_frame-client"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start frame-client");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

#[test]
fn frame_client_messages_and_heartbeat() {
    let server = Server::start(&[]);
    let out = client(
        &["--addr", &server.addr, "--heartbeat", "hello", "wörld", ""],
        None,
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "heartbeat ok\nhello\nwörld\n\n"
    );
}

#[test]
fn frame_client_reads_lines_from_stdin() {
    let server = Server::start(&["--threads", "2"]);
    let out = client(&["--addr", &server.addr], Some("one\r\ntwo\nthree"));
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "one\ntwo\nthree\n");
}

#[test]
fn frame_client_fails_clearly_without_a_server() {
    // A port bound but not listening, held for the whole test: connecting is refused, and no
    // other test of this binary can be given the port meanwhile (a released port can).
    use nix::sys::socket::{bind, getsockname, socket, AddressFamily, SockFlag, SockType};
    use nix::sys::socket::{SockaddrIn, SockaddrLike};
    let held = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&held),
        &SockaddrIn::new(127, 0, 0, 1, 0),
    )
    .unwrap();
    let bound: SockaddrIn = getsockname(std::os::fd::AsRawFd::as_raw_fd(&held)).unwrap();
    assert_eq!(bound.family(), Some(AddressFamily::Inet));
    let addr = format!("127.0.0.1:{}", bound.port());
    let out = client(&["--addr", &addr, "hi"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to"), "stderr: {err}");
}

#[test]
fn frame_client_reports_an_early_close() {
    // A server that accepts, reads a little and hangs up without replying.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 4];
        let _ = s.read_exact(&mut b);
    });
    let out = client(&["--addr", &addr, "hello"], None);
    t.join().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("closed the connection"), "stderr: {err}");
}

#[test]
fn pipelined_frames_come_back_byte_for_byte() {
    pipelined(Echo::Tokio);
}

#[test]
fn c_echo_pipelined_frames_come_back_byte_for_byte() {
    pipelined(Echo::C);
}

#[test]
fn uring_echo_pipelined_frames_come_back_byte_for_byte() {
    pipelined(Echo::Uring);
}

fn pipelined(which: Echo) {
    let Some(server) = Server::start_echo(which, &[]) else {
        return;
    };
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sent = Vec::new();
    for i in 0..500u32 {
        let len = (i * 37 % 3000) as usize; // includes length-0 heartbeats
        let payload: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
        sent.extend(frame(&payload));
    }
    sent.extend(frame(&vec![7u8; 200_000])); // bigger than the initial read buffer
                                             // Write from another thread so neither side can block the other.
    let mut w = s.try_clone().unwrap();
    let to_send = sent.clone();
    let writer = std::thread::spawn(move || {
        for chunk in to_send.chunks(1001) {
            w.write_all(chunk).unwrap();
        }
    });
    let mut got = vec![0u8; sent.len()];
    s.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == sent, "echo differs");
}

#[test]
fn oversized_frame_closes_only_that_connection() {
    oversized(Echo::Tokio);
}

#[test]
fn c_echo_oversized_frame_closes_only_that_connection() {
    oversized(Echo::C);
}

#[test]
fn uring_echo_oversized_frame_closes_only_that_connection() {
    oversized(Echo::Uring);
}

fn oversized(which: Echo) {
    let Some(server) = Server::start_echo(which, &["--max-frame", "1000"]) else {
        return;
    };
    let mut bad = TcpStream::connect(&server.addr).unwrap();
    let mut good = TcpStream::connect(&server.addr).unwrap();
    for s in [&bad, &good] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let mut msg = frame(b"before");
    msg.extend_from_slice(&1001u32.to_be_bytes());
    bad.write_all(&msg).unwrap();
    let mut rest = Vec::new();
    bad.read_to_end(&mut rest).unwrap();
    assert_eq!(
        rest,
        frame(b"before"),
        "frames before the bad one are answered, then EOF"
    );

    good.write_all(&frame(&[1u8; 1000])).unwrap();
    let mut back = vec![0u8; 1004];
    good.read_exact(&mut back).unwrap();
    assert_eq!(back, frame(&[1u8; 1000]));
}

/// Frames of 0 B, 64 B and 64 KiB, pipelined on `conns` connections at once, each written by
/// a thread of its own while the test reads: every byte comes back, in order.
fn many_connections(server: &Server, conns: usize) {
    let sizes = [0usize, 64, 65536, 64, 0, 64, 65536, 65536, 0, 64];
    let clients: Vec<_> = (0..conns)
        .map(|c| {
            let s = TcpStream::connect(&server.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut wire = Vec::new();
            for (i, &len) in sizes.iter().enumerate() {
                let payload: Vec<u8> = (0..len).map(|j| (c * 7 + i * 13 + j) as u8).collect();
                wire.extend(frame(&payload));
            }
            let mut w = s.try_clone().unwrap();
            let to_send = wire.clone();
            let writer = std::thread::spawn(move || w.write_all(&to_send).unwrap());
            (s, wire, writer)
        })
        .collect();
    for (c, (mut s, wire, writer)) in clients.into_iter().enumerate() {
        let mut got = vec![0u8; wire.len()];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("connection {c}: {e}"));
        writer.join().unwrap();
        assert!(got == wire, "connection {c}: echo differs");
    }
}

#[test]
fn uring_echo_serves_many_connections() {
    let Some(server) = Server::start_echo(Echo::Uring, &[]) else {
        return;
    };
    many_connections(&server, 200);
}

#[test]
fn uring_echo_with_few_small_buffers_splits_frames_and_waits_for_buffers() {
    // 64 buffers of 1 KiB for 100 connections: 64 KiB frames span many buffers (collected
    // and copied), receives run out of buffers (re-armed when some are back), and every
    // connection stops receiving past 8 KiB waiting.
    let args = [
        "--buffers",
        "64",
        "--buffer-size",
        "1024",
        "--max-pending",
        "8192",
    ];
    let Some(server) = Server::start_echo(Echo::Uring, &args) else {
        return;
    };
    many_connections(&server, 100);
}

#[test]
fn uring_echo_with_incremental_buffers_serves_many_connections() {
    // Buffers shared by the receives of many connections (IOU_PBUF_RING_INC): 16 buffers of
    // 256 KiB for 100 connections; 64 KiB frames end up split where a buffer fills.
    let args = [
        "--incremental",
        "--buffers",
        "16",
        "--buffer-size",
        "262144",
        "--max-pending",
        "65536",
    ];
    let Some(server) = Server::start_echo(Echo::Uring, &args) else {
        return;
    };
    many_connections(&server, 100);
}

// Ignored: in CI's full parallel suite (a fresh-clone `.ci/run`, 2026-11-30) connection 0 of
// the 20 got no echo within 30 s, while alone it passes every time. The prototype was measured
// and dropped for the front (docs/io_uring.md); the stall, likely every provided buffer held
// by echoes waiting on clients that are not being read, is noted there and not chased. Run:
// `cargo test -p shmrelay-examples --test echo -- --ignored`.
#[test]
#[ignore = "stalls under CI load: see the comment and docs/io_uring.md"]
fn uring_echo_client_that_does_not_read_does_not_stall_others() {
    hog_beside_others(&["--max-pending", "65536"]);
}

/// 64 buffers of 4 KiB; a client writes 64 B frames (so its echoes hold provided buffers until
/// they are sent) without ever reading: once the kernel's socket buffers are full, its echoes
/// stall, and without `--max-pending` it would end up holding every buffer; 20 other clients
/// must still be served.
fn hog_beside_others(extra: &[&str]) {
    let mut args = vec!["--buffers", "64", "--buffer-size", "4096"];
    args.extend(extra);
    let Some(server) = Server::start_echo(Echo::Uring, &args) else {
        return;
    };
    let hog = TcpStream::connect(&server.addr).unwrap();
    let mut w = hog.try_clone().unwrap();
    let hog_writer = std::thread::spawn(move || {
        let chunk: Vec<u8> = (0..1000).flat_map(|_| frame(&[9u8; 60])).collect();
        for _ in 0..1000 {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    many_connections(&server, 20);
    // Ends the hog's blocked write too (the writer holds a clone of the same socket).
    hog.shutdown(std::net::Shutdown::Both).unwrap();
    hog_writer.join().unwrap();
}
