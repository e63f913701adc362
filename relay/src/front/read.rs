//! Reading clients: which connections are read this turn, the read of a connection straight
//! into its worker's request ring (partial frames carried in the connection's buffer), and
//! what each read's outcome does to its connection. (A key-routed read is `route.rs`.)

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;

use shm_ring::{Meta, ReserveError};
use shmrelay_worker::codec::{Codec, FrameKind, ProtocolError, Scan};
use shmrelay_worker::protocol::{self, tag, FRAME_HEADER};
use shmrelay_worker::{CloseReason, ConnId};

use super::channel::Chan;
use super::conn::{Conn, ConnState};
use super::liveness;
use super::route::read_routed;
use super::Front;
use crate::stats::{add, FrontStats};

/// Largest single read into the ring. Large, because a read that fills its grant usually ends
/// inside a frame, whose bytes are then copied: with 64 KiB reads and 16 pipelined 4 KiB frames
/// per client, 6% of all bytes were copied; at 256 KiB reads mostly end where the socket ran
/// dry, on a frame boundary (0.2%).
pub(super) const READ_CHUNK: usize = 256 * 1024;
/// Bytes read from one connection before others get their turn.
const READ_BUDGET: usize = 512 * 1024;

impl Front {
    /// Moves connections blocked on a ring that has space again to the head of the ready
    /// list, in the order they blocked: they waited longest, so they are read first (ahead of
    /// connections that became readable since). Together with `read_ready` queueing every
    /// newcomer behind a ring's waiters, a full ring serves its connections first come, first
    /// served, which keeps the tail latency of a saturated ring bounded (issue 14: in no
    /// particular order, 4 KiB p99 was 1.5-2.5x tokio-echo's).
    pub(super) fn unblock(&mut self) {
        let mut resumed = std::mem::take(&mut self.resumed);
        for ch in &mut self.chans {
            let Some(unblocked) = ch.unblocked() else {
                continue;
            };
            for key in unblocked {
                if let Some(c) = self.slab.get(key) {
                    c.blocked = false;
                    if c.wants_read() {
                        resumed.push(key);
                    }
                }
            }
        }
        if !resumed.is_empty() {
            self.ready.splice(0..0, resumed.drain(..));
        }
        self.resumed = resumed;
    }

    /// Reads every connection on the ready list (its own budget each).
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
            if c.handshaking() {
                self.ws_handshake(key);
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
                let w = c.worker();
                let ch = &mut self.chans[w];
                if ch.is_broken() {
                    self.close_conn(key, CloseReason::WorkerGone);
                    continue;
                }
                if ch.has_backlog() || ch.has_blocked() {
                    // Control records go first; and connections already waiting for room in
                    // this ring are read before this one (FIFO, see `unblock`).
                    c.blocked = true;
                    ch.block(key);
                    continue;
                }
                let (result, heartbeats) = read_conn(
                    ch,
                    c,
                    ReadAt {
                        fs: self.fs,
                        id,
                        max_frame,
                        now,
                    },
                );
                (result, heartbeats, w)
            };
            if self.slab.get(key).is_some_and(|c| c.ws.is_some()) {
                self.ws_after_read(key);
            }
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
                    self.chans[w].block(key);
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

/// What a read of one connection needs besides its ring and the connection itself.
#[derive(Clone, Copy)]
pub(super) struct ReadAt<'a> {
    pub fs: &'a FrontStats,
    /// The connection's id (its DATA records carry it).
    pub id: ConnId,
    pub max_frame: u32,
    /// The current tick (liveness and partial-frame clocks).
    pub now: u32,
}

/// How a read of one connection ended.
pub(super) enum ReadResult {
    /// Read until the socket was empty.
    Drained,
    /// More to read; the connection's budget for this turn is spent.
    Budget,
    /// The worker's ring is full.
    Blocked,
    Close(CloseReason),
    /// Malformed or oversized input: the whole frames before it went to the worker; the
    /// codec's error reply follows their replies, then the close.
    Protocol(ProtocolError),
    Corrupt(ReserveError),
    /// A frame's worker is quarantined or failed: `worker unavailable`, then close.
    Unavailable,
}

/// Reads `c` into `ch`'s request ring until the socket is empty, the budget is spent or the
/// ring is full. Returns the outcome and the number of heartbeats to answer.
///
/// Copies: a read lands in ring space and its whole frames are committed in place (no copy).
/// A frame split across reads is assembled in the connection's private buffer (`carry`): the
/// start of it (the end of a read into the ring) is copied there once, the rest is read
/// straight into the buffer, and the complete frame is copied into the ring once. So the bytes
/// of a split frame are copied at most twice whatever the number of reads it took (never once
/// per read, as when the partial frame went back and forth between the ring and the buffer:
/// quadratic for a trickled frame), and whole frames are not copied at all. Every copy is
/// counted in `bytes_copied`.
pub(super) fn read_conn(ch: &mut Chan, c: &mut Conn, at: ReadAt<'_>) -> (ReadResult, usize) {
    let ReadAt {
        fs,
        id,
        max_frame,
        now,
    } = at;
    let mut budget = READ_BUDGET;
    let mut heartbeats = 0;
    loop {
        if !c.carry.is_empty() {
            // The rest of a partial frame: into the buffer, then the frame to the ring.
            if let Err(r) = flush_carry(ch, c, at, &mut heartbeats) {
                return (r, heartbeats);
            }
        }
        if !c.carry.is_empty() && !rest_is_waiting(c, max_frame, ch.req.max_payload()) {
            let want = carry_want(c, max_frame);
            let n = match read_into_carry(c, want) {
                Ok(0) => return (ReadResult::Close(CloseReason::ClientEof), heartbeats),
                Ok(n) => n,
                Err(e) => match read_error(c, &e, fs) {
                    Some(r) => return (r, heartbeats),
                    None => continue,
                },
            };
            add(&fs.bytes_in, n as u64);
            if let Err(r) = flush_carry(ch, c, at, &mut heartbeats) {
                return (r, heartbeats);
            }
            if let Some(r) = after_read(c, n, want, &mut budget) {
                return (r, heartbeats);
            }
            continue;
        }
        // A partial frame whose rest is already in the socket goes into the ring ahead of
        // this read (its start copied once more), and the rest lands there with no copy.
        let carried = c.carry.len();
        let min = match c.carry.is_empty() {
            true => 1,
            false => carry_need(c, max_frame),
        };
        let mut grant = match ch.req.reserve_up_to(min, (carried + READ_CHUNK).max(min)) {
            Ok(g) => g,
            Err(ReserveError::Full) => return (ReadResult::Blocked, heartbeats),
            Err(e) => return (ReadResult::Corrupt(e), heartbeats),
        };
        grant[..carried].copy_from_slice(&c.carry);
        let room = grant.len() - carried;
        let n = match (&c.stream).read_vectored(&mut [IoSliceMut::new(&mut grant[carried..])]) {
            Ok(0) => return (ReadResult::Close(CloseReason::ClientEof), heartbeats),
            Ok(n) => n,
            // A partial frame is still in `carry` then: nothing was lost.
            Err(e) => match read_error(c, &e, fs) {
                Some(r) => return (r, heartbeats),
                None => continue,
            },
        };
        if carried > 0 {
            add(&fs.bytes_copied, carried as u64);
            c.carry = Vec::new();
        }
        add(&fs.bytes_in, n as u64);
        let (read, n) = (n, carried + n);
        // Walk the frames of this read.
        let w = walk_mut(c, &mut grant[..n], max_frame);
        apply(c, fs, &w, now, &mut heartbeats);
        if let Some(e) = w.bad {
            if w.frames > 0 {
                grant.commit(w.pos, Meta::tag(tag::DATA).conn(id.raw()));
                ch.wrote();
                add(&fs.frames_in, w.frames);
            }
            return (ReadResult::Protocol(e), heartbeats);
        }
        if w.pos < n {
            // A partial frame at the end: copied once to the connection's buffer, with room
            // for all of it when its size is known.
            let tail = n - w.pos;
            c.carry.reserve_exact(if w.need > tail + 1 {
                w.need
            } else {
                tail + CARRY_CHUNK
            });
            c.carry.extend_from_slice(&grant[w.pos..n]);
            c.partial_since = now;
            add(&fs.bytes_copied, (n - w.pos) as u64);
        }
        if w.frames > 0 {
            // Heartbeats and ignored empty frames between data frames ride along (the SDK
            // skips them); a read of nothing but those commits nothing.
            grant.commit(w.pos, Meta::tag(tag::DATA).conn(id.raw()));
            ch.wrote();
            add(&fs.frames_in, w.frames);
        }
        if let Some(r) = after_read(c, read, room, &mut budget) {
            return (r, heartbeats);
        }
    }
}

/// How much of the partial frame in the connection's buffer to read next (room reserved):
/// exactly the rest when the codec knows the frame's size (nothing of the next frame lands
/// there, so it stays zero-copy); a chunk when it does not (a line).
pub(super) fn carry_want(c: &mut Conn, max_frame: u32) -> usize {
    let len = c.carry.len();
    let need = match scan_carry(c, max_frame) {
        Ok(Scan::NeedMore { need }) => need,
        // Only a partial frame is left behind.
        _ => len + 1,
    };
    if need > len + 1 {
        c.carry.reserve_exact(need - len);
        need - len
    } else {
        c.carry.reserve(CARRY_CHUNK);
        CARRY_CHUNK
    }
}

/// After a read of `n` of the `asked` bytes: the loop's outcome if it stops here. A short
/// read emptied the socket, and the next arrival raises a new edge (not so a FIN that came
/// with the data: it raises no further edge, so read on to the EOF); otherwise the read budget
/// is charged.
pub(super) fn after_read(
    c: &mut Conn,
    n: usize,
    asked: usize,
    budget: &mut usize,
) -> Option<ReadResult> {
    if n < asked && !c.hup {
        c.readable = false;
        return Some(ReadResult::Drained);
    }
    *budget = budget.saturating_sub(n);
    (*budget == 0).then_some(ReadResult::Budget)
}

/// What a failed read means: `None` to read again (EINTR), else the loop's outcome (the socket
/// is drained, or the connection is broken).
pub(super) fn read_error(c: &mut Conn, e: &io::Error, fs: &FrontStats) -> Option<ReadResult> {
    match e.kind() {
        io::ErrorKind::WouldBlock => {
            c.readable = false;
            Some(ReadResult::Drained)
        }
        io::ErrorKind::Interrupted => None,
        _ => {
            crate::stats::count_io_error(fs, e);
            Some(ReadResult::Close(CloseReason::IoError))
        }
    }
}

/// The size of the partial frame in `carry`, whole (at least one byte more than it holds).
fn carry_need(c: &Conn, max_frame: u32) -> usize {
    match scan_carry(c, max_frame) {
        Ok(Scan::NeedMore { need }) => need.max(c.carry.len() + 1),
        _ => c.carry.len() + 1,
    }
}

/// True if the socket already holds the rest of the partial frame in `carry` (its size known,
/// and small enough for one ring record): the next read can then go into the ring with the
/// partial frame ahead of it, completing it there, so the rest is never copied and the frame
/// is never carried again. Otherwise (a trickle, a line) the rest is assembled in `carry`.
fn rest_is_waiting(c: &Conn, max_frame: u32, max_payload: usize) -> bool {
    let need = carry_need(c, max_frame);
    if need <= c.carry.len() + 1 || need > max_payload {
        return false;
    }
    liveness::unread_bytes(&c.stream) >= need - c.carry.len()
}

/// Bytes read at a time into a partial frame whose size the codec cannot tell yet (a line).
pub(super) const CARRY_CHUNK: usize = 64 * 1024;

/// The partial frame in the connection's carry buffer, as its codec sees it (a websocket
/// connection's carry holds raw client bytes, which its codec's `scan` does not read).
fn scan_carry(c: &Conn, max_frame: u32) -> Result<Scan, ProtocolError> {
    if c.ws.is_some() {
        return Ok(Scan::NeedMore {
            need: super::websocket::carry_need(c),
        });
    }
    c.codec.scan(&c.carry, max_frame as usize)
}

/// What the start of a buffer holds, frame by frame.
#[derive(Default)]
pub(super) struct Walk {
    /// End of the whole frames.
    pub pos: usize,
    pub frames: u64,
    pub beats: u64,
    /// Malformed input after the whole frames.
    pub bad: Option<ProtocolError>,
    /// Bytes the partial frame after `pos` needs in all (when there is one).
    pub need: usize,
    /// A frame that proves the client alive arrived besides `frames` and `beats` (a
    /// websocket control frame or fragment).
    pub heard: bool,
    /// Bytes moved in the buffer (websocket fragments reassembled), counted as copied.
    pub moved: u64,
}

/// [`walk`], for every codec: a websocket connection's walk changes the buffer (unmasks and
/// reassembles in place) and its state, so it runs once per byte.
fn walk_mut(c: &mut Conn, buf: &mut [u8], max_frame: u32) -> Walk {
    if c.ws.is_some() {
        return super::websocket::walk(c, buf, max_frame);
    }
    walk(c, buf, max_frame)
}

/// What `buf` holds, frame by frame: the whole frames (heartbeats counted apart), then
/// malformed input or the size of the partial frame that follows them.
pub(super) fn walk(c: &Conn, buf: &[u8], max_frame: u32) -> Walk {
    if c.codec == Codec::LengthPrefixed {
        return walk_length_prefixed(buf, max_frame);
    }
    walk_scan(c.codec, buf, max_frame)
}

/// [`walk`] through the codec's general scan, frame by frame.
fn walk_scan(codec: Codec, buf: &[u8], max_frame: u32) -> Walk {
    let mut w = Walk::default();
    while w.pos < buf.len() {
        match codec.scan(&buf[w.pos..], max_frame as usize) {
            Ok(Scan::Frame { len, kind }) => {
                match kind {
                    FrameKind::Heartbeat => w.beats += 1,
                    FrameKind::Data => w.frames += 1,
                    _ => {}
                }
                w.pos += len;
            }
            Ok(Scan::NeedMore { need }) => {
                w.need = need;
                break;
            }
            Err(e) => {
                // The whole frames before it still go to the worker: nothing valid is lost.
                w.bad = Some(e);
                break;
            }
        }
    }
    w
}

/// [`walk`] for `length-prefixed`, the common case, without the general `Codec::scan` per
/// frame (issue 14: 38 of the front's instructions per 64 B request): the same verdicts, a
/// length over `max_frame` is malformed, a frame not all there is partial.
#[inline]
fn walk_length_prefixed(buf: &[u8], max_frame: u32) -> Walk {
    let mut w = Walk::default();
    while let Some(len) = protocol::frame_len(&buf[w.pos..]) {
        if len > max_frame as usize {
            w.bad = Some(ProtocolError::TooLarge {
                len,
                max: max_frame as usize,
            });
            return w;
        }
        if buf.len() - w.pos - FRAME_HEADER < len {
            w.need = FRAME_HEADER + len;
            return w;
        }
        if len == 0 {
            w.beats += 1;
        } else {
            w.frames += 1;
        }
        w.pos += FRAME_HEADER + len;
    }
    if w.pos < buf.len() {
        // Part of a header: the general scan asks for the whole header.
        w.need = FRAME_HEADER;
    }
    w
}

/// Liveness and heartbeat bookkeeping for the whole frames of a walk.
fn apply(c: &mut Conn, fs: &FrontStats, w: &Walk, now: u32, heartbeats: &mut usize) {
    if w.beats > 0 {
        // A length-0 frame answers our outstanding ping if there is one, and otherwise asks
        // for an answer: so pings and heartbeats never bounce back and forth.
        let mut ask = w.beats as usize;
        if c.ping_outstanding {
            c.ping_outstanding = false;
            ask -= 1;
        }
        if ask > 0 {
            c.client_beats = true;
            *heartbeats += ask;
        }
        add(&fs.heartbeats, w.beats);
    }
    if w.frames + w.beats > 0 || w.heard {
        c.last_rx = now;
    }
    if w.moved > 0 {
        add(&fs.bytes_copied, w.moved);
    }
    if w.frames > 0 {
        c.last_data = now;
    }
}

/// Hands the whole frames at the start of the connection's buffer to the ring (one copy,
/// counted) and keeps what follows them. Errs with the outcome when the ring is full (the
/// buffer is kept as it was), broken, or the input malformed.
fn flush_carry(
    ch: &mut Chan,
    c: &mut Conn,
    at: ReadAt<'_>,
    heartbeats: &mut usize,
) -> Result<(), ReadResult> {
    if super::websocket::closed(c) {
        // Nothing after a websocket close frame is read.
        c.carry = Vec::new();
        return Ok(());
    }
    // A websocket walk changes the buffer and runs once: so the ring must take what it
    // commits before it runs (the walk commits at most the whole buffer).
    if c.ws.is_some() && !ch.req.has_space(c.carry.len()).unwrap_or(true) {
        return Err(ReadResult::Blocked);
    }
    let mut carry = std::mem::take(&mut c.carry);
    let w = walk_mut(c, &mut carry, at.max_frame);
    c.carry = carry;
    if w.pos == 0 && w.bad.is_none() {
        apply(c, at.fs, &w, at.now, heartbeats);
        return Ok(());
    }
    if w.frames > 0 {
        let mut grant = match ch.req.reserve(w.pos) {
            Ok(g) => g,
            Err(ReserveError::Full) => return Err(ReadResult::Blocked),
            Err(e) => return Err(ReadResult::Corrupt(e)),
        };
        grant[..w.pos].copy_from_slice(&c.carry[..w.pos]);
        grant.commit(w.pos, Meta::tag(tag::DATA).conn(at.id.raw()));
        ch.wrote();
        add(&at.fs.frames_in, w.frames);
        add(&at.fs.bytes_copied, w.pos as u64);
    }
    apply(c, at.fs, &w, at.now, heartbeats);
    if let Some(e) = w.bad {
        c.carry = Vec::new();
        return Err(ReadResult::Protocol(e));
    }
    if w.pos == c.carry.len() {
        // Back to reading straight into the ring; the buffer's memory goes back too.
        c.carry = Vec::new();
    } else {
        // A new partial frame read along with the end of the last one (a codec that cannot
        // tell frame sizes): moved to the front, counted.
        c.carry.drain(..w.pos);
        c.partial_since = at.now;
        add(&at.fs.bytes_copied, c.carry.len() as u64);
    }
    Ok(())
}

/// Reads up to `want` bytes into the spare capacity of the connection's buffer (reserved by
/// the caller), without initialising it first (a trickled frame would otherwise cost a
/// memset of the rest of the frame per read).
pub(super) fn read_into_carry(c: &mut Conn, want: usize) -> io::Result<usize> {
    let len = c.carry.len();
    let spare = c.carry.spare_capacity_mut();
    let want = want.min(spare.len());
    // SAFETY: `spare` is at least `want` bytes of the buffer's allocation past its length,
    // owned by us and not aliased; read(2) writes at most `want` bytes into it.
    let r = unsafe { libc::read(c.stream.as_raw_fd(), spare.as_mut_ptr().cast(), want) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = r as usize;
    // SAFETY: the kernel initialised the first `n` (<= `want`) bytes past the length.
    unsafe { c.carry.set_len(len + n) };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn length_prefixed_walk_matches_the_general_scan(
            frames in prop::collection::vec(0usize..40, 0..8),
            garbage in prop::collection::vec(any::<u8>(), 0..10),
            max_frame in 0u32..50) {
            let mut buf = Vec::new();
            for len in frames {
                buf.extend((len as u32).to_be_bytes());
                buf.extend(std::iter::repeat_n(7u8, len));
            }
            buf.extend(&garbage);
            let verdicts = |w: Walk| (w.pos, w.frames, w.beats, w.bad, w.need);
            prop_assert_eq!(
                verdicts(walk_length_prefixed(&buf, max_frame)),
                verdicts(walk_scan(Codec::LengthPrefixed, &buf, max_frame))
            );
        }
    }
}
