//! The contract between the relay's fronts and its workers: record tags, connection ids, close
//! reasons, the frame codec and the environment a worker is started with.
//!
//! # Request ring (front -> worker)
//!
//! | tag | conn | aux | payload |
//! |---|---|---|---|
//! | [`tag::OPEN`] | new connection | 0 | peer address, UTF-8; for a `websocket` listener followed by a NUL byte and the handshake's fields ([`Upgrade::encode_open`](crate::codec::websocket::Upgrade::encode_open)) |
//! | [`tag::DATA`] | connection | 0 | one or more whole wire frames (4-byte big-endian length, payload), exactly as read from the socket; length-0 frames (heartbeats) may be among them and are skipped by the SDK |
//! | [`tag::CLOSE`] | connection | [`CloseReason`] code | empty |
//! | [`tag::FRONT_RESET`] | front index | 0 | empty (written by the supervisor after the front died) |
//!
//! A record flagged [`flags::REDELIVERED`] (set by the SDK, not the front) was published before
//! the current worker attached and may have been seen by its predecessor.
//!
//! # Reply ring (worker -> front)
//!
//! | tag | conn | aux | payload |
//! |---|---|---|---|
//! | [`tag::SEND`] | connection | request position answered (0 for a push) | one reply message's bytes, without the codec's framing (see below) |
//! | [`tag::CLOSE`] | connection | 0, or a `websocket` close code | empty, or a `websocket` close reason (UTF-8, at most 123 bytes): close after sending what was queued before; the SDK also writes one after every `on_close`, which acknowledges the front's CLOSE (a client that half-closed its socket is closed on it, once its replies are out) |
//!
//! A SEND record flagged [`flags::TEXT`] is a `websocket` text message (otherwise binary).
//!
//! **The front frames replies itself.** A SEND record carries the message body only; the front
//! writes the codec's header (`length-prefixed`: the 4-byte length) and trailer (`line`: the
//! newline) from the record length it copied out of the ring and validated, and takes only the
//! body from the ring. A worker that rewrites a record after publishing it can change bytes of
//! its own reply, never the framing a client sees. `resp` has no separate header: the front
//! validates a private copy of the reply (whole RESP values) and writes that copy.
//!
//! **Long replies** (more than one record can hold, see [`Producer::max_payload`]) are split
//! over consecutive SEND records of the same connection: every record but the last has
//! [`flags::MORE`], and the first starts with [`SPLIT_HEADER`] bytes holding the whole
//! message's length (u64, little-endian), which the front reads once and holds every piece
//! to. Nothing else may come between the pieces in the ring; a split that breaks off (another
//! record comes first, or the lengths disagree) closes its connection: the client gets a
//! close, never a shifted stream.
//!
//! **Coalesced replies**: a SEND record flagged [`flags::BATCH`] carries several whole reply
//! messages to its connection, each an entry of [`BATCH_ENTRY_HEADER`] bytes (the body length,
//! u32 little-endian; the low 32 bits of the request position the entry answers, u32
//! little-endian) and then the body. The record's aux is the position the last entry answers;
//! entries answer non-decreasing positions (so every entry's position is known exactly from the
//! record's aux: a record's entries span less than 4 GiB of request ring). The SDK writes one
//! such record for a run of consecutive replies to the connection whose frames it is handling,
//! so a pipelined batch of requests costs the front one record and one `writev`. The front
//! reads each entry header once into its own copy, checks it against the record and the
//! entry before (one pass: it frames each entry as it validates it) and writes the codec's
//! framing around each body; an entry that does not fit, or positions out of order, break the
//! record: the entries before it go out, then the connection closes. Not for `resp` (whose
//! replies the front copies and validates whole).
//!
//! The front validates every reply record (connection id, lengths) before use: a worker is
//! another process and its memory is untrusted.
//!
//! [`Producer::max_payload`]: shm_ring::Producer::max_payload

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Record tags.
pub mod tag {
    /// Request ring: a connection was accepted.
    pub const OPEN: u16 = 1;
    /// Request ring: frames from the client.
    pub const DATA: u16 = 2;
    /// Both rings: the connection closed (request) / close it (reply).
    pub const CLOSE: u16 = 3;
    /// Reply ring: frames to write to the client.
    pub const SEND: u16 = 4;
    /// Request ring, written by the supervisor: the front died; every connection of the front
    /// in the record's `conn` field (the front index) is gone. The SDK turns it into a CLOSE
    /// with [`CloseReason::FrontGone`](super::CloseReason::FrontGone) for each connection of
    /// that front it saw open.
    pub const FRONT_RESET: u16 = 5;
}

/// Record flags.
pub mod flags {
    /// The record may have been delivered to a previous worker that died.
    pub const REDELIVERED: u16 = 1;
    /// Reply ring, SEND: the message continues in the next record (a long reply split over
    /// several records; see the module documentation).
    pub const MORE: u16 = 2;
    /// Reply ring, SEND: a `websocket` text message (opcode 1); without it, binary (opcode 2).
    /// On a split reply, the first record's flag counts. Ignored by the other codecs.
    pub const TEXT: u16 = 4;
    /// Reply ring, SEND: the record holds several replies to its connection, each led by a
    /// [`BATCH_ENTRY_HEADER`](super::BATCH_ENTRY_HEADER) (see the module documentation).
    /// Never together with [`MORE`].
    pub const BATCH: u16 = 8;
}

/// Bytes before each reply body in a [`flags::BATCH`] record: the body length (u32,
/// little-endian), then the low 32 bits of the request position the reply answers (u32,
/// little-endian).
pub const BATCH_ENTRY_HEADER: usize = 8;

/// Bytes at the start of the first record of a split reply that hold the whole message's
/// length (u64, little-endian); see [`flags::MORE`].
pub const SPLIT_HEADER: usize = 8;

/// Index of the request ring's user word in which the front records the highest request
/// position answered by the reply records it has consumed (see [`tag::SEND`]'s aux). A
/// replacement worker skips frames at or below it, together with the answers still waiting in
/// its reply ring, so a client sees no duplicate reply across a worker crash.
pub const ANSWERED_WORD: usize = 0;

/// Index of the request ring's user word in which the worker counts the frames it was handed
/// flagged redelivered (they arrived before it attached and its predecessor may have seen them).
pub const REDELIVERED_WORD: usize = 1;

/// Index of the request ring's user word in which the worker counts the frames it skipped
/// because its predecessor had already answered them.
pub const SKIPPED_WORD: usize = 2;

/// Index of the request ring's user word in which the worker SDK records the request position
/// (frame end) it is handing to `on_frame`, before the call: after a crash the supervisor
/// reads it to learn which frame the worker died on (dead-lettering, see
/// [`DEAD_LETTER_WORDS`]). Written by the worker, so the supervisor bounds it by the positions
/// the front published before it believes it. Written once per frame, so it sits in the second
/// 64-byte half of the user words, away from [`ANSWERED_WORD`], which the front writes: the two
/// processes would otherwise pull one cache line back and forth at every frame.
pub const INFLIGHT_WORD: usize = 8;

/// Indices of the request ring's user words in which the supervisor, while no worker is
/// attached, records the request positions (frame ends) of dead-lettered frames: frames that
/// crashed `dead_letter_after` redelivered generations. A replacement worker skips a frame
/// ending at one of them (its connection is closed with an error by the front).
pub const DEAD_LETTER_WORDS: [usize; 2] = [4, 5];

/// Indices of the user words of a worker's request ring from front 0 in which a cluster
/// worker (`shmrelay-cluster`) publishes its NATS state for operators, in this order:
/// state (0: not a cluster worker, 1: not connected, 2: connected), subjects subscribed,
/// messages in, messages out, errors, reconnects. Operators' statistics only: the relay never
/// acts on them (the supervisor copies them into its view like the other user words).
pub const CLUSTER_WORDS: [usize; 6] = [9, 10, 11, 12, 13, 14];

/// Bytes of the frame length prefix.
pub const FRAME_HEADER: usize = 4;

/// A connection, unique within one relay instance for its lifetime: the front that owns it,
/// a generation that changes each time its slot is reused, and the slot.
///
/// # Examples
///
/// ```
/// use shmrelay_worker::ConnId;
/// let c = ConnId::new(3, 17, 42);
/// assert_eq!((c.front(), c.generation(), c.slot()), (3, 17, 42));
/// assert_eq!(ConnId::from_raw(c.raw()), c);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    /// Largest front index (8 bits).
    pub const MAX_FRONTS: usize = 256;
    /// Generations wrap at 24 bits.
    pub const GENERATION_MASK: u32 = (1 << 24) - 1;

    /// Packs front (8 bits), generation (24 bits) and slot (32 bits).
    pub const fn new(front: u8, generation: u32, slot: u32) -> ConnId {
        ConnId(
            (front as u64) << 56
                | ((generation & Self::GENERATION_MASK) as u64) << 32
                | slot as u64,
        )
    }
    /// From the 64-bit value carried in a record.
    pub const fn from_raw(raw: u64) -> ConnId {
        ConnId(raw)
    }
    /// The 64-bit value carried in a record.
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// Index of the owning front.
    pub const fn front(self) -> usize {
        (self.0 >> 56) as usize
    }
    /// Generation of the slot.
    pub const fn generation(self) -> u32 {
        (self.0 >> 32) as u32 & Self::GENERATION_MASK
    }
    /// Slot in the front's connection table.
    pub const fn slot(self) -> u32 {
        self.0 as u32
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.front(), self.slot(), self.generation())
    }
}

macro_rules! close_reasons {
    ($($(#[$doc:meta])* $name:ident = $code:literal => $text:literal,)*) => {
        /// Why a connection closed; carried in CLOSE records and counted in the stats.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum CloseReason {
            $($(#[$doc])* $name = $code,)*
        }

        impl CloseReason {
            /// Every reason, in code order.
            pub const ALL: &'static [CloseReason] = &[$(CloseReason::$name,)*];

            /// From a code read from a record; unknown codes map to `Other`.
            pub fn from_code(code: u64) -> CloseReason {
                match code {
                    $($code => CloseReason::$name,)*
                    _ => CloseReason::Other,
                }
            }

            /// Stable snake_case name (stats, logs, JSON).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(CloseReason::$name => $text,)*
                }
            }
        }
    };
}

close_reasons! {
    /// Anything not listed (also unknown codes).
    Other = 0 => "other",
    /// The client closed its end.
    ClientEof = 1 => "client_eof",
    /// Nothing arrived within the idle timeout.
    IdleTimeout = 2 => "idle_timeout",
    /// No answer to the front's heartbeats within the heartbeat timeout.
    HeartbeatTimeout = 3 => "heartbeat_timeout",
    /// Malformed or oversized frame.
    ProtocolError = 4 => "protocol_error",
    /// A worker asked for the close.
    WorkerRequest = 5 => "worker_request",
    /// The client did not read its replies and its queue passed the bound.
    SlowConsumer = 6 => "slow_consumer",
    /// The worker pool serving the connection failed.
    WorkerGone = 7 => "worker_gone",
    /// The relay is shutting down.
    Shutdown = 8 => "shutdown",
    /// Refused by admission control.
    Rejected = 9 => "rejected",
    /// A socket error (reset by peer, ...).
    IoError = 10 => "io_error",
    /// The front process that owned the connection died.
    FrontGone = 11 => "front_gone",
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A malformed frame sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer than 4 bytes, or fewer than the length announces, remain.
    #[error("truncated frame at offset {offset}")]
    Truncated { offset: usize },
}

/// Iterates the frames of a buffer of whole wire frames, yielding `(end offset, payload)`.
/// Heartbeats (length 0) are skipped: workers never see them.
///
/// # Examples
///
/// ```
/// let buf = [0, 0, 0, 2, b'h', b'i', 0, 0, 0, 0, 0, 0, 0, 1, b'!'];
/// let frames: Vec<_> = shmrelay_worker::protocol::Frames::new(&buf).map(|f| f.unwrap().1).collect();
/// assert_eq!(frames, [&b"hi"[..], &b"!"[..]]);
/// ```
pub struct Frames<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Frames<'a> {
    /// Frames of `buf`.
    pub fn new(buf: &'a [u8]) -> Frames<'a> {
        Frames { buf, pos: 0 }
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<(usize, &'a [u8]), FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let rest = &self.buf[self.pos..];
            if rest.is_empty() {
                return None;
            }
            let Some(len) = frame_len(rest) else {
                let offset = self.pos;
                self.pos = self.buf.len();
                return Some(Err(FrameError::Truncated { offset }));
            };
            let end = FRAME_HEADER + len;
            if rest.len() < end {
                let offset = self.pos;
                self.pos = self.buf.len();
                return Some(Err(FrameError::Truncated { offset }));
            }
            self.pos += end;
            if len > 0 {
                return Some(Ok((self.pos, &rest[FRAME_HEADER..end])));
            }
        }
    }
}

/// The payload length announced by the prefix at the start of `buf`, if 4 bytes are there.
#[inline]
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let p: [u8; 4] = buf.get(..FRAME_HEADER)?.try_into().ok()?;
    Some(u32::from_be_bytes(p) as usize)
}

/// Checks that `buf` is a sequence of whole frames (what a front must verify of a worker's
/// reply before writing it to a client).
pub fn is_whole_frames(buf: &[u8]) -> bool {
    let mut pos = 0;
    while pos < buf.len() {
        match frame_len(&buf[pos..]) {
            Some(len) if buf.len() - pos - FRAME_HEADER >= len => pos += FRAME_HEADER + len,
            _ => return false,
        }
    }
    true
}

/// Environment variables through which the supervisor hands a process what it needs: a
/// worker its rings, a front its sockets, rings and control segment. Every name the relay
/// reads or sets is here. All fds are inherited (close-on-exec cleared for exactly these) and
/// taken with [`inherited_fd`].
pub mod env {
    /// Instance name (for logs).
    pub const INSTANCE: &str = "SHMRELAY_INSTANCE";
    /// This worker's index in its pool.
    pub const WORKER_INDEX: &str = "SHMRELAY_WORKER_INDEX";
    /// The process's own eventfd: a worker's is rung by fronts when they publish requests or
    /// release replies, a front's by workers.
    pub const DOORBELL_FD: &str = "SHMRELAY_DOORBELL_FD";
    /// One [`Channel`](super::Channel) per peer, comma separated:
    /// `PEER:REQUEST_FD:REPLY_FD:PEER_DOORBELL_FD` (a worker's peers are fronts, a front's are
    /// workers).
    pub const CHANNELS: &str = "SHMRELAY_CHANNELS";
    /// How many times this worker slot was started before (0 on the first start).
    pub const RESTARTS: &str = "SHMRELAY_RESTARTS";
    /// The codec of the worker's listener (`length-prefixed`, `line`, `resp`; see
    /// [`Codec`](crate::Codec)); unset means `length-prefixed`.
    pub const CODEC: &str = "SHMRELAY_CODEC";
    /// Workers in this worker's pool (its listener's `workers`): keyed workers check that a
    /// command's keys all belong to them ([`crate::slot`]).
    pub const POOL_SIZE: &str = "SHMRELAY_POOL_SIZE";
    /// The run's token (16 hex digits) in every process the supervisor starts: how a later
    /// supervisor of the instance finds the processes of a dead run.
    pub const RUN: &str = "SHMRELAY_RUN";
    /// Front: its listening sockets, one per listener in configuration order, comma separated.
    pub const LISTEN_FD: &str = "SHMRELAY_LISTEN_FD";
    /// Front: the control segment (stats memfd).
    pub const STATS_FD: &str = "SHMRELAY_STATS_FD";
    /// Front: the write end of its readiness pipe (one byte once it accepts).
    pub const READY_FD: &str = "SHMRELAY_READY_FD";
    /// Front: its end of the supervisor's control socket (new ring generations).
    pub const CONTROL_FD: &str = "SHMRELAY_CONTROL_FD";
    /// Front: the relay's settings, as TOML.
    pub const CONFIG: &str = "SHMRELAY_CONFIG";
    /// Every relay process and tool: the directory of the instance's named files (default
    /// `/dev/shm`).
    pub const SHM_DIR: &str = "SHMRELAY_SHM_DIR";
    // --- Cluster over NATS (issue 19): set for workers only when the relay's config has a
    // `[cluster]` section; read by `shmrelay-cluster`'s `cluster-worker`. ---
    /// Worker: the NATS server URLs, comma separated (`nats://host:4222,...`).
    pub const CLUSTER_URLS: &str = "SHMRELAY_CLUSTER_URLS";
    /// Worker: this node's name in the cluster (`[A-Za-z0-9_-]`, 1-64 bytes).
    pub const CLUSTER_NODE: &str = "SHMRELAY_CLUSTER_NODE";
    /// Worker: the first token(s) of every NATS subject the cluster uses (default `shmrelay`).
    pub const CLUSTER_PREFIX: &str = "SHMRELAY_CLUSTER_PREFIX";
    /// Worker: a NATS credentials file (JWT and nkey seed), if the cluster needs one.
    pub const CLUSTER_CREDS: &str = "SHMRELAY_CLUSTER_CREDS";
    /// Worker: NATS user name (with [`CLUSTER_PASSWORD`]), if the cluster needs one.
    pub const CLUSTER_USER: &str = "SHMRELAY_CLUSTER_USER";
    /// Worker: NATS password for [`CLUSTER_USER`].
    pub const CLUSTER_PASSWORD: &str = "SHMRELAY_CLUSTER_PASSWORD";
    /// Worker: NATS authentication token, if the cluster needs one.
    pub const CLUSTER_TOKEN: &str = "SHMRELAY_CLUSTER_TOKEN";
}

/// One channel between a front and a worker as the supervisor names it in [`env::CHANNELS`]:
/// the peer's index and the inherited fds of the request ring, the reply ring and the peer's
/// doorbell (eventfd). Written `PEER:REQUEST_FD:REPLY_FD:DOORBELL_FD`.
///
/// # Examples
///
/// ```
/// use shmrelay_worker::protocol::Channel;
/// let c: Channel = "1:7:8:9".parse().unwrap();
/// assert_eq!((c.peer, c.request_fd, c.reply_fd, c.doorbell_fd), (1, 7, 8, 9));
/// assert_eq!(c.to_string(), "1:7:8:9");
/// assert_eq!(Channel::parse_list("0:3:4:5,1:6:7:8").unwrap().len(), 2);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel {
    /// For a worker, the front's index; for a front, the worker's.
    pub peer: usize,
    /// The request ring (front -> worker).
    pub request_fd: RawFd,
    /// The reply ring (worker -> front).
    pub reply_fd: RawFd,
    /// The peer's doorbell eventfd.
    pub doorbell_fd: RawFd,
}

/// A malformed [`Channel`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Not four colon-separated fields.
    #[error("channel {entry:?}: {found} fields, want PEER:REQUEST_FD:REPLY_FD:DOORBELL_FD")]
    Fields { entry: String, found: usize },
    /// A field is not a non-negative number (the peer index) or not an fd number.
    #[error("channel {entry:?}: {field} {value:?} is not a valid number")]
    Number {
        entry: String,
        field: &'static str,
        value: String,
    },
}

impl Channel {
    /// The channels of a comma-separated list (empty entries are skipped).
    ///
    /// # Errors
    ///
    /// The first malformed entry's [`ChannelError`].
    pub fn parse_list(list: &str) -> Result<Vec<Channel>, ChannelError> {
        list.split(',')
            .filter(|e| !e.is_empty())
            .map(str::parse)
            .collect()
    }

    /// The comma-separated list [`parse_list`](Channel::parse_list) reads.
    pub fn join(channels: &[Channel]) -> String {
        let entries: Vec<String> = channels.iter().map(Channel::to_string).collect();
        entries.join(",")
    }

    /// The three fds: (request ring, reply ring, doorbell).
    pub fn fds(&self) -> [RawFd; 3] {
        [self.request_fd, self.reply_fd, self.doorbell_fd]
    }

    /// Takes ownership of the three inherited fds: (request ring, reply ring, doorbell).
    ///
    /// # Errors
    ///
    /// An fd that is not open (see [`inherited_fd`]).
    ///
    /// # Safety
    ///
    /// As [`inherited_fd`], for each of the three fds, and each is taken at most once.
    pub unsafe fn take_fds(&self) -> io::Result<(OwnedFd, OwnedFd, OwnedFd)> {
        // SAFETY: the caller's contract.
        unsafe {
            Ok((
                inherited_fd(self.request_fd)?,
                inherited_fd(self.reply_fd)?,
                inherited_fd(self.doorbell_fd)?,
            ))
        }
    }
}

impl std::str::FromStr for Channel {
    type Err = ChannelError;

    fn from_str(entry: &str) -> Result<Channel, ChannelError> {
        const FIELDS: [&str; 4] = ["peer", "request fd", "reply fd", "doorbell fd"];
        let parts: Vec<&str> = entry.split(':').collect();
        if parts.len() != FIELDS.len() {
            return Err(ChannelError::Fields {
                entry: entry.to_owned(),
                found: parts.len(),
            });
        }
        let mut n = [0u32; 4];
        for ((slot, field), value) in n.iter_mut().zip(FIELDS).zip(&parts) {
            // fds are non-negative `c_int`s: at most i32::MAX.
            *slot = value
                .parse::<u32>()
                .ok()
                .filter(|&v| v <= i32::MAX as u32)
                .ok_or_else(|| ChannelError::Number {
                    entry: entry.to_owned(),
                    field,
                    value: (*value).to_owned(),
                })?;
        }
        let [peer, request_fd, reply_fd, doorbell_fd] = n;
        Ok(Channel {
            peer: peer as usize,
            request_fd: request_fd as RawFd,
            reply_fd: reply_fd as RawFd,
            doorbell_fd: doorbell_fd as RawFd,
        })
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.peer, self.request_fd, self.reply_fd, self.doorbell_fd
        )
    }
}

/// Takes ownership of an fd inherited from the supervisor (named in the environment),
/// checking that it is open, and sets close-on-exec so that it does not leak into processes
/// this one starts.
///
/// # Errors
///
/// `NotFound` if `fd` is not open.
///
/// # Safety
///
/// `fd` must be owned by this process and by nothing else in it.
pub unsafe fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_SETFD on any number is harmless; EBADF tells us it is not open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("inherited fd {fd} is not open"),
        ));
    }
    // SAFETY: open (checked) and owned per the caller's contract.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(p: &[u8]) -> Vec<u8> {
        let mut v = (p.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(p);
        v
    }

    #[test]
    fn frames_skip_heartbeats_and_report_truncation() {
        let mut buf = frame(b"abc");
        buf.extend(frame(b""));
        buf.extend(frame(b"de"));
        let got: Vec<_> = Frames::new(&buf).collect();
        assert_eq!(got, vec![Ok((7, &b"abc"[..])), Ok((17, &b"de"[..]))]);
        assert!(is_whole_frames(&buf));
        assert!(!is_whole_frames(&buf[..buf.len() - 1]));
        let cut = &buf[..9];
        let got: Vec<_> = Frames::new(cut).collect();
        assert_eq!(
            got,
            vec![
                Ok((7, &b"abc"[..])),
                Err(FrameError::Truncated { offset: 7 })
            ]
        );
        // A huge announced length never reads out of bounds.
        assert_eq!(
            Frames::new(&[0xff; 4]).next(),
            Some(Err(FrameError::Truncated { offset: 0 }))
        );
    }

    #[test]
    fn close_reasons_round_trip() {
        for &r in CloseReason::ALL {
            assert_eq!(CloseReason::from_code(r as u64), r);
        }
        assert_eq!(CloseReason::from_code(999), CloseReason::Other);
    }

    #[test]
    fn channels_round_trip() {
        let c = Channel {
            peer: 3,
            request_fd: 10,
            reply_fd: 11,
            doorbell_fd: i32::MAX,
        };
        assert_eq!(c.to_string().parse(), Ok(c));
        let list = vec![c, Channel { peer: 0, ..c }];
        assert_eq!(Channel::parse_list(&Channel::join(&list)), Ok(list));
        assert_eq!(Channel::parse_list(""), Ok(vec![]));
        assert_eq!(
            Channel::parse_list("0:1:2:3,,"),
            Ok(vec!["0:1:2:3".parse().unwrap()])
        );
    }

    #[test]
    fn malformed_channels_say_what_is_wrong() {
        let fields = |entry: &str, found| {
            Err::<Channel, _>(ChannelError::Fields {
                entry: entry.to_owned(),
                found,
            })
        };
        assert_eq!("".parse::<Channel>(), fields("", 1));
        assert_eq!("1:2:3".parse::<Channel>(), fields("1:2:3", 3));
        assert_eq!("1:2:3:4:5".parse::<Channel>(), fields("1:2:3:4:5", 5));
        assert_eq!(
            "1:2:3:".parse::<Channel>(),
            Err(number("1:2:3:", "doorbell fd", ""))
        );
        assert_eq!(
            "x:2:3:4".parse::<Channel>(),
            Err(number("x:2:3:4", "peer", "x"))
        );
        assert_eq!(
            "1:-2:3:4".parse::<Channel>(),
            Err(number("1:-2:3:4", "request fd", "-2"))
        );
        assert_eq!(
            "1:2:2147483648:4".parse::<Channel>(),
            Err(number("1:2:2147483648:4", "reply fd", "2147483648"))
        );
        assert_eq!(
            "1:2: 3:4".parse::<Channel>(),
            Err(number("1:2: 3:4", "reply fd", " 3"))
        );
        // A list reports its first bad entry.
        assert_eq!(
            Channel::parse_list("0:1:2:3,0:1:2"),
            Err(ChannelError::Fields {
                entry: "0:1:2".to_owned(),
                found: 3
            })
        );
        let e = "1:2:x:4".parse::<Channel>().unwrap_err().to_string();
        assert_eq!(
            e,
            "channel \"1:2:x:4\": reply fd \"x\" is not a valid number"
        );
    }

    fn number(entry: &str, field: &'static str, value: &str) -> ChannelError {
        ChannelError::Number {
            entry: entry.to_owned(),
            field,
            value: value.to_owned(),
        }
    }

    #[test]
    fn inherited_fd_refuses_fds_that_are_not_open() {
        for fd in [-1, i32::MAX] {
            // SAFETY: neither number is an open fd of this process (-1 never is; the highest
            // fd number is far above anything the test harness opens), so nothing is taken.
            let e = unsafe { inherited_fd(fd) }.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound);
        }
    }

    proptest::proptest! {
        #[test]
        fn frames_round_trip(payloads in proptest::collection::vec(proptest::collection::vec(0u8.., 0..64), 0..20)) {
            let buf: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
            let got: Vec<Vec<u8>> = Frames::new(&buf).map(|f| f.unwrap().1.to_vec()).collect();
            let want: Vec<Vec<u8>> = payloads.into_iter().filter(|p| !p.is_empty()).collect();
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert!(is_whole_frames(&buf));
        }

        #[test]
        fn conn_ids_round_trip(front: u8, generation in 0u32..(1 << 24), slot: u32) {
            let c = ConnId::new(front, generation, slot);
            proptest::prop_assert_eq!((c.front(), c.generation(), c.slot()), (front as usize, generation, slot));
        }
    }
}
