//! Issue 12.2, SDK side: a replacement worker never skips a frame because of an answered
//! position (or dead-letter position) beyond what the front published; one within it still
//! skips what it covers.

use std::os::fd::{AsRawFd, IntoRawFd};
use std::sync::atomic::Ordering;

use shm_ring::{EventFd, Meta, Producer, ShmRing};
use shmrelay_worker::protocol::{env, tag, ANSWERED_WORD, DEAD_LETTER_WORDS};
use shmrelay_worker::{ConnId, Handler, Out, Worker};

#[derive(Default)]
struct Seen(Vec<Vec<u8>>);

impl Handler for Seen {
    fn on_frame(&mut self, _: ConnId, frame: &[u8], _: bool, _: &mut Out<'_>) {
        self.0.push(frame.to_vec());
    }
}

/// A restarted worker attached to fresh rings holding one DATA record with frames "a" and
/// "b", whose request ring's answered and dead-letter words are set by `words`; returns the
/// frames it is handed.
fn frames_seen(words: &[(usize, u64)]) -> Vec<Vec<u8>> {
    let req = ShmRing::create_memfd("answered-req", 1 << 16).unwrap();
    let rep = ShmRing::create_memfd("answered-rep", 1 << 16).unwrap();
    let mut tx = Producer::new(&req).unwrap();
    let conn = ConnId::new(0, 1, 1);
    tx.push(
        Meta::tag(tag::DATA).conn(conn.raw()),
        &[0, 0, 0, 1, b'a', 0, 0, 0, 1, b'b'],
    )
    .unwrap();
    tx.publish();
    for &(i, v) in words {
        req.user_words()[i].store(v, Ordering::Relaxed);
    }
    let fd = |r: &ShmRing| r.fd().try_clone_to_owned().unwrap().into_raw_fd();
    let (front_bell, bell) = (EventFd::new().unwrap(), EventFd::new().unwrap());
    // SAFETY: dup of an open eventfd; the new fd is handed to the worker, which owns it.
    let dup = |e: &EventFd| unsafe { libc::dup(e.as_raw_fd()) };
    // The environment the supervisor gives a replacement (set and read on this thread only).
    std::env::set_var(env::WORKER_INDEX, "0");
    std::env::set_var(env::DOORBELL_FD, dup(&bell).to_string());
    std::env::set_var(env::RESTARTS, "1");
    std::env::set_var(
        env::CHANNELS,
        format!("0:{}:{}:{}", fd(&req), fd(&rep), dup(&front_bell)),
    );
    let mut w = Worker::from_env().unwrap();
    let mut seen = Seen::default();
    w.poll_once(&mut seen).unwrap();
    drop(tx);
    seen.0
}

#[test]
fn answered_and_dead_letter_positions_beyond_the_tail_are_ignored() {
    let both = vec![b"a".to_vec(), b"b".to_vec()];
    // The record's payload starts after its 16-byte header: "a" ends at 21, "b" at 26.
    let a_end = shm_ring::layout::RECORD_HEADER_SIZE as u64 + 5;
    assert_eq!(frames_seen(&[]), both);
    assert_eq!(
        frames_seen(&[(ANSWERED_WORD, 1 << 62)]),
        both,
        "a lie about answered positions skipped frames"
    );
    assert_eq!(
        frames_seen(&[
            (DEAD_LETTER_WORDS[0], 1 << 62),
            (DEAD_LETTER_WORDS[1], u64::MAX)
        ]),
        both
    );
    assert_eq!(
        frames_seen(&[(ANSWERED_WORD, a_end)]),
        vec![b"b".to_vec()],
        "an answered position within the tail skips what it covers"
    );
    assert_eq!(
        frames_seen(&[(DEAD_LETTER_WORDS[1], a_end)]),
        vec![b"b".to_vec()],
        "a dead-lettered frame is skipped"
    );
}
