//! Long-lived connections: admission control, heartbeats and timeouts, slow clients and
//! backpressure, across real processes on loopback.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmrelay::stats::RejectReason;
use shmrelay_tests::{eventually, pattern, Client, Relay};
use shmrelay_worker::CloseReason;

fn journal_worker() -> String {
    format!(
        "worker_cmd={:?}",
        format!("{} worker journal", env!("CARGO_BIN_EXE_shmrelay"))
    )
}

fn rejects(relay: &Relay, reason: RejectReason) -> u64 {
    let s = relay.stats();
    (0..2)
        .map(|f| s.front(f).rejects[reason as usize].load(Ordering::Relaxed))
        .sum()
}

fn closes(relay: &Relay, reason: CloseReason) -> u64 {
    let s = relay.stats();
    (0..2)
        .map(|f| s.front(f).closes[reason as usize].load(Ordering::Relaxed))
        .sum()
}

#[test]
fn connection_cap_is_global_across_fronts_and_refuses_at_once() {
    const LIMIT: usize = 40;
    let relay = Relay::start("cap", &["--fronts", "2", "--max-conns", &LIMIT.to_string()]);
    // Twice the limit, from several client threads at once.
    let addr = relay.addr;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut clients: Vec<Client> =
                    (0..2 * LIMIT / 4).map(|_| Client::connect(addr)).collect();
                let t = Instant::now();
                let served = clients
                    .iter_mut()
                    .filter_map(|c| c.try_roundtrip(b"hi"))
                    .count();
                (clients, served, t.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let served: usize = results.iter().map(|r| r.1).sum();
    assert_eq!(served, LIMIT, "exactly the limit is served");
    for r in &results {
        assert!(
            r.2 < Duration::from_secs(5),
            "refusals are immediate, not timeouts ({:?})",
            r.2
        );
    }
    assert_eq!(rejects(&relay, RejectReason::ConnLimit), LIMIT as u64);
    let s = relay.stats();
    assert_eq!(s.header().conns_total.load(Ordering::Relaxed), LIMIT as u64);
    drop(results);
    // Places are given back on close.
    assert!(eventually(Duration::from_secs(5), || s
        .header()
        .conns_total
        .load(Ordering::Relaxed)
        == 0));
    let mut again = relay.connect();
    assert_eq!(again.try_roundtrip(b"x").as_deref(), Some(&b"x"[..]));
}

#[test]
fn per_address_cap_and_accept_rate() {
    let relay = Relay::start("peraddr", &["--set", "max_conns_per_addr=5"]);
    let mut from1: Vec<Client> = (0..8)
        .map(|_| Client::connect_from(relay.addr, Ipv4Addr::new(127, 0, 0, 1)))
        .collect();
    let served = from1
        .iter_mut()
        .filter_map(|c| c.try_roundtrip(b"a"))
        .count();
    assert_eq!(served, 5);
    // Another source address has its own allowance.
    let mut from2: Vec<Client> = (0..5)
        .map(|_| Client::connect_from(relay.addr, Ipv4Addr::new(127, 0, 0, 2)))
        .collect();
    assert_eq!(
        from2
            .iter_mut()
            .filter_map(|c| c.try_roundtrip(b"b"))
            .count(),
        5
    );
    assert_eq!(rejects(&relay, RejectReason::PerAddress), 3);
    drop(relay);

    let relay = Relay::start(
        "rate",
        &["--set", "accept_rate=5", "--set", "accept_burst=4"],
    );
    let mut burst: Vec<Client> = (0..12).map(|_| relay.connect()).collect();
    let served = burst
        .iter_mut()
        .filter_map(|c| c.try_roundtrip(b"r"))
        .count();
    // The burst, plus at most what refilled (5/s) while the test ran.
    assert!((4..=6).contains(&served), "served {served}");
    assert_eq!(rejects(&relay, RejectReason::Rate), 12 - served as u64);
}

const FAST_PINGS: [&str; 6] = [
    "--set",
    "ping_min_ms=100",
    "--set",
    "ping_max_ms=200",
    "--set",
    "heartbeat_timeout_ms=600",
];

#[test]
fn silent_client_is_closed_and_worker_told_why_while_a_ponging_client_stays() {
    let mut args = FAST_PINGS.to_vec();
    let w = journal_worker();
    args.extend(["--workers", "1", "--set", &w]);
    let relay = Relay::start("heartbeat", &args);
    let mut silent = relay.connect();
    let mut alive = relay.connect();
    // The live client answers every ping (a length-0 frame) with a length-0 frame.
    let stop = Arc::new(AtomicBool::new(false));
    let pongs = Arc::new(AtomicU64::new(0));
    let t = {
        let (stop, pongs) = (stop.clone(), pongs.clone());
        let mut c = Client::from_stream(alive.stream.try_clone().unwrap());
        std::thread::spawn(move || {
            c.stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let mut h = [0u8; 4];
                if std::io::Read::read_exact(&mut c.stream, &mut h).is_ok() && h == [0; 4] {
                    c.send(b"");
                    pongs.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let t0 = Instant::now();
    assert!(
        silent.closed_within(Duration::from_secs(5)),
        "the silent client was not closed"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "closed too early: {waited:?}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    assert!(
        pongs.load(Ordering::Relaxed) >= 3,
        "the live client was pinged and answered"
    );
    // Still connected after more than twice the timeout.
    alive
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        alive.try_roundtrip(b"still here").as_deref(),
        Some(&b"still here"[..])
    );
    // A fresh connection (an idle one would be pinged and closed too) asks the worker.
    let mut observer = relay.connect();
    let journal = String::from_utf8(observer.try_roundtrip(b"journal?").unwrap()).unwrap();
    assert!(
        journal.contains("heartbeat_timeout"),
        "the worker got the reason: {journal}"
    );
    assert!(closes(&relay, CloseReason::HeartbeatTimeout) >= 1);
    assert!(relay.stats().front(0).pings_sent.load(Ordering::Relaxed) >= 3);
}

#[test]
fn client_that_sends_its_own_heartbeats_is_not_pinged() {
    // Pings after 100 ms of silence; this client beats every 150 ms. Its beats prove it alive,
    // so the relay waits the longest interval (600 ms here, so that a late beat on a loaded
    // machine stays well inside it) before pinging it: never, here.
    let relay = Relay::start(
        "ownbeats",
        &[
            "--set",
            "ping_min_ms=100",
            "--set",
            "ping_max_ms=600",
            "--set",
            "heartbeat_timeout_ms=1800",
        ],
    );
    let mut c = relay.connect();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let t0 = Instant::now();
    let mut beats = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            c.try_roundtrip(b"").as_deref(),
            Some(&b""[..]),
            "beat answered"
        );
        beats += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(beats >= 8);
    let f = relay.stats();
    assert_eq!(f.front(0).pings_sent.load(Ordering::Relaxed), 0);
    assert!(f.front(0).heartbeats.load(Ordering::Relaxed) >= beats);
    assert_eq!(c.try_roundtrip(b"alive").as_deref(), Some(&b"alive"[..]));
    assert_eq!(closes(&relay, CloseReason::HeartbeatTimeout), 0);
}

#[test]
fn slowloris_is_closed_at_its_timeout() {
    let relay = Relay::start("slowloris", &FAST_PINGS);
    let mut c = relay.connect();
    use std::io::Write;
    // Announce 100 bytes, then trickle them one by one: bytes arrive, frames never do.
    c.stream.write_all(&[0, 0, 0, 100]).unwrap();
    let t0 = Instant::now();
    let mut closed = false;
    for _ in 0..50 {
        if c.stream.write_all(b"z").is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if c.closed_within(Duration::from_millis(1)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "a slowloris client stayed connected");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(closes(&relay, CloseReason::HeartbeatTimeout), 1);
}

#[test]
fn client_that_never_reads_is_dropped_and_others_keep_going() {
    let relay = Relay::start("slow", &["--set", "max_pending=262144"]);
    let addr = relay.addr;
    // 100 well-behaved clients doing round trips; count them per phase.
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let good: Vec<_> = (0..100)
        .map(|i| {
            let (done, stop) = (done.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let p = pattern(i, seq, 64);
                    assert_eq!(c.try_roundtrip(&p).as_deref(), Some(&p[..]));
                    done.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = done.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let baseline = (done.load(Ordering::Relaxed) - before) as f64 / t0.elapsed().as_secs_f64();

    // The bad client writes requests as fast as it can and never reads a reply.
    let mut bad = Client::connect(addr);
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let frame = [&(4096u32).to_be_bytes()[..], &[9u8; 4096][..]].concat();
        let mut sent = 0u64;
        while bad.stream.write_all(&frame).is_ok() {
            sent += 1;
            if sent > 200_000 {
                break;
            }
        }
        sent
    });
    let t1 = Instant::now();
    let mid = done.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(20), || closes(
            &relay,
            CloseReason::SlowConsumer
        ) == 1),
        "the slow client was never disconnected"
    );
    let dropped_after = t1.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let during = (done.load(Ordering::Relaxed) - mid) as f64 / t1.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for g in good {
        g.join().unwrap();
    }
    let sent = writer.join().unwrap();
    eprintln!(
        "100 clients: {baseline:.0} round trips/s before, {during:.0}/s while a non-reading client was connected; \
         it was dropped after {dropped_after:?} having written {sent} frames of 4 KiB"
    );
    assert!(during > 0.0, "the other clients kept going");
    assert_eq!(
        closes(&relay, CloseReason::SlowConsumer),
        1,
        "only the slow client was dropped"
    );
}

#[test]
fn stopped_worker_fills_its_ring_then_everything_arrives_when_it_resumes() {
    // A small ring so that it fills fast.
    let relay = Relay::start(
        "backpressure",
        &[
            "--workers",
            "1",
            "--ring-capacity",
            "65536",
            "--max-frame",
            "16000",
        ],
    );
    let pid = relay.worker_pid(0);
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"warm").as_deref(), Some(&b"warm"[..]));
    // SAFETY: signalling our own test's worker.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    const N: usize = 400;
    let mut writer = Client::from_stream(c.stream.try_clone().unwrap());
    let w = std::thread::spawn(move || {
        for i in 0..N {
            writer.send(&pattern(7, i, 8000));
        }
    });
    assert!(
        eventually(Duration::from_secs(10), || relay
            .stats()
            .front(0)
            .ring_full_stalls
            .load(Ordering::Relaxed)
            > 0),
        "the ring never filled"
    );
    let stalled_at = relay.stats().front(0).frames_in.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        relay.stats().front(0).frames_in.load(Ordering::Relaxed),
        stalled_at,
        "the front kept reading a full ring's client"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    for i in 0..N {
        assert_eq!(c.recv().expect("reply"), pattern(7, i, 8000), "reply {i}");
    }
    w.join().unwrap();
}
