//! `Config::validate`: every setting's range and the relations between settings, each
//! refused by name with the reason.

use super::*;

impl Config {
    /// Checks ranges and relations between settings.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |name, problem: String| Err(ConfigError::Invalid { name, problem });
        if !crate::names::valid_instance(&self.instance) {
            return bad(
                "instance",
                format!("{:?}: use 1-64 of [A-Za-z0-9_-]", self.instance),
            );
        }
        // 0 is "auto" (fronts::AUTO), worked out at start by `Config::resolve`.
        if self.fronts > crate::stats::MAX_FRONTS {
            return bad(
                "fronts",
                format!(
                    "{} not in 1..={} (or \"auto\")",
                    self.fronts,
                    crate::stats::MAX_FRONTS
                ),
            );
        }
        if self.workers == 0 || self.workers > crate::stats::MAX_WORKERS {
            return bad(
                "workers",
                format!("{} not in 1..={}", self.workers, crate::stats::MAX_WORKERS),
            );
        }
        let range = |name, v: u64, lo: u64, hi: u64, why: &str| {
            if (lo..=hi).contains(&v) {
                return Ok(());
            }
            let limits = if hi == u64::MAX {
                format!("at least {lo}")
            } else {
                format!("in {lo}..={hi}")
            };
            bad(name, format!("{v} is not {limits}: {why}"))
        };
        range(
            "max_frame",
            self.max_frame.into(),
            1,
            MAX_FRAME_LIMIT.into(),
            "0 refuses every frame; each ring holds two frames, and there are 2 x fronts x workers rings",
        )?;
        range(
            "max_conns",
            self.max_conns(),
            1,
            u64::MAX,
            "0 refuses every connection",
        )?;
        range(
            "accept_rate",
            self.accept_rate,
            0,
            MAX_ACCEPT_TOKENS,
            "new connections per second (0: no limit); the shared bucket counts in 24 bits",
        )?;
        range(
            "accept_burst",
            self.accept_burst,
            1,
            MAX_ACCEPT_TOKENS,
            "the bucket holds at least one token and counts in 24 bits",
        )?;
        range(
            "max_pending",
            self.max_pending as u64,
            1,
            u64::MAX,
            "0 disconnects a client at the first reply it does not take at once",
        )?;
        range(
            "backlog",
            self.backlog.max(0) as u64,
            1,
            65535,
            "the listen queue (the kernel caps it at net.core.somaxconn)",
        )?;
        range(
            "crash_limit",
            self.crash_limit.into(),
            1,
            u64::MAX,
            "0 would mark a worker failed at any crash (that is 1)",
        )?;
        for (name, v, lo, why) in [
            (
                "ping_max_ms",
                self.ping_max_ms,
                1,
                "0 would ping without pause",
            ),
            (
                "heartbeat_timeout_ms",
                self.heartbeat_timeout_ms.unwrap_or(1),
                1,
                "0 would close every connection at once",
            ),
            ("idle_timeout_ms", self.idle_timeout_ms, 0, "0: never"),
            ("drain_ms", self.drain_ms, 0, "0: no drain"),
            (
                "crash_window_ms",
                self.crash_window_ms,
                1,
                "0 would never mark a worker failed",
            ),
            (
                "hang_timeout_ms",
                self.hang_timeout_ms,
                1,
                "0 would call every worker with a frame waiting hung",
            ),
            (
                "failed_retry_max_ms",
                self.failed_retry_max_ms,
                1,
                "0 would retry a failed worker without pause",
            ),
            ("frame_timeout_ms", self.frame_timeout_ms, 0, "0: never"),
        ] {
            range(name, v, lo, MAX_MS, &format!("{why}; at most 7 days"))?;
        }
        let cap = self.ring_capacity();
        if cap > MAX_RING_CAPACITY {
            return bad(
                "ring_capacity",
                format!("{cap} is above {MAX_RING_CAPACITY} (4 GiB): each of the 2 x fronts x workers rings takes this much memory"),
            );
        }
        if !shm_ring::layout::valid_capacity(cap as u64) {
            return bad(
                "ring_capacity",
                format!("{cap} is not a power of two between 4096 and 2^40"),
            );
        }
        let max_record = shm_ring::layout::max_payload(cap);
        if self.max_frame as usize + 4 > max_record {
            return bad(
                "max_frame",
                format!("{} does not fit a ring of {cap} bytes (largest record {max_record}); raise ring_capacity", self.max_frame),
            );
        }
        if self.ping_min_ms == 0 || self.ping_min_ms > self.ping_max_ms {
            return bad(
                "ping_min_ms",
                format!(
                    "{} must be > 0 and <= ping_max_ms ({})",
                    self.ping_min_ms, self.ping_max_ms
                ),
            );
        }
        if self
            .heartbeat_timeout_ms
            .is_some_and(|t| t <= self.ping_max_ms)
        {
            return bad(
                "heartbeat_timeout_ms",
                "must exceed ping_max_ms, or clients are closed before they can answer a ping"
                    .into(),
            );
        }
        if !self.listeners.is_empty() {
            // What the file, the flags and --set could not tell apart from a default: a
            // top-level value that differs from it beside the tables.
            let d = Config::default();
            let set = [
                ("listen", self.listen != d.listen),
                ("codec", self.codec != d.codec),
                ("workers", self.workers != d.workers),
                ("worker_cmd", self.worker_cmd.is_some()),
            ];
            if let Some((name, _)) = set.into_iter().find(|(_, set)| *set) {
                return bad(name, per_listener_conflict(name));
            }
        }
        for l in self.listeners() {
            if let Some(cmd) = &l.worker_cmd {
                cmd.argv()?;
            }
        }
        for l in &self.listeners {
            if l.workers == 0 {
                return bad("listener.workers", format!("{} has no workers", l.listen));
            }
        }
        if self.partial_budget < self.max_frame as usize + 4 {
            return bad(
                "partial_budget",
                format!(
                    "{} is below one frame of max_frame ({}): no split frame could be read",
                    self.partial_budget, self.max_frame
                ),
            );
        }
        if self.pending_budget < self.max_pending.min(self.max_frame as usize + 4) {
            return bad(
                "pending_budget",
                format!(
                    "{} cannot hold one reply of max_frame ({}) for a slow client",
                    self.pending_budget, self.max_frame
                ),
            );
        }
        let total = self.total_workers();
        if total > crate::stats::MAX_WORKERS {
            return bad(
                "workers",
                format!(
                    "{total} workers in all exceed {}",
                    crate::stats::MAX_WORKERS
                ),
            );
        }
        Ok(())
    }
}
