//! The C examples, compiled with `cc` against the static library and started by the real
//! relay with `--worker-cmd`, serving real clients: echo round trips, chat pushes, no
//! request lost when the C worker is killed under pipelined load, and the websocket echo's
//! kinds, close codes and handshake fields with a real websocket client.
//!
//! The static library is the one cargo built for this test run, beside the test executable in
//! `target/<profile>/deps/` (the copy in `target/<profile>/` is refreshed only by `cargo
//! build`); the harness finds the `shmrelay` binary. `CC` overrides the compiler.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shmrelay_tests::{check_ws_echo_example, eventually, pattern, signal, Recv, Relay, Watchdog};

const LIMIT: Duration = Duration::from_secs(20);

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>/deps`, where this test executable and this run's libraries are.
fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().expect("exe has a parent").to_path_buf()
}

/// How an example is linked to the library.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Link {
    Static,
    /// The cdylib, found at run time through the executable's rpath.
    Shared,
}

/// Compiles `examples/NAME.c` (once per test process) and returns the executable.
fn c_example(name: &str, link: Link) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<(String, Link), PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap();
    let key = (name.to_owned(), link);
    if let Some(exe) = built.get_or_insert_with(HashMap::new).get(&key) {
        return exe.clone();
    }
    let lib = deps_dir().join(match link {
        Link::Static => "libshmrelay_worker_c.a",
        Link::Shared => "libshmrelay_worker_c.so",
    });
    assert!(
        lib.exists(),
        "{} missing: build the package first (cargo test -p shmrelay-worker-ffi builds it)",
        lib.display()
    );
    let out_dir = deps_dir()
        .parent()
        .expect("target/<profile>")
        .join("c-examples");
    std::fs::create_dir_all(&out_dir).expect("create c-examples");
    let exe = out_dir.join(format!("{name}-{link:?}").to_lowercase());
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
        ])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(crate_dir().join("examples").join(format!("{name}.c")))
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", deps_dir().display()))
        // What the Rust standard library in the static library needs.
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("run {cc:?}: {e}"));
    assert!(
        status.success(),
        "compiling examples/{name}.c failed: {status}"
    );
    built.as_mut().unwrap().insert(key, exe.clone());
    exe
}

fn worker_cmd(name: &str, link: Link) -> String {
    c_example(name, link)
        .to_str()
        .expect("utf-8 path")
        .to_owned()
}

/// Received payloads as text, for messages.
fn text(r: &Recv) -> String {
    match r {
        Recv::Frame(p) => format!("{:?}", String::from_utf8_lossy(p)),
        other => format!("{other:?}"),
    }
}

/// Fails with `what` and what came instead unless `got` is the frame `want`.
#[track_caller]
fn expect_frame(got: Recv, want: &[u8], what: &dyn std::fmt::Display) {
    assert!(
        matches!(&got, Recv::Frame(p) if p == want),
        "{what}: got {}",
        text(&got)
    );
}

#[test]
fn c_echo_answers_pipelined_frames_on_many_connections_in_order() {
    let _w = Watchdog::new("c_echo", Duration::from_secs(120));
    let cmd = worker_cmd("echo", Link::Static);
    let relay = Relay::start_serving("cecho", &["--workers", "2", "--worker-cmd", &cmd]);
    let mut clients: Vec<_> = (0..64).map(|_| relay.connect()).collect();
    const DEPTH: usize = 20;
    for round in 0..3 {
        for (i, c) in clients.iter_mut().enumerate() {
            for seq in 0..DEPTH {
                let len = 1 + (i * 37 + seq * 101 + round) % 3000;
                c.try_send(&pattern(i, round * DEPTH + seq, len))
                    .expect("send");
            }
        }
        for (i, c) in clients.iter_mut().enumerate() {
            for seq in 0..DEPTH {
                let len = 1 + (i * 37 + seq * 101 + round) % 3000;
                let want = pattern(i, round * DEPTH + seq, len);
                let what = format!("connection {i} round {round} frame {seq}");
                expect_frame(c.recv_data(LIMIT), &want, &what);
            }
        }
    }
    // A frame longer than one ring record is split by the library and joined by the front.
    let big = pattern(7, 7, 700_000);
    expect_frame(
        clients[0].roundtrip_within(&big, LIMIT),
        &big,
        &"a split reply",
    );
}

#[test]
fn c_chat_pushes_to_every_member_and_answers_commands() {
    let _w = Watchdog::new("c_chat", Duration::from_secs(120));
    let cmd = worker_cmd("chat", Link::Static);
    let relay = Relay::start_serving("cchat", &["--workers", "1", "--worker-cmd", &cmd]);
    let mut members: Vec<_> = (0..3).map(|_| relay.connect()).collect();
    // The opens reach the worker before any frame sent after them on another connection
    // only if the front saw them first: wait until the worker counts all three.
    assert!(
        eventually(LIMIT, || {
            members[0].roundtrip_within(b"/who", LIMIT) == Recv::Frame(b"3 connected".to_vec())
        }),
        "the worker never saw three members"
    );
    members[1].try_send(b"hello from 1").expect("send");
    for (i, m) in members.iter_mut().enumerate() {
        expect_frame(m.recv_data(LIMIT), b"hello from 1", &format!("member {i}"));
    }
    expect_frame(
        members[1].roundtrip_within(b"/upper shout!", LIMIT),
        b"SHOUT!",
        &"/upper",
    );
    // Idle past the worker's own poll loop going to sleep: the next frame must wake it through
    // the doorbell (prepare_wait / finish_wait), not its 2 s stop-check timeout.
    std::thread::sleep(Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    expect_frame(
        members[1].roundtrip_within(b"/upper awake", LIMIT),
        b"AWAKE",
        &"/upper after idling",
    );
    let woke = t0.elapsed();
    assert!(
        woke < Duration::from_millis(1500),
        "the sleeping worker was not woken by the doorbell: {woke:?}"
    );
    members[2].try_send(b"/quit").expect("send");
    let closed = members[2].wait_closed(LIMIT);
    assert!(
        matches!(&closed, Some((Recv::Eof { .. }, frames)) if frames.is_empty()),
        "/quit did not close the connection cleanly: {closed:?}"
    );
    assert!(
        eventually(LIMIT, || {
            members[0].roundtrip_within(b"/who", LIMIT) == Recv::Frame(b"2 connected".to_vec())
        }),
        "the close did not reach the worker"
    );
}

#[test]
fn c_echo_linked_to_the_shared_library_serves() {
    let _w = Watchdog::new("c_echo_shared", Duration::from_secs(120));
    let cmd = worker_cmd("echo", Link::Shared);
    // `Relay::start_serving` checks a round trip through the worker.
    let relay = Relay::start_serving("cshared", &["--workers", "1", "--worker-cmd", &cmd]);
    let mut c = relay.connect();
    expect_frame(
        c.roundtrip_within(b"shared", LIMIT),
        b"shared",
        &"the cdylib echo",
    );
}

#[test]
fn c_kv_sets_and_gets_over_a_line_listener() {
    let _w = Watchdog::new("c_kv", Duration::from_secs(120));
    // The harness checks readiness with an echo on the first listener; the kv worker serves a
    // second one, on a port picked here.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = deps_dir()
        .parent()
        .expect("target/<profile>")
        .join("c-examples");
    std::fs::create_dir_all(&dir).expect("create c-examples");
    let config = dir.join(format!("kv-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n\
             codec = \"line\"\nworkers = 1\nworker_cmd = {:?}\n",
            worker_cmd("kv", Link::Static)
        ),
    )
    .expect("write the config");
    let _relay = Relay::start_serving("ckv", &["--config", config.to_str().expect("utf-8 path")]);
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to kv");
    stream.set_read_timeout(Some(LIMIT)).expect("timeout");
    let mut lines = std::io::BufReader::new(stream.try_clone().expect("clone"));
    let mut exchange = |requests: &[String]| -> Vec<String> {
        // Pipelined: every request first, then every reply, in order.
        (&stream)
            .write_all(requests.concat().as_bytes())
            .expect("send");
        requests
            .iter()
            .map(|_| {
                let mut line = String::new();
                lines.read_line(&mut line).expect("a reply line");
                line.trim_end().to_owned()
            })
            .collect()
    };
    let script = [
        "SET a 1\n",
        "SET greeting hello there\n",
        "GET a\n",
        "GET greeting\n",
        "GET missing\n",
        "DEL a\n",
        "DEL a\n",
        "GET a\n",
        "INCR a\n",
    ]
    .map(String::from);
    assert_eq!(
        exchange(&script),
        [
            "OK",
            "OK",
            "1",
            "hello there",
            "(nil)",
            "1",
            "0",
            "(nil)",
            "ERR unknown command"
        ]
    );
    let sets: Vec<_> = (0..2000)
        .map(|i| format!("SET key{i} value{i}\n"))
        .collect();
    assert!(exchange(&sets).iter().all(|r| r == "OK"));
    let gets: Vec<_> = (0..2000).map(|i| format!("GET key{i}\n")).collect();
    let values = exchange(&gets);
    for (i, v) in values.iter().enumerate() {
        assert_eq!(v, &format!("value{i}"));
    }
    let _ = std::fs::remove_file(&config);
}

/// A client that pipelines `depth` numbered requests and checks that every reply comes back
/// exactly once, in order; returns the number answered after `stop`.
fn numbered_client(
    relay: &Relay,
    id: usize,
    depth: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let mut c = relay.connect();
    std::thread::spawn(move || {
        let (mut sent, mut got) = (0, 0);
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            while !stopping && sent - got < depth {
                c.try_send(&pattern(id, sent, 16)).expect("send");
                sent += 1;
            }
            if stopping && got == sent {
                return got;
            }
            let what = format!("client {id}: reply {got} lost, duplicated or late");
            expect_frame(c.recv_data(LIMIT), &pattern(id, got, 16), &what);
            got += 1;
        }
    })
}

#[test]
fn c_worker_killed_under_pipelined_load_loses_no_request() {
    let _w = Watchdog::new("c_kill", Duration::from_secs(180));
    let cmd = worker_cmd("echo", Link::Static);
    let relay = Relay::start_serving(
        "ckill",
        &[
            "--workers",
            "2",
            "--worker-cmd",
            &cmd,
            "--set",
            "crash_limit=100",
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|i| numbered_client(&relay, i, 16, stop.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    const KILLS: u64 = 4;
    for round in 0..KILLS as usize {
        let w = round % 2;
        let pid = relay.worker_pid(w);
        signal(pid, libc::SIGKILL);
        assert!(
            eventually(LIMIT, || {
                let p = relay.worker_pid(w);
                p != 0 && p != pid
            }),
            "worker {w} was not replaced"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let answered: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(answered > 500, "only {answered} requests answered");
    let s = relay.stats();
    let crashes: u64 = (0..2)
        .map(|w| s.worker(w).crashes.load(Ordering::Relaxed))
        .sum();
    assert_eq!(crashes, KILLS);
    // The replacements were handed frames their predecessors had read: flagged redelivered
    // through the ABI, or skipped as answered (counted per worker since its rings' start).
    let report = shmrelay::report::InstanceReport::read(&relay.instance).expect("report");
    let (redelivered, skipped) = report.workers.iter().fold((0, 0), |(r, s), w| {
        (r + w.redeliveries, s + w.skipped_answered)
    });
    assert!(
        redelivered + skipped > 0,
        "no frame was redelivered or skipped after {KILLS} kills"
    );
    eprintln!(
        "{answered} requests answered exactly once across {KILLS} kills of the C worker \
         (the last replacements: {redelivered} frames redelivered, {skipped} skipped as answered)"
    );
}

#[test]
fn c_ws_echo_keeps_kinds_closes_with_codes_and_reads_the_handshake() {
    let _w = Watchdog::new("c_ws_echo", Duration::from_secs(120));
    let relay = Relay::start_ws_echo("cwsecho", &worker_cmd("ws_echo", Link::Static));
    let pid = relay.worker_pid(0);
    check_ws_echo_example(&relay);
    assert_eq!(relay.worker_pid(0), pid, "the worker kept serving");
    let crashes = relay.stats().worker(0).crashes.load(Ordering::Relaxed);
    assert_eq!(crashes, 0);
}

#[test]
fn readme_c_example_is_the_compiled_echo() {
    let readme = std::fs::read_to_string(crate_dir().join("../README.md")).expect("README");
    let section = readme
        .split("## Workers in C")
        .nth(1)
        .expect("workers/README.md has a `## Workers in C` section");
    let block = section
        .split("```c\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the C section has a ```c block");
    let echo = std::fs::read_to_string(crate_dir().join("examples/echo.c")).expect("echo.c");
    assert_eq!(
        block, echo,
        "the README's C example differs from examples/echo.c"
    );
}
