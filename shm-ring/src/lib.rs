//! Cross-process, lock-free, zero-copy record rings in shared memory.
//!
//! One [`Producer`] and one [`Consumer`], usually in two processes, share a ring in a memfd or a
//! `/dev/shm` file ([`ShmRing`]). The producer reserves space *in the ring* and fills it in place
//! (a `readv` from a socket can land there directly), commits records and publishes a batch with
//! one store; the consumer reads records in place as `&[u8]` and releases a batch with one store.
//! Neither side makes a system call per record: a side that finds nothing to do spins briefly,
//! then announces that it sleeps, and only then does the other side pay for a wakeup (futex, or
//! an [`EventFd`] for consumers that live in an event loop). See [`wake`] for why no wakeup is
//! lost.
//!
//! Shared memory written by another process is untrusted: every position and length read from
//! it is validated before use, and a corrupted ring yields a [`CorruptError`] naming what was
//! wrong, never a panic or an out-of-bounds access.
//!
//! # Example
//!
//! ```
//! use shm_ring::{Consumer, Meta, Producer, ShmRing};
//! use std::sync::Arc;
//!
//! let ring = Arc::new(ShmRing::create_memfd("example", 1 << 16)?);
//! let mut tx = Producer::new(ring.clone())?;
//! let mut rx = Consumer::new(ring)?;
//!
//! let mut grant = tx.reserve(5)?;
//! grant.copy_from_slice(b"hello");
//! grant.commit(5, Meta::tag(1).conn(7));
//! tx.publish();
//!
//! let mut last = 0;
//! for rec in rx.records()? {
//!     let rec = rec?;
//!     assert_eq!(rec.payload(), b"hello");
//!     last = rec.end();
//! }
//! rx.release(last);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # See also
//!
//! - `rtrb` and `bbqueue`: in-process SPSC rings with the same reserve/commit chunk style.
//! - iceoryx2: zero-copy IPC passing offsets into shared memory.
//! - Perfetto's `SharedRingBuffer`: a cross-process ring that also distrusts its peer.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks, missing_docs)]
#![allow(missing_docs)] // field-level docs live in `layout`; item docs are checked by review

mod error;
pub mod layout;
mod ring;
mod segment;
mod storage;
mod sync;
pub mod wake;

pub use error::{AttachError, CorruptError, CreateError, ReserveError};
pub use ring::{Consumer, Meta, Producer, Record, Records, WriteGrant};
pub use segment::{recv_fds, send_fds, RingSnapshot, RingView, ShmRing, SideSnapshot};
pub use storage::{HeapRing, RingStorage};
pub use wake::{monotonic_ns, Doorbell, EventFd};

/// True if a process with this pid exists (it may belong to another user).
pub fn process_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
