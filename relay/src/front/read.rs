//! The read side of the loop: which connections are read this turn, and what each read's
//! outcome does to its connection.

use std::io::{IoSlice, Write};

use shmrelay_worker::protocol::FRAME_HEADER;
use shmrelay_worker::CloseReason;

use super::conn::{read_conn, ConnState, ReadResult, READ_CHUNK};
use super::route::read_routed;
use super::Front;
use crate::stats::add;

impl Front {
    /// Moves connections blocked on a ring that has space again back to the ready list.
    pub(super) fn unblock(&mut self) {
        for ch in &mut self.chans {
            if ch.blocked.is_empty() || !ch.backlog.is_empty() {
                continue;
            }
            let want = READ_CHUNK.min(ch.req.max_payload());
            if !ch.req.has_space(want).unwrap_or(false) {
                continue;
            }
            for key in ch.blocked.drain(..) {
                if let Some(c) = self.slab.get(key) {
                    c.blocked = false;
                    if c.wants_read() {
                        self.ready.push(key);
                    }
                }
            }
        }
    }

    pub(super) fn read_ready(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        let now = self.now as u32;
        let max_frame = self.cfg.max_frame;
        let max_pending = self.cfg.max_pending;
        for key in ready.drain(..) {
            let Some(c) = self.slab.get(key) else {
                continue;
            };
            if !c.wants_read() {
                continue;
            }
            let id = key.id(self.index);
            let (result, heartbeats, w) = if let Some(l) = c.route.as_ref().map(|r| r.listener) {
                let pool = &self.listeners[l].pool;
                let routed = read_routed(
                    &mut self.chans,
                    pool,
                    c,
                    &mut self.scratch,
                    self.fs,
                    id,
                    max_frame,
                    max_pending,
                    now,
                );
                if let Some((w, p)) = routed.new_head {
                    self.routing.wait(key, (w, p));
                }
                (routed.result, 0, routed.worker)
            } else {
                let w = c.worker;
                let ch = &mut self.chans[w];
                if ch.broken {
                    self.close_conn(key, CloseReason::WorkerGone);
                    continue;
                }
                if !ch.backlog.is_empty() {
                    c.blocked = true;
                    ch.blocked.push(key);
                    continue;
                }
                let (result, heartbeats) = read_conn(ch, c, self.fs, id, max_frame, now);
                (result, heartbeats, w)
            };
            if heartbeats > 0 {
                // One answer per heartbeat read (a client may send several at once).
                static ZEROS: [u8; FRAME_HEADER * 64] = [0; FRAME_HEADER * 64];
                let many;
                let zeros = match ZEROS.get(..FRAME_HEADER * heartbeats) {
                    Some(z) => z,
                    None => {
                        many = vec![0u8; FRAME_HEADER * heartbeats];
                        &many[..]
                    }
                };
                if let Err(reason) = self.send(key, &[IoSlice::new(zeros)]) {
                    self.close_conn(key, reason);
                    continue;
                }
            }
            match result {
                ReadResult::Drained => {}
                ReadResult::Budget => self.ready.push(key),
                ReadResult::Blocked => {
                    add(&self.fs.ring_full_stalls, 1);
                    if let Some(c) = self.slab.get(key) {
                        c.blocked = true;
                    }
                    self.chans[w].blocked.push(key);
                }
                ReadResult::Close(CloseReason::ClientEof) => self.client_eof(key),
                ReadResult::Close(reason) => self.close_conn(key, reason),
                ReadResult::Protocol(e) => {
                    add(&self.fs.protocol_errors, 1);
                    let Some(c) = self.slab.get(key) else {
                        continue;
                    };
                    // Written by `close_conn`, after everything queued before it.
                    c.protocol_error = Some(Box::new(e));
                    if c.state == ConnState::Open {
                        // The whole frames before the bad input went to the worker(s): their
                        // replies come first, then the error reply (after the CLOSE acks).
                        self.close_after_worker(key, CloseReason::ProtocolError);
                    } else {
                        self.close_conn(key, CloseReason::ProtocolError);
                    }
                }
                ReadResult::Corrupt(e) => {
                    self.quarantine(w, &e.to_string());
                }
                ReadResult::Unavailable => {
                    if let Some(c) = self.slab.get(key) {
                        // Best effort and non-blocking: the close follows either way.
                        let _ = (&c.stream).write(&c.codec.error_reply("worker unavailable"));
                    }
                    self.close_conn(key, CloseReason::WorkerGone);
                }
            }
            self.account_partial(key);
        }
        // Keep the list's allocation for the next turn (it was taken, empty, each turn).
        if self.ready.is_empty() {
            self.ready = ready;
        }
    }
}
