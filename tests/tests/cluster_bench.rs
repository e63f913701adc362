//! Cross-node fan-out benchmark (issue 19), ignored by default: one publisher on node a,
//! 60 subscribers either all on node a ("one node") or 20 on each of a, b and c ("three
//! nodes", through NATS), alternating runs, medians. Prints messages/s and p50/p99 delivery
//! latency (publish sent -> push received, one clock: every client is in this process).
//!
//! ```sh
//! cargo test --release -p shmrelay-tests --test cluster_bench -- --ignored --nocapture
//! ```

#[path = "cluster/hosts.rs"]
#[allow(dead_code)]
mod hosts;

use std::time::{Duration, Instant};

use hosts::{ask, Cluster};
use shmrelay_tests::{Client, Recv};

const SUBS: usize = 60;
const MSGS: usize = 2000;

/// One run: `MSGS` publishes on `topic` from `publisher`, every subscriber reads them all.
/// Returns (deliveries per second, p50 us, p99 us).
fn run(publisher: &mut Client, subs: Vec<Client>, topic: &str) -> (f64, u64, u64, Vec<Client>) {
    let base = Instant::now();
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(MSGS);
                for _ in 0..MSGS {
                    let Recv::Frame(p) = c.recv_data(Duration::from_secs(60)) else {
                        panic!("subscriber starved");
                    };
                    let sent: u64 = std::str::from_utf8(&p)
                        .unwrap()
                        .rsplit(' ')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                    lat.push(base.elapsed().as_micros() as u64 - sent);
                }
                (lat, c)
            })
        })
        .collect();
    let start = Instant::now();
    for _ in 0..MSGS {
        let now = base.elapsed().as_micros();
        publisher.send(format!("pub {topic} {now}").as_bytes());
    }
    for _ in 0..MSGS {
        assert!(matches!(
            publisher.recv_data(Duration::from_secs(60)),
            Recv::Frame(_)
        ));
    }
    let mut all = Vec::new();
    let mut back = Vec::new();
    for r in readers {
        let (lat, c) = r.join().unwrap();
        all.extend(lat);
        back.push(c);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let p = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    ((MSGS * SUBS) as f64 / secs, p(0.5), p(0.99), back)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn fan_out_one_node_against_three() {
    let Some(cluster) = Cluster::start("cluster bench", &["a", "b", "c"], 1) else {
        return;
    };
    let r = &cluster.relays;
    let mut one: Vec<Client> = (0..SUBS).map(|_| hosts::subscriber(&r[0], "one")).collect();
    let mut three: Vec<Client> = (0..SUBS)
        .map(|i| hosts::subscriber(&r[i % 3], "three"))
        .collect();
    let mut publisher = r[0].connect();
    // Every remote subscription is in place before measuring.
    let ok = shmrelay_tests::eventually(hosts::LONG, || {
        ask(&mut publisher, "who three", "members")
            .split(' ')
            .count()
            == SUBS + 1
    });
    assert!(ok);
    let (mut rate1, mut p50_1, mut p99_1) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rate3, mut p50_3, mut p99_3) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let (rate, p50, p99, back) = run(&mut publisher, one, "one");
        one = back;
        rate1.push(rate);
        p50_1.push(p50 as f64);
        p99_1.push(p99 as f64);
        let (rate, p50, p99, back) = run(&mut publisher, three, "three");
        three = back;
        rate3.push(rate);
        p50_3.push(p50 as f64);
        p99_3.push(p99 as f64);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (r1, r3) = (median(rate1), median(rate3));
    println!(
        "fan-out, 1 publisher, {SUBS} subscribers, {MSGS} messages, medians of 3 alternating runs \
         (namespaces: {}), load {}",
        cluster.hosts.namespaced(),
        load.trim()
    );
    println!(
        "one node:    {r1:.0} deliveries/s, p50 {:.0} us, p99 {:.0} us",
        median(p50_1),
        median(p99_1)
    );
    println!(
        "three nodes: {r3:.0} deliveries/s, p50 {:.0} us, p99 {:.0} us  (rate ratio {:.2})",
        median(p50_3),
        median(p99_3),
        r3 / r1
    );
}
