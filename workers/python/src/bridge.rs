//! The SDK handler that calls the Python one: one `Bridge` per `run`, or per handler given to
//! `poll_once`.

use std::io::Write;

use pyo3::exceptions::{PyException, PyTypeError};
use pyo3::prelude::*;
use sdk::{CloseReason, ConnId, Handler, Out as SdkOut};

use crate::frame::{FrameView, Revoked, Spare};
use crate::out::{Out, OutScope};

/// Exit status of a worker whose handler kept a raw buffer of a frame past its callback.
const EXIT_FRAME_ESCAPED: i32 = 70;

/// Calls the Python handler's callbacks for the SDK's events.
pub struct Bridge {
    /// The handler object itself (`poll_once` reuses a bridge while it is given the same).
    pub handler: Py<PyAny>,
    on_open: Option<Py<PyAny>>,
    on_frame: Py<PyAny>,
    on_close: Option<Py<PyAny>>,
    out: Py<Out>,
    /// In `run`: a stopping exception also stops the SDK's loop (through its SIGTERM flag).
    /// In `poll_once` the caller's own loop stops when the call raises.
    in_run: bool,
    /// A `BaseException` that is not an `Exception` (SystemExit, KeyboardInterrupt) raised by
    /// a callback: the worker stops after the batch and the call raises it.
    pub stop: Option<PyErr>,
    /// The last frame's view, kept for the next frame (see `frame.rs`).
    spare: Option<Spare>,
    conn_ints: ConnInts,
}

/// Slots of [`ConnInts`]: a power of two.
const CONN_INTS: usize = 1024;

/// The Python `int`s of recent connection ids, so that a frame's callback does not allocate
/// (and free) one: a connection id is above 2^32, so never one of CPython's cached small ints,
/// and consecutive frames often come from one connection (a client's pipelined frames share a
/// record) or from a set of connections that fits. Direct-mapped by the id's slot; an `int` is
/// immutable, so handing the same object out again is invisible to Python code.
struct ConnInts(Box<[Option<ConnInt>]>);

/// A connection id and its `int`.
type ConnInt = (u64, Py<PyAny>);

impl ConnInts {
    fn new() -> ConnInts {
        ConnInts((0..CONN_INTS).map(|_| None).collect())
    }

    /// The `int` of the connection id `raw`.
    fn get<'a, 'py>(&'a mut self, py: Python<'py>, raw: u64) -> PyResult<&'a Bound<'py, PyAny>> {
        // The slot index (low bits) mixed with the front (top byte).
        let at = (raw ^ (raw >> 56)) as usize & (CONN_INTS - 1);
        let slot = &mut self.0[at];
        let hit = matches!(slot, Some((r, _)) if *r == raw);
        if !hit {
            *slot = Some((raw, raw.into_pyobject(py)?.into_any().unbind()));
        }
        match slot {
            Some((_, int)) => Ok(int.bind(py)),
            None => unreachable!("filled above"),
        }
    }
}

impl Bridge {
    /// A bridge to `handler` (`on_open`, `on_frame`, `on_close`; the first and last optional;
    /// a plain callable is `on_frame`).
    pub fn new(handler: &Bound<'_, PyAny>, out: Py<Out>, in_run: bool) -> PyResult<Bridge> {
        let optional = |name: &str| -> PyResult<Option<Py<PyAny>>> {
            Ok(if handler.hasattr(name)? {
                Some(handler.getattr(name)?.unbind())
            } else {
                None
            })
        };
        Ok(Bridge {
            handler: handler.clone().unbind(),
            on_open: optional("on_open")?,
            on_frame: if handler.hasattr("on_frame")? {
                handler.getattr("on_frame")?.unbind()
            } else if handler.is_callable() {
                handler.clone().unbind()
            } else {
                return Err(PyTypeError::new_err(
                    "handler must have an on_frame method or be callable as on_frame",
                ));
            },
            on_close: optional("on_close")?,
            out,
            in_run,
            stop: None,
            spare: None,
            conn_ints: ConnInts::new(),
        })
    }

    /// Calls the optional callback `pick` (on_open or on_close) with `(conn, text)`.
    fn notify(
        &mut self,
        pick: fn(&Bridge) -> Option<&Py<PyAny>>,
        conn: ConnId,
        text: &str,
        out: &mut SdkOut<'_>,
    ) {
        if pick(self).is_none() {
            return;
        }
        let py = gil_held();
        let Some(cb) = pick(self).map(|cb| cb.clone_ref(py)) else {
            return;
        };
        let o = self.out.get();
        let scope = OutScope::enter(o, out, None);
        let r = self
            .conn_ints
            .get(py, conn.raw())
            .and_then(|c| cb.call1(py, (c, text)));
        drop(scope);
        if let Err(e) = r {
            self.failed(py, e);
        }
    }

    fn failed(&mut self, py: Python<'_>, e: PyErr) {
        if e.is_instance_of::<PyException>(py) {
            e.display(py);
            return;
        }
        if self.stop.is_none() {
            self.stop = Some(e);
            if self.in_run {
                // The SDK's stop path: its SIGTERM handler sets the flag its run loop checks.
                // SAFETY: raise(3) on our own process; the handler only stores an atomic.
                unsafe { libc::raise(libc::SIGTERM) };
            }
        }
    }
}

impl Handler for Bridge {
    fn on_open(&mut self, conn: ConnId, peer: &str, out: &mut SdkOut<'_>) {
        self.notify(|b| b.on_open.as_ref(), conn, peer, out);
    }

    fn on_upgrade(&mut self, conn: ConnId, peer: &str, u: &sdk::Upgrade<'_>, out: &mut SdkOut<'_>) {
        let fields = [u.path, u.subprotocol, u.authorization, u.cookie].map(str::to_owned);
        self.out.get().set_upgrade(Some(fields));
        self.on_open(conn, peer, out);
        self.out.get().set_upgrade(None);
    }

    fn on_frame(&mut self, conn: ConnId, frame: &[u8], redelivered: bool, out: &mut SdkOut<'_>) {
        let py = gil_held();
        let o = self.out.get();
        let r = match self.conn_ints.get(py, conn.raw()) {
            Ok(conn_int) => {
                let scope = OutScope::enter(o, out, Some((conn, conn_int)));
                let r = FrameView::new(py, frame, &mut self.spare).and_then(|view| {
                    let r = self
                        .on_frame
                        .call1(py, (conn_int, view.object(), redelivered));
                    if view.finish(&mut self.spare) == Revoked::RawExport {
                        frame_escaped(conn);
                    }
                    r
                });
                drop(scope);
                r.map_err(|e| (e, o.touched()))
            }
            Err(e) => Err((e, false)),
        };
        if let Err((e, touched)) = r {
            self.failed(py, e);
            if !touched {
                let body = out
                    .codec()
                    .error_body("the worker's handler raised an exception");
                // A failure is noted by the SDK (this is the frame being answered),
                // which then settles the frame itself: its error reply, or a close.
                let _ = out.send(conn, &body);
            }
        }
    }

    fn on_close(&mut self, conn: ConnId, reason: CloseReason, out: &mut SdkOut<'_>) {
        self.notify(|b| b.on_close.as_ref(), conn, reason.as_str(), out);
    }
}

/// The GIL token for a callback. The SDK calls the bridge only from `Worker.run` and
/// `Worker.poll_once`, which hold the GIL across each batch (`run` releases it only around the
/// SDK's park, outside any callback); `Python::attach` would only re-check that, at two
/// thread-local accesses per event (each a `__tls_get_addr` call in a shared library).
fn gil_held() -> Python<'static> {
    // SAFETY: the GIL is held by this thread whenever the SDK calls the bridge (above), and
    // the token does not leave the callback that took it.
    unsafe { Python::assume_attached() }
}

/// A raw buffer of the frame outlives its callback: its holder could read ring memory the
/// front reuses. Ends the process before the SDK releases the frame, so the relay restarts
/// the worker and redelivers the unanswered frames.
fn frame_escaped(conn: ConnId) -> ! {
    let _ = writeln!(
        std::io::stderr(),
        "shmrelay_worker: a buffer of the frame of connection {conn} is still held after \
         on_frame returned (e.g. numpy.frombuffer(frame) kept); copy with bytes(frame) \
         instead. Exiting with status {EXIT_FRAME_ESCAPED}."
    );
    // SAFETY: _exit ends the process at once; nothing here relies on destructors running.
    unsafe { libc::_exit(EXIT_FRAME_ESCAPED) }
}
