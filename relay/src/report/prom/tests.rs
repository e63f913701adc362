//! A strict-enough parser of the OpenMetrics text for tests, and the exposition's tests.

use super::*;
use crate::report::tests::TempShm;
use crate::stats::{add, Stats};

/// A sample as [`parse`] returns it: name, labels, value.
pub(crate) type ParsedSample = (String, Vec<(String, String)>, f64);

/// Parses the OpenMetrics text strictly enough for tests: returns `(name, labels, value)` per
/// sample and checks that every sample belongs to a family announced by `# TYPE` (a counter's
/// samples with `_total`) and that the text ends with `# EOF`.
pub(crate) fn parse(text: &str) -> Result<Vec<ParsedSample>, String> {
    let mut typed: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
        if eof {
            return Err(err("after # EOF"));
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if line.is_empty() {
            return Err(err("empty line"));
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut it = rest.splitn(3, ' ');
            match (it.next(), it.next(), it.next()) {
                (Some("HELP" | "UNIT"), Some(_), Some(_)) => {}
                (Some("TYPE"), Some(name), Some(kind)) => {
                    let suffix = match kind {
                        "counter" => "_total",
                        "gauge" | "histogram" | "info" | "stateset" | "unknown" => "",
                        _ => return Err(err("unknown type")),
                    };
                    typed.push(format!("{name}{suffix}"));
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
    if !eof {
        return Err("no # EOF".to_owned());
    }
    Ok(samples)
}

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
            &[("front", "1"), ("le", "15.0")]
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
    // Counters keep their `_total` sample names; the RTT sum is unknown.
    assert_eq!(
        find("shmrelay_front_accepts_total", &[("front", "0")]),
        Some(0.0)
    );
    assert!(
        find("shmrelay_front_rtt_microseconds_sum", &[("front", "1")]).is_some_and(f64::is_nan)
    );
    assert!(text.ends_with("# EOF\n"));
    // Exactly one HELP and TYPE per family.
    let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let mut dedup = types.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(types.len(), dedup.len());
}
