//! New ring generations: fresh rings for a replaced worker, handed to each running front over
//! its control socket (the front carries unanswered requests over, see front/generation.rs).

use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use shm_ring::ShmRing;
use shmrelay::front::generation as front_generation;
use shmrelay::names::Dir;
use shmrelay_worker::protocol::DEAD_LETTER_WORDS;
use tracing::{error, info, warn};

use super::rings::new_ring;
use super::{Instance, Role};

/// The supervisor's end of a front's control socket, and the front's end (inherited by each
/// process of that front).
pub(super) struct Control {
    sup: std::os::unix::net::UnixStream,
    pub(super) front_end: OwnedFd,
    /// Number of the last generation message (acks of older ones are ignored).
    seq: u64,
}

/// How long a front has to take a new ring generation before it is restarted instead.
pub(super) const GENERATION_ACK: Duration = Duration::from_secs(2);

pub(super) fn control_pair() -> Result<Control> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (sup, front_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("creating a front's control socket")?;
    Ok(Control {
        sup: std::os::unix::net::UnixStream::from(sup),
        front_end,
        seq: 0,
    })
}

impl Instance {
    /// With worker `w` dead (its group and strays killed): a new ring generation. Fresh rings
    /// for every (front, `w`), handed to each running front, which carries the unanswered
    /// requests over (see front/generation.rs) and drops the old ones; only then are they
    /// stored for the replacement. Nothing any old process still maps reaches it. A front
    /// that does not take them within `GENERATION_ACK` is restarted (its replacement starts
    /// on the new rings; its clients reconnect).
    pub(super) fn new_generation(&mut self, w: usize) {
        let cap = self.cfg.ring_capacity();
        for f in 0..self.cfg.fronts {
            let fresh = new_ring(&self.cfg.instance, f, w, Dir::Request, cap)
                .and_then(|req| Ok((req, new_ring(&self.cfg.instance, f, w, Dir::Reply, cap)?)));
            let (req, rep) = match fresh {
                Ok(pair) => pair,
                Err(e) => {
                    error!(
                        front = f,
                        worker = w,
                        "no new ring generation, the replacement reuses the rings: {e:#}"
                    );
                    continue;
                }
            };
            {
                // The dead-letter positions (the supervisor's, written in `dead_letter`): the
                // positions carried over are the same.
                let (old, new) = (self.rings[f][w].0.user_words(), req.user_words());
                for i in DEAD_LETTER_WORDS {
                    new[i].store(old[i].load(Ordering::Relaxed), Ordering::Relaxed);
                }
            }
            let front = self.slots.get(&Role::Front(f)).and_then(|s| s.pid);
            if let Some(pid) = front {
                match self.send_generation(f, w, &req, &rep) {
                    Ok(status) if status == front_generation::CARRIED => {
                        info!(front = f, worker = w, "new ring generation, requests carried over")
                    }
                    Ok(status) if status == front_generation::QUARANTINED => info!(
                        front = f,
                        worker = w,
                        "new ring generation for rings the front quarantined"
                    ),
                    Ok(_) => warn!(
                        front = f,
                        worker = w,
                        "new ring generation; the front could not carry the requests over and closed the worker's connections"
                    ),
                    Err(e) => {
                        error!(
                            front = f,
                            worker = w,
                            pid = pid.as_raw(),
                            "the front did not take the new ring generation: {e:#}; restarting the front"
                        );
                        let _ = kill(pid, Signal::SIGKILL);
                        // A fresh socket: its replacement must not read this message.
                        match control_pair() {
                            Ok(c) => self.controls[f] = c,
                            Err(e) => error!(front = f, "{e:#}"),
                        }
                    }
                }
            }
            self.rings[f][w] = (req, rep);
            self.hangs[f][w].reset();
        }
    }

    /// Sends front `f` worker `w`'s new rings and waits for its answer (its status).
    fn send_generation(&mut self, f: usize, w: usize, req: &ShmRing, rep: &ShmRing) -> Result<u64> {
        let c = &mut self.controls[f];
        c.seq += 1;
        let seq = c.seq;
        let mut msg = [0u8; 24];
        msg[..8].copy_from_slice(&front_generation::MAGIC.to_ne_bytes());
        msg[8..16].copy_from_slice(&seq.to_ne_bytes());
        msg[16..].copy_from_slice(&(w as u64).to_ne_bytes());
        shm_ring::send_fds(&c.sup, &msg, &[req.fd(), rep.fd()]).context("sending the rings")?;
        let deadline = Instant::now() + GENERATION_ACK;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no answer within {GENERATION_ACK:?}");
            }
            c.sup.set_read_timeout(Some(left))?;
            let mut ack = [0u8; 16];
            match c.sup.read(&mut ack) {
                Ok(16) => {
                    let word = |i: usize| {
                        u64::from_ne_bytes(ack[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
                    };
                    if word(0) != seq {
                        continue; // an answer to an older message
                    }
                    if word(1) == front_generation::REFUSED {
                        bail!("the front refused the rings");
                    }
                    return Ok(word(1));
                }
                Ok(0) => bail!("the front closed its control socket"),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!("no answer within {GENERATION_ACK:?}")
                }
                Err(e) => return Err(e).context("reading the front's answer"),
            }
        }
    }
}
