//! Issue 12.4: a worker that rewrites the bytes of replies it already published (after the
//! front validated them, before or while the front writes them) cannot unframe its clients'
//! streams: the front frames what it writes from its own copy of the lengths.

use std::io::Read;
use std::time::{Duration, Instant};

use shmrelay_tests::Relay;

const LEN: usize = 64;
const PIPE: usize = 32;

fn payload() -> Vec<u8> {
    let mut p = b"ABCD".to_vec();
    p.extend(shmrelay_tests::pattern(1, 2, LEN - 4));
    p
}

/// What one connection saw.
#[derive(Default, Debug)]
struct Seen {
    frames: usize,
    flipped: usize,
    closed: bool,
}

/// Reads one frame; panics on a header no correct framing can produce.
fn read_frame(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_be_bytes(h) as usize;
    let error = b"shmrelay-error: worker unavailable".len();
    assert!(
        len == LEN || len == 4 || len == error,
        "unframed reply: header {h:02x?} (length {len:#x}) where a {LEN}-byte frame was due"
    );
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some(body)
}

fn one_connection(relay: &Relay, seen: &mut Seen) {
    one_connection_started(relay, seen, b"flip");
}

/// As `one_connection`, the flipper started by `start` (`flip` or `flen`).
fn one_connection_started(relay: &Relay, seen: &mut Seen, start: &[u8]) {
    let mut c = relay.connect();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    c.send(start);
    match read_frame(&mut c.stream) {
        Some(b) if b.len() == 4 => {}
        _ => {
            seen.closed = true;
            return;
        }
    }
    let want = payload();
    for _ in 0..40 {
        for _ in 0..PIPE {
            // The relay may close the connection mid-pipeline (a caught lie): a refused
            // write is that close.
            if c.try_send(&want).is_err() {
                seen.closed = true;
                return;
            }
        }
        for _ in 0..PIPE {
            let Some(body) = read_frame(&mut c.stream) else {
                seen.closed = true;
                return;
            };
            if body.len() != LEN {
                // The relay's error frame before a close (quarantine).
                assert!(body.starts_with(b"shmrelay-error"), "{body:?}");
                seen.closed = true;
                return;
            }
            // Only the first four payload bytes are rewritten by the worker; the rest of the
            // frame, and the framing, are intact.
            assert_eq!(&body[4..], &want[4..], "payload beyond the rewritten bytes");
            let head: [u8; 4] = body[..4].try_into().unwrap();
            assert!(
                [*b"ABCD", *b"flip", *b"flen", [0x7f, 0xff, 0xff, 0xff]].contains(&head),
                "{head:02x?}"
            );
            seen.frames += 1;
            seen.flipped += (head == [0x7f, 0xff, 0xff, 0xff]) as usize;
        }
    }
}

/// A relay whose one worker is the flipper fault worker.
fn flipper_relay(name: &str) -> Relay {
    let w = format!(
        "worker_cmd={:?}",
        format!("{} worker flipper", env!("CARGO_BIN_EXE_shmrelay"))
    );
    Relay::start(name, &["--workers", "1", "--set", &w])
}

#[test]
fn worker_rewriting_published_replies_never_unframes_the_stream() {
    let relay = flipper_relay("flip");
    let mut seen = Seen::default();
    let mut closes = 0;
    let end = Instant::now() + Duration::from_secs(20);
    // At least 10,000 replies, and on until the worker got to rewrite some (bounded).
    while (seen.frames < 10_000 || seen.flipped == 0) && Instant::now() < end {
        seen.closed = false;
        one_connection(&relay, &mut seen);
        if seen.closed {
            closes += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("{seen:?}, {closes} connections closed");
    assert!(seen.frames >= 2_000, "too few replies: {seen:?}");
    // The worker really raced the front: some payloads went out with its rewritten bytes...
    assert!(
        seen.flipped > 0,
        "the worker never got to rewrite a reply: {seen:?}"
    );
    // ...and that cost it nothing but its own payload bytes: no quarantine, no close.
    assert_eq!(closes, 0, "connections closed: {seen:?}");
}

/// Issue 14: replies to a pipelined batch come as one coalesced record whose entry headers
/// (lengths, positions) the worker can rewrite too. A worker racing the front on its entry
/// lengths can break only its own connections: every frame a client gets is whole and framed
/// by the front, a broken record closes its connection (counted as a protocol error), and the
/// worker's rings stay in use (no quarantine).
#[test]
fn worker_rewriting_coalesced_entry_lengths_only_closes_its_connections() {
    use std::sync::atomic::Ordering::Relaxed;
    let relay = flipper_relay("fliplen");
    let (mut seen, mut closes) = (Seen::default(), 0);
    let end = Instant::now() + Duration::from_secs(20);
    while (seen.frames < 2_000 || closes < 3) && Instant::now() < end {
        seen.closed = false;
        one_connection_started(&relay, &mut seen, b"flen");
        closes += seen.closed as usize;
    }
    eprintln!("{seen:?}, {closes} connections closed");
    assert!(seen.frames > 0, "no replies: {seen:?}");
    assert!(
        closes > 0,
        "the rewritten lengths were never caught: {seen:?}"
    );
    assert_eq!(seen.flipped, 0, "payload bytes changed: {seen:?}");
    let stats = relay.stats();
    assert!(stats.front(0).protocol_errors.load(Relaxed) > 0);
    assert_eq!(stats.front(0).quarantined.load(Relaxed), 0);
}

/// Issue 12.9 on a length-prefixed listener: a reply longer than a ring record (the default
/// ring holds records of up to 2 MiB) reaches the client as one frame, and the next reply
/// follows it in step.
#[test]
fn a_reply_longer_than_a_ring_record_is_one_frame() {
    let relay = flipper_relay("bigframe");
    let mut c = relay.connect();
    for n in [5_000_000usize, 2 << 20, 100] {
        c.send(format!("big:{n}").as_bytes());
        c.send(b"after");
        let got = c.recv().expect("the long reply");
        assert_eq!(got.len(), n);
        assert!(
            got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
            "reply of {n} bytes differs"
        );
        assert_eq!(
            c.recv().as_deref(),
            Some(&b"after"[..]),
            "the stream shifted"
        );
    }
}

/// The front writing each reply's length prefix itself keeps replies zero-copy: with frames of
/// 4 KiB pipelined 16 deep on 20 connections, the bytes it copies in user space stay under 1%
/// of the bytes relayed (the 4-byte prefixes it builds are not payload copies and not counted).
#[test]
fn four_kib_replies_stay_zero_copy() {
    use std::sync::atomic::Ordering::Relaxed;
    let relay = Relay::start("zerocopy", &["--workers", "1"]);
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let mut c = relay.connect();
            std::thread::spawn(move || {
                let frame = shmrelay_tests::pattern(i, 0, 4096);
                for _ in 0..30 {
                    for _ in 0..16 {
                        c.send(&frame);
                    }
                    for _ in 0..16 {
                        assert_eq!(c.recv().as_deref(), Some(&frame[..]));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = relay.stats();
    let f = stats.front(0);
    // The counters are published after the writes the clients already read: wait for them.
    let want_out = 20 * 30 * 16 * 4100;
    shmrelay_tests::eventually(Duration::from_secs(5), || {
        f.bytes_out.load(Relaxed) >= want_out
    });
    let (inb, out, copied) = (
        f.bytes_in.load(Relaxed),
        f.bytes_out.load(Relaxed),
        f.bytes_copied.load(Relaxed),
    );
    let ratio = copied as f64 / (inb + out) as f64;
    eprintln!(
        "bytes in {inb}, out {out}, copied {copied}: {:.3}%",
        ratio * 100.0
    );
    assert!(out >= want_out, "bytes out {out}");
    assert!(
        ratio < 0.01,
        "copied {:.3}% of the relayed bytes",
        ratio * 100.0
    );
}

/// A worker that dies in the middle of a long reply (after its first piece went out) leaves no
/// client waiting on the rest of a frame: once its replacement is up, the connection is
/// closed (`protocol_error`), and new connections are served by the replacement.
#[test]
fn a_long_reply_broken_off_by_a_crash_closes_its_connection() {
    use std::sync::atomic::Ordering::Relaxed;
    let relay = flipper_relay("bigdie");
    let mut c = relay.connect();
    assert_eq!(c.roundtrip(b"hello").as_deref(), Some(&b"hello"[..]));
    let n = 6_000_000usize;
    c.send(format!("bigdie:{n}").as_bytes());
    c.stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut h = [0u8; 4];
    c.stream.read_exact(&mut h).expect("the reply's header");
    assert_eq!(
        u32::from_be_bytes(h) as usize,
        n,
        "header from the whole length"
    );
    // Part of the body, then the close: never a hang, never more than announced.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let start = Instant::now();
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no close after {got} bytes in {:?}: {e}", start.elapsed()),
        }
    }
    assert!(
        got < n,
        "{got} of {n} bytes: the worker was meant to die mid-reply"
    );
    assert!(
        relay.stats().front(0).protocol_errors.load(Relaxed) >= 1,
        "counted as protocol_error"
    );
    let mut again = relay.connect();
    assert_eq!(again.roundtrip(b"after").as_deref(), Some(&b"after"[..]));
}

/// Every ring a process only reads is mapped read-only in it (the header page aside): the
/// front's view of its reply rings, the worker's view of its request rings. Mappings are told
/// apart by size (a 4 MiB ring is a 4 MiB + 4 KiB mapping) and permissions, whatever the
/// segments are named.
#[test]
fn rings_a_process_only_reads_are_mapped_read_only() {
    use std::sync::atomic::Ordering::Relaxed;
    let relay = Relay::start("romaps", &["--workers", "2"]);
    let mut c = relay.connect();
    assert_eq!(c.roundtrip(b"x").as_deref(), Some(&b"x"[..]));
    let ring_len = (4 << 20) + 4096;
    let count = |pid: u32, perms: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .lines()
            .filter(|l| {
                let mut f = l.split_whitespace();
                let (Some(range), Some(p)) = (f.next(), f.next()) else {
                    return false;
                };
                let (a, b) = range.split_once('-').unwrap();
                let len =
                    usize::from_str_radix(b, 16).unwrap() - usize::from_str_radix(a, 16).unwrap();
                len == ring_len && p == perms
            })
            .count()
    };
    let front = relay.stats().front(0).pid.load(Relaxed);
    // Two workers: two reply rings read-only, two request rings read-write.
    assert_eq!(count(front, "r--s"), 2, "front's reply rings");
    assert_eq!(count(front, "rw-s"), 2, "front's request rings");
    for w in 0..2 {
        let pid = relay.worker_pid(w);
        // One front: its request ring read-only, its reply ring read-write (once attached: the
        // round trip above went to one worker only).
        shmrelay_tests::eventually(Duration::from_secs(5), || {
            count(pid, "r--s") == 1 && count(pid, "rw-s") == 1
        });
        assert_eq!(count(pid, "r--s"), 1, "worker {w}'s request ring");
        assert_eq!(count(pid, "rw-s"), 1, "worker {w}'s reply ring");
    }
}
