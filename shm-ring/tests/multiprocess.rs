//! The ring between real processes.
//!
//! Each test is a parent that creates a named segment under /dev/shm and spawns helper
//! processes by re-running this test binary (`std::env::current_exe()`) on the single test
//! `child_process_entry`, with the role in environment variables (the trick servo's ipc-channel
//! uses for its cross-process tests). Outside such a child that test does nothing. The parent
//! keeps a watchdog: a child still running at the deadline is killed and the test fails; the
//! children are killed and the segment removed whatever happens.
//!
//! Both sides block in the futex paths (`Consumer::wait(None)`, `Producer::wait_for_space(None)`)
//! without timeouts, so a lost wakeup shows up as a hang the watchdog turns into a failure.
//!
//! Records are numbered; the length, metadata and every payload byte of record `seq` are a
//! function of `(seed, seq)` (SplitMix64), so a consumer checks each one, and the order, without
//! being told anything else.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shm_ring::layout::max_payload;
use shm_ring::{Consumer, Meta, Producer, ReserveError, RingSnapshot, RingView, ShmRing};

/// A small ring: records of up to 8168 bytes, so the largest record is half of it, the ring
/// wraps every ~80 records and fills up whenever the consumer falls a little behind.
const CAPACITY: usize = 16 * 1024;
const MAX: usize = max_payload(CAPACITY);
const SEED: u64 = 0x5EED_0F5A_F3C0_DE01;

// Environment of a child process.
const ROLE: &str = "SHM_RING_MP_ROLE";
const PATH: &str = "SHM_RING_MP_PATH";
const FROM: &str = "SHM_RING_MP_FROM";
const TO: &str = "SHM_RING_MP_TO";
const DIE_AT: &str = "SHM_RING_MP_DIE_AT";
const PAUSE_EVERY: &str = "SHM_RING_MP_PAUSE_EVERY";

// User words of the ring header the children use to tell each other (and the parent) things.
/// Consumer: the sequence number of the next record after its last release.
const W_RELEASED_SEQ: usize = 0;
/// Consumer: records it read (and checked) after its last release, when it died.
const W_UNRELEASED: usize = 1;
/// Consumer: records it received in total; producer: records it published.
const W_CONSUMED: usize = 2;
const W_PRODUCED: usize = 3;

// ------------------------------------------------------------------------------------------
// What record `seq` is.

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn hash(seq: u64) -> u64 {
    mix(SEED ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// Payload length of record `seq`: mostly small, so ten million records stay around 2 GB, but
/// every length from 0 to the maximum occurs, and 0 and the maximum occur often.
fn len_of(seq: u64) -> usize {
    let h = hash(seq);
    let r = (h >> 40) % 1000;
    match r {
        0 => MAX,
        1..=20 => 0,
        21..=30 => ((h >> 8) % (MAX as u64 + 1)) as usize,
        31..=33 => MAX - ((h >> 8) % 16) as usize,
        _ => ((h >> 8) % 257) as usize,
    }
}

fn meta_of(seq: u64) -> Meta {
    let h = hash(seq);
    Meta::tag((seq % 0xFFFF) as u16)
        .flags((h >> 48) as u16)
        .conn(seq)
        .aux(h)
}

#[inline(always)]
fn word(h: u64, k: u64) -> u64 {
    h ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn fill(seq: u64, buf: &mut [u8]) {
    let h = hash(seq);
    // SAFETY: u64 has no invalid bit patterns; align_to_mut handles any alignment.
    let (head, words, tail) = unsafe { buf.align_to_mut::<u64>() };
    assert!(head.is_empty(), "payloads are 8-aligned");
    for (k, w) in words.iter_mut().enumerate() {
        *w = word(h, k as u64).to_le();
    }
    let n = tail.len();
    tail.copy_from_slice(&word(h, words.len() as u64).to_le_bytes()[..n]);
}

/// Index of the first wrong byte of record `seq`'s payload, if any.
fn check_payload(seq: u64, buf: &[u8]) -> Option<usize> {
    let h = hash(seq);
    // SAFETY: as in `fill`.
    let (head, words, tail) = unsafe { buf.align_to::<u64>() };
    assert!(head.is_empty(), "payloads are 8-aligned");
    let mut bad = 0u64;
    for (k, &w) in words.iter().enumerate() {
        bad |= w ^ word(h, k as u64).to_le();
    }
    let k = words.len();
    if bad != 0 {
        return words
            .iter()
            .enumerate()
            .position(|(i, &w)| w != word(h, i as u64).to_le())
            .map(|i| i * 8);
    }
    (tail != &word(h, k as u64).to_le_bytes()[..tail.len()]).then_some(k * 8)
}

// ------------------------------------------------------------------------------------------
// The child processes.

/// Entry point of every helper process; does nothing in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    // Never outlive the parent test (it kills us on failure, but not if it is killed itself).
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let var = |k: &str| std::env::var(k).ok().map(|v| v.parse::<u64>().unwrap());
    let path = PathBuf::from(std::env::var(PATH).unwrap());
    let ring = Arc::new(ShmRing::open_path(&path, Duration::from_secs(5)).unwrap());
    let to = var(TO).unwrap();
    let die_at = var(DIE_AT);
    let pause_every = var(PAUSE_EVERY).unwrap_or(0);
    match role.as_str() {
        "producer" => produce(ring, var(FROM).unwrap(), to, die_at, pause_every),
        "consumer" => {
            // A replacement consumer starts where its predecessor released.
            let from = var(FROM).unwrap_or_else(|| ring.user_words()[W_RELEASED_SEQ].load(Relaxed));
            consume(ring, from, to, die_at, pause_every)
        }
        r => panic!("unknown role {r}"),
    }
}

/// User and system CPU time of this process so far.
fn cpu_time() -> String {
    // SAFETY: getrusage fills a zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    format!(
        "cpu {:.2}s user {:.2}s sys",
        secs(ru.ru_utime),
        secs(ru.ru_stime)
    )
}

fn die() -> ! {
    // SAFETY: plain syscalls; SIGKILL cannot be caught, so this does not return.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!()
}

/// Publishes records `from..to`. With `die_at`, publishes those before it, then commits one
/// more record without publishing it, reserves space for another and scribbles over it, and
/// dies there by SIGKILL.
fn produce(ring: Arc<ShmRing>, from: u64, to: u64, die_at: Option<u64>, pause_every: u64) {
    let mut tx = Producer::new(ring.clone()).unwrap();
    let words = ring.user_words();
    let end = die_at.unwrap_or(to);
    let mut seq = from;
    let mut batch = 0;
    let mut next_pause = if pause_every > 0 {
        from + pause_every / 2
    } else {
        u64::MAX
    };
    while seq < end {
        let len = len_of(seq);
        let h = hash(seq);
        let res = if h & 7 == 0 {
            // Reserve more than needed and commit less.
            tx.reserve_up_to(len, len + (h >> 3) as usize % 512)
        } else {
            tx.reserve(len)
        };
        match res {
            Ok(mut g) => {
                assert!(g.len() >= len);
                fill(seq, &mut g[..len]);
                g.commit(len, meta_of(seq));
                seq += 1;
                batch += 1;
                // Batches of 1 to 16 records per publish.
                if batch > (h >> 20) % 16 {
                    tx.publish();
                    batch = 0;
                }
            }
            Err(ReserveError::Full) => {
                // Publishes, spins, then parks on the futex until the consumer releases.
                tx.wait_for_space(len, None).unwrap();
            }
            Err(e) => panic!("producer: {e}"),
        }
        if seq >= next_pause {
            // Leave the consumer nothing to do for a moment: it parks.
            next_pause += pause_every;
            tx.publish();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    tx.publish();
    words[W_PRODUCED].store(seq, Relaxed);
    if die_at.is_none() {
        eprintln!("producer: {} records, {}", seq - from, cpu_time());
    }
    if die_at.is_some() {
        // Committed, never published.
        let junk = Meta::tag(0xBAD).conn(u64::MAX).aux(u64::MAX);
        while tx.push(junk, &[0xEE; 100]).is_err() {
            tx.wait_for_space(100, None).unwrap();
        }
        // Reserved and written, never committed.
        loop {
            match tx.reserve_up_to(1, MAX) {
                Ok(mut g) => {
                    g.fill(0xEE);
                    // A plausible record header inside the grant, too.
                    g[..8].copy_from_slice(&16u32.to_ne_bytes().repeat(2));
                    die();
                }
                Err(ReserveError::Full) => {
                    // Must not publish the junk record: wait without `wait_for_space`.
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => panic!("producer: {e}"),
            }
        }
    }
}

/// Receives records `from..to`, checking each. With `die_at`, once it has released past
/// `die_at` it reads one more batch without releasing it and dies there by SIGKILL.
fn consume(ring: Arc<ShmRing>, from: u64, to: u64, die_at: Option<u64>, pause_every: u64) {
    let mut rx = Consumer::new(ring.clone()).unwrap();
    let words = ring.user_words();
    let mut next = from;
    let mut released_seq = from;
    let mut round = 0u64;
    let mut bytes = 0u64;
    let mut next_pause = if pause_every > 0 {
        from + pause_every
    } else {
        u64::MAX
    };
    while next < to {
        round += 1;
        // Take 1 to 64 records per round; the rest are read again next round.
        let limit = 1 + mix(round) % 64;
        let dying = die_at.is_some_and(|d| released_seq >= d);
        let mut end = None;
        for rec in rx.records().unwrap() {
            let rec = rec.unwrap_or_else(|e| panic!("consumer at record {next}: {e}"));
            let want = meta_of(next);
            let got = Meta {
                tag: rec.tag(),
                flags: rec.flags(),
                conn: rec.conn(),
                aux: rec.aux(),
            };
            assert_eq!(got, want, "record {next}: header");
            assert_eq!(rec.payload().len(), len_of(next), "record {next}: length");
            if let Some(i) = check_payload(next, rec.payload()) {
                panic!(
                    "record {next}: byte {i} of {} is wrong",
                    rec.payload().len()
                );
            }
            bytes += rec.payload().len() as u64;
            next += 1;
            end = Some(rec.end());
            if next - released_seq >= limit || next == to {
                break;
            }
        }
        match end {
            Some(_) if dying => {
                words[W_UNRELEASED].store(next - released_seq, Relaxed);
                die();
            }
            Some(end) => {
                rx.release(end);
                released_seq = next;
                words[W_RELEASED_SEQ].store(released_seq, Relaxed);
            }
            None => {
                // Spins, then parks on the futex until the producer publishes.
                rx.wait(None).unwrap();
            }
        }
        if next >= next_pause {
            // Fall behind for a moment: the producer fills the ring and parks.
            next_pause += pause_every;
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    words[W_CONSUMED].store(next - from, Relaxed);
    eprintln!(
        "consumer: {} records, {} payload bytes, {}",
        next - from,
        bytes,
        cpu_time()
    );
}

// ------------------------------------------------------------------------------------------
// The parent side.

/// One multi-process test at a time: they would only fight for the two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// The segment and the children of one test; kills and reaps the children and removes the
/// segment on drop, so a failing test leaves nothing behind.
struct Harness {
    path: PathBuf,
    ring: Option<Arc<ShmRing>>,
    children: Vec<(&'static str, Child)>,
    deadline: Instant,
}

impl Harness {
    fn new(name: &str, timeout: Duration) -> Harness {
        let path = PathBuf::from(format!(
            "/dev/shm/shm-ring-mp-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let ring = Arc::new(ShmRing::create_at(&path, CAPACITY).unwrap());
        Harness {
            path,
            ring: Some(ring),
            children: Vec::new(),
            deadline: Instant::now() + timeout,
        }
    }

    fn spawn(&mut self, name: &'static str, role: &str, env: &[(&str, u64)]) {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "child_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(PATH, &self.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v.to_string());
        }
        self.children.push((name, cmd.spawn().unwrap()));
    }

    /// Waits for the child `name` to exit, failing the test at the deadline.
    fn wait(&mut self, name: &str) -> ExitStatus {
        let i = self.children.iter().position(|(n, _)| *n == name).unwrap();
        loop {
            if let Some(status) = self.children[i].1.try_wait().unwrap() {
                self.children.remove(i);
                return status;
            }
            // Fail fast if another child crashed.
            for (n, c) in &mut self.children {
                if let Some(s) = c.try_wait().unwrap() {
                    assert!(s.success(), "{n} failed while waiting for {name}: {s}");
                }
            }
            assert!(
                Instant::now() < self.deadline,
                "watchdog: {name} still running at the deadline"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn snapshot(&self) -> RingSnapshot {
        RingView::open(&self.path).unwrap().snapshot()
    }

    fn word(&self, i: usize) -> u64 {
        self.ring.as_ref().unwrap().user_words()[i].load(Relaxed)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.ring = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn killed(status: ExitStatus) -> bool {
    status.signal() == Some(libc::SIGKILL)
}

fn assert_segment_gone(path: &Path) {
    assert!(!path.exists(), "{} left behind", path.display());
}

/// Ten million records of random lengths (0 to the largest the ring allows), producer process
/// to consumer process, through a 16 KiB ring; every byte and the order checked by the
/// consumer, the totals by the parent from the ring's counters.
#[test]
fn ten_million_records_between_two_processes() {
    const N: u64 = 10_000_000;
    let _serial = lock();
    let started = Instant::now();
    let mut h = Harness::new("bulk", Duration::from_secs(150));
    h.spawn(
        "consumer",
        "consumer",
        &[(FROM, 0), (TO, N), (PAUSE_EVERY, 1_000_000)],
    );
    h.spawn(
        "producer",
        "producer",
        &[(FROM, 0), (TO, N), (PAUSE_EVERY, 1_000_000)],
    );
    let p = h.wait("producer");
    assert!(p.success(), "producer: {p}");
    let c = h.wait("consumer");
    assert!(c.success(), "consumer: {c}");

    let s = h.snapshot();
    let expected_bytes: u64 = (0..N).map(|seq| len_of(seq) as u64).sum();
    eprintln!(
        "bulk: {N} records, {expected_bytes} payload bytes in {:?}; {s:?}",
        started.elapsed()
    );
    assert_eq!(h.word(W_PRODUCED), N);
    assert_eq!(h.word(W_CONSUMED), N);
    assert_eq!((s.producer.records, s.consumer.records), (N, N));
    assert_eq!(
        (s.producer.bytes, s.consumer.bytes),
        (expected_bytes, expected_bytes)
    );
    assert_eq!(s.head, s.tail);
    assert!(
        s.tail > 1000 * CAPACITY as u64,
        "the ring wrapped only {} times",
        s.tail / CAPACITY as u64
    );
    // Both sides really parked and were woken across processes, and the ring was full.
    assert!(s.producer.full_events > 0, "{s:?}");
    assert!(s.producer.parks > 0 && s.consumer.wakeups_sent > 0, "{s:?}");
    assert!(s.consumer.parks > 0 && s.producer.wakeups_sent > 0, "{s:?}");
    // Both sides detached cleanly.
    assert_eq!((s.producer.pid, s.consumer.pid), (0, 0));
    let path = h.path.clone();
    drop(h);
    assert_segment_gone(&path);
    // The length distribution covered its corners.
    assert!((0..N).any(|s| len_of(s) == 0) && (0..N).any(|s| len_of(s) == MAX));
}

/// A consumer dies (SIGKILL) holding a batch it read but did not release; a new consumer
/// process attaches and continues from the released position: it gets every record after the
/// last release exactly once, in order, starting with the ones the dead one had read.
#[test]
fn consumer_dies_and_a_new_one_continues_from_the_released_position() {
    const N: u64 = 400_000;
    const DIE_AT: u64 = 150_000;
    let _serial = lock();
    let mut h = Harness::new("consumer-dies", Duration::from_secs(60));
    h.spawn("producer", "producer", &[(FROM, 0), (TO, N)]);
    h.spawn(
        "consumer 1",
        "consumer",
        &[(FROM, 0), (TO, N), (self::DIE_AT, DIE_AT)],
    );
    let c1 = h.wait("consumer 1");
    assert!(killed(c1), "consumer 1 should have died by SIGKILL: {c1}");
    let released = h.word(W_RELEASED_SEQ);
    let unreleased = h.word(W_UNRELEASED);
    let head = h.snapshot().head;
    eprintln!(
        "consumer 1 died after releasing {released} records (head {head}), holding {unreleased}"
    );
    assert!(released >= DIE_AT && unreleased >= 1);

    // The replacement reads its starting sequence number from the ring's user word and checks
    // that the first record at the released position carries it.
    h.spawn("consumer 2", "consumer", &[(TO, N)]);
    let p = h.wait("producer");
    assert!(p.success(), "producer: {p}");
    let c2 = h.wait("consumer 2");
    assert!(c2.success(), "consumer 2: {c2}");
    assert_eq!(h.word(W_CONSUMED), N - released);

    let s = h.snapshot();
    // Counted once each across the two consumers: the first counted what it released.
    assert_eq!(s.consumer.records, N);
    assert_eq!(s.producer.records, N);
    assert_eq!(s.consumer.attach_count, 2);
    assert_eq!(s.head, s.tail);
}

/// A producer dies (SIGKILL) after committing a record it never published and while holding a
/// reservation it scribbled over; a new producer process continues from the published
/// position, and the consumer, which runs throughout, sees every record once and no junk.
#[test]
fn producer_dies_mid_reservation_and_a_new_one_continues() {
    const N: u64 = 400_000;
    const DIE_AT: u64 = 150_000;
    let _serial = lock();
    let mut h = Harness::new("producer-dies", Duration::from_secs(60));
    h.spawn("consumer", "consumer", &[(FROM, 0), (TO, N)]);
    h.spawn(
        "producer 1",
        "producer",
        &[(FROM, 0), (TO, N), (self::DIE_AT, DIE_AT)],
    );
    let p1 = h.wait("producer 1");
    assert!(killed(p1), "producer 1 should have died by SIGKILL: {p1}");
    assert_eq!(h.word(W_PRODUCED), DIE_AT);
    let s = h.snapshot();
    // The counters are stored at publish: the unpublished commit is not in them.
    assert_eq!(s.producer.records, DIE_AT);
    assert!(s.tail <= s.head + CAPACITY as u64);

    h.spawn("producer 2", "producer", &[(FROM, DIE_AT), (TO, N)]);
    let p2 = h.wait("producer 2");
    assert!(p2.success(), "producer 2: {p2}");
    let c = h.wait("consumer");
    assert!(c.success(), "consumer: {c}");
    assert_eq!(h.word(W_CONSUMED), N);
    let s = h.snapshot();
    assert_eq!((s.producer.records, s.consumer.records), (N, N));
    assert_eq!(s.producer.attach_count, 2);
    assert_eq!(s.head, s.tail);
}
