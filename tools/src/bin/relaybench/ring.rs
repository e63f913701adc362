//! `relaybench ring`: shm-ring's throughput between two processes against in-process SPSC
//! queues, on the same payloads, in one run (the figures of `shm-ring/README.md` and issue 14).
//!
//! - **shm-ring**: this process produces; the consumer is this binary re-executed as
//!   `relaybench ring --child-plan PLAN` (see [`crate::procs`]), attached to the ring through an
//!   inherited memfd. The producer publishes once per `--batch` records, the consumer releases
//!   once per batch it finds; both park through the ring's own wake protocol when they must.
//! - **rtrb**: two threads of this process, the same length-prefixed bytes through rtrb's chunk
//!   API, `--batch` frames per chunk; both sides spin (rtrb cannot park).
//! - **crossbeam**: two threads of this process, one record per slot of a crossbeam-queue
//!   `ArrayQueue` of fixed-size arrays (so only 64 B and 1 KiB payloads); both sides spin.
//!
//! In every case the consumer reads every payload byte into a checksum and checks each frame's
//! sequence number, and the producer compares frame count and checksum at the end, so a figure
//! is never one of untouched or lost data. The consumer times the window between a MARK frame
//! (after the warm-up) and an END frame. The two sides are pinned to two CPUs unless
//! `--no-pin`; rings live in memfds, so nothing is ever left in /dev/shm, and the child dies
//! with the parent.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use shm_ring::{Consumer, Meta, Producer, ReserveError, RingStorage, ShmRing};

use crate::procs::{self, Children};

#[path = "ring_data.rs"]
mod ring_data;
#[path = "ring_threads.rs"]
mod ring_threads;

use ring_data::{Payload, Report, RxState, TxState};

/// Options of `relaybench ring`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds measured per case (fractions allowed), after a warm-up of a tenth of that
    /// (at most 0.25 s).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Payload sizes, in bytes (suffixes k and m allowed).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64,1k")]
    payloads: Vec<usize>,
    /// Queues to run.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "shm-ring,rtrb,crossbeam"
    )]
    transports: Vec<Transport>,
    /// One JSON object per case and line instead of the table (ratios go to stderr).
    #[arg(long)]
    json: bool,
    /// Bytes of the ring's data area; also rtrb's capacity and crossbeam's (in records).
    #[arg(long, value_parser = parse_size, default_value = "1m")]
    capacity: usize,
    /// Records per publish (shm-ring) and frames per chunk (rtrb).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Do not pin the two sides to two CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Internal: run as the consumer of a shm-ring case with this plan (JSON).
    #[arg(long, hide = true)]
    child_plan: Option<String>,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mul) = match s.strip_suffix("kib").or_else(|| s.strip_suffix('k')) {
        Some(n) => (n, 1 << 10),
        None => match s.strip_suffix("mib").or_else(|| s.strip_suffix('m')) {
            Some(n) => (n, 1 << 20),
            None => (s.as_str(), 1),
        },
    };
    num.trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("not a size: {s:?}"))
}

/// A queue under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    ShmRing,
    Rtrb,
    Crossbeam,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::ShmRing => "shm-ring",
            Transport::Rtrb => "rtrb",
            Transport::Crossbeam => "crossbeam",
        }
    }
}

/// What a case measured.
#[derive(Debug)]
pub struct Outcome {
    pub transport: Transport,
    pub payload: usize,
    pub frames_per_sec: f64,
    /// Payload bytes per second, in GB/s.
    pub gbytes_per_sec: f64,
    /// Shown in the table only.
    pub note: String,
}

/// The `--json` line: exactly these fields.
#[derive(Serialize)]
struct Row {
    transport: &'static str,
    payload: usize,
    frames_per_sec: f64,
    gbytes_per_sec: f64,
}

impl Outcome {
    fn new(transport: Transport, payload: usize, r: &Report, note: String) -> Outcome {
        let fps = r.measured_frames as f64 * 1e9 / r.measured_ns as f64;
        Outcome {
            transport,
            payload,
            frames_per_sec: fps,
            gbytes_per_sec: fps * payload as f64 / 1e9,
            note,
        }
    }

    fn row(&self) -> Row {
        Row {
            transport: self.transport.name(),
            payload: self.payload,
            frames_per_sec: self.frames_per_sec.round(),
            gbytes_per_sec: (self.gbytes_per_sec * 1e4).round() / 1e4,
        }
    }
}

/// Settings shared by every case.
#[derive(Clone, Debug)]
pub struct Config {
    pub warmup: Duration,
    pub measure: Duration,
    /// Extra time before a case is declared hung.
    pub grace: Duration,
    pub capacity: usize,
    pub batch: usize,
    /// (producer CPU, consumer CPU).
    pub cpus: Option<(usize, usize)>,
}

/// A batch (records per publish or release, frames per rtrb chunk) also ends once it holds this
/// fraction of the ring: a producer that filled the whole ring before publishing, or a consumer
/// that read all of it before releasing, would leave the other side idle half the time.
const BATCH_RING_FRACTION: usize = 16;

impl Config {
    /// Frames of `frame_bytes` in one batch: `--batch`, fewer for large frames.
    fn batch_frames(&self, frame_bytes: usize) -> usize {
        self.batch
            .min((self.capacity / BATCH_RING_FRACTION / frame_bytes.max(1)).max(1))
    }
}

/// Warm-up (not counted), then the measured phase, then the deadline of a hung case.
pub struct Clock {
    pub start: Instant,
    pub warm: Duration,
    pub end: Duration,
    pub deadline: Deadline,
}

impl Clock {
    fn start(cfg: &Config) -> Clock {
        let start = Instant::now();
        let end = cfg.warmup + cfg.measure;
        Clock {
            start,
            warm: cfg.warmup,
            end,
            deadline: Deadline(start + end + cfg.grace),
        }
    }
}

/// A point in time after which a case is declared hung.
#[derive(Clone, Copy)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// Errors once the deadline has passed.
    pub fn check(&self, what: &str) -> Result<()> {
        if Instant::now() >= self.0 {
            return Err(anyhow!("timed out {what}"));
        }
        Ok(())
    }
}

pub fn run(args: Args) -> Result<()> {
    if let Some(plan) = &args.child_plan {
        return procs::run_child(plan, shm_consumer);
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds < 1e6) {
        bail!("--seconds must be a positive number");
    }
    if !args.capacity.is_power_of_two() || args.capacity < 4096 {
        bail!("--capacity must be a power of two of at least 4096");
    }
    let max = shm_ring::layout::max_payload(args.capacity);
    if let Some(p) = args.payloads.iter().find(|&&p| p > max) {
        bail!(
            "payload {p} exceeds the largest record a ring of {} bytes takes ({max})",
            args.capacity
        );
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let measure = Duration::from_secs_f64(args.seconds);
    let allowed = allowed_cpus();
    let cpus = if args.no_pin {
        None
    } else {
        match allowed[..] {
            [a, b, ..] => Some((a, b)),
            _ => {
                eprintln!("relaybench ring: fewer than two CPUs available, not pinning");
                None
            }
        }
    };
    let cfg = Config {
        warmup: (measure / 10).min(Duration::from_millis(250)),
        measure,
        grace: Duration::from_secs(30),
        capacity: args.capacity,
        batch: args.batch,
        cpus,
    };
    if let Some((cpu, _)) = cfg.cpus {
        pin_current_thread(cpu)?;
    }
    let mut outcomes = Vec::new();
    for &payload in &args.payloads {
        for &t in &args.transports {
            let what = format!("{} {}", t.name(), fmt_payload(payload));
            if !args.json {
                eprint!("  {what} ... ");
            }
            let out = run_case(&cfg, t, payload).with_context(|| what.clone())?;
            match &out {
                None if args.json => {}
                None => eprintln!("skipped (crossbeam runs 64 B and 1 KiB only)"),
                Some(o) if args.json => println!("{}", serde_json::to_string(&o.row())?),
                Some(_) => eprintln!("done"),
            }
            outcomes.extend(out);
        }
    }
    let ratios = ratios(&outcomes);
    if args.json {
        for line in ratios {
            eprintln!("{line}");
        }
    } else {
        print!("{}", header(&cfg, allowed.len()));
        print!("{}", table(&outcomes));
        println!();
        for line in ratios {
            println!("{line}");
        }
    }
    Ok(())
}

/// Runs one case; `None` if the transport does not take that payload size.
fn run_case(cfg: &Config, t: Transport, payload: usize) -> Result<Option<Outcome>> {
    match t {
        Transport::ShmRing => shm_throughput(cfg, payload).map(Some),
        Transport::Rtrb => ring_threads::rtrb_throughput(cfg, payload).map(Some),
        Transport::Crossbeam => ring_threads::crossbeam_throughput(cfg, payload),
    }
}

// ----- shm-ring between two processes ---------------------------------------------------------

/// Record tags of the throughput run.
const TAG_DATA: u16 = 1;
const TAG_MARK: u16 = 2;
const TAG_END: u16 = 3;
/// How long one blocking wait lasts before the waiter checks its deadline and its peer.
const POLL: Duration = Duration::from_millis(50);

/// What the consumer process is told to do (JSON on its command line).
#[derive(Serialize, Deserialize, Debug, Clone)]
struct ChildPlan {
    /// The ring's memfd, inherited at this number.
    fd: RawFd,
    payload: usize,
    cpu: Option<usize>,
    /// The child gives up after this long.
    limit_secs: f64,
}

type ShmProducer = Producer<Arc<ShmRing>>;

/// Pushes a payload-less control record, waiting for space if need be, and publishes it.
fn shm_control(
    tx: &mut ShmProducer,
    tag: u16,
    child: &mut Children<(), Report>,
    dl: Deadline,
) -> Result<()> {
    loop {
        match tx.push(Meta::tag(tag), &[]) {
            Ok(_) => {
                tx.publish();
                return Ok(());
            }
            Err(ReserveError::Full) => {
                if !tx.wait_for_space(0, Some(POLL))? {
                    child.check_running()?;
                    dl.check("waiting for ring space")?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn shm_throughput(cfg: &Config, len: usize) -> Result<Outcome> {
    let ring = Arc::new(ShmRing::create_memfd("relaybench-tput", cfg.capacity)?);
    // A duplicate without close-on-exec is what the child inherits; ours closes after the spawn.
    let inherited = nix::unistd::dup(ring.fd()).context("dup of the ring's memfd")?;
    let plan = ChildPlan {
        fd: inherited.as_raw_fd(),
        payload: len,
        cpu: cfg.cpus.map(|c| c.1),
        limit_secs: (cfg.warmup + cfg.measure + 2 * cfg.grace).as_secs_f64(),
    };
    let mut child = Children::<(), Report>::spawn("ring", [plan])?;
    drop(inherited);
    child.wait_ready(Instant::now() + Duration::from_secs(10))?;
    child.go()?;
    let mut tx = Producer::new(ring)?;
    let payload = Payload::new(len);
    let mut st = TxState::default();
    let batch = cfg.batch_frames(shm_ring::layout::record_size(len) as usize);
    let clock = Clock::start(cfg);
    let mut marked = false;
    loop {
        // One batch: commit records in place, then make them visible with one store.
        let mut n = 0;
        while n < batch {
            match tx.reserve(len) {
                Ok(mut grant) => {
                    payload.fill(&mut grant, st.seq);
                    grant.commit(len, Meta::tag(TAG_DATA));
                    st.sent(&payload);
                    n += 1;
                }
                Err(ReserveError::Full) => {
                    // Publishes what is committed, spins, then parks until the consumer
                    // releases space.
                    if !tx.wait_for_space(len, Some(POLL))? {
                        child.check_running()?;
                        clock.deadline.check("waiting for ring space")?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        tx.publish();
        let el = clock.start.elapsed();
        if !marked && el >= clock.warm {
            shm_control(&mut tx, TAG_MARK, &mut child, clock.deadline)?;
            marked = true;
        } else if marked && el >= clock.end {
            shm_control(&mut tx, TAG_END, &mut child, clock.deadline)?;
            break;
        }
    }
    let mut report = None;
    child.collect_reports(clock.deadline.0 + cfg.grace, |r| {
        report = Some(r);
        Ok(())
    })?;
    child.finish()?;
    let report = report.ok_or_else(|| anyhow!("the consumer did not report"))?;
    st.check(&report)?;
    let tx_parks = tx.storage().header().producer.parks.load(Ordering::Relaxed);
    let note = format!("parks: consumer {}, producer {}", report.parks, tx_parks);
    Ok(Outcome::new(Transport::ShmRing, len, &report, note))
}

/// The consumer process: attaches to the inherited ring, reports ready, and once told to go
/// reads every record until END; `gate` reports ready and waits for the go.
fn shm_consumer(plan: ChildPlan, gate: &dyn Fn(&()) -> Result<()>) -> Result<Report> {
    if let Some(cpu) = plan.cpu {
        pin_current_thread(cpu)?;
    }
    let dl = Deadline(Instant::now() + Duration::from_secs_f64(plan.limit_secs));
    // SAFETY: the parent made `plan.fd` (a duplicate of the ring's memfd without close-on-exec)
    // for this process and closed its own copy; nothing else in this process owns that number,
    // and it is taken once, here. `open_fd` checks that it holds a ring before mapping it.
    let fd = unsafe { OwnedFd::from_raw_fd(plan.fd) };
    let ring = ShmRing::open_fd(fd, Duration::from_secs(5))?;
    let mut rx = Consumer::new(Arc::new(ring))?;
    gate(&())?;
    let mut st = RxState::new(plan.payload);
    let limit = (rx.capacity() / BATCH_RING_FRACTION) as u64;
    while !st.is_done() {
        // One batch: the published records read in place (up to a sixteenth of the ring),
        // then one release.
        let mut last = None;
        let from = rx.position();
        for rec in rx.records()? {
            let rec = rec?;
            match rec.tag() {
                TAG_DATA => st.on_data(rec.payload())?,
                TAG_MARK => st.on_mark(),
                TAG_END => st.on_end(),
                t => bail!("unexpected record tag {t}"),
            }
            last = Some(rec.end());
            if rec.end() - from >= limit {
                break;
            }
        }
        match last {
            Some(end) => rx.release(end),
            // Spins, then parks on the futex until the producer publishes.
            None => {
                if !rx.wait(Some(POLL))? {
                    dl.check("waiting for records")?;
                }
            }
        }
    }
    let parks = rx.storage().header().consumer.parks.load(Ordering::Relaxed);
    Ok(st.report(parks))
}

// ----- CPUs and output ------------------------------------------------------------------------

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("no CPU {cpu} in a CPU set"))?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

/// The table's title line; `n` CPUs were allowed before this thread was pinned.
fn header(cfg: &Config, n: usize) -> String {
    let cpu = shmrelay::procfs::cpu_model().unwrap_or_else(|| "unknown CPU".into());
    let pin = cfg.cpus.map_or("not pinned".into(), |(a, b)| {
        format!("sides pinned to CPUs {a} and {b}")
    });
    format!(
        "relaybench ring: {n} CPUs ({cpu}), {:.2} s per case after {:.2} s warm-up, capacity {} KiB, \
         batch {}, {pin}\n\n",
        cfg.measure.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.capacity >> 10,
        cfg.batch,
    )
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} K", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_payload(p: usize) -> String {
    if p >= 1024 && p % 1024 == 0 {
        format!("{} KiB", p >> 10)
    } else {
        format!("{p} B")
    }
}

fn table(outcomes: &[Outcome]) -> String {
    let line = |t: &str, p: &str, f: &str, g: &str, n: &str| {
        format!("{t:<10} {p:>8} {f:>10} {g:>7}  {n}\n")
    };
    let mut s = line("transport", "payload", "frames/s", "GB/s", "note");
    for o in outcomes {
        s += &line(
            o.transport.name(),
            &fmt_payload(o.payload),
            &fmt_rate(o.frames_per_sec),
            &format!("{:.2}", o.gbytes_per_sec),
            &o.note,
        );
    }
    s
}

/// shm-ring's throughput over each baseline's, by payload, with the targets of issue 14
/// (at least 1.3x rtrb at 64 B and 1x at 1 KiB).
fn ratios(outcomes: &[Outcome]) -> Vec<String> {
    let fps = |t: Transport, p: usize| {
        outcomes
            .iter()
            .find(|o| o.transport == t && o.payload == p)
            .map(|o| o.frames_per_sec)
    };
    let mut lines = vec!["ratios in this run (targets from issue 14):".to_owned()];
    for o in outcomes
        .iter()
        .filter(|o| o.transport == Transport::ShmRing)
    {
        let p = o.payload;
        for base in [Transport::Rtrb, Transport::Crossbeam] {
            let Some(b) = fps(base, p) else { continue };
            let r = o.frames_per_sec / b;
            let target = match (base, p) {
                (Transport::Rtrb, 64) => Some(1.3),
                (Transport::Rtrb, 1024) => Some(1.0),
                _ => None,
            };
            let goal = target.map_or(String::new(), |g| {
                let verdict = if r >= g { "met" } else { "MISSED" };
                format!("  (target >= {g}x: {verdict})")
            });
            lines.push(format!(
                "  {:<7} shm-ring / {:<9} = {r:>6.2}x{goal}",
                fmt_payload(p),
                base.name()
            ));
        }
    }
    if lines.len() == 1 {
        lines.push("  (none: shm-ring and a baseline were not both run)".into());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Config {
        Config {
            warmup: Duration::from_millis(20),
            measure: Duration::from_millis(100),
            grace: Duration::from_secs(20),
            capacity: 1 << 16,
            batch: 16,
            cpus: None,
        }
    }

    /// The in-process queues move checked frames (shm-ring needs the relaybench binary as its
    /// child: `tools/tests/ring.rs` runs it).
    #[test]
    fn in_process_queues_move_checked_frames() {
        let cfg = quick();
        // 20000-byte frames wrap rtrb's 64 KiB with a split frame every few frames.
        for payload in [0, 5, 64, 1024, 20_000] {
            let o = ring_threads::rtrb_throughput(&cfg, payload).unwrap();
            assert!(o.frames_per_sec > 0.0, "{o:?}");
        }
        for payload in [64, 1024] {
            let o = ring_threads::crossbeam_throughput(&cfg, payload)
                .unwrap()
                .unwrap();
            assert!(o.frames_per_sec > 0.0, "{o:?}");
        }
        assert!(ring_threads::crossbeam_throughput(&cfg, 100)
            .unwrap()
            .is_none());
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn ratios_name_missed_targets() {
        let o = |transport, payload, fps: f64| Outcome {
            transport,
            payload,
            frames_per_sec: fps,
            gbytes_per_sec: fps * payload as f64 / 1e9,
            note: String::new(),
        };
        let text = ratios(&[
            o(Transport::ShmRing, 64, 20e6),
            o(Transport::Rtrb, 64, 10e6),
            o(Transport::Crossbeam, 64, 40e6),
            o(Transport::ShmRing, 1024, 5e6),
            o(Transport::Rtrb, 1024, 10e6),
        ])
        .join("\n");
        assert!(
            text.contains("64 B    shm-ring / rtrb      =   2.00x  (target >= 1.3x: met)"),
            "{text}"
        );
        assert!(
            text.contains("64 B    shm-ring / crossbeam =   0.50x"),
            "{text}"
        );
        assert!(
            text.contains("1 KiB   shm-ring / rtrb      =   0.50x  (target >= 1x: MISSED)"),
            "{text}"
        );
    }

    #[test]
    fn json_rows_have_exactly_the_documented_fields() {
        let r = Report {
            measured_frames: 1000,
            measured_ns: 1_000_000,
            ..Report::default()
        };
        let o = Outcome::new(Transport::ShmRing, 64, &r, "not in json".into());
        let v: serde_json::Value = serde_json::to_value(o.row()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["frames_per_sec", "gbytes_per_sec", "payload", "transport"]
        );
        assert_eq!(v["transport"], "shm-ring");
        assert_eq!(v["frames_per_sec"], 1e6);
    }
}
