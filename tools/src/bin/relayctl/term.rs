//! The terminal side of `relayctl top`: raw input mode (to read `q` without Enter), the
//! alternate screen, quit signals, and waiting for a key with a timeout. Every change made to
//! the terminal is undone by a guard's `Drop`, so an error or a panic (which unwinds) restores
//! it too.

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by the SIGINT/SIGTERM/SIGHUP handler.
static QUIT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_quit_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    QUIT.store(true, Ordering::Relaxed);
}

/// Makes SIGINT, SIGTERM and SIGHUP set a flag (see [`quit_requested`]) instead of killing
/// the process, and interrupt a blocking `poll` (no `SA_RESTART`), so `top` can restore the
/// terminal before it exits.
pub fn install_quit_handlers() -> io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler
        // only stores to an atomic, which is async-signal-safe; sigemptyset gets a valid
        // pointer into the struct we own.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_quit_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// True once a quit signal arrived.
pub fn quit_requested() -> bool {
    QUIT.load(Ordering::Relaxed)
}

/// True if `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor; an invalid fd yields 0.
    unsafe { libc::isatty(fd) == 1 }
}

/// Rows and columns of the terminal on `fd`, if it is one.
pub fn window_size(fd: RawFd) -> Option<(usize, usize)> {
    let mut ws = MaybeUninit::<libc::winsize>::zeroed();
    // SAFETY: TIOCGWINSZ writes one winsize into the pointer we pass, which points to one.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, ws.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: zero-initialised, and filled by the successful ioctl.
    let ws = unsafe { ws.assume_init() };
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row as usize, ws.ws_col as usize))
}

/// Non-canonical, no-echo input on a terminal, restored on drop. Output processing is kept
/// (so `\n` still moves to the start of the next line); ISIG is cleared, so Ctrl-C arrives as
/// byte 3 and is handled like `q`.
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// Switches the terminal on `fd` to raw input.
    pub fn enable(fd: RawFd) -> io::Result<RawMode> {
        let mut t = MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: tcgetattr fills the termios we point to.
        if unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: filled by the successful tcgetattr.
        let saved = unsafe { t.assume_init() };
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL);
        raw.c_cc[libc::VMIN] = 0;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the termios read from this fd in `enable`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The alternate screen with a hidden cursor while it lives; the normal screen and the
/// cursor come back on drop.
pub struct AltScreen;

impl AltScreen {
    pub fn enter(out: &mut impl Write) -> io::Result<AltScreen> {
        out.write_all(b"\x1b[?1049h\x1b[?25l")?;
        out.flush()?;
        Ok(AltScreen)
    }
}

impl Drop for AltScreen {
    fn drop(&mut self) {
        let mut out = io::stdout().lock();
        let _ = out.write_all(b"\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
    }
}

/// What ended a wait.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// The time passed.
    Timeout,
    /// `q`, `Q`, Ctrl-C, Ctrl-D or a quit signal.
    Quit,
}

/// Waits up to `timeout` for a quit key on `input` (a terminal in raw mode), or without
/// `input`, just for the time or a quit signal.
pub fn wait(input: Option<RawFd>, timeout: Duration) -> io::Result<Wake> {
    let deadline = Instant::now() + timeout;
    loop {
        if quit_requested() {
            return Ok(Wake::Quit);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Wake::Timeout);
        }
        let ms = left.as_millis().clamp(1, 100) as libc::c_int;
        let Some(fd) = input else {
            std::thread::sleep(Duration::from_millis(ms as u64));
            continue;
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        if pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            // The terminal went away: nobody is watching.
            return Ok(Wake::Quit);
        }
        let mut buf = [0u8; 64];
        // SAFETY: reads at most buf.len() bytes into buf.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(Wake::Quit);
        }
        if buf[..r as usize]
            .iter()
            .any(|&b| matches!(b, b'q' | b'Q' | 3 | 4))
        {
            return Ok(Wake::Quit);
        }
    }
}
