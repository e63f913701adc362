//! `relaybench load`: a load generator for the length-prefixed wire protocol (or WebSocket,
//! `--codec websocket`: [`crate::ws`]), a workload of the one load engine ([`crate::engine`]:
//! connections, processes, threads, source addresses and the measured window are its
//! business).
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
//! All connections of all processes are open before the first request is sent. Only replies
//! that arrive inside the window count and are recorded; after it, a bounded drain
//! (`--drain`) collects the replies still in flight.
//!
//! A connection is one task with one read buffer and one write buffer and no locks: it waits
//! for readiness, reads whatever has arrived, checks every complete reply against the request it
//! answers, and writes the requests that the replies allowed (closed loop) or that the schedule
//! asks for (open loop) in one write.
//!
//! Output: a short human summary, or with `--json` exactly one JSON object on stdout (fields
//! listed on [`Summary`]).

use std::cell::{OnceCell, RefCell};
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::WriteHalf;
use tokio::net::TcpStream;

use crate::engine::{
    self, counters, mix, secs_arg, Base, Common, ConnArgs, Defaults, Plan, Start, Window,
};
use crate::ws::{self, MessageKind, Next, Wire, WireCodec};

/// Options of `relaybench load`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Payload bytes per frame (0: every frame is a heartbeat).
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Frames in flight per connection [default: 1 in closed loop, unlimited with --rate].
    #[arg(long)]
    pub depth: Option<usize>,
    /// Seconds of load before the window, not counted.
    #[arg(long, default_value_t = 0.5)]
    pub warmup: f64,
    /// Open loop: target requests per second in total; latency from the intended send time.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds to wait after the window for replies still in flight (then: `unanswered`).
    #[arg(long, default_value_t = 1.0)]
    pub drain: f64,
    /// Largest reply payload accepted; a longer reply length is a protocol error.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_frame: u32,
    /// Wire codec: length-prefixed frames, or WebSocket (handshake, then masked frames).
    #[arg(long, value_enum, default_value = "length-prefixed")]
    pub codec: WireCodec,
    /// WebSocket: the kind of the messages sent (text payloads are ASCII).
    #[arg(long, value_enum, default_value = "binary")]
    pub ws_kind: MessageKind,
    /// WebSocket: the request path of the handshake.
    #[arg(long, default_value = "/")]
    pub ws_path: String,
}

/// What every connection of a `load` run does (part of the plan children get).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Echo {
    size: u32,
    /// Frames in flight per connection at most.
    depth: usize,
    /// Open loop: requests per second of the whole run (None: closed loop).
    rate: Option<f64>,
    warmup: f64,
    drain: f64,
    /// Largest reply payload accepted.
    max_frame: u32,
    /// What the connections speak.
    wire: Wire,
}

counters! {
    /// Counters of a thread, a process or the whole run.
    Counters {
        /// Resets and other I/O errors on open connections.
        io_errors,
        /// The server closed a connection before the end of the run or with replies
        /// outstanding.
        early_closes,
        /// A reply announced a length above `--max-frame`: the stream cannot be followed after
        /// it.
        protocol_errors,
        /// Replies that are not the byte-for-byte echo of the request they answer (or answer
        /// none).
        mismatches,
        /// Replies received inside the measurement window (each recorded in the histogram).
        requests,
        /// All requests sent, warm-up and drain included.
        sent,
        /// All replies received, warm-up and drain included.
        replies,
        /// Requests still unanswered when the drain time ran out.
        unanswered,
    }
}

impl Counters {
    pub fn errors(&self) -> u64 {
        self.base.connect_errors + self.io_errors + self.early_closes + self.protocol_errors
    }
}

/// What a thread, a process or the run measured: counters and the latency histogram (which a
/// child sends V2-serialized, in hex).
#[derive(Clone, Serialize, Deserialize)]
pub struct Stats {
    counters: Counters,
    #[serde(with = "hist_hex")]
    hist: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            counters: Counters::default(),
            hist: new_histogram(),
        }
    }
}

impl engine::Tally for Stats {
    fn add(&mut self, o: &Stats) -> Result<()> {
        self.counters.add(&o.counters);
        self.hist
            .add(&o.hist)
            .map_err(|e| anyhow!("cannot merge histograms: {e:?}"))
    }

    fn base(&self) -> &Base {
        &self.counters.base
    }

    fn base_mut(&mut self) -> &mut Base {
        &mut self.counters.base
    }
}

/// Latency histogram in microseconds, 1 us to 1 h, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// A thread of a `load` run.
pub struct LoadThread {
    work: Echo,
    conns: usize,
    /// The server's address, for the WebSocket handshake's Host header.
    host: String,
    stats: RefCell<Stats>,
    /// Settings of the run phase, made at the start (they hold its window).
    shared: OnceCell<Shared>,
}

impl engine::Workload for Echo {
    type Tally = Stats;
    type Thread = LoadThread;
    const NAME: &'static str = "load";
    // A request/reply connection finishes its own drain; nothing is left to cut.
    const ENDS_ITSELF: bool = true;
    const DEFAULTS: Defaults = Defaults {
        conns: 100,
        seconds: 5.0,
        ramp_limit: 60.0,
    };

    fn warmup(&self) -> f64 {
        self.warmup
    }

    fn drain(&self) -> f64 {
        self.drain
    }

    fn thread(plan: &Plan<Echo>) -> LoadThread {
        LoadThread {
            work: plan.work.clone(),
            conns: plan.conns,
            host: plan.addr.to_string(),
            stats: RefCell::new(Stats::default()),
            shared: OnceCell::new(),
        }
    }

    fn tally(th: &LoadThread) -> &RefCell<Stats> {
        &th.stats
    }

    async fn conn(th: Rc<LoadThread>, start: Rc<Start>, id: usize, mut stream: TcpStream) {
        let wire = &th.work.wire;
        if wire.codec == WireCodec::Websocket {
            // During the connect phase: the run starts with every connection upgraded.
            let host = th.host.as_str();
            if let Err(e) = ws::handshake(&mut stream, host, &wire.path, id).await {
                let mut st = th.stats.borrow_mut();
                st.counters.io_errors += 1;
                st.counters.note_error(|| format!("connection {id}: {e}"));
                return;
            }
        }
        let w = start.wait().await;
        let sh = th.shared.get_or_init(|| Shared::new(&th.work, th.conns, w));
        drive(id, stream, sh, &th.stats).await;
    }
}

/// The result of a run; with `--json` printed as one object.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Address, connections asked for, processes, threads, source addresses, window, connect
    /// errors, CPU seconds of client and server, first error.
    #[serde(flatten)]
    pub run: Common,
    /// Connections open when the run started.
    pub connected: u64,
    pub size: u32,
    /// "length-prefixed" or "websocket".
    pub codec: WireCodec,
    /// WebSocket: "text" or "binary" (null for length-prefixed).
    pub ws_kind: Option<MessageKind>,
    /// Frames in flight per connection at most (null: unlimited).
    pub depth: Option<usize>,
    /// "closed" or "open".
    pub mode: &'static str,
    /// Open loop: target requests per second.
    pub rate: Option<f64>,
    pub warmup: f64,
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
    pub io_errors: u64,
    pub early_closes: u64,
    pub protocol_errors: u64,
    /// Replies that were not the echo of their request.
    pub mismatches: u64,
    pub sent: u64,
    pub replies: u64,
    pub unanswered: u64,
    /// Requests per server CPU second (efficiency).
    pub req_per_server_cpu_sec: Option<f64>,
}

pub fn run(args: Args) -> Result<()> {
    let work = make_work(&args)?;
    let Some(out) = engine::run(&args.conn, work)? else {
        return Ok(()); // a child of a --procs run
    };
    out.print(args.conn.json, &summarize(&out), print_human)
}

/// Checks the flags of the echo load.
fn make_work(args: &Args) -> Result<Echo> {
    if args.size > args.max_frame {
        bail!(
            "--size {} is above --max-frame {}",
            args.size,
            args.max_frame
        );
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
    Ok(Echo {
        size: args.size,
        depth,
        rate: args.rate,
        warmup: secs_arg(args.warmup, "--warmup", true)?,
        drain: secs_arg(args.drain, "--drain", true)?,
        max_frame: args.max_frame,
        wire: Wire {
            codec: args.codec,
            kind: args.ws_kind,
            path: args.ws_path.clone(),
        },
    })
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

/// Serde for a histogram as the hex of its V2 serialization (children's reports).
mod hist_hex {
    use hdrhistogram::Histogram;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hist_to_hex(h).map_err(serde::ser::Error::custom)?)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        super::hist_from_hex(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

fn summarize(out: &engine::Outcome<Echo>) -> Summary {
    let (plan, work) = (&out.plan, &out.plan.work);
    let (c, h) = (&out.report.tally.counters, &out.report.tally.hist);
    let q = |p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    let req_per_sec = c.requests as f64 / plan.seconds;
    Summary {
        run: out.common(),
        connected: c.base.connected,
        size: work.size,
        codec: work.wire.codec,
        ws_kind: (work.wire.codec == WireCodec::Websocket).then_some(work.wire.kind),
        depth: (work.depth != usize::MAX).then_some(work.depth),
        mode: if work.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        rate: work.rate,
        warmup: work.warmup,
        requests: c.requests,
        req_per_sec,
        bytes_per_sec: req_per_sec * work.size as f64,
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: h.max(),
        mean_us: if h.is_empty() { 0.0 } else { h.mean() },
        errors: c.errors(),
        io_errors: c.io_errors,
        early_closes: c.early_closes,
        protocol_errors: c.protocol_errors,
        mismatches: c.mismatches,
        sent: c.sent,
        replies: c.replies,
        unanswered: c.unanswered,
        req_per_server_cpu_sec: out
            .server_cpu
            .filter(|s| *s > 0.0)
            .map(|s| c.requests as f64 / s),
    }
}

fn print_human(s: &Summary) {
    let r = &s.run;
    let depth = s
        .depth
        .map_or_else(|| "unlimited".to_string(), |d| d.to_string());
    let mode = match s.rate {
        Some(r) => format!("open loop at {r} req/s"),
        None => "closed loop".to_string(),
    };
    println!(
        "relaybench load: {} | {} conns ({} open) | {} B payloads | depth {depth} | {mode} | {} s (+{} s warm-up) | {} proc(s) x {} thread(s)",
        r.addr, r.conns, s.connected, s.size, r.seconds, s.warmup, r.procs, r.threads
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
        s.errors, r.connect_errors, s.io_errors, s.early_closes, s.protocol_errors, s.mismatches, s.unanswered
    );
    let server = match (r.server_cpu_seconds, s.req_per_server_cpu_sec) {
        (Some(c), Some(e)) => format!("; server {c:.2} s ({e:.0} req per CPU-second)"),
        (Some(c), None) => format!("; server {c:.2} s"),
        _ => String::new(),
    };
    println!(
        "  cpu seconds in window: client {:.2}{server}",
        r.client_cpu_seconds
    );
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
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
    wire: Wire,
}

impl Shared {
    fn new(work: &Echo, conns: usize, w: Window) -> Shared {
        let size = work.size as usize;
        let interval = work.rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
        let text = work.wire.text();
        let pattern = (0..size)
            .map(|i| match text {
                true => b'a' + (i % 26) as u8,
                false => (i.wrapping_mul(131).wrapping_add(17) as u8) ^ 0x5a,
            })
            .collect();
        Shared {
            w,
            size,
            depth: work.depth.max(1),
            max_frame: work.max_frame,
            interval,
            pattern,
            wire: work.wire.clone(),
        }
    }

    /// [`stamp`], in ASCII for text messages.
    fn stamp(&self, id: usize, seq: u64) -> [u8; 8] {
        match self.wire.text() {
            true => ws::ascii(stamp(id, seq)),
            false => stamp(id, seq),
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

/// How a connection ended when it did not end cleanly.
enum ConnError {
    Io(std::io::Error),
    EarlyClose,
    Protocol(u64),
    /// A WebSocket frame the client cannot follow.
    Ws(&'static str),
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

async fn drive(id: usize, mut stream: TcpStream, sh: &Shared, st: &RefCell<Stats>) {
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
    let result = c.run(&mut stream, sh, st).await;
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
        Err(ConnError::Ws(what)) => {
            counters.protocol_errors += 1;
            counters.note_error(|| format!("connection {id}: {what}"));
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
        let key = ws::mask_key(self.id, self.next_seq);
        let key = sh.wire.header(&mut self.wbuf, sh.size, key);
        let at = self.wbuf.len();
        self.wbuf
            .extend_from_slice(&sh.stamp(self.id, self.next_seq)[..k]);
        self.wbuf.extend_from_slice(&sh.pattern[k..]);
        if let Some(key) = key {
            ws::mask(&mut self.wbuf[at..], key);
        }
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
        loop {
            let (hdr, len, reply, ping) =
                match sh.wire.next(&self.rbuf[pos..self.rlen], sh.max_frame) {
                    Next::Need => break,
                    Next::Data { hdr, len } => (hdr, len, true, false),
                    Next::Ping { hdr, len } => (hdr, len, false, true),
                    Next::Skip { hdr, len } => (hdr, len, false, false),
                    Next::TooLong(len) => return Err(ConnError::Protocol(len)),
                    Next::Bad(what) => return Err(ConnError::Ws(what)),
                    Next::Close if self.sending || !self.inflight.is_empty() => {
                        return Err(ConnError::EarlyClose)
                    }
                    Next::Close => break,
                };
            let end = pos + hdr + len;
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
            let payload = &self.rbuf[pos + hdr..end];
            if !reply {
                if ping {
                    // A ping (the server's idle check): answered with the next write.
                    let key = ws::mask_key(self.id, u64::MAX - self.next_seq);
                    ws::pong(&mut self.wbuf, payload, key);
                }
                pos = end;
                continue;
            }
            counters.replies += 1;
            match self.inflight.pop_front() {
                None => counters.mismatches += 1, // a frame nobody asked for
                Some(intended) => {
                    let k = sh.size.min(8);
                    let ok = payload.len() == sh.size
                        && payload[..k] == sh.stamp(self.id, self.expect_seq)[..k]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_child_encoding() {
        let mut h = new_histogram();
        for v in [1u64, 50, 50, 900, 123_456] {
            h.record(v).unwrap();
        }
        let back = hist_from_hex(&hist_to_hex(&h).unwrap()).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(back.max(), h.max());
        let stats = Stats {
            hist: h,
            ..Stats::default()
        };
        let json = serde_json::to_string(&stats).unwrap();
        let back: Stats = serde_json::from_str(&json).unwrap();
        assert_eq!(back.hist.len(), 5);
    }

    #[test]
    fn depth_defaults_to_one_closed_and_unlimited_open() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let work = |argv: &[&str]| {
            let cli = Cli::try_parse_from([&["load"], argv].concat()).unwrap();
            make_work(&cli.args)
        };
        assert_eq!(work(&[]).unwrap().depth, 1);
        assert_eq!(work(&["--rate", "100"]).unwrap().depth, usize::MAX);
        assert_eq!(work(&["--depth", "4", "--rate", "100"]).unwrap().depth, 4);
        assert!(work(&["--depth", "0"]).is_err());
        assert!(work(&["--size", "101", "--max-frame", "100"]).is_err());
    }
}
