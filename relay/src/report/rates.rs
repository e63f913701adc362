//! Per-second rates from the counters' growth between two reports.

use std::time::Duration;

use super::{FrontRates, InstanceReport, RingRates};

/// Fills the rates of `cur` from the counters' growth since `prev`, taken `interval` earlier.
///
/// Fronts are matched by index and rings by (front, worker, direction); a counter that went
/// down (its process restarted) counts as no growth. An interval of zero leaves `cur`
/// unchanged.
pub fn fill_rates(prev: &InstanceReport, cur: &mut InstanceReport, interval: Duration) {
    let secs = interval.as_secs_f64();
    if secs <= 0.0 {
        return;
    }
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    for f in &mut cur.fronts {
        let Some(p) = prev.fronts.iter().find(|p| p.index == f.index) else {
            continue;
        };
        f.rates = Some(FrontRates {
            accepts_per_sec: rate(p.accepts, f.accepts),
            frames_in_per_sec: rate(p.frames_in, f.frames_in),
            frames_out_per_sec: rate(p.frames_out, f.frames_out),
            bytes_in_per_sec: rate(p.bytes_in, f.bytes_in),
            bytes_out_per_sec: rate(p.bytes_out, f.bytes_out),
        });
    }
    for r in &mut cur.rings {
        let Some(p) = prev
            .rings
            .iter()
            .find(|p| (p.front, p.worker, p.direction) == (r.front, r.worker, r.direction))
        else {
            continue;
        };
        r.rates = Some(RingRates {
            records_in_per_sec: rate(p.records_in, r.records_in),
            bytes_in_per_sec: rate(p.bytes_in, r.bytes_in),
            records_out_per_sec: rate(p.records_out, r.records_out),
            bytes_out_per_sec: rate(p.bytes_out, r.bytes_out),
            full_events_per_sec: rate(p.full_events, r.full_events),
            wakeups_per_sec: rate(p.wakeups, r.wakeups),
        });
    }
    cur.rates_interval_secs = Some(secs);
}
