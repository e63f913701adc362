//! Connect-and-close at up to 10,000 per second: the relay keeps serving a probe client, every
//! accepted connection is closed and given back, and the front holds no more fds afterwards.
//! Alone in its test binary so that the flood does not starve other tests' timeouts.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmrelay_tests::{
    eventually, fd_count, frame, raw_connect, set_linger_zero, CloseReason, Probe, RejectReason,
    Relay, SocketOpts, Watchdog,
};

const THREADS: u64 = 4;
const RATE: u64 = 10_000;
const FLOOD: Duration = Duration::from_secs(2);
const SEC: Duration = Duration::from_secs(1);

/// Open fds of `pid`, read until two readings agree (the front briefly opens /proc/self/fd
/// for its own leak check every few seconds).
fn stable_fds(pid: u32) -> usize {
    let mut last = fd_count(pid);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = fd_count(pid);
        if now == last {
            return now;
        }
        last = now;
    }
}

#[test]
fn ten_thousand_connect_and_close_per_second_leak_nothing_and_stall_nobody() {
    let _w = Watchdog::new("connect_flood", Duration::from_secs(180));
    let relay = Relay::start_serving("flood", &[]);
    let front = relay.front_pid(0);
    let restarts = relay.front_restarts(0);
    let probe = Probe::start(relay.addr, Duration::from_millis(10), 10 * SEC);
    assert!(eventually(10 * SEC, || relay.conns_total() == 1 && probe.rounds() > 0));
    let fds_before = stable_fds(front);
    let accepts_before = relay.front(0, |f| &f.accepts);
    let closes_before: u64 = CloseReason::ALL.iter().map(|&r| relay.closes(r)).sum();

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let rounds_before = probe.rounds();
    let t0 = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|i| {
            let (ok, failed, addr) = (ok.clone(), failed.clone(), relay.addr);
            std::thread::spawn(move || {
                // Each thread its own source address: its own ephemeral ports and TIME_WAITs.
                let opts = SocketOpts {
                    source: Some(Ipv4Addr::new(127, 0, 0, 2 + i as u8)),
                    ..SocketOpts::default()
                };
                let per = RATE / THREADS;
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < FLOOD {
                    // Paced: connection n goes at n / per seconds, never faster.
                    let due = start + Duration::from_nanos(n * 1_000_000_000 / per);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    n += 1;
                    match raw_connect(addr, opts, SEC) {
                        Ok(s) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            match n % 3 {
                                // Close with a reset.
                                0 => set_linger_zero(&s),
                                // Send a frame and close without reading the reply.
                                1 => {
                                    let _ = std::io::Write::write_all(&mut &s, &frame(b"bye"));
                                }
                                // Plain close (FIN).
                                _ => {}
                            }
                            drop(s);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let took = t0.elapsed();
    let rounds_during = probe.rounds() - rounds_before;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));

    // Every connection accepted is closed and its place given back; the probe's stays.
    let settled = eventually(30 * SEC, || {
        relay.conns_total() == 1 && relay.front(0, |f| &f.conns_open) == 1
    });
    let accepts = relay.front(0, |f| &f.accepts) - accepts_before;
    let closes: u64 = CloseReason::ALL
        .iter()
        .map(|&r| relay.closes(r))
        .sum::<u64>()
        - closes_before;
    let fds_settled = eventually(15 * SEC, || fd_count(front) == fds_before);
    let fds_after = stable_fds(front);
    let report = probe.finish();
    eprintln!(
        "{ok} connect-and-close in {took:?} ({:.0}/s), {failed} connects failed; front accepted \
         {accepts}, closed {closes} ({}); probe: {rounds_during} round trips during the flood, \
         {report:?}; front fds {fds_before} -> {fds_after}",
        ok as f64 / took.as_secs_f64(),
        relay.close_summary()
    );
    assert!(ok > 0);
    assert!(settled, "connections still open: {}", relay.conns_total());
    assert_eq!(closes, accepts, "every accepted connection was closed");
    assert!(accepts <= ok, "accepted {accepts} of {ok} connections made");
    for r in RejectReason::ALL {
        assert_eq!(relay.front(0, |f| &f.rejects[r as usize]), 0, "{r:?}");
    }
    assert!(fds_settled, "front fds {fds_before} -> {fds_after}");
    assert_eq!(
        report.failures, 0,
        "the probe was served throughout: {report:?}"
    );
    assert!(
        rounds_during > 0,
        "the probe made no round trip during the flood"
    );
    assert_eq!(relay.front_pid(0), front, "the front was not replaced");
    assert_eq!(relay.front_restarts(0), restarts);
    assert!(eventually(10 * SEC, || relay.conns_total() == 0));
}
