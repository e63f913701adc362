//! Ring generations: when a worker dies, the supervisor hands this front a fresh pair of rings
//! for it over the front's control socket, so that nothing the dead worker (or anything it
//! started) still maps can reach its replacement.
//!
//! The front reads every reply the dead worker published from the old reply ring (validated
//! as always), then carries the request records the worker had not released into the new
//! request ring **at the same positions** (a copy of the bytes between the released position
//! and its own published tail, checked record by record once in the new ring, which nobody
//! else writes). Positions are unchanged, so the front's own answered copy, key routing's
//! waiting positions and the supervisor's dead-letter positions stay valid, and the
//! replacement sees the carried records exactly as redelivered frames of a restarted worker.
//! Queued control records (OPEN/CLOSE backlog) stay queued, in order. If the old request ring
//! does not read back as valid records, nothing is carried: the new ring starts empty at the
//! front's own tail and the connections that had requests with that worker get the codec's
//! error and are closed (as for a quarantine, but the worker's rings stay usable).
//!
//! Wire format (SOCK_SEQPACKET): the supervisor sends `MAGIC, seq, worker` (3 x u64, native
//! endianness) with two fds (request ring, reply ring); the front answers `seq, status`
//! (2 x u64) once it uses the new rings and has dropped the old ones.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shm_ring::{Consumer, CorruptError, Producer, RingStorage, ShmRing};
use shmrelay_worker::protocol::{tag, ANSWERED_WORD};
use shmrelay_worker::{CloseReason, ConnId};
use tracing::{error, info, warn};

use super::conn::ConnKey;
use super::{Front, REPLY_BATCH};
use crate::stats::add;

/// First word of a generation message.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SHMRGEN1");
/// Status: the new rings are in use, every unanswered request carried over.
pub const CARRIED: u64 = 0;
/// Status: the new rings are in use, nothing carried (the old ring did not read back as
/// valid records, or the worker's rings were quarantined): its connections were closed.
pub const NOT_CARRIED: u64 = 1;
/// Status: the message was refused (bad worker index or rings); the old rings are kept.
pub const REFUSED: u64 = 2;
/// Status: the new rings are in use by a quarantined channel (its connections were closed at
/// the quarantine); it re-arms on them once the supervisor has reset them.
pub const QUARANTINED: u64 = 3;

/// What the control socket held.
enum Msg {
    Generation {
        seq: u64,
        worker: usize,
        req: OwnedFd,
        rep: OwnedFd,
    },
    Garbage,
    Closed,
    Empty,
}

fn recv(sock: &UnixStream) -> Msg {
    let mut buf = [0u8; 24];
    loop {
        return match shm_ring::recv_fds(sock, &mut buf, 2) {
            Ok((0, _)) => Msg::Closed,
            Ok((24, fds)) => {
                let word = |i: usize| u64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
                let Ok::<[OwnedFd; 2], _>([req, rep]) = fds.try_into() else {
                    return Msg::Garbage;
                };
                if word(0) != MAGIC {
                    return Msg::Garbage;
                }
                Msg::Generation {
                    seq: word(1),
                    worker: word(2) as usize,
                    req,
                    rep,
                }
            }
            Ok(_) => Msg::Garbage,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Msg::Empty,
            Err(e) => {
                warn!("control socket: {e}");
                Msg::Closed
            }
        };
    }
}

/// Copies the bytes `head..tail` of `from`'s data area into the fresh ring `to` at the same
/// positions and sets `to`'s positions to `head` and `tail`. `to` must be a ring nobody is
/// attached to (only the supervisor, which created it, and this process hold it).
fn copy_span(from: &ShmRing, to: &ShmRing, head: u64, tail: u64) -> Result<(), CorruptError> {
    let cap = to.capacity() as u64;
    let out_of_range = CorruptError::HeadOutOfRange {
        head,
        tail,
        capacity: cap,
    };
    if from.capacity() != to.capacity()
        || head % 8 != 0
        || tail % 8 != 0
        || head > tail
        || tail - head > cap
        || tail > shm_ring::layout::MAX_POSITION
    {
        return Err(out_of_range);
    }
    let mask = cap - 1;
    let mut pos = head;
    while pos < tail {
        let off = pos & mask;
        let n = (tail - pos).min(cap - off) as usize;
        // SAFETY: `off + n <= cap`, inside both data areas (same capacity). The source is
        // shared memory a dead peer could still write: it is copied as raw bytes, never
        // referenced, and the copy is validated record by record afterwards. The destination
        // is a data area no other process writes (nobody attached yet).
        unsafe {
            std::ptr::copy_nonoverlapping(
                from.data().add(off as usize),
                to.data().add(off as usize),
                n,
            );
        }
        pos += n as u64;
    }
    let h = to.header();
    h.head.store(head, Ordering::Relaxed);
    // Release: pairs with the Acquire load of the tail by the consumer that attaches later,
    // so the copied bytes are visible before the tail that covers them.
    h.tail.store(tail, Ordering::Release);
    Ok(())
}

/// Request-ring tags this front writes.
fn request_tag(t: u16) -> bool {
    matches!(t, tag::OPEN | tag::DATA | tag::CLOSE | tag::FRONT_RESET)
}

impl Front {
    /// The control socket is readable: handle every generation message waiting.
    pub(super) fn control_ready(&mut self) {
        let Some(sock) = self.control.take() else {
            return;
        };
        loop {
            match recv(&sock) {
                Msg::Empty => break,
                Msg::Closed => {
                    // The supervisor is gone (the front dies with it anyway).
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut mio::unix::SourceFd(&fd));
                    return;
                }
                Msg::Garbage => warn!(front = self.index, "malformed control message ignored"),
                Msg::Generation {
                    seq,
                    worker,
                    req,
                    rep,
                } => {
                    let status = self.new_generation(worker, req, rep);
                    let mut ack = [0u8; 16];
                    ack[..8].copy_from_slice(&seq.to_ne_bytes());
                    ack[8..].copy_from_slice(&status.to_ne_bytes());
                    if let Err(e) = (&sock).write_all(&ack) {
                        warn!(front = self.index, "acknowledging a ring generation: {e}");
                    }
                }
            }
        }
        self.control = Some(sock);
    }

    /// Switches worker `w`'s channel to the rings in `req` and `rep`; returns the status sent
    /// back to the supervisor.
    fn new_generation(&mut self, w: usize, req: OwnedFd, rep: OwnedFd) -> u64 {
        if w >= self.chans.len() {
            warn!(
                front = self.index,
                worker = w,
                "ring generation for an unknown worker"
            );
            return REFUSED;
        }
        let t = Duration::from_secs(1);
        let (req, rep) = match (ShmRing::open_fd(req, t), ShmRing::open_fd_reader(rep, t)) {
            (Ok(req), Ok(rep)) => (Arc::new(req), Arc::new(rep)),
            (Err(e), _) | (_, Err(e)) => {
                error!(
                    front = self.index,
                    worker = w,
                    "new ring generation unusable: {e}"
                );
                return REFUSED;
            }
        };
        if req.capacity() != self.chans[w].req.capacity() {
            error!(
                front = self.index,
                worker = w,
                "new ring generation has another capacity"
            );
            return REFUSED;
        }
        // Every reply the dead worker published, read and delivered as usual (a corrupt one
        // quarantines the channel, as always).
        // The dead producer adds nothing: this ends once the ring is read (bounded anyway).
        // (the smallest record is a bare header).
        let most =
            2 + self.chans[w].rep.capacity() / (REPLY_BATCH * shm_ring::layout::RECORD_HEADER_SIZE);
        for _ in 0..most {
            if self.pump_replies(w) < REPLY_BATCH {
                break;
            }
        }
        let ch = &mut self.chans[w];
        if ch.is_broken() {
            // Quarantined: the supervisor resets these new rings in place and clears the
            // bit, then the channel re-arms on them (positions from zero).
            let tx = match Producer::new(req) {
                Ok(tx) => tx,
                Err(e) => {
                    error!(front = self.index, worker = w, "new request ring: {e}");
                    return REFUSED;
                }
            };
            let rx = match Consumer::new(rep) {
                Ok(rx) => rx,
                Err(e) => {
                    error!(front = self.index, worker = w, "new reply ring: {e}");
                    return REFUSED;
                }
            };
            ch.swap_rings(tx, rx);
            info!(
                front = self.index,
                worker = w,
                "new ring generation (channel quarantined)"
            );
            return QUARANTINED;
        }
        // What this front wrote and the worker never released (validated against our tail).
        ch.publish();
        let tail = ch.req.position();
        let head = ch.req.released();
        let carried = head.and_then(|head| {
            copy_span(ch.req.storage(), &req, head, tail)?;
            Ok(head)
        });
        let (mut tx, status) = match carried {
            Ok(head) => match Producer::new(req.clone()) {
                Ok(mut tx) => {
                    let valid = match tx.unreleased() {
                        Ok(records) => records
                            .map(|r| r.map(|r| request_tag(r.tag())))
                            .all(|r| r.unwrap_or(false)),
                        Err(_) => false,
                    };
                    if valid {
                        info!(
                            front = self.index,
                            worker = w,
                            bytes = tail - head,
                            "new ring generation: unreleased requests carried over"
                        );
                        (tx, CARRIED)
                    } else {
                        drop(tx.abandon());
                        match restart_empty(&req, tail) {
                            Ok(tx) => (tx, NOT_CARRIED),
                            Err(e) => {
                                error!(front = self.index, worker = w, "new request ring: {e}");
                                return REFUSED;
                            }
                        }
                    }
                }
                Err(e) => {
                    error!(front = self.index, worker = w, "new request ring: {e}");
                    return REFUSED;
                }
            },
            Err(e) => {
                warn!(
                    front = self.index,
                    worker = w,
                    "old request ring unreadable: {e}"
                );
                match restart_empty(&req, tail) {
                    Ok(tx) => (tx, NOT_CARRIED),
                    Err(e) => {
                        error!(front = self.index, worker = w, "new request ring: {e}");
                        return REFUSED;
                    }
                }
            }
        };
        let mut rx = match Consumer::new(rep) {
            Ok(rx) => rx,
            Err(e) => {
                error!(front = self.index, worker = w, "new reply ring: {e}");
                drop(tx.abandon());
                return REFUSED;
            }
        };
        ch.set_doorbells(&mut tx, &mut rx);
        // The answered word from this front's own copy (never from the old ring).
        tx.storage().user_words()[ANSWERED_WORD].store(ch.answered().min(tail), Ordering::Relaxed);
        // The old rings are dropped: this process maps nothing of them any more. A long
        // reply the dead worker had begun is never finished.
        let broken_split = ch.swap_rings(tx, rx);
        if let Some(conn) = broken_split {
            let id = ConnId::from_raw(conn);
            if id.front() == self.index && self.slab.get(ConnKey::of(id)).is_some() {
                add(&self.fs.protocol_errors, 1);
                self.close_conn(ConnKey::of(id), CloseReason::ProtocolError);
            }
        }
        if status == NOT_CARRIED {
            warn!(
                front = self.index,
                worker = w,
                "new ring generation: requests could not be carried over; closing the worker's connections"
            );
            add(&self.fs.corrupt_rings, 1);
            let ch = &mut self.chans[w];
            ch.restart_answered(tail);
            self.routing.restart(w, tail);
            self.close_worker_conns(w, "worker unavailable");
        }
        status
    }
}

/// The new request ring, empty, starting at `tail` (the front's own position).
fn restart_empty(req: &Arc<ShmRing>, tail: u64) -> Result<Producer<Arc<ShmRing>>, String> {
    let h = req.header();
    h.head.store(tail, Ordering::Relaxed);
    h.tail.store(tail, Ordering::Relaxed);
    Producer::new(req.clone()).map_err(|e| e.to_string())
}
