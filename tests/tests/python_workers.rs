//! Python workers (`workers/python`, module `shmrelay_worker`) behind a real relay: the
//! examples with real traffic, a SIGKILL under pipelined load, and the frame view's lifetime.
//!
//! The interpreter is `$SHMRELAY_PYTHON`, else `target/pyvenv/bin/python` (where
//! `workers/python/ci-setup.sh` installs the package), else `python3`. When none of them can
//! `import shmrelay_worker` each test says so and passes, unless `SHMRELAY_REQUIRE_PYTHON` is
//! set (CI sets it), then it fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shmrelay_tests::tungstenite::Message;
use shmrelay_tests::{
    check_ws_echo_example, eventually, pattern, signal, ws_connect, ws_next, Client, Recv, Relay,
    Watchdog,
};

const WAIT: Duration = Duration::from_secs(20);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
}

/// An interpreter that can import `shmrelay_worker`, or None (after saying why) to skip.
fn python() -> Option<String> {
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("SHMRELAY_PYTHON") {
        candidates.push(p);
    }
    candidates.push(
        repo()
            .join("target/pyvenv/bin/python")
            .to_string_lossy()
            .into_owned(),
    );
    candidates.push("python3".into());
    for py in &candidates {
        let ok = std::process::Command::new(py)
            .args(["-c", "import shmrelay_worker"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(py.clone());
        }
    }
    let why = format!(
        "no Python with shmrelay_worker installed (tried {candidates:?}); run \
         `bash workers/python/ci-setup.sh` and set SHMRELAY_PYTHON to the python it prints"
    );
    if std::env::var_os("SHMRELAY_REQUIRE_PYTHON").is_some() {
        panic!("{why} (SHMRELAY_REQUIRE_PYTHON is set)");
    }
    // Straight to stderr: the test harness captures eprintln!, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
    None
}

fn example(name: &str) -> PathBuf {
    repo().join("workers/python/examples").join(name)
}

/// A relay with `workers` Python workers running `script`.
fn relay_with(name: &str, py: &str, script: &Path, workers: usize, extra: &[&str]) -> Relay {
    let cmd = format!("{py} {}", script.display());
    let n = workers.to_string();
    let mut args = vec!["--workers", &n, "--worker-cmd", &cmd];
    args.extend_from_slice(extra);
    Relay::start_serving(name, &args)
}

/// One connection sending `frames` numbered payloads with up to `depth` in flight (or until
/// `stop`), checking that each reply is the next one due: none lost, none twice, in order.
/// Returns how many were answered.
fn pipelined(relay: &Relay, id: usize, frames: usize, depth: usize, stop: Arc<AtomicBool>) -> u64 {
    let mut c = relay.connect();
    let payload = |seq: usize| {
        let mut p = (id as u32).to_be_bytes().to_vec();
        p.extend_from_slice(&(seq as u64).to_be_bytes());
        p.extend_from_slice(&pattern(id, seq, 1 + seq % 61));
        p
    };
    let (mut sent, mut got) = (0usize, 0usize);
    loop {
        let stopping = stop.load(Ordering::Relaxed) || sent == frames;
        while !stopping && sent - got < depth {
            c.try_send(&payload(sent)).expect("send");
            sent += 1;
        }
        if got == sent && (stopping || sent == frames) {
            return got as u64;
        }
        match c.recv_data(WAIT) {
            Recv::Frame(p) => assert!(
                p == payload(got),
                "connection {id}: reply {got} wrong (a loss, a duplicate or a shift): {:?}",
                &p[..p.len().min(12)]
            ),
            other => panic!("connection {id}: {other:?} where reply {got} of {sent} was due"),
        }
        got += 1;
    }
}

/// `clients` connections at once, each [`pipelined`] with `frames` frames, 16 in flight;
/// returns how many were answered.
fn pipelined_clients(relay: &Relay, clients: usize, frames: usize) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let clients: Vec<_> = (0..clients)
            .map(|id| {
                let stop = stop.clone();
                s.spawn(move || pipelined(relay, id, frames, 16, stop))
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).sum()
    })
}

#[test]
fn echo_example_answers_pipelined_frames_on_many_connections() {
    let Some(py) = python() else { return };
    let _dog = Watchdog::new("python echo", Duration::from_secs(180));
    let relay = relay_with("pyecho", &py, &example("echo.py"), 2, &[]);
    assert_eq!(pipelined_clients(&relay, 40, 500), 40 * 500);
    drop(relay);
    // A long reply (split over ring records) comes back whole too.
    let relay = relay_with(
        "pyechobig",
        &py,
        &example("echo.py"),
        1,
        &["--max-frame", "4194304"],
    );
    let mut c = relay.connect();
    let big = pattern(99, 0, 3 << 20);
    assert_eq!(c.roundtrip_within(&big, WAIT), Recv::Frame(big));
}

#[test]
fn chat_example_pushes_to_the_other_members_of_a_room() {
    let Some(py) = python() else { return };
    let _dog = Watchdog::new("python chat", Duration::from_secs(120));
    let relay = relay_with("pychat", &py, &example("chat.py"), 1, &[]);
    let join = |room: &[u8]| {
        let mut c = relay.connect();
        assert_eq!(c.roundtrip_within(room, WAIT), Recv::Frame(room.to_vec()));
        c
    };
    let (mut a, mut b, mut c) = (join(b"lobby"), join(b"lobby"), join(b"lobby"));
    let mut d = join(b"elsewhere");
    a.try_send(b"hello from a").unwrap();
    assert_eq!(b.recv_data(WAIT), Recv::Frame(b"hello from a".to_vec()));
    assert_eq!(c.recv_data(WAIT), Recv::Frame(b"hello from a".to_vec()));
    c.try_send(b"hi, c here").unwrap();
    assert_eq!(a.recv_data(WAIT), Recv::Frame(b"hi, c here".to_vec()));
    assert_eq!(b.recv_data(WAIT), Recv::Frame(b"hi, c here".to_vec()));
    // b leaves: the room forgets it; a's next message reaches c alone.
    drop(b);
    assert!(eventually(WAIT, || relay.conns_total() == 4 - 1));
    a.try_send(b"still there?").unwrap();
    assert_eq!(c.recv_data(WAIT), Recv::Frame(b"still there?".to_vec()));
    // Nobody got their own messages, and the other room heard nothing.
    for (name, client) in [("a", &mut a), ("c", &mut c), ("d", &mut d)] {
        assert_eq!(
            client.recv_data(Duration::from_millis(300)),
            Recv::Timeout,
            "{name} got an unexpected frame"
        );
    }
}

#[test]
fn python_worker_killed_under_pipelined_load_loses_no_request() {
    let Some(py) = python() else { return };
    let _dog = Watchdog::new("python kill", Duration::from_secs(180));
    let relay = relay_with(
        "pykill",
        &py,
        &example("echo.py"),
        1,
        &["--set", "crash_limit=100"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let answered: u64 = std::thread::scope(|s| {
        let clients: Vec<_> = (0..8)
            .map(|id| {
                let (relay, stop) = (&relay, stop.clone());
                s.spawn(move || pipelined(relay, id, usize::MAX, 16, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        for _ in 0..3 {
            let pid = relay.worker_pid(0);
            signal(pid, libc::SIGKILL);
            assert!(eventually(WAIT, || {
                let p = relay.worker_pid(0);
                p != 0 && p != pid
            }));
            // Let the replacement import Python and serve for a while.
            std::thread::sleep(Duration::from_millis(700));
        }
        stop.store(true, Ordering::Relaxed);
        clients.into_iter().map(|c| c.join().unwrap()).sum()
    });
    let s = relay.stats();
    assert_eq!(s.worker(0).crashes.load(Ordering::Relaxed), 3);
    assert!(answered > 100, "only {answered} requests answered");
    eprintln!("{answered} requests answered exactly once across 3 SIGKILLs of a Python worker");
}

/// A worker that keeps frames and views of them past the callback and reports what they do
/// later; raises on request; and notes in `MARK` that `run` returned.
const PROBE_WORKER: &str = r#"
import gc, pickle, sys, threading, time, weakref
import shmrelay_worker

MARK = sys.argv[1]
kept = {}
ticks = [0]

def tick():
    while True:
        ticks[0] += 1
        time.sleep(0.001)

def outcome(f):
    try:
        f()
        return "readable"
    except ValueError:
        return "revoked"

class Probe:
    def __init__(self, out):
        self.out = out

    def on_frame(self, conn, frame, redelivered):
        cmd = bytes(frame)
        if cmd == b"keep":
            kept["frame"] = frame
            kept["slice"] = frame[1:3]
            kept["cast"] = frame.cast("c")
            kept["view"] = memoryview(frame)
            kept["iter"] = iter(frame)
            kept["out"] = self.out
            self.out.send(conn, b"kept")
        elif cmd == b"probe":
            r = [n + ":" + outcome(lambda n=n: bytes(kept[n])) for n in ("frame", "slice", "cast", "view")]
            r.append("iter:" + outcome(lambda: next(kept["iter"])))
            r.append("len:" + outcome(lambda: len(kept["frame"])))
            self.out.send(conn, " ".join(r))
        elif cmd == b"thread-out":
            box = []
            def other():
                try:
                    self.out.send(conn, b"from a thread")
                    box.append("sent")
                except BaseException as e:
                    box.append(type(e).__name__)
            t = threading.Thread(target=other)
            t.start()
            t.join()
            self.out.send(conn, box[0])
        elif cmd == b"raise":
            raise RuntimeError("the handler failed")
        elif cmd == b"exit":
            raise SystemExit(3)
        elif cmd in (b"raw", b"raw-slice", b"raw-released"):
            if redelivered:
                self.out.send(conn, cmd + b":redelivered")
                return
            view = frame if cmd == b"raw" else frame[1:]
            if cmd == b"raw-released":
                frame.release()
            kept["raw"] = pickle.PickleBuffer(view)
            self.out.send(conn, cmd + b":kept")
        elif cmd == b"edges":
            # What out.send refuses, and what it reads in place (a slice, an equal int).
            released = memoryview(b"abcdef")
            released.release()
            r = []
            for name, f in [
                ("released", lambda: self.out.send(conn, released)),
                ("revoked", lambda: self.out.send(conn, kept["frame"])),
                ("strided", lambda: self.out.send(conn, memoryview(b"abcdef")[::2])),
                ("one-arg", lambda: self.out.send(conn)),
                ("keywords", lambda: self.out.send(conn=conn, data=b"x")),
                ("bad-conn", lambda: self.out.send("1", b"x")),
            ]:
                try:
                    f()
                    r.append(name + ":sent")
                except Exception as e:
                    r.append(name + ":" + type(e).__name__)
            self.out.send(int(str(conn)), frame[1:3])
            self.out.push(conn, bytearray(b"pushed"))
            self.out.send(conn, " ".join(r))
        elif cmd == b"ticks":
            self.out.send(conn, str(ticks[0]))
        elif cmd.startswith(b"hash:"):
            # A view reused for a new frame must not keep the previous frame's hash.
            self.out.send(conn, str(hash(frame) == hash(cmd)))
        elif cmd == b"weak":
            kept["weak"] = weakref.ref(frame)
            self.out.send(conn, b"weak")
        elif cmd == b"weak-check":
            w = kept["weak"]()
            self.out.send(conn, "gone" if w is None else outcome(lambda: bytes(w)))
        elif cmd == b"gc-scan":
            # No other view the collector knows shows ring bytes.
            seen = [o for o in gc.get_objects() if isinstance(o, memoryview) and o is not frame]
            readable = [o for o in seen if outcome(lambda o=o: bytes(o)) == "readable" and len(o)]
            self.out.send(conn, "readable views: %d" % len(readable))
        else:
            self.out.send(conn, frame)

threading.Thread(target=tick, daemon=True).start()
worker = shmrelay_worker.Worker.from_env()
worker.run(Probe(worker.out))
try:
    worker.out.send(0, b"after run")
    outside = "sent"
except RuntimeError:
    outside = "RuntimeError"
with open(MARK, "a") as f:
    f.write("run returned; out outside a callback: %s\n" % outside)
"#;

/// A relay with one worker running `PROBE_WORKER`, a watchdog, the path of the worker's
/// `MARK` file and a client; None to skip (no Python with the module).
fn probe_relay(name: &str) -> Option<(Relay, Watchdog, PathBuf, Client)> {
    let py = python()?;
    let dog = Watchdog::new(name, Duration::from_secs(120));
    let (cmd, mark) = probe_cmd(name, &py);
    let relay = Relay::start_serving(name, &["--workers", "1", "--worker-cmd", &cmd]);
    let client = relay.connect();
    Some((relay, dog, mark, client))
}

/// The command that runs `PROBE_WORKER` with `py`, and the path of its `MARK` file.
fn probe_cmd(name: &str, py: &str) -> (String, PathBuf) {
    let dir = std::env::temp_dir().join(format!("shmrelay-py-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("probe.py");
    let mark = dir.join("MARK");
    let _ = std::fs::remove_file(&mark);
    std::fs::write(&script, PROBE_WORKER).unwrap();
    (
        format!("{py} {} {}", script.display(), mark.display()),
        mark,
    )
}

#[test]
fn frame_views_kept_past_the_callback_raise_instead_of_reading_the_ring() {
    let Some((_relay, _dog, _, mut c)) = probe_relay("pyviews") else {
        return;
    };
    assert_eq!(
        c.roundtrip_within(b"keep", WAIT),
        Recv::Frame(b"kept".to_vec())
    );
    // Frames in between overwrite nothing the views could still show.
    for i in 0..50u32 {
        let p = i.to_be_bytes();
        assert_eq!(c.roundtrip_within(&p, WAIT), Recv::Frame(p.to_vec()));
    }
    assert_eq!(
        c.roundtrip_within(b"probe", WAIT),
        Recv::Frame(
            b"frame:revoked slice:revoked cast:revoked view:revoked iter:revoked len:revoked"
                .to_vec()
        )
    );
    // A view reused from frame to frame hashes each frame's bytes; one with a weak reference
    // is never reused (the reference dies or shows a revoked view).
    for p in ["hash:a", "hash:bb", "hash:a", "hash:ccc"] {
        assert_eq!(
            c.roundtrip_within(p.as_bytes(), WAIT),
            Recv::Frame(b"True".to_vec()),
            "{p}"
        );
    }
    assert_eq!(
        c.roundtrip_within(b"weak", WAIT),
        Recv::Frame(b"weak".to_vec())
    );
    let check = c.roundtrip_within(b"weak-check", WAIT);
    assert!(
        check == Recv::Frame(b"gone".to_vec()) || check == Recv::Frame(b"revoked".to_vec()),
        "{check:?}"
    );
    assert_eq!(
        c.roundtrip_within(b"gc-scan", WAIT),
        Recv::Frame(b"readable views: 0".to_vec())
    );
    // out.send's fast paths refuse what the buffer protocol refuses (a released, revoked or
    // strided view), take positional arguments only, and read a slice of the frame in place;
    // an int equal to the callback's `conn` but another object works too.
    c.try_send(b"edges").unwrap();
    for want in [
        &b"dg"[..],
        b"pushed",
        b"released:TypeError revoked:TypeError strided:TypeError one-arg:TypeError \
          keywords:TypeError bad-conn:TypeError",
    ] {
        assert_eq!(c.recv_data(WAIT), Recv::Frame(want.to_vec()));
    }
    // Out belongs to the worker thread: another thread cannot use it, even during a callback.
    assert_eq!(
        c.roundtrip_within(b"thread-out", WAIT),
        Recv::Frame(b"RuntimeError".to_vec())
    );
}

#[test]
fn a_raw_buffer_kept_past_the_callback_ends_the_worker_and_the_frame_is_redelivered() {
    let Some((relay, _dog, _, mut c)) = probe_relay("pyraw") else {
        return;
    };
    let pid = relay.worker_pid(0);
    assert_eq!(
        c.roundtrip_within(b"raw", WAIT),
        Recv::Frame(b"raw:redelivered".to_vec()),
        "the worker must exit before the frame is released, and its replacement answer it"
    );
    let pid2 = relay.worker_pid(0);
    assert_ne!(pid2, pid);
    // The same for a raw buffer of a slice of the frame.
    assert_eq!(
        c.roundtrip_within(b"raw-slice", WAIT),
        Recv::Frame(b"raw-slice:redelivered".to_vec())
    );
    let pid3 = relay.worker_pid(0);
    assert_ne!(pid3, pid2);
    // And when the handler released the frame itself but kept a slice's raw buffer.
    assert_eq!(
        c.roundtrip_within(b"raw-released", WAIT),
        Recv::Frame(b"raw-released:redelivered".to_vec())
    );
    assert_ne!(relay.worker_pid(0), pid3);
    assert_eq!(
        c.roundtrip_within(b"after", WAIT),
        Recv::Frame(b"after".to_vec())
    );
}

#[test]
fn an_exception_in_on_frame_gets_the_error_reply_and_the_worker_goes_on_or_stops_on_system_exit() {
    let Some((relay, _dog, _, mut c)) = probe_relay("pyraise") else {
        return;
    };
    let pid = relay.worker_pid(0);
    c.try_send(b"raise").unwrap();
    c.try_send(b"next").unwrap();
    assert_eq!(
        c.recv_data(WAIT),
        Recv::Frame(b"shmrelay-error: the worker's handler raised an exception".to_vec())
    );
    assert_eq!(c.recv_data(WAIT), Recv::Frame(b"next".to_vec()));
    assert_eq!(relay.worker_pid(0), pid, "the worker did not restart");
    // SystemExit stops the worker (after its error reply); the relay starts another.
    assert_eq!(
        c.roundtrip_within(b"exit", WAIT),
        Recv::Frame(b"shmrelay-error: the worker's handler raised an exception".to_vec())
    );
    assert!(eventually(WAIT, || {
        let p = relay.worker_pid(0);
        p != 0 && p != pid
    }));
    assert_eq!(
        c.roundtrip_within(b"again", WAIT),
        Recv::Frame(b"again".to_vec())
    );
}

#[test]
fn the_gil_is_released_while_the_worker_waits_and_sigterm_stops_it_cleanly() {
    let Some((relay, _dog, mark, mut c)) = probe_relay("pygil") else {
        return;
    };
    let ticks = |c: &mut Client| match c.roundtrip_within(b"ticks", WAIT) {
        Recv::Frame(p) => String::from_utf8(p).unwrap().parse::<u64>().unwrap(),
        other => panic!("ticks: {other:?}"),
    };
    let before = ticks(&mut c);
    // The worker is idle, parked in the SDK: a Python thread runs only if the GIL is free.
    std::thread::sleep(Duration::from_millis(1000));
    let after = ticks(&mut c);
    assert!(
        after - before >= 10,
        "a Python thread ticked {} times in 1 s while the worker waited",
        after - before
    );
    let pid = relay.worker_pid(0);
    signal(pid, libc::SIGTERM);
    assert!(
        eventually(WAIT, || std::fs::read_to_string(&mark).is_ok_and(
            |m| m.contains("run returned; out outside a callback: RuntimeError")
        )),
        "run() did not return on SIGTERM: {:?}",
        std::fs::read_to_string(&mark)
    );
}

#[test]
fn the_python_section_of_the_workers_readme_shows_examples_echo_py_and_asyncio_worker_py() {
    let readme = std::fs::read_to_string(repo().join("workers/README.md")).unwrap();
    let section = &readme[readme.find("\n## Python\n").expect("a Python section")..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |e| e + 1)];
    let blocks: Vec<&str> = section
        .split("```python\n")
        .skip(1)
        .map(|b| &b[..b.find("```").unwrap()])
        .collect();
    for (i, file) in ["echo.py", "asyncio_worker.py"].into_iter().enumerate() {
        let text = std::fs::read_to_string(example(file)).unwrap();
        // From the first import on (the docstring is the file's own).
        let code = &text[text.find("\nimport ").unwrap() + 1..];
        assert_eq!(
            blocks.get(i).copied(),
            Some(code),
            "python block {i} of workers/README.md must show examples/{file} as it is"
        );
    }
}

#[test]
fn asyncio_example_serves_frames_from_its_own_event_loop() {
    let Some(py) = python() else { return };
    let _dog = Watchdog::new("python asyncio", Duration::from_secs(180));
    let relay = relay_with("pyasyncio", &py, &example("asyncio_worker.py"), 2, &[]);
    // Pipelined on many connections: a lost wake-up (a frame published after the worker
    // looked and before it slept, with nobody ringing) would leave a connection waiting.
    assert_eq!(pipelined_clients(&relay, 40, 500), 40 * 500);
    // The loop's other task runs while the worker is idle, and an idle worker is woken by
    // the doorbell alone (nothing else calls the example's `ready`).
    let mut c = relay.connect();
    let ticks = |c: &mut Client| match c.roundtrip_within(b"ticks", WAIT) {
        Recv::Frame(p) => String::from_utf8(p).unwrap().parse::<u64>().unwrap(),
        other => panic!("ticks: {other:?}"),
    };
    let before = ticks(&mut c);
    std::thread::sleep(Duration::from_millis(1000));
    for i in 0..20u32 {
        let p = i.to_be_bytes();
        assert_eq!(c.roundtrip_within(&p, WAIT), Recv::Frame(p.to_vec()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = ticks(&mut c);
    assert!(
        after >= before + 20,
        "the clock task ticked {} times in 1.4 s",
        after - before
    );
    // SIGTERM: the program's own handler stops its loop and it exits 0 (not a crash); the
    // relay starts another.
    let pid = relay.worker_pid(0);
    signal(pid, libc::SIGTERM);
    assert!(eventually(WAIT, || {
        let p = relay.worker_pid(0);
        p != 0 && p != pid
    }));
    let crashes = relay.stats().worker(0).crashes.load(Ordering::Relaxed);
    assert_eq!(crashes, 0, "a clean exit is no crash");
    assert_eq!(
        c.roundtrip_within(b"again", WAIT),
        Recv::Frame(b"again".to_vec())
    );
}

#[test]
fn the_poll_api_refuses_nesting_and_reports_a_stop() {
    let Some(py) = python() else { return };
    let _dog = Watchdog::new("python poll api", Duration::from_secs(120));
    let dir = std::env::temp_dir().join(format!("shmrelay-py-poll-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("poll.py");
    // A select() loop over the doorbell (the plainest event loop) with a handler that probes
    // the API from inside a callback.
    std::fs::write(
        &script,
        r#"import select, sys
import shmrelay_worker
w = shmrelay_worker.Worker.from_env()
out = w.out
assert isinstance(w.fileno(), int) and w.fileno() > 2

def on_frame(conn, frame, redelivered):
    if frame == b"nest":
        try:
            w.poll_once(on_frame)
            out.send(conn, b"nested poll ran")
        except RuntimeError:
            out.send(conn, b"RuntimeError")
    elif frame == b"exit":
        out.send(conn, b"bye")
        raise SystemExit(0)
    else:
        out.send(conn, frame)

try:
    w.poll_once(42)  # not a handler: refused, w still usable
except TypeError:
    pass
while not shmrelay_worker.stop_requested():
    if w.poll_once(on_frame):
        continue
    if w.prepare_wait():
        select.select([w.fileno()], [], [], 1.0)
    w.finish_wait()
"#,
    )
    .unwrap();
    let relay = relay_with("pypoll", &py, &script, 1, &[]);
    let mut c = relay.connect();
    assert_eq!(
        c.roundtrip_within(b"nest", WAIT),
        Recv::Frame(b"RuntimeError".to_vec())
    );
    for i in 0..50u32 {
        let p = i.to_be_bytes();
        assert_eq!(c.roundtrip_within(&p, WAIT), Recv::Frame(p.to_vec()));
    }
    // SystemExit from a callback: raised by poll_once after the batch (the reply went out).
    let pid = relay.worker_pid(0);
    assert_eq!(
        c.roundtrip_within(b"exit", WAIT),
        Recv::Frame(b"bye".to_vec())
    );
    assert!(eventually(WAIT, || {
        let p = relay.worker_pid(0);
        p != 0 && p != pid
    }));
    assert_eq!(
        relay.stats().worker(0).crashes.load(Ordering::Relaxed),
        0,
        "SystemExit(0) is a clean exit"
    );
    // SIGTERM: the SDK's handler sets stop_requested and the loop ends within its 1 s select.
    let pid = relay.worker_pid(0);
    signal(pid, libc::SIGTERM);
    assert!(eventually(WAIT, || {
        let p = relay.worker_pid(0);
        p != 0 && p != pid
    }));
    assert_eq!(relay.stats().worker(0).crashes.load(Ordering::Relaxed), 0);
}

#[test]
fn a_plain_function_is_a_handler_too_and_a_second_attach_is_refused() {
    let Some(py) = python() else { return };
    let _dog = Watchdog::new("python function", Duration::from_secs(120));
    let dir = std::env::temp_dir().join(format!("shmrelay-py-fn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("fn_echo.py");
    std::fs::write(
        &script,
        "import shmrelay_worker\n\
         w = shmrelay_worker.Worker.from_env()\n\
         try:\n    shmrelay_worker.Worker.from_env()  # the fds are w's: refused\n    raise SystemExit(9)\n\
         except shmrelay_worker.WorkerError:\n    pass\n\
         try:\n    w.run(object())  # neither on_frame nor callable: refused, w still usable\n\
         except TypeError:\n    pass\n\
         out = w.out\n\
         w.run(lambda conn, frame, redelivered: out.send(conn, frame))\n",
    )
    .unwrap();
    // Relay::start_serving checks one echo round trip.
    let relay = relay_with("pyfn", &py, &script, 1, &[]);
    let mut c = relay.connect();
    assert_eq!(
        c.roundtrip_within(b"plain", WAIT),
        Recv::Frame(b"plain".to_vec())
    );
}

#[test]
fn ws_echo_example_keeps_kinds_closes_with_codes_and_sees_the_handshake() {
    let Some(py) = python() else { return };
    let _dog = Watchdog::new("python ws echo", Duration::from_secs(180));
    let cmd = format!("{py} {}", example("ws_echo.py").display());
    let relay = Relay::start_ws_echo("pywsecho", &cmd);
    let pid = relay.worker_pid(0);
    check_ws_echo_example(&relay);
    // What Python raised for each refused close (caught by the example, which answers it).
    let (mut ws, _) = ws_connect(relay.addr, "/", &[]);
    let _greeting = ws_next(&mut ws);
    for (code, raised) in [
        ("1005", "SendError: "),
        ("999", "SendError: "),
        ("70000", "OverflowError: "),
        ("-1", "OverflowError: "),
        ("x", "ValueError: "),
    ] {
        ws.send(Message::Text(format!("close {code} no"))).unwrap();
        let want = format!("close refused: {raised}");
        match ws_next(&mut ws) {
            Message::Text(t) if t.starts_with(&want) => {}
            other => panic!("close {code}: {other:?}, not {want}..."),
        }
    }
    assert_eq!(relay.worker_pid(0), pid, "the worker kept serving");
    assert_eq!(relay.stats().worker(0).crashes.load(Ordering::Relaxed), 0);
}

#[test]
fn on_a_websocket_listener_views_are_revoked_and_a_raising_handler_gets_the_error_reply() {
    let Some(py) = python() else { return };
    let _dog = Watchdog::new("python ws probe", Duration::from_secs(120));
    let (cmd, _) = probe_cmd("pywsprobe", &py);
    let relay = Relay::start_websocket("pywsprobe", &["--workers", "1", "--worker-cmd", &cmd]);
    let (mut ws, _) = ws_connect(relay.addr, "/", &[]);
    let mut roundtrip = |m: Message| {
        ws.send(m).unwrap();
        ws_next(&mut ws)
    };
    // `send` answers with the kind of the message being handled.
    assert_eq!(
        roundtrip(Message::Text("keep".into())),
        Message::Text("kept".into())
    );
    for i in 0..50u32 {
        let m = Message::Binary(i.to_be_bytes().to_vec());
        assert_eq!(roundtrip(m.clone()), m);
    }
    assert_eq!(
        roundtrip(Message::Text("probe".into())),
        Message::Text(
            "frame:revoked slice:revoked cast:revoked view:revoked iter:revoked len:revoked".into()
        )
    );
    assert_eq!(
        roundtrip(Message::Binary(b"gc-scan".to_vec())),
        Message::Binary(b"readable views: 0".to_vec())
    );
    let pid = relay.worker_pid(0);
    assert_eq!(
        roundtrip(Message::Text("raise".into())),
        Message::Text("shmrelay-error: the worker's handler raised an exception".into())
    );
    assert_eq!(
        roundtrip(Message::Text("next".into())),
        Message::Text("next".into())
    );
    assert_eq!(relay.worker_pid(0), pid, "the worker did not restart");
}
