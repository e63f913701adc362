//! A hashed timing wheel: O(1) to schedule, and each connection is looked at only when its own
//! deadline comes, so idle connections cost nothing between their pings.

/// A connection's key: slot and generation (a stale key is ignored by the owner).
pub type Key = (u32, u32);

/// Deadlines in ticks; entries beyond the wheel's horizon fire early and are rescheduled by
/// their owner, which always re-checks its real deadline.
pub struct Wheel {
    slots: Vec<Vec<(Key, u64)>>,
    /// The last tick processed.
    now: u64,
    len: usize,
}

impl Wheel {
    /// A wheel of `n` slots (a power of two), starting at tick `now`.
    pub fn new(n: usize, now: u64) -> Wheel {
        assert!(n.is_power_of_two());
        Wheel {
            slots: (0..n).map(|_| Vec::new()).collect(),
            now,
            len: 0,
        }
    }

    /// Entries scheduled and not yet fired.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `key` at tick `at` (at the next tick if `at` has passed); returns the tick used.
    pub fn schedule(&mut self, key: Key, at: u64) -> u64 {
        let at = at.max(self.now + 1);
        let mask = self.slots.len() as u64 - 1;
        self.slots[(at & mask) as usize].push((key, at));
        self.len += 1;
        at
    }

    /// Advances to tick `now`, appending every due `(key, tick)` to `due`.
    pub fn advance(&mut self, now: u64, due: &mut Vec<(Key, u64)>) {
        let n = self.slots.len() as u64;
        let mask = n - 1;
        // After a long pause every slot is visited once, not once per missed tick.
        let from = if now - self.now > n {
            now - n + 1
        } else {
            self.now + 1
        };
        for t in from..=now {
            let slot = &mut self.slots[(t & mask) as usize];
            let before = slot.len();
            let mut i = 0;
            while i < slot.len() {
                if slot[i].1 <= now {
                    due.push(slot.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            self.len -= before - slot.len();
        }
        self.now = self.now.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_deadline_and_beyond_horizon() {
        let mut w = Wheel::new(8, 0);
        w.schedule((1, 0), 3);
        w.schedule((2, 0), 20); // beyond the 8-tick horizon
        let mut due = Vec::new();
        w.advance(2, &mut due);
        assert!(due.is_empty());
        w.advance(3, &mut due);
        assert_eq!(due, vec![((1, 0), 3)]);
        due.clear();
        w.advance(19, &mut due);
        assert!(
            due.is_empty(),
            "not due before its tick even when its slot came round"
        );
        w.advance(20, &mut due);
        assert_eq!(due, vec![((2, 0), 20)]);
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadlines_fire_next_tick_and_long_pauses_catch_up() {
        let mut w = Wheel::new(4, 10);
        assert_eq!(w.schedule((1, 1), 5), 11);
        for k in 0..10 {
            w.schedule((k, 0), 12 + k as u64);
        }
        let mut due = Vec::new();
        w.advance(1000, &mut due);
        assert_eq!(due.len(), 11);
        assert_eq!(w.len(), 0);
    }
}
