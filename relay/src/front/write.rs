//! Writing to a client: straight to the socket, the rest to its bounded out queue, flushed
//! when the socket is writable again.

use std::io::{self, IoSlice, Write};

use mio::{Interest, Token};
use shmrelay_worker::CloseReason;

use super::budget::Budget;
use super::conn::{Conn, ConnKey, ConnState};
use super::Front;
use crate::stats::{add, FrontStats};

impl Front {
    /// Writes to a connection, queueing what the socket does not take.
    pub(super) fn send(&mut self, key: ConnKey, iov: &[IoSlice<'_>]) -> Result<(), CloseReason> {
        let Some(c) = self.slab.get(key) else {
            return Ok(());
        };
        send_to(c, iov, self.fs, self.cfg.max_pending)?;
        if c.pending() > 0 {
            self.want_write(key);
        }
        Ok(())
    }

    /// The connection has queued reply bytes: bounds them (`max_pending`, `pending_budget`)
    /// and watches the socket for room.
    pub(super) fn want_write(&mut self, key: ConnKey) {
        let max = self.cfg.max_pending;
        let Some(c) = self.slab.get(key) else {
            return;
        };
        if c.pending() > max {
            self.close_conn(key, CloseReason::SlowConsumer);
            return;
        }
        // Every path that queues reply bytes ends here: count them in the front's total.
        let pending = c.pending();
        self.queued_total = self.queued_total - c.queued + pending;
        c.queued = pending;
        if self.queued_total > self.cfg.pending_budget {
            self.shed(Budget::Queued);
            if self.slab.get(key).is_none() {
                return;
            }
        }
        self.publish_queued();
        let Some(c) = self.slab.get(key) else {
            return;
        };
        if !c.want_write {
            c.want_write = true;
            let _ = self.poll.registry().reregister(
                &mut c.stream,
                Token(key.slot as usize),
                Interest::READABLE | Interest::WRITABLE,
            );
        }
    }

    /// The socket has room: writes the queued bytes, and finishes a draining connection once
    /// they are out.
    pub(super) fn flush_out(&mut self, key: ConnKey) {
        let Some(c) = self.slab.get(key) else {
            return;
        };
        if !c.want_write {
            return;
        }
        let before = c.pending();
        while c.pending() > 0 {
            match (&c.stream).write(&c.out[c.out_pos..]) {
                Ok(n) => {
                    c.out_pos += n;
                    add(&self.fs.bytes_out, n as u64);
                    let gone = c.queued.min(n);
                    c.queued -= gone;
                    self.queued_total -= gone;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if c.pending() < before {
                        self.publish_queued();
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::stats::count_io_error(self.fs, &e);
                    self.close_conn(key, CloseReason::IoError);
                    return;
                }
            }
        }
        c.out.clear();
        c.out_pos = 0;
        c.out.shrink_to(4096);
        self.queued_total -= std::mem::take(&mut c.queued);
        c.want_write = false;
        let _ = self.poll.registry().reregister(
            &mut c.stream,
            Token(key.slot as usize),
            Interest::READABLE,
        );
        if let ConnState::Draining(reason) = c.state {
            if c.flushed() && c.acks_in() {
                self.close_conn(key, reason);
                return;
            }
        }
        self.resume_routed(key);
    }
}

/// Writes `iov` to the connection unless it already has queued bytes (order), and queues the
/// rest. Errors with the close reason when the connection must go.
pub(super) fn send_to(
    c: &mut Conn,
    iov: &[IoSlice<'_>],
    fs: &FrontStats,
    max_pending: usize,
) -> Result<(), CloseReason> {
    let total: usize = iov.iter().map(|s| s.len()).sum();
    let mut written = 0;
    if c.pending() == 0 {
        loop {
            match (&c.stream).write_vectored(iov) {
                Ok(n) => {
                    written = n;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::stats::count_io_error(fs, &e);
                    return Err(CloseReason::IoError);
                }
            }
        }
        add(&fs.bytes_out, written as u64);
    }
    if written < total {
        let mut skip = written;
        for s in iov {
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            c.out.extend_from_slice(&s[skip..]);
            skip = 0;
        }
        add(&fs.bytes_copied, (total - written) as u64);
        if c.pending() > max_pending {
            return Err(CloseReason::SlowConsumer);
        }
    }
    Ok(())
}
