//! The supervisor: owns every shared resource, starts the fronts and workers, restarts them,
//! and on SIGINT/SIGTERM drains and removes everything it created.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use shm_ring::{Doorbell, EventFd, Meta, RingStorage, ShmRing};
use shmrelay::config::Config;
use shmrelay::names::{self, Dir};
use shmrelay::stats::{unix_ms, Stats, WorkerState};
use shmrelay::view::{self, Publisher};
use shmrelay_worker::protocol::{env, tag, DEAD_LETTER_WORDS, INFLIGHT_WORD};

use crate::watchdog::{self, Growth, Hang, HangWatch};
use shmrelay::front::generation as front_generation;
use tracing::{error, info, warn};

/// Restart delay after the first quick crash; doubles per further quick crash.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A process that ran this long is considered healthy again.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// First retry of a worker marked failed; doubles per further failure, up to
/// `failed_retry_max_ms`.
const FAILED_RETRY_START: Duration = Duration::from_secs(1);

/// Set by SIGUSR1: retry every failed worker now.
static REVIVE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_revive(_: libc::c_int) {
    REVIVE.store(true, Ordering::Relaxed);
}

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
    /// Per front: its last published activity stamp and when it last changed (stall watch).
    front_seen: Vec<(u64, Instant)>,
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

/// The supervisor's end of a front's control socket, and the front's end (inherited by each
/// process of that front).
struct Control {
    sup: std::os::unix::net::UnixStream,
    front_end: OwnedFd,
    /// Number of the last generation message (acks of older ones are ignored).
    seq: u64,
}

/// How long a front has to take a new ring generation before it is restarted instead.
const GENERATION_ACK: Duration = Duration::from_secs(2);

fn control_pair() -> Result<Control> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (sup, front_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("creating a front's control socket")?;
    Ok(Control {
        sup: std::os::unix::net::UnixStream::from(sup),
        front_end,
        seq: 0,
    })
}

/// Runs the relay until SIGINT or SIGTERM.
pub fn run(cfg: Config) -> Result<()> {
    cfg.validate()?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("installing the SIGINT/SIGTERM handler")?;
    }
    own_descendants()?;
    let (stale, dead_run) = claim_instance(&cfg.instance)?;
    let orphans = kill_orphans(&cfg.instance, dead_run);
    // Nothing named exists until the very end of `create` (the view, renamed into place):
    // a failed start leaves nothing behind.
    let mut inst = Instance::create(cfg, stale, orphans)?;
    let result = inst.serve(&stop);
    inst.shutdown();
    result
}

/// Makes this process the reaper of every process its children start (orphans of a dead
/// worker are reparented here, not to init, so they can be found and killed), and installs
/// SIGUSR1 (retry failed workers now).
fn own_descendants() -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("PR_SET_CHILD_SUBREAPER");
    }
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(
        SigHandler::Handler(on_revive),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe { sigaction(Signal::SIGUSR1, &action) }.context("installing the SIGUSR1 handler")?;
    Ok(())
}

/// Kills processes left from the dead run `token` of this instance (those whose environment
/// carries that run's token, never those that merely name the instance); returns how many.
fn kill_orphans(instance: &str, token: u64) -> usize {
    let orphans = view::processes_of_run(token, std::process::id());
    for &pid in &orphans {
        warn!(
            pid,
            instance, "killing a process left over from a dead run of this instance"
        );
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    orphans.len()
}

/// Refuses to start over a live instance of the same name (its supervisor holds the lock on
/// its view), or over a file at the name this user must not trust; removes a dead run's files
/// (its view, claimed under the lock, and its other files owned by this user) and returns
/// how many there were and the dead run's token.
fn claim_instance(instance: &str) -> Result<(usize, u64)> {
    let path = names::stats_path(instance);
    let claimed = view::claim_stale(&path, Duration::from_millis(500))
        .map_err(|e| anyhow!("instance {instance:?}: {e}"))?;
    let Some(claimed) = claimed else {
        return Ok((0, 0));
    };
    let token = claimed.peek.map_or(0, |p| p.token);
    let mut removed = 0;
    for f in names::instance_files(instance) {
        if f == path || !names::is_own_regular(&f) {
            continue;
        }
        match std::fs::remove_file(&f) {
            Ok(()) => removed += 1,
            Err(e) => warn!("removing {}: {e}", f.display()),
        }
    }
    match claimed.remove() {
        Ok(true) => removed += 1,
        Ok(false) => {}
        Err(e) => warn!("removing {}: {e}", path.display()),
    }
    if removed > 0 {
        warn!(
            instance,
            count = removed,
            "removed segments left by a dead run of this instance"
        );
    }
    Ok((removed, token))
}

/// A ring in a new memfd, sealed against shrinking and growing: a worker that truncates its
/// fd gets EPERM instead of SIGBUSing the front and the supervisor.
fn new_ring(instance: &str, f: usize, w: usize, dir: Dir, cap: usize) -> Result<ShmRing> {
    let name = names::ring_path(instance, f, w, dir);
    let name = name.file_name().map_or_else(
        || "shmrelay-ring".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    ShmRing::create_memfd(&name, cap).with_context(|| format!("creating ring {name}"))
}

impl Instance {
    fn create(cfg: Config, stale: usize, orphans: usize) -> Result<Instance> {
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
                let req = new_ring(&cfg.instance, f, w, Dir::Request, cap)?;
                let rep = new_ring(&cfg.instance, f, w, Dir::Reply, cap)?;
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
            let first =
                listen(addr, cfg.backlog).with_context(|| format!("listening on {addr}"))?;
            // Port 0 resolves on the first bind; the other fronts join that port.
            let bound = first.local_addr()?;
            listeners[0].push(first);
            for row in listeners.iter_mut().skip(1) {
                row.push(
                    listen(bound, cfg.backlog).with_context(|| format!("listening on {bound}"))?,
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
        // Last: the operators' view appears under its name locked and filled in.
        let view_path = names::stats_path(&cfg.instance);
        let mut publisher =
            Publisher::create(&view_path, view::new_token(), &stats, fronts, workers)
                .map_err(|e| anyhow!("instance {:?}: {e}", cfg.instance))?;
        let _ = publisher.publish(&stats, &rings);
        let controls = (0..fronts)
            .map(|_| control_pair())
            .collect::<Result<Vec<_>>>()?;
        Ok(Instance {
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
            front_seen: vec![(0, Instant::now()); fronts],
            ever_attached: false,
            startup_failure: None,
            inherited_children: watchdog::children(std::process::id())
                .into_iter()
                .map(|(pid, _)| pid)
                .collect(),
        })
    }

    fn serve(&mut self, stop: &AtomicBool) -> Result<()> {
        if let Some(addr) = self.cfg.metrics {
            // The thread serves until the process exits; it reads the stats read-only.
            let (bound, _thread) = shmrelay::metrics::spawn(addr, self.cfg.instance.clone())
                .with_context(|| format!("serving metrics on {addr}"))?;
            info!(%bound, "metrics on http://{bound}/metrics");
            println!("shmrelay: metrics on http://{bound}/metrics");
        }
        for f in 0..self.cfg.fronts {
            let ready = self.start(Role::Front(f))?;
            wait_ready(ready, f)?;
        }
        for w in 0..self.workers {
            self.start(Role::Worker(w))?;
        }
        // One line per listener, in configuration order (the first is the default listener's).
        for (l, spec) in self.cfg.listeners().iter().enumerate() {
            let addr = self.listeners[0][l].local_addr()?;
            info!(%addr, codec = %spec.codec, "listening on {addr}");
            println!(
                "shmrelay: listening on {addr} (instance {}, codec {})",
                self.cfg.instance, spec.codec
            );
        }
        self.publish();
        let _ = std::io::stdout().flush();
        let mut last_publish = Instant::now();
        let mut last_watch = Instant::now();
        let mut last_metrics = Instant::now();
        while !stop.load(Ordering::Relaxed) {
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
            if REVIVE.swap(false, Ordering::Relaxed) {
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

    /// Starts one process. For a front, returns the read end of its readiness pipe.
    fn start(&mut self, role: Role) -> Result<Option<OwnedFd>> {
        let mut keep: Vec<RawFd> = Vec::new();
        let starts = self.slots.get(&role).map_or(0, |s| s.starts);
        let (mut cmd, ready) = match role {
            Role::Front(f) => {
                let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                let mut cmd = Command::new(&self.exe);
                cmd.arg("front")
                    .args(["--index", &f.to_string()])
                    .env("SHMRELAY_CONFIG", toml::to_string(&self.cfg)?);
                let channels: Vec<String> = (0..self.workers)
                    .map(|w| {
                        let (req, rep) = &self.rings[f][w];
                        let fds = [
                            req.fd().as_raw_fd(),
                            rep.fd().as_raw_fd(),
                            self.worker_bells[w].as_raw_fd(),
                        ];
                        keep.extend(fds);
                        format!("{w}:{}:{}:{}", fds[0], fds[1], fds[2])
                    })
                    .collect();
                let listen_fds: Vec<RawFd> =
                    self.listeners[f].iter().map(|l| l.as_raw_fd()).collect();
                let (bell, stats_fd) =
                    (self.front_bells[f].as_raw_fd(), self.stats.fd().as_raw_fd());
                let control = self.controls[f].front_end.as_raw_fd();
                keep.extend(&listen_fds);
                keep.extend([bell, stats_fd, ready_w.as_raw_fd(), control]);
                let listen_fds: Vec<String> = listen_fds.iter().map(|fd| fd.to_string()).collect();
                cmd.env(env::INSTANCE, &self.cfg.instance)
                    .env(view::RUN_ENV, format!("{:016x}", self.publisher.token()))
                    .env("SHMRELAY_LISTEN_FD", listen_fds.join(","))
                    .env("SHMRELAY_DOORBELL_FD", bell.to_string())
                    .env("SHMRELAY_STATS_FD", stats_fd.to_string())
                    .env("SHMRELAY_READY_FD", ready_w.as_raw_fd().to_string())
                    .env("SHMRELAY_CONTROL_FD", control.to_string())
                    .env(env::CHANNELS, channels.join(","));
                self.stats
                    .front(f)
                    .restarts
                    .store(starts, Ordering::Relaxed);
                (cmd, Some((ready_r, ready_w)))
            }
            Role::Worker(w) => {
                let spec = &self.cfg.listeners()[self.worker_listener[w]];
                let mut cmd = match &spec.worker_cmd {
                    Some(line) => {
                        let mut parts = line.split_whitespace();
                        let prog = parts.next().context("worker_cmd is empty")?;
                        let mut cmd = Command::new(prog);
                        cmd.args(parts);
                        cmd
                    }
                    None => {
                        let mut cmd = Command::new(&self.exe);
                        cmd.args(["worker", "echo"]);
                        cmd
                    }
                };
                let channels: Vec<String> = (0..self.cfg.fronts)
                    .map(|f| {
                        let (req, rep) = &self.rings[f][w];
                        let fds = [
                            req.fd().as_raw_fd(),
                            rep.fd().as_raw_fd(),
                            self.front_bells[f].as_raw_fd(),
                        ];
                        keep.extend(fds);
                        format!("{f}:{}:{}:{}", fds[0], fds[1], fds[2])
                    })
                    .collect();
                let bell = self.worker_bells[w].as_raw_fd();
                keep.push(bell);
                cmd.env(env::INSTANCE, &self.cfg.instance)
                    .env(view::RUN_ENV, format!("{:016x}", self.publisher.token()))
                    .env(env::WORKER_INDEX, w.to_string())
                    .env(env::DOORBELL_FD, bell.to_string())
                    .env(env::RESTARTS, starts.to_string())
                    .env(env::CODEC, spec.codec().name())
                    .env(env::CHANNELS, channels.join(","));
                if let Some(name) = self.cfg.worker_user(w) {
                    let user = nix::unistd::User::from_name(name)
                        .with_context(|| format!("looking up user {name:?}"))?
                        .with_context(|| format!("no user {name:?} on this host (worker {w})"))?;
                    // std drops supplementary groups when a root parent sets the uid.
                    cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
                }
                let ws = self.stats.worker(w);
                ws.restarts.store(starts, Ordering::Relaxed);
                ws.started_unix_ms.store(unix_ms(), Ordering::Relaxed);
                (cmd, None)
            }
        };
        let parent = std::process::id() as libc::pid_t;
        // A worker leads a process group of its own: whatever it starts is in it (unless it
        // leaves with setsid/setpgid), and dies with it (`kill_group`).
        let own_group = matches!(role, Role::Worker(_));
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (setpgid, fcntl, prctl, getppid, _exit) on plain integers it owns.
        unsafe {
            cmd.pre_exec(move || {
                if own_group && libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Die with the supervisor, even if it is SIGKILLed: no orphans. (std runs this
                // after any uid change, which would clear the setting.)
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let attach_base = match role {
            Role::Worker(w) => worker_attaches(&self.rings, w),
            Role::Front(_) => 0,
        };
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {role} ({:?})", cmd.get_program()))?;
        let pid = Pid::from_raw(child.id() as i32);
        // The child is reaped with waitpid in `reap`; the handle is not needed.
        drop(child);
        info!(%role, pid = pid.as_raw(), starts, "started");
        match role {
            Role::Worker(w) => {
                let ws = self.stats.worker(w);
                ws.pid.store(pid.as_raw() as u32, Ordering::Relaxed);
                ws.state
                    .store(WorkerState::Running as u32, Ordering::Relaxed);
                for f in 0..self.cfg.fronts {
                    self.hangs[f][w].reset();
                }
            }
            Role::Front(f) => {
                self.front_seen[f] = (
                    self.stats.front(f).active_ns.load(Ordering::Relaxed),
                    Instant::now(),
                );
                let fp = self.stats.front_process(f);
                fp.pid.store(pid.as_raw() as u32, Ordering::Relaxed);
                fp.restarts.store(starts, Ordering::Relaxed);
                fp.started_unix_ms.store(unix_ms(), Ordering::Relaxed);
            }
        }
        let slot = self.slots.entry(role).or_insert(Slot {
            pid: None,
            started: Instant::now(),
            starts: 0,
            quick_crashes: 0,
            restart_at: None,
            crashes: VecDeque::new(),
            failed: false,
            fail_count: 0,
            attach_base: 0,
            growth: Growth::default(),
        });
        slot.attach_base = attach_base;
        slot.pid = Some(pid);
        slot.started = Instant::now();
        slot.starts += 1;
        slot.restart_at = None;
        Ok(ready.map(|(r, w)| {
            drop(w); // only the child keeps the write end, so its death reads as EOF
            r
        }))
    }

    /// Reaps exited children and schedules their restarts.
    fn reap(&mut self) {
        let mut worker_died = false;
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(s) => s,
            };
            let Some(pid) = status.pid() else { continue };
            // Anything else reaped here is a stray (a worker's orphan): nothing to restart.
            let Some(role) = self
                .slots
                .iter()
                .find(|(_, s)| s.pid == Some(pid))
                .map(|(&r, _)| r)
            else {
                continue;
            };
            let mut forgiven = 0;
            if let Role::Worker(w) = role {
                worker_died = true;
                // Whatever it started in its process group dies with it.
                kill_group(pid);
                let base = self.slots[&role].attach_base;
                if worker_attaches(&self.rings, w) != base {
                    self.ever_attached = true;
                }
                forgiven = self.note_crash_frames(w);
                // Nothing the dead worker started is left; its replacement gets fresh rings.
                self.kill_strays();
                self.new_generation(w);
            }
            let slot = self.slots.get_mut(&role).expect("found above");
            slot.pid = None;
            let lived = slot.started.elapsed();
            let window = Duration::from_millis(self.cfg.crash_window_ms);
            slot.crashes.push_back(Instant::now());
            // The crashes a dead-lettered frame caused are counted against the frame.
            for _ in 0..forgiven {
                slot.crashes.pop_back();
            }
            while slot.crashes.front().is_some_and(|t| t.elapsed() > window) {
                slot.crashes.pop_front();
            }
            if let Role::Worker(w) = role {
                if slot.crashes.len() as u32 >= self.cfg.crash_limit {
                    slot.failed = true;
                    slot.fail_count += 1;
                    let retry = FAILED_RETRY_START
                        .saturating_mul(2u32.saturating_pow(slot.fail_count - 1))
                        .min(Duration::from_millis(self.cfg.failed_retry_max_ms));
                    slot.restart_at = Some(Instant::now() + retry);
                    let crashes = slot.crashes.len();
                    let ws = self.stats.worker(w);
                    ws.crashes.fetch_add(1, Ordering::Relaxed);
                    ws.pid.store(0, Ordering::Relaxed);
                    ws.state
                        .store(WorkerState::Failed as u32, Ordering::Relaxed);
                    error!(%role, crashes, ?window, retry_in = ?retry, "crashed too often: marked failed, its clients get an error (retried after the backoff, or now at SIGUSR1)");
                    let all_failed = (0..self.workers)
                        .all(|i| self.slots.get(&Role::Worker(i)).is_some_and(|s| s.failed));
                    if all_failed {
                        self.stats.header().pool_failed.store(1, Ordering::Relaxed);
                        error!("every worker failed: new connections are refused");
                        if !self.ever_attached {
                            self.startup_failure = Some(format!(
                                "every worker failed during start-up (none attached to its rings; last: {role} {status:?}, {crashes} crashes in {window:?})"
                            ));
                        }
                    }
                    continue;
                }
            }
            slot.quick_crashes = if lived >= STABLE_AFTER {
                0
            } else {
                slot.quick_crashes + 1
            };
            let delay = if slot.quick_crashes <= 1 {
                Duration::ZERO
            } else {
                (BACKOFF_START * 2u32.saturating_pow(slot.quick_crashes - 2)).min(BACKOFF_MAX)
            };
            slot.restart_at = Some(Instant::now() + delay);
            match role {
                Role::Worker(w) => {
                    let ws = self.stats.worker(w);
                    ws.crashes.fetch_add(1, Ordering::Relaxed);
                    ws.pid.store(0, Ordering::Relaxed);
                    ws.state
                        .store(WorkerState::Restarting as u32, Ordering::Relaxed);
                    self.reset_quarantined(w);
                }
                Role::Front(f) => {
                    self.forget_front_connections(f);
                    self.reset_front_rings(f);
                }
            }
            warn!(%role, pid = pid.as_raw(), ?status, ?lived, restart_in = ?delay, "process exited; restarting");
        }
        if worker_died {
            self.kill_strays();
        }
    }

    /// After a crash of worker `w`: which frame was it in? The same frame in flight at more
    /// than `dead_letter_after` crashes in a row (the first delivery and each redelivery) is
    /// dead-lettered. Returns how many crashes that frame caused (they are forgiven).
    fn note_crash_frames(&mut self, w: usize) -> u32 {
        let mut forgiven = 0;
        for f in 0..self.cfg.fronts {
            let ring = &self.rings[f][w].0;
            let h = ring.header();
            let head = h.head.load(Ordering::Relaxed);
            // Acquire: pairs with the front's Release store of the tail; the records up to it
            // are read below.
            let tail = h.tail.load(Ordering::Acquire);
            // Written by the dead worker: believed only within what it had not released of
            // what the front published. Cleared, so that a replacement that dies before it
            // reaches any frame does not look as if it died on this one again.
            let at = ring.user_words()[INFLIGHT_WORD].swap(0, Ordering::Relaxed);
            let suspect = &mut self.suspects[f][w];
            if self.cfg.dead_letter_after == 0 || !(head < at && at <= tail) {
                *suspect = (0, 0);
                continue;
            }
            if suspect.0 == at {
                suspect.1 += 1;
            } else {
                *suspect = (at, 1);
            }
            if suspect.1 <= self.cfg.dead_letter_after {
                continue;
            }
            forgiven = forgiven.max(suspect.1);
            *suspect = (0, 0);
            self.dead_letter(f, w, at);
        }
        forgiven
    }

    /// Dead-letters the frame ending at request position `at` of ring (f, w), with its worker
    /// dead: the replacement skips it, its connection is closed with an error by the front.
    fn dead_letter(&mut self, f: usize, w: usize, at: u64) {
        let codec = self.cfg.listeners()[self.worker_listener[w]].codec();
        let ring = &self.rings[f][w].0;
        let words = ring.user_words();
        // Two slots, so that two poison frames in one redelivered batch do not take turns;
        // the older (lower) position is overwritten.
        let [a, b] = DEAD_LETTER_WORDS;
        let slot = if words[a].load(Ordering::Relaxed) <= words[b].load(Ordering::Relaxed) {
            a
        } else {
            b
        };
        words[slot].store(at, Ordering::Relaxed);
        let conn = frame_conn(ring, codec, at);
        let ws = self.stats.worker(w);
        ws.dead_letters.fetch_add(1, Ordering::Relaxed);
        ws.dead_letter_conn
            .store(conn.unwrap_or(0), Ordering::Relaxed);
        ws.dead_letter_pos.store(at, Ordering::Relaxed);
        ws.dead_letter_unix_ms.store(unix_ms(), Ordering::Relaxed);
        match conn {
            Some(conn) => {
                // One connection at a time: a front takes it within its 100 ms check (a rare
                // wait, on a crash path); if it does not, this one replaces the older.
                let deadline = Instant::now() + Duration::from_millis(500);
                while ws.dead_letter_pending.load(Ordering::Relaxed) != 0
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Release: pairs with the front's Acquire load of the mailbox.
                ws.dead_letter_pending.store(conn, Ordering::Release);
                error!(
                    front = f,
                    worker = w,
                    position = at,
                    conn = %shmrelay_worker::ConnId::from_raw(conn),
                    "a frame crashed its worker {} times in a row: dead-lettered (skipped by the replacement; its connection gets an error and is closed)",
                    self.cfg.dead_letter_after + 1
                );
            }
            None => error!(
                front = f,
                worker = w,
                position = at,
                "a frame crashed its worker repeatedly: dead-lettered, but its connection was not found in the ring"
            ),
        }
    }

    /// Kills the unknown children of this process (orphans of workers, reparented here as
    /// the subreaper) until none is left; returns how many were killed.
    fn kill_strays(&mut self) -> usize {
        let me = std::process::id();
        let mut killed = std::collections::HashSet::new();
        for _ in 0..100 {
            let mut known: Vec<u32> = self
                .slots
                .values()
                .filter_map(|s| s.pid)
                .map(|p| p.as_raw() as u32)
                .collect();
            known.extend(&self.inherited_children);
            let strays: Vec<(u32, bool)> = watchdog::children(me)
                .into_iter()
                .filter(|(pid, _)| !known.contains(pid))
                .collect();
            if strays.is_empty() {
                break;
            }
            for (pid, zombie) in strays {
                if !zombie && killed.insert(pid) {
                    warn!(pid, "killing a process a worker left behind");
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if !killed.is_empty() {
            self.stats
                .header()
                .orphans_killed
                .fetch_add(killed.len() as u64, Ordering::Relaxed);
        }
        killed.len()
    }

    /// SIGUSR1: every failed worker is retried now, with a clean crash record.
    fn revive(&mut self) {
        let now = Instant::now();
        for (role, s) in self.slots.iter_mut() {
            if s.failed && s.pid.is_none() {
                info!(%role, "revived by SIGUSR1: retrying now");
                s.crashes.clear();
                s.fail_count = 0;
                s.restart_at = Some(now);
            }
        }
    }

    /// Workers that attached, and failed workers whose retry has run long enough to count
    /// as healthy again.
    fn watch_lifecycles(&mut self) {
        let mut recovered = false;
        for w in 0..self.workers {
            let Some(s) = self.slots.get_mut(&Role::Worker(w)) else {
                continue;
            };
            if s.pid.is_none() {
                continue;
            }
            if !self.ever_attached && worker_attaches(&self.rings, w) != s.attach_base {
                self.ever_attached = true;
            }
            if s.failed && s.started.elapsed() >= STABLE_AFTER {
                info!(
                    worker = w,
                    "failed worker ran stably after its retry: healthy again"
                );
                s.failed = false;
                s.fail_count = 0;
                recovered = true;
            }
        }
        if recovered {
            self.stats.header().pool_failed.store(0, Ordering::Relaxed);
        }
    }

    /// A front whose loop stopped publishing activity (SIGSTOP, stuck) for `hang_timeout_ms`
    /// is killed and replaced, like a hung worker: its clients are disconnected and can
    /// reconnect at once to the others (or to its replacement).
    fn watch_fronts(&mut self) {
        let timeout = Duration::from_millis(self.cfg.hang_timeout_ms);
        for f in 0..self.cfg.fronts {
            let Some(s) = self.slots.get(&Role::Front(f)) else {
                continue;
            };
            let Some(pid) = s.pid else { continue };
            let active = self.stats.front(f).active_ns.load(Ordering::Relaxed);
            let seen = &mut self.front_seen[f];
            if active != seen.0 {
                *seen = (active, Instant::now());
                continue;
            }
            if seen.1.elapsed() < timeout || s.started.elapsed() < timeout {
                continue;
            }
            let stalled = seen.1.elapsed();
            seen.1 = Instant::now();
            self.stats
                .front_process(f)
                .hangs
                .fetch_add(1, Ordering::Relaxed);
            if self.cfg.kill_hung {
                error!(
                    front = f,
                    pid = pid.as_raw(),
                    ?stalled,
                    "front stalled (no loop activity): killing it; it is replaced"
                );
                let _ = kill(pid, Signal::SIGKILL);
            } else {
                error!(
                    front = f,
                    pid = pid.as_raw(),
                    ?stalled,
                    "front stalled (no loop activity) (kill_hung = false: left running)"
                );
            }
        }
    }

    /// A dead front's connections died with it (the kernel closed them): give their places in
    /// the global admission counts back.
    fn forget_front_connections(&self, f: usize) {
        let fs = self.stats.front(f);
        let open = fs.conns_open.swap(0, Ordering::Relaxed);
        fs.conns_draining.store(0, Ordering::Relaxed);
        let total = &self.stats.header().conns_total;
        let _ = total.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
            Some(t.saturating_sub(open))
        });
        for slot in 0..shmrelay::stats::ADDR_SLOTS {
            self.stats.addr_slot(f, slot).store(0, Ordering::Relaxed);
        }
    }

    /// Tells every worker that front `f` died, by a FRONT_RESET record in each of its request
    /// rings (the supervisor is the producer while no front is): each worker reports a CLOSE
    /// for every connection of that front. Replies still in the reply rings are dropped by the
    /// new front as stale (its connection ids start at new generations).
    fn reset_front_rings(&mut self, f: usize) {
        for w in 0..self.workers {
            let ring = &self.rings[f][w].0;
            let mut tx = match shm_ring::Producer::new(ring) {
                Ok(tx) => tx,
                Err(e) => {
                    error!(front = f, worker = w, "cannot reset the request ring: {e}");
                    continue;
                }
            };
            tx.set_doorbell(Doorbell::Both(self.worker_bells[w].clone()));
            let meta = Meta::tag(tag::FRONT_RESET).conn(f as u64);
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                match tx.push(meta, &[]) {
                    Ok(_) => {
                        tx.publish();
                        break;
                    }
                    Err(shm_ring::ReserveError::Full) if Instant::now() < deadline => {
                        let _ = tx.wait_for_space(0, Some(Duration::from_millis(50)));
                    }
                    Err(e) => {
                        warn!(
                            front = f,
                            worker = w,
                            "worker not told of the dead front's connections: {e}"
                        );
                        break;
                    }
                }
            }
        }
    }

    /// Replaces workers whose rings a front quarantined (they wrote garbage into shared
    /// memory): kill the worker; once it is dead, reset the pair of rings and hand them back
    /// to the front before the replacement attaches.
    fn watch_quarantines(&mut self) {
        for f in 0..self.cfg.fronts {
            // Acquire: pairs with the front's Release when it set the bit after its last use.
            let q = self.stats.front(f).quarantined.load(Ordering::Acquire);
            for w in 0..self.workers {
                if q & (1 << w) == 0 {
                    continue;
                }
                match self.slots.get(&Role::Worker(w)).and_then(|s| s.pid) {
                    Some(pid) => {
                        error!(
                            front = f,
                            worker = w,
                            pid = pid.as_raw(),
                            "the front quarantined this worker's rings: replacing the worker"
                        );
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                    None => self.reset_quarantined(w),
                }
            }
        }
    }

    /// With worker `w` dead (its group and strays killed): a new ring generation. Fresh rings
    /// for every (front, `w`), handed to each running front, which carries the unanswered
    /// requests over (see front/generation.rs) and drops the old ones; only then are they
    /// stored for the replacement. Nothing any old process still maps reaches it. A front
    /// that does not take them within `GENERATION_ACK` is restarted (its replacement starts
    /// on the new rings; its clients reconnect).
    fn new_generation(&mut self, w: usize) {
        let cap = self.cfg.ring_capacity();
        for f in 0..self.cfg.fronts {
            let fresh = new_ring(&self.cfg.instance, f, w, Dir::Request, cap)
                .and_then(|req| Ok((req, new_ring(&self.cfg.instance, f, w, Dir::Reply, cap)?)));
            let (req, rep) = match fresh {
                Ok(pair) => pair,
                Err(e) => {
                    error!(
                        front = f,
                        worker = w,
                        "no new ring generation, the replacement reuses the rings: {e:#}"
                    );
                    continue;
                }
            };
            {
                // The dead-letter positions (the supervisor's, written in `dead_letter`): the
                // positions carried over are the same.
                let (old, new) = (self.rings[f][w].0.user_words(), req.user_words());
                for i in DEAD_LETTER_WORDS {
                    new[i].store(old[i].load(Ordering::Relaxed), Ordering::Relaxed);
                }
            }
            let front = self.slots.get(&Role::Front(f)).and_then(|s| s.pid);
            if let Some(pid) = front {
                match self.send_generation(f, w, &req, &rep) {
                    Ok(status) if status == front_generation::CARRIED => {
                        info!(front = f, worker = w, "new ring generation, requests carried over")
                    }
                    Ok(status) if status == front_generation::QUARANTINED => info!(
                        front = f,
                        worker = w,
                        "new ring generation for rings the front quarantined"
                    ),
                    Ok(_) => warn!(
                        front = f,
                        worker = w,
                        "new ring generation; the front could not carry the requests over and closed the worker's connections"
                    ),
                    Err(e) => {
                        error!(
                            front = f,
                            worker = w,
                            pid = pid.as_raw(),
                            "the front did not take the new ring generation: {e:#}; restarting the front"
                        );
                        let _ = kill(pid, Signal::SIGKILL);
                        // A fresh socket: its replacement must not read this message.
                        match control_pair() {
                            Ok(c) => self.controls[f] = c,
                            Err(e) => error!(front = f, "{e:#}"),
                        }
                    }
                }
            }
            self.rings[f][w] = (req, rep);
            self.hangs[f][w].reset();
        }
    }

    /// Sends front `f` worker `w`'s new rings and waits for its answer (its status).
    fn send_generation(&mut self, f: usize, w: usize, req: &ShmRing, rep: &ShmRing) -> Result<u64> {
        let c = &mut self.controls[f];
        c.seq += 1;
        let seq = c.seq;
        let mut msg = [0u8; 24];
        msg[..8].copy_from_slice(&front_generation::MAGIC.to_ne_bytes());
        msg[8..16].copy_from_slice(&seq.to_ne_bytes());
        msg[16..].copy_from_slice(&(w as u64).to_ne_bytes());
        shm_ring::send_fds(&c.sup, &msg, &[req.fd(), rep.fd()]).context("sending the rings")?;
        let deadline = Instant::now() + GENERATION_ACK;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no answer within {GENERATION_ACK:?}");
            }
            c.sup.set_read_timeout(Some(left))?;
            let mut ack = [0u8; 16];
            match c.sup.read(&mut ack) {
                Ok(16) => {
                    let word = |i: usize| {
                        u64::from_ne_bytes(ack[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
                    };
                    if word(0) != seq {
                        continue; // an answer to an older message
                    }
                    if word(1) == front_generation::REFUSED {
                        bail!("the front refused the rings");
                    }
                    return Ok(word(1));
                }
                Ok(0) => bail!("the front closed its control socket"),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!("no answer within {GENERATION_ACK:?}")
                }
                Err(e) => return Err(e).context("reading the front's answer"),
            }
        }
    }

    /// With worker `w` dead, resets every pair of rings a front quarantined with it.
    fn reset_quarantined(&mut self, w: usize) {
        for f in 0..self.cfg.fronts {
            let fs = self.stats.front(f);
            if fs.quarantined.load(Ordering::Acquire) & (1 << w) == 0 {
                continue;
            }
            let (req, rep) = &self.rings[f][w];
            req.reset();
            rep.reset();
            self.hangs[f][w].reset();
            self.suspects[f][w] = (0, 0);
            // Release: the front re-attaches once it sees the bit clear, after the reset.
            fs.quarantined.fetch_and(!(1 << w), Ordering::Release);
            info!(front = f, worker = w, "rings reset after quarantine");
        }
    }

    /// Samples every worker's request rings for a hang; reports it and, if configured, kills
    /// the worker (the reaper restarts it, and its replacement gets the waiting frames).
    fn watch_hangs(&mut self) {
        let timeout = Duration::from_millis(self.cfg.hang_timeout_ms);
        for w in 0..self.workers {
            let Some(pid) = self.slots.get(&Role::Worker(w)).and_then(|s| s.pid) else {
                continue;
            };
            let mut hung = None;
            let mut recovered = false;
            for f in 0..self.cfg.fronts {
                match self.hangs[f][w].sample(&self.rings[f][w].0, timeout) {
                    Hang::Detected(d) => hung = Some(d),
                    Hang::Recovered => recovered = true,
                    Hang::Fine | Hang::Ongoing => {}
                }
            }
            let ws = self.stats.worker(w);
            if let Some(d) = hung {
                ws.hangs.fetch_add(1, Ordering::Relaxed);
                ws.state.store(WorkerState::Hung as u32, Ordering::Relaxed);
                if self.cfg.kill_hung {
                    error!(worker = w, pid = pid.as_raw(), stuck = ?d, "worker hung: killing it; its replacement gets the waiting frames");
                    let _ = kill(pid, Signal::SIGKILL);
                } else {
                    error!(worker = w, pid = pid.as_raw(), stuck = ?d, "worker hung (kill_hung = false: left running)");
                }
            } else if recovered {
                info!(worker = w, pid = pid.as_raw(), "worker consuming again");
                ws.state
                    .store(WorkerState::Running as u32, Ordering::Relaxed);
            }
        }
    }

    /// Memory and fd counts of every process, and growth beyond what their work explains.
    fn sample_processes(&mut self) {
        let h = self.stats.header();
        let me = std::process::id();
        if let Some((rss, fds)) = watchdog::process_metrics(me) {
            h.supervisor_rss_kb.store(rss, Ordering::Relaxed);
            h.supervisor_fds.store(fds, Ordering::Relaxed);
            self.note_growth(None, me, rss, fds, 0);
        }
        let roles: Vec<(Role, Pid)> = self
            .slots
            .iter()
            .filter_map(|(r, s)| Some((*r, s.pid?)))
            .collect();
        for (role, pid) in roles {
            let Some((rss, fds)) = watchdog::process_metrics(pid.as_raw() as u32) else {
                continue;
            };
            let (block, conns) = match role {
                Role::Worker(w) => (self.stats.worker(w), 0),
                Role::Front(f) => (
                    self.stats.front_process(f),
                    self.stats.front(f).conns_open.load(Ordering::Relaxed),
                ),
            };
            block.rss_kb.store(rss, Ordering::Relaxed);
            block.fds.store(fds, Ordering::Relaxed);
            self.note_growth(Some(role), pid.as_raw() as u32, rss, fds, conns);
        }
    }

    fn note_growth(&mut self, role: Option<Role>, pid: u32, rss: u64, fds: u64, conns: u64) {
        // A connection legitimately holds one fd and a few KiB (socket buffers are the kernel's).
        let g = match role {
            Some(r) => match self.slots.get_mut(&r) {
                Some(s) => &mut s.growth,
                None => return,
            },
            None => &mut self.supervisor_growth,
        };
        let ev = g.sample(pid, rss, fds, conns, conns * 4);
        let h = self.stats.header();
        let who = role.map_or("supervisor".to_owned(), |r| r.to_string());
        if ev.fds {
            h.fd_growth_events.fetch_add(1, Ordering::Relaxed);
            warn!(
                process = who,
                pid, fds, "open fds grew beyond the baseline: possible fd leak"
            );
        }
        if ev.rss {
            h.rss_growth_events.fetch_add(1, Ordering::Relaxed);
            warn!(
                process = who,
                pid,
                rss_kb = rss,
                "resident memory doubled beyond the baseline: possible leak"
            );
        }
    }

    fn restart_due(&mut self) -> Result<()> {
        let now = Instant::now();
        let due: Vec<Role> = self
            .slots
            .iter()
            .filter(|(_, s)| s.restart_at.is_some_and(|t| t <= now))
            .map(|(&r, _)| r)
            .collect();
        for role in due {
            match self.start(role) {
                Ok(Some(ready)) => {
                    if let Role::Front(f) = role {
                        if let Err(e) = wait_ready(Some(ready), f) {
                            error!(%role, "{e:#}");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    error!(%role, "restart failed: {e:#}");
                    if let Some(s) = self.slots.get_mut(&role) {
                        s.restart_at = Some(now + BACKOFF_MAX);
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies the counters and ring snapshots into the operators' view.
    fn publish(&mut self) {
        if let Err(e) = self.publisher.publish(&self.stats, &self.rings) {
            warn!("publishing the stats view: {e}");
        }
    }

    /// Drains fronts first (they stop accepting and wait for in-flight replies, which the
    /// workers are still there to produce), then stops the workers, then removes every segment.
    fn shutdown(&mut self) {
        self.stats.header().draining.store(1, Ordering::Relaxed);
        for s in self.slots.values_mut() {
            s.restart_at = None;
        }
        let drain = Duration::from_millis(self.cfg.drain_ms);
        self.stop_role(
            |r| matches!(r, Role::Front(_)),
            drain + Duration::from_secs(2),
        );
        let workers: Vec<Pid> = self
            .slots
            .iter()
            .filter(|(r, _)| matches!(r, Role::Worker(_)))
            .filter_map(|(_, s)| s.pid)
            .collect();
        self.stop_role(|r| matches!(r, Role::Worker(_)), Duration::from_secs(3));
        // Nothing a worker started outlives the relay: its process group, then anything that
        // left the group and was reparented here.
        for pid in workers {
            kill_group(pid);
        }
        self.kill_strays();
        self.publish();
        // Only this run's own file: never a file another run put at the name.
        self.publisher.remove();
        info!("stopped; segments removed");
    }

    fn stop_role(&mut self, which: impl Fn(Role) -> bool, grace: Duration) {
        let pids = |slots: &HashMap<Role, Slot>| -> Vec<Pid> {
            slots
                .iter()
                .filter(|(r, _)| which(**r))
                .filter_map(|(_, s)| s.pid)
                .collect()
        };
        for pid in pids(&self.slots) {
            let _ = kill(pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while !pids(&self.slots).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            self.reap_quietly();
        }
        for pid in pids(&self.slots) {
            warn!(pid = pid.as_raw(), "did not stop in time; killing");
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
        self.reap_quietly();
        for s in self.slots.values_mut() {
            if s.pid
                .is_some_and(|p| !shm_ring::process_alive(p.as_raw() as u32))
            {
                s.pid = None;
            }
        }
    }

    fn reap_quietly(&mut self) {
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            let Some(pid) = status.pid() else { break };
            for s in self.slots.values_mut() {
                if s.pid == Some(pid) {
                    s.pid = None;
                }
            }
        }
    }
}

/// Kills the process group a worker led (it and whatever it started that stayed in it), and
/// waits (up to a second) until no member is left, reaping those that are our children, so
/// that no process of the old group still runs when a replacement starts.
fn kill_group(leader: Pid) {
    let group = Pid::from_raw(-leader.as_raw());
    // A group id is not reused while any member lives; with none left this is ESRCH.
    let _ = kill(group, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        // Members whose parent died were reparented here (subreaper): reap them.
        while let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
            waitpid(group, Some(WaitPidFlag::WNOHANG))
        {}
        if kill(group, None) == Err(nix::errno::Errno::ESRCH) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    warn!(
        group = leader.as_raw(),
        "processes of a dead worker's group still there after SIGKILL"
    );
}

/// How many times consumers attached to worker `w`'s request rings, summed over fronts.
fn worker_attaches(rings: &[Vec<(ShmRing, ShmRing)>], w: usize) -> u32 {
    rings
        .iter()
        .map(|row| {
            row[w]
                .0
                .header()
                .consumer
                .attach_count
                .load(Ordering::Relaxed)
        })
        .fold(0u32, u32::wrapping_add)
}

/// The connection whose frame ends at request position `at` in `ring` (its consumer dead):
/// read from the records between the released position and the tail.
fn frame_conn(ring: &ShmRing, codec: shmrelay_worker::Codec, at: u64) -> Option<u64> {
    let mut rx = shm_ring::Consumer::new(ring).ok()?;
    let records = rx.records().ok()?;
    for rec in records {
        let rec = rec.ok()?;
        if rec.tag() != tag::DATA || rec.end() < at {
            continue;
        }
        let base = rec.payload_position();
        for frame in codec.frames(rec.payload()) {
            let (end, _) = frame.ok()?;
            if base + end as u64 == at {
                return Some(rec.conn());
            }
        }
        return None;
    }
    None
}

/// Waits until front `f` says it is accepting (or died trying).
fn wait_ready(ready: Option<OwnedFd>, f: usize) -> Result<()> {
    let Some(fd) = ready else { return Ok(()) };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // A signal (SIGTERM during start-up) interrupts the poll: wait on until the deadline, so
    // that the stop is handled by the main loop instead of failing the start.
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as libc::c_int;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left) };
        let interrupted =
            r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
        if !interrupted || left == 0 {
            break r;
        }
    };
    let mut byte = [0u8; 1];
    let n = if r > 0 {
        std::fs::File::from(fd).read(&mut byte).unwrap_or(0)
    } else {
        0
    };
    if n == 1 {
        Ok(())
    } else {
        bail!("front {f} did not become ready (see its log above)")
    }
}

/// A listening socket with SO_REUSEPORT, so that one per front can share the port.
fn listen(addr: SocketAddr, backlog: i32) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{
        bind, listen as nix_listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag,
        SockType, SockaddrStorage,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    nix_listen(&fd, Backlog::new(backlog).unwrap_or(Backlog::MAXCONN))?;
    // SAFETY: `fd` is a listening TCP socket we own; ownership moves into the listener.
    Ok(unsafe { std::net::TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) })
}
