//! A fault-injection worker (`shmrelay worker scribbler`) for tests: it echoes like the echo
//! worker, but some frames make it scribble over its shared memory the way a buggy worker
//! would. The front must detect it, quarantine that worker's rings, and carry on.
//!
//! - `whoami`: answered with the worker's index.
//! - `scribble:tail`: writes an impossible tail into the reply ring to this client's front.
//! - `scribble:record`: publishes a reply record whose length runs past the end of the ring.
//! - `scribble:head`: writes an impossible head into the request ring from this client's front
//!   (50 ms later, after the worker's own release).
//! - `ring:doorbell`: starts a thread that writes the eventfd doorbell of this client's front
//!   in a loop, forever (a wake with no work each time), and answers `ringing`.
//! - `push:F.S.G:BYTES`: pushes `BYTES` to connection `F.S.G` (front.slot.generation, as
//!   `ConnId` prints it), whichever listener it belongs to, and answers `pushed`.

use std::os::fd::{BorrowedFd, RawFd};

use shmrelay_worker::protocol::env;
use shmrelay_worker::{ConnId, Handler, Out};

pub struct Scribbler {
    index: usize,
    /// (request fd, reply fd) per front.
    fds: Vec<(RawFd, RawFd)>,
    /// The doorbell eventfd of each front.
    bells: Vec<RawFd>,
}

impl Scribbler {
    /// Reads the ring fds from the environment the supervisor set (the SDK owns them; this
    /// only writes through them).
    pub fn from_env(index: usize) -> Scribbler {
        let mut fds = Vec::new();
        let mut bells = Vec::new();
        for entry in std::env::var(env::CHANNELS).unwrap_or_default().split(',') {
            let n: Vec<i32> = entry.split(':').filter_map(|x| x.parse().ok()).collect();
            if let [f, req, rep, bell] = n[..] {
                let f = f as usize;
                if fds.len() <= f {
                    fds.resize(f + 1, (-1, -1));
                    bells.resize(f + 1, -1);
                }
                fds[f] = (req, rep);
                bells[f] = bell;
            }
        }
        Scribbler { index, fds, bells }
    }

    fn poke(&self, fd: RawFd, offset: i64, bytes: &[u8]) {
        // SAFETY: the fd stays open for the life of the process (the SDK owns it).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = nix::sys::uio::pwrite(fd, bytes, offset);
    }
}

impl Handler for Scribbler {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _redelivered: bool, out: &mut Out<'_>) {
        let (req, rep) = self.fds.get(conn.front()).copied().unwrap_or((-1, -1));
        match frame {
            b"whoami" => {
                let _ = out.send(conn, self.index.to_string().as_bytes());
            }
            b"scribble:tail" => self.poke(rep, 128, &u64::MAX.to_ne_bytes()),
            b"scribble:head" => {
                // After this batch's release, which would otherwise overwrite it.
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    // SAFETY: as in `poke`.
                    let fd = unsafe { BorrowedFd::borrow_raw(req) };
                    let _ = nix::sys::uio::pwrite(fd, &(u64::MAX - 7).to_ne_bytes(), 256);
                });
            }
            b"scribble:record" => {
                // A legitimate reply, then its header rewritten to claim 1 GiB.
                let _ = out.send(conn, b"soon corrupt");
                let tail = {
                    let mut b = [0u8; 8];
                    // SAFETY: as in `poke`.
                    let fd = unsafe { BorrowedFd::borrow_raw(rep) };
                    let _ = nix::sys::uio::pread(fd, &mut b, 128);
                    u64::from_ne_bytes(b)
                };
                // The record we just committed is not published yet: it sits at the tail.
                // SAFETY: as in `poke`.
                let size = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(rep) })
                    .map_or(0, |st| st.st_size as u64);
                let cap = size.saturating_sub(1024).max(1);
                let at = 1024 + (tail & (cap - 1)) as i64;
                self.poke(rep, at, &(1u32 << 30).to_ne_bytes());
            }
            b"ring:doorbell" => {
                let bell = self.bells.get(conn.front()).copied().unwrap_or(-1);
                std::thread::spawn(move || loop {
                    // SAFETY: as in `poke`; an eventfd takes 8-byte writes.
                    let fd = unsafe { BorrowedFd::borrow_raw(bell) };
                    if nix::unistd::write(fd, &1u64.to_ne_bytes()).is_err() {
                        std::thread::yield_now();
                    }
                });
                let _ = out.send(conn, b"ringing");
            }
            _ if frame.starts_with(b"push:") => {
                // A push to a connection named by the client (maybe another listener's).
                let text = String::from_utf8_lossy(&frame[5..]).into_owned();
                let (target, bytes) = text.split_once(':').unwrap_or((&text, ""));
                let n: Vec<u64> = target.split('.').filter_map(|x| x.parse().ok()).collect();
                if let [f, s, g] = n[..] {
                    let _ = out.send(ConnId::new(f as u8, g as u32, s as u32), bytes.as_bytes());
                }
                let _ = out.send(conn, b"pushed");
            }
            _ => {
                let _ = out.send(conn, frame);
            }
        }
    }
}
