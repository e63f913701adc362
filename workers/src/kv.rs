//! `kv-worker`: an in-memory key-value store speaking enough of the Redis protocol (RESP) for
//! `redis-cli` and `redis-benchmark -t ping,set,get,incr,lpush,lpop` to run unmodified. Run it
//! behind a `resp` listener (`shmrelay worker kv` or the `kv-worker` binary).
//!
//! Commands: PING, ECHO, SET (EX, PX, NX, XX), GET, DEL, EXISTS, INCR, DECR, INCRBY, LPUSH,
//! RPUSH, LPOP, RPOP (with a count), LLEN, EXPIRE, PEXPIRE, TTL, DBSIZE, FLUSHALL, FLUSHDB,
//! SELECT 0, plus the replies clients ask for at start: CONFIG GET (`save` and `appendonly`
//! answer as a server without persistence; anything else is an empty list), COMMAND (an empty
//! list), CLIENT (OK), INFO (a minimal text), QUIT.
//!
//! `DEBUG SLEEP <seconds>` (the worker sleeps, then answers OK; for tests of slow workers) is
//! refused unless the worker's environment has `SHMRELAY_KV_DEBUG=1`, as Redis refuses DEBUG
//! unless `enable-debug-command` is set: any client could otherwise stall the worker.
//!
//! Keys live in the worker process. With several kv workers on one listener the front routes
//! each command by its key ([`resp::routing_key`]), so each worker holds its share of the keys
//! and a key lives on one worker; keyless commands (`DBSIZE`, `INFO`, `FLUSHALL`) go to the
//! connection's home worker and see its share only. Data is lost when the worker restarts.
//! Expired keys are removed when they are accessed, and by a small sweep every 1,024 commands.
//!
//! Expiry: every `SET ... EX|PX` or `EXPIRE` pushes (deadline, stamp, key) onto a min-heap and
//! gives the key a new stamp; an entry whose stamp is no longer the key's (the key was
//! overwritten, deleted or given another deadline) is stale and dropped when it comes to the
//! top (lazy deletion). The sweep pops only due entries, at most [`SWEEP_MAX`] per run, and
//! the heap is rebuilt without its stale entries once it holds more than twice the keys that
//! have an expiry (plus [`HEAP_SLACK`]), so its size and the cost per command stay bounded
//! whatever the command mix (amortised O(log n) per command).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::codec::resp;
use crate::{ConnId, Handler, Out};

enum Val {
    Str(Vec<u8>),
    List(VecDeque<Vec<u8>>),
}

struct Entry {
    val: Val,
    expires: Option<Instant>,
    /// Which expiry heap entry is this key's (meaningful while `expires` is set).
    stamp: u64,
}

impl Entry {
    fn new(val: Val) -> Entry {
        Entry {
            val,
            expires: None,
            stamp: 0,
        }
    }
}

/// Most due heap entries one periodic sweep pops (more than the 1,024 commands between two
/// sweeps can push, so due entries never pile up; keys past it still expire on access).
const SWEEP_MAX: usize = 4096;
/// Stale heap entries tolerated beyond twice the live keys with an expiry before a rebuild.
const HEAP_SLACK: usize = 64;

/// The store and its command interpreter.
#[derive(Default)]
pub struct Kv {
    map: HashMap<Vec<u8>, Entry>,
    /// Expiry deadlines, soonest first: (deadline, stamp, key); see the module docs.
    expiry: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    /// Keys of `map` with an expiry (each has exactly one live entry in `expiry`).
    with_expiry: usize,
    /// The last stamp handed out.
    stamp: u64,
    commands: u64,
    reply: Vec<u8>,
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const NOT_INT: &str = "ERR value is not an integer or out of range";
const SYNTAX: &str = "ERR syntax error";
/// The environment variable that allows `DEBUG SLEEP`.
pub const DEBUG_ENV: &str = "SHMRELAY_KV_DEBUG";

fn parse_i64(s: &[u8]) -> Option<i64> {
    std::str::from_utf8(s).ok()?.parse().ok()
}

impl Kv {
    /// Runs one command (its arguments, name first) and appends the RESP reply to `out`.
    /// Returns false for QUIT (the caller closes the connection after the reply).
    pub fn execute(&mut self, args: &[&[u8]], out: &mut Vec<u8>) -> bool {
        self.commands += 1;
        if self.commands % 1024 == 0 {
            self.sweep(SWEEP_MAX);
        }
        let Some(name) = args.first() else {
            return true;
        };
        let mut upper = [0u8; 16];
        let cmd: &[u8] = if name.len() <= upper.len() {
            for (u, c) in upper.iter_mut().zip(name.iter()) {
                *u = c.to_ascii_uppercase();
            }
            &upper[..name.len()]
        } else {
            b""
        };
        let argc = args.len();
        let arity = |min: usize| argc >= min;
        let wrong_args = |out: &mut Vec<u8>| {
            resp::error(
                out,
                &format!(
                    "ERR wrong number of arguments for '{}' command",
                    String::from_utf8_lossy(name).to_lowercase()
                ),
            )
        };
        match cmd {
            b"PING" => match argc {
                1 => resp::simple(out, "PONG"),
                2 => resp::bulk(out, args[1]),
                _ => wrong_args(out),
            },
            b"ECHO" if argc == 2 => resp::bulk(out, args[1]),
            b"GET" if argc == 2 => match self.live(args[1]) {
                None => resp::nil(out),
                Some(Entry {
                    val: Val::Str(v), ..
                }) => resp::bulk(out, v),
                Some(_) => resp::error(out, WRONGTYPE),
            },
            b"SET" if arity(3) => self.set(args, out),
            b"DEL" | b"UNLINK" if arity(2) => {
                let mut n = 0;
                for k in &args[1..] {
                    if self.live(k).is_some() {
                        self.remove(k);
                        n += 1;
                    }
                }
                resp::int(out, n)
            }
            b"EXISTS" if arity(2) => {
                let n = args[1..].iter().filter(|k| self.live(k).is_some()).count();
                resp::int(out, n as i64)
            }
            b"INCR" if argc == 2 => self.incr(args[1], 1, out),
            b"DECR" if argc == 2 => self.incr(args[1], -1, out),
            b"INCRBY" if argc == 3 => match parse_i64(args[2]) {
                Some(by) => self.incr(args[1], by, out),
                None => resp::error(out, NOT_INT),
            },
            b"LPUSH" | b"RPUSH" if arity(3) => {
                let left = cmd == b"LPUSH";
                let list = match self.live(args[1]) {
                    Some(Entry {
                        val: Val::List(l), ..
                    }) => l,
                    Some(_) => {
                        resp::error(out, WRONGTYPE);
                        return true;
                    }
                    None => {
                        self.map
                            .insert(args[1].to_vec(), Entry::new(Val::List(VecDeque::new())));
                        match self.map.get_mut(args[1]) {
                            Some(Entry {
                                val: Val::List(l), ..
                            }) => l,
                            _ => unreachable!("just inserted a list"),
                        }
                    }
                };
                for v in &args[2..] {
                    if left {
                        list.push_front(v.to_vec());
                    } else {
                        list.push_back(v.to_vec());
                    }
                }
                resp::int(out, list.len() as i64)
            }
            b"LPOP" | b"RPOP" if argc == 2 || argc == 3 => self.pop(cmd == b"LPOP", args, out),
            b"LLEN" if argc == 2 => match self.live(args[1]) {
                None => resp::int(out, 0),
                Some(Entry {
                    val: Val::List(l), ..
                }) => resp::int(out, l.len() as i64),
                Some(_) => resp::error(out, WRONGTYPE),
            },
            b"EXPIRE" | b"PEXPIRE" if argc == 3 => {
                let Some(t) = parse_i64(args[2]) else {
                    resp::error(out, NOT_INT);
                    return true;
                };
                let ms = if cmd == b"EXPIRE" {
                    t.saturating_mul(1000)
                } else {
                    t
                };
                let key = args[1];
                match self.live(key) {
                    None => resp::int(out, 0),
                    Some(_) if ms <= 0 => {
                        self.remove(key);
                        resp::int(out, 1)
                    }
                    Some(_) => {
                        self.expire_at(key, Instant::now() + Duration::from_millis(ms as u64));
                        resp::int(out, 1)
                    }
                }
            }
            b"TTL" if argc == 2 => match self.live(args[1]) {
                None => resp::int(out, -2),
                Some(Entry { expires: None, .. }) => resp::int(out, -1),
                Some(Entry {
                    expires: Some(t), ..
                }) => {
                    let left = t.saturating_duration_since(Instant::now());
                    resp::int(out, left.as_millis().div_ceil(1000) as i64)
                }
            },
            b"DBSIZE" => {
                self.sweep(usize::MAX);
                resp::int(out, self.map.len() as i64)
            }
            b"FLUSHALL" | b"FLUSHDB" => {
                self.map.clear();
                self.expiry = BinaryHeap::new();
                self.with_expiry = 0;
                resp::simple(out, "OK")
            }
            b"SELECT" if argc == 2 => {
                if args[1] == b"0" {
                    resp::simple(out, "OK")
                } else {
                    resp::error(out, "ERR DB index is out of range")
                }
            }
            b"CONFIG" if argc >= 2 => {
                if args[1].eq_ignore_ascii_case(b"GET") && argc == 3 {
                    let p = args[2].to_ascii_lowercase();
                    let value: Option<&[u8]> = match &p[..] {
                        b"save" => Some(b""),
                        b"appendonly" => Some(b"no"),
                        b"databases" => Some(b"1"),
                        _ => None,
                    };
                    match value {
                        Some(v) => {
                            resp::array(out, 2);
                            resp::bulk(out, &p);
                            resp::bulk(out, v);
                        }
                        None => resp::array(out, 0),
                    }
                } else {
                    resp::simple(out, "OK")
                }
            }
            b"DEBUG" if argc == 3 && args[1].eq_ignore_ascii_case(b"SLEEP") => {
                if std::env::var_os(DEBUG_ENV).is_none_or(|v| v != "1") {
                    resp::error(out, &format!("ERR DEBUG command not allowed ({DEBUG_ENV} is not 1)"));
                    return true;
                }
                let secs = std::str::from_utf8(args[2])
                    .ok()
                    .and_then(|t| t.parse::<f64>().ok())
                    .filter(|t| t.is_finite() && (0.0..=60.0).contains(t));
                match secs {
                    Some(t) => {
                        std::thread::sleep(Duration::from_secs_f64(t));
                        resp::simple(out, "OK")
                    }
                    None => resp::error(out, "ERR DEBUG SLEEP takes 0 to 60 seconds"),
                }
            }
            b"COMMAND" => resp::array(out, 0),
            b"CLIENT" => resp::simple(out, "OK"),
            b"INFO" => resp::bulk(
                out,
                format!(
                    "# Server\r\nredis_version:7.0.0\r\nshmrelay_kv:1\r\n# Keyspace\r\ndb0:keys={}\r\n",
                    self.map.len()
                )
                .as_bytes(),
            ),
            b"QUIT" => {
                resp::simple(out, "OK");
                return false;
            }
            b"ECHO" | b"GET" | b"SET" | b"DEL" | b"UNLINK" | b"EXISTS" | b"INCR" | b"DECR"
            | b"INCRBY" | b"LPUSH" | b"RPUSH" | b"LPOP" | b"RPOP" | b"LLEN" | b"EXPIRE"
            | b"PEXPIRE" | b"TTL" | b"SELECT" | b"CONFIG" => wrong_args(out),
            _ => {
                let mut msg = format!(
                    "ERR unknown command '{}', with args beginning with:",
                    String::from_utf8_lossy(name)
                );
                for a in &args[1..] {
                    msg.push_str(&format!(" '{}'", String::from_utf8_lossy(a)));
                }
                msg.retain(|c| c != '\r' && c != '\n');
                resp::error(out, &msg)
            }
        }
        true
    }

    /// The entry of `key` unless it expired (an expired one is removed).
    fn live(&mut self, key: &[u8]) -> Option<&mut Entry> {
        let expired = self
            .map
            .get(key)?
            .expires
            .is_some_and(|t| t <= Instant::now());
        if expired {
            self.remove(key);
            return None;
        }
        self.map.get_mut(key)
    }

    /// Removes `key` (every removal goes through here, to keep `with_expiry` exact).
    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let e = self.map.remove(key)?;
        if e.expires.is_some() {
            self.with_expiry -= 1;
        }
        Some(e)
    }

    /// Sets the expiry of `key`, which is in the map: a new heap entry, and the old one (if
    /// any) goes stale.
    fn expire_at(&mut self, key: &[u8], deadline: Instant) {
        let Some(e) = self.map.get_mut(key) else {
            return;
        };
        self.stamp += 1;
        if e.expires.is_none() {
            self.with_expiry += 1;
        }
        e.expires = Some(deadline);
        e.stamp = self.stamp;
        self.expiry
            .push(Reverse((deadline, self.stamp, key.to_vec())));
        self.bound_heap();
    }

    /// Whether a heap entry is still its key's expiry.
    fn current(map: &HashMap<Vec<u8>, Entry>, stamp: u64, key: &[u8]) -> bool {
        map.get(key)
            .is_some_and(|e| e.expires.is_some() && e.stamp == stamp)
    }

    /// Rebuilds the heap without its stale entries once they outnumber the live ones
    /// (amortised O(1) per push: a rebuild of n entries drops at least n/2 - HEAP_SLACK).
    fn bound_heap(&mut self) {
        if self.expiry.len() <= 2 * self.with_expiry + HEAP_SLACK {
            return;
        }
        let map = &self.map;
        let mut v = std::mem::take(&mut self.expiry).into_vec();
        v.retain(|Reverse((_, stamp, key))| Self::current(map, *stamp, key));
        if v.capacity() > 4 * v.len() + HEAP_SLACK {
            v.shrink_to(2 * v.len() + HEAP_SLACK);
        }
        debug_assert_eq!(v.len(), self.with_expiry);
        self.expiry = BinaryHeap::from(v);
    }

    /// Removes due keys: pops at most `max` due heap entries (stale ones are dropped).
    fn sweep(&mut self, max: usize) {
        let now = Instant::now();
        let mut popped = 0;
        while popped < max {
            match self.expiry.peek() {
                Some(Reverse((t, _, _))) if *t <= now => {}
                _ => break,
            }
            let Some(Reverse((_, stamp, key))) = self.expiry.pop() else {
                break;
            };
            popped += 1;
            if Self::current(&self.map, stamp, &key) {
                self.remove(&key);
            }
        }
        self.bound_heap();
    }

    fn set(&mut self, args: &[&[u8]], out: &mut Vec<u8>) {
        let (mut expires, mut nx, mut xx) = (None, false, false);
        let mut i = 3;
        while i < args.len() {
            let opt = args[i].to_ascii_uppercase();
            match &opt[..] {
                b"NX" => nx = true,
                b"XX" => xx = true,
                b"EX" | b"PX" if i + 1 < args.len() => {
                    let Some(t) = parse_i64(args[i + 1]).filter(|&t| t > 0) else {
                        resp::error(out, "ERR invalid expire time in 'set' command");
                        return;
                    };
                    let ms = if &opt[..] == b"EX" {
                        t.saturating_mul(1000)
                    } else {
                        t
                    };
                    expires = Some(Instant::now() + Duration::from_millis(ms as u64));
                    i += 1;
                }
                _ => {
                    resp::error(out, SYNTAX);
                    return;
                }
            }
            i += 1;
        }
        if nx && xx {
            resp::error(out, SYNTAX);
            return;
        }
        let exists = self.live(args[1]).is_some();
        if (nx && exists) || (xx && !exists) {
            resp::nil(out);
            return;
        }
        let val = Val::Str(args[2].to_vec());
        match self.map.get_mut(args[1]) {
            // Reuse the key's allocation on overwrite; a SET without EX clears the expiry (its
            // heap entry goes stale).
            Some(e) => {
                if e.expires.take().is_some() {
                    self.with_expiry -= 1;
                }
                e.val = val;
            }
            None => {
                self.map.insert(args[1].to_vec(), Entry::new(val));
            }
        }
        if let Some(t) = expires {
            self.expire_at(args[1], t);
        }
        resp::simple(out, "OK")
    }

    fn incr(&mut self, key: &[u8], by: i64, out: &mut Vec<u8>) {
        let cur = match self.live(key) {
            None => 0,
            Some(Entry {
                val: Val::Str(v), ..
            }) => match parse_i64(v) {
                Some(n) => n,
                None => return resp::error(out, NOT_INT),
            },
            Some(_) => return resp::error(out, WRONGTYPE),
        };
        let Some(n) = cur.checked_add(by) else {
            return resp::error(out, "ERR increment or decrement would overflow");
        };
        let text = n.to_string().into_bytes();
        match self.live(key) {
            Some(e) => e.val = Val::Str(text),
            None => {
                self.map.insert(key.to_vec(), Entry::new(Val::Str(text)));
            }
        }
        resp::int(out, n)
    }

    fn pop(&mut self, left: bool, args: &[&[u8]], out: &mut Vec<u8>) {
        let count = match args.get(2) {
            None => None,
            Some(c) => match parse_i64(c) {
                Some(n) if n >= 0 => Some(n as usize),
                _ => return resp::error(out, "ERR value is out of range, must be positive"),
            },
        };
        let key = args[1];
        let list = match self.live(key) {
            None => {
                return if count.is_some() {
                    out.extend_from_slice(b"*-1\r\n")
                } else {
                    resp::nil(out)
                }
            }
            Some(Entry {
                val: Val::List(l), ..
            }) => l,
            Some(_) => return resp::error(out, WRONGTYPE),
        };
        let take = |list: &mut VecDeque<Vec<u8>>| {
            if left {
                list.pop_front()
            } else {
                list.pop_back()
            }
        };
        match count {
            None => match take(list) {
                Some(v) => resp::bulk(out, &v),
                None => resp::nil(out),
            },
            Some(n) => {
                let n = n.min(list.len());
                resp::array(out, n);
                for _ in 0..n {
                    if let Some(v) = take(list) {
                        resp::bulk(out, &v);
                    }
                }
            }
        }
        if list.is_empty() {
            self.remove(key);
        }
    }
}

impl Handler for Kv {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _redelivered: bool, out: &mut Out<'_>) {
        let mut reply = std::mem::take(&mut self.reply);
        reply.clear();
        let keep = match resp::with_args(frame, |args| {
            args.is_empty() || self.execute(args, &mut reply)
        }) {
            Some(keep) => keep,
            None => {
                resp::error(&mut reply, "ERR Protocol error: malformed command");
                false
            }
        };
        if !reply.is_empty() {
            let _ = out.send(conn, &reply);
        }
        if !keep {
            let _ = out.close(conn);
        }
        if reply.capacity() > 64 * 1024 {
            reply = Vec::new();
        }
        self.reply = reply;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kv: &mut Kv, line: &str) -> String {
        let args: Vec<&[u8]> = line.split(' ').map(str::as_bytes).collect();
        let mut out = Vec::new();
        kv.execute(&args, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn commands() {
        let mut kv = Kv::default();
        assert_eq!(run(&mut kv, "PING"), "+PONG\r\n");
        assert_eq!(run(&mut kv, "ping hi"), "$2\r\nhi\r\n");
        assert_eq!(run(&mut kv, "GET a"), "$-1\r\n");
        assert_eq!(run(&mut kv, "SET a 1"), "+OK\r\n");
        assert_eq!(run(&mut kv, "GET a"), "$1\r\n1\r\n");
        assert_eq!(run(&mut kv, "INCR a"), ":2\r\n");
        assert_eq!(run(&mut kv, "INCR b"), ":1\r\n");
        assert_eq!(run(&mut kv, "SET s x"), "+OK\r\n");
        assert_eq!(run(&mut kv, "INCR s"), format!("-{NOT_INT}\r\n"));
        assert_eq!(run(&mut kv, "LPUSH l x y"), ":2\r\n");
        assert_eq!(run(&mut kv, "GET l"), format!("-{WRONGTYPE}\r\n"));
        assert_eq!(run(&mut kv, "LPOP l"), "$1\r\ny\r\n");
        assert_eq!(run(&mut kv, "LPOP l 5"), "*1\r\n$1\r\nx\r\n");
        assert_eq!(run(&mut kv, "LPOP l"), "$-1\r\n");
        assert_eq!(run(&mut kv, "DEL a b nope"), ":2\r\n");
        assert_eq!(run(&mut kv, "SET e v PX 1"), "+OK\r\n");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(run(&mut kv, "GET e"), "$-1\r\n");
        assert_eq!(run(&mut kv, "SET e v"), "+OK\r\n");
        assert_eq!(run(&mut kv, "EXPIRE e 100"), ":1\r\n");
        assert_eq!(run(&mut kv, "TTL e"), ":100\r\n");
        assert_eq!(run(&mut kv, "EXPIRE nope 100"), ":0\r\n");
        assert_eq!(
            run(&mut kv, "CONFIG GET save"),
            "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
        );
        assert_eq!(run(&mut kv, "CONFIG GET maxmemory"), "*0\r\n");
        assert_eq!(run(&mut kv, "COMMAND DOCS"), "*0\r\n");
        assert!(run(&mut kv, "NOPE x").starts_with("-ERR unknown command 'NOPE'"));
        assert!(run(&mut kv, "GET").starts_with("-ERR wrong number of arguments"));
        assert!(crate::Codec::Resp.is_valid_reply(run(&mut kv, "INFO").as_bytes()));
        if std::env::var_os(DEBUG_ENV).is_none() {
            assert!(run(&mut kv, "DEBUG SLEEP 0").starts_with("-ERR DEBUG command not allowed"));
        }
    }

    /// Keys of the map with an expiry, counted the slow way.
    fn expiring_keys(kv: &Kv) -> usize {
        kv.map.values().filter(|e| e.expires.is_some()).count()
    }

    #[test]
    fn alternating_set_ex_keeps_the_expiry_heap_bounded() {
        let mut kv = Kv::default();
        let mut largest = 0;
        for i in 0..1_000_000 {
            let line = if i % 2 == 0 {
                "SET a v EX 100"
            } else {
                "SET b v EX 100"
            };
            assert_eq!(run(&mut kv, line), "+OK\r\n");
            largest = largest.max(kv.expiry.len());
        }
        assert_eq!(kv.with_expiry, 2);
        assert_eq!(expiring_keys(&kv), 2);
        assert!(
            largest <= 2 * 2 + HEAP_SLACK + 1,
            "heap reached {largest} entries for 2 keys"
        );
        assert!(
            kv.expiry.capacity() <= 4 * (2 * 2 + HEAP_SLACK + 1),
            "heap capacity {} for 2 keys",
            kv.expiry.capacity()
        );
        // EXPIRE on the same keys: bounded too.
        for i in 0..100_000 {
            let line = if i % 2 == 0 {
                "EXPIRE a 50"
            } else {
                "EXPIRE b 50"
            };
            assert_eq!(run(&mut kv, line), ":1\r\n");
            largest = largest.max(kv.expiry.len());
        }
        assert!(largest <= 2 * 2 + HEAP_SLACK + 1, "{largest}");
        assert_eq!(run(&mut kv, "TTL a"), ":50\r\n");
        assert_eq!(run(&mut kv, "DBSIZE"), ":2\r\n");
    }

    #[test]
    fn heap_follows_the_live_keys_down_after_deletes() {
        let mut kv = Kv::default();
        for i in 0..10_000 {
            assert_eq!(run(&mut kv, &format!("SET k{i} v EX 100")), "+OK\r\n");
        }
        assert_eq!(kv.expiry.len(), 10_000);
        for i in 0..10_000 {
            assert_eq!(run(&mut kv, &format!("DEL k{i}")), ":1\r\n");
        }
        assert_eq!(kv.with_expiry, 0);
        // The next expiry (or sweep) drops the stale entries.
        assert_eq!(run(&mut kv, "SET x v EX 100"), "+OK\r\n");
        assert!(kv.expiry.len() <= 1 + HEAP_SLACK, "{}", kv.expiry.len());
        assert!(
            kv.expiry.capacity() <= 4 * (2 + HEAP_SLACK),
            "{}",
            kv.expiry.capacity()
        );
    }

    #[test]
    fn expiry_semantics() {
        let mut kv = Kv::default();
        let ms = |n| std::thread::sleep(Duration::from_millis(n));
        // Keys expire: on access, and by the sweep without access.
        assert_eq!(run(&mut kv, "SET gone v PX 20"), "+OK\r\n");
        assert_eq!(run(&mut kv, "SET swept v PX 20"), "+OK\r\n");
        assert_eq!(run(&mut kv, "SET stays v"), "+OK\r\n");
        assert_eq!(run(&mut kv, "TTL stays"), ":-1\r\n");
        assert_eq!(run(&mut kv, "GET gone"), "$1\r\nv\r\n");
        ms(40);
        assert_eq!(run(&mut kv, "GET gone"), "$-1\r\n");
        assert!(kv.map.contains_key(&b"swept"[..]));
        for _ in 0..1024 {
            run(&mut kv, "PING");
        }
        assert!(
            !kv.map.contains_key(&b"swept"[..]),
            "the sweep removes due keys"
        );
        assert_eq!(kv.with_expiry, 0);
        assert!(kv.expiry.is_empty());
        assert_eq!(run(&mut kv, "DBSIZE"), ":1\r\n");

        // A SET without EX clears the expiry.
        assert_eq!(run(&mut kv, "SET k v PX 20"), "+OK\r\n");
        assert_eq!(run(&mut kv, "SET k w"), "+OK\r\n");
        assert_eq!(run(&mut kv, "TTL k"), ":-1\r\n");
        ms(40);
        kv.sweep(usize::MAX);
        assert_eq!(run(&mut kv, "GET k"), "$1\r\nw\r\n");
        assert_eq!(run(&mut kv, "TTL k"), ":-1\r\n");

        // EXPIRE moves the deadline, later and earlier.
        assert_eq!(run(&mut kv, "SET later v PX 20"), "+OK\r\n");
        assert_eq!(run(&mut kv, "EXPIRE later 100"), ":1\r\n");
        assert_eq!(run(&mut kv, "SET sooner v EX 100"), "+OK\r\n");
        assert_eq!(run(&mut kv, "PEXPIRE sooner 20"), ":1\r\n");
        ms(40);
        kv.sweep(usize::MAX);
        assert_eq!(run(&mut kv, "GET later"), "$1\r\nv\r\n");
        assert_eq!(run(&mut kv, "TTL later"), ":100\r\n");
        assert!(
            !kv.map.contains_key(&b"sooner"[..]),
            "the earlier deadline applies"
        );
        assert_eq!(run(&mut kv, "GET sooner"), "$-1\r\n");
        // EXPIRE to 0 deletes; a key deleted and set again without EX keeps no expiry.
        assert_eq!(run(&mut kv, "EXPIRE later 0"), ":1\r\n");
        assert_eq!(run(&mut kv, "GET later"), "$-1\r\n");
        assert_eq!(run(&mut kv, "SET d v PX 20"), "+OK\r\n");
        assert_eq!(run(&mut kv, "DEL d"), ":1\r\n");
        assert_eq!(run(&mut kv, "RPUSH d x"), ":1\r\n");
        ms(40);
        kv.sweep(usize::MAX);
        assert_eq!(run(&mut kv, "LLEN d"), ":1\r\n");
        // INCR keeps the TTL, as Redis does.
        assert_eq!(run(&mut kv, "SET n 1 EX 100"), "+OK\r\n");
        assert_eq!(run(&mut kv, "INCR n"), ":2\r\n");
        assert_eq!(run(&mut kv, "TTL n"), ":100\r\n");
        assert_eq!(kv.with_expiry, expiring_keys(&kv));
        assert_eq!(run(&mut kv, "FLUSHALL"), "+OK\r\n");
        assert_eq!(kv.with_expiry, 0);
        assert!(kv.expiry.is_empty());
    }
}
