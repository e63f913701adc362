//! The websocket calls of the ABI, in-process against a fake front: the kind of a message,
//! replies of either kind, a close with a code, and the handshake fields in `on_open`.

use std::ffi::{c_char, c_void};

use shmrelay_worker::codec::websocket::{opcode, write_header, Upgrade as SdkUpgrade, MAX_HEADER};
use shmrelay_worker::protocol::{flags, tag};
use shmrelay_worker::testing;
use shmrelay_worker::{Codec as SdkCodec, ConnId};

use crate::*;

#[derive(Default)]
struct Seen {
    events: Vec<String>,
    statuses: Vec<Status>,
}

fn seen<'a>(user: *mut c_void) -> &'a mut Seen {
    // SAFETY: the test passes a live `Seen`, used by one callback at a time.
    unsafe { &mut *user.cast::<Seen>() }
}

fn text(p: *const u8, len: usize) -> String {
    // SAFETY: the library passes `len` readable bytes (or an empty string's pointer).
    String::from_utf8(unsafe { std::slice::from_raw_parts(p, len) }.to_vec()).unwrap()
}

unsafe extern "C" fn on_open(
    user: *mut c_void,
    _: Conn,
    _: *const c_char,
    _: usize,
    out: *mut Out,
) {
    let mut info = std::mem::MaybeUninit::<Upgrade>::uninit();
    // SAFETY: `out` is this callback's handle; `info` is writable.
    let s = unsafe { shmrelay_upgrade_info(out, info.as_mut_ptr()) };
    seen(user).statuses.push(s);
    // SAFETY: filled on success.
    let u = unsafe { info.assume_init() };
    seen(user).events.push(format!(
        "open {} {} {} {}",
        text(u.path, u.path_len),
        text(u.subprotocol, u.subprotocol_len),
        text(u.authorization, u.authorization_len),
        text(u.cookie, u.cookie_len)
    ));
}

unsafe extern "C" fn on_frame(
    user: *mut c_void,
    conn: Conn,
    frame: *const u8,
    len: usize,
    _: bool,
    out: *mut Out,
) {
    // SAFETY: (every call) `out` is this callback's handle, buffers are live.
    unsafe {
        let kind = shmrelay_frame_kind(out);
        seen(user)
            .events
            .push(format!("{kind:?} {}", text(frame, len)));
        let s = shmrelay_send_kind(out, conn, MessageKind::Binary, frame, len);
        seen(user).statuses.push(s);
        let s = shmrelay_close_with(out, conn, 1005, std::ptr::null(), 0);
        seen(user).statuses.push(s);
        let s = shmrelay_close_with(out, conn, 4000, b"bye".as_ptr(), 3);
        seen(user).statuses.push(s);
        // Only in on_open.
        let s = shmrelay_upgrade_info(out, std::ptr::null_mut());
        seen(user).statuses.push(s);
    }
}

#[test]
fn kinds_closes_and_handshake_fields() {
    let (sdk, mut front) = testing::attach(0, SdkCodec::WebSocket, 1 << 16);
    let w = Box::into_raw(Box::new(Worker::new(sdk)));
    let conn = ConnId::new(0, 1, 2);
    let up = SdkUpgrade {
        path: "/p",
        subprotocol: "v1",
        authorization: "a",
        cookie: "c=1",
    };
    front.push(tag::OPEN, conn, 0, &up.encode_open("127.0.0.1:1"));
    let mut h = [0u8; MAX_HEADER];
    let n = write_header(&mut h, true, opcode::TEXT, 2, Some([0; 4]));
    front.push(tag::DATA, conn, 0, &[&h[..n], b"hi"].concat());
    let cb = Callbacks {
        on_open: Some(on_open),
        on_frame: Some(on_frame),
        on_close: None,
    };
    let mut s = Seen::default();
    let mut handled = 0;
    // SAFETY: a live worker, valid callbacks, `s` outlives the call.
    let st =
        unsafe { shmrelay_worker_poll_once(w, &cb, (&mut s as *mut Seen).cast(), &mut handled) };
    assert_eq!((st, handled), (Status::Ok, 2));
    assert_eq!(s.events, ["open /p v1 a c=1", "Text hi"]);
    assert_eq!(
        s.statuses,
        [
            Status::Ok,
            Status::Ok,
            Status::InvalidArgument,
            Status::Ok,
            Status::InvalidArgument
        ]
    );
    let recs: Vec<_> = front
        .replies()
        .into_iter()
        .map(|r| (r.tag, r.flags & flags::TEXT, r.aux, r.body))
        .collect();
    assert_eq!(
        recs[..2],
        [
            (tag::SEND, 0, recs[0].2, b"hi".to_vec()),
            (tag::CLOSE, 0, 4000, b"bye".to_vec())
        ]
    );
    // SAFETY: the worker made above, freed once.
    assert_eq!(unsafe { shmrelay_worker_free(w) }, Status::Ok);
}
