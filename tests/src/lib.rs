//! Shared harness of the reliability and hostile-input tests: the `shmrelay` binary started as
//! a real process tree on a free loopback port, a buffered wire-protocol client that never
//! loses bytes to a read timeout, a probe client that keeps doing round trips in the
//! background, a watchdog that kills every relay and aborts when a test hangs, and readers of
//! the relay's stats segment.
//!
//! The binary lives in another package, so it is found next to the test executable
//! (`target/<profile>/deps/<test>` -> `target/<profile>/shmrelay`), and built once with
//! `cargo build -p shmrelay` (same profile, same target directory) when it is missing or
//! older than its sources. `SHMRELAY_BIN` overrides the path (and skips the build).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use shmrelay::stats::{FrontStats, RejectReason, Stats};
pub use shmrelay_worker::CloseReason;

/// Bytes of the frame length prefix.
pub const HEADER: usize = 4;

/// The relay's default `max_frame`.
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;

/// Path of the `shmrelay` binary, built on first use if it is missing.
pub fn shmrelay_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("SHMRELAY_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test-hash>  ->  target/<profile>
        let profile_dir = exe
            .parent()
            .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
            .and_then(Path::parent)
            .unwrap_or_else(|| exe.parent().expect("exe has a parent"))
            .to_path_buf();
        let bin = profile_dir.join("shmrelay");
        // `cargo test -p shmrelay-tests` rebuilds the relay's library for the harness, never
        // its binary: a binary older than the sources would test old code against new stats
        // layouts, so it is rebuilt then too.
        if !bin.exists() || older_than_sources(&bin) {
            build_shmrelay(&profile_dir);
        }
        assert!(
            bin.exists(),
            "{} missing after `cargo build -p shmrelay`",
            bin.display()
        );
        bin
    })
}

/// True if a source of the binary (relay, worker SDK, ring, workspace manifest or lock file)
/// was modified after `bin`.
fn older_than_sources(bin: &Path) -> bool {
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
    ] {
        newest(&root.join(p), &mut latest);
    }
    latest > built
}

/// Runs `cargo build -p shmrelay` into the target directory and profile of this test binary.
fn build_shmrelay(profile_dir: &Path) {
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile directory name")
        .to_owned();
    let target_dir = profile_dir.parent().expect("target directory");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "-p", "shmrelay", "--bin", "shmrelay"])
        .env("CARGO_TARGET_DIR", target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!("building shmrelay: {cmd:?}");
    let status = cmd.status().expect("run cargo build -p shmrelay");
    assert!(status.success(), "cargo build -p shmrelay failed: {status}");
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
    pub addr: SocketAddr,
    pub instance: String,
}

impl Relay {
    /// Starts `shmrelay --listen 127.0.0.1:0 --instance hi-NAME-PID ARGS...` and waits for
    /// `listening on`.
    pub fn start(name: &str, args: &[&str]) -> Relay {
        let instance = format!("hi-{name}-{}", std::process::id());
        remove_instance_files(&instance);
        let mut child = Command::new(shmrelay_bin())
            .args(["--listen", "127.0.0.1:0", "--instance", &instance])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start shmrelay");
        LIVE.lock().unwrap().push((child.id(), instance.to_owned()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                remove_instance_files(&instance);
                panic!("relay {instance} did not print `listening on` within 30 s");
            }
        };
        let relay = Relay {
            child,
            addr,
            instance,
        };
        // Workers start after `listening on`: wait until one round trip works.
        let mut c = relay.connect();
        assert_eq!(
            c.roundtrip(b"ready?", Duration::from_secs(20)),
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
}

impl Drop for Relay {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Fronts and workers die with the supervisor (PR_SET_PDEATHSIG); give them a moment
        // before their segments go.
        std::thread::sleep(Duration::from_millis(20));
        remove_instance_files(&self.instance);
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|(p, _)| *p != pid);
        }
    }
}

/// Open fds of a process (entries of /proc/PID/fd).
pub fn fd_count(pid: u32) -> usize {
    shmrelay::procfs::open_fds(Some(pid)).unwrap_or_else(|| panic!("/proc/{pid}/fd is unreadable"))
        as usize
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns its last value.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A wire frame: 4-byte big-endian length, then the payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// The payload of the error frame a client gets for an announced length over the limit.
pub fn too_large_text(len: u32, max: u32) -> Vec<u8> {
    format!("shmrelay-error: frame of {len} bytes exceeds the maximum of {max}").into_bytes()
}

/// A small deterministic generator (xorshift64*), so every random case can be replayed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Deterministic payload bytes for (conn, seq).
pub fn pattern(conn: usize, seq: usize, len: usize) -> Vec<u8> {
    let mut r = Rng::new((conn as u64) << 32 | seq as u64);
    r.bytes(len)
}

/// What a read from the relay gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recv {
    /// One whole frame's payload (empty for a heartbeat).
    Frame(Vec<u8>),
    /// The relay closed the connection (FIN); `leftover` bytes of a partial frame were pending.
    Eof { leftover: usize },
    /// The connection was reset (RST).
    Reset,
    /// Nothing (complete) arrived in time.
    Timeout,
}

/// A blocking wire-protocol client with its own read buffer, so a read timeout never loses a
/// partial frame.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Set once EOF or a reset was seen.
    done: Option<Recv>,
}

/// Options of a client socket, set before `connect`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketOpts {
    /// Source address (127.0.0.2, ... to spread over ephemeral port ranges).
    pub source: Option<Ipv4Addr>,
    /// SO_RCVBUF, bytes (the kernel doubles it).
    pub rcvbuf: Option<usize>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::connect_with(addr, SocketOpts::default(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    /// Connects with socket options applied before the handshake.
    pub fn connect_with(
        addr: SocketAddr,
        opts: SocketOpts,
        timeout: Duration,
    ) -> io::Result<Client> {
        let stream = raw_connect(addr, opts, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client {
            stream,
            buf: Vec::new(),
            done: None,
        })
    }

    pub fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        self.stream.write_all(&frame(payload))
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads the next frame, or EOF / reset, waiting at most `limit`.
    pub fn recv(&mut self, limit: Duration) -> Recv {
        let end = Instant::now() + limit;
        loop {
            if self.buf.len() >= HEADER {
                let len = u32::from_be_bytes(self.buf[..HEADER].try_into().unwrap()) as usize;
                if self.buf.len() >= HEADER + len {
                    let payload = self.buf[HEADER..HEADER + len].to_vec();
                    self.buf.drain(..HEADER + len);
                    return Recv::Frame(payload);
                }
            }
            if let Some(done) = &self.done {
                return done.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Recv::Timeout;
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("set_read_timeout");
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.done = Some(Recv::Eof {
                        leftover: self.buf.len(),
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    self.done = Some(Recv::Reset)
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// Reads the next frame that is not a heartbeat (answering pings on the way).
    pub fn recv_data(&mut self, limit: Duration) -> Recv {
        let end = Instant::now() + limit;
        loop {
            match self.recv(end.saturating_duration_since(Instant::now())) {
                Recv::Frame(p) if p.is_empty() => {
                    // The front's ping: answer it, as a live client does.
                    let _ = self.send(b"");
                }
                other => return other,
            }
        }
    }

    /// Sends `payload` and waits for the next data frame.
    pub fn roundtrip(&mut self, payload: &[u8], limit: Duration) -> Recv {
        if let Err(e) = self.send(payload) {
            return match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Recv::Reset,
                _ => panic!("send: {e}"),
            };
        }
        self.recv_data(limit)
    }

    /// Waits until the relay closes the connection; returns what ended it and the frames that
    /// came first, or None if it was still open after `limit`.
    pub fn wait_closed(&mut self, limit: Duration) -> Option<(Recv, Vec<Vec<u8>>)> {
        let end = Instant::now() + limit;
        let mut frames = Vec::new();
        loop {
            match self.recv(end.saturating_duration_since(Instant::now())) {
                Recv::Frame(p) => frames.push(p),
                Recv::Timeout => return None,
                closed => return Some((closed, frames)),
            }
        }
    }

    /// Whether the relay closed the connection, looking without waiting.
    pub fn is_closed(&mut self) -> bool {
        loop {
            match self.recv(Duration::from_millis(1)) {
                Recv::Frame(_) => continue,
                Recv::Timeout => return false,
                _ => return true,
            }
        }
    }

    pub fn shutdown_write(&self) {
        self.stream.shutdown(Shutdown::Write).expect("shutdown");
    }
}

/// Connects a TCP socket with options that must be set before the handshake.
pub fn raw_connect(addr: SocketAddr, opts: SocketOpts, timeout: Duration) -> io::Result<TcpStream> {
    if opts.source.is_none() && opts.rcvbuf.is_none() {
        return TcpStream::connect_timeout(&addr, timeout);
    }
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    if let Some(n) = opts.rcvbuf {
        set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, n as i32)?;
    }
    if let Some(src) = opts.source {
        bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))
            .map_err(io::Error::from)?;
    }
    // Connect without blocking forever: a nonblocking connect, then wait for writability.
    // SAFETY: a socket we own, not yet connected.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    stream.set_nonblocking(true)?;
    let sa = SockaddrIn::from(v4);
    match nix::sys::socket::connect(stream.as_raw_fd(), &sa) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe {
        libc::poll(
            &mut pfd,
            1,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    if r == 0 {
        return Err(io::ErrorKind::TimedOut.into());
    }
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    stream.peer_addr()?; // ENOTCONN if the handshake did not complete
    stream.set_nonblocking(false)?;
    Ok(stream)
}

fn set_int(fd: i32, level: i32, opt: i32, v: i32) -> io::Result<()> {
    // SAFETY: a valid fd and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `close` send a reset instead of a FIN (SO_LINGER with a zero timeout).
pub fn set_linger_zero(stream: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the right size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// A well-behaved client doing round trips in the background (and answering pings), to show
/// that the relay keeps serving others while a test abuses it.
pub struct Probe {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<ProbeReport>>,
}

/// What a probe saw.
#[derive(Debug)]
pub struct ProbeReport {
    pub rounds: u64,
    /// Round trips that did not come back as the same bytes within the limit (with the first
    /// such outcome).
    pub failures: u64,
    pub first_failure: Option<Recv>,
    pub max_rtt: Duration,
    /// Longest time between two completed round trips.
    pub max_gap: Duration,
}

impl Probe {
    /// Round trips to `addr` every `every`, each allowed `limit`.
    pub fn start(addr: SocketAddr, every: Duration, limit: Duration) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let mut c = Client::connect(addr);
        let thread = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                let mut r = ProbeReport {
                    rounds: 0,
                    failures: 0,
                    first_failure: None,
                    max_rtt: Duration::ZERO,
                    max_gap: Duration::ZERO,
                };
                let mut last = Instant::now();
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let p = pattern(usize::MAX, seq, 1 + seq % 200);
                    seq += 1;
                    let t = Instant::now();
                    let got = c.roundtrip(&p, limit);
                    if got == Recv::Frame(p) {
                        r.rounds += 1;
                        rounds.fetch_add(1, Ordering::Relaxed);
                        r.max_rtt = r.max_rtt.max(t.elapsed());
                        r.max_gap = r.max_gap.max(last.elapsed());
                        last = Instant::now();
                    } else {
                        r.failures += 1;
                        r.first_failure.get_or_insert(got);
                        break;
                    }
                    std::thread::sleep(every);
                }
                r
            })
        };
        Probe {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    pub fn finish(mut self) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("not joined")
            .join()
            .expect("probe thread")
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The framing rule applied to a whole byte stream, as the front applies it read by read:
/// frames are taken in order; a length above `max_frame` ends the connection with an error
/// frame; a length-0 frame is a heartbeat the front answers itself; anything else is echoed
/// by the default worker; a partial frame at the end waits for more bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// Payloads of the data frames before the end, in order.
    pub echoes: Vec<Vec<u8>>,
    /// Heartbeats among them.
    pub heartbeats: usize,
    /// `Some(len)`: the announced length over the limit that closes the connection.
    pub too_large: Option<u32>,
    /// Bytes of an incomplete frame at the end (the connection waits for the rest).
    pub partial: usize,
}

pub fn expected_outcome(bytes: &[u8], max_frame: u32) -> Expected {
    let mut e = Expected {
        echoes: Vec::new(),
        heartbeats: 0,
        too_large: None,
        partial: 0,
    };
    let mut pos = 0;
    while bytes.len() - pos >= HEADER {
        let len = u32::from_be_bytes(bytes[pos..pos + HEADER].try_into().unwrap());
        if len > max_frame {
            e.too_large = Some(len);
            return e;
        }
        let len = len as usize;
        if bytes.len() - pos - HEADER < len {
            break;
        }
        if len == 0 {
            e.heartbeats += 1;
        } else {
            e.echoes
                .push(bytes[pos + HEADER..pos + HEADER + len].to_vec());
        }
        pos += HEADER + len;
    }
    e.partial = bytes.len() - pos;
    e
}

/// Sends `sig` to `pid` (SIGSTOP/SIGCONT on a relay process of this test).
pub fn signal(pid: u32, sig: i32) {
    assert!(pid > 1, "no such process: {pid}");
    // SAFETY: kill(2) on a process this test started (directly or through the relay).
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
}

pub use libc::{SIGCONT, SIGSTOP};
