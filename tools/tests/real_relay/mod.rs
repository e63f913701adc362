//! Shared by the tests that run `relayctl` against a real relay: the workspace harness's
//! relay (`shmrelay_tests::Relay::start_named`: a named instance, in a directory of the test's
//! choosing, stopped with SIGTERM on drop) and running a command with a watchdog.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

// Not every test that includes this module starts the binary itself.
#[allow(unused_imports)]
pub use shmrelay_tests::{shmrelay_bin as relay_bin, Relay};

/// Longest any command may take before the test calls it hung.
const WATCHDOG: Duration = Duration::from_secs(60);

/// Runs `cmd` with a watchdog: panics if it outlives [`WATCHDOG`].
pub fn run(mut cmd: Command, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        let _ = out.read_to_end(&mut o);
        o
    });
    let err_reader = std::thread::spawn(move || {
        let mut e = Vec::new();
        let _ = err.read_to_end(&mut e);
        e
    });
    let end = Instant::now() + WATCHDOG;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("{what} hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}
