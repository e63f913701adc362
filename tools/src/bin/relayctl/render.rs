//! Text output for people: aligned tables, human units, only the reasons that are non-zero.
//! Machines should use `--json` (the schema is in `shmrelay::report`).

use std::fmt::Write;

use shmrelay::report::host::{GcReport, LeaksReport, ListReport};
use shmrelay::report::{InstanceReport, LeakReport, RingReport, SideReport};

/// A table with right-aligned columns except the first `left` ones.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
    left: usize,
}

impl Table {
    fn new(head: &[&str], left: usize) -> Table {
        Table {
            head: head.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
            left,
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String, indent: &str) {
        let cols = self.head.len();
        let mut w = vec![0usize; cols];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        for r in std::iter::once(&self.head).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, c) in r.iter().enumerate().take(cols) {
                if i > 0 {
                    line.push_str("  ");
                }
                if i < self.left {
                    let _ = write!(line, "{c:<width$}", width = w[i]);
                } else {
                    let _ = write!(line, "{c:>width$}", width = w[i]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

/// `1536` -> `1.5Ki`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["", "Ki", "Mi", "Gi", "Ti", "Pi"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// `12345` -> `12.3k`.
pub fn count(n: f64) -> String {
    let a = n.abs();
    if a >= 1e9 {
        format!("{:.1}G", n / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", n / 1e3)
    } else if n.fract() == 0.0 {
        format!("{n:.0}")
    } else {
        format!("{n:.1}")
    }
}

/// `3725.0` -> `1h02m05s`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h{m:02}m")
    } else if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{:.1}s", secs.max(0.0))
    }
}

fn rate(v: Option<f64>, unit: fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), unit)
}

fn byte_rate(v: f64) -> String {
    bytes(v as u64)
}

fn side(s: &SideReport) -> String {
    if s.pid == 0 {
        "-".to_owned()
    } else {
        format!("{} {}", s.pid, s.liveness.as_str())
    }
}

fn ring_id(r: &RingReport) -> String {
    format!(
        "f{}.w{} {}",
        r.front,
        r.worker,
        match r.direction {
            shmrelay::report::Dir::Request => "req",
            shmrelay::report::Dir::Reply => "rep",
        }
    )
}

/// Rings busiest first: by bytes per second (in + out), then by fill.
pub fn busiest_first(rings: &mut [RingReport]) {
    let load = |r: &RingReport| {
        r.rates
            .map_or(0.0, |x| x.bytes_in_per_sec + x.bytes_out_per_sec)
    };
    rings.sort_by(|a, b| {
        load(b)
            .total_cmp(&load(a))
            .then(b.used.cmp(&a.used))
            .then((a.front, a.worker, a.direction).cmp(&(b.front, b.worker, b.direction)))
    });
}

/// With rates, the ring table shows records and bytes per second; without (one sample), the
/// totals.
fn rings_table(rings: &[RingReport], out: &mut String) {
    let rates = rings.iter().any(|r| r.rates.is_some());
    let flow: [&str; 4] = if rates {
        ["REC/S IN", "REC/S OUT", "B/S IN", "B/S OUT"]
    } else {
        ["RECORDS IN", "RECORDS OUT", "BYTES IN", "BYTES OUT"]
    };
    let mut head = vec!["RING", "CAP", "USED", "FILL%", "HIGH"];
    head.extend(flow);
    head.extend(["FULL", "WAKEUPS", "PRODUCER", "CONSUMER"]);
    let mut t = Table::new(&head, 1);
    for r in rings {
        if let Some(e) = &r.error {
            let mut row = vec![ring_id(r), format!("error: {e}")];
            row.resize(head.len(), String::new());
            t.row(row);
            continue;
        }
        let mut row = vec![
            ring_id(r),
            bytes(r.capacity),
            bytes(r.used),
            format!("{:.1}", r.fill_percent),
            bytes(r.high_water),
        ];
        if rates {
            let x = r.rates;
            row.extend([
                rate(x.map(|x| x.records_in_per_sec), count),
                rate(x.map(|x| x.records_out_per_sec), count),
                rate(x.map(|x| x.bytes_in_per_sec), byte_rate),
                rate(x.map(|x| x.bytes_out_per_sec), byte_rate),
            ]);
        } else {
            row.extend([
                count(r.records_in as f64),
                count(r.records_out as f64),
                bytes(r.bytes_in),
                bytes(r.bytes_out),
            ]);
        }
        row.extend([
            count(r.full_events as f64),
            count(r.wakeups as f64),
            side(&r.producer),
            side(&r.consumer),
        ]);
        t.row(row);
    }
    t.render(out, "  ");
}

fn header(r: &InstanceReport, out: &mut String) {
    let _ = writeln!(
        out,
        "instance {}  supervisor {} {}  up {}  connections {}  heartbeat {} ms ago",
        r.name,
        r.supervisor_pid,
        if r.alive { "alive" } else { "DEAD" },
        duration(r.uptime_secs),
        r.connections,
        r.supervisor_heartbeat_ms,
    );
    let _ = writeln!(
        out,
        "  draining {}  pool {}  supervisor rss {}B  fds {}  {}",
        if r.draining { "yes" } else { "no" },
        if r.pool_failed { "FAILED" } else { "ok" },
        bytes(r.supervisor_rss_kb.saturating_mul(1024)),
        r.supervisor_fds,
        r.rates_interval_secs.map_or_else(
            || "no rates (one sample)".to_owned(),
            |s| format!("rates over {s:.2}s")
        ),
    );
}

fn fronts(r: &InstanceReport, out: &mut String) {
    let mut t = Table::new(
        &[
            "FRONT",
            "PID",
            "STATE",
            "OPEN",
            "DRAIN",
            "ACCEPTS",
            "REJECTS",
            "CLOSES",
            "HEARTBEATS",
            "PINGS",
            "PROTO ERR",
            "RESTARTS",
            "RSS",
            "FDS",
        ],
        1,
    );
    for f in &r.fronts {
        t.row(vec![
            f.index.to_string(),
            f.pid.to_string(),
            format!(
                "{}{}",
                f.liveness.as_str(),
                if f.paused { ",paused" } else { "" }
            ),
            f.connections.open.to_string(),
            f.connections.draining.to_string(),
            count(f.accepts as f64),
            count(f.rejects.values().fold(0u64, |a, b| a.saturating_add(*b)) as f64),
            count(f.closes.values().fold(0u64, |a, b| a.saturating_add(*b)) as f64),
            count(f.heartbeats as f64),
            count(f.pings_sent as f64),
            count(f.protocol_errors as f64),
            f.restarts.to_string(),
            format!("{}B", bytes(f.rss_kb.saturating_mul(1024))),
            f.fds.to_string(),
        ]);
    }
    t.render(out, "  ");
    let mut t = Table::new(
        &[
            "FRONT",
            "FRAMES IN",
            "FRAMES OUT",
            "BYTES IN",
            "BYTES OUT",
            "COPIED",
            "COPIED%",
            "FRAMES/S IN",
            "FRAMES/S OUT",
            "B/S IN",
            "B/S OUT",
        ],
        1,
    );
    for f in &r.fronts {
        let x = f.rates;
        t.row(vec![
            f.index.to_string(),
            count(f.frames_in as f64),
            count(f.frames_out as f64),
            bytes(f.bytes_in),
            bytes(f.bytes_out),
            bytes(f.bytes_copied),
            format!("{:.3}", 100.0 * f.copied_ratio),
            rate(x.map(|x| x.frames_in_per_sec), count),
            rate(x.map(|x| x.frames_out_per_sec), count),
            rate(x.map(|x| x.bytes_in_per_sec), byte_rate),
            rate(x.map(|x| x.bytes_out_per_sec), byte_rate),
        ]);
    }
    out.push('\n');
    t.render(out, "  ");
    for f in &r.fronts {
        let nonzero = |m: &std::collections::BTreeMap<String, u64>| {
            let v: Vec<String> = m
                .iter()
                .filter(|(_, n)| **n != 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        let rtt: Vec<String> = f
            .rtt_histogram
            .iter()
            .filter(|b| b.count != 0)
            .map(|b| match b.below_us {
                Some(us) => format!("<{}us {}", us, b.count),
                None => format!("more {}", b.count),
            })
            .collect();
        let _ =
            writeln!(
            out,
            "  front {}: rejects {}; closes {}; rtt {}; stale replies {}, ring-full stalls {}, \
             corrupt rings {}, retransmits {}",
            f.index,
            nonzero(&f.rejects),
            nonzero(&f.closes),
            if rtt.is_empty() { "no samples".to_owned() } else { rtt.join(", ") },
            f.stale_replies,
            f.ring_full_stalls,
            f.corrupt_rings,
            f.retransmits,
        );
    }
}

fn workers(r: &InstanceReport, out: &mut String) {
    let mut t = Table::new(
        &[
            "WORKER", "PID", "PROCESS", "STATE", "RESTARTS", "CRASHES", "HANGS", "RSS", "FDS",
        ],
        1,
    );
    for w in &r.workers {
        t.row(vec![
            w.index.to_string(),
            w.pid.to_string(),
            w.liveness.as_str().to_owned(),
            w.state.to_string(),
            w.restarts.to_string(),
            w.crashes.to_string(),
            w.hangs.to_string(),
            format!("{}B", bytes(w.rss_kb.saturating_mul(1024))),
            w.fds.to_string(),
        ]);
    }
    t.render(out, "  ");
}

fn leak_counters(l: &LeakReport) -> String {
    format!(
        "stale segments removed {}, leaked conns {}, fd growth {}, rss growth {}, \
         reclaimed reservations {}, orphans killed {}, stale rings {}",
        l.stale_segments_removed,
        l.leaked_conns,
        l.fd_growth_events,
        l.rss_growth_events,
        l.reclaimed_reservations,
        l.orphans_killed,
        l.stale_rings.len()
    )
}

fn problems(p: &[String], out: &mut String) {
    if p.is_empty() {
        out.push_str("no problems\n");
    } else {
        let _ = writeln!(out, "{} problem(s):", p.len());
        for x in p {
            let _ = writeln!(out, "  - {x}");
        }
    }
}

/// `relayctl stat`.
pub fn stat(r: &InstanceReport) -> String {
    let mut out = String::new();
    header(r, &mut out);
    out.push_str("\nRINGS\n");
    rings_table(&r.rings, &mut out);
    out.push_str("\nFRONTS\n");
    fronts(r, &mut out);
    out.push_str("\nWORKERS\n");
    workers(r, &mut out);
    let _ = writeln!(out, "\nLEAKS\n  {}\n", leak_counters(&r.leaks));
    problems(&r.problems, &mut out);
    out
}

/// One frame of `relayctl top`, at most `rows` lines when given (a terminal).
pub fn top(r: &InstanceReport, rows: Option<usize>) -> String {
    let mut out = String::new();
    header(r, &mut out);
    let (mut fi, mut fo, mut bi, mut bo) = (0.0, 0.0, 0.0, 0.0);
    for f in r.fronts.iter().filter_map(|f| f.rates) {
        fi += f.frames_in_per_sec;
        fo += f.frames_out_per_sec;
        bi += f.bytes_in_per_sec;
        bo += f.bytes_out_per_sec;
    }
    let _ = writeln!(
        out,
        "  total: {} frames/s in, {} frames/s out, {}B/s in, {}B/s out   (q or Ctrl-C quits)",
        count(fi),
        count(fo),
        bytes(bi as u64),
        bytes(bo as u64)
    );
    out.push_str("\nFRONTS\n");
    fronts(r, &mut out);
    out.push_str("\nWORKERS\n");
    workers(r, &mut out);
    let mut rings = r.rings.clone();
    busiest_first(&mut rings);
    // Problems last, rings in between take what room is left on the screen.
    let mut tail = String::new();
    problems(&r.problems, &mut tail);
    if let Some(rows) = rows {
        let used = out.lines().count() + tail.lines().count() + 3;
        let room = rows.saturating_sub(used).max(1);
        if rings.len() > room {
            let hidden = rings.len() - room;
            rings.truncate(room);
            let _ = writeln!(out, "\nRINGS (busiest first, {hidden} more not shown)");
        } else {
            out.push_str("\nRINGS (busiest first)\n");
        }
    } else {
        out.push_str("\nRINGS (busiest first)\n");
    }
    rings_table(&rings, &mut out);
    out.push('\n');
    out.push_str(&tail);
    out
}

/// `relayctl list`.
pub fn list(l: &ListReport) -> String {
    if l.instances.is_empty() {
        return format!("no shmrelay instances in {}\n", l.shm_dir);
    }
    let mut t = Table::new(
        &[
            "NAME", "PID", "STATE", "UPTIME", "FRONTS", "WORKERS", "CONNS", "FILES", "SIZE",
        ],
        1,
    );
    for i in &l.instances {
        t.row(vec![
            i.name.clone(),
            i.supervisor_pid.to_string(),
            if i.alive { "alive" } else { "dead" }.to_owned(),
            if i.alive {
                duration(i.uptime_secs)
            } else {
                "-".to_owned()
            },
            i.fronts.to_string(),
            i.workers.to_string(),
            i.connections.to_string(),
            i.files.len().to_string(),
            format!("{}B", bytes(i.bytes)),
        ]);
    }
    let mut out = String::new();
    t.render(&mut out, "");
    for i in &l.instances {
        if let Some(e) = &i.error {
            let _ = writeln!(out, "{}: {e}", i.name);
        }
    }
    if l.instances.iter().any(|i| !i.alive) {
        out.push_str("dead instances leave their segments behind: `relayctl gc` removes them\n");
    }
    out
}

/// `relayctl leaks`.
pub fn leaks(l: &LeaksReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "shm directory {}", l.shm_dir);
    if l.dead_instances.is_empty() {
        out.push_str("dead instances: none\n");
    } else {
        out.push_str("dead instances (supervisor gone, segments left behind):\n");
        for d in &l.dead_instances {
            let _ = writeln!(
                out,
                "  {}  supervisor pid {}  {} file(s), {}B",
                d.name,
                d.supervisor_pid,
                d.files.len(),
                bytes(d.bytes)
            );
            for f in &d.files {
                let _ = writeln!(out, "    {f}");
            }
        }
    }
    if l.orphan_files.is_empty() {
        out.push_str("orphan files: none\n");
    } else {
        out.push_str("orphan files (no stats segment for their instance):\n");
        for o in &l.orphan_files {
            let who = if o.attached_pids.is_empty() {
                "no live process attached".to_owned()
            } else {
                format!("attached by pid(s) {:?}", o.attached_pids)
            };
            let _ = writeln!(out, "  {}  {}B  {who}", o.path, bytes(o.bytes));
        }
    }
    for i in &l.instances {
        let _ = writeln!(
            out,
            "instance {} (pid {}): {}",
            i.name,
            i.supervisor_pid,
            leak_counters(&i.leaks)
        );
        for s in &i.leaks.stale_rings {
            let _ = writeln!(
                out,
                "  ring f{}.w{} {}: {} pid {} is dead",
                s.front,
                s.worker,
                s.direction.as_str(),
                s.side,
                s.pid
            );
        }
    }
    out.push('\n');
    problems(&l.problems, &mut out);
    if !l.dead_instances.is_empty() || l.orphan_files.iter().any(|o| o.attached_pids.is_empty()) {
        out.push_str("run `relayctl gc --dry-run` to see what would be removed, `relayctl gc` to remove it\n");
    }
    out
}

/// `relayctl gc`.
pub fn gc(g: &GcReport) -> String {
    let mut out = String::new();
    let verb = if g.dry_run { "would remove" } else { "removed" };
    for f in &g.removed {
        let _ = writeln!(
            out,
            "{verb} {}  ({}B, instance {}, {})",
            f.path,
            bytes(f.bytes),
            f.instance,
            f.reason
        );
    }
    for f in &g.failed {
        let _ = writeln!(out, "could not remove {}: {}", f.path, f.error);
    }
    for f in &g.untrusted {
        let _ = writeln!(out, "left alone (not trusted): {}", f.error);
    }
    if g.removed.is_empty() && g.failed.is_empty() {
        let _ = writeln!(out, "nothing to remove in {}", g.shm_dir);
    } else if g.dry_run {
        let _ = writeln!(
            out,
            "dry run: nothing removed; {} file(s), {}B would be freed",
            g.removed.len(),
            bytes(g.bytes)
        );
    } else {
        let _ = writeln!(
            out,
            "{} file(s), {}B freed",
            g.removed.len(),
            bytes(g.bytes)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(bytes(512), "512");
        assert_eq!(bytes(1536), "1.5Ki");
        assert_eq!(bytes(4 << 20), "4.0Mi");
        assert_eq!(count(12.0), "12");
        assert_eq!(count(12345.0), "12.3k");
        assert_eq!(duration(3725.0), "1h02m05s");
        assert_eq!(duration(2.5), "2.5s");
    }

    #[test]
    fn table_aligns() {
        let mut t = Table::new(&["A", "NUM"], 1);
        t.row(vec!["long".into(), "1".into()]);
        let mut s = String::new();
        t.render(&mut s, "");
        assert_eq!(s, "A     NUM\nlong    1\n");
    }
}
