//! The front's two memory budgets: partial frames (`partial_budget`) and queued replies
//! (`pending_budget`), their gauges, and closing the largest holders past them.

use std::sync::atomic::Ordering;

use shmrelay_worker::codec::ProtocolError;
use shmrelay_worker::CloseReason;
use tracing::warn;

use super::conn::{Conn, ConnKey, Slab};
use super::Front;
use crate::stats::add;

/// The error of a connection closed because the front's partial frames passed
/// `partial_budget` and it held the largest.
const OVER_BUDGET: ProtocolError =
    ProtocolError::Invalid("partial frame over the front's memory budget");

/// One of the front's memory budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Budget {
    /// Partial frames held in connection buffers (`partial_budget`).
    Partial,
    /// Reply bytes queued for clients that do not read (`pending_budget`).
    Queued,
}

impl Front {
    /// Brings a connection's partial-frame memory into the front's total after a read,
    /// applies `partial_budget`, and makes sure its timer comes at its frame deadline.
    pub(super) fn account_partial(&mut self, key: ConnKey) {
        let now = self.now;
        let Some(c) = self.slab.get(key) else {
            return;
        };
        // At most max_frame (1 GiB) plus a header, doubled by the Vec at worst: a u32.
        let cap = c.carry.capacity().min(u32::MAX as usize) as u32;
        if cap == c.partial {
            return;
        }
        self.partial_total = self.partial_total - c.partial as usize + cap as usize;
        c.partial = cap;
        if self.frame_ticks > 0 && !c.carry.is_empty() {
            let since = (now as u32).wrapping_sub(c.partial_since) as u64;
            let deadline = (now + self.frame_ticks as u64).saturating_sub(since);
            if deadline < c.timer_at {
                c.timer_at = self.wheel.schedule(key.timer(), deadline);
            }
        }
        if self.partial_total > self.cfg.partial_budget {
            self.shed(Budget::Partial);
        }
        let fs = self.fs;
        publish_gauge(
            &fs.partial_bytes,
            &fs.partial_peak,
            self.partial_total as u64,
        );
    }

    /// Past its budget, closes the connections holding the most of it, largest first, until
    /// the front's total is back within it: partial frames with the codec's protocol error,
    /// reply queues as slow consumers.
    pub(super) fn shed(&mut self, which: Budget) {
        let (budget, held): (usize, fn(&Conn) -> usize) = match which {
            Budget::Partial => (self.cfg.partial_budget, |c| c.partial as usize),
            Budget::Queued => (self.cfg.pending_budget, |c| c.queued),
        };
        for (n, key) in largest_holders(&self.slab, held) {
            let total = match which {
                Budget::Partial => self.partial_total,
                Budget::Queued => self.queued_total,
            };
            if total <= budget {
                break;
            }
            let what = match which {
                Budget::Partial => "partial frames over partial_budget: closing the largest",
                Budget::Queued => "queued replies over pending_budget: closing the largest queue",
            };
            warn!(front = self.index, held = n, total, budget, "{what}");
            match which {
                Budget::Partial => {
                    add(&self.fs.partial_budget_closes, 1);
                    self.fail_conn(key, OVER_BUDGET);
                }
                Budget::Queued => {
                    add(&self.fs.pending_budget_closes, 1);
                    self.close_conn(key, CloseReason::SlowConsumer);
                }
            }
        }
    }

    /// Publishes the queued reply bytes for operators: the gauge, and the high-water mark
    /// (taken after the budget was applied; the total only grows in `want_write`).
    pub(super) fn publish_queued(&self) {
        let fs = self.fs;
        publish_gauge(&fs.queued_bytes, &fs.queued_peak, self.queued_total as u64);
    }
}

/// The connections holding part of a per-front budget (`held` of each, when not zero), as
/// (held, key), largest first: the order the budget closes them in.
pub(super) fn largest_holders(slab: &Slab, held: impl Fn(&Conn) -> usize) -> Vec<(usize, ConnKey)> {
    let mut big: Vec<(usize, ConnKey)> = slab
        .iter()
        .filter_map(|(key, c)| {
            let n = held(c);
            (n > 0).then_some((n, key))
        })
        .collect();
    big.sort_unstable_by(|a, b| b.cmp(a));
    big
}

/// Publishes a gauge for operators and raises its high-water mark.
pub(super) fn publish_gauge(
    gauge: &std::sync::atomic::AtomicU64,
    peak: &std::sync::atomic::AtomicU64,
    v: u64,
) {
    gauge.store(v, Ordering::Relaxed);
    peak.fetch_max(v, Ordering::Relaxed);
}
