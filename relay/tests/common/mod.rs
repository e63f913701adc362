//! Test harness: a relay started as a real process tree on a free loopback port, and a small
//! blocking client for the wire protocol.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shmrelay::names;
use shmrelay::stats::Stats;

/// A running relay; killed (with its whole tree) and cleaned up on drop.
pub struct Relay {
    pub child: Child,
    pub addr: SocketAddr,
    pub instance: String,
    /// Where `--metrics` serves, if it was given.
    pub metrics: Option<SocketAddr>,
}

impl Relay {
    /// Starts `shmrelay` with `args` on 127.0.0.1:0 under a unique instance name.
    pub fn start(name: &str, args: &[&str]) -> Relay {
        Relay::start_n(name, args, 1).0
    }

    /// Starts `shmrelay` with a config file holding `toml` (e.g. `[[listener]]` tables) and
    /// waits for `listeners` listening lines; returns every listener's address, in order.
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
        let instance = format!("t-{name}-{}", std::process::id());
        let mut child = Command::new(env!("CARGO_BIN_EXE_shmrelay"))
            .args(["--listen", "127.0.0.1:0", "--instance", &instance])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .expect("start shmrelay");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut metrics = None;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        while addrs.len() < n {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("relay did not print `listening on` within 30 s");
            if let Some(rest) = line.split("metrics on http://").nth(1) {
                metrics = rest.split('/').next().and_then(|a| a.parse().ok());
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                addrs.push(rest.split_whitespace().next().unwrap().parse().unwrap());
            }
        }
        let relay = Relay {
            child,
            addr: addrs[0],
            instance,
            metrics,
        };
        (relay, addrs)
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// The operators' view, once it shows everything that happened before this call (the
    /// supervisor publishes it every 50 ms).
    pub fn stats(&self) -> Stats {
        let path = names::stats_path(&self.instance);
        shmrelay::view::wait_published(&path, Duration::from_secs(5));
        Stats::open_readonly(&path).expect("stats segment")
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

    pub fn worker_pid(&self, w: usize) -> u32 {
        self.stats().worker(w).pid.load(Ordering::Relaxed)
    }

    pub fn shm_files(&self) -> Vec<PathBuf> {
        names::instance_files(&self.instance)
    }

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
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in names::instance_files(&self.instance) {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Polls `cond` until true or `limit` passes.
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

/// Resident memory of `pid` in KiB (`VmRSS` from /proc; 0 if it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    shmrelay::procfs::rss_kib(Some(pid)).unwrap_or(0)
}

pub fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); look at /proc state too.
    shmrelay::procfs::stat(pid).is_ok_and(|s| !s.is_zombie())
}

/// A blocking wire-protocol client.
pub struct Client {
    pub stream: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client { stream }
    }

    /// Connects from a chosen loopback source address (127.0.0.2, ...).
    pub fn connect_from(addr: SocketAddr, src: std::net::Ipv4Addr) -> Client {
        use nix::sys::socket::{
            bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
        };
        use std::os::fd::{FromRawFd, IntoRawFd};
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::from(std::net::SocketAddrV4::new(src, 0)),
        )
        .unwrap();
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only")
        };
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4)).unwrap();
        // SAFETY: a connected TCP socket we own.
        let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client { stream }
    }

    /// A round trip that reports a refused or closed connection as None instead of panicking.
    pub fn try_roundtrip(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        let mut buf = (payload.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(payload);
        self.stream.write_all(&buf).ok()?;
        loop {
            let mut h = [0u8; 4];
            self.stream.read_exact(&mut h).ok()?;
            let mut p = vec![0u8; u32::from_be_bytes(h) as usize];
            self.stream.read_exact(&mut p).ok()?;
            // A ping (or the answer to a heartbeat) may come first: the wire allows it anywhere.
            if !p.is_empty() || payload.is_empty() {
                return Some(p);
            }
        }
    }

    /// True if the server closed the connection (EOF or reset) within `limit`.
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let mut b = [0u8; 4096];
        let end = Instant::now() + limit;
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {
                    if Instant::now() >= end {
                        return false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    pub fn send(&mut self, payload: &[u8]) {
        let mut buf = (payload.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(payload);
        self.stream.write_all(&buf).expect("send");
    }

    /// Reads one frame; None on a clean close.
    pub fn recv(&mut self) -> Option<Vec<u8>> {
        let mut h = [0u8; 4];
        match self.stream.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("recv: {e}"),
        }
        let mut p = vec![0u8; u32::from_be_bytes(h) as usize];
        self.stream.read_exact(&mut p).expect("frame body");
        Some(p)
    }

    pub fn roundtrip(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        self.send(payload);
        self.recv()
    }
}

/// Deterministic payload bytes for (conn, seq).
pub fn pattern(conn: usize, seq: usize, len: usize) -> Vec<u8> {
    let mut x = (conn as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (seq as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
