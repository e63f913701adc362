//! Hostile client input against a real relay on loopback: each case asserts the documented
//! outcome listed in tests/README.md.

use std::time::{Duration, Instant};

use shmrelay_tests::{
    eventually, expected_outcome, frame, pattern, signal, too_large_text, Client, CloseReason,
    Probe, Recv, Relay, Rng, SocketOpts, Watchdog, DEFAULT_MAX_FRAME, HEADER, SIGCONT, SIGSTOP,
};

/// Pings every 200-400 ms and a 1.5 s heartbeat timeout: short enough for tests, long enough
/// that a busy 2-core machine never starves a well-behaved client into a timeout.
const FAST_TIMEOUT: [&str; 6] = [
    "--set",
    "ping_min_ms=200",
    "--set",
    "ping_max_ms=400",
    "--set",
    "heartbeat_timeout_ms=1500",
];
const TIMEOUT: Duration = Duration::from_millis(1500);
/// How early a timeout may fire. The front keeps time in 10 ms ticks read at the top of its
/// loop turn, before it sleeps in poll (up to 20 ms while it has timers, 100 ms without), and
/// stamps what the poll returns (an accept, a read) with that tick: a connection's clock can
/// start up to one sleep and a tick before the event, so its timeout can fire that much early.
const EARLY: Duration = Duration::from_millis(150);
const SEC: Duration = Duration::from_secs(1);

/// The front counts a protocol error before it writes the error frame, and the close just
/// after it: wait for the close count, then both must equal `n` (and stay there).
fn assert_counts(relay: &Relay, n: u64) {
    eventually(5 * SEC, || relay.closes(CloseReason::ProtocolError) >= n);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(relay.front(0, |f| &f.protocol_errors), n, "protocol errors");
    assert_eq!(
        relay.closes(CloseReason::ProtocolError),
        n,
        "protocol error closes: {}",
        relay.close_summary()
    );
}

fn assert_error_then_close(c: &mut Client, len: u32, max: u32, what: &str) {
    match c.wait_closed(10 * SEC) {
        Some((end, frames)) => {
            eprintln!("{what}: {} frame(s), then {end:?}", frames.len());
            assert_eq!(
                frames,
                vec![too_large_text(len, max)],
                "{what}: exactly one frame, the error text, before the close ({end:?})"
            );
            assert!(
                matches!(end, Recv::Eof { leftover: 0 } | Recv::Reset),
                "{what}: closed cleanly after the error frame, got {end:?}"
            );
        }
        None => panic!("{what}: still open 10 s after an oversized length"),
    }
}

#[test]
fn length_ffffffff_gets_the_error_frame_then_close_and_others_are_unaffected() {
    let _w = Watchdog::new("length_ffffffff", Duration::from_secs(120));
    let relay = Relay::start_serving("ffffffff", &[]);
    let mut bystander = relay.connect();
    assert_eq!(
        bystander.roundtrip_within(b"before", 10 * SEC),
        Recv::Frame(b"before".to_vec())
    );

    // The header alone.
    let mut hostile = relay.connect();
    hostile.send_raw(&[0xff; 4]).unwrap();
    assert_error_then_close(&mut hostile, u32::MAX, DEFAULT_MAX_FRAME, "header only");
    assert_counts(&relay, 1);

    // The header followed by a flood of bytes (written by a thread: the relay stops reading).
    let mut hostile = relay.connect();
    let mut writer = hostile.stream.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        use std::io::Write;
        let mut junk = vec![0xffu8; 256 * 1024];
        Rng::new(7)
            .bytes(4096)
            .iter()
            .enumerate()
            .for_each(|(i, b)| junk[4 + i] = *b);
        let _ = writer.write_all(&junk);
    });
    assert_error_then_close(&mut hostile, u32::MAX, DEFAULT_MAX_FRAME, "header and junk");
    t.join().unwrap();
    assert_counts(&relay, 2);

    // Nobody else noticed.
    for i in 0..50 {
        let p = pattern(1, i, 1 + i * 37);
        assert_eq!(bystander.roundtrip_within(&p, 10 * SEC), Recv::Frame(p));
    }
    let mut fresh = relay.connect();
    assert_eq!(
        fresh.roundtrip_within(b"after", 10 * SEC),
        Recv::Frame(b"after".to_vec())
    );
    assert_counts(&relay, 2);
    drop((bystander, fresh));
    assert!(eventually(10 * SEC, || relay.conns_total() == 0));
}

#[test]
fn a_frame_of_exactly_max_frame_is_echoed_and_one_byte_more_is_refused() {
    let _w = Watchdog::new("max_frame_edges", Duration::from_secs(180));
    for max in [1000u32, DEFAULT_MAX_FRAME] {
        let set = format!("max_frame={max}");
        let relay = Relay::start_serving(&format!("limit{max}"), &["--set", &set]);

        // Exactly the limit: accepted and echoed, byte for byte; twice, to cross the carry.
        let mut c = relay.connect();
        for seq in 0..2 {
            let p = pattern(max as usize, seq, max as usize);
            assert_eq!(
                c.roundtrip_within(&p, 30 * SEC),
                Recv::Frame(p),
                "limit {max}"
            );
        }

        // One byte over, header only.
        let mut over = relay.connect();
        over.send_raw(&(max + 1).to_be_bytes()).unwrap();
        assert_error_then_close(&mut over, max + 1, max, "limit+1, header only");

        // One byte over, header and the whole payload, as a real client would send it.
        let mut over = relay.connect();
        let mut w = over.stream.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(&frame(&pattern(9, 9, max as usize + 1)));
        });
        assert_error_then_close(&mut over, max + 1, max, "limit+1 with its payload");
        t.join().unwrap();

        assert_counts(&relay, 2);
        // The connection that sent the limit is still served.
        let p = pattern(3, 3, max as usize);
        assert_eq!(c.roundtrip_within(&p, 30 * SEC), Recv::Frame(p));
    }
}

#[test]
fn truncated_header_then_silence_is_closed_at_the_heartbeat_timeout() {
    let _w = Watchdog::new("truncated_header", Duration::from_secs(120));
    let relay = Relay::start_serving("truncated", &FAST_TIMEOUT);
    let probe = Probe::start(relay.addr, Duration::from_millis(50), 10 * SEC);
    let mut cases: Vec<(usize, Client, Instant)> = (1..HEADER)
        .map(|n| {
            let mut c = relay.connect();
            let t = Instant::now();
            c.send_raw(&[0u8, 0, 1][..n]).unwrap();
            (n, c, t)
        })
        .collect();
    for (n, c, t) in &mut cases {
        let Some((end, frames)) = c.wait_closed(20 * SEC) else {
            panic!("{n} header bytes then silence: still open after 20 s");
        };
        let waited = t.elapsed();
        assert!(
            matches!(end, Recv::Eof { leftover: 0 } | Recv::Reset),
            "{n} bytes: {end:?}"
        );
        assert!(
            frames.iter().all(|f| f.is_empty()),
            "{n} bytes: only pings may arrive before the close, got {frames:?}"
        );
        assert!(
            waited + EARLY >= TIMEOUT,
            "{n} bytes: closed after {waited:?}, before the heartbeat timeout"
        );
    }
    assert!(eventually(5 * SEC, || relay
        .closes(CloseReason::HeartbeatTimeout)
        == 3));
    assert_eq!(relay.front(0, |f| &f.protocol_errors), 0);
    let report = probe.finish();
    assert_eq!(report.failures, 0, "probe: {report:?}");
    assert!(report.rounds > 0);
    assert_eq!(
        relay.closes(CloseReason::HeartbeatTimeout),
        3,
        "only the truncated ones timed out: {}",
        relay.close_summary()
    );
}

/// Random bytes, or random valid frames with a random tail: the expected outcome is computed
/// from the bytes with the framing rule (`expected_outcome`).
fn garbage(seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    if seed % 2 == 0 {
        let n = 1 + r.below(8192) as usize;
        r.bytes(n)
    } else {
        let mut v = Vec::new();
        for _ in 0..r.below(12) {
            let len = match r.below(4) {
                0 => 0,
                _ => r.below(300) as usize,
            };
            v.extend(frame(&r.bytes(len)));
        }
        let tail = r.below(12) as usize;
        v.extend(r.bytes(tail));
        v
    }
}

#[test]
fn random_garbage_gets_what_the_framing_rule_says() {
    let _w = Watchdog::new("random_garbage", Duration::from_secs(180));
    let relay = Relay::start_serving("garbage", &[]);
    let mut probe = relay.connect();
    let mut open = Vec::new();
    let mut errors = 0;
    let (mut kinds_error, mut kinds_open) = (0, 0);
    for seed in 1..=40u64 {
        let bytes = garbage(seed);
        let want = expected_outcome(&bytes, DEFAULT_MAX_FRAME);
        let mut c = relay.connect();
        c.send_raw(&bytes).unwrap();
        let what = format!("seed {seed} ({} bytes): {want:?}", bytes.len());
        match want.too_large {
            Some(len) => {
                // Every whole frame before the oversized header is served (echoed in order,
                // heartbeats answered); the error frame comes last, then the close.
                errors += 1;
                kinds_error += 1;
                let (end, frames) = c
                    .wait_closed(10 * SEC)
                    .unwrap_or_else(|| panic!("{what}: not closed"));
                assert!(
                    matches!(end, Recv::Eof { leftover: 0 } | Recv::Reset),
                    "{what}: {end:?}"
                );
                let (last, before) = frames
                    .split_last()
                    .unwrap_or_else(|| panic!("{what}: no error frame"));
                assert_eq!(last, &too_large_text(len, DEFAULT_MAX_FRAME), "{what}");
                let data: Vec<&Vec<u8>> = before.iter().filter(|f| !f.is_empty()).collect();
                assert!(
                    data.len() == want.echoes.len()
                        && data.iter().zip(&want.echoes).all(|(a, b)| *a == b),
                    "{what}: every frame before the error is echoed, in order"
                );
                assert_eq!(before.len() - data.len(), want.heartbeats, "{what}");
            }
            None => {
                kinds_open += 1;
                // Every whole frame is answered: data echoed in order, each heartbeat by one
                // length-0 frame; a partial frame at the end just waits.
                let mut echoes = Vec::new();
                let mut beats = 0;
                while echoes.len() < want.echoes.len() || beats < want.heartbeats {
                    match c.recv_within(10 * SEC) {
                        Recv::Frame(p) if p.is_empty() => beats += 1,
                        Recv::Frame(p) => echoes.push(p),
                        other => panic!("{what}: {other:?} after {echoes:?}, {beats} heartbeats"),
                    }
                }
                assert_eq!(echoes, want.echoes, "{what}");
                assert_eq!(beats, want.heartbeats, "{what}");
                open.push((what.clone(), c));
            }
        }
        // A well-behaved connection is served between the hostile ones.
        let p = pattern(0, seed as usize, 1 + seed as usize);
        assert_eq!(
            probe.roundtrip_within(&p, 10 * SEC),
            Recv::Frame(p),
            "{what}"
        );
    }
    assert!(kinds_error > 0 && kinds_open > 0, "both outcomes exercised");
    // The connections whose bytes were valid (up to a partial frame) stay open.
    std::thread::sleep(Duration::from_millis(300));
    for (what, c) in &mut open {
        assert!(!c.is_closed(), "{what}: closed, but its bytes were valid");
        assert_eq!(
            c.recv_within(Duration::from_millis(1)),
            Recv::Timeout,
            "{what}: nothing more"
        );
    }
    assert_counts(&relay, errors);
}

/// Frames sent by a client that then shuts down its sending side (`shutdown(SHUT_WR)`), and
/// the echoes a relay should send back before it closes.
fn half_close_round(relay: &Relay, round: usize) -> (Client, Vec<Vec<u8>>) {
    let mut c = relay.connect();
    let sent: Vec<Vec<u8>> = (0..10).map(|i| pattern(round, i, 100 + i)).collect();
    let bytes: Vec<u8> = sent.iter().flat_map(|p| frame(p)).collect();
    c.send_raw(&bytes).unwrap();
    (c, sent)
}

#[test]
fn half_closed_client_is_closed_and_gets_nothing_but_its_echoes() {
    // The relay closes a half-closed connection once its replies are out (at the latest at
    // the heartbeat timeout), and what came first are the echoes of its frames, in order.
    let _w = Watchdog::new("half_closed", Duration::from_secs(180));
    let relay = Relay::start_serving("halfclose", &FAST_TIMEOUT);
    for round in 0..8 {
        let (mut c, sent) = half_close_round(&relay, round);
        c.shutdown_write();
        let Some((end, frames)) = c.wait_closed(TIMEOUT + 10 * SEC) else {
            panic!("round {round}: a half-closed connection was never closed");
        };
        let data: Vec<Vec<u8>> = frames.into_iter().filter(|f| !f.is_empty()).collect();
        assert!(
            data.len() <= sent.len() && data.iter().zip(&sent).all(|(a, b)| a == b),
            "round {round}: replies are echoes in order"
        );
        assert_eq!(end, Recv::Eof { leftover: 0 }, "round {round}");
    }
    assert!(eventually(5 * SEC, || relay.conns_total() == 0));
}

#[test]
fn half_closed_client_gets_replies_still_at_the_worker() {
    let _w = Watchdog::new("half_closed_slow_worker", Duration::from_secs(120));
    let relay = Relay::start_serving(
        "halfclose-worker",
        &["--workers", "1", "--set", "kill_hung=false"],
    );
    let worker = relay.worker_pid(0);
    // The worker stops: the frames wait in its request ring, as under load.
    signal(worker, SIGSTOP);
    let frames_before = relay.front(0, |f| &f.frames_in);
    let (mut c, sent) = half_close_round(&relay, 0);
    assert!(eventually(10 * SEC, || relay.front(0, |f| &f.frames_in)
        >= frames_before + sent.len() as u64));
    c.shutdown_write();
    // The front sees the FIN (it arrives after the data was read, so it is a new edge).
    let saw_fin = eventually(5 * SEC, || relay.closes(CloseReason::ClientEof) >= 2);
    signal(worker, SIGCONT);
    let (end, frames) = c.wait_closed(20 * SEC).expect("closed");
    let data: Vec<Vec<u8>> = frames.into_iter().filter(|f| !f.is_empty()).collect();
    assert_eq!(
        data.len(),
        sent.len(),
        "replies lost: {} of {} arrived before {end:?} (the front saw the FIN: {saw_fin}; closes: {})",
        data.len(),
        sent.len(),
        relay.close_summary()
    );
    assert_eq!(data, sent);
    assert_eq!(end, Recv::Eof { leftover: 0 });
}

#[test]
fn fin_arriving_with_the_data_closes_at_once() {
    let _w = Watchdog::new("fin_with_data", Duration::from_secs(120));
    // A 10 s heartbeat timeout, far from the 2 s this test allows for the close.
    let relay = Relay::start_serving(
        "fin-with-data",
        &[
            "--set",
            "ping_min_ms=5000",
            "--set",
            "ping_max_ms=6000",
            "--set",
            "heartbeat_timeout_ms=10000",
        ],
    );
    let front = relay.front_pid(0);
    let eof_before = relay.closes(CloseReason::ClientEof);
    // Hold the front for a moment so that the data and the FIN are both pending when it looks:
    // what a busy front sees under load.
    signal(front, SIGSTOP);
    let (mut c, sent) = half_close_round(&relay, 0);
    c.shutdown_write();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    signal(front, SIGCONT);
    let (end, frames) = c.wait_closed(20 * SEC).expect("closed");
    let waited = t.elapsed();
    let data: Vec<Vec<u8>> = frames.into_iter().filter(|f| !f.is_empty()).collect();
    assert_eq!(data, sent, "every reply before the close");
    assert_eq!(end, Recv::Eof { leftover: 0 });
    assert!(
        waited < 2 * SEC,
        "closed {waited:?} after the FIN (closes: {})",
        relay.close_summary()
    );
    // The harness's own readiness connection and this one, both as client_eof (the count is
    // taken after the socket closed, so give it a moment).
    assert!(
        eventually(5 * SEC, || relay.closes(CloseReason::ClientEof) == 2),
        "{} (before: {eof_before})",
        relay.close_summary()
    );
}

#[test]
fn twenty_clients_that_never_read_are_all_dropped_as_slow_consumers() {
    const BAD: usize = 20;
    let _w = Watchdog::new("never_read", Duration::from_secs(240));
    let relay = Relay::start_serving("neverread", &["--set", "max_pending=65536"]);
    let probe = Probe::start(relay.addr, Duration::from_millis(20), 30 * SEC);
    let addr = relay.addr;
    let writers: Vec<_> = (0..BAD)
        .map(|i| {
            std::thread::spawn(move || {
                // A small receive buffer, so replies back up in the relay quickly.
                let opts = SocketOpts {
                    rcvbuf: Some(4096),
                    ..SocketOpts::default()
                };
                let mut c = Client::connect_with(addr, opts, 10 * SEC).expect("connect");
                let f = frame(&pattern(i, 0, 4096));
                let mut sent = 0usize;
                // Bounded: 64 MiB, or a write blocked for 10 s (the write timeout).
                while sent < 64 << 20 {
                    if let Err(e) = c.send_raw(&f) {
                        return (sent, Some(e.kind()));
                    }
                    sent += f.len();
                }
                (sent, None)
            })
        })
        .collect();
    let all_dropped = eventually(90 * SEC, || {
        relay.closes(CloseReason::SlowConsumer) >= BAD as u64
    });
    let ended: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let report = probe.finish();
    eprintln!(
        "{BAD} non-reading clients: wrote {:?} KiB before being dropped; probe {report:?}; closes: {}",
        ended.iter().map(|e| e.0 >> 10).collect::<Vec<_>>(),
        relay.close_summary()
    );
    assert!(all_dropped, "not all dropped: {}", relay.close_summary());
    assert_eq!(relay.closes(CloseReason::SlowConsumer), BAD as u64);
    for (i, (_, err)) in ended.iter().enumerate() {
        assert!(
            matches!(
                err,
                Some(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
            ),
            "client {i}: its writes ended with {err:?}, not a closed connection"
        );
    }
    assert_eq!(
        report.failures, 0,
        "the probe kept its round trips: {report:?}"
    );
    assert!(report.rounds > 0);
    assert!(eventually(10 * SEC, || relay.conns_total() == 0));
}

#[test]
fn fifty_slowloris_connections_are_all_closed_at_the_heartbeat_timeout() {
    const N: usize = 50;
    let _w = Watchdog::new("slowloris_50", Duration::from_secs(120));
    let relay = Relay::start_serving("slowloris50", &FAST_TIMEOUT);
    let probe = Probe::start(relay.addr, Duration::from_millis(50), 10 * SEC);
    // Each announces 100 bytes, then trickles one byte every 100 ms: bytes keep arriving,
    // a frame never does.
    let mut conns: Vec<(Client, Instant, Option<Duration>)> = (0..N)
        .map(|_| {
            let mut c = relay.connect();
            let t = Instant::now();
            c.send_raw(&[0, 0, 0, 100]).unwrap();
            (c, t, None)
        })
        .collect();
    let end = Instant::now() + 20 * SEC;
    while Instant::now() < end && conns.iter().any(|c| c.2.is_none()) {
        for (c, t, closed) in conns.iter_mut().filter(|c| c.2.is_none()) {
            if c.send_raw(b"z").is_err() || c.is_closed() {
                *closed = Some(t.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = probe.finish();
    let times: Vec<Option<Duration>> = conns.iter().map(|c| c.2).collect();
    assert!(
        times.iter().all(Option::is_some),
        "still open after 20 s: {} of {N}",
        times.iter().filter(|t| t.is_none()).count()
    );
    let earliest = times.iter().flatten().min().unwrap();
    assert!(
        *earliest + EARLY >= TIMEOUT,
        "a slowloris connection was closed after {earliest:?}, before the timeout"
    );
    assert!(eventually(5 * SEC, || relay
        .closes(CloseReason::HeartbeatTimeout)
        >= N as u64));
    assert_eq!(
        relay.closes(CloseReason::HeartbeatTimeout),
        N as u64,
        "{}",
        relay.close_summary()
    );
    assert_eq!(report.failures, 0, "probe: {report:?}");
    assert!(report.rounds > 0);
    assert!(eventually(5 * SEC, || relay.conns_total() == 0));
}
