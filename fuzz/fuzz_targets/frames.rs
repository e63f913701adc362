//! The frame codec on arbitrary bytes: `Frames` and `is_whole_frames` never panic, agree with
//! each other, and the frames yielded tile the buffer exactly.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shmrelay_worker::protocol::{frame_len, is_whole_frames, Frames, FRAME_HEADER};

fuzz_target!(|buf: &[u8]| {
    let whole = is_whole_frames(buf);
    let mut errors = 0;
    let mut prev_end = 0usize;
    let mut payload_bytes = 0usize;
    for item in Frames::new(buf) {
        match item {
            Ok((end, payload)) => {
                assert_eq!(errors, 0, "a frame after an error");
                assert!(!payload.is_empty(), "heartbeats are skipped");
                assert!(end > prev_end && end <= buf.len());
                // The payload is the slice just before `end`, right after its own header.
                let start = end - payload.len();
                assert_eq!(&buf[start..end], payload);
                assert_eq!(frame_len(&buf[start - FRAME_HEADER..]), Some(payload.len()));
                prev_end = end;
                payload_bytes += payload.len();
            }
            Err(_) => errors += 1,
        }
    }
    assert!(errors <= 1, "the iterator ends after an error");
    assert_eq!(
        whole,
        errors == 0,
        "is_whole_frames says {whole}, the iterator gave {errors} errors"
    );
    if whole {
        // Whole frames: the headers (heartbeats included) and payloads cover every byte.
        let mut pos = 0;
        let mut beats = 0;
        while pos < buf.len() {
            let len = frame_len(&buf[pos..]).expect("whole frames");
            beats += usize::from(len == 0);
            pos += FRAME_HEADER + len;
        }
        assert_eq!(pos, buf.len());
        let frames = Frames::new(buf).count();
        assert_eq!(payload_bytes + (frames + beats) * FRAME_HEADER, buf.len());
    }
});
