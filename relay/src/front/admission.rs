//! Admission control, global across all fronts: a connection cap, a per-address cap and an
//! accept-rate token bucket, all kept in the stats segment that every front maps.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::Config;
use crate::stats::{RejectReason, Stats, ADDR_SLOTS};

/// Tokens kept in the low bits of the bucket word; the refill time (ms) in the rest.
const TOKEN_BITS: u32 = 24;
const TOKEN_MASK: u64 = (1 << TOKEN_BITS) - 1;

pub(super) struct Admission {
    max_conns: u64,
    per_addr: u64,
    rate: u64,
    burst: u64,
    fronts: usize,
    index: usize,
}

impl Admission {
    pub fn new(cfg: &Config, index: usize) -> Admission {
        Admission {
            max_conns: cfg.max_conns(),
            per_addr: cfg.max_conns_per_addr,
            rate: cfg.accept_rate,
            burst: cfg.accept_burst.clamp(1, TOKEN_MASK),
            fronts: cfg.fronts,
            index,
        }
    }

    /// Admits a connection from `ip`, taking its place in the global counts, or says why not.
    /// Returns the address slot to pass to [`release`](Admission::release) when it closes.
    pub fn admit(&self, stats: &Stats, ip: IpAddr) -> Result<u16, RejectReason> {
        let h = stats.header();
        // The cap is exact: the add reserves a place, and is undone if over.
        if h.conns_total.fetch_add(1, Ordering::Relaxed) >= self.max_conns {
            crate::stats::sub_saturating(&h.conns_total, 1);
            return Err(RejectReason::ConnLimit);
        }
        let slot = addr_slot(ip);
        // Per address: each front counts its own; two fronts admitting the same address at the
        // same instant can overshoot the cap by at most fronts - 1.
        if self.per_addr > 0 && stats.addr_count(self.fronts, slot) >= self.per_addr {
            crate::stats::sub_saturating(&h.conns_total, 1);
            return Err(RejectReason::PerAddress);
        }
        if self.rate > 0 && !take_token(&h.accept_bucket, self.rate, self.burst, now_ms()) {
            crate::stats::sub_saturating(&h.conns_total, 1);
            return Err(RejectReason::Rate);
        }
        stats
            .addr_slot(self.index, slot)
            .fetch_add(1, Ordering::Relaxed);
        Ok(slot as u16)
    }

    /// Gives back what [`admit`](Admission::admit) took.
    pub fn release(&self, stats: &Stats, slot: u16) {
        crate::stats::sub_saturating(&stats.header().conns_total, 1);
        stats
            .addr_slot(self.index, slot as usize)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

fn addr_slot(ip: IpAddr) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ip.hash(&mut h);
    (h.finish() % ADDR_SLOTS as u64) as usize
}

fn now_ms() -> u64 {
    shm_ring::monotonic_ns() / 1_000_000
}

/// Takes one token from a bucket refilled at `rate` per second up to `burst`, shared by every
/// front through one word: `refill_ms << 24 | tokens`, updated with compare-and-swap.
fn take_token(bucket: &AtomicU64, rate: u64, burst: u64, now: u64) -> bool {
    let mut cur = bucket.load(Ordering::Relaxed);
    loop {
        let (mut at, mut tokens) = (cur >> TOKEN_BITS, cur & TOKEN_MASK);
        if at == 0 {
            // First use: a full bucket.
            at = now;
            tokens = burst;
        }
        let refill = now.saturating_sub(at) * rate / 1000;
        if refill > 0 {
            tokens = (tokens + refill).min(burst);
            // Advance by the time the whole tokens took, keeping the fraction for next time.
            at += refill * 1000 / rate;
            if tokens == burst {
                at = now;
            }
        }
        if tokens == 0 {
            return false;
        }
        let new = at << TOKEN_BITS | (tokens - 1);
        // Relaxed: the word is self-contained; nothing else is published through it.
        match bucket.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(actual) => cur = actual,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let b = AtomicU64::new(0);
        let t0 = 1_000_000;
        let taken = (0..20).filter(|_| take_token(&b, 10, 5, t0)).count();
        assert_eq!(taken, 5, "the burst");
        assert!(
            !take_token(&b, 10, 5, t0 + 50),
            "half a token is not a token"
        );
        assert!(
            take_token(&b, 10, 5, t0 + 100),
            "one token after 100 ms at 10/s"
        );
        assert!(!take_token(&b, 10, 5, t0 + 150));
        let later = (0..20)
            .filter(|_| take_token(&b, 10, 5, t0 + 10_000))
            .count();
        assert_eq!(later, 5, "refill stops at the burst");
    }
}
