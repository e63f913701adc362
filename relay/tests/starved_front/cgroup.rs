//! Starving one process of CPU on purpose: a cgroup CPU quota keeps it runnable but off the
//! CPU, which the kernel counts as run-queue wait (`/proc/PID/schedstat`, second field).
//!
//! Why a quota and not busy-loop hogs: it starves only the process under test (the machine is
//! shared), it needs no real-time policy, and it is exact: with 1 ms per 1 s period the
//! process runs at most once a second, so its loop stamps activity at most once a second.
//! cgroup v1 (`cpu.cfs_quota_us`) and v2 (`cpu.max`) are both handled.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest quota period the kernel takes (1 s): the longest a throttled process waits.
pub const PERIOD: Duration = Duration::from_secs(1);
/// CPU time per period the throttled process gets.
pub const QUOTA: Duration = Duration::from_millis(1);

/// Prefix of the cgroups made here, so that those a killed test left behind are removed.
const PREFIX: &str = "shmrelay-test-starve-";

/// A process held in its own cgroup with a CPU quota of [`QUOTA`] per [`PERIOD`]. Dropping it
/// moves the process back to the cgroup it came from and removes the cgroup (a panicking
/// test unwinds through the drop, so the front never stays throttled).
pub struct Throttle {
    pid: u32,
    dir: PathBuf,
    /// The `cgroup.procs` file of the cgroup the process came from.
    home: PathBuf,
}

/// The hierarchy that has the cpu controller: its mount point and whether it is cgroup v2.
struct Hierarchy {
    root: PathBuf,
    v2: bool,
}

impl Throttle {
    /// Throttles `pid`. `Err` when this machine offers no writable cgroup cpu controller (a
    /// container without one, a read-only /sys/fs/cgroup).
    pub fn start(pid: u32) -> io::Result<Throttle> {
        let h = hierarchy()?;
        remove_stale(&h.root);
        let home = h.root.join(own_cgroup(pid, h.v2)?).join("cgroup.procs");
        let dir = h.root.join(format!("{PREFIX}{}", std::process::id()));
        if h.v2 {
            // The controller must be handed down from the root to its children.
            let _ = fs::write(h.root.join("cgroup.subtree_control"), "+cpu");
        }
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let t = Throttle { pid, dir, home };
        let (quota, period) = (QUOTA.as_micros(), PERIOD.as_micros());
        if h.v2 {
            fs::write(t.dir.join("cpu.max"), format!("{quota} {period}"))?;
        } else {
            fs::write(t.dir.join("cpu.cfs_period_us"), period.to_string())?;
            fs::write(t.dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        }
        fs::write(t.dir.join("cgroup.procs"), pid.to_string())?;
        Ok(t)
    }

    /// Times the kernel held the group back for its quota, and for how long in all.
    pub fn throttled(&self) -> (u64, Duration) {
        let text = fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let usec = field("throttled_usec ");
        let nsec = field("throttled_time ");
        (
            field("nr_throttled "),
            Duration::from_nanos(nsec.max(usec * 1000)),
        )
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // The process may be gone already (killed, replaced): then the group is empty anyway.
        let _ = fs::write(&self.home, self.pid.to_string());
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

/// Finds the cpu controller's hierarchy in /proc/self/mountinfo: a v1 `cgroup` mount with the
/// `cpu` option, else a `cgroup2` mount whose `cgroup.controllers` lists `cpu`.
fn hierarchy() -> io::Result<Hierarchy> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let mut v2 = None;
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = pre.split(' ').nth(4) else {
            continue;
        };
        let mut post = post.split(' ');
        let (fstype, options) = (post.next(), post.nth(1).unwrap_or(""));
        match fstype {
            Some("cgroup") if options.split(',').any(|o| o == "cpu") => {
                return Ok(Hierarchy {
                    root: point.into(),
                    v2: false,
                });
            }
            Some("cgroup2") => {
                let controllers = fs::read_to_string(Path::new(point).join("cgroup.controllers"))
                    .unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "cpu") {
                    v2.get_or_insert(PathBuf::from(point));
                }
            }
            _ => {}
        }
    }
    v2.map(|root| Hierarchy { root, v2: true })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup cpu controller"))
}

/// The path (relative to the hierarchy's root) of the cgroup `pid` is in.
fn own_cgroup(pid: u32, v2: bool) -> io::Result<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let mine = if v2 {
                id == "0" && controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == "cpu")
            };
            mine.then(|| path.trim_start_matches('/').to_owned())
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cpu cgroup in /proc/PID/cgroup"))
}

/// Removes the cgroups that killed runs left behind: those named after a test process that
/// is gone (`rmdir` refuses one that still holds a process).
fn remove_stale(root: &Path) {
    for e in fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if !Path::new("/proc").join(owner).exists() {
            let _ = fs::remove_dir(e.path());
        }
    }
}
