//! The C ABI of the shmrelay worker SDK: workers written in C (or any language that calls C)
//! with frames read in place from shared memory, as Rust workers have them.
//!
//! The header is `include/shmrelay_worker.h`, generated from this crate by cbindgen (the
//! test `header_is_current` fails when it is stale; `SHMRELAY_BLESS=1` rewrites it). Link
//! `libshmrelay_worker_c.a` (plus `-lpthread -ldl -lm`) or `libshmrelay_worker_c.so`.
//!
//! # Example: an echo worker in C
//!
//! ```c
//! static void on_frame(void *user, shmrelay_conn conn, const uint8_t *frame, size_t len,
//!                      bool redelivered, shmrelay_out *out) {
//!     shmrelay_send(out, conn, frame, len);
//! }
//!
//! int main(void) {
//!     shmrelay_worker *w;
//!     if (shmrelay_worker_from_env(&w) != SHMRELAY_STATUS_OK) return 2;
//!     shmrelay_callbacks cb = { .on_frame = on_frame };
//!     return shmrelay_worker_run(w, &cb, NULL) == SHMRELAY_STATUS_OK ? 0 : 1;
//! }
//! ```
//!
//! `examples/echo.c` is the complete program, `examples/kv.c` a key-value store and
//! `examples/chat.c` a worker with its own event loop; `tests/c_workers.rs` compiles them and
//! runs them behind the relay.
//!
//! # Ownership and lifetimes
//!
//! - A `shmrelay_worker` belongs to the caller from `shmrelay_worker_from_env` to
//!   `shmrelay_worker_free`.
//! - A frame, a peer address and an `out` handle are borrowed for the callback they are given
//!   to; they are invalid once it returns. Copy what you keep.
//! - Buffers from `shmrelay_reserve` and `shmrelay_send_with` belong to the library and are
//!   writable until the commit, or the fill function's return.
//! - Strings the library returns (`shmrelay_last_error`, `shmrelay_close_reason_name`) are the
//!   library's; never free them.
//! - No panic crosses the ABI: each exported function catches them and returns
//!   `SHMRELAY_STATUS_PANIC`. Callbacks must not unwind either (no C++ exception or longjmp).
//!
//! # Not yet covered
//!
//! The `websocket` codec (issue 16) does not exist yet; when it does, `on_frame` needs the
//! message kind (text or binary) and `send` a way to choose it. Nothing here is invented for
//! it before the codec is.
//!
//! See also: the Rust SDK (`shmrelay-worker`, whose `Worker` and `Out` this wraps) and
//! workers/README.md (the contract with the relay).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_char, CString};
use std::sync::OnceLock;

#[cfg(test)]
mod abi_tests;
#[cfg(test)]
mod abi_ws_tests;
mod error;
mod out;
mod worker;

pub use error::{shmrelay_last_error, Status};
pub use out::{
    shmrelay_close, shmrelay_close_with, shmrelay_commit, shmrelay_frame_kind, shmrelay_reserve,
    shmrelay_send, shmrelay_send_kind, shmrelay_send_with, shmrelay_upgrade_info, Fill,
    MessageKind, Out, Upgrade,
};
pub use worker::{
    shmrelay_stop_requested, shmrelay_worker_codec, shmrelay_worker_fd, shmrelay_worker_free,
    shmrelay_worker_from_env, shmrelay_worker_index, shmrelay_worker_poll_once,
    shmrelay_worker_run, shmrelay_worker_set_max_reply, Callbacks, OnClose, OnFrame, OnOpen,
    Worker,
};

/// A connection: unique within one relay instance for its lifetime (front, generation and
/// slot packed in 64 bits). Send to any live connection, not only the one being answered.
pub type Conn = u64;

/// The codec of a worker's listener (`SHMRELAY_CODEC`), which decides what a frame is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Frames are payloads; `send` adds the 4-byte big-endian length prefix.
    LengthPrefixed = 0,
    /// Frames are lines without their end; `send` adds `\n`.
    Line = 1,
    /// Frames are whole raw Redis commands; `send` writes its bytes as they are, which must
    /// be whole RESP values.
    Resp = 2,
    /// Frames are whole WebSocket messages (text or binary); `send` writes one binary
    /// message, or one of the kind being answered while answering.
    WebSocket = 3,
}

impl From<shmrelay_worker::Codec> for Codec {
    fn from(c: shmrelay_worker::Codec) -> Codec {
        match c {
            shmrelay_worker::Codec::LengthPrefixed => Codec::LengthPrefixed,
            shmrelay_worker::Codec::Line => Codec::Line,
            shmrelay_worker::Codec::Resp => Codec::Resp,
            shmrelay_worker::Codec::WebSocket => Codec::WebSocket,
        }
    }
}

/// Why a connection closed: the `reason` of `on_close` (the relay's codes, also used in its
/// stats).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Anything not listed (also codes this version does not know).
    Other = 0,
    /// The client closed its end.
    ClientEof = 1,
    /// Nothing arrived within the idle timeout.
    IdleTimeout = 2,
    /// No answer to the front's heartbeats within the heartbeat timeout.
    HeartbeatTimeout = 3,
    /// Malformed or oversized frame.
    ProtocolError = 4,
    /// A worker asked for the close.
    WorkerRequest = 5,
    /// The client did not read its replies and its queue passed the bound.
    SlowConsumer = 6,
    /// The worker pool serving the connection failed.
    WorkerGone = 7,
    /// The relay is shutting down.
    Shutdown = 8,
    /// Refused by admission control.
    Rejected = 9,
    /// A socket error (reset by peer, ...).
    IoError = 10,
    /// The front process that owned the connection died.
    FrontGone = 11,
}

/// The stable snake_case name of a close reason code (`"client_eof"`, ...; `"other"` for an
/// unknown code): a static NUL-terminated string, never to be freed.
#[no_mangle]
pub extern "C" fn shmrelay_close_reason_name(reason: u32) -> *const c_char {
    static NAMES: OnceLock<Vec<CString>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        shmrelay_worker::CloseReason::ALL
            .iter()
            .map(|r| CString::new(r.as_str()).unwrap_or_default())
            .collect()
    });
    let r = shmrelay_worker::CloseReason::from_code(reason.into());
    // `ALL` is in code order, so a code is its index.
    names
        .get(r as usize)
        .map_or(c"other".as_ptr(), |n| n.as_ptr())
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use shmrelay_worker::CloseReason as Sdk;

    use super::*;

    /// The mirror of the SDK's reasons, checked for every variant (a new one fails to
    /// compile here until it is added to the C enum).
    fn mirror(r: Sdk) -> CloseReason {
        match r {
            Sdk::Other => CloseReason::Other,
            Sdk::ClientEof => CloseReason::ClientEof,
            Sdk::IdleTimeout => CloseReason::IdleTimeout,
            Sdk::HeartbeatTimeout => CloseReason::HeartbeatTimeout,
            Sdk::ProtocolError => CloseReason::ProtocolError,
            Sdk::WorkerRequest => CloseReason::WorkerRequest,
            Sdk::SlowConsumer => CloseReason::SlowConsumer,
            Sdk::WorkerGone => CloseReason::WorkerGone,
            Sdk::Shutdown => CloseReason::Shutdown,
            Sdk::Rejected => CloseReason::Rejected,
            Sdk::IoError => CloseReason::IoError,
            Sdk::FrontGone => CloseReason::FrontGone,
        }
    }

    #[test]
    fn close_reasons_have_the_sdk_codes_and_names() {
        for &r in Sdk::ALL {
            assert_eq!(mirror(r) as u32, r as u32, "{r}");
            // SAFETY: a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(shmrelay_close_reason_name(r as u32)) };
            assert_eq!(name.to_str().unwrap(), r.as_str());
        }
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(shmrelay_close_reason_name(999)) };
        assert_eq!(unknown.to_str().unwrap(), "other");
    }
}
