//! The relay's output to stderr: a log and error lines that never fail the process.
//!
//! `shmrelay 2>&1 | tee log` and Ctrl-C: SIGINT reaches `tee` too, and from then on every
//! write to stderr fails with EPIPE. `eprintln!` panics on that (exit 101, clean-up skipped),
//! and so does `tracing-subscriber`'s own fallback report of a failed write. Here a write
//! error loses the line, nothing else: the relay still drains, stops and removes its files.

use std::io::{self, IsTerminal, Write};

/// Stderr whose write errors are swallowed, as the log's writer (a `MakeWriter` through the
/// closure in [`init`]).
#[derive(Clone, Copy)]
struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// Installs the log: level from `RUST_LOG` (default `info`), to stderr, with colours only when
/// stderr is a terminal (a file or a pipe gets no escape codes).
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(|| QuietStderr)
        .with_ansi(io::stderr().is_terminal())
        // Its fallback for a failed write is `eprintln!`, which panics on a closed stderr.
        .log_internal_errors(false)
        .init();
}

/// `eprintln!` that cannot panic: the line is lost if stderr is closed.
pub fn error_line(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// `println!` that cannot panic: the line is lost if stdout is closed.
pub fn out_line(line: std::fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
