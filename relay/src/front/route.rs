//! Key routing for `resp` listeners with more than one worker: each frame goes to the worker
//! that owns its key, so a key lives on one worker whichever connection names it.
//!
//! Reading: one read lands in a front-local buffer (not in a ring: which ring a frame belongs
//! to is known only once it is scanned); the frames of the read are then copied into one DATA
//! record per worker, each worker's frames in the client's order. These bytes are counted as
//! copied. Before a read, every worker of the pool must have room for the whole read, so the
//! bytes taken from the socket always fit. A frame split across reads is assembled in the
//! connection's own buffer (the rest read straight into it), which is then spread over the
//! pool the same way: never copied back and forth once per read.
//!
//! Ordering: the connection keeps the requests it sent, oldest first, as (worker, end position
//! of the frame in that worker's request ring), numbered in sequence. The worker SDK stamps
//! every reply with the end position of the frame it answers (`aux`), so a reply is matched to
//! its request. A reply for the oldest request is written straight from the reply ring
//! (zero-copy); one for a later request is copied to that request's held bytes (counted as
//! copied) and written when its turn comes. A record that answers no outstanding request (a
//! push) is written as it comes, as on a listener without routing.
//!
//! Cost: every step is O(1) amortised per request or reply, whatever the pipeline's length. A
//! reply finds its request through its worker's lane (the connection's requests to that worker
//! not yet passed, oldest first: a worker answers in ring order, so the request is at the
//! lane's front once the ones it passed are popped), and the request by its sequence number
//! (an index into the queue). Popping a request from the front is O(1); its held bytes are in
//! it. Queues shrink when a pipeline has drained, so an idle connection gives the memory back.
//!
//! Bound: the connection's route state (its outstanding requests and held replies,
//! [`Route::state_bytes`]) and its out queue together count against `max_pending`. Past it the
//! front stops reading the client ([`Route::stalled`]; TCP pushes back) until they are below
//! half of it again. Held reply bytes plus the out queue past `max_pending` itself (the
//! requests already in the rings when it stopped were answered with more than that: large
//! replies) still close the connection as a slow consumer, as the out queue alone does: the
//! held bytes go to the out queue when their turn comes.
//!
//! When is a request answered in full? A worker may send any number of records for a frame, so
//! a reply alone does not say. The SDK publishes a batch's replies before it releases the
//! batch's requests, so once the front has seen a worker release past a frame and then read
//! that worker's reply ring empty, every reply to the frame has been seen (`Chan::completed`).

use std::collections::VecDeque;
use std::io::{IoSliceMut, Read};
use std::mem::size_of;

use shm_ring::layout::RECORD_HEADER_SIZE;
use shm_ring::Meta;
use shmrelay_worker::codec::{resp, FrameKind, Scan};
use shmrelay_worker::protocol::tag;
use shmrelay_worker::{CloseReason, ConnId};

use super::conn::{after_read, carry_want, read_error, read_into_carry, walk, Conn, ReadResult};
use super::Chan;
use crate::stats::{add, FrontStats};

/// Largest read of a routed connection: every worker of the pool must have this much room
/// before the read (the frames of one read may all belong to one worker).
pub(super) const ROUTED_CHUNK: usize = 64 * 1024;
/// Bytes read from one routed connection before others get their turn.
const ROUTED_BUDGET: usize = 256 * 1024;

/// One outstanding request of a routed connection.
struct Req {
    /// End position of its frame in its worker's request ring.
    pos: u64,
    /// Its worker (global index).
    worker: u32,
    /// Its worker answered a later request of the connection: every reply to this one has
    /// been seen (a worker serves its frames in ring order).
    done: bool,
    /// Its replies that came before its turn, in arrival order.
    held: Vec<u8>,
}

/// A routed connection's requests to one worker not yet passed by that worker's replies,
/// oldest first: (position, sequence number).
struct Lane {
    worker: usize,
    reqs: VecDeque<(u64, u64)>,
}

/// Queues keep at least this many slots when they shrink while in use.
const KEEP: usize = 16;
/// An empty queue keeps its allocation only up to this many slots (a request-response client
/// reuses it without allocating; a drained pipeline's is freed).
const IDLE_KEEP: usize = 4;

/// What to do with a reply record (from [`Route::on_reply`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ReplyVerdict {
    /// Write it now, with the records around it (it answers the oldest request, or none);
    /// false: it was copied to its request's held bytes.
    pub direct: bool,
    /// The oldest request changed or may be written: call [`Route::pop_answered`] (the
    /// front's `advance`) to write what it holds and wait on the new oldest.
    pub advance: bool,
}

/// A routed connection's state (boxed in its `Conn`, so connections of other listeners pay
/// one pointer for it).
#[derive(Default)]
pub(super) struct Route {
    /// Its listener, whose pool the keys are spread over.
    pub listener: usize,
    /// Requests not yet answered in full, oldest first; `reqs[i]` has sequence number
    /// `base + i`.
    reqs: VecDeque<Req>,
    base: u64,
    /// Per worker the connection sent to (a pool is small: found by a scan).
    lanes: Vec<Lane>,
    /// Bytes in the requests' held replies.
    held_bytes: usize,
    /// Workers (bit = global index) sent the CLOSE at the client's FIN, and those that
    /// acknowledged it.
    pub close_sent: u64,
    pub close_acked: u64,
    /// The front stopped reading the client: its state was past the pending bound.
    pub stalled: bool,
}

impl Route {
    pub fn new(listener: usize) -> Route {
        Route {
            listener,
            ..Route::default()
        }
    }

    /// Nothing outstanding: every request answered and every reply written or queued.
    pub fn idle(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Bytes of held replies.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Memory the connection's outstanding requests and held replies take (what counts
    /// against its pending bound).
    pub fn state_bytes(&self) -> usize {
        self.reqs.len() * (size_of::<Req>() + size_of::<(u64, u64)>()) + self.held_bytes
    }

    /// Allocated capacity of the queues, in requests (for the memory give-back test).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.reqs.capacity() + self.lanes.iter().map(|l| l.reqs.capacity()).sum::<usize>()
    }

    /// A new request to worker `w` whose frame ends at `pos` in its request ring; true if it
    /// is the only outstanding one (the caller waits on it).
    pub fn push(&mut self, w: usize, pos: u64) -> bool {
        let seq = self.base + self.reqs.len() as u64;
        self.reqs.push_back(Req {
            pos,
            worker: w as u32,
            done: false,
            held: Vec::new(),
        });
        let lane = match self.lanes.iter().position(|l| l.worker == w) {
            Some(i) => &mut self.lanes[i],
            None => {
                self.lanes.push(Lane {
                    worker: w,
                    reqs: VecDeque::new(),
                });
                self.lanes.last_mut().expect("just pushed")
            }
        };
        lane.reqs.push_back((pos, seq));
        self.reqs.len() == 1
    }

    /// A reply record of worker `w` answering the frame that ends at `aux`: passes the
    /// worker's earlier requests (answered in full), pops the oldest requests that are answered
    /// and hold nothing, and says whether the record goes out now or was held (copied to its
    /// request, counted in `held_bytes`).
    pub fn on_reply(&mut self, w: usize, aux: u64, payload: &[u8]) -> ReplyVerdict {
        let mut passed = false;
        let mut seq = None;
        if let Some(lane) = self.lanes.iter_mut().find(|l| l.worker == w) {
            while let Some(&(pos, s)) = lane.reqs.front() {
                if pos >= aux {
                    if pos == aux {
                        seq = Some(s);
                    }
                    break;
                }
                lane.reqs.pop_front();
                if let Some(r) = s
                    .checked_sub(self.base)
                    .and_then(|i| self.reqs.get_mut(i as usize))
                {
                    r.done = true;
                    passed = true;
                }
            }
        }
        let mut moved = false;
        while self
            .reqs
            .front()
            .is_some_and(|r| r.done && r.held.is_empty())
        {
            self.pop_front();
            moved = true;
        }
        let front_done = self.reqs.front().is_some_and(|r| r.done);
        let advance = moved || (passed && front_done);
        let Some(seq) = seq else {
            // It answers no outstanding request: a push.
            return ReplyVerdict {
                direct: true,
                advance,
            };
        };
        let i = (seq - self.base) as usize;
        let r = &mut self.reqs[i];
        // A request's replies go out in the order they came: once one is held, so are the rest
        // until the held ones are written.
        if i == 0 && r.held.is_empty() {
            return ReplyVerdict {
                direct: true,
                advance,
            };
        }
        r.held.extend_from_slice(payload);
        self.held_bytes += payload.len();
        ReplyVerdict {
            direct: false,
            advance,
        }
    }

    /// Pops the requests that are answered in full from the front (`completed(w)`: every reply
    /// to a frame of worker `w` ending at or below it has been read), moving the held replies
    /// of each new oldest one to `out` in order. Returns the oldest request still waiting, as
    /// (worker, position), if any.
    pub fn pop_answered(
        &mut self,
        completed: impl Fn(usize) -> u64,
        out: &mut Vec<Vec<u8>>,
    ) -> Option<(usize, u64)> {
        let mut wait = None;
        while let Some(r) = self.reqs.front_mut() {
            if !r.held.is_empty() {
                let held = std::mem::take(&mut r.held);
                self.held_bytes -= held.len();
                out.push(held);
            }
            let w = r.worker as usize;
            if r.done || completed(w) >= r.pos {
                self.pop_front();
                continue;
            }
            wait = Some((w, r.pos));
            break;
        }
        self.give_back();
        wait
    }

    /// Pops the oldest request (and its lane entry, unless a later reply passed it already).
    fn pop_front(&mut self) {
        let Some(r) = self.reqs.pop_front() else {
            return;
        };
        let seq = self.base;
        self.base += 1;
        self.held_bytes -= r.held.len();
        if !r.done {
            if let Some(lane) = self
                .lanes
                .iter_mut()
                .find(|l| l.worker == r.worker as usize)
            {
                if lane.reqs.front().is_some_and(|&(_, s)| s == seq) {
                    lane.reqs.pop_front();
                }
            }
        }
    }

    /// Shrinks queues far larger than what they hold (after a long pipeline drained), to
    /// twice that: each shrink moves at most a quarter of the capacity it frees, so this is
    /// O(1) amortised. An empty queue larger than a request-response client needs is freed.
    fn give_back(&mut self) {
        fn shrink<T>(q: &mut VecDeque<T>) {
            if q.is_empty() {
                if q.capacity() > IDLE_KEEP {
                    *q = VecDeque::new();
                }
            } else if q.capacity() > 4 * KEEP && q.len() * 4 < q.capacity() {
                q.shrink_to((2 * q.len()).max(KEEP));
            }
        }
        shrink(&mut self.reqs);
        for lane in &mut self.lanes {
            shrink(&mut lane.reqs);
        }
    }
}

/// The pool member that owns a frame's key; keyless commands go to `home`.
pub(super) fn target(pool: &[usize], home: usize, frame: &[u8]) -> usize {
    match resp::routing_key(frame) {
        // FNV-1a: cheap, and stable across processes and restarts (keys must not move).
        Some(key) => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for &b in key {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            pool[(h % pool.len() as u64) as usize]
        }
        None => home,
    }
}

/// Scratch space of the front for routed reads, reused across connections.
#[derive(Default)]
pub(super) struct Scratch {
    buf: Vec<u8>,
    /// Per frame of the read: (start, len, worker, end offset in that worker's record).
    frames: Vec<(usize, usize, usize, usize)>,
    /// Per worker (global index): bytes of this read for it, and its record's payload position.
    per_worker: Vec<(usize, u64)>,
}

/// What a routed read asks the loop to do besides its result.
pub(super) struct Routed {
    pub result: ReadResult,
    /// The worker the result concerns (a full or corrupt ring), else the home worker.
    pub worker: usize,
    /// The connection's oldest request, if this read sent its first outstanding one:
    /// (worker, position) for the loop to wait on.
    pub new_head: Option<(usize, u64)>,
}

/// Reads a routed connection until the socket is empty, the budget is spent, a worker of the
/// pool has no room or the connection's state reaches `max_pending` (then it is marked
/// stalled and not read until `advance` or a flush brings it below half), and spreads its
/// frames over the pool by key.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_routed(
    chans: &mut [Chan],
    pool: &[usize],
    c: &mut Conn,
    s: &mut Scratch,
    fs: &FrontStats,
    id: ConnId,
    max_frame: u32,
    max_pending: usize,
    now: u32,
) -> Routed {
    let home = c.worker;
    let done = |result, worker, new_head| Routed {
        result,
        worker,
        new_head,
    };
    let mut new_head = None;
    let mut budget = ROUTED_BUDGET;
    if s.per_worker.len() < chans.len() {
        s.per_worker.resize(chans.len(), (0, 0));
    }
    loop {
        // The replies it waits on, its requests and its queued output count against its
        // bound: past it, leave its bytes in the socket.
        let used = c.pending() + c.route.as_ref().map_or(0, |r| r.state_bytes());
        let route = c.route.as_mut().expect("a routed connection has its route");
        if used > 0 && used >= max_pending {
            route.stalled = true;
            return done(ReadResult::Drained, home, new_head);
        }
        let mut carry = c.carry.len();
        // Room in every ring of the pool for all of this read, and nothing queued ahead of it
        // (an OPEN must reach each worker before the connection's data).
        let mut want = usize::MAX;
        for &w in pool {
            let ch = &mut chans[w];
            if ch.broken {
                return done(ReadResult::Unavailable, w, new_head);
            }
            if !ch.backlog.is_empty() {
                return done(ReadResult::Blocked, w, new_head);
            }
            want = want.min(ch.req.max_payload());
        }
        // A partial frame: the rest of it is read straight into the connection's buffer, and
        // once it holds whole frames the buffer itself is spread over the pool (each byte
        // copied once into its ring), instead of copying the partial frame into the scratch
        // buffer and back on every read (quadratic for a trickled frame).
        let (n, filled, room) = if carry > 0 {
            // The whole frames it holds, and whether malformed input follows them (handled
            // like them: spread them, then fail).
            let complete = |c: &Conn| {
                let w = walk(c, &c.carry, max_frame);
                (w.pos, w.bad.is_some())
            };
            let (mut pos, mut bad) = complete(c);
            if pos == 0 && !bad {
                let more = carry_want(c, max_frame);
                let n = match read_into_carry(c, more) {
                    Ok(0) => {
                        return done(ReadResult::Close(CloseReason::ClientEof), home, new_head)
                    }
                    Ok(n) => n,
                    Err(e) => match read_error(c, &e) {
                        Some(r) => return done(r, home, new_head),
                        None => continue,
                    },
                };
                add(&fs.bytes_in, n as u64);
                (pos, bad) = complete(c);
                if pos == 0 && !bad {
                    if let Some(r) = after_read(c, n, more, &mut budget) {
                        return done(r, home, new_head);
                    }
                    continue;
                }
            }
            if pos > want {
                return done(
                    ReadResult::Protocol(shmrelay_worker::codec::ProtocolError::TooLarge {
                        len: pos,
                        max: max_frame as usize,
                    }),
                    home,
                    new_head,
                );
            }
            for &w in pool {
                match chans[w].req.has_space(pos) {
                    Ok(true) => {}
                    Ok(false) => return done(ReadResult::Blocked, w, new_head),
                    Err(e) => return done(ReadResult::Corrupt(e), w, new_head),
                }
            }
            // The buffer becomes the scratch for this pass (no copy); what follows its whole
            // frames goes back to the connection below.
            std::mem::swap(&mut s.buf, &mut c.carry);
            c.carry.clear();
            carry = 0;
            (0, s.buf.len(), 0)
        } else {
            let want = want.min(ROUTED_CHUNK);
            for &w in pool {
                match chans[w].req.has_space(want) {
                    Ok(true) => {}
                    Ok(false) => return done(ReadResult::Blocked, w, new_head),
                    Err(e) => return done(ReadResult::Corrupt(e), w, new_head),
                }
            }
            if s.buf.len() < want {
                s.buf.resize(want, 0);
            }
            let n = match (&c.stream).read_vectored(&mut [IoSliceMut::new(&mut s.buf[..want])]) {
                Ok(0) => return done(ReadResult::Close(CloseReason::ClientEof), home, new_head),
                Ok(n) => n,
                Err(e) => match read_error(c, &e) {
                    Some(r) => return done(r, home, new_head),
                    None => continue,
                },
            };
            add(&fs.bytes_in, n as u64);
            (n, n, want)
        };
        // Walk the frames and pick each one's worker.
        s.frames.clear();
        for &w in pool {
            s.per_worker[w].0 = 0;
        }
        let mut pos = 0;
        let mut bad = None;
        while pos < filled {
            let (len, kind) = match c.codec.scan(&s.buf[pos..filled], max_frame as usize) {
                Ok(Scan::Frame { len, kind }) => (len, kind),
                Ok(Scan::NeedMore { .. }) => break,
                Err(e) => {
                    // The whole frames before it are still served (their replies come first).
                    bad = Some(e);
                    break;
                }
            };
            if kind == FrameKind::Data {
                let w = target(pool, home, &s.buf[pos..pos + len]);
                let acc = &mut s.per_worker[w].0;
                *acc += len;
                s.frames.push((pos, len, w, *acc));
            }
            pos += len;
        }
        // One DATA record per worker, its frames in the client's order. Every ring had room
        // for `want` >= `filled` bytes, and nothing was written to them since.
        for &w in pool {
            let total = s.per_worker[w].0;
            if total == 0 {
                continue;
            }
            let ch = &mut chans[w];
            let mut grant = match ch.req.reserve(total) {
                Ok(g) => g,
                Err(e) => return done(ReadResult::Corrupt(e), w, new_head),
            };
            let mut at = 0;
            for &(start, len, fw, _) in &s.frames {
                if fw == w {
                    grant[at..at + len].copy_from_slice(&s.buf[start..start + len]);
                    at += len;
                }
            }
            let base = grant.position() + RECORD_HEADER_SIZE as u64;
            grant.commit(total, Meta::tag(tag::DATA).conn(id.raw()));
            s.per_worker[w].1 = base;
            ch.dirty = true;
        }
        let route = c.route.as_mut().expect("a routed connection has its route");
        for &(_, _, w, end) in &s.frames {
            let p = s.per_worker[w].1 + end as u64;
            if route.push(w, p) {
                new_head = new_head.or(Some((w, p)));
            }
        }
        if !s.frames.is_empty() {
            c.last_rx = now;
            c.last_data = now;
            add(&fs.frames_in, s.frames.len() as u64);
        }
        if let Some(e) = bad {
            add(&fs.bytes_copied, (carry + pos) as u64);
            c.carry.clear();
            return done(ReadResult::Protocol(e), home, new_head);
        }
        // The carry in, every frame into its ring, and the new partial frame out.
        add(&fs.bytes_copied, (carry + filled) as u64);
        c.carry.clear();
        c.carry.extend_from_slice(&s.buf[pos..filled]);
        if pos > 0 || carry == 0 {
            // A new partial frame started (frame_timeout_ms runs from here).
            c.partial_since = now;
        }
        if c.carry.is_empty() && c.carry.capacity() > 4096 {
            c.carry = Vec::new();
        }
        if let Some(r) = after_read(c, n, room, &mut budget) {
            return done(r, home, new_head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_on_one_worker_and_keyless_commands_go_home() {
        let pool = [3, 4, 5];
        let get = |k: &str| format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len());
        let set = |k: &str| format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n$1\r\nv\r\n", k.len());
        let mut seen = std::collections::HashSet::new();
        for i in 0..100 {
            let k = format!("key:{i}");
            let w = target(&pool, 3, get(&k).as_bytes());
            assert_eq!(w, target(&pool, 4, set(&k).as_bytes()), "{k}");
            assert_eq!(w, target(&pool, 5, format!("GET {k}\r\n").as_bytes()));
            seen.insert(w);
        }
        assert_eq!(seen.len(), 3, "100 keys use every worker");
        assert_eq!(target(&pool, 4, b"*1\r\n$4\r\nPING\r\n"), 4);
        assert_eq!(target(&pool, 5, b"PING hello\r\n"), 5);
        assert_eq!(
            target(&pool, 5, b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n"),
            5,
            "SELECT's argument is no key"
        );
        // Hash tags keep related keys together.
        let a = target(&pool, 3, b"GET {u7}.name\r\n");
        assert_eq!(a, target(&pool, 4, b"GET {u7}.mail\r\n"));
    }

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

    /// The front around a `Route`, as mod.rs drives it: direct replies written, `advance`
    /// (pop_answered) when a reply asks for it and when a worker's completion passes a
    /// request the connection waits on. As in `pump_replies`, the advances a batch of
    /// replies asks for run after the batch's direct replies are written.
    struct Front {
        route: Route,
        completed: [u64; 16],
        waits: Vec<(usize, u64)>,
        out: Vec<u8>,
        /// Advances asked for in the current batch.
        todo: usize,
    }

    impl Front {
        fn new() -> Front {
            Front {
                route: Route::new(0),
                completed: [0; 16],
                waits: Vec::new(),
                out: Vec::new(),
                todo: 0,
            }
        }
        fn push(&mut self, w: usize, pos: u64) {
            if self.route.push(w, pos) {
                self.waits.push((w, pos));
            }
        }
        fn advance(&mut self) {
            let mut early = Vec::new();
            let completed = self.completed;
            let wait = self.route.pop_answered(|w| completed[w], &mut early);
            for b in early {
                self.out.extend_from_slice(&b);
            }
            if let Some(x) = wait {
                self.waits.push(x);
            }
        }
        fn reply(&mut self, w: usize, aux: u64, payload: &[u8]) {
            let v = self.route.on_reply(w, aux, payload);
            if v.direct {
                self.out.extend_from_slice(payload);
            }
            if v.advance {
                self.todo += 1;
            }
        }
        /// The end of a batch of replies: the advances it asked for.
        fn end_batch(&mut self) {
            for _ in 0..std::mem::take(&mut self.todo) {
                self.advance();
            }
        }
        fn complete(&mut self, w: usize, upto: u64) {
            self.completed[w] = self.completed[w].max(upto);
            let c = self.completed;
            let mut fire = 0;
            self.waits.retain(|&(ww, p)| {
                let due = c[ww] >= p;
                fire += due as usize;
                !due
            });
            for _ in 0..fire {
                self.advance();
            }
        }
    }

    #[test]
    fn replies_in_random_arrival_orders_come_out_in_request_order() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for trial in 0..300 {
            let workers: Vec<usize> = [3, 7, 9][..1 + rng.below(3)].to_vec();
            let n = 1 + rng.below(400);
            // Per request: its worker, its position, how many reply records it gets (0 to 3).
            let mut next_pos = [0u64; 16];
            let mut reqs = Vec::new();
            let mut expected = Vec::new();
            for i in 0..n {
                let w = workers[rng.below(workers.len())];
                next_pos[w] += 1 + rng.below(50) as u64;
                let recs = [0, 1, 1, 1, 1, 2, 3][rng.below(7)];
                for k in 0..recs {
                    expected.extend_from_slice(format!("<{i}.{k}>").as_bytes());
                }
                reqs.push((w, next_pos[w], recs));
            }
            // Each worker's requests, in order, and its cursor: (index in its list, record).
            let of: Vec<Vec<usize>> = (0..16)
                .map(|w| (0..n).filter(|&i| reqs[i].0 == w).collect())
                .collect();
            let mut cur = [(0usize, 0usize); 16];
            let mut f = Front::new();
            let mut pushed = 0;
            loop {
                let emitting: Vec<usize> = workers
                    .iter()
                    .copied()
                    .filter(|&w| of[w].get(cur[w].0).is_some_and(|&i| i < pushed))
                    .collect();
                if pushed == n && emitting.is_empty() {
                    break;
                }
                match rng.below(4) {
                    0 if pushed < n => {
                        // A read: a few more requests.
                        for _ in 0..1 + rng.below(20) {
                            if pushed < n {
                                let (w, p, _) = reqs[pushed];
                                f.push(w, p);
                                pushed += 1;
                            }
                        }
                    }
                    1 => {
                        // A worker releases what it answered: its ring read to the end.
                        let w = workers[rng.below(workers.len())];
                        let done = cur[w].0;
                        if done > 0 {
                            f.complete(w, reqs[of[w][done - 1]].1);
                        }
                    }
                    _ if !emitting.is_empty() => {
                        // A batch of one worker's replies.
                        let w = emitting[rng.below(emitting.len())];
                        for _ in 0..1 + rng.below(8) {
                            let Some(&i) = of[w].get(cur[w].0).filter(|&&i| i < pushed) else {
                                break;
                            };
                            let (_, p, recs) = reqs[i];
                            if cur[w].1 < recs {
                                f.reply(w, p, format!("<{i}.{}>", cur[w].1).as_bytes());
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
                if let Some(&last) = of[w].last() {
                    f.complete(w, reqs[last].1);
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
        let (slow, fast) = (f.completed[3] + 1, f.completed[4]);
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
        let fast = f.completed[4];
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
}
