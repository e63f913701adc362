//! `kv-worker`: an in-memory key-value store speaking enough of the Redis protocol (RESP) for
//! `redis-cli` (including `--stat` and `--scan`) and `redis-benchmark -t
//! ping,set,get,incr,lpush,lpop,mset` to run unmodified. Run it behind a `resp` listener
//! (`shmrelay worker kv` or the `kv-worker` binary).
//!
//! Commands: PING, ECHO; strings: SET (EX, PX, NX, XX), GET, MGET, MSET, SETEX, PSETEX,
//! GETSET, APPEND, STRLEN, INCR, DECR, INCRBY; keys: DEL, UNLINK, EXISTS, TYPE, KEYS, SCAN
//! (MATCH, COUNT, TYPE), EXPIRE, PEXPIRE, TTL, PTTL, PERSIST; lists: LPUSH, RPUSH, LPOP, RPOP
//! (with a count), LLEN; hashes: HSET, HGET, HDEL, HGETALL, HLEN, HINCRBY; sets: SADD, SREM,
//! SMEMBERS, SISMEMBER, SCARD; server: DBSIZE, FLUSHALL, FLUSHDB, SELECT 0, INFO (sections
//! server, clients, memory, stats, keyspace: what `redis-cli --stat` reads), plus the replies
//! clients ask for at start: CONFIG GET (`save` and `appendonly` answer as a server without
//! persistence; anything else is an empty list), COMMAND (an empty list), CLIENT (OK), QUIT.
//!
//! `DEBUG SLEEP <seconds>` (the worker sleeps, then answers OK; for tests of slow workers) is
//! refused unless the worker's environment has `SHMRELAY_KV_DEBUG=1`, as Redis refuses DEBUG
//! unless `enable-debug-command` is set: any client could otherwise stall the worker.
//!
//! Keys live in the worker process. With several kv workers on one listener the front routes
//! each command by its first key ([`resp::routing_key`], [`slot::pool_member`]), so each worker
//! holds its share of the keys and a key lives on one worker. A command naming several keys
//! (DEL, UNLINK, EXISTS, MGET, MSET) whose keys belong to different workers is refused with
//! Redis Cluster's `-CROSSSLOT` error rather than answered from this worker's share (give keys
//! that go together one `{tag}`); the worker knows its pool from [`slot::POOL_SIZE_ENV`] and
//! checks nothing when that is absent. KEYS and SCAN are refused in a pool (they would route
//! by their pattern or cursor and list one worker's share). `DBSIZE`, `FLUSHALL` and `FLUSHDB`
//! answer for this worker's share: the front sends them to every worker of the pool and merges
//! the replies. `INFO` goes to the connection's home worker and shows its share only.
//! Data is lost when the worker restarts. Expired keys are removed when they are accessed, and
//! by a small sweep every 1,024 commands.
//!
//! SCAN walks the keys in the order of their 64-bit FNV-1a hash: the cursor is the hash to go
//! on from, so a key present for a whole scan is returned exactly once whatever else changes,
//! and keys added during a scan may or may not be. The walk goes over a sorted copy of the
//! key names taken when a scan starts (cursor 0, or a cursor with no copy at hand), shared by
//! the scans running at the time and dropped when one of them ends (a scan given up half-way
//! leaves it until the next scan ends or a FLUSHALL: at most one copy of the key names).
//!
//! Expiry: every `SET ... EX|PX` or `EXPIRE` pushes (deadline, stamp, key) onto a min-heap and
//! gives the key a new stamp; an entry whose stamp is no longer the key's (the key was
//! overwritten, deleted or given another deadline) is stale and dropped when it comes to the
//! top (lazy deletion). The sweep pops only due entries, at most [`SWEEP_MAX`] per run, and
//! the heap is rebuilt without its stale entries once it holds more than twice the keys that
//! have an expiry (plus [`HEAP_SLACK`]), so its size and the cost per command stay bounded
//! whatever the command mix (amortised O(log n) per command).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::codec::resp;
use crate::slot::{self, PoolSizeError};
use crate::{CloseReason, ConnId, Handler, Out};

mod collections;
mod scan;

use scan::glob;

enum Val {
    Str(Vec<u8>),
    List(VecDeque<Vec<u8>>),
    Hash(HashMap<Vec<u8>, Vec<u8>>),
    Set(HashSet<Vec<u8>>),
}

impl Val {
    /// The name TYPE answers.
    fn type_name(&self) -> &'static str {
        match self {
            Val::Str(_) => "string",
            Val::List(_) => "list",
            Val::Hash(_) => "hash",
            Val::Set(_) => "set",
        }
    }

    /// Bytes the value holds (INFO's `used_memory` estimate).
    fn bytes(&self) -> usize {
        match self {
            Val::Str(v) => v.len(),
            Val::List(l) => l.iter().map(|v| v.len() + 24).sum(),
            Val::Hash(h) => h.iter().map(|(f, v)| f.len() + v.len() + 56).sum(),
            Val::Set(m) => m.iter().map(|v| v.len() + 32).sum(),
        }
    }
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
///
/// ```
/// use shmrelay_worker::kv::Kv;
/// let mut kv = Kv::new(None);
/// let mut out = Vec::new();
/// kv.execute(&[b"SET", b"k", b"v"], &mut out);
/// kv.execute(&[b"GET", b"k"], &mut out);
/// assert_eq!(out, b"+OK\r\n$1\r\nv\r\n");
/// ```
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
    /// Workers in this worker's routed pool, when more than one (multi-key commands are
    /// checked against it).
    pool: Option<usize>,
    /// Sorted copy of the key names for SCAN: (FNV-1a hash, key); see the module docs.
    scan_index: Option<Vec<(u64, Vec<u8>)>>,
    /// Connections open now (a replacement worker is told of closes it never saw opened:
    /// a set, not a counter, so those cannot make it wrap).
    clients: HashSet<ConnId>,
    /// Connections opened since the worker started.
    connections_received: u64,
}

impl Default for Kv {
    /// A store that takes its pool size from [`slot::POOL_SIZE_ENV`] (ignored when invalid:
    /// [`Kv::from_env`] reports that), so that every way of starting the kv worker checks
    /// multi-key commands once the supervisor sets it.
    fn default() -> Kv {
        Kv::new(slot::pool_size_from_env().unwrap_or(None))
    }
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const NOT_INT: &str = "ERR value is not an integer or out of range";
const SYNTAX: &str = "ERR syntax error";
const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";
/// SCAN's COUNT when none is given (Redis's default).
const SCAN_COUNT: usize = 10;
/// The environment variable that allows `DEBUG SLEEP`.
pub const DEBUG_ENV: &str = "SHMRELAY_KV_DEBUG";

fn parse_i64(s: &[u8]) -> Option<i64> {
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Appends the error reply `msg` and returns true (keep the connection), for early returns
/// from [`Kv::execute`].
fn err(out: &mut Vec<u8>, msg: &str) -> bool {
    resp::error(out, msg);
    true
}

impl Kv {
    /// An empty store in a routed pool of `pool` workers (`None` or 1: no pool, no CROSSSLOT
    /// checks).
    pub fn new(pool: Option<usize>) -> Kv {
        Kv {
            map: HashMap::new(),
            expiry: BinaryHeap::new(),
            with_expiry: 0,
            stamp: 0,
            commands: 0,
            reply: Vec::new(),
            pool: pool.filter(|&n| n > 1),
            scan_index: None,
            clients: HashSet::new(),
            connections_received: 0,
        }
    }

    /// An empty store in the pool the supervisor describes in [`slot::POOL_SIZE_ENV`].
    ///
    /// # Errors
    ///
    /// The variable is set but is not a pool size.
    pub fn from_env() -> Result<Kv, PoolSizeError> {
        Ok(Kv::new(slot::pool_size_from_env()?))
    }

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
            b"DEL" | b"UNLINK" | b"EXISTS" | b"MGET"
                if arity(2) && self.cross_slot(&args[1..], 1) =>
            {
                resp::error(out, CROSSSLOT)
            }
            b"MSET" if argc >= 3 && argc % 2 == 1 && self.cross_slot(&args[1..], 2) => {
                resp::error(out, CROSSSLOT)
            }
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
                let Some(Val::List(list)) = self.writable(args[1], Val::List(VecDeque::new()))
                else {
                    resp::error(out, WRONGTYPE);
                    return true;
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
            b"TTL" | b"PTTL" if argc == 2 => match self.live(args[1]) {
                None => resp::int(out, -2),
                Some(Entry { expires: None, .. }) => resp::int(out, -1),
                Some(Entry {
                    expires: Some(t), ..
                }) => {
                    let left = t.saturating_duration_since(Instant::now()).as_millis();
                    let unit = if cmd == b"TTL" { 1000 } else { 1 };
                    resp::int(out, left.div_ceil(unit) as i64)
                }
            },
            b"PERSIST" if argc == 2 => {
                let had = self.live(args[1]).is_some() && self.persist(args[1]);
                resp::int(out, i64::from(had))
            }
            b"MGET" if arity(2) => {
                resp::array(out, argc - 1);
                for k in &args[1..] {
                    match self.live(k) {
                        Some(Entry {
                            val: Val::Str(v), ..
                        }) => resp::bulk(out, v),
                        _ => resp::nil(out),
                    }
                }
            }
            b"MSET" if argc >= 3 && argc % 2 == 1 => {
                for kv in args[1..].chunks_exact(2) {
                    self.put_str(kv[0], kv[1].to_vec());
                }
                resp::simple(out, "OK")
            }
            b"SETEX" | b"PSETEX" if argc == 4 => {
                let ms = match parse_i64(args[2]) {
                    None => return err(out, NOT_INT),
                    Some(t) if t <= 0 => {
                        let name = String::from_utf8_lossy(name).to_lowercase();
                        return err(out, &format!("ERR invalid expire time in '{name}' command"));
                    }
                    Some(t) if cmd == b"SETEX" => t.saturating_mul(1000),
                    Some(t) => t,
                };
                self.put_str(args[1], args[3].to_vec());
                self.expire_at(args[1], Instant::now() + Duration::from_millis(ms as u64));
                resp::simple(out, "OK")
            }
            b"GETSET" if argc == 3 => {
                match self.live(args[1]) {
                    None => resp::nil(out),
                    Some(Entry {
                        val: Val::Str(v), ..
                    }) => resp::bulk(out, v),
                    Some(_) => return err(out, WRONGTYPE),
                }
                self.put_str(args[1], args[2].to_vec());
            }
            b"APPEND" if argc == 3 => match self.writable(args[1], Val::Str(Vec::new())) {
                Some(Val::Str(v)) => {
                    v.extend_from_slice(args[2]);
                    resp::int(out, v.len() as i64)
                }
                _ => resp::error(out, WRONGTYPE),
            },
            b"STRLEN" if argc == 2 => match self.live(args[1]) {
                None => resp::int(out, 0),
                Some(Entry {
                    val: Val::Str(v), ..
                }) => resp::int(out, v.len() as i64),
                Some(_) => resp::error(out, WRONGTYPE),
            },
            b"TYPE" if argc == 2 => {
                let name = self.live(args[1]).map_or("none", |e| e.val.type_name());
                resp::simple(out, name)
            }
            b"KEYS" | b"SCAN" if self.pool.is_some() => resp::error(
                out,
                &format!(
                    "ERR {} lists one worker's keys in a pool of {} kv workers; run the listener \
                     with workers = 1 to list them all",
                    String::from_utf8_lossy(name).to_uppercase(),
                    self.pool.unwrap_or(1)
                ),
            ),
            b"KEYS" if argc == 2 => {
                let now = Instant::now();
                let keys: Vec<&Vec<u8>> = self
                    .map
                    .iter()
                    .filter(|(k, e)| e.expires.is_none_or(|t| t > now) && glob(args[1], k))
                    .map(|(k, _)| k)
                    .collect();
                resp::array(out, keys.len());
                for k in keys {
                    resp::bulk(out, k);
                }
            }
            b"SCAN" if arity(2) => self.scan(args, out),
            b"HSET" | b"HGET" | b"HDEL" | b"HGETALL" | b"HLEN" | b"HINCRBY" if arity(2) => {
                return self.hash(cmd, args, out).unwrap_or_else(|| {
                    wrong_args(out);
                    true
                })
            }
            b"SADD" | b"SREM" | b"SMEMBERS" | b"SISMEMBER" | b"SCARD" if arity(2) => {
                return self.set_family(cmd, args, out).unwrap_or_else(|| {
                    wrong_args(out);
                    true
                })
            }
            b"DBSIZE" if argc == 1 => {
                self.sweep(usize::MAX);
                resp::int(out, self.map.len() as i64)
            }
            b"FLUSHALL" | b"FLUSHDB" => {
                self.map.clear();
                self.expiry = BinaryHeap::new();
                self.with_expiry = 0;
                self.scan_index = None;
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
                    resp::error(
                        out,
                        &format!("ERR DEBUG command not allowed ({DEBUG_ENV} is not 1)"),
                    );
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
            b"INFO" => self.info(&args[1..], out),
            b"QUIT" => {
                resp::simple(out, "OK");
                return false;
            }
            b"ECHO" | b"GET" | b"SET" | b"DEL" | b"UNLINK" | b"EXISTS" | b"INCR" | b"DECR"
            | b"INCRBY" | b"LPUSH" | b"RPUSH" | b"LPOP" | b"RPOP" | b"LLEN" | b"EXPIRE"
            | b"PEXPIRE" | b"TTL" | b"SELECT" | b"CONFIG" | b"PTTL" | b"PERSIST" | b"MGET"
            | b"MSET" | b"SETEX" | b"PSETEX" | b"GETSET" | b"APPEND" | b"STRLEN" | b"TYPE"
            | b"KEYS" | b"SCAN" | b"DBSIZE" => wrong_args(out),
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

    /// Whether the keys of one command (every `step`-th of `keys`, from the first) belong to
    /// different members of this worker's pool: the front sent the command by the first.
    fn cross_slot(&self, keys: &[&[u8]], step: usize) -> bool {
        let Some(pool) = self.pool else {
            return false;
        };
        let mut keys = keys.iter().step_by(step);
        let Some(first) = keys.next() else {
            return false;
        };
        let owner = slot::pool_member(first, pool);
        keys.any(|k| slot::pool_member(k, pool) != owner)
    }

    /// The value of `key` for a write that needs the kind of `empty`: created as `empty` when
    /// the key is absent, `None` when it holds another kind (WRONGTYPE).
    fn writable(&mut self, key: &[u8], empty: Val) -> Option<&mut Val> {
        let fits = self
            .live(key)
            .map(|e| std::mem::discriminant(&e.val) == std::mem::discriminant(&empty));
        match fits {
            Some(false) => return None,
            Some(true) => {}
            None => {
                self.map.insert(key.to_vec(), Entry::new(empty));
            }
        }
        self.map.get_mut(key).map(|e| &mut e.val)
    }

    /// Makes `key` the string `val`, of whatever kind it was, without an expiry (SET, MSET,
    /// GETSET; the key's allocation is reused on overwrite).
    fn put_str(&mut self, key: &[u8], val: Vec<u8>) {
        match self.map.get_mut(key) {
            Some(e) => {
                e.val = Val::Str(val);
                self.persist(key);
            }
            None => {
                self.map.insert(key.to_vec(), Entry::new(Val::Str(val)));
            }
        }
    }

    /// Drops the expiry of `key` (its heap entry goes stale); whether it had one.
    fn persist(&mut self, key: &[u8]) -> bool {
        let had = self
            .map
            .get_mut(key)
            .is_some_and(|e| e.expires.take().is_some());
        if had {
            self.with_expiry -= 1;
        }
        had
    }

    /// INFO with the sections named in `sections` (all when none, `all`, `default` or
    /// `everything`): server, clients, memory, stats, keyspace. The counts are this worker's.
    fn info(&mut self, sections: &[&[u8]], out: &mut Vec<u8>) {
        let want = |name: &str| {
            sections.is_empty()
                || sections.iter().any(|s| {
                    [name, "all", "default", "everything"]
                        .iter()
                        .any(|n| s.eq_ignore_ascii_case(n.as_bytes()))
                })
        };
        let mut text = String::new();
        if want("server") {
            text.push_str("# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\n");
            text.push_str(&format!(
                "shmrelay_kv:1\r\nprocess_id:{}\r\nshmrelay_pool_size:{}\r\n\r\n",
                std::process::id(),
                self.pool.unwrap_or(1)
            ));
        }
        if want("clients") {
            text.push_str(&format!(
                "# Clients\r\nconnected_clients:{}\r\nblocked_clients:0\r\n\r\n",
                self.clients.len()
            ));
        }
        if want("memory") {
            // An estimate: the bytes of keys and values plus a fixed overhead per key.
            let used: usize = self
                .map
                .iter()
                .map(|(k, e)| k.len() + 64 + e.val.bytes())
                .sum();
            text.push_str(&format!("# Memory\r\nused_memory:{used}\r\n\r\n"));
        }
        if want("stats") {
            text.push_str(&format!(
                "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\r\n",
                self.connections_received, self.commands
            ));
        }
        if want("keyspace") {
            self.sweep(usize::MAX);
            // `db0:keys=N` alone, also for 0 keys: what INFO has always said here, and enough
            // for `redis-cli --stat` (it reads the number up to a `,` or the line end).
            text.push_str(&format!("# Keyspace\r\ndb0:keys={}\r\n", self.map.len()));
        }
        resp::bulk(out, text.as_bytes());
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
        // A SET without EX clears the expiry.
        self.put_str(args[1], args[2].to_vec());
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
    fn on_open(&mut self, conn: ConnId, _peer: &str, _out: &mut Out<'_>) {
        self.clients.insert(conn);
        self.connections_received += 1;
    }

    fn on_close(&mut self, conn: ConnId, _reason: CloseReason, _out: &mut Out<'_>) {
        self.clients.remove(&conn);
    }

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

    pub(super) fn run(kv: &mut Kv, line: &str) -> String {
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

    pub(super) fn wrongtype() -> String {
        format!("-{WRONGTYPE}\r\n")
    }

    #[test]
    fn string_commands() {
        let mut kv = Kv::new(None);
        assert_eq!(run(&mut kv, "MSET a 1 b 2 c 3"), "+OK\r\n");
        assert!(run(&mut kv, "MSET a 1 b").starts_with("-ERR wrong number of arguments"));
        assert_eq!(run(&mut kv, "RPUSH l x"), ":1\r\n");
        assert_eq!(
            run(&mut kv, "MGET a nope l c"),
            "*4\r\n$1\r\n1\r\n$-1\r\n$-1\r\n$1\r\n3\r\n",
            "a missing key and a key of another kind are nil, as in Redis"
        );
        assert_eq!(run(&mut kv, "GETSET a 10"), "$1\r\n1\r\n");
        assert_eq!(run(&mut kv, "GETSET new 5"), "$-1\r\n");
        assert_eq!(run(&mut kv, "GET new"), "$1\r\n5\r\n");
        assert_eq!(run(&mut kv, "GETSET l x"), wrongtype());
        assert_eq!(run(&mut kv, "APPEND a 23"), ":4\r\n");
        assert_eq!(run(&mut kv, "APPEND fresh xyz"), ":3\r\n");
        assert_eq!(run(&mut kv, "GET a"), "$4\r\n1023\r\n");
        assert_eq!(run(&mut kv, "APPEND l x"), wrongtype());
        assert_eq!(run(&mut kv, "STRLEN a"), ":4\r\n");
        assert_eq!(run(&mut kv, "STRLEN nope"), ":0\r\n");
        assert_eq!(run(&mut kv, "STRLEN l"), wrongtype());
        assert_eq!(run(&mut kv, "TYPE a"), "+string\r\n");
        assert_eq!(run(&mut kv, "TYPE l"), "+list\r\n");
        assert_eq!(run(&mut kv, "TYPE nope"), "+none\r\n");
        // SET, MSET and GETSET overwrite any kind.
        assert_eq!(run(&mut kv, "MSET l s"), "+OK\r\n");
        assert_eq!(run(&mut kv, "TYPE l"), "+string\r\n");
    }

    #[test]
    fn expiry_commands() {
        let mut kv = Kv::new(None);
        let ms = |n| std::thread::sleep(Duration::from_millis(n));
        assert_eq!(run(&mut kv, "SETEX s 100 v"), "+OK\r\n");
        assert_eq!(run(&mut kv, "TTL s"), ":100\r\n");
        let pttl = run(&mut kv, "PTTL s");
        let left: i64 = pttl[1..pttl.len() - 2].parse().unwrap();
        assert!((99_000..=100_000).contains(&left), "{pttl}");
        assert_eq!(run(&mut kv, "PSETEX p 30 v"), "+OK\r\n");
        assert_eq!(run(&mut kv, "PSETEX q 30 v"), "+OK\r\n");
        assert_eq!(run(&mut kv, "PERSIST q"), ":1\r\n");
        assert_eq!(
            run(&mut kv, "PERSIST q"),
            ":0\r\n",
            "no expiry left to drop"
        );
        assert_eq!(run(&mut kv, "PERSIST nope"), ":0\r\n");
        assert_eq!(run(&mut kv, "PTTL q"), ":-1\r\n");
        assert_eq!(run(&mut kv, "PTTL nope"), ":-2\r\n");
        assert_eq!(kv.with_expiry, 2);
        ms(60);
        assert_eq!(run(&mut kv, "GET p"), "$-1\r\n", "PSETEX expires");
        assert_eq!(run(&mut kv, "PTTL p"), ":-2\r\n");
        kv.sweep(usize::MAX);
        assert_eq!(run(&mut kv, "GET q"), "$1\r\nv\r\n", "PERSIST kept it");
        assert!(run(&mut kv, "SETEX x 0 v").starts_with("-ERR invalid expire time in 'setex'"));
        assert!(run(&mut kv, "PSETEX x -5 v").starts_with("-ERR invalid expire time in 'psetex'"));
        assert_eq!(run(&mut kv, "SETEX x ten v"), format!("-{NOT_INT}\r\n"));
        assert!(run(&mut kv, "SETEX x 10").starts_with("-ERR wrong number of arguments"));
        // MSET and GETSET drop an expiry, APPEND keeps it (as Redis).
        assert_eq!(run(&mut kv, "SETEX m 100 v"), "+OK\r\n");
        assert_eq!(run(&mut kv, "MSET m w"), "+OK\r\n");
        assert_eq!(run(&mut kv, "TTL m"), ":-1\r\n");
        assert_eq!(run(&mut kv, "SETEX g 100 v"), "+OK\r\n");
        assert_eq!(run(&mut kv, "GETSET g w"), "$1\r\nv\r\n");
        assert_eq!(run(&mut kv, "TTL g"), ":-1\r\n");
        assert_eq!(run(&mut kv, "APPEND s w"), ":2\r\n");
        assert_eq!(run(&mut kv, "TTL s"), ":100\r\n");
        // Containers expire too.
        assert_eq!(run(&mut kv, "HSET h f v"), ":1\r\n");
        assert_eq!(run(&mut kv, "PEXPIRE h 20"), ":1\r\n");
        ms(40);
        assert_eq!(run(&mut kv, "HGET h f"), "$-1\r\n");
        assert_eq!(kv.with_expiry, expiring_keys(&kv));
    }

    /// Keys `prefix0`, `prefix1`, ... : the first two that belong to the same member of a pool
    /// of two, and one that belongs to the other.
    fn pool_keys(prefix: &str) -> (String, String, String) {
        let keys: Vec<String> = (0..100).map(|i| format!("{prefix}{i}")).collect();
        let member = |k: &String| slot::pool_member(k.as_bytes(), 2);
        let a = &keys[0];
        let same = keys[1..].iter().find(|k| member(k) == member(a)).unwrap();
        let other = keys.iter().find(|k| member(k) != member(a)).unwrap();
        (a.clone(), same.clone(), other.clone())
    }

    #[test]
    fn crossslot_in_a_pool() {
        let (a, same, other) = pool_keys("key");
        let cross = format!("-{CROSSSLOT}\r\n");
        let mut kv = Kv::new(Some(2));
        assert_eq!(run(&mut kv, &format!("MSET {a} 1 {same} 2")), "+OK\r\n");
        assert_eq!(run(&mut kv, &format!("MSET {a} 1 {other} 2")), cross);
        assert_eq!(
            run(&mut kv, &format!("MSET {a} {other} {same} 2")),
            "+OK\r\n",
            "values are no keys"
        );
        assert_eq!(
            run(&mut kv, &format!("MGET {a} {same}")),
            format!("*2\r\n${}\r\n{other}\r\n$1\r\n2\r\n", other.len())
        );
        for cmd in ["MGET", "EXISTS", "DEL", "UNLINK"] {
            assert_eq!(
                run(&mut kv, &format!("{cmd} {a} {same} {other}")),
                cross,
                "{cmd}"
            );
        }
        assert_eq!(run(&mut kv, &format!("EXISTS {a} {same}")), ":2\r\n");
        // One {tag}: one member, whatever the rest of the key.
        assert_eq!(run(&mut kv, "MSET {u}.a 1 {u}.b 2 {u}.c 3"), "+OK\r\n");
        assert_eq!(run(&mut kv, "DEL {u}.a {u}.b {u}.c"), ":3\r\n");
        // KEYS and SCAN would see one member's keys: refused.
        assert!(
            run(&mut kv, "KEYS *").starts_with("-ERR KEYS lists one worker's keys in a pool of 2")
        );
        assert!(
            run(&mut kv, "SCAN 0").starts_with("-ERR SCAN lists one worker's keys in a pool of 2")
        );
        // No pool (or a pool of one): no check.
        for mut kv in [Kv::new(None), Kv::new(Some(1))] {
            assert_eq!(run(&mut kv, &format!("MSET {a} 1 {other} 2")), "+OK\r\n");
            assert_eq!(run(&mut kv, &format!("DEL {a} {other}")), ":2\r\n");
            assert_eq!(run(&mut kv, "SCAN 0"), "*2\r\n$1\r\n0\r\n*0\r\n");
        }
    }

    #[test]
    fn info_has_what_redis_cli_stat_reads() {
        let mut kv = Kv::new(None);
        assert_eq!(run(&mut kv, "MSET a 1 b 2"), "+OK\r\n");
        assert_eq!(run(&mut kv, "SETEX c 100 v"), "+OK\r\n");
        let info = run(&mut kv, "INFO");
        assert!(crate::Codec::Resp.is_valid_reply(info.as_bytes()));
        for field in [
            "# Server\r\n",
            "redis_version:",
            "connected_clients:0\r\n",
            "blocked_clients:0\r\n",
            "used_memory:",
            "total_connections_received:0\r\n",
            "total_commands_processed:3\r\n",
            "# Keyspace\r\ndb0:keys=3\r\n",
        ] {
            assert!(info.contains(field), "{field:?} missing from {info}");
        }
        let memory = run(&mut kv, "INFO memory");
        assert!(
            memory.contains("used_memory:") && !memory.contains("# Server"),
            "{memory}"
        );
        let two = run(&mut kv, "INFO clients keyspace");
        assert!(
            two.contains("# Clients") && two.contains("# Keyspace") && !two.contains("# Stats")
        );
        assert_eq!(run(&mut kv, "FLUSHALL"), "+OK\r\n");
        assert!(run(&mut kv, "INFO keyspace").contains("db0:keys=0\r\n"));
    }
}
