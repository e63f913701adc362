//! `relaybench ring` as a real process (its shm-ring consumer is the binary re-executed): every
//! queue and payload of the default run yields a row, and the ratios are printed.

use std::process::Command;

use serde_json::Value;

#[test]
fn every_queue_reports_its_throughput() {
    let out = Command::new(env!("CARGO_BIN_EXE_relaybench"))
        .args(["ring", "--seconds", "0.2", "--capacity", "64k", "--json"])
        .output()
        .expect("run relaybench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "relaybench ring failed: {stderr}");
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let mut cases: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            assert!(r["frames_per_sec"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["gbytes_per_sec"].as_f64().unwrap() > 0.0, "{r}");
            (
                r["transport"].as_str().unwrap().to_owned(),
                r["payload"].as_u64().unwrap(),
            )
        })
        .collect();
    cases.sort();
    let want = [
        ("crossbeam", 64),
        ("crossbeam", 1024),
        ("rtrb", 64),
        ("rtrb", 1024),
        ("shm-ring", 64),
        ("shm-ring", 1024),
    ];
    assert_eq!(cases, want.map(|(t, p)| (t.to_owned(), p)));
    assert!(stderr.contains("64 B    shm-ring / rtrb"), "{stderr}");
    assert!(stderr.contains("1 KiB   shm-ring / crossbeam"), "{stderr}");
}

#[test]
fn a_payload_too_large_for_the_ring_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_relaybench"))
        .args(["ring", "--capacity", "4k", "--payloads", "8k"])
        .output()
        .expect("run relaybench");
    assert_eq!(out.status.code(), Some(2));
}
