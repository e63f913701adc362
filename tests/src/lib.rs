//! The one harness of the relay's integration tests (`relay/tests`) and of the reliability and
//! hostile-input tests (`tests/tests`): the `shmrelay` binary started as a real process tree
//! on a free loopback port ([`Relay`]), a wire-protocol [`Client`], a [`Probe`] client that
//! keeps doing round trips in the background, a [`Watchdog`] that kills every relay and aborts
//! when a test hangs, and small helpers (polling, payloads, /proc). Relays with a websocket
//! listener: [`Relay::start_websocket`], [`ws_connect`] (a `tungstenite` client) and the
//! driver of the `ws_echo` example workers, [`check_ws_echo_example`].
//!
//! The binary lives in another package, so it is found next to the test executable
//! (`target/<profile>/deps/<test>` -> `target/<profile>/shmrelay`), and built once with
//! `cargo build -p shmrelay` (same profile, same target directory) when it is missing or
//! older than its sources. `SHMRELAY_BIN` overrides the path (and skips the build).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use shmrelay::stats::{FrontStats, RejectReason, Stats};
pub use shmrelay_worker::CloseReason;

mod client;
mod relay;
mod ws;

pub use client::{
    raw_connect, read_frames, set_linger_zero, Client, Probe, ProbeReport, Recv, SocketOpts,
};
pub use relay::{shmrelay_bin, workspace_bin, Relay, Watchdog};
pub use ws::{check_ws_echo_example, expect_close, tungstenite, ws_connect, ws_next, Ws};

/// Bytes of the frame length prefix.
pub const HEADER: usize = 4;

/// The relay's default `max_frame`.
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;

/// Open fds of a process (entries of /proc/PID/fd).
pub fn fd_count(pid: u32) -> usize {
    shmrelay::procfs::open_fds(Some(pid)).unwrap_or_else(|| panic!("/proc/{pid}/fd is unreadable"))
        as usize
}

/// Resident memory of `pid` in KiB (`VmRSS` from /proc; 0 if it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    shmrelay::procfs::rss_kib(Some(pid)).unwrap_or(0)
}

/// Whether `pid` runs (a zombie still answers kill(0), so the /proc state is looked at too).
pub fn alive(pid: u32) -> bool {
    shmrelay::procfs::stat(pid).is_ok_and(|s| !s.is_zombie())
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

/// A fresh directory for one test's files (what a previous run left there is removed).
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shmrelay-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `dir/worker.sh` running `body` and returns the `--worker-cmd` that runs it.
pub fn shell_worker(dir: &Path, body: &str) -> String {
    let path = dir.join("worker.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    format!("/bin/sh {}", path.display())
}

/// A worker that serves (`bin worker echo`) until the file `MARK` exists in `dir`, then exits 1
/// at every start: its `--worker-cmd`, and the path of the mark that breaks it.
pub fn breakable_worker(dir: &Path, bin: &str) -> (String, PathBuf) {
    let mark = dir.join("MARK");
    let _ = std::fs::remove_file(&mark);
    let cmd = shell_worker(
        dir,
        &format!(
            "[ -e {m} ] && exit 1\nexec {bin} worker echo",
            m = mark.display()
        ),
    );
    (cmd, mark)
}
