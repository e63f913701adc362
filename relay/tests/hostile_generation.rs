//! A replacement worker gets fresh rings (a new ring generation, its predecessor's unanswered
//! frames carried over): whatever an old process still holds of the old rings cannot reach it.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shmrelay_tests::{eventually, Relay};

fn kill(pid: u32, sig: i32) {
    assert!(pid > 0);
    // SAFETY: sending a signal to a process of the relay under test.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The memfds a process holds open: (fd number, inode).
fn memfds(pid: u32) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("/memfd:shmrelay") {
            continue;
        }
        if let Ok(m) = std::fs::metadata(e.path()) {
            out.push((e.file_name().to_string_lossy().into_owned(), m.ino()));
        }
    }
    out
}

/// Inodes of the memfds a process maps.
fn mapped_memfds(pid: u32) -> HashSet<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter(|l| l.contains("/memfd:shmrelay"))
        .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
        .collect()
}

#[test]
fn replacement_gets_fresh_rings_that_an_old_holder_cannot_reach() {
    let relay = Relay::start("gen-fresh", &["--workers", "1"]);
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"before").as_deref(), Some(&b"before"[..]));
    let old = relay.worker_pid(0);
    let front = relay.stats().front(0).pid.load(Ordering::Relaxed);
    // The old worker's rings, opened read-write through its fds: a process of the old
    // generation that outlived it (as a child a worker forked would) holds exactly this.
    let held = memfds(old);
    assert_eq!(held.len(), 2, "the worker holds its two rings: {held:?}");
    let old_inodes: HashSet<u64> = held.iter().map(|h| h.1).collect();
    let files: Vec<File> = held
        .iter()
        .map(|(fd, _)| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{old}/fd/{fd}"))
                .expect("open the old worker's ring")
        })
        .collect();
    assert!(mapped_memfds(front).is_superset(&old_inodes));

    kill(old, libc::SIGKILL);
    assert!(
        eventually(Duration::from_secs(20), || {
            let p = relay.worker_pid(0);
            p != 0 && p != old && memfds(p).len() == 2
        }),
        "worker not replaced"
    );
    let new = relay.worker_pid(0);
    let new_inodes: HashSet<u64> = memfds(new).iter().map(|h| h.1).collect();
    assert!(
        new_inodes.is_disjoint(&old_inodes),
        "the replacement got the old rings: {new_inodes:?} vs {old_inodes:?}"
    );
    // The front dropped its mappings of the old rings and maps the new ones.
    let front_maps = mapped_memfds(front);
    assert!(
        front_maps.is_disjoint(&old_inodes),
        "the front still maps the old rings"
    );
    assert!(front_maps.is_superset(&new_inodes));

    // The old generation scribbles garbage over every byte of its rings, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let scribbler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut round = 0u8;
            while !stop.load(Ordering::Relaxed) {
                round = round.wrapping_add(1);
                for f in &files {
                    let len = f.metadata().unwrap().len() as usize;
                    let junk = vec![0xA5 ^ round; len];
                    f.write_all_at(&junk, 0).expect("scribble");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    for i in 0..200u32 {
        let msg = format!("after {i}");
        assert_eq!(
            c.try_roundtrip(msg.as_bytes()).as_deref(),
            Some(msg.as_bytes()),
            "the replacement's client is not served"
        );
    }
    let mut fresh = relay.connect();
    assert_eq!(fresh.try_roundtrip(b"new").as_deref(), Some(&b"new"[..]));
    stop.store(true, Ordering::Relaxed);
    scribbler.join().unwrap();
    let s = relay.stats();
    assert_eq!(s.front(0).corrupt_rings.load(Ordering::Relaxed), 0);
    assert_eq!(s.front(0).quarantined.load(Ordering::Relaxed), 0);
    assert_eq!(
        relay.worker_pid(0),
        new,
        "the replacement was not replaced again"
    );
    assert_eq!(
        s.front(0).pid.load(Ordering::Relaxed),
        front,
        "the front was not restarted"
    );
}

#[test]
fn frames_waiting_for_a_dead_worker_are_carried_to_the_new_generation_in_order() {
    let relay = Relay::start("gen-carry", &["--workers", "1", "--fronts", "2"]);
    let mut clients: Vec<_> = (0..6).map(|_| relay.connect()).collect();
    for c in &mut clients {
        assert_eq!(c.try_roundtrip(b"hi").as_deref(), Some(&b"hi"[..]));
    }
    let old = relay.worker_pid(0);
    let old_inodes: HashSet<u64> = memfds(old).iter().map(|h| h.1).collect();
    // Stopped: the frames below wait in the rings, unanswered, when it dies.
    kill(old, libc::SIGSTOP);
    for (n, c) in clients.iter_mut().enumerate() {
        for i in 0..20u8 {
            c.send(&[n as u8, i, 7, 7]);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    kill(old, libc::SIGKILL);
    for (n, c) in clients.iter_mut().enumerate() {
        for i in 0..20u8 {
            assert_eq!(
                c.recv().expect("served by the replacement"),
                vec![n as u8, i, 7, 7],
                "every frame answered once, in order"
            );
        }
        assert_eq!(c.try_roundtrip(b"more").as_deref(), Some(&b"more"[..]));
    }
    let new = relay.worker_pid(0);
    assert_ne!(new, old);
    let new_inodes: HashSet<u64> = memfds(new).iter().map(|h| h.1).collect();
    assert_eq!(new_inodes.len(), 4, "two fronts, two rings each");
    assert!(new_inodes.is_disjoint(&old_inodes));
    let s = relay.stats();
    for f in 0..2 {
        assert_eq!(s.front(f).corrupt_rings.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn a_request_ring_left_unreadable_is_not_carried_and_its_clients_get_an_error() {
    let w = format!(
        "worker_cmd={:?}",
        format!("{} worker scribbler", env!("CARGO_BIN_EXE_shmrelay"))
    );
    let relay = Relay::start("gen-nocarry", &["--workers", "1", "--set", &w]);
    let front = relay.stats().front(0).pid.load(Ordering::Relaxed);
    let mut other = relay.connect();
    assert_eq!(other.try_roundtrip(b"x").as_deref(), Some(&b"x"[..]));
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"y").as_deref(), Some(&b"y"[..]));
    let old = relay.worker_pid(0);
    // The worker leaves its released position in the middle of a record and dies.
    c.send(b"scribble:head-exit");
    for c in [&mut c, &mut other] {
        let mut got_error = false;
        while let Some(f) = c.recv() {
            if f == b"shmrelay-error: worker unavailable" {
                got_error = true;
            }
        }
        assert!(got_error, "no error frame before the close");
    }
    // The replacement serves on the new generation; the front carried on.
    assert!(
        eventually(Duration::from_secs(20), || {
            let mut c = relay.connect();
            c.try_roundtrip(b"again").as_deref() == Some(&b"again"[..])
        }),
        "never served again"
    );
    assert_ne!(relay.worker_pid(0), old);
    let s = relay.stats();
    assert_eq!(
        s.front(0).pid.load(Ordering::Relaxed),
        front,
        "the front was not restarted"
    );
    assert_eq!(s.front(0).corrupt_rings.load(Ordering::Relaxed), 1);
    assert_eq!(s.front(0).quarantined.load(Ordering::Relaxed), 0);
}

#[test]
fn a_front_that_does_not_take_the_new_generation_is_restarted_on_it() {
    let relay = Relay::start("gen-noack", &["--workers", "1"]);
    let mut c = relay.connect();
    assert_eq!(c.try_roundtrip(b"hi").as_deref(), Some(&b"hi"[..]));
    let front = relay.stats().front(0).pid.load(Ordering::Relaxed);
    let old = relay.worker_pid(0);
    let old_inodes: HashSet<u64> = memfds(old).iter().map(|h| h.1).collect();
    // The front cannot answer (stopped) when the worker dies.
    kill(front, libc::SIGSTOP);
    kill(old, libc::SIGKILL);
    assert!(
        eventually(Duration::from_secs(20), || {
            let s = relay.stats();
            let (f, w) = (s.front(0).pid.load(Ordering::Relaxed), relay.worker_pid(0));
            f != 0 && f != front && w != 0 && w != old
        }),
        "the front and the worker were not both replaced"
    );
    assert!(eventually(Duration::from_secs(5), || {
        !shmrelay_tests::alive(front)
    }));
    assert!(
        eventually(Duration::from_secs(20), || {
            let mut c = relay.connect();
            c.try_roundtrip(b"again").as_deref() == Some(&b"again"[..])
        }),
        "never served again"
    );
    let new = relay.worker_pid(0);
    let new_inodes: HashSet<u64> = memfds(new).iter().map(|h| h.1).collect();
    assert_eq!(new_inodes.len(), 2);
    assert!(new_inodes.is_disjoint(&old_inodes));
    let front_now = relay.stats().front(0).pid.load(Ordering::Relaxed);
    assert!(mapped_memfds(front_now).is_superset(&new_inodes));
}
