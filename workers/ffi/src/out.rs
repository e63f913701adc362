//! `shmrelay_out`: replies, pushes and closes from inside a callback, over the SDK's `Out`.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;

use shmrelay_worker::{ConnId, MessageKind as SdkKind};

use crate::error::{guard, Error, Status};
use crate::Conn;

/// Where a reply goes, handed to every callback. Valid only until that callback returns:
/// never keep the pointer, and never use it from another thread.
pub struct Out {
    /// The SDK's writer, borrowed for one callback (its lifetime is erased: this handle never
    /// outlives the callback, see `Out::scope`).
    sdk: *mut shmrelay_worker::Out<'static>,
    /// The worker's reply limit, checked by `shmrelay_reserve` first (for its message).
    max_reply: usize,
    state: Cell<State>,
    /// `shmrelay_reserve`'s reservation in the reply ring. It borrows the SDK's writer (its
    /// lifetimes erased: it is dropped at the latest with this handle, inside `scope`), so
    /// while it is open every other use of `sdk` is refused (`State::Reserved`).
    reservation: RefCell<Option<shmrelay_worker::Reservation<'static, 'static>>>,
    /// In the `on_open` of a websocket client: its handshake fields, borrowed for the
    /// callback (`shmrelay_upgrade_info`).
    upgrade: Option<Upgrade>,
}

/// A websocket client's handshake fields (`shmrelay_upgrade_info`): UTF-8 strings as pointer
/// and length (not NUL-terminated; empty when absent), valid until the callback returns.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Upgrade {
    /// The request path, with its query.
    pub path: *const u8,
    pub path_len: usize,
    /// The subprotocol the relay selected.
    pub subprotocol: *const u8,
    pub subprotocol_len: usize,
    /// The `Authorization` header.
    pub authorization: *const u8,
    pub authorization_len: usize,
    /// The `Cookie` headers, joined with `; `.
    pub cookie: *const u8,
    pub cookie_len: usize,
}

impl Upgrade {
    /// Pointers into `u`, valid as long as it is.
    pub(crate) fn of(u: &shmrelay_worker::Upgrade<'_>) -> Upgrade {
        Upgrade {
            path: u.path.as_ptr(),
            path_len: u.path.len(),
            subprotocol: u.subprotocol.as_ptr(),
            subprotocol_len: u.subprotocol.len(),
            authorization: u.authorization.as_ptr(),
            authorization_len: u.authorization.len(),
            cookie: u.cookie.as_ptr(),
            cookie_len: u.cookie.len(),
        }
    }
}

/// Whether a message is text (UTF-8, checked by the relay) or binary: the values are the
/// WebSocket opcodes. Every message of the other codecs is binary.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    Text = 1,
    Binary = 2,
}

impl From<shmrelay_worker::MessageKind> for MessageKind {
    fn from(k: shmrelay_worker::MessageKind) -> MessageKind {
        match k {
            shmrelay_worker::MessageKind::Text => MessageKind::Text,
            shmrelay_worker::MessageKind::Binary => MessageKind::Binary,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    /// Inside `shmrelay_send_with`'s fill function: the ring space is reserved by the SDK.
    Filling,
    /// `shmrelay_reserve` handed out a reservation, not committed yet.
    Reserved,
}

/// The fill function of `shmrelay_send_with`: writes exactly `len` bytes to `buf`, which
/// points into the reply ring. `ctx` is the pointer given to `shmrelay_send_with`.
pub type Fill = Option<unsafe extern "C" fn(ctx: *mut c_void, buf: *mut u8, len: usize)>;

impl Out {
    /// Runs `f` with a handle over `sdk`. The handle lives on this stack frame only, so a
    /// pointer C kept after its callback returned is never one this function still reads
    /// (using it is the caller's undefined behaviour, as documented). A reservation left
    /// open is abandoned here, while `sdk` is still borrowed.
    pub(crate) fn scope<R>(
        sdk: &mut shmrelay_worker::Out<'_>,
        max_reply: usize,
        upgrade: Option<Upgrade>,
        f: impl FnOnce(*mut Out) -> R,
    ) -> R {
        let mut handle = Out {
            sdk: (sdk as *mut shmrelay_worker::Out<'_>).cast(),
            max_reply,
            state: Cell::new(State::Idle),
            upgrade,
            reservation: RefCell::new(None),
        };
        let r = f(&mut handle);
        drop(handle.reservation.get_mut().take());
        r
    }

    /// Runs `f` on the SDK's writer unless the handle is inside a fill function.
    fn with_sdk<R>(
        &self,
        function: &str,
        f: impl FnOnce(&mut shmrelay_worker::Out<'static>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        match self.state.get() {
            State::Idle => {}
            State::Filling => {
                return Err(Error::new(
                    Status::Busy,
                    format!("{function}: called from a send_with fill function"),
                ))
            }
            State::Reserved => {
                return Err(Error::new(
                    Status::Busy,
                    format!("{function}: a reservation is open (commit it first)"),
                ))
            }
        }
        // SAFETY: `sdk` came from a `&mut` that `scope` holds for the whole callback and does
        // not use while C runs; no other reference to it is live (the checks above refuse
        // the nested use from inside `send_with`, and use while a reservation holds it).
        f(unsafe { &mut *self.sdk })
    }
}

/// Turns the raw handle C passed into a reference.
///
/// # Safety
///
/// `out` is null or the handle given to the callback that is running.
unsafe fn handle<'a>(out: *const Out, function: &str) -> Result<&'a Out, Error> {
    // SAFETY: per the caller's contract, non-null means live for the callback.
    unsafe { out.as_ref() }.ok_or_else(|| Error::invalid(function, "out is null"))
}

/// Queues `len` bytes at `data` as one frame to `conn`: a reply, or a push to any live
/// connection of this relay. The bytes are copied into the reply ring before this returns;
/// the front frames them for the listener's codec (length prefix, newline, or nothing for
/// `resp`). Blocks while the reply ring is full (the front is draining it).
///
/// A failed reply to the frame being handled is not lost silently: after the callback
/// returns, the library answers that frame with the codec's error reply (or closes the
/// connection if part of a long reply had gone out).
///
/// # Safety
///
/// `out` is the handle of the running callback; `data` points to `len` readable bytes (it
/// may be null when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn shmrelay_send(
    out: *mut Out,
    conn: Conn,
    data: *const u8,
    len: usize,
) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let out = unsafe { handle(out, "shmrelay_send") }?;
        let payload = if len == 0 {
            &[][..]
        } else if data.is_null() {
            return Err(Error::invalid("shmrelay_send", "data is null"));
        } else {
            // SAFETY: the caller promises `len` readable bytes at `data`.
            unsafe { std::slice::from_raw_parts(data, len) }
        };
        out.with_sdk("shmrelay_send", |o| {
            Ok(o.send(ConnId::from_raw(conn), payload)?)
        })
    })
}

/// Queues one frame of exactly `len` bytes to `conn` that `fill(ctx, buf, len)` writes
/// straight into the reply ring: the zero-copy reply. `fill` runs before this returns, with
/// `buf` valid for writes of `len` bytes during that call only; it must write all of them
/// (bytes it leaves are sent as they are) and must not call any other function on `out`
/// (they return `SHMRELAY_STATUS_BUSY`). A reply larger than one ring record (about half the
/// ring) is built in a buffer first and then split over records.
///
/// # Safety
///
/// `out` is the handle of the running callback; `fill` is a valid function that does not
/// unwind (no C++ exception, no longjmp out of it).
#[no_mangle]
pub unsafe extern "C" fn shmrelay_send_with(
    out: *mut Out,
    conn: Conn,
    len: usize,
    fill: Fill,
    ctx: *mut c_void,
) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let out = unsafe { handle(out, "shmrelay_send_with") }?;
        let fill = fill.ok_or_else(|| Error::invalid("shmrelay_send_with", "fill is null"))?;
        out.with_sdk("shmrelay_send_with", |o| {
            let before = out.state.replace(State::Filling);
            let r = o.send_with(ConnId::from_raw(conn), len, |buf| {
                // SAFETY: `buf` is `buf.len()` writable bytes for the duration of the call;
                // `fill` is valid per this function's contract.
                unsafe { fill(ctx, buf.as_mut_ptr(), buf.len()) }
            });
            out.state.set(before);
            Ok(r?)
        })
    })
}

/// Reserves `cap` bytes of the reply ring for one frame to `conn` and puts their address in
/// `*buf`; send the first `len` of them with `shmrelay_commit(out, len)` once the length is
/// known (up to `cap`). For replies whose length is known only after they are written
/// (formatted text, for instance): zero-copy, the bytes are written where the front sends
/// them from. A `cap` larger than one ring record (about half the ring) is a buffer of the
/// library's instead, split over records at the commit (one copy).
///
/// The buffer stays valid until `shmrelay_commit` or the end of the callback, whichever comes
/// first; a reservation not committed by then is dropped (nothing is sent). One reservation
/// at a time, and nothing else in between: until the commit, every other function on `out`
/// (a second reserve, send, send_with, close) returns `SHMRELAY_STATUS_BUSY`.
///
/// # Safety
///
/// `out` is the handle of the running callback; `buf` points to writable storage for one
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_reserve(
    out: *mut Out,
    conn: Conn,
    cap: usize,
    buf: *mut *mut u8,
) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let out = unsafe { handle(out, "shmrelay_reserve") }?;
        if buf.is_null() {
            return Err(Error::invalid("shmrelay_reserve", "buf is null"));
        }
        match out.state.get() {
            State::Idle => {}
            State::Filling => {
                return Err(Error::new(
                    Status::Busy,
                    "shmrelay_reserve: called from a send_with fill function",
                ))
            }
            State::Reserved => {
                return Err(Error::new(
                    Status::Busy,
                    "shmrelay_reserve: the previous reservation is not committed",
                ))
            }
        }
        if cap > out.max_reply {
            return Err(Error::new(
                Status::TooLarge,
                format!(
                    "shmrelay_reserve: {cap} bytes exceed the reply limit of {}",
                    out.max_reply
                ),
            ));
        }
        // SAFETY: `sdk` came from a `&mut` that `scope` holds for the whole callback and does
        // not use while C runs; no other reference to it is live (state Idle: no fill
        // function runs and no reservation holds it). The reservation made from it is kept in
        // `out.reservation`, which `scope` empties before its borrow ends, and while it lives
        // `with_sdk` makes no other reference (state Reserved).
        let sdk: &'static mut shmrelay_worker::Out<'static> = unsafe { &mut *out.sdk };
        let mut r = sdk.reserve(ConnId::from_raw(conn), cap)?;
        // SAFETY: `buf` is non-null and writable per this function's contract.
        unsafe { *buf = r.as_mut_ptr() };
        *out.reservation.borrow_mut() = Some(r);
        out.state.set(State::Reserved);
        Ok(())
    })
}

/// Sends the first `len` bytes of the open reservation (see `shmrelay_reserve`) as one frame
/// to its connection, and ends the reservation (also when the send fails). A `len` larger
/// than the reservation is refused and leaves it open.
///
/// # Safety
///
/// `out` is the handle of the running callback.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_commit(out: *mut Out, len: usize) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let out = unsafe { handle(out, "shmrelay_commit") }?;
        let mut open = out.reservation.borrow_mut();
        let Some(cap) = open.as_ref().map(|r| r.len()) else {
            return Err(Error::new(
                Status::NoReservation,
                "shmrelay_commit: no open reservation",
            ));
        };
        if len > cap {
            return Err(Error::invalid(
                "shmrelay_commit",
                &format!("length {len} exceeds the {cap} bytes reserved"),
            ));
        }
        let r = open.take();
        drop(open);
        out.state.set(State::Idle);
        match r {
            Some(r) => Ok(r.commit(len)?),
            None => Ok(()),
        }
    })
}

/// Asks the front to close `conn` once everything queued to it before is written. Any live
/// connection can be closed, not only the one being answered.
///
/// # Safety
///
/// `out` is the handle of the running callback.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_close(out: *mut Out, conn: Conn) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let out = unsafe { handle(out, "shmrelay_close") }?;
        out.with_sdk("shmrelay_close", |o| Ok(o.close(ConnId::from_raw(conn))?))
    })
}

/// The kind of the message being handled (valid in `on_frame`; `SHMRELAY_MESSAGE_KIND_BINARY`
/// in other callbacks and for codecs other than `websocket`). `out` null: binary.
///
/// # Safety
///
/// `out` is null or the handle of the running callback.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_frame_kind(out: *const Out) -> MessageKind {
    // SAFETY: per this function's contract.
    let Ok(out) = (unsafe { handle(out, "shmrelay_frame_kind") }) else {
        return MessageKind::Binary;
    };
    out.with_sdk("shmrelay_frame_kind", |o| Ok(o.message_kind().into()))
        .unwrap_or(MessageKind::Binary)
}

/// `shmrelay_send` with the message's kind given: on a `websocket` listener a text message
/// (which must be UTF-8: the relay does not check) or a binary one; for the other codecs the
/// same as `shmrelay_send`. (`shmrelay_send` itself answers with the kind of the message
/// being handled, and sends binary otherwise.)
///
/// # Safety
///
/// As `shmrelay_send`.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_send_kind(
    out: *mut Out,
    conn: Conn,
    kind: MessageKind,
    data: *const u8,
    len: usize,
) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let out = unsafe { handle(out, "shmrelay_send_kind") }?;
        // SAFETY: per this function's contract.
        let payload = unsafe { bytes("shmrelay_send_kind", data, len) }?;
        let kind = match kind {
            MessageKind::Text => SdkKind::Text,
            MessageKind::Binary => SdkKind::Binary,
        };
        out.with_sdk("shmrelay_send_kind", |o| {
            Ok(o.send_kind(ConnId::from_raw(conn), kind, payload)?)
        })
    })
}

/// Closes a `websocket` connection with a close `code` (1000-1003, 1007-1011 or 3000-4999,
/// else `SHMRELAY_STATUS_INVALID_ARGUMENT`) and a UTF-8 `reason` of `reason_len` bytes (cut to
/// 123 on a character boundary; invalid UTF-8 is `SHMRELAY_STATUS_INVALID_ARGUMENT`), once
/// what was queued before is written. For the other codecs the same as `shmrelay_close`.
///
/// # Safety
///
/// `out` is the handle of the running callback; `reason` points to `reason_len` readable
/// bytes (it may be null when `reason_len` is 0).
#[no_mangle]
pub unsafe extern "C" fn shmrelay_close_with(
    out: *mut Out,
    conn: Conn,
    code: u16,
    reason: *const u8,
    reason_len: usize,
) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let out = unsafe { handle(out, "shmrelay_close_with") }?;
        // SAFETY: per this function's contract.
        let reason = unsafe { bytes("shmrelay_close_with", reason, reason_len) }?;
        let reason = std::str::from_utf8(reason)
            .map_err(|_| Error::invalid("shmrelay_close_with", "reason is not UTF-8"))?;
        out.with_sdk("shmrelay_close_with", |o| {
            Ok(o.close_with(ConnId::from_raw(conn), code, reason)?)
        })
    })
}

/// In `on_open` of a `websocket` client: fills `*info` with its handshake fields (the path,
/// the selected subprotocol, the `Authorization` and `Cookie` headers), valid until the
/// callback returns. `SHMRELAY_STATUS_INVALID_ARGUMENT` anywhere else (another codec,
/// another callback) or for a null pointer.
///
/// # Safety
///
/// `out` is null or the handle of the running callback; `info` is null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_upgrade_info(out: *const Out, info: *mut Upgrade) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let out = unsafe { handle(out, "shmrelay_upgrade_info") }?;
        let up = out.upgrade.ok_or_else(|| {
            Error::invalid(
                "shmrelay_upgrade_info",
                "not in on_open of a websocket client",
            )
        })?;
        // SAFETY: per this function's contract, non-null means valid for writes.
        let info = unsafe { info.as_mut() }
            .ok_or_else(|| Error::invalid("shmrelay_upgrade_info", "info is null"))?;
        *info = up;
        Ok(())
    })
}

/// `len` bytes at `data` (null allowed when `len` is 0).
///
/// # Safety
///
/// `data` points to `len` readable bytes that outlive the returned slice, or `len` is 0.
unsafe fn bytes<'a>(function: &str, data: *const u8, len: usize) -> Result<&'a [u8], Error> {
    if len == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(Error::invalid(function, "data is null"));
    }
    // SAFETY: per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}
