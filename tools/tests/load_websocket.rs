//! `relaybench load --codec websocket` as a real process against a relay's websocket listener
//! (the built-in echo worker): every echo is checked for its bytes and its kind, text and
//! binary; a refused handshake counts as an error of the run (with the status in
//! `first_error`), never as a silent zero.

use std::time::Duration;

use serde_json::Value;
use shmrelay_tests::{Relay, Watchdog};

// The shared helpers of tools/tests; this file uses two of them.
#[allow(dead_code)]
mod common;
use common::count;

fn ws_relay(name: &str) -> Relay {
    let config = "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"websocket\"\npath = \"/echo\"\nworkers = 1\n";
    let (relay, _) = Relay::start_config(name, config, 1, &[]);
    relay
}

fn load(addr: &str, extra: &[&str]) -> (Value, bool) {
    let brief = [
        "--addr",
        addr,
        "--seconds",
        "0.5",
        "--warmup",
        "0.1",
        "--drain",
        "1",
        "--json",
    ];
    let out = common::relaybench("load", &[&brief[..], extra].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{e}: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.success())
}

#[test]
fn text_and_binary_messages_are_echoed_through_a_websocket_listener() {
    let _dog = Watchdog::new("load_websocket", Duration::from_secs(120));
    let relay = ws_relay("lbws");
    let addr = relay.addr.to_string();
    for (kind, size) in [("binary", "64"), ("text", "300"), ("binary", "70000")] {
        let (v, ok) = load(
            &addr,
            &[
                "--codec",
                "websocket",
                "--ws-path",
                "/echo",
                "--ws-kind",
                kind,
                "--size",
                size,
                "--conns",
                "4",
                "--depth",
                "4",
            ],
        );
        assert!(ok, "{kind} {size}: {v}");
        assert_eq!(v["codec"], "websocket");
        assert_eq!(v["ws_kind"], kind);
        assert!(count(&v, "requests") > 0, "{v}");
        assert_eq!(count(&v, "errors"), 0, "{kind} {size}: {v}");
        assert_eq!(count(&v, "mismatches"), 0, "{kind} {size}: {v}");
        assert_eq!(count(&v, "sent"), count(&v, "replies"), "{v}");
    }
    // Every connection was upgraded: the front counted the handshakes.
    assert!(relay.front(0, |f| &f.ws_upgrades) >= 12);
}

#[test]
fn a_refused_handshake_is_counted_with_its_status() {
    let _dog = Watchdog::new("load_websocket_refused", Duration::from_secs(120));
    let relay = ws_relay("lbws404");
    let (v, _) = load(
        &relay.addr.to_string(),
        &[
            "--codec",
            "websocket",
            "--ws-path",
            "/nowhere",
            "--conns",
            "2",
        ],
    );
    assert_eq!(count(&v, "errors"), 2, "{v}");
    assert_eq!(count(&v, "io_errors"), 2, "{v}");
    assert_eq!(count(&v, "requests"), 0, "{v}");
    let first = v["first_error"].as_str().unwrap_or_default();
    assert!(first.contains("404"), "{first}");
}
