//! [`Out`]: replies, pushes and closes written in place into the reply rings, consecutive
//! replies to one connection coalesced into one record, and [`Reservation`]s that let a reply
//! be written before its length is known.

use std::sync::Arc;

use shm_ring::{Meta, Producer, ShmRing};

use crate::codec::websocket;
use crate::codec::{Codec, MessageKind};
use crate::protocol::{flags, tag, ConnId, BATCH_ENTRY_HEADER};

mod reservation;
mod run;
mod split;

use run::Run;
use split::reserve_blocking;

pub use reservation::Reservation;

pub(super) type Tx = Producer<Arc<ShmRing>>;

/// Why a reply could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The connection id names a front this worker has no ring to.
    #[error("no ring to front {0}")]
    UnknownFront(usize),
    /// The reply is larger than the worker's reply limit (see
    /// [`Worker::set_max_reply`](crate::Worker::set_max_reply); for `length-prefixed` also at
    /// most `u32::MAX`).
    #[error("reply of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    /// A long reply failed after its first pieces were in the ring (the front closes the
    /// connection rather than let the stream shift).
    #[error("long reply broken off after {sent} of {len} bytes (the worker is stopping or the ring is corrupt)")]
    Partial { sent: usize, len: usize },
    /// The worker is stopping (SIGTERM) while waiting for ring space.
    #[error("worker stopping")]
    Stopping,
    /// The front corrupted the reply ring's positions.
    #[error("corrupt reply ring")]
    Corrupt,
    /// [`Out::close_with`]: a close code an endpoint may not send (RFC 6455 section 7.4).
    #[error("close code {0} may not be sent")]
    InvalidCloseCode(u16),
}

/// The largest reply message [`Out::send`] accepts by default (see
/// [`Worker::set_max_reply`](crate::Worker::set_max_reply)). Longer than a ring record is
/// fine: it is split over records.
pub const DEFAULT_MAX_REPLY: usize = 256 << 20;

/// Writes replies into the reply rings, in place.
///
/// Replies to the connection whose frame is being handled, for `length-prefixed` and `line`
/// listeners, are coalesced: a run of them (across that connection's consecutive frames) goes
/// into one [`BATCH`](crate::protocol::flags::BATCH) record, each reply still carrying the
/// request position it answers, so the front reads one record and writes one `writev` for a
/// pipelined batch. Anything else (a push to another connection, a close, a reply too long
/// for one record) ends the run first, so records keep the order of the calls.
pub struct Out<'w> {
    reps: &'w mut [Option<Tx>],
    codec: Codec,
    /// Request position being answered; carried in reply records (aux).
    pub(super) answering: u64,
    /// The connection whose frame is being handled, if any.
    pub(super) answering_conn: Option<ConnId>,
    /// The kind of the message being handled (what [`Out::send`] answers with).
    pub(super) answering_kind: MessageKind,
    /// The first send to `answering_conn` that failed, and whether part of a split reply
    /// was already in the ring when it failed.
    failure: Option<(SendError, bool)>,
    /// The longest reply accepted: the worker's reply limit, and for `length-prefixed` at
    /// most `u32::MAX` (computed once: it is checked on every send).
    max_len: usize,
    /// The record being built, reserved in its ring and not committed yet.
    run: Option<Run>,
    /// The reply rings written to, to publish only those: bit `f` for front `f` below 63,
    /// bit 63 for any front from 63 on (each `poll_once` batch comes from one front, and
    /// publishing all 56 rings of a 56-front relay after each was most of a worker's wake).
    touched: u64,
}

impl<'w> Out<'w> {
    pub(super) fn new(reps: &'w mut [Option<Tx>], codec: Codec, max_reply: usize) -> Out<'w> {
        Out {
            reps,
            codec,
            answering: 0,
            answering_conn: None,
            answering_kind: MessageKind::Binary,
            failure: None,
            max_len: if codec == Codec::LengthPrefixed {
                max_reply.min(u32::MAX as usize)
            } else {
                max_reply
            },
            run: None,
            touched: 0,
        }
    }
}

impl<'w> Out<'w> {
    /// Queues one frame to `conn` (a reply, or a push to any live connection). The reply ring
    /// holds `payload` as it is; the front frames it for the listener's codec: a length prefix
    /// (`length-prefixed`), a newline after it (`line`), or nothing (`resp`: `payload` is raw
    /// RESP, one or more whole values), or a `websocket` frame header: a reply to the message
    /// being handled has that message's kind, anything else is binary (say which with
    /// [`send_text`](Out::send_text), [`send_binary`](Out::send_binary),
    /// [`send_kind`](Out::send_kind)). A payload larger than one ring record is split over
    /// several records, which the front writes out as one reply.
    ///
    /// A failed reply to the frame being handled is not lost silently: after the handler
    /// returns, the SDK answers that frame with the codec's error reply (or, if part of a
    /// long reply had gone out, closes the connection), so the client's stream of replies
    /// never shifts.
    ///
    /// # Errors
    ///
    /// See [`SendError`].
    #[must_use = "a reply that could not be queued is lost: handle the SendError"]
    #[inline]
    pub fn send(&mut self, conn: ConnId, payload: &[u8]) -> Result<(), SendError> {
        if self.append_to_run(conn, payload) {
            return Ok(());
        }
        self.send_slow(conn, payload)
    }

    /// [`send`](Out::send) when the reply does not simply join the open run.
    #[inline(never)]
    fn send_slow(&mut self, conn: ConnId, payload: &[u8]) -> Result<(), SendError> {
        let kind = self.default_kind(conn);
        let r = self.try_send(conn, kind, payload);
        self.note(conn, r)
    }

    /// Queues a `websocket` text message (for other codecs, the same as [`send`](Out::send)).
    ///
    /// # Errors
    ///
    /// See [`SendError`].
    #[must_use = "a reply that could not be queued is lost: handle the SendError"]
    pub fn send_text(&mut self, conn: ConnId, text: &str) -> Result<(), SendError> {
        self.send_kind(conn, MessageKind::Text, text.as_bytes())
    }

    /// Queues a `websocket` binary message (for other codecs, the same as
    /// [`send`](Out::send)).
    ///
    /// # Errors
    ///
    /// See [`SendError`].
    #[must_use = "a reply that could not be queued is lost: handle the SendError"]
    pub fn send_binary(&mut self, conn: ConnId, payload: &[u8]) -> Result<(), SendError> {
        self.send_kind(conn, MessageKind::Binary, payload)
    }

    /// Queues a message of the kind given. A text message must be UTF-8: the front does not
    /// check what a worker sends (a client closes on invalid text with 1007).
    ///
    /// # Errors
    ///
    /// See [`SendError`].
    #[must_use = "a reply that could not be queued is lost: handle the SendError"]
    pub fn send_kind(
        &mut self,
        conn: ConnId,
        kind: MessageKind,
        payload: &[u8],
    ) -> Result<(), SendError> {
        let r = self.try_send(conn, kind, payload);
        self.note(conn, r)
    }

    /// [`send_with`](Out::send_with) for a message of the kind given.
    ///
    /// # Errors
    ///
    /// See [`SendError`].
    #[must_use = "a reply that could not be queued is lost: handle the SendError"]
    pub fn send_kind_with(
        &mut self,
        conn: ConnId,
        kind: MessageKind,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), SendError> {
        let r = self.try_send_with(conn, kind, len, fill);
        self.note(conn, r)
    }

    /// The kind of the message being handled ([`MessageKind::Binary`] outside `on_message` /
    /// `on_frame`, and for every codec but `websocket`): for bindings whose frame callback
    /// has no kind argument.
    pub fn message_kind(&self) -> MessageKind {
        match self.answering_conn {
            Some(_) => self.answering_kind,
            None => MessageKind::Binary,
        }
    }

    /// The kind [`send`](Out::send) uses: that of the message being answered, else binary.
    pub(super) fn default_kind(&self, conn: ConnId) -> MessageKind {
        if self.answering_conn == Some(conn) {
            self.answering_kind
        } else {
            MessageKind::Binary
        }
    }

    /// Queues one frame of `len` bytes that `fill` writes directly into the reply ring (or,
    /// for a payload larger than one record, into a buffer that is then split over records).
    /// Blocks (publishing first) while the ring is full.
    ///
    /// # Errors
    ///
    /// See [`SendError`].
    #[must_use = "a reply that could not be queued is lost: handle the SendError"]
    pub fn send_with(
        &mut self,
        conn: ConnId,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), SendError> {
        let kind = self.default_kind(conn);
        let r = self.try_send_with(conn, kind, len, fill);
        self.note(conn, r)
    }

    fn try_send(
        &mut self,
        conn: ConnId,
        kind: MessageKind,
        payload: &[u8],
    ) -> Result<(), SendError> {
        if payload.len() > self.ring(conn)?.max_payload() {
            // Straight from the caller's bytes, not through a buffer.
            return self.send_split(conn, kind, payload);
        }
        self.try_send_with(conn, kind, payload.len(), |b| b.copy_from_slice(payload))
    }

    fn try_send_with(
        &mut self,
        conn: ConnId,
        kind: MessageKind,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), SendError> {
        self.check_len(len)?;
        let aux = self.answering;
        let max = self.ring(conn)?.max_payload();
        if self.coalesces(conn) && len + BATCH_ENTRY_HEADER <= max {
            let body = self.begin_entry(conn, len)?;
            // SAFETY: `begin_entry` reserved `len` bytes at `body` in the open run, ours alone
            // until the record is committed (see `Run`); no other reference to them exists.
            fill(unsafe { std::slice::from_raw_parts_mut(body, len) });
            self.end_entry(len);
            return Ok(());
        }
        self.finish_run()?;
        if len > max {
            let mut buf = vec![0u8; len];
            fill(&mut buf);
            return self.send_split(conn, kind, &buf);
        }
        let rep = self.ring(conn)?;
        let mut grant = reserve_blocking(rep, len)?;
        fill(&mut grant[..len]);
        grant.commit(
            len,
            Meta::tag(tag::SEND)
                .conn(conn.raw())
                .aux(aux)
                .flags(kind_flag(kind)),
        );
        Ok(())
    }

    #[inline(always)]
    fn check_len(&self, len: usize) -> Result<(), SendError> {
        let max = self.max_len;
        if len > max {
            return Err(SendError::TooLarge { len, max });
        }
        Ok(())
    }

    /// Remembers the first failed send to the connection whose frame is being handled.
    fn note<T>(&mut self, conn: ConnId, r: Result<T, SendError>) -> Result<T, SendError> {
        if let Err(e) = &r {
            if self.answering_conn == Some(conn) && self.failure.is_none() {
                self.failure = Some((*e, matches!(e, SendError::Partial { .. })));
            }
        }
        r
    }

    /// After a handler returned for a frame of `conn`: if a reply to it failed, answer it with
    /// the codec's error reply, or close the connection if part of a reply went out.
    #[inline(always)]
    pub(super) fn settle(&mut self, conn: ConnId) {
        match self.failure.take() {
            None => self.answering_conn = None,
            Some(failure) => self.settle_failure(conn, failure),
        }
    }

    #[cold]
    #[inline(never)]
    fn settle_failure(&mut self, conn: ConnId, (e, partial): (SendError, bool)) {
        if !partial {
            let body = self.codec.error_body(&format!("reply failed: {e}"));
            // Still answering `conn`: the error reply takes the failed reply's place.
            if self.try_send(conn, MessageKind::Text, &body).is_ok() {
                self.answering_conn = None;
                return;
            }
        }
        self.answering_conn = None;
        let _ = self.close(conn);
    }

    /// The codec of this worker's listener.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Asks the front to close `conn` once what was queued before is written.
    ///
    /// # Errors
    ///
    /// See [`SendError`].
    #[must_use = "a close that could not be queued is lost: handle the SendError"]
    pub fn close(&mut self, conn: ConnId) -> Result<(), SendError> {
        self.finish_run()?;
        let rep = self.ring(conn)?;
        let grant = reserve_blocking(rep, 0)?;
        grant.commit(0, Meta::tag(tag::CLOSE).conn(conn.raw()));
        Ok(())
    }

    /// Asks the front to close a `websocket` connection with a close code and reason (cut to
    /// 123 bytes on a character boundary) once what was queued before is written; for other
    /// codecs the same as [`close`](Out::close).
    ///
    /// # Errors
    ///
    /// [`SendError::InvalidCloseCode`] for a code an endpoint may not send (1000-1003,
    /// 1007-1011 and 3000-4999 may be sent), else see [`SendError`].
    #[must_use = "a close that could not be queued is lost: handle the SendError"]
    pub fn close_with(&mut self, conn: ConnId, code: u16, reason: &str) -> Result<(), SendError> {
        if !websocket::close_code_valid(code) {
            return Err(SendError::InvalidCloseCode(code));
        }
        let mut end = reason.len().min(websocket::MAX_CLOSE_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &reason.as_bytes()[..end];
        self.finish_run()?;
        let rep = self.ring(conn)?;
        let mut grant = reserve_blocking(rep, reason.len())?;
        grant[..reason.len()].copy_from_slice(reason);
        grant.commit(
            reason.len(),
            Meta::tag(tag::CLOSE).conn(conn.raw()).aux(code as u64),
        );
        Ok(())
    }

    fn ring(&mut self, conn: ConnId) -> Result<&mut Tx, SendError> {
        let f = conn.front();
        self.touched |= 1 << f.min(63);
        self.reps
            .get_mut(f)
            .and_then(Option::as_mut)
            .ok_or(SendError::UnknownFront(f))
    }

    /// Commits the open run and publishes every ring written to. A run that cannot be
    /// committed (only when the front corrupted the ring) is lost with the ring.
    pub(super) fn publish(&mut self) {
        let _ = self.finish_run();
        let mut touched = std::mem::take(&mut self.touched);
        while touched != 0 {
            let f = touched.trailing_zeros() as usize;
            touched &= touched - 1;
            let rings = if f < 63 { f..f + 1 } else { f..self.reps.len() };
            for rep in self.reps.get_mut(rings).into_iter().flatten().flatten() {
                rep.publish();
            }
        }
    }
}

/// The SEND record flag of a message kind.
fn kind_flag(kind: MessageKind) -> u16 {
    match kind {
        MessageKind::Text => flags::TEXT,
        MessageKind::Binary => 0,
    }
}
