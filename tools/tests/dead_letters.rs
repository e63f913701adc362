//! `relayctl dead-letters` against a real relay whose worker crashes on a poison frame
//! (issue 12.7): the dead-lettered frame is listed with its connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use shmrelay::report::WorkerReport;

mod real_relay;
use real_relay::{relay_bin, run, Relay};

#[test]
fn dead_letters_lists_the_poison_frame_and_its_connection() {
    let bin = relay_bin();
    let instance = format!("t-deadletters-{}", std::process::id());
    let worker = format!(
        "worker_cmd={:?}",
        format!("{} worker scribbler", bin.display())
    );
    // Stopped on drop, also when an assertion below fails.
    let relay = Relay::start_named(&instance, &["--workers", "1", "--set", &worker], None);
    let addr = relay.addr;
    let relayctl = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayctl"));
        cmd.args(args);
        run(cmd, &format!("relayctl {args:?}"))
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
}
