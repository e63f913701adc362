//! Issue 12.11: a worker writes only to connections of its own listener unless `push_scope =
//! "relay"`. A hostile worker (the scribbler's `push:F.S.G:BYTES`) pushes to a client of the
//! other listener, whose id that client learned from its own journal worker.

use std::sync::atomic::Ordering;
use std::time::Duration;

use shmrelay_tests::{eventually, Client, Relay};

/// Listener 0: the scribbler (can push anywhere); listener 1: the journal worker.
fn two_listeners(name: &str, scope: &str) -> (Relay, Vec<std::net::SocketAddr>) {
    let bin = env!("CARGO_BIN_EXE_shmrelay");
    let toml = format!(
        r#"
push_scope = "{scope}"

[[listener]]
listen = "127.0.0.1:0"
worker_cmd = "{bin} worker scribbler"

[[listener]]
listen = "127.0.0.1:0"
worker_cmd = "{bin} worker journal"
"#
    );
    Relay::start_config(name, &toml, 2, &[])
}

/// The victim's own connection id, from its journal worker's `open F.S.G PEER` line.
fn own_id(victim: &mut Client) -> String {
    let journal = String::from_utf8(victim.roundtrip(b"journal?").expect("journal")).unwrap();
    let line = journal
        .lines()
        .find(|l| l.starts_with("open "))
        .unwrap_or_else(|| panic!("no open event in {journal:?}"));
    line.split_whitespace().nth(1).unwrap().to_owned()
}

fn out_of_scope(relay: &Relay) -> u64 {
    relay
        .stats()
        .front(0)
        .push_out_of_scope
        .load(Ordering::Relaxed)
}

#[test]
fn a_worker_cannot_push_to_another_listeners_client_by_default() {
    let (relay, addrs) = two_listeners("push-scope", "listener");
    let mut victim = Client::connect(addrs[1]);
    let id = own_id(&mut victim);
    let mut attacker = Client::connect(addrs[0]);
    let cmd = format!("push:{id}:injected");
    for _ in 0..3 {
        assert_eq!(
            attacker.roundtrip(cmd.as_bytes()).as_deref(),
            Some(&b"pushed"[..])
        );
    }
    // The victim's next frame is the echo of what it sent: nothing was injected before it.
    assert_eq!(
        victim.roundtrip(b"mine").as_deref(),
        Some(&b"mine"[..]),
        "a push from another listener's worker reached the client"
    );
    assert!(
        eventually(Duration::from_secs(10), || out_of_scope(&relay) == 3),
        "push_out_of_scope = {}",
        out_of_scope(&relay)
    );
    // Both connections are served afterwards.
    assert_eq!(attacker.roundtrip(b"still").as_deref(), Some(&b"still"[..]));
    assert_eq!(victim.roundtrip(b"fine").as_deref(), Some(&b"fine"[..]));
    assert_eq!(out_of_scope(&relay), 3);
}

#[test]
fn push_scope_relay_lets_a_worker_push_to_any_listener() {
    let (relay, addrs) = two_listeners("push-relay", "relay");
    let mut victim = Client::connect(addrs[1]);
    let id = own_id(&mut victim);
    let mut pusher = Client::connect(addrs[0]);
    let cmd = format!("push:{id}:hello from listener 0");
    assert_eq!(
        pusher.roundtrip(cmd.as_bytes()).as_deref(),
        Some(&b"pushed"[..])
    );
    // Widened on purpose: the push arrives.
    assert_eq!(
        victim.recv().as_deref(),
        Some(&b"hello from listener 0"[..])
    );
    assert_eq!(victim.roundtrip(b"mine").as_deref(), Some(&b"mine"[..]));
    assert_eq!(out_of_scope(&relay), 0);
}
