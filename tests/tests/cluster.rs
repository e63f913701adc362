//! Beyond one host (issue 19): a `nats-server` and three relays as three hosts (network
//! namespaces joined by veth links when this process may make them, loopback addresses
//! otherwise), each running `cluster-worker`s. Topics, direct pushes and presence across
//! nodes; a node killed; NATS killed and restarted; an HAProxy in front of the nodes.
//!
//! Needs `nats-server` (and `haproxy` for the balancer test): `bash tools/cluster/ci-setup.sh`.
//! Without them the tests print `SKIPPED` and pass, unless `SHMRELAY_REQUIRE_NATS=1`
//! (`SHMRELAY_REQUIRE_HAPROXY=1`) is set: then they fail.

#[path = "cluster/hosts.rs"]
mod hosts;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use hosts::{ask, next, report, required, subscriber, Cluster, LONG};
use shmrelay::report::types::ClusterReport;
use shmrelay_tests::{eventually, Client, Relay};

/// A child process killed (and reaped) when the test ends, even by a panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Asks `who TOPIC` on `c` until the members are exactly `want` (sorted ids).
fn wait_members(c: &mut Client, topic: &str, want: &[String]) {
    let mut want = want.to_vec();
    want.sort();
    let expected = std::iter::once("members".to_owned())
        .chain(want)
        .collect::<Vec<_>>()
        .join(" ");
    let mut last = String::new();
    let ok = eventually(LONG, || {
        last = ask(c, &format!("who {topic}"), "");
        last == expected
    });
    assert!(ok, "who {topic}: {last:?}, wanted {expected:?}");
}

/// Waits until the cluster counter `get`, summed over `relay`'s workers, reaches `min` (the
/// view the report reads is published every 50 ms).
fn wait_counter(relay: &Relay, what: &str, get: fn(&ClusterReport) -> u64, min: u64) {
    let sum = || -> u64 {
        report(relay)
            .workers
            .iter()
            .filter_map(|w| w.cluster.as_ref())
            .map(get)
            .sum()
    };
    assert!(
        eventually(LONG, || sum() >= min),
        "{}: cluster {what} {} < {min}",
        relay.instance,
        sum()
    );
}

fn whoami(c: &mut Client) -> String {
    ask(c, "whoami", "id ")["id ".len()..].to_owned()
}

/// Nothing more arrives on `c` for a while (no duplicate delivery).
fn quiet(c: &mut Client) {
    if let Some(extra) = next(c, Duration::from_millis(300)) {
        panic!("unexpected extra frame {extra:?}");
    }
}

#[test]
fn topics_reach_every_worker_of_every_node_once_and_in_order() {
    let Some(mut cluster) = Cluster::start("cluster topics", &["a", "b", "c"], 2) else {
        return;
    };
    eprintln!(
        "hosts in network namespaces: {}",
        cluster.hosts.namespaced()
    );
    let relays = &mut cluster.relays;
    // Several subscribers per node, so that both workers of each node have some.
    let mut subs: Vec<Client> = Vec::new();
    let mut ids = Vec::new();
    for relay in relays.iter() {
        for _ in 0..3 {
            let mut c = subscriber(relay, "news");
            ids.push(whoami(&mut c));
            subs.push(c);
        }
    }
    let workers: HashSet<(String, String)> = ids
        .iter()
        .map(|id| {
            let mut p = id.split('/');
            (p.next().unwrap().to_owned(), p.next().unwrap().to_owned())
        })
        .collect();
    eprintln!("subscribers on (node, worker): {workers:?}");
    let mut publisher = relays[0].connect();
    wait_members(&mut publisher, "news", &ids);

    const N: usize = 20;
    for i in 0..N {
        ask(&mut publisher, &format!("pub news m{i}"), "ok ");
    }
    for (c, id) in subs.iter_mut().zip(&ids) {
        for i in 0..N {
            let got = next(c, LONG);
            assert_eq!(
                got.as_deref(),
                Some(format!("news m{i}").as_str()),
                "subscriber {id}"
            );
        }
        quiet(c);
    }

    // Unsubscribing stops delivery to that connection only; interest follows.
    ask(&mut subs[4], "unsub news", "ok");
    let left = ids.remove(4);
    wait_members(&mut publisher, "news", &ids);
    ask(&mut publisher, "pub news after", "ok ");
    for (k, c) in subs.iter_mut().enumerate() {
        if k == 4 {
            quiet(c);
        } else {
            assert_eq!(next(c, LONG).as_deref(), Some("news after"), "{k}");
        }
    }
    eprintln!("{left} unsubscribed and got nothing more");

    // Operations: the counters moved where the traffic went.
    wait_counter(&relays[0], "messages_out", |c| c.messages_out, N as u64);
    wait_counter(&relays[2], "messages_in", |c| c.messages_in, N as u64);
    let c = report(&relays[2]);
    let prom = shmrelay::report::prometheus(&c);
    assert!(prom.contains("shmrelay_cluster_connected{"), "{prom}");
    assert!(
        prom.contains("shmrelay_cluster_messages_in_total{"),
        "{prom}"
    );
}

#[test]
fn pushes_reach_a_connection_on_another_node_and_gone_ids_are_reported() {
    let Some(mut cluster) = Cluster::start("cluster pushes", &["a", "b", "c"], 2) else {
        return;
    };
    let relays = &mut cluster.relays;
    let mut target = relays[2].connect();
    let id = whoami(&mut target);
    assert!(id.starts_with("c/"), "{id}");
    let mut sender = relays[0].connect();
    ask(&mut sender, &format!("push {id} hello from a"), "ok");
    assert_eq!(next(&mut target, LONG).as_deref(), Some("hello from a"));

    // Replies keep the order of the commands, though a push waits for a NATS round trip.
    sender.send(format!("push {id} two").as_bytes());
    sender.send(b"whoami");
    assert_eq!(next(&mut sender, LONG).as_deref(), Some("ok"));
    assert!(next(&mut sender, LONG).unwrap().starts_with("id a/"));
    assert_eq!(next(&mut target, LONG).as_deref(), Some("two"));

    // The same node's other worker, and the sender's own worker, work as well.
    let mut local = relays[0].connect();
    let local_id = whoami(&mut local);
    ask(&mut sender, &format!("push {local_id} near"), "ok");
    assert_eq!(next(&mut local, LONG).as_deref(), Some("near"));

    drop(target);
    let gone = eventually(LONG, || {
        ask(&mut sender, &format!("push {id} late"), "") == format!("err gone {id}")
    });
    assert!(gone, "a push to a closed connection is not reported gone");
    let slot = id.rsplit('/').next().unwrap();
    ask(
        &mut sender,
        &format!("push zz/0/{slot} x"),
        "err unknown zz/0/",
    );
    ask(&mut sender, "push not-an-id x", "err bad id");
    wait_counter(&relays[0], "errors", |c| c.errors, 2);
}

#[test]
fn presence_converges_and_a_dead_node_leaves_the_others_working() {
    let Some(mut cluster) = Cluster::start("cluster presence", &["a", "b", "c"], 1) else {
        return;
    };
    let relays = &mut cluster.relays;
    let mut watcher = relays[0].connect();
    ask(&mut watcher, "presence room", "ok");
    let mut on_b = relays[1].connect();
    let b_id = whoami(&mut on_b);
    let mut on_c = relays[2].connect();
    let c_id = whoami(&mut on_c);
    // The watch reaches NATS asynchronously: subscribe again until the join is seen.
    let joined = eventually(LONG, || {
        ask(&mut on_b, "sub room", "ok");
        let seen = next(&mut watcher, Duration::from_millis(300));
        if seen.is_none() {
            ask(&mut on_b, "unsub room", "ok");
            let _ = next(&mut watcher, Duration::from_millis(300));
        }
        seen.as_deref() == Some(&format!("join room {b_id}"))
    });
    assert!(joined, "no join event from node b");
    ask(&mut on_c, "sub room", "ok");
    assert_eq!(next(&mut watcher, LONG), Some(format!("join room {c_id}")));
    wait_members(&mut watcher, "room", &[b_id.clone(), c_id.clone()]);
    ask(&mut on_c, "unsub room", "ok");
    assert_eq!(next(&mut watcher, LONG), Some(format!("leave room {c_id}")));
    ask(&mut on_c, "sub room", "ok");
    assert_eq!(next(&mut watcher, LONG), Some(format!("join room {c_id}")));

    // Node b dies (SIGKILL, no goodbye): `who` stops naming its members within the gather
    // window; a and c go on publishing to each other.
    let mut sub_a = subscriber(&relays[0], "room");
    let a_id = whoami(&mut sub_a);
    wait_members(
        &mut watcher,
        "room",
        &[a_id.clone(), b_id.clone(), c_id.clone()],
    );
    let b = relays.remove(1);
    drop(b);
    drop(on_b);
    wait_members(&mut watcher, "room", &[a_id.clone(), c_id.clone()]);
    let mut publisher = relays[0].connect();
    ask(&mut publisher, "pub room still here", "ok 1");
    assert_eq!(next(&mut sub_a, LONG).as_deref(), Some("room still here"));
    assert_eq!(next(&mut on_c, LONG).as_deref(), Some("room still here"));
    let mut c_pub = relays[1].connect();
    ask(&mut c_pub, "pub room from c", "ok 1");
    assert_eq!(next(&mut sub_a, LONG).as_deref(), Some("room from c"));
}

#[test]
fn nats_down_keeps_local_delivery_and_cross_node_delivery_resumes() {
    let Some(mut cluster) = Cluster::start("cluster nats restart", &["a", "c"], 1) else {
        return;
    };
    let relays = &mut cluster.relays;
    let mut local = subscriber(&relays[0], "t");
    let mut remote = subscriber(&relays[1], "t");
    let remote_id = whoami(&mut remote);
    let local_id = whoami(&mut local);
    let mut publisher = relays[0].connect();
    wait_members(&mut publisher, "t", &[local_id, remote_id]);
    ask(&mut publisher, "pub t before", "ok 1");
    assert_eq!(next(&mut local, LONG).as_deref(), Some("t before"));
    assert_eq!(next(&mut remote, LONG).as_deref(), Some("t before"));

    cluster.nats.kill();
    let down = eventually(LONG, || {
        report(&relays[0])
            .workers
            .iter()
            .all(|w| w.cluster.as_ref().is_some_and(|c| !c.connected))
    });
    assert!(down, "node a does not notice that NATS is gone");
    // Local delivery goes on; the publisher is told the cross-node part failed.
    for i in 0..5 {
        ask(
            &mut publisher,
            &format!("pub t during{i}"),
            "err cluster unavailable (1 delivered on this worker)",
        );
        assert_eq!(next(&mut local, LONG), Some(format!("t during{i}")));
    }
    wait_counter(&relays[0], "errors", |c| c.errors, 5);
    let text = Command::new(shmrelay_tests::workspace_bin(
        "shmrelay-tools",
        "relayctl",
        &["tools/src"],
    ))
    .args(["cluster", &relays[0].instance])
    .stderr(Stdio::inherit())
    .output()
    .expect("run relayctl cluster");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("down"), "relayctl cluster: {text}");

    cluster.nats.restart();
    for r in relays.iter() {
        hosts::wait_connected(r, 1);
    }
    // Subscriptions are restored on reconnect: cross-node delivery resumes.
    let resumed = eventually(LONG, || {
        ask(&mut publisher, "pub t after", "ok 1");
        assert_eq!(next(&mut local, LONG).as_deref(), Some("t after"));
        next(&mut remote, Duration::from_millis(300)).as_deref() == Some("t after")
    });
    assert!(
        resumed,
        "cross-node delivery did not resume after NATS came back"
    );
    wait_counter(&relays[0], "reconnects", |c| c.reconnects, 1);
}

#[test]
fn haproxy_in_front_of_the_nodes() {
    let Some(haproxy) = required("haproxy", "HAPROXY") else {
        return;
    };
    let Some(mut cluster) = Cluster::start("cluster haproxy", &["a", "b", "c"], 1) else {
        return;
    };
    let relays = &mut cluster.relays;
    let lb_port = hosts::free_port();
    let cfg =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster/haproxy.cfg");
    let lb = Command::new(haproxy)
        .args(["-db", "-f"])
        .arg(&cfg)
        .env("SHMRELAY_LB_BIND", format!("127.0.0.1:{lb_port}"))
        .env("SHMRELAY_NODE_A", relays[0].addr.to_string())
        .env("SHMRELAY_NODE_B", relays[1].addr.to_string())
        .env("SHMRELAY_NODE_C", relays[2].addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start haproxy");
    let _lb = KillOnDrop(lb);
    let lb_addr = std::net::SocketAddr::from(([127, 0, 0, 1], lb_port));
    let try_client = || -> Option<(Client, String)> {
        let mut c =
            Client::connect_with(lb_addr, Default::default(), Duration::from_secs(5)).ok()?;
        match c.roundtrip_within(b"whoami", Duration::from_secs(5)) {
            shmrelay_tests::Recv::Frame(p) => {
                let s = String::from_utf8(p).ok()?;
                Some((c, s.strip_prefix("id ")?.to_owned()))
            }
            _ => None,
        }
    };
    assert!(
        eventually(LONG, || try_client().is_some()),
        "haproxy does not serve"
    );
    let mut clients: Vec<(Client, String)> = (0..6).filter_map(|_| try_client()).collect();
    assert_eq!(clients.len(), 6);
    let nodes: HashSet<&str> = clients
        .iter()
        .map(|(_, id)| id.split('/').next().unwrap())
        .collect();
    assert_eq!(
        nodes.len(),
        3,
        "round robin spreads clients over the nodes: {nodes:?}"
    );
    // Pub/sub through the balancer: every client subscribes, one publishes.
    let ids: Vec<String> = clients.iter().map(|(_, id)| id.clone()).collect();
    for (c, _) in clients.iter_mut() {
        ask(c, "sub lb", "ok");
    }
    wait_members(&mut clients[0].0, "lb", &ids);
    // The publisher is a subscriber too: its own worker pushes to it before answering.
    clients[0].0.send(b"pub lb hi");
    assert_eq!(next(&mut clients[0].0, LONG).as_deref(), Some("lb hi"));
    assert!(next(&mut clients[0].0, LONG).unwrap().starts_with("ok "));
    for (c, id) in clients.iter_mut().skip(1) {
        assert_eq!(next(c, LONG).as_deref(), Some("lb hi"), "{id}");
    }

    // Node b dies: once HAProxy's check marks it down, every new client is served by a or c.
    drop(relays.remove(1));
    let served = eventually(LONG, || {
        (0..6).all(|_| try_client().is_some_and(|(_, id)| !id.starts_with("b/")))
    });
    assert!(
        served,
        "new clients through haproxy are not all served after node b died"
    );
}
