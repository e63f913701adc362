//! Keeps each connection's replies in the order of its commands when some of them are
//! answered later, by a NATS round trip (`push` to another node, `who`).

use std::collections::{HashMap, VecDeque};

use shmrelay_worker::ConnId;

/// A token naming one outstanding round trip.
pub type Token = u64;

enum Slot {
    Waiting(Token),
    Ready(Vec<u8>),
}

/// Per connection, the replies not yet sent because an earlier one is still waiting for its
/// round trip. A connection with nothing waiting has no entry, so the common case costs one
/// map lookup.
///
/// ```
/// use shmrelay_cluster::ReplyOrder;
/// use shmrelay_worker::ConnId;
/// let c = ConnId::new(0, 1, 1);
/// let mut order = ReplyOrder::default();
/// assert_eq!(order.reply(c, b"a".to_vec()), Some(b"a".to_vec())); // nothing waits: send now
/// order.wait(c, 7);
/// assert_eq!(order.reply(c, b"c".to_vec()), None); // held behind token 7
/// assert_eq!(order.resolve(c, 7, b"b".to_vec()), vec![b"b".to_vec(), b"c".to_vec()]);
/// ```
#[derive(Default)]
pub struct ReplyOrder {
    queues: HashMap<ConnId, VecDeque<Slot>>,
}

impl ReplyOrder {
    /// A reply ready now: returned to be sent at once if nothing of `conn` waits, else held.
    pub fn reply(&mut self, conn: ConnId, bytes: Vec<u8>) -> Option<Vec<u8>> {
        match self.queues.get_mut(&conn) {
            Some(q) => {
                q.push_back(Slot::Ready(bytes));
                None
            }
            None => Some(bytes),
        }
    }

    /// The next reply of `conn` will come from round trip `token`.
    pub fn wait(&mut self, conn: ConnId, token: Token) {
        self.queues
            .entry(conn)
            .or_default()
            .push_back(Slot::Waiting(token));
    }

    /// Round trip `token` of `conn` ended with `bytes`: returns the replies that can go out
    /// now, in order (empty if an earlier round trip still waits, or if `conn` closed).
    pub fn resolve(&mut self, conn: ConnId, token: Token, bytes: Vec<u8>) -> Vec<Vec<u8>> {
        let Some(q) = self.queues.get_mut(&conn) else {
            return Vec::new();
        };
        if let Some(slot) = q
            .iter_mut()
            .find(|s| matches!(s, Slot::Waiting(t) if *t == token))
        {
            *slot = Slot::Ready(bytes);
        }
        let mut out = Vec::new();
        while let Some(Slot::Ready(_)) = q.front() {
            if let Some(Slot::Ready(b)) = q.pop_front() {
                out.push(b);
            }
        }
        if q.is_empty() {
            self.queues.remove(&conn);
        }
        out
    }

    /// `conn` closed: forget what it waited for.
    pub fn forget(&mut self, conn: ConnId) {
        self.queues.remove(&conn);
    }

    /// Connections with held replies.
    pub fn waiting(&self) -> usize {
        self.queues.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_resolutions_keep_command_order() {
        let c = ConnId::new(0, 1, 1);
        let mut o = ReplyOrder::default();
        o.wait(c, 1);
        o.wait(c, 2);
        assert_eq!(o.reply(c, b"3".to_vec()), None);
        assert!(o.resolve(c, 2, b"2".to_vec()).is_empty());
        assert_eq!(
            o.resolve(c, 1, b"1".to_vec()),
            [b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]
        );
        assert_eq!(o.waiting(), 0);
        assert_eq!(o.reply(c, b"4".to_vec()), Some(b"4".to_vec()));
    }

    #[test]
    fn other_connections_are_not_held_and_closed_ones_are_forgotten() {
        let (a, b) = (ConnId::new(0, 1, 1), ConnId::new(0, 1, 2));
        let mut o = ReplyOrder::default();
        o.wait(a, 1);
        assert_eq!(o.reply(b, b"x".to_vec()), Some(b"x".to_vec()));
        o.forget(a);
        assert!(o.resolve(a, 1, b"late".to_vec()).is_empty());
        assert_eq!(o.waiting(), 0);
    }
}
