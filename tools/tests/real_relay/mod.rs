//! Shared by the tests that run `relayctl` against a real relay: finding the `shmrelay` binary
//! and a relay process tree that is stopped and cleaned up on drop, also when a test panics.

use std::io::Read;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `shmrelay` binary of the same profile as this test. Integration tests of `tools`
/// cannot name another package's binary with `env!("CARGO_BIN_EXE_...")`, so it is found
/// next to our own: `<target>/<profile>/deps/TEST-HASH` -> `<target>/<profile>/shmrelay`,
/// and built with `cargo build -p shmrelay` if it is not there.
pub fn relay_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary is not under <target>/<profile>/deps")
            .to_path_buf();
        let bin = profile_dir.join("shmrelay");
        if bin.exists() {
            return bin;
        }
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(p) => p.to_owned(),
        };
        let mut target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args([
            "build",
            "-p",
            "shmrelay",
            "--bin",
            "shmrelay",
            "--profile",
            &profile,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        // <target>/<triple>/<profile>: cross builds put the profile one level deeper.
        if !target_dir.join("CACHEDIR.TAG").exists() {
            if let Some(triple) = target_dir.file_name().and_then(|n| n.to_str()) {
                cmd.args(["--target", triple]);
            }
            target_dir = target_dir.parent().expect("target dir").to_path_buf();
        }
        let status = cmd
            .env("CARGO_TARGET_DIR", &target_dir)
            .status()
            .expect("cargo build -p shmrelay");
        assert!(status.success() && bin.exists(), "building shmrelay failed");
        bin
    })
}

/// A relay started as a real process tree on 127.0.0.1:0; SIGTERMed (then killed) on drop,
/// and its files removed when it ran in the default shared-memory directory.
pub struct Relay {
    pub child: Child,
    pub addr: SocketAddr,
    pub instance: String,
    /// `SHMRELAY_SHM_DIR` given to it, if any (its files are then the test's to remove).
    pub shm_dir: Option<PathBuf>,
}

impl Relay {
    /// Starts `shmrelay --listen 127.0.0.1:0 --instance INSTANCE ARGS...` (in `shm_dir` if
    /// given) and waits for its `listening on` line.
    pub fn start(instance: &str, args: &[&str], shm_dir: Option<&Path>) -> Relay {
        let mut cmd = Command::new(relay_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--instance", instance])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped());
        if let Some(dir) = shm_dir {
            cmd.env("SHMRELAY_SHM_DIR", dir);
        }
        let mut child = cmd.spawn().expect("start shmrelay");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        let mut relay = Relay {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            instance: instance.to_owned(),
            shm_dir: shm_dir.map(Path::to_path_buf),
        };
        // On a panic here the relay is dropped, so stopped, like any other.
        relay.addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("relay did not print `listening on` within 30 s")
            .parse()
            .expect("listen address");
        relay
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // SIGTERM first so the supervisor stops its children and removes its files.
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.shm_dir.is_none() {
            for f in shmrelay::names::instance_files(&self.instance) {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// Longest any command may take before the test calls it hung.
const WATCHDOG: Duration = Duration::from_secs(60);

/// Runs `cmd` with a watchdog: panics if it outlives [`WATCHDOG`].
pub fn run(mut cmd: Command, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        let _ = out.read_to_end(&mut o);
        o
    });
    let err_reader = std::thread::spawn(move || {
        let mut e = Vec::new();
        let _ = err.read_to_end(&mut e);
        e
    });
    let end = Instant::now() + WATCHDOG;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("{what} hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}
