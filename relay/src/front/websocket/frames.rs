//! Client frames in place: the walk over a read's bytes that validates each frame, unmasks its
//! payload where it lies, reassembles fragments into one message and answers control frames,
//! leaving the DATA record layout the SDK reads (see `shmrelay_worker::codec::websocket`).
//!
//! A fragmented message is assembled at its own start: each continuation's payload is moved
//! back over the headers (and interleaved control frames) before it, so the message ends up as
//! one frame header and its payload, followed by padding. The bytes moved are counted as
//! copied; the first fragment's payload stays put unless the header must grow (126 or 65,536
//! bytes crossed), which moves what was assembled so far once by a few bytes.

use shmrelay_worker::codec::websocket::{
    self, close_code_valid, opcode, parse_header, MAX_CONTROL,
};
use shmrelay_worker::codec::ProtocolError;

/// A fragmented message being assembled, at the start of the buffer a walk resumes on: a
/// header of `head` bytes (written at the end), `acc` payload bytes, `dead` bytes already
/// handled (headers, control frames), then raw client bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(in crate::front) struct Frag {
    opcode: u8,
    head: usize,
    acc: usize,
    dead: usize,
    /// Text: the assembled payload's prefix that is known valid UTF-8.
    valid: usize,
}

/// What the front must do after a walk (besides committing its whole messages).
#[derive(Debug, Default)]
pub(in crate::front) struct Heard {
    /// A frame of any kind arrived (liveness).
    pub any: bool,
    /// Pings answered (`pong` holds the answers).
    pub pings: u64,
    /// A pong arrived (answers the front's ping).
    pub pong: bool,
    /// The client's close frame: the code to echo (None: an empty close payload). Nothing
    /// after it is read.
    pub close: Option<Option<u16>>,
}

/// The result of a walk: like the other codecs' (`read::Walk`), in raw numbers.
#[derive(Debug, Default, PartialEq, Eq)]
pub(in crate::front) struct Step {
    /// End of the whole messages (and control frames) to commit.
    pub pos: usize,
    /// Whole data messages before `pos`.
    pub messages: u64,
    /// Malformed input after `pos`.
    pub bad: Option<ProtocolError>,
    /// Bytes the unfinished message or frame at `pos` needs in all, when known.
    pub need: usize,
    /// Bytes moved to reassemble fragments.
    pub moved: u64,
}

/// Header bytes of a client (masked) frame of `len` payload bytes in the shortest form.
fn masked_head(len: usize) -> usize {
    match len {
        0..=125 => 6,
        126..=65_535 => 8,
        _ => 14,
    }
}

/// Walks `buf` (starting with the message in `frag`, if any) as far as it holds whole frames.
/// Pongs to send are appended to `pong`.
pub(in crate::front) fn walk(
    frag: &mut Option<Frag>,
    buf: &mut [u8],
    max_frame: usize,
    heard: &mut Heard,
    pong: &mut Vec<u8>,
) -> Step {
    let mut s = Step::default();
    // The start of the message in `frag` (0 when resuming; later when it starts in this walk).
    let mut start = 0;
    let mut at = frag.map_or(0, |f| f.head + f.acc + f.dead);
    let bad = |s: &mut Step, e: ProtocolError| s.bad = Some(e);
    while at < buf.len() {
        if heard.close.is_some() {
            break;
        }
        let Some(h) = parse_header(&buf[at..]) else {
            let from = if frag.is_some() { start } else { s.pos };
            s.need = buf.len() - from + 1;
            break;
        };
        if h.rsv != 0 {
            bad(
                &mut s,
                ProtocolError::Invalid("reserved bits set (no extension was negotiated)"),
            );
            break;
        }
        let data = matches!(
            h.opcode,
            opcode::CONTINUATION | opcode::TEXT | opcode::BINARY
        );
        let control = matches!(h.opcode, opcode::CLOSE | opcode::PING | opcode::PONG);
        if !data && !control {
            bad(&mut s, ProtocolError::Invalid("unknown opcode"));
            break;
        }
        let Some(key) = h.mask else {
            bad(&mut s, ProtocolError::Invalid("unmasked client frame"));
            break;
        };
        if control && !h.fin {
            bad(&mut s, ProtocolError::Invalid("fragmented control frame"));
            break;
        }
        if control && h.payload > MAX_CONTROL as u64 {
            bad(
                &mut s,
                ProtocolError::Invalid("control frame longer than 125 bytes"),
            );
            break;
        }
        if data {
            match (h.opcode == opcode::CONTINUATION, frag.is_some()) {
                (true, false) => {
                    bad(
                        &mut s,
                        ProtocolError::Invalid("continuation frame without a message"),
                    );
                    break;
                }
                (false, true) => {
                    bad(
                        &mut s,
                        ProtocolError::Invalid("new message inside a fragmented one"),
                    );
                    break;
                }
                _ => {}
            }
            let total = frag.map_or(0, |f| f.acc as u64).saturating_add(h.payload);
            if total > max_frame as u64 {
                bad(
                    &mut s,
                    ProtocolError::TooLarge {
                        len: total.min(usize::MAX as u64) as usize,
                        max: max_frame,
                    },
                );
                break;
            }
        }
        // Within max_frame (data) or 125 (control): fits usize.
        let len = h.payload as usize;
        let end = at + h.len + len;
        if end > buf.len() {
            let from = if frag.is_some() { start } else { s.pos };
            s.need = end - from;
            break;
        }
        let p = at + h.len;
        websocket::apply_mask(&mut buf[p..end], key, 0);
        heard.any = true;
        if control {
            match h.opcode {
                opcode::PING => {
                    heard.pings += 1;
                    let (hd, n) = websocket::server_header(opcode::PONG, len as u64);
                    pong.extend_from_slice(&hd[..n]);
                    pong.extend_from_slice(&buf[p..end]);
                }
                opcode::PONG => heard.pong = true,
                _ => match close_payload(&buf[p..end]) {
                    Ok(code) => heard.close = Some(code),
                    Err(e) => {
                        bad(&mut s, e);
                        break;
                    }
                },
            }
            at = end;
            match frag {
                // Handled: dead space inside the message being assembled.
                Some(f) => f.dead += end - (start + f.head + f.acc + f.dead),
                // Stays in the record; the SDK skips control frames.
                None => s.pos = end,
            }
            continue;
        }
        let text = if h.opcode == opcode::CONTINUATION {
            frag.is_some_and(|f| f.opcode == opcode::TEXT)
        } else {
            h.opcode == opcode::TEXT
        };
        match frag.as_mut() {
            None if h.fin => {
                if text && simdutf8::basic::from_utf8(&buf[p..end]).is_err() {
                    bad(&mut s, ProtocolError::InvalidText);
                    break;
                }
                s.messages += 1;
                at = end;
                s.pos = end;
            }
            None => {
                start = at;
                let mut f = Frag {
                    opcode: h.opcode,
                    head: h.len,
                    acc: len,
                    dead: 0,
                    valid: 0,
                };
                if text && !advance_utf8(&mut f, &buf[p..end], false) {
                    bad(&mut s, ProtocolError::InvalidText);
                    break;
                }
                *frag = Some(f);
                at = end;
            }
            Some(f) => {
                let want = masked_head(f.acc + len).max(f.head);
                if want > f.head {
                    // The header grows: what was assembled moves forward by a few bytes, into
                    // the space of this frame's header (always at least as large).
                    let from = start + f.head;
                    buf.copy_within(from..from + f.acc, start + want);
                    s.moved += f.acc as u64;
                    f.head = want;
                }
                let to = start + f.head + f.acc;
                if to != p {
                    buf.copy_within(p..end, to);
                    s.moved += len as u64;
                }
                f.acc += len;
                f.dead = end - (start + f.head + f.acc);
                let fin = h.fin;
                if text {
                    let msg = start + f.head;
                    if !advance_utf8(f, &buf[msg..msg + f.acc], fin) {
                        bad(&mut s, ProtocolError::InvalidText);
                        break;
                    }
                }
                at = end;
                if fin {
                    let f = *f;
                    write_message_head(&mut buf[start..start + f.head], f.opcode, f.acc);
                    write_padding(&mut buf[start + f.head + f.acc..end]);
                    *frag = None;
                    s.messages += 1;
                    s.pos = end;
                }
            }
        }
    }
    if frag.is_some() {
        // The unfinished message is carried whole, from its start.
        s.pos = start;
        if s.need == 0 && s.bad.is_none() {
            s.need = at - start + 2;
        }
    }
    s
}

/// Validates `msg[f.valid..]` (the assembled payload so far), leaving an incomplete code point
/// at the end for the next fragment unless this is the last.
fn advance_utf8(f: &mut Frag, msg: &[u8], last: bool) -> bool {
    match simdutf8::compat::from_utf8(&msg[f.valid..]) {
        Ok(_) => {
            f.valid = msg.len();
            true
        }
        Err(e) if e.error_len().is_none() && !last => {
            f.valid += e.valid_up_to();
            true
        }
        Err(_) => false,
    }
}

/// The code of a client's close payload (`None` if empty).
fn close_payload(p: &[u8]) -> Result<Option<u16>, ProtocolError> {
    match p {
        [] => Ok(None),
        [_] => Err(ProtocolError::Invalid("close frame with a 1-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !close_code_valid(code) {
                return Err(ProtocolError::Invalid("invalid close code"));
            }
            if simdutf8::basic::from_utf8(reason).is_err() {
                return Err(ProtocolError::InvalidText);
            }
            Ok(Some(code))
        }
    }
}

/// Writes the header of a reassembled message into exactly `head.len()` bytes (6, 8 or 14: a
/// masked header's sizes, the mask key zero and meaningless).
fn write_message_head(head: &mut [u8], op: u8, len: usize) {
    head.fill(0);
    head[0] = 0x80 | op;
    match head.len() {
        6 => head[1] = 0x80 | len as u8,
        8 => {
            head[1] = 0x80 | 126;
            head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            head[1] = 0x80 | 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Fills `gap` with one padding frame (the SDK skips it). A gap is never 1 byte: headers are
/// at least 6 bytes and a message's header takes at most what its fragments' headers freed.
fn write_padding(gap: &mut [u8]) {
    let n = gap.len();
    if n == 0 {
        return;
    }
    debug_assert!(n >= 2, "a 1-byte gap");
    gap[0] = 0x80 | opcode::PADDING;
    if n < 2 {
        return;
    }
    if n - 2 <= 125 {
        gap[1] = (n - 2) as u8;
    } else if n - 4 <= u16::MAX as usize {
        gap[1] = 126;
        gap[2..4].copy_from_slice(&((n - 4) as u16).to_be_bytes());
    } else {
        gap[1] = 127;
        gap[2..10].copy_from_slice(&((n - 10) as u64).to_be_bytes());
    }
}

/// The size of the unfinished frame or message at the start of `buf` (a connection's carry,
/// starting with `frag` if any), when the header says it: at least one byte more than `buf`.
pub(in crate::front) fn need(frag: &Option<Frag>, buf: &[u8]) -> usize {
    let at = frag.map_or(0, |f| f.head + f.acc + f.dead);
    match buf.get(at..).and_then(parse_header) {
        Some(h) => (at as u64 + h.frame_len())
            .min(usize::MAX as u64 / 2)
            .max(buf.len() as u64 + 1) as usize,
        None => buf.len() + 1,
    }
}

#[cfg(test)]
mod tests;
