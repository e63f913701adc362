//! The frame handed to `on_frame`: a read-only `memoryview` over the request ring that is
//! revoked, with every view derived from it, when the callback returns.
//!
//! CPython has no public call that invalidates views derived from a memoryview (slices,
//! `cast`, `memoryview(frame)`): they share one *managed buffer* with the frame, and
//! `frame.release()` leaves them readable. So the managed buffer itself is marked released,
//! as CPython's own `mbuf_release` does, through the object layout CPython declares in
//! `cpython/memoryobject.h` (unchanged from 3.3 to 3.13). [`check_layout`] proves the layout on
//! the running interpreter at import, so a build against an interpreter whose layout differs
//! fails to import instead of writing the wrong word.
//!
//! What a marked buffer does: every memoryview on it raises `ValueError: operation forbidden
//! on released memoryview object` for any access to its bytes (indexing, `bytes()`, `len()`,
//! iteration, exporting a buffer), so no Python code can read ring memory after the callback.
//! A consumer that took a raw buffer (`Py_buffer`) from a view and still holds it past the
//! callback (for example a `numpy.frombuffer(frame)` kept in a global) cannot be revoked: it
//! holds a bare pointer. That is detected and ends the worker (see [`Revoked::RawExport`]).
//!
//! Reuse: creating a memoryview and its managed buffer per frame (two allocations, a garbage
//! collector link each) was a sixth of the worker's time for small frames. So when a callback
//! returns and provably nobody else can reach its frame (the view's only reference is ours, no
//! view was derived from it, no raw buffer or weak reference to it exists, it was not
//! released), the view is kept as a [`Spare`] for the next frame instead of being revoked.
//! While kept it shows an empty static buffer, so that even code that finds it through the
//! garbage collector (`gc.get_objects()` in an `on_open`, or in another thread while the worker
//! waits) sees nothing of the ring; the next frame re-checks that nobody took a reference
//! meanwhile and points it at the new bytes (resetting the hash a read-only view caches), or
//! revokes it and makes a fresh one.

use std::ffi::{c_char, c_int};
use std::ptr::NonNull;

use pyo3::exceptions::PyImportError;
use pyo3::ffi;
use pyo3::prelude::*;

/// `_PyManagedBufferObject` of `cpython/memoryobject.h`.
#[repr(C)]
struct ManagedBuffer {
    ob_base: ffi::PyObject,
    flags: c_int,
    /// Memoryviews registered on this buffer (the frame and every view derived from it).
    exports: ffi::Py_ssize_t,
    master: ffi::Py_buffer,
}

/// `PyMemoryViewObject` of `cpython/memoryobject.h`.
#[repr(C)]
struct MemoryView {
    ob_base: ffi::PyVarObject,
    mbuf: *mut ManagedBuffer,
    /// The cached hash of a read-only view; -1 until computed.
    hash: ffi::Py_hash_t,
    flags: c_int,
    /// Raw buffers (`Py_buffer`) exported from this view and not released yet.
    exports: ffi::Py_ssize_t,
    view: ffi::Py_buffer,
    weakreflist: *mut ffi::PyObject,
    /// Shape (and strides) of the view; `view.shape` points here.
    ob_array: [ffi::Py_ssize_t; 1],
}

/// `_Py_MANAGED_BUFFER_RELEASED`: access through the managed buffer is blocked.
const MANAGED_BUFFER_RELEASED: c_int = 0x001;
/// `_Py_MEMORYVIEW_RELEASED`: this memoryview was released (`frame.release()`).
const MEMORYVIEW_RELEASED: c_int = 0x001;
/// `_Py_MEMORYVIEW_C`: the view's bytes are C-contiguous (`view.len` bytes at `view.buf`).
const MEMORYVIEW_C: c_int = 0x002;

/// A frame view that is alive during one callback.
pub struct FrameView<'py> {
    view: Bound<'py, PyAny>,
}

/// A frame view kept for the next frame, showing an empty static buffer meanwhile (see the
/// module docs).
pub struct Spare(Py<PyAny>);

/// What a kept view shows between frames.
static EMPTY: [u8; 1] = [0];

/// What revoking found.
#[derive(Debug, PartialEq, Eq)]
pub enum Revoked {
    /// Every view is unusable now (those still referenced raise on access).
    Clean,
    /// A raw buffer of the frame (or of a view derived from it) is still held: its holder
    /// can read the ring after the callback, which cannot be prevented.
    RawExport,
}

impl<'py> FrameView<'py> {
    /// A read-only memoryview over `bytes`: `spare` pointed at them if it is still unreachable
    /// for anybody else, else a new one.
    ///
    /// The caller must [`finish`](FrameView::finish) or [`revoke`](FrameView::revoke) it
    /// before `bytes` may change.
    pub fn new(
        py: Python<'py>,
        bytes: &[u8],
        spare: &mut Option<Spare>,
    ) -> PyResult<FrameView<'py>> {
        let len = ffi::Py_ssize_t::try_from(bytes.len())
            .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("frame too large"))?;
        if let Some(Spare(kept)) = spare.take() {
            let view = FrameView {
                view: kept.into_bound(py),
            };
            if view.unreachable() {
                // SAFETY: nobody but us can reach the view or its managed buffer (checked
                // just now, with the GIL held, so no Python code runs until we return);
                // `bytes` outlives the callback, as for a new view.
                unsafe { view.point_at(bytes.as_ptr(), len) };
                return Ok(view);
            }
            // Somebody took a reference while it was kept: it showed only the empty buffer,
            // and is revoked now.
            let _ = view.revoke();
        }
        // SAFETY: PyBUF_READ makes a read-only view, so CPython never writes through the
        // pointer (the request ring's data is mapped read-only anyway); the memory stays
        // valid until `revoke`, which the caller runs before the SDK releases the record.
        let view = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyMemoryView_FromMemory(bytes.as_ptr() as *mut c_char, len, ffi::PyBUF_READ),
            )?
        };
        Ok(FrameView { view })
    }

    /// The `memoryview` object handed to Python.
    pub fn object(&self) -> &Bound<'py, PyAny> {
        &self.view
    }

    /// After the callback: keeps the view in `spare` if nobody else can reach it (pointed at
    /// an empty static buffer), else revokes it.
    pub fn finish(self, spare: &mut Option<Spare>) -> Revoked {
        if !self.unreachable() {
            return self.revoke();
        }
        // SAFETY: unreachable for anybody else (checked above, GIL held); EMPTY is static.
        unsafe { self.point_at(EMPTY.as_ptr(), 0) };
        *spare = Some(Spare(self.view.unbind()));
        Revoked::Clean
    }

    /// True if only this `FrameView` can reach the view and its managed buffer: one reference
    /// each (ours, and the view's), no derived view, no raw buffer, no weak reference, not
    /// released.
    fn unreachable(&self) -> bool {
        let mv = self.view.as_ptr().cast::<MemoryView>();
        // SAFETY: a memoryview made by `new` (layout proven by `check_layout` at import),
        // GIL held; `mbuf` is checked non-null before it is read.
        unsafe {
            let m = (*mv).mbuf;
            ffi::Py_REFCNT(self.view.as_ptr()) == 1
                && (*mv).exports == 0
                && (*mv).flags & MEMORYVIEW_RELEASED == 0
                && (*mv).weakreflist.is_null()
                && !m.is_null()
                && ffi::Py_REFCNT(m.cast()) == 1
                && (*m).exports == 1
                && (*m).flags & MANAGED_BUFFER_RELEASED == 0
        }
    }

    /// Points the view (and its managed buffer) at `len` bytes at `ptr`, forgetting the
    /// cached hash.
    ///
    /// # Safety
    ///
    /// Nobody else can reach the view ([`unreachable`](FrameView::unreachable)), and `ptr`
    /// is valid for `len` bytes until the view is pointed elsewhere or revoked.
    unsafe fn point_at(&self, ptr: *const u8, len: ffi::Py_ssize_t) {
        let mv = self.view.as_ptr().cast::<MemoryView>();
        // SAFETY: (caller) only we reach the view; a one-dimensional view of bytes made by
        // PyMemoryView_FromMemory has its shape in its own `ob_array` and its managed
        // buffer's shape at `master.len` (both proven by `check_layout`), so these are all
        // the places that hold the address and the length.
        unsafe {
            let m = (*mv).mbuf;
            (*m).master.buf = ptr.cast_mut().cast();
            (*m).master.len = len;
            (*mv).view.buf = ptr.cast_mut().cast();
            (*mv).view.len = len;
            (*mv).ob_array[0] = len;
            (*mv).hash = -1;
        }
    }

    /// Makes the frame and every view derived from it unreadable.
    pub fn revoke(self) -> Revoked {
        let py = self.view.py();
        let mv = self.view.as_ptr().cast::<MemoryView>();
        // SAFETY: `self.view` is a memoryview made by `new` (checked type, layout proven by
        // `check_layout` at import) and we hold the GIL, so no other thread touches it.
        let mbuf = unsafe { NonNull::new((*mv).mbuf) };
        let Some(mbuf) = mbuf else {
            return Revoked::Clean;
        };
        // SAFETY: as above; the memoryview holds a reference to its managed buffer.
        let (own_exports, views) = unsafe { ((*mv).exports, (*mbuf.as_ptr()).exports) };
        let mut outcome = if own_exports > 0 {
            Revoked::RawExport
        } else {
            Revoked::Clean
        };
        // The frame itself counts among the views unless the handler released it.
        // SAFETY: as above.
        let released = unsafe { (*mv).flags } & MEMORYVIEW_RELEASED != 0;
        let derived = views - ffi::Py_ssize_t::from(!released);
        if derived > 0 && outcome == Revoked::Clean && derived_views_export(py, mbuf) {
            outcome = Revoked::RawExport;
        }
        // SAFETY: what CPython's mbuf_release does before releasing the master buffer (which
        // has no exporter object here: PyMemoryView_FromMemory). Once the flag is set,
        // CPython never calls mbuf_release's untrack again, so it is done here.
        unsafe {
            let m = mbuf.as_ptr();
            if (*m).flags & MANAGED_BUFFER_RELEASED == 0 {
                (*m).flags |= MANAGED_BUFFER_RELEASED;
                ffi::PyObject_GC_UnTrack(m.cast());
            }
        }
        outcome
    }
}

/// The bytes of `data` if it is a `memoryview` (exactly) that is usable and C-contiguous:
/// what `PyObject_GetBuffer(data, PyBUF_SIMPLE)` would give, without the export. None for
/// anything else (the caller takes the buffer protocol's path, with its errors).
///
/// The slice is valid while the GIL is held and no Python code runs: only Python code can
/// release the view, and a view that is not released keeps its exporter alive.
pub fn contiguous_view_bytes<'a>(data: &'a Bound<'_, PyAny>) -> Option<&'a [u8]> {
    let p = data.as_ptr();
    // SAFETY: a live object (we hold a reference and the GIL); the type is compared, not
    // called.
    if unsafe { ffi::Py_TYPE(p) } != std::ptr::addr_of_mut!(ffi::PyMemoryView_Type) {
        return None;
    }
    let mv = p.cast::<MemoryView>();
    // SAFETY: a memoryview (exact type checked), layout proven by `check_layout` at import;
    // `mbuf` is checked non-null before it is read. A view that is not released, on a managed
    // buffer that is not released, shows `view.len` bytes at `view.buf` when it is
    // C-contiguous (what memory_getbuf checks before exporting them).
    unsafe {
        let m = (*mv).mbuf;
        let usable = (*mv).flags & (MEMORYVIEW_RELEASED | MEMORYVIEW_C) == MEMORYVIEW_C
            && !m.is_null()
            && (*m).flags & MANAGED_BUFFER_RELEASED == 0;
        let len = usize::try_from((*mv).view.len).ok()?;
        if !usable {
            return None;
        }
        Some(if len == 0 {
            &[]
        } else {
            std::slice::from_raw_parts((*mv).view.buf.cast_const().cast::<u8>(), len)
        })
    }
}

/// Whether a view that shares `mbuf` (a slice or cast of the frame kept past the callback)
/// has raw buffers exported. Only runs when such views exist, which is a bug in the handler;
/// it walks the garbage collector's objects.
fn derived_views_export(py: Python<'_>, mbuf: NonNull<ManagedBuffer>) -> bool {
    let scan = || -> PyResult<bool> {
        // SAFETY: a live object (the frame holds a reference to it) and we hold the GIL.
        let m = unsafe { Bound::from_borrowed_ptr(py, mbuf.as_ptr().cast()) };
        let referrers = py.import("gc")?.call_method1("get_referrers", (m,))?;
        for r in referrers.try_iter()? {
            let r = r?;
            // SAFETY: type check before the cast; GIL held.
            if unsafe { ffi::PyMemoryView_Check(r.as_ptr()) } != 0 {
                let v = r.as_ptr().cast::<MemoryView>();
                // SAFETY: a memoryview (checked), layout proven at import.
                if unsafe { (*v).mbuf == mbuf.as_ptr() && (*v).exports > 0 } {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    };
    // If the scan itself fails, assume the worst.
    scan().unwrap_or(true)
}

/// Proves at import that this interpreter's memoryview layout is the one declared above:
/// a view of a known bytes object must show its pointer, length, owner and counts where the
/// structs say, and a slice must register on the same managed buffer.
pub fn check_layout(py: Python<'_>) -> PyResult<()> {
    let bad = |what: &str| {
        PyImportError::new_err(format!(
            "shmrelay_worker: this interpreter's memoryview layout is not the one the module \
             was written for ({what}); use CPython 3.11-3.13 with the GIL"
        ))
    };
    let data = pyo3::types::PyBytes::new(py, b"shmrelay");
    let expect_ptr = data.as_bytes().as_ptr();
    // SAFETY: PyMemoryView_FromObject on a bytes object returns a new reference or NULL.
    let view =
        unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyMemoryView_FromObject(data.as_ptr()))? };
    let mv = view.as_ptr().cast::<MemoryView>();
    // SAFETY: reads only, of an object just created as a memoryview; the comparisons decide
    // whether the layout is trusted. `mbuf` is checked non-null before it is dereferenced.
    let first = unsafe {
        let m = (*mv).mbuf;
        (*mv).view.buf.cast_const().cast::<u8>() == expect_ptr
            && (*mv).view.len == 8
            && (*mv).view.obj == data.as_ptr()
            && (*mv).exports == 0
            && !m.is_null()
            && (*m).flags == 0
            && (*m).exports == 1
            && (*m).master.obj == data.as_ptr()
    };
    if !first {
        return Err(bad("memoryview fields"));
    }
    let slice = view.get_item(pyo3::types::PySlice::new(py, 1, 4, 1))?;
    // SAFETY: as above.
    let second = unsafe {
        let s = slice.as_ptr().cast::<MemoryView>();
        (*s).mbuf == (*mv).mbuf && (*(*mv).mbuf).exports == 2
    };
    if !second {
        return Err(bad("managed buffer sharing"));
    }
    // What reading a view's bytes in place relies on (`contiguous_view_bytes`): the flags
    // say which views are C-contiguous, and where a slice starts.
    let strided = view.get_item(pyo3::types::PySlice::new(py, 0, 8, 2))?;
    let flags_ok = contiguous_view_bytes(&slice).is_some_and(|b| b == b"hmr")
        && contiguous_view_bytes(&strided).is_none()
        && contiguous_view_bytes(&view).is_some_and(|b| b == b"shmrelay");
    if !flags_ok {
        return Err(bad("memoryview contiguity flags"));
    }
    // What reusing a frame view relies on: where a view made over raw memory keeps its
    // shape, that it caches no hash yet, and where its weak references are listed.
    let mem = *b"shmrelay";
    let mut none = None;
    let fresh = FrameView::new(py, &mem, &mut none)?;
    let fv = fresh.view.as_ptr().cast::<MemoryView>();
    // SAFETY: reads of a memoryview just made (the fields above are proven); `ob_array` is
    // the last declared field, inside the object whatever the layout.
    let third = unsafe {
        let m = (*fv).mbuf;
        (*fv).flags & (MEMORYVIEW_RELEASED | MEMORYVIEW_C) == MEMORYVIEW_C
            && (*fv).view.ndim == 1
            && (*fv).view.itemsize == 1
            && (*fv).view.shape == std::ptr::addr_of_mut!((*fv).ob_array).cast()
            && (*fv).ob_array[0] == 8
            && (*fv).hash == -1
            && (*fv).weakreflist.is_null()
            && (*m).master.buf.cast_const().cast::<u8>() == mem.as_ptr()
            && (*m).master.shape == std::ptr::addr_of_mut!((*m).master.len)
    };
    let weak = py
        .import("weakref")?
        .call_method1("ref", (fresh.object(),))?;
    // SAFETY: as above.
    let fourth = third && unsafe { !(*fv).weakreflist.is_null() };
    drop(weak);
    let _ = fresh.revoke();
    if !fourth {
        return Err(bad("memoryview shape, hash or weak references"));
    }
    Ok(())
}
