//! `shmrelay_out`: replies, pushes and closes from inside a callback, over the SDK's `Out`.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;

use shmrelay_worker::ConnId;

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
        f: impl FnOnce(*mut Out) -> R,
    ) -> R {
        let mut handle = Out {
            sdk: (sdk as *mut shmrelay_worker::Out<'_>).cast(),
            max_reply,
            state: Cell::new(State::Idle),
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
