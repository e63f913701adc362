//! `shmrelay_worker`: shmrelay workers written in Python, over the Rust worker SDK.
//!
//! The SDK's run loop does the waiting with the GIL released; each event re-attaches to the
//! interpreter only for the Python callback. Frames reach Python as read-only `memoryview`s
//! over the request ring, revoked when the callback returns (see [`frame`]).
//!
//! ```python
//! import shmrelay_worker
//!
//! class Echo:
//!     def __init__(self, out):
//!         self.out = out
//!
//!     def on_frame(self, conn, frame, redelivered):
//!         self.out.send(conn, frame)
//!
//! worker = shmrelay_worker.Worker.from_env()
//! worker.run(Echo(worker.out))  # returns on SIGTERM / SIGINT
//! ```

mod frame;
mod out;

use std::cell::RefCell;
use std::io::Write;

use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use sdk::{CloseReason, ConnId, Handler, Out as SdkOut, Worker as SdkWorker};

use frame::{FrameView, Revoked};
use out::{Out, OutScope, SendError};

pyo3::create_exception!(
    shmrelay_worker,
    WorkerError,
    PyException,
    "The worker could not start (not started by shmrelay, a ring could not be attached) or a \
     front corrupted a request ring."
);

/// Set by the first `Worker.from_env()` (Relaxed: a flag with no data behind it).
static ATTACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Exit status of a worker whose handler kept a raw buffer of a frame past its callback.
const EXIT_FRAME_ESCAPED: i32 = 70;

/// A worker attached to the rings the relay handed over.
///
/// `Worker.from_env()` attaches (and installs the SIGTERM/SIGINT handler that makes `run`
/// return); `run(handler)` serves events until then. `out` is the worker's `Out`.
#[pyclass(module = "shmrelay_worker", unsendable)]
struct Worker {
    /// Taken out while `run` runs, so that callbacks can still read `out` and the getters.
    inner: RefCell<Option<SdkWorker>>,
    out: Py<Out>,
    index: usize,
    codec: String,
}

#[pymethods]
impl Worker {
    /// Attaches to the rings described by the environment shmrelay sets for its workers.
    ///
    /// Raises `WorkerError` when the process was not started by shmrelay.
    #[staticmethod]
    fn from_env(py: Python<'_>) -> PyResult<Worker> {
        // The SDK takes ownership of the inherited fds: a second attach would own (and close)
        // the same fd numbers twice.
        if ATTACHED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return Err(WorkerError::new_err(
                "Worker.from_env() may be called once per process",
            ));
        }
        let inner = SdkWorker::from_env().map_err(|e| WorkerError::new_err(e.to_string()))?;
        Ok(Worker {
            index: inner.index(),
            codec: inner.codec().to_string(),
            inner: RefCell::new(Some(inner)),
            out: Py::new(py, Out::new())?,
        })
    }

    /// The worker's `Out` (replies, pushes, closes; usable during callbacks).
    #[getter]
    fn out(&self, py: Python<'_>) -> Py<Out> {
        self.out.clone_ref(py)
    }

    /// This worker's index in the relay.
    #[getter]
    fn index(&self) -> usize {
        self.index
    }

    /// The listener's codec: `"length-prefixed"`, `"line"` or `"resp"`.
    #[getter]
    fn codec(&self) -> &str {
        &self.codec
    }

    /// Serves events until SIGTERM or SIGINT, calling `handler.on_open(conn, peer)`,
    /// `handler.on_frame(conn, frame, redelivered)` and `handler.on_close(conn, reason)`
    /// (`on_open` and `on_close` are optional); a plain callable is taken as `on_frame`. The
    /// GIL is released while the worker waits.
    ///
    /// An exception in a callback is printed to stderr and the worker goes on; a frame whose
    /// handler raised before queuing anything to its connection is answered with the codec's
    /// error reply. `SystemExit` or `KeyboardInterrupt` from a callback stops the worker after
    /// the current batch and is raised again from `run`.
    fn run(&self, py: Python<'_>, handler: &Bound<'_, PyAny>) -> PyResult<()> {
        let optional = |name: &str| -> PyResult<Option<Py<PyAny>>> {
            Ok(if handler.hasattr(name)? {
                Some(handler.getattr(name)?.unbind())
            } else {
                None
            })
        };
        let mut bridge = Bridge {
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
            out: self.out.clone_ref(py),
            stop: None,
        };
        let mut worker = self
            .inner
            .borrow_mut()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this worker is running already"))?;
        let result = py.detach(|| worker.run(&mut bridge).map_err(|e| e.to_string()));
        *self.inner.borrow_mut() = Some(worker);
        if let Some(e) = bridge.stop.take() {
            return Err(e);
        }
        result.map_err(WorkerError::new_err)
    }
}

/// The SDK's handler that calls the Python one.
struct Bridge {
    on_open: Option<Py<PyAny>>,
    on_frame: Py<PyAny>,
    on_close: Option<Py<PyAny>>,
    out: Py<Out>,
    /// A `BaseException` that is not an `Exception` (SystemExit, KeyboardInterrupt) raised by
    /// a callback: the worker stops and `run` raises it.
    stop: Option<PyErr>,
}

impl Bridge {
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
        Python::attach(|py| {
            let Some(cb) = pick(self).map(|cb| cb.clone_ref(py)) else {
                return;
            };
            let o = self.out.get();
            let scope = OutScope::enter(o, out, None);
            let r = cb.call1(py, (conn.raw(), text));
            drop(scope);
            if let Err(e) = r {
                self.failed(py, e);
            }
        })
    }

    fn failed(&mut self, py: Python<'_>, e: PyErr) {
        if e.is_instance_of::<PyException>(py) {
            e.display(py);
            return;
        }
        if self.stop.is_none() {
            self.stop = Some(e);
            // The SDK's stop path: its SIGTERM handler sets the flag its run loop checks.
            // SAFETY: raise(3) on our own process; the handler only stores an atomic.
            unsafe { libc::raise(libc::SIGTERM) };
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
        Python::attach(|py| {
            let o = self.out.get();
            let scope = OutScope::enter(o, out, Some(conn));
            let r = FrameView::new(py, frame).and_then(|view| {
                let r = self
                    .on_frame
                    .call1(py, (conn.raw(), view.object(), redelivered));
                if view.revoke() == Revoked::RawExport {
                    frame_escaped(conn);
                }
                r
            });
            drop(scope);
            if let Err(e) = r {
                let touched = o.touched();
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
        })
    }

    fn on_close(&mut self, conn: ConnId, reason: CloseReason, out: &mut SdkOut<'_>) {
        self.notify(|b| b.on_close.as_ref(), conn, reason.as_str(), out);
    }
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

/// Python workers for shmrelay (see the package README).
#[pymodule(name = "shmrelay_worker")]
fn shmrelay_worker_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    frame::check_layout(py)?;
    m.add_class::<Worker>()?;
    m.add_class::<Out>()?;
    m.add("WorkerError", py.get_type::<WorkerError>())?;
    m.add("SendError", py.get_type::<SendError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
