//! The load engine of one process: OS threads, each with a tokio current-thread runtime, each
//! driving its share of the process's connections.
//!
//! Phases, the same in every thread:
//! 1. **connect**: open the thread's connections, at most `connect_concurrency` at a time per
//!    process (so a burst of SYNs cannot overflow the server's listen backlog), each bound to
//!    its source address first when `--src-ips` is given;
//! 2. **wait for go**: report to the process's coordinator, which (in a child process) reports
//!    to the parent and waits for its go, so all connections of all processes are open before
//!    the first request;
//! 3. **run**: warm-up, measurement window, then a bounded drain of the replies still in
//!    flight. Only replies that arrive inside the window count and are recorded.
//!
//! A connection is one task with one read buffer and one write buffer and no locks: it waits
//! for readiness, reads whatever has arrived, checks every complete reply against the request it
//! answers, and writes the requests that the replies allowed (closed loop) or that the schedule
//! asks for (open loop) in one write.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::WriteHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

/// What one process has to do: the parent builds one per process (children get it as JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub addr: SocketAddr,
    /// Source addresses, used round robin by global connection index (empty: let the kernel pick).
    pub src_ips: Vec<IpAddr>,
    /// Connections of the whole run (all processes).
    pub conns: usize,
    /// This process takes the connections `proc_index, proc_index + procs, ...`.
    pub proc_index: usize,
    pub procs: usize,
    pub threads: usize,
    pub size: u32,
    /// Frames in flight per connection at most.
    pub depth: usize,
    /// Open loop: requests per second of the whole run (None: closed loop).
    pub rate: Option<f64>,
    pub seconds: f64,
    pub warmup: f64,
    pub drain: f64,
    /// Concurrent connection attempts in this process.
    pub connect_concurrency: usize,
    pub connect_timeout: f64,
    /// Connections not open this long after the start of the connect phase count as failed.
    pub ramp_limit: f64,
    /// Largest reply payload accepted.
    pub max_frame: u32,
}

impl Plan {
    /// Global indices of this process's connections.
    pub fn conn_ids(&self) -> Vec<usize> {
        (self.proc_index..self.conns)
            .step_by(self.procs.max(1))
            .collect()
    }
}

/// Counters of a thread, a process or the whole run (added up with [`Counters::add`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Connections open when the run started.
    pub connected: u64,
    pub connect_errors: u64,
    /// Resets and other I/O errors on open connections.
    pub io_errors: u64,
    /// The server closed a connection before the end of the run or with replies outstanding.
    pub early_closes: u64,
    /// A reply announced a length above `--max-frame`: the stream cannot be followed after it.
    pub protocol_errors: u64,
    /// Replies that are not the byte-for-byte echo of the request they answer (or answer none).
    pub mismatches: u64,
    /// Replies received inside the measurement window (each recorded in the histogram).
    pub requests: u64,
    /// All requests sent and all replies received, warm-up and drain included.
    pub sent: u64,
    pub replies: u64,
    /// Requests still unanswered when the drain time ran out.
    pub unanswered: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

impl Counters {
    pub fn errors(&self) -> u64 {
        self.connect_errors + self.io_errors + self.early_closes + self.protocol_errors
    }

    pub fn add(&mut self, o: &Counters) {
        self.connected += o.connected;
        self.connect_errors += o.connect_errors;
        self.io_errors += o.io_errors;
        self.early_closes += o.early_closes;
        self.protocol_errors += o.protocol_errors;
        self.mismatches += o.mismatches;
        self.requests += o.requests;
        self.sent += o.sent;
        self.replies += o.replies;
        self.unanswered += o.unanswered;
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

/// Latency histogram in microseconds, 1 us to 1 h, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What one process measured.
pub struct ProcReport {
    pub counters: Counters,
    pub hist: Histogram<u64>,
    /// CPU seconds (user + system) this process used inside the measurement window.
    pub cpu_seconds: f64,
}

/// Times of the run phase, shared by the threads of a process.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    measure_start: Instant,
    measure_end: Instant,
    drain_end: Instant,
}

impl Window {
    fn new(plan: &Plan, start: Instant) -> Window {
        let measure_start = start + Duration::from_secs_f64(plan.warmup);
        let measure_end = measure_start + Duration::from_secs_f64(plan.seconds);
        Window {
            start,
            measure_start,
            measure_end,
            drain_end: measure_end + Duration::from_secs_f64(plan.drain),
        }
    }
}

/// CPU seconds used so far by this process (all threads).
pub fn self_cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => 0.0,
    }
}

/// The OS threads of one process: thread `t` of `n` takes the process's connections
/// `t, t + n, ...` and its share of the connect concurrency, and reports its connect counters
/// (`C`) once its connection attempts are done; it ends with a `T`.
pub(crate) struct Threads<C, T> {
    /// For thread names and messages: "load" or "hold".
    kind: &'static str,
    handles: Vec<std::thread::JoinHandle<Result<T>>>,
    ready_rx: mpsc::Receiver<C>,
}

/// What one thread of [`Threads`] is given.
pub(crate) struct ThreadShare<C> {
    /// Global indices of its connections.
    pub ids: Vec<usize>,
    /// Its connection attempts in flight at once.
    pub concurrency: usize,
    /// Where it sends its connect counters once every attempt is done.
    pub ready_tx: mpsc::Sender<C>,
}

impl<C, T: Send + 'static> Threads<C, T> {
    /// Starts `plan.threads` threads (no more than there are connections); `make` turns each
    /// thread's share into the function the thread runs.
    pub(crate) fn spawn<F>(
        kind: &'static str,
        plan: &Plan,
        mut make: impl FnMut(ThreadShare<C>) -> F,
    ) -> Result<Self>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let ids = plan.conn_ids();
        let threads = plan.threads.clamp(1, ids.len().max(1));
        let concurrency = plan.connect_concurrency.div_ceil(threads).max(1);
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut handles = Vec::new();
        for t in 0..threads {
            let body = make(ThreadShare {
                ids: ids.iter().skip(t).step_by(threads).copied().collect(),
                concurrency,
                ready_tx: ready_tx.clone(),
            });
            let h = std::thread::Builder::new()
                .name(format!("{kind}-{t}"))
                .spawn(body)
                .with_context(|| format!("cannot start a {kind} thread"))?;
            handles.push(h);
        }
        Ok(Threads {
            kind,
            handles,
            ready_rx,
        })
    }

    /// Waits for every thread's connect counters, handing them to `each`; an error if a thread
    /// ended before it sent them.
    pub(crate) fn wait_ready(&self, mut each: impl FnMut(C)) -> Result<()> {
        for _ in 0..self.handles.len() {
            match self.ready_rx.recv() {
                Ok(c) => each(c),
                Err(_) => bail!("a {} thread failed while connecting", self.kind),
            }
        }
        Ok(())
    }

    /// Waits for every thread to end and hands its result to `merge`. The error is `failure`
    /// (what went wrong before) if any, else the first error of a thread or of `merge`.
    pub(crate) fn join(
        self,
        mut failure: Option<anyhow::Error>,
        mut merge: impl FnMut(T) -> Result<()>,
    ) -> Result<()> {
        for h in self.handles {
            match h.join() {
                Ok(Ok(r)) => merge(r)?,
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => failure = failure.or(Some(anyhow!("a {} thread panicked", self.kind))),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Runs this process's share of the plan. `gate` is called once every connection attempt has
/// finished, with the connect counters, and returns when the run may start (a child process
/// reports to its parent and waits for the go there). `at_window` is called at the start and
/// at the end of the measurement window (the caller samples server CPU there).
pub fn run_process(
    plan: &Plan,
    gate: impl FnOnce(&Counters) -> Result<()>,
    mut at_window: impl FnMut(bool),
) -> Result<ProcReport> {
    let mut go_txs = Vec::new();
    let threads = Threads::spawn("load", plan, |share| {
        let (go_tx, go_rx) = mpsc::channel::<Option<Instant>>();
        go_txs.push(go_tx);
        let plan = plan.clone();
        move || thread_main(&plan, share.ids, share.concurrency, share.ready_tx, go_rx)
    })?;
    let mut connect = Counters::default();
    let failure = threads
        .wait_ready(|c| connect.add(&c))
        .and_then(|()| gate(&connect))
        .err();
    let start = Instant::now();
    for tx in &go_txs {
        let _ = tx.send(if failure.is_some() { None } else { Some(start) });
    }
    let mut cpu_seconds = 0.0;
    if failure.is_none() {
        let w = Window::new(plan, start);
        sleep_until(w.measure_start);
        let cpu0 = self_cpu_seconds();
        at_window(true);
        sleep_until(w.measure_end);
        cpu_seconds = self_cpu_seconds() - cpu0;
        at_window(false);
    }

    let mut counters = Counters::default();
    let mut hist = new_histogram();
    threads.join(failure, |(c, th)| {
        counters.add(&c);
        hist.add(&th)
            .map_err(|e| anyhow!("cannot merge histograms: {e:?}"))
    })?;
    Ok(ProcReport {
        counters,
        hist,
        cpu_seconds,
    })
}

pub(crate) fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn thread_main(
    plan: &Plan,
    ids: Vec<usize>,
    concurrency: usize,
    ready_tx: mpsc::Sender<Counters>,
    go_rx: mpsc::Receiver<Option<Instant>>,
) -> Result<(Counters, Histogram<u64>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    let (conns, connect) = rt.block_on(local.run_until(connect_all(plan, &ids, concurrency)));
    let _ = ready_tx.send(connect.clone());
    let Ok(Some(start)) = go_rx.recv() else {
        return Ok((connect, new_histogram()));
    };
    let stats = Rc::new(RefCell::new(Stats {
        counters: connect,
        hist: new_histogram(),
    }));
    let shared = Rc::new(Shared::new(plan, Window::new(plan, start)));
    rt.block_on(local.run_until(async {
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|(id, stream)| {
                tokio::task::spawn_local(drive(id, stream, shared.clone(), stats.clone()))
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }));
    drop(shared);
    let stats = Rc::try_unwrap(stats)
        .map_err(|_| anyhow!("connection tasks outlived the run"))?
        .into_inner();
    Ok((stats.counters, stats.hist))
}

async fn connect_all(
    plan: &Plan,
    ids: &[usize],
    concurrency: usize,
) -> (Vec<(usize, TcpStream)>, Counters) {
    let connector = Rc::new(Connector::new(plan, concurrency));
    let tasks: Vec<_> = ids
        .iter()
        .map(|&id| {
            let connector = connector.clone();
            tokio::task::spawn_local(async move { connector.connect(id).await })
        })
        .collect();
    let mut conns = Vec::with_capacity(ids.len());
    let mut c = Counters::default();
    for (t, &id) in tasks.into_iter().zip(ids) {
        match t.await {
            Ok(Ok(s)) => {
                conns.push((id, s));
                c.connected += 1;
            }
            Ok(Err(e)) => {
                c.connect_errors += 1;
                c.note_error(|| format!("{e:#}"));
            }
            Err(e) => {
                c.connect_errors += 1;
                c.note_error(|| format!("connect task failed: {e}"));
            }
        }
    }
    (conns, c)
}

/// The connect phase of one thread: its limits, shared by its connection attempts.
pub(crate) struct Connector {
    addr: SocketAddr,
    /// Source addresses, used round robin by global connection index (empty: any).
    src_ips: Vec<IpAddr>,
    /// Attempts in flight at once.
    sem: Semaphore,
    /// End of the connect phase (`--ramp-limit` after the connector was made).
    ramp_end: tokio::time::Instant,
    /// Time one attempt may take (`--connect-timeout`).
    per_connect: Duration,
}

impl Connector {
    /// Starts the connect phase: `concurrency` attempts at a time, all done within
    /// `plan.ramp_limit` from now.
    pub(crate) fn new(plan: &Plan, concurrency: usize) -> Connector {
        Connector {
            addr: plan.addr,
            src_ips: plan.src_ips.clone(),
            sem: Semaphore::new(concurrency),
            ramp_end: tokio::time::Instant::now() + Duration::from_secs_f64(plan.ramp_limit),
            per_connect: Duration::from_secs_f64(plan.connect_timeout),
        }
    }

    /// Opens connection `id` (global index) once an attempt slot is free, from its source
    /// address if there are any.
    pub(crate) async fn connect(&self, id: usize) -> Result<TcpStream> {
        let addr = self.addr;
        let src = (!self.src_ips.is_empty()).then(|| self.src_ips[id % self.src_ips.len()]);
        let attempt = async {
            let _permit = self.sem.acquire().await.map_err(|e| anyhow!("{e}"))?;
            let deadline = (tokio::time::Instant::now() + self.per_connect).min(self.ramp_end);
            match tokio::time::timeout_at(deadline, connect_one(addr, src)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!("connect to {addr} timed out")),
            }
        };
        match tokio::time::timeout_at(self.ramp_end, attempt).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("connection not open within --ramp-limit")),
        }
    }
}

async fn connect_one(addr: SocketAddr, src: Option<IpAddr>) -> Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create a socket")?;
    if let Some(ip) = src {
        set_bind_address_no_port(&sock);
        sock.bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("cannot bind source address {ip}"))?;
    }
    let stream = sock.connect(addr).await.with_context(|| match src {
        Some(ip) => format!("connect {ip} -> {addr}"),
        None => format!("connect {addr}"),
    })?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Without IP_BIND_ADDRESS_NO_PORT, bind(ip, 0) reserves an ephemeral port for every
/// destination, capping a source address at ~28K connections in total instead of per
/// destination; with it the port is chosen at connect time from the whole 4-tuple.
fn set_bind_address_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: the fd is a valid open socket owned by `sock` for the duration of the call, and
    // the option value points to a live c_int whose size is passed alongside it.
    let _ = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Per-thread figures; connection tasks of a thread share them (current-thread runtime).
struct Stats {
    counters: Counters,
    hist: Histogram<u64>,
}

/// Read-only settings of the run phase, per thread.
struct Shared {
    w: Window,
    size: usize,
    depth: usize,
    max_frame: u32,
    /// Open loop: time between two requests of one connection.
    interval: Option<Duration>,
    /// Payload bytes after the sequence stamp (same for every request).
    pattern: Vec<u8>,
}

impl Shared {
    fn new(plan: &Plan, w: Window) -> Shared {
        let size = plan.size as usize;
        let interval = plan
            .rate
            .map(|r| Duration::from_secs_f64(plan.conns as f64 / r));
        let pattern = (0..size)
            .map(|i| (i.wrapping_mul(131).wrapping_add(17) as u8) ^ 0x5a)
            .collect();
        Shared {
            w,
            size,
            depth: plan.depth.max(1),
            max_frame: plan.max_frame,
            interval,
            pattern,
        }
    }
}

/// The first `min(8, size)` payload bytes of request `seq` on connection `id`: the sequence
/// number in the low bytes, the connection in the high ones (little endian). The rest of the
/// payload is [`Shared::pattern`]. A reply that is not the echo of the oldest outstanding
/// request of its own connection fails the comparison.
fn stamp(id: usize, seq: u64) -> [u8; 8] {
    (((id as u64) << 40) ^ (seq & ((1u64 << 40) - 1))).to_le_bytes()
}

/// splitmix64, for the per-connection phase of the open-loop schedule.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// How a connection ended when it did not end cleanly.
enum ConnError {
    Io(std::io::Error),
    EarlyClose,
    Protocol(u32),
}

struct Conn {
    id: usize,
    next_seq: u64,
    expect_seq: u64,
    /// Intended send times of the requests in flight, oldest first.
    inflight: VecDeque<Instant>,
    /// Open loop: intended send times that are due but wait for room under `--depth`.
    backlog: VecDeque<Instant>,
    /// Open loop: the next intended send time.
    next_due: Instant,
    wbuf: Vec<u8>,
    wpos: usize,
    rbuf: Vec<u8>,
    rlen: usize,
    /// False once the measurement window is over: no new requests.
    sending: bool,
    /// The end timer has fired once and now stands for the end of the drain.
    draining: bool,
}

/// First read buffer of a connection; it doubles (up to [`MAX_READ_BUF`]) while reads fill it.
const READ_BUF: usize = 4 * 1024;
const MAX_READ_BUF: usize = 256 * 1024;

async fn drive(id: usize, mut stream: TcpStream, sh: Rc<Shared>, st: Rc<RefCell<Stats>>) {
    let mut c = Conn {
        id,
        next_seq: 0,
        expect_seq: 0,
        inflight: VecDeque::with_capacity(sh.depth.min(1024)),
        backlog: VecDeque::new(),
        next_due: sh.w.start,
        wbuf: Vec::new(),
        wpos: 0,
        rbuf: vec![0; READ_BUF.max(sh.size + 4).min(MAX_READ_BUF)],
        rlen: 0,
        sending: true,
        draining: false,
    };
    let result = c.run(&mut stream, &sh, &st).await;
    let mut st = st.borrow_mut();
    let counters = &mut st.counters;
    match result {
        Ok(()) => {}
        Err(ConnError::Io(e)) => {
            counters.io_errors += 1;
            counters.note_error(|| format!("connection {id}: {e}"));
        }
        Err(ConnError::EarlyClose) => {
            counters.early_closes += 1;
            counters.note_error(|| format!("connection {id}: closed by the server during the run"));
        }
        Err(ConnError::Protocol(len)) => {
            counters.protocol_errors += 1;
            counters
                .note_error(|| format!("connection {id}: reply length {len} is above --max-frame"));
        }
    }
    counters.unanswered += c.inflight.len() as u64;
    counters.sent += c.next_seq;
}

impl Conn {
    async fn run(
        &mut self,
        stream: &mut TcpStream,
        sh: &Shared,
        st: &RefCell<Stats>,
    ) -> Result<(), ConnError> {
        // Reading through the AsyncRead half lets tokio treat a short read as "drained" and
        // skip the extra read that would only return EAGAIN: one read, one write and (amortized)
        // one epoll_wait per batch of replies.
        let (mut rd, wr) = stream.split();
        let open_loop = sh.interval.is_some();
        if let Some(iv) = sh.interval {
            // Spread the connections' schedules over one interval.
            let frac = (mix(self.id as u64) >> 11) as f64 / (1u64 << 53) as f64;
            self.next_due = sh.w.start + iv.mul_f64(frac);
        } else {
            for _ in 0..sh.depth {
                self.enqueue(sh, sh.w.start);
            }
        }
        let end = tokio::time::sleep_until(sh.w.measure_end.into());
        tokio::pin!(end);
        let tick = tokio::time::sleep_until(self.next_due.into());
        tokio::pin!(tick);
        loop {
            self.flush(&wr)?;
            if !self.sending && self.inflight.is_empty() {
                return Ok(());
            }
            if self.rlen == self.rbuf.len() {
                // Never read into an empty slice: that would look like end of stream.
                let len = self.rbuf.len();
                self.rbuf.resize(len * 2, 0);
            }
            let pending_write = self.wpos < self.wbuf.len();
            let free = self.rbuf.len() - self.rlen;
            tokio::select! {
                biased;
                r = rd.read(&mut self.rbuf[self.rlen..]) => {
                    self.on_read(r, free, sh, st)?;
                }
                w = wr.writable(), if pending_write => {
                    w.map_err(ConnError::Io)?; // the flush at the top of the loop writes
                }
                _ = &mut tick, if open_loop && self.sending => {
                    let iv = sh.interval.unwrap_or_default();
                    let now = Instant::now();
                    while self.next_due <= now && self.next_due < sh.w.measure_end {
                        self.backlog.push_back(self.next_due);
                        self.next_due += iv;
                    }
                    self.pump(sh);
                    if self.next_due >= sh.w.measure_end {
                        // The schedule is done: no more sends (also disarms this branch, which
                        // would otherwise fire forever and, being biased first, starve `end`).
                        self.sending = false;
                        self.backlog.clear();
                    } else {
                        tick.as_mut().reset(self.next_due.into());
                    }
                }
                _ = &mut end => {
                    if !self.draining {
                        self.draining = true;
                        self.sending = false;
                        self.backlog.clear();
                        end.as_mut().reset(sh.w.drain_end.into());
                    } else {
                        return Ok(()); // drain time is up; what is in flight counts as unanswered
                    }
                }
            }
        }
    }

    /// Appends request `next_seq` to the write buffer, `intended` being its intended send time.
    fn enqueue(&mut self, sh: &Shared, intended: Instant) {
        let k = sh.size.min(8);
        self.wbuf.extend_from_slice(&(sh.size as u32).to_be_bytes());
        self.wbuf
            .extend_from_slice(&stamp(self.id, self.next_seq)[..k]);
        self.wbuf.extend_from_slice(&sh.pattern[k..]);
        self.next_seq += 1;
        self.inflight.push_back(intended);
    }

    /// Open loop: sends due requests while there is room under `--depth`.
    fn pump(&mut self, sh: &Shared) {
        while self.inflight.len() < sh.depth {
            match self.backlog.pop_front() {
                Some(t) => self.enqueue(sh, t),
                None => break,
            }
        }
    }

    /// Writes as much of the write buffer as the socket takes now.
    fn flush(&mut self, stream: &WriteHalf<'_>) -> Result<(), ConnError> {
        while self.wpos < self.wbuf.len() {
            match stream.try_write(&self.wbuf[self.wpos..]) {
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        } else if self.wpos >= 64 * 1024 {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        Ok(())
    }

    /// Handles the outcome of one read of up to `free` bytes into `rbuf[rlen..]`.
    fn on_read(
        &mut self,
        read: std::io::Result<usize>,
        free: usize,
        sh: &Shared,
        st: &RefCell<Stats>,
    ) -> Result<(), ConnError> {
        let n = match read {
            Ok(0) => {
                return if self.sending || !self.inflight.is_empty() {
                    Err(ConnError::EarlyClose)
                } else {
                    Ok(())
                };
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                return Ok(())
            }
            Err(e) => return Err(ConnError::Io(e)),
        };
        self.rlen += n;
        if n == free && self.rbuf.len() < MAX_READ_BUF {
            // Replies arrive faster than one buffer per read: read bigger batches.
            let len = self.rbuf.len();
            self.rbuf.resize(len * 2, 0);
        }
        let now = Instant::now();
        let in_window = now >= sh.w.measure_start && now < sh.w.measure_end;
        if now >= sh.w.measure_end {
            self.sending = false;
        }
        let mut pos = 0;
        let mut stats = st.borrow_mut();
        let Stats { counters, hist } = &mut *stats;
        let mut answered = 0usize;
        while self.rlen - pos >= 4 {
            let b = &self.rbuf[pos..pos + 4];
            let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            if len > sh.max_frame {
                return Err(ConnError::Protocol(len));
            }
            let end = pos + 4 + len as usize;
            if end > self.rlen {
                if end - pos > self.rbuf.len() {
                    // Make room for the whole frame after compaction below.
                    let need = end - pos;
                    self.rbuf.copy_within(pos..self.rlen, 0);
                    self.rlen -= pos;
                    pos = 0;
                    self.rbuf.resize(need, 0);
                }
                break;
            }
            let payload = &self.rbuf[pos + 4..end];
            counters.replies += 1;
            match self.inflight.pop_front() {
                None => counters.mismatches += 1, // a frame nobody asked for
                Some(intended) => {
                    let k = sh.size.min(8);
                    let ok = payload.len() == sh.size
                        && payload[..k] == stamp(self.id, self.expect_seq)[..k]
                        && payload[k..] == sh.pattern[k..];
                    self.expect_seq += 1;
                    answered += 1;
                    if !ok {
                        counters.mismatches += 1;
                        counters.note_error(|| {
                            format!(
                                "connection {}: reply {} is not the echo of its request",
                                self.id,
                                self.expect_seq - 1
                            )
                        });
                    }
                    if in_window {
                        counters.requests += 1;
                        let us = now.saturating_duration_since(intended).as_micros() as u64;
                        hist.saturating_record(us.max(1));
                    }
                }
            }
            pos = end;
        }
        if pos > 0 {
            self.rbuf.copy_within(pos..self.rlen, 0);
            self.rlen -= pos;
        }
        drop(stats);
        if self.sending {
            if sh.interval.is_some() {
                self.pump(sh);
            } else {
                for _ in 0..answered {
                    self.enqueue(sh, now);
                }
            }
        }
        Ok(())
    }
}
