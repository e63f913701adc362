//! `shmrelay_out`: replies, pushes and closes from inside a callback, over the SDK's `Out`.

use std::cell::Cell;
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
    /// The worker's staging buffer for `shmrelay_reserve`, borrowed for the same callback.
    stage: *mut Vec<u8>,
    /// The worker's reply limit, checked by `shmrelay_reserve` before it allocates.
    max_reply: usize,
    state: Cell<State>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    /// Inside `shmrelay_send_with`'s fill function: the ring space is reserved by the SDK.
    Filling,
    /// `shmrelay_reserve` handed out `cap` bytes of the staging buffer for `conn`.
    Reserved {
        conn: ConnId,
        cap: usize,
    },
}

/// The fill function of `shmrelay_send_with`: writes exactly `len` bytes to `buf`, which
/// points into the reply ring. `ctx` is the pointer given to `shmrelay_send_with`.
pub type Fill = Option<unsafe extern "C" fn(ctx: *mut c_void, buf: *mut u8, len: usize)>;

impl Out {
    /// Runs `f` with a handle over `sdk` and `stage`. The handle lives on this stack frame
    /// only, so a pointer C kept after its callback returned is never one this function
    /// still reads (using it is the caller's undefined behaviour, as documented).
    pub(crate) fn scope<R>(
        sdk: &mut shmrelay_worker::Out<'_>,
        stage: &mut Vec<u8>,
        max_reply: usize,
        f: impl FnOnce(*mut Out) -> R,
    ) -> R {
        let mut handle = Out {
            sdk: (sdk as *mut shmrelay_worker::Out<'_>).cast(),
            stage,
            max_reply,
            state: Cell::new(State::Idle),
        };
        f(&mut handle)
    }

    /// Runs `f` on the SDK's writer unless the handle is inside a fill function.
    fn with_sdk<R>(
        &self,
        function: &str,
        f: impl FnOnce(&mut shmrelay_worker::Out<'static>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        if self.state.get() == State::Filling {
            return Err(Error::new(
                Status::Busy,
                format!("{function}: called from a send_with fill function"),
            ));
        }
        // SAFETY: `sdk` came from a `&mut` that `scope` holds for the whole callback and does
        // not use while C runs; no other reference to it is live (the Filling check above
        // refuses the one nested use, from inside `send_with`).
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

/// Hands out a writable buffer of `cap` bytes in `*buf` for one frame to `conn`; send it
/// with `shmrelay_commit(out, len)` once its length is known (up to `cap`). For replies
/// whose length is known only after they are written (formatted text, for instance); a
/// reply whose length is known up front goes straight into the ring with
/// `shmrelay_send_with`.
///
/// The buffer is the worker's own and reused: `commit` copies the bytes into the reply ring
/// (one copy; the Rust SDK does not expose a ring reservation yet). It stays valid until
/// `shmrelay_commit` or the end of the callback, whichever comes first; a reservation not
/// committed by then is dropped. One reservation at a time (a second one returns
/// `SHMRELAY_STATUS_BUSY`); other sends may come in between, and the frame takes its place
/// among the replies when it is committed, not when it was reserved.
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
            State::Reserved { .. } => {
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
        // SAFETY: `stage` is the worker's staging buffer, borrowed by `Out::scope` for this
        // callback; no other reference to it is live while C runs.
        let stage = unsafe { &mut *out.stage };
        if stage.len() < cap {
            // Grows to the largest reservation seen; later ones reuse it as it is. A failed
            // allocation is an error here, not the abort `resize` would make of it.
            stage.try_reserve(cap - stage.len()).map_err(|_| {
                Error::new(
                    Status::TooLarge,
                    format!("shmrelay_reserve: cannot allocate {cap} bytes"),
                )
            })?;
            stage.resize(cap, 0);
        }
        out.state.set(State::Reserved {
            conn: ConnId::from_raw(conn),
            cap,
        });
        // SAFETY: `buf` is non-null and writable per this function's contract.
        unsafe { *buf = stage.as_mut_ptr() };
        Ok(())
    })
}

/// Sends the first `len` bytes of the open reservation (see `shmrelay_reserve`) as one frame
/// to its connection, and ends the reservation (also when the send fails).
///
/// # Safety
///
/// `out` is the handle of the running callback.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_commit(out: *mut Out, len: usize) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let out = unsafe { handle(out, "shmrelay_commit") }?;
        let State::Reserved { conn, cap } = out.state.get() else {
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
        out.state.set(State::Idle);
        // SAFETY: as in `shmrelay_reserve`; the SDK's writer does not touch this buffer.
        let stage = unsafe { &*out.stage };
        out.with_sdk("shmrelay_commit", |o| Ok(o.send(conn, &stage[..len])?))
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
