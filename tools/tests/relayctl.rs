//! `relayctl` as a real process: against a real relay under load (`stat --json` deserialised
//! into the documented structs, `list`, `top` without a terminal, the metrics endpoint), and
//! against fabricated stale segments in a private shm directory (`leaks`, `gc`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmrelay::report::host::{GcReport, LeaksReport, ListReport};
use shmrelay::report::{Dir, InstanceReport, Liveness};
use shmrelay::stats::Stats;

mod real_relay;
use real_relay::{run, Relay};

/// Runs relayctl with `args` (and `env`), killing it if it outlives the watchdog.
fn relayctl(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayctl"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(cmd, &format!("relayctl {args:?}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// Clients sending pipelined length-prefixed frames and checking the echoes, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let echoed = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let threads = (0..clients)
            .map(|c| {
                let (stop, sent, echoed, ready) =
                    (stop.clone(), sent.clone(), echoed.clone(), ready_tx.clone());
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(addr).expect("connect");
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    s.set_nodelay(true).unwrap();
                    let _ = ready.send(());
                    let mut seq = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let frames: Vec<Vec<u8>> = (0..8)
                            .map(|i| {
                                let len = 64 + (seq + i) * 37 % 900;
                                (0..len).map(|j| (c + seq + i + j) as u8).collect()
                            })
                            .collect();
                        let mut wire = Vec::new();
                        for f in &frames {
                            wire.extend_from_slice(&(f.len() as u32).to_be_bytes());
                            wire.extend_from_slice(f);
                        }
                        s.write_all(&wire).expect("send");
                        sent.fetch_add(wire.len() as u64, Ordering::Relaxed);
                        for f in &frames {
                            let mut h = [0u8; 4];
                            s.read_exact(&mut h).expect("reply header");
                            let mut p = vec![0u8; u32::from_be_bytes(h) as usize];
                            s.read_exact(&mut p).expect("reply body");
                            assert_eq!(&p, f, "echo differs");
                            echoed.fetch_add(4 + p.len() as u64, Ordering::Relaxed);
                        }
                        seq += 8;
                    }
                })
            })
            .collect();
        for _ in 0..clients {
            ready_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("clients connected");
        }
        Load {
            stop,
            sent,
            echoed,
            threads,
        }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a load client failed");
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.echoed.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn stat_list_top_and_metrics_on_a_loaded_relay() {
    let relay = Relay::start_named(&format!("ctl-load-{}", std::process::id()), &[], None);
    let name = relay.instance.as_str();
    let load = Load::start(relay.addr, 4);
    // Let some traffic through before sampling.
    let t0 = Instant::now();
    while load.echoed.load(Ordering::Relaxed) < 100_000 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }

    let o = relayctl(&["stat", "--json", "--interval", "0.5", name], &[]);
    assert!(o.status.success(), "{}", show(&o));
    let r: InstanceReport =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}\n{}", show(&o)));
    let sent_after_stat = load.sent.load(Ordering::Relaxed);

    assert_eq!(r.name, name);
    assert_eq!(r.supervisor_pid, relay.child.id());
    assert!(r.alive && !r.draining && !r.pool_failed, "{r:#?}");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.rates_interval_secs.map(|s| s >= 0.5), Some(true));
    assert!(!r.fronts.is_empty() && !r.workers.is_empty());
    assert_eq!(r.rings.len(), r.fronts.len() * r.workers.len() * 2);
    assert_eq!(r.connections, 4);
    let accepts: u64 = r.fronts.iter().map(|f| f.accepts).sum();
    let open: u64 = r.fronts.iter().map(|f| f.connections.open).sum();
    let bytes_in: u64 = r.fronts.iter().map(|f| f.bytes_in).sum();
    let frames_in: u64 = r.fronts.iter().map(|f| f.frames_in).sum();
    assert!(accepts >= 4, "accepts {accepts}");
    assert_eq!(open, 4);
    assert!(bytes_in > 0 && frames_in > 0);
    // The front cannot have read more than the clients had sent by the time it was read.
    assert!(
        bytes_in <= sent_after_stat,
        "{bytes_in} > {sent_after_stat}"
    );
    let in_rate: f64 = r
        .fronts
        .iter()
        .filter_map(|f| f.rates)
        .map(|x| x.bytes_in_per_sec)
        .sum();
    assert!(in_rate > 0.0, "no input rate under load");
    for f in &r.fronts {
        assert_eq!(f.liveness, Liveness::Alive);
        assert_eq!(f.protocol_errors, 0);
        assert!(f.rejects.contains_key("conn_limit") && f.closes.contains_key("client_eof"));
        assert!((0.0..=1.0).contains(&f.copied_ratio));
    }
    for w in &r.workers {
        assert_eq!(
            (w.state.as_str(), w.liveness),
            ("running", Liveness::Alive),
            "{w:?}"
        );
        assert_ne!(w.pid, 0);
    }
    let mut ring_bytes = 0;
    for g in &r.rings {
        assert!(g.error.is_none(), "{g:?}");
        assert!(g.capacity.is_power_of_two() && g.used <= g.capacity);
        assert!(g.records_out <= g.records_in + 1, "{g:?}");
        let (front_pid, worker_pid) = (r.fronts[g.front].pid, r.workers[g.worker].pid);
        let (producer, consumer) = match g.direction {
            Dir::Request => (front_pid, worker_pid),
            Dir::Reply => (worker_pid, front_pid),
        };
        assert_eq!(
            (g.producer.pid, g.consumer.pid),
            (producer, consumer),
            "{g:?}"
        );
        assert_eq!(g.answered_position.is_some(), g.direction == Dir::Request);
        if g.direction == Dir::Request {
            ring_bytes += g.bytes_in;
        }
    }
    assert!(ring_bytes > 0, "request rings carried nothing");

    // The text form names every ring.
    let o = relayctl(&["stat", "--interval", "0", name], &[]);
    assert!(o.status.success(), "{}", show(&o));
    let t = text(&o.stdout);
    assert!(t.contains("f0.w0 req") && t.contains("f0.w1 rep"), "{t}");

    let o = relayctl(&["list", "--json"], &[]);
    assert!(o.status.success(), "{}", show(&o));
    let l: ListReport = serde_json::from_slice(&o.stdout).unwrap();
    let me = l.instances.iter().find(|i| i.name == name).expect("listed");
    // One file: the stats view (rings and the control segment are memfds with no name).
    assert!(me.alive && me.supervisor_pid == relay.child.id() && me.files.len() == 1);

    // top without a terminal: plain frames, no escape codes, exits after the iterations.
    let o = relayctl(
        &["top", "--iterations", "2", "--interval", "0.2", name],
        &[],
    );
    assert!(o.status.success(), "{}", show(&o));
    let t = text(&o.stdout);
    assert_eq!(t.matches(&format!("instance {name} ")).count(), 2, "{t}");
    assert!(!t.contains('\x1b'), "escape codes without a tty");
    // Laid out to a size given: no line wider, no more lines.
    let o = relayctl(
        &[
            "top",
            "--iterations",
            "1",
            "--width",
            "80",
            "--height",
            "24",
            name,
        ],
        &[],
    );
    assert!(o.status.success(), "{}", show(&o));
    let t = text(&o.stdout);
    assert!(t.lines().count() <= 24, "{t}");
    assert!(t.lines().all(|l| l.chars().count() <= 80), "{t}");
    assert!(t.starts_with(&format!("instance {name} ")), "{t}");
    let o = relayctl(
        &[
            "top",
            "--json",
            "--iterations",
            "2",
            "--interval",
            "0.2",
            name,
        ],
        &[],
    );
    assert!(o.status.success(), "{}", show(&o));
    let frames: Vec<InstanceReport> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one report per line"))
        .collect();
    assert_eq!(frames.len(), 2);
    assert!(frames[0].rates_interval_secs.is_none() && frames[1].rates_interval_secs.is_some());

    // The metrics endpoint, reading the same instance over a real HTTP GET.
    let (maddr, _thread) =
        shmrelay::metrics::spawn("127.0.0.1:0".parse().unwrap(), name.to_owned()).unwrap();
    let mut s = TcpStream::connect(maddr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.contains("Content-Type: application/openmetrics-text; version=1.0.0"));
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    let accepts_metric = body
        .lines()
        .find(|l| l.starts_with("shmrelay_front_accepts_total{") && l.contains("front=\"0\""))
        .expect("accepts metric");
    let v: f64 = accepts_metric.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(v >= 4.0, "{accepts_metric}");
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect(line);
        assert!(
            series.starts_with("shmrelay_") && series.ends_with('}'),
            "{line}"
        );
        assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{line}");
    }

    let (sent, echoed) = load.finish();
    assert!(sent > 0 && echoed > 0);
}

/// A private shm directory for one test.
struct TempShm(PathBuf);

impl TempShm {
    fn new(tag: &str) -> TempShm {
        let d = std::env::temp_dir().join(format!("relayctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempShm(d)
    }
}

impl Drop for TempShm {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A live instance's view at `path` as a supervisor publishes it: this test process holds its
/// lock (liveness is the lock, not a pid) until the returned publisher is dropped.
fn live_view(path: &Path) -> shmrelay::view::Publisher {
    let control = Stats::create_memfd(1, 1).unwrap();
    let mut p = shmrelay::view::Publisher::create(path, 7, &control, 1, 1).unwrap();
    p.publish(&control, &[]).unwrap();
    p
}

fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// What a dead instance `name` leaves in `dir`: its stats segment, naming a supervisor that is
/// gone (returned), and a ring file (its path returned).
fn dead_instance(dir: &Path, name: &str) -> (u32, PathBuf) {
    let stats = Stats::create(&dir.join(format!("shmrelay.{name}.stats")), 1, 1).unwrap();
    let gone = dead_pid();
    stats.header().supervisor_pid.store(gone, Ordering::Relaxed);
    drop(stats);
    let ring = dir.join(format!("shmrelay.{name}.f0.w0.req"));
    std::fs::write(&ring, vec![0u8; 8192]).unwrap();
    (gone, ring)
}

#[test]
fn stale_segments_are_found_by_leaks_and_removed_by_gc() {
    let tmp = TempShm::new("stale");
    let dir = tmp.0.as_path();
    let env = [("SHMRELAY_SHM_DIR", dir)];
    let stale = "stale-one";
    let live = "live-one";

    // A dead instance: its stats segment names a supervisor that is gone, plus a ring file.
    let (gone, ring) = dead_instance(dir, stale);
    // A live one (this test process is its "supervisor"), and an orphan ring of no instance.
    let _live = live_view(&dir.join(format!("shmrelay.{live}.stats")));
    let orphan = dir.join("shmrelay.nobody.f0.w0.rep");
    std::fs::write(&orphan, b"junk").unwrap();

    let o = relayctl(&["list", "--json"], &env);
    assert!(o.status.success(), "{}", show(&o));
    let l: ListReport = serde_json::from_slice(&o.stdout).unwrap();
    let state = |n: &str| l.instances.iter().find(|i| i.name == n).map(|i| i.alive);
    assert_eq!(
        (state(stale), state(live)),
        (Some(false), Some(true)),
        "{l:?}"
    );

    let o = relayctl(&["stat", stale], &env);
    assert_eq!(
        o.status.code(),
        Some(1),
        "stat of a dead instance: {}",
        show(&o)
    );
    assert!(text(&o.stdout).contains("dead"), "{}", show(&o));

    let o = relayctl(&["leaks"], &env);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let t = text(&o.stdout);
    assert!(t.contains(stale) && t.contains("relayctl gc"), "{t}");
    assert!(t.contains(&orphan.display().to_string()), "{t}");

    let o = relayctl(&["leaks", "--json"], &env);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let lk: LeaksReport = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(lk.dead_instances.len(), 1);
    assert_eq!(lk.dead_instances[0].name, stale);
    assert_eq!(lk.dead_instances[0].supervisor_pid, gone);
    assert_eq!(lk.dead_instances[0].files.len(), 2);
    assert_eq!(lk.orphan_files.len(), 1);
    assert!(lk.instances.iter().any(|i| i.name == live));
    assert!(!lk.problems.is_empty());

    // The dry run removes nothing and says what it would remove.
    let o = relayctl(&["gc", "--dry-run"], &env);
    assert!(o.status.success(), "{}", show(&o));
    let t = text(&o.stdout);
    assert!(
        t.contains("would remove") && t.contains(&ring.display().to_string()),
        "{t}"
    );
    assert!(
        ring.exists() && orphan.exists() && dir.join(format!("shmrelay.{stale}.stats")).exists()
    );

    let o = relayctl(&["gc", "--json"], &env);
    assert!(o.status.success(), "{}", show(&o));
    let g: GcReport = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!g.dry_run);
    assert_eq!(g.removed.len(), 3, "{g:?}");
    assert!(g.failed.is_empty() && g.untrusted.is_empty());
    assert!(!ring.exists() && !orphan.exists());
    assert!(!dir.join(format!("shmrelay.{stale}.stats")).exists());
    assert!(
        dir.join(format!("shmrelay.{live}.stats")).exists(),
        "gc removed a live instance"
    );

    let o = relayctl(&["leaks"], &env);
    assert!(o.status.success(), "nothing left to find: {}", show(&o));
    let o = relayctl(&["gc"], &env);
    assert!(
        o.status.success() && text(&o.stdout).contains("nothing to remove"),
        "{}",
        show(&o)
    );
}

/// Runs relayctl expecting an error (exit 2) whose message contains `what`; returns stderr.
fn fails_with(args: &[&str], env: &[(&str, &Path)], what: &str) -> String {
    let o = relayctl(args, env);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {}", show(&o));
    let e = text(&o.stderr);
    assert!(e.contains(what), "{args:?}: {}", show(&o));
    e
}

#[test]
fn gc_of_one_instance_leaves_the_others_alone() {
    let tmp = TempShm::new("gc-one");
    let dir = tmp.0.as_path();
    let env = [("SHMRELAY_SHM_DIR", dir)];
    let (_, ring_a) = dead_instance(dir, "dead-a");
    let (_, ring_b) = dead_instance(dir, "dead-b");
    let (stats_a, stats_b) = (
        dir.join("shmrelay.dead-a.stats"),
        dir.join("shmrelay.dead-b.stats"),
    );
    let _live = live_view(&dir.join("shmrelay.live-c.stats"));
    let orphan = dir.join("shmrelay.nobody.f0.w0.rep");
    std::fs::write(&orphan, b"junk").unwrap();
    let all_there = || [&ring_a, &stats_a, &ring_b, &stats_b, &orphan].map(|p| p.exists());

    // The dry run names only dead-a's two files.
    let o = relayctl(&["gc", "dead-a", "--dry-run", "--json"], &env);
    assert!(o.status.success(), "{}", show(&o));
    let g: GcReport = serde_json::from_slice(&o.stdout).unwrap();
    assert!(g.dry_run);
    let mut paths: Vec<&str> = g.removed.iter().map(|f| f.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [ring_a.to_str().unwrap(), stats_a.to_str().unwrap()],
        "{g:?}"
    );
    assert!(g.removed.iter().all(|f| f.instance == "dead-a"));
    assert_eq!(all_there(), [true; 5], "a dry run removes nothing");

    // The real run removes them and nothing else.
    let o = relayctl(&["gc", "dead-a"], &env);
    assert!(o.status.success(), "{}", show(&o));
    let t = text(&o.stdout);
    assert!(
        t.contains("2 file(s)") && t.contains("instance dead-a"),
        "{t}"
    );
    assert!(!t.contains("dead-b") && !t.contains("nobody"), "{t}");
    assert_eq!(all_there(), [false, false, true, true, true]);

    // A live instance is refused, an unknown one (now dead-a too) is named as such.
    fails_with(&["gc", "live-c"], &env, "`live-c` is alive");
    assert!(dir.join("shmrelay.live-c.stats").exists());
    for unknown in ["dead-a", "never-was"] {
        let e = fails_with(&["gc", unknown], &env, &format!("no instance `{unknown}`"));
        assert!(e.contains("instances here: dead-b"), "{e}");
    }
    fails_with(&["gc", "../x"], &env, "not a valid instance name");

    // An instance with only orphan files is cleaned up by its name too.
    let o = relayctl(&["gc", "nobody"], &env);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(all_there(), [false, false, true, true, false]);

    // Without a name, gc still cleans up every dead instance.
    let o = relayctl(&["gc"], &env);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(all_there(), [false; 5]);
    assert!(dir.join("shmrelay.live-c.stats").exists());
}

#[test]
fn errors_say_what_to_do_and_exit_2() {
    let tmp = TempShm::new("errors");
    let env = [("SHMRELAY_SHM_DIR", tmp.0.as_path())];
    fails_with(&["stat"], &env, "no live shmrelay instance");
    fails_with(&["stat", "missing"], &env, "no instance `missing`");
    let o = relayctl(&["top", "--iterations", "x"], &env);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let o = relayctl(&["list"], &env);
    assert!(o.status.success() && text(&o.stdout).contains("no shmrelay instances"));

    // Two live instances and none named.
    let _a = live_view(&tmp.0.join("shmrelay.a.stats"));
    let _b = live_view(&tmp.0.join("shmrelay.b.stats"));
    fails_with(&["stat"], &env, "2 live instances (a, b)");
}
