//! Start-up, shutdown and logs as an operator meets them: listeners that would share a port
//! are refused, a closed stderr neither panics the relay nor skips its clean-up, logs read
//! well through a pipe, and a worker's clean exit is not a crash.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use shmrelay_tests::{shmrelay_bin, Client, Recv, Relay, Watchdog};

/// A unique instance name for a relay this file starts itself.
fn instance(name: &str) -> String {
    format!("t-{name}-{}", std::process::id())
}

/// A loopback address with a fixed port nobody listens on (just now).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Collects a child's stderr to the end in the background.
fn collect(mut stream: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `shmrelay ARGS` (instance `name`) that is expected to refuse to start: its exit code
/// (None if it still ran after 30 s) and its stderr.
fn refused(name: &str, args: &[&str]) -> (Option<i32>, String) {
    let inst = instance(name);
    let mut child = Command::new(shmrelay_bin())
        .args(["--instance", &inst])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shmrelay");
    let err = collect(child.stderr.take().unwrap());
    let mut relay = Relay::from_child(child, &inst);
    let code = relay.wait_exit(Duration::from_secs(30));
    drop(relay);
    (code, err.join().unwrap())
}

#[test]
fn two_listeners_on_one_address_are_a_config_error() {
    let _w = Watchdog::new("two_listeners", Duration::from_secs(60));
    let addr = free_addr();
    let path = std::env::temp_dir().join(format!("shmrelay-dup-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!("[[listener]]\nlisten = \"{addr}\"\n\n[[listener]]\nlisten = \"{addr}\"\ncodec = \"line\"\n"),
    )
    .unwrap();
    let (code, err) = refused("dup", &["--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(
        err.contains(&addr.to_string()),
        "stderr names the address: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_second_relay_on_a_running_relays_port_is_refused_and_the_first_keeps_every_connection() {
    let _w = Watchdog::new("second_relay", Duration::from_secs(120));
    let first = Relay::start_serving("first", &[]);
    let addr = first.addr.to_string();
    let (code, err) = refused("second", &["--listen", &addr]);
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(err.contains(&addr), "stderr names the address: {err}");
    assert!(err.contains("in use"), "{err}");
    // Every new connection still lands on the first relay, and is served.
    let mut clients: Vec<Client> = (0..20).map(|_| first.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let msg = format!("hello {i}");
        assert_eq!(
            c.roundtrip_within(msg.as_bytes(), Duration::from_secs(20)),
            Recv::Frame(msg.into_bytes())
        );
    }
    assert_eq!(first.conns_total(), 20);
}
