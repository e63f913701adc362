//! A front in the test's own process: a [`Worker`] attached to a fresh pair of memfd rings,
//! and the front's ends of them, so a handler (or a binding over the SDK) is tested without a
//! relay. Test support: it panics if the rings cannot be made.

use std::sync::Arc;

use shm_ring::layout::RECORD_HEADER_SIZE;
use shm_ring::{Consumer, EventFd, Meta, Producer, ShmRing};

use crate::protocol::{flags, tag, BATCH_ENTRY_HEADER};
use crate::{Codec, ConnId, Worker};

/// The front's ends of a worker's rings: it writes requests, reads replies.
pub struct FakeFront {
    /// The request ring, written as a front writes it.
    pub req: Producer<Arc<ShmRing>>,
    /// The reply ring, read as a front reads it.
    pub rep: Consumer<Arc<ShmRing>>,
}

/// A worker with index `index` for a listener of `codec`, attached as front 0's to two new
/// rings of `capacity` bytes, and the front's ends of them.
///
/// ```
/// use shmrelay_worker::{protocol::tag, testing, Codec, ConnId};
/// let (mut worker, mut front) = testing::attach(0, Codec::LengthPrefixed, 1 << 16);
/// let conn = ConnId::new(0, 1, 5);
/// // DATA records hold frames on the wire format of the listener's codec.
/// let end = front.push(tag::DATA, conn, 0, &Codec::LengthPrefixed.encode(b"hi"));
/// let mut echo = shmrelay_worker::examples::Echo;
/// assert!(worker.poll_once(&mut echo).unwrap() > 0);
/// let replies = front.replies();
/// assert_eq!((replies[0].tag, replies[0].aux), (tag::SEND, end));
/// assert_eq!(replies[0].body, b"hi");
/// ```
///
/// # Panics
///
/// If the memfds cannot be made or attached (out of memory or fds).
pub fn attach(index: usize, codec: Codec, capacity: usize) -> (Worker, FakeFront) {
    let mut worker = Worker::new(index, Arc::new(EventFd::new().expect("eventfd")), codec);
    let front = attach_front(&mut worker, 0, capacity);
    (worker, front)
}

/// Attaches `worker` as front `front`'s to two new rings of `capacity` bytes (a worker of a
/// relay with many fronts) and returns the front's ends of them.
///
/// ```
/// use shmrelay_worker::{protocol::tag, testing, Codec, ConnId};
/// let (mut worker, _front0) = testing::attach(0, Codec::LengthPrefixed, 1 << 16);
/// let mut front3 = testing::attach_front(&mut worker, 3, 1 << 16);
/// front3.push(tag::DATA, ConnId::new(3, 1, 5), 0, &Codec::LengthPrefixed.encode(b"hi"));
/// assert!(worker.poll_once(&mut shmrelay_worker::examples::Echo).unwrap() > 0);
/// assert_eq!(front3.replies()[0].body, b"hi");
/// ```
///
/// # Panics
///
/// If the memfds cannot be made or attached (out of memory or fds).
pub fn attach_front(worker: &mut Worker, front: usize, capacity: usize) -> FakeFront {
    let req = ShmRing::create_memfd("req", capacity).expect("request ring");
    let rep = ShmRing::create_memfd("rep", capacity).expect("reply ring");
    worker
        .attach(
            front,
            req.fd().try_clone_to_owned().expect("dup"),
            rep.fd().try_clone_to_owned().expect("dup"),
            Arc::new(EventFd::new().expect("eventfd")),
            false,
        )
        .expect("attach");
    FakeFront {
        req: Producer::new(Arc::new(req)).expect("request producer"),
        rep: Consumer::new(Arc::new(rep)).expect("reply consumer"),
    }
}

impl FakeFront {
    /// Writes one request record and publishes it; returns the end position of its payload
    /// in the request ring (what a reply to it carries as `aux`).
    ///
    /// # Panics
    ///
    /// If the request ring has no room.
    pub fn push(&mut self, tag: u16, conn: ConnId, aux: u64, payload: &[u8]) -> u64 {
        let mut g = self
            .req
            .reserve(payload.len())
            .expect("room in the request ring");
        g[..payload.len()].copy_from_slice(payload);
        let at = g.commit(payload.len(), Meta::tag(tag).conn(conn.raw()).aux(aux));
        self.req.publish();
        at + RECORD_HEADER_SIZE as u64 + payload.len() as u64
    }
}

/// One message of the reply ring as the front takes it: a record, or one entry of a coalesced
/// ([`BATCH`](flags::BATCH)) record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub tag: u16,
    pub conn: ConnId,
    /// The request position it answers (an entry's, rebuilt from the record's aux).
    pub aux: u64,
    /// The record's flags, without `BATCH`.
    pub flags: u16,
    pub body: Vec<u8>,
}

impl FakeFront {
    /// Reads and releases every published reply record, coalesced ones split into their
    /// entries.
    ///
    /// # Panics
    ///
    /// If the reply ring or a coalesced record is malformed.
    pub fn replies(&mut self) -> Vec<Reply> {
        let mut got = Vec::new();
        let mut end = None;
        for rec in self.rep.records().expect("reply ring") {
            let rec = rec.expect("reply record");
            end = Some(rec.end());
            let (conn, aux) = (ConnId::from_raw(rec.conn()), rec.aux());
            let payload = rec.payload_to_vec();
            if rec.tag() != tag::SEND || rec.flags() & flags::BATCH == 0 {
                got.push(Reply {
                    tag: rec.tag(),
                    conn,
                    aux,
                    flags: rec.flags(),
                    body: payload,
                });
                continue;
            }
            let mut rest = &payload[..];
            while !rest.is_empty() {
                let (head, body) = rest.split_at(BATCH_ENTRY_HEADER);
                let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
                let low = u32::from_le_bytes(head[4..].try_into().unwrap());
                got.push(Reply {
                    tag: tag::SEND,
                    conn,
                    aux: aux - (aux as u32).wrapping_sub(low) as u64,
                    flags: rec.flags() & !flags::BATCH,
                    body: body[..len].to_vec(),
                });
                rest = &body[len..];
            }
        }
        if let Some(e) = end {
            self.rep.release(e);
        }
        got
    }
}
