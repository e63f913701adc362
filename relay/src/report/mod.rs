//! Point-in-time reports of an instance, read from its shared memory through read-only
//! mappings, for `relayctl` and the Prometheus endpoint.
//!
//! Reading a report never writes to the relay's memory and takes no lock the relay could wait
//! on: it copies the operators' view the supervisor publishes ([`View::read`]: the counters
//! and a snapshot of every ring; see [`crate::view`]) into private memory, opened without
//! blocking or trusting it, and bounds every value it uses. Every value is a relaxed load of a counter another process is
//! updating, so a report is consistent enough for display, not an atomic snapshot: for example
//! `records_out` of a ring can briefly exceed what `used` suggests.
//!
//! Rates need two reports: take one, wait, take another and call [`fill_rates`].
//! [`prometheus`] renders a report in the Prometheus text format; [`host`] finds instances,
//! dead instances' segments and orphan files in the shm directory, and removes the dead ones.
//!
//! # Wire format
//!
//! `relayctl stat --json` prints one [`InstanceReport`] as a JSON object, `relayctl top --json`
//! one per line per refresh; `relayctl list --json`, `leaks --json` and `gc --json` print a
//! [`host::ListReport`], [`host::LeaksReport`] and [`host::GcReport`]. The structs in this module
//! *are* the schema: each field's rustdoc gives its meaning and unit, and deserialising the
//! output with these types (as the tests do) is the way to consume it from Rust.
//!
//! Conventions:
//!
//! - Field names are snake_case; enums are lowercase strings (`"request"`, `"alive"`, ...).
//! - Counters (`..._total` in Prometheus) are unsigned integers counted since the instance
//!   started; they never decrease except when the process that writes them restarts (front and
//!   ring counters can then start again from zero).
//! - Units are in the name or the doc: `_secs` seconds, `_ms` milliseconds, `_kb` KiB,
//!   `bytes` bytes, `_per_sec` per second averaged over the interval between two reports.
//! - Maps keyed by reason (`rejects`, `closes`) list every known reason, zeros included, so a
//!   consumer can rely on the keys; a counter slot with no known name appears as `code_N`.
//! - Rate fields are `null` in a report taken on its own, numbers after [`fill_rates`].
//! - New fields may be added; consumers should ignore fields they do not know. Renaming or
//!   removing a field is a breaking change of the schema.
//!
//! A shortened example of an [`InstanceReport`]:
//!
//! ```json
//! {
//!   "name": "edge", "supervisor_pid": 4242, "alive": true, "uptime_secs": 812.4,
//!   "started_unix_ms": 1718000000000, "taken_unix_ms": 1718000812400,
//!   "supervisor_heartbeat_ms": 12, "draining": false, "pool_failed": false,
//!   "connections": 128, "supervisor_rss_kb": 5120, "supervisor_fds": 31,
//!   "rates_interval_secs": 1.0,
//!   "fronts": [{ "index": 0, "pid": 4250, "liveness": "alive", "connections": {"open": 128, "draining": 0},
//!                "accepts": 130, "rejects": {"conn_limit": 0, "...": 0}, "closes": {"client_eof": 2, "...": 0},
//!                "frames_in": 90211, "bytes_in": 9021100, "copied_ratio": 0.0004, "...": "...",
//!                "rates": {"frames_in_per_sec": 1200.0, "...": 0.0} }],
//!   "workers": [{ "index": 0, "pid": 4251, "liveness": "alive", "state": "running", "restarts": 0, "...": 0 }],
//!   "rings": [{ "front": 0, "worker": 0, "direction": "request", "capacity": 4194304, "used": 0,
//!               "fill_percent": 0.0, "producer": {"pid": 4250, "liveness": "alive", "...": 0}, "...": 0 }],
//!   "leaks": { "stale_segments_removed": 0, "stale_rings": [], "...": 0 },
//!   "problems": []
//! }
//! ```
//!
//! Files: [`types`] holds the report types (the schema above), `build` reads them from a
//! view, [`liveness`] says whether a pid is alive, `problems` lists findings, `rates`
//! computes rates between two reports.
//!
//! [`View::read`]: crate::view::View::read

use std::io;
use std::path::PathBuf;

mod build;
pub mod host;
pub mod liveness;
mod problems;
pub(crate) mod prom;
mod rates;
pub mod types;

pub use crate::names::Dir;
pub use crate::stats::WorkerState;
pub use build::rtt_bucket_bound;
pub use liveness::{process_liveness, Liveness, STALL_AFTER};
pub use prom::{prometheus, PROMETHEUS_CONTENT_TYPE};
pub use rates::fill_rates;
pub use types::*;

/// Why a report could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// No stats segment for this instance in the shm directory.
    #[error("no instance `{name}`: {} does not exist", path.display())]
    NotFound { name: String, path: PathBuf },
    /// The stats segment exists but could not be mapped or is not a valid stats segment
    /// (another layout version, truncated, not initialised).
    #[error("reading the stats segment {}: {source}", path.display())]
    Stats {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::stats::unix_ms;
    use crate::view::View;

    /// A temp shm dir for one test; removed on drop.
    pub(crate) struct TempShm(pub PathBuf);

    impl TempShm {
        pub(crate) fn new(tag: &str) -> TempShm {
            let dir = std::env::temp_dir().join(format!(
                "shmrelay-report-{tag}-{}-{}",
                std::process::id(),
                unix_ms()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempShm(dir)
        }
    }

    impl Drop for TempShm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The enums serialise to the strings `--json` printed when these fields were strings.
    #[test]
    fn states_and_directions_keep_their_json_strings() {
        let all = [
            (WorkerState::Stopped, "stopped"),
            (WorkerState::Running, "running"),
            (WorkerState::Restarting, "restarting"),
            (WorkerState::Failed, "failed"),
            (WorkerState::Hung, "hung"),
        ];
        for (s, name) in all {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{name}\""));
            assert_eq!(s.to_string(), name);
            assert_eq!(
                serde_json::from_str::<WorkerState>(&format!("\"{name}\"")).unwrap(),
                s
            );
        }
        for (d, name) in [(Dir::Request, "request"), (Dir::Reply, "reply")] {
            assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{name}\""));
            assert_eq!(d.to_string(), name);
        }
    }

    /// A view full of garbage (valid magic and version, everything else random), read the way
    /// relayctl and the metrics endpoint read it: a report, rates between two of them, the
    /// Prometheus text. Nothing may panic (this runs with overflow checks).
    #[test]
    fn garbage_in_the_view_never_panics_a_reader() {
        use crate::view::published_size;
        let tmp = TempShm::new("garbage");
        let path = tmp.0.join("shmrelay.g.stats");
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut reports = Vec::new();
        for seed in 0..6 {
            let mut bytes = vec![0u8; published_size(64 * 2)];
            for chunk in bytes.chunks_mut(8) {
                let v = match seed % 3 {
                    0 => next(),
                    1 => u64::MAX - (next() % 4),
                    _ => next() % 1000,
                };
                chunk.copy_from_slice(&v.to_ne_bytes()[..chunk.len()]);
            }
            crate::layout::stamp_view_header(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            let view = View::read(&path).unwrap();
            let r = InstanceReport::build("g", &path, &view.stats, Some(&view), true);
            let text = prometheus(&r);
            assert!(text.contains("shmrelay_up"));
            prom::tests::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            let _ = serde_json::to_string(&r).unwrap();
            reports.push(r);
        }
        for pair in reports.windows(2) {
            let mut b = pair[1].clone();
            fill_rates(&pair[0], &mut b, Duration::from_millis(1));
            let _ = prometheus(&b);
        }
    }
}
