//! Key routing's ordering as pure logic: requests in, replies in, decisions out (write a reply
//! now, hold it for its turn, close the connection), with no socket and no ring in sight, so
//! every rule is unit-tested (`routing/tests.rs`). The reply pump (`pump.rs`) and the routed
//! read (`route.rs`) feed it events and carry out its decisions.
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
//! half of it again ([`Route::resume`]). Held reply bytes plus the out queue past
//! `max_pending` itself (the requests already in the rings when it stopped were answered with
//! more than that: large replies) still close the connection as a slow consumer
//! ([`Reply::Close`]), as the out queue alone does: the held bytes go to the out queue when
//! their turn comes.
//!
//! When is a request answered in full? A worker may send any number of records for a frame, so
//! a reply alone does not say. The SDK publishes a batch's replies before it releases the
//! batch's requests, so once the front has seen a worker release past a frame and then read
//! that worker's reply ring empty, every reply to the frame has been seen
//! ([`Routing::complete`]).
//!
//! Pool-wide commands (`fanout.rs`: `DBSIZE`, `FLUSHALL`) are one request with a part per
//! worker of the pool, each in its worker's lane under the request's one sequence number. The
//! parts' replies are never written: they are kept (bounded) in the request, and once every
//! part is answered in full the merged reply is written in the request's turn, as a held
//! reply is.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::mem::size_of;

use shmrelay_worker::CloseReason;

use super::conn::ConnKey;
use super::fanout::{Fan, PoolWide};

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
    /// A pool-wide command: its parts (then `pos`, `worker` and `done` are unused).
    fan: Option<Box<Fan>>,
}

impl Req {
    /// Every reply to it has been seen (as far as the connection's later replies tell).
    fn answered(&self) -> bool {
        match &self.fan {
            Some(fan) => fan.all_done(),
            None => self.done,
        }
    }
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
    /// false: it was copied to its request's held bytes, or to its fan-out part.
    pub direct: bool,
    /// It answers a part of a pool-wide command: kept for the merged reply.
    pub merged: bool,
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
    /// Memory of the outstanding pool-wide commands ([`Fan::mem`]).
    fan_bytes: usize,
    /// Workers (bit = global index) sent the CLOSE at the client's FIN, and those that
    /// acknowledged it.
    pub close_sent: u64,
    pub close_acked: u64,
    /// The front stopped reading the client: its state was past the pending bound.
    pub stalled: bool,
}

impl Route {
    /// The state of a new connection of listener `listener`.
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
        self.reqs.len() * (size_of::<Req>() + size_of::<(u64, u64)>())
            + self.held_bytes
            + self.fan_bytes
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
            fan: None,
        });
        self.lane(w).reqs.push_back((pos, seq));
        self.reqs.len() == 1
    }

    /// A new pool-wide command `cmd` whose frame went to every worker of `parts`, as
    /// (worker, end position of the frame in its request ring), in pool order; true if it is
    /// the only outstanding request (the caller waits on its first part).
    pub fn push_fan(&mut self, cmd: PoolWide, parts: &[(usize, u64)]) -> bool {
        let Some(&(w, pos)) = parts.first() else {
            return false;
        };
        let seq = self.base + self.reqs.len() as u64;
        for &(pw, ppos) in parts {
            self.lane(pw).reqs.push_back((ppos, seq));
        }
        let fan = Box::new(Fan::new(cmd, parts));
        self.fan_bytes += fan.mem();
        self.reqs.push_back(Req {
            pos,
            worker: w as u32,
            done: false,
            held: Vec::new(),
            fan: Some(fan),
        });
        self.reqs.len() == 1
    }

    /// Worker `w`'s lane, made on first use.
    fn lane(&mut self, w: usize) -> &mut Lane {
        match self.lanes.iter().position(|l| l.worker == w) {
            Some(i) => &mut self.lanes[i],
            None => {
                self.lanes.push(Lane {
                    worker: w,
                    reqs: VecDeque::new(),
                });
                self.lanes.last_mut().expect("just pushed")
            }
        }
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
                    match r.fan.as_mut().and_then(|f| f.part_mut(w)) {
                        Some(part) => part.done = true,
                        None => r.done = true,
                    }
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
        let front_done = self.reqs.front().is_some_and(Req::answered);
        let advance = moved || (passed && front_done);
        let Some(seq) = seq else {
            // It answers no outstanding request: a push.
            return ReplyVerdict {
                direct: true,
                merged: false,
                advance,
            };
        };
        let i = (seq - self.base) as usize;
        let r = &mut self.reqs[i];
        if let Some(fan) = r.fan.as_mut() {
            self.fan_bytes += fan.add_reply(w, payload);
            return ReplyVerdict {
                direct: false,
                merged: true,
                advance,
            };
        }
        // A request's replies go out in the order they came: once one is held, so are the rest
        // until the held ones are written.
        if i == 0 && r.held.is_empty() {
            return ReplyVerdict {
                direct: true,
                merged: false,
                advance,
            };
        }
        r.held.extend_from_slice(payload);
        self.held_bytes += payload.len();
        ReplyVerdict {
            direct: false,
            merged: false,
            advance,
        }
    }

    /// Pops the requests that are answered in full from the front (`completed(w)`: every reply
    /// to a frame of worker `w` ending at or below it has been read), moving the held replies
    /// of each new oldest one (and the merged replies of pool-wide commands, counted in
    /// `merged`) to `out` in order. Returns the oldest request still waiting, as (worker,
    /// position), if any.
    pub fn pop_answered(
        &mut self,
        completed: impl Fn(usize) -> u64,
        out: &mut Vec<Vec<u8>>,
        merged: &mut usize,
    ) -> Option<(usize, u64)> {
        let mut wait = None;
        while let Some(r) = self.reqs.front_mut() {
            if let Some(fan) = &r.fan {
                // Its merged reply, once every part is answered in full.
                let pending = fan
                    .parts()
                    .iter()
                    .find(|p| !p.done && completed(p.worker as usize) < p.pos);
                if let Some(p) = pending {
                    wait = Some((p.worker as usize, p.pos));
                    break;
                }
                out.push(fan.merged());
                *merged += 1;
                self.pop_front();
                continue;
            }
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

    /// Reads the connection again if it was stalled at its pending bound and its route state
    /// and out queue (`queued`) are below half of it now; true if it was resumed.
    pub fn resume(&mut self, queued: usize, max_pending: usize) -> bool {
        if !self.stalled || self.state_bytes() + queued > max_pending / 2 {
            return false;
        }
        self.stalled = false;
        true
    }

    /// Pops the oldest request (and its lane entry, unless a later reply passed it already).
    fn pop_front(&mut self) {
        let Some(r) = self.reqs.pop_front() else {
            return;
        };
        let seq = self.base;
        self.base += 1;
        self.held_bytes -= r.held.len();
        if let Some(fan) = &r.fan {
            self.fan_bytes -= fan.mem();
            for p in fan.parts().iter().filter(|p| !p.done) {
                self.unlane(p.worker as usize, seq);
            }
        } else if !r.done {
            self.unlane(r.worker as usize, seq);
        }
    }

    /// Takes request `seq` off worker `w`'s lane, if it is still there (at the front: the
    /// lane's earlier requests are gone).
    fn unlane(&mut self, w: usize, seq: u64) {
        if let Some(lane) = self.lanes.iter_mut().find(|l| l.worker == w) {
            if lane.reqs.front().is_some_and(|&(_, s)| s == seq) {
                lane.reqs.pop_front();
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

/// Per worker: how far its replies are known complete, and who waits on it.
#[derive(Default)]
struct Completion {
    /// Every reply to a request frame ending at or below this request-ring position has been
    /// read from the reply ring.
    completed: u64,
    /// Routed connections whose oldest request is on this worker, by that request's position.
    /// An entry may be stale (its connection closed or moved on): the caller skips those.
    waiting: BinaryHeap<Reverse<(u64, ConnKey)>>,
}

/// What to do with one reply record of a routed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reply {
    /// Write it now, with the records around it (it answers the oldest request, or none).
    Write,
    /// Copied to its request's held bytes; written when its turn comes.
    Hold,
    /// Held, but the connection's held replies and out queue are past `max_pending`: close it.
    Close(CloseReason),
    /// A part of a pool-wide command's reply: kept (bounded) for the merged reply.
    Merge,
}

/// The decision on a reply record: the reply, and whether the connection's oldest request
/// may have changed (then [`Routing::advance`] it, after the batch's direct replies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Decision {
    pub reply: Reply,
    pub advance: bool,
}

/// The front's routing table: per worker, how far its replies are complete and which
/// connections wait on it. With each connection's [`Route`] it takes the events of key
/// routing (a request sent, a reply read, a worker's ring read to its end, a worker gone) and
/// returns what the front must do.
#[derive(Default)]
pub(super) struct Routing {
    workers: Vec<Completion>,
}

impl Routing {
    /// A table for `workers` workers (global indices `0..workers`).
    pub fn new(workers: usize) -> Routing {
        Routing {
            workers: (0..workers).map(|_| Completion::default()).collect(),
        }
    }

    /// How far worker `w`'s replies are known complete (0 for an unknown worker).
    #[inline]
    pub fn completed(&self, w: usize) -> u64 {
        self.workers.get(w).map_or(0, |c| c.completed)
    }

    /// True if some connection waits on worker `w` (its release must then be watched).
    #[inline]
    pub fn has_waiters(&self, w: usize) -> bool {
        self.workers.get(w).is_some_and(|c| !c.waiting.is_empty())
    }

    /// Connection `key`'s oldest request is now the one to worker `w` ending at `pos` (from a
    /// read that sent its first outstanding request, or from [`Routing::advance`]).
    #[inline]
    pub fn wait(&mut self, key: ConnKey, (w, pos): (usize, u64)) {
        if let Some(c) = self.workers.get_mut(w) {
            c.waiting.push(Reverse((pos, key)));
        }
    }

    /// A reply record of worker `w` for a connection routed by `route`, answering the frame
    /// that ends at `aux`; `queued` is the connection's out queue. Counting the held copy is
    /// the caller's.
    pub fn reply(
        route: &mut Route,
        w: usize,
        aux: u64,
        payload: &[u8],
        queued: usize,
        max_pending: usize,
    ) -> Decision {
        let verdict = route.on_reply(w, aux, payload);
        let reply = if verdict.direct {
            Reply::Write
        } else if verdict.merged {
            Reply::Merge
        } else if queued + route.held_bytes() > max_pending {
            Reply::Close(CloseReason::SlowConsumer)
        } else {
            Reply::Hold
        };
        Decision {
            reply,
            advance: verdict.advance,
        }
    }

    /// Worker `w` is known to have answered in full every request ending at or below `upto`:
    /// hands each connection that waited on one of those to `due` (to advance; some may be
    /// stale).
    pub fn complete(&mut self, w: usize, upto: u64, mut due: impl FnMut(ConnKey)) {
        let Some(c) = self.workers.get_mut(w) else {
            return;
        };
        if upto <= c.completed {
            return;
        }
        c.completed = upto;
        while let Some(&Reverse((p, key))) = c.waiting.peek() {
            if p > upto {
                break;
            }
            c.waiting.pop();
            due(key);
        }
    }

    /// Pops connection `key`'s requests that are answered in full, moving the replies held
    /// for each new oldest one to `out` in order, and waits on the first that is not. Returns
    /// how many of them were merged replies of pool-wide commands (new frames for the client;
    /// held replies were counted when they were held).
    pub fn advance(&mut self, key: ConnKey, route: &mut Route, out: &mut Vec<Vec<u8>>) -> usize {
        let mut merged = 0;
        let wait = route.pop_answered(|w| self.completed(w), out, &mut merged);
        if let Some(wait) = wait {
            self.wait(key, wait);
        }
        merged
    }

    /// Worker `w`'s rings were quarantined: nobody waits on it any more (its connections, and
    /// the routed connections of its pool, are closed).
    pub fn forget(&mut self, w: usize) {
        if let Some(c) = self.workers.get_mut(w) {
            c.waiting = BinaryHeap::new();
        }
    }

    /// Worker `w`'s request positions start again at `at` (its rings were reset: 0; a new ring
    /// generation that carried nothing: the front's tail). Everything before counts as
    /// answered, and nobody waits on it.
    pub fn restart(&mut self, w: usize, at: u64) {
        if let Some(c) = self.workers.get_mut(w) {
            c.completed = at;
            c.waiting = BinaryHeap::new();
        }
    }
}

#[cfg(test)]
mod tests;
