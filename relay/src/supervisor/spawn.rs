//! Starting one front or worker process: its command line, the fds it inherits and the
//! environment that names them (see `shmrelay_worker::protocol::env`).

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;
use shm_ring::EventFd;
use shmrelay::stats::{unix_ms, WorkerState};
use shmrelay_worker::protocol::{env, Channel};
use tracing::info;

use super::restart::worker_attaches;
use super::{Instance, Role, Slot};
use crate::watchdog::Growth;

/// Waits until front `f` says it is accepting (or died trying).
pub(super) fn wait_ready(ready: Option<OwnedFd>, f: usize) -> Result<()> {
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

impl Instance {
    /// Ring pair (f, w) as one end is handed it: `peer` is the process at the other end, whose
    /// doorbell is `bell`.
    fn channel(&self, f: usize, w: usize, peer: usize, bell: &EventFd) -> Channel {
        let (req, rep) = &self.rings[f][w];
        Channel {
            peer,
            request_fd: req.fd().as_raw_fd(),
            reply_fd: rep.fd().as_raw_fd(),
            doorbell_fd: bell.as_raw_fd(),
        }
    }

    /// Starts one process. For a front, returns the read end of its readiness pipe.
    pub(super) fn start(&mut self, role: Role) -> Result<Option<OwnedFd>> {
        let mut keep: Vec<RawFd> = Vec::new();
        let starts = self.slots.get(&role).map_or(0, |s| s.starts);
        let (mut cmd, ready) = match role {
            Role::Front(f) => {
                let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                let mut cmd = Command::new(&self.exe);
                cmd.arg("front")
                    .args(["--index", &f.to_string()])
                    .env(env::CONFIG, toml::to_string(&self.cfg)?);
                let channels: Vec<Channel> = (0..self.workers)
                    .map(|w| self.channel(f, w, w, &self.worker_bells[w]))
                    .collect();
                keep.extend(channels.iter().flat_map(Channel::fds));
                let listen_fds: Vec<RawFd> =
                    self.listeners[f].iter().map(|l| l.as_raw_fd()).collect();
                let (bell, stats_fd) =
                    (self.front_bells[f].as_raw_fd(), self.stats.fd().as_raw_fd());
                let control = self.controls[f].front_end.as_raw_fd();
                keep.extend(&listen_fds);
                keep.extend([bell, stats_fd, ready_w.as_raw_fd(), control]);
                let listen_fds: Vec<String> = listen_fds.iter().map(|fd| fd.to_string()).collect();
                cmd.env(env::INSTANCE, &self.cfg.instance)
                    .env(env::RUN, format!("{:016x}", self.publisher.token()))
                    .env(env::LISTEN_FD, listen_fds.join(","))
                    .env(env::DOORBELL_FD, bell.to_string())
                    .env(env::STATS_FD, stats_fd.to_string())
                    .env(env::READY_FD, ready_w.as_raw_fd().to_string())
                    .env(env::CONTROL_FD, control.to_string())
                    .env(env::CHANNELS, Channel::join(&channels));
                self.stats
                    .front(f)
                    .restarts
                    .store(starts, Ordering::Relaxed);
                (cmd, Some((ready_r, ready_w)))
            }
            Role::Worker(w) => {
                let spec = &self.cfg.listeners()[self.worker_listener[w]];
                let mut cmd = match &spec.worker_cmd {
                    Some(worker_cmd) => {
                        // Checked by `Config::validate` at start: a bad one never gets here.
                        let argv = worker_cmd.argv()?;
                        let mut cmd = Command::new(&argv[0]);
                        cmd.args(&argv[1..]);
                        cmd
                    }
                    None => {
                        let mut cmd = Command::new(&self.exe);
                        cmd.args(["worker", "echo"]);
                        cmd
                    }
                };
                let channels: Vec<Channel> = (0..self.cfg.fronts)
                    .map(|f| self.channel(f, w, f, &self.front_bells[f]))
                    .collect();
                keep.extend(channels.iter().flat_map(Channel::fds));
                let bell = self.worker_bells[w].as_raw_fd();
                keep.push(bell);
                cmd.env(env::INSTANCE, &self.cfg.instance)
                    .env(env::RUN, format!("{:016x}", self.publisher.token()))
                    .env(env::WORKER_INDEX, w.to_string())
                    .env(env::DOORBELL_FD, bell.to_string())
                    .env(env::RESTARTS, starts.to_string())
                    .env(env::CODEC, spec.codec().name())
                    .env(env::POOL_SIZE, spec.workers.to_string())
                    .env(env::CHANNELS, Channel::join(&channels));
                if let Some(cluster) = &self.cfg.cluster {
                    cmd.envs(cluster.worker_env());
                }
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
                self.front_seen[f] = self.stats.front(f).active_ns.load(Ordering::Relaxed);
                self.front_stall[f] = Default::default();
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
}
