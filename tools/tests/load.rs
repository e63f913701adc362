//! `relaybench load` as a real process against small in-test servers on loopback: it must
//! count echoed requests, and notice corrupted, reordered and missing replies.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

mod common;
use common::{src_ip_set, start_server, Server};

#[derive(Clone, Copy)]
enum Mode {
    /// Every frame back unchanged.
    Echo,
    /// Flips one payload byte of the `n`-th frame the server handles (all connections).
    CorruptOne(usize),
    /// Swaps the 20th and 21st frames of every connection.
    SwapPair,
    /// Answers `n` frames per connection, then closes it.
    CloseAfter(usize),
}

fn start_echo(mode: Mode) -> Server {
    // Frames handled, over all connections.
    let frames = AtomicUsize::new(0);
    start_server(move |_, s| serve(s, mode, &frames))
}

/// Frame by frame (one write each: fine for a test server).
fn serve(mut s: TcpStream, mode: Mode, frames: &AtomicUsize) {
    let _ = s.set_nodelay(true);
    let mut held: Option<Vec<u8>> = None;
    for i in 0usize.. {
        let mut head = [0u8; 4];
        if s.read_exact(&mut head).is_err() {
            return;
        }
        let mut frame = head.to_vec();
        frame.resize(4 + u32::from_be_bytes(head) as usize, 0);
        if s.read_exact(&mut frame[4..]).is_err() {
            return;
        }
        let n = frames.fetch_add(1, Ordering::Relaxed);
        match mode {
            Mode::Echo => {}
            Mode::CorruptOne(k) => {
                if n == k && frame.len() > 4 {
                    let last = frame.len() - 1;
                    frame[last] ^= 0xff;
                }
            }
            Mode::SwapPair => {
                if i == 20 {
                    held = Some(frame);
                    continue;
                }
                if i == 21 {
                    frame.extend(held.take().unwrap());
                }
            }
            Mode::CloseAfter(k) => {
                if i == k {
                    return;
                }
            }
        }
        if s.write_all(&frame).is_err() {
            return;
        }
    }
}

fn relaybench(args: &[&str]) -> Output {
    common::relaybench("load", args)
}

/// Runs `relaybench load --json` briefly against `addr`; returns the parsed object.
fn load_json(addr: &str, extra: &[&str]) -> Value {
    let brief = ["--seconds", "0.3", "--warmup", "0.1", "--drain", "0.5"];
    common::run_json("load", addr, &brief, extra)
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

#[test]
fn closed_loop_against_an_echo_server() {
    let server = start_echo(Mode::Echo);
    let v = load_json(
        &server.addr,
        &["--conns", "8", "--depth", "4", "--size", "100"],
    );
    for key in [
        "req_per_sec",
        "p50_us",
        "p99_us",
        "p999_us",
        "errors",
        "conns",
        "requests",
        "bytes_per_sec",
        "mismatches",
    ] {
        assert!(v[key].is_number(), "{key} missing in {v}");
    }
    assert!(num(&v, "requests") > 0.0, "{v}");
    assert!(num(&v, "req_per_sec") > 0.0, "{v}");
    assert_eq!(num(&v, "errors"), 0.0, "{v}");
    assert_eq!(num(&v, "mismatches"), 0.0, "{v}");
    assert_eq!(num(&v, "conns"), 8.0);
    assert_eq!(num(&v, "connected"), 8.0);
    assert_eq!(v["mode"], "closed");
    assert!(num(&v, "p50_us") <= num(&v, "p99_us") && num(&v, "p99_us") <= num(&v, "p999_us"));
    assert_eq!(
        num(&v, "unanswered"),
        0.0,
        "the drain collects every reply: {v}"
    );
    assert_eq!(num(&v, "sent"), num(&v, "replies"), "{v}");
}

#[test]
fn heartbeat_frames_are_load_too() {
    let server = start_echo(Mode::Echo);
    let v = load_json(
        &server.addr,
        &["--conns", "2", "--depth", "2", "--size", "0"],
    );
    assert!(num(&v, "requests") > 0.0, "{v}");
    assert_eq!(num(&v, "errors") + num(&v, "mismatches"), 0.0, "{v}");
}

#[test]
fn a_corrupted_reply_is_a_mismatch() {
    let server = start_echo(Mode::CorruptOne(50));
    let v = load_json(
        &server.addr,
        &["--conns", "4", "--depth", "2", "--size", "64"],
    );
    assert!(num(&v, "requests") > 0.0, "{v}");
    assert_eq!(num(&v, "mismatches"), 1.0, "{v}");
    assert_eq!(num(&v, "errors"), 0.0, "{v}");
}

#[test]
fn reordered_replies_are_mismatches() {
    let server = start_echo(Mode::SwapPair);
    let v = load_json(
        &server.addr,
        &["--conns", "2", "--depth", "4", "--size", "16"],
    );
    assert_eq!(
        num(&v, "mismatches"),
        4.0,
        "two swapped replies on each connection: {v}"
    );
}

#[test]
fn a_server_that_hangs_up_is_counted() {
    let server = start_echo(Mode::CloseAfter(10));
    let v = load_json(&server.addr, &["--conns", "3"]);
    assert_eq!(num(&v, "early_closes"), 3.0, "{v}");
    assert_eq!(num(&v, "errors"), 3.0, "{v}");
    assert!(v["first_error"].is_string(), "{v}");
}

#[test]
fn processes_threads_and_source_addresses() {
    let server = start_echo(Mode::Echo);
    let v = load_json(
        &server.addr,
        &[
            "--conns",
            "12",
            "--depth",
            "2",
            "--procs",
            "2",
            "--threads",
            "2",
            "--src-ips",
            common::SRC_IPS,
        ],
    );
    assert_eq!(num(&v, "connected"), 12.0, "{v}");
    assert_eq!(num(&v, "procs"), 2.0);
    assert!(num(&v, "requests") > 0.0, "{v}");
    assert_eq!(num(&v, "errors") + num(&v, "mismatches"), 0.0, "{v}");
    assert_eq!(
        *server.peers.lock().unwrap(),
        src_ip_set(),
        "connections come from every source address and no other"
    );
}

#[test]
fn open_loop_keeps_to_the_rate() {
    let server = start_echo(Mode::Echo);
    let v = load_json(&server.addr, &["--conns", "4", "--rate", "2000"]);
    assert_eq!(v["mode"], "open");
    let requests = num(&v, "requests");
    // 2000 req/s over a 0.3 s window: about 600. The bounds are generous (a busy machine
    // stretches the window); an unlimited closed loop on 4 connections makes tens of thousands.
    assert!((150.0..=1500.0).contains(&requests), "{v}");
    assert_eq!(num(&v, "errors") + num(&v, "mismatches"), 0.0, "{v}");
}

#[test]
fn no_server_means_failure() {
    let (v, err) = common::against_refused("load", &["--warmup", "0"]);
    assert_eq!(num(&v, "connected"), 0.0, "{v}");
    assert!(
        err.contains("no connection") && err.contains("refused"),
        "stderr: {err}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    for args in [
        &["--conns", "0"][..],
        &["--seconds", "-1"],
        &["--procs", "3", "--conns", "2"],
        &["--src-ips", "x"],
    ] {
        let out = relaybench(args);
        assert!(!out.status.success(), "{args:?} should fail");
    }
}

#[test]
fn frames_bigger_than_the_read_buffer() {
    let server = start_echo(Mode::Echo);
    let v = load_json(
        &server.addr,
        &["--conns", "2", "--depth", "3", "--size", "100000"],
    );
    assert!(num(&v, "requests") > 0.0, "{v}");
    assert_eq!(num(&v, "errors") + num(&v, "mismatches"), 0.0, "{v}");
}
