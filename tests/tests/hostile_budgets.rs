//! Per-front budgets against hostile clients (issue 12, items 5 and 6): what many connections
//! hold together in one front (queued replies, partial frames) is bounded, the largest holders
//! are closed first, and a normal client keeps being served.

use std::time::{Duration, Instant};

use shmrelay_tests::{
    eventually, frame, pattern, Client, CloseReason, Probe, Relay, SocketOpts, Watchdog,
};

const SEC: Duration = Duration::from_secs(1);
const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn queued(relay: &Relay) -> usize {
    relay.front(0, |f| &f.queued_bytes) as usize
}

/// A client with a 4 KiB receive buffer that never reads: its echoes back up in the front.
fn non_reader(relay: &Relay) -> Client {
    let opts = SocketOpts {
        rcvbuf: Some(4096),
        ..SocketOpts::default()
    };
    Client::connect_with(relay.addr, opts, 10 * SEC).expect("connect")
}

/// Waits until the front's queued total stops moving; returns it.
fn settled(relay: &Relay) -> usize {
    let mut last = queued(relay);
    let end = Instant::now() + 10 * SEC;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = queued(relay);
        if now == last || Instant::now() > end {
            return now;
        }
        last = now;
    }
}

#[test]
fn queued_replies_stay_under_the_front_budget_and_the_largest_queue_goes_first() {
    const BUDGET: usize = 4 * MIB;
    const SMALL: usize = 8;
    let _w = Watchdog::new("pending_budget", Duration::from_secs(240));
    let budget = format!("pending_budget={BUDGET}");
    // The per-connection bound far above the budget: only the front's budget can act.
    let relay = Relay::start(
        "pendbudget",
        &[
            "--workers",
            "1",
            "--set",
            &budget,
            "--set",
            "max_pending=67108864",
        ],
    );
    let probe = Probe::start(relay.addr, Duration::from_millis(20), 30 * SEC);
    let f = frame(&pattern(1, 0, 16 * KIB));
    // Small queues first: each client writes until the front queues about 128 KiB more for it
    // (the kernel's buffers take the first MiBs).
    let mut smalls = Vec::new();
    for i in 0..SMALL {
        let mut c = non_reader(&relay);
        let base = settled(&relay);
        let mut sent = 0;
        while queued(&relay) < base + 128 * KIB {
            c.send_raw(&f).expect("a small non-reader's write");
            sent += f.len();
            assert!(sent < 64 * MIB, "client {i}: nothing queued after 64 MiB");
            std::thread::sleep(Duration::from_millis(2));
        }
        smalls.push(c);
    }
    let before_big = settled(&relay);
    eprintln!("{SMALL} small non-readers queue {} KiB", before_big / KIB);
    assert!(
        before_big < BUDGET,
        "the small queues alone are over the budget"
    );
    assert_eq!(relay.closes(CloseReason::SlowConsumer), 0);

    // One client that writes on and on: its queue becomes the largest and passes the budget.
    let addr_relay = &relay;
    let mut big = non_reader(addr_relay);
    let writer = std::thread::spawn(move || {
        let f = frame(&pattern(2, 0, 64 * KIB));
        let mut sent = 0usize;
        while sent < 512 * MIB {
            if let Err(e) = big.send_raw(&f) {
                return (sent, Some(e.kind()));
            }
            sent += f.len();
        }
        (sent, None)
    });
    let closed = eventually(60 * SEC, || relay.closes(CloseReason::SlowConsumer) >= 1);
    let (sent, err) = writer.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let peak = relay.front(0, |f| &f.queued_peak) as usize;
    // The small ones (and the probe) are still open.
    let open = relay.front(0, |f| &f.conns_open);
    let report = probe.finish();
    eprintln!(
        "big writer sent {} MiB, ended with {err:?}; queued peak {} KiB; closes: {}; probe {report:?}",
        sent / MIB,
        peak / KIB,
        relay.close_summary()
    );
    assert!(closed, "nobody closed: {}", relay.close_summary());
    assert!(
        matches!(
            err,
            Some(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
        ),
        "the big writer's writes ended with {err:?}, not a closed connection"
    );
    // Exactly the largest queue went, as a slow consumer, by the budget.
    assert_eq!(relay.closes(CloseReason::SlowConsumer), 1);
    assert_eq!(relay.front(0, |f| &f.pending_budget_closes), 1);
    assert_eq!(
        open,
        SMALL as u64 + 1,
        "the small non-readers and the probe stay open"
    );
    assert!(
        peak <= BUDGET,
        "queued total reached {peak} bytes, over the budget of {BUDGET}"
    );
    assert!(queued(&relay) <= BUDGET);
    assert_eq!(
        report.failures, 0,
        "the probe kept its round trips: {report:?}"
    );
    assert!(report.rounds > 0);
    drop(smalls);
    assert!(eventually(10 * SEC, || relay.conns_total() == 0));
    assert_eq!(queued(&relay), 0, "the gauge returns to zero");
}
