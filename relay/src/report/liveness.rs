//! Whether a process named by a pid is there and making progress.

use std::io;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A ring side or process that has not touched its ring for longer than this while the ring
/// holds unconsumed bytes is reported [`Liveness::Stalled`].
pub const STALL_AFTER: Duration = Duration::from_secs(1);

/// Whether a process is there and making progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// The process exists and is not stopped.
    Alive,
    /// The process exists but makes no progress: it is stopped (SIGSTOP, a debugger), or, for
    /// the consumer of a ring, it has not touched the ring for more than [`STALL_AFTER`] while
    /// the ring holds unconsumed records.
    Stalled,
    /// A pid is recorded but no such process exists (or it is a zombie).
    Dead,
    /// No pid recorded (never attached, or detached cleanly).
    None,
}

impl Liveness {
    /// Stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Stalled => "stalled",
            Liveness::Dead => "dead",
            Liveness::None => "none",
        }
    }
}

/// Liveness of a process by pid: `none` for 0, `dead` if it does not exist or is a zombie,
/// `stalled` if it is stopped, else `alive`.
pub fn process_liveness(pid: u32) -> Liveness {
    if pid == 0 {
        return Liveness::None;
    }
    match crate::procfs::stat(pid) {
        Ok(s) if s.is_zombie() => Liveness::Dead,
        Ok(s) if s.is_stopped() => Liveness::Stalled,
        Ok(_) => Liveness::Alive,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Liveness::Dead,
        // /proc unavailable or hidden: fall back to kill(pid, 0).
        Err(_) if shm_ring::process_alive(pid) => Liveness::Alive,
        Err(_) => Liveness::Dead,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_of_pids() {
        assert_eq!(process_liveness(0), Liveness::None);
        assert_eq!(process_liveness(std::process::id()), Liveness::Alive);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(process_liveness(pid), Liveness::Dead);
    }
}
