//! The Prometheus text exposition format (version 0.0.4) of an [`InstanceReport`].
//!
//! Every metric is prefixed `shmrelay_` and labelled with `instance`; per-front metrics add
//! `front`, per-worker `worker`, per-ring `front`, `worker` and `ring` (`request` or `reply`),
//! reason-split counters `reason`. Counters end in `_total`. Sizes are in bytes, times in
//! seconds, except the RTT histogram, which is in microseconds as the front samples it
//! (`shmrelay_front_rtt_microseconds`, buckets at `2^k - 1` µs because samples are whole
//! microseconds filed under `floor(log2(us))`; it has no `_sum`, since only bucket counts are
//! kept).

use std::fmt::Write;

use super::{InstanceReport, Liveness};
use crate::stats::WorkerState;

/// Renders `r` in the Prometheus text format, version 0.0.4 (`Content-Type: text/plain;
/// version=0.0.4`): one `# HELP` and one `# TYPE` line per metric family, then its samples.
///
/// # Examples
///
/// ```no_run
/// let report = shmrelay::report::InstanceReport::read("default")?;
/// print!("{}", shmrelay::report::prometheus(&report));
/// # Ok::<(), shmrelay::report::ReportError>(())
/// ```
pub fn prometheus(r: &InstanceReport) -> String {
    let mut out = Exposition {
        out: String::with_capacity(16 * 1024),
        instance: escape(&r.name),
    };
    let b = |v: bool| u64::from(v) as f64;
    let up = |l: Liveness| b(l == Liveness::Alive);

    out.family(
        "up",
        "gauge",
        "1 while the supervisor process exists.",
        [(String::new(), b(r.alive))],
    );
    out.family(
        "start_time_seconds",
        "gauge",
        "Start time of the supervisor, seconds since the Unix epoch.",
        [(String::new(), r.started_unix_ms as f64 / 1000.0)],
    );
    out.family(
        "uptime_seconds",
        "gauge",
        "Seconds since the supervisor started.",
        [(String::new(), r.uptime_secs)],
    );
    out.family(
        "draining",
        "gauge",
        "1 while the instance drains for shutdown.",
        [(String::new(), b(r.draining))],
    );
    out.family(
        "pool_failed",
        "gauge",
        "1 once the worker pool crashed too often and new connections are refused.",
        [(String::new(), b(r.pool_failed))],
    );
    out.family(
        "connections",
        "gauge",
        "Connections open across all fronts.",
        [(String::new(), r.connections as f64)],
    );
    out.family(
        "supervisor_resident_memory_bytes",
        "gauge",
        "Resident memory of the supervisor.",
        [(String::new(), r.supervisor_rss_kb as f64 * 1024.0)],
    );
    out.family(
        "supervisor_open_fds",
        "gauge",
        "Open file descriptors of the supervisor.",
        [(String::new(), r.supervisor_fds as f64)],
    );
    out.family(
        "problems",
        "gauge",
        "Findings that need attention (what `relayctl stat` lists under problems).",
        [(String::new(), r.problems.len() as f64)],
    );

    // Fronts.
    let fl = |f: &super::FrontReport| format!(",front=\"{}\"", f.index);
    let fronts = &r.fronts;
    let per_front = |get: &dyn Fn(&super::FrontReport) -> f64| -> Vec<(String, f64)> {
        fronts.iter().map(|f| (fl(f), get(f))).collect()
    };
    out.family(
        "front_up",
        "gauge",
        "1 while the front process exists and is not stopped.",
        per_front(&|f| up(f.liveness)),
    );
    out.family(
        "front_restarts_total",
        "counter",
        "Times the front was restarted.",
        per_front(&|f| f64::from(f.restarts)),
    );
    out.family(
        "front_connections",
        "gauge",
        "Connections of the front by state.",
        fronts.iter().flat_map(|f| {
            [
                (
                    format!("{},state=\"open\"", fl(f)),
                    f.connections.open as f64,
                ),
                (
                    format!("{},state=\"draining\"", fl(f)),
                    f.connections.draining as f64,
                ),
            ]
        }),
    );
    out.family(
        "front_accepts_total",
        "counter",
        "Connections accepted.",
        per_front(&|f| f.accepts as f64),
    );
    out.family(
        "front_rejects_total",
        "counter",
        "Connections refused at accept, by reason.",
        fronts.iter().flat_map(|f| {
            f.rejects
                .iter()
                .map(move |(k, v)| (format!("{},reason=\"{}\"", fl(f), escape(k)), *v as f64))
        }),
    );
    out.family(
        "front_closes_total",
        "counter",
        "Connections closed, by reason.",
        fronts.iter().flat_map(|f| {
            f.closes
                .iter()
                .map(move |(k, v)| (format!("{},reason=\"{}\"", fl(f), escape(k)), *v as f64))
        }),
    );
    out.family(
        "front_heartbeats_total",
        "counter",
        "Heartbeat frames received from clients.",
        per_front(&|f| f.heartbeats as f64),
    );
    out.family(
        "front_pings_sent_total",
        "counter",
        "Heartbeat frames sent to idle clients.",
        per_front(&|f| f.pings_sent as f64),
    );
    out.family(
        "front_protocol_errors_total",
        "counter",
        "Malformed or oversized frames.",
        per_front(&|f| f.protocol_errors as f64),
    );
    out.family(
        "front_frames_in_total",
        "counter",
        "Frames received from clients, heartbeats excluded.",
        per_front(&|f| f.frames_in as f64),
    );
    out.family(
        "front_frames_out_total",
        "counter",
        "Reply records written to clients.",
        per_front(&|f| f.frames_out as f64),
    );
    out.family(
        "front_bytes_in_total",
        "counter",
        "Bytes read from clients.",
        per_front(&|f| f.bytes_in as f64),
    );
    out.family(
        "front_bytes_out_total",
        "counter",
        "Bytes written to clients.",
        per_front(&|f| f.bytes_out as f64),
    );
    out.family(
        "front_bytes_copied_total",
        "counter",
        "Bytes the front copied in user space.",
        per_front(&|f| f.bytes_copied as f64),
    );
    out.family(
        "front_stale_replies_total",
        "counter",
        "Reply records for connections that no longer existed.",
        per_front(&|f| f.stale_replies as f64),
    );
    out.family(
        "front_ring_full_stalls_total",
        "counter",
        "Times a connection stopped being read because its request ring was full.",
        per_front(&|f| f.ring_full_stalls as f64),
    );
    out.family(
        "front_corrupt_rings_total",
        "counter",
        "Rings found corrupt and quarantined.",
        per_front(&|f| f.corrupt_rings as f64),
    );
    out.family(
        "front_tcp_retransmits_total",
        "counter",
        "TCP retransmissions of closed connections (TCP_INFO at close).",
        per_front(&|f| f.retransmits as f64),
    );
    out.family(
        "front_paused",
        "gauge",
        "1 while the front stopped accepting (overload).",
        per_front(&|f| b(f.paused)),
    );
    out.family(
        "front_resident_memory_bytes",
        "gauge",
        "Resident memory of the front process.",
        per_front(&|f| f.rss_kb as f64 * 1024.0),
    );
    out.family(
        "front_open_fds",
        "gauge",
        "Open file descriptors of the front process.",
        per_front(&|f| f.fds as f64),
    );
    out.family(
        "front_rtt_microseconds",
        "histogram",
        "TCP round-trip times sampled from TCP_INFO, microseconds.",
        fronts.iter().flat_map(|f| {
            let mut cumulative = 0u64;
            let mut v: Vec<Sample> = f
                .rtt_histogram
                .iter()
                .map(|bk| {
                    cumulative = cumulative.saturating_add(bk.count);
                    let le = bk
                        .below_us
                        .map_or_else(|| "+Inf".to_owned(), |b| (b - 1).to_string());
                    Sample::new(
                        "_bucket",
                        format!("{},le=\"{le}\"", fl(f)),
                        cumulative as f64,
                    )
                })
                .collect();
            if f.rtt_histogram
                .last()
                .is_some_and(|bk| bk.below_us.is_some())
            {
                v.push(Sample::new(
                    "_bucket",
                    format!("{},le=\"+Inf\"", fl(f)),
                    cumulative as f64,
                ));
            }
            v.push(Sample::new("_count", fl(f), cumulative as f64));
            v
        }),
    );

    // Workers.
    let wl = |w: &super::WorkerReport| format!(",worker=\"{}\"", w.index);
    let workers = &r.workers;
    let per_worker = |get: &dyn Fn(&super::WorkerReport) -> f64| -> Vec<(String, f64)> {
        workers.iter().map(|w| (wl(w), get(w))).collect()
    };
    out.family(
        "worker_up",
        "gauge",
        "1 while the worker process exists and is not stopped.",
        per_worker(&|w| up(w.liveness)),
    );
    const STATES: [WorkerState; 5] = [
        WorkerState::Stopped,
        WorkerState::Running,
        WorkerState::Restarting,
        WorkerState::Failed,
        WorkerState::Hung,
    ];
    out.family(
        "worker_state",
        "gauge",
        "1 for the worker slot's current state, 0 for the others.",
        workers.iter().flat_map(|w| {
            STATES.iter().map(move |s| {
                (
                    format!("{},state=\"{}\"", wl(w), s.as_str()),
                    b(w.state == *s),
                )
            })
        }),
    );
    out.family(
        "worker_restarts_total",
        "counter",
        "Times the worker was restarted.",
        per_worker(&|w| f64::from(w.restarts)),
    );
    out.family(
        "worker_crashes_total",
        "counter",
        "Times the worker died unasked.",
        per_worker(&|w| w.crashes as f64),
    );
    out.family(
        "worker_hangs_total",
        "counter",
        "Hangs detected.",
        per_worker(&|w| w.hangs as f64),
    );
    out.family(
        "worker_resident_memory_bytes",
        "gauge",
        "Resident memory of the worker process.",
        per_worker(&|w| w.rss_kb as f64 * 1024.0),
    );
    out.family(
        "worker_open_fds",
        "gauge",
        "Open file descriptors of the worker process.",
        per_worker(&|w| w.fds as f64),
    );

    // Rings.
    let rl = |g: &super::RingReport| {
        format!(
            ",front=\"{}\",worker=\"{}\",ring=\"{}\"",
            g.front,
            g.worker,
            g.direction.as_str()
        )
    };
    let rings = &r.rings;
    let per_ring = |get: &dyn Fn(&super::RingReport) -> f64| -> Vec<(String, f64)> {
        rings.iter().map(|g| (rl(g), get(g))).collect()
    };
    out.family(
        "ring_capacity_bytes",
        "gauge",
        "Data area of the ring.",
        per_ring(&|g| g.capacity as f64),
    );
    out.family(
        "ring_used_bytes",
        "gauge",
        "Bytes published and not yet released.",
        per_ring(&|g| g.used as f64),
    );
    out.family(
        "ring_high_water_bytes",
        "gauge",
        "Most bytes ever in use.",
        per_ring(&|g| g.high_water as f64),
    );
    out.family(
        "ring_records_in_total",
        "counter",
        "Records committed by the producer.",
        per_ring(&|g| g.records_in as f64),
    );
    out.family(
        "ring_records_out_total",
        "counter",
        "Records consumed.",
        per_ring(&|g| g.records_out as f64),
    );
    out.family(
        "ring_bytes_in_total",
        "counter",
        "Payload bytes committed.",
        per_ring(&|g| g.bytes_in as f64),
    );
    out.family(
        "ring_bytes_out_total",
        "counter",
        "Payload bytes consumed.",
        per_ring(&|g| g.bytes_out as f64),
    );
    out.family(
        "ring_full_events_total",
        "counter",
        "Reservations refused because the ring was full.",
        per_ring(&|g| g.full_events as f64),
    );
    out.family(
        "ring_wakeups_total",
        "counter",
        "Wakeups sent between the two sides.",
        per_ring(&|g| g.wakeups as f64),
    );
    out.family(
        "ring_parks_total",
        "counter",
        "Times either side parked.",
        per_ring(&|g| g.parks as f64),
    );
    out.family(
        "ring_side_up",
        "gauge",
        "1 while the process attached to this side exists and makes progress.",
        rings.iter().flat_map(|g| {
            [
                ("producer", g.producer.liveness),
                ("consumer", g.consumer.liveness),
            ]
            .map(|(side, l)| (format!("{},side=\"{side}\"", rl(g)), up(l)))
        }),
    );
    out.family(
        "ring_side_stalled",
        "gauge",
        "1 while the process on this side exists but makes no progress.",
        rings.iter().flat_map(|g| {
            [
                ("producer", g.producer.liveness),
                ("consumer", g.consumer.liveness),
            ]
            .map(|(side, l)| {
                (
                    format!("{},side=\"{side}\"", rl(g)),
                    b(l == Liveness::Stalled),
                )
            })
        }),
    );

    // Leaks.
    let lk = &r.leaks;
    out.family(
        "leak_events_total",
        "counter",
        "Leak detector findings by kind.",
        [
            ("stale_segments_removed", lk.stale_segments_removed),
            ("leaked_conns", lk.leaked_conns),
            ("fd_growth", lk.fd_growth_events),
            ("rss_growth", lk.rss_growth_events),
            ("reclaimed_reservations", lk.reclaimed_reservations),
            ("orphans_killed", lk.orphans_killed),
        ]
        .map(|(k, v)| (format!(",reason=\"{k}\""), v as f64)),
    );
    out.family(
        "stale_rings",
        "gauge",
        "Ring sides whose pid belongs to no live process.",
        [(String::new(), lk.stale_rings.len() as f64)],
    );
    out.out
}

struct Exposition {
    out: String,
    /// Already escaped.
    instance: String,
}

/// One sample of a family: `name{suffix}{instance="..."{labels}} value`.
struct Sample {
    /// Appended to the family name (`_bucket`, `_count` of a histogram), usually empty.
    suffix: &'static str,
    /// Labels after `instance`, each starting with a comma, values escaped.
    labels: String,
    value: f64,
}

impl Sample {
    fn new(suffix: &'static str, labels: String, value: f64) -> Sample {
        Sample {
            suffix,
            labels,
            value,
        }
    }
}

impl From<(String, f64)> for Sample {
    fn from((labels, value): (String, f64)) -> Sample {
        Sample::new("", labels, value)
    }
}

impl Exposition {
    /// Writes one family: its `# HELP` and `# TYPE` lines, then its samples.
    fn family<S: Into<Sample>>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = S>,
    ) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP shmrelay_{name} {help}");
        let _ = writeln!(self.out, "# TYPE shmrelay_{name} {kind}");
        for s in samples {
            let s: Sample = s.into();
            let _ = writeln!(
                self.out,
                "shmrelay_{name}{}{{instance=\"{}\"{}}} {}",
                s.suffix,
                self.instance,
                s.labels,
                number(s.value)
            );
        }
    }
}

/// A sample value: integers without a fraction, `NaN`/`+Inf`/`-Inf` spelled as the format
/// wants.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if v.fract() == 0.0 && v.abs() < 9.0e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Escapes a label value: backslash, double quote and newline.
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

/// A sample as [`parse`] returns it: name, labels, value.
#[cfg(test)]
pub(crate) type ParsedSample = (String, Vec<(String, String)>, f64);

/// Parses the text format strictly enough for tests: returns `(name, labels, value)` per
/// sample and checks that every sample belongs to a family announced by `# TYPE`.
#[cfg(test)]
pub(crate) fn parse(text: &str) -> Result<Vec<ParsedSample>, String> {
    let mut typed: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut it = rest.splitn(3, ' ');
            match (it.next(), it.next(), it.next()) {
                (Some("HELP"), Some(_), Some(_)) => {}
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(err("unknown type"));
                    }
                    typed.push(name.to_owned());
                }
                _ => return Err(err("bad comment")),
            }
            continue;
        }
        let open = line.find('{').ok_or_else(|| err("no labels"))?;
        let close = line.rfind('}').ok_or_else(|| err("unclosed labels"))?;
        let name = &line[..open];
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
            || name.as_bytes()[0].is_ascii_digit()
        {
            return Err(err("bad metric name"));
        }
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| typed.iter().any(|t| t == b))
            })
            .unwrap_or(name);
        if !typed.iter().any(|t| t == base) {
            return Err(err("sample without # TYPE"));
        }
        let mut labels = Vec::new();
        let mut rest = &line[open + 1..close];
        while !rest.is_empty() {
            let eq = rest.find("=\"").ok_or_else(|| err("bad label"))?;
            let key = &rest[..eq];
            let mut val = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, c)) => val.push(c),
                        None => return Err(err("bad escape")),
                    },
                    Some((_, c)) => val.push(c),
                    None => return Err(err("unterminated label value")),
                }
            };
            labels.push((key.to_owned(), val));
            rest = &rest[eq + 2 + end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        let value = line[close + 1..].trim();
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().map_err(|_| err("bad value"))?,
        };
        samples.push((name.to_owned(), labels, value));
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::TempShm;
    use crate::stats::{add, Stats};

    #[test]
    fn renders_parseable_text() {
        let tmp = TempShm::new("prom");
        let path = tmp.0.join("shmrelay.prom.stats");
        let stats = Stats::create(&path, 2, 1).unwrap();
        add(&stats.front(1).accepts, 7);
        add(&stats.front(1).rtt_hist[3], 2);
        add(&stats.front(1).rtt_hist[15], 1);
        let mut r = InstanceReport::from_stats("we\"ird\\na\nme", &path, &stats);
        r.uptime_secs = 1.25;
        let text = prometheus(&r);
        let samples = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let find = |name: &str, labels: &[(&str, &str)]| {
            samples
                .iter()
                .find(|(n, l, _)| {
                    n == name
                        && labels
                            .iter()
                            .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
                })
                .map(|s| s.2)
        };
        assert_eq!(
            find("shmrelay_up", &[("instance", "we\"ird\\na\nme")]),
            Some(1.0)
        );
        assert_eq!(find("shmrelay_uptime_seconds", &[]), Some(1.25));
        assert_eq!(
            find("shmrelay_front_accepts_total", &[("front", "1")]),
            Some(7.0)
        );
        assert_eq!(
            find(
                "shmrelay_front_rtt_microseconds_bucket",
                &[("front", "1"), ("le", "15")]
            ),
            Some(2.0)
        );
        assert_eq!(
            find(
                "shmrelay_front_rtt_microseconds_bucket",
                &[("front", "1"), ("le", "+Inf")]
            ),
            Some(3.0)
        );
        assert_eq!(
            find("shmrelay_front_rtt_microseconds_count", &[("front", "1")]),
            Some(3.0)
        );
        assert_eq!(
            find(
                "shmrelay_ring_capacity_bytes",
                &[("front", "0"), ("worker", "0"), ("ring", "reply")]
            ),
            Some(0.0)
        );
        assert_eq!(
            find("shmrelay_worker_state", &[("state", "stopped")]),
            Some(1.0)
        );
        // Exactly one HELP and TYPE per family.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut dedup = types.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(types.len(), dedup.len());
    }

    #[test]
    fn numbers() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
    }
}
