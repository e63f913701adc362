//! The one load engine of `relaybench load` and `relaybench hold`: it opens the connections,
//! starts the run everywhere at once, measures a window and merges what every connection
//! counted; what a connection does once open is its workload's business.
//!
//! Scale: connections are spread over `--threads` OS threads per process (a tokio
//! current-thread runtime each, or the workload's own event loop), over `--procs` processes (this binary re-executed as
//! `relaybench SUB --child-plan PLAN`, see [`crate::procs`]) and over source addresses
//! (`--src-ips`), because a process may hold only so many open files and a source address only
//! ~28K ports towards one destination.
//!
//! Phases, the same in every thread:
//! 1. **connect**: open the thread's connections, at most `connect_concurrency` at a time per
//!    process (so a burst of SYNs cannot overflow the server's listen backlog), each bound to
//!    its source address first when `--src-ips` is given. A [`Workload`] runs each connection
//!    as a tokio task ([`Workload::conn`]) as soon as it is open (a load connection waits for
//!    the start); a [`Bench`] with its own thread body (`hold`'s epoll loop, no task per
//!    connection) connects in that loop and answers pings during the ramp;
//! 2. **wait for go**: report to the process's coordinator, which (in a child process) reports
//!    to the parent and waits for its go, so all connections of all processes are open (or
//!    failed) before the run starts;
//! 3. **run**: warm-up, measurement window, drain ([`Window`]); then the connections end by
//!    themselves ([`Workload::ENDS_ITSELF`]) or are cut at the end of the window.
//!
//! This file holds the contracts (flags, plan, [`Bench`], [`Workload`], [`Tally`]) and the
//! parent's side; the threads of one process are in `engine_process.rs`.

use std::cell::{Cell, RefCell};
use std::fmt::Debug;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::procs::{self, Children};

#[path = "engine_process.rs"]
mod process;
use process::run_process;
pub(crate) use process::{set_bind_address_no_port, ThreadCtl};

/// The flags every workload shares (`#[command(flatten)]`ed into `load` and `hold`).
#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// Server address (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: String,
    /// Concurrent connections (all processes together) [default: load 100, hold 1000].
    #[arg(long)]
    pub conns: Option<usize>,
    /// Length of the measurement window in seconds (fractions allowed), after all connections
    /// are open (`load`: after `--warmup`) [default: load 5, hold 60].
    #[arg(long)]
    pub seconds: Option<f64>,
    /// OS threads per process, each with its own event loop.
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
    /// Seconds the whole connect phase may take; connections not open by then count as errors
    /// [default: load 60, hold 180].
    #[arg(long)]
    pub ramp_limit: Option<f64>,
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

/// The defaults of [`ConnArgs`] that differ by workload.
pub struct Defaults {
    pub conns: usize,
    pub seconds: f64,
    pub ramp_limit: f64,
}

/// What one process has to do: the parent builds one per process (children get it as JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan<W> {
    pub addr: SocketAddr,
    /// Source addresses, used round robin by global connection index (empty: let the kernel pick).
    pub src_ips: Vec<IpAddr>,
    /// Connections of the whole run (all processes).
    pub conns: usize,
    /// This process takes the connections `proc_index, proc_index + procs, ...`.
    pub proc_index: usize,
    pub procs: usize,
    pub threads: usize,
    /// The measurement window, seconds.
    pub seconds: f64,
    /// Concurrent connection attempts in this process.
    pub connect_concurrency: usize,
    pub connect_timeout: f64,
    /// Connections not open this long after the start of the connect phase count as failed.
    pub ramp_limit: f64,
    /// What each connection does.
    pub work: W,
}

impl<W> Plan<W> {
    /// Global indices of this process's connections.
    pub fn conn_ids(&self) -> Vec<usize> {
        (self.proc_index..self.conns)
            .step_by(self.procs.max(1))
            .collect()
    }
}

/// A kind of run the engine drives: its name, defaults and counts, and the body of each of
/// its threads, from the first connect to the end of the run. Every [`Workload`] is one (its
/// threads are the engine's tokio loop with a task per connection); `hold` implements it
/// directly with an epoll loop of its own, where a connection is a few words, not a task.
pub(crate) trait Bench:
    Clone + Debug + Serialize + DeserializeOwned + Send + 'static
{
    /// The subcommand: children are re-run with it; it names threads and messages.
    const NAME: &'static str;
    /// Defaults of the shared flags.
    const DEFAULTS: Defaults;
    /// What a thread, a process and the whole run count.
    type Tally: Tally;
    /// Seconds of load before the measurement window, not counted.
    fn warmup(&self) -> f64;
    /// Seconds after the window for replies still in flight.
    fn drain(&self) -> f64;
    /// One thread of a process: connects `ctl.ids` (at most `ctl.concurrency` attempts at a
    /// time), reports its connect counts with [`ThreadCtl::ready`], runs from the go to the
    /// stop ([`ThreadCtl::poll_go`], [`ThreadCtl::should_stop`]) and returns its counts.
    fn run_thread(plan: &Plan<Self>, ctl: ThreadCtl<Self::Tally>) -> Result<Self::Tally>;
    /// In the parent once every connection was tried, `ramp_secs` after the start.
    fn on_start(plan: &Plan<Self>, connect: &Self::Tally, ramp_secs: f64);
}

impl<W: Workload> Bench for W {
    const NAME: &'static str = <W as Workload>::NAME;
    const DEFAULTS: Defaults = <W as Workload>::DEFAULTS;
    type Tally = <W as Workload>::Tally;
    fn warmup(&self) -> f64 {
        Workload::warmup(self)
    }
    fn drain(&self) -> f64 {
        Workload::drain(self)
    }
    fn run_thread(plan: &Plan<W>, ctl: ThreadCtl<W::Tally>) -> Result<W::Tally> {
        process::thread_main(plan, ctl)
    }
    fn on_start(plan: &Plan<W>, connect: &W::Tally, ramp_secs: f64) {
        <W as Workload>::on_start(plan, connect, ramp_secs)
    }
}

/// What a connection does once open, as one tokio task per connection (`load`).
pub(crate) trait Workload:
    Clone + Debug + Serialize + DeserializeOwned + Send + 'static
{
    /// The subcommand: children are re-run with it; it names threads and messages.
    const NAME: &'static str;
    /// Defaults of the shared flags.
    const DEFAULTS: Defaults;
    /// True: connections end by themselves after the drain (the thread waits for them);
    /// false: they are held until the window ends, then cut.
    const ENDS_ITSELF: bool;
    /// What a thread, a process and the whole run count.
    type Tally: Tally;
    /// State of one thread, shared by its connection tasks (current-thread runtime: no locks).
    type Thread: 'static;

    /// Seconds of load before the measurement window, not counted.
    fn warmup(&self) -> f64 {
        0.0
    }
    /// Seconds after the window for replies still in flight.
    fn drain(&self) -> f64 {
        0.0
    }
    /// A thread's state.
    fn thread(plan: &Plan<Self>) -> Self::Thread;
    /// The counts of a thread.
    fn tally(th: &Self::Thread) -> &RefCell<Self::Tally>;
    /// The life of connection `id` from the moment it is open; `start` tells when the run
    /// starts. Returns when the connection is over (or is cut by aborting its task).
    fn conn(
        th: Rc<Self::Thread>,
        start: Rc<Start>,
        id: usize,
        stream: TcpStream,
    ) -> impl Future<Output = ()> + 'static;
    /// On a thread at the end of the window, before its remaining connections are cut (not
    /// called when they end by themselves).
    fn at_end(_th: &Self::Thread) {}
    /// In the parent once every connection was tried, `ramp_secs` after the start.
    fn on_start(_plan: &Plan<Self>, _connect: &Self::Tally, _ramp_secs: f64) {}
}

/// Counts of a thread, a process or the whole run; [`Tally::add`] merges them.
pub(crate) trait Tally:
    Default + Clone + Serialize + DeserializeOwned + Send + 'static
{
    /// Adds `other`'s counts to these (an error if a histogram cannot take them).
    fn add(&mut self, other: &Self) -> Result<()>;
    /// The counts every workload keeps (the engine counts connects into them).
    fn base(&self) -> &Base;
    /// The same, to count into.
    fn base_mut(&mut self) -> &mut Base;
}

/// The counts every workload keeps: connections and the first error.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Base {
    /// Connections that opened.
    pub connected: u64,
    /// Connection attempts that failed.
    pub connect_errors: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

impl Base {
    /// Adds `o`'s counts to these; keeps the first error.
    pub fn add(&mut self, o: &Base) {
        self.connected += o.connected;
        self.connect_errors += o.connect_errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
    }

    /// Keeps `msg` as the first error if there is none yet.
    pub fn note_error(&mut self, msg: impl FnOnce() -> String) {
        if self.first_error.is_none() {
            self.first_error = Some(msg());
        }
    }
}

/// Declares a counters struct: [`Base`] plus the listed `u64` counts, with `add` (sums the
/// counts, keeps the first error) and `note_error`.
macro_rules! counters {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
        pub struct $name {
            /// Connections and the first error.
            pub base: $crate::engine::Base,
            $($(#[$fmeta])* pub $field: u64,)*
        }

        impl $name {
            /// Adds `o`'s counts to these; keeps the first error.
            pub fn add(&mut self, o: &$name) {
                self.base.add(&o.base);
                $(self.$field += o.$field;)*
            }

            /// Keeps `msg` as the first error if there is none yet.
            pub fn note_error(&mut self, msg: impl FnOnce() -> String) {
                self.base.note_error(msg);
            }
        }
    };
}
pub(crate) use counters;

/// Times of the run phase, shared by the threads of a process.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start: Instant,
    pub measure_start: Instant,
    pub measure_end: Instant,
    pub drain_end: Instant,
}

impl Window {
    fn new<W: Bench>(plan: &Plan<W>, start: Instant) -> Window {
        let measure_start = start + Duration::from_secs_f64(plan.work.warmup());
        let measure_end = measure_start + Duration::from_secs_f64(plan.seconds);
        Window {
            start,
            measure_start,
            measure_end,
            drain_end: measure_end + Duration::from_secs_f64(plan.work.drain()),
        }
    }
}

/// The start of the run as a thread's connections see it.
#[derive(Default)]
pub struct Start {
    window: Cell<Option<Window>>,
    started: Notify,
}

impl Start {
    /// Waits for the start of the run.
    pub async fn wait(&self) -> Window {
        loop {
            // Nothing else runs on this thread between the check and the registration.
            if let Some(w) = self.window.get() {
                return w;
            }
            self.started.notified().await;
        }
    }

    fn set(&self, w: Window) {
        self.window.set(Some(w));
        self.started.notify_waiters();
    }
}

/// What one process measured (what a child process reports at the end of a `--procs` run).
#[derive(Default, Serialize, Deserialize)]
pub struct ProcReport<T> {
    pub tally: T,
    /// CPU seconds (user + system) of the client processes inside the measurement window.
    pub cpu_seconds: f64,
    /// Resident memory of the client processes at the end of the window, KiB.
    pub rss_kb: u64,
}

impl<T: Tally> ProcReport<T> {
    fn add(&mut self, o: &ProcReport<T>) -> Result<()> {
        self.cpu_seconds += o.cpu_seconds;
        self.rss_kb += o.rss_kb;
        self.tally.add(&o.tally)
    }
}

/// The result of a run, for the workload's summary.
pub struct Outcome<W: Bench> {
    pub plan: Plan<W>,
    pub report: ProcReport<W::Tally>,
    /// CPU seconds of the `--server-pid` processes and their descendants inside the window.
    pub server_cpu: Option<f64>,
    /// Seconds from the start until every connection had been tried (the connect ramp).
    pub ramp_secs: f64,
}

/// Runs a workload as the parent of the run; `None` when this process is a child of a
/// `--procs` run (it has reported to its parent).
pub(crate) fn run<W: Bench>(args: &ConnArgs, work: W) -> Result<Option<Outcome<W>>> {
    if let Some(plan) = &args.child_plan {
        procs::run_child(plan, |plan: Plan<W>, gate| run_process(&plan, gate, |_| {}))?;
        return Ok(None);
    }
    let plan = args.plan(work)?;
    check_limits(&plan)?;
    let started = Instant::now();
    let mut ramp_secs = 0.0;
    let mut on_start = |c: &W::Tally| {
        ramp_secs = started.elapsed().as_secs_f64();
        W::on_start(&plan, c, ramp_secs);
    };
    let (report, server_cpu) = if plan.procs == 1 {
        let mut samples = Vec::new();
        let r = run_process(
            &plan,
            |c| {
                on_start(c);
                Ok(())
            },
            |_| samples.push(server_cpu_seconds(&args.server_pids)),
        )?;
        (r, cpu_delta(&samples))
    } else {
        run_procs(&plan, &args.server_pids, on_start)?
    };
    Ok(Some(Outcome {
        plan,
        report,
        server_cpu,
        ramp_secs,
    }))
}

/// What every summary reports about the run itself (flattened into those of `load` and
/// `hold`).
#[derive(Debug, Serialize)]
pub struct Common {
    /// The server's address (`--addr`, resolved).
    pub addr: String,
    /// Connections asked for.
    pub conns: usize,
    /// Client processes (`--procs`).
    pub procs: usize,
    /// Threads per client process (`--threads`).
    pub threads: usize,
    /// Source addresses the connections were spread over (0: the kernel's choice).
    pub src_ips: usize,
    /// The measurement window, seconds.
    pub seconds: f64,
    /// Connection attempts that failed.
    pub connect_errors: u64,
    /// CPU seconds of the client processes inside the window.
    pub client_cpu_seconds: f64,
    /// CPU seconds of the `--server-pid` processes and their descendants inside the window.
    pub server_cpu_seconds: Option<f64>,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

impl<W: Bench> Outcome<W> {
    /// The figures of [`Common`].
    pub fn common(&self) -> Common {
        let (plan, base) = (&self.plan, self.report.tally.base());
        Common {
            addr: plan.addr.to_string(),
            conns: plan.conns,
            procs: plan.procs,
            threads: plan.threads,
            src_ips: plan.src_ips.len(),
            seconds: plan.seconds,
            connect_errors: base.connect_errors,
            client_cpu_seconds: self.report.cpu_seconds,
            server_cpu_seconds: self.server_cpu,
            first_error: base.first_error.clone(),
        }
    }

    /// Prints the summary (one JSON object with `json`, else `human`); an error if no
    /// connection opened.
    pub fn print<S: Serialize>(
        &self,
        json: bool,
        summary: &S,
        human: impl FnOnce(&S),
    ) -> Result<()> {
        if json {
            println!("{}", serde_json::to_string(summary)?);
        } else {
            human(summary);
        }
        let base = self.report.tally.base();
        if base.connected == 0 {
            bail!(
                "no connection to {} could be opened: {}",
                self.plan.addr,
                base.first_error.as_deref().unwrap_or("unknown error")
            );
        }
        Ok(())
    }
}

impl ConnArgs {
    /// Checks the flags and builds the plan of process 0.
    pub(crate) fn plan<W: Bench>(&self, work: W) -> Result<Plan<W>> {
        let d = W::DEFAULTS;
        let conns = self.conns.unwrap_or(d.conns);
        let addr = self
            .addr
            .to_socket_addrs()
            .with_context(|| format!("bad --addr {:?} (expected HOST:PORT)", self.addr))?
            .next()
            .ok_or_else(|| anyhow!("--addr {:?} resolves to no address", self.addr))?;
        if conns == 0 {
            bail!("--conns must be at least 1");
        }
        let (threads, procs) = (self.threads, self.procs);
        if threads == 0 || procs == 0 {
            bail!("--threads and --procs must be at least 1");
        }
        if procs > conns {
            bail!("--procs {procs} is more than --conns {conns}");
        }
        if self.connect_concurrency == 0 {
            bail!("--connect-concurrency must be at least 1");
        }
        let src_ips = match &self.src_ips {
            Some(s) => parse_src_ips(s)?,
            None => Vec::new(),
        };
        if let Some(ip) = src_ips.iter().find(|ip| ip.is_ipv4() != addr.is_ipv4()) {
            bail!("source address {ip} is not of the same family as {addr}");
        }
        Ok(Plan {
            addr,
            src_ips,
            conns,
            proc_index: 0,
            procs,
            threads,
            seconds: secs_arg(self.seconds.unwrap_or(d.seconds), "--seconds", false)?,
            connect_concurrency: self.connect_concurrency.div_ceil(procs),
            connect_timeout: secs_arg(self.connect_timeout, "--connect-timeout", false)?,
            ramp_limit: secs_arg(
                self.ramp_limit.unwrap_or(d.ramp_limit),
                "--ramp-limit",
                false,
            )?,
            work,
        })
    }
}

/// Checks a number of seconds given as flag `name`.
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
fn check_limits<W>(plan: &Plan<W>) -> Result<()> {
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
                "relaybench: warning: {} connections from {sources} source address(es) exceed the {ports} \
                 ephemeral ports per source; add addresses with --src-ips",
                plan.conns
            );
        }
    }
    Ok(())
}

/// CPU seconds (user + system) of the given processes and all their descendants, from /proc.
fn server_cpu_seconds(pids: &[u32]) -> Option<f64> {
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

fn cpu_delta(samples: &[Option<f64>]) -> Option<f64> {
    match samples {
        [Some(a), Some(b)] => Some((b - a).max(0.0)),
        _ => None,
    }
}

/// CPU seconds used so far by this process (all threads).
fn self_cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => 0.0,
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// The parent of a `--procs` run: every child connects, then all start at once; the server is
/// sampled over the same window as the children.
fn run_procs<W: Bench>(
    plan: &Plan<W>,
    server_pids: &[u32],
    on_start: impl FnOnce(&W::Tally),
) -> Result<(ProcReport<W::Tally>, Option<f64>)> {
    let plans = (0..plan.procs).map(|i| Plan {
        proc_index: i,
        ..plan.clone()
    });
    let mut children = Children::<W::Tally, ProcReport<W::Tally>>::spawn(W::NAME, plans)?;
    // 1. Every child connects; wait for all of them.
    let ready_deadline =
        Instant::now() + Duration::from_secs_f64(plan.ramp_limit) + Duration::from_secs(30);
    let mut connect = W::Tally::default();
    for c in children.wait_ready(ready_deadline)? {
        connect.add(&c)?;
    }
    on_start(&connect);
    // 2. Go, all at once; sample the server over the same window as the children.
    children.go()?;
    let w = Window::new(plan, Instant::now());
    let mut samples = Vec::new();
    for t in [w.measure_start, w.measure_end] {
        sleep_until(t);
        samples.push(server_cpu_seconds(server_pids));
    }
    // 3. Collect and merge the reports.
    let report_deadline = w.drain_end + Duration::from_secs(60);
    let mut total = ProcReport::default();
    children.collect_reports(report_deadline, |r| total.add(&r))?;
    children.finish()?;
    Ok((total, cpu_delta(&samples)))
}

/// splitmix64, for per-connection pseudo-random phases and jitter.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
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
    fn connections_are_split_over_processes_without_overlap() {
        let plan = Plan {
            addr: "127.0.0.1:1".parse().unwrap(),
            src_ips: vec![],
            conns: 10,
            proc_index: 0,
            procs: 3,
            threads: 1,
            seconds: 1.0,
            connect_concurrency: 10,
            connect_timeout: 1.0,
            ramp_limit: 1.0,
            work: (),
        };
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
    }
}
