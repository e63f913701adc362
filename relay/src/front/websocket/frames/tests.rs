//! The walk against a model: any message sequence, fragmented any way, with pings between
//! fragments, read in chunks of any size, comes out as the same messages in DATA records.

use proptest::prelude::*;
use shmrelay_worker::codec::websocket::{apply_mask, opcode, write_header, MAX_HEADER};
use shmrelay_worker::{Codec, MessageKind};

use super::*;

fn frame(fin: bool, op: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut h = [0u8; MAX_HEADER];
    let n = write_header(&mut h, fin, op, payload.len() as u64, Some(key));
    let mut v = h[..n].to_vec();
    v.extend_from_slice(payload);
    apply_mask(&mut v[n..], key, 0);
    v
}

/// What the read path does with the walk: commits `[0, pos)` as a record, carries the rest.
#[derive(Default)]
struct Front {
    frag: Option<Frag>,
    carry: Vec<u8>,
    records: Vec<Vec<u8>>,
    pongs: Vec<u8>,
    heard: Heard,
    moved: u64,
}

impl Front {
    fn feed(&mut self, bytes: &[u8], max: usize) -> Option<ProtocolError> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(bytes);
        let s = walk(
            &mut self.frag,
            &mut buf,
            max,
            &mut self.heard,
            &mut self.pongs,
        );
        self.moved += s.moved;
        if s.messages > 0 {
            self.records.push(buf[..s.pos].to_vec());
        }
        if s.bad.is_none() && s.pos < buf.len() && self.heard.close.is_none() {
            let left = buf.len() - s.pos;
            assert!(s.need > left, "need {} of {left}", s.need);
            assert!(need(&self.frag, &buf[s.pos..]) > left);
        }
        self.carry = buf[s.pos..].to_vec();
        s.bad
    }

    /// The messages of every record, as the SDK reads them.
    fn messages(&self) -> Vec<(MessageKind, Vec<u8>)> {
        let mut out = Vec::new();
        for r in &self.records {
            let mut it = Codec::WebSocket.frames(r);
            while let Some(f) = it.next() {
                let (_, payload) = f.expect("a record the SDK can read");
                out.push((it.kind(), payload.to_vec()));
            }
        }
        out
    }
}

fn bad(wire: &[u8], max: usize) -> ProtocolError {
    let mut f = Front::default();
    f.feed(wire, max).expect("refused")
}

#[test]
fn every_bad_frame_is_refused_with_its_error() {
    let k = [1, 2, 3, 4];
    let invalid = |why| ProtocolError::Invalid(why);
    let mut rsv = frame(true, opcode::TEXT, b"a", k);
    rsv[0] |= 0x40;
    assert_eq!(
        bad(&rsv, 100),
        invalid("reserved bits set (no extension was negotiated)")
    );
    assert_eq!(bad(&frame(true, 3, b"", k), 100), invalid("unknown opcode"));
    assert_eq!(
        bad(&frame(true, 0xB, b"", k), 100),
        invalid("unknown opcode")
    );
    assert_eq!(
        bad(&frame(true, opcode::PADDING, b"", k), 100),
        invalid("unknown opcode")
    );
    assert_eq!(
        bad(&[0x81, 0x01, b'a'], 100),
        invalid("unmasked client frame")
    );
    assert_eq!(
        bad(&frame(true, opcode::PING, &[0; 126], k), 1000),
        invalid("control frame longer than 125 bytes")
    );
    assert_eq!(
        bad(&frame(false, opcode::PING, b"", k), 100),
        invalid("fragmented control frame")
    );
    assert_eq!(
        bad(&frame(true, opcode::CONTINUATION, b"a", k), 100),
        invalid("continuation frame without a message")
    );
    let mut two = frame(false, opcode::TEXT, b"a", k);
    two.extend(frame(true, opcode::TEXT, b"b", k));
    assert_eq!(
        bad(&two, 100),
        invalid("new message inside a fragmented one")
    );
    assert_eq!(
        bad(&frame(true, opcode::BINARY, &[0; 101], k), 100),
        ProtocolError::TooLarge { len: 101, max: 100 }
    );
    // Too large across fragments, before the last one arrives.
    let mut frags = frame(false, opcode::BINARY, &[0; 60], k);
    frags.extend(&frame(false, opcode::CONTINUATION, &[0; 60], k)[..8]);
    assert_eq!(
        bad(&frags, 100),
        ProtocolError::TooLarge { len: 120, max: 100 }
    );
    assert_eq!(
        bad(&frame(true, opcode::TEXT, b"\xff", k), 100),
        ProtocolError::InvalidText
    );
    // Invalid text fails at the fragment that has it, not at the end of the message.
    assert_eq!(
        bad(&frame(false, opcode::TEXT, b"ok\xc0\xaf", k), 100),
        ProtocolError::InvalidText
    );
    assert_eq!(
        bad(&frame(true, opcode::CLOSE, b"\x03", k), 100),
        invalid("close frame with a 1-byte payload")
    );
    assert_eq!(
        bad(&frame(true, opcode::CLOSE, &1005u16.to_be_bytes(), k), 100),
        invalid("invalid close code")
    );
    assert_eq!(
        bad(&frame(true, opcode::CLOSE, b"\x03\xe8\xff", k), 100),
        ProtocolError::InvalidText
    );
}

#[test]
fn a_code_point_split_between_fragments_is_valid() {
    let k = [9, 8, 7, 6];
    let mut wire = frame(false, opcode::TEXT, "é".as_bytes().split_at(1).0, k);
    wire.extend(frame(
        true,
        opcode::CONTINUATION,
        "é".as_bytes().split_at(1).1,
        k,
    ));
    let mut f = Front::default();
    assert_eq!(f.feed(&wire, 100), None);
    assert_eq!(f.messages(), [(MessageKind::Text, "é".as_bytes().to_vec())]);
    // Cut short at the end of the message: invalid.
    let mut wire = frame(false, opcode::TEXT, &"é".as_bytes()[..1], k);
    wire.extend(frame(true, opcode::CONTINUATION, b"", k));
    assert_eq!(bad(&wire, 100), ProtocolError::InvalidText);
}

#[test]
fn pings_are_answered_and_a_close_ends_the_walk() {
    let k = [5, 5, 5, 5];
    let mut wire = frame(true, opcode::PING, b"are you there", k);
    wire.extend(frame(true, opcode::TEXT, b"hi", k));
    wire.extend(frame(true, opcode::CLOSE, b"\x03\xe8bye", k));
    wire.extend(frame(true, opcode::TEXT, b"ignored", k));
    let mut f = Front::default();
    assert_eq!(f.feed(&wire, 100), None);
    assert_eq!(f.pongs, [&[0x8a, 13][..], b"are you there"].concat());
    assert_eq!(f.heard.close, Some(Some(1000)));
    assert_eq!(f.messages(), [(MessageKind::Text, b"hi".to_vec())]);
}

/// One message as the client sends it: fragments (with pings between) of a payload.
#[derive(Clone, Debug)]
struct Msg {
    text: bool,
    payload: Vec<u8>,
    cuts: Vec<usize>,
    pings: Vec<bool>,
}

fn msg() -> impl Strategy<Value = Msg> {
    (
        any::<bool>(),
        prop_oneof![0usize..10, 100usize..300, 65_400usize..65_700],
        prop::collection::vec(any::<usize>(), 0..4),
        prop::collection::vec(any::<bool>(), 4),
        any::<u8>(),
    )
        .prop_map(|(text, len, mut cuts, pings, fill)| {
            let payload = if text {
                // Two-byte characters, so fragments split code points.
                "é".repeat(len / 2).into_bytes()
            } else {
                (0..len).map(|i| (i as u8).wrapping_mul(fill)).collect()
            };
            let n = payload.len();
            cuts.iter_mut().for_each(|c| *c %= n + 1);
            cuts.sort_unstable();
            Msg {
                text,
                payload,
                cuts,
                pings,
            }
        })
}

fn wire(m: &Msg, key: [u8; 4]) -> Vec<u8> {
    let mut bounds = vec![0];
    bounds.extend(&m.cuts);
    bounds.push(m.payload.len());
    let pieces = bounds.len() - 1;
    let mut v = Vec::new();
    for i in 0..pieces {
        let op = match (i, m.text) {
            (0, true) => opcode::TEXT,
            (0, false) => opcode::BINARY,
            _ => opcode::CONTINUATION,
        };
        v.extend(frame(
            i + 1 == pieces,
            op,
            &m.payload[bounds[i]..bounds[i + 1]],
            key,
        ));
        if i + 1 < pieces && m.pings[i % 4] {
            v.extend(frame(true, opcode::PING, &[i as u8; 3], key));
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn messages_survive_any_fragmentation_and_any_reads(
        msgs in prop::collection::vec(msg(), 1..5),
        chunk in prop_oneof![1usize..20, 100usize..5000, Just(1 << 20)],
        key: [u8; 4],
    ) {
        let bytes: Vec<u8> = msgs.iter().flat_map(|m| wire(m, key)).collect();
        let mut f = Front::default();
        for c in bytes.chunks(chunk) {
            prop_assert_eq!(f.feed(c, 1 << 20), None);
        }
        prop_assert!(f.carry.is_empty() && f.frag.is_none());
        let want: Vec<_> = msgs
            .iter()
            .map(|m| (if m.text { MessageKind::Text } else { MessageKind::Binary }, m.payload.clone()))
            .collect();
        prop_assert_eq!(f.messages(), want);
        // Only reassembly moves bytes, and at most once plus one header growth per message.
        let unfragmented = msgs.iter().all(|m| m.cuts.is_empty());
        prop_assert!(!unfragmented || f.moved == 0);
        let total: usize = msgs.iter().map(|m| m.payload.len()).sum();
        prop_assert!(f.moved <= 3 * total as u64);
    }
}
