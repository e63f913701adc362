//! The reply pump: reply records read from a worker's ring, grouped per connection and written
//! (`writev` from the ring), routed replies put in request order.

use std::io::IoSlice;

use shmrelay_worker::codec::websocket::MAX_CLOSE_REASON;
use shmrelay_worker::protocol::{flags, tag};
use shmrelay_worker::{CloseReason, Codec, ConnId};
use tracing::debug;

use super::conn::{ConnKey, ConnState, Slab};
use super::reply;
use super::routing::{Reply, Routing};
use super::write::send_to;
use super::{Front, MAX_IOV, REPLY_BATCH};
use crate::stats::{add, FrontStats};

impl Front {
    /// Reads a batch of worker `w`'s reply records and writes them to their connections;
    /// returns how many were read (a full batch: there may be more).
    pub(super) fn pump_replies(&mut self, w: usize) -> usize {
        let me = self.index;
        let codec = self.worker_codecs.get(w).copied().unwrap_or_default();
        let routed = self.routed_workers.get(w).copied().unwrap_or(false);
        let max_pending = self.cfg.max_pending;
        if self.chans[w].is_broken() {
            return 0;
        }
        // Nothing published since the last look and nothing left unread: with one wake per
        // heartbeat and most wakes not the workers', this is most calls. (A routed worker's
        // release alone is news: looked at below.)
        if !routed && self.chans[w].rep.is_idle() {
            return 0;
        }
        // Key routing: how far the worker had released its requests before the replies below
        // were read (see routing.rs on when a request is answered in full).
        let released_before = if routed {
            match self.chans[w].req.released() {
                Ok(p) => Some(p),
                Err(e) => {
                    let e = e.to_string();
                    self.quarantine(w, &e);
                    return 0;
                }
            }
        } else {
            None
        };
        let ch = &mut self.chans[w];
        // A reply answers a request this front wrote: no position beyond what it committed.
        let answerable = ch.req.position();
        let mut todo: Vec<(ConnKey, Action)> = Vec::new();
        let mut n = 0;
        let mut corrupt = None;
        let mut out_of_scope = 0u64;
        {
            // Read before the records: a replacement attaching meanwhile can only make a split
            // it starts look older (closed at the next check), never an old one look current.
            let attach = reply::producer_attach(ch.rep.storage());
            let records = match ch.rep.records() {
                Ok(r) => r,
                Err(e) => {
                    let e = e.to_string();
                    self.quarantine(w, &e);
                    return 0;
                }
            };
            // Kept across pumps for its allocations.
            let mut group = std::mem::take(&mut self.reply_group);
            let mut answered = 0u64;
            let mut end = None;
            let slab = &mut self.slab;
            let fs = self.fs;
            let scope = &self.scope;
            let split = &mut ch.split;
            for rec in records.take(REPLY_BATCH) {
                let rec = match rec {
                    Ok(r) => r,
                    Err(e) => {
                        corrupt = Some(e.to_string());
                        break;
                    }
                };
                // A long reply in progress takes only its own next piece: anything else
                // means it broke off, and its connection, part of a frame written, closes.
                if let Some(sp) = split.as_ref() {
                    if rec.tag() != tag::SEND
                        || rec.conn() != sp.conn
                        || sp.attach != attach
                        || rec.flags() & flags::BATCH != 0
                    {
                        let broken = sp.conn;
                        *split = None;
                        close_broken(slab, fs, me, broken, &mut group, &mut todo);
                    }
                }
                match rec.tag() {
                    tag::SEND if rec.aux() > answerable => {
                        // It would make a replacement skip frames it was never shown.
                        corrupt = Some(format!(
                            "reply record at {} answers request position {}, beyond the {} this front wrote",
                            rec.position(),
                            rec.aux(),
                            answerable
                        ));
                        break;
                    }
                    tag::SEND | tag::CLOSE if !scope.allows(slab, me, w, rec.conn()) => {
                        // Another listener's connection (push_scope): dropped, counted below.
                        out_of_scope += 1;
                    }
                    tag::SEND if rec.flags() & flags::BATCH != 0 => {
                        // Coalesced replies to one connection (the aux check above covers the
                        // last entry's position; the entries are checked against it).
                        let conn = rec.conn();
                        if conn != group.conn || group.is_full() {
                            deliver(slab, fs, me, &mut group, &mut todo);
                            group.conn = conn;
                        }
                        let flush = |g: &mut reply::Group| deliver(slab, fs, me, g, &mut todo);
                        if let Err(why) = reply::push_batch(codec, &rec, &mut group, flush) {
                            debug!(front = me, worker = w, "coalesced reply broken: {why}");
                            close_broken(slab, fs, me, conn, &mut group, &mut todo);
                        }
                        answered = answered.max(rec.aux());
                    }
                    tag::SEND => {
                        let conn = rec.conn();
                        if conn != group.conn || group.is_full() {
                            deliver(slab, fs, me, &mut group, &mut todo);
                            group.conn = conn;
                        }
                        let piece = reply::piece(codec, split, &rec, max_pending, attach, fs);
                        match piece {
                            reply::Piece::Invalid => {
                                corrupt = Some(format!(
                                    "reply record at {} has broken framing",
                                    rec.position()
                                ));
                                break;
                            }
                            reply::Piece::Broken(why) => {
                                debug!(front = me, worker = w, "reply broke off: {why}");
                                close_broken(slab, fs, me, conn, &mut group, &mut todo);
                            }
                            reply::Piece::Copy(bytes) if routed => {
                                if routed_reply(
                                    slab,
                                    fs,
                                    me,
                                    w,
                                    (conn, rec.aux()),
                                    &bytes,
                                    max_pending,
                                    &mut todo,
                                ) {
                                    group.push(reply::Piece::Copy(bytes));
                                }
                                // Otherwise held for its turn.
                            }
                            piece => group.push(piece),
                        }
                        answered = answered.max(rec.aux());
                    }
                    tag::CLOSE => {
                        deliver(slab, fs, me, &mut group, &mut todo);
                        let id = ConnId::from_raw(rec.conn());
                        if id.front() == me && rec.aux() != 0 && codec == Codec::WebSocket {
                            if let Some(c) = slab.get(ConnKey::of(id)) {
                                // The close code and reason, copied out (a longer reason
                                // than a close frame holds leaves the default close).
                                let mut why = [0u8; MAX_CLOSE_REASON];
                                if let Some(why) = why.get_mut(..rec.len()) {
                                    rec.copy_payload(0, why);
                                    Front::ws_worker_close(c, rec.aux(), why);
                                }
                            }
                        }
                        if id.front() == me {
                            todo.push((ConnKey::of(id), Action::CloseAfterFlush(w)));
                        }
                    }
                    t => {
                        corrupt = Some(format!("reply record at {} has tag {t}", rec.position()));
                        break;
                    }
                }
                end = Some(rec.end());
                n += 1;
            }
            deliver(slab, fs, me, &mut group, &mut todo);
            group.clear();
            self.reply_group = group;
            if let Some(end) = end {
                // The answered word first, then the release (Release store of the head): a
                // replacement worker that sees the release sees the word (see the worker SDK).
                // Stored from the front's own copy: whatever a worker wrote into the word is
                // overwritten, never built upon.
                ch.note_answered(answered);
                ch.rep.release(end);
            }
            // Every reply published before the worker released up to `released_before` has
            // been read if this pass read the ring to its end. Reading the release again and
            // finding the ring still empty extends that to the newer release.
            if let (Some(before), None, true) = (released_before, &corrupt, n < REPLY_BATCH) {
                let mut upto = before;
                if let Ok(after) = ch.req.released() {
                    if ch.rep.is_empty().unwrap_or(false) {
                        upto = after;
                    }
                }
                self.routing
                    .complete(w, upto, |key| todo.push((key, Action::Advance)));
            }
        }
        for (key, action) in todo {
            match action {
                Action::Close(reason) => self.close_conn(key, reason),
                Action::WantWrite => self.want_write(key),
                Action::CloseAfterFlush(from) => self.worker_closed(key, from),
                Action::Advance => self.advance(key),
            }
        }
        if out_of_scope > 0 {
            add(&self.fs.push_out_of_scope, out_of_scope);
            self.scope.note(self.index, w, out_of_scope);
        }
        if let Some(detail) = corrupt {
            self.quarantine(w, &detail);
        }
        // Slow-consumer bound, checked once per batch.
        n
    }

    /// Key routing: pops the connection's requests that are answered in full, writing the
    /// replies held for each new oldest one, and waits on the worker of the first that is not.
    /// A request is answered in full when its worker is known to be past it: its ring was read
    /// after the worker released the request, or a reply of the worker to a later request of
    /// the connection came. O(1) amortised per request (see routing.rs).
    pub(super) fn advance(&mut self, key: ConnKey) {
        let fs = self.fs;
        let Some(c) = self.slab.get(key) else {
            return;
        };
        let Some(r) = c.route.as_mut() else {
            return;
        };
        let mut early: Vec<Vec<u8>> = Vec::new();
        let merged = self.routing.advance(key, r, &mut early);
        if merged > 0 {
            add(&fs.frames_out, merged as u64);
        }
        // Written in slices of MAX_IOV; what the socket does not take is queued (and counted).
        for chunk in early.chunks(MAX_IOV) {
            let iov: Vec<IoSlice<'_>> = chunk.iter().map(|b| IoSlice::new(b)).collect();
            if let Err(reason) = send_to(c, &iov, fs, usize::MAX) {
                self.close_conn(key, reason);
                return;
            }
        }
        if c.pending() > 0 {
            self.want_write(key);
        } else if let ConnState::Draining(reason) = c.state {
            if c.flushed() && c.acks_in() {
                self.close_conn(key, reason);
                return;
            }
        }
        self.resume_routed(key);
    }

    /// Key routing: reads a connection again that was stalled at its pending bound, once its
    /// route state and out queue are below half of it.
    pub(super) fn resume_routed(&mut self, key: ConnKey) {
        let max = self.cfg.max_pending;
        let Some(c) = self.slab.get(key) else {
            return;
        };
        let pending = c.pending();
        let Some(r) = c.route.as_mut() else {
            return;
        };
        if r.resume(pending, max) && c.wants_read() {
            self.ready.push(key);
        }
    }
}

/// Writes a group of consecutive reply pieces of one connection (or counts them stale).
pub(super) fn deliver(
    slab: &mut Slab,
    fs: &FrontStats,
    me: usize,
    group: &mut reply::Group,
    todo: &mut Vec<(ConnKey, Action)>,
) {
    if group.is_empty() {
        group.clear();
        return;
    }
    if group.copied > 0 {
        add(&fs.bytes_copied, group.copied);
    }
    let id = ConnId::from_raw(group.conn);
    let key = ConnKey::of(id);
    match slab.get(key) {
        Some(c) if id.front() == me => {
            add(&fs.frames_out, group.messages);
            if let Err(reason) = reply::write_group(c, group, fs) {
                todo.push((key, Action::Close(reason)));
            } else if c.pending() > 0 {
                todo.push((key, Action::WantWrite));
            }
        }
        _ => add(&fs.stale_replies, group.messages.max(1)),
    }
    group.clear();
}

/// A long reply to `conn` broke off after part of it may have been written: what came before
/// goes out, then the connection closes (its client sees a close, never a shifted stream).
pub(super) fn close_broken(
    slab: &mut Slab,
    fs: &FrontStats,
    me: usize,
    conn: u64,
    group: &mut reply::Group,
    todo: &mut Vec<(ConnKey, Action)>,
) {
    if group.conn == conn {
        deliver(slab, fs, me, group, todo);
    }
    let id = ConnId::from_raw(conn);
    if id.front() == me && slab.get(ConnKey::of(id)).is_some() {
        add(&fs.protocol_errors, 1);
        todo.push((ConnKey::of(id), Action::Close(CloseReason::ProtocolError)));
    }
}

/// What the pump does to a connection once the batch's records are handled.
pub(super) enum Action {
    Close(CloseReason),
    WantWrite,
    /// A CLOSE record from this worker.
    CloseAfterFlush(usize),
    /// Key routing: the connection's oldest request may be answered in full now.
    Advance,
}

/// Key routing: true if a reply record goes out now with the records around it (it answers
/// the connection's oldest request, or no request: a push); false if it was held for its turn,
/// copied and counted (or belongs to no live connection: `deliver` counts those). O(1)
/// amortised (see routing.rs).
#[allow(clippy::too_many_arguments)]
pub(super) fn routed_reply(
    slab: &mut Slab,
    fs: &FrontStats,
    me: usize,
    w: usize,
    (conn, aux): (u64, u64),
    payload: &[u8],
    max_pending: usize,
    todo: &mut Vec<(ConnKey, Action)>,
) -> bool {
    let id = ConnId::from_raw(conn);
    let key = ConnKey::of(id);
    let Some(c) = slab.get(key).filter(|_| id.front() == me) else {
        return true;
    };
    let pending = c.pending();
    let Some(r) = c.route.as_mut() else {
        return true;
    };
    let decision = Routing::reply(r, w, aux, payload, pending, max_pending);
    if decision.advance {
        // Wait on (or move past) whatever is oldest now, and write what it holds.
        todo.push((key, Action::Advance));
    }
    if decision.reply == Reply::Write {
        return true;
    }
    add(&fs.bytes_copied, payload.len() as u64);
    if decision.reply == Reply::Merge {
        // A part of a pool-wide command's reply; the merged reply is counted when written.
        return false;
    }
    add(&fs.frames_out, 1);
    // The client is not read past `max_pending` (routing.rs); held replies past it answer
    // requests already in the rings with more than the bound allows (they would go to the out
    // queue, which has the same bound).
    if let Reply::Close(reason) = decision.reply {
        todo.push((key, Action::Close(reason)));
    }
    false
}
