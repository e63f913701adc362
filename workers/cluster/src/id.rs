//! Cluster-wide names: node names, connection ids that say which node and worker hold a
//! connection, and the NATS subjects derived from them and from topics.

use std::fmt;
use std::str::FromStr;

use shmrelay_worker::ConnId;

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A node name or subject prefix token outside `[A-Za-z0-9_-]`, empty or too long.
    #[error("{what} {value:?}: use 1-64 of [A-Za-z0-9_-]")]
    BadName { what: &'static str, value: String },
    /// A cluster connection id that is not `NODE/WORKER/FRONT.SLOT.GENERATION`.
    #[error("bad cluster connection id {0:?}: expected NODE/WORKER/FRONT.SLOT.GENERATION")]
    BadId(String),
}

/// A node name, a subject prefix token: 1-64 bytes of `[A-Za-z0-9_-]`, so that it is one
/// NATS subject token with no wildcard, dot or space in it.
pub fn check_name(what: &'static str, value: &str) -> Result<(), IdError> {
    let ok = (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IdError::BadName {
            what,
            value: value.to_owned(),
        })
    }
}

/// A subject prefix: one or more names (see [`check_name`]) joined by dots.
pub fn check_prefix(prefix: &str) -> Result<(), IdError> {
    prefix
        .split('.')
        .try_for_each(|t| check_name("subject prefix token", t))
}

/// A connection anywhere in the cluster: the node, the worker (index on that node) that the
/// connection is routed to, and its [`ConnId`] there. Written `NODE/WORKER/FRONT.SLOT.GEN`
/// (the `ConnId` as the relay prints it).
///
/// ```
/// use shmrelay_cluster::ClusterId;
/// use shmrelay_worker::ConnId;
/// let id = ClusterId { node: "b".into(), worker: 1, conn: ConnId::new(0, 3, 9) };
/// assert_eq!(id.to_string(), "b/1/0.9.3");
/// assert_eq!("b/1/0.9.3".parse::<ClusterId>().unwrap(), id);
/// assert!("b/1/0.9".parse::<ClusterId>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterId {
    /// The node's name (`[cluster] node`).
    pub node: String,
    /// The worker's index on its node.
    pub worker: usize,
    /// The connection on that node.
    pub conn: ConnId,
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.node, self.worker, self.conn)
    }
}

impl FromStr for ClusterId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<ClusterId, IdError> {
        let bad = || IdError::BadId(s.to_owned());
        let mut parts = s.split('/');
        let (Some(node), Some(worker), Some(conn), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        check_name("node", node).map_err(|_| bad())?;
        let worker = worker.parse().map_err(|_| bad())?;
        let mut c = conn.split('.');
        let (Some(front), Some(slot), Some(generation), None) =
            (c.next(), c.next(), c.next(), c.next())
        else {
            return Err(bad());
        };
        let front: u8 = front.parse().map_err(|_| bad())?;
        let slot: u32 = slot.parse().map_err(|_| bad())?;
        let generation: u32 = generation.parse().map_err(|_| bad())?;
        if generation > ConnId::GENERATION_MASK {
            return Err(bad());
        }
        Ok(ClusterId {
            node: node.to_owned(),
            worker,
            conn: ConnId::new(front, generation, slot),
        })
    }
}

/// The NATS subjects of one cluster (all under its prefix).
///
/// ```
/// use shmrelay_cluster::Subjects;
/// let s = Subjects::new("shmrelay");
/// assert_eq!(s.topic(b"news"), "shmrelay.t.news");
/// assert_eq!(s.topic(b"a.b*c"), "shmrelay.t.a%2Eb%2Ac");
/// assert_eq!(s.push("node-a", 2), "shmrelay.push.node-a.2");
/// ```
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix` (checked with [`check_prefix`] by the caller).
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            prefix: prefix.to_owned(),
        }
    }

    /// Messages published on a topic.
    pub fn topic(&self, topic: &[u8]) -> String {
        format!("{}.t.{}", self.prefix, encode_token(topic))
    }

    /// "Who is subscribed to this topic?" requests, answered by every worker with local
    /// subscribers.
    pub fn who(&self, topic: &[u8]) -> String {
        format!("{}.who.{}", self.prefix, encode_token(topic))
    }

    /// Join and leave events of a topic.
    pub fn presence(&self, topic: &[u8]) -> String {
        format!("{}.pe.{}", self.prefix, encode_token(topic))
    }

    /// Direct pushes to connections of one worker of one node.
    pub fn push(&self, node: &str, worker: usize) -> String {
        format!("{}.push.{node}.{worker}", self.prefix)
    }
}

/// A topic as one subject token: `[A-Za-z0-9_-]` bytes as they are, every other byte `%XX`.
/// Injective, so two topics never share a subject, and free of `.`, `*`, `>` and spaces, so a
/// topic can neither split into tokens nor act as a wildcard. The empty topic is `%`.
pub fn encode_token(topic: &[u8]) -> String {
    if topic.is_empty() {
        return "%".to_owned();
    }
    let mut s = String::with_capacity(topic.len());
    for &b in topic {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("node", "node-1_a").is_ok());
        for bad in ["", "a.b", "a b", "a*", ">", &"x".repeat(65)] {
            assert!(check_name("node", bad).is_err(), "{bad:?}");
        }
        assert!(check_prefix("shmrelay.prod").is_ok());
        assert!(check_prefix("shmrelay..prod").is_err());
        assert!(check_prefix("a.>").is_err());
    }

    #[test]
    fn tokens_are_injective_and_safe() {
        let topics: [&[u8]; 6] = [b"a", b"%41", b"A", b"a.b", b"a%2Eb", b""];
        let enc: Vec<String> = topics.iter().map(|t| encode_token(t)).collect();
        for (i, a) in enc.iter().enumerate() {
            assert!(!a.contains(['.', '*', '>', ' ']), "{a}");
            for b in &enc[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn ids_refuse_garbage() {
        for bad in [
            "",
            "a/0",
            "a/x/0.1.2",
            "a/0/0.1",
            "a/0/256.1.2",
            "a/0/0.1.16777216",
            "a.b/0/0.1.2",
            "a/0/0.1.2/3",
        ] {
            assert!(bad.parse::<ClusterId>().is_err(), "{bad:?}");
        }
    }
}
