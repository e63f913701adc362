//! The front: one process, one mio event loop, many sockets.
//!
//! Reading: a readable connection gets space reserved in its worker's request ring and the
//! socket is read straight into it; the whole frames of that read are committed as one DATA
//! record. Only the partial frame at the end of a read is copied (to the connection's small
//! carry buffer, and back in front of the next read), and counted as copied.
//!
//! Writing: reply records are written to their sockets with `writev` straight from the reply
//! ring, consecutive records of one connection in one call. Only what a socket does not take
//! at once is copied to the connection's bounded out queue (and counted); past the bound the
//! client is disconnected as a slow consumer, so it never stalls anybody else.
//!
//! Backpressure: when a request ring is full, the connections routed to it are not read (TCP
//! pushes back on their clients) until the worker releases space; when every ring is full the
//! front also stops accepting (if configured).
//!
//! Liveness: a timing wheel visits each connection only at its own deadline, to ping it when
//! idle and to close it when nothing arrived within its heartbeat timeout.
//!
//! Key routing: on a `resp` listener with several workers, frames are spread over the pool by
//! key and replies put back in request order (see `route.rs`).

mod admission;
mod conn;
pub mod generation;
mod liveness;
mod reply;
mod route;
mod scope;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, IoSlice, Write};
use std::net::Shutdown;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use shm_ring::{Consumer, Doorbell, EventFd, Meta, Producer, ReserveError, ShmRing};
use shmrelay_worker::codec::ProtocolError;
use shmrelay_worker::protocol::{tag, ANSWERED_WORD, FRAME_HEADER};
use shmrelay_worker::{CloseReason, Codec, ConnId};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::stats::{add, FrontStats, Stats, WorkerState};
use crate::timer::Wheel;
use admission::Admission;
use conn::{read_conn, send_to, Conn, ConnState, ReadResult, Slab, READ_CHUNK};
use liveness::{Liveness, Verdict, TICK_MS};
use route::{read_routed, Route, Scratch};
use scope::Scope;

/// Listener `l` has token `LISTENER_BASE - l`.
const LISTENER_BASE: usize = usize::MAX - 16;
/// Most listeners per relay.
pub const MAX_LISTENERS: usize = 64;
const DOORBELL: Token = Token(usize::MAX - 2);
/// The supervisor's control socket (ring generations, see generation.rs).
const CONTROL: Token = Token(usize::MAX - 3);
/// Reply records handled per ring per loop turn.
const REPLY_BATCH: usize = 1024;
/// Slices per writev.
const MAX_IOV: usize = 64;
/// Longest sleep of an idle loop (stop flag, worker checks).
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// Doorbell wakes in a row with no work before the doorbell is left unwatched for a moment.
const BELL_EMPTY_LIMIT: u32 = 16;
/// How long the doorbell is left unwatched after too many wakes with no work.
const BELL_PAUSE: Duration = Duration::from_millis(10);
/// How often the backlog is retried while accepting fails (EMFILE) and no connection closes.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// The error of a connection whose partial frame outlived `frame_timeout_ms`.
const FRAME_TIMEOUT: ProtocolError =
    ProtocolError::Invalid("frame not complete within frame_timeout_ms");
/// The error of a connection closed because the front's partial frames passed
/// `partial_budget` and it held the largest.
const OVER_BUDGET: ProtocolError =
    ProtocolError::Invalid("partial frame over the front's memory budget");
/// Shortest sleep for timers alone: how late a ping or timeout may fire on an idle front.
const TIMER_SLACK: Duration = Duration::from_millis(50);

/// Settings of one front process.
#[derive(Clone, Debug)]
pub struct FrontSettings {
    /// This front's index (the top byte of its connection ids).
    pub index: usize,
    /// The relay's settings.
    pub config: Config,
}

/// One worker's pair of rings, as handed over by the supervisor.
pub struct ChannelFds {
    /// Worker index.
    pub worker: usize,
    /// Request ring segment (front -> worker).
    pub req: OwnedFd,
    /// Reply ring segment (worker -> front).
    pub rep: OwnedFd,
    /// The worker's doorbell.
    pub worker_doorbell: Arc<EventFd>,
}

/// Why a front stopped.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// Setting up the event loop or the listener failed.
    #[error("front setup: {0}")]
    Io(#[from] io::Error),
    /// A ring could not be attached.
    #[error("attaching to the rings of worker {worker}: {source}")]
    Attach {
        worker: usize,
        source: shm_ring::AttachError,
    },
}

/// One listening socket of this front, its codec and the workers of its pool.
struct Listener {
    /// `None` once draining.
    sock: Option<TcpListener>,
    codec: Codec,
    /// Global worker indices.
    pool: Vec<usize>,
    /// Round-robin position in `pool`.
    next: usize,
    /// Frames are routed by key across the pool (`resp` with more than one worker).
    routed: bool,
}

/// A control record waiting for ring space (kept in order, ahead of any data).
struct Ctrl {
    tag: u16,
    conn: u64,
    aux: u64,
    payload: Vec<u8>,
}

struct Chan {
    req: Producer<Arc<ShmRing>>,
    rep: Consumer<Arc<ShmRing>>,
    backlog: VecDeque<Ctrl>,
    /// Connections not read because `req` was full: (slot, generation).
    blocked: Vec<(u32, u32)>,
    dirty: bool,
    broken: bool,
    /// The worker's doorbell.
    bell: Arc<EventFd>,
    /// Key routing: every reply to a request frame ending at or below this request-ring
    /// position has been read from the reply ring.
    completed: u64,
    /// Key routing: routed connections whose oldest request is on this worker, by that
    /// request's position: (position, slot, generation). Stale entries are skipped.
    waiting: BinaryHeap<Reverse<(u64, u32, u32)>>,
    /// The highest request position answered by a reply record read from this worker, each
    /// checked against what this front published: the front's own copy of the answered word.
    answered: u64,
    /// A long reply whose pieces are being read from `rep` (see reply.rs).
    split: Option<reply::Split>,
}

/// Runs a front until SIGTERM (then drains) and returns.
///
/// # Errors
///
/// Only setup errors; everything after setup is handled per connection.
pub fn run(
    settings: FrontSettings,
    listeners: Vec<std::net::TcpListener>,
    doorbell: Arc<EventFd>,
    channels: Vec<ChannelFds>,
    stats: Stats,
    ready: Option<OwnedFd>,
    control: Option<OwnedFd>,
) -> Result<(), FrontError> {
    crate::signals::install();
    let mut front = Front::new(settings, listeners, doorbell, channels, stats)?;
    if let Some(fd) = control {
        let sock = std::os::unix::net::UnixStream::from(fd);
        sock.set_nonblocking(true)?;
        front.poll.registry().register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&sock)),
            CONTROL,
            Interest::READABLE,
        )?;
        front.control = Some(sock);
    }
    if let Some(fd) = ready {
        // Tell the supervisor we are accepting; closing the pipe is the signal.
        let mut f = std::fs::File::from(fd);
        let _ = f.write_all(b"r");
    }
    front.run()
}

struct Front {
    index: usize,
    cfg: Config,
    poll: Poll,
    /// One per configured listener, in order.
    listeners: Vec<Listener>,
    /// The codec of each worker's listener (replies are validated with it).
    worker_codecs: Vec<Codec>,
    /// Workers of a key-routed pool (their replies are put in request order).
    routed_workers: Vec<bool>,
    scratch: Scratch,
    /// Not accepting because every request ring is full.
    paused: bool,
    doorbell: Arc<EventFd>,
    chans: Vec<Chan>,
    slab: Slab,
    ready: Vec<(u32, u32)>,
    stats: &'static Stats,
    fs: &'static FrontStats,
    admission: Admission,
    liveness: Liveness,
    wheel: Wheel,
    due: Vec<((u32, u32), u64)>,
    start_ns: u64,
    /// When `tick` last ran (CLOCK_MONOTONIC ns): a long gap means this process was late.
    last_tick_ns: u64,
    /// Current tick (TICK_MS each) since the front started.
    now: u64,
    open: u64,
    draining: u64,
    /// Open fds besides the connections' sockets: the fd self-check's baseline (0 until the
    /// first check takes it).
    base_fds: u64,
    last_checks: Instant,
    last_fd_check: Instant,
    /// Which connections each worker may write to.
    scope: Scope,
    /// Reply bytes queued in every connection's out queue (the sum of their `queued`), held
    /// under `pending_budget`.
    queued_total: usize,
    /// The reply pump's group of iovecs, kept across pumps for its allocations.
    reply_group: reply::Group,
    /// Bytes of partial-frame buffers (the sum of the connections' `partial`), held under
    /// `partial_budget`.
    partial_total: usize,
    /// `frame_timeout_ms` in ticks (0: never).
    frame_ticks: u32,
    /// Accepting failed (EMFILE, ENFILE, ...) with connections left in the backlog: since
    /// when, and whether a connection closed since (an fd came free).
    accept_stall: Option<Instant>,
    fd_freed: bool,
    accept_retrying: bool,
    /// Doorbell wakes in a row that found no work, and until when the doorbell is not
    /// watched after too many (a worker ringing it in a loop).
    bell_empty: u32,
    bell_off_until: Option<Instant>,
    bell_logged: bool,
    /// The supervisor's control socket (new ring generations for replaced workers).
    control: Option<std::os::unix::net::UnixStream>,
}

impl Front {
    fn new(
        s: FrontSettings,
        sockets: Vec<std::net::TcpListener>,
        doorbell: Arc<EventFd>,
        channels: Vec<ChannelFds>,
        stats: Stats,
    ) -> Result<Front, FrontError> {
        let poll = Poll::new()?;
        let specs = s.config.listeners();
        if specs.len() != sockets.len() || specs.len() > MAX_LISTENERS {
            return Err(FrontError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} listening sockets for {} configured listeners (at most {MAX_LISTENERS})",
                    sockets.len(),
                    specs.len()
                ),
            )));
        }
        let owner = s.config.worker_listeners();
        let mut listeners = Vec::new();
        for (l, (sock, spec)) in sockets.into_iter().zip(&specs).enumerate() {
            sock.set_nonblocking(true)?;
            let mut sock = TcpListener::from_std(sock);
            poll.registry()
                .register(&mut sock, Token(LISTENER_BASE - l), Interest::READABLE)?;
            let pool: Vec<usize> = (0..owner.len()).filter(|&w| owner[w] == l).collect();
            let routed = spec.codec() == Codec::Resp && pool.len() > 1;
            listeners.push(Listener {
                sock: Some(sock),
                codec: spec.codec(),
                pool,
                next: 0,
                routed,
            });
        }
        let worker_codecs = owner.iter().map(|&l| specs[l].codec()).collect();
        let routed_workers = owner.iter().map(|&l| listeners[l].routed).collect();
        poll.registry().register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&*doorbell)),
            DOORBELL,
            Interest::READABLE,
        )?;
        let mut chans = Vec::new();
        for ch in channels {
            let worker = ch.worker;
            let attach = |source| FrontError::Attach { worker, source };
            let t = Duration::from_secs(5);
            let req = Arc::new(ShmRing::open_fd(ch.req, t).map_err(attach)?);
            // Reply data read-only: the front only consumes it (header page writable).
            let rep = Arc::new(ShmRing::open_fd_reader(ch.rep, t).map_err(attach)?);
            let mut req = Producer::new(req).map_err(attach)?;
            let mut rep = Consumer::new(rep).map_err(attach)?;
            // Workers block on a futex or poll their eventfd: ring both.
            req.set_doorbell(Doorbell::Both(ch.worker_doorbell.clone()));
            rep.set_doorbell(Doorbell::Both(ch.worker_doorbell.clone()));
            // A previous front's answered word, if it is within what was published.
            let answered = req.storage().user_words()[ANSWERED_WORD].load(Ordering::Relaxed);
            let answered = if answered <= req.position() {
                answered
            } else {
                0
            };
            chans.push(Chan {
                answered,
                bell: ch.worker_doorbell,
                req,
                rep,
                backlog: VecDeque::new(),
                blocked: Vec::new(),
                dirty: false,
                broken: false,
                completed: 0,
                waiting: BinaryHeap::new(),
                split: None,
            });
        }
        // The stats block lives as long as the process; leaking the mapping gives the hot
        // path a plain reference.
        let stats: &'static Stats = Box::leak(Box::new(stats));
        let fs = stats.front(s.index);
        fs.pid.store(std::process::id(), Ordering::Relaxed);
        fs.conns_open.store(0, Ordering::Relaxed);
        fs.conns_draining.store(0, Ordering::Relaxed);
        fs.paused.store(0, Ordering::Relaxed);
        fs.quarantined.store(0, Ordering::Relaxed);
        let scope = Scope::new(&s.config);
        let s_frame_ticks = match s.config.frame_timeout_ms {
            0 => 0,
            ms => (ms / TICK_MS).clamp(1, u32::MAX as u64 / 4) as u32,
        };
        Ok(Front {
            index: s.index,
            admission: Admission::new(&s.config, s.index),
            liveness: Liveness::new(&s.config),
            cfg: s.config,
            poll,
            listeners,
            worker_codecs,
            routed_workers,
            scratch: Scratch::default(),
            paused: false,
            doorbell,
            chans,
            // Generations differ from any earlier incarnation of this front.
            slab: Slab::new((shm_ring::monotonic_ns() as u32) | 1),
            ready: Vec::new(),
            stats,
            fs,
            wheel: Wheel::new(4096, 0),
            due: Vec::new(),
            start_ns: shm_ring::monotonic_ns(),
            last_tick_ns: shm_ring::monotonic_ns(),
            now: 0,
            open: 0,
            draining: 0,
            base_fds: 0,
            last_checks: Instant::now(),
            last_fd_check: Instant::now(),
            scope,
            queued_total: 0,
            reply_group: reply::Group::default(),
            partial_total: 0,
            frame_ticks: s_frame_ticks,
            accept_stall: None,
            fd_freed: false,
            accept_retrying: false,
            bell_empty: 0,
            bell_off_until: None,
            bell_logged: false,
            control: None,
        })
    }

    fn tick(&mut self) {
        let ns = shm_ring::monotonic_ns();
        self.now = (ns - self.start_ns) / (TICK_MS * 1_000_000);
        let gap = ns.saturating_sub(self.last_tick_ns);
        self.last_tick_ns = ns;
        if let Some(ticks) = liveness::stall_ticks(gap) {
            // This process was stopped or starved: its clients could not be heard meanwhile,
            // so the time does not count against them.
            warn!(
                front = self.index,
                late_ms = gap / 1_000_000,
                "front loop was late: extending every connection's deadlines"
            );
            for c in self.slab.conns.iter_mut().flatten() {
                liveness::forgive(c, ticks);
            }
        }
        self.fs.active_ns.store(ns, Ordering::Relaxed);
    }

    fn run(&mut self) -> Result<(), FrontError> {
        info!(
            front = self.index,
            workers = self.chans.len(),
            "front running"
        );
        let mut events = Events::with_capacity(1024);
        let mut drain_deadline: Option<Instant> = None;
        loop {
            if crate::signals::stop_requested() && drain_deadline.is_none() {
                info!(front = self.index, conns = self.open, "draining");
                drain_deadline = Some(Instant::now() + Duration::from_millis(self.cfg.drain_ms));
                for l in &mut self.listeners {
                    if let Some(mut sock) = l.sock.take() {
                        let _ = self.poll.registry().deregister(&mut sock);
                    }
                }
                self.ready.clear();
            }
            self.tick();
            let mut busy = false;
            for w in 0..self.chans.len() {
                busy |= self.pump_replies(w) > 0;
                self.flush_backlog(w);
            }
            if let Some(deadline) = drain_deadline {
                if self.drained() || Instant::now() >= deadline {
                    break;
                }
            } else {
                self.unblock();
                self.read_ready();
                self.check_timers();
                self.pause_when_overloaded();
                if self.last_checks.elapsed() >= Duration::from_millis(100) {
                    self.last_checks = Instant::now();
                    self.check_workers();
                    self.check_splits();
                }
                if self.last_fd_check.elapsed() >= Duration::from_secs(5) {
                    self.last_fd_check = Instant::now();
                    self.check_fds();
                }
            }
            for ch in &mut self.chans {
                if ch.dirty {
                    ch.req.publish();
                    ch.dirty = false;
                }
            }
            let timeout = if busy || !self.ready.is_empty() {
                Some(Duration::ZERO)
            } else {
                self.prepare_park()
            };
            let timeout = self.doorbell_rearm(timeout);
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            // The events below happened after the sleep: stamp them with the time now, or a
            // frame that arrived would look up to a sleep older and time out early.
            self.tick();
            if timeout != Some(Duration::ZERO) {
                for ch in &mut self.chans {
                    ch.rep.finish_park();
                    ch.req.finish_park();
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    Token(t) if t <= LISTENER_BASE && t > LISTENER_BASE - MAX_LISTENERS => {
                        self.accept(LISTENER_BASE - t)
                    }
                    DOORBELL => self.doorbell_rang(),
                    CONTROL => self.control_ready(),
                    Token(t) => {
                        let slot = t as u32;
                        let Some(gen) = self.slab.gens.get(t).copied() else {
                            continue;
                        };
                        if ev.is_writable() {
                            self.flush_out(slot, gen);
                        }
                        if (ev.is_readable() || ev.is_read_closed() || ev.is_error())
                            && drain_deadline.is_none()
                        {
                            if let Some(c) = self.slab.get(slot, gen) {
                                c.hup |= ev.is_read_closed() || ev.is_error();
                                if !c.readable {
                                    c.readable = true;
                                    if c.wants_read() {
                                        self.ready.push((slot, gen));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        self.shutdown();
        Ok(())
    }

    /// True when every request was consumed, every reply written and every queue flushed.
    fn drained(&mut self) -> bool {
        for ch in &mut self.chans {
            if ch.broken {
                continue;
            }
            if !ch.backlog.is_empty()
                || !ch.req.is_drained().unwrap_or(true)
                || !ch.rep.is_empty().unwrap_or(true)
            {
                return false;
            }
        }
        self.slab.conns.iter().flatten().all(|c| c.flushed())
    }

    fn shutdown(&mut self) {
        let slots: Vec<u32> = (0..self.slab.conns.len() as u32)
            .filter(|&s| self.slab.conns[s as usize].is_some())
            .collect();
        for slot in slots {
            self.close_conn(slot, CloseReason::Shutdown);
        }
        for w in 0..self.chans.len() {
            self.flush_backlog(w);
            self.chans[w].req.publish();
        }
        info!(front = self.index, "front stopped");
    }

    /// Announces sleep on every ring this front waits on; returns the poll timeout.
    fn prepare_park(&mut self) -> Option<Duration> {
        // Key routing: a worker releases its requests just after it publishes their replies,
        // and a release alone wakes nobody. A release not yet seen is work now; one that may
        // come while asleep is seen within a millisecond.
        let mut routed_wait = false;
        for ch in &mut self.chans {
            if ch.broken || ch.waiting.is_empty() {
                continue;
            }
            if ch.req.released().is_ok_and(|p| p > ch.completed) {
                return Some(Duration::ZERO);
            }
            routed_wait = true;
        }
        for ch in &mut self.chans {
            if ch.broken {
                continue;
            }
            if !ch.rep.prepare_park().unwrap_or(false) {
                return Some(Duration::ZERO);
            }
            if !ch.blocked.is_empty() || !ch.backlog.is_empty() {
                let want = READ_CHUNK.min(ch.req.max_payload());
                if !ch.req.prepare_park_for_space(want).unwrap_or(false) {
                    return Some(Duration::ZERO);
                }
            }
        }
        if routed_wait {
            return Some(Duration::from_millis(1));
        }
        // Sleep until the next deadline, but never less than TIMER_SLACK: liveness deadlines
        // are seconds apart per connection yet spread over every tick across many connections,
        // and waking each tick for them costs more than the precision is worth. Network events
        // wake the loop anyway, and each wakeup processes whatever timers are due.
        let Some(next) = self.wheel.next_due() else {
            return Some(MAX_SLEEP);
        };
        let ms = next.saturating_sub(self.now) * TICK_MS;
        Some(Duration::from_millis(ms).clamp(TIMER_SLACK, MAX_SLEEP))
    }

    fn accept(&mut self, l: usize) {
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
                .filter(|&w| w < self.chans.len() && !self.chans[w].broken)
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
            liveness::configure_socket(
                &stream,
                self.liveness.timeout(self.liveness.interval(0)) as u64 * TICK_MS,
            );
            let lst = &mut self.listeners[l];
            let worker = workers[lst.next % workers.len()];
            lst.next = lst.next.wrapping_add(1);
            let codec = lst.codec;
            let mut conn = Conn::new(stream, worker, codec, addr_slot, now);
            if lst.routed {
                conn.route = Some(Box::new(Route::new(l)));
            }
            let (slot, gen) = self.slab.insert(conn);
            let first = self.liveness.first(codec, now);
            let at = self.wheel.schedule((slot, gen), first);
            let c = self.slab.conns[slot as usize]
                .as_mut()
                .expect("just inserted");
            c.timer_at = at;
            if let Err(e) = self.poll.registry().register(
                &mut c.stream,
                Token(slot as usize),
                Interest::READABLE,
            ) {
                warn!("register: {e}");
                self.slab.remove(slot);
                self.admission.release(self.stats, addr_slot);
                continue;
            }
            let id = ConnId::new(self.index as u8, gen, slot);
            // A routed connection may send frames to any worker of the pool: each hears of it
            // (and of its close), so none keeps state for a connection it was never told of.
            let told = if self.listeners[l].routed {
                workers.clone()
            } else {
                vec![worker]
            };
            for &w in &told {
                self.chans[w].backlog.push_back(Ctrl {
                    tag: tag::OPEN,
                    conn: id.raw(),
                    aux: 0,
                    payload: peer.to_string().into_bytes(),
                });
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
    fn pause_when_overloaded(&mut self) {
        if !self.cfg.pause_accept_when_overloaded {
            return;
        }
        // With no usable worker at all there is nothing to wait for: accepting goes on, and
        // each new client is refused at once with an error (`no_worker`), never left in the
        // backlog.
        let usable = self.chans.iter().any(|c| !c.broken);
        let overloaded = usable && self.chans.iter().all(|c| c.broken || !c.blocked.is_empty());
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

    /// Writes queued control records while there is space; true if the backlog is empty.
    /// An OPEN written moves its connection from Accepted to Open.
    fn flush_backlog(&mut self, w: usize) -> bool {
        let ch = &mut self.chans[w];
        while let Some(ctrl) = ch.backlog.front() {
            if ch.broken {
                ch.backlog.clear();
                break;
            }
            match ch.req.push(
                Meta::tag(ctrl.tag).conn(ctrl.conn).aux(ctrl.aux),
                &ctrl.payload,
            ) {
                Ok(_) => {
                    let ctrl = ch.backlog.pop_front().expect("front exists");
                    ch.dirty = true;
                    if ctrl.tag == tag::OPEN {
                        let id = ConnId::from_raw(ctrl.conn);
                        if let Some(c) = self.slab.get(id.slot(), id.generation()) {
                            if c.state == ConnState::Accepted {
                                c.state = ConnState::Open;
                                if c.readable {
                                    self.ready.push((id.slot(), id.generation()));
                                }
                            }
                        }
                    }
                }
                Err(ReserveError::Full) => return false,
                Err(e) => {
                    error!(worker = w, "request ring: {e}");
                    ch.broken = true;
                }
            }
        }
        true
    }

    /// Moves connections blocked on a ring that has space again back to the ready list.
    fn unblock(&mut self) {
        for ch in &mut self.chans {
            if ch.blocked.is_empty() || !ch.backlog.is_empty() {
                continue;
            }
            let want = READ_CHUNK.min(ch.req.max_payload());
            if !ch.req.has_space(want).unwrap_or(false) {
                continue;
            }
            for (slot, gen) in ch.blocked.drain(..) {
                if let Some(c) = self.slab.get(slot, gen) {
                    c.blocked = false;
                    if c.wants_read() {
                        self.ready.push((slot, gen));
                    }
                }
            }
        }
    }

    fn read_ready(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        let now = self.now as u32;
        let max_frame = self.cfg.max_frame;
        let max_pending = self.cfg.max_pending;
        for (slot, gen) in ready.drain(..) {
            let Some(c) = self.slab.get(slot, gen) else {
                continue;
            };
            if !c.wants_read() {
                continue;
            }
            let id = ConnId::new(self.index as u8, gen, slot);
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
                    self.chans[w].waiting.push(Reverse((p, slot, gen)));
                }
                (routed.result, 0, routed.worker)
            } else {
                let w = c.worker;
                let ch = &mut self.chans[w];
                if ch.broken {
                    self.close_conn(slot, CloseReason::WorkerGone);
                    continue;
                }
                if !ch.backlog.is_empty() {
                    c.blocked = true;
                    ch.blocked.push((slot, gen));
                    continue;
                }
                let (result, heartbeats) = read_conn(ch, c, self.fs, id, max_frame, now);
                (result, heartbeats, w)
            };
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
                if let Err(reason) = self.send(slot, gen, &[IoSlice::new(zeros)]) {
                    self.close_conn(slot, reason);
                    continue;
                }
            }
            match result {
                ReadResult::Drained => {}
                ReadResult::Budget => self.ready.push((slot, gen)),
                ReadResult::Blocked => {
                    add(&self.fs.ring_full_stalls, 1);
                    if let Some(c) = self.slab.get(slot, gen) {
                        c.blocked = true;
                    }
                    self.chans[w].blocked.push((slot, gen));
                }
                ReadResult::Close(CloseReason::ClientEof) => self.client_eof(slot, gen),
                ReadResult::Close(reason) => self.close_conn(slot, reason),
                ReadResult::Protocol(e) => {
                    add(&self.fs.protocol_errors, 1);
                    let Some(c) = self.slab.get(slot, gen) else {
                        continue;
                    };
                    // Written by `close_conn`, after everything queued before it.
                    c.protocol_error = Some(Box::new(e));
                    if c.state == ConnState::Open {
                        // The whole frames before the bad input went to the worker(s): their
                        // replies come first, then the error reply (after the CLOSE acks).
                        self.close_after_worker(slot, gen, CloseReason::ProtocolError);
                    } else {
                        self.close_conn(slot, CloseReason::ProtocolError);
                    }
                }
                ReadResult::Corrupt(e) => {
                    self.quarantine(w, &e.to_string());
                }
                ReadResult::Unavailable => {
                    if let Some(c) = self.slab.get(slot, gen) {
                        // Best effort and non-blocking: the close follows either way.
                        let _ = (&c.stream).write(&c.codec.error_reply("worker unavailable"));
                    }
                    self.close_conn(slot, CloseReason::WorkerGone);
                }
            }
            self.account_partial(slot, gen);
        }
        // Keep the list's allocation for the next turn (it was taken, empty, each turn).
        if self.ready.is_empty() {
            self.ready = ready;
        }
    }

    /// The doorbell woke the loop. Workers ring it only when this front announced sleep and
    /// they published something; a worker that rings it in a loop (hostile or broken) would
    /// cost the front a core. So after BELL_EMPTY_LIMIT wakes in a row that found no work,
    /// the doorbell is not watched for BELL_PAUSE: the loop then sleeps at most that long and
    /// looks at its rings anyway, so a real reply waits at most BELL_PAUSE, never forever. The
    /// first wake after a pause that finds no work starts another pause at once.
    fn doorbell_rang(&mut self) {
        self.doorbell.drain();
        let work = self.chans.iter_mut().any(|ch| {
            !ch.broken
                && (!ch.rep.is_empty().unwrap_or(true)
                    || !ch.blocked.is_empty()
                    || !ch.backlog.is_empty())
        });
        if work {
            self.bell_empty = 0;
            return;
        }
        self.bell_empty = self.bell_empty.saturating_add(1);
        if self.bell_empty < BELL_EMPTY_LIMIT {
            return;
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.doorbell);
        if self.poll.registry().deregister(&mut SourceFd(&fd)).is_ok() {
            self.bell_off_until = Some(Instant::now() + BELL_PAUSE);
            add(&self.fs.doorbell_throttled, 1);
            if !std::mem::replace(&mut self.bell_logged, true) {
                warn!(
                    front = self.index,
                    "doorbell rung {} times in a row with no work: a worker rings it in a \
                     loop; watched again after a pause (counted in doorbell_throttled)",
                    self.bell_empty
                );
            }
            // One more empty wake after the pause starts the next one.
            self.bell_empty = BELL_EMPTY_LIMIT - 1;
        }
    }

    /// Watches the doorbell again once its pause is over; until then the loop sleeps no
    /// longer than the pause's end.
    fn doorbell_rearm(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let Some(until) = self.bell_off_until else {
            return timeout;
        };
        let now = Instant::now();
        if now >= until {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.doorbell);
            if self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), DOORBELL, Interest::READABLE)
                .is_ok()
            {
                self.bell_off_until = None;
            }
            // A ring that came while it was not watched: its count is still in the eventfd,
            // and registering it raises the event; the rings are looked at this turn anyway.
            return timeout;
        }
        let left = until - now;
        Some(timeout.map_or(left, |t| t.min(left)))
    }

    /// Accepting stopped at an error (EMFILE: out of fds): remembered so that the backlog is
    /// retried when an fd comes free, since no new edge comes for the connections in it.
    fn accept_stalled(&mut self, e: &io::Error) {
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
    fn retry_accept(&mut self) {
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

    /// Visits the connections whose deadline came: ping the idle, close the silent.
    fn check_timers(&mut self) {
        self.retry_accept();
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(self.now, &mut due);
        let now = self.now as u32;
        for ((slot, gen), at) in due.drain(..) {
            let Some(c) = self.slab.get(slot, gen) else {
                continue;
            };
            if c.timer_at != at {
                continue; // superseded entry
            }
            // A partial frame not complete within frame_timeout_ms (any codec).
            let partial_deadline = (self.frame_ticks > 0 && !c.carry.is_empty()).then(|| {
                (self.now + self.frame_ticks as u64)
                    .saturating_sub(now.wrapping_sub(c.partial_since) as u64)
            });
            if partial_deadline.is_some_and(|d| d <= self.now) && c.state == ConnState::Open {
                add(&self.fs.frame_timeouts, 1);
                debug!(slot, "frame not complete within frame_timeout_ms");
                self.fail_conn(slot, gen, FRAME_TIMEOUT);
                continue;
            }
            // A cheap kernel sample, once per check rather than per frame, and only where the
            // ping interval needs it: a client that beats on its own sets its own pace.
            if c.rtt_us == 0 || !c.client_beats {
                if let Some((rtt, _)) = liveness::tcp_info(&c.stream) {
                    c.rtt_us = rtt;
                    add(&self.fs.rtt_hist[liveness::rtt_bucket(rtt)], 1);
                }
            }
            let mut verdict = self.liveness.check(c, now, self.now);
            if matches!(verdict, Verdict::Close(CloseReason::HeartbeatTimeout))
                && (c.blocked || liveness::unread_bytes(&c.stream) > 0)
            {
                // Its bytes wait unread (its worker's ring is full, or its edge comes later in
                // this loop): the peer spoke, it is not silent.
                c.last_rx = now;
                verdict = self.liveness.check(c, now, self.now);
            }
            let next = match verdict {
                Verdict::Close(reason) => {
                    self.close_conn(slot, reason);
                    continue;
                }
                Verdict::Ping(next) => {
                    c.ping_outstanding = true;
                    c.ping_sent = now;
                    add(&self.fs.pings_sent, 1);
                    if let Err(reason) = self.send(slot, gen, &[IoSlice::new(&[0u8; FRAME_HEADER])])
                    {
                        self.close_conn(slot, reason);
                        continue;
                    }
                    next
                }
                Verdict::Wait(next) => next,
            };
            let next = partial_deadline.map_or(next, |d| next.min(d));
            let at = self.wheel.schedule((slot, gen), next);
            if let Some(c) = self.slab.get(slot, gen) {
                c.timer_at = at;
            }
        }
        self.due = due;
    }

    fn pump_replies(&mut self, w: usize) -> usize {
        let me = self.index;
        let codec = self.worker_codecs.get(w).copied().unwrap_or_default();
        let routed = self.routed_workers.get(w).copied().unwrap_or(false);
        let max_pending = self.cfg.max_pending;
        if self.chans[w].broken {
            return 0;
        }
        // Key routing: how far the worker had released its requests before the replies below
        // were read (see route.rs on when a request is answered in full).
        let released_before = if routed {
            match self.chans[w].req.released() {
                Ok(p) => Some(p),
                Err(e) => {
                    let e = e.to_string();
                    self.quarantine(w, &e);
                    return 0;
                }
            }
        } else {
            None
        };
        let ch = &mut self.chans[w];
        // A reply answers a request this front wrote: no position beyond what it committed.
        let answerable = ch.req.position();
        let mut todo: Vec<(u32, u32, Action)> = Vec::new();
        let mut n = 0;
        let mut corrupt = None;
        let mut out_of_scope = 0u64;
        {
            // Read before the records: a replacement attaching meanwhile can only make a split
            // it starts look older (closed at the next check), never an old one look current.
            let attach = reply::producer_attach(ch.rep.storage());
            let records = match ch.rep.records() {
                Ok(r) => r,
                Err(e) => {
                    let e = e.to_string();
                    self.quarantine(w, &e);
                    return 0;
                }
            };
            // Kept across pumps for its allocations.
            let mut group = std::mem::take(&mut self.reply_group);
            let mut answered = 0u64;
            let mut end = None;
            let slab = &mut self.slab;
            let fs = self.fs;
            let scope = &self.scope;
            let split = &mut ch.split;
            for rec in records.take(REPLY_BATCH) {
                let rec = match rec {
                    Ok(r) => r,
                    Err(e) => {
                        corrupt = Some(e.to_string());
                        break;
                    }
                };
                // A long reply in progress takes only its own next piece: anything else
                // means it broke off, and its connection, part of a frame written, closes.
                if let Some(sp) = split.as_ref() {
                    if rec.tag() != tag::SEND || rec.conn() != sp.conn || sp.attach != attach {
                        let broken = sp.conn;
                        *split = None;
                        close_broken(slab, fs, me, broken, &mut group, &mut todo);
                    }
                }
                match rec.tag() {
                    tag::SEND if rec.aux() > answerable => {
                        // It would make a replacement skip frames it was never shown.
                        corrupt = Some(format!(
                            "reply record at {} answers request position {}, beyond the {} this front wrote",
                            rec.position(),
                            rec.aux(),
                            answerable
                        ));
                        break;
                    }
                    tag::SEND | tag::CLOSE if !scope.allows(slab, me, w, rec.conn()) => {
                        // Another listener's connection (push_scope): dropped, counted below.
                        out_of_scope += 1;
                    }
                    tag::SEND => {
                        let conn = rec.conn();
                        if conn != group.conn || group.is_full() {
                            deliver(slab, fs, me, &mut group, &mut todo);
                            group.conn = conn;
                        }
                        let piece = reply::piece(codec, split, &rec, max_pending, attach, fs);
                        match piece {
                            reply::Piece::Invalid => {
                                corrupt = Some(format!(
                                    "reply record at {} has broken framing",
                                    rec.position()
                                ));
                                break;
                            }
                            reply::Piece::Broken(why) => {
                                debug!(front = me, worker = w, "reply broke off: {why}");
                                close_broken(slab, fs, me, conn, &mut group, &mut todo);
                            }
                            reply::Piece::Copy(bytes) if routed => {
                                if routed_reply(
                                    slab,
                                    fs,
                                    me,
                                    w,
                                    (conn, rec.aux()),
                                    &bytes,
                                    max_pending,
                                    &mut todo,
                                ) {
                                    group.push(reply::Piece::Copy(bytes));
                                }
                                // Otherwise held for its turn.
                            }
                            piece => group.push(piece),
                        }
                        answered = answered.max(rec.aux());
                    }
                    tag::CLOSE => {
                        deliver(slab, fs, me, &mut group, &mut todo);
                        let id = ConnId::from_raw(rec.conn());
                        if id.front() == me {
                            todo.push((id.slot(), id.generation(), Action::CloseAfterFlush(w)));
                        }
                    }
                    t => {
                        corrupt = Some(format!("reply record at {} has tag {t}", rec.position()));
                        break;
                    }
                }
                end = Some(rec.end());
                n += 1;
            }
            deliver(slab, fs, me, &mut group, &mut todo);
            group.clear();
            self.reply_group = group;
            if let Some(end) = end {
                // The answered word first, then the release (Release store of the head): a
                // replacement worker that sees the release sees the word (see the worker SDK).
                // Stored from the front's own copy: whatever a worker wrote into the word is
                // overwritten, never built upon.
                if answered > ch.answered {
                    ch.answered = answered;
                    ch.req.storage().user_words()[ANSWERED_WORD]
                        .store(ch.answered, Ordering::Relaxed);
                }
                ch.rep.release(end);
            }
            // Every reply published before the worker released up to `released_before` has
            // been read if this pass read the ring to its end. Reading the release again and
            // finding the ring still empty extends that to the newer release.
            if let (Some(before), None, true) = (released_before, &corrupt, n < REPLY_BATCH) {
                let mut upto = before;
                if let Ok(after) = ch.req.released() {
                    if ch.rep.is_empty().unwrap_or(false) {
                        upto = after;
                    }
                }
                if upto > ch.completed {
                    ch.completed = upto;
                    while let Some(&Reverse((p, slot, gen))) = ch.waiting.peek() {
                        if p > upto {
                            break;
                        }
                        ch.waiting.pop();
                        todo.push((slot, gen, Action::Advance));
                    }
                }
            }
        }
        for (slot, gen, action) in todo {
            match action {
                Action::Close(reason) => self.close_conn(slot, reason),
                Action::WantWrite => self.want_write(slot, gen),
                Action::CloseAfterFlush(from) => self.worker_closed(slot, gen, from),
                Action::Advance => self.advance(slot, gen),
            }
        }
        if out_of_scope > 0 {
            add(&self.fs.push_out_of_scope, out_of_scope);
            self.scope.note(self.index, w, out_of_scope);
        }
        if let Some(detail) = corrupt {
            self.quarantine(w, &detail);
        }
        // Slow-consumer bound, checked once per batch.
        n
    }

    /// A long reply whose worker was replaced before it finished (a crash mid-reply) will
    /// never be finished: its connection, part of a frame written, is closed instead of left
    /// waiting.
    fn check_splits(&mut self) {
        for w in 0..self.chans.len() {
            let ch = &mut self.chans[w];
            let Some(sp) = ch.split.as_ref() else {
                continue;
            };
            if ch.broken || reply::producer_attach(ch.rep.storage()) == sp.attach {
                continue;
            }
            let id = ConnId::from_raw(sp.conn);
            ch.split = None;
            if id.front() == self.index && self.slab.get(id.slot(), id.generation()).is_some() {
                debug!(
                    front = self.index,
                    worker = w,
                    "a long reply broke off: worker replaced"
                );
                add(&self.fs.protocol_errors, 1);
                self.close_conn(id.slot(), CloseReason::ProtocolError);
            }
        }
    }

    /// Writes to a connection, queueing what the socket does not take.
    fn send(&mut self, slot: u32, gen: u32, iov: &[IoSlice<'_>]) -> Result<(), CloseReason> {
        let Some(c) = self.slab.get(slot, gen) else {
            return Ok(());
        };
        send_to(c, iov, self.fs, self.cfg.max_pending)?;
        if c.pending() > 0 {
            self.want_write(slot, gen);
        }
        Ok(())
    }

    fn want_write(&mut self, slot: u32, gen: u32) {
        let max = self.cfg.max_pending;
        let Some(c) = self.slab.get(slot, gen) else {
            return;
        };
        if c.pending() > max {
            self.close_conn(slot, CloseReason::SlowConsumer);
            return;
        }
        // Every path that queues reply bytes ends here: count them in the front's total.
        let pending = c.pending();
        self.queued_total = self.queued_total - c.queued + pending;
        c.queued = pending;
        if self.queued_total > self.cfg.pending_budget {
            self.shed_queues();
            if self.slab.get(slot, gen).is_none() {
                return;
            }
        }
        self.publish_queued();
        let Some(c) = self.slab.get(slot, gen) else {
            return;
        };
        if !c.want_write {
            c.want_write = true;
            let _ = self.poll.registry().reregister(
                &mut c.stream,
                Token(slot as usize),
                Interest::READABLE | Interest::WRITABLE,
            );
        }
    }

    fn flush_out(&mut self, slot: u32, gen: u32) {
        let Some(c) = self.slab.get(slot, gen) else {
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
                Err(_) => {
                    self.close_conn(slot, CloseReason::IoError);
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
            Token(slot as usize),
            Interest::READABLE,
        );
        if let ConnState::Draining(reason) = c.state {
            if c.flushed() && c.acks_in() {
                self.close_conn(slot, reason);
                return;
            }
        }
        self.resume_routed(slot, gen);
    }

    /// Brings a connection's partial-frame memory into the front's total after a read,
    /// applies `partial_budget`, and makes sure its timer comes at its frame deadline.
    fn account_partial(&mut self, slot: u32, gen: u32) {
        let now = self.now;
        let Some(c) = self.slab.get(slot, gen) else {
            return;
        };
        let cap = c.carry.capacity();
        if cap == c.partial {
            return;
        }
        self.partial_total = self.partial_total - c.partial + cap;
        c.partial = cap;
        if self.frame_ticks > 0 && !c.carry.is_empty() {
            let since = (now as u32).wrapping_sub(c.partial_since) as u64;
            let deadline = (now + self.frame_ticks as u64).saturating_sub(since);
            if deadline < c.timer_at {
                c.timer_at = self.wheel.schedule((slot, gen), deadline);
            }
        }
        if self.partial_total > self.cfg.partial_budget {
            self.shed_partials();
        }
        let fs = self.fs;
        publish_gauge(
            &fs.partial_bytes,
            &fs.partial_peak,
            self.partial_total as u64,
        );
    }

    /// Past `partial_budget`, closes the connections holding the largest partial frames
    /// with the codec's protocol error until the total is back within it.
    fn shed_partials(&mut self) {
        let budget = self.cfg.partial_budget;
        for (partial, slot, gen) in largest_holders(&self.slab, |c| c.partial) {
            if self.partial_total <= budget {
                break;
            }
            warn!(
                front = self.index,
                partial,
                total = self.partial_total,
                budget,
                "partial frames over partial_budget: closing the largest"
            );
            add(&self.fs.partial_budget_closes, 1);
            self.fail_conn(slot, gen, OVER_BUDGET);
        }
    }

    /// Closes a connection for malformed or abusive input with the codec's error reply
    /// (after the replies to its whole frames), freeing its partial frame at once.
    fn fail_conn(&mut self, slot: u32, gen: u32, e: ProtocolError) {
        let Some(c) = self.slab.get(slot, gen) else {
            return;
        };
        self.partial_total -= c.partial;
        c.partial = 0;
        c.carry = Vec::new();
        c.protocol_error = Some(Box::new(e));
        let open = c.state == ConnState::Open;
        add(&self.fs.protocol_errors, 1);
        if open {
            self.close_after_worker(slot, gen, CloseReason::ProtocolError);
        } else {
            self.close_conn(slot, CloseReason::ProtocolError);
        }
    }

    /// Past `pending_budget`, closes the connections with the largest reply queues
    /// (`slow_consumer`) until the front's total is back within it.
    fn shed_queues(&mut self) {
        let budget = self.cfg.pending_budget;
        for (queued, slot, _) in largest_holders(&self.slab, |c| c.queued) {
            if self.queued_total <= budget {
                break;
            }
            warn!(
                front = self.index,
                queued,
                total = self.queued_total,
                budget,
                "queued replies over pending_budget: closing the largest queue"
            );
            add(&self.fs.pending_budget_closes, 1);
            self.close_conn(slot, CloseReason::SlowConsumer);
        }
    }

    /// Publishes the queued reply bytes for operators: the gauge, and the high-water mark
    /// (taken after the budget was applied; the total only grows in `want_write`).
    fn publish_queued(&self) {
        let fs = self.fs;
        publish_gauge(&fs.queued_bytes, &fs.queued_peak, self.queued_total as u64);
    }

    /// The client sent its FIN: it will send nothing more but may still want the replies to
    /// what it sent. Tell the worker now (after the connection's data, in ring order); the
    /// worker acknowledges with a CLOSE of its own once it has handled everything before it,
    /// and the connection closes when those replies are written (or at its timeout).
    fn client_eof(&mut self, slot: u32, gen: u32) {
        self.close_after_worker(slot, gen, CloseReason::ClientEof);
    }

    /// Stops reading a connection and tells its worker; the connection closes when the worker
    /// acknowledges (its last replies are then out), with `reason`.
    fn close_after_worker(&mut self, slot: u32, gen: u32, reason: CloseReason) {
        let Some(c) = self.slab.get(slot, gen) else {
            return;
        };
        if c.state == ConnState::Accepted {
            self.close_conn(slot, reason);
            return;
        }
        let worker = c.worker;
        c.told_close = true;
        c.state = ConnState::Draining(reason);
        // A routed connection's frames went to any worker of its pool: each acknowledges.
        let workers = match c.route.as_ref() {
            Some(r) => self.listeners[r.listener].pool.clone(),
            None => vec![worker],
        };
        self.draining += 1;
        self.fs
            .conns_draining
            .store(self.draining, Ordering::Relaxed);
        let id = ConnId::new(self.index as u8, gen, slot);
        let mut sent = 0u64;
        for &w in &workers {
            if self.chans[w].broken {
                continue;
            }
            sent |= 1 << w;
            self.chans[w].backlog.push_back(Ctrl {
                tag: tag::CLOSE,
                conn: id.raw(),
                aux: reason as u64,
                payload: Vec::new(),
            });
            self.flush_backlog(w);
        }
        if let Some(r) = self.slab.get(slot, gen).and_then(|c| c.route.as_mut()) {
            r.close_sent = sent;
        }
        if workers.iter().any(|&w| self.chans[w].broken) {
            self.close_conn(slot, reason);
        }
    }

    /// A CLOSE record from worker `w`: after the client's FIN, its acknowledgement of ours
    /// (every reply it had for the connection is before it); otherwise the worker asks to
    /// close once what it queued is written.
    fn worker_closed(&mut self, slot: u32, gen: u32, w: usize) {
        let Some(c) = self.slab.get(slot, gen) else {
            return;
        };
        // After a client's FIN keep its reason.
        let reason = match c.state {
            ConnState::Draining(r) => r,
            _ => CloseReason::WorkerRequest,
        };
        if let Some(r) = c.route.as_mut() {
            r.close_acked |= 1 << w;
        }
        self.drain_conn(slot, gen, reason);
    }

    /// Key routing: pops the connection's requests that are answered in full, writing the
    /// replies held for each new oldest one, and waits on the worker of the first that is not.
    /// A request is answered in full when its worker is known to be past it: its ring was read
    /// after the worker released the request, or a reply of the worker to a later request of
    /// the connection came. O(1) amortised per request (see route.rs).
    fn advance(&mut self, slot: u32, gen: u32) {
        let fs = self.fs;
        let chans = &self.chans;
        let Some(c) = self.slab.get(slot, gen) else {
            return;
        };
        let Some(r) = c.route.as_mut() else {
            return;
        };
        let mut early: Vec<Vec<u8>> = Vec::new();
        let wait = r.pop_answered(|w| chans.get(w).map_or(0, |ch| ch.completed), &mut early);
        // Written in slices of MAX_IOV; what the socket does not take is queued (and counted).
        for chunk in early.chunks(MAX_IOV) {
            let iov: Vec<IoSlice<'_>> = chunk.iter().map(|b| IoSlice::new(b)).collect();
            if let Err(reason) = send_to(c, &iov, fs, usize::MAX) {
                self.close_conn(slot, reason);
                return;
            }
        }
        if let Some((hw, hp)) = wait {
            self.chans[hw].waiting.push(Reverse((hp, slot, gen)));
        }
        if c.pending() > 0 {
            self.want_write(slot, gen);
        } else if let ConnState::Draining(reason) = c.state {
            if c.flushed() && c.acks_in() {
                self.close_conn(slot, reason);
                return;
            }
        }
        self.resume_routed(slot, gen);
    }

    /// Key routing: reads a connection again that was stalled at its pending bound, once its
    /// route state and out queue are below half of it.
    fn resume_routed(&mut self, slot: u32, gen: u32) {
        let max = self.cfg.max_pending;
        let Some(c) = self.slab.get(slot, gen) else {
            return;
        };
        let pending = c.pending();
        let Some(r) = c.route.as_mut() else {
            return;
        };
        if !r.stalled || r.state_bytes() + pending > max / 2 {
            return;
        }
        r.stalled = false;
        if c.wants_read() {
            self.ready.push((slot, gen));
        }
    }

    /// Stops reading a connection and closes it once its queued replies are written.
    fn drain_conn(&mut self, slot: u32, gen: u32, reason: CloseReason) {
        let Some(c) = self.slab.get(slot, gen) else {
            return;
        };
        if c.flushed() && c.acks_in() {
            self.close_conn(slot, reason);
        } else if !matches!(c.state, ConnState::Draining(_)) {
            c.state = ConnState::Draining(reason);
            self.draining += 1;
            self.fs
                .conns_draining
                .store(self.draining, Ordering::Relaxed);
        }
    }

    /// Closes a connection now and tells its worker (in order, after its data).
    fn close_conn(&mut self, slot: u32, reason: CloseReason) {
        let Some(mut c) = self.slab.remove(slot) else {
            return;
        };
        if c.partial > 0 {
            self.partial_total -= c.partial;
            self.fs
                .partial_bytes
                .store(self.partial_total as u64, Ordering::Relaxed);
        }
        if c.queued > 0 {
            self.queued_total -= c.queued;
            self.fs
                .queued_bytes
                .store(self.queued_total as u64, Ordering::Relaxed);
        }
        if let Some(e) = c.protocol_error.take() {
            if c.pending() == 0 {
                // The error reply it is owed, after its replies. Best effort and never
                // blocking: the connection closes either way, and the FIN follows it.
                let _ = (&c.stream).write(&c.codec.protocol_error_reply(&e));
                let _ = c.stream.shutdown(Shutdown::Write);
            }
        }
        let gen_before = self.slab.gens[slot as usize].wrapping_sub(1) & ConnId::GENERATION_MASK;
        let _ = self.poll.registry().deregister(&mut c.stream);
        // The socket's retransmissions over its whole life, counted once.
        if let Some((_, retrans)) = liveness::tcp_info(&c.stream) {
            add(&self.fs.retransmits, retrans as u64);
        }
        drop(c.stream);
        self.fd_freed = true;
        self.admission.release(self.stats, c.addr_slot);
        let id = ConnId::new(self.index as u8, gen_before, slot);
        if let Some(r) = c.route.as_ref() {
            // Every worker of the pool was sent the OPEN: a worker whose OPEN is still queued
            // loses it, the others get the CLOSE unless they had it already (at the FIN).
            let told = if c.told_close { r.close_sent } else { 0 };
            for w in self.listeners[r.listener].pool.clone() {
                let ch = &mut self.chans[w];
                if ch.broken || told & (1 << w) != 0 {
                    continue;
                }
                let queued = ch
                    .backlog
                    .iter()
                    .any(|ctrl| ctrl.conn == id.raw() && ctrl.tag == tag::OPEN);
                if queued {
                    ch.backlog.retain(|ctrl| ctrl.conn != id.raw());
                } else {
                    ch.backlog.push_back(Ctrl {
                        tag: tag::CLOSE,
                        conn: id.raw(),
                        aux: reason as u64,
                        payload: Vec::new(),
                    });
                    self.flush_backlog(w);
                }
            }
        } else if c.state == ConnState::Accepted {
            // A connection whose OPEN never reached the worker needs no CLOSE either.
            self.chans[c.worker]
                .backlog
                .retain(|ctrl| ctrl.conn != id.raw());
        } else if c.told_close {
            // The worker got its CLOSE at the client's FIN (or protocol error): one is enough,
            // or its `on_close` would run twice.
        } else {
            self.chans[c.worker].backlog.push_back(Ctrl {
                tag: tag::CLOSE,
                conn: id.raw(),
                aux: reason as u64,
                payload: Vec::new(),
            });
            self.flush_backlog(c.worker);
        }
        if matches!(c.state, ConnState::Draining(_)) {
            self.draining -= 1;
            self.fs
                .conns_draining
                .store(self.draining, Ordering::Relaxed);
        }
        self.open -= 1;
        self.fs.conns_open.store(self.open, Ordering::Relaxed);
        add(&self.fs.closes[reason as usize], 1);
        debug!(%id, %reason, "closed");
    }

    /// Gives up on workers the supervisor marked failed, and takes back rings the supervisor
    /// has reset after a quarantine.
    fn check_workers(&mut self) {
        // Acquire: pairs with the supervisor's Release when it clears a bit after resetting
        // the rings, so the reset positions are visible before we attach again.
        let quarantined = self.fs.quarantined.load(Ordering::Acquire);
        for w in 0..self.chans.len() {
            self.take_dead_letter(w);
            let state = WorkerState::from_code(self.stats.worker(w).state.load(Ordering::Relaxed));
            let ch = &mut self.chans[w];
            if ch.broken {
                if quarantined & (1 << w) == 0 && state != WorkerState::Failed {
                    if let Err(e) = rearm(ch) {
                        error!(
                            front = self.index,
                            worker = w,
                            "rings still unusable after the reset: {e}"
                        );
                    }
                }
                continue;
            }
            if state == WorkerState::Failed {
                self.quarantine(w, "the worker crashed too often and was marked failed");
            } else if let Err(e) = ch.req.check() {
                // The worker's position, which we rarely need to read while there is room.
                let e = e.to_string();
                self.quarantine(w, &e);
            }
        }
    }

    /// A frame of one of our connections that crashed worker `w` repeatedly was dead-lettered
    /// by the supervisor (the replacement skips it): its connection gets the codec's error
    /// and is closed, the worker's other clients carry on.
    fn take_dead_letter(&mut self, w: usize) {
        let mailbox = &self.stats.worker(w).dead_letter_pending;
        // Acquire: pairs with the supervisor's Release store of the connection id.
        let raw = mailbox.load(Ordering::Acquire);
        if raw == 0 || ConnId::from_raw(raw).front() != self.index {
            return;
        }
        if mailbox
            .compare_exchange(raw, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let id = ConnId::from_raw(raw);
        let listeners = &self.listeners;
        // The id came from a ring the worker could write: only a connection served by that
        // worker is closed (a worker can close its own clients anyway).
        let Some(c) = self.slab.get(id.slot(), id.generation()).filter(|c| {
            c.worker == w
                || c.route
                    .as_ref()
                    .is_some_and(|r| listeners[r.listener].pool.contains(&w))
        }) else {
            return;
        };
        warn!(front = self.index, worker = w, %id, "a frame of this connection crashed its worker repeatedly: dead-lettered, closing the connection");
        // Best effort and non-blocking: the close follows either way.
        let _ = (&c.stream).write(&c.codec.error_reply("frame dead-lettered"));
        self.close_conn(id.slot(), CloseReason::WorkerGone);
    }

    /// The connection table against the open fds: every connection holds one socket, and
    /// nothing else should come or go. A difference is a leak (counted once per change).
    fn check_fds(&mut self) {
        let fds = count_fds();
        if self.base_fds == 0 {
            self.base_fds = fds.saturating_sub(self.slab.len() as u64);
            return;
        }
        let expected = self.base_fds + self.slab.len() as u64;
        if fds != expected {
            let diff = fds.abs_diff(expected);
            warn!(
                front = self.index,
                fds, expected, "open fds do not match the connection table"
            );
            add(&self.stats.header().leaked_conns, diff);
            // Count each discrepancy once.
            self.base_fds = fds - self.slab.len() as u64;
        }
    }

    /// Stops using a worker's rings (its peer broke them, or it failed for good). Its
    /// connections get an error frame and a close, never a hang.
    fn quarantine(&mut self, w: usize, detail: &str) {
        if self.chans[w].broken {
            return;
        }
        error!(front = self.index, worker = w, "ring quarantined: {detail}");
        self.chans[w].broken = true;
        self.chans[w].blocked.clear();
        // Release: the supervisor may reset the rings once it sees the bit; our last use of
        // them happened before this store.
        self.fs.quarantined.fetch_or(1 << w, Ordering::Release);
        self.chans[w].backlog.clear();
        self.chans[w].waiting.clear();
        add(&self.fs.corrupt_rings, 1);
        self.close_worker_conns(w, "worker unavailable");
    }

    /// Closes worker `w`'s connections, and every routed connection whose keys it shares,
    /// each after the codec's error frame `why`.
    fn close_worker_conns(&mut self, w: usize, why: &str) {
        let listeners = &self.listeners;
        let slots: Vec<u32> = (0..self.slab.conns.len() as u32)
            .filter(|&s| {
                self.slab.conns[s as usize].as_ref().is_some_and(|c| {
                    c.worker == w
                        || c.route
                            .as_ref()
                            .is_some_and(|r| listeners[r.listener].pool.contains(&w))
                })
            })
            .collect();
        for slot in slots {
            if let Some(c) = self.slab.conns[slot as usize].as_ref() {
                // Best effort and non-blocking: the close follows either way.
                let _ = (&c.stream).write(&c.codec.error_reply(why));
            }
            self.close_conn(slot, CloseReason::WorkerGone);
        }
    }
}

/// The connections holding part of a per-front budget (`held` of each, when not zero), as
/// (held, slot, generation), largest first: the order the budget closes them in.
fn largest_holders(slab: &Slab, held: impl Fn(&Conn) -> usize) -> Vec<(usize, u32, u32)> {
    let mut big: Vec<(usize, u32, u32)> = (0..slab.conns.len())
        .filter_map(|s| {
            let n = held(slab.conns[s].as_ref()?);
            (n > 0).then(|| (n, s as u32, slab.gens[s]))
        })
        .collect();
    big.sort_unstable_by(|a, b| b.cmp(a));
    big
}

/// Publishes a gauge for operators and raises its high-water mark.
fn publish_gauge(
    gauge: &std::sync::atomic::AtomicU64,
    peak: &std::sync::atomic::AtomicU64,
    v: u64,
) {
    gauge.store(v, Ordering::Relaxed);
    peak.fetch_max(v, Ordering::Relaxed);
}

/// Attaches afresh to a pair of rings the supervisor reset (positions back to zero), without
/// publishing anything the old handles held.
fn rearm(ch: &mut Chan) -> Result<(), shm_ring::AttachError> {
    let req = Producer::new(ch.req.storage().clone())?;
    let rep = Consumer::new(ch.rep.storage().clone())?;
    let bell = ch.bell.clone();
    let mut req = req;
    let mut rep = rep;
    req.set_doorbell(Doorbell::Both(bell.clone()));
    rep.set_doorbell(Doorbell::Both(bell));
    std::mem::replace(&mut ch.req, req).abandon();
    drop(std::mem::replace(&mut ch.rep, rep));
    ch.backlog.clear();
    ch.blocked.clear();
    ch.dirty = false;
    ch.broken = false;
    // Positions start again at zero.
    ch.completed = 0;
    ch.answered = 0;
    ch.waiting.clear();
    ch.split = None;
    Ok(())
}

/// Open fds of this process.
fn count_fds() -> u64 {
    crate::procfs::open_fds(None).unwrap_or(0)
}

/// Writes a group of consecutive reply pieces of one connection (or counts them stale).
fn deliver(
    slab: &mut Slab,
    fs: &FrontStats,
    me: usize,
    group: &mut reply::Group,
    todo: &mut Vec<(u32, u32, Action)>,
) {
    if group.is_empty() {
        group.clear();
        return;
    }
    if group.copied > 0 {
        add(&fs.bytes_copied, group.copied);
    }
    let id = ConnId::from_raw(group.conn);
    let (slot, gen) = (id.slot(), id.generation());
    match slab.get(slot, gen) {
        Some(c) if id.front() == me => {
            add(&fs.frames_out, group.messages);
            if let Err(reason) = reply::write_group(c, group, fs) {
                todo.push((slot, gen, Action::Close(reason)));
            } else if c.pending() > 0 {
                todo.push((slot, gen, Action::WantWrite));
            }
        }
        _ => add(&fs.stale_replies, group.messages.max(1)),
    }
    group.clear();
}

/// A long reply to `conn` broke off after part of it may have been written: what came before
/// goes out, then the connection closes (its client sees a close, never a shifted stream).
fn close_broken(
    slab: &mut Slab,
    fs: &FrontStats,
    me: usize,
    conn: u64,
    group: &mut reply::Group,
    todo: &mut Vec<(u32, u32, Action)>,
) {
    if group.conn == conn {
        deliver(slab, fs, me, group, todo);
    }
    let id = ConnId::from_raw(conn);
    if id.front() == me && slab.get(id.slot(), id.generation()).is_some() {
        add(&fs.protocol_errors, 1);
        todo.push((
            id.slot(),
            id.generation(),
            Action::Close(CloseReason::ProtocolError),
        ));
    }
}

enum Action {
    Close(CloseReason),
    WantWrite,
    /// A CLOSE record from this worker.
    CloseAfterFlush(usize),
    /// Key routing: the connection's oldest request may be answered in full now.
    Advance,
}

/// Key routing: true if a reply record goes out now with the records around it (it answers
/// the connection's oldest request, or no request: a push); false if it was held for its turn,
/// copied and counted (or belongs to no live connection: `deliver` counts those). O(1)
/// amortised (see route.rs).
#[allow(clippy::too_many_arguments)]
fn routed_reply(
    slab: &mut Slab,
    fs: &FrontStats,
    me: usize,
    w: usize,
    (conn, aux): (u64, u64),
    payload: &[u8],
    max_pending: usize,
    todo: &mut Vec<(u32, u32, Action)>,
) -> bool {
    let id = ConnId::from_raw(conn);
    let (slot, gen) = (id.slot(), id.generation());
    let Some(c) = slab.get(slot, gen).filter(|_| id.front() == me) else {
        return true;
    };
    let pending = c.pending();
    let Some(r) = c.route.as_mut() else {
        return true;
    };
    let verdict = r.on_reply(w, aux, payload);
    if verdict.advance {
        // Wait on (or move past) whatever is oldest now, and write what it holds.
        todo.push((slot, gen, Action::Advance));
    }
    if verdict.direct {
        return true;
    }
    add(&fs.bytes_copied, payload.len() as u64);
    add(&fs.frames_out, 1);
    // The client is not read past `max_pending` (route.rs); held replies past it answer
    // requests already in the rings with more than the bound allows (they would go to the out
    // queue, which has the same bound).
    if pending + r.held_bytes() > max_pending {
        todo.push((slot, gen, Action::Close(CloseReason::SlowConsumer)));
    }
    false
}

/// Takes an inherited fd named in the environment.
///
/// # Safety
///
/// `fd` must be owned by this process and by nothing else in it.
pub unsafe fn inherited_fd(fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: F_SETFD on any number is harmless; EBADF tells us it is not open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("inherited fd {fd} is not open"),
        ));
    }
    // SAFETY: open (checked) and owned per the caller's contract.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
