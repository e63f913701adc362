//! The relay's one signal path: each signal a relay process handles sets a flag its loop polls.
//!
//! Handlers are registered with `signal-hook` (`signal_hook::flag::register`): the handler
//! only stores `true` into an atomic, which is async-signal-safe, and needs no thread. The
//! front and the supervisor poll the flags from their loops.
//!
//! | process | signal | effect |
//! |---|---|---|
//! | front ([`install`]) | SIGTERM, SIGINT | [`stop_requested`]: drain and exit |
//! | front ([`install`]) | SIGPIPE | ignored: a vanished client surfaces as EPIPE on its socket |
//! | supervisor ([`install_supervisor`]) | SIGTERM, SIGINT, SIGHUP | [`stop_requested`]: drain, stop, remove |
//! | supervisor ([`install_supervisor`]) | SIGUSR1 | [`take_revive`]: retry every failed worker now |
//! | supervisor ([`install_supervisor`]) | SIGPIPE | ignored: a closed stdout/stderr fails the write only |
//!
//! Workers get the same treatment from the worker SDK (`shmrelay_worker::stop_requested`).
//!
//! # Examples
//!
//! ```no_run
//! shmrelay::signals::install_supervisor()?;
//! while !shmrelay::signals::stop_requested() {
//!     if shmrelay::signals::take_revive() { /* retry failed workers */ }
//!     std::thread::sleep(std::time::Duration::from_millis(20));
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

/// Set by the stop signals.
static STOP: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);
/// Set by SIGUSR1 (supervisor): retry every failed worker now.
static REVIVE: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

/// Makes each of `signals` set `flag`.
fn register(flag: &Arc<AtomicBool>, signals: &[libc::c_int]) -> io::Result<()> {
    for &sig in signals {
        signal_hook::flag::register(sig, Arc::clone(flag))?;
    }
    Ok(())
}

/// The front's signals: SIGTERM and SIGINT set [`stop_requested`], and SIGPIPE is ignored (a
/// client that vanished must surface as EPIPE on its own socket, not kill the process).
/// Failures are ignored, as they can only come from invalid signal numbers.
pub fn install() {
    let _ = register(&STOP, &[SIGTERM, SIGINT]);
    ignore_sigpipe();
}

/// The supervisor's signals: SIGTERM, SIGINT and SIGHUP set [`stop_requested`]; SIGUSR1 sets
/// [`take_revive`]; SIGPIPE is ignored (a closed stdout or stderr, such as a `| tee` that a
/// Ctrl-C ended too, must fail a write, never kill the supervisor before its clean-up).
///
/// # Errors
///
/// The error of the first registration that failed.
pub fn install_supervisor() -> io::Result<()> {
    register(&STOP, &[SIGTERM, SIGINT, SIGHUP])?;
    ignore_sigpipe();
    register(&REVIVE, &[SIGUSR1])
}

/// SIG_IGN is a disposition, not a handler (signal-hook registers handlers only), and unlike
/// a handler it also makes writes to a closed socket fail with EPIPE without running anything.
fn ignore_sigpipe() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: SIG_IGN installs no code to run in a signal context.
    let _ = unsafe { sigaction(Signal::SIGPIPE, &ignore) };
}

/// True once a stop signal arrived.
pub fn stop_requested() -> bool {
    // Relaxed: the flag carries no data; the loop only needs to see it eventually.
    STOP.load(Ordering::Relaxed)
}

/// True if SIGUSR1 arrived since the last call (and clears it).
pub fn take_revive() -> bool {
    // Relaxed: as in `stop_requested`.
    REVIVE.swap(false, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revive_is_taken_once() {
        register(&REVIVE, &[SIGUSR1]).unwrap();
        assert!(!take_revive());
        // SAFETY: raise with a signal whose handler was just installed.
        assert_eq!(unsafe { libc::raise(SIGUSR1) }, 0);
        assert!(take_revive());
        assert!(!take_revive());
    }
}
