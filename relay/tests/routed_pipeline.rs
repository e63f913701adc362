//! A long pipeline on a key-routed pool (issue 20, item 4): a `resp` listener with two kv
//! workers; one client sends a slow command for one worker (`DEBUG SLEEP`, allowed by
//! `SHMRELAY_KV_DEBUG=1` in the workers' environment) followed by N x `GET a` for the other.
//! Every reply to `GET a` comes before its turn and is held by the front until the slow one is
//! written. The replies must come complete and in order, an unrelated client of the fast
//! worker must keep getting quick answers meanwhile, and a pipeline larger than the
//! connection's pending bound stalls that client (the front stops reading it) instead of
//! growing the front or closing the connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmrelay_tests::{rss_kib, Relay};

/// The tests of this file run one at a time: each loads the machine (a long pipeline), and one
/// of them measures another client's latency.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `resp` listener with two kv workers that accept `DEBUG SLEEP`, and `extra` settings.
fn relay(name: &str, extra: &str) -> Relay {
    let kv = format!(
        "env SHMRELAY_KV_DEBUG=1 {} worker kv",
        env!("CARGO_BIN_EXE_shmrelay")
    );
    Relay::start_config(
        name,
        &format!(
            "{extra}\n[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"resp\"\nworkers = 2\nworker_cmd = \"{kv}\"\n"
        ),
        1,
        &[],
    )
    .0
}

/// Which of the two workers owns `key`: the front's FNV-1a of the key, modulo the pool size
/// (stable by design: keys must not move between workers).
fn owner(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % 2
}

/// Keys owned by the worker that does not own `SLEEP` (where `DEBUG SLEEP s` goes).
fn fast_keys(n: usize) -> Vec<String> {
    let slow = owner("SLEEP");
    (0..)
        .map(|i| format!("a{i}"))
        .filter(|k| owner(k) != slow)
        .take(n)
        .collect()
}

fn resp_cmd(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn read_exact_or_panic(s: &mut TcpStream, want: usize, what: &str) -> Vec<u8> {
    let mut got = vec![0u8; want];
    let mut at = 0;
    while at < want {
        match s.read(&mut got[at..]) {
            Ok(0) => panic!("{what}: closed after {at} of {want} bytes"),
            Ok(n) => at += n,
            Err(e) => panic!("{what}: {e} after {at} of {want} bytes"),
        }
    }
    got
}

/// CPU time (user + system) of a process, in milliseconds.
fn cpu_ms(pid: u32) -> u64 {
    (shmrelay::procfs::cpu_seconds(pid).unwrap_or(0.0) * 1000.0) as u64
}

fn front_pid(relay: &Relay) -> u32 {
    relay.stats().front(0).pid.load(Ordering::Relaxed)
}

/// Round trips of a client using only keys of the fast worker, until `stop`: their latencies.
fn unrelated_client(
    addr: SocketAddr,
    key: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        let mut s = connect(addr);
        s.write_all(&resp_cmd(&["SET", &key, "u"])).unwrap();
        assert_eq!(read_exact_or_panic(&mut s, 5, "SET"), b"+OK\r\n");
        let get = resp_cmd(&["GET", &key]);
        let mut lat = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            s.write_all(&get).unwrap();
            assert_eq!(
                read_exact_or_panic(&mut s, 7, "unrelated GET"),
                b"$1\r\nu\r\n"
            );
            lat.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(2));
        }
        lat
    })
}

/// Sends `DEBUG SLEEP secs` then `n` x `GET key` on one connection (written by another thread,
/// since the front may stop reading it), and checks every reply, in order. Returns how long
/// the replies took from the first write.
fn slow_then_pipeline(addr: SocketAddr, key: &str, secs: &str, n: usize) -> Duration {
    let mut s = connect(addr);
    slow_then_pipeline_on(&mut s, key, secs, n)
}

/// `slow_then_pipeline` on a connection of the caller's (left open).
fn slow_then_pipeline_on(s: &mut TcpStream, key: &str, secs: &str, n: usize) -> Duration {
    s.write_all(&resp_cmd(&["SET", key, "v"])).unwrap();
    assert_eq!(read_exact_or_panic(s, 5, "SET"), b"+OK\r\n");
    let mut w = s.try_clone().unwrap();
    let mut cmds = resp_cmd(&["DEBUG", "SLEEP", secs]);
    let get = resp_cmd(&["GET", key]);
    for _ in 0..n {
        cmds.extend_from_slice(&get);
    }
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        for piece in cmds.chunks(64 * 1024) {
            w.write_all(piece).expect("pipeline write");
        }
    });
    assert_eq!(
        read_exact_or_panic(s, 5, "DEBUG SLEEP"),
        b"+OK\r\n",
        "the slow command's reply comes first"
    );
    // Every GET reply, in order and complete (read in pieces: no 7-byte read loop per reply).
    const REPLY: &[u8] = b"$1\r\nv\r\n";
    let mut left = n * REPLY.len();
    let mut at = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = left.min(buf.len());
        let m = match s.read(&mut buf[..want]) {
            Ok(0) => panic!("pipeline closed with {left} reply bytes missing"),
            Ok(m) => m,
            Err(e) => panic!("pipeline read: {e} with {left} reply bytes missing"),
        };
        for &b in &buf[..m] {
            assert_eq!(b, REPLY[at % REPLY.len()], "reply byte {at} out of order");
            at += 1;
        }
        left -= m;
    }
    let took = t.elapsed();
    writer.join().unwrap();
    // Nothing more, and the connection still works.
    s.write_all(&resp_cmd(&["PING"])).unwrap();
    assert_eq!(read_exact_or_panic(s, 7, "PING"), b"+PONG\r\n");
    took
}

#[test]
fn a_long_pipeline_behind_a_slow_worker_does_not_stall_other_clients() {
    let _one = one_at_a_time();
    // ROUTED_PIPELINE_N=25000 (etc.) to measure other lengths.
    let n: usize = std::env::var("ROUTED_PIPELINE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let relay = relay("routedpipe", "");
    let keys = fast_keys(2);
    let pid = front_pid(&relay);
    let stop = Arc::new(AtomicBool::new(false));
    let other = unrelated_client(relay.addr, keys[1].clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    let cpu0 = cpu_ms(pid);
    let took = slow_then_pipeline(relay.addr, &keys[0], "2", n);
    let cpu = cpu_ms(pid) - cpu0;
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let lat = other.join().unwrap();
    let max = lat.iter().max().copied().unwrap_or_default();
    println!(
        "N = {n}: pipeline answered in {took:?}, front CPU {cpu} ms, unrelated client: {} round \
         trips, max latency {max:?}",
        lat.len()
    );
    assert!(
        lat.len() >= 20,
        "the unrelated client was served during the sleep"
    );
    assert!(
        max < Duration::from_millis(500),
        "the unrelated client waited {max:?} behind another client's pipeline"
    );
}

#[test]
fn a_pipeline_past_the_pending_bound_stalls_its_client_instead_of_closing_it() {
    let _one = one_at_a_time();
    // 64 KiB of state per connection: the replies held for 50K GETs (350 KB) and their
    // requests do not fit, so the front must stop reading the client until the slow reply is
    // written, then go on.
    const N: usize = 50_000;
    let relay = relay("routedbound", "max_pending = 65536");
    let keys = fast_keys(1);
    let addr = relay.addr;
    let key = keys[0].clone();
    let pipeline = std::thread::spawn(move || slow_then_pipeline(addr, &key, "1.5", N));
    // While the worker sleeps, the front reads only part of the pipeline.
    std::thread::sleep(Duration::from_millis(1000));
    let frames_in = relay.stats().front(0).frames_in.load(Ordering::Relaxed);
    let took = pipeline
        .join()
        .expect("every reply, in order, on an open connection");
    println!("N = {N}, max_pending 64 KiB: {frames_in} frames read during the sleep, all answered in {took:?}");
    assert!(
        frames_in < (N / 2) as u64,
        "the front read {frames_in} frames of a stalled pipeline"
    );
}

/// Issue 20.4: after one 3 MB pipeline an idle connection kept its reorder queues (6.65 MiB
/// each). Measured with 60 connections: the front's RSS grew by 168 MiB before the fix and by
/// 14 MiB after; the bound leaves room for allocator noise.
#[test]
fn idle_connections_give_back_the_memory_of_a_big_pipeline() {
    let _one = one_at_a_time();
    const CONNS: usize = 60;
    let relay = relay("routedmem", "");
    let pid = front_pid(&relay);
    let keys = fast_keys(1);
    let mut conns: Vec<TcpStream> = (0..CONNS).map(|_| connect(relay.addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(pid);
    // About 3 MB of pipelined GETs per connection, behind a short sleep of the other worker;
    // every connection stays open (and idle) afterwards.
    let n = 3_000_000 / resp_cmd(&["GET", &keys[0]]).len();
    for s in &mut conns {
        slow_then_pipeline_on(s, &keys[0], "0.05", n);
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(pid);
    println!(
        "front RSS {before} KiB before, {after} KiB after {CONNS} idle connections each ran a \
         pipeline of {n} GETs"
    );
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "{CONNS} idle connections keep {} KiB",
        after.saturating_sub(before)
    );
}
