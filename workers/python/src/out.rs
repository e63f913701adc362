//! `shmrelay_worker.Out`: replies, pushes and closes from Python, valid only inside a callback.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64};

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use sdk::{ConnId, MessageKind, Out as SdkOut, SendError as SdkSendError};

pyo3::create_exception!(
    shmrelay_worker,
    SendError,
    pyo3::exceptions::PyException,
    "A reply, push or close could not be queued (the reply is too large, the worker is \
     stopping, or the connection id names no front of this worker)."
);

/// Sends replies and pushes and closes connections; the worker's one `Out` is `worker.out`.
///
/// Its methods work only while a callback (`on_open`, `on_frame`, `on_close`) runs, on the
/// thread running it; elsewhere they raise `RuntimeError`. `data` is `bytes`, `bytearray`, a
/// `memoryview` (the frame itself, for an echo) or any contiguous buffer, or a `str`
/// (sent as UTF-8). The front adds the framing of the listener's codec.
#[pyclass(module = "shmrelay_worker", frozen)]
pub struct Out {
    /// The worker's thread: the only one that runs callbacks, so the only one that may send.
    /// A `pthread_t` rather than a `ThreadId`: `pthread_self` is one load, while
    /// `thread::current()` takes and drops a reference to the thread's handle (two atomic
    /// read-modify-writes) on every send.
    owner: libc::pthread_t,
    /// The SDK's `Out` of the callback running now; null outside callbacks. Set and cleared
    /// by [`OutScope`] on `owner`.
    sdk: AtomicPtr<SdkOut<'static>>,
    /// The raw id of the connection whose frame is being handled, if `answering_set`, and
    /// whether the handler queued anything to it (so a handler that raises before replying
    /// gets the codec's error reply instead of leaving the client waiting).
    answering: AtomicU64,
    answering_set: AtomicBool,
    /// The Python `int` the callback was given for `answering` (null if none): a `conn`
    /// argument that is this very object needs no conversion (the object is alive for the
    /// whole callback, and an `int` never changes).
    answering_int: AtomicPtr<ffi::PyObject>,
    touched: AtomicBool,
    /// In `on_open` of a websocket client: path, subprotocol, authorization, cookie.
    upgrade: std::sync::Mutex<Option<[String; 4]>>,
}

// Ordering: every field is written and read by `owner` alone (checked before any other
// access), so Relaxed suffices; the atomics only make the type shareable with Python threads,
// which get an error.

impl Out {
    pub fn new() -> Out {
        Out {
            owner: this_thread(),
            sdk: AtomicPtr::new(std::ptr::null_mut()),
            answering: AtomicU64::new(0),
            answering_set: AtomicBool::new(false),
            answering_int: AtomicPtr::new(std::ptr::null_mut()),
            touched: AtomicBool::new(false),
            upgrade: std::sync::Mutex::new(None),
        }
    }

    /// Sets (or clears) the websocket handshake fields `upgrade` shows during `on_open`.
    pub fn set_upgrade(&self, fields: Option<[String; 4]>) {
        *self.upgrade.lock().unwrap_or_else(|e| e.into_inner()) = fields;
    }

    /// Whether the handler queued a reply or close to the connection being answered.
    pub fn touched(&self) -> bool {
        self.touched.load(Relaxed)
    }

    fn with_sdk<R>(
        &self,
        conn: u64,
        f: impl FnOnce(&mut SdkOut<'static>, ConnId) -> Result<R, SdkSendError>,
    ) -> PyResult<R> {
        if this_thread() != self.owner {
            return Err(PyRuntimeError::new_err(
                "shmrelay_worker.Out is usable only on the worker's thread, during a callback",
            ));
        }
        let p = self.sdk.load(Relaxed);
        if p.is_null() {
            return Err(PyRuntimeError::new_err(
                "shmrelay_worker.Out is usable only during a callback of the worker",
            ));
        }
        if self.answering_set.load(Relaxed) && self.answering.load(Relaxed) == conn {
            self.touched.store(true, Relaxed);
        }
        // SAFETY: non-null only between OutScope::enter and its drop, on `owner` (checked
        // above), while the SDK's `&mut Out` it came from is not used (the SDK is waiting in
        // our handler method, which is running the Python code that called us).
        let out = unsafe { &mut *p };
        f(out, ConnId::from_raw(conn)).map_err(|e| SendError::new_err(e.to_string()))
    }
}

/// The calling thread (a live thread's id is unique in the process; compared, never
/// dereferenced).
fn this_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() }
}

/// Points `out` at the SDK's `Out` for the duration of one callback.
pub struct OutScope<'a> {
    out: &'a Out,
}

impl<'a> OutScope<'a> {
    /// Must be called on the thread that created `out` (the worker's). `answering`: the
    /// connection whose frame is being handled, and the `int` the callback gets for it, which
    /// must stay alive until the scope ends.
    pub fn enter(
        out: &'a Out,
        sdk: &mut SdkOut<'_>,
        answering: Option<(ConnId, &Bound<'_, PyAny>)>,
    ) -> OutScope<'a> {
        debug_assert_eq!(this_thread(), out.owner);
        out.sdk.store((sdk as *mut SdkOut<'_>).cast(), Relaxed);
        out.answering
            .store(answering.map_or(0, |(c, _)| c.raw()), Relaxed);
        out.answering_set.store(answering.is_some(), Relaxed);
        out.answering_int.store(
            answering.map_or(std::ptr::null_mut(), |(_, int)| int.as_ptr()),
            Relaxed,
        );
        out.touched.store(false, Relaxed);
        OutScope { out }
    }
}

impl Drop for OutScope<'_> {
    fn drop(&mut self) {
        self.out.sdk.store(std::ptr::null_mut(), Relaxed);
        self.out.answering_set.store(false, Relaxed);
        self.out.answering_int.store(std::ptr::null_mut(), Relaxed);
    }
}

impl Out {
    /// `send(conn, data)` and `push(conn, data)` (see `fastcall.rs`, which makes them the
    /// type's methods): queues `data` as one frame to `conn`. Blocks while the reply ring is
    /// full; `SendError` if it cannot be queued.
    pub fn send_data(&self, conn: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let conn = if conn.as_ptr() == self.answering_int.load(Relaxed) {
            // The `conn` the callback was given (null never matches a live object).
            self.answering.load(Relaxed)
        } else {
            raw_conn(conn)?
        };
        with_bytes(data, |bytes| {
            self.with_sdk(conn, |out, c| out.send(c, bytes))
        })
    }
}

#[pymethods]
impl Out {
    /// Asks the front to close `conn` once what was queued to it before is written.
    fn close(&self, conn: &Bound<'_, PyAny>) -> PyResult<()> {
        self.with_sdk(raw_conn(conn)?, |out, c| out.close(c))
    }

    /// The listener's codec: `"length-prefixed"`, `"line"`, `"resp"` or `"websocket"`.
    #[getter]
    fn codec(&self) -> PyResult<String> {
        self.with_sdk(0, |out, _| Ok(out.codec().to_string()))
    }

    /// Queues a websocket text message (`data` must be UTF-8; a `str` is). For the other
    /// codecs the same as `send`. (`send` answers with the kind of the message being
    /// handled, and sends binary otherwise.)
    fn send_text(&self, conn: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let conn = raw_conn(conn)?;
        with_bytes(data, |bytes| {
            self.with_sdk(conn, |out, c| out.send_kind(c, MessageKind::Text, bytes))
        })
    }

    /// Queues a websocket binary message; for the other codecs the same as `send`.
    fn send_binary(&self, conn: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let conn = raw_conn(conn)?;
        with_bytes(data, |bytes| {
            self.with_sdk(conn, |out, c| out.send_kind(c, MessageKind::Binary, bytes))
        })
    }

    /// Closes a websocket connection with a close `code` (1000-1003, 1007-1011, 3000-4999;
    /// others raise `SendError`) and a `reason` (cut to 123 bytes), after what was queued.
    #[pyo3(signature = (conn, code, reason = ""))]
    fn close_with(&self, conn: &Bound<'_, PyAny>, code: u16, reason: &str) -> PyResult<()> {
        self.with_sdk(raw_conn(conn)?, |out, c| out.close_with(c, code, reason))
    }

    /// The kind of the message being handled: `"text"` or `"binary"` (always `"binary"`
    /// for the other codecs and outside `on_frame`).
    #[getter]
    fn message_kind(&self) -> PyResult<&'static str> {
        self.with_sdk(0, |out, _| {
            Ok(match out.message_kind() {
                MessageKind::Text => "text",
                MessageKind::Binary => "binary",
            })
        })
    }

    /// In `on_open` of a websocket client: `(path, subprotocol, authorization, cookie)` from
    /// its handshake (empty strings when absent); `None` elsewhere.
    #[getter]
    fn upgrade(&self) -> PyResult<Option<(String, String, String, String)>> {
        self.with_sdk(0, |_, _| Ok(()))?;
        let u = self.upgrade.lock().unwrap_or_else(|e| e.into_inner());
        Ok(u.clone().map(|[a, b, c, d]| (a, b, c, d)))
    }
}

const _: () = assert!(std::mem::size_of::<std::ffi::c_ulong>() == 8);

/// A connection id from Python (an `int`, as the callbacks pass it). `PyLong_AsUnsignedLong`
/// rather than PyO3's `u64` extraction, which goes through `PyLong_AsUnsignedLongLong` and a
/// byte-array conversion on CPython 3.11: this runs for every reply.
fn raw_conn(conn: &Bound<'_, PyAny>) -> PyResult<u64> {
    // SAFETY: GIL held (we have a Bound); accepts any object, raising TypeError for non-ints
    // and OverflowError for negative or too large ones.
    let v = unsafe { ffi::PyLong_AsUnsignedLong(conn.as_ptr()) };
    if v == std::ffi::c_ulong::MAX {
        if let Some(e) = PyErr::take(conn.py()) {
            return Err(e);
        }
    }
    Ok(v)
}

/// Calls `f` with the bytes of `data` (bytes, str, or any object with a contiguous buffer).
///
/// `f` must not run Python code: the bytes of a `memoryview` are read without taking a
/// buffer from it, so only the GIL keeps it from being released meanwhile.
fn with_bytes<R>(data: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> PyResult<R>) -> PyResult<R> {
    if let Ok(b) = data.cast::<PyBytes>() {
        return f(b.as_bytes());
    }
    // The frame itself (an echo), or a slice of it: read in place, as the buffer protocol
    // would give it, without its export and release per reply.
    if let Some(bytes) = crate::frame::contiguous_view_bytes(data) {
        return f(bytes);
    }
    if let Ok(s) = data.cast::<PyString>() {
        return f(s.to_str()?.as_bytes());
    }
    let mut view = ffi::Py_buffer::new();
    // SAFETY: `view` is a valid out-parameter; PyBUF_SIMPLE asks for contiguous bytes.
    if unsafe { ffi::PyObject_GetBuffer(data.as_ptr(), &mut view, ffi::PyBUF_SIMPLE) } != 0 {
        let cause = PyErr::take(data.py());
        let err = PyTypeError::new_err(format!(
            "data must be bytes, str or a contiguous buffer, not {}",
            data.get_type().name()?
        ));
        err.set_cause(data.py(), cause);
        return Err(err);
    }
    struct Release(ffi::Py_buffer);
    impl Drop for Release {
        fn drop(&mut self) {
            // SAFETY: obtained by a successful PyObject_GetBuffer, released once, GIL held
            // (this guard lives inside a function that holds a `Bound`).
            unsafe { ffi::PyBuffer_Release(&mut self.0) };
        }
    }
    let held = Release(view);
    let len = usize::try_from(held.0.len).unwrap_or(0);
    let bytes = if len == 0 {
        &[][..]
    } else {
        // SAFETY: a PyBUF_SIMPLE buffer is `len` contiguous bytes at `buf`, valid until the
        // release; we hold the GIL and call no Python code meanwhile, so no other Python code
        // can resize or free the exporter.
        unsafe { std::slice::from_raw_parts(held.0.buf.cast_const().cast::<u8>(), len) }
    };
    f(bytes)
}
