//! `pubsub-worker` refuses to run as one of several workers of a listener (a publish would
//! reach only the subscribers of one worker's connections), and says how to run it.

use std::process::Command;

fn pubsub_worker(pool: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pubsub-worker"));
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
