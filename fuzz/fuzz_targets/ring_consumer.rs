//! The ring consumer reading memory a hostile producer writes: arbitrary positions in the
//! header and arbitrary bytes (or plausible record headers) in the data area, changed between
//! reads. `Consumer::new`, `records`, `release` and friends must never panic, and every record
//! they hand out must lie inside the data area and between the released position and the tail.
//!
//! The ring is a `HeapRing`: its data area is one heap allocation of exactly `capacity` bytes,
//! so AddressSanitizer reports any read outside it (in a memfd mapping, a read just past the
//! data area would land in the rest of the page unnoticed). The ring code is generic over the
//! storage, so this is the same code the front and the workers run on shared memory.

#![no_main]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shm_ring::layout::{RecordHeader, MAX_POSITION, RECORD_HEADER_SIZE, TAG_PAD};
use shm_ring::{Consumer, HeapRing, Meta, Producer, RingStorage};

/// A position: one of a few bases (0, mid-range, around the attach limit, just below 2^64, or
/// raw) plus an offset.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Pos {
    Zero(u32),
    Mid(u32),
    NearMax(u16),
    Raw(u64),
    NearLimit(u16),
}

impl Pos {
    fn get(self) -> u64 {
        match self {
            Pos::Zero(o) => o as u64,
            Pos::Mid(o) => (1u64 << 40) + o as u64,
            // Around the largest position a side accepts at attach: positions only grow from
            // there, and must never reach 2^64 (see regressions/).
            Pos::NearLimit(o) => MAX_POSITION + 4096 - o as u64,
            Pos::NearMax(o) => u64::MAX - o as u64,
            Pos::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A record header at 8-byte slot `at` (what a producer writes, possibly lying).
    Header {
        at: u16,
        len: u32,
        tag: u16,
    },
    /// A padding record header at slot `at`.
    Pad {
        at: u16,
        len: u32,
    },
    /// Raw bytes at byte offset `at`.
    Bytes {
        at: u16,
        bytes: Vec<u8>,
    },
    /// The hostile producer stores a tail.
    Tail(Pos),
    /// ... or moves it forward by a little.
    TailAdd(u16),
    /// ... or stores a head (the consumer's own word).
    Head(Pos),
    /// A well-behaved push through a real producer (if one could attach), then publish.
    Push {
        len: u16,
        tag: u16,
    },
    /// Iterate up to `take` records, release after the `release`-th one.
    Read {
        take: u8,
        release: u8,
    },
    IsEmpty,
    Park,
    /// Drop the consumer and attach a new one (a restarted front reading a ring left behind).
    Reattach,
    /// The producer's side of the same distrust: read back what it published and the hostile
    /// consumer did not release (a restarted producer does this), and validate the head.
    Unreleased {
        take: u8,
    },
    /// Drop the producer and attach a new one (reads the tail and head left behind).
    ReattachProducer,
}

#[derive(Arbitrary, Debug)]
struct Input {
    cap_shift: u8,
    head: Pos,
    tail: Pos,
    data: Vec<u8>,
    ops: Vec<Op>,
}

fn write_bytes(ring: &HeapRing, at: usize, bytes: &[u8]) {
    let cap = ring.capacity();
    let at = at % cap;
    let n = bytes.len().min(cap - at);
    // SAFETY: `at + n <= cap` bytes of the ring's data area, which no reference covers now
    // (no record is alive between operations).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ring.data().add(at), n) };
}

fn write_header(ring: &HeapRing, slot: u16, hdr: RecordHeader) {
    let cap = ring.capacity();
    let at = (slot as usize * 8) % cap;
    if at + std::mem::size_of::<RecordHeader>() > cap {
        return;
    }
    // SAFETY: inside the data area, 8-aligned (the area is u64-aligned), no live references.
    unsafe {
        ring.data()
            .add(at)
            .cast::<RecordHeader>()
            .write_volatile(hdr)
    };
}

fn read(c: &mut Consumer<Arc<HeapRing>>, ring: &HeapRing, take: u8, release: u8) {
    let data = ring.data() as usize;
    let cap = ring.capacity();
    let released = c.position();
    let mut seen = Vec::new();
    let mut release_at = None;
    if let Ok(records) = c.records() {
        for (i, rec) in records.take(take as usize).enumerate() {
            let Ok(rec) = rec else { break };
            let p = rec.payload();
            // Touch every byte: ASan checks the reads.
            let sum = p.iter().fold(0u8, |a, &b| a.wrapping_add(b));
            std::hint::black_box(sum);
            seen.push((rec.position(), rec.end(), p.as_ptr() as usize, p.len()));
            if i + 1 == release as usize {
                release_at = Some(rec.end());
            }
        }
    }
    let tail = c.seen_tail();
    let mut prev = released;
    for &(pos, end, ptr, len) in &seen {
        assert!(
            pos >= prev && end >= pos + (RECORD_HEADER_SIZE + len) as u64 && end <= tail,
            "record {pos}..{end} outside {released}..{tail}"
        );
        assert!(
            ptr >= data && ptr + len <= data + cap,
            "payload outside the data area"
        );
        assert_eq!(end % 8, 0);
        prev = end;
    }
    if let Some(end) = release_at {
        c.release(end);
        assert_eq!(c.position(), end);
    }
}

fuzz_target!(|input: Input| {
    let cap = 4096usize << (input.cap_shift % 3);
    let ring = HeapRing::new(cap).expect("valid capacity");
    let h = ring.header();
    write_bytes(&ring, 0, &input.data);
    h.head.store(input.head.get(), Ordering::Relaxed);
    h.tail.store(input.tail.get(), Ordering::Relaxed);
    let mut consumer = Consumer::new(ring.clone()).ok();
    // A real producer, when the positions let one attach: mixes valid records into the garbage.
    let mut producer = Producer::new(ring.clone()).ok();
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Header { at, len, tag } => write_header(
                &ring,
                at,
                RecordHeader {
                    len,
                    tag,
                    flags: 0,
                    conn: 0,
                },
            ),
            Op::Pad { at, len } => write_header(
                &ring,
                at,
                RecordHeader {
                    len,
                    tag: TAG_PAD,
                    flags: 0,
                    conn: 0,
                },
            ),
            Op::Bytes { at, bytes } => write_bytes(&ring, at as usize, &bytes),
            Op::Tail(p) => h.tail.store(p.get(), Ordering::Relaxed),
            Op::TailAdd(n) => {
                let t = h.tail.load(Ordering::Relaxed);
                h.tail.store(t.wrapping_add(n as u64), Ordering::Relaxed);
            }
            Op::Head(p) => h.head.store(p.get(), Ordering::Relaxed),
            Op::Push { len, tag } => {
                if let Some(p) = producer.as_mut() {
                    let tag = if tag == TAG_PAD { 0 } else { tag };
                    let payload = vec![0xA5u8; len as usize % 3000];
                    // Odd lengths also carry an aux word after the payload.
                    let meta = Meta::tag(tag).conn(len as u64).aux(len as u64 & 1);
                    if p.push(meta, &payload).is_ok() {
                        p.publish();
                    }
                }
            }
            Op::Read { take, release } => {
                if let Some(c) = consumer.as_mut() {
                    read(c, &ring, take, release);
                }
            }
            Op::IsEmpty => {
                if let Some(c) = consumer.as_mut() {
                    let _ = c.is_empty();
                    let _ = c.has_new();
                }
            }
            Op::Park => {
                if let Some(c) = consumer.as_mut() {
                    if c.prepare_park().is_ok() {
                        c.finish_park();
                    }
                }
            }
            Op::Reattach => {
                drop(consumer.take()); // release the side before attaching again
                consumer = Consumer::new(ring.clone()).ok();
            }
            Op::Unreleased { take } => {
                if let Some(p) = producer.as_mut() {
                    let _ = p.check();
                    let _ = p.is_drained();
                    if let Ok(records) = p.unreleased() {
                        for rec in records.take(take as usize) {
                            let Ok(rec) = rec else { break };
                            let sum = rec.payload().iter().fold(0u8, |a, &b| a.wrapping_add(b));
                            std::hint::black_box(sum);
                        }
                    }
                }
            }
            Op::ReattachProducer => {
                drop(producer.take());
                producer = Producer::new(ring.clone()).ok();
            }
        }
    }
});
