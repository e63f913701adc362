//! `relaybench ring`: shm-ring against rtrb, a Unix socket pair, a pipe and a raw futex
//! ping-pong, in one run, on the same payloads.
//!
//! - **throughput**: a producer sends frames for `--seconds` (after a short warm-up); the
//!   consumer reads every payload byte into a checksum and checks each frame's sequence number,
//!   and the sender compares frame count and checksum at the end, so a figure is never one of
//!   untouched or lost data. shm-ring publishes once per `--batch` records and the consumer
//!   releases once per batch it finds; rtrb moves the same length-prefixed bytes through its
//!   chunk API, `--batch` frames per chunk; the socket and the pipe write `--stream-batch`
//!   frames per system call (1 by default: one write per frame, the message-passing baseline)
//!   and read with a 256 KiB buffer (as many frames per read as the kernel has).
//! - **rtt**: ping-pong of one frame, every reply checked; p50 and p99 from an HdrHistogram.
//!   shm-ring with `wake` = `spin` (both sides poll the tail) and `park` (both sides sleep at
//!   once on every hop through the ring's park protocol: announce, fence, re-check, futex; that
//!   is `Consumer::wait` without its spin phase, which in a ping-pong would catch the reply and
//!   hide the wake-up); uds and pipe use blocking reads (reported as `park`: the reader sleeps
//!   in the kernel); futex is two processes waking each other on a shared-memory word, the floor
//!   for a parked wake-up (it carries no payload: payload 0); rtrb spins (it cannot park).
//!
//! Cross-process cases re-execute this binary as `relaybench ring --child <spec>` with the
//! transport's descriptors at fixed numbers; every child dies with the parent
//! (`PR_SET_PDEATHSIG`), and rings live in memfds, so nothing is ever left in /dev/shm.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[path = "ring_cases.rs"]
mod ring_cases;
#[path = "ring_data.rs"]
mod ring_data;
#[path = "ring_sys.rs"]
mod ring_sys;

/// Options of `relaybench ring`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds measured per case (fractions allowed), after a warm-up of a tenth of that
    /// (at most 0.25 s).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Payload sizes of the throughput cases, in bytes (suffixes k and m allowed).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64,1k,64k")]
    payloads: Vec<usize>,
    /// Payload sizes of the round-trip cases.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64")]
    rtt_payloads: Vec<usize>,
    /// Transports to run.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "shm-ring,rtrb,uds,pipe,futex"
    )]
    transports: Vec<Transport>,
    /// Modes to run.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "throughput,rtt"
    )]
    modes: Vec<Mode>,
    /// One JSON object per case and line instead of the table (ratios go to stderr).
    #[arg(long)]
    json: bool,
    /// Bytes of the ring's data area; also rtrb's capacity and the pipe's and socket's buffer.
    #[arg(long, value_parser = parse_size, default_value = "1m")]
    capacity: usize,
    /// Records per publish (shm-ring) and frames per chunk (rtrb) in throughput mode.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Frames per write system call for uds and pipe in throughput mode.
    #[arg(long, default_value_t = 1)]
    stream_batch: usize,
    /// Do not pin the two sides to two CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Internal: run the child side of one case.
    #[arg(long, hide = true)]
    child: Option<String>,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    ShmRing,
    Rtrb,
    Uds,
    Pipe,
    Futex,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::ShmRing => "shm-ring",
            Transport::Rtrb => "rtrb",
            Transport::Uds => "uds",
            Transport::Pipe => "pipe",
            Transport::Futex => "futex",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Throughput,
    Rtt,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Throughput => "throughput",
            Mode::Rtt => "rtt",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wake {
    Spin,
    Park,
}

impl Wake {
    fn name(self) -> &'static str {
        match self {
            Wake::Spin => "spin",
            Wake::Park => "park",
        }
    }
}

/// One measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    pub transport: Transport,
    pub mode: Mode,
    pub wake: Option<Wake>,
    pub payload: usize,
}

/// What a case measured.
#[derive(Debug)]
pub struct Outcome {
    pub case: Case,
    pub frames_per_sec: Option<f64>,
    pub gbytes_per_sec: Option<f64>,
    pub rtt_p50_ns: Option<u64>,
    pub rtt_p99_ns: Option<u64>,
    /// Shown in the table only.
    pub note: String,
}

/// The `--json` line: exactly these fields.
#[derive(Serialize)]
struct Row {
    transport: &'static str,
    mode: &'static str,
    wake: Option<&'static str>,
    payload: usize,
    frames_per_sec: Option<f64>,
    gbytes_per_sec: Option<f64>,
    rtt_p50_ns: Option<u64>,
    rtt_p99_ns: Option<u64>,
}

impl Outcome {
    fn row(&self) -> Row {
        Row {
            transport: self.case.transport.name(),
            mode: self.case.mode.name(),
            wake: self.case.wake.map(Wake::name),
            payload: self.case.payload,
            frames_per_sec: self.frames_per_sec.map(|v| v.round()),
            gbytes_per_sec: self.gbytes_per_sec.map(|v| (v * 1e4).round() / 1e4),
            rtt_p50_ns: self.rtt_p50_ns,
            rtt_p99_ns: self.rtt_p99_ns,
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
    pub stream_batch: usize,
    /// (parent CPU, child CPU).
    pub cpus: Option<(usize, usize)>,
}

impl Config {
    fn child_spec(&self, case: &Case) -> ChildSpec {
        ChildSpec {
            transport: case.transport,
            mode: case.mode,
            wake: case.wake,
            payload: case.payload,
            cpu: self.cpus.map(|c| c.1),
            limit_secs: (self.warmup + self.measure + 2 * self.grace).as_secs_f64(),
        }
    }
}

/// What a child process is told to do (passed as JSON on its command line).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ChildSpec {
    pub transport: Transport,
    pub mode: Mode,
    pub wake: Option<Wake>,
    pub payload: usize,
    pub cpu: Option<usize>,
    /// The child gives up after this long.
    pub limit_secs: f64,
}

/// The cases of a run, in order: throughput by payload, then round trips.
fn plan(
    transports: &[Transport],
    modes: &[Mode],
    payloads: &[usize],
    rtt_payloads: &[usize],
) -> Vec<Case> {
    let has = |t| transports.contains(&t);
    let mut cases = Vec::new();
    if modes.contains(&Mode::Throughput) {
        for &payload in payloads {
            for t in [
                Transport::ShmRing,
                Transport::Rtrb,
                Transport::Uds,
                Transport::Pipe,
            ] {
                if has(t) {
                    cases.push(Case {
                        transport: t,
                        mode: Mode::Throughput,
                        wake: None,
                        payload,
                    });
                }
            }
        }
    }
    if modes.contains(&Mode::Rtt) {
        let rtt = |transport, wake, payload| Case {
            transport,
            mode: Mode::Rtt,
            wake: Some(wake),
            payload,
        };
        for &p in rtt_payloads {
            let list = [
                (Transport::ShmRing, Wake::Spin),
                (Transport::ShmRing, Wake::Park),
                (Transport::Rtrb, Wake::Spin),
                (Transport::Uds, Wake::Park),
                (Transport::Pipe, Wake::Park),
            ];
            for (t, w) in list {
                if has(t) {
                    cases.push(rtt(t, w, p));
                }
            }
        }
        if has(Transport::Futex) {
            cases.push(rtt(Transport::Futex, Wake::Park, 0));
        }
    }
    cases
}

pub fn run(args: Args) -> Result<()> {
    if let Some(spec) = &args.child {
        let spec: ChildSpec = serde_json::from_str(spec).context("bad --child spec")?;
        return ring_cases::child_main(&spec);
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds < 1e6) {
        bail!("--seconds must be a positive number");
    }
    if !args.capacity.is_power_of_two() || args.capacity < 4096 {
        bail!("--capacity must be a power of two of at least 4096");
    }
    let max = shm_ring::layout::max_payload(args.capacity);
    if let Some(p) = args
        .payloads
        .iter()
        .chain(&args.rtt_payloads)
        .find(|&&p| p > max)
    {
        bail!(
            "payload {p} exceeds the largest record a ring of {} bytes takes ({max})",
            args.capacity
        );
    }
    if args.batch == 0 || args.stream_batch == 0 {
        bail!("--batch and --stream-batch must be at least 1");
    }
    let measure = Duration::from_secs_f64(args.seconds);
    let cpus = if args.no_pin {
        None
    } else {
        let allowed = ring_sys::allowed_cpus();
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
        stream_batch: args.stream_batch,
        cpus,
    };
    if let Some((cpu, _)) = cfg.cpus {
        ring_sys::pin_current_thread(cpu)?;
    }
    let cases = plan(
        &args.transports,
        &args.modes,
        &args.payloads,
        &args.rtt_payloads,
    );
    let mut outcomes = Vec::new();
    let stdout = std::io::stdout();
    for case in &cases {
        let what = describe(case);
        if !args.json {
            eprint!("  {what} ... ");
        }
        let out = ring_cases::run_case(&cfg, case).with_context(|| what.clone())?;
        if args.json {
            let mut lock = stdout.lock();
            writeln!(lock, "{}", serde_json::to_string(&out.row())?)?;
            lock.flush()?;
        } else {
            eprintln!("done");
        }
        outcomes.push(out);
    }
    let ratios = ratios(&outcomes);
    if args.json {
        for line in ratios {
            eprintln!("{line}");
        }
    } else {
        print!("{}", header(&cfg));
        print!("{}", table(&outcomes));
        println!();
        for line in ratios {
            println!("{line}");
        }
    }
    Ok(())
}

fn describe(case: &Case) -> String {
    let wake = case
        .wake
        .map_or(String::new(), |w| format!(" {}", w.name()));
    format!(
        "{} {}{} {} B",
        case.transport.name(),
        case.mode.name(),
        wake,
        case.payload
    )
}

fn cpu_model() -> String {
    shmrelay::procfs::cpu_model().unwrap_or_else(|| "unknown CPU".into())
}

fn header(cfg: &Config) -> String {
    // SAFETY: sysconf has no memory arguments.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let pin = cfg.cpus.map_or("not pinned".into(), |(a, b)| {
        format!("sides pinned to CPUs {a} and {b}")
    });
    format!(
        "relaybench ring: {n} CPUs ({}), {:.2} s per case after {:.2} s warm-up, capacity {} KiB, \
         batch {}, stream batch {}, {pin}\n\n",
        cpu_model(),
        cfg.measure.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.capacity >> 10,
        cfg.batch,
        cfg.stream_batch,
    )
}

fn fmt_rate(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 1e6 => format!("{:.2} M", v / 1e6),
        Some(v) if v >= 1e3 => format!("{:.1} K", v / 1e3),
        Some(v) => format!("{v:.0}"),
    }
}

fn fmt_ns(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10_000 => format!("{v} ns"),
        Some(v) => format!("{:.1} us", v as f64 / 1e3),
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
    let mut s = format!(
        "{:<9} {:<10} {:<5} {:>8} {:>10} {:>7} {:>9} {:>9}  {}\n",
        "transport", "mode", "wake", "payload", "frames/s", "GB/s", "rtt p50", "rtt p99", "note"
    );
    for o in outcomes {
        s += &format!(
            "{:<9} {:<10} {:<5} {:>8} {:>10} {:>7} {:>9} {:>9}  {}\n",
            o.case.transport.name(),
            o.case.mode.name(),
            o.case.wake.map_or("-", Wake::name),
            fmt_payload(o.case.payload),
            fmt_rate(o.frames_per_sec),
            o.gbytes_per_sec.map_or("-".into(), |g| format!("{g:.2}")),
            fmt_ns(o.rtt_p50_ns),
            fmt_ns(o.rtt_p99_ns),
            o.note,
        );
    }
    s
}

/// The comparisons the targets are stated in, from this run's figures.
fn ratios(outcomes: &[Outcome]) -> Vec<String> {
    let find = |t: Transport, m: Mode, w: Option<Wake>, p: Option<usize>| {
        outcomes.iter().find(|o| {
            o.case.transport == t
                && o.case.mode == m
                && o.case.wake == w
                && p.is_none_or(|p| o.case.payload == p)
        })
    };
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let mut lines = vec!["ratios in this run (targets from issue 2):".to_owned()];
    let fps = |t| find(t, Mode::Throughput, None, Some(64)).and_then(|o| o.frames_per_sec);
    if let Some(shm) = fps(Transport::ShmRing) {
        for (t, target) in [
            (Transport::Uds, Some(10.0)),
            (Transport::Pipe, None),
            (Transport::Rtrb, Some(0.5)),
        ] {
            if let Some(base) = fps(t) {
                let r = shm / base;
                let goal = target.map_or(String::new(), |g| {
                    format!("  (target >= {g}x: {})", verdict(r >= g))
                });
                lines.push(format!(
                    "  throughput 64 B   shm-ring / {:<4} = {r:>7.2}x{goal}",
                    t.name()
                ));
            }
        }
    }
    if let Some(g) =
        find(Transport::ShmRing, Mode::Throughput, None, Some(65536)).and_then(|o| o.gbytes_per_sec)
    {
        lines.push(format!(
            "  throughput 64 KiB shm-ring        = {g:>7.2} GB/s  (target >= 5 GB/s: {})",
            verdict(g >= 5.0)
        ));
    }
    let p50 = |t, w| find(t, Mode::Rtt, Some(w), None).and_then(|o| o.rtt_p50_ns);
    if let Some(spin) = p50(Transport::ShmRing, Wake::Spin) {
        lines.push(format!(
            "  rtt spin p50      shm-ring        = {spin:>7} ns    (target < 1000 ns: {})",
            verdict(spin < 1000)
        ));
    }
    if let (Some(park), Some(futex)) = (
        p50(Transport::ShmRing, Wake::Park),
        p50(Transport::Futex, Wake::Park),
    ) {
        let r = park as f64 / futex as f64;
        lines.push(format!(
            "  rtt park p50      shm-ring / futex = {r:>6.2}x      (target <= 1.5x: {}; {park} ns vs {futex} ns)",
            verdict(r <= 1.5)
        ));
    }
    if lines.len() == 1 {
        lines.push("  (none: the cases they compare were not all run)".into());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Becomes the child side of a case when a test re-executes the test binary (see
    /// `ring_sys::child_command`); an ordinary test run passes through.
    #[test]
    fn child_entry() {
        if let Ok(spec) = std::env::var(ring_sys::CHILD_ENV) {
            let code = match serde_json::from_str(&spec)
                .map_err(anyhow::Error::from)
                .and_then(|s| ring_cases::child_main(&s))
            {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("relaybench ring child: {e:#}");
                    2
                }
            };
            std::process::exit(code);
        }
    }

    fn quick() -> Config {
        Config {
            warmup: Duration::from_millis(20),
            measure: Duration::from_millis(100),
            grace: Duration::from_secs(20),
            capacity: 1 << 16,
            batch: 16,
            stream_batch: 1,
            cpus: None,
        }
    }

    #[test]
    fn every_case_moves_checked_frames() {
        let all = [
            Transport::ShmRing,
            Transport::Rtrb,
            Transport::Uds,
            Transport::Pipe,
            Transport::Futex,
        ];
        // 20000-byte records wrap the 64 KiB ring with padding every few records.
        let cases = plan(&all, &[Mode::Throughput, Mode::Rtt], &[64, 20_000], &[64]);
        assert_eq!(cases.len(), 8 + 6);
        let cfg = quick();
        for case in &cases {
            let o = ring_cases::run_case(&cfg, case).unwrap_or_else(|e| panic!("{case:?}: {e:#}"));
            match case.mode {
                Mode::Throughput => {
                    assert!(o.frames_per_sec.unwrap() > 0.0, "{o:?}");
                    assert!(o.gbytes_per_sec.unwrap() > 0.0, "{o:?}");
                    assert!(o.rtt_p50_ns.is_none());
                }
                Mode::Rtt => {
                    let (p50, p99) = (o.rtt_p50_ns.unwrap(), o.rtt_p99_ns.unwrap());
                    assert!(p50 > 0 && p99 >= p50, "{o:?}");
                    assert!(o.frames_per_sec.is_none());
                }
            }
        }
    }

    #[test]
    fn stream_batching_and_tiny_payloads_are_checked_too() {
        let cfg = Config {
            stream_batch: 7,
            ..quick()
        };
        for (transport, payload) in [
            (Transport::Uds, 3),
            (Transport::Pipe, 0),
            (Transport::ShmRing, 0),
            (Transport::Rtrb, 5),
        ] {
            let case = Case {
                transport,
                mode: Mode::Throughput,
                wake: None,
                payload,
            };
            let o = ring_cases::run_case(&cfg, &case).unwrap_or_else(|e| panic!("{case:?}: {e:#}"));
            assert!(o.frames_per_sec.unwrap() > 0.0);
        }
    }

    #[test]
    fn json_rows_have_exactly_the_documented_fields() {
        let o = Outcome {
            case: Case {
                transport: Transport::ShmRing,
                mode: Mode::Rtt,
                wake: Some(Wake::Park),
                payload: 64,
            },
            frames_per_sec: None,
            gbytes_per_sec: None,
            rtt_p50_ns: Some(1234),
            rtt_p99_ns: Some(5678),
            note: "not in json".into(),
        };
        let v: serde_json::Value = serde_json::to_value(o.row()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "frames_per_sec",
                "gbytes_per_sec",
                "mode",
                "payload",
                "rtt_p50_ns",
                "rtt_p99_ns",
                "transport",
                "wake"
            ]
        );
        assert_eq!(v["transport"], "shm-ring");
        assert_eq!(v["wake"], "park");
        assert!(v["frames_per_sec"].is_null());
        assert_eq!(v["rtt_p99_ns"], 5678);
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
        let tput = |t, fps: f64| Outcome {
            case: Case {
                transport: t,
                mode: Mode::Throughput,
                wake: None,
                payload: 64,
            },
            frames_per_sec: Some(fps),
            gbytes_per_sec: Some(fps * 64.0 / 1e9),
            rtt_p50_ns: None,
            rtt_p99_ns: None,
            note: String::new(),
        };
        let lines = ratios(&[
            tput(Transport::ShmRing, 20e6),
            tput(Transport::Uds, 1e6),
            tput(Transport::Rtrb, 50e6),
        ]);
        let text = lines.join("\n");
        assert!(
            text.contains("shm-ring / uds  =   20.00x  (target >= 10x: met)"),
            "{text}"
        );
        assert!(
            text.contains("shm-ring / rtrb =    0.40x  (target >= 0.5x: MISSED)"),
            "{text}"
        );
    }
}
