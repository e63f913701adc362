//! The connection close state machine: a client's FIN, a worker's CLOSE, draining, and the
//! final close that tells the workers and gives back what the connection held.

use std::io::Write;
use std::net::Shutdown;
use std::sync::atomic::Ordering;

use shmrelay_worker::codec::ProtocolError;
use shmrelay_worker::protocol::tag;
use shmrelay_worker::{CloseReason, ConnId};
use tracing::debug;

use super::conn::{ConnKey, ConnState};
use super::liveness;
use super::Front;
use crate::stats::add;

impl Front {
    /// The client sent its FIN: it will send nothing more but may still want the replies to
    /// what it sent. Tell the worker now (after the connection's data, in ring order); the
    /// worker acknowledges with a CLOSE of its own once it has handled everything before it,
    /// and the connection closes when those replies are written (or at its timeout).
    pub(super) fn client_eof(&mut self, key: ConnKey) {
        self.close_after_worker(key, CloseReason::ClientEof);
    }

    /// Stops reading a connection and tells its worker; the connection closes when the worker
    /// acknowledges (its last replies are then out), with `reason`.
    pub(super) fn close_after_worker(&mut self, key: ConnKey, reason: CloseReason) {
        let Some(c) = self.slab.get(key) else {
            return;
        };
        if c.state == ConnState::Accepted {
            self.close_conn(key, reason);
            return;
        }
        let worker = c.worker();
        c.told_close = true;
        c.state = ConnState::Draining(reason);
        // A routed connection's frames went to any worker of its pool: each acknowledges.
        let workers = match c.route.as_ref() {
            Some(r) => self.listeners[r.listener].pool.clone(),
            None => vec![worker],
        };
        self.draining += 1;
        self.fs
            .conns_draining
            .store(self.draining, Ordering::Relaxed);
        let id = key.id(self.index);
        let mut sent = 0u64;
        for &w in &workers {
            if self.chans[w].is_broken() {
                continue;
            }
            sent |= 1 << w;
            self.send_close(w, id, reason);
        }
        if let Some(r) = self.slab.get(key).and_then(|c| c.route.as_mut()) {
            r.close_sent = sent;
        }
        if workers.iter().any(|&w| self.chans[w].is_broken()) {
            self.close_conn(key, reason);
        }
    }

    /// A CLOSE record from worker `w`: after the client's FIN, its acknowledgement of ours
    /// (every reply it had for the connection is before it); otherwise the worker asks to
    /// close once what it queued is written.
    pub(super) fn worker_closed(&mut self, key: ConnKey, w: usize) {
        let Some(c) = self.slab.get(key) else {
            return;
        };
        // After a client's FIN keep its reason.
        let reason = match c.state {
            ConnState::Draining(r) => r,
            _ => CloseReason::WorkerRequest,
        };
        if let Some(r) = c.route.as_mut() {
            r.close_acked |= 1 << w;
        }
        self.drain_conn(key, reason);
    }

    /// Stops reading a connection and closes it once its queued replies are written.
    pub(super) fn drain_conn(&mut self, key: ConnKey, reason: CloseReason) {
        let Some(c) = self.slab.get(key) else {
            return;
        };
        if c.flushed() && c.acks_in() {
            self.close_conn(key, reason);
        } else if !matches!(c.state, ConnState::Draining(_)) {
            c.state = ConnState::Draining(reason);
            self.draining += 1;
            self.fs
                .conns_draining
                .store(self.draining, Ordering::Relaxed);
        }
    }

    /// Closes a connection for malformed or abusive input with the codec's error reply
    /// (after the replies to its whole frames), freeing its partial frame at once.
    pub(super) fn fail_conn(&mut self, key: ConnKey, e: ProtocolError) {
        let Some(c) = self.slab.get(key) else {
            return;
        };
        self.partial_total -= c.partial as usize;
        c.partial = 0;
        c.carry = Vec::new();
        c.protocol_error = Some(Box::new(e));
        let open = c.state == ConnState::Open;
        add(&self.fs.protocol_errors, 1);
        if open {
            self.close_after_worker(key, CloseReason::ProtocolError);
        } else {
            self.close_conn(key, CloseReason::ProtocolError);
        }
    }

    /// Closes a connection now and tells its worker (in order, after its data).
    pub(super) fn close_conn(&mut self, key: ConnKey, reason: CloseReason) {
        let Some(mut c) = self.slab.remove(key) else {
            return;
        };
        if c.partial > 0 {
            self.partial_total -= c.partial as usize;
            self.fs
                .partial_bytes
                .store(self.partial_total as u64, Ordering::Relaxed);
        }
        if c.queued > 0 {
            self.queued_total -= c.queued;
            self.fs
                .queued_bytes
                .store(self.queued_total as u64, Ordering::Relaxed);
        }
        if let Some(e) = c.protocol_error.take() {
            if c.pending() == 0 {
                // The error reply it is owed, after its replies. Best effort and never
                // blocking: the connection closes either way, and the FIN follows it.
                let _ = (&c.stream).write(&c.codec.protocol_error_reply(&e));
                let _ = c.stream.shutdown(Shutdown::Write);
            }
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        // The socket's retransmissions over its whole life, counted once.
        if let Some((_, retrans)) = liveness::tcp_info(&c.stream) {
            add(&self.fs.retransmits, retrans as u64);
        }
        let worker = c.worker();
        drop(c.stream);
        self.fd_freed = true;
        self.admission.release(self.stats, c.addr_slot);
        let id = key.id(self.index);
        if let Some(r) = c.route.as_ref() {
            // Every worker of the pool was sent the OPEN: a worker whose OPEN is still queued
            // loses it, the others get the CLOSE unless they had it already (at the FIN).
            let told = if c.told_close { r.close_sent } else { 0 };
            for w in self.listeners[r.listener].pool.clone() {
                let ch = &mut self.chans[w];
                if ch.is_broken() || told & (1 << w) != 0 {
                    continue;
                }
                if ch.open_queued(id) {
                    ch.forget(id);
                } else {
                    self.send_close(w, id, reason);
                }
            }
        } else if c.state == ConnState::Accepted {
            // A connection whose OPEN never reached the worker needs no CLOSE either.
            self.chans[worker].forget(id);
        } else if c.told_close {
            // The worker got its CLOSE at the client's FIN (or protocol error): one is enough,
            // or its `on_close` would run twice.
        } else {
            self.send_close(worker, id, reason);
        }
        if matches!(c.state, ConnState::Draining(_)) {
            self.draining -= 1;
            self.fs
                .conns_draining
                .store(self.draining, Ordering::Relaxed);
        }
        self.open -= 1;
        self.fs.conns_open.store(self.open, Ordering::Relaxed);
        add(&self.fs.closes[reason as usize], 1);
        debug!(%id, %reason, "closed");
    }

    /// Queues the connection's CLOSE for worker `w` (after its data, in ring order) and
    /// writes what fits.
    fn send_close(&mut self, w: usize, id: ConnId, reason: CloseReason) {
        self.chans[w].tell(tag::CLOSE, id, reason as u64, Vec::new());
        self.flush_backlog(w);
    }
}
