//! `relayctl` and `shmrelay` against a hostile shared-memory directory (issue 20 items 1, 2
//! and 6): FIFOs and other users' files squatting instance names, `relayctl gc` run in another
//! PID namespace, and a directory with thousands of files.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use shmrelay::report::host::{GcReport, LeaksReport, ListReport};
use shmrelay::stats::Stats;

mod real_relay;
use real_relay::{relay_bin, run, Relay};

/// uid of `nobody`, the other local user of these tests.
const NOBODY: u32 = 65534;

fn relayctl(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayctl"));
    cmd.args(args).env("SHMRELAY_SHM_DIR", dir);
    run(cmd, &format!("relayctl {args:?}"))
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A private shm directory, mode 1777 like /dev/shm.
struct TempShm(PathBuf);

impl TempShm {
    fn new(tag: &str) -> TempShm {
        let d = std::env::temp_dir().join(format!("relayctl-hn-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        TempShm(d)
    }
}

impl Drop for TempShm {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "mkfifo");
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// One length-prefixed round trip with `relay`.
fn echo(relay: &Relay, payload: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(relay.addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut wire = (payload.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(payload);
    s.write_all(&wire).ok()?;
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let mut p = vec![0u8; u32::from_be_bytes(h) as usize];
    s.read_exact(&mut p).ok()?;
    Some(p)
}

#[test]
fn fifos_of_another_user_at_instance_names_hang_nothing_and_are_reported() {
    if !root() {
        eprintln!("skipped: needs root to create files as another user");
        return;
    }
    let tmp = TempShm::new("fifo");
    let dir = tmp.0.as_path();
    let stats_fifo = dir.join("shmrelay.squat.stats");
    let ring_fifo = dir.join("shmrelay.ringsquat.f0.w0.req");
    for f in [&stats_fifo, &ring_fifo] {
        mkfifo(f);
        std::os::unix::fs::chown(f, Some(NOBODY), Some(NOBODY)).unwrap();
    }

    let o = relayctl(dir, &["list", "--json"]);
    assert!(o.status.success(), "{}", show(&o));
    let l: ListReport = serde_json::from_slice(&o.stdout).unwrap();
    let squat = l
        .instances
        .iter()
        .find(|i| i.name == "squat")
        .expect("listed");
    assert!(!squat.alive);
    let e = squat.error.as_deref().unwrap_or("");
    assert!(e.contains("FIFO") && e.contains("65534"), "{e}");

    let o = relayctl(dir, &["stat", "squat"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("FIFO"),
        "{}",
        show(&o)
    );

    let o = relayctl(dir, &["leaks", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let lk: LeaksReport = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        lk.problems
            .iter()
            .any(|p| p.contains("squat") && p.contains("FIFO")),
        "{lk:?}"
    );

    for args in [&["gc", "--dry-run", "--json"][..], &["gc", "--json"]] {
        let o = relayctl(dir, args);
        assert!(o.status.success(), "{}", show(&o));
        let g: GcReport = serde_json::from_slice(&o.stdout).unwrap();
        assert!(g.removed.is_empty(), "{g:?}");
        assert!(
            g.untrusted
                .iter()
                .any(|u| u.path.ends_with("shmrelay.squat.stats")),
            "{g:?}"
        );
        assert!(stats_fifo.exists() && ring_fifo.exists());
    }

    // The relay reports what is wrong instead of hanging.
    let mut cmd = Command::new(relay_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--instance", "squat"])
        .env("SHMRELAY_SHM_DIR", dir)
        .env("RUST_LOG", "error");
    let o = run(cmd, "shmrelay --instance squat");
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("FIFO") && err.contains("65534"), "{err}");
}

#[test]
fn a_file_of_another_user_claiming_pid_1_is_not_trusted() {
    if !root() {
        eprintln!("skipped: needs root to create files as another user");
        return;
    }
    let tmp = TempShm::new("claim");
    let dir = tmp.0.as_path();
    let path = dir.join("shmrelay.claim.stats");
    let s = Stats::create(&path, 1, 1).unwrap();
    s.header()
        .supervisor_pid
        .store(1, std::sync::atomic::Ordering::Relaxed);
    drop(s);
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).unwrap();

    let o = relayctl(dir, &["list", "--json"]);
    assert!(o.status.success(), "{}", show(&o));
    let l: ListReport = serde_json::from_slice(&o.stdout).unwrap();
    let c = l
        .instances
        .iter()
        .find(|i| i.name == "claim")
        .expect("listed");
    assert!(!c.alive, "pid 1 proves nothing: {c:?}");
    assert!(
        c.error
            .as_deref()
            .unwrap_or("")
            .contains("owned by uid 65534"),
        "{c:?}"
    );

    let mut cmd = Command::new(relay_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--instance", "claim"])
        .env("SHMRELAY_SHM_DIR", dir)
        .env("RUST_LOG", "error");
    let o = run(cmd, "shmrelay --instance claim");
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("owned by uid 65534") && !err.contains("already running"),
        "{err}"
    );
    let o = relayctl(dir, &["gc"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(path.exists(), "gc removed another user's file");
}

#[test]
fn gc_in_another_pid_namespace_never_removes_a_live_relays_files() {
    let probe = Command::new("unshare")
        .args(["-pf", "--mount-proc", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: unshare -pf --mount-proc is not permitted here");
        return;
    }
    let tmp = TempShm::new("pidns");
    let dir = tmp.0.as_path();
    let relay = Relay::start_named("nsrelay", &["--workers", "1"], Some(dir));
    let view = dir.join("shmrelay.nsrelay.stats");
    assert!(view.exists());
    for args in [&["list", "--json"][..], &["gc", "--json"]] {
        let mut cmd = Command::new("unshare");
        cmd.args(["-pf", "--mount-proc", env!("CARGO_BIN_EXE_relayctl")])
            .args(args)
            .env("SHMRELAY_SHM_DIR", dir);
        let o = run(cmd, &format!("unshare relayctl {args:?}"));
        assert!(o.status.success(), "{}", show(&o));
        if args[0] == "list" {
            let l: ListReport = serde_json::from_slice(&o.stdout).unwrap();
            let me = l
                .instances
                .iter()
                .find(|i| i.name == "nsrelay")
                .expect("listed");
            assert!(
                me.alive,
                "another PID namespace saw a live relay as dead: {me:?}"
            );
        } else {
            let g: GcReport = serde_json::from_slice(&o.stdout).unwrap();
            assert!(
                g.removed.is_empty(),
                "gc removed a live relay's files: {g:?}"
            );
        }
    }
    assert!(view.exists(), "the live relay's view is gone");
    assert_eq!(echo(&relay, b"alive").as_deref(), Some(&b"alive"[..]));
    // A second start of the same name in the same directory is refused (the lock is held).
    let mut cmd = Command::new(relay_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--instance", "nsrelay"])
        .env("SHMRELAY_SHM_DIR", dir)
        .env("RUST_LOG", "error");
    let o = run(cmd, "second shmrelay");
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already running"),
        "{}",
        show(&o)
    );
    assert_eq!(echo(&relay, b"still").as_deref(), Some(&b"still"[..]));
}

#[test]
fn relayctl_list_and_gc_on_a_crowded_directory_finish() {
    const FILES: usize = 3000;
    let tmp = TempShm::new("crowd");
    let dir = tmp.0.as_path();
    for i in 0..FILES {
        std::fs::write(dir.join(format!("shmrelay.i{i}.stats")), b"").unwrap();
    }
    let relay = Relay::start_named("crowdlive", &["--workers", "1"], Some(dir));
    let t = Instant::now();
    let o = relayctl(dir, &["list", "--json"]);
    let list_time = t.elapsed();
    assert!(o.status.success(), "{}", show(&o));
    let l: ListReport = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(l.instances.len(), FILES + 1);
    assert!(l.instances.iter().any(|i| i.name == "crowdlive" && i.alive));
    let t = Instant::now();
    let o = relayctl(dir, &["gc", "--json"]);
    let gc_time = t.elapsed();
    assert!(o.status.success(), "{}", show(&o));
    let g: GcReport = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(g.removed.len(), FILES, "every dead file, nothing else");
    assert!(dir.join("shmrelay.crowdlive.stats").exists());
    eprintln!("{FILES} stats files: list {list_time:?}, gc {gc_time:?}");
    assert_eq!(echo(&relay, b"x").as_deref(), Some(&b"x"[..]));
}

/// Fills `path` with a view of random content (valid magic and version) in one of three
/// flavours: random, near `u64::MAX`, small numbers.
fn garbage_view(path: &Path, seed: u64) {
    use shmrelay::stats::{STATS_MAGIC, STATS_SIZE, STATS_VERSION};
    use shmrelay::view::{published_size, VIEW_MAGIC, VIEW_VERSION};
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut bytes = vec![0u8; published_size(64 * 2)];
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = match seed % 3 {
            0 => x,
            1 => u64::MAX - x % 4,
            _ => x % 1000,
        };
        chunk.copy_from_slice(&v.to_ne_bytes()[..chunk.len()]);
    }
    bytes[0..8].copy_from_slice(&STATS_MAGIC.to_ne_bytes());
    bytes[8..12].copy_from_slice(&STATS_VERSION.to_ne_bytes());
    bytes[STATS_SIZE..STATS_SIZE + 8].copy_from_slice(&VIEW_MAGIC.to_ne_bytes());
    bytes[STATS_SIZE + 8..STATS_SIZE + 12].copy_from_slice(&VIEW_VERSION.to_ne_bytes());
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn garbage_in_a_live_stats_view_crashes_no_relayctl_command() {
    let tmp = TempShm::new("garbage");
    let dir = tmp.0.as_path();
    let path = dir.join("shmrelay.junk.stats");
    for seed in 0..3 {
        garbage_view(&path, seed);
        // Held locked by this process: relayctl takes it for a live instance and reads it all.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert!(shmrelay::view::try_lock(&f).unwrap());
        for args in [
            &["list"][..],
            &["list", "--json"],
            &["stat", "junk", "--interval", "0.1"],
            &["stat", "junk", "--json", "--interval", "0.1"],
            &["top", "junk", "--iterations", "2", "--interval", "0.1"],
            &["leaks"],
            &["leaks", "--json"],
            &["gc", "--dry-run"],
        ] {
            let o = relayctl(dir, args);
            // 0, 1 (problems found) or 2 (an error) are answers; a panic is 101.
            assert!(
                matches!(o.status.code(), Some(0..=2)),
                "seed {seed}, relayctl {args:?}: {}",
                show(&o)
            );
        }
        drop(f);
    }
}
