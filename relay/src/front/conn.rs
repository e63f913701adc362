//! One connection's state, the connection table, and the read and write paths.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};

use mio::net::TcpStream;
use shm_ring::{Meta, ReserveError};
use shmrelay_worker::codec::{FrameKind, ProtocolError, Scan};
use shmrelay_worker::protocol::tag;
use shmrelay_worker::{CloseReason, Codec, ConnId};

use super::route::Route;
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

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len() - self.free.len()
    }

    pub fn insert(&mut self, conn: Conn) -> (u32, u32) {
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
        (slot, self.gens[slot as usize])
    }

    pub fn get(&mut self, slot: u32, gen: u32) -> Option<&mut Conn> {
        let s = slot as usize;
        if self.gens.get(s) != Some(&gen) {
            return None;
        }
        self.conns[s].as_mut()
    }

    pub fn remove(&mut self, slot: u32) -> Option<Conn> {
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
    let limit = ch.req.max_payload();
    loop {
        let carry = c.carry.len();
        // A partial frame of known size needs room for all of it, so it is carried at most
        // once more; otherwise any room beyond the carry will do.
        let min = if carry == 0 {
            1
        } else {
            match c.codec.scan(&c.carry, max_frame as usize) {
                Ok(Scan::NeedMore { need }) => need,
                _ => carry + 1,
            }
        }
        .min(limit);
        let max = (carry + READ_CHUNK).max(min);
        let mut grant = match ch.req.reserve_up_to(min, max) {
            Ok(g) => g,
            Err(ReserveError::Full) => return (ReadResult::Blocked, heartbeats),
            Err(e) => return (ReadResult::Corrupt(e), heartbeats),
        };
        grant[..carry].copy_from_slice(&c.carry);
        let room = grant.len() - carry;
        let n = match (&c.stream).read_vectored(&mut [IoSliceMut::new(&mut grant[carry..])]) {
            Ok(0) => return (ReadResult::Close(CloseReason::ClientEof), heartbeats),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.readable = false;
                return (ReadResult::Drained, heartbeats);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return (ReadResult::Close(CloseReason::IoError), heartbeats),
        };
        let filled = carry + n;
        // Walk the frames of this read.
        let mut pos = 0;
        let mut frames = 0u64;
        let mut beats = 0u64;
        let mut bad = None;
        while pos < filled {
            let (len, kind) = match c.codec.scan(&grant[pos..filled], max_frame as usize) {
                Ok(Scan::Frame { len, kind }) => (len, kind),
                Ok(Scan::NeedMore { .. }) => break,
                Err(e) => {
                    // The whole frames before it still go to the worker: nothing valid is lost.
                    bad = Some(e);
                    break;
                }
            };
            if kind == FrameKind::Heartbeat {
                // A length-0 frame answers our outstanding ping if there is one, and otherwise
                // asks for an answer: so pings and heartbeats never bounce back and forth.
                beats += 1;
                if c.ping_outstanding {
                    c.ping_outstanding = false;
                } else {
                    c.client_beats = true;
                    heartbeats += 1;
                }
            } else if kind == FrameKind::Data {
                frames += 1;
            }
            pos += len;
        }
        if frames + beats > 0 {
            c.last_rx = now;
        }
        if frames > 0 {
            c.last_data = now;
        }
        if beats > 0 {
            add(&fs.heartbeats, beats);
        }
        if let Some(e) = bad {
            if frames > 0 {
                grant.commit(pos, Meta::tag(tag::DATA).conn(id.raw()));
                ch.dirty = true;
                add(&fs.frames_in, frames);
            }
            add(&fs.bytes_in, n as u64);
            c.carry.clear();
            return (ReadResult::Protocol(e), heartbeats);
        }
        // The carried bytes were copied in; the new partial tail is copied out.
        let copied = carry + (filled - pos);
        c.carry.clear();
        c.carry.extend_from_slice(&grant[pos..filled]);
        if frames > 0 {
            // Heartbeats and ignored empty frames between data frames ride along (the SDK
            // skips them); a read of nothing but those commits nothing.
            grant.commit(pos, Meta::tag(tag::DATA).conn(id.raw()));
            ch.dirty = true;
            add(&fs.frames_in, frames);
        }
        add(&fs.bytes_in, n as u64);
        if copied > 0 {
            add(&fs.bytes_copied, copied as u64);
        }
        if c.carry.is_empty() && c.carry.capacity() > 4096 {
            c.carry = Vec::new();
        }
        if n < room && !c.hup {
            // A short read emptied the socket; the next arrival raises a new edge. (Not so a
            // FIN that came with the data: it raises no further edge, so read on to the EOF.)
            c.readable = false;
            return (ReadResult::Drained, heartbeats);
        }
        budget = budget.saturating_sub(n);
        if budget == 0 {
            return (ReadResult::Budget, heartbeats);
        }
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
