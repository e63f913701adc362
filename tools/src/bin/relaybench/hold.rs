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
//! Scale is the one load engine's ([`crate::engine`], shared with `relaybench load`: the same
//! `--procs`, `--threads` and `--src-ips`). Each connection starts answering pings as soon as it
//! is open, so a slow connect ramp cannot make the server time out the first ones. The hold
//! window of `--seconds` starts when every connection of every process has been tried; at its
//! end the connections still open are counted and cut.
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
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;

use crate::engine::{self, counters, secs_arg, Base, Common, ConnArgs, Defaults, Plan, Start};

/// Options of `relaybench hold`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
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
}

/// What every connection of a `hold` run does (part of the plan children get).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Heartbeats {
    /// Seconds between own heartbeats; 0 for none.
    heartbeat: f64,
    jitter: f64,
    bucket: f64,
}

counters! {
    /// Counters of a thread, a process or the whole run.
    Counters {
        /// Connections still open at the end of the hold window.
        open_at_end,
        /// Connections the server ended with a FIN (end of stream).
        server_closes,
        /// Connections that ended with an error (a reset, usually also the server's doing).
        reset_closes,
        /// Of those two, the ones that ended before the hold window started (during the ramp).
        closes_during_ramp,
        /// Own heartbeats sent.
        heartbeats_sent,
        /// Own heartbeats answered by a length-0 frame.
        heartbeats_answered,
        /// Heartbeats not sent because the previous one was still unanswered.
        heartbeats_skipped,
        /// Server pings (length-0 frames while no heartbeat of ours was outstanding) answered.
        pings_answered,
        /// Frames of non-zero length received (skipped).
        data_frames,
    }
}

/// What a thread, a process or the run counted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HoldTally {
    counters: Counters,
    /// Closes inside the hold window by time into it: entry i counts closes in
    /// `[i * bucket, (i + 1) * bucket)` seconds.
    close_buckets: Vec<u64>,
}

impl engine::Tally for HoldTally {
    fn add(&mut self, o: &HoldTally) -> Result<()> {
        self.counters.add(&o.counters);
        if self.close_buckets.len() < o.close_buckets.len() {
            self.close_buckets.resize(o.close_buckets.len(), 0);
        }
        for (a, b) in self.close_buckets.iter_mut().zip(&o.close_buckets) {
            *a += b;
        }
        Ok(())
    }

    fn base(&self) -> &Base {
        &self.counters.base
    }

    fn base_mut(&mut self) -> &mut Base {
        &mut self.counters.base
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
    /// Address, connections asked for, processes, threads, source addresses, hold window,
    /// connect errors, CPU seconds of client and server over the hold window, first error.
    #[serde(flatten)]
    pub run: Common,
    /// Seconds between own heartbeats (0: none).
    pub heartbeat: f64,
    /// Seconds from the start until every connection had been tried (the connect ramp).
    pub ramp_secs: f64,
    /// Connections that opened.
    pub opened: u64,
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
    /// Resident memory of the client processes at the end of the hold window, KiB.
    pub client_rss_kb: u64,
    /// `server_cpu_seconds` as a percentage of one core over the hold window.
    pub server_cpu_percent: Option<f64>,
}

pub fn run(args: Args) -> Result<()> {
    if !(0.0..1.0).contains(&args.jitter) {
        bail!("--jitter must be at least 0 and below 1");
    }
    let work = Heartbeats {
        heartbeat: secs_arg(args.heartbeat, "--heartbeat", true)?,
        jitter: args.jitter,
        bucket: secs_arg(args.bucket, "--bucket", false)?,
    };
    let Some(out) = engine::run(&args.conn, work)? else {
        return Ok(()); // a child of a --procs run
    };
    out.print(args.conn.json, &summarize(&out), print_human)
}

/// State of one thread, shared by its connection tasks (current-thread runtime: no locks).
pub struct HoldThread {
    tally: RefCell<HoldTally>,
    /// Connections open now.
    open: Cell<u64>,
    /// One read buffer for all connections of the thread: a read is handled before the next.
    scratch: RefCell<Vec<u8>>,
    heartbeat: Option<Duration>,
    jitter: f64,
    bucket: f64,
}

impl HoldThread {
    /// Counts the end of an open connection; `start` is that of the hold window, if it began.
    fn closed(&self, error: Option<String>, start: Option<Instant>) {
        self.open.set(self.open.get() - 1);
        let mut t = self.tally.borrow_mut();
        let HoldTally {
            counters: c,
            close_buckets,
        } = &mut *t;
        match error {
            None => c.server_closes += 1,
            Some(e) => {
                c.reset_closes += 1;
                c.note_error(|| e);
            }
        }
        match start {
            None => c.closes_during_ramp += 1,
            Some(start) => {
                let i = (start.elapsed().as_secs_f64() / self.bucket) as usize;
                if close_buckets.len() <= i {
                    close_buckets.resize(i + 1, 0);
                }
                close_buckets[i] += 1;
            }
        }
    }
}

impl engine::Workload for Heartbeats {
    const NAME: &'static str = "hold";
    const DEFAULTS: Defaults = Defaults {
        conns: 1000,
        seconds: 60.0,
        ramp_limit: 180.0,
    };
    const ENDS_ITSELF: bool = false;
    type Tally = HoldTally;
    type Thread = HoldThread;

    fn thread(plan: &Plan<Heartbeats>) -> HoldThread {
        let w = &plan.work;
        HoldThread {
            tally: RefCell::new(HoldTally::default()),
            open: Cell::new(0),
            scratch: RefCell::new(vec![0; 16 * 1024]),
            heartbeat: (w.heartbeat > 0.0).then(|| Duration::from_secs_f64(w.heartbeat)),
            jitter: w.jitter,
            bucket: w.bucket,
        }
    }

    fn tally(th: &HoldThread) -> &RefCell<HoldTally> {
        &th.tally
    }

    /// Holds the connection until the server closes it or the task is cut.
    async fn conn(th: Rc<HoldThread>, start: Rc<Start>, id: usize, mut stream: TcpStream) {
        th.open.set(th.open.get() + 1);
        let end = hold(id, &mut stream, &th).await;
        let error = end.err().map(|e| format!("connection {id}: {e}"));
        th.closed(error, start.get().map(|w| w.start));
    }

    fn at_end(th: &HoldThread) {
        th.tally.borrow_mut().counters.open_at_end = th.open.get();
    }

    fn on_start(plan: &Plan<Heartbeats>, t: &HoldTally, ramp_secs: f64) {
        let c = &t.counters;
        eprintln!(
            "relaybench hold: {} connection(s) opened, {} connect error(s), {} closed by the server, after {ramp_secs:.1} s; holding for {} s",
            c.base.connected,
            c.base.connect_errors,
            c.server_closes + c.reset_closes,
            plan.seconds
        );
    }
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
async fn hold(id: usize, stream: &mut TcpStream, st: &HoldThread) -> std::io::Result<()> {
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
                let mut t = st.tally.borrow_mut();
                let c = &mut t.counters;
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
                    st.tally.borrow_mut().counters.heartbeats_skipped += 1;
                } else {
                    outstanding = true;
                    pending += 4;
                    st.tally.borrow_mut().counters.heartbeats_sent += 1;
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

fn summarize(out: &engine::Outcome<Heartbeats>) -> Summary {
    let (plan, r, server_cpu) = (&out.plan, &out.report, out.server_cpu);
    let c = &r.tally.counters;
    let b = plan.work.bucket;
    Summary {
        run: out.common(),
        heartbeat: plan.work.heartbeat,
        ramp_secs: out.ramp_secs,
        opened: c.base.connected,
        open_at_end: c.open_at_end,
        server_closes: c.server_closes + c.reset_closes,
        reset_closes: c.reset_closes,
        closes_during_ramp: c.closes_during_ramp,
        bucket_secs: b,
        closes_by_time: r
            .tally
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
        client_rss_kb: r.rss_kb,
        server_cpu_percent: server_cpu.map(|s| 100.0 * s / plan.seconds),
    }
}

fn print_human(s: &Summary) {
    let r = &s.run;
    println!(
        "relaybench hold: {} | {} conns over {} proc(s) x {} thread(s), {} source address(es) | {} s | heartbeat {} s",
        r.addr, r.conns, r.procs, r.threads, r.src_ips, r.seconds, s.heartbeat
    );
    println!(
        "  connections  opened {} (ramp {:.1} s), connect errors {}, open at the end {}",
        s.opened, s.ramp_secs, r.connect_errors, s.open_at_end
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
    let server = match (r.server_cpu_seconds, s.server_cpu_percent) {
        (Some(c), Some(p)) => format!("; server {c:.2} s ({p:.2}% of one core)"),
        _ => String::new(),
    };
    println!(
        "  cpu seconds in window: client {:.2}{server}; client rss {} KiB",
        r.client_cpu_seconds, s.client_rss_kb
    );
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_merge_buckets_of_different_lengths() {
        use engine::Tally;
        let mut a = HoldTally {
            close_buckets: vec![1, 0, 2],
            counters: Counters {
                heartbeats_sent: 3,
                ..Counters::default()
            },
        };
        let b = HoldTally {
            close_buckets: vec![0, 0, 1, 0, 5],
            counters: Counters {
                heartbeats_sent: 2,
                base: Base {
                    first_error: Some("x".into()),
                    ..Base::default()
                },
                ..Counters::default()
            },
        };
        a.add(&b).unwrap();
        assert_eq!(a.close_buckets, [1, 0, 3, 0, 5]);
        assert_eq!(a.counters.heartbeats_sent, 5);
        assert_eq!(a.counters.base.first_error.as_deref(), Some("x"));
    }

    #[test]
    fn jitter_draws_are_uniform_enough_and_in_range() {
        let v: Vec<f64> = (0..10_000).map(|i| unit(i, 3)).collect();
        assert!(v.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
}
