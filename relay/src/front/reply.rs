//! Reply records to wire bytes, framed from the front's own copy of the lengths.
//!
//! A reply record is memory the worker can rewrite at any moment, also after the front looked
//! at it. So nothing the client sees as framing is taken from it: the front copied the record
//! header (length, flags) out of the ring once, validated that copy, and writes the codec's
//! header (`length-prefixed`: the 4-byte length) and trailer (`line`: the newline) itself,
//! from that copy. Only the payload goes from the ring to the socket (by `writev`, zero-copy),
//! and the ring is reached through raw pointers only, never through a `&[u8]` the compiler may
//! assume stable. A worker rewriting a published reply can change payload bytes of its own
//! reply, never the framing. `resp` has no separate header: a `resp` reply is copied out,
//! validated as whole RESP values, and the copy is written (counted as copied).
//!
//! A reply longer than one record comes as consecutive records flagged
//! [`MORE`](shmrelay_worker::protocol::flags::MORE), the first led by the whole length
//! ([`SPLIT_HEADER`] bytes), read once and held privately ([`Split`]): `length-prefixed` writes
//! the header from it before the first piece and streams the pieces; `line` writes the newline
//! after the last piece; `resp` collects the pieces privately (bounded by `max_pending`) and
//! validates the whole. A split that breaks off closes its connection.
//!
//! A coalesced record ([`BATCH`](shmrelay_worker::protocol::flags::BATCH)) holds several
//! replies to one connection, each behind an entry header. [`push_batch`] walks it once: each
//! entry header is copied out of the ring, checked against the record and the entry before,
//! and framed at once (validation fused with the walk, no separate pass), so a batch of small
//! replies becomes one run of the group's own bytes: one iovec.

use std::io;
use std::os::fd::AsRawFd;

use shm_ring::Record;
use shmrelay_worker::codec::websocket::{self, opcode, MAX_HEADER};
use shmrelay_worker::protocol::{flags, BATCH_ENTRY_HEADER, SPLIT_HEADER};
use shmrelay_worker::{CloseReason, Codec};

use super::conn::Conn;
use super::MAX_IOV;
use crate::stats::{add, FrontStats};

/// A long reply in progress on one reply ring (its pieces are consecutive records).
pub(super) struct Split {
    pub conn: u64,
    /// The reply ring's producer attach count when the split began: a replacement worker
    /// (after a crash mid-reply) will never finish it.
    pub attach: u32,
    /// Payload bytes still to come, from the whole length the first piece announced.
    remaining: u64,
    /// `resp`: the pieces so far, copied.
    copy: Option<Vec<u8>>,
}

/// Reply bodies up to this size are copied next to the header the front writes, so a batch of
/// small replies is one iovec, not two per reply. (4 KiB and larger stay zero-copy.)
const COPY_SMALL_BODY: usize = 512;

/// What one SEND record contributes.
pub(super) enum Piece {
    /// Wire bytes for the connection: a header built here, the payload in the ring, a
    /// trailer; `whole` when it completes a message.
    Frame {
        head: [u8; MAX_HEADER],
        head_len: usize,
        body: *const u8,
        body_len: usize,
        tail: &'static [u8],
        whole: bool,
    },
    /// A whole message, copied and validated (`resp`).
    Copy(Vec<u8>),
    /// A piece of a `resp` split, held until the last.
    Held,
    /// The record breaks the reply protocol; close the connection (a split broke off or
    /// announced an impossible length).
    Broken(&'static str),
    /// Not whole RESP values: the worker's framing is broken.
    Invalid,
}

/// Interprets a SEND record (whose connection continues `split`, if one is in progress: the
/// caller checks that first). `max_copy` bounds what a `resp` reply may hold privately.
pub(super) fn piece(
    codec: Codec,
    split: &mut Option<Split>,
    rec: &Record<'_>,
    max_copy: usize,
    attach: u32,
    fs: &FrontStats,
) -> Piece {
    let len = rec.len();
    let more = rec.flags() & flags::MORE != 0;
    let ptr = rec.payload_ptr();
    if let Some(sp) = split.as_mut() {
        if len as u64 > sp.remaining {
            *split = None;
            return Piece::Broken("a piece longer than its reply");
        }
        sp.remaining -= len as u64;
        if more == (sp.remaining == 0) {
            *split = None;
            return Piece::Broken("pieces disagree with the announced length");
        }
        if let Some(copy) = sp.copy.as_mut() {
            let at = copy.len();
            copy.resize(at + len, 0);
            rec.copy_payload(0, &mut copy[at..]);
            add(&fs.bytes_copied, len as u64);
            if more {
                return Piece::Held;
            }
            let copy = split.take().and_then(|s| s.copy).unwrap_or_default();
            return if codec.is_valid_reply(&copy) {
                Piece::Copy(copy)
            } else {
                Piece::Invalid
            };
        }
        if !more {
            *split = None;
        }
        return Piece::Frame {
            head: [0; MAX_HEADER],
            head_len: 0,
            body: ptr,
            body_len: len,
            tail: if more { b"" } else { codec.reply_trailer() },
            whole: !more,
        };
    }
    if more {
        // The first piece of a long reply: the whole length, copied out once.
        if len < SPLIT_HEADER {
            return Piece::Broken("a split reply without its length");
        }
        let mut t = [0u8; SPLIT_HEADER];
        rec.copy_payload(0, &mut t);
        let total = u64::from_le_bytes(t);
        let body_len = len - SPLIT_HEADER;
        let limit = match codec {
            Codec::LengthPrefixed => u32::MAX as u64,
            Codec::Resp => max_copy as u64,
            Codec::Line | Codec::WebSocket => u64::MAX / 2,
        };
        if total <= body_len as u64 || total > limit {
            return Piece::Broken("a split reply of an impossible length");
        }
        let copy = (codec == Codec::Resp).then(|| {
            let mut v = Vec::with_capacity((total as usize).min(1 << 20));
            v.resize(body_len, 0);
            rec.copy_payload(SPLIT_HEADER, &mut v);
            add(&fs.bytes_copied, body_len as u64);
            v
        });
        let resp = copy.is_some();
        *split = Some(Split {
            conn: rec.conn(),
            attach,
            remaining: total - body_len as u64,
            copy,
        });
        if resp {
            return Piece::Held;
        }
        let (head, head_len) = header(codec, total, rec.flags());
        return Piece::Frame {
            head,
            head_len,
            // SAFETY: SPLIT_HEADER <= len, so this stays inside the payload.
            body: unsafe { ptr.add(SPLIT_HEADER) },
            body_len,
            tail: b"",
            whole: false,
        };
    }
    if codec == Codec::Resp {
        let copy = rec.payload_to_vec();
        add(&fs.bytes_copied, len as u64);
        return if codec.is_valid_reply(&copy) {
            Piece::Copy(copy)
        } else {
            Piece::Invalid
        };
    }
    if codec == Codec::LengthPrefixed && len > u32::MAX as usize {
        return Piece::Broken("a reply longer than a frame");
    }
    let (head, head_len) = header(codec, len as u64, rec.flags());
    Piece::Frame {
        head,
        head_len,
        body: ptr,
        body_len: len,
        tail: codec.reply_trailer(),
        whole: true,
    }
}

/// The header the front writes before a reply of `len` bytes, from its own copy of the length
/// (and, for `websocket`, of the record's flags: text or binary).
fn header(codec: Codec, len: u64, record_flags: u16) -> ([u8; MAX_HEADER], usize) {
    if codec == Codec::WebSocket {
        let op = if record_flags & flags::TEXT != 0 {
            opcode::TEXT
        } else {
            opcode::BINARY
        };
        return websocket::server_header(op, len);
    }
    let (h, n) = codec.reply_header(len as usize);
    let mut head = [0u8; MAX_HEADER];
    head[..h.len()].copy_from_slice(&h);
    (head, n)
}

/// Frames every entry of a coalesced SEND record (flagged `BATCH`) into `group`, in one pass
/// that validates each entry as it reaches it: its header (length, position) is copied out
/// of the ring once, the length must fit the rest of the record, positions must not go
/// backwards and the last must be the record's aux (which the caller checked against what
/// this front wrote). `flush` writes out a full group (of the same connection) and empties it.
///
/// # Errors
///
/// Why the record is broken: the entries before the bad one are in `group` (whole replies);
/// the caller closes the connection after them, so the client never sees a shifted stream.
pub(super) fn push_batch(
    codec: Codec,
    rec: &Record<'_>,
    group: &mut Group,
    mut flush: impl FnMut(&mut Group),
) -> Result<(), &'static str> {
    if codec == Codec::Resp {
        return Err("a coalesced reply on a resp listener");
    }
    if rec.flags() & flags::MORE != 0 {
        return Err("a coalesced reply flagged as a piece of a long reply");
    }
    let (len, aux, base) = (rec.len(), rec.aux(), rec.payload_ptr());
    if len == 0 {
        return Err("an empty coalesced reply");
    }
    let (tail, aux_low) = (codec.reply_trailer(), aux as u32);
    // How far below the record's aux the previous entry's position was.
    let mut prev_back = aux;
    let mut at = 0;
    while at < len {
        if len - at < BATCH_ENTRY_HEADER {
            return Err("a coalesced reply entry cut off");
        }
        let mut h = [0u8; BATCH_ENTRY_HEADER];
        // SAFETY: at + BATCH_ENTRY_HEADER <= len (checked above): inside the record's payload,
        // which lies in the ring's mapping until the caller releases it; copied into our own
        // array with a raw copy, never read through a reference a worker could change.
        unsafe { std::ptr::copy_nonoverlapping(base.add(at), h.as_mut_ptr(), h.len()) };
        let [l0, l1, l2, l3, p0, p1, p2, p3] = h;
        let n = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
        let back = aux_low.wrapping_sub(u32::from_le_bytes([p0, p1, p2, p3])) as u64;
        at += BATCH_ENTRY_HEADER;
        if n > len - at {
            return Err("a coalesced reply entry longer than its record");
        }
        if back > prev_back {
            return Err("coalesced reply entries answer positions out of order");
        }
        prev_back = back;
        if group.is_full() {
            flush(group);
        }
        let (head, head_len) = header(codec, n as u64, 0);
        // SAFETY: at + n <= len (checked above): inside the payload.
        let body = unsafe { base.add(at) };
        if n <= COPY_SMALL_BODY {
            // Straight to the copy, without a `Piece` moved through memory (issue 14).
            group.push_small(&head, head_len, body, n, tail, true);
        } else {
            group.push(Piece::Frame {
                head,
                head_len,
                body,
                body_len: n,
                tail,
                whole: true,
            });
        }
        at += n;
    }
    if prev_back != 0 {
        return Err("the last coalesced reply entry does not answer the record's position");
    }
    Ok(())
}

/// The reply ring's producer attach count (a hint the worker could fake, which would only
/// close its own connection).
pub(super) fn producer_attach(ring: &shm_ring::ShmRing) -> u32 {
    use shm_ring::RingStorage;
    ring.header()
        .producer
        .attach_count
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Clone, Copy)]
enum Seg {
    /// `own[start..start + len]`.
    Own(usize, usize),
    /// `bufs[i]`.
    Buf(usize),
    /// Payload bytes in a reply ring (valid until the batch's release).
    Ring(*const u8, usize),
}

/// Consecutive reply bytes of one connection, written with one `writev`.
pub(super) struct Group {
    pub conn: u64,
    /// Whole messages in the group.
    pub messages: u64,
    /// Reply bytes copied into `own` (small bodies), for `bytes_copied`.
    pub copied: u64,
    own: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    segs: Vec<Seg>,
    /// The iovecs of `segs`, rebuilt for each `writev` (kept for its allocation).
    iov: Vec<libc::iovec>,
}

impl Default for Group {
    fn default() -> Group {
        Group::new()
    }
}

impl Group {
    pub fn new() -> Group {
        Group {
            conn: 0,
            messages: 0,
            copied: 0,
            own: Vec::new(),
            bufs: Vec::new(),
            segs: Vec::new(),
            iov: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// True if another piece (up to three slices) might not fit one `writev`.
    pub fn is_full(&self) -> bool {
        self.segs.len() + 3 > MAX_IOV
    }

    pub fn clear(&mut self) {
        self.messages = 0;
        self.copied = 0;
        self.own.clear();
        self.bufs.clear();
        self.segs.clear();
    }

    fn push_own(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let start = self.own.len();
        self.own.extend_from_slice(bytes);
        self.extend_own(start, bytes.len());
    }

    /// Covers `own[start..start + len]`, just appended, with a segment (the last one grows
    /// when it ends there).
    fn extend_own(&mut self, start: usize, len: usize) {
        if let Some(Seg::Own(s, l)) = self.segs.last_mut() {
            if *s + *l == start {
                *l += len;
                return;
            }
        }
        self.segs.push(Seg::Own(start, len));
    }

    /// A message whose body is small: header, body and trailer copied side by side into
    /// `own` with one reservation, covered by one segment (issue 14: three appends per reply
    /// were a third of the front's instructions per 64 B request). The body counts as copied;
    /// `whole` when it completes a message. `body` must stay readable until the group is
    /// written, as for [`push`](Group::push).
    #[inline(always)]
    pub fn push_small(
        &mut self,
        head: &[u8; MAX_HEADER],
        head_len: usize,
        body: *const u8,
        body_len: usize,
        tail: &[u8],
        whole: bool,
    ) {
        debug_assert!(head_len <= MAX_HEADER && body_len <= COPY_SMALL_BODY);
        let at = self.own.len();
        let total = head_len + body_len + tail.len();
        // The whole header array is written (a fixed-size copy, no memcpy call); the bytes past
        // `head_len` are overwritten by the body or left in spare capacity.
        self.own.reserve(MAX_HEADER.max(total));
        // SAFETY: `own` has room for MAX_HEADER and for `total` bytes at `at` (reserved just
        // above); `body` is `body_len` readable bytes of a published, unreleased reply record
        // (see `Piece::Frame`), copied with raw copies into our own buffer, which cannot
        // overlap shared memory; `set_len` covers only bytes written here.
        unsafe {
            let dst = self.own.as_mut_ptr().add(at);
            std::ptr::copy_nonoverlapping(head.as_ptr(), dst, MAX_HEADER);
            std::ptr::copy_nonoverlapping(body, dst.add(head_len), body_len);
            std::ptr::copy_nonoverlapping(tail.as_ptr(), dst.add(head_len + body_len), tail.len());
            self.own.set_len(at + total);
        }
        if total > 0 {
            self.extend_own(at, total);
        }
        self.copied += body_len as u64;
        self.messages += whole as u64;
    }

    /// Adds a piece. The ring pointer must stay readable until the group is written (the
    /// caller releases the ring only after).
    pub fn push(&mut self, p: Piece) {
        match p {
            Piece::Frame {
                head,
                head_len,
                body,
                body_len,
                tail,
                whole,
            } => {
                if body_len <= COPY_SMALL_BODY {
                    // Cheaper copied next to its header than as an iovec of its own (the
                    // kernel's per-segment cost dwarfs a small memcpy).
                    self.push_small(&head, head_len, body, body_len, tail, whole);
                    return;
                }
                // Larger bodies stay in the ring, an iovec of their own (zero-copy).
                self.push_own(&head[..head_len]);
                self.segs.push(Seg::Ring(body, body_len));
                self.push_own(tail);
                self.messages += whole as u64;
            }
            Piece::Copy(v) => {
                if !v.is_empty() {
                    self.bufs.push(v);
                    self.segs.push(Seg::Buf(self.bufs.len() - 1));
                }
                self.messages += 1;
            }
            Piece::Held | Piece::Broken(_) | Piece::Invalid => {}
        }
    }

    fn iovecs(&mut self) -> &[libc::iovec] {
        let (own, bufs) = (&self.own, &self.bufs);
        self.iov.clear();
        self.iov.extend(self.segs.iter().map(|s| {
            let (base, len) = match *s {
                Seg::Own(start, len) => (own[start..].as_ptr(), len),
                Seg::Buf(i) => (bufs[i].as_ptr(), bufs[i].len()),
                Seg::Ring(p, len) => (p, len),
            };
            libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            }
        }));
        &self.iov
    }
}

/// Writes a group to its connection: `writev` straight from the ring and the front's own
/// bytes; what the socket does not take is copied to the connection's out queue (and
/// counted as copied; a queue already waiting takes it all).
pub(super) fn write_group(c: &mut Conn, g: &mut Group, fs: &FrontStats) -> Result<(), CloseReason> {
    let iov = g.iovecs();
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    let mut written = 0;
    if c.pending() == 0 {
        loop {
            // SAFETY: every iovec describes readable memory that lives until this returns:
            // the group's own buffers (not touched meanwhile), or payload bytes of published,
            // unreleased reply records inside the ring's read-only mapping. The kernel only
            // reads them; bytes a worker changes meanwhile change what is sent of its own
            // payload, never the lengths, which are ours.
            let n = unsafe {
                libc::writev(
                    c.stream.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len().min(libc::c_int::MAX as usize) as libc::c_int,
                )
            };
            if n >= 0 {
                written = n as usize;
                break;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => break,
                io::ErrorKind::Interrupted => {}
                _ => {
                    crate::stats::count_io_error(fs, &e);
                    return Err(CloseReason::IoError);
                }
            }
        }
        add(&fs.bytes_out, written as u64);
    }
    if written < total {
        let mut skip = written;
        c.out.reserve(total - written);
        for v in iov {
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = v.iov_len - skip;
            let at = c.out.len();
            c.out.reserve(n);
            // SAFETY: the source is `n` readable bytes (as for writev above); the destination
            // is spare capacity of the private out queue, reserved just above, which cannot
            // overlap shared memory. A raw copy: never a reference over the worker's bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (v.iov_base as *const u8).add(skip),
                    c.out.as_mut_ptr().add(at),
                    n,
                );
                c.out.set_len(at + n);
            }
            skip = 0;
        }
        add(&fs.bytes_copied, (total - written) as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
