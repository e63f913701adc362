//! Heartbeats and timeouts: when to ping a connection, when to give up on it, and what the
//! kernel says about it (TCP_INFO), plus the kernel's own backstops (keepalive,
//! TCP_USER_TIMEOUT).

use std::os::fd::AsRawFd;

use shmrelay_worker::{CloseReason, Codec};

use super::conn::{Conn, ConnState};
use crate::config::Config;

/// Timer resolution.
pub(super) const TICK_MS: u64 = 10;

pub(super) enum Verdict {
    Close(CloseReason),
    /// Send a ping now, then come back at the tick given.
    Ping(u64),
    /// Nothing to do until this tick.
    Wait(u64),
}

pub(super) struct Liveness {
    ping_min: u32,
    ping_max: u32,
    timeout: Option<u32>,
    idle: u32,
}

impl Liveness {
    pub fn new(cfg: &Config) -> Liveness {
        let ticks = |ms: u64| (ms / TICK_MS).clamp(1, u32::MAX as u64 / 4) as u32;
        Liveness {
            ping_min: ticks(cfg.ping_min_ms),
            ping_max: ticks(cfg.ping_max_ms),
            timeout: cfg.heartbeat_timeout_ms.map(ticks),
            idle: if cfg.idle_timeout_ms == 0 {
                0
            } else {
                ticks(cfg.idle_timeout_ms)
            },
        }
    }

    /// The ping interval for a connection: 64 round trips, within the configured bounds, so a
    /// high-latency (mobile) link is pinged less often than a LAN one.
    pub fn interval(&self, rtt_us: u32) -> u32 {
        let ticks = (rtt_us as u64 * 64 / 1000 / TICK_MS).min(u32::MAX as u64) as u32;
        ticks.clamp(self.ping_min, self.ping_max)
    }

    /// Nothing received for this long closes the connection: 1.5x its interval by default.
    pub fn timeout(&self, interval: u32) -> u32 {
        self.timeout.unwrap_or(interval + interval / 2)
    }

    /// The first check of a new connection.
    pub fn first(&self, codec: Codec, now: u32) -> u64 {
        let next = now as u64 + self.interval(0) as u64;
        if !codec.has_heartbeats() && self.idle > 0 {
            return now as u64 + self.idle as u64;
        }
        if self.idle > 0 {
            next.min(now as u64 + self.idle as u64)
        } else {
            next
        }
    }

    /// What to do with `c` at tick `now` (ticks are u32 and compared with wrapping arithmetic).
    pub fn check(&self, c: &Conn, now: u32, now64: u64) -> Verdict {
        let (interval, timeout) = if c.client_beats {
            // Its own beats prove it alive: ping it only once it is late by a quarter of the
            // longest interval, so a client beating every `ping_max` (jitter and all) is never
            // pinged, and one that stopped still gets a ping before its timeout.
            let late = self.ping_max + self.ping_max / 4;
            (late, self.timeout(self.ping_max))
        } else {
            let interval = self.interval(c.rtt_us);
            (interval, self.timeout(interval))
        };
        let since_rx = now.wrapping_sub(c.last_rx);
        let since_data = now.wrapping_sub(c.last_data);
        if self.idle > 0 && since_data >= self.idle {
            return Verdict::Close(CloseReason::IdleTimeout);
        }
        if !c.codec.has_heartbeats() {
            // No heartbeats in the protocol: no pings and no heartbeat timeout. Come back for
            // the idle timeout if there is one, else now and then for the RTT sample.
            let wait = if self.idle > 0 {
                self.idle - since_data
            } else {
                interval
            };
            return Verdict::Wait(now64 + wait as u64);
        }
        if since_rx >= timeout {
            return Verdict::Close(CloseReason::HeartbeatTimeout);
        }
        let mut next = now64 + (timeout - since_rx) as u64;
        if self.idle > 0 {
            next = next.min(now64 + (self.idle - since_data) as u64);
        }
        if c.state == ConnState::Open && !c.ping_outstanding {
            if since_rx >= interval {
                return Verdict::Ping(next);
            }
            next = next.min(now64 + (interval - since_rx) as u64);
        }
        Verdict::Wait(next)
    }
}

/// A gap between two turns of the front's loop longer than this means the front itself was
/// late (SIGSTOP, starved of CPU): an idle loop wakes at least every 100 ms.
pub(super) const STALL_MS: u64 = 500;

/// The ticks a loop gap of `gap_ns` took from the front's clients beyond a normal turn, if
/// the front was late.
pub(super) fn stall_ticks(gap_ns: u64) -> Option<u32> {
    let ms = gap_ns / 1_000_000;
    (ms > STALL_MS).then(|| ((ms - 100) / TICK_MS).min(u32::MAX as u64 / 4) as u32)
}

/// Never blame a client for the front's own lateness: moves its liveness clocks forward by
/// the ticks the front lost, as if the stall had not happened.
pub(super) fn forgive(c: &mut Conn, ticks: u32) {
    c.last_rx = c.last_rx.wrapping_add(ticks);
    c.last_data = c.last_data.wrapping_add(ticks);
    c.ping_sent = c.ping_sent.wrapping_add(ticks);
}

/// Turns on keepalive and TCP_USER_TIMEOUT, the kernel's backstops for a peer that vanished
/// without a FIN (our own heartbeats normally notice first). Best effort: a socket that
/// refuses an option is still served.
pub(super) fn configure_socket(stream: &mio::net::TcpStream, timeout_ms: u64) {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = (timeout_ms / 1000).clamp(1, 3600) as u32;
    let _ = setsockopt(stream, sockopt::KeepAlive, &true);
    let _ = setsockopt(stream, sockopt::TcpKeepIdle, &(secs * 2));
    let _ = setsockopt(stream, sockopt::TcpKeepInterval, &secs);
    let _ = setsockopt(stream, sockopt::TcpKeepCount, &3);
    let user_timeout = (timeout_ms * 2).min(i32::MAX as u64) as u32;
    let _ = setsockopt(stream, sockopt::TcpUserTimeout, &user_timeout);
}

/// Smoothed RTT (microseconds) and total retransmissions of a socket. (nix has no sockopt for
/// `TCP_INFO`: read with `getsockopt` directly.)
pub(super) fn tcp_info(stream: &mio::net::TcpStream) -> Option<(u32, u32)> {
    // SAFETY: tcp_info is plain old data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket fd and a buffer of `len` bytes that the kernel fills.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (r == 0).then_some((info.tcpi_rtt, info.tcpi_total_retrans))
}

/// Bytes received by the kernel and not yet read (0 if the kernel does not say).
pub(super) fn unread_bytes(stream: &mio::net::TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: a valid socket fd; FIONREAD writes one int.
    let r = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// The histogram bucket of an RTT: `floor(log2(us))`, clamped.
pub(super) fn rtt_bucket(rtt_us: u32) -> usize {
    (32 - rtt_us.max(1).leading_zeros() as usize - 1).min(crate::stats::RTT_BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt};

    #[test]
    fn the_kernels_backstops_are_set_on_an_accepted_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (sock, _) = listener.accept().unwrap();
        let sock = mio::net::TcpStream::from_std(sock);
        configure_socket(&sock, 20_000);
        assert!(getsockopt(&sock, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&sock, sockopt::TcpKeepIdle).unwrap(), 40);
        assert_eq!(getsockopt(&sock, sockopt::TcpKeepInterval).unwrap(), 20);
        assert_eq!(getsockopt(&sock, sockopt::TcpKeepCount).unwrap(), 3);
        assert_eq!(getsockopt(&sock, sockopt::TcpUserTimeout).unwrap(), 40_000);
        assert!(tcp_info(&sock).is_some(), "TCP_INFO of a connected socket");
    }
}
