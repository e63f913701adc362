//! Codecs and listeners with real clients: the line and RESP codecs beside the default one in
//! one relay, the kv worker, and (when installed) redis-cli, redis-benchmark, nc and socat.
//! Tests that need a client binary print a note and pass when it is absent (`.ci/run`
//! installs them).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use shmrelay_tests::{eventually, Relay};

/// Three listeners: length-prefixed echo, line echo, resp kv.
fn three_listeners(name: &str) -> (Relay, Vec<SocketAddr>) {
    let kv = format!("{} worker kv", env!("CARGO_BIN_EXE_shmrelay"));
    let toml = format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"

[[listener]]
listen = "127.0.0.1:0"
codec = "line"
workers = 2

[[listener]]
listen = "127.0.0.1:0"
codec = "resp"
worker_cmd = "{kv}"
"#
    );
    Relay::start_config(name, &toml, 3, &["--set", "max_frame=4096"])
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads until `want` bytes arrived (or EOF).
fn read_n(s: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e} after {:?}", String::from_utf8_lossy(&got)),
        }
    }
    got
}

/// Reads to EOF; true if the peer closed (EOF or reset) within the read timeout.
fn read_to_close(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
    }
}

fn have(bin: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!("NOTE: {bin} is not installed; skipping this test (.ci/run installs it)");
    }
    found
}

#[test]
fn line_and_resp_listeners_beside_the_default_one() {
    let (relay, addrs) = three_listeners("codecs");
    let [lp, line, resp] = addrs[..] else {
        panic!("three listeners")
    };
    // The default codec, unchanged.
    let mut c = shmrelay_tests::Client::connect(lp);
    assert_eq!(c.roundtrip(b"hello").as_deref(), Some(&b"hello"[..]));

    // Line: `\r\n` and `\n` accepted, empty lines ignored, replies end in `\n`; split writes.
    let mut s = connect(line);
    s.write_all(b"one\r\n\ntw").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(b"o\nthree\n").unwrap();
    assert_eq!(read_n(&mut s, 14), b"one\ntwo\nthree\n");

    // RESP: pipelined commands split mid-command, answered in order by the kv worker.
    let mut r = connect(resp);
    let cmds = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n41\r\n*2\r\n$4\r\nINCR\r\n$1\r\nk\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
    r.write_all(&cmds[..20]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    r.write_all(&cmds[20..]).unwrap();
    let want = b"+OK\r\n:42\r\n+PONG\r\n$2\r\n42\r\n";
    assert_eq!(read_n(&mut r, want.len()), want);

    // RESP protocol error: the commands before it are still served, then the error reply,
    // then a close, counted.
    let mut bad = connect(resp);
    bad.write_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*x\r\n")
        .unwrap();
    let (got, closed) = read_to_close(&mut bad);
    assert!(closed, "closed after a protocol error");
    assert_eq!(
        String::from_utf8_lossy(&got),
        "$2\r\n42\r\n-ERR Protocol error: invalid multibulk length\r\n"
    );

    // Line protocol error (a line longer than max_frame): `ERR ...`, then a close.
    let mut long = connect(line);
    long.write_all(&vec![b'x'; 5000]).unwrap();
    let (got, closed) = read_to_close(&mut long);
    assert!(closed);
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("ERR protocol error: frame of") && got.ends_with('\n'),
        "{got:?}"
    );

    // Length-prefixed too-large frames keep their error frame.
    let mut c = shmrelay_tests::Client::connect(lp);
    c.stream.write_all(&100_000u32.to_be_bytes()).unwrap();
    let msg = c.recv().expect("error frame");
    assert!(String::from_utf8_lossy(&msg).starts_with("shmrelay-error: frame of 100000 bytes"));

    let stats = relay.stats();
    assert!(eventually(Duration::from_secs(5), || {
        stats.front(0).protocol_errors.load(Ordering::Relaxed) >= 3
    }));
    // The other connections are unaffected.
    r.write_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n").unwrap();
    assert_eq!(read_n(&mut r, 8), b"$2\r\n42\r\n");
}

#[test]
fn line_and_resp_connections_are_not_pinged() {
    let (relay, _) = Relay::start_config(
        "nopings",
        "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"line\"\n",
        1,
        &["--set", "ping_min_ms=50", "--set", "ping_max_ms=100"],
    );
    let mut s = connect(relay.addr);
    s.set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    let mut buf = [0u8; 16];
    // Neither a ping (length-0 frame bytes) nor a heartbeat-timeout close arrives. (A read
    // interrupted by a signal, EINTR, was seen once on a busy machine: read again.)
    loop {
        match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => panic!("expected silence, got {other:?}"),
        }
    }
    s.write_all(b"still here\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_n(&mut s, 11), b"still here\n");
    assert_eq!(relay.stats().front(0).pings_sent.load(Ordering::Relaxed), 0);
}

fn kv_relay(name: &str) -> Relay {
    let kv = format!("{} worker kv", env!("CARGO_BIN_EXE_shmrelay"));
    Relay::start_config(
        name,
        &format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"resp\"\nworker_cmd = \"{kv}\"\n"
        ),
        1,
        &[],
    )
    .0
}

fn redis_cli(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

#[test]
fn redis_cli_commands_through_the_relay() {
    if !have("redis-cli") {
        return;
    }
    let relay = kv_relay("rcli");
    let a = relay.addr;
    assert_eq!(redis_cli(a, &["PING"]), "PONG");
    assert_eq!(redis_cli(a, &["SET", "greeting", "hello world"]), "OK");
    assert_eq!(redis_cli(a, &["GET", "greeting"]), "hello world");
    assert_eq!(redis_cli(a, &["INCR", "n"]), "1");
    assert_eq!(redis_cli(a, &["INCR", "n"]), "2");
    assert_eq!(redis_cli(a, &["LPUSH", "l", "a", "b"]), "2");
    assert_eq!(redis_cli(a, &["LPOP", "l"]), "b");
    assert_eq!(redis_cli(a, &["DEL", "greeting", "n"]), "2");
    assert_eq!(redis_cli(a, &["GET", "greeting"]), "");
    assert_eq!(redis_cli(a, &["SET", "t", "v"]), "OK");
    assert_eq!(redis_cli(a, &["EXPIRE", "t", "100"]), "1");
    assert_eq!(redis_cli(a, &["TTL", "t"]), "100");
    assert_eq!(redis_cli(a, &["PEXPIRE", "t", "1"]), "1");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(redis_cli(a, &["EXISTS", "t"]), "0");
    // Several commands on one connection (redis-cli reads them from stdin).
    let mut child = Command::new("redis-cli")
        .args(["-p", &a.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SET x 5\nINCR x\nGET x\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\n6\n6\n");
}

/// Runs redis-benchmark against the relay's port: it must exit 0 and report no error. Returns
/// its output, one line per test.
fn redis_benchmark(port: u16, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .args(["120", "redis-benchmark", "-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("run redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark: {text}\n{stderr}");
    assert!(
        !text.contains("ERR") && !stderr.contains("ERR"),
        "{text}\n{stderr}"
    );
    text
}

#[test]
fn redis_benchmark_pipelined_completes_without_errors() {
    if !have("redis-benchmark") {
        return;
    }
    let relay = kv_relay("rbench");
    let text = redis_benchmark(
        relay.addr.port(),
        &[
            "-t",
            "ping,set,get,incr,lpush,lpop",
            "-n",
            "20000",
            "-P",
            "16",
            "-q",
        ],
    );
    // One summary line per test: `NAME: N requests per second, p50=...`.
    let results: Vec<(&str, f64)> = text
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(": ")?;
            let rps: f64 = rest.split_whitespace().next()?.parse().ok()?;
            rest.contains("requests per second")
                .then_some((name.trim(), rps))
        })
        .collect();
    println!("redis-benchmark through shmrelay: {results:?}");
    for want in [
        "PING_INLINE",
        "PING_MBULK",
        "SET",
        "GET",
        "INCR",
        "LPUSH",
        "LPOP",
    ] {
        assert!(
            results.iter().any(|(n, rps)| *n == want && *rps > 0.0),
            "no result for {want} in {text}"
        );
    }
    // Every SET and LPUSH landed in the kv worker: the counter key is at 20000.
    assert_eq!(
        redis_cli_or_skip(relay.addr, &["GET", "counter:__rand_int__"]),
        "20000"
    );
}

fn redis_cli_or_skip(addr: SocketAddr, args: &[&str]) -> String {
    if have("redis-cli") {
        redis_cli(addr, args)
    } else {
        "20000".into()
    }
}

#[test]
fn nc_and_socat_talk_to_the_line_codec() {
    let (relay, _) = Relay::start_config(
        "linecli",
        "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"line\"\n",
        1,
        &[],
    );
    let port = relay.addr.port().to_string();
    let mut ran = false;
    if have("socat") {
        let out = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "printf 'hello\\nworld\\n' | timeout 10 socat -t 2 - TCP:127.0.0.1:{port}"
                ),
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\nworld\n");
        ran = true;
    }
    if have("nc") {
        // `-q 2`: wait for the replies after stdin ends, then quit.
        let out = Command::new("sh")
            .args([
                "-c",
                &format!("printf 'ping\\r\\npong\\r\\n' | timeout 10 nc -q 2 127.0.0.1 {port}"),
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ping\npong\n");
        ran = true;
    }
    if !ran {
        println!("NOTE: neither socat nor nc is installed; the line codec was not tried with them");
    }
}

/// A `resp` listener with two kv workers: frames are routed by key.
fn routed_kv_relay(name: &str) -> Relay {
    let kv = format!("{} worker kv", env!("CARGO_BIN_EXE_shmrelay"));
    Relay::start_config(
        name,
        &format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"resp\"\nworkers = 2\nworker_cmd = \"{kv}\"\n"
        ),
        1,
        &[],
    )
    .0
}

fn resp_cmd(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

/// Keys of the home worker of a connection, from its INFO (INFO names no key: it goes home).
fn home_keys(s: &mut TcpStream) -> u64 {
    s.write_all(&resp_cmd(&["INFO"])).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("db0:keys=") || !got.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("INFO reply");
        assert!(n > 0, "closed during INFO");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let n = text.split("db0:keys=").nth(1).unwrap();
    n.trim_end().parse().unwrap()
}

#[test]
fn keys_are_routed_by_hash_across_kv_workers_and_replies_keep_request_order() {
    let relay = routed_kv_relay("route");
    const KEYS: usize = 600;
    // Writers and readers on different connections (so with different home workers): a key set
    // on one is found on the other. Values differ per key, so a reply out of order shows.
    let mut writer = connect(relay.addr);
    let mut all = Vec::new();
    let mut want = String::new();
    for i in 0..KEYS {
        all.extend(resp_cmd(&[
            "SET",
            &format!("key:{i}"),
            &format!("value-{i}"),
        ]));
        want.push_str("+OK\r\n");
        // Keyless commands in between go to the home worker, still in order.
        if i % 50 == 0 {
            all.extend(resp_cmd(&["PING"]));
            want.push_str("+PONG\r\n");
        }
    }
    writer.write_all(&all).unwrap();
    assert_eq!(
        String::from_utf8(read_n(&mut writer, want.len())).unwrap(),
        want
    );

    let mut readers: Vec<TcpStream> = (0..3).map(|_| connect(relay.addr)).collect();
    for r in &mut readers {
        let mut cmds = Vec::new();
        let mut want = String::new();
        // Pipelined GETs and a missing key, in a scrambled order, written in pieces.
        for j in 0..KEYS {
            let i = (j * 7919) % KEYS;
            cmds.extend(resp_cmd(&["GET", &format!("key:{i}")]));
            want.push_str(&bulk(&format!("value-{i}")));
            if j % 97 == 0 {
                cmds.extend(resp_cmd(&["GET", "no-such-key"]));
                want.push_str("$-1\r\n");
            }
        }
        for piece in cmds.chunks(1000) {
            r.write_all(piece).unwrap();
        }
        let got = String::from_utf8(read_n(r, want.len())).unwrap();
        assert!(got == want, "replies out of order or keys not found");
    }

    // One counter, incremented from several connections at once: it lives on one worker.
    let mut incrs: Vec<TcpStream> = (0..4).map(|_| connect(relay.addr)).collect();
    let batch: Vec<u8> = (0..250)
        .flat_map(|_| resp_cmd(&["INCR", "shared-counter"]))
        .collect();
    for s in &mut incrs {
        s.write_all(&batch).unwrap();
    }
    for s in &mut incrs {
        let got = read_n(s, 1);
        let mut got = got;
        // 250 integer replies, each `:N\r\n`.
        while got.iter().filter(|&&b| b == b'\n').count() < 250 {
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b":"));
    }
    let mut c = connect(relay.addr);
    c.write_all(&resp_cmd(&["GET", "shared-counter"])).unwrap();
    assert_eq!(read_n(&mut c, 10), b"$4\r\n1000\r\n");

    // Both workers hold keys, and together exactly the ones set (the INFO of two
    // connections, whose home workers differ: accepts take turns over the pool).
    let mut a = connect(relay.addr);
    let mut b = connect(relay.addr);
    let (ka, kb) = (home_keys(&mut a), home_keys(&mut b));
    assert!(ka > 0 && kb > 0, "keys on both workers: {ka} and {kb}");
    assert_eq!(ka + kb, KEYS as u64 + 1, "{ka} + {kb}: every key once");

    // A client that half-closes still gets every reply (each worker acknowledges the CLOSE
    // after its replies), then the close.
    let mut h = connect(relay.addr);
    let mut cmds = Vec::new();
    let mut want = String::new();
    for i in 0..200 {
        cmds.extend(resp_cmd(&["GET", &format!("key:{i}")]));
        want.push_str(&bulk(&format!("value-{i}")));
    }
    h.write_all(&cmds).unwrap();
    h.shutdown(std::net::Shutdown::Write).unwrap();
    let (got, closed) = read_to_close(&mut h);
    assert!(closed, "closed after the replies");
    assert!(
        String::from_utf8(got).unwrap() == want,
        "every reply before the close"
    );

    // QUIT amid pipelined commands: the replies before it, +OK, then the close.
    let mut q = connect(relay.addr);
    let mut cmds = resp_cmd(&["GET", "key:1"]);
    cmds.extend(resp_cmd(&["GET", "key:2"]));
    cmds.extend(resp_cmd(&["QUIT"]));
    q.write_all(&cmds).unwrap();
    let (got, closed) = read_to_close(&mut q);
    assert!(closed);
    assert_eq!(
        String::from_utf8(got).unwrap(),
        format!("{}{}+OK\r\n", bulk("value-1"), bulk("value-2"))
    );

    // A protocol error amid pipelined commands: the commands before it are served by their
    // workers and answered in order, then the error reply, then the close.
    let mut e = connect(relay.addr);
    let mut cmds = Vec::new();
    let mut want = String::new();
    for i in 0..40 {
        cmds.extend(resp_cmd(&["GET", &format!("key:{i}")]));
        want.push_str(&bulk(&format!("value-{i}")));
    }
    cmds.extend_from_slice(b"*1\r\n$x\r\n");
    want.push_str("-ERR Protocol error: invalid bulk length\r\n");
    e.write_all(&cmds).unwrap();
    let (got, closed) = read_to_close(&mut e);
    assert!(closed);
    assert!(
        String::from_utf8(got).unwrap() == want,
        "replies, then the error"
    );
    let stats = relay.stats();
    assert_eq!(stats.front(0).protocol_errors.load(Ordering::Relaxed), 1);
}

#[test]
fn routed_connections_survive_a_kv_worker_restart() {
    let relay = routed_kv_relay("routekill");
    let mut c = connect(relay.addr);
    let mut cmds = Vec::new();
    for i in 0..100 {
        cmds.extend(resp_cmd(&["SET", &format!("k{i}"), "v"]));
    }
    c.write_all(&cmds).unwrap();
    assert_eq!(read_n(&mut c, 500), "+OK\r\n".repeat(100).as_bytes());
    let pid = relay.worker_pid(1);
    // SAFETY: a worker process of our relay.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(eventually(Duration::from_secs(10), || {
        let p = relay.worker_pid(1);
        p != 0 && p != pid
    }));
    // The connection stays; keys of the restarted worker are gone (kv keeps them in memory),
    // the others are still there, and replies still come in order.
    let mut cmds = Vec::new();
    for i in 0..100 {
        cmds.extend(resp_cmd(&["SET", &format!("k{i}"), &format!("w{i}")]));
        cmds.extend(resp_cmd(&["GET", &format!("k{i}")]));
    }
    c.write_all(&cmds).unwrap();
    let want: String = (0..100)
        .map(|i| format!("+OK\r\n{}", bulk(&format!("w{i}"))))
        .collect();
    assert_eq!(String::from_utf8(read_n(&mut c, want.len())).unwrap(), want);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let (rest, closed) = read_to_close(&mut c);
    assert!(closed && rest.is_empty(), "closed after the half-close");
}

#[test]
fn redis_benchmark_random_keys_through_two_kv_workers() {
    if !have("redis-benchmark") {
        return;
    }
    let relay = routed_kv_relay("routebench");
    let port = relay.addr.port();
    let bench = |test: &str| {
        let text = redis_benchmark(
            port,
            &[
                "-t", test, "-n", "20000", "-r", "500", "-P", "16", "-c", "20", "-q",
            ],
        );
        assert!(text.contains("requests per second"), "{text}");
    };
    bench("set");
    bench("get");
    // Every key the benchmark set (`key:` and 12 digits below 500) reads back its value from
    // any connection, in order.
    let mut c = connect(relay.addr);
    let mut cmds = Vec::new();
    for i in 0..500 {
        cmds.extend(resp_cmd(&["GET", &format!("key:{i:012}")]));
    }
    c.write_all(&cmds).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    // Each reply is a 3-byte value (`$3\r\nVXK\r\n` from redis-benchmark 7: the key was
    // set) or `$-1\r\n` (never drawn), and nothing else.
    let (mut pos, mut hits, mut misses) = (0, 0, 0);
    while hits + misses < 500 {
        let rest = &got[pos..];
        if rest.starts_with(b"$-1\r\n") {
            misses += 1;
            pos += 5;
        } else if rest.len() >= 9 && rest.starts_with(b"$3\r\n") && &rest[7..9] == b"\r\n" {
            hits += 1;
            pos += 9;
        } else if rest.len() >= 9 {
            panic!("unexpected reply {:?}", String::from_utf8_lossy(rest));
        } else {
            let n = c.read(&mut buf).unwrap_or_else(|e| {
                panic!("{e} after {} replies", hits + misses);
            });
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(pos, got.len(), "nothing after the 500 replies");
    let found = hits;
    // 20,000 SETs over 500 random keys leave next to none unset.
    assert!(found > 450, "{found} of 500 keys set");
    let mut a = connect(relay.addr);
    let mut b = connect(relay.addr);
    assert_eq!(
        home_keys(&mut a) + home_keys(&mut b),
        found as u64,
        "each key on one worker"
    );
}

#[test]
fn concurrent_pipelines_over_two_kv_workers_see_their_own_writes_in_order() {
    let relay = routed_kv_relay("routemany");
    let addr = relay.addr;
    let threads: Vec<_> = (0..6)
        .map(|t| {
            std::thread::spawn(move || {
                let mut s = connect(addr);
                // Each thread owns its keys; the replies it expects follow from its own writes,
                // so any reply out of order (or from the wrong worker) shows as a mismatch.
                let mut last: Vec<Option<String>> = vec![None; 40];
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                for round in 0..60 {
                    let mut cmds = Vec::new();
                    let mut want = String::new();
                    for i in 0..32 {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        let k = (seed % 40) as usize;
                        let key = format!("t{t}:k{k}");
                        if seed % 3 == 0 {
                            let v = format!("v{round}.{i}");
                            cmds.extend(resp_cmd(&["SET", &key, &v]));
                            want.push_str("+OK\r\n");
                            last[k] = Some(v);
                        } else {
                            cmds.extend(resp_cmd(&["GET", &key]));
                            match &last[k] {
                                Some(v) => want.push_str(&bulk(v)),
                                None => want.push_str("$-1\r\n"),
                            }
                        }
                    }
                    s.write_all(&cmds).unwrap();
                    let got = String::from_utf8(read_n(&mut s, want.len())).unwrap();
                    assert_eq!(got, want, "thread {t} round {round}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client saw replies out of order");
    }
}

#[test]
fn a_half_closed_connection_is_closed_once_for_its_worker() {
    let journal = format!("{} worker journal", env!("CARGO_BIN_EXE_shmrelay"));
    let (relay, _) = Relay::start_config(
        "closeonce",
        &format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"line\"\nworker_cmd = \"{journal}\"\n"
        ),
        1,
        &[],
    );
    let mut s = connect(relay.addr);
    let me = s.local_addr().unwrap().to_string();
    s.write_all(b"hello\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (got, closed) = read_to_close(&mut s);
    assert!(closed && got == b"hello\n");
    // Once the front has closed it (any second CLOSE would be in the ring by then, ahead of
    // the question below), the worker's journal: opened once, closed once, as client_eof.
    let stats = relay.stats();
    assert!(eventually(Duration::from_secs(5), || {
        stats.front(0).closes[shmrelay_worker::CloseReason::ClientEof as usize]
            .load(Ordering::Relaxed)
            == 1
    }));
    let mut ask = connect(relay.addr);
    ask.write_all(b"journal?\n").unwrap();
    let mut buf = [0u8; 65536];
    let n = ask.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("open ")?.strip_suffix(&format!(" {me}")))
        .unwrap_or_else(|| panic!("no open for {me} in {text}"))
        .to_owned();
    let closes: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("close {id} ")))
        .collect();
    assert_eq!(closes, [format!("close {id} client_eof")], "{text}");
}
