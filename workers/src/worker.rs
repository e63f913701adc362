//! The worker side of the relay: attach to the rings handed over by the supervisor and serve
//! OPEN / frame / CLOSE events with payloads borrowed in place.

use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use shm_ring::{Consumer, Doorbell, EventFd, Meta, Producer, ReserveError, ShmRing};

use crate::codec::websocket::{self, Upgrade};
use crate::codec::{Codec, MessageKind};
use crate::protocol::{
    env, flags, inherited_fd, tag, Channel, CloseReason, ConnId, ANSWERED_WORD, DEAD_LETTER_WORDS,
    INFLIGHT_WORD, REDELIVERED_WORD, SKIPPED_WORD, SPLIT_HEADER,
};

type Rx = Consumer<Arc<ShmRing>>;
type Tx = Producer<Arc<ShmRing>>;

/// How long a blocked worker sleeps before re-checking its stop flag.
const PARK_TIMEOUT: Duration = Duration::from_millis(100);
/// Records handled before replies are published and requests released.
const BATCH: usize = 256;

/// Why a worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A variable the supervisor sets is missing or malformed: the binary was not started by
    /// `shmrelay`.
    #[error("environment variable {var}: {problem} (is this worker started by shmrelay?)")]
    Env { var: &'static str, problem: String },
    /// Attaching to a ring failed.
    #[error("attaching to the ring of front {front}: {source}")]
    Attach {
        front: usize,
        source: shm_ring::AttachError,
    },
    /// A front wrote invalid positions or records into a request ring.
    #[error("corrupt request ring from front {front}: {detail}")]
    Corrupt { front: usize, detail: String },
}

/// Why a reply could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The connection id names a front this worker has no ring to.
    #[error("no ring to front {0}")]
    UnknownFront(usize),
    /// The reply is larger than the worker's reply limit (see [`Worker::set_max_reply`]; for
    /// `length-prefixed` also at most `u32::MAX`).
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

/// What the worker code implements. Every method gets an [`Out`] to reply, push or close.
pub trait Handler {
    /// A client connected (`peer` is its address).
    fn on_open(&mut self, _conn: ConnId, _peer: &str, _out: &mut Out<'_>) {}
    /// One frame from `conn`, borrowed from shared memory. `redelivered` is true if a previous
    /// worker may have seen it before it died.
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], redelivered: bool, out: &mut Out<'_>);
    /// The connection closed; further sends to it are dropped by the front.
    fn on_close(&mut self, _conn: ConnId, _reason: CloseReason, _out: &mut Out<'_>) {}
    /// A `websocket` client completed its handshake: what it asked for (path, the
    /// subprotocol the front selected, its `Authorization` and `Cookie` headers), to
    /// authorise it (close it with [`Out::close_with`] to refuse). By default
    /// [`on_open`](Handler::on_open).
    fn on_upgrade(&mut self, conn: ConnId, peer: &str, _upgrade: &Upgrade<'_>, out: &mut Out<'_>) {
        self.on_open(conn, peer, out)
    }
    /// One whole message from `conn` and its kind (`websocket`: text or binary as the client
    /// sent it; other codecs: always [`MessageKind::Binary`]). By default
    /// [`on_frame`](Handler::on_frame), whose replies with [`Out::send`] keep the kind.
    fn on_message(
        &mut self,
        conn: ConnId,
        message: &[u8],
        _kind: MessageKind,
        redelivered: bool,
        out: &mut Out<'_>,
    ) {
        self.on_frame(conn, message, redelivered, out)
    }
}

/// Writes replies into the reply rings, in place.
pub struct Out<'w> {
    reps: &'w mut [Option<Tx>],
    codec: Codec,
    /// Request position being answered; carried in reply records (aux).
    answering: u64,
    /// The connection whose frame is being handled, if any.
    answering_conn: Option<ConnId>,
    /// The kind of the message being handled (what [`Out::send`] answers with).
    answering_kind: MessageKind,
    /// The first send to `answering_conn` that failed, and whether part of a split reply
    /// was already in the ring when it failed.
    failure: Option<(SendError, bool)>,
    max_reply: usize,
}

/// The largest reply message [`Out::send`] accepts by default (see
/// [`Worker::set_max_reply`]). Longer than a ring record is fine: it is split over records.
pub const DEFAULT_MAX_REPLY: usize = 256 << 20;

impl Out<'_> {
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
    pub fn send(&mut self, conn: ConnId, payload: &[u8]) -> Result<(), SendError> {
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
    fn default_kind(&self, conn: ConnId) -> MessageKind {
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
        self.check_len(payload.len())?;
        let max = self.ring(conn)?.max_payload();
        if payload.len() <= max {
            return self.try_send_with(conn, kind, payload.len(), |b| b.copy_from_slice(payload));
        }
        self.send_split(conn, kind, payload)
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
        let rep = self.ring(conn)?;
        if len > rep.max_payload() {
            let mut buf = vec![0u8; len];
            fill(&mut buf);
            return self.send_split(conn, kind, &buf);
        }
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

    fn check_len(&self, len: usize) -> Result<(), SendError> {
        let mut max = self.max_reply;
        if self.codec == Codec::LengthPrefixed {
            max = max.min(u32::MAX as usize);
        }
        if len > max {
            return Err(SendError::TooLarge { len, max });
        }
        Ok(())
    }

    /// A reply longer than one record: consecutive SEND records, all but the last flagged
    /// MORE, the first led by the whole length (see the protocol module).
    fn send_split(
        &mut self,
        conn: ConnId,
        kind: MessageKind,
        payload: &[u8],
    ) -> Result<(), SendError> {
        self.check_len(payload.len())?;
        let aux = self.answering;
        let rep = self.ring(conn)?;
        let piece = rep.max_payload() - SPLIT_HEADER;
        let mut at = 0;
        while at < payload.len() {
            let lead = if at == 0 { SPLIT_HEADER } else { 0 };
            let n = piece.min(payload.len() - at);
            let last = at + n == payload.len();
            let mut grant = match reserve_blocking(rep, lead + n) {
                Ok(g) => g,
                // Part of the message is in the ring already: the front must close.
                Err(_) if at > 0 => {
                    return Err(SendError::Partial {
                        sent: at,
                        len: payload.len(),
                    })
                }
                Err(e) => return Err(e),
            };
            if lead > 0 {
                grant[..lead].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            }
            grant[lead..lead + n].copy_from_slice(&payload[at..at + n]);
            let flags = if last { 0 } else { flags::MORE } | kind_flag(kind);
            grant.commit(
                lead + n,
                Meta::tag(tag::SEND).conn(conn.raw()).aux(aux).flags(flags),
            );
            at += n;
        }
        Ok(())
    }

    /// Remembers the first failed send to the connection whose frame is being handled.
    fn note(&mut self, conn: ConnId, r: Result<(), SendError>) -> Result<(), SendError> {
        if let Err(e) = &r {
            if self.answering_conn == Some(conn) && self.failure.is_none() {
                self.failure = Some((*e, matches!(e, SendError::Partial { .. })));
            }
        }
        r
    }

    /// After a handler returned for a frame of `conn`: if a reply to it failed, answer it with
    /// the codec's error reply, or close the connection if part of a reply went out.
    fn settle(&mut self, conn: ConnId) {
        self.answering_conn = None;
        let Some((e, partial)) = self.failure.take() else {
            return;
        };
        if !partial {
            let body = self.codec.error_body(&format!("reply failed: {e}"));
            if self.try_send(conn, MessageKind::Text, &body).is_ok() {
                return;
            }
        }
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
        self.reps
            .get_mut(f)
            .and_then(Option::as_mut)
            .ok_or(SendError::UnknownFront(f))
    }

    fn publish(&mut self) {
        for rep in self.reps.iter_mut().flatten() {
            rep.publish();
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

fn reserve_blocking(
    rep: &mut Tx,
    len: usize,
) -> Result<shm_ring::WriteGrant<'_, Arc<ShmRing>>, SendError> {
    let fail = |e| match e {
        ReserveError::TooLarge { len, max } => SendError::TooLarge { len, max },
        _ => SendError::Corrupt,
    };
    while !rep.has_space(len).map_err(fail)? {
        if stop_requested() {
            return Err(SendError::Stopping);
        }
        rep.wait_for_space(len, Some(PARK_TIMEOUT)).map_err(fail)?;
    }
    rep.reserve(len).map_err(fail)
}

/// A worker attached to its rings: one request ring and one reply ring per front.
pub struct Worker {
    index: usize,
    reqs: Vec<Option<Rx>>,
    reps: Vec<Option<Tx>>,
    /// Records published before attach, per front: below this position they are flagged as
    /// redelivered.
    redeliver_below: Vec<u64>,
    /// Per front: frames ending at or below this request position were answered by the
    /// previous worker and are skipped.
    answered: Vec<u64>,
    /// Per front: frames ending at these request positions were dead-lettered by the
    /// supervisor (a previous worker crashed on them) and are skipped; 0 is none.
    dead_letters: Vec<[u64; 2]>,
    /// Per front: the connections this worker saw opened and not closed, so that a front's
    /// death can be reported as a CLOSE for each of them.
    open: Vec<std::collections::HashSet<ConnId>>,
    doorbell: Arc<EventFd>,
    codec: Codec,
    max_reply: usize,
}

impl Worker {
    /// Attaches to the rings described by the environment the supervisor set (see
    /// [`protocol::env`](crate::protocol::env)) and installs the SIGTERM/SIGINT handler that
    /// makes [`run`](Worker::run) return.
    ///
    /// # Errors
    ///
    /// [`WorkerError::Env`] when not started by shmrelay, [`WorkerError::Attach`] when a ring
    /// cannot be attached.
    pub fn from_env() -> Result<Worker, WorkerError> {
        let index = parse_env::<usize>(env::WORKER_INDEX)?;
        let doorbell_fd = parse_env::<RawFd>(env::DOORBELL_FD)?;
        let channels = std::env::var(env::CHANNELS).map_err(|e| env_error(env::CHANNELS, e))?;
        let restarted = std::env::var(env::RESTARTS)
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
            > 0;
        // SAFETY: the supervisor passes this fd number as an inherited eventfd owned by us.
        let doorbell = Arc::new(EventFd::from_owned(unsafe {
            inherited_fd(doorbell_fd).map_err(|e| env_error(env::DOORBELL_FD, e))?
        }));
        let codec = match std::env::var(env::CODEC) {
            Ok(v) => v
                .parse()
                .map_err(|e: crate::codec::UnknownCodec| env_error(env::CODEC, e))?,
            Err(_) => Codec::default(),
        };
        let mut worker = Worker::new(index, doorbell, codec);
        let channels = Channel::parse_list(&channels).map_err(|e| env_error(env::CHANNELS, e))?;
        for channel in channels {
            // SAFETY: inherited fds named by the supervisor for this process alone.
            let (req_fd, rep_fd, front_bell) =
                unsafe { channel.take_fds() }.map_err(|e| env_error(env::CHANNELS, e))?;
            worker.attach(
                channel.peer,
                req_fd,
                rep_fd,
                Arc::new(EventFd::from_owned(front_bell)),
                restarted,
            )?;
        }
        install_stop_handler();
        Ok(worker)
    }

    /// A worker with no rings yet, for tests and custom launchers: add them with
    /// [`attach`](Worker::attach). (Does not install the stop handler.)
    pub fn new(index: usize, doorbell: Arc<EventFd>, codec: Codec) -> Worker {
        Worker {
            codec,
            max_reply: DEFAULT_MAX_REPLY,
            index,
            reqs: Vec::new(),
            reps: Vec::new(),
            redeliver_below: Vec::new(),
            answered: Vec::new(),
            dead_letters: Vec::new(),
            open: Vec::new(),
            doorbell,
        }
    }

    /// Attaches to one front's pair of rings (for tests and custom launchers).
    ///
    /// # Errors
    ///
    /// [`WorkerError::Attach`].
    pub fn attach(
        &mut self,
        front: usize,
        req: OwnedFd,
        rep: OwnedFd,
        front_doorbell: Arc<EventFd>,
        restarted: bool,
    ) -> Result<(), WorkerError> {
        let attach_err = |source| WorkerError::Attach { front, source };
        let timeout = Duration::from_secs(5);
        // Request data read-only: this process only consumes it (header page writable).
        let req = Arc::new(ShmRing::open_fd_reader(req, timeout).map_err(attach_err)?);
        let rep = Arc::new(ShmRing::open_fd(rep, timeout).map_err(attach_err)?);
        let mut rx = Consumer::new(req).map_err(attach_err)?;
        let mut tx = Producer::new(rep).map_err(attach_err)?;
        // The front parks in epoll on its eventfd; wake it there.
        rx.set_doorbell(Doorbell::EventFd(front_doorbell.clone()));
        tx.set_doorbell(Doorbell::EventFd(front_doorbell));
        let corrupt = |e: shm_ring::CorruptError| WorkerError::Corrupt {
            front,
            detail: e.to_string(),
        };
        let (below, answered, dead) = if restarted {
            rx.is_empty().map_err(corrupt)?;
            // Every value below decides which frames are skipped, and comes from memory a
            // previous worker could write: one beyond the front's published tail is a lie (or
            // corruption) and is ignored, so a frame the front published is never skipped
            // because of it (at worst an answered frame is delivered again).
            let tail = rx.seen_tail();
            let bounded = |v: u64| if v <= tail { v } else { 0 };
            let words = rx.storage().user_words();
            // Producer::new loaded the reply ring's head with Acquire, and the front stores the
            // answered word before it releases reply records (Release): so every answer is
            // either covered by the word or still readable in the reply ring.
            let mut answered = bounded(words[ANSWERED_WORD].load(Ordering::Acquire));
            // Relaxed: the supervisor wrote these before it started this process.
            let dead = DEAD_LETTER_WORDS.map(|i| bounded(words[i].load(Ordering::Relaxed)));
            for rec in tx.unreleased().map_err(corrupt)? {
                let rec = rec.map_err(corrupt)?;
                if rec.tag() == tag::SEND {
                    answered = answered.max(bounded(rec.aux()));
                }
            }
            (rx.seen_tail(), answered, dead)
        } else {
            (0, 0, [0; 2])
        };
        if self.reqs.len() <= front {
            self.reqs.resize_with(front + 1, || None);
            self.reps.resize_with(front + 1, || None);
            self.redeliver_below.resize(front + 1, 0);
            self.answered.resize(front + 1, 0);
            self.dead_letters.resize(front + 1, [0; 2]);
            self.open.resize_with(front + 1, Default::default);
        }
        self.reqs[front] = Some(rx);
        self.reps[front] = Some(tx);
        self.redeliver_below[front] = below;
        self.answered[front] = answered;
        self.dead_letters[front] = dead;
        Ok(())
    }

    /// This worker's index (global across the relay's listeners).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The codec of this worker's listener (from `SHMRELAY_CODEC`): how frames arrive and how
    /// [`Out::send`] encodes replies.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Sets the codec (for tests and custom launchers).
    pub fn set_codec(&mut self, codec: Codec) {
        self.codec = codec;
    }

    /// The largest reply message [`Out::send`] accepts (default [`DEFAULT_MAX_REPLY`]);
    /// a longer one fails with [`SendError::TooLarge`] and the frame is answered with the
    /// codec's error reply.
    pub fn set_max_reply(&mut self, max: usize) {
        self.max_reply = max;
    }

    /// The eventfd fronts ring when there is work: poll it from your own event loop, between
    /// [`prepare_wait`](Worker::prepare_wait) and [`finish_wait`](Worker::finish_wait), then
    /// call [`poll_once`](Worker::poll_once).
    pub fn doorbell(&self) -> &EventFd {
        &self.doorbell
    }

    /// Runs `f` with an [`Out`] outside any frame, for programs with their own event loop
    /// that push to connections because of something else than a frame (a message from
    /// another process, a timer); what `f` queued is published when it returns.
    ///
    /// ```no_run
    /// # use shmrelay_worker::{ConnId, Worker};
    /// # fn main() -> Result<(), shmrelay_worker::WorkerError> {
    /// let mut worker = Worker::from_env()?;
    /// let conn = ConnId::new(0, 1, 7); // remembered from an earlier on_open
    /// let pushed = worker.with_out(|out| out.send(conn, b"tick"));
    /// # let _ = pushed;
    /// # Ok(()) }
    /// ```
    pub fn with_out<R>(&mut self, f: impl FnOnce(&mut Out<'_>) -> R) -> R {
        let mut out = Out {
            codec: self.codec,
            reps: &mut self.reps,
            answering: 0,
            answering_conn: None,
            answering_kind: MessageKind::Binary,
            failure: None,
            max_reply: self.max_reply,
        };
        let r = f(&mut out);
        out.publish();
        r
    }

    /// The user words of the request ring from front 0 named by
    /// [`CLUSTER_WORDS`](crate::protocol::CLUSTER_WORDS), in that order, where a cluster
    /// worker publishes its state for operators (`None` before a ring from front 0 is
    /// attached). Only this worker writes them; the relay only copies them for display.
    pub fn cluster_words(&self) -> Option<[&std::sync::atomic::AtomicU64; 6]> {
        let rx = self.reqs.first()?.as_ref()?;
        let words = rx.storage().user_words();
        Some(crate::protocol::CLUSTER_WORDS.map(|i| &words[i]))
    }

    /// Serves events until SIGTERM or SIGINT.
    ///
    /// # Errors
    ///
    /// [`WorkerError::Corrupt`] if a front corrupted a request ring.
    pub fn run<H: Handler>(&mut self, handler: &mut H) -> Result<(), WorkerError> {
        while !stop_requested() {
            if self.poll_once(handler)? == 0 {
                self.park()?;
            }
        }
        for rep in self.reps.iter_mut().flatten() {
            rep.publish();
        }
        Ok(())
    }

    /// Handles what is waiting in every request ring, without blocking; returns the number of
    /// records handled. Replies are published and requests released after each batch, so a
    /// crash never loses a request whose reply was not published.
    ///
    /// # Errors
    ///
    /// [`WorkerError::Corrupt`] if a front corrupted a request ring.
    pub fn poll_once<H: Handler>(&mut self, handler: &mut H) -> Result<usize, WorkerError> {
        let mut total = 0;
        for front in 0..self.reqs.len() {
            let Some(rx) = self.reqs[front].as_mut() else {
                continue;
            };
            let corrupt = |detail: String| WorkerError::Corrupt { front, detail };
            let below = self.redeliver_below[front];
            let answered = self.answered[front];
            let dead = self.dead_letters[front];
            // The ring's user words outlive this borrow of `rx` by the record iterator.
            let ring = rx.storage().clone();
            let inflight = &ring.user_words()[INFLIGHT_WORD];
            let open = &mut self.open[front];
            let codec = self.codec;
            let mut out = Out {
                codec,
                reps: &mut self.reps,
                answering: 0,
                answering_conn: None,
                answering_kind: MessageKind::Binary,
                failure: None,
                max_reply: self.max_reply,
            };
            let mut end = None;
            let mut n = 0;
            let (mut redelivered_frames, mut skipped) = (0u64, 0u64);
            for rec in rx
                .records()
                .map_err(|e| corrupt(e.to_string()))?
                .take(BATCH)
            {
                let rec = rec.map_err(|e| corrupt(e.to_string()))?;
                let conn = ConnId::from_raw(rec.conn());
                let redelivered = rec.position() < below || rec.flags() & flags::REDELIVERED != 0;
                match rec.tag() {
                    tag::OPEN => {
                        open.insert(conn);
                        match Upgrade::decode_open(rec.payload()) {
                            (peer, Some(up)) if codec == Codec::WebSocket => {
                                handler.on_upgrade(conn, &peer, &up, &mut out)
                            }
                            (peer, _) => handler.on_open(conn, &peer, &mut out),
                        }
                    }
                    tag::DATA => {
                        let base = rec.payload_position();
                        let mut frames = codec.frames(rec.payload());
                        while let Some(frame) = frames.next() {
                            let (end, payload) = frame.map_err(|e| corrupt(e.to_string()))?;
                            out.answering = base + end as u64;
                            if out.answering <= answered || dead.contains(&out.answering) {
                                skipped += 1;
                                continue; // answered by the previous worker, or dead-lettered
                            }
                            // Which frame this process is in, should it die in it (read by
                            // the supervisor only after this process is gone).
                            inflight.store(out.answering, Ordering::Relaxed);
                            redelivered_frames += redelivered as u64;
                            out.answering_conn = Some(conn);
                            out.answering_kind = frames.kind();
                            handler.on_message(conn, payload, frames.kind(), redelivered, &mut out);
                            out.settle(conn);
                        }
                        out.answering = 0;
                    }
                    tag::CLOSE => {
                        open.remove(&conn);
                        handler.on_close(conn, CloseReason::from_code(rec.aux()), &mut out);
                        // The acknowledgement: everything this worker had for the connection
                        // is before it in the reply ring. The front closes a half-closed
                        // connection on it (and ignores it for one already gone).
                        let _ = out.close(conn);
                    }
                    tag::FRONT_RESET => {
                        for conn in std::mem::take(open) {
                            handler.on_close(conn, CloseReason::FrontGone, &mut out);
                        }
                    }
                    other => return Err(corrupt(format!("unknown record tag {other}"))),
                }
                end = Some(rec.end());
                n += 1;
            }
            // Replies first, then the release: a request is only given up once its answer is
            // visible to the front.
            out.publish();
            if redelivered_frames + skipped > 0 {
                // This worker is the only writer of these words; they outlive it for `relayctl`.
                let words = rx.storage().user_words();
                for (i, n) in [
                    (REDELIVERED_WORD, redelivered_frames),
                    (SKIPPED_WORD, skipped),
                ] {
                    words[i].store(words[i].load(Ordering::Relaxed) + n, Ordering::Relaxed);
                }
            }
            if let Some(end) = end {
                rx.release(end);
            }
            total += n;
        }
        Ok(total)
    }

    /// Waits for work as [`run`](Worker::run) does between batches: spins briefly, then
    /// sleeps on the doorbell until a front publishes (or 100 ms pass, so that the caller
    /// re-checks [`stop_requested`]). For a loop of one's own around
    /// [`poll_once`](Worker::poll_once) that must do something around the wait (the Python
    /// package releases the GIL for it, and holds it across a batch); a program with an event
    /// loop of its own sleeps in that loop instead, between
    /// [`prepare_wait`](Worker::prepare_wait) and [`finish_wait`](Worker::finish_wait).
    ///
    /// ```no_run
    /// # use shmrelay_worker::{ConnId, Handler, Out, Worker};
    /// # struct Echo;
    /// # impl Handler for Echo {
    /// #     fn on_frame(&mut self, c: ConnId, f: &[u8], _: bool, out: &mut Out<'_>) { let _ = out.send(c, f); }
    /// # }
    /// # fn main() -> Result<(), shmrelay_worker::WorkerError> {
    /// let mut worker = Worker::from_env()?;
    /// while !shmrelay_worker::stop_requested() {
    ///     if worker.poll_once(&mut Echo)? == 0 {
    ///         worker.park()?; // what `run` does
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`WorkerError::Corrupt`] if a request ring's header is corrupt.
    pub fn park(&mut self) -> Result<(), WorkerError> {
        // A few microseconds, as in shm-ring's own `wait`, before paying for a park.
        for _ in 0..256 {
            if self.reqs.iter().flatten().any(Consumer::has_new) {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        if self.prepare_wait()? {
            // Drains the doorbell when woken.
            self.doorbell.wait(Some(PARK_TIMEOUT));
        }
        self.awake();
        Ok(())
    }

    /// Takes back the "about to sleep" flag from every front.
    fn awake(&mut self) {
        for rx in self.reqs.iter_mut().flatten() {
            rx.finish_park();
        }
    }

    /// For a program with its own event loop, before it sleeps on [`doorbell`](Worker::doorbell):
    /// tells every front this worker is about to sleep, so that the next frame rings the
    /// doorbell (fronts ring only a worker that said so: a busy worker costs them no
    /// syscalls). Returns false if frames are already waiting: don't sleep, call
    /// [`poll_once`](Worker::poll_once). Either way, call [`finish_wait`](Worker::finish_wait)
    /// once awake (or at once, on false), before the next `poll_once`.
    ///
    /// ```no_run
    /// # use shmrelay_worker::{ConnId, Handler, Out, Worker};
    /// # struct Echo;
    /// # impl Handler for Echo {
    /// #     fn on_frame(&mut self, c: ConnId, f: &[u8], _: bool, out: &mut Out<'_>) { let _ = out.send(c, f); }
    /// # }
    /// # fn main() -> Result<(), shmrelay_worker::WorkerError> {
    /// let mut worker = Worker::from_env()?;
    /// while !shmrelay_worker::stop_requested() {
    ///     if worker.poll_once(&mut Echo)? > 0 {
    ///         continue;
    ///     }
    ///     if worker.prepare_wait()? {
    ///         // poll()/epoll_wait() on worker.doorbell() and the program's other fds here.
    ///     }
    ///     worker.finish_wait();
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`WorkerError::Corrupt`] if a request ring's header is corrupt.
    pub fn prepare_wait(&mut self) -> Result<bool, WorkerError> {
        let mut sleep = true;
        for (front, rx) in self.reqs.iter_mut().enumerate() {
            if let Some(rx) = rx {
                sleep &= rx.prepare_park().map_err(|e| WorkerError::Corrupt {
                    front,
                    detail: e.to_string(),
                })?;
            }
        }
        Ok(sleep)
    }

    /// After [`prepare_wait`](Worker::prepare_wait), once awake: takes back the "about to
    /// sleep" flag from every front and resets the doorbell (so a poller does not see it
    /// readable again for a wake already acted on).
    pub fn finish_wait(&mut self) {
        self.doorbell.drain();
        self.awake();
    }
}

fn parse_env<T: std::str::FromStr>(var: &'static str) -> Result<T, WorkerError> {
    let v = std::env::var(var).map_err(|e| env_error(var, e))?;
    v.parse()
        .map_err(|_| env_error(var, format_args!("cannot parse {v:?}")))
}

/// A [`WorkerError::Env`] about `var`.
fn env_error(var: &'static str, problem: impl std::fmt::Display) -> WorkerError {
    WorkerError::Env {
        var,
        problem: problem.to_string(),
    }
}

/// Set by SIGTERM and SIGINT (once [`Worker::from_env`] installed the handlers).
static STOP: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

/// True once SIGTERM or SIGINT arrived.
pub fn stop_requested() -> bool {
    // Relaxed: the flag carries no data; the loop only needs to see it eventually.
    STOP.load(Ordering::Relaxed)
}

/// SIGTERM and SIGINT set [`STOP`] (signal-hook, as in the relay: the handler only stores
/// to the flag, which is async-signal-safe). Registered once per process.
fn install_stop_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            // Fails only for a forbidden signal number, which these are not.
            let _ = signal_hook::flag::register(sig, Arc::clone(&STOP));
        }
    });
}
