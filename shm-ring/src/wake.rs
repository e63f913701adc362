//! Parking and waking across processes.
//!
//! # The no-lost-wakeup argument
//!
//! Each ring has two sleep words: `consumer_sleep` (the consumer waits for data) and
//! `producer_sleep` (the producer waits for space). Take the consumer; the producer's wait for
//! space is the mirror image with `head` in place of `tail`.
//!
//! ```text
//! consumer (parks)                          producer (publishes)
//! C1 consumer_sleep.store(1)                P1 tail.store(new, Release)
//! C2 fence(SeqCst)                          P2 fence(SeqCst)
//! C3 if tail.load(Acquire) moved: cancel    P3 if consumer_sleep.load() == 1
//! C4 futex_wait(consumer_sleep, 1)          P4     consumer_sleep.swap(0); futex_wake / eventfd
//! ```
//!
//! The two SeqCst fences are totally ordered. If C2 comes first, P3 (after P2) sees the 1 written
//! at C1, so the producer wakes the consumer. If P2 comes first, C3 (after C2) sees the tail
//! written at P1, so the consumer does not sleep. Both may happen (a spurious wake), never
//! neither. The wake in P4 cannot be lost to a consumer that has not reached C4 yet: the futex
//! sleeps only while the word still holds 1, and P4 set it to 0 before waking; an eventfd keeps
//! its count until read.
//!
//! The producer's check at P3 is one load of a line it rarely finds changed, so a producer under
//! load makes no system call per record: only a consumer that announced it sleeps costs a wake.
//!
//! Every write of a sleep word is a `swap`, not a plain store. Under the memory model a store
//! would do, but loom (0.7) keeps the modification order of a store racing an RMW partial and
//! then reports wakeups lost that cannot be (tokio-rs/loom#282); with RMWs only, it verifies
//! repeated park cycles too. The cost is one locked instruction on the park path only.
//!
//! The futex is shared (no `FUTEX_PRIVATE_FLAG`): the word lives in memory mapped by two
//! processes, and a private futex would key on the virtual address of one of them.
//!
//! Both fences stay SeqCst fences. An asymmetric pair (a compiler fence at P2, and at C2
//! `membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)`, which runs a full barrier on every CPU that
//! runs a registered process) would keep this argument, but only if every process on the ring
//! registered: one that cannot (seccomp, an older binary) would lose wakeups against a peer
//! that dropped its fence. Adopting it needs a per-ring agreement and a layout version bump;
//! see "Issue 14" in the crate's README for the measurements.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::sync::AtomicU32;

/// How one side wakes the other after it announced that it sleeps.
#[derive(Clone, Debug, Default)]
pub enum Doorbell {
    /// `FUTEX_WAKE` on the sleep word: for a peer blocked in `wait`.
    #[default]
    Futex,
    /// Write to an eventfd the peer polls in its event loop (the fd may be shared by several
    /// rings that the same peer consumes).
    EventFd(Arc<EventFd>),
    /// Both: for a peer that may block either way.
    Both(Arc<EventFd>),
}

impl Doorbell {
    pub(crate) fn ring(&self, word: &AtomicU32, header: &crate::layout::RingHeader) {
        let _ = header;
        match self {
            Doorbell::Futex => futex_wake(word, header),
            Doorbell::EventFd(fd) => fd.notify(),
            Doorbell::Both(fd) => {
                futex_wake(word, header);
                fd.notify();
            }
        }
    }
}

/// A Linux eventfd: a counter an event loop can poll. Used as a doorbell by rings whose
/// consumer lives in an event loop.
///
/// # Examples
///
/// ```
/// let fd = shm_ring::EventFd::new().unwrap();
/// fd.notify();
/// assert!(fd.drain());
/// assert!(!fd.drain());
/// ```
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new non-blocking eventfd with close-on-exec set.
    ///
    /// # Errors
    ///
    /// The `eventfd2` system call's error (out of fds).
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wraps an inherited eventfd (e.g. one a supervisor passed to a child process).
    pub fn from_owned(fd: OwnedFd) -> EventFd {
        EventFd(fd)
    }

    /// Adds one to the counter, waking any poller. Never blocks: a full counter (2^64 - 2
    /// pending wakes) already means "readable".
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an fd we own.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter; true if it was non-zero.
    pub fn drain(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from an fd we own.
        let n = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        n == 8 && v > 0
    }

    /// Blocks until the counter is non-zero or `timeout` passes, then drains it. True if woken.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: one valid pollfd, count 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        r > 0 && self.drain()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Sleeps while `*word == expected`, at most `timeout`. Returns on wake, timeout, signal or
/// a changed word; the caller re-checks its condition in every case.
#[cfg(not(loom))]
pub(crate) fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    timeout: Option<Duration>,
    _h: &crate::layout::RingHeader,
) {
    futex_wait_shared(word, expected, timeout);
}

/// Wakes one sleeper on `word`.
#[cfg(not(loom))]
pub(crate) fn futex_wake(word: &AtomicU32, _h: &crate::layout::RingHeader) {
    futex_wake_shared(word);
}

/// `FUTEX_WAIT` on a word that may live in memory shared between processes (no
/// `FUTEX_PRIVATE_FLAG`): sleeps while `*word == expected`, at most `timeout`, and returns on
/// a wake, the timeout, a signal or a changed word; the caller re-checks its condition in every
/// case. The ring parks with it; it is public for programs that park on a ring's sleep word
/// after [`Consumer::prepare_park`](crate::Consumer::prepare_park) themselves (and for
/// benchmarks that measure the raw futex against the ring).
///
/// # Examples
///
/// ```
/// use std::sync::atomic::AtomicU32;
/// use std::time::Duration;
///
/// let word = AtomicU32::new(0);
/// // The word is not 1: returns at once instead of sleeping.
/// shm_ring::wake::futex_wait_shared(&word, 1, Some(Duration::from_secs(5)));
/// ```
#[cfg(not(loom))]
pub fn futex_wait_shared(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, 4-byte aligned u32 (AtomicU32 has u32's layout) for the duration
    // of the call; the timespec pointer is null or points at a live local. FUTEX_WAIT without the
    // private flag keys on the physical page, which is what a word shared between processes needs.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
        );
    }
}

/// `FUTEX_WAKE` of one sleeper on `word`, shared between processes like
/// [`futex_wait_shared`].
#[cfg(not(loom))]
pub fn futex_wake_shared(word: &AtomicU32) {
    // SAFETY: `word` is a live aligned u32; FUTEX_WAKE only uses its address as a key.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1);
    }
}

/// A model of a futex for loom: checking the word and going to sleep are atomic with respect to
/// a wake, which is the property the protocol above relies on.
#[cfg(loom)]
#[derive(Default)]
pub(crate) struct LoomFutex {
    lock: loom::sync::Mutex<()>,
    cv: loom::sync::Condvar,
}

#[cfg(loom)]
pub(crate) fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    _timeout: Option<Duration>,
    h: &crate::layout::RingHeader,
) {
    use crate::sync::Ordering;
    let guard = h.futex.lock.lock().unwrap();
    if word.load(Ordering::SeqCst) == expected {
        drop(h.futex.cv.wait(guard).unwrap());
    }
}

#[cfg(loom)]
pub(crate) fn futex_wake(_word: &AtomicU32, h: &crate::layout::RingHeader) {
    let _guard = h.futex.lock.lock().unwrap();
    h.futex.cv.notify_all();
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of the liveness words (comparable across processes).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn eventfd_counts_and_drains() {
        let fd = EventFd::new().unwrap();
        assert!(!fd.drain());
        fd.notify();
        fd.notify();
        assert!(fd.drain());
        assert!(!fd.wait(Some(Duration::from_millis(1))));
    }

    #[test]
    fn futex_wait_returns_when_word_differs() {
        let h = crate::layout::RingHeader::boxed_zeroed();
        // The word is 0, we expect 1: must return at once rather than sleep.
        futex_wait(&h.consumer_sleep, 1, None, &h);
        // Word matches: returns at the timeout.
        let t = std::time::Instant::now();
        futex_wait(&h.consumer_sleep, 0, Some(Duration::from_millis(5)), &h);
        assert!(t.elapsed() >= Duration::from_millis(4));
    }
}
