//! The supervisor: owns every shared resource, starts the fronts and workers, restarts them,
//! and on SIGINT/SIGTERM drains and removes everything it created.
//!
//! The loop and the state it owns are here; each concern it dispatches to has its own file:
//! [`claim`] (taking the instance name over from a dead run), [`listen`] (the listening
//! sockets), [`rings`] (sealed ring memfds, quarantine and front resets), [`generation`] (fresh
//! rings for a replaced worker, handed to the fronts), [`spawn`] (starting a front or a worker
//! with its fds and environment), [`restart`] (reaping, backoff, crash windows, failed workers,
//! revive), [`dead_letter`] (the frame a worker keeps dying on), [`watch`] (hangs, stalls and
//! growth), [`strays`] (nothing a worker starts outlives it) and [`shutdown`].

mod claim;
mod dead_letter;
mod generation;
mod listen;
mod restart;
mod rings;
mod shutdown;
mod spawn;
mod stall;
mod strays;
mod watch;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::Pid;
use shm_ring::{EventFd, ShmRing};
use shmrelay::config::Config;
use shmrelay::names::{self, Dir};
use shmrelay::signals;
use shmrelay::stats::Stats;
use shmrelay::view::{self, Publisher};
use tracing::{error, info, warn};

use self::generation::{control_pair, Control};
use crate::logging::out_line;
use crate::watchdog::{self, Growth, HangWatch};

/// Which process a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Role {
    Front(usize),
    Worker(usize),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Front(i) => write!(f, "front {i}"),
            Role::Worker(i) => write!(f, "worker {i}"),
        }
    }
}

/// One process slot: its current process and its restart record.
struct Slot {
    pid: Option<Pid>,
    started: Instant,
    starts: u32,
    quick_crashes: u32,
    restart_at: Option<Instant>,
    /// Recent crash times, for the crash limit.
    crashes: VecDeque<Instant>,
    /// Crashed too often: retried only after a backoff (or at SIGUSR1).
    failed: bool,
    /// Times marked failed since it last ran stably: sets the retry backoff.
    fail_count: u32,
    /// The consumer attach counts of the worker's request rings when it was started: a
    /// higher count means it attached.
    attach_base: u32,
    growth: Growth,
}

/// Everything one instance owns.
struct Instance {
    cfg: Config,
    exe: PathBuf,
    /// The control segment (a sealed memfd only the fronts are handed).
    stats: Stats,
    /// The operators' view (`shmrelay.NAME.stats`), its lock and the run's token.
    publisher: Publisher,
    /// One listening socket per front, all bound to the port with SO_REUSEPORT: the kernel
    /// spreads new connections over them, and a dead front's socket (held here) keeps its
    /// queue until the front's replacement accepts from it.
    /// `listeners[f][l]`: front `f`'s socket of listener `l`.
    listeners: Vec<Vec<std::net::TcpListener>>,
    /// Workers in all (the pools of every listener), and each one's listener.
    workers: usize,
    worker_listener: Vec<usize>,
    /// rings[f][w] = (request, reply)
    rings: Vec<Vec<(ShmRing, ShmRing)>>,
    front_bells: Vec<Arc<EventFd>>,
    worker_bells: Vec<Arc<EventFd>>,
    slots: HashMap<Role, Slot>,
    /// hangs[f][w] watches request ring (f, w).
    hangs: Vec<Vec<HangWatch>>,
    supervisor_growth: Growth,
    /// suspects[f][w]: the request position a crash of worker `w` left in flight in ring
    /// (f, w), and how many crashes in a row left it there (dead-lettering).
    suspects: Vec<Vec<(u64, u32)>>,
    /// Per front: its last published activity stamp (stall watch).
    front_seen: Vec<u64>,
    /// Per front: its own time without loop activity (stall watch).
    front_stall: Vec<stall::StallClock>,
    /// Some worker attached to its rings at least once.
    ever_attached: bool,
    /// Every worker failed before any attached: the relay cannot serve and exits.
    startup_failure: Option<String>,
    /// Children this process had before it started any (a wrapper's, from before an exec):
    /// not strays.
    inherited_children: Vec<u32>,
    /// One control socket per front: new ring generations for replaced workers.
    controls: Vec<Control>,
}

/// Runs the relay until SIGINT or SIGTERM.
pub fn run(cfg: Config) -> Result<()> {
    cfg.validate()?;
    // `fronts = "auto"` and the default `max_conns`, for this host's open-files limit (which
    // it raises to the hard limit first: the fronts inherit it).
    let limits = shmrelay::config::fronts::Limits::of_this_process();
    let cfg = cfg.resolve(&limits)?;
    info!(
        fronts = cfg.fronts,
        max_conns = cfg.max_conns(),
        nofile = limits.nofile,
        "fronts sized"
    );
    let addrs: Vec<_> = cfg.listeners().iter().map(|l| l.listen).collect();
    listen::check_distinct(&addrs)?;
    // Stop on SIGINT/SIGTERM/SIGHUP, retry failed workers on SIGUSR1.
    signals::install_supervisor().context("installing the signal handlers")?;
    strays::own_descendants()?;
    let (stale, dead_run) = claim::claim_instance(&cfg.instance)?;
    let orphans = claim::kill_orphans(&cfg.instance, dead_run);
    // A dead run's orphans may still hold its listeners for a moment after their SIGKILL.
    let patience = Duration::from_secs(if orphans > 0 { 2 } else { 0 });
    for &addr in &addrs {
        listen::check_free(addr, patience)?;
    }
    // Nothing named exists until the very end of `create` (the view, renamed into place):
    // a failed start leaves nothing behind, and neither does a stop signal during it (the
    // memfds made so far close with the process).
    let Some(mut inst) = Instance::create(cfg, stale, orphans)? else {
        info!("stopped during set-up; nothing was left");
        return Ok(());
    };
    let result = inst.serve();
    inst.shutdown();
    result
}

impl Instance {
    /// Creates everything the instance owns; `None` if a stop signal came meanwhile.
    fn create(cfg: Config, stale: usize, orphans: usize) -> Result<Option<Instance>> {
        let exe = std::env::current_exe().context("locating the shmrelay binary")?;
        let nworkers = cfg.total_workers();
        // The control segment: only the fronts are handed it.
        let stats = Stats::create_memfd(cfg.fronts, nworkers)
            .context("creating the control segment (memfd)")?;
        let h = stats.header();
        h.stale_segments_removed
            .store(stale as u64, Ordering::Relaxed);
        h.orphans_killed.store(orphans as u64, Ordering::Relaxed);
        let cap = cfg.ring_capacity();
        let mut rings = Vec::new();
        for f in 0..cfg.fronts {
            let mut row = Vec::new();
            for w in 0..nworkers {
                if signals::stop_requested() {
                    return Ok(None);
                }
                let req = rings::new_ring(&cfg.instance, f, w, Dir::Request, cap)?;
                let rep = rings::new_ring(&cfg.instance, f, w, Dir::Reply, cap)?;
                row.push((req, rep));
            }
            rings.push(row);
        }
        let bell = || EventFd::new().map(Arc::new).context("creating an eventfd");
        let front_bells = (0..cfg.fronts)
            .map(|_| bell())
            .collect::<Result<Vec<_>>>()?;
        let worker_bells = (0..nworkers).map(|_| bell()).collect::<Result<Vec<_>>>()?;
        let mut listeners: Vec<Vec<std::net::TcpListener>> =
            (0..cfg.fronts).map(|_| Vec::new()).collect();
        for spec in cfg.listeners() {
            let addr = spec.listen;
            let first = listen::listen(addr, cfg.backlog)
                .with_context(|| format!("listening on {addr}"))?;
            // Port 0 resolves on the first bind; the other fronts join that port.
            let bound = first.local_addr()?;
            listeners[0].push(first);
            for row in listeners.iter_mut().skip(1) {
                row.push(
                    listen::listen(bound, cfg.backlog)
                        .with_context(|| format!("listening on {bound}"))?,
                );
            }
        }
        info!(
            instance = cfg.instance,
            fronts = cfg.fronts,
            workers = nworkers,
            ring_capacity = cap,
            "segments created"
        );
        let (fronts, workers) = (cfg.fronts, nworkers);
        let worker_listener = cfg.worker_listeners();
        let controls = (0..fronts)
            .map(|_| control_pair())
            .collect::<Result<Vec<_>>>()?;
        if signals::stop_requested() {
            return Ok(None);
        }
        // Last, after everything that can fail: the operators' view appears under its name
        // locked and filled in, and from here on `shutdown` removes it.
        let view_path = names::stats_path(&cfg.instance);
        let mut publisher =
            Publisher::create(&view_path, view::new_token(), &stats, fronts, workers)
                .map_err(|e| anyhow!("instance {:?}: {e}", cfg.instance))?;
        let _ = publisher.publish(&stats, &rings);
        Ok(Some(Instance {
            controls,
            workers,
            worker_listener,
            cfg,
            exe,
            stats,
            publisher,
            listeners,
            rings,
            front_bells,
            worker_bells,
            slots: HashMap::new(),
            hangs: (0..fronts)
                .map(|_| (0..workers).map(|_| HangWatch::default()).collect())
                .collect(),
            supervisor_growth: Growth::default(),
            suspects: vec![vec![(0, 0); workers]; fronts],
            front_seen: vec![0; fronts],
            front_stall: vec![stall::StallClock::default(); fronts],
            ever_attached: false,
            startup_failure: None,
            inherited_children: watchdog::children(std::process::id())
                .into_iter()
                .map(|(pid, _)| pid)
                .collect(),
        }))
    }

    fn serve(&mut self) -> Result<()> {
        if let Some(addr) = self.cfg.metrics {
            // The thread serves until the process exits; it reads the stats read-only.
            let (bound, _thread) = shmrelay::metrics::spawn(addr, self.cfg.instance.clone())
                .with_context(|| format!("serving metrics on {addr}"))?;
            info!(%bound, "metrics on http://{bound}/metrics");
            out_line(format_args!("shmrelay: metrics on http://{bound}/metrics"));
        }
        // A stop signal during start-up: `shutdown` stops what was started.
        for f in 0..self.cfg.fronts {
            if signals::stop_requested() {
                return Ok(());
            }
            let ready = self.start(Role::Front(f))?;
            spawn::wait_ready(ready, f)?;
        }
        for w in 0..self.workers {
            if signals::stop_requested() {
                return Ok(());
            }
            self.start(Role::Worker(w))?;
        }
        // One line per listener, in configuration order (the first is the default listener's).
        for (l, spec) in self.cfg.listeners().iter().enumerate() {
            let addr = self.listeners[0][l].local_addr()?;
            info!(%addr, codec = %spec.codec, "listening on {addr}");
            out_line(format_args!(
                "shmrelay: listening on {addr} (instance {}, codec {})",
                self.cfg.instance, spec.codec
            ));
        }
        self.publish();
        let mut last_publish = Instant::now();
        let mut last_watch = Instant::now();
        let mut last_metrics = Instant::now();
        while !signals::stop_requested() {
            self.reap();
            self.restart_due()?;
            self.stats
                .header()
                .supervisor_active_ns
                .store(shm_ring::monotonic_ns(), Ordering::Relaxed);
            if let Some(reason) = self.startup_failure.take() {
                error!("{reason}");
                bail!("{reason}");
            }
            if signals::take_revive() {
                self.revive();
            }
            if last_watch.elapsed() >= Duration::from_millis(100) {
                last_watch = Instant::now();
                self.watch_hangs();
                self.watch_quarantines();
                self.watch_fronts();
                self.watch_lifecycles();
            }
            if last_metrics.elapsed() >= Duration::from_secs(1) {
                last_metrics = Instant::now();
                self.sample_processes();
                self.kill_strays();
            }
            if last_publish.elapsed() >= view::PUBLISH_EVERY {
                last_publish = Instant::now();
                self.publish();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        info!("stopping");
        Ok(())
    }

    /// Copies the counters and ring snapshots into the operators' view.
    fn publish(&mut self) {
        if let Err(e) = self.publisher.publish(&self.stats, &self.rings) {
            warn!("publishing the stats view: {e}");
        }
    }
}
