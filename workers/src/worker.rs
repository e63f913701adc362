//! The worker side of the relay: attach to the rings handed over by the supervisor and serve
//! OPEN / frame / CLOSE events with payloads borrowed in place.

use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use shm_ring::{Consumer, Doorbell, EventFd, Producer, ShmRing};

use crate::codec::websocket::Upgrade;
use crate::codec::{Codec, MessageKind};
use crate::protocol::{
    env, flags, inherited_fd, tag, Channel, CloseReason, ConnId, ANSWERED_WORD, DEAD_LETTER_WORDS,
    INFLIGHT_WORD, REDELIVERED_WORD, SKIPPED_WORD,
};

mod out;

use out::Tx;
pub use out::{Out, Reservation, SendError, DEFAULT_MAX_REPLY};

type Rx = Consumer<Arc<ShmRing>>;

/// How long a blocked worker sleeps before re-checking its stop flag.
const PARK_TIMEOUT: Duration = Duration::from_millis(100);
/// Records handled before replies are published and requests released.
const BATCH: usize = 256;
/// Request-ring checks `park` spins through before it sleeps (all rings together).
const SPIN_CHECKS: usize = 256;

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
        let mut out = Out::new(&mut self.reps, self.codec, self.max_reply);
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
            // Nothing published since the last look and nothing seen left unreleased (a batch
            // cut at BATCH, or what a restarted worker found at attach): skip the ring before
            // paying for its reply handle (with 56 fronts most rings are empty at every wake).
            if rx.is_idle() {
                continue;
            }
            let corrupt = |detail: String| WorkerError::Corrupt { front, detail };
            let below = self.redeliver_below[front];
            let answered = self.answered[front];
            let dead = self.dead_letters[front];
            // The ring's user words outlive this borrow of `rx` by the record iterator.
            let ring = rx.storage().clone();
            let inflight = &ring.user_words()[INFLIGHT_WORD];
            let open = &mut self.open[front];
            let codec = self.codec;
            let mut out = Out::new(&mut self.reps, codec, self.max_reply);
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
        // A few microseconds, as in shm-ring's own `wait`, before paying for a park: a budget
        // of ring checks, not of rounds over every ring, so that the spin costs as much with 56
        // fronts as with one (256 rounds over 56 rings were ~14,000 loads of shared lines per
        // park: issue 15).
        let rounds = (SPIN_CHECKS / self.reqs.len().max(1)).max(1);
        for _ in 0..rounds {
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
