//! `shmrelay_worker`: attach from the environment, then serve with a blocking run loop or
//! one poll at a time, calling C callbacks for every event.

use std::cell::UnsafeCell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use shmrelay_worker::{CloseReason, ConnId, Handler};

use crate::error::{guard, panic_message, Error, Status};
use crate::out::Out;
use crate::{Codec, Conn};

/// A connection opened. `peer` is the client's address as text (`peer_len` bytes, then a
/// NUL), valid during the call only.
pub type OnOpen = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        conn: Conn,
        peer: *const c_char,
        peer_len: usize,
        out: *mut Out,
    ),
>;

/// One frame from `conn`: `len` bytes at `frame`, read in place from shared memory (no copy).
/// The bytes are valid during the call only (they are released to the front after it) and
/// are read-only: copy what you keep. `redelivered` is true if a previous worker may have
/// seen the frame before it died.
pub type OnFrame = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        conn: Conn,
        frame: *const u8,
        len: usize,
        redelivered: bool,
        out: *mut Out,
    ),
>;

/// The connection closed; sends to it from now on are dropped by the front. `reason` is a
/// `shmrelay_close_reason` value (an unknown one is possible from a newer relay: treat it
/// as `SHMRELAY_CLOSE_REASON_OTHER`).
pub type OnClose =
    Option<unsafe extern "C" fn(user: *mut c_void, conn: Conn, reason: u32, out: *mut Out)>;

/// The callbacks of a worker. `on_frame` is required; `on_open` and `on_close` may be null.
/// Every callback gets the `user` pointer given to `shmrelay_worker_run` or
/// `shmrelay_worker_poll_once`, and an `out` handle that is valid until it returns.
///
/// Callbacks run on the thread that called `run` or `poll_once`, one at a time, and must not
/// unwind (no C++ exception and no longjmp may leave them). The events of one connection
/// arrive in order: open, its frames, close.
#[repr(C)]
pub struct Callbacks {
    pub on_open: OnOpen,
    pub on_frame: OnFrame,
    pub on_close: OnClose,
}

/// A worker attached to the rings the relay handed over. Create it with
/// `shmrelay_worker_from_env`, release it with `shmrelay_worker_free`. It may be used from
/// any thread, one call at a time (a concurrent call returns `SHMRELAY_STATUS_BUSY`).
pub struct Worker {
    /// Set while a call uses `sdk`: refuses re-entry from a callback and concurrent use.
    busy: AtomicBool,
    sdk: UnsafeCell<shmrelay_worker::Worker>,
    max_reply: UnsafeCell<usize>,
    // Read without entering: they never change after attach.
    doorbell_fd: c_int,
    index: usize,
    codec: Codec,
}

/// Exclusive use of a worker's state, until dropped.
struct Entered<'a>(&'a Worker);

impl Worker {
    pub(crate) fn new(sdk: shmrelay_worker::Worker) -> Worker {
        Worker {
            busy: AtomicBool::new(false),
            doorbell_fd: sdk.doorbell().as_raw_fd(),
            index: sdk.index(),
            codec: sdk.codec().into(),
            sdk: UnsafeCell::new(sdk),
            max_reply: UnsafeCell::new(shmrelay_worker::DEFAULT_MAX_REPLY),
        }
    }

    fn enter(&self, function: &str) -> Result<Entered<'_>, Error> {
        // Acquire: pairs with the Release in `Entered::drop`, so this call sees everything
        // the previous one (perhaps on another thread) did to the worker.
        if self.busy.swap(true, Ordering::Acquire) {
            return Err(Error::new(
                Status::Busy,
                format!("{function}: the worker is in use (called from one of its callbacks, or from two threads at once)"),
            ));
        }
        Ok(Entered(self))
    }
}

impl Entered<'_> {
    /// The SDK worker and the reply limit.
    fn parts(&mut self) -> (&mut shmrelay_worker::Worker, &mut usize) {
        // SAFETY: `busy` is held by this `Entered` alone (see `Worker::enter`), and it is
        // borrowed mutably here, so these are the only references to the cells' contents.
        unsafe { (&mut *self.0.sdk.get(), &mut *self.0.max_reply.get()) }
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire in `Worker::enter`.
        self.0.busy.store(false, Ordering::Release);
    }
}

/// Turns the raw handle C passed into a reference.
///
/// # Safety
///
/// `w` is null or a live worker from `shmrelay_worker_from_env`.
unsafe fn worker<'a>(w: *const Worker, function: &str) -> Result<&'a Worker, Error> {
    // SAFETY: per the caller's contract, non-null means live.
    unsafe { w.as_ref() }.ok_or_else(|| Error::invalid(function, "worker is null"))
}

/// The SDK's `Handler` that calls the C callbacks.
struct Adapter {
    on_open: OnOpen,
    on_frame: unsafe extern "C" fn(*mut c_void, Conn, *const u8, usize, bool, *mut Out),
    on_close: OnClose,
    user: *mut c_void,
    max_reply: usize,
    /// The first panic caught in this glue (a bug here; C callbacks cannot panic).
    fault: Option<String>,
    /// A websocket client's handshake fields, for the `on_open` call being made.
    upgrade: Option<crate::out::Upgrade>,
}

impl Adapter {
    fn new(
        callbacks: *const Callbacks,
        user: *mut c_void,
        max_reply: usize,
        function: &str,
    ) -> Result<Adapter, Error> {
        // SAFETY: `callbacks` is null or valid for reads, per the contract of the exported
        // functions that call this.
        let cb = unsafe { callbacks.as_ref() }
            .ok_or_else(|| Error::invalid(function, "callbacks is null"))?;
        Ok(Adapter {
            on_open: cb.on_open,
            on_frame: cb
                .on_frame
                .ok_or_else(|| Error::invalid(function, "callbacks->on_frame is null"))?,
            on_close: cb.on_close,
            user,
            max_reply,
            fault: None,
            upgrade: None,
        })
    }

    /// Calls one C callback with an `out` handle over the SDK's writer. Panics of the glue
    /// around it are caught here, so that the SDK's loop (and its delivery bookkeeping) goes
    /// on and the call returns `SHMRELAY_STATUS_PANIC` at its end.
    fn call(&mut self, out: &mut shmrelay_worker::Out<'_>, f: impl FnOnce(*mut c_void, *mut Out)) {
        let user = self.user;
        let r = catch_unwind(AssertUnwindSafe(|| {
            Out::scope(out, self.max_reply, self.upgrade.take(), |handle| {
                f(user, handle)
            })
        }));
        if let Err(panic) = r {
            self.fault
                .get_or_insert_with(|| panic_message(panic.as_ref()));
        }
    }

    fn finish(self) -> Result<(), Error> {
        match self.fault {
            Some(message) => Err(Error::new(Status::Panic, message)),
            None => Ok(()),
        }
    }
}

impl Handler for Adapter {
    fn on_upgrade(
        &mut self,
        conn: ConnId,
        peer: &str,
        upgrade: &shmrelay_worker::Upgrade<'_>,
        out: &mut shmrelay_worker::Out<'_>,
    ) {
        // Pointers into `upgrade`, which outlives the on_open call below.
        self.upgrade = Some(crate::out::Upgrade::of(upgrade));
        self.on_open(conn, peer, out);
        self.upgrade = None;
    }

    fn on_open(&mut self, conn: ConnId, peer: &str, out: &mut shmrelay_worker::Out<'_>) {
        let Some(on_open) = self.on_open else {
            return;
        };
        // The front writes the address; a NUL inside would be a lie: pass it empty then.
        let peer = CString::new(peer).unwrap_or_default();
        self.call(out, |user, handle| {
            // SAFETY: the callback is valid per `Callbacks`; `peer` and `handle` outlive it.
            unsafe {
                on_open(
                    user,
                    conn.raw(),
                    peer.as_ptr(),
                    peer.as_bytes().len(),
                    handle,
                )
            }
        });
    }

    fn on_frame(
        &mut self,
        conn: ConnId,
        frame: &[u8],
        redelivered: bool,
        out: &mut shmrelay_worker::Out<'_>,
    ) {
        let on_frame = self.on_frame;
        self.call(out, |user, handle| {
            // SAFETY: the callback is valid per `Callbacks`; the frame (borrowed from the
            // request ring, which this worker maps read-only) and `handle` outlive the call.
            unsafe {
                on_frame(
                    user,
                    conn.raw(),
                    frame.as_ptr(),
                    frame.len(),
                    redelivered,
                    handle,
                )
            }
        });
    }

    fn on_close(&mut self, conn: ConnId, reason: CloseReason, out: &mut shmrelay_worker::Out<'_>) {
        let Some(on_close) = self.on_close else {
            return;
        };
        self.call(out, |user, handle| {
            // SAFETY: the callback is valid per `Callbacks`; `handle` outlives it.
            unsafe { on_close(user, conn.raw(), reason as u32, handle) }
        });
    }
}

/// Attaches to the rings described by the environment the relay sets for its workers
/// (`SHMRELAY_CHANNELS` and friends; see workers/README.md) and installs the SIGTERM and
/// SIGINT handler that makes `shmrelay_worker_run` return. On success `*worker` is the new
/// worker, owned by the caller until `shmrelay_worker_free`.
///
/// Errors: `SHMRELAY_STATUS_ENV` when the program was not started by shmrelay,
/// `SHMRELAY_STATUS_ATTACH` when a ring cannot be attached.
///
/// Only the first call in a process attaches: the inherited file descriptors belong to the
/// worker it makes (and are closed with it), so a later call returns
/// `SHMRELAY_STATUS_INVALID_ARGUMENT` rather than take fd numbers that may name other files
/// by then.
///
/// # Safety
///
/// `worker` points to writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_worker_from_env(worker: *mut *mut Worker) -> Status {
    static CALLED: AtomicBool = AtomicBool::new(false);
    guard(|| {
        if worker.is_null() {
            return Err(Error::invalid("shmrelay_worker_from_env", "worker is null"));
        }
        // Relaxed: only the flag's own value matters (one winner), nothing is published.
        if CALLED.swap(true, Ordering::Relaxed) {
            return Err(Error::invalid(
                "shmrelay_worker_from_env",
                "called again (the inherited fds belong to the first call's worker)",
            ));
        }
        let w = Box::new(Worker::new(shmrelay_worker::Worker::from_env()?));
        // SAFETY: non-null and writable per this function's contract.
        unsafe { *worker = Box::into_raw(w) };
        Ok(())
    })
}

/// Detaches and frees a worker (null is allowed and does nothing). Refused with
/// `SHMRELAY_STATUS_BUSY` from inside one of its callbacks.
///
/// # Safety
///
/// `worker` is null or a live worker from `shmrelay_worker_from_env`, not used again after
/// this returns `SHMRELAY_STATUS_OK`.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_worker_free(worker: *mut Worker) -> Status {
    guard(|| {
        if worker.is_null() {
            return Ok(());
        }
        // SAFETY: per this function's contract.
        let w = unsafe { self::worker(worker, "shmrelay_worker_free") }?;
        std::mem::forget(w.enter("shmrelay_worker_free")?);
        // SAFETY: from `Box::into_raw` in `shmrelay_worker_from_env`; the busy flag stays
        // set, and the caller gives up the pointer.
        drop(unsafe { Box::from_raw(worker) });
        Ok(())
    })
}

/// Serves events until SIGTERM or SIGINT, calling `callbacks` with `user`; returns
/// `SHMRELAY_STATUS_OK` then (replies queued so far are published).
///
/// Errors: `SHMRELAY_STATUS_CORRUPT` if a front corrupted a request ring (exit: the relay
/// starts a replacement), `SHMRELAY_STATUS_INVALID_ARGUMENT`, `SHMRELAY_STATUS_BUSY`.
///
/// # Safety
///
/// `worker` is null or live; `callbacks` is null or valid for reads, with valid function
/// pointers, during the call.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_worker_run(
    worker: *mut Worker,
    callbacks: *const Callbacks,
    user: *mut c_void,
) -> Status {
    // SAFETY: per this function's contract.
    unsafe {
        serve(
            worker,
            callbacks,
            user,
            "shmrelay_worker_run",
            |sdk, adapter| sdk.run(adapter),
        )
    }
}

/// Handles what is waiting in every request ring without blocking, calling `callbacks` with
/// `user`, and stores the number of records handled in `*handled` (if not null; 0 means
/// there was nothing to do). Replies are published and requests released before this
/// returns, so a crash never loses a request whose reply was not published.
///
/// For programs with their own event loop: call this until it handles nothing, then sleep on
/// `shmrelay_worker_fd` between `shmrelay_worker_prepare_wait` and
/// `shmrelay_worker_finish_wait`. Call `shmrelay_stop_requested` to learn that the relay asked
/// the worker to stop.
///
/// Errors: as `shmrelay_worker_run`.
///
/// # Safety
///
/// As `shmrelay_worker_run`; `handled` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_worker_poll_once(
    worker: *mut Worker,
    callbacks: *const Callbacks,
    user: *mut c_void,
    handled: *mut usize,
) -> Status {
    let poll = |sdk: &mut shmrelay_worker::Worker, adapter: &mut Adapter| {
        let n = sdk.poll_once(adapter)?;
        // SAFETY: null or writable per this function's contract.
        if let Some(handled) = unsafe { handled.as_mut() } {
            *handled = n;
        }
        Ok(())
    };
    // SAFETY: per this function's contract.
    unsafe { serve(worker, callbacks, user, "shmrelay_worker_poll_once", poll) }
}

/// The body of `run` and `poll_once`: enters the worker and hands `serve` the SDK worker and
/// a handler calling `callbacks`.
///
/// # Safety
///
/// As `shmrelay_worker_run`.
unsafe fn serve(
    worker: *mut Worker,
    callbacks: *const Callbacks,
    user: *mut c_void,
    function: &str,
    serve: impl FnOnce(
        &mut shmrelay_worker::Worker,
        &mut Adapter,
    ) -> Result<(), shmrelay_worker::WorkerError>,
) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let w = unsafe { self::worker(worker, function) }?;
        let mut entered = w.enter(function)?;
        let (sdk, max_reply) = entered.parts();
        let mut adapter = Adapter::new(callbacks, user, *max_reply, function)?;
        serve(sdk, &mut adapter)?;
        adapter.finish()
    })
}

/// Before a program with its own event loop sleeps on `shmrelay_worker_fd`: tells every
/// front this worker is about to sleep, so that the next frame rings the doorbell. Stores in
/// `*may_sleep` 1 if the worker may sleep, 0 if frames are already waiting (call
/// `shmrelay_worker_poll_once` instead). Either way, call `shmrelay_worker_finish_wait` once
/// awake (or at once, on 0) before the next `shmrelay_worker_poll_once`.
///
/// Errors: `SHMRELAY_STATUS_INVALID_ARGUMENT` (null `worker` or `may_sleep`), `SHMRELAY_STATUS_BUSY`
/// (called from a callback), `SHMRELAY_STATUS_CORRUPT` (a request ring's header is corrupt).
///
/// # Safety
///
/// `worker` is null or live; `may_sleep` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_worker_prepare_wait(
    worker: *mut Worker,
    may_sleep: *mut c_int,
) -> Status {
    const F: &str = "shmrelay_worker_prepare_wait";
    guard(|| {
        // SAFETY: per this function's contract.
        let w = unsafe { self::worker(worker, F) }?;
        // SAFETY: null or writable per this function's contract.
        let out =
            unsafe { may_sleep.as_mut() }.ok_or_else(|| Error::invalid(F, "may_sleep is null"))?;
        let mut entered = w.enter(F)?;
        let (sdk, _) = entered.parts();
        *out = c_int::from(sdk.prepare_wait()?);
        Ok(())
    })
}

/// After `shmrelay_worker_prepare_wait`, once awake: takes back the "about to sleep" flag
/// from every front and resets the doorbell.
///
/// Errors: `SHMRELAY_STATUS_INVALID_ARGUMENT` (null `worker`), `SHMRELAY_STATUS_BUSY` (called from a
/// callback).
///
/// # Safety
///
/// `worker` is null or live.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_worker_finish_wait(worker: *mut Worker) -> Status {
    const F: &str = "shmrelay_worker_finish_wait";
    guard(|| {
        // SAFETY: per this function's contract.
        let w = unsafe { self::worker(worker, F) }?;
        let mut entered = w.enter(F)?;
        let (sdk, _) = entered.parts();
        sdk.finish_wait();
        Ok(())
    })
}

/// The worker's doorbell: an eventfd that becomes readable when a front has work for this
/// worker, for `poll`/`epoll` in a program's own event loop; -1 if `worker` is null. Owned by
/// the worker: do not close it, and do not read it (`shmrelay_worker_finish_wait` resets it).
///
/// The fronts ring it only for a worker that said it is about to sleep: once
/// `shmrelay_worker_poll_once` handles nothing, call `shmrelay_worker_prepare_wait`; if it
/// says the worker may sleep, poll this fd (no timeout needed); then call
/// `shmrelay_worker_finish_wait` and `shmrelay_worker_poll_once` again.
///
/// # Safety
///
/// `worker` is null or live.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_worker_fd(worker: *const Worker) -> c_int {
    // SAFETY: per this function's contract.
    match unsafe { self::worker(worker, "shmrelay_worker_fd") } {
        Ok(w) => w.doorbell_fd,
        Err(_) => -1,
    }
}

/// This worker's index among the relay's workers (0 if `worker` is null).
///
/// # Safety
///
/// `worker` is null or live.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_worker_index(worker: *const Worker) -> usize {
    // SAFETY: per this function's contract.
    unsafe { self::worker(worker, "shmrelay_worker_index") }.map_or(0, |w| w.index)
}

/// The codec of this worker's listener: what a frame is, and how replies are framed
/// (`SHMRELAY_CODEC_LENGTH_PREFIXED` if `worker` is null).
///
/// # Safety
///
/// `worker` is null or live.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_worker_codec(worker: *const Worker) -> Codec {
    // SAFETY: per this function's contract.
    unsafe { self::worker(worker, "shmrelay_worker_codec") }
        .map_or(Codec::LengthPrefixed, |w| w.codec)
}

/// Sets the largest reply this worker sends (default 256 MiB); a longer one fails with
/// `SHMRELAY_STATUS_TOO_LARGE`, and the frame being answered gets the codec's error reply.
///
/// # Safety
///
/// `worker` is null or live.
#[no_mangle]
pub unsafe extern "C" fn shmrelay_worker_set_max_reply(worker: *mut Worker, max: usize) -> Status {
    guard(|| {
        // SAFETY: per this function's contract.
        let w = unsafe { self::worker(worker, "shmrelay_worker_set_max_reply") }?;
        let mut entered = w.enter("shmrelay_worker_set_max_reply")?;
        let (sdk, max_reply) = entered.parts();
        sdk.set_max_reply(max);
        *max_reply = max;
        Ok(())
    })
}

/// True once SIGTERM or SIGINT arrived (after `shmrelay_worker_from_env` installed the
/// handler): a program with its own loop should then finish and exit.
#[no_mangle]
pub extern "C" fn shmrelay_stop_requested() -> bool {
    shmrelay_worker::stop_requested()
}
