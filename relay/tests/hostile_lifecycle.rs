//! Issue 12, worker and front lifecycles under hostile or broken peers: lying answered
//! positions (12.2), children that outlive their worker (12.3), poison frames (12.7), no worker
//! left (12.8), a stopped front (12.10).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shmrelay::stats::{RejectReason, WorkerState};
use shmrelay_tests::{alive, breakable_worker, eventually, scratch, shell_worker, Client, Relay};
use shmrelay_worker::CloseReason;

const BIN: &str = env!("CARGO_BIN_EXE_shmrelay");

fn kill(pid: u32, sig: i32) {
    assert!(pid > 0);
    // SAFETY: signalling a process of our own test.
    unsafe { libc::kill(pid as i32, sig) };
}

fn pids_in(file: &Path) -> Vec<u32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// 12.2: a worker that answers with `aux = 2^62` and exits must not make its replacements
/// skip every frame: the front sees a position beyond what it published, quarantines the
/// rings (the liar's client gets an error), and new clients are served by the replacement.
#[test]
fn lying_answered_position_is_quarantined_and_new_clients_are_served() {
    lie_is_quarantined("liar");
}

/// 12.2, the lie read late: the liar publishes its record without waking the front and exits,
/// so the front may first read it while it switches to the replacement's rings.
#[test]
fn lying_answer_read_at_the_ring_switch_is_quarantined() {
    lie_is_quarantined("quiet-liar");
}

fn lie_is_quarantined(kind: &str) {
    let w = format!("worker_cmd={:?}", format!("{BIN} worker {kind}"));
    let relay = Relay::start(kind, &["--workers", "1", "--set", &w]);
    let mut first = relay.connect();
    first
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    first.send(b"who answers?");
    // The lie is not delivered as a reply: the ring is quarantined instead.
    let mut frames = Vec::new();
    while let Some(f) = first.recv() {
        frames.push(f);
    }
    assert!(
        frames.iter().all(|f| f != b"lie"),
        "the reply with an impossible request position was delivered: {frames:?}"
    );
    assert!(
        frames
            .iter()
            .any(|f| f == b"shmrelay-error: worker unavailable"),
        "the liar's client got no error before the close: {frames:?}"
    );
    let s = relay.stats();
    assert!(s.front(0).corrupt_rings.load(Ordering::Relaxed) >= 1);
    // New clients are answered (never silence), by an honest replacement.
    let served = eventually(Duration::from_secs(20), || {
        let mut c = relay.connect();
        c.stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        c.try_roundtrip(b"hello").as_deref() == Some(&b"hello"[..])
            && c.try_roundtrip(b"again").as_deref() == Some(&b"again"[..])
    });
    assert!(served, "after the lie no client is ever answered");
}

/// 12.3: a worker forks a child that stays in its process group and one that calls setsid;
/// when the worker is replaced both are killed, and after SIGTERM of the relay no process
/// it (or its replacement) started remains.
#[test]
fn a_workers_children_die_at_its_restart_and_at_shutdown() {
    let dir = scratch("children");
    let pids = dir.join("pids");
    let cmd = shell_worker(
        &dir,
        &format!(
            "sleep 3600 &\necho $! >> {p}\nsetsid sh -c 'echo $$ >> {p}; exec sleep 3600' &\n\
             while [ $(wc -l < {p}) -lt $(( ${{SHMRELAY_RESTARTS}} * 2 + 2 )) ]; do sleep 0.05; done\n\
             exec {BIN} worker echo",
            p = pids.display()
        ),
    );
    let mut relay = Relay::start("children", &["--workers", "1", "--worker-cmd", &cmd]);
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"a").as_deref(), Some(&b"a"[..]));
    assert!(eventually(Duration::from_secs(10), || pids_in(&pids).len() == 2));
    let first = pids_in(&pids);
    assert!(first.iter().all(|&p| alive(p)), "children started");
    // Replace the worker.
    let worker = relay.worker_pid(0);
    kill(worker, libc::SIGKILL);
    assert!(
        eventually(Duration::from_secs(15), || pids_in(&pids).len() == 4),
        "the replacement did not start"
    );
    let all = pids_in(&pids);
    let result = (|| {
        if !eventually(Duration::from_secs(5), || !first.iter().any(|&p| alive(p))) {
            return Err(format!(
                "children of the replaced worker still alive: {:?}",
                first.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
            ));
        }
        let mut c = relay.connect();
        if c.try_roundtrip(b"b").as_deref() != Some(&b"b"[..]) {
            return Err("the replacement does not serve".into());
        }
        relay.signal(libc::SIGTERM);
        if relay.wait_exit(Duration::from_secs(15)) != Some(0) {
            return Err("the relay did not stop cleanly".into());
        }
        if !eventually(Duration::from_secs(5), || !all.iter().any(|&p| alive(p))) {
            return Err(format!(
                "processes started by workers outlived the relay: {:?}",
                all.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
            ));
        }
        Ok(())
    })();
    // Never leave the sleepers behind, whatever happened.
    for p in pids_in(&pids) {
        if alive(p) {
            kill(p, libc::SIGKILL);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap();
}

/// 12.8: with every worker failed, a new client is refused at once with the codec's error
/// (counted as `no_worker`), never left waiting in the backlog.
#[test]
fn with_every_worker_failed_new_clients_are_refused_at_once_with_an_error() {
    let dir = scratch("noworker");
    let (cmd, mark) = breakable_worker(&dir, BIN);
    let relay = Relay::start(
        "noworker",
        &[
            "--workers",
            "1",
            "--worker-cmd",
            &cmd,
            "--set",
            "crash_limit=3",
            "--set",
            "failed_retry_max_ms=600000",
        ],
    );
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"up").as_deref(), Some(&b"up"[..]));
    std::fs::write(&mark, b"").unwrap();
    kill(relay.worker_pid(0), libc::SIGKILL);
    let s = relay.stats();
    assert!(
        eventually(Duration::from_secs(15), || s
            .header()
            .pool_failed
            .load(Ordering::Relaxed)
            == 1),
        "the worker was never marked failed"
    );
    // Refused at once: an error frame, then the close, well within the wait. (A client
    // accepted just before the front saw the failure gets the same error from the quarantine;
    // later ones are refused at the accept.)
    let no_worker = || s.front(0).rejects[RejectReason::NoWorker as usize].load(Ordering::Relaxed);
    let refused = eventually(Duration::from_secs(10), || {
        let before = no_worker();
        let t0 = Instant::now();
        let mut late = relay.connect();
        late.stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = Vec::new();
        let _ = late.stream.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        // The counter reaches the published view within a publish period or two.
        t0.elapsed() < Duration::from_secs(2)
            && text.contains("shmrelay-error: worker unavailable")
            && eventually(Duration::from_secs(1), || no_worker() > before)
    });
    assert!(
        refused,
        "a new client was not refused at once with an error, counted as no_worker"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// 12.8: if every worker fails during start-up (none ever attached), the relay exits
/// non-zero with the reason instead of running without any.
#[test]
fn every_worker_failing_during_start_up_exits_non_zero_with_the_reason() {
    let instance = format!("t-startfail-{}", std::process::id());
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--instance", &instance])
        .args(["--workers", "2", "--worker-cmd", "/bin/false"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = status.expect("the relay kept running with no worker at all");
    assert_ne!(status.code(), Some(0), "exit status {status:?}");
    assert!(
        err.contains("every worker failed during start-up"),
        "the reason is not given: {err}"
    );
    assert!(shmrelay::names::instance_files(&instance).is_empty());
}

/// 12.7: a frame that crashes the worker on every delivery is dead-lettered: its client gets
/// the codec's error and a close, the worker's other clients keep being served, the worker is
/// not marked failed, and the dead letter is counted.
#[test]
fn poison_frame_is_dead_lettered_and_the_worker_serves_everyone_else() {
    let w = format!("worker_cmd={:?}", format!("{BIN} worker scribbler"));
    let relay = Relay::start("poison", &["--workers", "1", "--set", &w]);
    let mut others: Vec<Client> = (0..3).map(|_| relay.connect()).collect();
    for (i, c) in others.iter_mut().enumerate() {
        let p = format!("hello {i}");
        assert_eq!(c.try_roundtrip(p.as_bytes()), Some(p.into_bytes()));
    }
    let mut bad = relay.connect();
    bad.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    bad.send(b"poison");
    let mut frames = Vec::new();
    while let Some(f) = bad.recv() {
        frames.push(f);
    }
    assert_eq!(
        frames,
        vec![b"shmrelay-error: frame dead-lettered".to_vec()],
        "the poison client gets the error, then the close"
    );
    for (i, c) in others.iter_mut().enumerate() {
        let p = format!("still here {i}");
        assert_eq!(
            c.try_roundtrip(p.as_bytes()),
            Some(p.into_bytes()),
            "client {i} on the same worker is still served"
        );
    }
    let mut late = relay.connect();
    assert_eq!(late.try_roundtrip(b"new").as_deref(), Some(&b"new"[..]));
    let s = relay.stats();
    let ws = s.worker(0);
    assert_eq!(ws.dead_letters.load(Ordering::Relaxed), 1);
    assert_eq!(
        ws.crashes.load(Ordering::Relaxed),
        3,
        "first delivery + 2 redeliveries"
    );
    assert_eq!(
        WorkerState::from_code(ws.state.load(Ordering::Relaxed)),
        WorkerState::Running
    );
    assert!(ws.dead_letter_pos.load(Ordering::Relaxed) > 0);
    assert_ne!(ws.dead_letter_conn.load(Ordering::Relaxed), 0);
    assert_eq!(s.header().pool_failed.load(Ordering::Relaxed), 0);
}

/// 12.7: a failed worker is retried with a backoff: once its cause is gone it serves again,
/// without an operator; SIGUSR1 retries at once.
#[test]
fn failed_worker_is_retried_and_sigusr1_revives_it_at_once() {
    let dir = scratch("retry");
    let (cmd, mark) = breakable_worker(&dir, BIN);
    let relay = Relay::start(
        "retry",
        &[
            "--workers",
            "1",
            "--worker-cmd",
            &cmd,
            "--set",
            "crash_limit=2",
        ],
    );
    let s = relay.stats();
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"up").as_deref(), Some(&b"up"[..]));
    std::fs::write(&mark, b"").unwrap();
    kill(relay.worker_pid(0), libc::SIGKILL);
    assert!(eventually(Duration::from_secs(15), || s
        .header()
        .pool_failed
        .load(Ordering::Relaxed)
        == 1));
    // The cause goes away: the backoff retry (1 s) brings it back by itself.
    std::fs::remove_file(&mark).unwrap();
    let back = eventually(Duration::from_secs(15), || {
        let mut c = relay.connect();
        c.stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        c.try_roundtrip(b"back?").as_deref() == Some(&b"back?"[..])
    });
    assert!(back, "the failed worker was never retried");
    // Fail it again and let the backoff grow past the test's patience, then revive.
    std::fs::write(&mark, b"").unwrap();
    kill(relay.worker_pid(0), libc::SIGKILL);
    assert!(eventually(
        Duration::from_secs(15),
        || WorkerState::from_code(s.worker(0).state.load(Ordering::Relaxed)) == WorkerState::Failed
    ));
    // Each retry fails at once (its crashes are still in the window), doubling the wait:
    // retries 2 s and 6 s after this, then not before 14 s.
    std::thread::sleep(Duration::from_secs(7));
    std::fs::remove_file(&mark).unwrap();
    let crashes = s.worker(0).crashes.load(Ordering::Relaxed);
    relay.signal(libc::SIGUSR1);
    let revived = eventually(Duration::from_secs(4), || {
        let mut c = relay.connect();
        c.stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        c.try_roundtrip(b"revived").as_deref() == Some(&b"revived"[..])
    });
    assert!(revived, "SIGUSR1 did not revive the failed worker at once");
    assert_eq!(s.worker(0).crashes.load(Ordering::Relaxed), crashes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// 12.10: a SIGSTOPped front is detected like a hung worker and replaced.
#[test]
fn stopped_front_is_detected_and_replaced() {
    let relay = Relay::start(
        "frontstop",
        &["--workers", "1", "--set", "hang_timeout_ms=1000"],
    );
    let s = relay.stats();
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"a").as_deref(), Some(&b"a"[..]));
    let pid = s.front(0).pid.load(Ordering::Relaxed);
    kill(pid, libc::SIGSTOP);
    let replaced = eventually(Duration::from_secs(20), || {
        let now = s.front(0).pid.load(Ordering::Relaxed);
        now != pid && now != 0
    });
    if !replaced {
        kill(pid, libc::SIGCONT);
    }
    assert!(replaced, "the stopped front was never replaced");
    assert!(s.front_process(0).hangs.load(Ordering::Relaxed) >= 1);
    assert!(eventually(Duration::from_secs(10), || {
        let mut c = relay.connect();
        c.try_roundtrip(b"b").as_deref() == Some(&b"b"[..])
    }));
}

/// 12.10: a front stopped for less than the detection window and then continued does not
/// close, as heartbeat_timeout, clients that answered every ping: its own lateness is not
/// theirs.
#[test]
fn a_late_front_does_not_blame_its_clients() {
    let relay = Relay::start(
        "frontlate",
        &[
            "--workers",
            "1",
            "--set",
            "ping_min_ms=200",
            "--set",
            "ping_max_ms=300",
            "--set",
            "heartbeat_timeout_ms=1500",
            "--set",
            "hang_timeout_ms=20000",
        ],
    );
    let s = relay.stats();
    let c = relay.connect();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // A client that answers every ping and reports its replies.
    let mut writer = c.stream.try_clone().unwrap();
    let rx = shmrelay_tests::read_frames(c.stream.try_clone().unwrap(), true);
    let send = |w: &mut std::net::TcpStream, p: &[u8]| {
        let mut b = (p.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(p);
        w.write_all(&b).unwrap();
    };
    send(&mut writer, b"before");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().as_deref(),
        Some(&b"before"[..])
    );
    // Pinged and answering for a while.
    std::thread::sleep(Duration::from_secs(1));
    let front = s.front(0).pid.load(Ordering::Relaxed);
    kill(front, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    kill(front, libc::SIGCONT);
    // Longer than the heartbeat timeout after the stall, answering pings throughout.
    std::thread::sleep(Duration::from_secs(2));
    send(&mut writer, b"after");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().as_deref(),
        Some(&b"after"[..]),
        "the client was closed although it answered every ping"
    );
    assert_eq!(
        s.front(0).closes[CloseReason::HeartbeatTimeout as usize].load(Ordering::Relaxed),
        0
    );
    assert_eq!(s.front(0).pid.load(Ordering::Relaxed), front);
}
