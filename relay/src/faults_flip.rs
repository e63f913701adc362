//! A fault-injection worker (`shmrelay worker flipper`) for tests: it echoes like the echo
//! worker (`big:N` is answered with N bytes, to test replies longer than a ring record;
//! `bigdie:N` publishes the first piece of such a reply by hand and exits), but
//! the first frame `flip` on a connection starts a thread that keeps rewriting the
//! first four payload bytes of every reply record it has published and the front has not
//! released yet, alternating `7f ff ff ff` with the original bytes (in a coalesced record,
//! the first four bytes of its first reply's body: the entry headers before them are what
//! the front validates). The first frame `flen` starts it on those entry headers instead:
//! their length fields, which a worker rewriting can only break its own connections with. Under the old reply format
//! those four bytes were the frame's length prefix, which the front validated in shared memory
//! and then wrote from shared memory again: a client could receive an unframed `7fffffff`
//! header. The front must frame what it writes from its own copy of the lengths, so that such a
//! worker can at worst change payload bytes of its own replies.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use shm_ring::layout::{record_size, AUX_SIZE, LEN_AUX, RECORD_HEADER_SIZE};
use shmrelay_worker::protocol::{env, flags, tag, BATCH_ENTRY_HEADER};
use shmrelay_worker::{ConnId, Handler, Out};

/// The bytes the thread writes over the start of each reply payload.
pub const FLIPPED: [u8; 4] = [0x7f, 0xff, 0xff, 0xff];

pub struct Flipper {
    /// Reply ring fd per front.
    reps: Vec<RawFd>,
    /// The front's doorbell (eventfd) per front.
    bells: Vec<RawFd>,
}

static STARTED: AtomicBool = AtomicBool::new(false);
/// The thread rewrites coalesced records' first entry length (`flen`), not payload bytes.
static LENGTHS: AtomicBool = AtomicBool::new(false);

impl Flipper {
    /// Reads the reply ring fds from the environment the supervisor set (the SDK owns them;
    /// this only maps them a second time).
    pub fn from_env() -> Flipper {
        let channels = crate::faults::channels_by_front();
        let reps = channels
            .iter()
            .map(|c| c.map_or(-1, |c| c.reply_fd))
            .collect();
        let bells = channels
            .iter()
            .map(|c| c.map_or(-1, |c| c.doorbell_fd))
            .collect();
        Flipper { reps, bells }
    }

    /// Publishes the first 1,000-byte piece of a split reply of `total` bytes to `conn` by
    /// hand (the SDK has published everything it committed: this runs alone in the batch),
    /// wakes the front and exits.
    fn first_piece_then_exit(&self, conn: ConnId, total: u64) -> ! {
        use std::os::fd::BorrowedFd;
        let (Some(&rep), Some(&bell)) = (self.reps.get(conn.front()), self.bells.get(conn.front()))
        else {
            std::process::exit(3)
        };
        // SAFETY: fds the SDK keeps open for the life of the process.
        let (rep, bell) = unsafe { (BorrowedFd::borrow_raw(rep), BorrowedFd::borrow_raw(bell)) };
        let size = nix::sys::stat::fstat(rep).map_or(0, |st| st.st_size as u64);
        let cap = size.saturating_sub(1024);
        let mut t = [0u8; 8];
        let _ = nix::sys::uio::pread(rep, &mut t, 128);
        let tail = u64::from_ne_bytes(t);
        const PIECE: usize = 1000;
        let len = (8 + PIECE) as u32;
        let rec_size = record_size(len as usize); // no aux word
        if cap.is_power_of_two() && cap - (tail & (cap - 1)) >= rec_size {
            let mut rec = Vec::with_capacity(rec_size as usize);
            rec.extend_from_slice(&len.to_ne_bytes());
            rec.extend_from_slice(&tag::SEND.to_ne_bytes());
            rec.extend_from_slice(&shmrelay_worker::protocol::flags::MORE.to_ne_bytes());
            rec.extend_from_slice(&conn.raw().to_ne_bytes());
            rec.extend_from_slice(&total.to_le_bytes());
            rec.extend((0..PIECE).map(|i| (i % 251) as u8));
            let at = 1024 + (tail & (cap - 1));
            let _ = nix::sys::uio::pwrite(rep, &rec, at as i64);
            let _ = nix::sys::uio::pwrite(rep, &(tail + rec_size).to_ne_bytes(), 128);
            let _ = nix::unistd::write(bell, &1u64.to_ne_bytes());
        }
        std::process::exit(3)
    }

    fn start(&self) {
        if STARTED.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut maps = Vec::new();
        for &fd in self.reps.iter().filter(|&&fd| fd >= 0) {
            // SAFETY: fstat on an fd the process owns (the SDK keeps it open).
            let size = nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
                .map_or(0, |st| st.st_size as usize);
            if size <= 1024 {
                continue;
            }
            // SAFETY: a new shared mapping of a ring segment the worker was given; the file is
            // sealed against resizing, so every byte of the mapping stays backed.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                maps.push((p as usize, size));
            }
        }
        std::thread::spawn(move || loop {
            for &(base, size) in &maps {
                // SAFETY: the mapping lives for the rest of the process; `flip_ring` only
                // touches offsets inside it.
                unsafe { flip_ring(base as *mut u8, size) };
            }
            std::hint::spin_loop();
        });
    }
}

/// One pass over the published, unreleased records of the reply ring at `base`.
///
/// # Safety
///
/// `base` points to a live shared mapping of `size` bytes holding a ring segment.
unsafe fn flip_ring(base: *mut u8, size: usize) {
    let cap = (size - 1024) as u64;
    if !cap.is_power_of_two() {
        return;
    }
    // SAFETY (all reads and writes below): offsets are reduced modulo `cap` and bounded by the
    // record header size, so they stay inside the mapping; volatile because the front and the
    // SDK use the same memory concurrently.
    // SAFETY: `off` is 128 or 256, inside the header of the mapping.
    let rd64 = |off: usize| unsafe { base.add(off).cast::<u64>().read_volatile() };
    let head = rd64(256);
    let tail = rd64(128);
    if tail < head || tail - head > cap {
        return;
    }
    // Every SEND record's first payload bytes, with their original value; then all of them
    // are flipped and restored together, over and over, so that whatever moment the front
    // checks a record and whatever later moment it writes it, the two may disagree.
    let mut recs: Vec<(*mut [u8; 4], [u8; 4])> = Vec::new();
    // Past the published tail too: records the SDK committed but has not published yet are
    // rewritten from before the front can first see them.
    let mut pos = head;
    while pos < tail + cap / 2 && recs.len() < 256 {
        let off = pos & (cap - 1);
        if cap - off < RECORD_HEADER_SIZE as u64 {
            pos += cap - off;
            continue;
        }
        let rec = 1024 + off as usize;
        // SAFETY: `rec` + 16 <= 1024 + cap (checked above): a record header in the mapping.
        let word = unsafe { base.add(rec).cast::<u32>().read_volatile() };
        let len = (word & !LEN_AUX) as u64;
        // SAFETY: as above.
        let tg = unsafe { base.add(rec + 4).cast::<u16>().read_volatile() };
        if tg == 0xFFFF {
            pos += cap - off;
            continue;
        }
        let aux = if word & LEN_AUX != 0 {
            AUX_SIZE as u64
        } else {
            0
        };
        let size = record_size(len as usize) + aux;
        if size > cap - off {
            break;
        }
        if pos >= tail && (tg != tag::SEND || len > 1 << 20) {
            break;
        }
        // SAFETY: as above.
        let fl = unsafe { base.add(rec + 6).cast::<u16>().read_volatile() };
        // A coalesced record: the first entry's body (or its length field).
        let skip = if fl & flags::BATCH != 0 && !LENGTHS.load(Ordering::Relaxed) {
            BATCH_ENTRY_HEADER
        } else {
            0
        };
        if tg == tag::SEND && len as usize >= skip + 4 {
            // SAFETY: `size <= cap - off` and `len >= skip + 4`: those 4 payload bytes are in
            // the mapping.
            let p = unsafe { base.add(rec + RECORD_HEADER_SIZE + skip) }.cast::<[u8; 4]>();
            // SAFETY: as above (volatile: the SDK and the front use the bytes concurrently).
            let orig = unsafe { p.read_volatile() };
            if orig != FLIPPED {
                recs.push((p, orig));
            }
        }
        pos += size;
    }
    for _ in 0..16 {
        for &(p, _) in &recs {
            // SAFETY: in the mapping (collected above); the mapping lives on.
            unsafe { p.write_volatile(FLIPPED) };
        }
        spin(50);
        for &(p, orig) in &recs {
            // SAFETY: as above.
            unsafe { p.write_volatile(orig) };
        }
        spin(50);
    }
}

impl Handler for Flipper {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _redelivered: bool, out: &mut Out<'_>) {
        if frame == b"flip" {
            self.start();
        }
        if frame == b"flen" {
            // Relaxed: read by the thread `start` spawns after this store.
            LENGTHS.store(true, Ordering::Relaxed);
            self.start();
        }
        // `bigdie:N`: the first piece of a split reply announcing N bytes, written into the
        // reply ring by hand and published, then the process exits (a worker crashing in the
        // middle of a long reply, deterministically).
        if let Some(n) = frame.strip_prefix(b"bigdie:") {
            let n: u64 = std::str::from_utf8(n)
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            // Once per relay instance: the frame is redelivered to the replacement (the
            // hand-made piece answers no request position), which must not die again.
            let marker = std::env::temp_dir().join(format!(
                "shmrelay-bigdie-{}",
                std::env::var(env::INSTANCE).unwrap_or_default()
            ));
            if std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
                .is_ok()
            {
                self.first_piece_then_exit(conn, n);
            }
            // Silent: nothing else on the ring may break the split off, only the front's
            // noticing that the worker was replaced.
            let _ = std::fs::remove_file(&marker);
            return;
        }
        // `big:N`: a reply of N bytes (i % 251), longer than a ring record for a large N.
        if let Some(n) = frame.strip_prefix(b"big:") {
            let n: usize = std::str::from_utf8(n)
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let _ = out.send_with(conn, n, |buf| {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (i % 251) as u8;
                }
            });
            return;
        }
        let _ = out.send(conn, frame);
    }
}

fn spin(n: u32) {
    for _ in 0..n {
        std::hint::spin_loop();
    }
}
