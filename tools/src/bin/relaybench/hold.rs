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
//! `--procs`, `--threads` and `--src-ips`); the threads are hold's own. Each connection starts
//! answering pings as soon as it is open, so a slow connect ramp cannot make the server time
//! out the first ones. The hold window of `--seconds` starts when every connection of every
//! process has been tried; at its end the connections still open are counted and cut.
//!
//! Memory: a thread is one epoll loop (`hold_loop.rs`) over a table of compact connection
//! slots and one timing wheel; a connection is a 20-byte slot, its index and one timer entry
//! (about 50 bytes), with no task, future or buffer of its own: reads go through one scratch
//! buffer per thread, and the only bytes it ever writes are zeros from a static buffer.
//! `client_rss_kb` reports what the client processes actually used, and
//! `client_bytes_per_conn` that divided by the connections opened (fixed costs included).
//!
//! What went wrong is counted by kind (the errno's name): `connect_error_kinds` for connects
//! that failed, `reset_kinds` for open connections that ended with an error.
//!
//! Output: a short human summary, or with `--json` exactly one JSON object on stdout (the
//! fields of [`Summary`]). A progress line goes to stderr when the hold window starts.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::engine::{self, counters, secs_arg, Base, Common, ConnArgs, Defaults, Plan, ThreadCtl};

#[path = "hold_loop.rs"]
mod event_loop;

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
        /// Of those, the ones answered inside the hold window (the window the server's CPU
        /// is measured over: a rate per CPU second needs this count, not the whole run's).
        heartbeats_answered_in_window,
        /// Heartbeats not sent because the previous one was still unanswered.
        heartbeats_skipped,
        /// Server pings (length-0 frames while no heartbeat of ours was outstanding) answered.
        pings_answered,
        /// Of those, the ones answered inside the hold window.
        pings_answered_in_window,
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
    /// Failed connects by kind (errno name, `TimedOut`, `RampLimit`).
    connect_error_kinds: BTreeMap<String, u64>,
    /// Connections ended by an error, by kind (errno name).
    reset_kinds: BTreeMap<String, u64>,
}

impl HoldTally {
    /// Counts the end of connection `id` by the server: a FIN (`None`) or an error; `window`
    /// is the start of the hold window, if it began.
    fn closed(
        &mut self,
        error: Option<std::io::Error>,
        id: usize,
        window: Option<Instant>,
        bucket: f64,
    ) {
        let c = &mut self.counters;
        match error {
            None => c.server_closes += 1,
            Some(e) => {
                c.reset_closes += 1;
                *self
                    .reset_kinds
                    .entry(event_loop::kind_name(&e))
                    .or_default() += 1;
                c.note_error(|| format!("connection {id}: {e}"));
            }
        }
        match window {
            None => c.closes_during_ramp += 1,
            Some(start) => {
                let i = (start.elapsed().as_secs_f64() / bucket) as usize;
                if self.close_buckets.len() <= i {
                    self.close_buckets.resize(i + 1, 0);
                }
                self.close_buckets[i] += 1;
            }
        }
    }
}

/// Adds the counts of `b` to those of `a`, key by key.
fn add_kinds(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, n) in b {
        *a.entry(k.clone()).or_default() += n;
    }
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
        add_kinds(&mut self.connect_error_kinds, &o.connect_error_kinds);
        add_kinds(&mut self.reset_kinds, &o.reset_kinds);
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
    /// Connections opened per second of the ramp (`opened / ramp_secs`; 0 without a ramp).
    pub connect_rate: f64,
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
    /// Of `heartbeats_answered`, those inside the hold window (the window of
    /// `server_cpu_seconds`).
    pub heartbeats_answered_in_window: u64,
    pub heartbeats_skipped: u64,
    pub pings_answered: u64,
    /// Of `pings_answered`, those inside the hold window.
    pub pings_answered_in_window: u64,
    pub data_frames: u64,
    /// Failed connects by kind (errno name, `TimedOut`, `RampLimit`); empty if none failed.
    pub connect_error_kinds: BTreeMap<String, u64>,
    /// Of `server_closes`, the resets and other errors by kind (errno name).
    pub reset_kinds: BTreeMap<String, u64>,
    /// Resident memory of the client processes at the end of the hold window, KiB.
    pub client_rss_kb: u64,
    /// `client_rss_kb` in bytes per connection opened, fixed costs (binary, threads, buffers)
    /// included: an upper bound of what a connection costs the client.
    pub client_bytes_per_conn: Option<f64>,
    /// `server_cpu_seconds` as a percentage of one core over the hold window.
    pub server_cpu_percent: Option<f64>,
    /// Server CPU microseconds per own heartbeat answered in the hold window (both figures of
    /// that window: `server_cpu_seconds` / `heartbeats_answered_in_window`); `None` without a
    /// server pid or with no heartbeat answered.
    pub server_us_per_heartbeat: Option<f64>,
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

impl engine::Bench for Heartbeats {
    const NAME: &'static str = "hold";
    const DEFAULTS: Defaults = Defaults {
        conns: 1000,
        seconds: 60.0,
        ramp_limit: 180.0,
    };
    type Tally = HoldTally;

    fn warmup(&self) -> f64 {
        0.0
    }

    fn drain(&self) -> f64 {
        0.0
    }

    fn run_thread(plan: &Plan<Heartbeats>, ctl: ThreadCtl<HoldTally>) -> Result<HoldTally> {
        event_loop::run(plan, ctl)
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

/// A uniform number in [0, 1) from a connection index and a counter.
fn unit(id: usize, n: u64) -> f64 {
    (engine::mix((id as u64) << 32 ^ n) >> 11) as f64 / (1u64 << 53) as f64
}

fn summarize(out: &engine::Outcome<Heartbeats>) -> Summary {
    let (plan, r, server_cpu) = (&out.plan, &out.report, out.server_cpu);
    let c = &r.tally.counters;
    let b = plan.work.bucket;
    Summary {
        run: out.common(),
        heartbeat: plan.work.heartbeat,
        ramp_secs: out.ramp_secs,
        connect_rate: if out.ramp_secs > 0.0 {
            c.base.connected as f64 / out.ramp_secs
        } else {
            0.0
        },
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
        heartbeats_answered_in_window: c.heartbeats_answered_in_window,
        pings_answered_in_window: c.pings_answered_in_window,
        heartbeats_skipped: c.heartbeats_skipped,
        pings_answered: c.pings_answered,
        data_frames: c.data_frames,
        connect_error_kinds: r.tally.connect_error_kinds.clone(),
        reset_kinds: r.tally.reset_kinds.clone(),
        client_rss_kb: r.rss_kb,
        client_bytes_per_conn: (c.base.connected > 0)
            .then(|| r.rss_kb as f64 * 1024.0 / c.base.connected as f64),
        server_cpu_percent: server_cpu.map(|s| 100.0 * s / plan.seconds),
        server_us_per_heartbeat: server_cpu
            .filter(|_| c.heartbeats_answered_in_window > 0)
            .map(|s| s * 1e6 / c.heartbeats_answered_in_window as f64),
    }
}

fn print_human(s: &Summary) {
    let r = &s.run;
    println!(
        "relaybench hold: {} | {} conns over {} proc(s) x {} thread(s), {} source address(es) | {} s | heartbeat {} s",
        r.addr, r.conns, r.procs, r.threads, r.src_ips, r.seconds, s.heartbeat
    );
    println!(
        "  connections  opened {} (ramp {:.1} s, {:.0} connects/s), connect errors {}{}, open at the end {}",
        s.opened,
        s.ramp_secs,
        s.connect_rate,
        r.connect_errors,
        kinds(&s.connect_error_kinds),
        s.open_at_end
    );
    let by_time: Vec<String> = s
        .closes_by_time
        .iter()
        .map(|b| format!("{}-{} s: {}", b.from_secs, b.to_secs, b.closes))
        .collect();
    println!(
        "  server closes {} (resets {}{}, during the ramp {}){}{}",
        s.server_closes,
        s.reset_closes,
        kinds(&s.reset_kinds),
        s.closes_during_ramp,
        if by_time.is_empty() {
            ""
        } else {
            "; in the window "
        },
        by_time.join(", ")
    );
    println!(
        "  heartbeats sent {}, answered {} ({} in the window), skipped {}; pings answered {} ({} in the window); data frames {}",
        s.heartbeats_sent,
        s.heartbeats_answered,
        s.heartbeats_answered_in_window,
        s.heartbeats_skipped,
        s.pings_answered,
        s.pings_answered_in_window,
        s.data_frames
    );
    let server = match (r.server_cpu_seconds, s.server_cpu_percent) {
        (Some(c), Some(p)) => format!("; server {c:.2} s ({p:.2}% of one core)"),
        _ => String::new(),
    } + &s
        .server_us_per_heartbeat
        .map_or(String::new(), |us| format!(", {us:.1} us per heartbeat"));
    let per_conn = s
        .client_bytes_per_conn
        .map_or(String::new(), |b| format!(" ({b:.0} B per connection)"));
    println!(
        "  cpu seconds in window: client {:.2}{server}; client rss {} KiB{per_conn}",
        r.client_cpu_seconds, s.client_rss_kb
    );
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
}

/// " [A: n, B: m]" for counts by kind, or nothing.
fn kinds(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return String::new();
    }
    let v: Vec<String> = m.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    format!(" [{}]", v.join(", "))
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
            ..HoldTally::default()
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
            reset_kinds: [("ECONNRESET".to_string(), 2)].into(),
            ..HoldTally::default()
        };
        a.reset_kinds.insert("ECONNRESET".into(), 1);
        a.reset_kinds.insert("ETIMEDOUT".into(), 4);
        a.add(&b).unwrap();
        assert_eq!(a.close_buckets, [1, 0, 3, 0, 5]);
        assert_eq!(a.reset_kinds["ECONNRESET"], 3);
        assert_eq!(a.reset_kinds["ETIMEDOUT"], 4);
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
