//! One connection's state, the connection table, and the read and write paths.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;

use mio::net::TcpStream;
use shm_ring::{Meta, ReserveError};
use shmrelay_worker::codec::{FrameKind, ProtocolError, Scan};
use shmrelay_worker::protocol::tag;
use shmrelay_worker::{CloseReason, Codec, ConnId};

use super::routing::Route;
use super::Chan;
use crate::stats::{add, FrontStats};

/// Largest single read into the ring. Large, because a read that fills its grant usually ends
/// inside a frame, whose bytes are then copied: with 64 KiB reads and 16 pipelined 4 KiB frames
/// per client, 6% of all bytes were copied; at 256 KiB reads mostly end where the socket ran
/// dry, on a frame boundary (0.2%).
pub(super) const READ_CHUNK: usize = 256 * 1024;
/// Bytes read from one connection before others get their turn.
const READ_BUDGET: usize = 512 * 1024;

/// Where a connection is in its life. Every transition is made by the front's loop:
///
/// ```text
/// Accepted --OPEN record written--> Open --close requested, replies pending--> Draining
///     \                              |                                            |
///      +------------------------------+--------- close(reason) ------------------+--> (removed)
/// ```
///
/// `Accepted`: its OPEN record waits for ring space, nothing is read yet. `Open`: read and
/// written. `Draining`: nothing more is read; it closes once its queued replies are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConnState {
    Accepted,
    Open,
    Draining(CloseReason),
}

pub(super) struct Conn {
    pub stream: TcpStream,
    pub worker: usize,
    /// Its listener's codec.
    pub codec: Codec,
    pub state: ConnState,
    /// An edge was seen and the socket not yet read dry.
    pub readable: bool,
    /// Waiting for space in its worker's request ring.
    pub blocked: bool,
    /// The peer's FIN (or an error) is pending: read until EOF, not just until a short read.
    pub hup: bool,
    /// Its worker was sent the CLOSE already (at the client's FIN, before the final close).
    pub told_close: bool,
    pub want_write: bool,
    /// Heartbeat bookkeeping, in timer ticks.
    pub last_rx: u32,
    pub last_data: u32,
    pub ping_sent: u32,
    pub ping_outstanding: bool,
    /// The client sends heartbeats of its own: they prove it alive, so it is pinged only after
    /// 1.25x the longest ping interval of silence (pinging it too doubles the idle traffic).
    pub client_beats: bool,
    /// The protocol error this connection made (malformed or oversized input): the codec's
    /// error reply is written at its close, after the replies to the frames before it.
    pub protocol_error: Option<Box<ProtocolError>>,
    /// The tick of this connection's live timer entry.
    pub timer_at: u64,
    /// Smoothed RTT from TCP_INFO, microseconds (0 until sampled).
    pub rtt_us: u32,
    /// Its source address's admission slot.
    pub addr_slot: u16,
    /// The partial frame at the end of the last read.
    pub carry: Vec<u8>,
    /// The tick the partial frame in `carry` started (meaningful while `carry` is not empty):
    /// it must be complete within `frame_timeout_ms`.
    pub partial_since: u32,
    /// The part of `carry`'s capacity counted in the front's total of partial-frame memory
    /// (brought up to date after each read and at the close).
    pub partial: usize,
    /// Reply bytes the socket did not take yet.
    pub out: Vec<u8>,
    pub out_pos: usize,
    /// The part of `pending()` counted in the front's total of queued reply bytes (brought up
    /// to date by `want_write`, `flush_out` and `close_conn`).
    pub queued: usize,
    /// Per-frame key routing (a `resp` listener with several workers); `worker` is then the
    /// home worker, which gets the commands that name no key.
    pub route: Option<Box<Route>>,
}

impl Conn {
    pub fn new(stream: TcpStream, worker: usize, codec: Codec, addr_slot: u16, now: u32) -> Conn {
        Conn {
            stream,
            worker,
            codec,
            state: ConnState::Accepted,
            readable: false,
            blocked: false,
            hup: false,
            told_close: false,
            want_write: false,
            last_rx: now,
            last_data: now,
            ping_sent: 0,
            ping_outstanding: false,
            client_beats: false,
            protocol_error: None,
            timer_at: 0,
            rtt_us: 0,
            addr_slot,
            carry: Vec::new(),
            partial_since: 0,
            partial: 0,
            out: Vec::new(),
            out_pos: 0,
            queued: 0,
            route: None,
        }
    }

    pub fn pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// True when a draining connection may close: its queue is written and, if routed, every
    /// request it sent was answered and written.
    pub fn flushed(&self) -> bool {
        self.pending() == 0 && self.route.as_ref().is_none_or(|r| r.idle())
    }

    /// False while a routed connection half-closed by its client still waits for a worker's
    /// acknowledgement of the CLOSE (each worker's comes after all its replies).
    pub fn acks_in(&self) -> bool {
        !self.told_close
            || self
                .route
                .as_ref()
                .is_none_or(|r| r.close_acked & r.close_sent == r.close_sent)
    }

    /// True if the loop should read this connection now.
    pub fn wants_read(&self) -> bool {
        self.readable && !self.blocked && self.state == ConnState::Open
    }
}

/// A connection of this front: its slot in the [`Slab`] and the slot's generation when the
/// connection was accepted. The generation makes a key of a closed connection (a stale timer
/// entry, a late reply) miss the slot's next occupant. Shown as `slot.generation`, the end of
/// the [`ConnId`] the workers see (`front.slot.generation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct ConnKey {
    pub slot: u32,
    pub gen: u32,
}

impl ConnKey {
    /// The key of a connection id (of any front: the caller checks [`ConnId::front`]).
    #[inline]
    pub fn of(id: ConnId) -> ConnKey {
        ConnKey {
            slot: id.slot(),
            gen: id.generation(),
        }
    }

    /// The key of a timer wheel entry (`crate::timer` keys are plain pairs).
    #[inline]
    pub fn from_timer((slot, gen): crate::timer::Key) -> ConnKey {
        ConnKey { slot, gen }
    }

    /// This key as a timer wheel key.
    #[inline]
    pub fn timer(self) -> crate::timer::Key {
        (self.slot, self.gen)
    }

    /// The id the workers know this connection by, on front `front`.
    #[inline]
    pub fn id(self, front: usize) -> ConnId {
        ConnId::new(front as u8, self.gen, self.slot)
    }
}

impl std::fmt::Display for ConnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.slot, self.gen)
    }
}

/// The connection table: slots reused with a new generation, so a stale id never reaches a
/// new connection. New slots start at a generation derived from a per-process seed, so a
/// restarted front does not reuse its predecessor's ids (replies still in flight to those are
/// dropped as stale, not delivered to a stranger).
pub(super) struct Slab {
    pub conns: Vec<Option<Conn>>,
    pub gens: Vec<u32>,
    free: Vec<u32>,
    seed: u32,
}

impl Slab {
    pub fn new(seed: u32) -> Slab {
        Slab {
            conns: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            seed,
        }
    }

    /// The key of the connection in `slot`, if there is one.
    pub fn key(&self, slot: usize) -> Option<ConnKey> {
        self.conns.get(slot)?.as_ref()?;
        Some(ConnKey {
            slot: slot as u32,
            gen: self.gens[slot],
        })
    }

    /// The keys of every open connection.
    pub fn keys(&self) -> Vec<ConnKey> {
        (0..self.conns.len()).filter_map(|s| self.key(s)).collect()
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len() - self.free.len()
    }

    pub fn insert(&mut self, conn: Conn) -> ConnKey {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                let n = self.conns.len() as u32;
                self.gens
                    .push(self.seed.wrapping_mul(n).rotate_left(13) & ConnId::GENERATION_MASK);
                (self.conns.len() - 1) as u32
            }
        };
        self.conns[slot as usize] = Some(conn);
        ConnKey {
            slot,
            gen: self.gens[slot as usize],
        }
    }

    #[inline]
    pub fn get(&mut self, key: ConnKey) -> Option<&mut Conn> {
        let s = key.slot as usize;
        if self.gens.get(s) != Some(&key.gen) {
            return None;
        }
        self.conns[s].as_mut()
    }

    /// Removes a connection; its slot's generation moves on, so `key` no longer finds it.
    pub fn remove(&mut self, key: ConnKey) -> Option<Conn> {
        let slot = key.slot;
        if self.gens.get(slot as usize) != Some(&key.gen) {
            return None;
        }
        let c = self.conns.get_mut(slot as usize)?.take()?;
        self.gens[slot as usize] = (self.gens[slot as usize] + 1) & ConnId::GENERATION_MASK;
        self.free.push(slot);
        Some(c)
    }
}

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
pub(super) fn read_conn(
    ch: &mut Chan,
    c: &mut Conn,
    fs: &FrontStats,
    id: ConnId,
    max_frame: u32,
    now: u32,
) -> (ReadResult, usize) {
    let mut budget = READ_BUDGET;
    let mut heartbeats = 0;
    loop {
        if !c.carry.is_empty() {
            // The rest of a partial frame: into the buffer, then the frame to the ring.
            if let Err(r) = flush_carry(ch, c, fs, id, max_frame, now, &mut heartbeats) {
                return (r, heartbeats);
            }
        }
        if !c.carry.is_empty() && !rest_is_waiting(c, max_frame, ch.req.max_payload()) {
            let want = carry_want(c, max_frame);
            let n = match read_into_carry(c, want) {
                Ok(0) => return (ReadResult::Close(CloseReason::ClientEof), heartbeats),
                Ok(n) => n,
                Err(e) => match read_error(c, &e) {
                    Some(r) => return (r, heartbeats),
                    None => continue,
                },
            };
            add(&fs.bytes_in, n as u64);
            if let Err(r) = flush_carry(ch, c, fs, id, max_frame, now, &mut heartbeats) {
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
            Err(e) => match read_error(c, &e) {
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
        let w = walk(c, &grant[..n], max_frame);
        apply(c, fs, &w, now, &mut heartbeats);
        if let Some(e) = w.bad {
            if w.frames > 0 {
                grant.commit(w.pos, Meta::tag(tag::DATA).conn(id.raw()));
                ch.dirty = true;
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
            ch.dirty = true;
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
    let need = match c.codec.scan(&c.carry, max_frame as usize) {
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
pub(super) fn read_error(c: &mut Conn, e: &io::Error) -> Option<ReadResult> {
    match e.kind() {
        io::ErrorKind::WouldBlock => {
            c.readable = false;
            Some(ReadResult::Drained)
        }
        io::ErrorKind::Interrupted => None,
        _ => Some(ReadResult::Close(CloseReason::IoError)),
    }
}

/// The size of the partial frame in `carry`, whole (at least one byte more than it holds).
fn carry_need(c: &Conn, max_frame: u32) -> usize {
    match c.codec.scan(&c.carry, max_frame as usize) {
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
    let mut ready: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int, the bytes waiting in the socket, to `ready`.
    let r = unsafe { libc::ioctl(c.stream.as_raw_fd(), libc::FIONREAD, &mut ready) };
    r == 0 && ready as usize >= need - c.carry.len()
}

/// Bytes read at a time into a partial frame whose size the codec cannot tell yet (a line).
pub(super) const CARRY_CHUNK: usize = 64 * 1024;

/// What the start of a buffer holds, frame by frame.
pub(super) struct Walk {
    /// End of the whole frames.
    pub pos: usize,
    frames: u64,
    beats: u64,
    /// Malformed input after the whole frames.
    pub bad: Option<ProtocolError>,
    /// Bytes the partial frame after `pos` needs in all (when there is one).
    need: usize,
}

/// What `buf` holds, frame by frame: the whole frames (heartbeats counted apart), then
/// malformed input or the size of the partial frame that follows them.
pub(super) fn walk(c: &Conn, buf: &[u8], max_frame: u32) -> Walk {
    let mut w = Walk {
        pos: 0,
        frames: 0,
        beats: 0,
        bad: None,
        need: 0,
    };
    while w.pos < buf.len() {
        match c.codec.scan(&buf[w.pos..], max_frame as usize) {
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
    if w.frames + w.beats > 0 {
        c.last_rx = now;
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
    fs: &FrontStats,
    id: ConnId,
    max_frame: u32,
    now: u32,
    heartbeats: &mut usize,
) -> Result<(), ReadResult> {
    let w = walk(c, &c.carry, max_frame);
    if w.pos == 0 && w.bad.is_none() {
        return Ok(());
    }
    if w.frames > 0 {
        let mut grant = match ch.req.reserve(w.pos) {
            Ok(g) => g,
            Err(ReserveError::Full) => return Err(ReadResult::Blocked),
            Err(e) => return Err(ReadResult::Corrupt(e)),
        };
        grant[..w.pos].copy_from_slice(&c.carry[..w.pos]);
        grant.commit(w.pos, Meta::tag(tag::DATA).conn(id.raw()));
        ch.dirty = true;
        add(&fs.frames_in, w.frames);
        add(&fs.bytes_copied, w.pos as u64);
    }
    apply(c, fs, &w, now, heartbeats);
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
        c.partial_since = now;
        add(&fs.bytes_copied, c.carry.len() as u64);
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
                Err(_) => return Err(CloseReason::IoError),
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
