//! What `relaybench ring` prints: per-case medians over the rounds (table or JSON), the
//! load average, and the ratios issue 14 sets targets for, each the median of the per-round
//! ratios (both sides of a ratio ran next to each other, under the same load).

use serde::Serialize;

use super::{Case, Config, Mode, Outcome, Transport};

/// The `--json` line of one case: exactly these fields. Figures are medians over `runs`
/// rounds; `frames_per_sec` and `gbytes_per_sec` are null for round-trip cases,
/// `rtt_p50_ns` and `rtt_p99_ns` for throughput cases.
#[derive(Serialize, Debug)]
pub struct Row {
    pub transport: &'static str,
    pub mode: &'static str,
    pub payload: usize,
    pub runs: usize,
    pub frames_per_sec: Option<f64>,
    pub gbytes_per_sec: Option<f64>,
    pub rtt_p50_ns: Option<u64>,
    pub rtt_p99_ns: Option<u64>,
}

/// "shm-ring throughput 64 B" and the like.
pub fn describe(c: &Case) -> String {
    format!(
        "{} {} {}",
        c.transport.name(),
        c.mode.name(),
        fmt_payload(c.payload)
    )
}

/// The one-line result of a run, for the progress lines.
pub fn brief(o: &Outcome) -> String {
    match (o.frames_per_sec, o.rtt_p50_ns) {
        (Some(f), _) => format!("{} frames/s", fmt_rate(f)),
        (_, Some(p50)) => format!("p50 {}", fmt_ns(p50)),
        _ => "done".into(),
    }
}

/// The table's title line; `n` CPUs were allowed before this thread was pinned.
pub fn header(cfg: &Config, n: usize, runs: usize) -> String {
    let cpu = shmrelay::procfs::cpu_model().unwrap_or_else(|| "unknown CPU".into());
    let pin = cfg.cpus.map_or("not pinned".into(), |(a, b)| {
        format!("sides pinned to CPUs {a} and {b}")
    });
    format!(
        "relaybench ring: {n} CPUs ({cpu}), {runs} alternating rounds of {:.2} s per case after \
         {:.2} s warm-up, capacity {} KiB, batch {}, {pin}; medians over the rounds\n",
        cfg.measure.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.capacity >> 10,
        cfg.batch,
    )
}

/// The load averages before and after the run.
pub fn load_line(before: Option<[f64; 3]>, after: Option<[f64; 3]>) -> String {
    let f = |l: Option<[f64; 3]>| {
        l.map_or("unknown".into(), |[a, b, c]| {
            format!("{a:.2} {b:.2} {c:.2}")
        })
    };
    format!(
        "load average (1, 5, 15 min): before {}, after {}",
        f(before),
        f(after)
    )
}

/// Every round's outcome of every case.
pub struct Summary<'a> {
    cases: Vec<Case>,
    /// `rounds[r][i]` is case `i` in round `r` (every round runs the same cases).
    rounds: &'a [Vec<Outcome>],
}

impl<'a> Summary<'a> {
    pub fn new(rounds: &'a [Vec<Outcome>]) -> Summary<'a> {
        let cases = rounds
            .first()
            .map_or(Vec::new(), |r| r.iter().map(|o| o.case).collect());
        debug_assert!(rounds
            .iter()
            .all(|r| r.iter().map(|o| o.case).eq(cases.iter().copied())));
        Summary { cases, rounds }
    }

    fn index(&self, t: Transport, m: Mode, payload: Option<usize>) -> Option<usize> {
        self.cases
            .iter()
            .position(|c| c.transport == t && c.mode == m && payload.is_none_or(|p| c.payload == p))
    }

    /// Case `i`'s figure of every round.
    fn series(&self, i: usize, f: impl Fn(&Outcome) -> Option<f64>) -> Vec<f64> {
        self.rounds.iter().filter_map(|r| f(&r[i])).collect()
    }

    fn median_of(&self, i: usize, f: impl Fn(&Outcome) -> Option<f64>) -> Option<f64> {
        median(self.series(i, f))
    }

    pub fn rows(&self) -> Vec<Row> {
        (0..self.cases.len())
            .map(|i| {
                let c = self.cases[i];
                let fps = self.median_of(i, |o| o.frames_per_sec);
                Row {
                    transport: c.transport.name(),
                    mode: c.mode.name(),
                    payload: c.payload,
                    runs: self.rounds.len(),
                    frames_per_sec: fps.map(f64::round),
                    gbytes_per_sec: fps.map(|f| (f * c.payload as f64 / 1e5).round() / 1e4),
                    rtt_p50_ns: self
                        .median_of(i, |o| o.rtt_p50_ns.map(|v| v as f64))
                        .map(ns),
                    rtt_p99_ns: self
                        .median_of(i, |o| o.rtt_p99_ns.map(|v| v as f64))
                        .map(ns),
                }
            })
            .collect()
    }

    pub fn table(&self) -> String {
        let line = |t: &str, m: &str, p: &str, f: &str, g: &str, p50: &str, p99: &str, n: &str| {
            format!("{t:<9} {m:<10} {p:>7} {f:>10} {g:>6} {p50:>9} {p99:>9}  {n}\n")
        };
        let mut s = line(
            "transport",
            "mode",
            "payload",
            "frames/s",
            "GB/s",
            "rtt p50",
            "rtt p99",
            "note (last round)",
        );
        for (i, row) in self.rows().iter().enumerate() {
            let note = self.rounds.last().map_or("", |r| r[i].note.as_str());
            s += &line(
                row.transport,
                row.mode,
                &fmt_payload(row.payload),
                &row.frames_per_sec.map_or("-".into(), fmt_rate),
                &row.gbytes_per_sec.map_or("-".into(), |g| format!("{g:.2}")),
                &row.rtt_p50_ns.map_or("-".into(), fmt_ns),
                &row.rtt_p99_ns.map_or("-".into(), fmt_ns),
                note,
            );
        }
        s
    }

    /// Per-round ratios of case `a`'s figure over case `b`'s: `(median, min, max)`.
    fn ratio(&self, a: usize, b: usize, f: impl Fn(&Outcome) -> Option<f64>) -> Option<[f64; 3]> {
        let rs: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|r| Some(f(&r[a])? / f(&r[b])?))
            .collect();
        let lo = rs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some([median(rs)?, lo, hi])
    }

    /// The ratios of issue 14, with its targets.
    pub fn ratio_lines(&self) -> Vec<String> {
        let n = self.rounds.len();
        let mut lines = vec![format!(
            "ratios, median of {n} per-round ratios [min-max] (targets from issue 14):"
        )];
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let fps = |o: &Outcome| o.frames_per_sec;
        let p50 = |o: &Outcome| o.rtt_p50_ns.map(|v| v as f64);
        for (i, c) in self.cases.iter().enumerate() {
            if c.transport != Transport::ShmRing || c.mode != Mode::Throughput {
                continue;
            }
            for base in [Transport::Rtrb, Transport::Crossbeam] {
                let Some(b) = self.index(base, Mode::Throughput, Some(c.payload)) else {
                    continue;
                };
                let Some([r, lo, hi]) = self.ratio(i, b, fps) else {
                    continue;
                };
                let target = match (base, c.payload) {
                    (Transport::Rtrb, 64) => Some(1.3),
                    (Transport::Rtrb, 1024) => Some(1.0),
                    _ => None,
                };
                let goal = target.map_or(String::new(), |g| {
                    format!("  (target >= {g}x: {})", verdict(r >= g))
                });
                lines.push(format!(
                    "  throughput {:<6} shm-ring / {:<9} = {r:>5.2}x [{lo:.2}-{hi:.2}]{goal}",
                    fmt_payload(c.payload),
                    base.name()
                ));
            }
        }
        if let Some(i) = self.index(Transport::ShmRing, Mode::RttSpin, None) {
            if let Some(v) = self.median_of(i, p50) {
                lines.push(format!(
                    "  rtt spin p50      shm-ring         = {}  (target < 250 ns: {})",
                    fmt_ns(ns(v)),
                    verdict(v < 250.0)
                ));
            }
            if let Some(b) = self.index(Transport::Rtrb, Mode::RttSpin, None) {
                if let Some([r, lo, hi]) = self.ratio(i, b, p50) {
                    lines.push(format!(
                        "  rtt spin p50      shm-ring / rtrb  = {r:>5.2}x [{lo:.2}-{hi:.2}]"
                    ));
                }
            }
        }
        let park = self.index(Transport::ShmRing, Mode::RttPark, None);
        let futex = self.index(Transport::Futex, Mode::RttPark, None);
        if let (Some(a), Some(b)) = (park, futex) {
            if let Some([r, lo, hi]) = self.ratio(a, b, p50) {
                lines.push(format!(
                    "  rtt park p50      shm-ring / futex = {r:>5.2}x [{lo:.2}-{hi:.2}]  \
                     (target <= 1.2x: {})",
                    verdict(r <= 1.2)
                ));
            }
        }
        if lines.len() == 1 {
            lines.push("  (none: shm-ring and a baseline were not both run)".into());
        }
        lines
    }
}

/// The median (mean of the middle two for an even count); `None` for no values.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn ns(v: f64) -> u64 {
    v.round() as u64
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} K", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_ns(v: u64) -> String {
    if v >= 1_000_000 {
        format!("{:.2} ms", v as f64 / 1e6)
    } else if v >= 1_000 {
        format!("{:.1} us", v as f64 / 1e3)
    } else {
        format!("{v} ns")
    }
}

pub fn fmt_payload(p: usize) -> String {
    if p >= 1024 && p % 1024 == 0 {
        format!("{} KiB", p >> 10)
    } else {
        format!("{p} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tput(transport: Transport, payload: usize, fps: f64) -> Outcome {
        Outcome {
            case: Case {
                transport,
                mode: Mode::Throughput,
                payload,
            },
            frames_per_sec: Some(fps),
            rtt_p50_ns: None,
            rtt_p99_ns: None,
            note: String::new(),
        }
    }

    fn rtt(transport: Transport, mode: Mode, p50: u64) -> Outcome {
        Outcome {
            case: Case {
                transport,
                mode,
                payload: 64,
            },
            frames_per_sec: None,
            rtt_p50_ns: Some(p50),
            rtt_p99_ns: Some(p50 * 3),
            note: String::new(),
        }
    }

    fn round(k: f64) -> Vec<Outcome> {
        vec![
            tput(Transport::ShmRing, 64, 20e6 * k),
            tput(Transport::Rtrb, 64, 10e6 * k),
            tput(Transport::Crossbeam, 64, 40e6),
            tput(Transport::ShmRing, 1024, 5e6),
            tput(Transport::Rtrb, 1024, 10e6),
            rtt(Transport::ShmRing, Mode::RttSpin, (200.0 * k) as u64),
            rtt(Transport::Rtrb, Mode::RttSpin, 100),
            rtt(Transport::ShmRing, Mode::RttPark, 60_000),
            rtt(Transport::Futex, Mode::RttPark, 50_000),
        ]
    }

    #[test]
    fn ratios_are_medians_of_rounds_and_name_missed_targets() {
        let rounds = vec![round(1.0), round(2.0), round(1.0)];
        let s = Summary::new(&rounds);
        let text = s.ratio_lines().join("\n");
        let want = [
            "throughput 64 B   shm-ring / rtrb      =  2.00x [2.00-2.00]  (target >= 1.3x: met)",
            "throughput 64 B   shm-ring / crossbeam =  0.50x [0.50-1.00]",
            "throughput 1 KiB  shm-ring / rtrb      =  0.50x [0.50-0.50]  (target >= 1x: MISSED)",
            "rtt spin p50      shm-ring         = 200 ns  (target < 250 ns: met)",
            "rtt spin p50      shm-ring / rtrb  =  2.00x [2.00-4.00]",
            "rtt park p50      shm-ring / futex =  1.20x [1.20-1.20]  (target <= 1.2x: met)",
        ];
        for w in want {
            assert!(text.contains(w), "missing {w:?} in\n{text}");
        }
        let rows = s.rows();
        assert_eq!(rows[0].frames_per_sec, Some(20e6));
        assert_eq!(rows[5].rtt_p50_ns, Some(200));
        assert_eq!(rows[5].frames_per_sec, None);
    }

    #[test]
    fn json_rows_have_exactly_the_documented_fields() {
        let rounds = vec![round(1.0)];
        let rows = Summary::new(&rounds).rows();
        let v: serde_json::Value = serde_json::to_value(&rows[0]).unwrap();
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
                "runs",
                "transport"
            ]
        );
        assert_eq!(v["transport"], "shm-ring");
        assert_eq!(v["frames_per_sec"], 20e6);
        assert_eq!(v["gbytes_per_sec"], 1.28);
        assert!(v["rtt_p50_ns"].is_null());
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
