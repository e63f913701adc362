//! Pool-wide `resp` commands on a routed pool: which commands go to every worker of the pool
//! (`DBSIZE`, `FLUSHALL`, `FLUSHDB`) and how the workers' replies merge into the one reply a
//! Redis client expects. Pure logic, unit-tested here; `routing.rs` keeps a fan-out request's
//! place in the connection's reply order and `route.rs` writes its frame into every ring.
//!
//! Merging: `DBSIZE` answers the sum of the workers' integers; `FLUSHALL`/`FLUSHDB` answer
//! `+OK` only if every worker did. Otherwise the first failure in pool order is the reply: a
//! worker's own error line as it sent it, or an error of the front's when a worker sent
//! something else or nothing (its frame was counted as answered without a reply: the worker
//! was replaced and its frames were not carried over). A worker's replies are untrusted: what
//! one part keeps is bounded ([`MAX_PART`]) and parsed, never passed on unless it is exactly
//! one error line.

use std::mem::size_of;

use shmrelay_worker::codec::resp;

/// Bytes kept of one worker's reply to a fan-out request: an integer or `+OK` needs a few,
/// an error line a few dozen. A worker that sends more has sent no reply the front can merge.
pub(super) const MAX_PART: usize = 512;

/// A command that acts on the whole pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PoolWide {
    /// `DBSIZE`: the sum of the workers' key counts.
    Dbsize,
    /// `FLUSHALL`: every worker flushes; `+OK` if all did.
    Flushall,
    /// `FLUSHDB`: as `FLUSHALL` (one database).
    Flushdb,
}

impl PoolWide {
    /// The pool-wide command `frame` is, if any (a malformed frame is none: it goes to the
    /// connection's home worker, which answers the error).
    pub fn of(frame: &[u8]) -> Option<PoolWide> {
        resp::with_args(frame, |args| {
            let name = args.first()?;
            [
                (PoolWide::Dbsize, &b"DBSIZE"[..]),
                (PoolWide::Flushall, b"FLUSHALL"),
                (PoolWide::Flushdb, b"FLUSHDB"),
            ]
            .into_iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name))
            .map(|(c, _)| c)
        })
        .flatten()
    }

    fn name(self) -> &'static str {
        match self {
            PoolWide::Dbsize => "DBSIZE",
            PoolWide::Flushall => "FLUSHALL",
            PoolWide::Flushdb => "FLUSHDB",
        }
    }
}

/// One worker's share of a fan-out request.
#[derive(Debug)]
pub(super) struct Part {
    /// The worker (global index).
    pub worker: u32,
    /// End position of the frame in that worker's request ring.
    pub pos: u64,
    /// The worker answered a later request of the connection: its reply to this one, if
    /// any, has been seen.
    pub done: bool,
    /// Its reply bytes so far (at most [`MAX_PART`]).
    reply: Vec<u8>,
    /// It sent more than [`MAX_PART`] bytes.
    overflow: bool,
}

/// A fan-out request: the command and one part per worker of the pool.
#[derive(Debug)]
pub(super) struct Fan {
    cmd: PoolWide,
    parts: Vec<Part>,
}

/// One part's reply, parsed.
enum Answer<'a> {
    Int(i64),
    Ok,
    /// A whole error line, `-...\r\n`.
    Error(&'a [u8]),
    Nothing,
    Other,
}

impl Fan {
    /// A fan-out of `cmd` to the workers `parts`, (worker, frame end position) each.
    pub fn new(cmd: PoolWide, parts: &[(usize, u64)]) -> Fan {
        Fan {
            cmd,
            parts: parts
                .iter()
                .map(|&(w, pos)| Part {
                    worker: w as u32,
                    pos,
                    done: false,
                    reply: Vec::new(),
                    overflow: false,
                })
                .collect(),
        }
    }

    /// The parts, in pool order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Worker `w`'s part.
    pub fn part_mut(&mut self, w: usize) -> Option<&mut Part> {
        self.parts.iter_mut().find(|p| p.worker as usize == w)
    }

    /// Every worker is known to have answered (a later request of the connection passed
    /// each part).
    pub fn all_done(&self) -> bool {
        self.parts.iter().all(|p| p.done)
    }

    /// Memory the request takes (what counts against the connection's pending bound).
    pub fn mem(&self) -> usize {
        size_of::<Fan>()
            + self.parts.len() * size_of::<Part>()
            + self.parts.iter().map(|p| p.reply.len()).sum::<usize>()
    }

    /// A reply record of worker `w` to this request; returns the bytes kept.
    pub fn add_reply(&mut self, w: usize, payload: &[u8]) -> usize {
        let Some(p) = self.part_mut(w) else {
            return 0;
        };
        if p.overflow || p.reply.len() + payload.len() > MAX_PART {
            // What it kept stays (and counted) until the request is popped.
            p.overflow = true;
            return 0;
        }
        p.reply.extend_from_slice(payload);
        payload.len()
    }

    /// The one reply the client gets: the merge of every part (see the module docs).
    pub fn merged(&self) -> Vec<u8> {
        let mut sum: i64 = 0;
        for (i, p) in self.parts.iter().enumerate() {
            let fail = |why: &str| {
                let mut out = Vec::new();
                resp::error(
                    &mut out,
                    &format!(
                        "ERR {}: worker {} of {} in the pool {why}",
                        self.cmd.name(),
                        i + 1,
                        self.parts.len()
                    ),
                );
                out
            };
            match (parse(p), self.cmd) {
                (Answer::Error(line), _) => return line.to_vec(),
                (Answer::Nothing, _) => {
                    return fail("did not answer (it was replaced while the command was in flight)")
                }
                (Answer::Int(n), PoolWide::Dbsize) => match sum.checked_add(n) {
                    Some(s) if n >= 0 => sum = s,
                    _ => return fail("answered an impossible key count"),
                },
                (Answer::Ok, PoolWide::Flushall | PoolWide::Flushdb) => {}
                _ => return fail("answered something else than the command's reply"),
            }
        }
        let mut out = Vec::new();
        match self.cmd {
            PoolWide::Dbsize => resp::int(&mut out, sum),
            PoolWide::Flushall | PoolWide::Flushdb => resp::simple(&mut out, "OK"),
        }
        out
    }
}

/// What a part's reply bytes are: exactly one integer, `+OK` or error line, or else nothing
/// or something else.
fn parse(p: &Part) -> Answer<'_> {
    let r = &p.reply[..];
    if p.overflow {
        return Answer::Other;
    }
    if r.is_empty() {
        return Answer::Nothing;
    }
    let Some(body) = r.strip_suffix(b"\r\n") else {
        return Answer::Other;
    };
    if body.len() < 2 || body.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Answer::Other;
    }
    match body[0] {
        b'-' => Answer::Error(r),
        b'+' if &body[1..] == b"OK" => Answer::Ok,
        b':' => std::str::from_utf8(&body[1..])
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Answer::Other, Answer::Int),
        _ => Answer::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fan(cmd: PoolWide, replies: &[&[u8]]) -> Vec<u8> {
        let parts: Vec<(usize, u64)> = (0..replies.len()).map(|w| (w + 3, 10)).collect();
        let mut f = Fan::new(cmd, &parts);
        for (w, r) in replies.iter().enumerate() {
            // In two records, as a worker may send it.
            let (a, b) = r.split_at(r.len() / 2);
            f.add_reply(w + 3, a);
            f.add_reply(w + 3, b);
        }
        f.merged()
    }

    #[test]
    fn the_pool_wide_commands_in_any_case_and_form() {
        assert_eq!(
            PoolWide::of(b"*1\r\n$6\r\nDBSIZE\r\n"),
            Some(PoolWide::Dbsize)
        );
        assert_eq!(PoolWide::of(b"dbsize\r\n"), Some(PoolWide::Dbsize));
        assert_eq!(
            PoolWide::of(b"*2\r\n$8\r\nflushall\r\n$5\r\nASYNC\r\n"),
            Some(PoolWide::Flushall)
        );
        assert_eq!(PoolWide::of(b"FLUSHDB\r\n"), Some(PoolWide::Flushdb));
        for other in [
            &b"*2\r\n$3\r\nGET\r\n$6\r\nDBSIZE\r\n"[..],
            b"*1\r\n$4\r\nINFO\r\n",
            b"PING\r\n",
            b"*1\r\n$9\r\nDBSIZE",
            b"",
        ] {
            assert_eq!(PoolWide::of(other), None, "{other:?}");
        }
    }

    #[test]
    fn dbsize_sums_and_flush_is_ok_only_if_all_are() {
        assert_eq!(
            fan(PoolWide::Dbsize, &[b":3\r\n", b":0\r\n", b":39\r\n"]),
            b":42\r\n"
        );
        assert_eq!(
            fan(PoolWide::Flushall, &[b"+OK\r\n", b"+OK\r\n"]),
            b"+OK\r\n"
        );
        assert_eq!(
            fan(PoolWide::Flushdb, &[b"+OK\r\n", b"+OK\r\n"]),
            b"+OK\r\n"
        );
    }

    #[test]
    fn the_first_error_in_pool_order_is_the_reply() {
        let merged = fan(
            PoolWide::Flushall,
            &[b"+OK\r\n", b"-ERR first\r\n", b"-ERR second\r\n"],
        );
        assert_eq!(merged, b"-ERR first\r\n");
        let merged = fan(PoolWide::Dbsize, &[b"-ERR wrong number\r\n", b":4\r\n"]);
        assert_eq!(merged, b"-ERR wrong number\r\n");
    }

    #[test]
    fn a_missing_or_strange_part_is_the_fronts_error_never_a_partial_answer() {
        let err = |m: Vec<u8>| String::from_utf8(m).unwrap();
        let m = err(fan(PoolWide::Dbsize, &[b":3\r\n", b""]));
        assert!(
            m.starts_with("-ERR DBSIZE: worker 2 of 2 in the pool did not answer"),
            "{m}"
        );
        for strange in [
            &b"+OK\r\n"[..],
            b":1\r\n:2\r\n",
            b":-5\r\n",
            b":x\r\n",
            b"$1\r\n1\r\n",
            b"-ERR a\r\nb\r\n",
            b":1",
        ] {
            let m = err(fan(PoolWide::Dbsize, &[b":3\r\n", strange]));
            assert!(
                m.starts_with("-ERR DBSIZE: worker 2 of 2"),
                "{strange:?}: {m}"
            );
            assert!(m.ends_with("\r\n") && m.matches("\r\n").count() == 1, "{m}");
        }
        let m = err(fan(PoolWide::Flushall, &[b":0\r\n", b"+OK\r\n"]));
        assert!(m.starts_with("-ERR FLUSHALL: worker 1 of 2"), "{m}");
        let huge = format!(":{}\r\n", i64::MAX);
        let m = err(fan(PoolWide::Dbsize, &[huge.as_bytes(), b":1\r\n"]));
        assert!(m.contains("impossible key count"), "{m}");
    }

    #[test]
    fn a_part_keeps_a_bounded_reply() {
        let mut f = Fan::new(PoolWide::Dbsize, &[(0, 5), (1, 5)]);
        let before = f.mem();
        let big = vec![b'-'; 300];
        assert_eq!(f.add_reply(0, &big), 300);
        assert_eq!(f.add_reply(0, &big), 0, "past MAX_PART nothing is kept");
        assert_eq!(f.add_reply(0, b":1\r\n"), 0);
        assert!(f.mem() <= before + MAX_PART);
        assert_eq!(f.add_reply(7, b":1\r\n"), 0, "not a worker of the fan-out");
        f.add_reply(1, b":1\r\n");
        let m = String::from_utf8(f.merged()).unwrap();
        assert!(m.starts_with("-ERR DBSIZE: worker 1 of 2"), "{m}");
    }
}
