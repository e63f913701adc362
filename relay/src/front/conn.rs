//! One connection's state, its key, and the connection table.

use mio::net::TcpStream;
use shmrelay_worker::codec::ProtocolError;
use shmrelay_worker::{CloseReason, Codec, ConnId};

use super::routing::Route;

/// Where a connection is in its life. Every transition is made by the front's loop:
///
/// ```text
/// Accepted --OPEN record written--> Open --close requested, replies pending--> Draining
///     \                              |                                            |
///      +------------------------------+--------- close(reason) ------------------+--> (removed)
/// ```
///
/// `Accepted`: its OPEN record waits for ring space, nothing is read yet. `Open`: read and
/// written. `Draining`: nothing more is read; it closes once its queued replies are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConnState {
    Accepted,
    Open,
    Draining(CloseReason),
}

/// One client connection of this front.
pub(super) struct Conn {
    pub stream: TcpStream,
    /// Its worker (home worker of a routed connection): [`Conn::worker`]. A u16 (workers
    /// are at most `MAX_WORKERS`): every byte here is a megabyte at a million connections.
    worker: u16,
    /// Its listener's codec.
    pub codec: Codec,
    pub state: ConnState,
    /// An edge was seen and the socket not yet read dry.
    pub readable: bool,
    /// Waiting for space in its worker's request ring.
    pub blocked: bool,
    /// The peer's FIN (or an error) is pending: read until EOF, not just until a short read.
    pub hup: bool,
    /// Its worker was sent the CLOSE already (at the client's FIN, before the final close).
    pub told_close: bool,
    pub want_write: bool,
    /// Heartbeat bookkeeping, in timer ticks.
    pub last_rx: u32,
    pub last_data: u32,
    pub ping_sent: u32,
    pub ping_outstanding: bool,
    /// The client sends heartbeats of its own: they prove it alive, so it is pinged only after
    /// 1.25x the longest ping interval of silence (pinging it too doubles the idle traffic).
    pub client_beats: bool,
    /// The protocol error this connection made (malformed or oversized input): the codec's
    /// error reply is written at its close, after the replies to the frames before it.
    pub protocol_error: Option<Box<ProtocolError>>,
    /// The tick of this connection's live timer entry.
    pub timer_at: u64,
    /// Smoothed RTT from TCP_INFO, microseconds (0 until sampled).
    pub rtt_us: u32,
    /// Its source address's admission slot.
    pub addr_slot: u16,
    /// The partial frame at the end of the last read.
    pub carry: Vec<u8>,
    /// The tick the partial frame in `carry` started (meaningful while `carry` is not empty):
    /// it must be complete within `frame_timeout_ms`.
    pub partial_since: u32,
    /// The part of `carry`'s capacity counted in the front's total of partial-frame memory
    /// (brought up to date after each read and at the close). A partial frame is at most
    /// `max_frame` (1 GiB) plus a header: a u32.
    pub partial: u32,
    /// Reply bytes the socket did not take yet.
    pub out: Vec<u8>,
    pub out_pos: usize,
    /// The part of `pending()` counted in the front's total of queued reply bytes (brought up
    /// to date by `want_write`, `flush_out` and `close_conn`).
    pub queued: usize,
    /// Per-frame key routing (a `resp` listener with several workers); `worker` is then the
    /// home worker, which gets the commands that name no key.
    pub route: Option<Box<Route>>,
    /// A `websocket` connection's own state (handshake, fragments, control frames, close).
    pub ws: Option<Box<super::websocket::Ws>>,
}

impl Conn {
    /// A connection just accepted (its OPEN not written yet).
    pub fn new(stream: TcpStream, worker: usize, codec: Codec, addr_slot: u16, now: u32) -> Conn {
        Conn {
            stream,
            worker: worker as u16,
            codec,
            state: ConnState::Accepted,
            readable: false,
            blocked: false,
            hup: false,
            told_close: false,
            want_write: false,
            last_rx: now,
            last_data: now,
            ping_sent: 0,
            ping_outstanding: false,
            client_beats: false,
            protocol_error: None,
            timer_at: 0,
            rtt_us: 0,
            addr_slot,
            carry: Vec::new(),
            partial_since: 0,
            partial: 0,
            out: Vec::new(),
            out_pos: 0,
            queued: 0,
            route: None,
            ws: None,
        }
    }

    /// Its worker (the home worker of a routed connection), a global worker index.
    #[inline]
    pub fn worker(&self) -> usize {
        self.worker as usize
    }

    /// Reply bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// True when a draining connection may close: its queue is written and, if routed, every
    /// request it sent was answered and written.
    pub fn flushed(&self) -> bool {
        self.pending() == 0 && self.route.as_ref().is_none_or(|r| r.idle())
    }

    /// False while a routed connection half-closed by its client still waits for a worker's
    /// acknowledgement of the CLOSE (each worker's comes after all its replies).
    pub fn acks_in(&self) -> bool {
        !self.told_close
            || self
                .route
                .as_ref()
                .is_none_or(|r| r.close_acked & r.close_sent == r.close_sent)
    }

    /// True if the loop should read this connection now.
    pub fn wants_read(&self) -> bool {
        self.readable && !self.blocked && (self.state == ConnState::Open || self.handshaking())
    }

    /// A `websocket` connection still reading its handshake request (in state `Accepted`:
    /// its worker hears of it only once the handshake succeeds).
    pub fn handshaking(&self) -> bool {
        self.ws.as_ref().is_some_and(|w| w.handshaking)
    }
}

/// A connection of this front: its slot in the [`Slab`] and the slot's generation when the
/// connection was accepted. The generation makes a key of a closed connection (a stale timer
/// entry, a late reply) miss the slot's next occupant. Shown as `slot.generation`, the end of
/// the [`ConnId`] the workers see (`front.slot.generation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct ConnKey {
    pub slot: u32,
    pub gen: u32,
}

impl ConnKey {
    /// The key of a connection id (of any front: the caller checks [`ConnId::front`]).
    #[inline]
    pub fn of(id: ConnId) -> ConnKey {
        ConnKey {
            slot: id.slot(),
            gen: id.generation(),
        }
    }

    /// The key of a timer wheel entry (`crate::timer` keys are plain pairs).
    #[inline]
    pub fn from_timer((slot, gen): crate::timer::Key) -> ConnKey {
        ConnKey { slot, gen }
    }

    /// This key as a timer wheel key.
    #[inline]
    pub fn timer(self) -> crate::timer::Key {
        (self.slot, self.gen)
    }

    /// The id the workers know this connection by, on front `front`.
    #[inline]
    pub fn id(self, front: usize) -> ConnId {
        ConnId::new(front as u8, self.gen, self.slot)
    }
}

impl std::fmt::Display for ConnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.slot, self.gen)
    }
}

/// The connection table: slots reused with a new generation, so a stale id never reaches a
/// new connection. New slots start at a generation derived from a per-process seed, so a
/// restarted front does not reuse its predecessor's ids (replies still in flight to those are
/// dropped as stale, not delivered to a stranger).
pub(super) struct Slab {
    conns: Vec<Option<Conn>>,
    gens: Vec<u32>,
    free: Vec<u32>,
    seed: u32,
}

impl Slab {
    /// An empty table whose generations derive from `seed`, with room for `cap` connections
    /// reserved up front. Reserved is not resident: the allocator maps the space and the kernel gives it pages only as slots are
    /// filled, so a front costs what its connections use, without the up-to-2x slack of a
    /// table that doubles as it grows (and without copying a large table while it does).
    pub fn with_capacity(seed: u32, cap: usize) -> Slab {
        Slab {
            conns: Vec::with_capacity(cap),
            gens: Vec::with_capacity(cap),
            free: Vec::with_capacity(cap),
            seed,
        }
    }

    /// The key of the connection in `slot`, if there is one.
    pub fn key(&self, slot: usize) -> Option<ConnKey> {
        self.conns.get(slot)?.as_ref()?;
        Some(ConnKey {
            slot: slot as u32,
            gen: self.gens[slot],
        })
    }

    /// The keys of every open connection.
    pub fn keys(&self) -> Vec<ConnKey> {
        self.iter().map(|(key, _)| key).collect()
    }

    /// Every open connection with its key, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (ConnKey, &Conn)> {
        let gens = &self.gens;
        self.conns.iter().enumerate().filter_map(move |(s, c)| {
            let key = ConnKey {
                slot: s as u32,
                gen: gens[s],
            };
            Some((key, c.as_ref()?))
        })
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len() - self.free.len()
    }

    /// Stores a new connection in a free slot; returns its key.
    pub fn insert(&mut self, conn: Conn) -> ConnKey {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                let n = self.conns.len() as u32;
                self.gens
                    .push(self.seed.wrapping_mul(n).rotate_left(13) & ConnId::GENERATION_MASK);
                (self.conns.len() - 1) as u32
            }
        };
        self.conns[slot as usize] = Some(conn);
        ConnKey {
            slot,
            gen: self.gens[slot as usize],
        }
    }

    #[inline]
    pub fn get(&mut self, key: ConnKey) -> Option<&mut Conn> {
        let s = key.slot as usize;
        if self.gens.get(s) != Some(&key.gen) {
            return None;
        }
        self.conns[s].as_mut()
    }

    /// Removes a connection; its slot's generation moves on, so `key` no longer finds it.
    pub fn remove(&mut self, key: ConnKey) -> Option<Conn> {
        let slot = key.slot;
        if self.gens.get(slot as usize) != Some(&key.gen) {
            return None;
        }
        let c = self.conns.get_mut(slot as usize)?.take()?;
        self.gens[slot as usize] = (self.gens[slot as usize] + 1) & ConnId::GENERATION_MASK;
        self.free.push(slot);
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        Conn::new(TcpStream::from_std(stream), 0, Codec::default(), 0, 0)
    }

    #[test]
    fn a_stale_key_never_reaches_the_slots_next_connection() {
        let mut slab = Slab::with_capacity(0x9e37_79b9, 0);
        let a = slab.insert(conn());
        assert!(slab.get(a).is_some());
        assert!(slab.remove(a).is_some());
        assert!(slab.get(a).is_none(), "removed");
        let b = slab.insert(conn());
        assert_eq!(b.slot, a.slot, "the slot is reused");
        assert_ne!(b.gen, a.gen, "with a new generation");
        assert!(
            slab.get(a).is_none(),
            "the old key misses the new connection"
        );
        assert!(slab.remove(a).is_none(), "and cannot remove it");
        assert_eq!(slab.keys(), [b]);
        assert_eq!(slab.len(), 1);
    }

    /// The per-connection budget (issue 15: at most 256 B of private memory per connection,
    /// table slot, timer entry and all): a field added here costs a million connections its
    /// size in megabytes.
    #[test]
    fn a_connection_slot_stays_small() {
        let slot = std::mem::size_of::<Option<Conn>>();
        // Debug builds carry mio's selector id (8 bytes and padding) in every TcpStream; the
        // last 8 bytes are the websocket state's pointer (issue 16), null for other codecs.
        let budget = if cfg!(debug_assertions) { 152 } else { 144 };
        assert!(slot <= budget, "Option<Conn> is {slot} bytes");
        assert_eq!(
            std::mem::size_of::<Option<Conn>>(),
            std::mem::size_of::<Conn>()
        );
    }

    #[test]
    fn a_key_is_the_end_of_the_id_the_workers_see() {
        let key = ConnKey { slot: 42, gen: 7 };
        let id = key.id(3);
        assert_eq!(ConnKey::of(id), key);
        assert_eq!(id.to_string(), format!("3.{key}"));
        assert_eq!(key.to_string(), "42.7");
        assert_eq!(ConnKey::from_timer(key.timer()), key);
    }
}
