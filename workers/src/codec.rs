//! Wire codecs: where frames begin and end on a connection, shared by the relay's front (which
//! only finds frame boundaries, so that a read of whole frames becomes one DATA record) and the
//! worker SDK (which iterates the frames of a DATA record and encodes replies). No I/O here.
//!
//! | codec | request frame | what a worker gets | a reply `send(bytes)` writes | heartbeats |
//! |---|---|---|---|---|
//! | `length-prefixed` (default) | 4-byte big-endian length, payload | the payload | length prefix + bytes | length 0, answered by the front |
//! | `line` | bytes up to `\n` (a `\r` before it is dropped); empty lines are ignored | the line without its end | bytes + `\n` | none |
//! | `resp` | one Redis command: an array of bulk strings `*N\r\n$len\r\n...\r\n`, or an inline command line `PING\r\n`; empty lines are ignored | the raw command bytes ([`resp::args`] splits them) | bytes as they are (raw RESP) | none |
//! | `websocket` | after an HTTP/1.1 upgrade handshake, RFC 6455 frames (client frames masked; fragments reassembled by the front) | one whole message, unmasked, and its [`MessageKind`] | one unmasked frame (text or binary, see [`Out::send`](crate::Out::send)) | ping/pong, answered and sent by the front |
//!
//! Limits: a length-prefixed payload, a line (without its end) and a whole RESP command are at
//! most `max_frame` bytes; longer is a protocol error.

use std::fmt;

pub mod websocket;

pub use websocket::MessageKind;

use crate::protocol::{frame_len, is_whole_frames, FRAME_HEADER};

/// The codecs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Codec {
    /// 4-byte big-endian length prefix, then the payload (length 0: heartbeat).
    #[default]
    LengthPrefixed,
    /// Newline-delimited text (`\r\n` accepted).
    Line,
    /// The Redis serialization protocol (requests: arrays of bulk strings and inline commands).
    Resp,
    /// WebSocket (RFC 6455) after an HTTP/1.1 upgrade; see [`websocket`].
    WebSocket,
}

/// A codec name that is not one of `length-prefixed`, `line`, `resp`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown codec {0:?} (length-prefixed, line, resp, websocket)")]
pub struct UnknownCodec(pub String);

impl std::str::FromStr for Codec {
    type Err = UnknownCodec;
    fn from_str(s: &str) -> Result<Codec, UnknownCodec> {
        match s {
            "length-prefixed" => Ok(Codec::LengthPrefixed),
            "line" => Ok(Codec::Line),
            "resp" => Ok(Codec::Resp),
            "websocket" => Ok(Codec::WebSocket),
            other => Err(UnknownCodec(other.to_owned())),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Malformed input from a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame longer than the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    /// Anything else, with a message in the protocol's own words.
    #[error("{0}")]
    Invalid(&'static str),
    /// A websocket text message that is not UTF-8 (close code 1007).
    #[error("text message is not valid UTF-8")]
    InvalidText,
}

/// What the start of a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// A complete frame of `len` wire bytes.
    Frame { len: usize, kind: FrameKind },
    /// Not a complete frame yet: at least `need` bytes in all are needed (`need` > the
    /// buffer's length).
    NeedMore { need: usize },
}

/// What a complete frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Goes to the worker.
    Data,
    /// A length-0 frame of the length-prefixed codec: answered by the front.
    Heartbeat,
    /// Ignored (an empty line): neither delivered nor answered.
    Empty,
}

/// Longest `*N` / `$N` header line of a RESP request, `\r\n` included.
const RESP_HEADER_MAX: usize = 32;
/// Most arguments in one RESP command (Redis's own limit).
const RESP_MAX_ARGS: usize = 1024 * 1024;

impl Codec {
    /// Every codec.
    pub const ALL: [Codec; 4] = [
        Codec::LengthPrefixed,
        Codec::Line,
        Codec::Resp,
        Codec::WebSocket,
    ];

    /// The name used in settings and in `SHMRELAY_CODEC`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::LengthPrefixed => "length-prefixed",
            Codec::Line => "line",
            Codec::Resp => "resp",
            Codec::WebSocket => "websocket",
        }
    }

    /// True for the codecs with heartbeats (and so pings and heartbeat timeouts): length-0
    /// frames, websocket ping/pong.
    pub fn has_heartbeats(self) -> bool {
        matches!(self, Codec::LengthPrefixed | Codec::WebSocket)
    }

    /// What the front sends to ping an idle client.
    pub fn ping(self) -> &'static [u8] {
        match self {
            Codec::WebSocket => &[0x80 | websocket::opcode::PING, 0],
            _ => &[0; FRAME_HEADER],
        }
    }

    /// Finds the end of the first frame of `buf` (which must not be empty). For `websocket`
    /// this reads the layout of a DATA record (see [`websocket`]), not raw client bytes: the
    /// front's websocket reader does that.
    ///
    /// # Errors
    ///
    /// [`ProtocolError`] when `buf` cannot start a valid frame of at most `max_frame` bytes.
    pub fn scan(self, buf: &[u8], max_frame: usize) -> Result<Scan, ProtocolError> {
        match self {
            Codec::LengthPrefixed => match frame_len(buf) {
                None => Ok(Scan::NeedMore {
                    need: FRAME_HEADER.max(buf.len() + 1),
                }),
                Some(len) if len > max_frame => Err(ProtocolError::TooLarge {
                    len,
                    max: max_frame,
                }),
                Some(len) if buf.len() - FRAME_HEADER < len => Ok(Scan::NeedMore {
                    need: FRAME_HEADER + len,
                }),
                Some(0) => Ok(Scan::Frame {
                    len: FRAME_HEADER,
                    kind: FrameKind::Heartbeat,
                }),
                Some(len) => Ok(Scan::Frame {
                    len: FRAME_HEADER + len,
                    kind: FrameKind::Data,
                }),
            },
            Codec::Line => match find_nl(buf, max_frame + 2) {
                Some(nl) => {
                    let line = trim_cr(&buf[..nl]);
                    if line.len() > max_frame {
                        return Err(ProtocolError::TooLarge {
                            len: line.len(),
                            max: max_frame,
                        });
                    }
                    let kind = if line.is_empty() {
                        FrameKind::Empty
                    } else {
                        FrameKind::Data
                    };
                    Ok(Scan::Frame { len: nl + 1, kind })
                }
                // `max_frame` bytes and a `\r` may still end in a newline.
                None if buf.len() > max_frame + 1 => Err(ProtocolError::TooLarge {
                    len: buf.len(),
                    max: max_frame,
                }),
                None => Ok(Scan::NeedMore {
                    need: buf.len() + 1,
                }),
            },
            Codec::Resp => scan_resp(buf, max_frame),
            Codec::WebSocket => websocket::scan_record(buf, max_frame),
        }
    }

    /// Iterates the frames of a buffer of whole frames (a DATA record), yielding
    /// `(end offset, what the worker gets)`; heartbeats, empty lines and websocket control
    /// frames are skipped. [`messages`](CodecFrames::messages) adds each message's kind.
    pub fn frames(self, buf: &[u8]) -> CodecFrames<'_> {
        CodecFrames {
            codec: self,
            buf,
            pos: 0,
            kind: MessageKind::Binary,
        }
    }

    /// Bytes written before a reply payload (by the front, from its own copy of the length:
    /// the reply record holds the payload alone).
    pub fn reply_header(self, len: usize) -> ([u8; 4], usize) {
        match self {
            Codec::LengthPrefixed => ((len as u32).to_be_bytes(), FRAME_HEADER),
            // The websocket header depends on the message kind too: see
            // `websocket::server_header`.
            Codec::Line | Codec::Resp | Codec::WebSocket => ([0; 4], 0),
        }
    }

    /// Bytes written after a reply payload (by the front, as for [`reply_header`](Codec::reply_header)).
    pub fn reply_trailer(self) -> &'static [u8] {
        match self {
            Codec::Line => b"\n",
            Codec::LengthPrefixed | Codec::Resp | Codec::WebSocket => b"",
        }
    }

    /// Encodes one reply as the client receives it: header, payload, trailer (the front
    /// writes the header and trailer around what [`Out::send`](crate::Out::send) puts in the
    /// reply ring).
    pub fn encode(self, payload: &[u8]) -> Vec<u8> {
        if self == Codec::WebSocket {
            let (h, n) = websocket::server_header(websocket::opcode::BINARY, payload.len() as u64);
            return [&h[..n], payload].concat();
        }
        let (h, n) = self.reply_header(payload.len());
        let mut v = Vec::with_capacity(n + payload.len() + 1);
        v.extend_from_slice(&h[..n]);
        v.extend_from_slice(payload);
        v.extend_from_slice(self.reply_trailer());
        v
    }

    /// Checks that a reply record holds whole frames of this codec (what a front verifies
    /// before writing a worker's bytes to a client): length-prefixed frames; text ending in a
    /// newline; a sequence of complete RESP values.
    pub fn is_valid_reply(self, buf: &[u8]) -> bool {
        match self {
            Codec::LengthPrefixed => is_whole_frames(buf),
            Codec::Line => buf.last() == Some(&b'\n'),
            Codec::Resp => {
                let mut pos = 0;
                while pos < buf.len() {
                    match resp_value_len(&buf[pos..], 0) {
                        Some(n) => pos += n,
                        None => return false,
                    }
                }
                !buf.is_empty()
            }
            Codec::WebSocket => true,
        }
    }

    /// The bytes that tell a client about a protocol error before the close.
    pub fn protocol_error_reply(self, e: &ProtocolError) -> Vec<u8> {
        match self {
            Codec::LengthPrefixed => self.encode(format!("shmrelay-error: {e}").as_bytes()),
            Codec::Line => format!("ERR protocol error: {e}\n").into_bytes(),
            Codec::Resp => format!("-ERR Protocol error: {e}\r\n").into_bytes(),
            Codec::WebSocket => {
                let code = match e {
                    ProtocolError::TooLarge { .. } => websocket::close_code::TOO_BIG,
                    ProtocolError::InvalidText => websocket::close_code::INVALID_DATA,
                    ProtocolError::Invalid(_) => websocket::close_code::PROTOCOL,
                };
                websocket::close_frame(code, &e.to_string())
            }
        }
    }

    /// An error the relay itself reports (e.g. `worker unavailable`), in the codec's form.
    pub fn error_reply(self, msg: &str) -> Vec<u8> {
        if self == Codec::WebSocket {
            return websocket::close_frame(websocket::close_code::INTERNAL, msg);
        }
        self.encode(&self.error_body(msg))
    }

    /// The payload of [`error_reply`](Codec::error_reply): what a worker sends (the front adds
    /// the header or trailer). `msg` should hold no line breaks.
    pub fn error_body(self, msg: &str) -> Vec<u8> {
        match self {
            Codec::LengthPrefixed | Codec::WebSocket => {
                format!("shmrelay-error: {msg}").into_bytes()
            }
            Codec::Line => format!("ERR {msg}").into_bytes(),
            Codec::Resp => format!("-ERR {msg}\r\n").into_bytes(),
        }
    }
}

/// See [`Codec::frames`].
pub struct CodecFrames<'a> {
    codec: Codec,
    buf: &'a [u8],
    pos: usize,
    /// The kind of the message last yielded.
    kind: MessageKind,
}

impl CodecFrames<'_> {
    /// The kind of the message [`next`](Iterator::next) last yielded: as the client sent it
    /// for `websocket`, [`MessageKind::Binary`] for every other codec.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }
}

/// A DATA record that does not hold whole frames (the front never writes one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed or truncated frame at offset {offset}")]
pub struct BadRecord {
    /// Where in the record.
    pub offset: usize,
}

impl<'a> Iterator for CodecFrames<'a> {
    type Item = Result<(usize, &'a [u8]), BadRecord>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.codec == Codec::LengthPrefixed {
            return self.next_length_prefixed();
        }
        self.next_general()
    }
}

impl<'a> CodecFrames<'a> {
    /// [`next`](Iterator::next) for every codec, out of line so that `next` stays small
    /// enough to inline the `length-prefixed` path into the worker's loop.
    #[inline(never)]
    fn next_general(&mut self) -> Option<<Self as Iterator>::Item> {
        loop {
            let rest = &self.buf[self.pos..];
            if rest.is_empty() {
                return None;
            }
            let bad = BadRecord { offset: self.pos };
            let (len, kind) = match self.codec.scan(rest, usize::MAX / 4) {
                Ok(Scan::Frame { len, kind }) => (len, kind),
                _ => {
                    self.pos = self.buf.len();
                    return Some(Err(bad));
                }
            };
            self.pos += len;
            let frame = &rest[..len];
            let payload = match (kind, self.codec) {
                (FrameKind::Data, Codec::LengthPrefixed) => &frame[FRAME_HEADER..],
                (FrameKind::Data, Codec::Line) => trim_cr(&frame[..len - 1]),
                (FrameKind::Data, Codec::Resp) => frame,
                (FrameKind::Data, Codec::WebSocket) => {
                    let (payload, kind) = websocket::record_message(frame);
                    self.kind = kind;
                    payload
                }
                _ => continue,
            };
            return Some(Ok((self.pos, payload)));
        }
    }

    /// [`next`](Iterator::next) for `length-prefixed`, the common case, without the general
    /// [`Codec::scan`]: the same checks (a whole 4-byte header, then all of its payload, both
    /// inside the record), inlined into the worker's loop (issue 14: the general scan was 100
    /// of the echo worker's 330 instructions per request).
    #[inline(always)]
    fn next_length_prefixed(&mut self) -> Option<<Self as Iterator>::Item> {
        loop {
            let rest = self.buf.get(self.pos..).unwrap_or_default();
            if rest.is_empty() {
                return None;
            }
            let Some(len) = frame_len(rest).filter(|&len| rest.len() - FRAME_HEADER >= len) else {
                let offset = self.pos;
                self.pos = self.buf.len();
                return Some(Err(BadRecord { offset }));
            };
            self.pos += FRAME_HEADER + len;
            if len > 0 {
                // Heartbeats (length 0) never reach workers: the front answers them; skipped
                // like the general path does.
                return Some(Ok((self.pos, &rest[FRAME_HEADER..FRAME_HEADER + len])));
            }
        }
    }
}

fn find_nl(buf: &[u8], limit: usize) -> Option<usize> {
    buf[..buf.len().min(limit)].iter().position(|&b| b == b'\n')
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Parses a decimal integer (optional leading `-`), as in RESP headers.
fn parse_int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (d - b'0') as i64;
    }
    Some(if neg { -v } else { v })
}

/// A `\r\n`-terminated header line at the start of `buf` (after its type byte): its content,
/// and the length of the line. `Ok(None)`: not all there yet.
fn resp_line(buf: &[u8], limit: usize) -> Result<Option<(&[u8], usize)>, ()> {
    match find_nl(buf, limit) {
        Some(nl) if nl >= 2 && buf[nl - 1] == b'\r' => Ok(Some((&buf[1..nl - 1], nl + 1))),
        Some(_) => Err(()),
        None if buf.len() >= limit => Err(()),
        None => Ok(None),
    }
}

fn scan_resp(buf: &[u8], max_frame: usize) -> Result<Scan, ProtocolError> {
    let too_large = |len| ProtocolError::TooLarge {
        len,
        max: max_frame,
    };
    let more = |need: usize| Ok(Scan::NeedMore { need });
    if buf[0] != b'*' {
        // An inline command: one line.
        return match find_nl(buf, max_frame + 1) {
            Some(nl) => {
                let blank = buf[..nl].iter().all(|b| b.is_ascii_whitespace());
                let kind = if blank {
                    FrameKind::Empty
                } else {
                    FrameKind::Data
                };
                Ok(Scan::Frame { len: nl + 1, kind })
            }
            None if buf.len() > max_frame => Err(too_large(buf.len())),
            None => more(buf.len() + 1),
        };
    }
    let (count, mut pos) = match resp_line(buf, RESP_HEADER_MAX) {
        Err(()) => return Err(ProtocolError::Invalid("invalid multibulk length")),
        Ok(None) => return more(buf.len() + 1),
        Ok(Some((line, n))) => match parse_int(line) {
            Some(c) if c <= RESP_MAX_ARGS as i64 => (c, n),
            _ => return Err(ProtocolError::Invalid("invalid multibulk length")),
        },
    };
    if count <= 0 {
        // `*0\r\n` and `*-1\r\n`: an empty command, ignored (as Redis does).
        return Ok(Scan::Frame {
            len: pos,
            kind: FrameKind::Empty,
        });
    }
    for _ in 0..count {
        if pos > max_frame {
            return Err(too_large(pos));
        }
        let rest = &buf[pos..];
        if rest.is_empty() {
            return more(pos + 1);
        }
        if rest[0] != b'$' {
            return Err(ProtocolError::Invalid("expected '$'"));
        }
        let (len, n) = match resp_line(rest, RESP_HEADER_MAX) {
            Err(()) => return Err(ProtocolError::Invalid("invalid bulk length")),
            Ok(None) => return more(buf.len() + 1),
            Ok(Some((line, n))) => match parse_int(line) {
                Some(l) if l >= 0 => (l as usize, n),
                _ => return Err(ProtocolError::Invalid("invalid bulk length")),
            },
        };
        let end = pos + n + len + 2;
        if end > max_frame {
            return Err(too_large(end));
        }
        if buf.len() < end {
            return more(end);
        }
        if &buf[end - 2..end] != b"\r\n" {
            return Err(ProtocolError::Invalid("bulk string not terminated by CRLF"));
        }
        pos = end;
    }
    if pos > max_frame {
        return Err(too_large(pos));
    }
    Ok(Scan::Frame {
        len: pos,
        kind: FrameKind::Data,
    })
}

/// Length of the complete RESP2 value at the start of `buf` (a reply: `+ - : $ *`), or `None`
/// if it is incomplete or malformed.
fn resp_value_len(buf: &[u8], depth: usize) -> Option<usize> {
    if depth > 64 || buf.is_empty() {
        return None;
    }
    let limit = buf.len().min(64 * 1024 * 1024);
    let (line, n) = resp_line(&buf[..limit], limit).ok()??;
    match buf[0] {
        b'+' | b'-' => (!line.contains(&b'\r')).then_some(n),
        b':' => parse_int(line).map(|_| n),
        b'$' => match parse_int(line)? {
            -1 => Some(n),
            l if l >= 0 => {
                let end = n.checked_add(l as usize)?.checked_add(2)?;
                (buf.len() >= end && &buf[end - 2..end] == b"\r\n").then_some(end)
            }
            _ => None,
        },
        b'*' => match parse_int(line)? {
            -1 => Some(n),
            c if c >= 0 => {
                let mut pos = n;
                for _ in 0..c {
                    pos += resp_value_len(&buf[pos..], depth + 1)?;
                }
                Some(pos)
            }
            _ => None,
        },
        _ => None,
    }
}

/// RESP helpers for workers.
pub mod resp {
    use super::{parse_int, resp_line};

    /// The arguments of one RESP command frame (as the front delivers it): the bulk strings of
    /// an array, or the whitespace-separated words of an inline command. `None` if malformed.
    ///
    /// ```
    /// use shmrelay_worker::codec::resp::args;
    /// assert_eq!(args(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n").unwrap(), [&b"GET"[..], b"k"]);
    /// assert_eq!(args(b"PING hi\r\n").unwrap(), [&b"PING"[..], b"hi"]);
    /// ```
    pub fn args(frame: &[u8]) -> Option<Vec<&[u8]>> {
        let mut out = Vec::new();
        for_each_arg(frame, |a| {
            out.push(a);
            true
        })?;
        Some(out)
    }

    /// Calls `f` with the arguments of one command frame, as [`args`] splits them, without a
    /// heap allocation for up to 16 arguments (the common case: a worker's hot path). `None`
    /// if malformed.
    ///
    /// ```
    /// use shmrelay_worker::codec::resp::with_args;
    /// assert_eq!(with_args(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", |a| a.len()), Some(2));
    /// ```
    pub fn with_args<R>(frame: &[u8], f: impl FnOnce(&[&[u8]]) -> R) -> Option<R> {
        let mut small: [&[u8]; 16] = [&[]; 16];
        let mut n = 0;
        let fits = for_each_arg(frame, |a| {
            if n == small.len() {
                return false;
            }
            small[n] = a;
            n += 1;
            true
        });
        match fits {
            Some(true) => Some(f(&small[..n])),
            // More than fit on the stack: the rare long command pays for a vector.
            Some(false) => args(frame).map(|v| f(&v)),
            None => None,
        }
    }

    /// The key a command works on, for routing it to the worker that owns the key: its
    /// second argument, or `None` for commands that name no key (`PING`, `ECHO`, `COMMAND`,
    /// `CONFIG`, `INFO`, `CLIENT`, `SELECT`, `DBSIZE`, `FLUSHALL`, `FLUSHDB`, `QUIT`, `HELLO`,
    /// `AUTH`, and any command given without a second argument) or a malformed frame. A key
    /// with a non-empty `{tag}` routes by the tag alone, as in Redis Cluster, so that keys
    /// meant to live together can.
    ///
    /// ```
    /// use shmrelay_worker::codec::resp::routing_key;
    /// assert_eq!(routing_key(b"*2\r\n$3\r\nGET\r\n$3\r\nabc\r\n"), Some(&b"abc"[..]));
    /// assert_eq!(routing_key(b"SET {user1}.name x\r\n"), Some(&b"user1"[..]));
    /// assert_eq!(routing_key(b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$4\r\nsave\r\n"), None);
    /// ```
    pub fn routing_key(frame: &[u8]) -> Option<&[u8]> {
        let mut first: &[u8] = &[];
        let mut key = None;
        let mut i = 0;
        for_each_arg(frame, |a| {
            if i == 0 {
                first = a;
            } else {
                key = Some(a);
            }
            i += 1;
            i < 2
        })?;
        const KEYLESS: [&[u8]; 13] = [
            b"PING",
            b"ECHO",
            b"COMMAND",
            b"CONFIG",
            b"INFO",
            b"CLIENT",
            b"SELECT",
            b"DBSIZE",
            b"FLUSHALL",
            b"FLUSHDB",
            b"QUIT",
            b"HELLO",
            b"AUTH",
        ];
        if KEYLESS.iter().any(|k| k.eq_ignore_ascii_case(first)) {
            return None;
        }
        let key = key?;
        // `{tag}`: the part between the first `{` and the next `}`, when not empty.
        if let Some(open) = key.iter().position(|&b| b == b'{') {
            if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
                if len > 0 {
                    return Some(&key[open + 1..open + 1 + len]);
                }
            }
        }
        Some(key)
    }

    /// Feeds each argument to `push` until it returns false. `Some(true)`: all were fed;
    /// `Some(false)`: `push` stopped early; `None`: malformed.
    fn for_each_arg<'a>(frame: &'a [u8], mut push: impl FnMut(&'a [u8]) -> bool) -> Option<bool> {
        if frame.first() != Some(&b'*') {
            for w in frame
                .split(|b| b.is_ascii_whitespace())
                .filter(|w| !w.is_empty())
            {
                if !push(w) {
                    return Some(false);
                }
            }
            return Some(true);
        }
        let (line, mut pos) = resp_line(frame, frame.len()).ok()??;
        let count = parse_int(line)?;
        for _ in 0..count.max(0) {
            let rest = frame.get(pos..)?;
            if rest.first() != Some(&b'$') {
                return None;
            }
            let (line, n) = resp_line(rest, rest.len()).ok()??;
            let len = usize::try_from(parse_int(line)?).ok()?;
            let start = pos + n;
            if !push(frame.get(start..start.checked_add(len)?)?) {
                return Some(false);
            }
            pos = start + len + 2;
        }
        Some(true)
    }

    /// Appends a decimal number without allocating (replies are built per command).
    fn push_decimal(out: &mut Vec<u8>, v: i64) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            buf[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if v < 0 {
            out.push(b'-');
        }
        out.extend_from_slice(&buf[i..]);
    }

    /// Appends a bulk string reply.
    pub fn bulk(out: &mut Vec<u8>, s: &[u8]) {
        out.push(b'$');
        push_decimal(out, s.len() as i64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(s);
        out.extend_from_slice(b"\r\n");
    }

    /// Appends an integer reply.
    pub fn int(out: &mut Vec<u8>, v: i64) {
        out.push(b':');
        push_decimal(out, v);
        out.extend_from_slice(b"\r\n");
    }

    /// Appends an array header.
    pub fn array(out: &mut Vec<u8>, n: usize) {
        out.push(b'*');
        push_decimal(out, n as i64);
        out.extend_from_slice(b"\r\n");
    }

    /// Appends a nil bulk string.
    pub fn nil(out: &mut Vec<u8>) {
        out.extend_from_slice(b"$-1\r\n");
    }

    /// Appends a simple string (`+OK`).
    pub fn simple(out: &mut Vec<u8>, s: &str) {
        out.push(b'+');
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// Appends an error (`-ERR ...`; `msg` includes its prefix word).
    pub fn error(out: &mut Vec<u8>, msg: &str) {
        out.push(b'-');
        out.extend_from_slice(msg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Splits `stream` like a front would, reads of the given sizes, returning the frames (as
    /// the worker sees them) or the first error.
    fn front_split(
        codec: Codec,
        stream: &[u8],
        cuts: &[usize],
        max: usize,
    ) -> Result<Vec<Vec<u8>>, ProtocolError> {
        let mut out = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        for cut in cuts {
            buf.extend_from_slice(&stream[at..cut.max(at)]);
            at = at.max(cut);
            let mut pos = 0;
            while pos < buf.len() {
                match codec.scan(&buf[pos..], max)? {
                    Scan::Frame { len, .. } => pos += len,
                    Scan::NeedMore { need } => {
                        assert!(need > buf.len() - pos);
                        break;
                    }
                }
            }
            for f in codec.frames(&buf[..pos]) {
                out.push(f.expect("whole frames").1.to_vec());
            }
            buf.drain(..pos);
        }
        Ok(out)
    }

    fn resp_cmd(args: &[Vec<u8>]) -> Vec<u8> {
        let mut v = Vec::new();
        resp::array(&mut v, args.len());
        for a in args {
            resp::bulk(&mut v, a);
        }
        v
    }

    #[test]
    fn names_round_trip() {
        for c in Codec::ALL {
            assert_eq!(c.name().parse::<Codec>().unwrap(), c);
        }
        assert!("nope".parse::<Codec>().is_err());
    }

    #[test]
    fn line_frames() {
        let got: Vec<_> = Codec::Line
            .frames(b"a\r\n\nbc\n")
            .map(|f| f.unwrap())
            .collect();
        assert_eq!(got, vec![(3, &b"a"[..]), (7, &b"bc"[..])]);
        assert_eq!(
            Codec::Line.scan(b"abcdef", 4),
            Err(ProtocolError::TooLarge { len: 6, max: 4 })
        );
        assert_eq!(
            Codec::Line.scan(b"abcd\r\n", 4),
            Ok(Scan::Frame {
                len: 6,
                kind: FrameKind::Data
            })
        );
        assert!(Codec::Line.is_valid_reply(b"x\n"));
        assert!(!Codec::Line.is_valid_reply(b"x"));
    }

    #[test]
    fn resp_frames_and_errors() {
        let cmd = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n\r\n*0\r\n";
        let got: Vec<_> = Codec::Resp.frames(cmd).map(|f| f.unwrap().1).collect();
        assert_eq!(
            got,
            vec![&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"[..], b"PING\r\n"]
        );
        for (bad, msg) in [
            (&b"*x\r\n"[..], "invalid multibulk length"),
            (b"*1\r\n+3\r\n", "expected '$'"),
            (b"*1\r\n$-5\r\n", "invalid bulk length"),
            (b"*1\r\n$1\r\nab\r\n", "bulk string not terminated by CRLF"),
            (b"*1\n", "invalid multibulk length"),
        ] {
            assert_eq!(
                Codec::Resp.scan(bad, 1000),
                Err(ProtocolError::Invalid(msg)),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Codec::Resp.scan(b"*1\r\n$2000\r\n", 1000),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert_eq!(
            Codec::Resp.protocol_error_reply(&ProtocolError::Invalid("expected '$'")),
            b"-ERR Protocol error: expected '$'\r\n"
        );
        for ok in [
            &b"+OK\r\n"[..],
            b"-ERR x\r\n",
            b":12\r\n",
            b"$-1\r\n",
            b"$2\r\nab\r\n",
            b"*2\r\n$1\r\na\r\n:1\r\n*0\r\n",
        ] {
            assert!(Codec::Resp.is_valid_reply(ok), "{ok:?}");
        }
        for bad in [
            &b""[..],
            b"+OK",
            b"$2\r\nabc\r\n",
            b"*2\r\n:1\r\n",
            b"x\r\n",
        ] {
            assert!(!Codec::Resp.is_valid_reply(bad), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn length_prefixed_splits(payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..12),
                                  cuts in prop::collection::vec(any::<usize>(), 0..10)) {
            let c = Codec::LengthPrefixed;
            let stream: Vec<u8> = payloads.iter().flat_map(|p| c.encode(p)).collect();
            let want: Vec<Vec<u8>> = payloads.iter().filter(|p| !p.is_empty()).cloned().collect();
            prop_assert_eq!(front_split(c, &stream, &cuts, 1000).unwrap(), want);
            prop_assert!(c.is_valid_reply(&stream));
        }

        #[test]
        fn line_round_trip_and_splits(lines in prop::collection::vec("[^\r\n]{1,30}", 0..12),
                                      crlf: bool,
                                      cuts in prop::collection::vec(any::<usize>(), 0..10)) {
            let c = Codec::Line;
            let mut stream = Vec::new();
            for l in &lines {
                stream.extend_from_slice(l.as_bytes());
                stream.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
            }
            let want: Vec<Vec<u8>> = lines.iter().map(|l| l.as_bytes().to_vec()).collect();
            prop_assert_eq!(front_split(c, &stream, &cuts, 1000).unwrap(), want);
            for l in &lines {
                let enc = c.encode(l.as_bytes());
                prop_assert!(c.is_valid_reply(&enc));
                let got: Vec<_> = c.frames(&enc).map(|f| f.unwrap().1.to_vec()).collect();
                prop_assert_eq!(got, vec![l.as_bytes().to_vec()]);
            }
        }

        #[test]
        fn resp_round_trip_and_splits(cmds in prop::collection::vec(prop::collection::vec(prop::collection::vec(any::<u8>(), 0..20), 1..5), 0..8),
                                      cuts in prop::collection::vec(any::<usize>(), 0..10)) {
            let c = Codec::Resp;
            let encoded: Vec<Vec<u8>> = cmds.iter().map(|a| resp_cmd(a)).collect();
            let stream = encoded.concat();
            prop_assert_eq!(front_split(c, &stream, &cuts, 4096).unwrap(), encoded.clone());
            for (e, a) in encoded.iter().zip(&cmds) {
                let got: Vec<Vec<u8>> = resp::args(e).unwrap().into_iter().map(<[u8]>::to_vec).collect();
                prop_assert_eq!(&got, a);
                prop_assert!(c.is_valid_reply(e));
            }
        }

        #[test]
        fn garbage_never_panics(buf in prop::collection::vec(any::<u8>(), 1..200), max in 0usize..300) {
            for c in Codec::ALL {
                match c.scan(&buf, max) {
                    Ok(Scan::Frame { len, .. }) => prop_assert!(len <= buf.len()),
                    Ok(Scan::NeedMore { need }) => prop_assert!(need > buf.len()),
                    Err(_) => {}
                }
                let _ = c.frames(&buf).count();
                let _ = c.is_valid_reply(&buf);
                let _ = resp::args(&buf);
            }
            // The allocation-free split agrees with the plain one, on anything.
            let owned = |a: &[&[u8]]| a.iter().map(|x| x.to_vec()).collect::<Vec<_>>();
            prop_assert_eq!(resp::with_args(&buf, owned), resp::args(&buf).map(|a| owned(&a)));
        }

        #[test]
        fn length_prefixed_fast_path_matches_the_general_scan(
            frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 0..8),
            garbage in prop::collection::vec(any::<u8>(), 0..12)) {
            // Whole frames, then anything (a record the front never writes: must be found bad
            // at the same offset).
            let mut buf: Vec<u8> = frames.iter().flat_map(|p| Codec::LengthPrefixed.encode(p)).collect();
            buf.extend(&garbage);
            let mut want = Vec::new();
            let mut pos = 0;
            while pos < buf.len() {
                match Codec::LengthPrefixed.scan(&buf[pos..], usize::MAX / 4) {
                    Ok(Scan::Frame { len, kind }) => {
                        if kind == FrameKind::Data {
                            want.push(Ok((pos + len, buf[pos + FRAME_HEADER..pos + len].to_vec())));
                        }
                        pos += len;
                    }
                    _ => {
                        want.push(Err(BadRecord { offset: pos }));
                        break;
                    }
                }
            }
            let got: Vec<_> = Codec::LengthPrefixed
                .frames(&buf)
                .map(|f| f.map(|(end, p)| (end, p.to_vec())))
                .collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn with_args_matches_args_past_the_stack_array(args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..6), 0..40),
                                                       inline in any::<bool>()) {
            let frame = if inline {
                let words: Vec<Vec<u8>> = args.iter().map(|a| a.iter().map(|b| b'a' + b % 26).collect()).collect();
                let mut f = words.join(&b' ');
                f.extend_from_slice(b"\r\n");
                f
            } else {
                resp_cmd(&args)
            };
            let owned = |a: &[&[u8]]| a.iter().map(|x| x.to_vec()).collect::<Vec<_>>();
            prop_assert_eq!(resp::with_args(&frame, owned), resp::args(&frame).map(|a| owned(&a)));
        }

        #[test]
        fn reply_numbers_are_decimal(v in any::<i64>()) {
            let mut out = Vec::new();
            resp::int(&mut out, v);
            prop_assert_eq!(out, format!(":{v}\r\n").into_bytes());
        }

        #[test]
        fn resp_like_garbage_never_panics(parts in prop::collection::vec(prop_oneof![
            Just(b"*".to_vec()), Just(b"$".to_vec()), Just(b"\r\n".to_vec()), Just(b"-1".to_vec()),
            Just(b"3".to_vec()), Just(b"abc".to_vec()), Just(b"\n".to_vec()), Just(b"+".to_vec()), Just(b":".to_vec())], 1..30)) {
            let buf = parts.concat();
            for c in Codec::ALL {
                let _ = c.scan(&buf, 100);
                let _ = c.frames(&buf).count();
                let _ = c.is_valid_reply(&buf);
            }
            let _ = resp::args(&buf);
        }
    }
}
