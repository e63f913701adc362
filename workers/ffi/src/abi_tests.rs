//! The exported functions driven in-process against a fake front on memfd rings: every way to
//! reply, and the status of every misuse the ABI promises to refuse.

use std::ffi::{c_char, c_void, CStr};

use shmrelay_worker::protocol::tag;
use shmrelay_worker::testing::{self, FakeFront};
use shmrelay_worker::{Codec as SdkCodec, ConnId};

use crate::*;

const CAP: usize = 1 << 16;

/// The front's ends of the worker's rings.
struct Front(FakeFront);

impl Front {
    fn push(&mut self, tag: u16, conn: ConnId, aux: u64, payload: &[u8]) {
        self.0.push(tag, conn, aux, payload);
    }

    /// Every message the worker published: (tag, conn, payload).
    fn replies(&mut self) -> Vec<(u16, u64, Vec<u8>)> {
        self.0
            .replies()
            .into_iter()
            .map(|r| (r.tag, r.conn.raw(), r.body))
            .collect()
    }
}

fn start() -> (*mut Worker, Front) {
    let (sdk, front) = testing::attach(3, SdkCodec::LengthPrefixed, CAP);
    (Box::into_raw(Box::new(Worker::new(sdk))), Front(front))
}

/// What the callbacks saw and the statuses of the calls they made.
struct Log {
    worker: *mut Worker,
    events: Vec<String>,
    statuses: Vec<(&'static str, Status)>,
    /// An `out` to use in the fill function (the fill test calls back into it).
    out: *mut Out,
}

fn log<'a>(user: *mut c_void) -> &'a mut Log {
    // SAFETY: every test passes a live `Log` as `user`, used by one callback at a time.
    unsafe { &mut *user.cast::<Log>() }
}

unsafe extern "C" fn on_open(
    user: *mut c_void,
    conn: Conn,
    peer: *const c_char,
    peer_len: usize,
    _out: *mut Out,
) {
    // SAFETY: the library passes a NUL-terminated string of `peer_len` bytes.
    let peer = unsafe { CStr::from_ptr(peer) }.to_str().unwrap();
    assert_eq!(peer.len(), peer_len);
    log(user).events.push(format!("open {conn} {peer}"));
}

unsafe extern "C" fn on_close(user: *mut c_void, conn: Conn, reason: u32, _out: *mut Out) {
    // SAFETY: a static string.
    let name = unsafe { CStr::from_ptr(shmrelay_close_reason_name(reason)) };
    log(user)
        .events
        .push(format!("close {conn} {}", name.to_str().unwrap()));
}

unsafe extern "C" fn fill(ctx: *mut c_void, buf: *mut u8, len: usize) {
    let l = log(ctx);
    // SAFETY: `out` is the handle of the callback that called send_with.
    let nested = unsafe { shmrelay_send(l.out, 0, b"x".as_ptr(), 1) };
    l.statuses.push(("send inside fill", nested));
    // SAFETY: the library passes `len` writable bytes.
    unsafe { std::slice::from_raw_parts_mut(buf, len) }.copy_from_slice(b"fill");
}

unsafe extern "C" fn on_frame(
    user: *mut c_void,
    conn: Conn,
    frame: *const u8,
    len: usize,
    _redelivered: bool,
    out: *mut Out,
) {
    let l = log(user);
    // SAFETY: the library passes `len` readable bytes.
    let frame = unsafe { std::slice::from_raw_parts(frame, len) };
    l.events
        .push(format!("frame {}", String::from_utf8_lossy(frame)));
    // SAFETY: (every call below) `out` is this callback's handle; buffers are live locals.
    unsafe {
        match frame {
            b"send" => l
                .statuses
                .push(("send", shmrelay_send(out, conn, b"sent".as_ptr(), 4))),
            b"with" => {
                l.out = out;
                let s = shmrelay_send_with(out, conn, 4, Some(fill), user);
                l.statuses.push(("send_with", s));
            }
            b"reserve" => {
                let mut buf = std::ptr::null_mut();
                l.statuses
                    .push(("reserve", shmrelay_reserve(out, conn, 64, &mut buf)));
                let mut second = std::ptr::null_mut();
                l.statuses.push((
                    "second reserve",
                    shmrelay_reserve(out, conn, 8, &mut second),
                ));
                l.statuses
                    .push(("commit too long", shmrelay_commit(out, 65)));
                std::ptr::copy_nonoverlapping(b"reserved!".as_ptr(), buf, 9);
                l.statuses.push(("commit", shmrelay_commit(out, 9)));
                l.statuses.push(("commit again", shmrelay_commit(out, 1)));
            }
            b"dangling" => {
                let mut buf = std::ptr::null_mut();
                l.statuses.push((
                    "dangling reserve",
                    shmrelay_reserve(out, conn, 16, &mut buf),
                ));
            }
            b"nested" => {
                let cb = callbacks();
                let s = shmrelay_worker_poll_once(l.worker, &cb, user, std::ptr::null_mut());
                l.statuses.push(("nested poll_once", s));
                l.statuses
                    .push(("free inside", shmrelay_worker_free(l.worker)));
                l.statuses.push(("close", shmrelay_close(out, conn)));
            }
            _ => {}
        }
    }
}

fn callbacks() -> Callbacks {
    Callbacks {
        on_open: Some(on_open),
        on_frame: Some(on_frame),
        on_close: Some(on_close),
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    SdkCodec::LengthPrefixed.encode(payload)
}

#[test]
fn every_reply_path_and_every_refusal() {
    let (w, mut front) = start();
    let conn = ConnId::new(0, 1, 7);
    front.push(tag::OPEN, conn, 0, b"127.0.0.1:5000");
    let mut wire = Vec::new();
    for f in ["send", "with", "reserve", "dangling", "nested"] {
        wire.extend(frame(f.as_bytes()));
    }
    front.push(tag::DATA, conn, 0, &wire);
    front.push(tag::CLOSE, conn, 1, b"");
    let mut l = Log {
        worker: w,
        events: Vec::new(),
        statuses: Vec::new(),
        out: std::ptr::null_mut(),
    };
    let cb = callbacks();
    let mut handled = 0;
    // SAFETY: a live worker, callbacks and log.
    let s = unsafe { shmrelay_worker_poll_once(w, &cb, (&mut l as *mut Log).cast(), &mut handled) };
    assert_eq!(s, Status::Ok);
    assert_eq!(handled, 3);
    let c = conn.raw();
    assert_eq!(
        l.events,
        [
            format!("open {c} 127.0.0.1:5000"),
            "frame send".into(),
            "frame with".into(),
            "frame reserve".into(),
            "frame dangling".into(),
            "frame nested".into(),
            format!("close {c} client_eof"),
        ]
    );
    use Status::*;
    assert_eq!(
        l.statuses,
        [
            ("send", Ok),
            ("send inside fill", Busy),
            ("send_with", Ok),
            ("reserve", Ok),
            ("second reserve", Busy),
            ("commit too long", InvalidArgument),
            ("commit", Ok),
            ("commit again", NoReservation),
            ("dangling reserve", Ok),
            ("nested poll_once", Busy),
            ("free inside", Busy),
            ("close", Ok),
        ]
    );
    let replies = front.replies();
    let sends: Vec<_> = replies
        .iter()
        .map(|(t, conn, p)| (*t, *conn, String::from_utf8_lossy(p).into_owned()))
        .collect();
    assert_eq!(
        sends,
        [
            (tag::SEND, c, "sent".into()),
            (tag::SEND, c, "fill".into()),
            (tag::SEND, c, "reserved!".into()),
            // `nested` asked for the close; the other is the SDK's acknowledgement of CLOSE.
            (tag::CLOSE, c, String::new()),
            (tag::CLOSE, c, String::new()),
        ]
    );
    // SAFETY: a live worker, not used afterwards.
    assert_eq!(unsafe { shmrelay_worker_free(w) }, Ok);
}

#[test]
fn null_arguments_are_refused_with_a_message() {
    let last = || {
        // SAFETY: a NUL-terminated string owned by this thread.
        unsafe { CStr::from_ptr(shmrelay_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    // SAFETY: null handles are part of the contract.
    unsafe {
        assert_eq!(
            shmrelay_send(std::ptr::null_mut(), 0, std::ptr::null(), 0),
            Status::InvalidArgument
        );
        assert_eq!(last(), "shmrelay_send: out is null");
        assert_eq!(shmrelay_worker_fd(std::ptr::null()), -1);
        assert_eq!(shmrelay_worker_free(std::ptr::null_mut()), Status::Ok);
        let mut w = std::ptr::null_mut();
        // Not started by shmrelay: the environment is missing.
        assert_eq!(shmrelay_worker_from_env(&mut w), Status::Env);
        assert!(w.is_null());
        assert!(last().contains("SHMRELAY_"), "{}", last());
        // Once per process, whatever the first call gave.
        assert_eq!(shmrelay_worker_from_env(&mut w), Status::InvalidArgument);
        assert!(last().contains("called again"), "{}", last());
    }
    let (w, _front) = start();
    let no_frame = Callbacks {
        on_open: None,
        on_frame: None,
        on_close: None,
    };
    // SAFETY: a live worker; callbacks without on_frame are refused before any call.
    unsafe {
        assert_eq!(shmrelay_worker_index(w), 3);
        assert_eq!(shmrelay_worker_codec(w), Codec::LengthPrefixed);
        assert!(shmrelay_worker_fd(w) >= 0);
        let s = shmrelay_worker_poll_once(w, &no_frame, std::ptr::null_mut(), std::ptr::null_mut());
        assert_eq!(s, Status::InvalidArgument);
        assert_eq!(
            last(),
            "shmrelay_worker_poll_once: callbacks->on_frame is null"
        );
        assert_eq!(shmrelay_worker_free(w), Status::Ok);
    }
}

#[test]
fn a_reservation_over_the_reply_limit_is_refused_before_it_allocates() {
    let (w, mut front) = start();
    unsafe extern "C" fn big(
        user: *mut c_void,
        conn: Conn,
        _: *const u8,
        _: usize,
        _: bool,
        out: *mut Out,
    ) {
        let mut buf = std::ptr::null_mut();
        // SAFETY: this callback's handle.
        let s = unsafe { shmrelay_reserve(out, conn, usize::MAX, &mut buf) };
        log(user).statuses.push(("huge reserve", s));
    }
    let cb = Callbacks {
        on_open: None,
        on_frame: Some(big),
        on_close: None,
    };
    let conn = ConnId::new(0, 1, 1);
    front.push(tag::DATA, conn, 0, &frame(b"x"));
    let mut l = Log {
        worker: w,
        events: Vec::new(),
        statuses: Vec::new(),
        out: std::ptr::null_mut(),
    };
    // SAFETY: a live worker, callbacks and log.
    unsafe {
        assert_eq!(shmrelay_worker_set_max_reply(w, 1000), Status::Ok);
        let s =
            shmrelay_worker_poll_once(w, &cb, (&mut l as *mut Log).cast(), std::ptr::null_mut());
        assert_eq!(s, Status::Ok);
        assert_eq!(shmrelay_worker_free(w), Status::Ok);
    }
    assert_eq!(l.statuses, [("huge reserve", Status::TooLarge)]);
}
