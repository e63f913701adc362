//! The hash and set commands of the kv worker: HSET, HGET, HDEL, HGETALL, HLEN, HINCRBY and
//! SADD, SREM, SMEMBERS, SISMEMBER, SCARD, as Redis answers them (an emptied hash or set is
//! removed; a key of another kind is WRONGTYPE).

use std::collections::{HashMap, HashSet};

use super::{err, parse_i64, Entry, Kv, Val, NOT_INT, WRONGTYPE};
use crate::codec::resp;

impl Kv {
    /// HSET, HGET, HDEL, HGETALL, HLEN, HINCRBY; `None` for a wrong number of arguments.
    pub(super) fn hash(&mut self, cmd: &[u8], args: &[&[u8]], out: &mut Vec<u8>) -> Option<bool> {
        let (key, argc) = (args[1], args.len());
        let read = match cmd {
            b"HSET" if argc >= 4 && argc % 2 == 0 => false,
            b"HINCRBY" if argc == 4 => false,
            b"HGET" if argc == 3 => true,
            b"HDEL" if argc >= 3 => true,
            b"HGETALL" | b"HLEN" if argc == 2 => true,
            _ => return None,
        };
        // The increment is checked before the hash is created (as Redis does), so a bad one
        // leaves no empty hash behind.
        let by = match cmd {
            b"HINCRBY" => match parse_i64(args[3]) {
                Some(n) => n,
                None => return Some(err(out, NOT_INT)),
            },
            _ => 0,
        };
        let h = if read {
            match self.live(key) {
                None => {
                    match cmd {
                        b"HGET" => resp::nil(out),
                        b"HGETALL" => resp::array(out, 0),
                        _ => resp::int(out, 0),
                    }
                    return Some(true);
                }
                Some(Entry {
                    val: Val::Hash(h), ..
                }) => h,
                Some(_) => return Some(err(out, WRONGTYPE)),
            }
        } else {
            match self.writable(key, Val::Hash(HashMap::new())) {
                Some(Val::Hash(h)) => h,
                _ => return Some(err(out, WRONGTYPE)),
            }
        };
        match cmd {
            b"HSET" => {
                let mut added = 0;
                for fv in args[2..].chunks_exact(2) {
                    if h.insert(fv[0].to_vec(), fv[1].to_vec()).is_none() {
                        added += 1;
                    }
                }
                resp::int(out, added)
            }
            b"HINCRBY" => {
                let cur = match h.get(args[2]) {
                    None => 0,
                    Some(v) => match parse_i64(v) {
                        Some(n) => n,
                        None => return Some(err(out, "ERR hash value is not an integer")),
                    },
                };
                let Some(n) = cur.checked_add(by) else {
                    return Some(err(out, "ERR increment or decrement would overflow"));
                };
                h.insert(args[2].to_vec(), n.to_string().into_bytes());
                resp::int(out, n)
            }
            b"HGET" => match h.get(args[2]) {
                Some(v) => resp::bulk(out, v),
                None => resp::nil(out),
            },
            b"HGETALL" => {
                resp::array(out, 2 * h.len());
                for (f, v) in h.iter() {
                    resp::bulk(out, f);
                    resp::bulk(out, v);
                }
            }
            b"HLEN" => resp::int(out, h.len() as i64),
            _ => {
                let n = args[2..].iter().filter(|f| h.remove(**f).is_some()).count();
                if h.is_empty() {
                    self.remove(key);
                }
                resp::int(out, n as i64)
            }
        }
        Some(true)
    }

    /// SADD, SREM, SMEMBERS, SISMEMBER, SCARD; `None` for a wrong number of arguments.
    pub(super) fn set_family(
        &mut self,
        cmd: &[u8],
        args: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        let (key, argc) = (args[1], args.len());
        match cmd {
            b"SADD" if argc >= 3 => {}
            b"SREM" if argc >= 3 => {}
            b"SISMEMBER" if argc == 3 => {}
            b"SMEMBERS" | b"SCARD" if argc == 2 => {}
            _ => return None,
        }
        let m = if cmd == b"SADD" {
            match self.writable(key, Val::Set(HashSet::new())) {
                Some(Val::Set(m)) => m,
                _ => return Some(err(out, WRONGTYPE)),
            }
        } else {
            match self.live(key) {
                None if cmd == b"SMEMBERS" => {
                    resp::array(out, 0);
                    return Some(true);
                }
                None => {
                    resp::int(out, 0);
                    return Some(true);
                }
                Some(Entry {
                    val: Val::Set(m), ..
                }) => m,
                Some(_) => return Some(err(out, WRONGTYPE)),
            }
        };
        match cmd {
            b"SADD" => {
                let n = args[2..].iter().filter(|v| m.insert(v.to_vec())).count();
                resp::int(out, n as i64)
            }
            b"SISMEMBER" => resp::int(out, i64::from(m.contains(args[2]))),
            b"SCARD" => resp::int(out, m.len() as i64),
            b"SMEMBERS" => {
                resp::array(out, m.len());
                for v in m.iter() {
                    resp::bulk(out, v);
                }
            }
            _ => {
                let n = args[2..].iter().filter(|v| m.remove(**v)).count();
                if m.is_empty() {
                    self.remove(key);
                }
                resp::int(out, n as i64)
            }
        }
        Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, wrongtype};
    use super::*;

    #[test]
    fn hash_commands() {
        let mut kv = Kv::new(None);
        assert_eq!(run(&mut kv, "HSET h a 1 b 2"), ":2\r\n");
        assert_eq!(
            run(&mut kv, "HSET h a 3 c 4"),
            ":1\r\n",
            "a was there already"
        );
        assert_eq!(run(&mut kv, "HGET h a"), "$1\r\n3\r\n");
        assert_eq!(run(&mut kv, "HGET h nope"), "$-1\r\n");
        assert_eq!(run(&mut kv, "HGET nope a"), "$-1\r\n");
        assert_eq!(run(&mut kv, "HLEN h"), ":3\r\n");
        assert_eq!(run(&mut kv, "HLEN nope"), ":0\r\n");
        assert_eq!(run(&mut kv, "TYPE h"), "+hash\r\n");
        assert_eq!(run(&mut kv, "HINCRBY h a 5"), ":8\r\n");
        assert_eq!(run(&mut kv, "HINCRBY h n -2"), ":-2\r\n");
        assert_eq!(run(&mut kv, "HSET h t x"), ":1\r\n");
        assert_eq!(
            run(&mut kv, "HINCRBY h t 1"),
            "-ERR hash value is not an integer\r\n"
        );
        assert_eq!(run(&mut kv, "HINCRBY h a x"), format!("-{NOT_INT}\r\n"));
        let all = run(&mut kv, "HGETALL h");
        assert!(all.starts_with("*10\r\n"), "{all}");
        for pair in ["$1\r\na\r\n$1\r\n8\r\n", "$1\r\nn\r\n$2\r\n-2\r\n"] {
            assert!(all.contains(pair), "{all} lacks {pair}");
        }
        assert_eq!(run(&mut kv, "HGETALL nope"), "*0\r\n");
        assert_eq!(run(&mut kv, "HINCRBY fresh f x"), format!("-{NOT_INT}\r\n"));
        assert_eq!(run(&mut kv, "EXISTS fresh"), ":0\r\n", "no empty hash left");
        assert_eq!(run(&mut kv, "HDEL h a nope b"), ":2\r\n");
        assert_eq!(run(&mut kv, "HDEL h c n t"), ":3\r\n");
        assert_eq!(
            run(&mut kv, "EXISTS h"),
            ":0\r\n",
            "an empty hash is no key"
        );
        assert!(run(&mut kv, "HSET h a").starts_with("-ERR wrong number of arguments"));
        assert!(run(&mut kv, "HGET h").starts_with("-ERR wrong number of arguments"));
        // WRONGTYPE both ways.
        assert_eq!(run(&mut kv, "SET s v"), "+OK\r\n");
        for cmd in [
            "HSET s f v",
            "HGET s f",
            "HDEL s f",
            "HGETALL s",
            "HLEN s",
            "HINCRBY s f 1",
        ] {
            assert_eq!(run(&mut kv, cmd), wrongtype(), "{cmd}");
        }
        assert_eq!(run(&mut kv, "HSET h f v"), ":1\r\n");
        for cmd in ["GET h", "LPUSH h x", "SADD h x", "APPEND h x", "INCR h"] {
            assert_eq!(run(&mut kv, cmd), wrongtype(), "{cmd}");
        }
    }

    #[test]
    fn set_commands() {
        let mut kv = Kv::new(None);
        assert_eq!(run(&mut kv, "SADD s a b a c"), ":3\r\n");
        assert_eq!(run(&mut kv, "SADD s c d"), ":1\r\n");
        assert_eq!(run(&mut kv, "SCARD s"), ":4\r\n");
        assert_eq!(run(&mut kv, "SCARD nope"), ":0\r\n");
        assert_eq!(run(&mut kv, "SISMEMBER s a"), ":1\r\n");
        assert_eq!(run(&mut kv, "SISMEMBER s z"), ":0\r\n");
        assert_eq!(run(&mut kv, "SISMEMBER nope a"), ":0\r\n");
        assert_eq!(run(&mut kv, "TYPE s"), "+set\r\n");
        let members = run(&mut kv, "SMEMBERS s");
        assert!(members.starts_with("*4\r\n"), "{members}");
        for m in ["a", "b", "c", "d"] {
            assert!(members.contains(&format!("$1\r\n{m}\r\n")), "{members}");
        }
        assert_eq!(run(&mut kv, "SMEMBERS nope"), "*0\r\n");
        assert_eq!(run(&mut kv, "SREM s a z"), ":1\r\n");
        assert_eq!(run(&mut kv, "SREM s b c d"), ":3\r\n");
        assert_eq!(run(&mut kv, "EXISTS s"), ":0\r\n", "an empty set is no key");
        assert_eq!(run(&mut kv, "SREM nope a"), ":0\r\n");
        assert!(run(&mut kv, "SADD s").starts_with("-ERR wrong number of arguments"));
        assert!(run(&mut kv, "SISMEMBER s").starts_with("-ERR wrong number of arguments"));
        assert_eq!(run(&mut kv, "RPUSH l x"), ":1\r\n");
        for cmd in [
            "SADD l x",
            "SREM l x",
            "SMEMBERS l",
            "SISMEMBER l x",
            "SCARD l",
        ] {
            assert_eq!(run(&mut kv, cmd), wrongtype(), "{cmd}");
        }
    }
}
