//! Hostile peers against the relay's identity and shared state (issue 12 items 1 and 10,
//! issue 20 items 2 and 3): a worker that truncates its ring fds, a same-uid process writing
//! the operators' stats view, a second relay of the same name in another shm directory, a
//! bystander whose environment names the instance, a deleted stats file.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shmrelay::stats::{FrontStats, StatsHeader, WorkerStats, MAX_FRONTS};
use shmrelay_tests::{alive, eventually, Client, Relay};

/// A private directory (mode 1777 like /dev/shm) removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("shmrelay-hid-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A worker that truncates every ring fd it was given (reply ring first, then request ring),
/// writes what happened to `out`, then sleeps.
const TRUNCATOR: &str = r#"
import errno, os, sys, time
res = []
for ch in os.environ["SHMRELAY_CHANNELS"].split(","):
    f, req, rep, bell = ch.split(":")
    for name, fd in (("rep", int(rep)), ("req", int(req))):
        try:
            os.ftruncate(fd, 0)
            res.append(name + ":truncated")
        except OSError as e:
            res.append(name + ":" + errno.errorcode.get(e.errno, str(e.errno)))
out = sys.argv[1]
with open(out + ".tmp", "w") as fh:
    fh.write(" ".join(res))
os.rename(out + ".tmp", out)
time.sleep(600)
"#;

fn truncating_worker_harms_nobody(tag: &str, users: Option<&str>) {
    if users.is_some() && !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to start workers as another user");
        return;
    }
    let dir = TempDir::new(tag);
    let script = dir.0.join("truncator.py");
    std::fs::write(&script, TRUNCATOR).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.0.join("result");
    let users = users.map_or(String::new(), |u| format!("worker_users = [\"{u}\"]\n"));
    // Listener 0: the hostile worker; listener 1: a healthy echo pool.
    let toml = format!(
        "{users}[[listener]]\nlisten = \"127.0.0.1:0\"\nworker_cmd = \"/usr/bin/python3 {} {}\"\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\n",
        script.display(),
        out.display()
    );
    let (mut relay, addrs) = Relay::start_config(tag, &toml, 2, &[]);
    let front = relay.stats().front(0).pid.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(20), || out.exists()),
        "the truncating worker never ran"
    );
    let result = std::fs::read_to_string(&out).unwrap();
    // Both rings are sealed: the worker's ftruncate fails instead of shrinking them.
    assert_eq!(
        result, "rep:EPERM req:EPERM",
        "what the worker's ftruncate did"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the supervisor died"
    );
    assert!(alive(front), "the front died");
    let s = relay.stats();
    assert_eq!(
        s.front(0).pid.load(Ordering::Relaxed),
        front,
        "the front was replaced"
    );
    assert_eq!(s.front(0).restarts.load(Ordering::Relaxed), 0);
    // The other listener still serves.
    let mut c = Client::connect(addrs[1]);
    assert_eq!(
        c.roundtrip(b"still here").as_deref(),
        Some(&b"still here"[..])
    );
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn a_worker_truncating_its_ring_fds_kills_neither_front_nor_supervisor() {
    truncating_worker_harms_nobody("trunc", None);
}

#[test]
fn a_worker_running_as_nobody_truncating_its_ring_fds_kills_nothing() {
    truncating_worker_harms_nobody("trunc-nobody", Some("nobody"));
}

const HEADER: usize = std::mem::size_of::<StatsHeader>();
const FRONT: usize = std::mem::size_of::<FrontStats>();
const WORKER: usize = std::mem::size_of::<WorkerStats>();

fn write_u64(file: &std::fs::File, at: usize, v: u64) {
    use std::os::unix::fs::FileExt;
    file.write_all_at(&v.to_ne_bytes(), at as u64).unwrap();
}

fn write_u32(file: &std::fs::File, at: usize, v: u32) {
    use std::os::unix::fs::FileExt;
    file.write_all_at(&v.to_ne_bytes(), at as u64).unwrap();
}

#[test]
fn writing_the_stats_view_changes_no_decision_of_the_relay() {
    let relay = Relay::start("viewwrite", &["--workers", "2"]);
    let s = relay.stats();
    let workers = [relay.worker_pid(0), relay.worker_pid(1)];
    let front = s.front(0).pid.load(Ordering::Relaxed);
    assert!(workers.iter().all(|&p| p != 0) && front != 0);
    // A same-uid process (this test) writes what the relay used to act on: every quarantine
    // bit, worker states "failed", conns_total = 0, the magic. It keeps writing for a second,
    // across many publishes.
    let path = shmrelay::names::stats_path(&relay.instance);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let quarantined = HEADER + std::mem::offset_of!(FrontStats, quarantined);
    let state = |w: usize| {
        HEADER + MAX_FRONTS * FRONT + w * WORKER + std::mem::offset_of!(WorkerStats, state)
    };
    let conns_total = std::mem::offset_of!(StatsHeader, conns_total);
    let mut held: Vec<Client> = (0..4).map(|_| relay.connect()).collect();
    for c in &mut held {
        assert!(c.try_roundtrip(b"hello").is_some());
    }
    for round in 0..50 {
        write_u64(&file, quarantined, u64::MAX);
        write_u32(&file, state(0), 3);
        write_u32(&file, state(1), 3);
        write_u64(&file, conns_total, 0);
        if round == 10 {
            // Close one connection while the view says 0 are open.
            held.pop();
        }
        write_u64(&file, 0, 0);
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...and with the view's magic zeroed, a front crash: the replacement must start.
    // SAFETY: signalling a process of our own relay.
    unsafe { libc::kill(front as i32, libc::SIGKILL) };
    write_u64(&file, 0, 0);
    assert!(
        eventually(Duration::from_secs(20), || {
            let s = relay.stats();
            let p = s.front(0).pid.load(Ordering::Relaxed);
            p != 0 && p != front && alive(p)
        }),
        "the front was not replaced"
    );
    // Every client that connects now is served (connections alternate between the workers).
    for _ in 0..8 {
        let mut c = relay.connect();
        assert_eq!(c.try_roundtrip(b"ok").as_deref(), Some(&b"ok"[..]));
    }
    assert_eq!(
        [relay.worker_pid(0), relay.worker_pid(1)],
        workers,
        "a worker was killed because of what the view said"
    );
    let s = relay.stats();
    assert_eq!(s.header().pool_failed.load(Ordering::Relaxed), 0);
    assert!(s.worker(0).crashes.load(Ordering::Relaxed) == 0);
    assert!(s.worker(1).crashes.load(Ordering::Relaxed) == 0);
    let total = s.header().conns_total.load(Ordering::Relaxed);
    assert!(total < 100, "conns_total wrapped: {total}");
    assert_eq!(
        s.header().magic.load(Ordering::Relaxed),
        shmrelay::stats::STATS_MAGIC
    );
}

/// Starts a relay of instance `name` in shm directory `dir`; returns it and its address.
fn start_in(dir: &Path, name: &str) -> Relay {
    Relay::start_named(name, &["--workers", "1"], Some(dir))
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_relay_of_the_same_name_in_another_shm_dir_leaves_the_first_alone() {
    let (d1, d2) = (TempDir::new("dir1"), TempDir::new("dir2"));
    let name = format!("same-{}", std::process::id());
    let mut first = start_in(&d1.0, &name);
    let kids = children_of(first.child.id());
    assert!(kids.len() >= 2, "front and worker: {kids:?}");
    let mut second = start_in(&d2.0, &name);
    std::thread::sleep(Duration::from_millis(300));
    for k in &kids {
        assert!(alive(*k), "the second relay killed the first's process {k}");
    }
    assert_eq!(
        first.connect().try_roundtrip(b"one").as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(
        second.connect().try_roundtrip(b"two").as_deref(),
        Some(&b"two"[..])
    );
    second.signal(libc::SIGTERM);
    assert_eq!(second.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(d1.0.join(format!("shmrelay.{name}.stats")).exists());
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn a_bystander_naming_the_instance_in_its_environment_survives_a_start() {
    let name = format!("t-bystander-{}", std::process::id());
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .env("SHMRELAY_INSTANCE", &name)
        .spawn()
        .unwrap();
    let relay = start_in(&shmrelay::names::shm_dir(), &name);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the relay killed an unrelated process"
    );
    assert_eq!(
        relay
            .stats()
            .header()
            .orphans_killed
            .load(Ordering::Relaxed),
        0
    );
    drop(relay);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn deleting_the_stats_file_does_not_let_a_second_start_harm_the_first() {
    let name = format!("t-deleted-{}", std::process::id());
    let mut first = start_in(&shmrelay::names::shm_dir(), &name);
    let kids = children_of(first.child.id());
    let path = shmrelay::names::stats_path(&name);
    std::fs::remove_file(&path).unwrap();
    // The name is free now, so a second relay may take it; it must not touch the first.
    let mut second = start_in(&shmrelay::names::shm_dir(), &name);
    std::thread::sleep(Duration::from_millis(300));
    for k in &kids {
        assert!(alive(*k), "the second relay killed the first's process {k}");
    }
    assert_eq!(
        first.connect().try_roundtrip(b"one").as_deref(),
        Some(&b"one"[..])
    );
    // Stopping the first removes only its own file, not the second's.
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(
        path.exists(),
        "the first relay removed the second's stats view"
    );
    assert!(shmrelay::view::peek(&path).unwrap().live);
    assert_eq!(
        second.connect().try_roundtrip(b"two").as_deref(),
        Some(&b"two"[..])
    );
    second.signal(libc::SIGTERM);
    assert_eq!(second.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(!path.exists());
}
