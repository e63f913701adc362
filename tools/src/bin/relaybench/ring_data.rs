//! What every queue of `relaybench ring` moves and how the receiver proves it read it: payload
//! templates with a sequence number, a word-sum checksum over every payload byte, the
//! receiver's bookkeeping and report, round-trip samples, and the length-prefixed framing of
//! rtrb's byte chunks.

use std::mem::MaybeUninit;
use std::time::Instant;

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use rtrb::CopyToUninit;
use serde::{Deserialize, Serialize};

/// What the receiving side counted.
#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy)]
pub struct Report {
    /// Data frames received (all of them, warm-up included).
    pub frames: u64,
    /// Wrapping sum of the 8-byte words of every payload received (see [`sum_words`]).
    pub sum: u64,
    /// Data frames between the MARK and END frames.
    pub measured_frames: u64,
    /// Nanoseconds between receiving MARK and END.
    pub measured_ns: u64,
    /// Times the receiver went to sleep in the kernel.
    pub parks: u64,
}

/// Length prefix of a MARK frame (no payload): the receiver starts its clock.
pub const LEN_MARK: u32 = 0xFFFF_FFFE;
/// Length prefix of an END frame (no payload): the receiver stops its clock and reports.
pub const LEN_END: u32 = 0xFFFF_FFFF;
/// Bytes of a frame's length prefix (the wire protocol's 4-byte big-endian length).
pub const PREFIX: usize = 4;

/// Wrapping sum of the payload read as little-endian u64 words (the last one zero-padded).
/// Cheap enough to run at memory speed, and it touches every byte.
#[inline]
pub fn sum_words(p: &[u8]) -> u64 {
    let mut acc = [0u64; 4];
    let mut big = p.chunks_exact(32);
    for c in &mut big {
        for (i, a) in acc.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            *a = a.wrapping_add(w);
        }
    }
    let mut s = acc[0]
        .wrapping_add(acc[1])
        .wrapping_add(acc[2])
        .wrapping_add(acc[3]);
    let mut small = big.remainder().chunks_exact(8);
    for c in &mut small {
        s = s.wrapping_add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
    }
    let rest = small.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        s = s.wrapping_add(u64::from_le_bytes(w));
    }
    s
}

/// The bytes a producer sends: a fixed pseudo-random template whose first 8 bytes are replaced
/// by the frame's sequence number (payloads shorter than 8 bytes carry no sequence number).
pub struct Payload {
    bytes: Vec<u8>,
    /// `sum_words` of the template without its first word.
    base: u64,
}

impl Payload {
    pub fn new(len: usize) -> Payload {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ len as u64;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let base = if len >= 8 {
            sum_words(&bytes[8..])
        } else {
            sum_words(&bytes)
        };
        Payload { bytes, base }
    }

    fn has_seq(&self) -> bool {
        self.bytes.len() >= 8
    }

    /// Writes frame `seq`'s payload into `dst` (exactly `len()` bytes).
    #[inline]
    pub fn fill(&self, dst: &mut [u8], seq: u64) {
        if self.has_seq() {
            dst[..8].copy_from_slice(&seq.to_le_bytes());
            dst[8..].copy_from_slice(&self.bytes[8..]);
        } else {
            dst.copy_from_slice(&self.bytes);
        }
    }

    /// The same into possibly uninitialised memory split in two (an rtrb chunk).
    #[inline]
    pub fn fill_split(&self, w: &mut SplitWriter<'_>, seq: u64) {
        if self.has_seq() {
            w.put(&seq.to_le_bytes());
            w.put(&self.bytes[8..]);
        } else {
            w.put(&self.bytes);
        }
    }

    /// `sum_words` of frame `seq`'s payload.
    #[inline]
    pub fn expected_sum(&self, seq: u64) -> u64 {
        if self.has_seq() {
            self.base.wrapping_add(seq)
        } else {
            self.base
        }
    }
}

impl Payload {
    /// Bytes of a payload.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Checks that `got` is frame `seq`'s payload (length and checksum over every byte).
    pub fn verify(&self, got: &[u8], seq: u64) -> Result<()> {
        if got.len() != self.len() {
            bail!(
                "frame {seq}: payload of {} bytes, expected {}",
                got.len(),
                self.len()
            );
        }
        let sum = sum_words(got);
        if sum != self.expected_sum(seq) {
            bail!(
                "frame {seq}: checksum {sum:#x}, expected {:#x}",
                self.expected_sum(seq)
            );
        }
        Ok(())
    }
}

/// A round-trip case goes on past its time until it has this many samples (on a saturated
/// machine a parked round trip can take longer than a short run), within its deadline.
pub const MIN_RTT_SAMPLES: u64 = 20;

/// Round-trip times of one case, in nanoseconds.
pub struct RttSamples(Histogram<u64>);

impl RttSamples {
    pub fn new() -> RttSamples {
        RttSamples(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"))
    }

    /// Records the round trip that started at `t0`.
    #[inline]
    pub fn record(&mut self, t0: Instant) {
        self.0.saturating_record(t0.elapsed().as_nanos() as u64);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// `(p50, p99)` in nanoseconds; an error if nothing was recorded.
    pub fn percentiles(&self) -> Result<(u64, u64)> {
        if self.0.is_empty() {
            bail!("no round trip was measured (the run was too short?)");
        }
        Ok((
            self.0.value_at_quantile(0.5),
            self.0.value_at_quantile(0.99),
        ))
    }
}

/// The producer's running totals.
#[derive(Default)]
pub struct TxState {
    pub seq: u64,
    pub sum: u64,
}

impl TxState {
    #[inline]
    pub fn sent(&mut self, payload: &Payload) {
        self.sum = self.sum.wrapping_add(payload.expected_sum(self.seq));
        self.seq += 1;
    }

    /// Compares with what the receiver reported.
    pub fn check(&self, r: &Report) -> Result<()> {
        if r.frames != self.seq || r.sum != self.sum {
            bail!(
                "receiver got {} frames with checksum {:#x}; sender sent {} with {:#x}",
                r.frames,
                r.sum,
                self.seq,
                self.sum
            );
        }
        if r.measured_frames == 0 || r.measured_ns == 0 {
            bail!("nothing was measured (the run was too short?)");
        }
        Ok(())
    }
}

/// The receiver's bookkeeping for a throughput run.
pub struct RxState {
    len: usize,
    frames: u64,
    sum: u64,
    mark: Option<(Instant, u64)>,
    end: Option<(Instant, u64)>,
}

impl RxState {
    pub fn new(len: usize) -> RxState {
        RxState {
            len,
            frames: 0,
            sum: 0,
            mark: None,
            end: None,
        }
    }

    /// Reads every byte of a data frame's payload into the checksum, checks its length and its
    /// sequence number.
    #[inline]
    pub fn on_data(&mut self, p: &[u8]) -> Result<()> {
        if p.len() != self.len {
            bail!(
                "frame {}: payload of {} bytes, expected {}",
                self.frames,
                p.len(),
                self.len
            );
        }
        if p.len() >= 8 {
            let seq = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
            if seq != self.frames {
                bail!(
                    "frame {}: sequence number {seq} (lost, duplicated or reordered)",
                    self.frames
                );
            }
        }
        self.sum = self.sum.wrapping_add(sum_words(p));
        self.frames += 1;
        Ok(())
    }

    pub fn on_mark(&mut self) {
        self.mark = Some((Instant::now(), self.frames));
    }

    pub fn on_end(&mut self) {
        self.end = Some((Instant::now(), self.frames));
    }

    pub fn is_done(&self) -> bool {
        self.end.is_some()
    }

    pub fn report(&self, parks: u64) -> Report {
        let (measured_frames, measured_ns) = match (self.mark, self.end) {
            (Some((t0, f0)), Some((t1, f1))) => (f1 - f0, (t1 - t0).as_nanos() as u64),
            _ => (0, 0),
        };
        Report {
            frames: self.frames,
            sum: self.sum,
            measured_frames,
            measured_ns,
            parks,
        }
    }
}

/// One frame of rtrb's length-prefixed framing.
pub enum Frame<'a> {
    Data(&'a [u8]),
    Mark,
    End,
}

/// Writes a sequence of byte strings into the two pieces of an rtrb write chunk.
pub struct SplitWriter<'a> {
    a: &'a mut [MaybeUninit<u8>],
    b: &'a mut [MaybeUninit<u8>],
    pos: usize,
}

impl<'a> SplitWriter<'a> {
    pub fn new(a: &'a mut [MaybeUninit<u8>], b: &'a mut [MaybeUninit<u8>]) -> SplitWriter<'a> {
        SplitWriter { a, b, pos: 0 }
    }

    /// Appends `src`, splitting it at the seam if it straddles it.
    #[inline]
    pub fn put(&mut self, src: &[u8]) {
        let alen = self.a.len();
        let end = self.pos + src.len();
        if end <= alen {
            src.copy_to_uninit(&mut self.a[self.pos..end]);
        } else if self.pos >= alen {
            src.copy_to_uninit(&mut self.b[self.pos - alen..end - alen]);
        } else {
            let k = alen - self.pos;
            src[..k].copy_to_uninit(&mut self.a[self.pos..]);
            src[k..].copy_to_uninit(&mut self.b[..end - alen]);
        }
        self.pos = end;
    }

    /// Bytes written so far.
    pub fn written(&self) -> usize {
        self.pos
    }
}

/// Reads byte ranges from the two pieces of an rtrb read chunk; a range that straddles the seam
/// is copied into a scratch buffer (once per lap of the ring).
pub struct SplitReader<'a> {
    a: &'a [u8],
    b: &'a [u8],
    pos: usize,
}

impl<'a> SplitReader<'a> {
    pub fn new(a: &'a [u8], b: &'a [u8]) -> SplitReader<'a> {
        SplitReader { a, b, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.a.len() + self.b.len() - self.pos
    }

    /// Bytes taken so far.
    pub fn consumed(&self) -> usize {
        self.pos
    }

    /// The next `n` bytes as one slice.
    #[inline]
    pub fn take<'s>(&mut self, n: usize, scratch: &'s mut Vec<u8>) -> &'s [u8]
    where
        'a: 's,
    {
        let alen = self.a.len();
        let (pos, end) = (self.pos, self.pos + n);
        self.pos = end;
        if end <= alen {
            &self.a[pos..end]
        } else if pos >= alen {
            &self.b[pos - alen..end - alen]
        } else {
            scratch.clear();
            scratch.extend_from_slice(&self.a[pos..]);
            scratch.extend_from_slice(&self.b[..end - alen]);
            scratch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_words_reads_every_byte() {
        let p = Payload::new(100);
        let base = sum_words(&p.bytes);
        for i in 0..100 {
            let mut q = p.bytes.clone();
            q[i] ^= 1;
            assert_ne!(sum_words(&q), base, "byte {i} not covered");
        }
        assert_eq!(sum_words(&[]), 0);
        assert_eq!(sum_words(&[1]), 1);
        assert_eq!(sum_words(&[0, 1]), 256);
    }

    #[test]
    fn payload_sums_match_filled_bytes() {
        for len in [0, 1, 7, 8, 9, 64, 1000, 65536] {
            let p = Payload::new(len);
            let mut buf = vec![0u8; len];
            for seq in [0, 1, 12345, u64::MAX] {
                p.fill(&mut buf, seq);
                assert_eq!(sum_words(&buf), p.expected_sum(seq), "len {len} seq {seq}");
            }
            if len > 0 {
                buf[len - 1] ^= 0x80;
                assert_ne!(sum_words(&buf), p.expected_sum(u64::MAX));
            }
        }
    }

    #[test]
    fn split_writer_and_reader_agree_across_the_seam() {
        let p = Payload::new(20);
        for seam in 0..=48 {
            let mut mem = [MaybeUninit::<u8>::uninit(); 48];
            let (a, b) = mem.split_at_mut(seam);
            let mut w = SplitWriter::new(a, b);
            for seq in 0..2 {
                w.put(&(p.bytes.len() as u32).to_be_bytes());
                p.fill_split(&mut w, seq);
            }
            assert_eq!(w.written(), 48);
            // SAFETY: every byte of `mem` was written above.
            let bytes: Vec<u8> = mem.iter().map(|m| unsafe { m.assume_init() }).collect();
            let (a, b) = bytes.split_at(seam);
            let mut r = SplitReader::new(a, b);
            let mut st = RxState::new(20);
            let mut scratch = Vec::new();
            while r.remaining() > 0 {
                let len = u32::from_be_bytes(r.take(4, &mut scratch).try_into().unwrap());
                st.on_data(r.take(len as usize, &mut scratch)).unwrap();
            }
            let rep = st.report(0);
            assert_eq!(
                (rep.frames, rep.sum),
                (2, p.expected_sum(0).wrapping_add(p.expected_sum(1)))
            );
        }
    }
}
