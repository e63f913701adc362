//! Crashes, hangs and leaks: the relay survives its processes failing, loses nothing, and says
//! what happened.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmrelay::stats::WorkerState;
use shmrelay_tests::{alive, breakable_worker, eventually, scratch, Client, Relay};
use shmrelay_worker::CloseReason;

fn journal_worker() -> String {
    format!(
        "worker_cmd={:?}",
        format!("{} worker journal", env!("CARGO_BIN_EXE_shmrelay"))
    )
}

fn kill(pid: u32, sig: i32) {
    assert!(pid > 0);
    // SAFETY: signalling a process of our own test.
    unsafe { libc::kill(pid as i32, sig) };
}

/// A pipelining client that numbers its requests and checks every reply: exactly once, in order.
fn pipelined_client(
    addr: std::net::SocketAddr,
    id: u32,
    depth: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        let frame = |seq: u64| {
            let mut f = 12u32.to_be_bytes().to_vec();
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&seq.to_be_bytes());
            f
        };
        let (mut sent, mut got) = (0u64, 0u64);
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            while !stopping && sent - got < depth as u64 {
                c.stream.write_all(&frame(sent)).expect("send");
                sent += 1;
            }
            if stopping && got == sent {
                return got;
            }
            let mut buf = [0u8; 16];
            c.stream
                .read_exact(&mut buf)
                .expect("every request is answered (no loss)");
            assert_eq!(&buf[..4], &12u32.to_be_bytes());
            assert_eq!(u32::from_be_bytes(buf[4..8].try_into().unwrap()), id);
            let seq = u64::from_be_bytes(buf[8..16].try_into().unwrap());
            assert_eq!(
                seq, got,
                "client {id}: reply {seq} where {got} was due (a duplicate or a loss)"
            );
            got += 1;
        }
    })
}

#[test]
fn worker_kill_loop_under_pipelined_load_answers_every_request_exactly_once() {
    let relay = Relay::start("killloop", &["--workers", "2", "--set", "crash_limit=100"]);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|i| pipelined_client(relay.addr, i, 16, stop.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for round in 0..6 {
        let w = round % 2;
        let pid = relay.worker_pid(w);
        kill(pid, libc::SIGKILL);
        assert!(eventually(Duration::from_secs(10), || {
            let p = relay.worker_pid(w);
            p != 0 && p != pid
        }));
        std::thread::sleep(Duration::from_millis(150));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let answered: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(answered > 1000, "only {answered} requests answered");
    let s = relay.stats();
    assert_eq!(
        s.worker(0).crashes.load(Ordering::Relaxed) + s.worker(1).crashes.load(Ordering::Relaxed),
        6
    );
    eprintln!("{answered} requests answered exactly once across 6 worker kills");
}

#[test]
fn front_kill_disconnects_only_its_clients_and_workers_get_their_closes() {
    let w = journal_worker();
    let relay = Relay::start(
        "frontkill",
        &["--fronts", "2", "--workers", "1", "--set", &w],
    );
    let mut clients: Vec<Client> = (0..24).map(|_| relay.connect()).collect();
    for c in &mut clients {
        assert_eq!(c.try_roundtrip(b"hi").as_deref(), Some(&b"hi"[..]));
    }
    let s = relay.stats();
    let on_front0 = s.front(0).conns_open.load(Ordering::Relaxed);
    assert!(
        on_front0 > 0 && on_front0 < 24,
        "both fronts hold clients ({on_front0} on front 0)"
    );
    let pid0 = s.front(0).pid.load(Ordering::Relaxed);
    kill(pid0, libc::SIGKILL);
    // Front 0's clients see a close; front 1's keep working.
    let mut lost = 0;
    for c in &mut clients {
        match c.try_roundtrip(b"again") {
            Some(r) => assert_eq!(r, b"again"),
            None => lost += 1,
        }
    }
    assert_eq!(
        lost, on_front0,
        "exactly the dead front's clients were disconnected"
    );
    // Reconnecting works at once: the listening socket never closed.
    let t = Instant::now();
    let mut back = relay.connect();
    assert_eq!(back.try_roundtrip(b"back").as_deref(), Some(&b"back"[..]));
    assert!(t.elapsed() < Duration::from_secs(2));
    // The worker got a CLOSE for every connection of the dead front.
    assert!(eventually(Duration::from_secs(5), || {
        let j = String::from_utf8(
            relay
                .connect()
                .try_roundtrip(b"journal?")
                .unwrap_or_default(),
        )
        .unwrap();
        j.matches("front_gone").count() as u64 == on_front0
    }));
    assert!(
        eventually(Duration::from_secs(10), || relay
            .stats()
            .front(0)
            .pid
            .load(Ordering::Relaxed)
            != pid0),
        "front 0 restarted"
    );
    assert!(!alive(pid0));
}

#[test]
fn stopped_worker_is_detected_as_hung_and_recovers_on_sigcont() {
    let relay = Relay::start(
        "hang",
        &[
            "--workers",
            "1",
            "--set",
            "hang_timeout_ms=400",
            "--set",
            "kill_hung=false",
        ],
    );
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"a").as_deref(), Some(&b"a"[..]));
    // Idle for longer than the hang timeout: not hung.
    std::thread::sleep(Duration::from_millis(1000));
    let s = relay.stats();
    assert_eq!(
        s.worker(0).hangs.load(Ordering::Relaxed),
        0,
        "an idle worker was taken for a hung one"
    );
    let pid = relay.worker_pid(0);
    kill(pid, libc::SIGSTOP);
    c.send(b"while stopped");
    assert!(
        eventually(Duration::from_secs(5), || WorkerState::from_code(
            s.worker(0).state.load(Ordering::Relaxed)
        ) == WorkerState::Hung),
        "hang not detected"
    );
    assert_eq!(s.worker(0).hangs.load(Ordering::Relaxed), 1);
    kill(pid, libc::SIGCONT);
    assert_eq!(c.recv().as_deref(), Some(&b"while stopped"[..]));
    assert!(eventually(
        Duration::from_secs(5),
        || WorkerState::from_code(s.worker(0).state.load(Ordering::Relaxed))
            == WorkerState::Running
    ));
    assert_eq!(
        relay.worker_pid(0),
        pid,
        "not replaced when kill_hung is off"
    );
}

#[test]
fn hung_worker_is_replaced_and_its_frames_are_served() {
    let relay = Relay::start(
        "hangkill",
        &["--workers", "1", "--set", "hang_timeout_ms=300"],
    );
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"a").as_deref(), Some(&b"a"[..]));
    let pid = relay.worker_pid(0);
    kill(pid, libc::SIGSTOP);
    for i in 0..10u8 {
        c.send(&[i; 10]);
    }
    for i in 0..10u8 {
        assert_eq!(c.recv().expect("served by the replacement"), vec![i; 10]);
    }
    assert_ne!(relay.worker_pid(0), pid);
    assert_eq!(relay.stats().worker(0).hangs.load(Ordering::Relaxed), 1);
}

#[test]
fn worker_that_keeps_crashing_is_failed_and_clients_get_an_error_not_a_hang() {
    // A worker that serves, then crashes at every start once MARK exists (one that never
    // starts at all makes the relay exit: `hostile_lifecycle.rs`).
    let dir = scratch("failed");
    let (cmd, mark) = breakable_worker(&dir, env!("CARGO_BIN_EXE_shmrelay"));
    let relay = Relay::start(
        "failed",
        &[
            "--workers",
            "1",
            "--worker-cmd",
            &cmd,
            "--set",
            "crash_limit=3",
        ],
    );
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"up").as_deref(), Some(&b"up"[..]));
    std::fs::write(&mark, b"").unwrap();
    kill(relay.worker_pid(0), libc::SIGKILL);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    c.send(b"anyone?");
    let err = c.recv().expect("an error frame, not silence");
    assert_eq!(err, b"shmrelay-error: worker unavailable");
    assert_eq!(c.recv(), None, "then a close");
    // New connections are refused at once. (Checked before reading the stats view, which
    // waits for the supervisor's next publishes.)
    let mut late = relay.connect();
    assert!(late.closed_within(Duration::from_secs(2)));
    let s = relay.stats();
    assert_eq!(
        WorkerState::from_code(s.worker(0).state.load(Ordering::Relaxed)),
        WorkerState::Failed
    );
    assert_eq!(s.header().pool_failed.load(Ordering::Relaxed), 1);
    assert!(eventually(Duration::from_secs(5), || s.front(0).closes
        [CloseReason::WorkerGone as usize]
        .load(Ordering::Relaxed)
        >= 1));
}

#[test]
fn stale_segments_of_a_dead_instance_are_removed_at_start() {
    let instance = format!("t-stale-{}", std::process::id());
    let dir = shmrelay::names::shm_dir();
    let fake = dir.join(format!("shmrelay.{instance}.f0.w0.req"));
    std::fs::write(&fake, b"left behind by a crash").unwrap();
    // A stats segment whose supervisor is long dead.
    let stats_path = shmrelay::names::stats_path(&instance);
    let st = shmrelay::stats::Stats::create(&stats_path, 1, 1).unwrap();
    st.header()
        .supervisor_pid
        .store(999_999_999, Ordering::Relaxed);
    drop(st);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shmrelay"))
        .args(["--listen", "127.0.0.1:0", "--instance", &instance])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut relay = Relay::from_child(out, &instance);
    assert!(eventually(Duration::from_secs(10), || {
        shmrelay::stats::Stats::open_readonly(&stats_path)
            .map(|s| s.header().supervisor_pid.load(Ordering::Relaxed) == relay.child.id())
            .unwrap_or(false)
    }));
    let s = relay.stats();
    assert!(eventually(Duration::from_secs(5), || s
        .header()
        .stale_segments_removed
        .load(Ordering::Relaxed)
        == 2));
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(relay.shm_files().is_empty());
}

#[test]
fn worker_scribbling_on_shared_memory_is_quarantined_and_replaced() {
    let w = format!(
        "worker_cmd={:?}",
        format!("{} worker scribbler", env!("CARGO_BIN_EXE_shmrelay"))
    );
    for (i, scribble) in [&b"scribble:tail"[..], b"scribble:record", b"scribble:head"]
        .into_iter()
        .enumerate()
    {
        let relay = Relay::start(&format!("scribble{i}"), &["--workers", "2", "--set", &w]);
        let front_pid = relay.stats().front(0).pid.load(Ordering::Relaxed);
        // Connections alternate between the two workers.
        let mut clients: Vec<(Client, Vec<u8>)> = (0..6)
            .map(|_| {
                let mut c = relay.connect();
                let who = c.try_roundtrip(b"whoami").unwrap();
                (c, who)
            })
            .collect();
        let (bad, good): (Vec<_>, Vec<_>) = clients.drain(..).partition(|(_, who)| who == b"0");
        let mut bad: Vec<Client> = bad.into_iter().map(|(c, _)| c).collect();
        let mut good: Vec<Client> = good.into_iter().map(|(c, _)| c).collect();
        assert!(!bad.is_empty() && !good.is_empty());
        bad[0].send(scribble);
        // Worker 0's clients get the error and a close; worker 1's keep being served.
        for c in &mut bad {
            c.stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut got_error = false;
            while let Some(f) = c.recv() {
                if f == b"shmrelay-error: worker unavailable" {
                    got_error = true;
                }
            }
            assert!(
                got_error,
                "{}: no error frame before the close",
                String::from_utf8_lossy(scribble)
            );
        }
        for c in &mut good {
            assert_eq!(c.try_roundtrip(b"fine").as_deref(), Some(&b"fine"[..]));
        }
        let s = relay.stats();
        assert_eq!(s.front(0).corrupt_rings.load(Ordering::Relaxed), 1);
        // The worker is replaced, the rings reset and handed back: new clients reach it.
        assert!(
            eventually(Duration::from_secs(10), || {
                let mut c = relay.connect();
                c.try_roundtrip(b"whoami").as_deref() == Some(&b"0"[..])
                    && c.try_roundtrip(b"again").as_deref() == Some(&b"again"[..])
            }),
            "{}: worker 0 never served again",
            String::from_utf8_lossy(scribble)
        );
        assert_eq!(
            s.front(0).pid.load(Ordering::Relaxed),
            front_pid,
            "the front never crashed"
        );
        // The view lags the relay by up to 50 ms: a fresh one.
        let s = relay.stats();
        assert_eq!(s.front(0).quarantined.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn too_little_shared_memory_is_a_clear_error_at_start() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let dir = std::env::temp_dir().join(format!("shmrelay-small-shm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"])
        .arg(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    // Rings are memfds (allocated in full when created, elsewhere); what the relay writes in
    // this directory is its stats view, about 50 KiB of counters: more than 16 KiB.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shmrelay"))
        .args(["--listen", "127.0.0.1:0", "--instance", "small"])
        .env("SHMRELAY_SHM_DIR", &dir)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let _ = std::process::Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir(&dir);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no space"), "not a clear error: {err}");
    assert!(
        leftovers.is_empty(),
        "a failed start left segments behind: {leftovers:?}"
    );
}
