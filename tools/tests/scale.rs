//! Issue 15, the CI-sized variant of a million connections: 20,000 connections held against a
//! real relay with `fronts = "auto"`, by `relaybench hold` in two client processes (each
//! process, the relay's fronts and this test stay under the 20,000 open-files limit), every
//! one answering the fronts' pings, none closed by the relay, spread over the fronts.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shmrelay::config::fronts::{auto_fronts, Limits};
use shmrelay::config::Config;
use shmrelay::report::InstanceReport;
use shmrelay_tests::{eventually, Relay, Watchdog};

const CONNS: u64 = 20_000;

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {key} in {v}"))
}

#[test]
fn twenty_thousand_connections_over_auto_fronts_are_held_and_none_is_closed() {
    let _w = Watchdog::new("scale-20k", Duration::from_secs(600));
    let relay = Relay::start(
        "scale20k",
        &[
            "--fronts",
            "auto",
            "--max-conns",
            &CONNS.to_string(),
            "--workers",
            "1",
            // Pinged every 5 s, so each connection is pinged a few times in the hold window.
            "--set",
            "ping_min_ms=5000",
            "--set",
            "ping_max_ms=5000",
        ],
    );
    let s = relay.stats();
    let fronts = s.header().fronts.load(std::sync::atomic::Ordering::Relaxed) as usize;
    // What `auto` should have chosen for this host (the relay raises its soft open-files limit
    // to the hard one, as `Limits::of_this_process` does here).
    let limits = Limits::of_this_process();
    let cfg = Config {
        max_conns: Some(CONNS),
        workers: 1,
        ..Config::default()
    };
    assert_eq!(fronts, auto_fronts(&cfg, CONNS, &limits), "{limits:?}");
    assert!(fronts >= 2, "20,000 connections do not fit one front's fds");
    // Client processes that each stay under the open-files limit (two here, at 20,000).
    let procs = CONNS
        .div_ceil(limits.nofile.saturating_sub(256).max(1))
        .max(2)
        .to_string();

    let mut hold = Command::new(env!("CARGO_BIN_EXE_relaybench"))
        .args([
            "hold",
            "--addr",
            &relay.addr.to_string(),
            "--conns",
            &CONNS.to_string(),
            "--procs",
            &procs,
            "--src-ips",
            "127.0.0.2-127.0.0.3",
            "--seconds",
            "20",
            // No beats of their own: kept alive by answering the fronts' pings alone.
            "--heartbeat",
            "0",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start relaybench hold");
    let mut out = hold.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut o = String::new();
        let _ = out.read_to_string(&mut o);
        o
    });
    let mut err = hold.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = err.read_to_string(&mut e);
        e
    });

    // Every connection open at once, spread over the fronts (SO_REUSEPORT hashes the source
    // address and port).
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(300), || relay.conns_total() == CONNS),
        "{} of {CONNS} open after {:?}: {}",
        relay.conns_total(),
        t0.elapsed(),
        relay.close_summary()
    );
    let ramp = t0.elapsed();
    // Held for a while, with pings going out and answered.
    std::thread::sleep(Duration::from_secs(8));
    let o = Command::new(env!("CARGO_BIN_EXE_relayctl"))
        .args(["stat", "--json", &relay.instance])
        .output()
        .expect("relayctl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: InstanceReport = serde_json::from_slice(&o.stdout).unwrap();
    let open: Vec<u64> = r.fronts.iter().map(|f| f.connections.open).collect();
    eprintln!("connections per front: {open:?} (ramp {ramp:?})");
    assert_eq!(open.len(), fronts);
    assert_eq!(open.iter().sum::<u64>(), CONNS, "{open:?}");
    let even = CONNS / fronts as u64;
    for (f, &n) in open.iter().enumerate() {
        assert!(
            n >= even / 2 && n <= even + even / 2,
            "front {f} holds {n} of {CONNS} ({open:?}): not spread"
        );
    }
    for f in &r.fronts {
        let closed: u64 = f.closes.values().sum();
        assert_eq!(closed, 0, "front {} closed {:?}", f.index, f.closes);
    }
    let pinged: u64 = r.fronts.iter().map(|f| f.pings_sent).sum();
    assert!(pinged > 0, "no pings in 8 s of a 5 s interval");

    let status = hold.wait().unwrap();
    let stdout = reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    assert!(status.success(), "relaybench: {status}\n{stdout}\n{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(num(&v, "opened"), CONNS, "{v}");
    assert_eq!(num(&v, "connect_errors"), 0, "{v}");
    assert_eq!(num(&v, "server_closes"), 0, "{v}");
    assert_eq!(num(&v, "reset_closes"), 0, "{v}");
    assert_eq!(num(&v, "open_at_end"), CONNS, "{v}");
    assert!(
        num(&v, "pings_answered") >= CONNS,
        "every connection pinged: {v}"
    );
    // The relay closed nobody: every close it counted is the clients' own, when the client
    // processes cut their connections at the end (a FIN, or a reset: `io_error` of class
    // `reset`, the client's doing).
    let o = Command::new(env!("CARGO_BIN_EXE_relayctl"))
        .args(["stat", "--json", &relay.instance])
        .output()
        .expect("relayctl");
    let r: InstanceReport = serde_json::from_slice(&o.stdout).unwrap();
    for f in &r.fronts {
        eprintln!(
            "front {}: closes {:?}, io errors {:?}",
            f.index, f.closes, f.io_errors
        );
        for (reason, &n) in &f.closes {
            if reason != "client_eof" && reason != "io_error" {
                assert_eq!(n, 0, "front {}: {n} closed as {reason}", f.index);
            }
        }
        let resets = f.io_errors.get("reset").copied().unwrap_or(0);
        assert_eq!(
            f.closes.get("io_error").copied().unwrap_or(0),
            resets,
            "front {}: io errors other than the clients' resets: {:?}",
            f.index,
            f.io_errors
        );
    }
}
