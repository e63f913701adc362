//! Listing keys: KEYS and SCAN (MATCH, COUNT, TYPE) of the kv worker, and the glob patterns
//! both match with. See the parent module's docs for how a SCAN cursor walks the keys.

use super::{parse_i64, Kv, NOT_INT, SCAN_COUNT, SYNTAX};
use crate::codec::resp;
use crate::slot;

/// Whether `s` matches the glob `pattern` as Redis's KEYS and MATCH read it: `*` any run,
/// `?` one byte, `[abc]`, `[^abc]`, `[a-z]` a class, `\x` the byte x. Linear backtracking
/// (only the last `*` is retried), so no pattern costs more than O(pattern x key).
pub(super) fn glob(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    // After a `*`: where the pattern goes on, and the key position the `*` has eaten up to.
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if pattern.get(p) == Some(&b'*') {
            p += 1;
            star = Some((p, i));
            continue;
        }
        if let Some(next) = glob_one(pattern, p, s[i]) {
            p = next;
            i += 1;
            continue;
        }
        match star {
            Some((after, ate)) => {
                star = Some((after, ate + 1));
                p = after;
                i = ate + 1;
            }
            None => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// If the one-byte element of `pattern` at `p` (not a `*`) matches `c`: where the pattern
/// goes on after it.
fn glob_one(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match *pattern.get(p)? {
        b'?' => Some(p + 1),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        b'[' => {
            let mut j = p + 1;
            let negate = pattern.get(j) == Some(&b'^');
            if negate {
                j += 1;
            }
            let mut hit = false;
            while j < pattern.len() && pattern[j] != b']' {
                if pattern[j] == b'\\' && j + 1 < pattern.len() {
                    hit |= pattern[j + 1] == c;
                    j += 2;
                } else if pattern.get(j + 1) == Some(&b'-') && j + 2 < pattern.len() {
                    let (a, b) = (pattern[j], pattern[j + 2]);
                    hit |= (a.min(b)..=a.max(b)).contains(&c);
                    j += 3;
                } else {
                    hit |= pattern[j] == c;
                    j += 1;
                }
            }
            // An unclosed class ends with the pattern, as in Redis.
            (hit != negate).then_some((j + 1).min(pattern.len()))
        }
        b => (b == c).then_some(p + 1),
    }
}

impl Kv {
    /// `SCAN cursor [MATCH pattern] [COUNT n] [TYPE type]`: see the module docs. COUNT keys
    /// are examined per call (more when several share the last one's hash); those matching
    /// are returned.
    pub(super) fn scan(&mut self, args: &[&[u8]], out: &mut Vec<u8>) {
        let Some(cursor) = std::str::from_utf8(args[1])
            .ok()
            .and_then(|c| c.parse::<u64>().ok())
        else {
            return resp::error(out, "ERR invalid cursor");
        };
        let (mut pattern, mut count, mut kind): (&[u8], usize, Option<Vec<u8>>) =
            (b"*", SCAN_COUNT, None);
        let mut opts = args[2..].chunks(2);
        for opt in opts.by_ref() {
            let [name, value] = opt else {
                return resp::error(out, SYNTAX);
            };
            match &name.to_ascii_uppercase()[..] {
                b"MATCH" => pattern = value,
                b"COUNT" => match parse_i64(value) {
                    Some(n) if n >= 1 => count = n as usize,
                    Some(_) => return resp::error(out, SYNTAX),
                    None => return resp::error(out, NOT_INT),
                },
                b"TYPE" => kind = Some(value.to_ascii_lowercase()),
                _ => return resp::error(out, SYNTAX),
            }
        }
        let index = match self.scan_index.take() {
            Some(index) if cursor != 0 => index,
            _ => {
                let mut index: Vec<(u64, Vec<u8>)> = self
                    .map
                    .keys()
                    .map(|k| (slot::fnv1a(k), k.clone()))
                    .collect();
                index.sort_unstable();
                index
            }
        };
        let start = index.partition_point(|(h, _)| *h < cursor);
        let mut end = (start + count).min(index.len());
        // Keys sharing the last hash go in this call too: the next cursor is past that hash.
        while end < index.len() && end > start && index[end].0 == index[end - 1].0 {
            end += 1;
        }
        let mut found = Vec::new();
        for (_, key) in &index[start..end] {
            let Some(e) = self.live(key) else { continue };
            let kind_ok = kind
                .as_deref()
                .is_none_or(|t| t == e.val.type_name().as_bytes());
            if kind_ok && glob(pattern, key) {
                found.push(key);
            }
        }
        let next = match index.get(end) {
            Some(_) => index[end - 1].0 + 1,
            None => 0,
        };
        resp::array(out, 2);
        resp::bulk(out, next.to_string().as_bytes());
        resp::array(out, found.len());
        for key in found {
            resp::bulk(out, key);
        }
        if next != 0 {
            self.scan_index = Some(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::run;
    use super::*;
    use std::time::Duration;

    #[test]
    fn glob_patterns() {
        let yes = [
            ("*", ""),
            ("*", "abc"),
            ("a*", "abc"),
            ("*c", "abc"),
            ("a*b*c", "aXbYc"),
            ("a?c", "abc"),
            ("h[ae]llo", "hello"),
            ("h[^e]llo", "hallo"),
            ("h[a-b]llo", "hbllo"),
            ("h[b-a]llo", "hallo"),
            ("user:\\*", "user:*"),
            ("*a*a*a*a*a*b", "aaaaaaaaaaaaaaaaaab"),
        ];
        for (p, s) in yes {
            assert!(glob(p.as_bytes(), s.as_bytes()), "{p} ~ {s}");
        }
        let no = [
            ("a*", "bac"),
            ("a?c", "ac"),
            ("h[ae]llo", "hillo"),
            ("h[^e]llo", "hello"),
            ("user:\\*", "user:x"),
            ("abc", "abcd"),
            (
                "*a*a*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaac",
            ),
        ];
        for (p, s) in no {
            assert!(!glob(p.as_bytes(), s.as_bytes()), "{p} !~ {s}");
        }
    }

    #[test]
    fn keys_lists_live_keys_matching() {
        let mut kv = Kv::new(None);
        for k in ["user:1", "user:2", "user:10", "other"] {
            assert_eq!(run(&mut kv, &format!("SET {k} v")), "+OK\r\n");
        }
        assert_eq!(run(&mut kv, "SET user:gone v PX 1"), "+OK\r\n");
        std::thread::sleep(Duration::from_millis(5));
        let keys = |kv: &mut Kv, p: &str| {
            let reply = run(kv, &format!("KEYS {p}"));
            let mut v: Vec<String> = reply
                .split("\r\n")
                .filter(|l| !l.is_empty() && !l.starts_with(['*', '$']))
                .map(str::to_owned)
                .collect();
            v.sort();
            v
        };
        assert_eq!(keys(&mut kv, "user:?"), ["user:1", "user:2"]);
        assert_eq!(keys(&mut kv, "user:*"), ["user:1", "user:10", "user:2"]);
        assert_eq!(keys(&mut kv, "*"), ["other", "user:1", "user:10", "user:2"]);
        assert_eq!(run(&mut kv, "KEYS nothing*"), "*0\r\n");
    }

    /// Splits a SCAN reply into (next cursor, keys).
    fn scan_reply(reply: &str) -> (u64, Vec<String>) {
        let lines: Vec<&str> = reply.split("\r\n").collect();
        assert_eq!(lines[0], "*2", "{reply}");
        let cursor = lines[2].parse().unwrap();
        let keys = lines[4..]
            .iter()
            .filter(|l| !l.is_empty() && !l.starts_with('$'))
            .map(|l| l.to_string())
            .collect();
        (cursor, keys)
    }

    /// Runs a whole scan with `opts`; every key it returned, in order.
    fn full_scan(kv: &mut Kv, opts: &str) -> Vec<String> {
        let mut cursor = 0;
        let mut all = Vec::new();
        let mut calls = 0;
        loop {
            let (next, keys) = scan_reply(&run(kv, &format!("SCAN {cursor}{opts}")));
            all.extend(keys);
            calls += 1;
            assert!(calls < 10_000, "the scan does not end");
            if next == 0 {
                return all;
            }
            assert!(next > cursor, "the cursor moves forward");
            cursor = next;
        }
    }

    #[test]
    fn scan_returns_every_key_exactly_once() {
        let mut kv = Kv::new(None);
        for i in 0..1000 {
            assert_eq!(run(&mut kv, &format!("SET k{i} v")), "+OK\r\n");
        }
        for i in 0..50 {
            assert_eq!(run(&mut kv, &format!("SADD s{i} x")), ":1\r\n");
        }
        let all: std::collections::BTreeSet<String> = (0..1000)
            .map(|i| format!("k{i}"))
            .chain((0..50).map(|i| format!("s{i}")))
            .collect();
        for opts in ["", " COUNT 1", " COUNT 7", " COUNT 100", " COUNT 5000"] {
            let got = full_scan(&mut kv, opts);
            assert_eq!(got.len(), all.len(), "no key twice with{opts}");
            let got: std::collections::BTreeSet<String> = got.into_iter().collect();
            assert_eq!(got, all, "every key with{opts}");
            assert!(
                kv.scan_index.is_none(),
                "the finished scan dropped its copy"
            );
        }
        let matched = full_scan(&mut kv, " MATCH k??? COUNT 30");
        assert_eq!(matched.len(), 900);
        assert!(matched.iter().all(|k| k.len() == 4 && k.starts_with('k')));
        let sets = full_scan(&mut kv, " TYPE set COUNT 30");
        assert_eq!(sets.len(), 50);
        assert!(sets.iter().all(|k| k.starts_with('s')));

        // Changes during a scan: keys deleted before their turn are not returned, keys there
        // for the whole scan are returned once, two scans at once do not disturb each other.
        let (mut c1, mut first) = scan_reply(&run(&mut kv, "SCAN 0 COUNT 10"));
        let (mut c2, mut second) = scan_reply(&run(&mut kv, "SCAN 0 COUNT 25"));
        for i in 0..100 {
            assert_eq!(run(&mut kv, &format!("DEL k{i}")), ":1\r\n");
            assert_eq!(run(&mut kv, &format!("SET new{i} v")), "+OK\r\n");
        }
        while c1 != 0 || c2 != 0 {
            if c1 != 0 {
                let (n, keys) = scan_reply(&run(&mut kv, &format!("SCAN {c1} COUNT 10")));
                first.extend(keys);
                c1 = n;
            }
            if c2 != 0 {
                let (n, keys) = scan_reply(&run(&mut kv, &format!("SCAN {c2} COUNT 25")));
                second.extend(keys);
                c2 = n;
            }
        }
        for got in [first, second] {
            let set: std::collections::BTreeSet<&String> = got.iter().collect();
            assert_eq!(set.len(), got.len(), "a key came twice");
            for i in 100..1000 {
                assert!(set.contains(&format!("k{i}")), "k{i} missing");
            }
        }
        assert_eq!(run(&mut kv, "SCAN x"), "-ERR invalid cursor\r\n");
        assert_eq!(run(&mut kv, "SCAN 0 COUNT 0"), format!("-{SYNTAX}\r\n"));
        assert_eq!(run(&mut kv, "SCAN 0 MATCH"), format!("-{SYNTAX}\r\n"));
        assert_eq!(run(&mut kv, "SCAN 0 BOGUS 1"), format!("-{SYNTAX}\r\n"));
        assert_eq!(run(&mut kv, "FLUSHALL"), "+OK\r\n");
        assert_eq!(run(&mut kv, "SCAN 0"), "*2\r\n$1\r\n0\r\n*0\r\n");
    }
}
