//! One shim for every atomic the ring touches, so that `--cfg loom` swaps them all for loom's
//! model-checked versions. Nothing in this crate names `std::sync::atomic` directly.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Busy-wait hint; under loom a yield, so the model explores the other thread.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}
