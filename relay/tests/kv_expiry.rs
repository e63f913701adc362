//! The kv worker's expiry under a stream of `SET ... EX` (issue 20, item 5), end to end: 1M
//! alternating `SET a v EX 100` / `SET b v EX 100` through a `resp` listener, then 100K
//! `PING`s. Before the fix the worker's expiry list grew by one entry per command (RSS 12 ->
//! 67 MiB; 23.5 s for the SETs, 6.3 s for the PINGs: every sweep walked the list); after it the
//! worker stays at its size (2.0 s, 0.09 s). Asserted on memory only (timings are printed).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use shmrelay_tests::{rss_kib, Relay};

/// Writes `cmds` (from another thread) and reads `n` copies of `reply`, checking each byte.
fn pipeline(s: &mut TcpStream, cmds: Vec<u8>, reply: &'static [u8], n: usize) {
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&cmds).expect("write"));
    let mut left = reply.len() * n;
    let mut at = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let m = s.read(&mut buf[..left.min(64 * 1024)]).expect("read");
        assert!(m > 0, "closed with {left} reply bytes missing");
        for &b in &buf[..m] {
            assert_eq!(b, reply[at % reply.len()], "reply byte {at}");
            at += 1;
        }
        left -= m;
    }
    writer.join().unwrap();
}

fn cmd(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

#[test]
fn alternating_set_ex_keeps_the_kv_worker_small() {
    let kv = format!("{} worker kv", env!("CARGO_BIN_EXE_shmrelay"));
    let (relay, _) = Relay::start_config(
        "kvexpiry",
        &format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\ncodec = \"resp\"\nworker_cmd = \"{kv}\"\n"
        ),
        1,
        &[],
    );
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    pipeline(&mut s, cmd(&["PING"]), b"+PONG\r\n", 1);
    let pid = relay.worker_pid(0);
    let before = rss_kib(pid);
    let (a, b) = (
        cmd(&["SET", "a", "v", "EX", "100"]),
        cmd(&["SET", "b", "v", "EX", "100"]),
    );
    let t = Instant::now();
    for _ in 0..10 {
        let mut cmds = Vec::new();
        for i in 0..100_000 {
            cmds.extend_from_slice(if i % 2 == 0 { &a } else { &b });
        }
        pipeline(&mut s, cmds, b"+OK\r\n", 100_000);
    }
    let sets = t.elapsed();
    let after = rss_kib(pid);
    let t = Instant::now();
    pipeline(
        &mut s,
        cmd(&["PING"]).repeat(100_000),
        b"+PONG\r\n",
        100_000,
    );
    let pings = t.elapsed();
    println!(
        "kv worker RSS {before} KiB -> {after} KiB after 1M alternating SET EX ({sets:?}); \
         100K PING {pings:?}"
    );
    // Both keys are there, with an expiry (TTL 99 or 100 s, depending on the machine's pace).
    pipeline(&mut s, cmd(&["DBSIZE"]), b":2\r\n", 1);
    s.write_all(&cmd(&["TTL", "b"])).unwrap();
    let mut ttl = [0u8; 5];
    s.read_exact(&mut ttl).unwrap();
    assert!(
        &ttl == b":100\r" || &ttl == b":99\r\n",
        "{:?}",
        String::from_utf8_lossy(&ttl)
    );
    assert!(
        after.saturating_sub(before) < 16 * 1024,
        "the worker grew by {} KiB for two keys",
        after.saturating_sub(before)
    );
}
