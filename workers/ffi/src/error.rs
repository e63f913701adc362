//! Status codes, the calling thread's last error message, and the guard that keeps every panic
//! on the Rust side of the ABI.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use shmrelay_worker::{SendError, WorkerError};

/// What a call of this library returned. Every function that can fail returns one of these;
/// on anything but `SHMRELAY_STATUS_OK`, `shmrelay_last_error()` describes the failure.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// A variable the relay sets is missing or malformed: the program was not started by
    /// shmrelay (`shmrelay_worker_from_env`).
    Env = 1,
    /// Attaching to a ring the relay handed over failed (`shmrelay_worker_from_env`).
    Attach = 2,
    /// A front wrote invalid positions or records into a request ring. The worker cannot go
    /// on: exit, and the relay starts a replacement.
    Corrupt = 3,
    /// The connection id names a front this worker has no ring to.
    UnknownFront = 4,
    /// The reply is larger than the worker's reply limit (`shmrelay_worker_set_max_reply`;
    /// for `length-prefixed` also at most 4 GiB - 1).
    TooLarge = 5,
    /// A long reply broke off after its first pieces were in the ring (the front closes the
    /// connection rather than let its stream of replies shift).
    Partial = 6,
    /// The worker is stopping (SIGTERM or SIGINT arrived) while it waited for ring space.
    Stopping = 7,
    /// The front corrupted the reply ring's positions.
    CorruptReply = 8,
    /// A null pointer where an object is required, a missing `on_frame` callback, or a
    /// length out of range.
    InvalidArgument = 9,
    /// The object is in use: a call from inside a callback into the worker that is running
    /// it (`run`, `poll_once`, `free`), a call on an `out` from inside its own `send_with`
    /// fill function, or a second `reserve` before the first was committed.
    Busy = 10,
    /// `shmrelay_commit` without an open reservation.
    NoReservation = 11,
    /// A panic inside the library was caught (a bug in it); the call had no further effect.
    Panic = 12,
}

/// A failure on its way to the caller: a status and a message for `shmrelay_last_error`.
#[derive(Debug)]
pub(crate) struct Error {
    pub(crate) status: Status,
    pub(crate) message: String,
}

impl Error {
    pub(crate) fn new(status: Status, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }

    /// A null or otherwise unusable argument of `function`.
    pub(crate) fn invalid(function: &str, what: &str) -> Error {
        Error::new(Status::InvalidArgument, format!("{function}: {what}"))
    }

    /// Stores the message as this thread's last error and gives back the status.
    fn record(self) -> Status {
        set_last_error(&self.message);
        self.status
    }
}

impl From<WorkerError> for Error {
    fn from(e: WorkerError) -> Error {
        let status = match e {
            WorkerError::Env { .. } => Status::Env,
            WorkerError::Attach { .. } => Status::Attach,
            WorkerError::Corrupt { .. } => Status::Corrupt,
        };
        Error::new(status, e.to_string())
    }
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Error {
        let status = match e {
            SendError::UnknownFront(_) => Status::UnknownFront,
            SendError::TooLarge { .. } => Status::TooLarge,
            SendError::Partial { .. } => Status::Partial,
            SendError::Stopping => Status::Stopping,
            SendError::Corrupt => Status::CorruptReply,
            SendError::InvalidCloseCode(_) => Status::InvalidArgument,
        };
        Error::new(status, e.to_string())
    }
}

thread_local! {
    /// The message of the last failed call on this thread (empty before the first).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A NUL inside the message would cut it short in C: show it instead.
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Runs the body of an exported function: a failure is recorded as the thread's last error,
/// and a panic is caught here, so that it never unwinds into C (where it would abort the
/// process or worse).
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Error>) -> Status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => Status::Ok,
        Ok(Err(e)) => e.record(),
        Err(panic) => Error::new(Status::Panic, panic_message(panic.as_ref())).record(),
    }
}

/// The text of a caught panic payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("panic in shmrelay_worker: {text}")
}

/// The message of the last call on this thread that failed: a NUL-terminated UTF-8 string,
/// empty if no call failed yet.
///
/// Ownership: the string belongs to the library. It stays valid until the next call of this
/// library that fails on the same thread; copy it to keep it longer. Never free it.
#[no_mangle]
pub extern "C" fn shmrelay_last_error() -> *const c_char {
    // A thread-local being destroyed (the thread is exiting) has no message to give.
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    fn last_error() -> String {
        // SAFETY: the library returns a valid NUL-terminated string owned by this thread.
        unsafe { CStr::from_ptr(shmrelay_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_failure_sets_the_message_and_a_success_keeps_it() {
        assert_eq!(
            guard(|| Err(Error::new(Status::Busy, "in use\0here"))),
            Status::Busy
        );
        assert_eq!(last_error(), "in use\\0here");
        assert_eq!(guard(|| Ok(())), Status::Ok);
        assert_eq!(last_error(), "in use\\0here");
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let s = guard(|| panic!("boom {}", 7));
        std::panic::set_hook(prev);
        assert_eq!(s, Status::Panic);
        assert_eq!(last_error(), "panic in shmrelay_worker: boom 7");
    }

    #[test]
    fn sdk_errors_map_to_their_codes() {
        assert_eq!(
            Error::from(SendError::UnknownFront(3)).status,
            Status::UnknownFront
        );
        assert_eq!(Error::from(SendError::Stopping).status, Status::Stopping);
        let e = Error::from(WorkerError::Env {
            var: "SHMRELAY_CHANNELS",
            problem: "missing".into(),
        });
        assert_eq!(e.status, Status::Env);
        assert!(e.message.contains("SHMRELAY_CHANNELS"), "{}", e.message);
    }
}
