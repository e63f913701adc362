//! The kv worker as a Redis stand-in, with real clients: every command family through
//! redis-cli (one kv worker), `redis-cli --stat` and `--scan`, redis-benchmark's MSET, HSET and
//! SADD tests, CROSSSLOT over a routed pool of two, and the pool-wide DBSIZE and FLUSHALL
//! (also with a worker killed while the command is in flight). The redis tools are optional: a
//! test that needs one prints a note and passes when it is absent (`.ci/run` installs them);
//! the pool tests speak RESP themselves and always run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use shmrelay_tests::{eventually, scratch, shell_worker, signal, Relay, SIGSTOP};
use shmrelay_worker::slot::{pool_member, POOL_SIZE_ENV};

/// A relay with one `resp` listener of `workers` kv workers, started through `env` with the
/// pool size set (as the supervisor sets it itself once it knows [`POOL_SIZE_ENV`]).
fn kv_pool(name: &str, workers: usize) -> Relay {
    let worker = format!(
        "env {POOL_SIZE_ENV}={workers} {} worker kv",
        env!("CARGO_BIN_EXE_shmrelay")
    );
    kv_pool_of(name, workers, &worker, &[])
}

/// A relay with one `resp` listener of `workers` workers started by `worker_cmd`.
fn kv_pool_of(name: &str, workers: usize, worker_cmd: &str, args: &[&str]) -> Relay {
    let toml = format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"resp\"\nworkers = {workers}\n\
         worker_cmd = \"{worker_cmd}\"\n"
    );
    Relay::start_config(name, &toml, 1, args).0
}

/// `tool ARGS` aimed at the relay, or `None` (with a note) when the tool is not installed.
fn tool(tool: &str, addr: SocketAddr, args: &[&str]) -> Option<Output> {
    let run = Command::new("timeout")
        .args([
            "60",
            tool,
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run timeout");
    // `timeout` exits 127 when it cannot find the tool.
    if run.status.code() == Some(127) {
        println!("NOTE: {tool} is not installed; skipping (.ci/run installs it)");
        return None;
    }
    Some(run)
}

/// What redis-cli printed for one command (non-interactive: plain values, one a line).
struct Cli(SocketAddr);

impl Cli {
    /// A relay with one kv worker and redis-cli aimed at it; `None` without redis-cli.
    fn with_relay(name: &str) -> Option<(Relay, Cli)> {
        let relay = kv_pool(name, 1);
        tool("redis-cli", relay.addr, &["PING"])?;
        let cli = Cli(relay.addr);
        Some((relay, cli))
    }

    fn run(&self, args: &[&str]) -> String {
        let out = tool("redis-cli", self.0, args).expect("redis-cli went away");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    /// The lines of a multi-line answer, sorted (hash and set order is unspecified).
    fn sorted(&self, args: &[&str]) -> Vec<String> {
        let mut lines: Vec<String> = self.run(args).lines().map(str::to_owned).collect();
        lines.sort();
        lines
    }
}

#[test]
fn every_command_family_through_redis_cli() {
    let Some((_relay, cli)) = Cli::with_relay("kvcmds") else {
        return;
    };
    // Strings.
    assert_eq!(cli.run(&["MSET", "a", "1", "b", "2", "c", "3"]), "OK");
    assert_eq!(cli.run(&["MGET", "a", "nope", "c"]), "1\n\n3");
    assert_eq!(cli.run(&["GETSET", "a", "10"]), "1");
    assert_eq!(cli.run(&["APPEND", "a", "0"]), "3");
    assert_eq!(cli.run(&["STRLEN", "a"]), "3");
    assert_eq!(cli.run(&["GET", "a"]), "100");
    assert_eq!(cli.run(&["TYPE", "a"]), "string");
    assert_eq!(cli.run(&["TYPE", "nope"]), "none");
    // Expiry.
    assert_eq!(cli.run(&["SETEX", "s", "100", "v"]), "OK");
    assert_eq!(cli.run(&["TTL", "s"]), "100");
    let pttl: i64 = cli.run(&["PTTL", "s"]).parse().unwrap();
    assert!((90_000..=100_000).contains(&pttl), "{pttl}");
    assert_eq!(cli.run(&["PERSIST", "s"]), "1");
    assert_eq!(cli.run(&["PTTL", "s"]), "-1");
    assert_eq!(cli.run(&["PSETEX", "p", "30", "v"]), "OK");
    assert!(eventually(Duration::from_secs(5), || cli
        .run(&["EXISTS", "p"])
        == "0"));
    assert_eq!(cli.run(&["PTTL", "p"]), "-2");
    // Hashes.
    assert_eq!(cli.run(&["HSET", "h", "f1", "v1", "f2", "v2"]), "2");
    assert_eq!(cli.run(&["HGET", "h", "f1"]), "v1");
    assert_eq!(cli.run(&["HINCRBY", "h", "n", "5"]), "5");
    assert_eq!(cli.run(&["HLEN", "h"]), "3");
    assert_eq!(
        cli.sorted(&["HGETALL", "h"]),
        ["5", "f1", "f2", "n", "v1", "v2"]
    );
    assert_eq!(cli.run(&["HDEL", "h", "f1", "nope"]), "1");
    assert_eq!(cli.run(&["TYPE", "h"]), "hash");
    // Sets.
    assert_eq!(cli.run(&["SADD", "st", "x", "y", "x"]), "2");
    assert_eq!(cli.run(&["SISMEMBER", "st", "y"]), "1");
    assert_eq!(cli.run(&["SCARD", "st"]), "2");
    assert_eq!(cli.sorted(&["SMEMBERS", "st"]), ["x", "y"]);
    assert_eq!(cli.run(&["SREM", "st", "x"]), "1");
    assert_eq!(cli.run(&["TYPE", "st"]), "set");
    // Wrong kinds.
    for args in [
        &["GET", "h"][..],
        &["HGET", "a", "f"],
        &["SADD", "h", "x"],
        &["LPUSH", "st", "x"],
    ] {
        assert!(
            cli.run(args).contains("WRONGTYPE"),
            "{args:?}: {}",
            cli.run(args)
        );
    }
    // KEYS, and SCAN as `redis-cli --scan` drives it (cursor, MATCH and COUNT).
    for i in 0..250 {
        assert_eq!(cli.run(&["SET", &format!("user:{i}"), "v"]), "OK");
    }
    let users: Vec<String> = {
        let mut v: Vec<String> = (0..250).map(|i| format!("user:{i}")).collect();
        v.sort();
        v
    };
    assert_eq!(cli.sorted(&["KEYS", "user:*"]), users);
    assert_eq!(cli.sorted(&["KEYS", "user:1?"]).len(), 10);
    let scanned = cli.sorted(&["--scan", "--pattern", "user:*"]);
    assert_eq!(scanned, users, "every key once");
    let all = cli.sorted(&["--scan"]);
    assert_eq!(all.len(), 250 + 6, "{all:?}");
    // SCAN by hand with COUNT: the cursor is the first line of each answer.
    let (mut cursor, mut seen) = ("0".to_owned(), Vec::new());
    loop {
        let page = cli.run(&["SCAN", &cursor, "MATCH", "user:*", "COUNT", "7"]);
        let mut lines = page.lines().map(str::to_owned);
        cursor = lines.next().unwrap();
        seen.extend(lines.filter(|l| !l.is_empty()));
        if cursor == "0" {
            break;
        }
    }
    seen.sort();
    assert_eq!(seen, users, "every key once, COUNT 7");
    assert_eq!(cli.run(&["DBSIZE"]), "256");
}

#[test]
fn redis_cli_stat_reads_the_info_sections() {
    let Some((relay, cli)) = Cli::with_relay("kvstat") else {
        return;
    };
    assert_eq!(cli.run(&["MSET", "a", "1", "b", "2", "c", "3"]), "OK");
    // `--stat` prints a header, then one line a second until stopped: keys, mem, clients,
    // blocked, requests (+delta), connections. `timeout` stops it; `stdbuf` keeps the lines
    // it printed from dying in its stdio buffer.
    let out = Command::new("timeout")
        .args(["3", "stdbuf", "-oL", "redis-cli", "-p"])
        .args([&relay.addr.port().to_string(), "--stat", "-i", "1"])
        .output()
        .expect("run redis-cli --stat");
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text
        .lines()
        .position(|l| l.starts_with("keys"))
        .unwrap_or_else(|| panic!("no header in {text}"));
    let row: Vec<&str> = text
        .lines()
        .nth(header + 1)
        .unwrap_or_else(|| panic!("no data line in {text}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[0], "3", "keys: {text}");
    assert!(
        row[1].ends_with('B') || row[1].ends_with('K'),
        "mem: {text}"
    );
    let clients: u64 = row[2].parse().unwrap();
    assert!(clients >= 1, "the --stat connection itself is open: {text}");
    assert_eq!(row[3], "0", "blocked: {text}");
    let requests: u64 = row[4].parse().unwrap();
    assert!(requests >= 2, "requests: {text}");
    let connections: u64 = row.last().unwrap().parse().unwrap();
    assert!(connections >= 2, "connections: {text}");
}

#[test]
fn redis_benchmark_mset_hset_sadd_on_one_worker_and_on_a_pool() {
    // redis-benchmark's MSET keys share one {tag}, as for Redis Cluster: no CROSSSLOT in a
    // pool of two either.
    for workers in [1, 2] {
        let relay = kv_pool(&format!("kvbench{workers}"), workers);
        let Some(out) = tool(
            "redis-benchmark",
            relay.addr,
            &["-t", "mset,hset,sadd", "-n", "5000", "-P", "8", "-q"],
        ) else {
            return;
        };
        // Progress lines end in \r; errors may come on either stream.
        let text = [&out.stdout[..], &out.stderr[..]].concat();
        let text = String::from_utf8_lossy(&text).replace('\r', "\n");
        let failed = ["ERR", "CROSSSLOT", "Error"]
            .iter()
            .any(|e| text.contains(e));
        assert!(out.status.success() && !failed, "{workers} workers: {text}");
        for test in ["MSET (10 keys)", "HSET", "SADD"] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(test) && l.contains("requests per second")),
                "{workers} workers: no result for {test} in {text}"
            );
        }
    }
}

/// A RESP connection speaking arrays of bulk strings, reading one reply at a time.
struct Resp(TcpStream);

impl Resp {
    fn connect(addr: SocketAddr) -> Resp {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Resp(s)
    }

    /// Sends one command and returns its reply's bytes (a reply here is one line, or one
    /// array of bulk strings or nils).
    fn call(&mut self, line: &str) -> String {
        let args: Vec<&str> = line.split(' ').collect();
        let mut cmd = format!("*{}\r\n", args.len());
        for a in &args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.0.write_all(cmd.as_bytes()).unwrap();
        let mut got = Vec::new();
        while !whole(&got) {
            let mut buf = [0u8; 4096];
            let n = self.0.read(&mut buf).expect("reply");
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    /// Sends the commands of `lines` in one write and returns their `n` replies, each one
    /// line or one bulk string.
    fn pipeline(&mut self, lines: &[&str]) -> Vec<String> {
        let mut cmds = String::new();
        for line in lines {
            let args: Vec<&str> = line.split(' ').collect();
            cmds.push_str(&format!("*{}\r\n", args.len()));
            for a in &args {
                cmds.push_str(&format!("${}\r\n{a}\r\n", a.len()));
            }
        }
        self.0.write_all(cmds.as_bytes()).unwrap();
        (0..lines.len()).map(|_| self.reply()).collect()
    }

    /// Reads one reply of one line, or one bulk string, byte by byte (pipelined replies
    /// follow it in the socket).
    fn reply(&mut self) -> String {
        let mut got = Vec::new();
        let line = |got: &mut Vec<u8>, s: &mut TcpStream| {
            let (start, mut b) = (got.len(), [0u8]);
            while !got[start..].ends_with(b"\r\n") {
                let n = s.read(&mut b).expect("reply");
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(got));
                got.push(b[0]);
            }
        };
        line(&mut got, &mut self.0);
        if got[0] == b'$' && &got[..] != b"$-1\r\n" {
            line(&mut got, &mut self.0);
        }
        String::from_utf8(got).unwrap()
    }
}

/// Whether `buf` is one whole reply of the shapes [`Resp::call`] expects.
fn whole(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let lines: Vec<&str> = text.split_terminator("\r\n").collect();
    if !text.ends_with("\r\n") || lines.is_empty() {
        return false;
    }
    match lines[0].strip_prefix('*') {
        // n elements: a `$-1` line, or a `$len` line and its data, each.
        Some(n) => {
            let (mut need, mut i) = (n.parse::<usize>().unwrap(), 1);
            while need > 0 && i < lines.len() {
                i += if lines[i] == "$-1" { 1 } else { 2 };
                need -= 1;
            }
            need == 0 && i <= lines.len()
        }
        None if lines[0].starts_with('$') && lines[0] != "$-1" => lines.len() >= 2,
        None => true,
    }
}

#[test]
fn multi_key_commands_across_a_pool_of_two_answer_crossslot() {
    let relay = kv_pool("kvcross", 2);
    let mut c = Resp::connect(relay.addr);
    // Keys on one member (with the first) and on the other, by the SDK's function: the one
    // the front routes by.
    let keys: Vec<String> = (0..64).map(|i| format!("key{i}")).collect();
    let member = |k: &String| pool_member(k.as_bytes(), 2);
    let (first, rest) = keys.split_first().unwrap();
    let same: Vec<&String> = rest.iter().filter(|k| member(k) == member(first)).collect();
    let other: Vec<&String> = rest.iter().filter(|k| member(k) != member(first)).collect();
    assert!(same.len() >= 3 && other.len() >= 3);
    let cross = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";

    let mset = format!("MSET {first} 0 {} 1 {} 2", same[0], same[1]);
    assert_eq!(c.call(&mset), "+OK\r\n");
    // Each key alone, routed by the front: each lives where the MSET put it, so the worker's
    // check and the front's routing agree.
    for (k, v) in [(first, "0"), (same[0], "1"), (same[1], "2")] {
        assert_eq!(c.call(&format!("GET {k}")), format!("$1\r\n{v}\r\n"), "{k}");
    }
    assert_eq!(
        c.call(&format!("EXISTS {first} {} {}", same[0], same[1])),
        ":3\r\n"
    );
    // Any key on the other member: refused, nothing partial.
    for cmd in ["EXISTS", "MGET", "DEL", "UNLINK"] {
        let line = format!("{cmd} {first} {} {}", same[0], other[0]);
        assert_eq!(c.call(&line), cross, "{line}");
    }
    assert_eq!(c.call(&format!("MSET {first} 5 {} 6", other[0])), cross);
    assert_eq!(
        c.call(&format!("GET {first}")),
        "$1\r\n0\r\n",
        "the refused MSET wrote nothing"
    );
    assert_eq!(c.call(&format!("GET {}", other[0])), "$-1\r\n");
    // A {tag} keeps keys together, as in Redis Cluster.
    let tagged: Vec<String> = (0..8).map(|i| format!("{{user7}}.k{i}")).collect();
    let pairs: Vec<String> = tagged.iter().map(|k| format!("{k} v")).collect();
    assert_eq!(c.call(&format!("MSET {}", pairs.join(" "))), "+OK\r\n");
    assert_eq!(c.call(&format!("EXISTS {}", tagged.join(" "))), ":8\r\n");
    assert_eq!(c.call(&format!("DEL {}", tagged.join(" "))), ":8\r\n");
    // KEYS and SCAN would list one member: refused with the fix.
    assert!(c
        .call("KEYS *")
        .starts_with("-ERR KEYS lists one worker's keys in a pool of 2"));
    assert!(c
        .call("SCAN 0")
        .starts_with("-ERR SCAN lists one worker's keys in a pool of 2"));
    // Single-key commands are untouched.
    assert_eq!(c.call(&format!("SET {} x", other[1])), "+OK\r\n");
    assert_eq!(c.call(&format!("GET {}", other[1])), "$1\r\nx\r\n");
}

/// `n` keys named `PREFIX0..`, spread over a pool of `workers` by the front's function, and how
/// many live on each member.
fn spread(prefix: &str, n: usize, workers: usize) -> (Vec<String>, Vec<usize>) {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let mut per = vec![0; workers];
    for k in &keys {
        per[pool_member(k.as_bytes(), workers)] += 1;
    }
    assert!(per.iter().all(|&p| p > 0), "{per:?}");
    (keys, per)
}

#[test]
fn dbsize_and_flushall_answer_for_the_whole_pool_in_reply_order() {
    for workers in [2, 3] {
        let relay = kv_pool(&format!("kvwide{workers}"), workers);
        let mut c = Resp::connect(relay.addr);
        let (keys, _) = spread("k", 60, workers);
        for k in &keys {
            assert_eq!(c.call(&format!("SET {k} v")), "+OK\r\n");
        }
        assert_eq!(c.call("DBSIZE"), ":60\r\n", "{workers} workers");
        // Every connection sees the pool, whatever its home worker.
        for _ in 0..workers {
            assert_eq!(Resp::connect(relay.addr).call("dbsize"), ":60\r\n");
        }
        // Pipelined between routed commands: each reply in its turn.
        let replies = c.pipeline(&[
            &format!("GET {}", keys[0]),
            "DBSIZE",
            "SET extra v",
            "DBSIZE",
            "FLUSHALL",
            "DBSIZE",
            &format!("GET {}", keys[1]),
            "SET after v",
            "DBSIZE",
            "FLUSHDB",
            "DBSIZE",
            "DBSIZE too many",
        ]);
        let want = [
            "$1\r\nv\r\n",
            ":60\r\n",
            "+OK\r\n",
            ":61\r\n",
            "+OK\r\n",
            ":0\r\n",
            "$-1\r\n",
            "+OK\r\n",
            ":1\r\n",
            "+OK\r\n",
            ":0\r\n",
        ];
        assert_eq!(replies[..want.len()], want, "{workers} workers");
        // An error every worker gives is passed on once.
        assert_eq!(
            replies[11],
            "-ERR wrong number of arguments for 'dbsize' command\r\n"
        );
        // Every key on every member is gone.
        for k in &keys {
            assert_eq!(c.call(&format!("EXISTS {k}")), ":0\r\n", "{k}");
        }
        // A long pipeline of them keeps its order too.
        let mut lines = Vec::new();
        for i in 0..200 {
            lines.push(format!("SET p{i} v"));
            lines.push("DBSIZE".to_owned());
        }
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let replies = c.pipeline(&lines);
        for i in 0..200 {
            assert_eq!(replies[2 * i], "+OK\r\n");
            assert_eq!(
                replies[2 * i + 1],
                format!(":{}\r\n", i + 1),
                "DBSIZE after {i}"
            );
        }
        // And with redis-cli, where it is installed.
        if let Some(out) = tool("redis-cli", relay.addr, &["DBSIZE"]) {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "200");
            let out = tool("redis-cli", relay.addr, &["FLUSHALL"]).unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
            let out = tool("redis-cli", relay.addr, &["DBSIZE"]).unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
        }
    }
}

#[test]
fn a_worker_killed_during_dbsize_is_replaced_and_the_client_gets_its_answer() {
    let relay = kv_pool("kvwidekill", 2);
    let mut c = Resp::connect(relay.addr);
    let (keys, per) = spread("k", 40, 2);
    for k in &keys {
        assert_eq!(c.call(&format!("SET {k} v")), "+OK\r\n");
    }
    assert_eq!(c.call("DBSIZE"), ":40\r\n");
    // Worker 0 stops; the DBSIZE reaches both, worker 1 answers, the front waits on 0.
    let pid = relay.worker_pid(0);
    signal(pid, SIGSTOP);
    c.0.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    c.0.write_all(b"*1\r\n$6\r\nDBSIZE\r\n").unwrap();
    let mut b = [0u8; 64];
    assert!(
        c.0.read(&mut b).is_err(),
        "no answer while a worker has not answered"
    );
    // Killed: its replacement gets the unanswered DBSIZE again and answers for its keys,
    // which died with it.
    signal(pid, libc::SIGKILL);
    c.0.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(c.reply(), format!(":{}\r\n", per[1]));
    assert_eq!(c.call("DBSIZE"), format!(":{}\r\n", per[1]));
    assert!(relay.worker_pid(0) != pid);
}

#[test]
fn a_pool_member_that_cannot_come_back_ends_a_pool_wide_command_with_an_error() {
    // Kv workers that serve until MARK exists, then exit 1 at every start.
    let dir = scratch("kvwidefail");
    let mark = dir.join("MARK");
    let cmd = shell_worker(
        &dir,
        &format!(
            "[ -e {} ] && exit 1\nexec {} worker kv",
            mark.display(),
            env!("CARGO_BIN_EXE_shmrelay")
        ),
    );
    let relay = kv_pool_of("kvwidefail", 2, &cmd, &["--set", "crash_limit=3"]);
    let mut c = Resp::connect(relay.addr);
    let (keys, _) = spread("k", 20, 2);
    for k in &keys {
        assert_eq!(c.call(&format!("SET {k} v")), "+OK\r\n");
    }
    let pid = relay.worker_pid(0);
    signal(pid, SIGSTOP);
    c.0.write_all(b"*1\r\n$8\r\nFLUSHALL\r\n").unwrap();
    std::fs::write(&mark, b"").unwrap();
    signal(pid, libc::SIGKILL);
    // The replacement never starts: the worker is failed, and the pool's connections get the
    // codec's error and a close instead of waiting for ever.
    c.0.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(c.reply(), "-ERR worker unavailable\r\n");
    let mut rest = Vec::new();
    let end = c.0.read_to_end(&mut rest);
    let timed_out = matches!(&end, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    assert!(
        rest.is_empty() && !timed_out,
        "then a close: {end:?} {rest:?}"
    );
}
