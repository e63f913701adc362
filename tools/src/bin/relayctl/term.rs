//! The terminal side of `relayctl top`: raw input mode (to read `q` without Enter), the
//! alternate screen, quit signals, and waiting for a key with a timeout. Every change made to
//! the terminal is undone by a guard's `Drop`, so an error or a panic (which unwinds) restores
//! it too.
//!
//! The terminal goes through crossterm and the signals through signal-hook (the relay's own
//! mechanism), so this file holds no `unsafe`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, terminal};

/// Set by SIGINT, SIGTERM and SIGHUP once [`QuitSignals::install`] ran.
pub struct QuitSignals(Arc<AtomicBool>);

impl QuitSignals {
    /// Makes SIGINT, SIGTERM and SIGHUP set a flag (see [`QuitSignals::requested`]) instead
    /// of killing the process, so `top` can restore the terminal before it exits. [`wait`]
    /// looks at the flag at least every 100 ms, so a signal that does not interrupt the wait
    /// is still seen promptly.
    pub fn install() -> io::Result<QuitSignals> {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ] {
            signal_hook::flag::register(sig, Arc::clone(&flag))?;
        }
        Ok(QuitSignals(flag))
    }

    /// True once a quit signal arrived.
    pub fn requested(&self) -> bool {
        // Relaxed: the flag carries no data with it; the handler's store only has to be seen
        // eventually, and the wait loop looks again within 100 ms.
        self.0.load(Ordering::Relaxed)
    }
}

/// Columns and rows of the terminal standard output shows, if it is one.
pub fn window_size() -> Option<(usize, usize)> {
    let (cols, rows) = terminal::size().ok()?;
    (cols > 0 && rows > 0).then_some((cols as usize, rows as usize))
}

/// Raw input on the controlling terminal (no line buffering, no echo, Ctrl-C arrives as a key
/// and is handled like `q`), restored on drop. Raw mode also turns off output processing:
/// lines written meanwhile end in `\r\n`.
pub struct RawMode(());

impl RawMode {
    /// Switches the terminal on standard input to raw mode.
    pub fn enable() -> io::Result<RawMode> {
        terminal::enable_raw_mode()?;
        Ok(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = terminal::disable_raw_mode();
    }
}

/// The alternate screen with a hidden cursor while it lives; the normal screen and the
/// cursor come back on drop.
pub struct AltScreen(());

impl AltScreen {
    pub fn enter(out: &mut impl Write) -> io::Result<AltScreen> {
        execute!(out, terminal::EnterAlternateScreen, cursor::Hide)?;
        Ok(AltScreen(()))
    }
}

impl Drop for AltScreen {
    fn drop(&mut self) {
        let _ = execute!(io::stdout(), cursor::Show, terminal::LeaveAlternateScreen);
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

/// Waits up to `timeout` for a quit key (with `keys`: the terminal is in [`RawMode`]), or
/// without `keys`, just for the time or a quit signal.
pub fn wait(quit: &QuitSignals, keys: bool, timeout: Duration) -> io::Result<Wake> {
    let deadline = Instant::now() + timeout;
    loop {
        if quit.requested() {
            return Ok(Wake::Quit);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Wake::Timeout);
        }
        let slice = left.clamp(Duration::from_millis(1), Duration::from_millis(100));
        if !keys {
            std::thread::sleep(slice);
            continue;
        }
        // Drain every event that is ready: a quit key may follow other input.
        while event::poll(slice)? {
            if let Event::Key(key) = event::read()? {
                if is_quit_key(&key) {
                    return Ok(Wake::Quit);
                }
            }
            if deadline <= Instant::now() {
                break;
            }
        }
    }
}

/// `q`, `Q`, Ctrl-C or Ctrl-D (the bytes 3 and 4 of a raw terminal).
fn is_quit_key(key: &KeyEvent) -> bool {
    if key.kind == KeyEventKind::Release {
        return false;
    }
    match key.code {
        KeyCode::Char('q' | 'Q') => true,
        KeyCode::Char('c' | 'd') => key.modifiers.contains(KeyModifiers::CONTROL),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quit_keys() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(is_quit_key(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(is_quit_key(&key(KeyCode::Char('Q'), KeyModifiers::SHIFT)));
        assert!(is_quit_key(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(is_quit_key(&key(KeyCode::Char('d'), KeyModifiers::CONTROL)));
        assert!(!is_quit_key(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!is_quit_key(&key(KeyCode::Char('x'), KeyModifiers::NONE)));
        assert!(!is_quit_key(&key(KeyCode::Enter, KeyModifiers::NONE)));
    }

    #[test]
    fn wait_without_keys_times_out() {
        let quit = QuitSignals(Arc::new(AtomicBool::new(false)));
        let t0 = Instant::now();
        assert_eq!(
            wait(&quit, false, Duration::from_millis(30)).unwrap(),
            Wake::Timeout
        );
        assert!(t0.elapsed() >= Duration::from_millis(30));
        quit.0.store(true, Ordering::Relaxed);
        assert_eq!(
            wait(&quit, false, Duration::from_secs(60)).unwrap(),
            Wake::Quit
        );
    }
}
