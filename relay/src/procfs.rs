//! Counting a process's open files without listing them.

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

#[cfg(test)]
mod tests {
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
            super::open_fds(None) == Some(listed)
        }));
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(eventually(|| {
            let listed = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64 - 1;
            super::open_fds(Some(std::process::id())) == Some(listed)
        }));
        drop(f);
    }
}
