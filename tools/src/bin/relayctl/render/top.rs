//! One frame of `relayctl top`, laid out to a terminal's size when it has one.

use shmrelay::report::InstanceReport;

use super::{
    busiest_first, bytes, clip, count, fit_line, front_tables, fronts, header_pieces, problems,
    rings_table, workers_table,
};

/// One frame of `relayctl top`. With `size` (columns, rows: a terminal's), it is laid out to
/// fit: one table per section, the least important columns dropped first, each section
/// given a fair share of the rows (the ones left out are counted in a `... N more` line),
/// and no line longer than the width nor more lines than the rows.
pub fn top(r: &InstanceReport, size: Option<(usize, usize)>) -> String {
    let (mut fi, mut fo, mut bi, mut bo) = (0.0, 0.0, 0.0, 0.0);
    for f in r.fronts.iter().filter_map(|f| f.rates) {
        fi += f.frames_in_per_sec;
        fo += f.frames_out_per_sec;
        bi += f.bytes_in_per_sec;
        bo += f.bytes_out_per_sec;
    }
    let totals = [
        (0, format!("total: {} frames/s in", count(fi))),
        (1, format!("{} frames/s out", count(fo))),
        (2, format!("{}B/s in", bytes(bi as u64))),
        (2, format!("{}B/s out", bytes(bo as u64))),
        (3, "(q or Ctrl-C quits)".to_owned()),
    ];
    let (width, height) = size.unwrap_or((usize::MAX, usize::MAX));
    let mut out = String::new();
    for (indent, pieces) in ["", "  "].into_iter().zip(header_pieces(r)) {
        fit_line(&mut out, indent, &pieces, width);
    }
    fit_line(&mut out, "  ", &totals, width);
    let mut rings = r.rings.clone();
    busiest_first(&mut rings);
    let mut tail = String::new();
    problems(&r.problems, &mut tail);
    if size.is_none() {
        out.push_str("\nFRONTS\n");
        fronts(r, &mut out);
        out.push_str("\nWORKERS\n");
        workers_table(r).render(&mut out, "  ");
        out.push_str("\nRINGS (busiest first)\n");
        rings_table(&rings).render(&mut out, "  ");
        out.push('\n');
        out.push_str(&tail);
        return out;
    }
    // Problems last, on at most a sixth of the screen; the sections share what is left.
    let tail_rows = (height / 6).max(1);
    let mut tail: Vec<String> = tail.lines().map(str::to_owned).collect();
    if tail.len() > tail_rows {
        let n = r.problems.len();
        if tail_rows == 1 {
            tail = vec![format!("{n} problem(s), first: {}", r.problems[0])];
        } else {
            let hidden = tail.len() - (tail_rows - 1);
            tail.truncate(tail_rows - 1);
            tail.push(format!("  ... {hidden} more problems"));
        }
    }
    let (front, flow) = front_tables(r);
    let sections = [
        (front.beside(flow), "fronts"),
        (workers_table(r), "workers"),
        (rings_table(&rings), "rings (busiest first)"),
    ];
    let head_rows = out.lines().count() + tail.len() + sections.len();
    let room = height.saturating_sub(head_rows);
    let need: Vec<usize> = sections.iter().map(|(t, _)| t.rows.len()).collect();
    let got = share(&need, room);
    // A blank line before each section and the problems when everything else fits.
    let gaps = room > need.iter().sum::<usize>() + sections.len();
    for ((t, what), (need, got)) in sections.iter().zip(need.iter().zip(got)) {
        if got == 0 && *need > 0 {
            continue;
        }
        if gaps {
            out.push('\n');
        }
        t.render_fit(&mut out, "  ", width, got, what);
    }
    if gaps {
        out.push('\n');
    }
    for line in tail {
        out.push_str(&clip(&line, width));
        out.push('\n');
    }
    out.lines().take(height).map(|l| format!("{l}\n")).collect()
}

/// Rows given to sections needing `need` rows out of `room`: one at a time to each section
/// that still needs some, in turn, so that a long section cannot crowd out the others.
fn share(need: &[usize], mut room: usize) -> Vec<usize> {
    let mut got = vec![0; need.len()];
    loop {
        let mut gave = false;
        for (g, n) in got.iter_mut().zip(need) {
            if room > 0 && *g < *n {
                *g += 1;
                room -= 1;
                gave = true;
            }
        }
        if !gave {
            return got;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_takes_turns() {
        assert_eq!(share(&[4, 8, 64], 18), [4, 7, 7]);
        assert_eq!(share(&[4, 8, 64], 100), [4, 8, 64]);
        assert_eq!(share(&[4, 8, 64], 2), [1, 1, 0]);
        assert_eq!(share(&[0, 8, 64], 3), [0, 2, 1]);
    }

    /// An instance of 4 fronts and 8 workers (64 rings) with traffic, rates and problems.
    fn busy_instance() -> InstanceReport {
        let stats = shmrelay::stats::Stats::create_memfd(4, 8).unwrap();
        let mut r = InstanceReport::from_stats(
            "edge-frontdoor-1",
            std::path::Path::new("/dev/shm/shmrelay.edge-frontdoor-1.stats"),
            &stats,
        );
        r.supervisor_pid = 4_194_303;
        r.alive = true;
        r.uptime_secs = 3725.0;
        r.connections = 123_456;
        r.rates_interval_secs = Some(1.0);
        for f in &mut r.fronts {
            f.pid = 4_194_000 + f.index as u32;
            f.connections.open = 30_864;
            f.accepts = 1_234_567;
            f.frames_in = 9_876_543_210;
            f.bytes_in = 1 << 40;
            f.rates = Some(shmrelay::report::FrontRates {
                frames_in_per_sec: 1_234_567.0,
                frames_out_per_sec: 1_234_000.0,
                bytes_in_per_sec: 123_456_789.0,
                bytes_out_per_sec: 123_456_000.0,
                ..Default::default()
            });
        }
        for w in &mut r.workers {
            w.pid = 4_195_000 + w.index as u32;
        }
        assert_eq!(r.rings.len(), 64);
        for (i, g) in r.rings.iter_mut().enumerate() {
            g.error = None;
            g.capacity = 1 << 20;
            g.used = (i as u64 * 4099) % (1 << 20);
            g.fill_percent = 100.0 * g.used as f64 / g.capacity as f64;
            g.high_water = 1 << 19;
            g.producer.pid = 4_194_000;
            g.consumer.pid = 4_195_000;
            g.rates = Some(shmrelay::report::RingRates {
                records_in_per_sec: 10_000.0 * i as f64,
                bytes_in_per_sec: 1_000_000.0 * i as f64,
                records_out_per_sec: 10_000.0 * i as f64,
                bytes_out_per_sec: 1_000_000.0 * i as f64,
                ..Default::default()
            });
        }
        r.problems = (0..7)
            .map(|i| format!("worker {i} is hung: no heartbeat for 12 s"))
            .collect();
        r
    }

    /// The first line of `frame` that starts (after the indent) with `word`.
    fn line_of<'a>(frame: &'a str, word: &str) -> &'a str {
        frame
            .lines()
            .find(|l| l.trim_start().starts_with(word))
            .unwrap_or_else(|| panic!("no {word} line in\n{frame}"))
    }

    #[test]
    fn top_fits_the_terminal() {
        let r = busy_instance();
        for (w, h) in [(80, 24), (120, 40), (40, 10)] {
            let frame = top(&r, Some((w, h)));
            let lines: Vec<&str> = frame.lines().collect();
            assert!(lines.len() <= h, "{w}x{h}: {} lines\n{frame}", lines.len());
            for l in &lines {
                assert!(l.chars().count() <= w, "{w}x{h}: too long: {l:?}\n{frame}");
            }
            assert!(
                lines[0].starts_with("instance edge-frontdoor-1"),
                "{w}x{h}: the header goes first\n{frame}"
            );
            assert!(
                frame.contains("more"),
                "{w}x{h}: rows left out are counted\n{frame}"
            );
        }
        // At 80x24 every section is there with its most important columns.
        let frame = top(&r, Some((80, 24)));
        assert!(
            line_of(&frame, "instance").contains("connections 123456"),
            "{frame}"
        );
        let fronts = line_of(&frame, "FRONT");
        for col in ["STATE", "OPEN", "FRAMES/S IN", "FRAMES/S OUT", "B/S IN"] {
            assert!(
                fronts.contains(col),
                "{col} missing from {fronts:?}\n{frame}"
            );
        }
        let workers = line_of(&frame, "WORKER");
        for col in ["PROCESS", "STATE", "RESTARTS"] {
            assert!(
                workers.contains(col),
                "{col} missing from {workers:?}\n{frame}"
            );
        }
        let rings = line_of(&frame, "RING");
        for col in ["FILL%", "REC/S IN", "REC/S OUT", "B/S IN", "USED"] {
            assert!(rings.contains(col), "{col} missing from {rings:?}\n{frame}");
        }
        // Busiest first: the ring with the highest rates (index 63: f3.w7 rep) leads.
        let first_ring = frame
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("RING"))
            .nth(1);
        assert!(
            first_ring.is_some_and(|l| l.contains("f3.w7 rep")),
            "{frame}"
        );
        assert!(frame.contains("more rings"), "{frame}");
        assert!(frame.contains("7 problem(s)"), "{frame}");
        let tiny = top(&r, Some((40, 10)));
        assert!(
            line_of(&tiny, "instance").contains("conns 123456"),
            "{tiny}"
        );
        assert!(line_of(&tiny, "RING").contains("FILL%"), "{tiny}");
        // Wider and taller shows more, never less.
        let big = top(&r, Some((120, 40)));
        assert!(big.lines().count() > frame.lines().count(), "{big}");
        assert!(line_of(&big, "FRONT").len() > fronts.len(), "{big}");
    }

    #[test]
    fn top_without_a_size_shows_everything() {
        let r = busy_instance();
        let frame = top(&r, None);
        // To look at the layouts: RELAYCTL_SHOW_FRAMES=1 cargo test ... -- --nocapture.
        if std::env::var_os("RELAYCTL_SHOW_FRAMES").is_some() {
            for size in [(80, 24), (120, 40), (40, 10)] {
                println!("{size:?}\n{}", top(&r, Some(size)));
            }
        }
        assert!(frame.contains("\nFRONTS\n") && frame.contains("RINGS (busiest first)"));
        assert!(!frame.contains("more rings"), "{frame}");
        assert_eq!(
            frame.matches(" rep ").count() + frame.matches(" req ").count(),
            64
        );
        // Only the height given: every ring row fits in 120 lines, no width limit.
        let tall = top(&r, Some((usize::MAX, 120)));
        assert!(!tall.contains("more rings"), "{tall}");
    }
}
