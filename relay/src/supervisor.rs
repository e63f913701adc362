//! The supervisor: owns every shared resource, starts the fronts and workers, restarts them,
//! and on SIGINT/SIGTERM drains and removes everything it created.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use shm_ring::{EventFd, ShmRing};
use shmrelay::config::Config;
use shmrelay::names::{self, Dir};
use shmrelay::stats::{unix_ms, Stats};
use shmrelay_worker::protocol::env;
use tracing::{error, info, warn};

/// Restart delay after the first quick crash; doubles per further quick crash.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A process that ran this long is considered healthy again.
const STABLE_AFTER: Duration = Duration::from_secs(10);

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
}

/// Everything one instance owns.
struct Instance {
    cfg: Config,
    exe: PathBuf,
    stats: Stats,
    listener: std::net::TcpListener,
    /// rings[f][w] = (request, reply)
    rings: Vec<Vec<(ShmRing, ShmRing)>>,
    front_bells: Vec<Arc<EventFd>>,
    worker_bells: Vec<Arc<EventFd>>,
    slots: HashMap<Role, Slot>,
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
    claim_instance(&cfg.instance)?;
    let instance = cfg.instance.clone();
    let mut inst = match Instance::create(cfg) {
        Ok(i) => i,
        Err(e) => {
            // Nothing runs yet: remove whatever part of the instance was created.
            remove_files(&instance, &[]);
            return Err(e);
        }
    };
    let result = inst.serve(&stop);
    inst.shutdown();
    result
}

/// Refuses to start over a live instance of the same name; removes a dead one's segments.
fn claim_instance(instance: &str) -> Result<()> {
    let stats_path = names::stats_path(instance);
    if stats_path.exists() {
        let live = Stats::open_readonly(&stats_path)
            .ok()
            .map(|s| s.header().supervisor_pid.load(Ordering::Relaxed))
            .filter(|&pid| pid != std::process::id() && shm_ring::process_alive(pid));
        if let Some(pid) = live {
            bail!("instance {instance:?} is already running (supervisor pid {pid}); stop it or pick another --instance");
        }
    }
    let stale = names::instance_files(instance);
    if !stale.is_empty() {
        warn!(
            instance,
            count = stale.len(),
            "removing segments left by a dead instance"
        );
        remove_files(instance, &stale);
    }
    Ok(())
}

fn remove_files(instance: &str, files: &[PathBuf]) {
    let files = if files.is_empty() {
        names::instance_files(instance)
    } else {
        files.to_vec()
    };
    for f in files {
        if let Err(e) = std::fs::remove_file(&f) {
            warn!("removing {}: {e}", f.display());
        }
    }
}

impl Instance {
    fn create(cfg: Config) -> Result<Instance> {
        let exe = std::env::current_exe().context("locating the shmrelay binary")?;
        let stats = Stats::create(&names::stats_path(&cfg.instance), cfg.fronts, cfg.workers)
            .with_context(|| {
                format!(
                    "creating the stats segment {}",
                    names::stats_path(&cfg.instance).display()
                )
            })?;
        let cap = cfg.ring_capacity();
        let mut rings = Vec::new();
        for f in 0..cfg.fronts {
            let mut row = Vec::new();
            for w in 0..cfg.workers {
                let req =
                    ShmRing::create_at(&names::ring_path(&cfg.instance, f, w, Dir::Request), cap)?;
                let rep =
                    ShmRing::create_at(&names::ring_path(&cfg.instance, f, w, Dir::Reply), cap)?;
                row.push((req, rep));
            }
            rings.push(row);
        }
        let bell = || EventFd::new().map(Arc::new).context("creating an eventfd");
        let front_bells = (0..cfg.fronts)
            .map(|_| bell())
            .collect::<Result<Vec<_>>>()?;
        let worker_bells = (0..cfg.workers)
            .map(|_| bell())
            .collect::<Result<Vec<_>>>()?;
        let addr: SocketAddr = cfg.listen.parse()?;
        let listener = listen(addr, cfg.backlog).with_context(|| format!("listening on {addr}"))?;
        info!(
            instance = cfg.instance,
            fronts = cfg.fronts,
            workers = cfg.workers,
            ring_capacity = cap,
            "segments created"
        );
        Ok(Instance {
            cfg,
            exe,
            stats,
            listener,
            rings,
            front_bells,
            worker_bells,
            slots: HashMap::new(),
        })
    }

    fn serve(&mut self, stop: &AtomicBool) -> Result<()> {
        for f in 0..self.cfg.fronts {
            let ready = self.start(Role::Front(f))?;
            wait_ready(ready, f)?;
        }
        let addr = self.listener.local_addr()?;
        for w in 0..self.cfg.workers {
            self.start(Role::Worker(w))?;
        }
        info!(%addr, "listening on {addr}");
        println!(
            "shmrelay: listening on {addr} (instance {})",
            self.cfg.instance
        );
        let _ = std::io::stdout().flush();
        while !stop.load(Ordering::Relaxed) {
            self.reap();
            self.restart_due()?;
            self.stats
                .header()
                .supervisor_active_ns
                .store(shm_ring::monotonic_ns(), Ordering::Relaxed);
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
                let channels: Vec<String> = (0..self.cfg.workers)
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
                let (listen_fd, bell, stats_fd) = (
                    self.listener.as_raw_fd(),
                    self.front_bells[f].as_raw_fd(),
                    self.stats.fd().as_raw_fd(),
                );
                keep.extend([listen_fd, bell, stats_fd, ready_w.as_raw_fd()]);
                cmd.env("SHMRELAY_LISTEN_FD", listen_fd.to_string())
                    .env("SHMRELAY_DOORBELL_FD", bell.to_string())
                    .env("SHMRELAY_STATS_FD", stats_fd.to_string())
                    .env("SHMRELAY_READY_FD", ready_w.as_raw_fd().to_string())
                    .env(env::CHANNELS, channels.join(","));
                self.stats
                    .front(f)
                    .restarts
                    .store(starts, Ordering::Relaxed);
                (cmd, Some((ready_r, ready_w)))
            }
            Role::Worker(w) => {
                let mut cmd = match &self.cfg.worker_cmd {
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
                    .env(env::WORKER_INDEX, w.to_string())
                    .env(env::DOORBELL_FD, bell.to_string())
                    .env(env::RESTARTS, starts.to_string())
                    .env(env::CHANNELS, channels.join(","));
                let ws = self.stats.worker(w);
                ws.restarts.store(starts, Ordering::Relaxed);
                ws.started_unix_ms.store(unix_ms(), Ordering::Relaxed);
                (cmd, None)
            }
        };
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (fcntl, prctl, getppid, _exit) on plain integers it owns.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Die with the supervisor, even if it is SIGKILLed: no orphans.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {role} ({:?})", cmd.get_program()))?;
        let pid = Pid::from_raw(child.id() as i32);
        // The child is reaped with waitpid in `reap`; the handle is not needed.
        drop(child);
        info!(%role, pid = pid.as_raw(), starts, "started");
        if let Role::Worker(w) = role {
            self.stats
                .worker(w)
                .pid
                .store(pid.as_raw() as u32, Ordering::Relaxed);
        }
        let slot = self.slots.entry(role).or_insert(Slot {
            pid: None,
            started: Instant::now(),
            starts: 0,
            quick_crashes: 0,
            restart_at: None,
        });
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
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let Some(pid) = status.pid() else { continue };
            let Some((&role, slot)) = self.slots.iter_mut().find(|(_, s)| s.pid == Some(pid))
            else {
                continue;
            };
            slot.pid = None;
            let lived = slot.started.elapsed();
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
                }
                Role::Front(f) => self.forget_front_connections(f),
            }
            warn!(%role, pid = pid.as_raw(), ?status, ?lived, restart_in = ?delay, "process exited; restarting");
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
        self.stop_role(|r| matches!(r, Role::Worker(_)), Duration::from_secs(3));
        remove_files(&self.cfg.instance, &[]);
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

/// Waits until front `f` says it is accepting (or died trying).
fn wait_ready(ready: Option<OwnedFd>, f: usize) -> Result<()> {
    let Some(fd) = ready else { return Ok(()) };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, 10_000) };
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

/// A listening socket for all fronts to share. One socket rather than one per front with
/// SO_REUSEPORT: a front that dies loses no queued connection, and the port stays open while
/// it restarts.
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
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    nix_listen(&fd, Backlog::new(backlog).unwrap_or(Backlog::MAXCONN))?;
    // SAFETY: `fd` is a listening TCP socket we own; ownership moves into the listener.
    Ok(unsafe { std::net::TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) })
}
