//! Shared by the `relaybench` tests: a loopback test server that records where its connections
//! come from, and running `relaybench SUB --json` as a real process.

use std::collections::HashSet;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// The source addresses the multi-process tests spread their connections over.
pub const SRC_IPS: &str = "127.0.0.2-127.0.0.4";

/// The addresses of [`SRC_IPS`].
pub fn src_ip_set() -> HashSet<IpAddr> {
    ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

/// A server on a free loopback port.
pub struct Server {
    /// HOST:PORT to connect to.
    pub addr: String,
    /// Source addresses of the connections it accepted.
    pub peers: Arc<Mutex<HashSet<IpAddr>>>,
}

/// Accepts connections on a free loopback port and hands each one, with its index in accept
/// order (0, 1, ...), to `handle` on a thread of its own.
pub fn start_server(handle: impl Fn(u64, TcpStream) + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let seen = peers.clone();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        let mut accepted = 0u64;
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            if let Ok(p) = s.peer_addr() {
                seen.lock().unwrap().insert(p.ip());
            }
            let (n, handle) = (accepted, handle.clone());
            accepted += 1;
            std::thread::spawn(move || handle(n, s));
        }
    });
    Server { addr, peers }
}

/// HOST:PORT of a loopback port that nothing listens on (a listener bound and dropped).
pub fn refused_addr() -> String {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// Runs `relaybench SUB ARGS...`.
pub fn relaybench(sub: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relaybench"))
        .arg(sub)
        .args(args)
        .output()
        .expect("run relaybench")
}

/// Runs `relaybench SUB ARGS...` (ARGS including `--json`), which must succeed and print
/// exactly one line; returns it parsed.
pub fn relaybench_json(sub: &str, args: &[&str]) -> Value {
    let out = relaybench(sub, args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "relaybench failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints exactly one line: {stdout}");
    serde_json::from_str(lines[0]).expect("valid JSON")
}

/// Runs `relaybench SUB --addr ADDR ARGS... --json EXTRA...` (which must succeed); returns the
/// parsed object.
pub fn run_json(sub: &str, addr: &str, args: &[&str], extra: &[&str]) -> Value {
    let all: Vec<&str> = [&["--addr", addr], args, &["--json"], extra].concat();
    relaybench_json(sub, &all)
}

/// The count `key` of a JSON summary.
pub fn count(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {key} in {v}"))
}

/// Runs `relaybench SUB` with 2 connections against an address nothing listens on: it must
/// exit with 2 and still print its JSON summary, with 2 connect errors. Returns the summary
/// and stderr.
pub fn against_refused(sub: &str, extra: &[&str]) -> (Value, String) {
    let addr = refused_addr();
    let args = [
        &[
            "--addr",
            &addr,
            "--conns",
            "2",
            "--seconds",
            "0.1",
            "--json",
        ],
        extra,
    ]
    .concat();
    let out = relaybench(sub, &args);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).expect("the summary is still printed");
    assert_eq!(count(&v, "connect_errors"), 2, "{v}");
    (v, String::from_utf8_lossy(&out.stderr).into_owned())
}
