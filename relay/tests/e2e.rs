//! The relay end to end, as real processes on loopback: supervisor, front, workers.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shmrelay_tests::{alive, eventually, pattern, Client, Relay};
use shmrelay_worker::CloseReason;

#[test]
fn thousand_connections_echo_random_frames_in_order() {
    let relay = Relay::start("echo1k", &[]);
    const CONNS: usize = 1000;
    const ROUNDS: usize = 4;
    // Each thread owns a share of the connections, all open at once, one frame in flight each.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let addr = relay.addr;
            std::thread::spawn(move || {
                let ids: Vec<usize> = (t..CONNS).step_by(8).collect();
                let mut clients: Vec<Client> = ids.iter().map(|_| Client::connect(addr)).collect();
                let mut rng = 0x1234_5678_u64 ^ t as u64;
                let mut total = 0usize;
                for round in 0..ROUNDS {
                    let mut sent = Vec::new();
                    for (c, &id) in clients.iter_mut().zip(&ids) {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let len = match rng % 10 {
                            0 => 0,
                            1 => 65536,
                            _ => (rng >> 8) as usize % 65537,
                        };
                        let p = pattern(id, round, len);
                        c.send(&p);
                        sent.push(p);
                    }
                    for (c, p) in clients.iter_mut().zip(&sent) {
                        let got = c.recv().expect("reply");
                        assert_eq!(got.len(), p.len(), "length of the echo");
                        assert!(got == *p, "echo differs");
                        total += p.len();
                    }
                }
                total
            })
        })
        .collect();
    let bytes: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(bytes > 0);
    let s = relay.stats();
    let f = s.front(0);
    assert_eq!(f.accepts.load(Ordering::Relaxed), CONNS as u64);
    assert_eq!(f.protocol_errors.load(Ordering::Relaxed), 0);
    assert!(f.bytes_in.load(Ordering::Relaxed) >= bytes as u64);
}

#[test]
fn heartbeat_is_answered_without_a_worker() {
    // A "worker" that never attaches: only the front can answer.
    let relay = Relay::start("hb", &["--workers", "1", "--worker-cmd", "sleep 600"]);
    let mut c = relay.connect();
    for _ in 0..3 {
        assert_eq!(c.roundtrip(b"").as_deref(), Some(&b""[..]));
    }
    assert_eq!(relay.stats().front(0).heartbeats.load(Ordering::Relaxed), 3);
}

#[test]
fn oversized_frame_closes_only_its_connection() {
    let relay = Relay::start("big", &["--max-frame", "1000"]);
    let mut good = relay.connect();
    let mut bad = relay.connect();
    assert_eq!(good.roundtrip(b"before").as_deref(), Some(&b"before"[..]));
    bad.send(&vec![7u8; 1001]);
    let err = bad.recv().expect("an error frame before the close");
    assert!(String::from_utf8_lossy(&err)
        .starts_with("shmrelay-error: frame of 1001 bytes exceeds the maximum of 1000"));
    assert_eq!(bad.recv(), None, "then a close");
    assert_eq!(good.roundtrip(b"after").as_deref(), Some(&b"after"[..]));
    assert_eq!(good.roundtrip(&[1u8; 1000]).map(|v| v.len()), Some(1000));
    let f = relay.stats();
    assert_eq!(f.front(0).protocol_errors.load(Ordering::Relaxed), 1);
    assert_eq!(
        f.front(0).closes[CloseReason::ProtocolError as usize].load(Ordering::Relaxed),
        1
    );
}

#[test]
fn push_reaches_another_connection_and_vanished_client_gets_a_close() {
    let relay = Relay::start(
        "pubsub",
        &[
            "--workers",
            "1",
            "--worker-cmd",
            &format!("{} worker pubsub", env!("CARGO_BIN_EXE_shmrelay")),
        ],
    );
    let mut sub = relay.connect();
    let mut publisher = relay.connect();
    assert_eq!(sub.roundtrip(b"sub news").as_deref(), Some(&b"ok"[..]));
    assert_eq!(
        publisher.roundtrip(b"pub news hello").as_deref(),
        Some(&b"ok 1"[..])
    );
    assert_eq!(
        sub.recv().as_deref(),
        Some(&b"news hello"[..]),
        "the push reached the subscriber"
    );

    // A subscriber that vanishes in the middle of a frame: the worker must get its CLOSE and
    // drop the subscription, so publishing reaches nobody.
    let mut ghost = relay.connect();
    assert_eq!(ghost.roundtrip(b"sub ghosts").as_deref(), Some(&b"ok"[..]));
    use std::io::Write;
    ghost.stream.write_all(&[0, 0, 0, 50, b'x', b'y']).unwrap();
    drop(ghost);
    assert!(
        eventually(Duration::from_secs(5), || publisher
            .roundtrip(b"pub ghosts boo")
            .as_deref()
            == Some(&b"ok 0"[..])),
        "the worker never saw the CLOSE of the vanished client"
    );
    // The front counts the close when it handles the worker's acknowledgement, which may be
    // just after it wrote the publisher's reply from the same batch.
    let s = relay.stats();
    let eof = || s.front(0).closes[CloseReason::ClientEof as usize].load(Ordering::Relaxed);
    assert!(eventually(Duration::from_secs(5), || eof() >= 1));
    assert_eq!(eof(), 1);
}

#[test]
fn killed_worker_is_restarted_and_serves_again() {
    let relay = Relay::start("kill", &["--workers", "1"]);
    let mut c = relay.connect();
    assert_eq!(c.roundtrip(b"one").as_deref(), Some(&b"one"[..]));
    let pid = relay.worker_pid(0);
    assert!(pid > 0);
    // SAFETY: signalling a process of our own test.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(eventually(Duration::from_secs(10), || {
        let p = relay.worker_pid(0);
        p != 0 && p != pid
    }));
    // Frames sent around the crash are still answered: they wait in the ring.
    assert_eq!(c.roundtrip(b"two").as_deref(), Some(&b"two"[..]));
    let mut fresh = relay.connect();
    assert_eq!(fresh.roundtrip(b"three").as_deref(), Some(&b"three"[..]));
    assert_eq!(relay.stats().worker(0).crashes.load(Ordering::Relaxed), 1);
}

#[test]
fn sigterm_under_load_drains_and_leaves_nothing() {
    let mut relay = Relay::start("term", &["--drain-ms", "3000"]);
    let pids = relay.child_pids();
    assert_eq!(pids.len(), 3, "one front and two workers");
    let addr = relay.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loaders: Vec<_> = (0..16)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut answered = 0;
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let p = pattern(i, seq, 512);
                    c.send(&p);
                    match c.recv() {
                        // Every reply that arrives is the right one.
                        Some(r) => {
                            assert_eq!(r, p);
                            answered += 1;
                        }
                        // Or a clean close at shutdown.
                        None => return answered,
                    }
                    seq += 1;
                }
                answered
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    relay.signal(libc::SIGTERM);
    assert_eq!(
        relay.wait_exit(Duration::from_secs(15)),
        Some(0),
        "supervisor exits cleanly"
    );
    stop.store(true, Ordering::Relaxed);
    let answered: usize = loaders.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(answered > 0);
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the supervisor");
    }
    assert!(
        relay.shm_files().is_empty(),
        "segments left: {:?}",
        relay.shm_files()
    );
}

#[test]
fn sigkill_of_the_supervisor_leaves_no_process() {
    let mut relay = Relay::start("kill9", &["--fronts", "2"]);
    let pids = relay.child_pids();
    assert_eq!(pids.len(), 4);
    let mut c = relay.connect();
    assert_eq!(c.roundtrip(b"x").as_deref(), Some(&b"x"[..]));
    relay.signal(libc::SIGKILL);
    relay.wait_exit(Duration::from_secs(5));
    let unique: HashSet<u32> = pids.iter().copied().collect();
    assert!(
        eventually(Duration::from_secs(5), || unique.iter().all(|&p| !alive(p))),
        "children outlived a SIGKILLed supervisor"
    );
    // The next start of the same instance removes the stale segments.
    assert!(!relay.shm_files().is_empty());
}

#[test]
fn second_instance_with_the_same_name_is_refused() {
    let relay = Relay::start("dup", &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shmrelay"))
        .args(["--listen", "127.0.0.1:0", "--instance", &relay.instance])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    let mut c = relay.connect();
    assert_eq!(
        c.roundtrip(b"still fine").as_deref(),
        Some(&b"still fine"[..])
    );
}

#[test]
fn prometheus_metrics_are_served_over_http() {
    let relay = Relay::start("metrics", &["--metrics", "127.0.0.1:0"]);
    let mut c = relay.connect();
    assert_eq!(c.roundtrip(b"count me").as_deref(), Some(&b"count me"[..]));
    let addr = relay
        .metrics
        .expect("the relay printed its metrics address");
    // The endpoint serves the published view, which lags by up to 50 ms.
    let _ = relay.stats();
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("application/openmetrics-text; version=1.0.0"));
    let accepts = body
        .lines()
        .find(|l| l.starts_with("shmrelay_front_accepts_total{"))
        .unwrap_or_else(|| panic!("no accepts metric in:\n{body}"));
    assert!(accepts.ends_with(" 1"), "{accepts}");
    // Every sample line is `name{labels} value` with a number.
    let samples = body.split("\r\n\r\n").nth(1).unwrap();
    for line in samples
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
    }
}
