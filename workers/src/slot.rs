//! Which member of a routed worker pool owns a key: the one function the front routes by and
//! workers check multi-key commands with, so the two can never disagree.
//!
//! On a `resp` listener with several workers the front sends each command to the pool member
//! that owns its first key ([`crate::codec::resp::routing_key`], then [`pool_member`]). A
//! worker that receives a command naming several keys can tell whether they all live with it
//! by asking [`pool_member`] for each and comparing with the first key's answer; it needs the
//! pool's size only, which the supervisor gives it in [`POOL_SIZE_ENV`].

/// The environment variable holding the number of workers in this worker's pool (the workers
/// of its listener). Absent for a pool of one, or under a supervisor that does not set it.
pub const POOL_SIZE_ENV: &str = crate::protocol::env::POOL_SIZE;

/// The part of `key` that decides its owner: the bytes between the first `{` and the next `}`
/// when that is not empty (a Redis Cluster hash tag), else the whole key. Taking the tag of a
/// tag changes nothing, so this may be applied to a key that already went through
/// [`crate::codec::resp::routing_key`].
///
/// ```
/// use shmrelay_worker::slot::hash_tag;
/// assert_eq!(hash_tag(b"{user1}.name"), b"user1");
/// assert_eq!(hash_tag(b"plain"), b"plain");
/// assert_eq!(hash_tag(b"{}.empty"), b"{}.empty");
/// ```
pub fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    let rest = &key[open + 1..];
    match rest.iter().position(|&b| b == b'}') {
        Some(len) if len > 0 => &rest[..len],
        _ => key,
    }
}

/// The index (`0..pool_len`) of the pool member that owns `key`: the 64-bit FNV-1a hash of
/// its [`hash_tag`], modulo `pool_len`. FNV-1a is cheap and the same in every process and
/// after every restart, so a key never moves while the pool keeps its size. A `pool_len` of 0
/// or 1 gives 0.
///
/// ```
/// use shmrelay_worker::slot::pool_member;
/// let n = pool_member(b"user:1", 4);
/// assert!(n < 4);
/// // Keys with one {tag} live together.
/// assert_eq!(pool_member(b"{user:1}.name", 4), pool_member(b"{user:1}.mail", 4));
/// assert_eq!(pool_member(b"anything", 1), 0);
/// ```
pub fn pool_member(key: &[u8], pool_len: usize) -> usize {
    if pool_len <= 1 {
        return 0;
    }
    (fnv1a(hash_tag(key)) % pool_len as u64) as usize
}

/// The 64-bit FNV-1a hash of `bytes` (what [`pool_member`] reduces modulo the pool).
///
/// ```
/// assert_eq!(shmrelay_worker::slot::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
/// ```
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// [`POOL_SIZE_ENV`] is set but is not a pool size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{POOL_SIZE_ENV}={value:?} is not a pool size (a whole number of at least 1)")]
pub struct PoolSizeError {
    /// The variable's value, as text.
    pub value: String,
}

/// This worker's pool size from [`POOL_SIZE_ENV`]: `None` when the variable is absent.
///
/// # Errors
///
/// The variable is set but is not a whole number of at least 1.
pub fn pool_size_from_env() -> Result<Option<usize>, PoolSizeError> {
    let Some(v) = std::env::var_os(POOL_SIZE_ENV) else {
        return Ok(None);
    };
    match v.to_str().and_then(|s| s.trim().parse::<usize>().ok()) {
        Some(n) if n >= 1 => Ok(Some(n)),
        _ => Err(PoolSizeError {
            value: v.to_string_lossy().into_owned(),
        }),
    }
}

/// Why a worker that must be alone in its pool refuses to start: [`POOL_SIZE_ENV`] is invalid
/// or names a pool larger than one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolOfOneError {
    /// The variable is not a pool size.
    #[error(transparent)]
    Invalid(#[from] PoolSizeError),
    /// The pool has `0` workers: each would see only its own connections' state.
    #[error(
        "this worker is one of {0} workers of its listener ({POOL_SIZE_ENV}={0}), but its state \
         cannot be split: each worker would see only its own connections, and a message for \
         all of them would reach some. Run it alone: `--workers 1`, or `workers = 1` in its \
         [[listener]] table"
    )]
    TooLarge(usize),
}

/// For workers whose state must live in one process (a pub/sub worker's subscriptions):
/// refuses a pool of more than one worker, as [`POOL_SIZE_ENV`] gives it (absent: no pool).
///
/// # Errors
///
/// The variable is invalid, or names more than one worker.
pub fn require_pool_of_one() -> Result<(), PoolOfOneError> {
    match pool_size_from_env()? {
        Some(n) if n > 1 => Err(PoolOfOneError::TooLarge(n)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_fnv1a_values() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn member_is_fnv1a_of_the_tag_modulo_the_pool() {
        for key in [&b"a"[..], b"foobar", b"user:1000", b"", b"{x}y"] {
            for n in 2..9 {
                let want = (fnv1a(hash_tag(key)) % n as u64) as usize;
                assert_eq!(pool_member(key, n), want, "{key:?} over {n}");
            }
        }
        assert_eq!(pool_member(b"a", 0), 0);
        assert_eq!(pool_member(b"a", 1), 0);
    }

    #[test]
    fn tags() {
        assert_eq!(hash_tag(b"{a}b"), b"a");
        assert_eq!(hash_tag(b"x{a}b{c}"), b"a");
        assert_eq!(hash_tag(b"{}{a}"), b"{}{a}");
        assert_eq!(hash_tag(b"{open"), b"{open");
        assert_eq!(hash_tag(b"{a{b}c}"), b"a{b");
        // Idempotent: the front applies it once through routing_key, pool_member again.
        let keys = ["{a}b", "{}{a}", "{open", "{a{b}c}", "{{x}}", "plain"];
        for key in keys.map(str::as_bytes) {
            assert_eq!(hash_tag(hash_tag(key)), hash_tag(key), "{key:?}");
        }
    }

    #[test]
    fn agrees_with_routing_key() {
        use crate::codec::resp::routing_key;
        for key in ["{u1}.a", "{}{b}", "{a{b}c}", "plain", "{{x}}"] {
            let frame = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
            let routed = routing_key(frame.as_bytes()).unwrap();
            assert_eq!(hash_tag(key.as_bytes()), routed, "{key}");
            assert_eq!(pool_member(routed, 5), pool_member(key.as_bytes(), 5));
        }
    }
}
