//! The per-worker channel: its rings, the control backlog, quarantine and re-arm, and the
//! worker health checks (failed workers, dead letters, broken-off long replies).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use shm_ring::{Consumer, Doorbell, EventFd, Meta, Producer, ReserveError, ShmRing};
use shmrelay_worker::protocol::tag;
use shmrelay_worker::{CloseReason, ConnId};
use tracing::{debug, error, warn};

use super::conn::{ConnKey, ConnState};
use super::reply;
use super::Front;
use crate::stats::{add, WorkerState};

/// A control record waiting for ring space (kept in order, ahead of any data).
pub(super) struct Ctrl {
    pub(super) tag: u16,
    pub(super) conn: u64,
    pub(super) aux: u64,
    pub(super) payload: Vec<u8>,
}

/// The channel to one worker: its request and reply rings and what waits for them.
pub(super) struct Chan {
    pub(super) req: Producer<Arc<ShmRing>>,
    pub(super) rep: Consumer<Arc<ShmRing>>,
    pub(super) backlog: VecDeque<Ctrl>,
    /// Connections not read because `req` was full: (slot, generation).
    pub(super) blocked: Vec<ConnKey>,
    pub(super) dirty: bool,
    pub(super) broken: bool,
    /// The worker's doorbell.
    pub(super) bell: Arc<EventFd>,
    /// The highest request position answered by a reply record read from this worker, each
    /// checked against what this front published: the front's own copy of the answered word.
    pub(super) answered: u64,
    /// A long reply whose pieces are being read from `rep` (see reply.rs).
    pub(super) split: Option<reply::Split>,
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
                    match rearm(ch) {
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
            c.worker == w
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
        let keys: Vec<ConnKey> = (0..self.slab.conns.len())
            .filter(|&s| {
                self.slab.conns[s].as_ref().is_some_and(|c| {
                    c.worker == w
                        || c.route
                            .as_ref()
                            .is_some_and(|r| listeners[r.listener].pool.contains(&w))
                })
            })
            .filter_map(|s| self.slab.key(s))
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

/// Attaches afresh to a pair of rings the supervisor reset (positions back to zero), without
/// publishing anything the old handles held.
pub(super) fn rearm(ch: &mut Chan) -> Result<(), shm_ring::AttachError> {
    let req = Producer::new(ch.req.storage().clone())?;
    let rep = Consumer::new(ch.rep.storage().clone())?;
    let bell = ch.bell.clone();
    let mut req = req;
    let mut rep = rep;
    req.set_doorbell(Doorbell::Both(bell.clone()));
    rep.set_doorbell(Doorbell::Both(bell));
    std::mem::replace(&mut ch.req, req).abandon();
    drop(std::mem::replace(&mut ch.rep, rep));
    ch.backlog.clear();
    ch.blocked.clear();
    ch.dirty = false;
    ch.broken = false;
    // Positions start again at zero (the routing table's too: the caller's).
    ch.answered = 0;
    ch.split = None;
    Ok(())
}
