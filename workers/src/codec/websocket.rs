//! The WebSocket codec (RFC 6455) as the front and the SDK share it: frame headers, masking,
//! close codes, the message kinds, and the two records the front writes for a websocket
//! connection that no other codec has (the OPEN's handshake fields, the DATA record's layout).
//!
//! # What a DATA record of a websocket listener holds
//!
//! Wire frames as the client sent them, in order, with two changes the front makes in place:
//! every payload is already **unmasked** (the mask bit and key stay in the header and mean
//! nothing), and a fragmented message has been **reassembled** into one frame (FIN set, the
//! first fragment's opcode, the whole length) followed by padding the SDK skips. So every data
//! frame in a record is a whole message, and the SDK hands its payload to the worker in place.
//! Control frames (ping, pong, close: answered by the front) and padding (opcode
//! [`opcode::PADDING`]) are skipped. Nothing in a record is longer than the listener's
//! `max_frame`.
//!
//! # What a worker sends
//!
//! A SEND record holds a message body; its flag [`TEXT`](crate::protocol::flags::TEXT) says
//! text (opcode 1), otherwise binary (opcode 2). The front writes the unmasked frame header
//! from its own copy of the length and the payload straight from the ring. A CLOSE record's
//! `aux` is the close code (0: 1000) and its payload the reason (at most
//! [`MAX_CLOSE_REASON`] bytes of UTF-8, else replaced by none).

use std::fmt;

/// Whether a message is text (UTF-8, validated by the front) or binary.
///
/// ```
/// use shmrelay_worker::MessageKind;
/// assert_eq!(MessageKind::from_opcode(1), Some(MessageKind::Text));
/// assert_eq!(MessageKind::Binary.opcode(), 2);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Opcode 1: valid UTF-8 (an incoming one was validated by the front).
    Text,
    /// Opcode 2 (and every message of the other codecs).
    #[default]
    Binary,
}

impl MessageKind {
    /// The frame opcode.
    pub fn opcode(self) -> u8 {
        match self {
            MessageKind::Text => opcode::TEXT,
            MessageKind::Binary => opcode::BINARY,
        }
    }

    /// The kind of a data frame's opcode (`None` for continuation and control opcodes).
    pub fn from_opcode(op: u8) -> Option<MessageKind> {
        match op {
            opcode::TEXT => Some(MessageKind::Text),
            opcode::BINARY => Some(MessageKind::Binary),
            _ => None,
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MessageKind::Text => "text",
            MessageKind::Binary => "binary",
        })
    }
}

/// Frame opcodes.
pub mod opcode {
    /// A continuation fragment.
    pub const CONTINUATION: u8 = 0x0;
    /// A text message (or its first fragment).
    pub const TEXT: u8 = 0x1;
    /// A binary message (or its first fragment).
    pub const BINARY: u8 = 0x2;
    /// Close (control).
    pub const CLOSE: u8 = 0x8;
    /// Ping (control).
    pub const PING: u8 = 0x9;
    /// Pong (control).
    pub const PONG: u8 = 0xA;
    /// Padding inside a DATA record, written by the front after a reassembled message (a
    /// reserved control opcode: a client sending it is closed with 1002, so it never comes
    /// from the wire).
    pub const PADDING: u8 = 0xF;
}

/// Close status codes the relay sends.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown, timeouts).
    pub const GOING_AWAY: u16 = 1001;
    /// A protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// Text that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A policy violation (a client that does not read its replies).
    pub const POLICY: u16 = 1008;
    /// A message larger than `max_frame`.
    pub const TOO_BIG: u16 = 1009;
    /// The server failed (no worker to serve the connection).
    pub const INTERNAL: u16 = 1011;
}

/// Longest control frame payload.
pub const MAX_CONTROL: usize = 125;
/// Longest close reason (a close payload is the 2-byte code and the reason).
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL - 2;
/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask key.
pub const MAX_HEADER: usize = 14;
/// Longest header of a frame the server sends (no mask).
pub const MAX_SERVER_HEADER: usize = 10;

/// True for a close code an endpoint may send (RFC 6455 section 7.4: 1000-1003, 1007-1011,
/// 3000-4999; 1004-1006 and 1015 are reserved, the rest unassigned).
pub fn close_code_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1-3 (must be 0: no extension is negotiated).
    pub rsv: u8,
    pub opcode: u8,
    /// The mask key, if the mask bit is set.
    pub mask: Option<[u8; 4]>,
    /// Header bytes.
    pub len: usize,
    /// Payload bytes announced.
    pub payload: u64,
}

impl Header {
    /// Header and payload bytes (saturating: a length near `u64::MAX` is refused by the
    /// caller's limit anyway).
    pub fn frame_len(&self) -> u64 {
        self.payload.saturating_add(self.len as u64)
    }

    /// A control frame (opcode 8 to 15).
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Parses the frame header at the start of `buf`: `None` if more bytes are needed.
///
/// ```
/// use shmrelay_worker::codec::websocket::parse_header;
/// let h = parse_header(&[0x81, 0x85, 1, 2, 3, 4]).unwrap();
/// assert!(h.fin && h.opcode == 1 && h.mask == Some([1, 2, 3, 4]));
/// assert_eq!((h.len, h.payload), (6, 5));
/// assert!(parse_header(&[0x81, 0xfe, 0]).is_none());
/// ```
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (payload, mut at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64,
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (n as u64, 2),
    };
    let mask = if masked {
        let k: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(k)
    } else {
        None
    };
    Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0xf,
        mask,
        len: at,
        payload,
    })
}

/// Writes a frame header into `out` and returns its length: FIN as given, the shortest
/// length encoding, and the mask key if given (a client's frame).
///
/// ```
/// use shmrelay_worker::codec::websocket::{write_header, parse_header, MAX_HEADER};
/// let mut h = [0u8; MAX_HEADER];
/// let n = write_header(&mut h, true, 2, 70_000, Some([9, 9, 9, 9]));
/// assert_eq!(n, 14);
/// assert_eq!(parse_header(&h[..n]).unwrap().payload, 70_000);
/// ```
pub fn write_header(
    out: &mut [u8; MAX_HEADER],
    fin: bool,
    opcode: u8,
    len: u64,
    mask: Option<[u8; 4]>,
) -> usize {
    out[0] = (fin as u8) << 7 | (opcode & 0xf);
    let m = (mask.is_some() as u8) << 7;
    let mut at = if len <= 125 {
        out[1] = m | len as u8;
        2
    } else if len <= u16::MAX as u64 {
        out[1] = m | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = m | 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    };
    if let Some(k) = mask {
        out[at..at + 4].copy_from_slice(&k);
        at += 4;
    }
    at
}

/// The header of a frame the server sends (unmasked, FIN set), in the front's reply form.
pub fn server_header(kind_opcode: u8, len: u64) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    let n = write_header(&mut h, true, kind_opcode, len, None);
    (h, n)
}

/// XORs `buf` with the mask `key`, where `buf` starts `offset` bytes into the payload (so a
/// payload can be unmasked piece by piece). Masking and unmasking are the same operation.
///
/// ```
/// use shmrelay_worker::codec::websocket::apply_mask;
/// let mut b = *b"hello";
/// apply_mask(&mut b, [1, 2, 3, 4], 0);
/// apply_mask(&mut b[..2], [1, 2, 3, 4], 0);
/// apply_mask(&mut b[2..], [1, 2, 3, 4], 2);
/// assert_eq!(&b, b"hello");
/// ```
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = {
        let r = offset % 4;
        [key[r], key[(r + 1) % 4], key[(r + 2) % 4], key[(r + 3) % 4]]
    };
    // Eight bytes at a time (the compiler vectorises this loop); the key repeats every 4.
    let k8 = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ k8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// A frame as a client sends it: masked with `key`.
///
/// ```
/// use shmrelay_worker::codec::websocket::{client_frame, parse_header};
/// let f = client_frame(1, b"hi", [1, 2, 3, 4]);
/// assert_eq!(parse_header(&f).unwrap().payload, 2);
/// ```
pub fn client_frame(opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut h = [0u8; MAX_HEADER];
    let n = write_header(&mut h, true, opcode, payload.len() as u64, Some(key));
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&h[..n]);
    v.extend_from_slice(payload);
    apply_mask(&mut v[n..], key, 0);
    v
}

/// A close frame the server sends: `code` and `reason` (cut to [`MAX_CLOSE_REASON`] bytes on
/// a character boundary).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut v = vec![0x88, (2 + end) as u8];
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&reason.as_bytes()[..end]);
    v
}

/// What the worker learns about a websocket client at its OPEN: the handshake's request path,
/// the subprotocol the front selected, and the `Authorization` and `Cookie` headers (nothing
/// else of the request is kept). Empty strings when absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Upgrade<'a> {
    /// The request target of the `GET` (path and query), e.g. `/chat?room=1`.
    pub path: &'a str,
    /// The subprotocol selected (empty if none was).
    pub subprotocol: &'a str,
    /// The `Authorization` header's value.
    pub authorization: &'a str,
    /// The `Cookie` header's value (several `Cookie` headers joined with `; `).
    pub cookie: &'a str,
}

/// Field order in an OPEN payload after the peer address.
const OPEN_FIELDS: usize = 4;

impl<'a> Upgrade<'a> {
    /// The OPEN record's payload for a websocket connection: the peer address, a NUL byte,
    /// then each field (path, subprotocol, authorization, cookie) as a 4-byte little-endian
    /// length and its bytes.
    ///
    /// ```
    /// use shmrelay_worker::codec::websocket::Upgrade;
    /// let u = Upgrade { path: "/chat", subprotocol: "v1", authorization: "", cookie: "a=b" };
    /// let rec = u.encode_open("127.0.0.1:5000");
    /// assert_eq!(Upgrade::decode_open(&rec), ("127.0.0.1:5000".into(), Some(u)));
    /// assert_eq!(Upgrade::decode_open(b"10.0.0.1:1"), ("10.0.0.1:1".into(), None));
    /// ```
    pub fn encode_open(&self, peer: &str) -> Vec<u8> {
        let fields = [self.path, self.subprotocol, self.authorization, self.cookie];
        let mut v =
            Vec::with_capacity(peer.len() + 1 + fields.iter().map(|f| 4 + f.len()).sum::<usize>());
        v.extend_from_slice(peer.as_bytes());
        v.push(0);
        for f in fields {
            v.extend_from_slice(&(f.len() as u32).to_le_bytes());
            v.extend_from_slice(f.as_bytes());
        }
        v
    }

    /// Splits an OPEN payload into the peer address and, for a websocket connection, its
    /// fields (`None` for another codec's OPEN, or a malformed one).
    pub fn decode_open(payload: &'a [u8]) -> (std::borrow::Cow<'a, str>, Option<Upgrade<'a>>) {
        let Some(nul) = payload.iter().position(|&b| b == 0) else {
            return (String::from_utf8_lossy(payload), None);
        };
        let peer = String::from_utf8_lossy(&payload[..nul]);
        let mut rest = &payload[nul + 1..];
        let mut fields = [""; OPEN_FIELDS];
        for f in &mut fields {
            let Some(len) = rest
                .get(..4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
            else {
                return (peer, None);
            };
            let Some(bytes) = rest.get(4..4 + len as usize) else {
                return (peer, None);
            };
            let Ok(s) = std::str::from_utf8(bytes) else {
                return (peer, None);
            };
            *f = s;
            rest = &rest[4 + len as usize..];
        }
        let [path, subprotocol, authorization, cookie] = fields;
        (
            peer,
            Some(Upgrade {
                path,
                subprotocol,
                authorization,
                cookie,
            }),
        )
    }
}

/// Where the first frame of a DATA record of a websocket listener ends and what it is: the
/// codec's [`scan`](super::Codec::scan) on the record layout described in the module docs.
pub(super) fn scan_record(
    buf: &[u8],
    max_frame: usize,
) -> Result<super::Scan, super::ProtocolError> {
    use super::{FrameKind, ProtocolError, Scan};
    let Some(h) = parse_header(buf) else {
        return Ok(Scan::NeedMore {
            need: buf.len() + 1,
        });
    };
    let data = !h.is_control();
    if data && h.payload > max_frame as u64 {
        return Err(ProtocolError::TooLarge {
            len: h.payload.min(usize::MAX as u64) as usize,
            max: max_frame,
        });
    }
    if !data && h.opcode != opcode::PADDING && h.payload > MAX_CONTROL as u64 {
        return Err(ProtocolError::Invalid(
            "control frame longer than 125 bytes",
        ));
    }
    let len = h.frame_len();
    if len > buf.len() as u64 {
        return Ok(Scan::NeedMore {
            need: len.min(usize::MAX as u64) as usize,
        });
    }
    if data && (!h.fin || h.opcode == opcode::CONTINUATION) {
        return Err(ProtocolError::Invalid("a fragment in a record"));
    }
    let kind = if data {
        FrameKind::Data
    } else {
        FrameKind::Empty
    };
    Ok(Scan::Frame {
        len: len as usize,
        kind,
    })
}

/// The payload and kind of a whole data frame of a record (as found by [`scan_record`]).
pub(super) fn record_message(frame: &[u8]) -> (&[u8], MessageKind) {
    let h = parse_header(frame).expect("scanned");
    let kind = MessageKind::from_opcode(h.opcode).unwrap_or_default();
    (&frame[h.len..], kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_at_every_length_class() {
        for len in [0u64, 1, 125, 126, 65_535, 65_536, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut h = [0u8; MAX_HEADER];
                let n = write_header(&mut h, false, 2, len, mask);
                let p = parse_header(&h[..n]).unwrap();
                assert_eq!((p.payload, p.len, p.mask, p.fin), (len, n, mask, false));
                assert!(parse_header(&h[..n - 1]).is_none(), "cut at {len}");
            }
        }
    }

    #[test]
    fn close_codes() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1011, 3000, 4999] {
            assert!(close_code_valid(ok), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1012, 1015, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!close_code_valid(bad), "{bad}");
        }
        let f = close_frame(1000, &"é".repeat(100));
        assert!(f.len() <= 2 + MAX_CONTROL);
        assert!(
            std::str::from_utf8(&f[4..]).is_ok(),
            "cut on a char boundary"
        );
    }

    #[test]
    fn malformed_open_fields_are_refused_not_misread() {
        let u = Upgrade {
            path: "/",
            ..Default::default()
        };
        let rec = u.encode_open("p");
        for cut in 2..rec.len() {
            assert_eq!(Upgrade::decode_open(&rec[..cut]).1, None, "cut at {cut}");
        }
    }
}
