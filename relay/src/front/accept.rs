//! Accepting: admission, a new connection's OPEN to its worker(s), pausing while every ring is
//! full, and retrying the backlog after an accept error (EMFILE).

use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::{Interest, Token};
use shmrelay_worker::protocol::tag;
use shmrelay_worker::CloseReason;
use tracing::{debug, info, warn};

use super::conn::Conn;
use super::liveness::{self, TICK_MS};
use super::routing::Route;
use super::{Front, LISTENER_BASE};
use crate::stats::add;

/// How often the backlog is retried while accepting fails (EMFILE) and no connection closes.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

impl Front {
    /// Accepts what listener `l`'s backlog holds: each client is admitted or refused at once,
    /// and an admitted one's OPEN goes to its worker (every worker of a routed pool).
    pub(super) fn accept(&mut self, l: usize) {
        loop {
            let Some(listener) = self.listeners[l].sock.as_ref() else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the rest stays in the backlog, and no new edge comes
                    // for it: retried at the next close or within ACCEPT_RETRY.
                    self.accept_stalled(&e);
                    return;
                }
            };
            let workers: Vec<usize> = self.listeners[l]
                .pool
                .iter()
                .copied()
                .filter(|&w| w < self.chans.len() && !self.chans[w].is_broken())
                .collect();
            let admitted = if workers.is_empty() {
                Err(crate::stats::RejectReason::NoWorker)
            } else {
                self.admission.admit(self.stats, peer.ip())
            };
            let addr_slot = match admitted {
                Ok(slot) => slot,
                Err(reason) => {
                    // Refused at once, never left to time out in a full backlog.
                    add(&self.fs.rejects[reason as usize], 1);
                    add(&self.fs.closes[CloseReason::Rejected as usize], 1);
                    debug!(%peer, reason = reason.as_str(), "rejected");
                    if reason == crate::stats::RejectReason::NoWorker {
                        // Best effort and non-blocking: the client learns why before the close.
                        let codec = self.listeners[l].codec;
                        let _ = (&stream).write(&codec.error_reply("worker unavailable"));
                    }
                    drop(stream);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let now = self.now as u32;
            liveness::configure_socket(&stream, self.liveness.longest_timeout() as u64 * TICK_MS);
            let lst = &mut self.listeners[l];
            let worker = workers[lst.next % workers.len()];
            lst.next = lst.next.wrapping_add(1);
            let codec = lst.codec;
            let mut conn = Conn::new(stream, worker, codec, addr_slot, now);
            if lst.routed {
                conn.route = Some(Box::new(Route::new(l)));
            }
            let key = self.slab.insert(conn);
            let first = self.liveness.first(codec, now);
            let at = self.wheel.schedule(key.timer(), first);
            let c = self.slab.get(key).expect("just inserted");
            c.timer_at = at;
            if let Err(e) = self.poll.registry().register(
                &mut c.stream,
                Token(key.slot as usize),
                Interest::READABLE,
            ) {
                warn!("register: {e}");
                self.slab.remove(key);
                self.admission.release(self.stats, addr_slot);
                continue;
            }
            let id = key.id(self.index);
            // A routed connection may send frames to any worker of the pool: each hears of it
            // (and of its close), so none keeps state for a connection it was never told of.
            let told = if self.listeners[l].routed {
                workers.clone()
            } else {
                vec![worker]
            };
            for &w in &told {
                self.chans[w].tell(tag::OPEN, id, 0, peer.to_string().into_bytes());
            }
            self.open += 1;
            add(&self.fs.accepts, 1);
            self.fs.conns_open.store(self.open, Ordering::Relaxed);
            debug!(%id, %peer, worker, "accepted");
            for w in told {
                self.flush_backlog(w);
            }
        }
    }

    /// Stops accepting while every worker's request ring is full, and resumes when one has
    /// room: new clients wait in the kernel's backlog instead of adding to the overload.
    pub(super) fn pause_when_overloaded(&mut self) {
        if !self.cfg.pause_accept_when_overloaded {
            return;
        }
        // With no usable worker at all there is nothing to wait for: accepting goes on, and
        // each new client is refused at once with an error (`no_worker`), never left in the
        // backlog.
        let usable = self.chans.iter().any(|c| !c.is_broken());
        let overloaded = usable && self.chans.iter().all(|c| c.is_broken() || c.has_blocked());
        if overloaded != self.paused {
            let mut any = false;
            for (i, l) in self.listeners.iter_mut().enumerate() {
                let Some(sock) = l.sock.as_mut() else {
                    continue;
                };
                let r = if overloaded {
                    self.poll.registry().deregister(sock)
                } else {
                    self.poll.registry().register(
                        sock,
                        Token(LISTENER_BASE - i),
                        Interest::READABLE,
                    )
                };
                any |= r.is_ok();
            }
            if any {
                self.paused = overloaded;
                self.fs.paused.store(overloaded as u64, Ordering::Relaxed);
                if !overloaded {
                    // Connections may have queued while paused: there is no new edge for them.
                    for l in 0..self.listeners.len() {
                        self.accept(l);
                    }
                }
            }
        }
    }

    /// Accepting stopped at an error (EMFILE: out of fds): remembered so that the backlog is
    /// retried when an fd comes free, since no new edge comes for the connections in it.
    pub(super) fn accept_stalled(&mut self, e: &io::Error) {
        if self.accept_stall.is_none() && !self.accept_retrying {
            warn!(
                front = self.index,
                "accept: {e}; the backlog is retried when a connection closes"
            );
            add(&self.fs.accept_emfile, 1);
        }
        self.accept_stall = Some(Instant::now());
        self.fd_freed = false;
    }

    /// Retries the backlog after an accept error, once a connection closed (its fd is free)
    /// or ACCEPT_RETRY passed (fds may come free elsewhere).
    pub(super) fn retry_accept(&mut self) {
        let Some(at) = self.accept_stall else {
            return;
        };
        if !self.fd_freed && at.elapsed() < ACCEPT_RETRY {
            return;
        }
        self.accept_stall = None;
        add(&self.fs.accept_retries, 1);
        self.accept_retrying = true;
        for l in 0..self.listeners.len() {
            self.accept(l);
        }
        self.accept_retrying = false;
        if self.accept_stall.is_none() {
            info!(front = self.index, "accepting again");
        }
    }
}
