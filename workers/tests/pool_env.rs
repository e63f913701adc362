//! The worker binaries and `SHMRELAY_POOL_SIZE`: `pubsub-worker` refuses to run as one of
//! several workers of a listener (a publish would reach only the subscribers of one worker's
//! connections) and says how to run it; `kv-worker` refuses a size that is not one.

use std::process::Command;

fn pubsub_worker(pool: Option<&str>) -> (Option<i32>, String) {
    worker(env!("CARGO_BIN_EXE_pubsub-worker"), pool)
}

/// Runs a worker binary by hand (no rings) with the pool size `pool`: its exit code, stderr.
fn worker(bin: &str, pool: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin);
    cmd.env_remove("SHMRELAY_POOL_SIZE");
    if let Some(n) = pool {
        cmd.env("SHMRELAY_POOL_SIZE", n);
    }
    let out = cmd.output().expect("run pubsub-worker");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn refuses_a_pool_of_two_or_an_invalid_size_with_the_fix() {
    for (pool, says) in [
        ("2", "pubsub-worker: this worker is one of 2 workers"),
        ("2", "`--workers 1`"),
        ("many", "SHMRELAY_POOL_SIZE=\"many\" is not a pool size"),
    ] {
        let (code, stderr) = pubsub_worker(Some(pool));
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(says), "{pool}: {stderr}");
    }
}

#[test]
fn a_pool_of_one_or_none_goes_on_to_attach() {
    // Not started by shmrelay: it gets past the pool check and fails on the missing rings.
    for pool in [None, Some("1")] {
        let (code, stderr) = pubsub_worker(pool);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            !stderr.contains("workers of its listener"),
            "{pool:?}: {stderr}"
        );
        assert!(stderr.starts_with("pubsub-worker: "), "{stderr}");
    }
}

#[test]
fn kv_worker_refuses_an_invalid_pool_size_and_accepts_a_pool() {
    let kv = env!("CARGO_BIN_EXE_kv-worker");
    let (code, stderr) = worker(kv, Some("0"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("kv-worker: SHMRELAY_POOL_SIZE=\"0\" is not a pool size"),
        "{stderr}"
    );
    // A pool of two is fine for kv (it answers CROSSSLOT): it goes on to attach and fails on
    // the missing rings.
    let (code, stderr) = worker(kv, Some("2"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("is this worker started by shmrelay?"),
        "{stderr}"
    );
}
