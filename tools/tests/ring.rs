//! `relaybench ring` as a real process (its shm-ring and futex children are the binary
//! re-executed): every case of the default plan yields a row of medians over the rounds, and
//! the ratios are printed.

use std::process::Command;

use serde_json::Value;

fn run(args: &[&str]) -> (std::process::Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_relaybench"))
        .arg("ring")
        .args(args)
        .output()
        .expect("run relaybench");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

fn rows(out: &std::process::Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn every_case_reports_medians_and_ratios() {
    let (out, stderr) = run(&[
        "--seconds",
        "0.1",
        "--runs",
        "2",
        "--capacity",
        "64k",
        "--json",
    ]);
    assert!(out.status.success(), "relaybench ring failed: {stderr}");
    let rows = rows(&out);
    let mut cases: Vec<(String, String, u64)> = rows
        .iter()
        .map(|r| {
            assert_eq!(r["runs"], 2, "{r}");
            if r["mode"] == "throughput" {
                assert!(r["frames_per_sec"].as_f64().unwrap() > 0.0, "{r}");
                assert!(r["gbytes_per_sec"].as_f64().unwrap() > 0.0, "{r}");
                assert!(r["rtt_p50_ns"].is_null(), "{r}");
            } else {
                let p50 = r["rtt_p50_ns"].as_u64().unwrap();
                assert!(p50 > 0 && p50 <= r["rtt_p99_ns"].as_u64().unwrap(), "{r}");
                assert!(r["frames_per_sec"].is_null(), "{r}");
            }
            (
                r["transport"].as_str().unwrap().to_owned(),
                r["mode"].as_str().unwrap().to_owned(),
                r["payload"].as_u64().unwrap(),
            )
        })
        .collect();
    cases.sort();
    let want = [
        ("crossbeam", "throughput", 64),
        ("crossbeam", "throughput", 1024),
        ("futex", "rtt park", 0),
        ("rtrb", "rtt spin", 64),
        ("rtrb", "throughput", 64),
        ("rtrb", "throughput", 1024),
        ("shm-ring", "rtt park", 64),
        ("shm-ring", "rtt spin", 64),
        ("shm-ring", "throughput", 64),
        ("shm-ring", "throughput", 1024),
    ];
    assert_eq!(cases, want.map(|(t, m, p)| (t.to_owned(), m.to_owned(), p)));
    for line in [
        "load average (1, 5, 15 min): before ",
        "throughput 64 B   shm-ring / rtrb      =",
        "throughput 1 KiB  shm-ring / crossbeam =",
        "rtt spin p50      shm-ring         =",
        "rtt park p50      shm-ring / futex =",
    ] {
        assert!(stderr.contains(line), "no {line:?} in {stderr}");
    }
}

#[test]
fn the_closure_api_moves_the_same_checked_frames() {
    let (out, stderr) = run(&[
        "--seconds",
        "0.1",
        "--runs",
        "1",
        "--capacity",
        "64k",
        "--json",
        "--api",
        "push-with",
        "--transports",
        "shm-ring",
        "--payloads",
        "0,64,3000",
    ]);
    assert!(out.status.success(), "relaybench ring failed: {stderr}");
    assert_eq!(rows(&out).len(), 3 + 2, "{stderr}");
}

#[test]
fn a_payload_too_large_for_the_ring_is_refused() {
    let (out, _) = run(&["--capacity", "4k", "--payloads", "8k"]);
    assert_eq!(out.status.code(), Some(2));
    let (out, _) = run(&["--capacity", "4k", "--rtt-payload", "8k"]);
    assert_eq!(out.status.code(), Some(2));
}
