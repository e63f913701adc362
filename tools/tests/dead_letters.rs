//! `relayctl dead-letters` against a real relay whose worker crashes on a poison frame
//! (issue 12.7): the dead-lettered frame is listed with its connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use shmrelay::report::WorkerReport;

/// The `shmrelay` binary next to this test's profile directory (built if missing).
fn relay_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is not under <target>/<profile>/deps")
        .to_path_buf();
    let bin = profile_dir.join("shmrelay");
    if !bin.exists() {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", "shmrelay", "--bin", "shmrelay"])
            .env(
                "CARGO_TARGET_DIR",
                profile_dir.parent().expect("target dir"),
            )
            .status()
            .expect("cargo build");
        assert!(status.success());
    }
    bin
}

#[test]
fn dead_letters_lists_the_poison_frame_and_its_connection() {
    let bin = relay_bin();
    let instance = format!("t-deadletters-{}", std::process::id());
    let worker = format!(
        "worker_cmd={:?}",
        format!("{} worker scribbler", bin.display())
    );
    let mut relay = Command::new(&bin)
        .args(["--listen", "127.0.0.1:0", "--instance", &instance])
        .args(["--workers", "1", "--set", &worker])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start shmrelay");
    let mut lines = BufReader::new(relay.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("relay exited").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    let relayctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_relayctl"))
            .args(args)
            .output()
            .expect("run relayctl")
    };
    let none = relayctl(&["dead-letters", &instance]);
    assert!(none.status.success());
    assert!(String::from_utf8_lossy(&none.stdout).contains("no dead-lettered frames"));

    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(&[&6u32.to_be_bytes()[..], b"poison"].concat())
        .unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(
        String::from_utf8_lossy(&got).contains("shmrelay-error: frame dead-lettered"),
        "{got:?}"
    );

    // relayctl reads the stats view, which the supervisor publishes every 50 ms: poll.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let out = relayctl(&["dead-letters", &instance, "--json"]);
        let listed: Vec<WorkerReport> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "relayctl dead-letters --json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        if !listed.is_empty() || std::time::Instant::now() > deadline {
            break listed;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].index, 0);
    assert_eq!(listed[0].dead_letters, 1);
    let last = listed[0].last_dead_letter.as_ref().expect("the last one");
    assert!(!last.conn.is_empty() && last.position > 0 && last.unix_ms > 0);
    let text = relayctl(&["dead-letters", &instance]);
    assert!(String::from_utf8_lossy(&text.stdout).contains(&last.conn));

    // SAFETY: signalling our own child.
    unsafe { libc::kill(relay.id() as i32, libc::SIGTERM) };
    let _ = relay.wait();
}
