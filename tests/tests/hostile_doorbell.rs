//! Issue 12.10: a worker that writes its front's doorbell (an eventfd) in a loop must not cost
//! the front a core, and clients keep being served.

use std::time::{Duration, Instant};

use shmrelay_tests::{pattern, shmrelay_bin, Recv, Relay, Watchdog};

const SEC: Duration = Duration::from_secs(1);

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    shmrelay::procfs::cpu_seconds(pid).expect("the front's /proc stat")
}

#[test]
fn a_worker_ringing_the_front_doorbell_in_a_loop_does_not_cost_the_front_a_core() {
    let _w = Watchdog::new("doorbell_flood", Duration::from_secs(120));
    let cmd = format!("{} worker scribbler", shmrelay_bin().display());
    let relay = Relay::start_serving("bellflood", &["--workers", "1", "--worker-cmd", &cmd]);
    let front = relay.front_pid(0);
    let mut hostile = relay.connect();
    assert_eq!(
        hostile.roundtrip_within(b"ring:doorbell", 10 * SEC),
        Recv::Frame(b"ringing".to_vec())
    );
    std::thread::sleep(Duration::from_millis(500));
    // A normal client does round trips while the front's CPU time is measured.
    let mut normal = relay.connect();
    let (cpu0, t0) = (cpu_seconds(front), Instant::now());
    let mut rounds = 0;
    while t0.elapsed() < 3 * SEC {
        let p = pattern(1, rounds, 64);
        assert_eq!(
            normal.roundtrip_within(&p, 10 * SEC),
            Recv::Frame(p),
            "round {rounds}"
        );
        rounds += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let share = (cpu_seconds(front) - cpu0) / t0.elapsed().as_secs_f64();
    let throttled = relay.front(0, |f| &f.doorbell_throttled);
    eprintln!(
        "front CPU {:.1}% of a core while a worker rings its doorbell in a loop; {rounds} round trips; throttled {throttled} times",
        share * 100.0
    );
    // Measured on a shared 2-core VM: 0.7% with the throttle, 36% without it (the worker's
    // writes are the limit there). Generous for a loaded machine, well below the old cost.
    assert!(
        share < 0.15,
        "the front used {:.0}% of a core",
        share * 100.0
    );
    assert!(throttled >= 1, "the doorbell was never throttled");
    assert!(rounds >= 20);
    // The hostile worker's own clients are served too.
    let p = pattern(2, 0, 64);
    assert_eq!(hostile.roundtrip_within(&p, 10 * SEC), Recv::Frame(p));
}
