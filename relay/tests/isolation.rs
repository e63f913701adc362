//! Isolation: workers running as other users reach only their own rings.
//!
//! Needs root (to create the users and to start workers as them); skipped with a note
//! otherwise.

use std::os::unix::process::CommandExt;
use std::process::Command;

use shmrelay_tests::Relay;

fn ensure_user(name: &str) -> Option<u32> {
    let lookup = || {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    };
    if let Some(uid) = lookup() {
        return Some(uid);
    }
    let ok = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        lookup()
    } else {
        None
    }
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn workers_of_different_users_cannot_read_each_others_rings() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to create users and switch to them");
        return;
    }
    let (Some(u1), Some(u2)) = (ensure_user("shmrelay-t1"), ensure_user("shmrelay-t2")) else {
        eprintln!("skipped: useradd is not available");
        return;
    };
    let relay = Relay::start(
        "users",
        &[
            "--workers",
            "2",
            "--set",
            r#"worker_users=["shmrelay-t1","shmrelay-t2"]"#,
        ],
    );
    let mut clients: Vec<_> = (0..4).map(|_| relay.connect()).collect();
    for c in &mut clients {
        assert_eq!(
            c.roundtrip(b"as another user").as_deref(),
            Some(&b"as another user"[..])
        );
    }
    let (w0, w1) = (relay.worker_pid(0), relay.worker_pid(1));
    assert_eq!((uid_of(w0), uid_of(w1)), (u1, u2));

    // Each worker maps its own rings and no other.
    let maps0 = std::fs::read_to_string(format!("/proc/{w0}/maps")).unwrap();
    let own = format!("shmrelay.{}.f0.w0.", relay.instance);
    let other = format!("shmrelay.{}.f0.w1.", relay.instance);
    assert!(maps0.contains(&own), "worker 0 does not map its rings");
    assert!(!maps0.contains(&other), "worker 0 maps worker 1's rings");
    assert!(!maps0.contains(&format!("shmrelay.{}.stats", relay.instance)));

    // Rings are memfds (named in /proc/PID/maps only): no file leads to them. The one file,
    // the stats view, and worker 0's /proc entries are closed to worker 1's user.
    let files = relay.shm_files();
    assert_eq!(files.len(), 1, "only the stats view has a name: {files:?}");
    let view = files[0].clone();
    let try_read = |path: String| {
        Command::new("cat")
            .arg(path)
            .uid(u2)
            .gid(u2)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        !try_read(view.display().to_string()),
        "another user read the stats view"
    );
    assert!(
        !try_read(format!("/proc/{w0}/maps")),
        "another user read a worker's maps"
    );
    assert!(
        !try_read(format!("/proc/{w0}/fd/0")),
        "another user opened a worker's fds"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&view).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}
