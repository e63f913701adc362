//! Issue 12.10: at EMFILE the connections left in the listen backlog are accepted once fds
//! come free, without waiting for another connection to arrive.

use std::time::Duration;

use shmrelay_tests::{eventually, pattern, Recv, Relay, Watchdog};

const SEC: Duration = Duration::from_secs(1);

/// Sets RLIMIT_NOFILE (soft and hard) of another process of ours.
fn limit_fds(pid: u32, n: u64) {
    let lim = libc::rlimit64 {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: a valid rlimit for a process we started; the old value is not asked for.
    let r = unsafe {
        libc::prlimit64(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn backlog_left_at_emfile_is_accepted_when_a_connection_closes() {
    let _w = Watchdog::new("emfile_backlog", Duration::from_secs(120));
    let relay = Relay::start_serving("emfile", &["--workers", "1"]);
    let front = relay.front_pid(0);
    // Room for a connection or a few (RLIMIT_NOFILE bounds fd numbers: the free numbers
    // below the highest one count too), once the harness's own check connection is gone.
    assert!(eventually(10 * SEC, || relay.conns_total() == 0));
    std::thread::sleep(Duration::from_millis(100));
    let max_fd = std::fs::read_dir(format!("/proc/{front}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    limit_fds(front, max_fd + 2);
    eprintln!(
        "front {front}: highest fd {max_fd}; {}",
        std::fs::read_to_string(format!("/proc/{front}/limits"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("open files"))
            .unwrap_or("")
    );
    // Connect until one is not served: the front is out of fds, that one waits in the backlog.
    let mut served = Vec::new();
    let (mut queued, p) = loop {
        assert!(
            served.len() as u64 <= max_fd + 2,
            "never out of fds: {} served",
            served.len()
        );
        let mut c = relay.connect();
        let p = pattern(served.len(), 0, 100);
        c.try_send(&p).unwrap();
        match c.recv_data(Duration::from_millis(500)) {
            Recv::Frame(got) if got == p => served.push(c),
            Recv::Timeout => break (c, p),
            other => panic!("{other:?}"),
        }
    };
    eprintln!(
        "highest fd {max_fd}: {} connections served, then EMFILE",
        served.len()
    );
    assert!(!served.is_empty());
    assert!(
        eventually(10 * SEC, || relay.front(0, |f| &f.accept_emfile) >= 1),
        "the front did not hit EMFILE"
    );
    let early = queued.recv_data(Duration::from_millis(500));
    assert_eq!(early, Recv::Timeout, "served without an fd?");
    let accepts = relay.front(0, |f| &f.accepts);
    // One closes: its fd comes free, and the queued connection is accepted and served with
    // no new connection arriving.
    drop(served.pop());
    assert_eq!(
        queued.recv_data(10 * SEC),
        Recv::Frame(p),
        "the connection left in the backlog was not accepted after a close"
    );
    assert_eq!(relay.front(0, |f| &f.accepts), accepts + 1);
    assert!(relay.front(0, |f| &f.accept_retries) >= 1);
    for (i, c) in served.iter_mut().enumerate() {
        let p = pattern(i, 1, 100);
        assert_eq!(c.roundtrip_within(&p, 10 * SEC), Recv::Frame(p));
    }
    assert_eq!(relay.front_restarts(0), 0);
}
