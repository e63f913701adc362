//! The routing table driven as the front drives it, without sockets or rings.

use super::*;
use crate::front::fanout::PoolWide;

mod fan;

/// xorshift64*: deterministic randomness without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The connection the tests drive.
const K: ConnKey = ConnKey { slot: 1, gen: 7 };

/// The front around the routing table and one connection's `Route`, as `pump.rs` and
/// `read.rs` drive them: direct replies written, `advance` when a reply asks for it and when
/// a worker's completion passes a request the connection waits on. As in `pump_replies`, the
/// advances a batch of replies asks for run after the batch's direct replies are written.
struct Front {
    routing: Routing,
    route: Route,
    out: Vec<u8>,
    /// Advances asked for in the current batch.
    todo: usize,
    /// The connection's out queue (bytes the socket did not take).
    queued: usize,
    max_pending: usize,
    /// Set when a decision closed the connection.
    closed: Option<CloseReason>,
}

impl Front {
    fn new() -> Front {
        Front {
            routing: Routing::new(16),
            route: Route::new(0),
            out: Vec::new(),
            todo: 0,
            queued: 0,
            max_pending: usize::MAX,
            closed: None,
        }
    }
    /// A front whose connection sent these requests, (worker, position) each, in order.
    fn sent(reqs: &[(usize, u64)]) -> Front {
        let mut f = Front::new();
        for &(w, pos) in reqs {
            f.push(w, pos);
        }
        f
    }
    fn push(&mut self, w: usize, pos: u64) {
        if self.route.push(w, pos) {
            self.routing.wait(K, (w, pos));
        }
    }
    fn push_fan(&mut self, cmd: PoolWide, parts: &[(usize, u64)]) {
        if self.route.push_fan(cmd, parts) {
            self.routing.wait(K, parts[0]);
        }
    }
    fn advance(&mut self) {
        let mut early = Vec::new();
        self.routing.advance(K, &mut self.route, &mut early);
        for b in early {
            self.out.extend_from_slice(&b);
        }
    }
    fn reply(&mut self, w: usize, aux: u64, payload: &[u8]) -> Reply {
        let d = Routing::reply(
            &mut self.route,
            w,
            aux,
            payload,
            self.queued,
            self.max_pending,
        );
        match d.reply {
            Reply::Write => self.out.extend_from_slice(payload),
            Reply::Hold | Reply::Merge => {}
            Reply::Close(reason) => self.closed = Some(reason),
        }
        if d.advance {
            self.todo += 1;
        }
        d.reply
    }
    /// The end of a batch of replies: the advances it asked for.
    fn end_batch(&mut self) {
        for _ in 0..std::mem::take(&mut self.todo) {
            self.advance();
        }
    }
    /// Worker `w`'s ring was read to its end after it released up to `upto`.
    fn complete(&mut self, w: usize, upto: u64) {
        let mut due = Vec::new();
        self.routing.complete(w, upto, |key| due.push(key));
        for key in due {
            assert_eq!(key, K);
            self.advance();
        }
    }
}

#[test]
fn replies_in_random_arrival_orders_come_out_in_request_order() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for trial in 0..400 {
        let workers: Vec<usize> = [3, 7, 9][..1 + rng.below(3)].to_vec();
        let n = 1 + rng.below(400);
        // Every other trial with a pool of several has pool-wide commands among its requests.
        let fans = trial % 2 == 1 && workers.len() > 1;
        // Per request: its parts (worker, position; one per worker of the pool for a pool-wide
        // command) and how many reply records each part gets (0 to 3; 1 for a pool-wide one).
        let mut next_pos = [0u64; 16];
        let mut reqs: Vec<(Vec<(usize, u64)>, usize)> = Vec::new();
        let mut expected = Vec::new();
        for i in 0..n {
            let fan = fans && rng.below(4) == 0;
            let ws = if fan {
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
                // The merged reply: the sum of the parts' counts.
                let sum: usize = workers.iter().map(|w| i * 10 + w).sum();
                expected.extend_from_slice(format!(":{sum}\r\n").as_bytes());
                1
            } else {
                let recs = [0, 1, 1, 1, 1, 2, 3][rng.below(7)];
                for k in 0..recs {
                    expected.extend_from_slice(format!("<{i}.{k}>").as_bytes());
                }
                recs
            };
            reqs.push((parts, recs));
        }
        // Each worker's parts in order, (request, position), and its cursor: (index, record).
        let of: Vec<Vec<(usize, u64)>> = (0..16)
            .map(|w| {
                let mine = |i: usize| reqs[i].0.iter().filter(move |p| p.0 == w);
                (0..n)
                    .flat_map(|i| mine(i).map(move |p| (i, p.1)))
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
                    // A read: a few more requests.
                    for _ in 0..1 + rng.below(20) {
                        if pushed < n {
                            let parts = &reqs[pushed].0;
                            if parts.len() > 1 {
                                f.push_fan(PoolWide::Dbsize, parts);
                            } else {
                                f.push(parts[0].0, parts[0].1);
                            }
                            pushed += 1;
                        }
                    }
                }
                1 => {
                    // A worker releases what it answered: its ring read to the end.
                    let w = workers[rng.below(workers.len())];
                    let done = cur[w].0;
                    if done > 0 {
                        f.complete(w, of[w][done - 1].1);
                    }
                }
                _ if !emitting.is_empty() => {
                    // A batch of one worker's replies.
                    let w = emitting[rng.below(emitting.len())];
                    for _ in 0..1 + rng.below(8) {
                        let Some(&(i, p)) = of[w].get(cur[w].0).filter(|&&(i, _)| i < pushed)
                        else {
                            break;
                        };
                        let recs = reqs[i].1;
                        if cur[w].1 < recs {
                            let body = if reqs[i].0.len() > 1 {
                                format!(":{}\r\n", i * 10 + w)
                            } else {
                                format!("<{i}.{}>", cur[w].1)
                            };
                            f.reply(w, p, body.as_bytes());
                            cur[w].1 += 1;
                        }
                        if cur[w].1 >= recs {
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
        assert_eq!(f.route.held_bytes(), 0);
        assert_eq!(f.route.state_bytes(), 0);
    }
}

#[test]
fn a_push_is_written_as_it_comes() {
    let mut f = Front::new();
    f.push(3, 10);
    f.push(4, 5);
    f.reply(4, 5, b"second");
    f.reply(4, 0, b"push");
    f.reply(3, 10, b"first");
    f.end_batch();
    f.complete(3, 10);
    assert_eq!(f.out, b"pushfirstsecond");
}

/// One slow request to worker 3, then `n` to worker 4 answered at once: the reply of the
/// slow one releases them all, and the route's queues shrink afterwards.
fn long_pipeline(f: &mut Front, n: usize) {
    // Ring positions only grow.
    let (slow, fast) = (f.routing.completed(3) + 1, f.routing.completed(4));
    f.push(3, slow);
    for i in 1..=n as u64 {
        f.push(4, fast + i);
    }
    for i in 1..=n as u64 {
        f.reply(4, fast + i, b"$1\r\nv\r\n");
    }
    f.end_batch();
    f.complete(4, fast + n as u64);
    assert_eq!(f.route.held_bytes(), 7 * n);
    assert!(f.route.state_bytes() > 7 * n);
    assert!(f.out.is_empty(), "nothing before the slow reply");
    f.reply(3, slow, b"+OK\r\n");
    f.end_batch();
    f.complete(3, slow);
    assert_eq!(f.out.len(), 5 + 7 * n);
    assert!(f.out.starts_with(b"+OK\r\n$1\r\nv\r\n"));
    assert!(f.route.idle());
    f.out.clear();
}

/// `n` requests of which nine tenths are answered and popped: the queues hold about
/// twice what is left at most (they shrink while requests are still outstanding).
fn long_pipeline_mostly_drained(f: &mut Front, n: usize) {
    let fast = f.routing.completed(4);
    for i in 1..=n as u64 {
        f.push(4, fast + i);
    }
    let grown = f.route.reqs.capacity();
    let left = n / 10;
    f.complete(4, fast + (n - left) as u64);
    assert_eq!(f.route.reqs.len(), left);
    assert!(
        f.route.reqs.capacity() <= 4 * left && f.route.reqs.capacity() < grown,
        "{} slots for {left} requests (grown to {grown})",
        f.route.reqs.capacity()
    );
    f.complete(4, fast + n as u64);
    assert!(f.route.idle());
    assert!(f.route.capacity() <= 3 * IDLE_KEEP);
}

#[test]
fn a_drained_pipeline_gives_its_memory_back() {
    let mut f = Front::new();
    long_pipeline(&mut f, 100_000);
    // 2 lanes and the request queue, each back to a few slots.
    assert!(
        f.route.capacity() <= 3 * IDLE_KEEP,
        "{} request slots kept by an idle connection",
        f.route.capacity()
    );
    assert_eq!(f.route.state_bytes(), 0);
    // And it works again after shrinking.
    long_pipeline(&mut f, 1000);
    assert!(f.route.capacity() <= 3 * IDLE_KEEP);
    // While a pipeline drains, the queues follow it down.
    long_pipeline_mostly_drained(&mut f, 100_000);
}

#[test]
fn reordering_cost_does_not_grow_with_the_pipeline() {
    // 200K replies held behind one slow request: with a scan per reply this is ~10^10
    // steps (minutes); O(1) per reply is milliseconds. The bound is generous for a loaded
    // machine.
    let t = std::time::Instant::now();
    let mut f = Front::new();
    long_pipeline(&mut f, 200_000);
    let took = t.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
}

#[test]
fn replies_from_several_workers_come_out_in_request_order() {
    let mut f = Front::sent(&[(3, 10), (4, 5), (3, 20), (5, 8)]);
    // Every reply but the oldest one's comes early: held, in its request.
    assert_eq!(f.reply(5, 8, b"d"), Reply::Hold);
    assert_eq!(f.reply(4, 5, b"b"), Reply::Hold);
    assert_eq!(f.reply(3, 10, b"a"), Reply::Write);
    // Worker 3 answering its later request passes its first one: "b" is next.
    assert_eq!(f.reply(3, 20, b"c"), Reply::Hold);
    f.end_batch();
    assert_eq!(f.out, b"ab");
    f.complete(4, 5);
    assert_eq!(f.out, b"abc");
    f.complete(3, 20);
    f.complete(5, 8);
    assert_eq!(f.out, b"abcd");
    assert!(f.route.idle());
    assert_eq!(f.route.held_bytes(), 0);
    for w in [3, 4, 5] {
        assert!(!f.routing.has_waiters(w), "worker {w}: waits left behind");
    }
}

#[test]
fn a_reply_for_a_closed_or_unknown_connection_decides_nothing_for_anyone_else() {
    let mut t = Routing::new(4);
    let mut r = Route::new(0);
    assert!(r.push(2, 10), "the only outstanding request is waited on");
    t.wait(K, (2, 10));
    // The connection closes: its route state goes with it, its wait stays behind (stale).
    drop(r);
    let mut due = Vec::new();
    t.complete(2, 10, |key| due.push(key));
    assert_eq!(
        due,
        [K],
        "the front looks the key up, finds nothing and skips it"
    );
    assert!(!t.has_waiters(2), "the stale entry is gone");
    // A late reply to it lands on the slot's next connection (another generation: a route
    // with nothing outstanding) or on none: it answers no request, so it is a push, and the
    // route is untouched.
    let mut fresh = Route::new(0);
    let d = Routing::reply(&mut fresh, 2, 10, b"late", 0, usize::MAX);
    assert_eq!(
        d,
        Decision {
            reply: Reply::Write,
            advance: false
        }
    );
    assert!(fresh.idle());
    assert_eq!(fresh.held_bytes(), 0);
    // A worker index beyond the table (a wrong record) changes nothing and does not panic.
    t.wait(K, (99, 1));
    due.clear();
    t.complete(99, 5, |key| due.push(key));
    assert!(due.is_empty());
    assert_eq!(t.completed(99), 0);
}

#[test]
fn a_lying_aux_passes_only_its_own_workers_requests() {
    // An answered position beyond every request of the worker: it claims to be past them
    // all. They count as answered (the worker had its chance), the record is written as a
    // push, and the other worker's request keeps its turn.
    let mut f = Front::sent(&[(3, 10), (3, 20), (4, 5)]);
    assert_eq!(f.reply(3, 1000, b"lie "), Reply::Write);
    f.end_batch();
    assert_eq!(f.reply(4, 5, b"b"), Reply::Write);
    f.complete(4, 5);
    assert_eq!(f.out, b"lie b");
    assert!(f.route.idle());

    // An answered position of another worker's request: the lie touches its own lane only.
    let mut f = Front::sent(&[(4, 5), (3, 10)]);
    assert_eq!(
        f.reply(3, 5, b"x"),
        Reply::Write,
        "no request of worker 3 ends at 5"
    );
    assert!(!f.route.idle());
    assert_eq!(f.reply(4, 5, b"a"), Reply::Write);
    assert_eq!(f.reply(3, 10, b"b"), Reply::Hold);
    f.end_batch();
    f.complete(4, 5);
    f.complete(3, 10);
    assert_eq!(f.out, b"xab");
    assert!(f.route.idle());
    assert_eq!(f.route.state_bytes(), 0);
}

#[test]
fn a_worker_gone_with_requests_outstanding_releases_its_waiters() {
    let mut f = Front::sent(&[(3, 10), (4, 5), (3, 20)]);
    assert_eq!(f.reply(4, 5, b"b"), Reply::Hold);
    assert!(f.routing.has_waiters(3));
    // Worker 3 dies and its new ring generation carried nothing: its positions restart at
    // the front's tail (its connections are closed by the front; nobody waits on it).
    f.routing.restart(3, 20);
    assert!(!f.routing.has_waiters(3));
    assert_eq!(f.routing.completed(3), 20);
    // Whatever still advances moves past worker 3's requests, never waits on them.
    f.advance();
    assert_eq!(f.out, b"b");
    f.complete(4, 5);
    assert!(f.route.idle(), "nothing waits on the gone worker");
    // Rings reset after a quarantine: positions start again at zero.
    f.routing.restart(3, 0);
    assert_eq!(f.routing.completed(3), 0);
    f.push(3, 4);
    assert!(f.routing.has_waiters(3));
    f.routing.forget(3);
    assert!(!f.routing.has_waiters(3));
    assert_eq!(
        f.routing.completed(3),
        0,
        "forgetting waiters keeps the position"
    );
}

#[test]
fn held_replies_past_max_pending_close_the_connection() {
    let mut f = Front::new();
    f.max_pending = 10;
    f.push(3, 10);
    f.push(4, 5);
    f.push(4, 6);
    assert_eq!(f.reply(4, 5, b"12345678"), Reply::Hold);
    assert_eq!(f.closed, None);
    assert_eq!(
        f.reply(4, 6, b"12345678"),
        Reply::Close(CloseReason::SlowConsumer)
    );
    // The out queue counts too.
    let mut f = Front::new();
    f.max_pending = 10;
    f.queued = 5;
    f.push(3, 10);
    f.push(4, 5);
    assert_eq!(
        f.reply(4, 5, b"123456"),
        Reply::Close(CloseReason::SlowConsumer)
    );
    // A direct reply never closes: it goes to the socket (and its queue's own bound).
    assert_eq!(f.reply(3, 10, b"123456789012"), Reply::Write);
}

#[test]
fn a_stalled_connection_resumes_below_half_its_bound() {
    let mut r = Route::new(0);
    assert!(!r.resume(0, 0), "not stalled: nothing to resume");
    r.push(3, 10);
    let s = r.state_bytes();
    assert!(s > 0);
    r.stalled = true;
    assert!(!r.resume(1, 2 * s), "queue and state above half");
    assert!(r.stalled);
    assert!(r.resume(0, 2 * s));
    assert!(!r.stalled);
}
