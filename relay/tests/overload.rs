//! Issue 15: the relay never blames its clients for its own lateness. A front stopped
//! (SIGSTOP) for several heartbeat timeouts, then continued, closes none of its healthy
//! clients (answering pings, beating on their own, sending frames or the rest of a frame
//! while it was stopped), and still closes the one that really went silent.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::thread;
use std::time::{Duration, Instant};

use shmrelay_tests::{eventually, frame, read_frames, signal, Relay, Watchdog, SIGCONT, SIGSTOP};
use shmrelay_worker::CloseReason;

/// How a test client behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Answers the front's pings, says nothing else.
    Answers,
    /// Sends a heartbeat every 200 ms (and answers pings).
    Beats,
    /// Says nothing and answers nothing: really silent.
    Silent,
}

/// A client whose thread reads everything: answers pings (unless silent), passes data frames
/// on, and reports the close.
struct TestClient {
    kind: Kind,
    stream: TcpStream,
    frames: Receiver<Option<Vec<u8>>>,
}

impl TestClient {
    fn connect(addr: SocketAddr, kind: Kind) -> TestClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        // A ping (or the answer to a beat): answering a ping is what a healthy client does; an
        // extra length-0 frame to a beater's answer is one more beat.
        let frames = read_frames(stream.try_clone().unwrap(), kind != Kind::Silent);
        if kind == Kind::Beats {
            let mut w = stream.try_clone().unwrap();
            thread::spawn(move || {
                while w.write_all(&[0u8; 4]).is_ok() {
                    thread::sleep(Duration::from_millis(200));
                }
            });
        }
        TestClient {
            kind,
            stream,
            frames,
        }
    }

    /// The next data frame, or `None` at the close or after `limit`.
    fn next_frame(&self, limit: Duration) -> Option<Vec<u8>> {
        self.frames.recv_timeout(limit).ok().flatten()
    }

    fn send(&self, bytes: &[u8]) {
        (&self.stream).write_all(bytes).unwrap();
    }
}

#[test]
fn a_stopped_front_closes_none_of_its_healthy_clients() {
    let _w = Watchdog::new("overload", Duration::from_secs(180));
    let relay = Relay::start(
        "overload",
        &[
            "--workers",
            "1",
            "--set",
            "ping_min_ms=500",
            "--set",
            "ping_max_ms=500",
            "--set",
            "heartbeat_timeout_ms=2000",
            "--set",
            "frame_timeout_ms=2000",
            // The supervisor must not replace the stopped front: this test is about what the
            // front does once it runs again.
            "--set",
            "hang_timeout_ms=120000",
        ],
    );
    let addr = relay.addr;
    let mut clients = Vec::new();
    for i in 0..60 {
        let kind = if i % 3 == 0 {
            Kind::Beats
        } else {
            Kind::Answers
        };
        clients.push(TestClient::connect(addr, kind));
    }
    // Every client served once, and pinged or beating for a while (a few ping intervals).
    for (i, c) in clients.iter().enumerate() {
        let p = format!("hello {i}");
        c.send(&frame(p.as_bytes()));
        assert_eq!(
            c.next_frame(Duration::from_secs(20)).as_deref(),
            Some(p.as_bytes()),
            "client {i} before the stop"
        );
    }
    thread::sleep(Duration::from_secs(2));
    let s = relay.stats();
    let fs = s.front(0);
    assert_eq!(
        fs.conns_open.load(Ordering::Relaxed),
        60,
        "{}",
        relay.close_summary()
    );
    let pings_before = fs.pings_sent.load(Ordering::Relaxed);
    assert!(pings_before > 0, "the answering clients were pinged");
    // A client that goes really silent, and one that starts a frame just before the stop.
    let silent = TestClient::connect(addr, Kind::Silent);
    let halves = TestClient::connect(addr, Kind::Answers);
    let whole = frame(b"split across the stop");
    halves.send(&whole[..7]);
    thread::sleep(Duration::from_millis(300));

    let front = relay.front_pid(0);
    signal(front, SIGSTOP);
    let stopped = Instant::now();
    // Meanwhile (3x the heartbeat timeout): some clients send frames, the split frame is
    // completed, the beaters beat and nobody is answered.
    thread::sleep(Duration::from_secs(2));
    for (i, c) in clients.iter().enumerate().filter(|(i, _)| i % 10 == 1) {
        c.send(&frame(format!("during {i}").as_bytes()));
    }
    halves.send(&whole[7..]);
    thread::sleep(Duration::from_secs(4));
    signal(front, SIGCONT);
    let stop_ms = stopped.elapsed().as_millis() as u64;

    // What was sent meanwhile is served.
    for (i, c) in clients.iter().enumerate().filter(|(i, _)| i % 10 == 1) {
        let p = format!("during {i}");
        assert_eq!(
            c.next_frame(Duration::from_secs(20)).as_deref(),
            Some(p.as_bytes()),
            "client {i}: the frame sent while the front was stopped ({})",
            relay.close_summary()
        );
    }
    assert_eq!(
        halves.next_frame(Duration::from_secs(20)).as_deref(),
        Some(&b"split across the stop"[..]),
        "the frame completed while the front was stopped ({})",
        relay.close_summary()
    );
    // The silent one is still closed for its silence, once its timeout passed in the front's
    // own time.
    assert!(
        eventually(Duration::from_secs(30), || relay
            .closes(CloseReason::HeartbeatTimeout)
            == 1),
        "the silent client was not closed: {}",
        relay.close_summary()
    );
    assert_eq!(silent.next_frame(Duration::from_secs(5)), None);
    assert_eq!(silent.kind, Kind::Silent);
    // Several heartbeat timeouts after the stop, every healthy client is open and served.
    thread::sleep(Duration::from_secs(4));
    for (i, c) in clients.iter().enumerate() {
        let p = format!("after {i}");
        c.send(&frame(p.as_bytes()));
        assert_eq!(
            c.next_frame(Duration::from_secs(20)).as_deref(),
            Some(p.as_bytes()),
            "{:?} client {i} after the stop: {}",
            c.kind,
            relay.close_summary()
        );
    }
    let s = relay.stats();
    let fs = s.front(0);
    assert_eq!(
        relay.close_summary(),
        "heartbeat_timeout=1",
        "only the silent client was closed"
    );
    assert_eq!(fs.conns_open.load(Ordering::Relaxed), 61);
    assert_eq!(fs.frame_timeouts.load(Ordering::Relaxed), 0);
    assert!(
        fs.pings_sent.load(Ordering::Relaxed) > pings_before,
        "pinging went on after the stop"
    );
    // The lateness is counted for operators: most of the stop (the loop was asleep for at
    // most 100 ms of it).
    let lag = fs.lag_ms.load(Ordering::Relaxed);
    assert!(
        lag >= stop_ms.saturating_sub(1_000) && lag <= stop_ms + 5_000,
        "lag_ms {lag} for a stop of {stop_ms} ms"
    );
    assert_eq!(relay.front_pid(0), front, "the front was not replaced");
}
