//! The SPSC record ring: [`Producer`] and [`Consumer`] over any [`RingStorage`](crate::RingStorage).

mod consumer;
mod producer;
mod write;

pub use consumer::{Consumer, Record, Records};
pub use producer::Producer;
pub use write::WriteGrant;

use crate::error::AttachError;
use crate::layout::{RingHeader, Side};
use crate::sync::{AtomicU32, Ordering};
use crate::wake::Doorbell;

/// Spins before parking. A spinning hand-off costs well under a microsecond and a futex wake
/// 17-36 us on these machines, so a few microseconds of spinning pay for themselves under load;
/// 256 checks take about 7 us here (2,000 took 53 us, longer than the wake they avoid).
#[cfg(not(loom))]
pub(crate) const SPIN_LIMIT: u32 = 256;
#[cfg(loom)]
pub(crate) const SPIN_LIMIT: u32 = 1;

/// What a record says besides its payload. The ring gives `tag`, `flags`, `conn` and `aux` no
/// meaning (except that tag `0xFFFF` is reserved for padding).
///
/// # Examples
///
/// ```
/// let m = shm_ring::Meta::tag(2).conn(99).flags(1).aux(7);
/// assert_eq!((m.tag, m.conn, m.flags, m.aux), (2, 99, 1, 7));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub tag: u16,
    pub flags: u16,
    pub conn: u64,
    pub aux: u64,
}

impl Meta {
    /// Metadata with this tag and everything else zero.
    pub const fn tag(tag: u16) -> Meta {
        Meta {
            tag,
            flags: 0,
            conn: 0,
            aux: 0,
        }
    }
    /// With this connection id.
    pub const fn conn(mut self, conn: u64) -> Meta {
        self.conn = conn;
        self
    }
    /// With these flags.
    pub const fn flags(mut self, flags: u16) -> Meta {
        self.flags = flags;
        self
    }
    /// With this auxiliary word.
    pub const fn aux(mut self, aux: u64) -> Meta {
        self.aux = aux;
        self
    }
}

/// The clock of the liveness words (`Side::active_ns`), read every [`LIVENESS_EVERY`]-th
/// publish and release and on the slow paths:
/// `CLOCK_MONOTONIC_COARSE`, the same clock as [`monotonic_ns`](crate::monotonic_ns) at tick
/// resolution (it lags it by at most one tick, 1-10 ms), for a fraction of the cost (13 ns
/// against 57 ns on the 2-core VMs, where it was a quarter of a spinning round trip). Liveness
/// is judged over hundreds of milliseconds, so the coarse value loses nothing.
#[inline]
pub(crate) fn activity_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Publishes (producer) or releases (consumer) between two liveness stamps of a side under
/// load, and parks between two stamps of a side with nothing waiting. Reading the clock cost
/// 45-57 ns per call on the 2-core test VMs (the coarse clock included), a fifth of a spinning
/// round trip that publishes and releases twice; every 16th call it costs 3 ns. A side also
/// stamps whenever it wakes its peer, releases while records remain unreleased, parks with a
/// backlog, is dropped or is asked to (`heartbeat`), so a side that does few operations, or a
/// consumer sitting on a backlog, is stamped on every one that matters (see
/// [`SideStats::after_move`]).
pub(crate) const LIVENESS_EVERY: u32 = 16;

/// A side's counters, kept privately and stored to shared memory with plain relaxed stores
/// (single writer: no read-modify-write needed).
#[derive(Default)]
pub(crate) struct SideStats {
    pub active_ns: u64,
    pub records: u64,
    pub bytes: u64,
    pub full_events: u64,
    pub wakeups_sent: u64,
    pub parks: u64,
    pub high_water: u64,
    /// Calls of `after_move` since the last `touch`.
    since_touch: u32,
}

impl SideStats {
    /// Continues the counters of a previous holder of the side (they are hints, so a garbage
    /// value from a hostile peer only makes the statistics wrong).
    pub fn load(s: &Side) -> SideStats {
        SideStats {
            active_ns: activity_ns(),
            records: s.records.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            full_events: s.full_events.load(Ordering::Relaxed),
            wakeups_sent: s.wakeups_sent.load(Ordering::Relaxed),
            parks: s.parks.load(Ordering::Relaxed),
            high_water: s.high_water.load(Ordering::Relaxed),
            since_touch: 0,
        }
    }

    fn store(&self, s: &Side) {
        s.active_ns.store(self.active_ns, Ordering::Relaxed);
        s.records.store(self.records, Ordering::Relaxed);
        s.bytes.store(self.bytes, Ordering::Relaxed);
        s.full_events.store(self.full_events, Ordering::Relaxed);
        s.wakeups_sent.store(self.wakeups_sent, Ordering::Relaxed);
        s.parks.store(self.parks, Ordering::Relaxed);
        s.high_water.store(self.high_water, Ordering::Relaxed);
    }

    /// After a publish or release: stores the record and byte counters (so they are exact at
    /// every publish and release, also for a side that is killed next), and every
    /// [`LIVENESS_EVERY`]-th time, or now if `stamp`, the liveness stamp and the other
    /// counters (those move only on slow paths).
    #[inline]
    pub fn after_move(&mut self, s: &Side, stamp: bool) {
        s.records.store(self.records, Ordering::Relaxed);
        s.bytes.store(self.bytes, Ordering::Relaxed);
        self.touch_now_and_then(s, stamp);
    }

    /// After a publish, a release or a park: every [`LIVENESS_EVERY`]-th time, or now if
    /// `stamp`, the liveness stamp and every counter.
    #[inline]
    pub fn touch_now_and_then(&mut self, s: &Side, stamp: bool) {
        self.since_touch += 1;
        if stamp || self.since_touch >= LIVENESS_EVERY {
            self.touch(s);
        }
    }

    /// Stamps the side as alive now and stores every counter.
    #[inline(never)]
    pub fn touch(&mut self, s: &Side) {
        self.since_touch = 0;
        self.active_ns = activity_ns();
        self.store(s);
    }
}

/// P4 of the wake protocol (wake.rs), for either side: takes the peer's announcement in its
/// sleep word `word` and rings `doorbell`. True if this call woke it. Out of line: a side under
/// load never gets here.
#[cold]
#[inline(never)]
pub(crate) fn wake_peer(
    word: &AtomicU32,
    h: &RingHeader,
    doorbell: &Doorbell,
    stats: &mut SideStats,
) -> bool {
    if word.swap(0, Ordering::Relaxed) != 1 {
        return false;
    }
    doorbell.ring(word, h);
    stats.wakeups_sent = stats.wakeups_sent.wrapping_add(1);
    true
}

/// Marks this process as the holder of a side, refusing if a live other process holds it.
/// The pid is advisory (pids can be reused), a guard against two producers by mistake; the
/// supervisor, which starts every process, is the real authority.
pub(crate) fn claim_side(side: &Side, name: &'static str) -> Result<(), AttachError> {
    let me = std::process::id();
    let pid = side.pid.load(Ordering::Relaxed);
    if pid != 0 && pid != me && crate::process_alive(pid) {
        return Err(AttachError::InUse { side: name, pid });
    }
    side.pid.store(me, Ordering::Relaxed);
    let n = side.attach_count.load(Ordering::Relaxed);
    side.attach_count
        .store(n.wrapping_add(1), Ordering::Relaxed);
    side.active_ns.store(activity_ns(), Ordering::Relaxed);
    Ok(())
}

pub(crate) fn release_side(side: &Side) {
    if side.pid.load(Ordering::Relaxed) == std::process::id() {
        side.pid.store(0, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::{HeapRing, RingStorage};

    /// Counters are exact after every publish and release; the liveness stamp (which costs a
    /// clock read) comes every `LIVENESS_EVERY`-th time, and on every release that leaves
    /// records behind. A zeroed `active_ns` shows which calls stamped.
    #[test]
    fn counters_every_time_liveness_every_16th_and_on_a_backlog() {
        let (mut tx, mut rx) = HeapRing::channel(1 << 16).unwrap();
        let ring = tx.storage().clone();
        let h = ring.header();
        h.producer.active_ns.store(0, Ordering::Relaxed);
        for i in 1..=u64::from(LIVENESS_EVERY) {
            tx.push(Meta::tag(1), b"abc").unwrap();
            tx.publish();
            assert_eq!(h.producer.records.load(Ordering::Relaxed), i);
            assert_eq!(h.producer.bytes.load(Ordering::Relaxed), 3 * i);
            let stamped = h.producer.active_ns.load(Ordering::Relaxed) != 0;
            assert_eq!(stamped, i == u64::from(LIVENESS_EVERY), "publish {i}");
        }
        // Releasing everything but the last record leaves a backlog: stamped at once.
        h.consumer.active_ns.store(0, Ordering::Relaxed);
        let ends: Vec<u64> = rx.records().unwrap().map(|r| r.unwrap().end()).collect();
        rx.release(ends[ends.len() - 2]);
        assert_ne!(h.consumer.active_ns.load(Ordering::Relaxed), 0);
        assert_eq!(
            h.consumer.records.load(Ordering::Relaxed),
            u64::from(LIVENESS_EVERY)
        );
        // Releasing the rest empties the ring: counted, not stamped.
        h.consumer.active_ns.store(0, Ordering::Relaxed);
        rx.release(ends[ends.len() - 1]);
        assert_eq!(h.consumer.active_ns.load(Ordering::Relaxed), 0);
        // Dropping a side stamps it.
        drop(rx);
        assert_ne!(h.consumer.active_ns.load(Ordering::Relaxed), 0);
    }

    /// A park with nothing waiting is stamped every `LIVENESS_EVERY`-th time; one that leaves
    /// records unreleased at once (a reader calls that consumer stalled after a while without
    /// a stamp); a `finish_park` with no announcement standing touches nothing.
    #[test]
    fn parks_stamp_every_16th_and_with_a_backlog() {
        let (mut tx, mut rx) = HeapRing::channel(1 << 16).unwrap();
        let ring = tx.storage().clone();
        let h = ring.header();
        h.consumer.active_ns.store(0, Ordering::Relaxed);
        rx.finish_park();
        assert_eq!(h.consumer.active_ns.load(Ordering::Relaxed), 0);
        for i in 1..=LIVENESS_EVERY {
            assert!(rx.prepare_park().unwrap());
            assert_eq!(h.consumer_sleep.load(Ordering::Relaxed), 1);
            rx.finish_park();
            assert_eq!(h.consumer_sleep.load(Ordering::Relaxed), 0);
            let stamped = h.consumer.active_ns.load(Ordering::Relaxed) != 0;
            assert_eq!(stamped, i == LIVENESS_EVERY, "park {i}");
        }
        // Two records, one read and kept: the consumer has a backlog when it parks.
        tx.push(Meta::tag(1), b"a").unwrap();
        tx.push(Meta::tag(1), b"b").unwrap();
        tx.publish();
        let first = rx.records().unwrap().next().unwrap().unwrap().end();
        rx.release(first);
        h.consumer.active_ns.store(0, Ordering::Relaxed);
        assert!(rx.prepare_park().unwrap());
        rx.finish_park();
        assert_ne!(h.consumer.active_ns.load(Ordering::Relaxed), 0);
        // The producer: no announcement, nothing withdrawn or stamped.
        h.producer.active_ns.store(0, Ordering::Relaxed);
        h.producer_sleep.store(1, Ordering::Relaxed);
        tx.finish_park();
        assert_eq!(h.producer_sleep.load(Ordering::Relaxed), 1);
        assert_eq!(h.producer.active_ns.load(Ordering::Relaxed), 0);
    }
}
