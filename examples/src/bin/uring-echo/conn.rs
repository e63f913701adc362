//! One connection of `uring-echo`: framing what it receives (whole frames are sent straight
//! from the provided buffers, only a frame split across buffers is copied) and the batch of
//! segments its one send in flight carries. No io_uring here: the loop in `main.rs` submits.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use shmrelay_examples::frames::scan;

use crate::bufring::BufRing;

/// At most this many iovecs in one send (the kernel's UIO_MAXIOV).
const MAX_IOV: usize = 1024;

/// Bytes to send, in arrival order.
enum Seg {
    /// `len` bytes at `off` of provided buffer `bid` (released once sent); `weight` is what
    /// it counts towards `pending` (the whole buffer when a segment holds one buffer alone).
    Buf {
        bid: u16,
        off: usize,
        len: usize,
        weight: usize,
    },
    /// A frame that arrived split across buffers, collected here; `.1` bytes already sent.
    Owned(Vec<u8>, usize),
}

impl Seg {
    fn len(&self) -> usize {
        match self {
            Seg::Buf { len, .. } => *len,
            Seg::Owned(v, sent) => v.len() - sent,
        }
    }
}

/// A connection's state. Boxed by the loop: the `msghdr` and iovecs of its send in flight
/// must stay where the kernel was told they are until that send completes.
pub struct Conn {
    pub fd: RawFd,
    /// The partial frame at the end of what was received (header included).
    carry: Vec<u8>,
    /// Segments waiting for the next send.
    queue: VecDeque<Seg>,
    /// Segments of the send in flight.
    flight: Vec<Seg>,
    /// Bytes in `queue` and `flight`, plus one whole buffer per held buffer.
    pending: usize,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
    /// A multishot receive is armed (its last completion, without `MORE`, has not come).
    pub recv_armed: bool,
    /// A send is in flight.
    pub sending: bool,
    /// Receiving is stopped because too much waits to be sent (resumed below half of it).
    pub paused: bool,
    /// A frame over the maximum arrived: what came before it is sent, then the close.
    pub bad: bool,
    /// The client closed its side (or the receive failed).
    pub read_done: bool,
    /// A send failed: nothing more is sent.
    pub dead: bool,
}

impl Conn {
    pub fn new(fd: RawFd) -> Box<Conn> {
        Box::new(Conn {
            fd,
            carry: Vec::new(),
            queue: VecDeque::new(),
            flight: Vec::new(),
            pending: 0,
            iov: Vec::new(),
            // SAFETY: msghdr is plain data for which all-zero is the empty message.
            msg: unsafe { std::mem::zeroed() },
            recv_armed: false,
            sending: false,
            paused: false,
            bad: false,
            read_done: false,
            dead: false,
        })
    }

    fn push(&mut self, seg: Seg) {
        self.pending += match seg {
            Seg::Buf { weight, .. } => weight,
            Seg::Owned(ref v, _) => v.len(),
        };
        self.queue.push_back(seg);
    }

    /// Takes the `data` the kernel received into buffer `bid` at offset `base`. Returns
    /// whether a segment now refers to the buffer (the caller holds it until the segment is
    /// sent); it weighs `weight` in `pending`. Sets `bad` on a frame over `max_frame`.
    pub fn ingest(
        &mut self,
        bid: u16,
        base: usize,
        data: &[u8],
        max_frame: u32,
        weight: usize,
    ) -> bool {
        if self.bad || self.dead {
            return false;
        }
        let mut at = 0;
        if !self.carry.is_empty() {
            if self.carry.len() < 4 {
                at = (4 - self.carry.len()).min(data.len());
                self.carry.extend_from_slice(&data[..at]);
                if self.carry.len() < 4 {
                    return false;
                }
            }
            let len =
                u32::from_be_bytes([self.carry[0], self.carry[1], self.carry[2], self.carry[3]]);
            if len > max_frame {
                self.carry = Vec::new();
                self.bad = true;
                return false;
            }
            let frame = 4 + len as usize;
            let take = (frame - self.carry.len()).min(data.len() - at);
            self.carry.extend_from_slice(&data[at..at + take]);
            at += take;
            if self.carry.len() < frame {
                return false;
            }
            let whole = std::mem::take(&mut self.carry);
            self.push(Seg::Owned(whole, 0));
        }
        let rest = &data[at..];
        let s = scan(rest, max_frame);
        let kept = s.complete > 0;
        if kept {
            let seg = Seg::Buf {
                bid,
                off: base + at,
                len: s.complete,
                weight,
            };
            self.push(seg);
        }
        if s.oversized {
            self.bad = true;
        } else if s.complete < rest.len() {
            self.carry.reserve(s.pending_frame.unwrap_or(4));
            self.carry.extend_from_slice(&rest[s.complete..]);
        }
        kept
    }

    /// Bytes waiting to be sent (segments weighed as pushed).
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Moves the queued segments (up to 1,024) into a send and returns its `msghdr` for a
    /// SENDMSG; `None` when a send is in flight or nothing waits.
    pub fn start_send(&mut self, bufs: &BufRing) -> Option<*const libc::msghdr> {
        if self.sending || self.dead || self.queue.is_empty() {
            return None;
        }
        debug_assert!(self.flight.is_empty());
        self.iov.clear();
        while self.flight.len() < MAX_IOV {
            let Some(seg) = self.queue.pop_front() else {
                break;
            };
            let base = match &seg {
                Seg::Buf { bid, off, .. } => bufs.addr(*bid, *off),
                Seg::Owned(v, sent) => v[*sent..].as_ptr(),
            };
            self.iov.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: seg.len(),
            });
            self.flight.push(seg);
        }
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len();
        self.sending = true;
        Some(&self.msg)
    }

    /// The send in flight took `n` bytes: its whole segments are done (their buffers go to
    /// `freed`), a partly sent one and the rest go back to the head of the queue.
    pub fn sent(&mut self, mut n: usize, freed: &mut Vec<u16>) {
        self.sending = false;
        let mut flight = std::mem::take(&mut self.flight);
        let mut rest = Vec::new();
        for mut seg in flight.drain(..) {
            let len = seg.len();
            if n >= len {
                n -= len;
                self.pending -= match seg {
                    Seg::Buf { bid, weight, .. } => {
                        freed.push(bid);
                        weight
                    }
                    Seg::Owned(v, sent) => v.len() - sent,
                };
                continue;
            }
            match &mut seg {
                Seg::Buf { off, len, .. } => {
                    *off += n;
                    *len -= n;
                }
                Seg::Owned(_, sent) => {
                    *sent += n;
                    self.pending -= n;
                }
            }
            n = 0;
            rest.push(seg);
        }
        for seg in rest.into_iter().rev() {
            self.queue.push_front(seg);
        }
        self.flight = flight;
    }

    /// Drops everything waiting (the connection is going away); held buffers go to `freed`.
    pub fn discard(&mut self, freed: &mut Vec<u16>) {
        debug_assert!(!self.sending);
        for seg in self.queue.drain(..).chain(self.flight.drain(..)) {
            if let Seg::Buf { bid, .. } = seg {
                freed.push(bid);
            }
        }
        self.pending = 0;
        self.carry = Vec::new();
    }

    /// Nothing is in flight and nothing more will be sent: the fd can be closed.
    pub fn finished(&self) -> bool {
        !self.recv_armed
            && !self.sending
            && (self.dead || ((self.read_done || self.bad) && self.queue.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    /// The bytes the queue would send, with `buffers[bid]` as the provided buffers' contents.
    fn queued(c: &Conn, buffers: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for seg in &c.queue {
            match seg {
                Seg::Buf { bid, off, len, .. } => {
                    out.extend_from_slice(&buffers[usize::from(*bid)][*off..*off + *len])
                }
                Seg::Owned(v, sent) => out.extend_from_slice(&v[*sent..]),
            }
        }
        out
    }

    #[test]
    fn frames_split_anywhere_come_out_whole_and_in_order() {
        let mut wire = Vec::new();
        for i in 0..40u32 {
            wire.extend(frame(&vec![i as u8; (i * 53 % 700) as usize]));
        }
        for cut in [1, 3, 4, 5, 64, 100, 333] {
            let buffers: Vec<Vec<u8>> = wire.chunks(cut).map(<[u8]>::to_vec).collect();
            let mut c = Conn::new(-1);
            for (bid, b) in buffers.iter().enumerate() {
                c.ingest(bid as u16, 0, b, 1 << 20, 4096);
            }
            assert_eq!(queued(&c, &buffers), wire, "cut {cut}");
            assert!(c.carry.is_empty() && !c.bad);
        }
    }

    #[test]
    fn receives_sharing_one_buffer_keep_their_offsets() {
        // One incrementally filled buffer holds bytes of two connections, ingested out of
        // buffer order; each connection's segments point at its own bytes, at their offsets.
        let (a, b) = ([frame(b"one"), frame(b"two")].concat(), frame(b"three"));
        let buffers = vec![[a.clone(), b.clone()].concat()];
        let (mut ca, mut cb) = (Conn::new(-1), Conn::new(-1));
        assert!(ca.ingest(0, 0, &buffers[0][..7], 1 << 20, 7));
        assert!(cb.ingest(0, a.len(), &buffers[0][a.len()..], 1 << 20, b.len()));
        assert!(ca.ingest(0, 7, &buffers[0][7..a.len()], 1 << 20, a.len() - 7));
        assert_eq!(queued(&ca, &buffers), a);
        assert_eq!(queued(&cb, &buffers), b);
        assert_eq!(ca.pending(), a.len(), "weighed as received");
    }

    #[test]
    fn an_oversized_header_split_across_buffers_stops_input() {
        let mut wire = frame(b"ok");
        wire.extend(11u32.to_be_bytes());
        let buffers = vec![wire[..8].to_vec(), wire[8..].to_vec()];
        let mut c = Conn::new(-1);
        assert!(c.ingest(0, 0, &buffers[0], 10, 64));
        assert!(!c.ingest(1, 0, &buffers[1], 10, 64));
        assert!(c.bad);
        assert_eq!(queued(&c, &buffers), frame(b"ok"));
        assert!(
            !c.ingest(2, 0, &frame(b"later"), 10, 64),
            "nothing after a bad frame"
        );
    }

    #[test]
    fn partial_sends_resume_where_they_stopped() {
        let buffers = vec![frame(b"hello"), frame(b"world!")];
        let mut c = Conn::new(-1);
        for (bid, b) in buffers.iter().enumerate() {
            c.ingest(bid as u16, 0, b, 100, 64);
        }
        let seg_lens: Vec<usize> = c.queue.iter().map(Seg::len).collect();
        assert_eq!(seg_lens, [9, 10]);
        // Fake a send in flight (no BufRing in a unit test).
        c.flight = c.queue.drain(..).collect();
        c.sending = true;
        let mut freed = Vec::new();
        c.sent(12, &mut freed);
        assert_eq!(freed, [0]);
        assert_eq!(queued(&c, &buffers), frame(b"world!")[3..].to_vec());
        assert_eq!(c.pending(), 64);
    }
}
