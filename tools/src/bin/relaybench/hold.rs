//! `relaybench hold`: open many idle long-lived connections, keep them for a while with
//! heartbeats, and count what happened to them.
//!
//! Every connection follows the wire protocol's heartbeat rule: a length-0 frame answers the
//! peer's outstanding length-0 frame if there is one, and otherwise asks for an answer. So a
//! connection
//!
//! - sends its own heartbeat (a length-0 frame) every `--heartbeat` seconds, each interval
//!   jittered by `--jitter` (the first one at a random point of the first interval, so the
//!   connections do not beat in step), but never while its previous heartbeat is unanswered
//!   (that one is then counted as `heartbeats_skipped`: sending it anyway would make the two
//!   sides bounce length-0 frames at each other);
//! - treats a length-0 frame from the server as the answer to its outstanding heartbeat if it
//!   has one (`heartbeats_answered`), and otherwise as the server's ping, which it answers with
//!   a length-0 frame (`pings_answered`);
//! - skips any other frame (`data_frames`; the relay sends one only before a protocol close).
//!
//! Scale: connections are spread over `--procs` processes (this binary re-executed with a
//! hidden `--child-plan`, as `relaybench load` does), `--threads` current-thread tokio runtimes
//! per process and `--src-ips` source addresses. Each connection starts answering pings as soon
//! as it is open, so a slow connect ramp cannot make the server time out the first ones. The
//! hold window of `--seconds` starts when every connection of every process has been tried.
//!
//! Memory: a connection is one small task (its socket, one timer and a few words of state, no
//! buffers of its own: reads go through one scratch buffer per thread, and the only bytes it
//! ever writes are zeros from a static buffer). Measured with tokio's per-task and per-socket
//! allocations included: ~1.3-1.6 KB per connection (17 MiB for 10,000 in one process, 191 MiB
//! for 100,000 in eight). `client_rss_kb` reports what the client processes actually used.
//!
//! Output: a short human summary, or with `--json` exactly one JSON object on stdout (the
//! fields of [`Summary`]). A progress line goes to stderr when the hold window starts.

use std::cell::{Cell, RefCell};
use std::io::ErrorKind;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::mpsc;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

use crate::load::engine::{self, sleep_until, Connector, Plan, Threads};
use crate::load::{
    check_addr_and_split, check_limits, cpu_delta, secs_arg, server_cpu_seconds, src_ips_for,
};
use crate::procs::{self, Children};

/// Options of `relaybench hold`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Server address (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: String,
    /// Connections to open (all processes together).
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Length of the hold window in seconds (fractions allowed), after all connections are open.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    /// Seconds between a connection's own heartbeats (0: send none, only answer pings).
    #[arg(long, default_value_t = 30.0)]
    pub heartbeat: f64,
    /// Each heartbeat interval is drawn uniformly from heartbeat x (1 +- jitter).
    #[arg(long, default_value_t = 0.1)]
    pub jitter: f64,
    /// Width in seconds of the buckets that server closes are counted in, by time into the
    /// hold window.
    #[arg(long, default_value_t = 10.0)]
    pub bucket: f64,
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
    /// Connection attempts in flight at once (all processes together).
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Seconds one connection attempt may take.
    #[arg(long, default_value_t = 5.0)]
    pub connect_timeout: f64,
    /// Seconds the whole connect phase may take; connections not open by then count as errors.
    #[arg(long, default_value_t = 180.0)]
    pub ramp_limit: f64,
    /// Server process whose CPU time (with all its descendants, from /proc) is measured over
    /// the hold window; repeatable.
    #[arg(long = "server-pid", value_name = "PID")]
    pub server_pids: Vec<u32>,
    /// Print exactly one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Internal: run as a child process of a `--procs` run with this plan (JSON).
    #[arg(long, hide = true)]
    pub child_plan: Option<String>,
}

/// What one process has to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct HoldPlan {
    /// Address, connections, processes, threads, source addresses, connect limits and
    /// `seconds` (the hold window); the request fields are unused.
    base: Plan,
    /// Seconds between own heartbeats; 0 for none.
    heartbeat: f64,
    jitter: f64,
    bucket: f64,
}

/// Counters of a thread, a process or the whole run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Connections that opened.
    pub opened: u64,
    pub connect_errors: u64,
    /// Connections still open at the end of the hold window.
    pub open_at_end: u64,
    /// Connections the server ended with a FIN (end of stream).
    pub server_closes: u64,
    /// Connections that ended with an error (a reset, usually also the server's doing).
    pub reset_closes: u64,
    /// Of those two, the ones that ended before the hold window started (during the ramp).
    pub closes_during_ramp: u64,
    /// Closes inside the hold window by time into it: entry i counts closes in
    /// `[i * bucket, (i + 1) * bucket)` seconds.
    pub close_buckets: Vec<u64>,
    /// Own heartbeats sent.
    pub heartbeats_sent: u64,
    /// Own heartbeats answered by a length-0 frame.
    pub heartbeats_answered: u64,
    /// Heartbeats not sent because the previous one was still unanswered.
    pub heartbeats_skipped: u64,
    /// Server pings (length-0 frames while no heartbeat of ours was outstanding) answered.
    pub pings_answered: u64,
    /// Frames of non-zero length received (skipped).
    pub data_frames: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.opened += o.opened;
        self.connect_errors += o.connect_errors;
        self.open_at_end += o.open_at_end;
        self.server_closes += o.server_closes;
        self.reset_closes += o.reset_closes;
        self.closes_during_ramp += o.closes_during_ramp;
        if self.close_buckets.len() < o.close_buckets.len() {
            self.close_buckets.resize(o.close_buckets.len(), 0);
        }
        for (a, b) in self.close_buckets.iter_mut().zip(&o.close_buckets) {
            *a += b;
        }
        self.heartbeats_sent += o.heartbeats_sent;
        self.heartbeats_answered += o.heartbeats_answered;
        self.heartbeats_skipped += o.heartbeats_skipped;
        self.pings_answered += o.pings_answered;
        self.data_frames += o.data_frames;
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
    }

    fn note_error(&mut self, msg: impl FnOnce() -> String) {
        if self.first_error.is_none() {
            self.first_error = Some(msg());
        }
    }
}

/// Closes counted in one bucket of the hold window.
#[derive(Debug, Serialize)]
pub struct CloseBucket {
    pub from_secs: f64,
    pub to_secs: f64,
    pub closes: u64,
}

/// The result of a run; with `--json` printed as one object.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub addr: String,
    /// Connections asked for.
    pub conns: usize,
    pub procs: usize,
    pub threads: usize,
    pub src_ips: usize,
    /// Hold window, seconds.
    pub seconds: f64,
    /// Seconds between own heartbeats (0: none).
    pub heartbeat: f64,
    /// Seconds from the start until every connection had been tried (the connect ramp).
    pub ramp_secs: f64,
    /// Connections that opened.
    pub opened: u64,
    pub connect_errors: u64,
    /// Connections still open at the end of the hold window.
    pub open_at_end: u64,
    /// Connections closed by the server (FIN or reset), at any time after they opened.
    pub server_closes: u64,
    /// Of `server_closes`, those that were resets or other errors.
    pub reset_closes: u64,
    /// Of `server_closes`, those before the hold window started.
    pub closes_during_ramp: u64,
    /// Width of the buckets of `closes_by_time`, seconds.
    pub bucket_secs: f64,
    /// Closes inside the hold window by time into it; empty buckets are left out.
    pub closes_by_time: Vec<CloseBucket>,
    pub heartbeats_sent: u64,
    pub heartbeats_answered: u64,
    pub heartbeats_skipped: u64,
    pub pings_answered: u64,
    pub data_frames: u64,
    /// CPU seconds of the client processes over the hold window.
    pub client_cpu_seconds: f64,
    /// Resident memory of the client processes at the end of the hold window, KiB.
    pub client_rss_kb: u64,
    /// CPU seconds of the `--server-pid` processes and their descendants over the hold window.
    pub server_cpu_seconds: Option<f64>,
    /// `server_cpu_seconds` as a percentage of one core over the hold window.
    pub server_cpu_percent: Option<f64>,
    pub first_error: Option<String>,
}

/// What one process measured (what a child process reports at the end of a `--procs` run).
#[derive(Serialize, Deserialize)]
struct ProcReport {
    counters: Counters,
    cpu_seconds: f64,
    rss_kb: u64,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(plan) = &args.child_plan {
        return run_child(plan);
    }
    let plan = make_plan(&args)?;
    check_limits(&plan.base)?;
    let started = Instant::now();
    let mut ramp_secs = 0.0;
    let mut on_start = |c: &Counters| {
        ramp_secs = started.elapsed().as_secs_f64();
        eprintln!(
            "relaybench hold: {} connection(s) opened, {} connect error(s), {} closed by the server, after {ramp_secs:.1} s; holding for {} s",
            c.opened,
            c.connect_errors,
            c.server_closes + c.reset_closes,
            plan.base.seconds
        );
    };
    let (report, server_cpu) = if plan.base.procs == 1 {
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
        run_procs(&plan, &args.server_pids, &mut on_start)?
    };
    let summary = summarize(&plan, &report, ramp_secs, server_cpu);
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_human(&summary);
    }
    if summary.opened == 0 {
        bail!(
            "no connection to {} could be opened: {}",
            summary.addr,
            summary.first_error.as_deref().unwrap_or("unknown error")
        );
    }
    Ok(())
}

fn make_plan(args: &Args) -> Result<HoldPlan> {
    let addr = check_addr_and_split(&args.addr, args.conns, args.threads, args.procs)?;
    if args.connect_concurrency == 0 {
        bail!("--connect-concurrency must be at least 1");
    }
    if !(0.0..1.0).contains(&args.jitter) {
        bail!("--jitter must be at least 0 and below 1");
    }
    let src_ips = src_ips_for(addr, args.src_ips.as_deref())?;
    let base = Plan {
        addr,
        src_ips,
        conns: args.conns,
        proc_index: 0,
        procs: args.procs,
        threads: args.threads,
        size: 0,
        depth: 1,
        rate: None,
        seconds: secs_arg(args.seconds, "--seconds", false)?,
        warmup: 0.0,
        drain: 0.0,
        connect_concurrency: args.connect_concurrency.div_ceil(args.procs),
        connect_timeout: secs_arg(args.connect_timeout, "--connect-timeout", false)?,
        ramp_limit: secs_arg(args.ramp_limit, "--ramp-limit", false)?,
        max_frame: u32::MAX,
    };
    Ok(HoldPlan {
        base,
        heartbeat: secs_arg(args.heartbeat, "--heartbeat", true)?,
        jitter: args.jitter,
        bucket: secs_arg(args.bucket, "--bucket", false)?,
    })
}

/// Resident memory of this process, KiB (0 if unknown).
fn self_rss_kb() -> u64 {
    shmrelay::procfs::rss_kib(None).unwrap_or(0)
}

/// Connects this process's share of the plan and holds it. `gate` is called once every
/// connection attempt has finished, with the connect counters, and returns when the hold may
/// start; `at_window` is called at its start and at its end.
fn run_process(
    plan: &HoldPlan,
    gate: impl FnOnce(&Counters) -> Result<()>,
    mut at_window: impl FnMut(bool),
) -> Result<ProcReport> {
    let mut go_txs = Vec::new();
    let mut stop_txs = Vec::new();
    let threads = Threads::spawn("hold", &plan.base, |share| {
        let (go_tx, go_rx) = oneshot::channel::<Instant>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        go_txs.push(go_tx);
        stop_txs.push(stop_tx);
        let plan = plan.clone();
        move || {
            thread_main(
                &plan,
                share.ids,
                share.concurrency,
                share.ready_tx,
                go_rx,
                stop_rx,
            )
        }
    })?;
    let mut connect = Counters::default();
    let failure = threads
        .wait_ready(|c| connect.add(&c))
        .and_then(|()| gate(&connect))
        .err();
    let mut cpu_seconds = 0.0;
    let mut rss_kb = 0;
    if failure.is_none() {
        let start = Instant::now();
        for tx in go_txs.drain(..) {
            let _ = tx.send(start);
        }
        let cpu0 = engine::self_cpu_seconds();
        at_window(true);
        sleep_until(start + Duration::from_secs_f64(plan.base.seconds));
        cpu_seconds = engine::self_cpu_seconds() - cpu0;
        rss_kb = self_rss_kb();
        at_window(false);
    }
    // Dropping a go sender without sending tells its thread to stop at once.
    drop(go_txs);
    for tx in stop_txs {
        let _ = tx.send(());
    }
    let mut counters = Counters::default();
    threads.join(failure, |c| {
        counters.add(&c);
        Ok(())
    })?;
    Ok(ProcReport {
        counters,
        cpu_seconds,
        rss_kb,
    })
}

/// State of one thread, shared by its connection tasks (current-thread runtime: no locks).
struct ThreadState {
    counters: RefCell<Counters>,
    /// Connections open now.
    open: Cell<u64>,
    /// Connection attempts not finished yet, and the wakeup for when they are.
    attempts_left: Cell<usize>,
    attempts_done: Notify,
    /// Start of the hold window (None during the ramp).
    start: Cell<Option<Instant>>,
    /// One read buffer for all connections of the thread: a read is handled before the next.
    scratch: RefCell<Vec<u8>>,
    heartbeat: Option<Duration>,
    jitter: f64,
    bucket: f64,
}

impl ThreadState {
    fn attempt_done(&self) {
        let left = self.attempts_left.get() - 1;
        self.attempts_left.set(left);
        if left == 0 {
            self.attempts_done.notify_one();
        }
    }

    /// Counts the end of an open connection.
    fn closed(&self, error: Option<String>) {
        self.open.set(self.open.get() - 1);
        let mut c = self.counters.borrow_mut();
        match error {
            None => c.server_closes += 1,
            Some(e) => {
                c.reset_closes += 1;
                c.note_error(|| e);
            }
        }
        match self.start.get() {
            None => c.closes_during_ramp += 1,
            Some(start) => {
                let i = (start.elapsed().as_secs_f64() / self.bucket) as usize;
                if c.close_buckets.len() <= i {
                    c.close_buckets.resize(i + 1, 0);
                }
                c.close_buckets[i] += 1;
            }
        }
    }
}

fn thread_main(
    plan: &HoldPlan,
    ids: Vec<usize>,
    concurrency: usize,
    ready_tx: mpsc::Sender<Counters>,
    go_rx: oneshot::Receiver<Instant>,
    stop_rx: oneshot::Receiver<()>,
) -> Result<Counters> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    let st = Rc::new(ThreadState {
        counters: RefCell::new(Counters::default()),
        open: Cell::new(0),
        attempts_left: Cell::new(ids.len()),
        attempts_done: Notify::new(),
        start: Cell::new(None),
        scratch: RefCell::new(vec![0; 16 * 1024]),
        heartbeat: (plan.heartbeat > 0.0).then(|| Duration::from_secs_f64(plan.heartbeat)),
        jitter: plan.jitter,
        bucket: plan.bucket,
    });
    rt.block_on(local.run_until(async {
        let connector = Rc::new(Connector::new(&plan.base, concurrency));
        let tasks: Vec<_> = ids
            .iter()
            .map(|&id| tokio::task::spawn_local(conn_task(id, connector.clone(), st.clone())))
            .collect();
        if !ids.is_empty() {
            st.attempts_done.notified().await;
        }
        let _ = ready_tx.send(st.counters.borrow().clone());
        if let Ok(start) = go_rx.await {
            st.start.set(Some(start));
            let _ = stop_rx.await;
        }
        st.counters.borrow_mut().open_at_end = st.open.get();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }));
    let c = st.counters.borrow().clone();
    Ok(c)
}

/// One connection: open it, then hold it until the server closes it or the task is aborted.
async fn conn_task(id: usize, connector: Rc<Connector>, st: Rc<ThreadState>) {
    // Boxed so that the connect machinery is freed once open instead of sizing the task.
    let opened = Box::pin(async move { connector.connect(id).await }).await;
    let stream = match opened {
        Ok(s) => {
            st.open.set(st.open.get() + 1);
            st.counters.borrow_mut().opened += 1;
            st.attempt_done();
            s
        }
        Err(e) => {
            let mut c = st.counters.borrow_mut();
            c.connect_errors += 1;
            c.note_error(|| format!("{e:#}"));
            drop(c);
            st.attempt_done();
            return;
        }
    };
    let mut stream = stream;
    let end = hold(id, &mut stream, &st).await;
    st.closed(end.err().map(|e| format!("connection {id}: {e}")));
}

/// Zero bytes: every frame a holding connection sends is a length-0 frame.
static ZEROS: [u8; 64] = [0; 64];

/// A uniform number in [0, 1) from a connection index and a counter.
fn unit(id: usize, n: u64) -> f64 {
    (engine::mix((id as u64) << 32 ^ n) >> 11) as f64 / (1u64 << 53) as f64
}

/// Reads once into the thread's scratch buffer, which is borrowed only inside each poll (never
/// across an await), so every task of the thread can use it; the caller handles the bytes before
/// it awaits again. Reading through `AsyncRead` lets tokio take a short read as "drained", so an
/// event costs one read, not a second one that only says EAGAIN.
async fn read_scratch(rd: &mut ReadHalf<'_>, scratch: &RefCell<Vec<u8>>) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut buf = scratch.borrow_mut();
        let mut rb = ReadBuf::new(&mut buf[..]);
        match Pin::new(&mut *rd).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Holds an open connection; `Ok` when the server ended it with a FIN.
async fn hold(id: usize, stream: &mut TcpStream, st: &ThreadState) -> std::io::Result<()> {
    let (mut rd, wr) = stream.split();
    // Own heartbeat sent and not yet answered.
    let mut outstanding = false;
    // Zero bytes still to write (answers and heartbeats the socket did not take at once).
    let mut pending: usize = 0;
    // Frame parser: header bytes so far, then payload bytes of a data frame left to skip.
    let mut head = [0u8; 4];
    let mut head_len = 0usize;
    let mut skip: u64 = 0;
    let mut beats: u64 = 0;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let first = st.heartbeat.map_or(far, |hb| {
        tokio::time::Instant::now() + hb.mul_f64(unit(id, 0))
    });
    let timer = tokio::time::sleep_until(first);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            biased;
            r = read_scratch(&mut rd, &st.scratch) => {
                let n = r?;
                if n == 0 {
                    return Ok(());
                }
                let buf = st.scratch.borrow();
                let mut c = st.counters.borrow_mut();
                let mut p = 0;
                while p < n {
                    if skip > 0 {
                        let k = skip.min((n - p) as u64);
                        skip -= k;
                        p += k as usize;
                        continue;
                    }
                    head[head_len] = buf[p];
                    head_len += 1;
                    p += 1;
                    if head_len == 4 {
                        head_len = 0;
                        let len = u32::from_be_bytes(head);
                        if len > 0 {
                            c.data_frames += 1;
                            skip = len as u64;
                        } else if outstanding {
                            outstanding = false;
                            c.heartbeats_answered += 1;
                        } else {
                            pending += 4;
                            c.pings_answered += 1;
                        }
                    }
                }
            }
            r = wr.writable(), if pending > 0 => {
                r?; // the write below sends
            }
            _ = &mut timer => {
                beats += 1;
                if outstanding {
                    st.counters.borrow_mut().heartbeats_skipped += 1;
                } else {
                    outstanding = true;
                    pending += 4;
                    st.counters.borrow_mut().heartbeats_sent += 1;
                }
                if let Some(hb) = st.heartbeat {
                    let f = 1.0 + st.jitter * (2.0 * unit(id, beats) - 1.0);
                    timer.as_mut().reset(tokio::time::Instant::now() + hb.mul_f64(f));
                }
            }
        }
        while pending > 0 {
            match wr.try_write(&ZEROS[..pending.min(ZEROS.len())]) {
                Ok(n) => pending -= n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Child side of `--procs`: connect, report ready, wait for "go" on stdin, hold, report.
fn run_child(plan_json: &str) -> Result<()> {
    procs::run_child(plan_json, |plan: HoldPlan, gate| {
        run_process(&plan, gate, |_| {})
    })
}

fn run_procs(
    plan: &HoldPlan,
    server_pids: &[u32],
    on_start: &mut dyn FnMut(&Counters),
) -> Result<(ProcReport, Option<f64>)> {
    let plans = (0..plan.base.procs).map(|i| HoldPlan {
        base: Plan {
            proc_index: i,
            ..plan.base.clone()
        },
        ..plan.clone()
    });
    let mut children = Children::<Counters, ProcReport>::spawn("hold", plans)?;
    // 1. Every child connects (and from then on answers pings); wait for all of them.
    let ready_deadline =
        Instant::now() + Duration::from_secs_f64(plan.base.ramp_limit) + Duration::from_secs(30);
    let mut connect = Counters::default();
    for c in children.wait_ready(ready_deadline)? {
        connect.add(&c);
    }
    on_start(&connect);
    // 2. Go; sample the server over the same window as the children.
    children.go()?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(plan.base.seconds);
    let mut samples = vec![server_cpu_seconds(server_pids)];
    sleep_until(end);
    samples.push(server_cpu_seconds(server_pids));
    // 3. Collect and merge the reports.
    let report_deadline = end + Duration::from_secs(60);
    let mut total = ProcReport {
        counters: Counters::default(),
        cpu_seconds: 0.0,
        rss_kb: 0,
    };
    children.collect_reports(report_deadline, |r| {
        total.counters.add(&r.counters);
        total.cpu_seconds += r.cpu_seconds;
        total.rss_kb += r.rss_kb;
        Ok(())
    })?;
    children.finish()?;
    Ok((total, cpu_delta(&samples)))
}

fn summarize(plan: &HoldPlan, r: &ProcReport, ramp_secs: f64, server_cpu: Option<f64>) -> Summary {
    let c = &r.counters;
    let b = plan.bucket;
    Summary {
        addr: plan.base.addr.to_string(),
        conns: plan.base.conns,
        procs: plan.base.procs,
        threads: plan.base.threads,
        src_ips: plan.base.src_ips.len(),
        seconds: plan.base.seconds,
        heartbeat: plan.heartbeat,
        ramp_secs,
        opened: c.opened,
        connect_errors: c.connect_errors,
        open_at_end: c.open_at_end,
        server_closes: c.server_closes + c.reset_closes,
        reset_closes: c.reset_closes,
        closes_during_ramp: c.closes_during_ramp,
        bucket_secs: b,
        closes_by_time: c
            .close_buckets
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| CloseBucket {
                from_secs: i as f64 * b,
                to_secs: (i + 1) as f64 * b,
                closes: n,
            })
            .collect(),
        heartbeats_sent: c.heartbeats_sent,
        heartbeats_answered: c.heartbeats_answered,
        heartbeats_skipped: c.heartbeats_skipped,
        pings_answered: c.pings_answered,
        data_frames: c.data_frames,
        client_cpu_seconds: r.cpu_seconds,
        client_rss_kb: r.rss_kb,
        server_cpu_seconds: server_cpu,
        server_cpu_percent: server_cpu.map(|s| 100.0 * s / plan.base.seconds),
        first_error: c.first_error.clone(),
    }
}

fn print_human(s: &Summary) {
    println!(
        "relaybench hold: {} | {} conns over {} proc(s) x {} thread(s), {} source address(es) | {} s | heartbeat {} s",
        s.addr, s.conns, s.procs, s.threads, s.src_ips, s.seconds, s.heartbeat
    );
    println!(
        "  connections  opened {} (ramp {:.1} s), connect errors {}, open at the end {}",
        s.opened, s.ramp_secs, s.connect_errors, s.open_at_end
    );
    let by_time: Vec<String> = s
        .closes_by_time
        .iter()
        .map(|b| format!("{}-{} s: {}", b.from_secs, b.to_secs, b.closes))
        .collect();
    println!(
        "  server closes {} (resets {}, during the ramp {}){}{}",
        s.server_closes,
        s.reset_closes,
        s.closes_during_ramp,
        if by_time.is_empty() {
            ""
        } else {
            "; in the window "
        },
        by_time.join(", ")
    );
    println!(
        "  heartbeats sent {}, answered {}, skipped {}; pings answered {}; data frames {}",
        s.heartbeats_sent,
        s.heartbeats_answered,
        s.heartbeats_skipped,
        s.pings_answered,
        s.data_frames
    );
    let server = match (s.server_cpu_seconds, s.server_cpu_percent) {
        (Some(c), Some(p)) => format!("; server {c:.2} s ({p:.2}% of one core)"),
        _ => String::new(),
    };
    println!(
        "  cpu seconds in window: client {:.2}{server}; client rss {} KiB",
        s.client_cpu_seconds, s.client_rss_kb
    );
    if let Some(e) = &s.first_error {
        println!("  first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_merge_buckets_of_different_lengths() {
        let mut a = Counters {
            close_buckets: vec![1, 0, 2],
            opened: 3,
            ..Counters::default()
        };
        let b = Counters {
            close_buckets: vec![0, 0, 1, 0, 5],
            opened: 2,
            first_error: Some("x".into()),
            ..Counters::default()
        };
        a.add(&b);
        assert_eq!(a.close_buckets, [1, 0, 3, 0, 5]);
        assert_eq!(a.opened, 5);
        assert_eq!(a.first_error.as_deref(), Some("x"));
    }

    #[test]
    fn jitter_draws_are_uniform_enough_and_in_range() {
        let v: Vec<f64> = (0..10_000).map(|i| unit(i, 3)).collect();
        assert!(v.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
}
