//! Text output for people: aligned tables, human units, only the reasons that are non-zero.
//! Machines should use `--json` (the schema is in `shmrelay::report`).

use std::borrow::Cow;
use std::fmt::Write;

use shmrelay::report::host::{GcReport, LeaksReport, ListReport};
use shmrelay::report::{InstanceReport, LeakReport, RingReport, SideReport};

mod top;
pub use top::top;

/// A table with right-aligned columns except the first `left` ones.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
    left: usize,
    /// Per column, how readily it is dropped when the table must fit a width: 0 never, the
    /// highest first (see [`fit`]).
    ranks: Vec<u8>,
}

impl Table {
    fn new(head: &[&str], left: usize) -> Table {
        Table {
            head: head.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
            left,
            ranks: vec![0; head.len()],
        }
    }

    /// The same table whose columns are dropped in the order `ranks` gives when it must fit.
    fn ranked(mut self, ranks: &[u8]) -> Table {
        assert_eq!(ranks.len(), self.head.len(), "one rank per column");
        self.ranks = ranks.to_vec();
        self
    }

    /// This table with `other`'s columns after its own, but `other`'s first (the shared key):
    /// both have one row per item in the same order.
    fn beside(mut self, other: Table) -> Table {
        debug_assert_eq!(self.rows.len(), other.rows.len());
        self.head.extend(other.head.into_iter().skip(1));
        self.ranks.extend(other.ranks.into_iter().skip(1));
        for (mine, theirs) in self.rows.iter_mut().zip(other.rows) {
            mine.extend(theirs.into_iter().skip(1));
        }
        self
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String, indent: &str) {
        self.render_fit(out, indent, usize::MAX, usize::MAX, "");
    }

    /// Renders the heading and at most `rows` lines below it in at most `width` columns:
    /// columns are dropped by rank until the rest fit (a line still too long is cut), and the
    /// rows that do not fit are summarised in a last line, `... N more WHAT`.
    fn render_fit(&self, out: &mut String, indent: &str, width: usize, rows: usize, what: &str) {
        let cols = self.head.len();
        let mut w = vec![0usize; cols];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let keep = fit(&w, &self.ranks, 2, width.saturating_sub(indent.len()));
        let shown = if self.rows.len() > rows {
            rows.saturating_sub(1)
        } else {
            self.rows.len()
        };
        for r in std::iter::once(&self.head).chain(self.rows.iter().take(shown)) {
            let mut line = String::from(indent);
            let mut first = true;
            for (i, c) in r.iter().enumerate().take(cols).filter(|(i, _)| keep[*i]) {
                if !first {
                    line.push_str("  ");
                }
                first = false;
                if i < self.left {
                    let _ = write!(line, "{c:<width$}", width = w[i]);
                } else {
                    let _ = write!(line, "{c:>width$}", width = w[i]);
                }
            }
            out.push_str(&clip(line.trim_end(), width));
            out.push('\n');
        }
        if shown < self.rows.len() && rows > 0 {
            let more = format!("{indent}... {} more {what}", self.rows.len() - shown);
            out.push_str(&clip(&more, width));
            out.push('\n');
        }
    }
}

/// Which of the items of `widths`, joined by `sep` columns, to keep so that they fit in
/// `budget` columns: items of the highest rank go first (the rightmost among equals); rank 0
/// is never dropped, so the result may still be too wide.
fn fit(widths: &[usize], ranks: &[u8], sep: usize, budget: usize) -> Vec<bool> {
    let mut keep = vec![true; widths.len()];
    loop {
        let used = widths
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(w, _)| w + sep)
            .sum::<usize>()
            .saturating_sub(sep);
        if used <= budget {
            return keep;
        }
        let victim = (0..widths.len())
            .filter(|&i| keep[i] && ranks[i] > 0)
            .max_by_key(|&i| (ranks[i], i));
        match victim {
            Some(i) => keep[i] = false,
            None => return keep,
        }
    }
}

/// `s` in at most `width` characters: cut, with a `>` as its last one so that a cut number is
/// not read as a smaller one.
fn clip(s: &str, width: usize) -> Cow<'_, str> {
    match s.char_indices().nth(width) {
        Some(_) => {
            let mut c: String = s.chars().take(width.saturating_sub(1)).collect();
            if width > 0 {
                c.push('>');
            }
            Cow::Owned(c)
        }
        None => Cow::Borrowed(s),
    }
}

/// Words shortened, in this order, in a line still too long once all but its rank-0 pieces
/// are left out.
const ABBREVIATIONS: [(&str, &str); 4] = [
    ("connections ", "conns "),
    ("frames/s ", "f/s "),
    ("instance ", ""),
    ("total: ", ""),
];

/// Pieces of text joined by two spaces after `indent`, the pieces of the highest rank left
/// out first until the line fits in `width` (see [`fit`]), then [`ABBREVIATIONS`], then cut.
fn fit_pieces(indent: &str, pieces: &[(u8, String)], width: usize) -> String {
    let widths: Vec<usize> = pieces.iter().map(|(_, p)| p.chars().count()).collect();
    let ranks: Vec<u8> = pieces.iter().map(|(r, _)| *r).collect();
    let keep = fit(&widths, &ranks, 2, width.saturating_sub(indent.len()));
    let kept: Vec<&str> = pieces
        .iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|((_, p), _)| p.as_str())
        .collect();
    let mut line = format!("{indent}{}", kept.join("  "));
    for (long, short) in ABBREVIATIONS {
        if line.chars().count() <= width {
            break;
        }
        line = line.replace(long, short);
    }
    clip(&line, width).into_owned()
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
fn rings_table(rings: &[RingReport]) -> Table {
    let rates = rings.iter().any(|r| r.rates.is_some());
    let flow: [&str; 4] = if rates {
        ["REC/S IN", "REC/S OUT", "B/S IN", "B/S OUT"]
    } else {
        ["RECORDS IN", "RECORDS OUT", "BYTES IN", "BYTES OUT"]
    };
    let mut head = vec!["RING", "CAP", "USED", "FILL%", "HIGH"];
    head.extend(flow);
    head.extend(["FULL", "WAKEUPS", "PRODUCER", "CONSUMER"]);
    // Kept longest: the ring, its fill, its flow.
    let mut t = Table::new(&head, 1).ranked(&[0, 6, 3, 0, 4, 1, 1, 2, 2, 3, 6, 5, 5]);
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
    t
}

/// The two lines of an instance's header, as pieces ranked for [`fit_pieces`].
fn header_pieces(r: &InstanceReport) -> [Vec<(u8, String)>; 2] {
    [
        vec![
            (0, format!("instance {}", r.name)),
            (
                1,
                format!(
                    "supervisor {} {}",
                    r.supervisor_pid,
                    if r.alive { "alive" } else { "DEAD" }
                ),
            ),
            (3, format!("up {}", duration(r.uptime_secs))),
            (0, format!("connections {}", r.connections)),
            (4, format!("heartbeat {} ms ago", r.supervisor_heartbeat_ms)),
        ],
        vec![
            (
                3,
                format!("draining {}", if r.draining { "yes" } else { "no" }),
            ),
            (
                1,
                format!("pool {}", if r.pool_failed { "FAILED" } else { "ok" }),
            ),
            (
                5,
                format!(
                    "supervisor rss {}B",
                    bytes(r.supervisor_rss_kb.saturating_mul(1024))
                ),
            ),
            (5, format!("fds {}", r.supervisor_fds)),
            (
                2,
                r.rates_interval_secs.map_or_else(
                    || "no rates (one sample)".to_owned(),
                    |s| format!("rates over {s:.2}s"),
                ),
            ),
        ],
    ]
}

fn header(r: &InstanceReport, out: &mut String) {
    for (indent, pieces) in ["", "  "].into_iter().zip(header_pieces(r)) {
        fit_line(out, indent, &pieces, usize::MAX);
    }
}

/// [`fit_pieces`] as one line of `out`.
fn fit_line(out: &mut String, indent: &str, pieces: &[(u8, String)], width: usize) {
    out.push_str(&fit_pieces(indent, pieces, width));
    out.push('\n');
}

/// The fronts' processes and connections, and their traffic: one row per front each.
fn front_tables(r: &InstanceReport) -> (Table, Table) {
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
    )
    .ranked(&[0, 4, 0, 0, 3, 3, 3, 3, 6, 6, 4, 3, 5, 6]);
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
    let mut flow = Table::new(
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
    )
    .ranked(&[0, 6, 6, 6, 6, 6, 4, 1, 1, 2, 2]);
    for f in &r.fronts {
        let x = f.rates;
        flow.row(vec![
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
    (t, flow)
}

fn fronts(r: &InstanceReport, out: &mut String) {
    let (t, flow) = front_tables(r);
    t.render(out, "  ");
    out.push('\n');
    flow.render(out, "  ");
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
        let _ = writeln!(
            out,
            "  front {}: rejects {}; closes {}; io errors {}; rtt {}; stale replies {}, \
             ring-full stalls {}, corrupt rings {}, retransmits {}",
            f.index,
            nonzero(&f.rejects),
            nonzero(&f.closes),
            nonzero(&f.io_errors),
            if rtt.is_empty() {
                "no samples".to_owned()
            } else {
                rtt.join(", ")
            },
            f.stale_replies,
            f.ring_full_stalls,
            f.corrupt_rings,
            f.retransmits,
        );
    }
}

fn workers_table(r: &InstanceReport) -> Table {
    let mut t = Table::new(
        &[
            "WORKER", "PID", "PROCESS", "STATE", "RESTARTS", "CRASHES", "HANGS", "RSS", "FDS",
        ],
        1,
    )
    .ranked(&[0, 3, 1, 0, 2, 2, 2, 4, 5]);
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
    t
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
    rings_table(&r.rings).render(&mut out, "  ");
    out.push_str("\nFRONTS\n");
    fronts(r, &mut out);
    out.push_str("\nWORKERS\n");
    workers_table(r).render(&mut out, "  ");
    let _ = writeln!(out, "\nLEAKS\n  {}\n", leak_counters(&r.leaks));
    problems(&r.problems, &mut out);
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

    #[test]
    fn fit_drops_the_highest_ranks_first_and_never_rank_0() {
        // Widths 5, 5, 5 joined by 2: 19 in all.
        assert_eq!(fit(&[5, 5, 5], &[0, 1, 2], 2, 19), [true, true, true]);
        assert_eq!(fit(&[5, 5, 5], &[0, 2, 1], 2, 12), [true, false, true]);
        assert_eq!(fit(&[5, 5, 5], &[0, 1, 1], 2, 12), [true, true, false]);
        assert_eq!(fit(&[5, 5, 5], &[0, 1, 2], 2, 3), [true, false, false]);
        assert_eq!(clip("abcdef", 3), "ab>");
        assert_eq!(clip("ab", 3), "ab");
    }

    #[test]
    fn a_table_cut_to_rows_says_how_many_more() {
        let mut t = Table::new(&["A", "B"], 1).ranked(&[0, 1]);
        for i in 0..5 {
            t.row(vec![format!("row{i}"), "x".repeat(20)]);
        }
        let mut s = String::new();
        t.render_fit(&mut s, "", 20, 3, "things");
        assert_eq!(s, "A\nrow0\nrow1\n... 3 more things\n");
    }
}
