//! The per-worker channel: its rings, the control backlog, quarantine and re-arm, and the
//! worker health checks (failed workers, dead letters, broken-off long replies).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shm_ring::{Consumer, Doorbell, EventFd, Meta, Producer, ReserveError, ShmRing};
use shmrelay_worker::protocol::{tag, ANSWERED_WORD};
use shmrelay_worker::{CloseReason, ConnId};
use tracing::{debug, error, warn};

use super::conn::{ConnKey, ConnState};
use super::read::READ_CHUNK;
use super::reply;
use super::{ChannelFds, Front, FrontError};
use crate::stats::{add, WorkerState};

/// A control record waiting for ring space (kept in order, ahead of any data).
struct Ctrl {
    tag: u16,
    conn: u64,
    aux: u64,
    payload: Vec<u8>,
}

/// The channel to one worker: its request and reply rings and what waits for them.
pub(super) struct Chan {
    /// The request ring (this front produces): the read paths reserve and commit in it.
    pub(super) req: Producer<Arc<ShmRing>>,
    /// The reply ring (this front consumes): the reply pump reads it.
    pub(super) rep: Consumer<Arc<ShmRing>>,
    /// OPEN and CLOSE records waiting for ring space, in order, ahead of any data.
    backlog: VecDeque<Ctrl>,
    /// Connections not read because `req` was full, in the order they asked (they resume in
    /// that order: first come, first read).
    blocked: Vec<ConnKey>,
    /// Records were committed to `req` this turn and not yet published.
    dirty: bool,
    /// Quarantined (its peer broke the rings) or failed for good: not used until re-armed.
    broken: bool,
    /// The worker's doorbell.
    bell: Arc<EventFd>,
    /// The highest request position answered by a reply record read from this worker, each
    /// checked against what this front published: the front's own copy of the answered word.
    answered: u64,
    /// A long reply whose pieces are being read from `rep` (see reply.rs).
    pub(super) split: Option<reply::Split>,
}

impl Chan {
    /// Attaches to one worker's rings as the supervisor handed them over.
    pub fn attach(fds: ChannelFds) -> Result<Chan, FrontError> {
        let worker = fds.worker;
        let attach = |source| FrontError::Attach { worker, source };
        let t = Duration::from_secs(5);
        let req = Arc::new(ShmRing::open_fd(fds.req, t).map_err(attach)?);
        // Reply data read-only: the front only consumes it (header page writable).
        let rep = Arc::new(ShmRing::open_fd_reader(fds.rep, t).map_err(attach)?);
        let mut req = Producer::new(req).map_err(attach)?;
        let mut rep = Consumer::new(rep).map_err(attach)?;
        set_doorbells(&fds.worker_doorbell, &mut req, &mut rep);
        // A previous front's answered word, if it is within what was published.
        let answered = req.storage().user_words()[ANSWERED_WORD].load(Ordering::Relaxed);
        let answered = if answered <= req.position() {
            answered
        } else {
            0
        };
        Ok(Chan {
            answered,
            bell: fds.worker_doorbell,
            req,
            rep,
            backlog: VecDeque::new(),
            blocked: Vec::new(),
            dirty: false,
            broken: false,
            split: None,
        })
    }

    /// Quarantined or failed: its rings are not used.
    #[inline]
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Control records wait for ring space (data must wait behind them).
    #[inline]
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Connections wait for room in the request ring.
    #[inline]
    pub fn has_blocked(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// Connection `key` waits for room in the request ring.
    #[inline]
    pub fn block(&mut self, key: ConnKey) {
        self.blocked.push(key);
    }

    /// The connections that waited for room, if the request ring has room for a read now and
    /// no control record is queued ahead of them.
    pub fn unblocked(&mut self) -> Option<std::vec::Drain<'_, ConnKey>> {
        if self.blocked.is_empty() || !self.backlog.is_empty() {
            return None;
        }
        let want = READ_CHUNK.min(self.req.max_payload());
        if !self.req.has_space(want).unwrap_or(false) {
            return None;
        }
        Some(self.blocked.drain(..))
    }

    /// Queues a control record for the worker behind those already queued (written by
    /// `Front::flush_backlog`, ahead of any later data of the connection).
    pub fn tell(&mut self, tag: u16, conn: ConnId, aux: u64, payload: Vec<u8>) {
        self.backlog.push_back(Ctrl {
            tag,
            conn: conn.raw(),
            aux,
            payload,
        });
    }

    /// True if the connection's OPEN still waits in the backlog (the worker never heard of it).
    pub fn open_queued(&self, conn: ConnId) -> bool {
        self.backlog
            .iter()
            .any(|ctrl| ctrl.conn == conn.raw() && ctrl.tag == tag::OPEN)
    }

    /// Drops the connection's queued control records.
    pub fn forget(&mut self, conn: ConnId) {
        self.backlog.retain(|ctrl| ctrl.conn != conn.raw());
    }

    /// Records were committed to the request ring: published at the end of the loop's turn.
    #[inline]
    pub fn wrote(&mut self) {
        self.dirty = true;
    }

    /// Publishes what this turn committed to the request ring, if anything.
    #[inline]
    pub fn publish(&mut self) {
        if self.dirty {
            self.req.publish();
            self.dirty = false;
        }
    }

    /// True when every request was consumed, every reply read and no control record waits
    /// (a broken channel counts as done).
    pub fn is_drained(&mut self) -> bool {
        self.broken
            || (self.backlog.is_empty()
                && self.req.is_drained().unwrap_or(true)
                && self.rep.is_empty().unwrap_or(true))
    }

    /// True if the loop has something to do for this worker (replies, blocked connections,
    /// queued control records).
    pub fn has_work(&mut self) -> bool {
        !self.broken
            && (!self.rep.is_empty().unwrap_or(true)
                || !self.blocked.is_empty()
                || !self.backlog.is_empty())
    }

    /// Announces sleep on this worker's rings (replies, and room when somebody waits for
    /// it); false if there is work now instead.
    pub fn prepare_park(&mut self) -> bool {
        if self.broken {
            return true;
        }
        if !self.rep.prepare_park().unwrap_or(false) {
            return false;
        }
        if !self.blocked.is_empty() || !self.backlog.is_empty() {
            let want = READ_CHUNK.min(self.req.max_payload());
            if !self.req.prepare_park_for_space(want).unwrap_or(false) {
                return false;
            }
        }
        true
    }

    /// Attaches afresh to a pair of rings the supervisor reset (positions back to zero),
    /// without publishing anything the old handles held, and uses them again.
    pub fn rearm(&mut self) -> Result<(), shm_ring::AttachError> {
        let mut req = Producer::new(self.req.storage().clone())?;
        let mut rep = Consumer::new(self.rep.storage().clone())?;
        self.set_doorbells(&mut req, &mut rep);
        self.swap_rings(req, rep);
        self.backlog.clear();
        self.blocked.clear();
        self.dirty = false;
        self.broken = false;
        // Positions start again at zero (the routing table's too: the caller's).
        self.answered = 0;
        Ok(())
    }

    /// Ends the sleep [`Chan::prepare_park`] announced.
    pub fn finish_park(&mut self) {
        self.rep.finish_park();
        self.req.finish_park();
    }

    /// Rings the worker's doorbell from new ring handles.
    pub fn set_doorbells(
        &self,
        req: &mut Producer<Arc<ShmRing>>,
        rep: &mut Consumer<Arc<ShmRing>>,
    ) {
        set_doorbells(&self.bell, req, rep);
    }

    /// Moves to new ring handles, abandoning the old request ring's unpublished records and
    /// any long reply in progress on the old reply ring (returned: its connection, if any).
    pub fn swap_rings(
        &mut self,
        req: Producer<Arc<ShmRing>>,
        rep: Consumer<Arc<ShmRing>>,
    ) -> Option<u64> {
        std::mem::replace(&mut self.req, req).abandon();
        drop(std::mem::replace(&mut self.rep, rep));
        self.split.take().map(|sp| sp.conn)
    }

    /// The highest request position answered by this worker's replies (the front's copy).
    #[inline]
    pub fn answered(&self) -> u64 {
        self.answered
    }

    /// Raises the answered position to `answered` (read from reply records this pass) and
    /// stores it in the ring's answered word, from the front's own copy: whatever a worker
    /// wrote into the word is overwritten, never built upon. Before the release of the reply
    /// records (see the pump).
    pub fn note_answered(&mut self, answered: u64) {
        if answered > self.answered {
            self.answered = answered;
            self.req.storage().user_words()[ANSWERED_WORD].store(self.answered, Ordering::Relaxed);
        }
    }

    /// Positions restart at `at` (a new ring generation that carried nothing).
    pub fn restart_answered(&mut self, at: u64) {
        self.answered = at;
    }
}

/// Workers block on a futex or poll their eventfd: ring both.
fn set_doorbells(
    bell: &Arc<EventFd>,
    req: &mut Producer<Arc<ShmRing>>,
    rep: &mut Consumer<Arc<ShmRing>>,
) {
    req.set_doorbell(Doorbell::Both(bell.clone()));
    rep.set_doorbell(Doorbell::Both(bell.clone()));
}

impl Front {
    /// Writes queued control records while there is space; true if the backlog is empty.
    /// An OPEN written moves its connection from Accepted to Open.
    pub(super) fn flush_backlog(&mut self, w: usize) -> bool {
        let ch = &mut self.chans[w];
        while let Some(ctrl) = ch.backlog.front() {
            if ch.broken {
                ch.backlog.clear();
                break;
            }
            match ch.req.push(
                Meta::tag(ctrl.tag).conn(ctrl.conn).aux(ctrl.aux),
                &ctrl.payload,
            ) {
                Ok(_) => {
                    let ctrl = ch.backlog.pop_front().expect("front exists");
                    ch.dirty = true;
                    if ctrl.tag == tag::OPEN {
                        let id = ConnId::from_raw(ctrl.conn);
                        if let Some(c) = self.slab.get(ConnKey::of(id)) {
                            if c.state == ConnState::Accepted {
                                c.state = ConnState::Open;
                                if c.readable {
                                    self.ready.push(ConnKey::of(id));
                                }
                            }
                        }
                    }
                }
                Err(ReserveError::Full) => return false,
                Err(e) => {
                    error!(worker = w, "request ring: {e}");
                    ch.broken = true;
                }
            }
        }
        true
    }

    /// Gives up on workers the supervisor marked failed, and takes back rings the supervisor
    /// has reset after a quarantine.
    pub(super) fn check_workers(&mut self) {
        // Acquire: pairs with the supervisor's Release when it clears a bit after resetting
        // the rings, so the reset positions are visible before we attach again.
        let quarantined = self.fs.quarantined.load(Ordering::Acquire);
        for w in 0..self.chans.len() {
            self.take_dead_letter(w);
            let state = WorkerState::from_code(self.stats.worker(w).state.load(Ordering::Relaxed));
            let ch = &mut self.chans[w];
            if ch.broken {
                if quarantined & (1 << w) == 0 && state != WorkerState::Failed {
                    match ch.rearm() {
                        // Positions start again at zero.
                        Ok(()) => self.routing.restart(w, 0),
                        Err(e) => error!(
                            front = self.index,
                            worker = w,
                            "rings still unusable after the reset: {e}"
                        ),
                    }
                }
                continue;
            }
            if state == WorkerState::Failed {
                self.quarantine(w, "the worker crashed too often and was marked failed");
            } else if let Err(e) = ch.req.check() {
                // The worker's position, which we rarely need to read while there is room.
                let e = e.to_string();
                self.quarantine(w, &e);
            }
        }
    }

    /// A frame of one of our connections that crashed worker `w` repeatedly was dead-lettered
    /// by the supervisor (the replacement skips it): its connection gets the codec's error
    /// and is closed, the worker's other clients carry on.
    pub(super) fn take_dead_letter(&mut self, w: usize) {
        let mailbox = &self.stats.worker(w).dead_letter_pending;
        // Acquire: pairs with the supervisor's Release store of the connection id.
        let raw = mailbox.load(Ordering::Acquire);
        if raw == 0 || ConnId::from_raw(raw).front() != self.index {
            return;
        }
        if mailbox
            .compare_exchange(raw, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let id = ConnId::from_raw(raw);
        let listeners = &self.listeners;
        // The id came from a ring the worker could write: only a connection served by that
        // worker is closed (a worker can close its own clients anyway).
        let Some(c) = self.slab.get(ConnKey::of(id)).filter(|c| {
            c.worker() == w
                || c.route
                    .as_ref()
                    .is_some_and(|r| listeners[r.listener].pool.contains(&w))
        }) else {
            return;
        };
        warn!(front = self.index, worker = w, %id, "a frame of this connection crashed its worker repeatedly: dead-lettered, closing the connection");
        // Best effort and non-blocking: the close follows either way.
        let _ = (&c.stream).write(&c.codec.error_reply("frame dead-lettered"));
        self.close_conn(ConnKey::of(id), CloseReason::WorkerGone);
    }

    /// Stops using a worker's rings (its peer broke them, or it failed for good). Its
    /// connections get an error frame and a close, never a hang.
    pub(super) fn quarantine(&mut self, w: usize, detail: &str) {
        if self.chans[w].broken {
            return;
        }
        error!(front = self.index, worker = w, "ring quarantined: {detail}");
        self.chans[w].broken = true;
        self.chans[w].blocked.clear();
        // Release: the supervisor may reset the rings once it sees the bit; our last use of
        // them happened before this store.
        self.fs.quarantined.fetch_or(1 << w, Ordering::Release);
        self.chans[w].backlog.clear();
        self.routing.forget(w);
        add(&self.fs.corrupt_rings, 1);
        self.close_worker_conns(w, "worker unavailable");
    }

    /// Closes worker `w`'s connections, and every routed connection whose keys it shares,
    /// each after the codec's error frame `why`.
    pub(super) fn close_worker_conns(&mut self, w: usize, why: &str) {
        let listeners = &self.listeners;
        let keys: Vec<ConnKey> = self
            .slab
            .iter()
            .filter(|(_, c)| {
                c.worker() == w
                    || c.route
                        .as_ref()
                        .is_some_and(|r| listeners[r.listener].pool.contains(&w))
            })
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            if let Some(c) = self.slab.get(key) {
                // Best effort and non-blocking: the close follows either way.
                let _ = (&c.stream).write(&c.codec.error_reply(why));
            }
            self.close_conn(key, CloseReason::WorkerGone);
        }
    }

    /// A long reply whose worker was replaced before it finished (a crash mid-reply) will
    /// never be finished: its connection, part of a frame written, is closed instead of left
    /// waiting.
    pub(super) fn check_splits(&mut self) {
        for w in 0..self.chans.len() {
            let ch = &mut self.chans[w];
            let Some(sp) = ch.split.as_ref() else {
                continue;
            };
            if ch.broken || reply::producer_attach(ch.rep.storage()) == sp.attach {
                continue;
            }
            let id = ConnId::from_raw(sp.conn);
            ch.split = None;
            if id.front() == self.index && self.slab.get(ConnKey::of(id)).is_some() {
                debug!(
                    front = self.index,
                    worker = w,
                    "a long reply broke off: worker replaced"
                );
                add(&self.fs.protocol_errors, 1);
                self.close_conn(ConnKey::of(id), CloseReason::ProtocolError);
            }
        }
    }
}
