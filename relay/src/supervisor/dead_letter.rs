//! Dead-lettering: the frame a worker died on, redelivered and fatal again, is skipped by the
//! next replacement and its connection closed with an error.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shm_ring::{RingStorage, ShmRing};
use shmrelay::stats::unix_ms;
use shmrelay_worker::protocol::{tag, DEAD_LETTER_WORDS, INFLIGHT_WORD};
use tracing::error;

use super::Instance;

/// The connection whose frame ends at request position `at` in `ring` (its consumer dead):
/// read from the records between the released position and the tail.
fn frame_conn(ring: &ShmRing, codec: shmrelay_worker::Codec, at: u64) -> Option<u64> {
    let mut rx = shm_ring::Consumer::new(ring).ok()?;
    let records = rx.records().ok()?;
    for rec in records {
        let rec = rec.ok()?;
        if rec.tag() != tag::DATA || rec.end() < at {
            continue;
        }
        let base = rec.payload_position();
        for frame in codec.frames(rec.payload()) {
            let (end, _) = frame.ok()?;
            if base + end as u64 == at {
                return Some(rec.conn());
            }
        }
        return None;
    }
    None
}

impl Instance {
    /// After a crash of worker `w`: which frame was it in? The same frame in flight at more
    /// than `dead_letter_after` crashes in a row (the first delivery and each redelivery) is
    /// dead-lettered. Returns how many crashes that frame caused (they are forgiven).
    pub(super) fn note_crash_frames(&mut self, w: usize) -> u32 {
        let mut forgiven = 0;
        for f in 0..self.cfg.fronts {
            let ring = &self.rings[f][w].0;
            let h = ring.header();
            let head = h.head.load(Ordering::Relaxed);
            // Acquire: pairs with the front's Release store of the tail; the records up to it
            // are read below.
            let tail = h.tail.load(Ordering::Acquire);
            // Written by the dead worker: believed only within what it had not released of
            // what the front published. Cleared, so that a replacement that dies before it
            // reaches any frame does not look as if it died on this one again.
            let at = ring.user_words()[INFLIGHT_WORD].swap(0, Ordering::Relaxed);
            let suspect = &mut self.suspects[f][w];
            if self.cfg.dead_letter_after == 0 || !(head < at && at <= tail) {
                *suspect = (0, 0);
                continue;
            }
            if suspect.0 == at {
                suspect.1 += 1;
            } else {
                *suspect = (at, 1);
            }
            if suspect.1 <= self.cfg.dead_letter_after {
                continue;
            }
            forgiven = forgiven.max(suspect.1);
            *suspect = (0, 0);
            self.dead_letter(f, w, at);
        }
        forgiven
    }

    /// Dead-letters the frame ending at request position `at` of ring (f, w), with its worker
    /// dead: the replacement skips it, its connection is closed with an error by the front.
    fn dead_letter(&mut self, f: usize, w: usize, at: u64) {
        let codec = self.cfg.listeners()[self.worker_listener[w]].codec();
        let ring = &self.rings[f][w].0;
        let words = ring.user_words();
        // Two slots, so that two poison frames in one redelivered batch do not take turns;
        // the older (lower) position is overwritten.
        let [a, b] = DEAD_LETTER_WORDS;
        let slot = if words[a].load(Ordering::Relaxed) <= words[b].load(Ordering::Relaxed) {
            a
        } else {
            b
        };
        words[slot].store(at, Ordering::Relaxed);
        let conn = frame_conn(ring, codec, at);
        let ws = self.stats.worker(w);
        ws.dead_letters.fetch_add(1, Ordering::Relaxed);
        ws.dead_letter_conn
            .store(conn.unwrap_or(0), Ordering::Relaxed);
        ws.dead_letter_pos.store(at, Ordering::Relaxed);
        ws.dead_letter_unix_ms.store(unix_ms(), Ordering::Relaxed);
        match conn {
            Some(conn) => {
                // One connection at a time: a front takes it within its 100 ms check (a rare
                // wait, on a crash path); if it does not, this one replaces the older.
                let deadline = Instant::now() + Duration::from_millis(500);
                while ws.dead_letter_pending.load(Ordering::Relaxed) != 0
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Release: pairs with the front's Acquire load of the mailbox.
                ws.dead_letter_pending.store(conn, Ordering::Release);
                error!(
                    front = f,
                    worker = w,
                    position = at,
                    conn = %shmrelay_worker::ConnId::from_raw(conn),
                    "a frame crashed its worker {} times in a row: dead-lettered (skipped by the replacement; its connection gets an error and is closed)",
                    self.cfg.dead_letter_after + 1
                );
            }
            None => error!(
                front = f,
                worker = w,
                position = at,
                "a frame crashed its worker repeatedly: dead-lettered, but its connection was not found in the ring"
            ),
        }
    }
}
