//! The relay under test: the `shmrelay` binary found (or built), started as a real process
//! tree on 127.0.0.1:0, read through its stats view, and killed with its files on drop or by
//! the [`Watchdog`] when a test hangs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use shmrelay::stats::{FrontStats, Stats};
use shmrelay_worker::CloseReason;

use crate::client::{Client, Recv};
use crate::eventually;

/// Path of the `shmrelay` binary, built on first use if it is missing.
pub fn shmrelay_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("SHMRELAY_BIN") {
            return PathBuf::from(p);
        }
        workspace_bin("shmrelay", "shmrelay", &[])
    })
}

/// Path of binary `bin` of workspace package `package` (say `cluster-worker` of
/// `shmrelay-cluster`), found next to the test executable and built with `cargo build -p
/// PACKAGE --bin BIN` (same profile and target directory) when it is missing or older than the
/// relay's sources or the folders `sources` (relative to the workspace root).
pub fn workspace_bin(package: &str, bin: &str, sources: &[&str]) -> PathBuf {
    {
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test-hash>  ->  target/<profile>
        let profile_dir = exe
            .parent()
            .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
            .and_then(Path::parent)
            .unwrap_or_else(|| exe.parent().expect("exe has a parent"))
            .to_path_buf();
        let path = profile_dir.join(bin);
        // `cargo test -p shmrelay-tests` rebuilds the relay's library for the harness, never
        // its binary: a binary older than the sources would test old code against new stats
        // layouts, so it is rebuilt then too.
        if !path.exists() || older_than_sources(&path, sources) {
            build_bin(&profile_dir, package, bin);
        }
        assert!(
            path.exists(),
            "{} missing after `cargo build -p {package}`",
            path.display()
        );
        path
    }
}

/// True if a source of the binary (relay, worker SDK, ring, workspace manifest or lock file,
/// or one of `extra`) was modified after `bin`.
fn older_than_sources(bin: &Path, extra: &[&str]) -> bool {
    fn newest(path: &Path, acc: &mut std::time::SystemTime) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.is_dir() {
            for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
                newest(&e.path(), acc);
            }
        } else if let Ok(m) = meta.modified() {
            *acc = (*acc).max(m);
        }
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return true;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut latest = std::time::UNIX_EPOCH;
    for p in [
        "Cargo.toml",
        "Cargo.lock",
        "relay/Cargo.toml",
        "relay/src",
        "workers/Cargo.toml",
        "workers/src",
        "shm-ring/Cargo.toml",
        "shm-ring/src",
    ]
    .iter()
    .chain(extra)
    {
        newest(&root.join(p), &mut latest);
    }
    latest > built
}

/// Runs `cargo build -p PACKAGE --bin BIN` into the target directory and profile of this
/// test binary.
fn build_bin(profile_dir: &Path, package: &str, bin: &str) {
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile directory name")
        .to_owned();
    let mut target_dir = profile_dir.parent().expect("target directory");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "-p", package, "--bin", bin]);
    // <target>/<triple>/<profile>: cross builds put the profile one level deeper. Asked of
    // rustc, not guessed from files in the directory (a copied target directory lacks them).
    if let Some(triple) = target_dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| is_target_triple(n))
    {
        cmd.args(["--target", triple]);
        target_dir = target_dir.parent().expect("target directory");
    }
    cmd.env("CARGO_TARGET_DIR", target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!("building {bin}: {cmd:?}");
    let status = cmd.status().expect("run cargo build");
    assert!(
        status.success(),
        "cargo build -p {package} failed: {status}"
    );
}

/// Whether `name` is a target triple rustc knows (`rustc --print target-list`).
fn is_target_triple(name: &str) -> bool {
    if name.matches('-').count() < 2 {
        return false;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    Command::new(rustc)
        .args(["--print", "target-list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == name)
        })
        .unwrap_or(false)
}

/// The instance name of a test relay: `t-NAME-PID`, unique across concurrent test binaries.
fn instance_name(name: &str) -> String {
    format!("t-{name}-{}", std::process::id())
}

/// Relays alive in this test process, for the watchdog: (supervisor pid, instance).
static LIVE: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());

fn remove_instance_files(instance: &str) {
    for f in shmrelay::names::instance_files(instance) {
        let _ = std::fs::remove_file(f);
    }
}

/// Kills a test that hangs: after `limit`, every relay of this process is killed (SIGKILL on
/// the supervisor; fronts and workers follow through PR_SET_PDEATHSIG), its segments removed,
/// and the process aborts. Dropping the watchdog disarms it. The clock starts after the
/// `shmrelay` binary is found (or built).
pub struct Watchdog {
    disarm: Option<std::sync::mpsc::Sender<()>>,
}

impl Watchdog {
    pub fn new(label: &str, limit: Duration) -> Watchdog {
        // A first build of the binary is not the test hanging: do it before the clock starts.
        shmrelay_bin();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let label = label.to_owned();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("watchdog: test `{label}` still running after {limit:?}; aborting");
                let live = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
                for (pid, instance) in live {
                    // SAFETY: SIGKILL to a child this process started.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    std::thread::sleep(Duration::from_millis(50));
                    remove_instance_files(&instance);
                }
                std::process::abort();
            }
        });
        Watchdog { disarm: Some(tx) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.disarm.take() {
            let _ = tx.send(());
        }
    }
}

/// A running relay; killed (with its whole tree) and its segments removed on drop.
pub struct Relay {
    pub child: Child,
    /// The first listener's address.
    pub addr: SocketAddr,
    pub instance: String,
    /// Where `--metrics` serves, if it was given.
    pub metrics: Option<SocketAddr>,
    /// `SHMRELAY_SHM_DIR` given to it, if any (its files are then the test's to remove).
    pub shm_dir: Option<PathBuf>,
    /// Stop with SIGTERM first on drop (the supervisor removes its own files).
    graceful: bool,
}

impl Relay {
    /// Starts `shmrelay --listen 127.0.0.1:0 --instance t-NAME-PID ARGS...` and waits for its
    /// `listening on` line (its workers may still be starting: see [`Relay::start_serving`]).
    pub fn start(name: &str, args: &[&str]) -> Relay {
        Relay::start_n(name, args, 1).0
    }

    /// Starts `shmrelay` with a config file holding `toml` (e.g. `[[listener]]` tables, which
    /// then give every address: no `--listen`) and waits for `listeners` listening lines;
    /// returns every listener's address, in order.
    pub fn start_config(
        name: &str,
        toml: &str,
        listeners: usize,
        args: &[&str],
    ) -> (Relay, Vec<SocketAddr>) {
        let path =
            std::env::temp_dir().join(format!("shmrelay-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, toml).expect("write config");
        let mut all = vec!["--config", path.to_str().unwrap()];
        all.extend_from_slice(args);
        let r = Relay::start_n(name, &all, listeners);
        let _ = std::fs::remove_file(&path);
        r
    }

    /// Starts `shmrelay` and waits for `n` listening lines.
    pub fn start_n(name: &str, args: &[&str], n: usize) -> (Relay, Vec<SocketAddr>) {
        Relay::spawn(&instance_name(name), args, n, "warn", None, &[])
    }

    /// As [`Relay::start_config`], with the relay's command line after `wrapper` (say
    /// `ip netns exec NS`, to run it as another host; the wrapper must exec the relay, so
    /// that the child's pid is the supervisor's).
    pub fn start_config_wrapped(
        name: &str,
        wrapper: &[&str],
        toml: &str,
        listeners: usize,
    ) -> (Relay, Vec<SocketAddr>) {
        let path =
            std::env::temp_dir().join(format!("shmrelay-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, toml).expect("write config");
        let args = ["--config", path.to_str().unwrap()];
        let r = Relay::spawn(
            &instance_name(name),
            &args,
            listeners,
            "warn",
            None,
            wrapper,
        );
        let _ = std::fs::remove_file(&path);
        r
    }

    /// Starts `shmrelay --listen 127.0.0.1:0 --instance INSTANCE ARGS...` under exactly that
    /// name, in `shm_dir` (`SHMRELAY_SHM_DIR`) if given, for tests that look at instances by
    /// name (relayctl). On drop it gets SIGTERM first, so its supervisor stops its children and
    /// removes its files, then SIGKILL after 10 s.
    pub fn start_named(instance: &str, args: &[&str], shm_dir: Option<&Path>) -> Relay {
        let (mut relay, _) = Relay::spawn(instance, args, 1, "warn", shm_dir, &[]);
        relay.graceful = true;
        relay
    }

    /// Starts `shmrelay` (logging only errors, for tests that provoke many warnings) and
    /// waits until it serves: one round trip echoed, and that connection closed again.
    pub fn start_serving(name: &str, args: &[&str]) -> Relay {
        let (relay, _) = Relay::spawn(&instance_name(name), args, 1, "error", None, &[]);
        // Workers start after `listening on`: wait until one round trip works.
        let mut c = relay.connect();
        assert_eq!(
            c.roundtrip_within(b"ready?", Duration::from_secs(20)),
            Recv::Frame(b"ready?".to_vec()),
            "relay {} does not serve",
            relay.instance
        );
        drop(c);
        assert!(
            eventually(Duration::from_secs(10), || relay.conns_total() == 0),
            "the readiness connection did not close"
        );
        relay
    }

    /// Starts `shmrelay --listen 127.0.0.1:0 --instance INSTANCE ARGS...` (in `shm_dir` if
    /// given, after the command `wrapper` if not empty) with `RUST_LOG` (unless set) at `log`,
    /// and waits for `n` `listening on` lines.
    fn spawn(
        instance: &str,
        args: &[&str],
        n: usize,
        log: &str,
        shm_dir: Option<&Path>,
        wrapper: &[&str],
    ) -> (Relay, Vec<SocketAddr>) {
        let instance = instance.to_owned();
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(shmrelay_bin());
                c
            }
            None => Command::new(shmrelay_bin()),
        };
        // A config file with `[[listener]]` tables gives every address itself (`--listen`
        // beside them is an error).
        let tables = args.windows(2).any(|w| {
            w[0] == "--config"
                && std::fs::read_to_string(w[1]).is_ok_and(|t| t.contains("[[listener]]"))
        });
        if !tables {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        // One front unless the test asks (the relay's default, `fronts = "auto"`, sizes the
        // fronts for 100,000 connections: six here), so `front(0)` is every client's front.
        let names_fronts = args.iter().any(|a| a.contains("fronts"))
            || args.windows(2).any(|w| {
                w[0] == "--config"
                    && std::fs::read_to_string(w[1]).is_ok_and(|t| t.contains("fronts"))
            });
        if !names_fronts {
            cmd.args(["--fronts", "1"]);
        }
        cmd.args(["--instance", &instance])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| log.into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        match shm_dir {
            Some(dir) => {
                cmd.env("SHMRELAY_SHM_DIR", dir);
            }
            None => remove_instance_files(&instance),
        }
        let mut child = cmd.spawn().expect("start shmrelay");
        LIVE.lock().unwrap().push((child.id(), instance.to_owned()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // On a failure from here on the relay is dropped, so killed and cleaned up.
        let mut relay = Relay {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            instance,
            metrics: None,
            shm_dir: shm_dir.map(Path::to_path_buf),
            graceful: false,
        };
        let mut addrs: Vec<SocketAddr> = Vec::new();
        while addrs.len() < n {
            let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
                panic!(
                    "relay {} did not print `listening on` within 30 s",
                    relay.instance
                );
            };
            if let Some(rest) = line.split("metrics on http://").nth(1) {
                relay.metrics = rest.split('/').next().and_then(|a| a.parse().ok());
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("");
                addrs.push(addr.parse().expect("listen address"));
            }
        }
        relay.addr = addrs[0];
        (relay, addrs)
    }

    /// A relay process the test started itself (say, to give it an unusual environment),
    /// under `instance` in the default shared-memory directory: killed and its files removed
    /// on drop like any other. Its `addr` is unknown (127.0.0.1:0).
    pub fn from_child(child: Child, instance: &str) -> Relay {
        LIVE.lock().unwrap().push((child.id(), instance.to_owned()));
        Relay {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            instance: instance.to_owned(),
            metrics: None,
            shm_dir: None,
            graceful: false,
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// The operators' view, once it shows everything that happened before this call (the
    /// supervisor publishes it every 50 ms).
    pub fn stats(&self) -> Stats {
        let path = shmrelay::names::stats_path(&self.instance);
        shmrelay::view::wait_published(&path, std::time::Duration::from_secs(5));
        Stats::open_readonly(&path).expect("stats segment")
    }

    /// The operators' view as it is now, without waiting for a publish: at most one publish
    /// period (50 ms) behind. For polling loops, where `stats` would add 100 ms a turn.
    pub fn stats_now(&self) -> Stats {
        let path = shmrelay::names::stats_path(&self.instance);
        Stats::open_readonly(&path).expect("stats segment")
    }

    /// One counter of front `f`.
    pub fn front(&self, f: usize, counter: impl Fn(&FrontStats) -> &AtomicU64) -> u64 {
        counter(self.stats().front(f)).load(Ordering::Relaxed)
    }

    /// Closes with `reason` on front 0.
    pub fn closes(&self, reason: CloseReason) -> u64 {
        self.front(0, |f| &f.closes[reason as usize])
    }

    /// Every close of front 0, by reason name (for messages).
    pub fn close_summary(&self) -> String {
        let s = self.stats();
        CloseReason::ALL
            .iter()
            .filter_map(|&r| {
                let n = s.front(0).closes[r as usize].load(Ordering::Relaxed);
                (n > 0).then(|| format!("{}={n}", r.as_str()))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn front_pid(&self, f: usize) -> u32 {
        self.stats().front(f).pid.load(Ordering::Relaxed)
    }

    /// Times the supervisor restarted front `f`.
    pub fn front_restarts(&self, f: usize) -> u32 {
        self.stats().front(f).restarts.load(Ordering::Relaxed)
    }

    pub fn worker_pid(&self, w: usize) -> u32 {
        self.stats().worker(w).pid.load(Ordering::Relaxed)
    }

    /// Connections open across all fronts (the global count admission control keeps).
    pub fn conns_total(&self) -> u64 {
        self.stats().header().conns_total.load(Ordering::Relaxed)
    }

    /// Pids of the fronts and workers (from the stats segment).
    pub fn child_pids(&self) -> Vec<u32> {
        let s = self.stats();
        let h = s.header();
        let mut pids = Vec::new();
        for f in 0..h.fronts.load(Ordering::Relaxed) as usize {
            pids.push(s.front(f).pid.load(Ordering::Relaxed));
        }
        for w in 0..h.workers.load(Ordering::Relaxed) as usize {
            pids.push(s.worker(w).pid.load(Ordering::Relaxed));
        }
        pids.retain(|&p| p != 0);
        pids
    }

    /// The instance's files in the shared-memory directory.
    pub fn shm_files(&self) -> Vec<PathBuf> {
        shmrelay::names::instance_files(&self.instance)
    }

    /// Sends `sig` to the supervisor.
    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the supervisor to exit; returns its exit status code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let pid = self.child.id();
        if self.graceful {
            self.signal(libc::SIGTERM);
            let _ = self.wait_exit(Duration::from_secs(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Fronts and workers die with the supervisor (PR_SET_PDEATHSIG); give them a moment
        // before their segments go.
        std::thread::sleep(Duration::from_millis(20));
        if self.shm_dir.is_none() {
            remove_instance_files(&self.instance);
        }
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|(p, _)| *p != pid);
        }
    }
}
