//! Autobahn TestSuite conformance of the websocket listener (issue 16): runs
//! `tools/ws/autobahn.sh` (kosoku against a websocket listener with the echo worker, cases
//! 1.* through 10.*, 301 cases: about 20 s with a debug build here) on the relay binary of this
//! build, and passes if every verdict is OK, NON-STRICT or INFORMATIONAL. The script's `--ci`
//! selection (1.*-7.*, 10.* and the smaller 9.* cases) is there for slower machines; the
//! result of the full run is in tests/README.md.
//!
//! Needs kosoku in a venv (`bash tools/ws/ci-setup.sh`; `SHMRELAY_WS_VENV`, default
//! `target/ws-venv`). Without it the test prints `SKIPPED` and passes, unless
//! `SHMRELAY_REQUIRE_KOSOKU=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use shmrelay_tests::{shmrelay_bin, Watchdog};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[test]
fn autobahn_cases_1_to_10_pass_against_the_websocket_listener() {
    let venv = std::env::var_os("SHMRELAY_WS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/ws-venv"));
    if !venv.join("bin/kosoku").is_file() {
        if std::env::var("SHMRELAY_REQUIRE_KOSOKU").is_ok_and(|v| v == "1") {
            panic!(
                "SHMRELAY_REQUIRE_KOSOKU=1 but no kosoku in {} (bash tools/ws/ci-setup.sh)",
                venv.display()
            );
        }
        eprintln!(
            "SKIPPED: no kosoku in {} (bash tools/ws/ci-setup.sh)",
            venv.display()
        );
        return;
    }
    // The script stops its relay itself; the watchdog only guards against a hang of the test.
    let _dog = Watchdog::new("autobahn", Duration::from_secs(900));
    let bin = shmrelay_bin();
    let out = bin.parent().expect("profile directory").join("autobahn");
    let status = Command::new("bash")
        .arg(workspace().join("tools/ws/autobahn.sh"))
        .args(["--timeout", "600", "--out"])
        .arg(&out)
        .env("SHMRELAY_BIN", bin)
        .env("SHMRELAY_WS_VENV", &venv)
        .status()
        .expect("run tools/ws/autobahn.sh");
    assert!(
        status.success(),
        "Autobahn cases failed ({status}); report in {}/index.html",
        out.display()
    );
}
