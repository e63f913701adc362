//! Key routing for `resp` listeners with more than one worker: each frame goes to the worker
//! that owns its key, so a key lives on one worker whichever connection names it. This file
//! is the read side (the key's worker, and spreading a read's frames over the pool); putting
//! the replies back in request order is `routing.rs`.
//!
//! Reading: one read lands in a front-local buffer (not in a ring: which ring a frame belongs
//! to is known only once it is scanned); the frames of the read are then copied into one DATA
//! record per worker, each worker's frames in the client's order. These bytes are counted as
//! copied. Before a read, every worker of the pool must have room for the whole read, so the
//! bytes taken from the socket always fit. A frame split across reads is assembled in the
//! connection's own buffer (the rest read straight into it), which is then spread over the
//! pool the same way: never copied back and forth once per read.

use std::io::{IoSliceMut, Read};

use shm_ring::layout::RECORD_HEADER_SIZE;
use shm_ring::Meta;
use shmrelay_worker::codec::{resp, FrameKind, Scan};
use shmrelay_worker::protocol::tag;
use shmrelay_worker::{CloseReason, ConnId};

use super::conn::Conn;
use super::read::{after_read, carry_want, read_error, read_into_carry, walk, ReadResult};
use super::Chan;
use crate::stats::{add, FrontStats};

/// Largest read of a routed connection: every worker of the pool must have this much room
/// before the read (the frames of one read may all belong to one worker).
pub(super) const ROUTED_CHUNK: usize = 64 * 1024;
/// Bytes read from one routed connection before others get their turn.
const ROUTED_BUDGET: usize = 256 * 1024;

/// The pool member that owns a frame's key; keyless commands go to `home`.
pub(super) fn target(pool: &[usize], home: usize, frame: &[u8]) -> usize {
    match resp::routing_key(frame) {
        // The one key-to-member function the kv worker checks its keys with (CROSSSLOT).
        Some(key) => pool[shmrelay_worker::slot::pool_member(key, pool.len())],
        None => home,
    }
}

/// Scratch space of the front for routed reads, reused across connections.
#[derive(Default)]
pub(super) struct Scratch {
    buf: Vec<u8>,
    /// Per frame of the read: (start, len, worker, end offset in that worker's record).
    frames: Vec<(usize, usize, usize, usize)>,
    /// Per worker (global index): bytes of this read for it, and its record's payload position.
    per_worker: Vec<(usize, u64)>,
}

/// What a routed read asks the loop to do besides its result.
pub(super) struct Routed {
    pub result: ReadResult,
    /// The worker the result concerns (a full or corrupt ring), else the home worker.
    pub worker: usize,
    /// The connection's oldest request, if this read sent its first outstanding one:
    /// (worker, position) for the loop to wait on.
    pub new_head: Option<(usize, u64)>,
}

/// Reads a routed connection until the socket is empty, the budget is spent, a worker of the
/// pool has no room or the connection's state reaches `max_pending` (then it is marked
/// stalled and not read until `advance` or a flush brings it below half), and spreads its
/// frames over the pool by key.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_routed(
    chans: &mut [Chan],
    pool: &[usize],
    c: &mut Conn,
    s: &mut Scratch,
    fs: &FrontStats,
    id: ConnId,
    max_frame: u32,
    max_pending: usize,
    now: u32,
) -> Routed {
    let home = c.worker();
    let done = |result, worker, new_head| Routed {
        result,
        worker,
        new_head,
    };
    let mut new_head = None;
    let mut budget = ROUTED_BUDGET;
    if s.per_worker.len() < chans.len() {
        s.per_worker.resize(chans.len(), (0, 0));
    }
    loop {
        // The replies it waits on, its requests and its queued output count against its
        // bound: past it, leave its bytes in the socket.
        let used = c.pending() + c.route.as_ref().map_or(0, |r| r.state_bytes());
        let route = c.route.as_mut().expect("a routed connection has its route");
        if used > 0 && used >= max_pending {
            route.stalled = true;
            return done(ReadResult::Drained, home, new_head);
        }
        let mut carry = c.carry.len();
        // Room in every ring of the pool for all of this read, and nothing queued ahead of it
        // (an OPEN must reach each worker before the connection's data).
        let mut want = usize::MAX;
        for &w in pool {
            let ch = &mut chans[w];
            if ch.is_broken() {
                return done(ReadResult::Unavailable, w, new_head);
            }
            if ch.has_backlog() {
                return done(ReadResult::Blocked, w, new_head);
            }
            want = want.min(ch.req.max_payload());
        }
        // A partial frame: the rest of it is read straight into the connection's buffer, and
        // once it holds whole frames the buffer itself is spread over the pool (each byte
        // copied once into its ring), instead of copying the partial frame into the scratch
        // buffer and back on every read (quadratic for a trickled frame).
        let (n, filled, room) = if carry > 0 {
            // The whole frames it holds, and whether malformed input follows them (handled
            // like them: spread them, then fail).
            let complete = |c: &Conn| {
                let w = walk(c, &c.carry, max_frame);
                (w.pos, w.bad.is_some())
            };
            let (mut pos, mut bad) = complete(c);
            if pos == 0 && !bad {
                let more = carry_want(c, max_frame);
                let n = match read_into_carry(c, more) {
                    Ok(0) => {
                        return done(ReadResult::Close(CloseReason::ClientEof), home, new_head)
                    }
                    Ok(n) => n,
                    Err(e) => match read_error(c, &e, fs) {
                        Some(r) => return done(r, home, new_head),
                        None => continue,
                    },
                };
                add(&fs.bytes_in, n as u64);
                (pos, bad) = complete(c);
                if pos == 0 && !bad {
                    if let Some(r) = after_read(c, n, more, &mut budget) {
                        return done(r, home, new_head);
                    }
                    continue;
                }
            }
            if pos > want {
                return done(
                    ReadResult::Protocol(shmrelay_worker::codec::ProtocolError::TooLarge {
                        len: pos,
                        max: max_frame as usize,
                    }),
                    home,
                    new_head,
                );
            }
            for &w in pool {
                match chans[w].req.has_space(pos) {
                    Ok(true) => {}
                    Ok(false) => return done(ReadResult::Blocked, w, new_head),
                    Err(e) => return done(ReadResult::Corrupt(e), w, new_head),
                }
            }
            // The buffer becomes the scratch for this pass (no copy); what follows its whole
            // frames goes back to the connection below.
            std::mem::swap(&mut s.buf, &mut c.carry);
            c.carry.clear();
            carry = 0;
            (0, s.buf.len(), 0)
        } else {
            let want = want.min(ROUTED_CHUNK);
            for &w in pool {
                match chans[w].req.has_space(want) {
                    Ok(true) => {}
                    Ok(false) => return done(ReadResult::Blocked, w, new_head),
                    Err(e) => return done(ReadResult::Corrupt(e), w, new_head),
                }
            }
            if s.buf.len() < want {
                s.buf.resize(want, 0);
            }
            let n = match (&c.stream).read_vectored(&mut [IoSliceMut::new(&mut s.buf[..want])]) {
                Ok(0) => return done(ReadResult::Close(CloseReason::ClientEof), home, new_head),
                Ok(n) => n,
                Err(e) => match read_error(c, &e, fs) {
                    Some(r) => return done(r, home, new_head),
                    None => continue,
                },
            };
            add(&fs.bytes_in, n as u64);
            (n, n, want)
        };
        // Walk the frames and pick each one's worker.
        s.frames.clear();
        for &w in pool {
            s.per_worker[w].0 = 0;
        }
        let mut pos = 0;
        let mut bad = None;
        while pos < filled {
            let (len, kind) = match c.codec.scan(&s.buf[pos..filled], max_frame as usize) {
                Ok(Scan::Frame { len, kind }) => (len, kind),
                Ok(Scan::NeedMore { .. }) => break,
                Err(e) => {
                    // The whole frames before it are still served (their replies come first).
                    bad = Some(e);
                    break;
                }
            };
            if kind == FrameKind::Data {
                let w = target(pool, home, &s.buf[pos..pos + len]);
                let acc = &mut s.per_worker[w].0;
                *acc += len;
                s.frames.push((pos, len, w, *acc));
            }
            pos += len;
        }
        // One DATA record per worker, its frames in the client's order. Every ring had room
        // for `want` >= `filled` bytes, and nothing was written to them since.
        for &w in pool {
            let total = s.per_worker[w].0;
            if total == 0 {
                continue;
            }
            let ch = &mut chans[w];
            let mut grant = match ch.req.reserve(total) {
                Ok(g) => g,
                Err(e) => return done(ReadResult::Corrupt(e), w, new_head),
            };
            let mut at = 0;
            for &(start, len, fw, _) in &s.frames {
                if fw == w {
                    grant[at..at + len].copy_from_slice(&s.buf[start..start + len]);
                    at += len;
                }
            }
            let base = grant.position() + RECORD_HEADER_SIZE as u64;
            grant.commit(total, Meta::tag(tag::DATA).conn(id.raw()));
            s.per_worker[w].1 = base;
            ch.wrote();
        }
        let route = c.route.as_mut().expect("a routed connection has its route");
        for &(_, _, w, end) in &s.frames {
            let p = s.per_worker[w].1 + end as u64;
            if route.push(w, p) {
                new_head = new_head.or(Some((w, p)));
            }
        }
        if !s.frames.is_empty() {
            c.last_rx = now;
            c.last_data = now;
            add(&fs.frames_in, s.frames.len() as u64);
        }
        if let Some(e) = bad {
            add(&fs.bytes_copied, (carry + pos) as u64);
            c.carry.clear();
            return done(ReadResult::Protocol(e), home, new_head);
        }
        // The carry in, every frame into its ring, and the new partial frame out.
        add(&fs.bytes_copied, (carry + filled) as u64);
        c.carry.clear();
        c.carry.extend_from_slice(&s.buf[pos..filled]);
        if pos > 0 || carry == 0 {
            // A new partial frame started (frame_timeout_ms runs from here).
            c.partial_since = now;
        }
        if c.carry.is_empty() && c.carry.capacity() > 4096 {
            c.carry = Vec::new();
        }
        if let Some(r) = after_read(c, n, room, &mut budget) {
            return done(r, home, new_head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_on_one_worker_and_keyless_commands_go_home() {
        let pool = [3, 4, 5];
        let get = |k: &str| format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len());
        let set = |k: &str| format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n$1\r\nv\r\n", k.len());
        let mut seen = std::collections::HashSet::new();
        for i in 0..100 {
            let k = format!("key:{i}");
            let w = target(&pool, 3, get(&k).as_bytes());
            assert_eq!(w, target(&pool, 4, set(&k).as_bytes()), "{k}");
            assert_eq!(w, target(&pool, 5, format!("GET {k}\r\n").as_bytes()));
            seen.insert(w);
        }
        assert_eq!(seen.len(), 3, "100 keys use every worker");
        assert_eq!(target(&pool, 4, b"*1\r\n$4\r\nPING\r\n"), 4);
        assert_eq!(target(&pool, 5, b"PING hello\r\n"), 5);
        assert_eq!(
            target(&pool, 5, b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n"),
            5,
            "SELECT's argument is no key"
        );
        // Hash tags keep related keys together.
        let a = target(&pool, 3, b"GET {u7}.name\r\n");
        assert_eq!(a, target(&pool, 4, b"GET {u7}.mail\r\n"));
    }
}
