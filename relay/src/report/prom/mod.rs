//! The Prometheus exposition of an [`InstanceReport`], written by `prometheus-client` in the
//! OpenMetrics text format (version 1.0.0, served as [`PROMETHEUS_CONTENT_TYPE`]).
//!
//! Every metric is prefixed `shmrelay_` and labelled with `instance`; per-front metrics add
//! `front`, per-worker `worker`, per-ring `front`, `worker` and `ring` (`request` or `reply`),
//! reason-split counters `reason`. Counter samples end in `_total` (their `# TYPE` line names
//! the family without it, as OpenMetrics wants). Sizes are in bytes, times in seconds, except
//! the RTT histogram, which is in microseconds as the front samples it
//! (`shmrelay_front_rtt_microseconds`, buckets at `2^k - 1` µs because samples are whole
//! microseconds filed under `floor(log2(us))`; its `_sum` is `NaN` because only bucket counts
//! are kept).
//!
//! A fresh [`Registry`] is built per scrape around one collector that owns the report, so the
//! numbers are the ones the report read from the stats at scrape time; nothing is cached.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{FrontReport, InstanceReport, Liveness, RingReport, WorkerReport};
use crate::stats::WorkerState;

/// The `Content-Type` of [`prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders `r` in the OpenMetrics text format ([`PROMETHEUS_CONTENT_TYPE`]): one `# HELP` and one
/// `# TYPE` line per metric family, then its samples, then `# EOF`.
///
/// # Examples
///
/// ```no_run
/// let report = shmrelay::report::InstanceReport::read("default")?;
/// print!("{}", shmrelay::report::prometheus(&report));
/// # Ok::<(), shmrelay::report::ReportError>(())
/// ```
pub fn prometheus(r: &InstanceReport) -> String {
    let instance = (Cow::Borrowed("instance"), Cow::Owned(escape(&r.name)));
    let mut registry = Registry::with_prefix_and_labels("shmrelay", std::iter::once(instance));
    registry.register_collector(Box::new(ReportCollector(r.clone())));
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail, and every value below is encodable (gauges are
    // clamped to i64, histogram counts saturate before the encoder adds them up).
    let written = prometheus_client::encoding::text::encode(&mut out, &registry);
    debug_assert!(written.is_ok(), "{written:?}");
    out
}

/// Labels after `instance`; values already escaped.
type Labels = Vec<(&'static str, String)>;

/// Encodes one report at scrape time.
#[derive(Debug)]
struct ReportCollector(InstanceReport);

impl Collector for ReportCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let r = &self.0;
        let e = &mut enc;
        let one = |v: u64| [(Labels::new(), int(v))];
        gauges(
            e,
            "up",
            "1 while the supervisor process exists.",
            one(r.alive.into()),
        )?;
        gauges(
            e,
            "start_time_seconds",
            "Start time of the supervisor, seconds since the Unix epoch.",
            [(Labels::new(), r.started_unix_ms as f64 / 1000.0)],
        )?;
        gauges(
            e,
            "uptime_seconds",
            "Seconds since the supervisor started.",
            [(Labels::new(), r.uptime_secs)],
        )?;
        gauges(
            e,
            "draining",
            "1 while the instance drains for shutdown.",
            one(r.draining.into()),
        )?;
        gauges(
            e,
            "pool_failed",
            "1 once the worker pool crashed too often and new connections are refused.",
            one(r.pool_failed.into()),
        )?;
        gauges(
            e,
            "connections",
            "Connections open across all fronts.",
            one(r.connections),
        )?;
        gauges(
            e,
            "supervisor_resident_memory_bytes",
            "Resident memory of the supervisor.",
            one(r.supervisor_rss_kb.saturating_mul(1024)),
        )?;
        gauges(
            e,
            "supervisor_open_fds",
            "Open file descriptors of the supervisor.",
            one(r.supervisor_fds),
        )?;
        gauges(
            e,
            "problems",
            "Findings that need attention (what `relayctl stat` lists under problems).",
            one(r.problems.len() as u64),
        )?;
        fronts(e, &r.fronts)?;
        workers(e, &r.workers)?;
        cluster(e, &r.workers)?;
        rings(e, &r.rings)?;

        let lk = &r.leaks;
        counters(
            e,
            "leak_events",
            "Leak detector findings by kind.",
            [
                ("stale_segments_removed", lk.stale_segments_removed),
                ("leaked_conns", lk.leaked_conns),
                ("fd_growth", lk.fd_growth_events),
                ("rss_growth", lk.rss_growth_events),
                ("reclaimed_reservations", lk.reclaimed_reservations),
                ("orphans_killed", lk.orphans_killed),
            ]
            .map(|(k, v)| (vec![("reason", k.to_owned())], v)),
        )?;
        gauges(
            e,
            "stale_rings",
            "Ring sides whose pid belongs to no live process.",
            one(lk.stale_rings.len() as u64),
        )
    }
}

fn fronts(e: &mut DescriptorEncoder, fronts: &[FrontReport]) -> fmt::Result {
    let t = Rows {
        rows: fronts,
        labels: |f| vec![("front", f.index.to_string())],
    };
    gauges(
        e,
        "front_up",
        "1 while the front process exists and is not stopped.",
        t.ints(|f| (f.liveness == Liveness::Alive).into()),
    )?;
    counters(
        e,
        "front_restarts",
        "Times the front was restarted.",
        t.counts(|f| f.restarts.into()),
    )?;
    gauges(
        e,
        "front_connections",
        "Connections of the front by state.",
        ints(t.split("state", |f| {
            [
                ("open".to_owned(), f.connections.open),
                ("draining".to_owned(), f.connections.draining),
            ]
        })),
    )?;
    counters(
        e,
        "front_accepts",
        "Connections accepted.",
        t.counts(|f| f.accepts),
    )?;
    let by_reason = |m: &BTreeMap<String, u64>| m.iter().map(|(k, v)| (escape(k), *v)).collect();
    counters(
        e,
        "front_rejects",
        "Connections refused at accept, by reason.",
        t.split("reason", |f| -> Vec<_> { by_reason(&f.rejects) }),
    )?;
    counters(
        e,
        "front_closes",
        "Connections closed, by reason.",
        t.split("reason", |f| -> Vec<_> { by_reason(&f.closes) }),
    )?;
    type Get = fn(&FrontReport) -> u64;
    let plain: &[(&str, &str, Get)] = &[
        (
            "front_heartbeats",
            "Heartbeat frames received from clients.",
            |f| f.heartbeats,
        ),
        (
            "front_pings_sent",
            "Heartbeat frames sent to idle clients.",
            |f| f.pings_sent,
        ),
        (
            "front_protocol_errors",
            "Malformed or oversized frames.",
            |f| f.protocol_errors,
        ),
        (
            "front_frames_in",
            "Frames received from clients, heartbeats excluded.",
            |f| f.frames_in,
        ),
        (
            "front_frames_out",
            "Reply records written to clients.",
            |f| f.frames_out,
        ),
        ("front_bytes_in", "Bytes read from clients.", |f| f.bytes_in),
        ("front_bytes_out", "Bytes written to clients.", |f| {
            f.bytes_out
        }),
        (
            "front_bytes_copied",
            "Bytes the front copied in user space.",
            |f| f.bytes_copied,
        ),
        (
            "front_stale_replies",
            "Reply records for connections that no longer existed.",
            |f| f.stale_replies,
        ),
        (
            "front_ring_full_stalls",
            "Times a connection stopped being read because its request ring was full.",
            |f| f.ring_full_stalls,
        ),
        (
            "front_corrupt_rings",
            "Rings found corrupt and quarantined.",
            |f| f.corrupt_rings,
        ),
        (
            "front_tcp_retransmits",
            "TCP retransmissions of closed connections (TCP_INFO at close).",
            |f| f.retransmits,
        ),
        (
            "front_ws_upgrades",
            "WebSocket handshakes completed.",
            |f| f.ws_upgrades,
        ),
        (
            "front_ws_refused",
            "WebSocket handshakes refused (any HTTP status).",
            // Saturating: the counters are read from memory that may hold garbage.
            |f| {
                f.ws_refused
                    .values()
                    .fold(0u64, |a, &n| a.saturating_add(n))
            },
        ),
        (
            "front_ws_handshake_timeouts",
            "WebSocket handshakes not complete in time.",
            |f| f.ws_handshake_timeouts,
        ),
    ];
    for &(name, help, get) in plain {
        counters(e, name, help, t.counts(get))?;
    }
    gauges(
        e,
        "front_paused",
        "1 while the front stopped accepting (overload).",
        t.ints(|f| f.paused.into()),
    )?;
    gauges(
        e,
        "front_resident_memory_bytes",
        "Resident memory of the front process.",
        t.ints(|f| f.rss_kb.saturating_mul(1024)),
    )?;
    gauges(
        e,
        "front_open_fds",
        "Open file descriptors of the front process.",
        t.ints(|f| f.fds),
    )?;
    let mut m = e.encode_descriptor(
        "front_rtt_microseconds",
        "TCP round-trip times sampled from TCP_INFO, microseconds.",
        None,
        MetricType::Histogram,
    )?;
    for f in fronts {
        // The encoder adds the bucket counts up in u64: hand it differences of a saturating
        // running total so garbage counts cannot overflow it.
        let mut total = 0u64;
        let mut buckets: Vec<(f64, u64)> = f
            .rtt_histogram
            .iter()
            .map(|bk| {
                let before = total;
                total = total.saturating_add(bk.count);
                // `f64::MAX` is the encoder's spelling of `+Inf`.
                let le = bk.below_us.map_or(f64::MAX, |b| b.saturating_sub(1) as f64);
                (le, total - before)
            })
            .collect();
        if buckets.last().is_none_or(|b| b.0 != f64::MAX) {
            buckets.push((f64::MAX, 0));
        }
        let labels = (t.labels)(f);
        m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            f64::NAN,
            total,
            &buckets,
            None,
        )?;
    }
    Ok(())
}

/// The cluster workers' NATS state (workers that are not cluster workers have no samples).
fn cluster(e: &mut DescriptorEncoder, workers: &[WorkerReport]) -> fmt::Result {
    let rows: Vec<(usize, super::types::ClusterReport)> = workers
        .iter()
        .filter_map(|w| w.cluster.clone().map(|c| (w.index, c)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let t = Rows {
        rows: &rows,
        labels: |(w, _)| vec![("worker", w.to_string())],
    };
    gauges(
        e,
        "cluster_connected",
        "1 while the cluster worker is connected to NATS.",
        t.ints(|(_, c)| c.connected.into()),
    )?;
    gauges(
        e,
        "cluster_subjects",
        "NATS subjects the cluster worker subscribes to.",
        t.ints(|(_, c)| c.subjects),
    )?;
    counters(
        e,
        "cluster_messages_in",
        "Messages the cluster worker received from NATS.",
        t.counts(|(_, c)| c.messages_in),
    )?;
    counters(
        e,
        "cluster_messages_out",
        "Messages the cluster worker sent to NATS.",
        t.counts(|(_, c)| c.messages_out),
    )?;
    counters(
        e,
        "cluster_errors",
        "Cross-node operations that failed (NATS unreachable, queue full, unknown or gone push targets, timeouts).",
        t.counts(|(_, c)| c.errors),
    )?;
    counters(
        e,
        "cluster_reconnects",
        "Times the cluster worker's NATS connection was re-established.",
        t.counts(|(_, c)| c.reconnects),
    )
}

fn workers(e: &mut DescriptorEncoder, workers: &[WorkerReport]) -> fmt::Result {
    let t = Rows {
        rows: workers,
        labels: |w| vec![("worker", w.index.to_string())],
    };
    gauges(
        e,
        "worker_up",
        "1 while the worker process exists and is not stopped.",
        t.ints(|w| (w.liveness == Liveness::Alive).into()),
    )?;
    const STATES: [WorkerState; 5] = [
        WorkerState::Stopped,
        WorkerState::Running,
        WorkerState::Restarting,
        WorkerState::Failed,
        WorkerState::Hung,
    ];
    gauges(
        e,
        "worker_state",
        "1 for the worker slot's current state, 0 for the others.",
        ints(t.split("state", |w| {
            STATES.map(|s| (s.as_str().to_owned(), (w.state == s).into()))
        })),
    )?;
    counters(
        e,
        "worker_restarts",
        "Times the worker was restarted.",
        t.counts(|w| w.restarts.into()),
    )?;
    counters(
        e,
        "worker_crashes",
        "Times the worker died unasked.",
        t.counts(|w| w.crashes),
    )?;
    counters(e, "worker_hangs", "Hangs detected.", t.counts(|w| w.hangs))?;
    gauges(
        e,
        "worker_resident_memory_bytes",
        "Resident memory of the worker process.",
        t.ints(|w| w.rss_kb.saturating_mul(1024)),
    )?;
    gauges(
        e,
        "worker_open_fds",
        "Open file descriptors of the worker process.",
        t.ints(|w| w.fds),
    )
}

fn rings(e: &mut DescriptorEncoder, rings: &[RingReport]) -> fmt::Result {
    let t = Rows {
        rows: rings,
        labels: |g| {
            vec![
                ("front", g.front.to_string()),
                ("worker", g.worker.to_string()),
                ("ring", g.direction.as_str().to_owned()),
            ]
        },
    };
    gauges(
        e,
        "ring_capacity_bytes",
        "Data area of the ring.",
        t.ints(|g| g.capacity),
    )?;
    gauges(
        e,
        "ring_used_bytes",
        "Bytes published and not yet released.",
        t.ints(|g| g.used),
    )?;
    gauges(
        e,
        "ring_high_water_bytes",
        "Most bytes ever in use.",
        t.ints(|g| g.high_water),
    )?;
    type Get = fn(&RingReport) -> u64;
    let plain: &[(&str, &str, Get)] = &[
        (
            "ring_records_in",
            "Records committed by the producer.",
            |g| g.records_in,
        ),
        ("ring_records_out", "Records consumed.", |g| g.records_out),
        ("ring_bytes_in", "Payload bytes committed.", |g| g.bytes_in),
        ("ring_bytes_out", "Payload bytes consumed.", |g| g.bytes_out),
        (
            "ring_full_events",
            "Reservations refused because the ring was full.",
            |g| g.full_events,
        ),
        ("ring_wakeups", "Wakeups sent between the two sides.", |g| {
            g.wakeups
        }),
        ("ring_parks", "Times either side parked.", |g| g.parks),
    ];
    for &(name, help, get) in plain {
        counters(e, name, help, t.counts(get))?;
    }
    let sides = |is: fn(Liveness) -> bool| {
        ints(t.split("side", move |g| {
            [
                ("producer", g.producer.liveness),
                ("consumer", g.consumer.liveness),
            ]
            .map(|(side, l)| (side.to_owned(), is(l).into()))
        }))
    };
    gauges(
        e,
        "ring_side_up",
        "1 while the process attached to this side exists and makes progress.",
        sides(|l| l == Liveness::Alive),
    )?;
    gauges(
        e,
        "ring_side_stalled",
        "1 while the process on this side exists but makes no progress.",
        sides(|l| l == Liveness::Stalled),
    )
}

/// The rows of one table of the report (fronts, workers or rings) and how a row is labelled.
struct Rows<'a, T> {
    rows: &'a [T],
    labels: fn(&T) -> Labels,
}

impl<'a, T> Rows<'a, T> {
    /// One sample per row.
    fn counts(&self, get: fn(&T) -> u64) -> impl Iterator<Item = (Labels, u64)> + 'a {
        let labels = self.labels;
        self.rows.iter().map(move |r| (labels(r), get(r)))
    }

    /// One integer gauge sample per row.
    fn ints(&self, get: fn(&T) -> u64) -> impl Iterator<Item = (Labels, i64)> + 'a {
        ints(self.counts(get))
    }

    /// Samples per row, told apart by label `key`: `get` gives each one's value of `key`
    /// (escaped) and its number.
    fn split<I>(
        &self,
        key: &'static str,
        get: impl Fn(&'a T) -> I + 'a,
    ) -> impl Iterator<Item = (Labels, u64)> + 'a
    where
        I: IntoIterator<Item = (String, u64)>,
        I::IntoIter: 'a,
    {
        let labels = self.labels;
        self.rows.iter().flat_map(move |r| {
            get(r).into_iter().map(move |(k, v)| {
                let mut l = labels(r);
                l.push((key, k));
                (l, v)
            })
        })
    }
}

/// Integer gauge samples of counts.
fn ints(samples: impl Iterator<Item = (Labels, u64)>) -> impl Iterator<Item = (Labels, i64)> {
    samples.map(|(l, v)| (l, int(v)))
}

/// Writes a gauge family: its descriptor, then one sample per label set.
fn gauges<V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// Writes a counter family (`name` without `_total`: the encoder appends it to each sample).
fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
    }
    Ok(())
}

/// An integer gauge value: the encoder refuses a `u64` gauge above `i64::MAX` (and would
/// then fail the whole scrape), so garbage from shared memory is clamped instead.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Escapes a label value (backslash, double quote, newline): the encoder writes label values
/// as given.
fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
pub(crate) mod tests;
