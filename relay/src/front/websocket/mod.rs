//! WebSocket connections in the front: the per-connection state, the handshake read, the walk
//! that plugs into the common read path, control frames out, and the close frame a
//! connection gets when it closes. The protocol logic is in `handshake.rs` and `frames.rs`.

mod frames;
mod handshake;

use std::io::{IoSlice, Write};
use std::net::Shutdown;

use shmrelay_worker::codec::websocket::{self as wsc, close_code};
use shmrelay_worker::codec::ProtocolError;
use shmrelay_worker::protocol::tag;
use shmrelay_worker::CloseReason;
use tracing::debug;

pub(super) use handshake::Settings;

use super::conn::{Conn, ConnKey};
use super::liveness::TICK_MS;
use super::read::{read_error, read_into_carry, ReadResult, Walk};
use super::Front;
use crate::stats::add;

/// How long a client has at most to send its whole handshake request (less if
/// `frame_timeout_ms` is less).
pub(super) const HANDSHAKE_MS: u64 = 10_000;
/// Control frames (pongs) held for a client that does not read: past this it is closed as a
/// slow consumer.
const MAX_CONTROL_QUEUE: usize = 64 * 1024;

/// A websocket connection's own state (boxed in its `Conn`: the other codecs pay one word).
#[derive(Debug)]
pub(super) struct Ws {
    /// Its listener (for the handshake settings).
    pub listener: usize,
    /// The handshake request is still being read (the worker knows nothing yet).
    pub handshaking: bool,
    /// The fragmented message at the start of the carry buffer, if any.
    frag: Option<frames::Frag>,
    /// Control frames to write (pongs).
    control: Vec<u8>,
    /// Pings received since the last count.
    pings: u64,
    /// The client's close frame arrived: the code to echo (None: it had none).
    client_close: Option<Option<u16>>,
    /// The close the worker asked for: code and reason.
    worker_close: Option<(u16, Box<str>)>,
}

impl Ws {
    pub fn new(listener: usize) -> Ws {
        Ws {
            listener,
            handshaking: true,
            frag: None,
            control: Vec::new(),
            pings: 0,
            client_close: None,
            worker_close: None,
        }
    }

    /// The close frame a connection closing for `reason` gets (none before the handshake
    /// completed, or if the client is gone).
    fn goodbye(&self, reason: CloseReason, error: Option<&ProtocolError>) -> Option<Vec<u8>> {
        if self.handshaking {
            return None;
        }
        if let Some(e) = error {
            return Some(shmrelay_worker::Codec::WebSocket.protocol_error_reply(e));
        }
        if let Some(code) = self.client_close {
            // Echo the client's code (RFC 6455 section 5.5.1); an empty close gets an empty one.
            return Some(match code {
                Some(code) => wsc::close_frame(code, ""),
                None => vec![0x88, 0],
            });
        }
        if let Some((code, why)) = &self.worker_close {
            return Some(wsc::close_frame(*code, why));
        }
        let (code, why) = match reason {
            CloseReason::ClientEof | CloseReason::IoError | CloseReason::Rejected => return None,
            CloseReason::WorkerRequest => (close_code::NORMAL, ""),
            CloseReason::Shutdown => (close_code::GOING_AWAY, "relay shutting down"),
            CloseReason::IdleTimeout => (close_code::GOING_AWAY, "idle timeout"),
            CloseReason::HeartbeatTimeout => (close_code::GOING_AWAY, "no answer to pings"),
            CloseReason::SlowConsumer => (close_code::POLICY, "replies not read"),
            CloseReason::WorkerGone | CloseReason::FrontGone => {
                (close_code::INTERNAL, "worker unavailable")
            }
            CloseReason::ProtocolError | CloseReason::Other => (close_code::PROTOCOL, ""),
        };
        Some(wsc::close_frame(code, why))
    }
}

/// The walk of the common read path for a websocket connection: validates, unmasks and
/// reassembles in `buf` (see `frames.rs`), and notes what was heard.
pub(super) fn walk(c: &mut Conn, buf: &mut [u8], max_frame: u32) -> Walk {
    let ws = c.ws.as_mut().expect("a websocket connection");
    if ws.client_close.is_some() {
        // Nothing after a close frame is read: dropped, never committed.
        return Walk {
            pos: buf.len(),
            ..Walk::default()
        };
    }
    let mut heard = frames::Heard::default();
    let s = frames::walk(
        &mut ws.frag,
        buf,
        max_frame as usize,
        &mut heard,
        &mut ws.control,
    );
    ws.pings += heard.pings;
    if heard.close.is_some() && ws.client_close.is_none() {
        ws.client_close = heard.close;
        // Nothing after a close is read: a message in progress is dropped.
        ws.frag = None;
    }
    if heard.pong {
        c.ping_outstanding = false;
    }
    if heard.pings > 0 {
        // It beats on its own: pinged only when late (as with length-0 heartbeats).
        c.client_beats = true;
    }
    Walk {
        pos: s.pos,
        frames: s.messages,
        beats: 0,
        bad: s.bad,
        need: s.need,
        heard: heard.any,
        moved: s.moved,
    }
}

/// The size of the unfinished frame in a websocket connection's carry buffer (at least one
/// byte more than it holds).
pub(super) fn carry_need(c: &Conn) -> usize {
    let frag = c.ws.as_ref().and_then(|w| w.frag);
    frames::need(&frag, &c.carry)
}

/// True if a websocket connection's carry holds nothing that may be read any more (a close
/// arrived): it is dropped instead of walked.
pub(super) fn closed(c: &Conn) -> bool {
    c.ws.as_ref().is_some_and(|w| w.client_close.is_some())
}

impl Front {
    /// Reads a handshake request into the connection's carry buffer (bounded by
    /// `handshake::MAX_REQUEST`) and answers it once complete: 101 and the worker's OPEN, or
    /// the HTTP error and a close.
    pub(super) fn ws_handshake(&mut self, key: ConnKey) {
        let peer = |c: &Conn| {
            c.stream
                .peer_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string())
        };
        loop {
            let Some(c) = self.slab.get(key) else {
                return;
            };
            let l = c.ws.as_ref().map_or(0, |w| w.listener);
            let want = handshake::MAX_REQUEST + 1 - c.carry.len().min(handshake::MAX_REQUEST);
            c.carry.reserve(want.min(2048));
            let n = match read_into_carry(c, want.min(2048)) {
                Ok(0) => return self.close_conn(key, CloseReason::ClientEof),
                Ok(n) => n,
                Err(e) => match read_error(c, &e, self.fs) {
                    Some(ReadResult::Close(reason)) => return self.close_conn(key, reason),
                    Some(_) => break,
                    None => continue,
                },
            };
            add(&self.fs.bytes_in, n as u64);
            let settings = &self.listeners[l].ws;
            match handshake::check(&c.carry, settings, &peer(c)) {
                Ok(None) => continue,
                Err(refusal) => {
                    debug!(
                        slot = key.slot,
                        status = refusal.status(),
                        "websocket handshake refused"
                    );
                    add(&self.fs.ws_refused[refusal.index()], 1);
                    add(&self.fs.protocol_errors, 1);
                    // Best effort and never blocking: the close follows either way.
                    let _ = (&c.stream).write(&refusal.response());
                    let _ = c.stream.shutdown(Shutdown::Write);
                    return self.close_conn(key, CloseReason::ProtocolError);
                }
                Ok(Some(accepted)) => {
                    let rest = c.carry.len() - accepted.consumed;
                    if rest > 0 {
                        // Frames the client sent right behind its request: the start of the
                        // carry, as if a read had ended there (copied once, counted).
                        c.carry.drain(..accepted.consumed);
                        c.carry.shrink_to_fit();
                        add(&self.fs.bytes_copied, rest as u64);
                        c.partial_since = self.now as u32;
                    } else {
                        c.carry = Vec::new();
                    }
                    if let Some(ws) = c.ws.as_mut() {
                        ws.handshaking = false;
                    }
                    // Read on once the worker has the OPEN (see `flush_backlog`): the carry, and
                    // whatever the socket holds, without waiting for a new edge.
                    c.readable = true;
                    let worker = c.worker();
                    add(&self.fs.ws_upgrades, 1);
                    let id = key.id(self.index);
                    if let Err(reason) = self.send(key, &[IoSlice::new(&accepted.response)]) {
                        return self.close_conn(key, reason);
                    }
                    self.chans[worker].tell(tag::OPEN, id, 0, accepted.open);
                    self.flush_backlog(worker);
                    self.account_partial(key);
                    return;
                }
            }
        }
        self.account_partial(key);
    }

    /// After a read of a websocket connection: writes the pongs it earned and, once its close
    /// frame arrived, closes it after its worker (the close frame echoed at the end).
    pub(super) fn ws_after_read(&mut self, key: ConnKey) {
        let Some(c) = self.slab.get(key) else {
            return;
        };
        let id = key.id(self.index).raw();
        let mid = mid_reply(c, &self.chans, id);
        let Some(ws) = c.ws.as_mut() else {
            return;
        };
        let pings = std::mem::take(&mut ws.pings);
        let closing = ws.client_close.is_some();
        // Not in the middle of a long reply's frame: held until its last piece is out.
        let control = if mid {
            Vec::new()
        } else {
            std::mem::take(&mut ws.control)
        };
        if ws.control.len() > MAX_CONTROL_QUEUE {
            return self.close_conn(key, CloseReason::SlowConsumer);
        }
        if mid && !ws.control.is_empty() {
            // Looked at again at the next tick (check_timers), until the reply is out.
            let soon = self.now + 1;
            if soon < c.timer_at {
                c.timer_at = self.wheel.schedule(key.timer(), soon);
            }
        }
        if closing {
            // Nothing after the close frame counts: whatever was carried is dropped.
            self.partial_total -= c.partial as usize;
            c.partial = 0;
            c.carry = Vec::new();
        }
        if pings > 0 {
            add(&self.fs.heartbeats, pings);
        }
        if !control.is_empty() {
            if let Err(reason) = self.send(key, &[IoSlice::new(&control)]) {
                return self.close_conn(key, reason);
            }
        }
        if closing
            && self
                .slab
                .get(key)
                .is_some_and(|c| c.state == super::conn::ConnState::Open)
        {
            self.close_after_worker(key, CloseReason::ClientEof);
        }
    }

    /// A worker's CLOSE record for a websocket connection carries the close code (in `aux`)
    /// and reason: kept, from the front's own copy, for the close frame. A code that may not
    /// be sent, or a reason that is too long or not UTF-8, leaves the default (1000).
    pub(super) fn ws_worker_close(conn: &mut Conn, code: u64, reason: &[u8]) {
        let Some(ws) = conn.ws.as_mut() else {
            return;
        };
        let Ok(code) = u16::try_from(code) else {
            return;
        };
        if !wsc::close_code_valid(code) || reason.len() > wsc::MAX_CLOSE_REASON {
            return;
        }
        if let Ok(why) = std::str::from_utf8(reason) {
            ws.worker_close = Some((code, why.into()));
        }
    }
}

/// True if a control frame may not be written to the connection now: its worker's long reply
/// to it is part way out (the frame's payload continues in later records). Pongs wait for the
/// next read or timer visit, pings for the next timer visit.
pub(super) fn mid_reply(c: &Conn, chans: &[super::channel::Chan], id: u64) -> bool {
    c.ws.is_some()
        && chans
            .get(c.worker())
            .and_then(|ch| ch.split.as_ref())
            .is_some_and(|s| s.conn == id)
}

/// True if pongs wait to be written (see [`mid_reply`]).
pub(super) fn control_waiting(c: &Conn) -> bool {
    c.ws.as_ref().is_some_and(|w| !w.control.is_empty())
}

/// The bytes a connection gets just before its socket closes: the codec's error reply after a
/// protocol error, or a websocket close frame (see [`Ws::goodbye`]).
pub(super) fn last_words(c: &mut Conn, reason: CloseReason) -> Option<Vec<u8>> {
    let error = c.protocol_error.take();
    match c.ws.as_ref() {
        Some(ws) => ws.goodbye(reason, error.as_deref()),
        None => error.map(|e| c.codec.protocol_error_reply(&e)),
    }
}

/// How long a handshake may take, in ticks: [`HANDSHAKE_MS`], or `frame_timeout_ms` if that
/// is shorter (`frame_ticks`, 0 when off).
pub(super) fn handshake_ticks(frame_ticks: u32) -> u32 {
    let limit = (HANDSHAKE_MS / TICK_MS) as u32;
    if frame_ticks > 0 {
        limit.min(frame_ticks)
    } else {
        limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle websocket connection's private memory in the front: its slot in the
    /// connection table and its boxed state (buffers are freed once empty). The issue's
    /// budget is 512 bytes; the timer entry and the kernel's socket are apart.
    #[test]
    fn an_idle_connection_fits_the_memory_budget() {
        let slot = std::mem::size_of::<Option<Conn>>() + std::mem::size_of::<u32>();
        let ws = std::mem::size_of::<Ws>();
        eprintln!("connection slot {slot} B, websocket state {ws} B");
        assert!(slot + ws + 16 <= 512, "{slot} + {ws}");
    }
}
