//! The Grafana dashboard (`tools/grafana/shmrelay.json`) against a live relay: every metric its
//! queries use is in a real `/metrics` scrape, every selector is filtered by the `$instance`
//! variable, and the points the dashboard is for (connections, accepts, refusals, closes, ring
//! fill and full events, requests, replies, heartbeats, worker restarts, copied ratio) each
//! have a query. When `promtool` is installed (Debian package `prometheus`) the queries are
//! also parsed by it; otherwise that test prints a note and passes.

mod real_relay;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use real_relay::Relay;
use serde_json::Value;

const DASHBOARD: &str = include_str!("../grafana/shmrelay.json");

/// Every PromQL query of the dashboard: panel targets (rows included) and template variables.
fn queries() -> Vec<String> {
    let dash: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut found = Vec::new();
    collect_exprs(&dash["panels"], &mut found);
    for var in dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        if let Some(q) = var["query"]["query"].as_str() {
            found.push(q.to_owned());
        }
    }
    found
}

fn collect_exprs(v: &Value, found: &mut Vec<String>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, found)),
        Value::Object(map) => {
            if let Some(Value::String(e)) = map.get("expr") {
                found.push(e.clone());
            }
            map.values().for_each(|i| collect_exprs(i, found));
        }
        _ => {}
    }
}

/// The identifiers of a PromQL expression outside quoted strings, each with the character
/// that follows it (metric names, functions, label names and keywords alike).
fn identifiers(expr: &str) -> Vec<(String, Option<char>)> {
    let mut out = Vec::new();
    let mut chars = expr.chars().peekable();
    let mut quoted = None;
    let mut word = String::new();
    while let Some(c) = chars.next() {
        if let Some(q) = quoted {
            if c == '\\' {
                chars.next();
            } else if c == q {
                quoted = None;
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' || (c == '$' && word.is_empty()) {
            word.push(c);
            if !chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphanumeric() || *n == '_' || *n == ':')
            {
                out.push((std::mem::take(&mut word), chars.peek().copied()));
            }
        } else if c == '"' || c == '\'' {
            quoted = Some(c);
        }
    }
    out
}

/// The shmrelay metric names a query uses.
fn metric_names(expr: &str) -> Vec<String> {
    identifiers(expr)
        .into_iter()
        .map(|(w, _)| w)
        .filter(|w| w.starts_with("shmrelay_"))
        .collect()
}

/// Metric names in a Prometheus text scrape: from `# TYPE` lines (with the sample names a
/// histogram or summary family has, and a counter's `_total` form) and from sample lines.
fn scraped_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), kind) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            let suffixes: &[&str] = match kind {
                Some("histogram") => &["_bucket", "_sum", "_count"],
                Some("summary") => &["_sum", "_count"],
                Some("counter") => &["_total"],
                _ => &[],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.is_empty() && !line.starts_with('#') {
            let end = line
                .find(|c: char| c == '{' || c.is_whitespace())
                .unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// Whether `name` (as a query writes it) is in the scrape, allowing for a counter written
/// with or without `_total` on either side.
fn scraped(names: &BTreeSet<String>, name: &str) -> bool {
    let bare = name.strip_suffix("_total").unwrap_or(name);
    names.contains(name) || names.contains(bare) || names.contains(&format!("{bare}_total"))
}

/// A loopback port free a moment ago, for `--metrics` (the shared test harness reads only
/// the relay's `listening on` line).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `/metrics` once; the body if it answered 200.
fn get_metrics(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}

/// Scrapes a relay started with `--metrics` after a frame went through it.
fn live_scrape() -> String {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let instance = format!("grafana-{}", std::process::id());
    let relay = Relay::start_named(&instance, &["--metrics", &metrics], None);
    // One request and its reply, so the traffic counters exist with values.
    let mut c = TcpStream::connect(relay.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&[0, 0, 0, 2, b'h', b'i']).unwrap();
    let mut reply = [0u8; 6];
    c.read_exact(&mut reply).expect("echo reply");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match get_metrics(port) {
            Some(body) if body.contains("shmrelay_up") => return body,
            _ if Instant::now() > end => panic!("no /metrics on {metrics} within 30 s"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_in_a_live_scrape() {
    let scrape = live_scrape();
    let names = scraped_names(&scrape);
    assert!(names.len() > 20, "too few metrics in the scrape:\n{scrape}");
    let mut missing = BTreeSet::new();
    let mut used = BTreeSet::new();
    for q in queries() {
        let in_query = metric_names(&q);
        assert!(
            !in_query.is_empty(),
            "a query names no shmrelay metric: {q}"
        );
        for name in in_query {
            if !scraped(&names, &name) {
                missing.insert(name.clone());
            }
            used.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "queried by the dashboard but not in /metrics: {missing:?}\nscrape has: {names:?}"
    );
    println!(
        "{} metrics queried, all in the scrape: {used:?}",
        used.len()
    );
}

#[test]
fn the_dashboard_covers_what_operators_asked_for() {
    let used: BTreeSet<String> = queries().iter().flat_map(|q| metric_names(q)).collect();
    let uses = |name: &str| scraped(&used, name);
    for (what, name) in [
        ("connections", "shmrelay_connections"),
        ("accepts", "shmrelay_front_accepts_total"),
        ("refusals by reason", "shmrelay_front_rejects_total"),
        ("closes by reason", "shmrelay_front_closes_total"),
        ("ring fill", "shmrelay_ring_used_bytes"),
        ("ring fill", "shmrelay_ring_capacity_bytes"),
        ("ring full events", "shmrelay_ring_full_events_total"),
        ("request rate", "shmrelay_front_frames_in_total"),
        ("reply rate", "shmrelay_front_frames_out_total"),
        ("heartbeats", "shmrelay_front_heartbeats_total"),
        ("worker restarts", "shmrelay_worker_restarts_total"),
        ("copied ratio", "shmrelay_front_bytes_copied_total"),
        ("copied ratio", "shmrelay_front_bytes_in_total"),
        ("copied ratio", "shmrelay_front_bytes_out_total"),
    ] {
        assert!(uses(name), "no query for {what} ({name})");
    }
    // Refusals and closes are broken down by their reason label.
    for name in [
        "shmrelay_front_rejects_total",
        "shmrelay_front_closes_total",
    ] {
        assert!(
            queries()
                .iter()
                .any(|q| q.contains(name) && q.contains("by (reason)")),
            "{name} is not shown by reason"
        );
    }
}

#[test]
fn panels_are_well_formed_and_filtered_by_instance() {
    let dash: Value = serde_json::from_str(DASHBOARD).unwrap();
    assert_eq!(dash["uid"], "shmrelay");
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "instance"]);
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let grid = &p["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && grid["h"].as_u64().unwrap() > 0,
            "{title}: {grid}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        let refs: BTreeSet<&str> = targets.iter().filter_map(|t| t["refId"].as_str()).collect();
        assert_eq!(refs.len(), targets.len(), "{title}: refIds must differ");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let words = identifiers(expr);
            // Every selector of a shmrelay metric is filtered by the instance variable.
            let selectors = words
                .iter()
                .filter(|(w, _)| w.starts_with("shmrelay_"))
                .count();
            let filtered = expr.matches(r#"{instance=~"$instance"}"#).count();
            assert_eq!(selectors, filtered, "{title}: {expr}");
            // Any other metric-like name followed by `{` would be a metric the scrape
            // check does not look for.
            for (w, next) in &words {
                assert!(
                    next != &Some('{') || w.starts_with("shmrelay_"),
                    "{title}: {w} in {expr}"
                );
            }
        }
    }
}

#[test]
fn the_queries_parse_with_promtool() {
    let have = Command::new("promtool").arg("--version").output();
    if !have.is_ok_and(|o| o.status.success()) {
        println!("NOTE: promtool is not installed (Debian package `prometheus`); skipping");
        return;
    }
    // Grafana's variables replaced by values Prometheus accepts, one recording rule a query.
    let mut rules = String::from("groups:\n  - name: shmrelay-dashboard\n    rules:\n");
    for (i, q) in queries().iter().enumerate() {
        if q.starts_with("label_values(") {
            continue; // Grafana's own function, not PromQL.
        }
        let q = q
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: '{}'\n",
            q.replace('\'', "''")
        ));
    }
    let path = std::env::temp_dir().join(format!("shmrelay-grafana-{}.yml", std::process::id()));
    std::fs::write(&path, rules).unwrap();
    let mut check = Command::new("promtool");
    check.args(["check", "rules"]).arg(&path);
    let out = real_relay::run(check, "promtool check rules");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn name_extraction() {
    let text = "# HELP a_total x\n# TYPE a_total counter\na_total{x=\"1 2\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 0\n# TYPE c counter\nc_total 1\n\
                g 2\n";
    let names = scraped_names(text);
    for n in [
        "a_total", "h", "h_bucket", "h_sum", "h_count", "c", "c_total", "g",
    ] {
        assert!(names.contains(n), "{n}: {names:?}");
    }
    assert!(scraped(&names, "c") && scraped(&names, "c_total"));
    assert!(scraped(&names, "a") && !scraped(&names, "b_total"));
    let q = r#"sum by (le) (rate(shmrelay_x_bucket{instance=~"$instance", a="shmrelay_no"}[5m]))"#;
    assert_eq!(metric_names(q), ["shmrelay_x_bucket"]);
}
