//! `relaybench ring`: shm-ring between two processes against in-process SPSC queues and a raw
//! futex ping-pong, on the same payloads, in one run of several alternating rounds (the
//! figures of `shm-ring/README.md` and issue 14).
//!
//! Throughput cases:
//! - **shm-ring**: this process produces; the consumer is this binary re-executed as
//!   `relaybench ring --child-plan PLAN` (see [`crate::procs`]), attached to the ring through an
//!   inherited memfd. The producer publishes once per `--batch` records, the consumer releases
//!   once per batch it finds; both park through the ring's own wake protocol when they must.
//! - **rtrb**: two threads of this process, the same length-prefixed bytes through rtrb's chunk
//!   API, `--batch` frames per chunk; both sides spin (rtrb cannot park).
//! - **crossbeam**: two threads of this process, one record per slot of a crossbeam-queue
//!   `ArrayQueue` of fixed-size arrays (so only 64 B and 1 KiB payloads); both sides spin.
//!
//! Round-trip cases (one frame ping-ponged, every reply checked; p50 and p99):
//! - **shm-ring spin**: a request ring and a reply ring between two processes, both sides
//!   polling the tail;
//! - **shm-ring park**: the same, both sides sleeping at once on every hop through the ring's
//!   park protocol (announce, fence, re-check, futex on the sleep word): `Consumer::wait`
//!   without its spin phase, which in a ping-pong would catch the reply and hide the wake-up;
//! - **rtrb spin**: two threads of this process (rtrb cannot park);
//! - **futex park**: two processes waking each other through `FUTEX_WAIT`/`FUTEX_WAKE` on two
//!   words of a shared memfd, no payload: the floor of a parked wake-up.
//!
//! In every case the receiver reads every payload byte into a checksum and checks each frame's
//! sequence number, so a figure is never one of untouched or lost data. Each case runs
//! `--runs` times, the cases alternating (in reverse order every other round, so a drift of
//! the machine's load hits both sides of a ratio alike); the table gives per-case medians and
//! the ratios are medians of the per-round ratios. The two sides are pinned to two CPUs
//! unless `--no-pin`; rings live in memfds, so nothing is ever left in /dev/shm, and children
//! die with the parent.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use crate::procs;

#[path = "ring_case.rs"]
mod ring_case;
#[path = "ring_data.rs"]
mod ring_data;
#[path = "ring_report.rs"]
mod ring_report;
#[path = "ring_shm.rs"]
mod ring_shm;
#[path = "ring_threads.rs"]
mod ring_threads;

pub use ring_case::{Case, Mode, ModeArg, Outcome, ProducerApi, Transport};

/// Options of `relaybench ring`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds measured per case and round (fractions allowed), after a warm-up of a tenth of
    /// that (at most 0.25 s).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Rounds: every case runs this many times, alternating with the others; figures are
    /// medians over the rounds.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Payload sizes of the throughput cases, in bytes (suffixes k and m allowed).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64,1k")]
    payloads: Vec<usize>,
    /// Payload size of the round-trip cases (the futex ping-pong carries none).
    #[arg(long, value_parser = parse_size, default_value = "64")]
    rtt_payload: usize,
    /// Transports to run.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "shm-ring,rtrb,crossbeam,futex"
    )]
    transports: Vec<Transport>,
    /// Kinds of cases to run.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "throughput,rtt"
    )]
    modes: Vec<ModeArg>,
    /// One JSON object per case and line instead of the table (ratios go to stderr).
    #[arg(long)]
    json: bool,
    /// Bytes of the ring's data area; also rtrb's capacity and crossbeam's (in records).
    #[arg(long, value_parser = parse_size, default_value = "1m")]
    capacity: usize,
    /// Records per publish (shm-ring) and frames per chunk (rtrb).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// How the shm-ring producers write records: `grant` (`reserve` + `commit`, as a `readv`
    /// into the ring does) or `push-with` (the closure API).
    #[arg(long, value_enum, default_value = "grant")]
    api: ProducerApi,
    /// Do not pin the two sides to two CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Internal: run as the child side of a shm-ring or futex case with this plan (JSON).
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

/// Settings shared by every case.
#[derive(Clone, Debug)]
pub struct Config {
    pub warmup: Duration,
    pub measure: Duration,
    /// Extra time before a case is declared hung.
    pub grace: Duration,
    pub capacity: usize,
    pub batch: usize,
    pub api: ProducerApi,
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

    /// Runs `round_trip(seq)` for `seq` = 0, 1, ... until the measured phase is over and at
    /// least [`ring_data::MIN_RTT_SAMPLES`] were taken, timing every round trip that starts
    /// after the warm-up. Returns the samples and the number of round trips.
    fn ping_pong(
        &self,
        mut round_trip: impl FnMut(u64) -> Result<()>,
    ) -> Result<(ring_data::RttSamples, u64)> {
        let mut samples = ring_data::RttSamples::new();
        let mut seq = 0;
        loop {
            let t0 = Instant::now();
            let since = t0 - self.start;
            if since >= self.end && samples.len() >= ring_data::MIN_RTT_SAMPLES {
                return Ok((samples, seq));
            }
            round_trip(seq)?;
            if since >= self.warm {
                samples.record(t0);
            }
            seq += 1;
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
        return procs::run_child(plan, ring_shm::child);
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds < 1e6) {
        bail!("--seconds must be a positive number");
    }
    if !args.capacity.is_power_of_two() || args.capacity < 4096 {
        bail!("--capacity must be a power of two of at least 4096");
    }
    let max = shm_ring::layout::max_payload(args.capacity);
    let sizes = args.payloads.iter().chain([&args.rtt_payload]);
    if let Some(p) = sizes.into_iter().find(|&&p| p > max) {
        bail!(
            "payload {p} exceeds the largest record a ring of {} bytes takes ({max})",
            args.capacity
        );
    }
    if args.batch == 0 || args.runs == 0 {
        bail!("--batch and --runs must be at least 1");
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
        api: args.api,
        cpus,
    };
    if let Some((cpu, _)) = cfg.cpus {
        pin_current_thread(cpu)?;
    }
    let cases = plan(&args);
    if cases.is_empty() {
        bail!("no case left to run with these --transports and --modes");
    }
    let load_before = shmrelay::procfs::load_average();
    let mut rounds: Vec<Vec<Outcome>> = Vec::new();
    for round in 0..args.runs {
        let mut order: Vec<usize> = (0..cases.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut outcomes = vec![None; cases.len()];
        for i in order {
            let what = ring_report::describe(&cases[i]);
            if !args.json {
                eprint!("  round {}/{}: {what} ... ", round + 1, args.runs);
            }
            let out = run_case(&cfg, cases[i]).with_context(|| what.clone())?;
            if !args.json {
                eprintln!("{}", ring_report::brief(&out));
            }
            outcomes[i] = Some(out);
        }
        rounds.push(outcomes.into_iter().flatten().collect());
    }
    let load_after = shmrelay::procfs::load_average();
    let summary = ring_report::Summary::new(&rounds);
    let ratios = summary.ratio_lines();
    let load = ring_report::load_line(load_before, load_after);
    if args.json {
        for row in summary.rows() {
            println!("{}", serde_json::to_string(&row)?);
        }
        eprintln!("{load}");
        for line in ratios {
            eprintln!("{line}");
        }
    } else {
        print!("{}", ring_report::header(&cfg, allowed.len(), args.runs));
        println!("{load}\n");
        print!("{}", summary.table());
        println!();
        for line in ratios {
            println!("{line}");
        }
    }
    Ok(())
}

/// The cases `args` select, in the order of a round.
fn plan(args: &Args) -> Vec<Case> {
    let has = |t| args.transports.contains(&t);
    let mut cases = Vec::new();
    if args.modes.contains(&ModeArg::Throughput) {
        for &payload in &args.payloads {
            for t in [Transport::ShmRing, Transport::Rtrb, Transport::Crossbeam] {
                // crossbeam's slots hold fixed-size arrays of these two sizes only.
                if has(t) && (t != Transport::Crossbeam || matches!(payload, 64 | 1024)) {
                    cases.push(Case {
                        transport: t,
                        mode: Mode::Throughput,
                        payload,
                    });
                }
            }
        }
    }
    if args.modes.contains(&ModeArg::Rtt) {
        let p = args.rtt_payload;
        let rtt = [
            (Transport::ShmRing, Mode::RttSpin, p),
            (Transport::Rtrb, Mode::RttSpin, p),
            (Transport::ShmRing, Mode::RttPark, p),
            (Transport::Futex, Mode::RttPark, 0),
        ];
        for (transport, mode, payload) in rtt {
            if has(transport) {
                cases.push(Case {
                    transport,
                    mode,
                    payload,
                });
            }
        }
    }
    cases
}

/// Runs one case once.
fn run_case(cfg: &Config, case: Case) -> Result<Outcome> {
    match (case.transport, case.mode) {
        (Transport::ShmRing, Mode::Throughput) => ring_shm::throughput(cfg, case),
        (Transport::ShmRing, _) => ring_shm::rtt(cfg, case),
        (Transport::Futex, _) => ring_shm::futex_rtt(cfg, case),
        (Transport::Rtrb, Mode::Throughput) => ring_threads::rtrb_throughput(cfg, case),
        (Transport::Rtrb, _) => ring_threads::rtrb_rtt(cfg, case),
        (Transport::Crossbeam, _) => ring_threads::crossbeam_throughput(cfg, case),
    }
}

// ----- CPUs -----------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn quick() -> Config {
        Config {
            warmup: Duration::from_millis(20),
            measure: Duration::from_millis(100),
            grace: Duration::from_secs(20),
            capacity: 1 << 16,
            batch: 16,
            api: ProducerApi::Grant,
            cpus: None,
        }
    }

    fn case(transport: Transport, mode: Mode, payload: usize) -> Case {
        Case {
            transport,
            mode,
            payload,
        }
    }

    /// The in-process queues move checked frames (the shm-ring and futex cases need the
    /// relaybench binary as their child: `tools/tests/ring.rs` runs them).
    #[test]
    fn in_process_queues_move_checked_frames() {
        let cfg = quick();
        // 20000-byte frames wrap rtrb's 64 KiB with a split frame every few frames.
        for payload in [0, 5, 64, 1024, 20_000] {
            let c = case(Transport::Rtrb, Mode::Throughput, payload);
            let o = ring_threads::rtrb_throughput(&cfg, c).unwrap();
            assert!(o.frames_per_sec.unwrap() > 0.0, "{o:?}");
        }
        for payload in [64, 1024] {
            let c = case(Transport::Crossbeam, Mode::Throughput, payload);
            let o = ring_threads::crossbeam_throughput(&cfg, c).unwrap();
            assert!(o.frames_per_sec.unwrap() > 0.0, "{o:?}");
        }
        let c = case(Transport::Crossbeam, Mode::Throughput, 100);
        assert!(ring_threads::crossbeam_throughput(&cfg, c).is_err());
        for payload in [0, 64, 5000] {
            let o = ring_threads::rtrb_rtt(&cfg, case(Transport::Rtrb, Mode::RttSpin, payload))
                .unwrap();
            let (p50, p99) = (o.rtt_p50_ns.unwrap(), o.rtt_p99_ns.unwrap());
            assert!(p50 > 0 && p50 <= p99, "{o:?}");
        }
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
    fn the_plan_follows_transports_and_modes() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let plan_of = |argv: &[&str]| {
            let cli = Cli::parse_from(std::iter::once("ring").chain(argv.iter().copied()));
            plan(&cli.args)
        };
        let all = plan_of(&[]);
        assert_eq!(all.len(), 6 + 4, "{all:?}");
        assert!(all.contains(&case(Transport::Futex, Mode::RttPark, 0)));
        assert!(all.contains(&case(Transport::ShmRing, Mode::RttSpin, 64)));
        let some = plan_of(&["--modes", "rtt", "--transports", "shm-ring,futex"]);
        assert_eq!(
            some,
            [
                case(Transport::ShmRing, Mode::RttSpin, 64),
                case(Transport::ShmRing, Mode::RttPark, 64),
                case(Transport::Futex, Mode::RttPark, 0),
            ]
        );
        // crossbeam runs 64 B and 1 KiB only.
        let odd = plan_of(&["--payloads", "100", "--modes", "throughput"]);
        assert_eq!(odd.len(), 2, "{odd:?}");
    }
}
