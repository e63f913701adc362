//! The wire codecs of `relaybench load` (`--codec`): the length-prefixed frames of the relay's
//! default listener, and the client side of WebSocket (RFC 6455) for `codec = "websocket"`
//! listeners and other WebSocket servers: the opening handshake, masked request frames of
//! one kind (`--ws-kind text|binary`), and the server's frames found in the read buffer (a
//! ping is answered with a pong, a close ends the connection). Frame headers and masking are
//! the worker SDK's (`shmrelay_worker::codec::websocket`, the relay's own): one WebSocket
//! framing in the workspace.

use std::io;

use serde::{Deserialize, Serialize};
use shmrelay_worker::codec::websocket::{
    apply_mask, client_frame, opcode, parse_header, write_header, MAX_HEADER,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::engine::mix;

/// What a `load` connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WireCodec {
    /// 4-byte big-endian length, then the payload (the relay's default codec).
    LengthPrefixed,
    /// WebSocket: an HTTP upgrade, then masked frames (one message per request).
    Websocket,
}

/// The kind of the WebSocket messages sent (and expected back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MessageKind {
    Binary,
    /// Text: payloads are ASCII, so that they are valid UTF-8 (which a server checks).
    Text,
}

impl MessageKind {
    fn opcode(self) -> u8 {
        match self {
            MessageKind::Text => opcode::TEXT,
            MessageKind::Binary => opcode::BINARY,
        }
    }
}

/// A codec with its settings: what the connections of one run speak.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Wire {
    pub codec: WireCodec,
    pub kind: MessageKind,
    /// Request path of the WebSocket handshake.
    pub path: String,
}

/// What starts at the beginning of a read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Not even a whole header yet.
    Need,
    /// A message (a reply) of `len` payload bytes after `hdr` header bytes.
    Data { hdr: usize, len: usize },
    /// A WebSocket ping: answer with a pong of its payload.
    Ping { hdr: usize, len: usize },
    /// A frame to skip (a pong).
    Skip { hdr: usize, len: usize },
    /// The server closes the connection (a WebSocket close frame).
    Close,
    /// A length above the maximum.
    TooLong(u64),
    /// A frame this client cannot follow (reason).
    Bad(&'static str),
}

impl Wire {
    /// True if payloads must be ASCII (text messages).
    pub fn text(&self) -> bool {
        self.codec == WireCodec::Websocket && self.kind == MessageKind::Text
    }

    /// Appends the header of a request of `len` payload bytes; returns the mask the payload
    /// must be XORed with ([`mask`]) once written, if any.
    pub fn header(&self, buf: &mut Vec<u8>, len: usize, mask_key: [u8; 4]) -> Option<[u8; 4]> {
        match self.codec {
            WireCodec::LengthPrefixed => {
                buf.extend_from_slice(&(len as u32).to_be_bytes());
                None
            }
            WireCodec::Websocket => {
                let mut h = [0u8; MAX_HEADER];
                let n = write_header(&mut h, true, self.kind.opcode(), len as u64, Some(mask_key));
                buf.extend_from_slice(&h[..n]);
                Some(mask_key)
            }
        }
    }

    /// Finds the frame at the start of `buf`.
    pub fn next(&self, buf: &[u8], max: u32) -> Next {
        match self.codec {
            WireCodec::LengthPrefixed => {
                let Some(b) = buf.get(..4) else {
                    return Next::Need;
                };
                let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                if len > max {
                    return Next::TooLong(len.into());
                }
                Next::Data {
                    hdr: 4,
                    len: len as usize,
                }
            }
            WireCodec::Websocket => self.next_ws(buf, max),
        }
    }

    fn next_ws(&self, buf: &[u8], max: u32) -> Next {
        let Some(h) = parse_header(buf) else {
            return Next::Need;
        };
        if h.mask.is_some() {
            return Next::Bad("a masked frame from the server");
        }
        if h.rsv != 0 {
            return Next::Bad("reserved bits set (no extension was negotiated)");
        }
        if h.payload > u64::from(max) {
            return Next::TooLong(h.payload);
        }
        let (hdr, len) = (h.len, h.payload as usize);
        match h.opcode {
            opcode::PING => Next::Ping { hdr, len },
            opcode::PONG => Next::Skip { hdr, len },
            opcode::CLOSE => Next::Close,
            op if !h.fin || op == opcode::CONTINUATION => Next::Bad("a fragmented reply"),
            op if op != self.kind.opcode() => {
                Next::Bad("a reply of another message kind than the request")
            }
            _ => Next::Data { hdr, len },
        }
    }
}

/// XORs a payload with the mask key, as a client must (RFC 6455 5.3).
pub fn mask(payload: &mut [u8], key: [u8; 4]) {
    apply_mask(payload, key, 0);
}

/// The mask key of request `seq` of connection `id` (a client picks a fresh one per frame).
pub fn mask_key(id: usize, seq: u64) -> [u8; 4] {
    let x = mix(((id as u64) << 40) ^ seq);
    [x as u8, (x >> 8) as u8, (x >> 16) as u8, (x >> 24) as u8]
}

/// Appends a masked pong answering a ping with `payload`.
pub fn pong(buf: &mut Vec<u8>, payload: &[u8], key: [u8; 4]) {
    buf.extend_from_slice(&client_frame(opcode::PONG, payload, key));
}

/// Maps stamp bytes to ASCII ('0'..='o') for text messages: still different for every
/// request of a connection (48 of its 64 bits are kept), and valid UTF-8.
pub fn ascii(stamp: [u8; 8]) -> [u8; 8] {
    stamp.map(|b| b'0' + (b & 0x3f))
}

/// Performs the opening handshake as a client (`GET path` with a key derived from `id`) and
/// checks the `101` answer. Reads byte by byte up to the end of the response head, so no
/// frame byte is taken from the stream (it happens once per connection, before the run).
pub async fn handshake(
    stream: &mut TcpStream,
    host: &str,
    path: &str,
    id: usize,
) -> io::Result<()> {
    let k = mix(id as u64 ^ 0x5753_4b45_5953_0000).to_le_bytes();
    let k2 = mix(id as u64 ^ 0x1234_5678).to_le_bytes();
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&k);
    key[8..].copy_from_slice(&k2);
    let key = base64(&key);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err(io::Error::other("handshake response head over 8 KiB"));
        }
        if stream.read(&mut byte).await? == 0 {
            return Err(io::Error::other("closed during the WebSocket handshake"));
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.lines().next().unwrap_or("");
    let upgraded = status.split_whitespace().nth(1) == Some("101")
        && text
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("sec-websocket-accept:"));
    if !upgraded {
        return Err(io::Error::other(format!(
            "WebSocket handshake refused: {status:?}"
        )));
    }
    Ok(())
}

/// Standard base64 with padding (the handshake key is 16 bytes: no crate needed for it).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(kind: MessageKind) -> Wire {
        Wire {
            codec: WireCodec::Websocket,
            kind,
            path: "/".into(),
        }
    }

    #[test]
    fn base64_of_the_rfc_sample_key() {
        assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
    }

    #[test]
    fn request_headers_have_the_three_length_forms_and_a_mask() {
        let w = ws(MessageKind::Binary);
        for (len, hdr) in [(0, 6), (125, 6), (126, 8), (65535, 8), (65536, 14)] {
            let mut buf = Vec::new();
            let key = w.header(&mut buf, len, [1, 2, 3, 4]);
            assert_eq!(key, Some([1, 2, 3, 4]));
            assert_eq!(buf.len(), hdr, "len {len}");
            assert_eq!(buf[0], 0x82);
            assert_eq!(buf[1] & 0x80, 0x80, "client frames are masked");
            assert_eq!(&buf[hdr - 4..], &[1, 2, 3, 4]);
        }
    }

    #[test]
    fn server_frames_are_found_and_checked() {
        let w = ws(MessageKind::Text);
        let mut h = [0u8; MAX_HEADER];
        let n = write_header(&mut h, true, opcode::TEXT, 300, None);
        let unmasked = h[..n].to_vec();
        assert_eq!(w.next(&unmasked, 1000), Next::Data { hdr: 4, len: 300 });
        assert_eq!(w.next(&unmasked[..3], 1000), Next::Need);
        assert_eq!(w.next(&unmasked, 100), Next::TooLong(300));
        assert_eq!(
            w.next(&[0x89, 2, b'h', b'i'], 100),
            Next::Ping { hdr: 2, len: 2 }
        );
        assert_eq!(w.next(&[0x8a, 0], 100), Next::Skip { hdr: 2, len: 0 });
        assert_eq!(w.next(&[0x88, 0], 100), Next::Close);
        assert!(matches!(w.next(&[0x82, 0], 100), Next::Bad(_)), "kind");
        assert!(matches!(w.next(&[0x01, 0], 100), Next::Bad(_)), "fragment");
        assert!(
            matches!(w.next(&[0x81, 0x80, 1, 2, 3, 4], 100), Next::Bad(_)),
            "masked"
        );
        assert!(matches!(w.next(&[0xc1, 0], 100), Next::Bad(_)), "rsv1");
    }

    #[test]
    fn masking_twice_restores_and_pongs_are_masked() {
        let mut p = b"hello world".to_vec();
        mask(&mut p, [9, 8, 7, 6]);
        assert_ne!(p, b"hello world");
        mask(&mut p, [9, 8, 7, 6]);
        assert_eq!(p, b"hello world");
        let mut buf = Vec::new();
        pong(&mut buf, b"hi", [1, 1, 1, 1]);
        assert_eq!(buf, [0x8a, 0x82, 1, 1, 1, 1, b'h' ^ 1, b'i' ^ 1]);
    }

    #[test]
    fn ascii_stamps_are_text() {
        let s = ascii([0xff, 0, 0x80, 0x3f, 1, 2, 3, 0xc0]);
        assert!(s.iter().all(|b| b.is_ascii_graphic()));
    }
}
