//! `shmrelay_worker`: shmrelay workers written in Python, over the Rust worker SDK.
//!
//! `run` holds the GIL across each batch of events and releases it while the worker waits
//! (one GIL hand-off per batch, not per event). Frames reach Python as read-only
//! `memoryview`s over the request ring, revoked when the callback returns (see [`frame`]).
//! Programs with an event loop of their own use the poll API instead: `fileno`,
//! `prepare_wait`, `finish_wait` and `poll_once`, as the Rust SDK's.
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

mod bridge;
mod fastcall;
mod frame;
mod out;

use std::cell::RefCell;
use std::os::fd::AsRawFd;

use pyo3::exceptions::{PyException, PyRuntimeError};
use pyo3::prelude::*;
use sdk::Worker as SdkWorker;

use bridge::Bridge;
use out::{Out, SendError};

pyo3::create_exception!(
    shmrelay_worker,
    WorkerError,
    PyException,
    "The worker could not start (not started by shmrelay, a ring could not be attached) or a \
     front corrupted a request ring."
);

/// Set by the first `Worker.from_env()` (Relaxed: a flag with no data behind it).
static ATTACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A worker attached to the rings the relay handed over.
///
/// `Worker.from_env()` attaches (and installs the SIGTERM/SIGINT handler that makes `run`
/// return); `run(handler)` serves events until then. `out` is the worker's `Out`. A program
/// with its own event loop polls instead: `fileno()`, `prepare_wait()`, `finish_wait()`,
/// `poll_once(handler)`.
#[pyclass(module = "shmrelay_worker", unsendable)]
struct Worker {
    /// Taken out while `run` or `poll_once` runs, so that callbacks can still read `out` and
    /// the getters (and a nested `run` or `poll_once` is refused).
    inner: RefCell<Option<SdkWorker>>,
    out: Py<Out>,
    index: usize,
    codec: String,
    /// The doorbell's fd (owned by the SDK worker, which lives as long as this object).
    doorbell: i32,
    /// The bridge of the handler last given to `poll_once`, reused while it is given the same
    /// handler (its callbacks are looked up once, not per poll).
    polling: RefCell<Option<Bridge>>,
}

/// A `WorkerError` from the SDK's.
fn worker_error(e: sdk::WorkerError) -> PyErr {
    WorkerError::new_err(e.to_string())
}

impl Worker {
    /// Takes the SDK worker out for a call that runs callbacks.
    fn take(&self) -> PyResult<SdkWorker> {
        self.inner
            .try_borrow_mut()
            .ok()
            .and_then(|mut w| w.take())
            .ok_or_else(|| {
                PyRuntimeError::new_err(
                    "this worker is serving already (run or poll_once cannot be called from \
                     one of its callbacks)",
                )
            })
    }

    /// Runs `f` on the SDK worker when no call is serving it.
    fn with<R>(&self, f: impl FnOnce(&mut SdkWorker) -> PyResult<R>) -> PyResult<R> {
        let mut w = self.take()?;
        let r = f(&mut w);
        *self.inner.borrow_mut() = Some(w);
        r
    }
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
        let inner = SdkWorker::from_env().map_err(worker_error)?;
        Ok(Worker {
            index: inner.index(),
            codec: inner.codec().to_string(),
            doorbell: inner.doorbell().as_raw_fd(),
            inner: RefCell::new(Some(inner)),
            out: Py::new(py, Out::new())?,
            polling: RefCell::new(None),
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
    /// GIL is held across each batch of events and released while the worker waits.
    ///
    /// An exception in a callback is printed to stderr and the worker goes on; a frame whose
    /// handler raised before queuing anything to its connection is answered with the codec's
    /// error reply. `SystemExit` or `KeyboardInterrupt` from a callback stops the worker after
    /// the current batch and is raised again from `run`.
    fn run(&self, py: Python<'_>, handler: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut bridge = Bridge::new(handler, self.out.clone_ref(py), true)?;
        let mut worker = self.take()?;
        let result = serve(py, &mut worker, &mut bridge);
        *self.inner.borrow_mut() = Some(worker);
        if let Some(e) = bridge.stop.take() {
            return Err(e);
        }
        result
    }

    /// Handles the events waiting now, without blocking, calling `handler` as `run` does;
    /// returns how many were handled (0: nothing was waiting). Replies are published and
    /// requests released before it returns. For programs with their own event loop: see
    /// `fileno` and `prepare_wait`. `SystemExit` or `KeyboardInterrupt` from a callback is
    /// raised once the batch is done; other exceptions are handled as in `run`.
    fn poll_once(&self, py: Python<'_>, handler: &Bound<'_, PyAny>) -> PyResult<usize> {
        let mut worker = self.take()?;
        let cached = self
            .polling
            .borrow_mut()
            .take()
            .filter(|b| b.handler.as_ptr() == handler.as_ptr());
        let mut bridge = match cached {
            Some(b) => b,
            None => match Bridge::new(handler, self.out.clone_ref(py), false) {
                Ok(b) => b,
                Err(e) => {
                    *self.inner.borrow_mut() = Some(worker);
                    return Err(e);
                }
            },
        };
        let r = worker.poll_once(&mut bridge);
        *self.inner.borrow_mut() = Some(worker);
        let stop = bridge.stop.take();
        *self.polling.borrow_mut() = Some(bridge);
        if let Some(e) = stop {
            return Err(e);
        }
        r.map_err(worker_error)
    }

    /// Tells the fronts that this worker is about to sleep on `fileno()`, so that the next
    /// frame rings it (fronts ring only a worker that said so). Returns False if events are
    /// already waiting: don't sleep, poll. Either way call `finish_wait()` once awake (at
    /// once, on False) before the next `poll_once`.
    fn prepare_wait(&self) -> PyResult<bool> {
        self.with(|w| w.prepare_wait().map_err(worker_error))
    }

    /// After `prepare_wait`, once awake: takes back the "about to sleep" announcement and
    /// resets the doorbell, so that the event loop does not see it readable again for a wake
    /// already acted on.
    fn finish_wait(&self) -> PyResult<()> {
        self.with(|w| {
            w.finish_wait();
            Ok(())
        })
    }

    /// The doorbell: a file descriptor that becomes readable when a front has work for a
    /// worker that called `prepare_wait` (for `select`, `poll` or `loop.add_reader`). Owned
    /// by the worker: do not close it.
    fn fileno(&self) -> i32 {
        self.doorbell
    }
}

/// `run`'s loop: the GIL held across each batch of events (each callback's attach is then the
/// cheap nested one) and released only while waiting for the next batch.
fn serve(py: Python<'_>, worker: &mut SdkWorker, bridge: &mut Bridge) -> PyResult<()> {
    while !sdk::stop_requested() && bridge.stop.is_none() {
        if worker.poll_once(bridge).map_err(worker_error)? == 0 {
            py.detach(|| worker.park()).map_err(worker_error)?;
        }
    }
    Ok(())
}

/// True once SIGTERM or SIGINT arrived (after `Worker.from_env()` installed the handler): a
/// program polling from its own loop stops on it.
#[pyfunction]
fn stop_requested() -> bool {
    sdk::stop_requested()
}

/// Python workers for shmrelay (see the package README).
#[pymodule(name = "shmrelay_worker")]
fn shmrelay_worker_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    frame::check_layout(py)?;
    m.add_class::<Worker>()?;
    m.add_class::<Out>()?;
    fastcall::install(py)?;
    m.add_function(wrap_pyfunction!(stop_requested, m)?)?;
    m.add("WorkerError", py.get_type::<WorkerError>())?;
    m.add("SendError", py.get_type::<SendError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
