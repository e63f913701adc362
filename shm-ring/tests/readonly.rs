//! A reader maps a ring's data area read-only (issue 12.4): a write through its view faults,
//! its header stays writable (it publishes its position there), and it cannot become the
//! producer.

use std::sync::Arc;
use std::time::Duration;

use shm_ring::{AttachError, Consumer, Meta, Producer, RingStorage, ShmRing};

fn reader_of(ring: &ShmRing) -> ShmRing {
    let fd = ring.fd().try_clone_to_owned().unwrap();
    ShmRing::open_fd_reader(fd, Duration::ZERO).unwrap()
}

/// The permissions /proc/self/maps shows for the mapping holding `addr`.
fn perms_at(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let range = f.next().unwrap();
        let perms = f.next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        if (a..b).contains(&addr) {
            return perms.to_owned();
        }
    }
    panic!("{addr:#x} is not mapped")
}

#[test]
fn reader_maps_data_read_only_and_header_read_write() {
    let ring = ShmRing::create_memfd("ro", 1 << 16).unwrap();
    let reader = reader_of(&ring);
    assert!(reader.is_reader() && !ring.is_reader());
    assert!(!reader.data_writable());
    let data = reader.data() as usize;
    let header = reader.header() as *const _ as usize;
    assert_eq!(perms_at(data), "r--s");
    assert_eq!(perms_at(data + (1 << 16) - 1), "r--s");
    assert_eq!(perms_at(header), "rw-s");
    // The creator's own view is writable.
    assert_eq!(perms_at(ring.data() as usize), "rw-s");
}

#[test]
fn a_write_through_the_read_only_view_faults() {
    let ring = ShmRing::create_memfd("ro-fault", 1 << 16).unwrap();
    let reader = reader_of(&ring);
    let target = reader.data().wrapping_add(4096);
    // SAFETY: fork in a test process; the child only writes one byte (which faults) and
    // exits, calling nothing that could deadlock on a lock held by another thread.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: deliberately writes to a read-only page: the kernel kills the child
            // with SIGSEGV before the store takes effect.
            unsafe { target.write_volatile(0xAA) };
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(0) };
        }
        pid if pid > 0 => {
            let mut status = 0;
            // SAFETY: waits for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
                "child status {status:#x}: the write did not fault"
            );
        }
        _ => panic!("fork failed"),
    }
    // The byte is unchanged, seen through the writable view.
    // SAFETY: inside the creator's data area.
    assert_eq!(unsafe { ring.data().add(4096).read_volatile() }, 0);
}

#[test]
fn a_reader_consumes_but_cannot_produce() {
    let ring = Arc::new(ShmRing::create_memfd("ro-use", 1 << 16).unwrap());
    let reader = Arc::new(reader_of(&ring));
    assert!(matches!(
        Producer::new(reader.clone()),
        Err(AttachError::ReadOnly)
    ));
    let mut tx = Producer::new(ring).unwrap();
    let mut rx = Consumer::new(reader).unwrap();
    tx.push(Meta::tag(1).conn(9), b"read-only view").unwrap();
    tx.publish();
    let mut end = 0;
    for rec in rx.records().unwrap() {
        let rec = rec.unwrap();
        assert_eq!(rec.conn(), 9);
        assert_eq!(rec.len(), 14);
        assert_eq!(rec.payload_to_vec(), b"read-only view");
        let mut part = [0u8; 4];
        rec.copy_payload(10, &mut part);
        assert_eq!(&part, b"view");
        end = rec.end();
    }
    // Releasing writes the header: the header stays writable for a reader.
    rx.release(end);
    assert!(tx.is_drained().unwrap());
}
