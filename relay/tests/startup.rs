//! Start-up, shutdown and logs as an operator meets them: listeners that would share a port
//! are refused, a closed stderr neither panics the relay nor skips its clean-up, logs read
//! well through a pipe, and a worker's clean exit is not a crash.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use shmrelay::stats::WorkerState;
use shmrelay_tests::{eventually, scratch, shmrelay_bin, Client, Recv, Relay, Watchdog};

/// A unique instance name for a relay this file starts itself.
fn instance(name: &str) -> String {
    format!("t-{name}-{}", std::process::id())
}

/// A loopback address with a fixed port nobody listens on (just now).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Collects a child's stderr to the end in the background.
fn collect(mut stream: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `shmrelay ARGS` (instance `name`) that is expected to refuse to start: its exit code
/// (None if it still ran after 30 s) and its stderr.
fn refused(name: &str, args: &[&str]) -> (Option<i32>, String) {
    let inst = instance(name);
    let mut child = Command::new(shmrelay_bin())
        .args(["--instance", &inst])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shmrelay");
    let err = collect(child.stderr.take().unwrap());
    let mut relay = Relay::from_child(child, &inst);
    let code = relay.wait_exit(Duration::from_secs(30));
    drop(relay);
    (code, err.join().unwrap())
}

#[test]
fn two_listeners_on_one_address_are_a_config_error() {
    let _w = Watchdog::new("two_listeners", Duration::from_secs(60));
    let addr = free_addr();
    let path = std::env::temp_dir().join(format!("shmrelay-dup-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!("[[listener]]\nlisten = \"{addr}\"\n\n[[listener]]\nlisten = \"{addr}\"\ncodec = \"line\"\n"),
    )
    .unwrap();
    let (code, err) = refused("dup", &["--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(
        err.contains(&addr.to_string()),
        "stderr names the address: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_second_relay_on_a_running_relays_port_is_refused_and_the_first_keeps_every_connection() {
    let _w = Watchdog::new("second_relay", Duration::from_secs(120));
    let first = Relay::start_serving("first", &[]);
    let addr = first.addr.to_string();
    let (code, err) = refused("second", &["--listen", &addr]);
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(err.contains(&addr), "stderr names the address: {err}");
    assert!(err.contains("in use"), "{err}");
    // Every new connection still lands on the first relay, and is served.
    let mut clients: Vec<Client> = (0..20).map(|_| first.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let msg = format!("hello {i}");
        assert_eq!(
            c.roundtrip_within(msg.as_bytes(), Duration::from_secs(20)),
            Recv::Frame(msg.into_bytes())
        );
    }
    assert_eq!(first.conns_total(), 20);
}

/// Reads `stdout` up to the relay's `listening on` line; returns the address.
fn listening(stdout: &mut BufReader<ChildStdout>) -> SocketAddr {
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdout
            .read_line(&mut line)
            .expect("read the relay's stdout");
        assert!(n > 0, "the relay ended before `listening on`");
        if let Some(rest) = line.split("listening on ").nth(1) {
            return rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    }
}

/// Starts `shmrelay --listen 127.0.0.1:0 --instance NAME ARGS` at log level info, with its
/// stdout and stderr on pipes (in its own process group, as a shell job), in `shm_dir` if
/// given; waits for `listening on`. Returns the relay, its address, its stdout (past that
/// line) and its stderr, the read end of that pipe, for the test to read or close.
fn start_piped(
    name: &str,
    args: &[&str],
    shm_dir: Option<&Path>,
) -> (
    Relay,
    SocketAddr,
    BufReader<ChildStdout>,
    std::process::ChildStderr,
) {
    let inst = instance(name);
    let mut cmd = Command::new(shmrelay_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--instance", &inst])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(dir) = shm_dir {
        cmd.env("SHMRELAY_SHM_DIR", dir);
    }
    let mut child = cmd.spawn().expect("start shmrelay");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let stderr = child.stderr.take().unwrap();
    let relay = Relay::from_child(child, &inst);
    let addr = listening(&mut stdout);
    (relay, addr, stdout, stderr)
}

#[test]
fn ctrl_c_with_stdout_and_stderr_closed_exits_cleanly_and_removes_every_file() {
    let _w = Watchdog::new("ctrl_c_closed_pipe", Duration::from_secs(120));
    let dir = scratch("pipe");
    // `shmrelay 2>&1 | tee log`, then Ctrl-C: SIGINT ends `tee` too, and from then on every
    // log line the relay writes (draining, stopping) meets a pipe without a reader.
    let (mut relay, addr, stdout, stderr) = start_piped("pipe", &[], Some(&dir));
    let mut c = Client::connect(addr);
    assert_eq!(
        c.roundtrip_within(b"before", Duration::from_secs(20)),
        Recv::Frame(b"before".to_vec())
    );
    drop((stdout, stderr));
    // Ctrl-C: the terminal signals the whole foreground job (the supervisor and its fronts).
    let group = -(relay.child.id() as i32);
    // SAFETY: kill(2) on the process group of a child this test started.
    let sent = unsafe { libc::kill(group, libc::SIGINT) };
    assert_eq!(sent, 0);
    let code = relay.wait_exit(Duration::from_secs(30));
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        code,
        Some(0),
        "exit status after SIGINT with a closed stderr"
    );
    assert!(left.is_empty(), "files left in the shm dir: {left:?}");
}

/// A worker command: worker 1 exits at once with the status given as its argument; any other
/// runs the built-in echo worker.
fn worker_script(dir: &Path) -> PathBuf {
    let script = dir.join("worker.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$SHMRELAY_WORKER_INDEX\" = 1 ] && exit \"$1\"\nexec {} worker echo\n",
            shmrelay_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

fn worker_state(relay: &Relay, w: usize) -> (u32, u64, u32) {
    let s = relay.stats_now();
    let ws = s.worker(w);
    (
        ws.state.load(Ordering::Relaxed),
        ws.crashes.load(Ordering::Relaxed),
        ws.restarts.load(Ordering::Relaxed),
    )
}

/// A relay (`crash_limit` 3) whose worker 1 exits with `status` at every start, worker 0
/// being the echo worker; its scratch directory and its log (read to the end in the
/// background, so that the pipe never fills).
fn start_with_worker_1_exiting(
    name: &str,
    status: i32,
) -> (Relay, PathBuf, std::thread::JoinHandle<String>) {
    let dir = scratch(name);
    let cmd = format!(
        "worker_cmd={:?}",
        format!("{} {status}", worker_script(&dir).display())
    );
    let (relay, _addr, _stdout, stderr) = start_piped(
        name,
        &["--workers", "2", "--set", "crash_limit=3", "--set", &cmd],
        None,
    );
    (relay, dir, collect(stderr))
}

#[test]
fn a_worker_exiting_0_is_restarted_but_never_failed_and_the_log_reads_plainly() {
    let _w = Watchdog::new("clean_exit", Duration::from_secs(120));
    let (mut relay, dir, log) = start_with_worker_1_exiting("clean-exit", 0);
    // Past the crash limit in exits, with the backoff (0, 0, 100, 200, 400 ms ...).
    assert!(
        eventually(Duration::from_secs(30), || worker_state(&relay, 1).2 >= 6),
        "worker 1 restarted: {:?}",
        worker_state(&relay, 1)
    );
    let (state, crashes, restarts) = worker_state(&relay, 1);
    assert_ne!(state, WorkerState::Failed as u32, "{restarts} clean exits");
    assert_eq!(crashes, 0, "clean exits are not crashes");
    // A crash of the echo worker, for its line in the log.
    let pid = relay.worker_pid(0);
    shmrelay_tests::signal(pid, libc::SIGKILL);
    assert!(eventually(Duration::from_secs(20), || {
        let p = relay.worker_pid(0);
        p != 0 && p != pid
    }));
    assert_eq!(worker_state(&relay, 0).1, 1, "a SIGKILL is a crash");
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(Duration::from_secs(30)), Some(0));
    let log = log.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !log.contains("\x1b["),
        "colour codes in a piped log:\n{log}"
    );
    assert!(
        log.contains("exited with status 0; restarting (not counted as a crash)"),
        "{log}"
    );
    assert!(log.contains("killed by SIGKILL; restarting"), "{log}");
    assert!(!log.contains("Exited(Pid("), "{log}");
}

#[test]
fn a_worker_exiting_1_is_marked_failed_after_the_crash_limit() {
    let _w = Watchdog::new("crash_exit", Duration::from_secs(120));
    let (relay, dir, _log) = start_with_worker_1_exiting("crash-exit", 1);
    let failed = eventually(Duration::from_secs(30), || {
        worker_state(&relay, 1).0 == WorkerState::Failed as u32
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failed, "worker 1: {:?}", worker_state(&relay, 1));
    assert!(worker_state(&relay, 1).1 >= 3);
}

#[test]
fn a_quoted_worker_cmd_runs_and_an_unterminated_quote_is_refused_at_start() {
    let _w = Watchdog::new("worker_cmd_quoting", Duration::from_secs(120));
    let bin = shmrelay_bin().display().to_string();
    let line = format!("/bin/sh -c 'exec \"{bin}\" worker echo'");
    let relay = Relay::start_serving("quoted", &["--worker-cmd", &line]);
    let mut c = relay.connect();
    assert_eq!(
        c.roundtrip_within(b"quoted", Duration::from_secs(20)),
        Recv::Frame(b"quoted".to_vec())
    );
    drop((c, relay));
    // The same as a TOML array.
    let array = format!("worker_cmd=[\"/bin/sh\", \"-c\", \"exec '{bin}' worker echo\"]");
    let relay = Relay::start_serving("argv", &["--set", &array]);
    assert_eq!(
        relay
            .connect()
            .roundtrip_within(b"argv", Duration::from_secs(20)),
        Recv::Frame(b"argv".to_vec())
    );
    drop(relay);
    let (code, err) = refused(
        "unterminated",
        &[
            "--listen",
            "127.0.0.1:0",
            "--worker-cmd",
            "/bin/sh -c 'exec cat",
        ],
    );
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(
        err.contains("worker_cmd"),
        "stderr names the setting: {err}"
    );
}

/// Pids of processes whose environment holds `entry` (`SHMRELAY_INSTANCE=NAME`).
fn processes_with_env(entry: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|v| v == entry.as_bytes()) && shmrelay_tests::alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_stop_signal_at_any_moment_of_start_up_leaves_no_file_and_no_process() {
    let _w = Watchdog::new("stop_during_start", Duration::from_secs(300));
    let dir = scratch("stop-start");
    for (i, delay_ms) in [0u64, 5, 15, 30, 60, 120, 250, 500].into_iter().enumerate() {
        let inst = instance(&format!("stop{i}"));
        let child = Command::new(shmrelay_bin())
            .args(["--listen", "127.0.0.1:0", "--instance", &inst])
            .args([
                "--fronts",
                "2",
                "--workers",
                "4",
                "--ring-capacity",
                "67108864",
            ])
            .env("RUST_LOG", "warn")
            .env("SHMRELAY_SHM_DIR", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start shmrelay");
        let mut relay = Relay::from_child(child, &inst);
        std::thread::sleep(Duration::from_millis(delay_ms));
        relay.signal(libc::SIGTERM);
        let code = relay.wait_exit(Duration::from_secs(30));
        // 0, or killed by the signal if it came before the handlers (nothing existed yet).
        assert!(
            matches!(code, Some(0) | Some(-1)),
            "SIGTERM after {delay_ms} ms: exit {code:?}"
        );
        let entry = format!("SHMRELAY_INSTANCE={inst}");
        assert!(
            eventually(Duration::from_secs(5), || processes_with_env(&entry)
                .is_empty()),
            "SIGTERM after {delay_ms} ms: processes left: {:?}",
            processes_with_env(&entry)
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(
            left.is_empty(),
            "SIGTERM after {delay_ms} ms: files left: {left:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn out_of_range_settings_are_refused_at_start_with_the_reason() {
    let _w = Watchdog::new("ranges", Duration::from_secs(60));
    for (args, name) in [
        (["--max-frame", "0"], "max_frame"),
        (["--max-frame", "4000000000"], "max_frame"),
        (["--max-conns", "0"], "max_conns"),
        (["--set", "hang_timeout_ms=0"], "hang_timeout_ms"),
    ] {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(&args);
        let (code, err) = refused("range", &all);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("invalid setting {name}: ")),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn listener_flags_beside_listener_tables_are_refused_naming_the_conflict() {
    let _w = Watchdog::new("flags_and_tables", Duration::from_secs(60));
    let path = std::env::temp_dir().join(format!("shmrelay-tables-{}.toml", std::process::id()));
    let tables = "[[listener]]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(&path, tables).unwrap();
    let config = path.to_str().unwrap();
    for (flag, value) in [
        ("--workers", "6"),
        ("--listen", "127.0.0.1:0"),
        ("--worker-cmd", "/bin/cat"),
        ("--set", "codec=line"),
    ] {
        let (code, err) = refused("tables", &["--config", config, flag, value]);
        assert_eq!(code, Some(2), "{flag}: {err}");
        assert!(
            err.contains("is not used with [[listener]] tables"),
            "{flag}: {err}"
        );
        assert!(err.contains(flag) || err.contains("codec"), "{flag}: {err}");
    }
    // Top-level `workers` in the file itself.
    std::fs::write(&path, format!("workers = 6\n{tables}")).unwrap();
    let (code, err) = refused("tables", &["--config", config]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("top-level workers is not used"), "{err}");
}

/// Issue 15: every connection is an fd of its front, so a `max_conns` the fronts cannot hold
/// under the open-files limit is refused at start, naming what fits; `fronts = "auto"` takes
/// as many fronts as it needs.
#[test]
fn a_max_conns_the_fronts_cannot_hold_is_refused_and_auto_sizes_the_fronts() {
    let _w = Watchdog::new("fronts_fit", Duration::from_secs(120));
    let (code, err) = refused(
        "fit",
        &[
            "--listen",
            "127.0.0.1:0",
            "--fronts",
            "1",
            "--max-conns",
            "1000000",
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("invalid setting max_conns: "), "{err}");
    assert!(err.contains("do not fit 1 front(s)"), "{err}");
    assert!(err.contains("RLIMIT_NOFILE"), "{err}");
    let (code, err) = refused("fit-zero", &["--listen", "127.0.0.1:0", "--fronts", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("auto"), "{err}");
    // Auto: enough fronts for 100,000 connections (each front holds what its fds allow).
    let relay = Relay::start("fit-auto", &["--fronts", "auto", "--workers", "1"]);
    let fronts = relay
        .stats()
        .header()
        .fronts
        .load(std::sync::atomic::Ordering::Relaxed) as usize;
    let limits = shmrelay::config::fronts::Limits::of_this_process();
    let cfg = shmrelay::config::Config {
        workers: 1,
        ..Default::default()
    };
    assert_eq!(
        fronts,
        shmrelay::config::fronts::auto_fronts(&cfg, 100_000, &limits)
    );
    let mut c = relay.connect();
    assert_eq!(
        c.roundtrip_within(b"auto", Duration::from_secs(20)),
        shmrelay_tests::Recv::Frame(b"auto".to_vec())
    );
}
