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
/// Paced runs: this many messages, one every [`PACE`] (latency without queueing).
const PACED: usize = 200;
const PACE: Duration = Duration::from_millis(5);

/// One run: `msgs` publishes on `topic` from `publisher` (back to back, or one every `pace`),
/// every subscriber reads them all. Returns (deliveries per second, p50 us, p99 us).
fn run(
    publisher: &mut Client,
    subs: Vec<Client>,
    topic: &str,
    msgs: usize,
    pace: Option<Duration>,
) -> (f64, u64, u64, Vec<Client>) {
    let base = Instant::now();
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(msgs);
                for _ in 0..msgs {
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
    for _ in 0..msgs {
        let now = base.elapsed().as_micros();
        publisher.send(format!("pub {topic} {now}").as_bytes());
        if let Some(p) = pace {
            std::thread::sleep(p);
        }
    }
    for _ in 0..msgs {
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
    ((msgs * SUBS) as f64 / secs, p(0.5), p(0.99), back)
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
    let mut stats: [Vec<Vec<f64>>; 2] = Default::default(); // [one, three] x [rate, p50, p99, paced p50, paced p99]
    for s in stats.iter_mut() {
        *s = vec![Vec::new(); 5];
    }
    for _ in 0..3 {
        for (k, topic) in ["one", "three"].into_iter().enumerate() {
            let subs = std::mem::take(if k == 0 { &mut one } else { &mut three });
            let (rate, p50, p99, subs) = run(&mut publisher, subs, topic, MSGS, None);
            let (_, q50, q99, subs) = run(&mut publisher, subs, topic, PACED, Some(PACE));
            *(if k == 0 { &mut one } else { &mut three }) = subs;
            for (i, v) in [rate, p50 as f64, p99 as f64, q50 as f64, q99 as f64]
                .into_iter()
                .enumerate()
            {
                stats[k][i].push(v);
            }
        }
    }
    let m: Vec<Vec<f64>> = stats
        .iter()
        .map(|s| s.iter().cloned().map(median).collect())
        .collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "fan-out, 1 publisher, {SUBS} subscribers: bursts of {MSGS} messages back to back, and \
         {PACED} paced one every {PACE:?}; medians of 3 alternating runs (namespaces: {}), load {}",
        cluster.hosts.namespaced(),
        load.trim()
    );
    for (k, name) in ["one node (60 on a)", "three nodes (20 on each)"]
        .into_iter()
        .enumerate()
    {
        println!(
            "{name}: burst {:.0} deliveries/s, p50 {:.0} us, p99 {:.0} us; paced p50 {:.0} us, p99 {:.0} us",
            m[k][0], m[k][1], m[k][2], m[k][3], m[k][4]
        );
    }
    println!(
        "three nodes / one node: burst rate {:.2}, paced p50 {:.2}",
        m[1][0] / m[0][0],
        m[1][3] / m[0][3]
    );
}
