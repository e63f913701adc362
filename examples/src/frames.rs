//! Finding whole frames of the length-prefixed wire protocol in received bytes, for the echo
//! servers (`tokio-echo`, `uring-echo`).

/// Outcome of scanning received bytes for complete frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Bytes `[0, complete)` are whole frames.
    pub complete: usize,
    /// A frame header at `complete` announced a length above the maximum.
    pub oversized: bool,
    /// Size (header included) of the partial frame at `complete`, when its header is known.
    pub pending_frame: Option<usize>,
}

/// Scans `buf` for the run of whole frames at its start: each is a 4-byte big-endian length
/// and that many payload bytes, a length above `max_frame` stops the scan (`oversized`).
///
/// # Examples
///
/// ```
/// use shmrelay_examples::frames::scan;
/// let mut wire = vec![0, 0, 0, 2, b'h', b'i'];
/// wire.extend([0, 0, 0, 5, b'h']);
/// let s = scan(&wire, 1024);
/// assert_eq!((s.complete, s.oversized, s.pending_frame), (6, false, Some(9)));
/// ```
pub fn scan(buf: &[u8], max_frame: u32) -> Scan {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        if rest.len() < 4 {
            return Scan {
                complete: pos,
                oversized: false,
                pending_frame: None,
            };
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if len > max_frame {
            return Scan {
                complete: pos,
                oversized: true,
                pending_frame: None,
            };
        }
        let frame = 4 + len as usize;
        if rest.len() < frame {
            return Scan {
                complete: pos,
                oversized: false,
                pending_frame: Some(frame),
            };
        }
        pos += frame;
    }
}

#[cfg(test)]
mod tests {
    use super::scan;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn scan_finds_whole_frames_and_the_partial_one() {
        let mut b = frame(b"abc");
        b.extend(frame(b""));
        let whole = b.len();
        b.extend(&frame(b"hello")[..6]);
        let s = scan(&b, 100);
        assert_eq!(s.complete, whole);
        assert!(!s.oversized);
        assert_eq!(s.pending_frame, Some(9));
    }

    #[test]
    fn scan_flags_oversized_frames() {
        let mut b = frame(b"ok");
        b.extend(frame(&[0u8; 11]));
        let s = scan(&b, 10);
        assert_eq!(s.complete, 6);
        assert!(s.oversized);
    }

    #[test]
    fn scan_of_a_short_header_is_empty() {
        let s = scan(&[0, 0], 10);
        assert_eq!(s.complete, 0);
        assert_eq!(s.pending_frame, None);
    }
}
