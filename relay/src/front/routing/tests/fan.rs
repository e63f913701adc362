//! Pool-wide commands in a routed connection's reply order: one merged reply, in its turn.

use super::*;
use crate::front::fanout::PoolWide;

impl Front {
    fn push_fan(&mut self, cmd: PoolWide, parts: &[(usize, u64)]) {
        if self.route.push_fan(cmd, parts) {
            self.routing.wait(K, parts[0]);
        }
    }
}

#[test]
fn a_fan_out_between_single_requests_comes_out_merged_in_its_turn() {
    // GET a (worker 3), DBSIZE (3 and 4), GET b (worker 4).
    let mut f = Front::sent(&[(3, 10)]);
    f.push_fan(PoolWide::Dbsize, &[(3, 20), (4, 5)]);
    f.push(4, 15);
    assert_eq!(f.reply(4, 5, b":2\r\n"), Reply::Merge);
    assert_eq!(f.reply(4, 15, b"$1\r\nb\r\n"), Reply::Hold);
    f.end_batch();
    assert_eq!(f.out, b"", "nothing before GET a's reply");
    assert_eq!(f.reply(3, 10, b"$1\r\na\r\n"), Reply::Write);
    assert_eq!(f.reply(3, 20, b":3\r\n"), Reply::Merge);
    f.end_batch();
    assert_eq!(
        f.out, b"$1\r\na\r\n",
        "worker 3's part may have more replies coming"
    );
    f.complete(3, 20);
    assert_eq!(f.out, b"$1\r\na\r\n:5\r\n$1\r\nb\r\n");
    f.complete(4, 15);
    assert!(f.route.idle());
    assert_eq!(
        f.route.state_bytes(),
        0,
        "the fan-out's memory is given back"
    );
}

#[test]
fn a_fan_out_alone_waits_on_every_part() {
    let mut f = Front::new();
    f.push_fan(PoolWide::Flushall, &[(3, 7), (4, 9), (5, 2)]);
    assert!(f.route.state_bytes() > 0);
    assert_eq!(f.reply(5, 2, b"+OK\r\n"), Reply::Merge);
    assert_eq!(f.reply(3, 7, b"+OK\r\n"), Reply::Merge);
    f.end_batch();
    f.complete(3, 7);
    f.complete(5, 2);
    assert_eq!(f.out, b"", "worker 4 has not answered");
    assert!(f.routing.has_waiters(4));
    assert_eq!(f.reply(4, 9, b"+OK\r\n"), Reply::Merge);
    f.complete(4, 9);
    assert_eq!(f.out, b"+OK\r\n");
    assert!(f.route.idle());
    assert_eq!(f.route.state_bytes(), 0);
}

#[test]
fn a_part_answered_without_a_reply_is_an_error_not_a_hang() {
    // Worker 4 was replaced and its frames were not carried: its positions restart past the
    // request, which counts as answered, with no reply.
    let mut f = Front::new();
    f.push_fan(PoolWide::Dbsize, &[(3, 7), (4, 9)]);
    f.push(3, 12);
    assert_eq!(f.reply(3, 7, b":1\r\n"), Reply::Merge);
    f.complete(3, 7);
    f.routing.restart(4, 30);
    f.advance();
    let out = String::from_utf8(f.out.clone()).unwrap();
    assert!(
        out.starts_with("-ERR DBSIZE: worker 2 of 2 in the pool did not answer"),
        "{out}"
    );
    assert_eq!(f.reply(3, 12, b"+x\r\n"), Reply::Write);
    f.complete(3, 12);
    assert!(f.route.idle());
}

#[test]
fn many_fan_outs_and_single_requests_in_random_arrival_orders() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for trial in 0..200 {
        let workers: Vec<usize> = [3, 7, 9][..2 + rng.below(2)].to_vec();
        let n = 1 + rng.below(200);
        // Per request: its parts (worker, position) and, for a single one, its reply count.
        let mut next_pos = [0u64; 16];
        let mut reqs: Vec<(Vec<(usize, u64)>, usize)> = Vec::new();
        let mut expected = Vec::new();
        for i in 0..n {
            let fan = rng.below(4) == 0;
            let ws: Vec<usize> = if fan {
                workers.clone()
            } else {
                vec![workers[rng.below(workers.len())]]
            };
            let parts = ws
                .iter()
                .map(|&w| {
                    next_pos[w] += 1 + rng.below(50) as u64;
                    (w, next_pos[w])
                })
                .collect();
            let recs = if fan {
                let sum: usize = workers.iter().map(|w| i * 10 + w).sum();
                expected.extend_from_slice(format!(":{sum}\r\n").as_bytes());
                1
            } else {
                let recs = [0, 1, 1, 2][rng.below(4)];
                for k in 0..recs {
                    expected.extend_from_slice(format!("<{i}.{k}>").as_bytes());
                }
                recs
            };
            reqs.push((parts, recs));
        }
        // Each worker's parts, in order: (request, position); its cursor: (index, record).
        let of: Vec<Vec<(usize, u64)>> = (0..16)
            .map(|w| {
                (0..n)
                    .flat_map(|i| {
                        reqs[i]
                            .0
                            .iter()
                            .filter(move |p| p.0 == w)
                            .map(move |p| (i, p.1))
                    })
                    .collect()
            })
            .collect();
        let mut cur = [(0usize, 0usize); 16];
        let mut f = Front::new();
        let mut pushed = 0;
        loop {
            let emitting: Vec<usize> = workers
                .iter()
                .copied()
                .filter(|&w| of[w].get(cur[w].0).is_some_and(|&(i, _)| i < pushed))
                .collect();
            if pushed == n && emitting.is_empty() {
                break;
            }
            match rng.below(4) {
                0 if pushed < n => {
                    for _ in 0..1 + rng.below(10) {
                        if pushed < n {
                            let (parts, _) = &reqs[pushed];
                            if parts.len() > 1 {
                                f.push_fan(PoolWide::Dbsize, &parts.clone());
                            } else {
                                f.push(parts[0].0, parts[0].1);
                            }
                            pushed += 1;
                        }
                    }
                }
                1 => {
                    let w = workers[rng.below(workers.len())];
                    let done = cur[w].0;
                    if done > 0 {
                        f.complete(w, of[w][done - 1].1);
                    }
                }
                _ if !emitting.is_empty() => {
                    let w = emitting[rng.below(emitting.len())];
                    for _ in 0..1 + rng.below(8) {
                        let Some(&(i, p)) = of[w].get(cur[w].0).filter(|&&(i, _)| i < pushed)
                        else {
                            break;
                        };
                        let (parts, recs) = &reqs[i];
                        if cur[w].1 < *recs {
                            let body = if parts.len() > 1 {
                                format!(":{}\r\n", i * 10 + w)
                            } else {
                                format!("<{i}.{}>", cur[w].1)
                            };
                            f.reply(w, p, body.as_bytes());
                            cur[w].1 += 1;
                        }
                        if cur[w].1 >= *recs {
                            cur[w] = (cur[w].0 + 1, 0);
                        }
                    }
                    f.end_batch();
                }
                _ => {}
            }
            assert!(
                expected.starts_with(&f.out),
                "trial {trial}: out of order: {}",
                String::from_utf8_lossy(&f.out)
            );
        }
        for &w in &workers {
            if let Some(&(_, last)) = of[w].last() {
                f.complete(w, last);
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&f.out),
            String::from_utf8_lossy(&expected),
            "trial {trial}"
        );
        assert!(f.route.idle(), "trial {trial}: requests left");
        assert_eq!(f.route.state_bytes(), 0);
    }
}
