//! A fault-injection worker (`shmrelay worker scribbler`) for tests: it echoes like the echo
//! worker, but some frames make it scribble over its shared memory the way a buggy worker
//! would. The front must detect it, quarantine that worker's rings, and carry on.
//!
//! - `whoami`: answered with the worker's index.
//! - `scribble:tail`: writes an impossible tail into the reply ring to this client's front.
//! - `scribble:record`: publishes a reply record whose length runs past the end of the ring.
//! - `scribble:head`: writes an impossible head into the request ring from this client's front
//!   (50 ms later, after the worker's own release).
//! - `scribble:head-exit`: moves the released position of the request ring from this client's
//!   front into the middle of the last record (aligned and in range, but no record boundary),
//!   then exits at once: the front cannot carry that ring over to the next generation.
//! - `ring:doorbell`: starts a thread that writes the eventfd doorbell of this client's front
//!   in a loop, forever (a wake with no work each time), and answers `ringing`.
//! - `push:F.S.G:BYTES`: pushes `BYTES` to connection `F.S.G` (front.slot.generation, as
//!   `ConnId` prints it), whichever listener it belongs to, and answers `pushed`.
//! - `poison`: panics (the worker crashes on this frame, and on each redelivery of it).
//!
//! `shmrelay worker liar` (see [`liar`]) answers its first frame claiming an impossible
//! request position, then exits; its replacements echo. `shmrelay worker quiet-liar` does the
//! same without waking the front, which then first reads the lie when it switches to the
//! replacement's rings.

use std::os::fd::{BorrowedFd, RawFd};

use shmrelay_worker::protocol::{env, inherited_fd, Channel};
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
        let channels = channels_by_front();
        let fds = channels
            .iter()
            .map(|c| c.map_or((-1, -1), |c| (c.request_fd, c.reply_fd)))
            .collect();
        let bells = channels
            .iter()
            .map(|c| c.map_or(-1, |c| c.doorbell_fd))
            .collect();
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
            b"poison" => panic!("poison frame (fault injection)"),
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
            b"scribble:head-exit" => {
                let mut b = [0u8; 8];
                // SAFETY: as in `poke`.
                let fd = unsafe { BorrowedFd::borrow_raw(req) };
                let _ = nix::sys::uio::pread(fd, &mut b, 128);
                // Every record is at least 16 bytes: 8 before the tail is inside the last one.
                let mid = u64::from_ne_bytes(b).saturating_sub(8);
                self.poke(req, 256, &mid.to_ne_bytes());
                std::process::exit(1);
            }
            b"scribble:record" => {
                // A legitimate reply, then its header rewritten to claim 1 GiB. The reply joins
                // the SDK's coalesced record for this connection; a push to another connection
                // (none such: the front counts it stale) ends that record, committing it now.
                let _ = out.send(conn, b"soon corrupt");
                let nobody = ConnId::new(conn.front() as u8, 0, u32::MAX);
                let _ = out.send(nobody, b"");
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

/// The channels the supervisor handed this worker, indexed by front (the SDK owns their fds;
/// the fault workers only write through them). Empty if the environment holds none.
pub fn channels_by_front() -> Vec<Option<Channel>> {
    let list = std::env::var(env::CHANNELS).unwrap_or_default();
    let mut by_front = Vec::new();
    for c in Channel::parse_list(&list).unwrap_or_default() {
        if by_front.len() <= c.peer {
            by_front.resize(c.peer + 1, None);
        }
        by_front[c.peer] = Some(c);
    }
    by_front
}

/// The `liar` fault worker: in its first generation it answers the first frame it gets with a
/// reply record whose `aux` (the request position it answers) is 2^62, far beyond anything
/// the front published, then exits 1. A front that believed it would make every replacement
/// skip every frame. Later generations (`SHMRELAY_RESTARTS` > 0) are plain echo workers.
/// `quiet`: the record's tail is stored without the wake `publish` would do, so the front finds
/// the lie at its next wake, typically the ring generation the supervisor hands it.
pub fn liar(quiet: bool) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use shm_ring::{Consumer, Meta, Producer, RingStorage, ShmRing};
    use shmrelay_worker::protocol::tag;

    let restarts: u32 = std::env::var(env::RESTARTS)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if restarts > 0 {
        let mut worker = shmrelay_worker::Worker::from_env()?;
        worker.run(&mut shmrelay_worker::examples::Echo)?;
        return Ok(());
    }
    let channels = std::env::var(env::CHANNELS).context(env::CHANNELS)?;
    let first = *Channel::parse_list(&channels)?
        .first()
        .context("no channel")?;
    // SAFETY: inherited fds the supervisor named for this process; nothing else owns them.
    let (req, rep) = unsafe {
        (
            inherited_fd(first.request_fd)?,
            inherited_fd(first.reply_fd)?,
        )
    };
    let t = Duration::from_secs(5);
    let mut rx = Consumer::new(Arc::new(ShmRing::open_fd(req, t)?))?;
    let mut tx = Producer::new(Arc::new(ShmRing::open_fd(rep, t)?))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut target = None;
        for rec in rx.records()? {
            let rec = rec?;
            if rec.tag() == tag::DATA {
                target = Some((rec.conn(), rec.end()));
                break;
            }
        }
        if let Some((conn, _end)) = target {
            let reply = [&3u32.to_be_bytes()[..], b"lie"].concat();
            tx.push(Meta::tag(tag::SEND).conn(conn).aux(1 << 62), &reply)?;
            if quiet {
                // Release: pairs with the front's Acquire load of the tail (as `publish`),
                // but without waking it: the front reads the lie only at its next wake.
                tx.storage()
                    .header()
                    .tail
                    .store(tx.position(), std::sync::atomic::Ordering::Release);
            } else {
                tx.publish();
            }
            // Exit without releasing: the frame stays for the replacement.
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
