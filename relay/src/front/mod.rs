//! The front: one process, one mio event loop, many sockets.
//!
//! # The path of one frame, file by file
//!
//! 1. `accept.rs`: a client is admitted (`admission.rs`), takes a slot in the connection
//!    table (`conn.rs`, keyed by a `ConnKey`: slot and generation), and
//!    its worker gets an OPEN record through the worker's channel (`channel.rs`: the rings,
//!    the control backlog ahead of any data).
//! 2. `event_loop.rs`: each turn pumps replies, flushes control records, reads the readable
//!    connections, runs the timers, publishes what it wrote and sleeps on the sockets and
//!    the front's doorbell.
//! 3. `read.rs`: a readable connection gets space reserved in its worker's request ring and
//!    the socket is read straight into it; the whole frames of that read are committed as
//!    one DATA record. Only the partial frame at the end of a read is copied (to the
//!    connection's carry buffer), and counted as copied. On a key-routed pool (`resp` with
//!    several workers) `route.rs` reads instead and spreads the frames over the pool by key.
//! 4. The worker answers (see `workers/`): reply records in its reply ring.
//! 5. `pump.rs`: the reply pump reads them, frames them from the front's own copy of their
//!    lengths (`reply.rs`) and groups them per connection; on a routed pool `routing.rs` (pure
//!    logic, unit-tested) puts them back in request order, and merges the replies of the
//!    pool-wide commands (`fanout.rs`: `DBSIZE`, `FLUSHALL`) into one.
//! 6. `write.rs`: a group is written with `writev` straight from the reply ring, consecutive
//!    records of one connection in one call. Only what a socket does not take at once is
//!    copied to the connection's bounded out queue (and counted); past the bound the client is
//!    disconnected as a slow consumer, so it never stalls anybody else.
//! 7. `lifecycle.rs`: the close, from the client's FIN or a worker's CLOSE through draining to
//!    the final close that tells the workers.
//!
//! Around that path: `liveness.rs` (pings, timeouts, the kernel's backstops), `budget.rs`
//! (`partial_budget`, `pending_budget`), `channel.rs` (per worker: quarantine, re-arm, dead
//! letters), `generation.rs` (new rings for a replaced worker), `scope.rs` (which
//! connections a worker may write to).
//!
//! Backpressure: when a request ring is full, the connections routed to it are not read (TCP
//! pushes back on their clients) until the worker releases space; when every ring is full the
//! front also stops accepting (if configured).
//!
//! Liveness: a timing wheel visits each connection only at its own deadline, to ping it when
//! idle and to close it when nothing arrived within its heartbeat timeout.

mod accept;
mod admission;
mod budget;
mod channel;
mod conn;
mod event_loop;
mod fanout;
pub mod generation;
mod lifecycle;
mod liveness;
mod pump;
mod read;
mod reply;
mod route;
mod routing;
mod scope;
mod websocket;
mod write;

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};
use shm_ring::EventFd;
use shmrelay_worker::Codec;

use crate::config::Config;
use crate::stats::{FrontStats, Stats};
use crate::timer::Wheel;
use admission::Admission;
use channel::Chan;
use conn::{ConnKey, Slab};
use liveness::{FrontClock, Liveness, TICK_MS};
use route::Scratch;
use routing::Routing;
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
    /// `websocket`: the handshake's settings.
    ws: websocket::Settings,
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
    /// Key routing's table: how far each worker's replies are complete, who waits on whom.
    routing: Routing,
    /// Not accepting because every request ring is full.
    paused: bool,
    doorbell: Arc<EventFd>,
    chans: Vec<Chan>,
    slab: Slab,
    ready: Vec<ConnKey>,
    /// `unblock`'s list of resumed connections (kept for its allocation).
    resumed: Vec<ConnKey>,
    stats: &'static Stats,
    fs: &'static FrontStats,
    admission: Admission,
    liveness: Liveness,
    wheel: Wheel,
    due: Vec<(crate::timer::Key, u64)>,
    /// The clients' clock: real time minus this front's own lateness.
    clock: FrontClock,
    /// Current tick (TICK_MS each) of `clock`: every deadline of a connection is in these.
    now: u64,
    open: u64,
    draining: u64,
    /// Open fds besides the connections' sockets: the fd self-check's baseline (0 until the
    /// first check takes it).
    base_fds: u64,
    /// CLOCK_MONOTONIC (ns) of the last `tick`: the periodic checks are timed by it, not by
    /// clock reads of their own on every turn of the loop.
    tick_ns: u64,
    last_checks: u64,
    last_fd_check: u64,
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

/// Connections this front can hold at most: `max_conns`, and never more than its open-files
/// limit (each is an fd).
fn slab_capacity(max_conns: u64) -> usize {
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    max_conns.min(nofile).min(1 << 24) as usize
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
                ws: websocket::Settings {
                    path: spec.path.clone(),
                    origins: spec.origins.clone(),
                    subprotocols: spec.subprotocols.clone(),
                },
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
            chans.push(Chan::attach(ch)?);
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
        let s_max_conns = s.config.max_conns();
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
            routing: Routing::new(chans.len()),
            scratch: Scratch::default(),
            paused: false,
            doorbell,
            chans,
            // Generations differ from any earlier incarnation of this front.
            slab: Slab::with_capacity(
                (shm_ring::monotonic_ns() as u32) | 1,
                slab_capacity(s_max_conns),
            ),
            ready: Vec::new(),
            resumed: Vec::new(),
            stats,
            fs,
            wheel: Wheel::new(4096, 0),
            due: Vec::new(),
            clock: FrontClock::new(shm_ring::monotonic_ns()),
            now: 0,
            open: 0,
            draining: 0,
            base_fds: 0,
            tick_ns: shm_ring::monotonic_ns(),
            last_checks: shm_ring::monotonic_ns(),
            last_fd_check: shm_ring::monotonic_ns(),
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
}
