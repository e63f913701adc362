//! The one reader of `/proc`: process state, memory, open files, environment, and the few
//! system facts the tools check. Everything else asks here instead of parsing `/proc` itself.

use std::io;

/// The fields of `/proc/PID/stat` the relay and its tools use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// The state letter: `R`, `S`, `D`, `T` (stopped), `Z` (zombie), ...
    pub state: char,
    /// The parent's pid.
    pub ppid: u32,
    /// User plus system CPU time, in clock ticks ([`clock_ticks_per_sec`]).
    pub cpu_ticks: u64,
}

impl Stat {
    /// Exited, not yet reaped (or being torn down).
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// Stopped by a signal or a tracer.
    pub fn is_stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }
}

/// Reads `/proc/PID/stat`. `NotFound` means there is no such process.
///
/// ```
/// let me = shmrelay::procfs::stat(std::process::id()).unwrap();
/// assert!(!me.is_zombie());
/// ```
pub fn stat(pid: u32) -> io::Result<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc stat"))
}

/// "pid (comm) state ppid ... utime(14) stime(15) ...": the command name may hold spaces and
/// parentheses, so the fields are counted after its last ')'.
fn parse_stat(text: &str) -> Option<Stat> {
    let mut f = text.rsplit_once(')')?.1.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let mut f = f.skip(9);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        cpu_ticks: utime + stime,
    })
}

/// Clock ticks per second, the unit of [`Stat::cpu_ticks`].
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a configuration value; it has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU time (user plus system) `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(stat(pid).ok()?.cpu_ticks as f64 / clock_ticks_per_sec())
}

/// The scheduler's times of a thread, from `/proc/PID/schedstat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedTimes {
    /// Nanoseconds on a CPU (kept current while it runs, to within a scheduler tick).
    pub on_cpu_ns: u64,
    /// Nanoseconds runnable but waiting for a CPU (held back by other work, or by a cgroup's
    /// CPU quota). A wait is added when the thread next gets a CPU: one still going on is
    /// not in it yet, however long it has lasted.
    pub run_queue_wait_ns: u64,
}

/// [`SchedTimes`] of `pid`'s main thread (`None` if it is gone or the kernel keeps no such
/// statistics).
///
/// ```
/// use shmrelay::procfs::sched_times;
/// // (A thread still in its first slice may show 0 ns on a CPU: the figure is brought up to
/// // date at scheduler ticks.)
/// assert!(sched_times(std::process::id()).is_some());
/// assert_eq!(sched_times(u32::MAX), None);
/// ```
pub fn sched_times(pid: u32) -> Option<SchedTimes> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let mut f = s.split_whitespace().map(str::parse::<u64>);
    Some(SchedTimes {
        on_cpu_ns: f.next()?.ok()?,
        run_queue_wait_ns: f.next()?.ok()?,
    })
}

/// Every pid in `/proc` (empty if `/proc` cannot be read).
pub fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// Resident memory of `pid` (this process if `None`) in KiB: `VmRSS` of `/proc/PID/status`.
///
/// ```
/// assert!(shmrelay::procfs::rss_kib(None).unwrap() > 0);
/// ```
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Private resident memory of `pid` (this process if `None`) in KiB: `RssAnon` of
/// `/proc/PID/status` (heap, stacks), without the shared memory it maps (rings, which are
/// counted once for the relay, not once per process) or its program's pages.
///
/// ```
/// let private = shmrelay::procfs::private_kib(None).unwrap();
/// assert!(private > 0 && private <= shmrelay::procfs::rss_kib(None).unwrap());
/// ```
pub fn private_kib(pid: Option<u32>) -> Option<u64> {
    status_kib(pid, "RssAnon:")
}

/// A `NAME:   N kB` line of `/proc/PID/status`.
fn status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    status_field(&read_status(pid)?, field)
}

/// Resident and private resident memory of `pid` in KiB ([`rss_kib`], [`private_kib`]) from
/// one read of `/proc/PID/status` (the supervisor samples every process each second).
///
/// ```
/// let (rss, private) = shmrelay::procfs::rss_and_private_kib(None).unwrap();
/// assert!(private.unwrap() <= rss);
/// ```
pub fn rss_and_private_kib(pid: Option<u32>) -> Option<(u64, Option<u64>)> {
    let status = read_status(pid)?;
    Some((
        status_field(&status, "VmRSS:")?,
        status_field(&status, "RssAnon:"),
    ))
}

fn read_status(pid: Option<u32>) -> Option<String> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    std::fs::read_to_string(path).ok()
}

fn status_field(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Whether `pid`'s environment holds the entry `entry` (`NAME=value`), exactly.
pub fn environ_has(pid: u32, entry: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|&b| b == 0).any(|v| v == entry.as_bytes()))
        .unwrap_or(false)
}

/// The number of open fds of `pid` (this process if `None`).
///
/// Linux 6.2 and later report the count as the size of `/proc/PID/fd`, one `stat` instead of
/// a directory listing that costs O(fds): with 20,000 connections per front the listing was
/// the supervisor's largest cost. Older kernels report 0 there, and get the listing.
///
/// ```
/// let fds = shmrelay::procfs::open_fds(None).unwrap();
/// assert!(fds >= 1);
/// ```
pub fn open_fds(pid: Option<u32>) -> Option<u64> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}/fd"),
        None => "/proc/self/fd".to_owned(),
    };
    let size = std::fs::metadata(&dir).ok()?.len();
    if size > 0 {
        return Some(size);
    }
    // The listing holds one fd of its own open while it runs (only for our own process).
    let listed = std::fs::read_dir(&dir).ok()?.count() as u64;
    Some(if pid.is_none() {
        listed.saturating_sub(1)
    } else {
        listed
    })
}

/// The ephemeral port range `(low, high)` of `/proc/sys/net/ipv4/ip_local_port_range`.
pub fn local_port_range() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut v = text.split_whitespace().map(|x| x.parse().ok());
    Some((v.next()??, v.next()??))
}

/// The CPU's model name from `/proc/cpuinfo`.
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_owned())
}

/// The 1-, 5- and 15-minute load averages of `/proc/loadavg` (what a benchmark prints next to
/// its figures on a shared machine).
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut v = text.split_whitespace().map(|x| x.parse().ok());
    Some([v.next()??, v.next()??, v.next()??])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Other tests of this binary open files on other threads: retry until a quiet moment.
    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        (0..100).any(|_| {
            f() || {
                std::thread::sleep(std::time::Duration::from_millis(5));
                false
            }
        })
    }

    #[test]
    fn counts_what_a_listing_counts() {
        assert!(eventually(|| {
            let listed = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64 - 1;
            open_fds(None) == Some(listed)
        }));
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(eventually(|| {
            let listed = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64 - 1;
            open_fds(Some(std::process::id())) == Some(listed)
        }));
        drop(f);
    }

    #[test]
    fn stat_survives_hostile_command_names() {
        let line = "42 (a) b) (c) T 7 1 1 0 -1 0 0 0 0 0 30 12 0 0 20 0 1 0 5 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.state, s.ppid, s.cpu_ticks), ('T', 7, 42));
        assert!(s.is_stopped() && !s.is_zombie());
        assert_eq!(parse_stat("42 (x"), None);
    }

    #[test]
    fn this_process_is_found_with_its_parent() {
        let me = std::process::id();
        assert!(pids().any(|p| p == me));
        let s = stat(me).unwrap();
        assert_eq!(s.ppid, std::os::unix::process::parent_id());
        assert!(matches!(s.state, 'R' | 'S'));
        assert_eq!(stat(u32::MAX).unwrap_err().kind(), io::ErrorKind::NotFound);
        let (lo, hi) = local_port_range().unwrap();
        assert!(lo <= hi);
    }

    #[test]
    fn environ_matches_whole_entries_only() {
        let me = std::process::id();
        let path = std::env::var("PATH").unwrap();
        assert!(environ_has(me, &format!("PATH={path}")));
        assert!(!environ_has(me, "PATH="));
    }
}
