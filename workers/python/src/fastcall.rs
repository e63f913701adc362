//! `Out.send` and `Out.push` as plain `METH_FASTCALL` methods: the one call every reply makes,
//! without pyo3's generic argument parsing and call trampoline.
//!
//! A `#[pymethods]` method goes through a trampoline (a panic trap, an attach guard with its
//! thread-local count and reference-pool check) and a generic parser of positional and keyword
//! arguments before its body runs. `send(conn, data)` takes exactly two positional arguments,
//! so this entry point checks that, checks `self`, and goes straight to
//! [`Out::send_data`]; a panic is still caught and raised as `RuntimeError`.

use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::out::Out;

const SEND_DOC: &CStr = c"send($self, conn, data, /)
--

Queues `data` as one frame to `conn` (normally the reply to the frame being handled).

`data` is bytes, bytearray, a memoryview (the frame itself, for an echo) or any contiguous
buffer, or a str (sent as UTF-8). On a websocket listener it is a message of the kind being
answered (binary outside `on_frame`). Blocks while the reply ring is full. Raises `SendError`
if it cannot be queued; a failed reply to the frame being handled is then answered with the
codec's error reply.";

const PUSH_DOC: &CStr = c"push($self, conn, data, /)
--

Queues `data` as one frame to another live connection `conn` (a push). The same as `send`;
a push to a connection that closed meanwhile is dropped by the front.";

/// Puts `send` and `push` on the `Out` type (at import, before any `Out` is used).
pub fn install(py: Python<'_>) -> PyResult<()> {
    let ty = py.get_type::<Out>();
    for (name, doc) in [(c"send", SEND_DOC), (c"push", PUSH_DOC)] {
        // CPython keeps a pointer to the definition for as long as the type lives, which is
        // until the process ends (an extension module is never unloaded): leaked on purpose,
        // once per import.
        let def: &'static mut ffi::PyMethodDef = Box::leak(Box::new(ffi::PyMethodDef {
            ml_name: name.as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunctionFast: send,
            },
            ml_flags: ffi::METH_FASTCALL,
            ml_doc: doc.as_ptr(),
        }));
        // SAFETY: `ty` is a live type object, `def` lives for the rest of the process;
        // PyDescr_NewMethod returns a new reference or NULL with an exception set.
        let descr = unsafe {
            Bound::from_owned_ptr_or_err(py, ffi::PyDescr_NewMethod(ty.as_type_ptr(), def))?
        };
        ty.setattr(name.to_str().expect("ASCII"), descr)?;
    }
    Ok(())
}

/// `Out.send(conn, data)` and `Out.push(conn, data)`.
///
/// # Safety
///
/// Called by CPython as a `METH_FASTCALL` method of `Out`: GIL held, `args` holds `nargs`
/// borrowed references.
unsafe extern "C" fn send(
    slf: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls methods with the GIL held (caller's contract).
    let py = unsafe { Python::assume_attached() };
    let r = catch_unwind(AssertUnwindSafe(|| -> PyResult<()> {
        if nargs != 2 {
            return Err(PyTypeError::new_err(format!(
                "send() takes exactly 2 positional arguments (conn, data); {nargs} given"
            )));
        }
        // SAFETY: `slf` and the two arguments are borrowed references that live for this
        // call (caller's contract; `nargs` checked above).
        let (slf, conn, data) = unsafe {
            (
                Borrowed::from_ptr(py, slf),
                Borrowed::from_ptr(py, *args),
                Borrowed::from_ptr(py, *args.add(1)),
            )
        };
        // SAFETY: a method descriptor checks that `self` is an instance of its type (or a
        // subclass) before it calls us (CPython's `descr_check`), so `slf` is an `Out`.
        let out = unsafe { slf.cast_unchecked::<Out>() };
        out.get().send_data(&conn, &data)
    }));
    let err = match r {
        // SAFETY: Py_None is the immortal singleton; a new reference to it is returned.
        Ok(Ok(())) => return unsafe { ffi::Py_NewRef(ffi::Py_None()) },
        Ok(Err(e)) => e,
        Err(_) => PyRuntimeError::new_err("shmrelay_worker: a panic in Out.send (a bug)"),
    };
    err.restore(py);
    std::ptr::null_mut()
}
