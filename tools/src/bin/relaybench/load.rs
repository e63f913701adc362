//! `relaybench load`: a load generator for the length-prefixed wire protocol.
//!
//! Every connection sends frames of `--size` payload bytes and checks that each reply is the
//! byte-for-byte echo of the request it answers, in order (payloads carry a per-connection
//! sequence stamp). Latency is recorded per request in an HdrHistogram (microseconds).
//!
//! - **Closed loop** (default): `--depth` frames in flight per connection; each reply lets the
//!   next request go. Latency is measured from the send.
//! - **Open loop** (`--rate R`): R requests per second in total, each connection on its own
//!   fixed schedule; latency is measured from the *intended* send time, so a stalled server
//!   is not hidden (corrected for coordinated omission). `--depth` then caps the frames in
//!   flight per connection (unlimited by default); requests held back by the cap still count
//!   from their intended time. The schedule runs on tokio timers, which fire on a 1 ms grid:
//!   open-loop latencies include up to ~1 ms of that lateness (closed loop has no timer).
//!
//! Scale: connections are spread over `--threads` OS threads per process (a tokio
//! current-thread runtime each) and over `--procs` processes (this binary re-executed with a
//! hidden `--child-plan`; each child reports its counters and its histogram as one JSON line on
//! stdout and the parent merges them), and over source addresses (`--src-ips`), because a
//! process may hold only so many open files and a source address only ~28K ports towards one
//! destination. All connections of all processes are open before the first request is sent.
//!
//! Output: a short human summary, or with `--json` exactly one JSON object on stdout (fields
//! listed on [`Summary`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[path = "load_engine.rs"]
pub(crate) mod engine;

use crate::procs::{self, Children};
use engine::{Counters, Plan};

/// Options of `relaybench load`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Server address (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: String,
    /// Concurrent connections (all processes together).
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Payload bytes per frame (0: every frame is a heartbeat).
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Frames in flight per connection [default: 1 in closed loop, unlimited with --rate].
    #[arg(long)]
    pub depth: Option<usize>,
    /// Length of the measurement window in seconds (fractions allowed).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Seconds of load before the window, not counted.
    #[arg(long, default_value_t = 0.5)]
    pub warmup: f64,
    /// Open loop: target requests per second in total; latency from the intended send time.
    #[arg(long)]
    pub rate: Option<f64>,
    /// OS threads per process, each with a tokio current-thread runtime.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Processes to spread the connections over (open files are capped per process).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Source addresses to bind before connecting, used round robin: a list of addresses and
    /// IPv4 ranges, e.g. `127.0.0.2-127.0.0.9,127.0.1.1`.
    #[arg(long, value_name = "LIST")]
    pub src_ips: Option<String>,
    /// Connection attempts in flight at once (all processes together), so connecting cannot
    /// overflow the server's listen backlog.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Seconds one connection attempt may take.
    #[arg(long, default_value_t = 5.0)]
    pub connect_timeout: f64,
    /// Seconds the whole connect phase may take; connections not open by then count as errors.
    #[arg(long, default_value_t = 60.0)]
    pub ramp_limit: f64,
    /// Seconds to wait after the window for replies still in flight (then: `unanswered`).
    #[arg(long, default_value_t = 1.0)]
    pub drain: f64,
    /// Largest reply payload accepted; a longer reply length is a protocol error.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_frame: u32,
    /// Server process whose CPU time (with all its descendants, from /proc) is measured over
    /// the window; repeatable.
    #[arg(long = "server-pid", value_name = "PID")]
    pub server_pids: Vec<u32>,
    /// Print exactly one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Internal: run as a child process of a `--procs` run with this plan (JSON).
    #[arg(long, hide = true)]
    pub child_plan: Option<String>,
}

/// The result of a run; with `--json` printed as one object.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub addr: String,
    /// Connections asked for.
    pub conns: usize,
    /// Connections open when the run started.
    pub connected: u64,
    pub size: u32,
    /// Frames in flight per connection at most (null: unlimited).
    pub depth: Option<usize>,
    /// "closed" or "open".
    pub mode: &'static str,
    /// Open loop: target requests per second.
    pub rate: Option<f64>,
    pub seconds: f64,
    pub warmup: f64,
    pub procs: usize,
    pub threads: usize,
    pub src_ips: usize,
    /// Replies received inside the window.
    pub requests: u64,
    pub req_per_sec: f64,
    /// Payload bytes echoed per second (one direction).
    pub bytes_per_sec: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// connect_errors + io_errors + early_closes + protocol_errors.
    pub errors: u64,
    pub connect_errors: u64,
    pub io_errors: u64,
    pub early_closes: u64,
    pub protocol_errors: u64,
    /// Replies that were not the echo of their request.
    pub mismatches: u64,
    pub sent: u64,
    pub replies: u64,
    pub unanswered: u64,
    /// CPU seconds of the load generator's processes inside the window.
    pub client_cpu_seconds: f64,
    /// CPU seconds of the `--server-pid` processes and their descendants inside the window.
    pub server_cpu_seconds: Option<f64>,
    /// Requests per server CPU second (efficiency).
    pub req_per_server_cpu_sec: Option<f64>,
    pub first_error: Option<String>,
}

/// What a child process reports at the end of a `--procs` run.
#[derive(Serialize, Deserialize)]
struct ChildReport {
    counters: Counters,
    /// The latency histogram, V2-serialized, in hex.
    hist: String,
    cpu_seconds: f64,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(plan) = &args.child_plan {
        return run_child(plan);
    }
    let plan = make_plan(&args)?;
    check_limits(&plan)?;
    let (counters, hist, client_cpu, server_cpu) = if plan.procs == 1 {
        run_single(&plan, &args.server_pids)?
    } else {
        run_procs(&plan, &args.server_pids)?
    };
    let summary = summarize(&args, &plan, &counters, &hist, client_cpu, server_cpu);
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_human(&summary);
    }
    if summary.connected == 0 {
        bail!(
            "no connection to {} could be opened: {}",
            summary.addr,
            summary.first_error.as_deref().unwrap_or("unknown error")
        );
    }
    Ok(())
}

pub(crate) fn secs_arg(v: f64, name: &str, allow_zero: bool) -> Result<f64> {
    if !v.is_finite() || v < 0.0 || (!allow_zero && v == 0.0) || v > 1e6 {
        bail!(
            "{name} must be a {} number of seconds, got {v}",
            if allow_zero {
                "non-negative"
            } else {
                "positive"
            }
        );
    }
    Ok(v)
}

fn make_plan(args: &Args) -> Result<Plan> {
    let addr = check_addr_and_split(&args.addr, args.conns, args.threads, args.procs)?;
    if args.size > args.max_frame {
        bail!(
            "--size {} is above --max-frame {}",
            args.size,
            args.max_frame
        );
    }
    if args.connect_concurrency == 0 {
        bail!("--connect-concurrency must be at least 1");
    }
    if let Some(r) = args.rate {
        if !r.is_finite() || r <= 0.0 {
            bail!("--rate must be a positive number of requests per second");
        }
    }
    let depth = match (args.depth, args.rate) {
        (Some(0), _) => bail!("--depth must be at least 1"),
        (Some(d), _) => d,
        (None, None) => 1,
        (None, Some(_)) => usize::MAX,
    };
    let src_ips = src_ips_for(addr, args.src_ips.as_deref())?;
    Ok(Plan {
        addr,
        src_ips,
        conns: args.conns,
        proc_index: 0,
        procs: args.procs,
        threads: args.threads,
        size: args.size,
        depth,
        rate: args.rate,
        seconds: secs_arg(args.seconds, "--seconds", false)?,
        warmup: secs_arg(args.warmup, "--warmup", true)?,
        drain: secs_arg(args.drain, "--drain", true)?,
        connect_concurrency: args.connect_concurrency.div_ceil(args.procs),
        connect_timeout: secs_arg(args.connect_timeout, "--connect-timeout", false)?,
        ramp_limit: secs_arg(args.ramp_limit, "--ramp-limit", false)?,
        max_frame: args.max_frame,
    })
}

/// Resolves `--addr` and checks `--conns`, `--threads` and `--procs` (for `load` and `hold`).
pub(crate) fn check_addr_and_split(
    addr: &str,
    conns: usize,
    threads: usize,
    procs: usize,
) -> Result<SocketAddr> {
    let addr = addr
        .to_socket_addrs()
        .with_context(|| format!("bad --addr {addr:?} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("--addr {addr:?} resolves to no address"))?;
    if conns == 0 {
        bail!("--conns must be at least 1");
    }
    if threads == 0 || procs == 0 {
        bail!("--threads and --procs must be at least 1");
    }
    if procs > conns {
        bail!("--procs {procs} is more than --conns {conns}");
    }
    Ok(addr)
}

/// The addresses of `--src-ips` (none given: empty), which must be of `addr`'s family.
pub(crate) fn src_ips_for(addr: SocketAddr, src_ips: Option<&str>) -> Result<Vec<IpAddr>> {
    let src_ips = match src_ips {
        Some(s) => parse_src_ips(s)?,
        None => Vec::new(),
    };
    if let Some(ip) = src_ips.iter().find(|ip| ip.is_ipv4() != addr.is_ipv4()) {
        bail!("source address {ip} is not of the same family as {addr}");
    }
    Ok(src_ips)
}

/// Parses `127.0.0.2-127.0.0.9,127.0.1.1,::1` into a list of addresses.
pub(crate) fn parse_src_ips(s: &str) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if let Some((a, b)) = item.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("bad address in --src-ips range {item:?}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("bad address in --src-ips range {item:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a >= 1 << 16 {
                bail!("--src-ips range {item:?} must go upwards and hold at most 65536 addresses");
            }
            out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
        } else {
            out.push(
                item.parse()
                    .with_context(|| format!("bad address {item:?} in --src-ips"))?,
            );
        }
    }
    if out.is_empty() {
        bail!("--src-ips holds no address");
    }
    Ok(out)
}

/// Raises the open-files limit to its hard cap and checks that each process's share fits.
pub(crate) fn check_limits(plan: &Plan) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).context("cannot read the open-files limit")?;
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let per_proc = plan.conns.div_ceil(plan.procs) as u64;
    // A few descriptors go to stdio, the runtime and the pipes.
    if per_proc + 64 > limit {
        let need = plan
            .conns
            .div_ceil((limit.saturating_sub(64)).max(1) as usize);
        bail!(
            "{per_proc} connections per process exceed the open-files limit of {limit}: \
             use --procs {need} or more"
        );
    }
    if let Some((lo, hi)) = shmrelay::procfs::local_port_range() {
        let ports = (hi.saturating_sub(lo) + 1) as usize;
        let sources = plan.src_ips.len().max(1);
        if plan.conns > ports * sources {
            eprintln!(
                "relaybench load: warning: {} connections from {sources} source address(es) exceed the {ports} \
                 ephemeral ports per source; add addresses with --src-ips",
                plan.conns
            );
        }
    }
    Ok(())
}

/// CPU seconds (user + system) of the given processes and all their descendants, from /proc.
pub(crate) fn server_cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    use shmrelay::procfs;
    let ticks = procfs::clock_ticks_per_sec();
    // (pid, ppid, utime + stime in ticks) of every process.
    let procs: Vec<(u32, u32, u64)> = procfs::pids()
        .filter_map(|pid| procfs::stat(pid).ok().map(|s| (pid, s.ppid, s.cpu_ticks)))
        .collect();
    let mut members: Vec<u32> = pids.to_vec();
    let mut i = 0;
    while i < members.len() {
        let parent = members[i];
        for &(pid, ppid, _) in &procs {
            if ppid == parent && !members.contains(&pid) {
                members.push(pid);
            }
        }
        i += 1;
    }
    let total: u64 = procs
        .iter()
        .filter(|p| members.contains(&p.0))
        .map(|p| p.2)
        .sum();
    Some(total as f64 / ticks)
}

type RunResult = (Counters, Histogram<u64>, f64, Option<f64>);

fn run_single(plan: &Plan, server_pids: &[u32]) -> Result<RunResult> {
    let mut samples = Vec::new();
    let report = engine::run_process(
        plan,
        |_| Ok(()),
        |_| samples.push(server_cpu_seconds(server_pids)),
    )?;
    Ok((
        report.counters,
        report.hist,
        report.cpu_seconds,
        cpu_delta(&samples),
    ))
}

pub(crate) fn cpu_delta(samples: &[Option<f64>]) -> Option<f64> {
    match samples {
        [Some(a), Some(b)] => Some((b - a).max(0.0)),
        _ => None,
    }
}

fn hist_to_hex(h: &Histogram<u64>) -> Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| anyhow!("cannot serialize a histogram: {e:?}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn hist_from_hex(s: &str) -> Result<Histogram<u64>> {
    if s.len() % 2 != 0 {
        bail!("bad histogram encoding");
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .context("bad histogram encoding")?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| anyhow!("cannot read a histogram: {e:?}"))
}

/// Child side of `--procs`: connect, report ready, wait for "go" on stdin, run, report.
fn run_child(plan_json: &str) -> Result<()> {
    procs::run_child(plan_json, |plan: Plan, gate| {
        let r = engine::run_process(&plan, gate, |_| {})?;
        Ok(ChildReport {
            counters: r.counters,
            hist: hist_to_hex(&r.hist)?,
            cpu_seconds: r.cpu_seconds,
        })
    })
}

fn run_procs(plan: &Plan, server_pids: &[u32]) -> Result<RunResult> {
    let plans = (0..plan.procs).map(|i| Plan {
        proc_index: i,
        ..plan.clone()
    });
    let mut children = Children::<Counters, ChildReport>::spawn("load", plans)?;
    // 1. Every child connects; wait for all of them.
    let ready_deadline =
        Instant::now() + Duration::from_secs_f64(plan.ramp_limit) + Duration::from_secs(30);
    children.wait_ready(ready_deadline)?;
    // 2. Go, all at once; sample the server over the same window as the children.
    children.go()?;
    let start = Instant::now();
    let measure_start = start + Duration::from_secs_f64(plan.warmup);
    let measure_end = measure_start + Duration::from_secs_f64(plan.seconds);
    let mut samples = Vec::new();
    if !server_pids.is_empty() {
        for t in [measure_start, measure_end] {
            std::thread::sleep(t.saturating_duration_since(Instant::now()));
            samples.push(server_cpu_seconds(server_pids));
        }
    }
    // 3. Collect and merge the reports.
    let report_deadline =
        measure_end + Duration::from_secs_f64(plan.drain) + Duration::from_secs(30);
    let mut counters = Counters::default();
    let mut hist = engine::new_histogram();
    let mut cpu = 0.0;
    children.collect_reports(report_deadline, |r| {
        counters.add(&r.counters);
        hist.add(hist_from_hex(&r.hist)?)
            .map_err(|e| anyhow!("cannot merge histograms: {e:?}"))?;
        cpu += r.cpu_seconds;
        Ok(())
    })?;
    children.finish()?;
    Ok((counters, hist, cpu, cpu_delta(&samples)))
}

fn summarize(
    args: &Args,
    plan: &Plan,
    c: &Counters,
    h: &Histogram<u64>,
    client_cpu: f64,
    server_cpu: Option<f64>,
) -> Summary {
    let q = |p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    let req_per_sec = c.requests as f64 / plan.seconds;
    Summary {
        addr: plan.addr.to_string(),
        conns: plan.conns,
        connected: c.connected,
        size: plan.size,
        depth: (plan.depth != usize::MAX).then_some(plan.depth),
        mode: if plan.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        rate: plan.rate,
        seconds: plan.seconds,
        warmup: plan.warmup,
        procs: plan.procs,
        threads: args.threads,
        src_ips: plan.src_ips.len(),
        requests: c.requests,
        req_per_sec,
        bytes_per_sec: req_per_sec * plan.size as f64,
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: h.max(),
        mean_us: if h.is_empty() { 0.0 } else { h.mean() },
        errors: c.errors(),
        connect_errors: c.connect_errors,
        io_errors: c.io_errors,
        early_closes: c.early_closes,
        protocol_errors: c.protocol_errors,
        mismatches: c.mismatches,
        sent: c.sent,
        replies: c.replies,
        unanswered: c.unanswered,
        client_cpu_seconds: client_cpu,
        server_cpu_seconds: server_cpu,
        req_per_server_cpu_sec: server_cpu
            .filter(|s| *s > 0.0)
            .map(|s| c.requests as f64 / s),
        first_error: c.first_error.clone(),
    }
}

fn print_human(s: &Summary) {
    let depth = s
        .depth
        .map_or_else(|| "unlimited".to_string(), |d| d.to_string());
    let mode = match s.rate {
        Some(r) => format!("open loop at {r} req/s"),
        None => "closed loop".to_string(),
    };
    println!(
        "relaybench load: {} | {} conns ({} open) | {} B payloads | depth {depth} | {mode} | {} s (+{} s warm-up) | {} proc(s) x {} thread(s)",
        s.addr, s.conns, s.connected, s.size, s.seconds, s.warmup, s.procs, s.threads
    );
    println!(
        "  throughput  {:.0} req/s ({} requests, {:.1} MB/s payload each way)",
        s.req_per_sec,
        s.requests,
        s.bytes_per_sec / 1e6
    );
    println!(
        "  latency us  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.1}",
        s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us, s.mean_us
    );
    println!(
        "  errors {} (connect {}, io {}, early close {}, protocol {})  mismatches {}  unanswered {}",
        s.errors, s.connect_errors, s.io_errors, s.early_closes, s.protocol_errors, s.mismatches, s.unanswered
    );
    let server = match (s.server_cpu_seconds, s.req_per_server_cpu_sec) {
        (Some(c), Some(e)) => format!("; server {c:.2} s ({e:.0} req per CPU-second)"),
        (Some(c), None) => format!("; server {c:.2} s"),
        _ => String::new(),
    };
    println!(
        "  cpu seconds in window: client {:.2}{server}",
        s.client_cpu_seconds
    );
    if let Some(e) = &s.first_error {
        println!("  first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn src_ip_lists_and_ranges() {
        let v = parse_src_ips("127.0.0.2-127.0.0.4, 127.0.1.1").unwrap();
        let s: Vec<String> = v.iter().map(|i| i.to_string()).collect();
        assert_eq!(s, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.1.1"]);
        assert!(parse_src_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_src_ips("nope").is_err());
        assert!(parse_src_ips(",").is_err());
    }

    #[test]
    fn histograms_survive_the_child_encoding() {
        let mut h = engine::new_histogram();
        for v in [1u64, 50, 50, 900, 123_456] {
            h.record(v).unwrap();
        }
        let back = hist_from_hex(&hist_to_hex(&h).unwrap()).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(back.max(), h.max());
    }

    #[test]
    fn connections_are_split_over_processes_without_overlap() {
        let args = Args {
            addr: "127.0.0.1:1".into(),
            conns: 10,
            size: 8,
            depth: None,
            seconds: 1.0,
            warmup: 0.0,
            rate: None,
            threads: 1,
            procs: 3,
            src_ips: None,
            connect_concurrency: 10,
            connect_timeout: 1.0,
            ramp_limit: 1.0,
            drain: 0.0,
            max_frame: 100,
            server_pids: vec![],
            json: false,
            child_plan: None,
        };
        let plan = make_plan(&args).unwrap();
        let mut all: Vec<usize> = (0..3)
            .flat_map(|i| {
                Plan {
                    proc_index: i,
                    ..plan.clone()
                }
                .conn_ids()
            })
            .collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(plan.depth, 1);
        let open = make_plan(&Args {
            rate: Some(100.0),
            ..args
        })
        .unwrap();
        assert_eq!(open.depth, usize::MAX);
    }
}
