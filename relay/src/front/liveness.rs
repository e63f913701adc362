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

    /// The longest a healthy connection may be silent (ticks): the heartbeat timeout of a
    /// client that beats on its own at the longest interval. The kernel's backstops are sized
    /// from it, so they never act on a connection our own heartbeats still consider alive.
    pub fn longest_timeout(&self) -> u32 {
        self.timeout(self.ping_max)
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

/// Lateness of the front's own loop below this is noise (scheduling, a busy turn) and counts
/// against nobody's deadline either way; above it, the whole lateness is taken off the
/// clients' clock.
pub(super) const LAG_NS: u64 = 100_000_000;

/// The front's clock for its clients' deadlines (heartbeat, idle and frame timeouts): real
/// time minus the time the front itself was late. A client is never blamed for the relay's
/// lateness: while the front is stopped (SIGSTOP), starved of CPU or busy with a long turn,
/// nobody could be heard, so that time does not count; every deadline moves by as much, at
/// no cost per connection.
///
/// Lateness is measured per loop turn: the time between two looks at the clock beyond the
/// sleep the loop asked for (a sleep of 100 ms that took 3 s was 2.9 s late; a turn that
/// spent 2 s handling events was 2 s late).
#[derive(Debug)]
pub(super) struct FrontClock {
    start_ns: u64,
    last_ns: u64,
    /// The sleep asked for since the last look (0 while awake).
    sleep_ns: u64,
    /// Lateness taken off so far.
    lost_ns: u64,
}

impl FrontClock {
    pub fn new(now_ns: u64) -> FrontClock {
        FrontClock {
            start_ns: now_ns,
            last_ns: now_ns,
            sleep_ns: 0,
            lost_ns: 0,
        }
    }

    /// The loop is about to sleep this long at most (`None`: until an event).
    pub fn sleeping(&mut self, timeout: Option<std::time::Duration>) {
        self.sleep_ns = timeout.map_or(u64::MAX, |t| t.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// A look at the clock at `now_ns` (CLOCK_MONOTONIC): the clients' tick now, and the
    /// lateness (ns) taken off since the last look, if any.
    pub fn tick(&mut self, now_ns: u64) -> (u64, Option<u64>) {
        let gap = now_ns.saturating_sub(self.last_ns);
        self.last_ns = now_ns.max(self.last_ns);
        let late = gap.saturating_sub(std::mem::take(&mut self.sleep_ns));
        let forgiven = (late >= LAG_NS).then(|| {
            self.lost_ns += late;
            late
        });
        let ticks = self
            .last_ns
            .saturating_sub(self.start_ns)
            .saturating_sub(self.lost_ns)
            / (TICK_MS * 1_000_000);
        (ticks, forgiven)
    }
}

/// Turns on keepalive and TCP_USER_TIMEOUT, the kernel's backstops for a peer that vanished
/// without a FIN while the front cannot notice (our own heartbeats normally notice first).
/// `timeout_ms` is the longest silence our heartbeats allow a healthy client
/// ([`Liveness::longest_timeout`]). Best effort: a socket that refuses an option is still
/// served.
///
/// Sized so that the kernel never acts first on a healthy connection (issue 15): keepalive
/// starts probing only after twice that silence (a client beating every `ping_max` is never
/// probed: its beats or our pings always come sooner), and `TCP_USER_TIMEOUT`, which
/// overrides the probe count once any probe is out, leaves room for every probe
/// (`idle + (count + 1) x interval`). Sized from `ping_min` instead (22.5 s), every connection
/// of clients beating each 60 s was probed at 44 s and aborted (`ETIMEDOUT`, counted as
/// `io_error` / `timed_out`) when one probe's answer was lost: 2,461 of 200,000 in
/// `scale.sh --conns 200000` when the clients closed at once, and the likely cause of the
/// mass `io_error` closes at a million.
pub(super) fn configure_socket(stream: &mio::net::TcpStream, timeout_ms: u64) {
    use nix::sys::socket::{setsockopt, sockopt};
    let (idle, interval, count, user_timeout_ms) = backstops(timeout_ms);
    let _ = setsockopt(stream, sockopt::KeepAlive, &true);
    let _ = setsockopt(stream, sockopt::TcpKeepIdle, &idle);
    let _ = setsockopt(stream, sockopt::TcpKeepInterval, &interval);
    let _ = setsockopt(stream, sockopt::TcpKeepCount, &count);
    let _ = setsockopt(stream, sockopt::TcpUserTimeout, &user_timeout_ms);
}

/// Keepalive idle and interval (s), probe count, and TCP_USER_TIMEOUT (ms) for connections
/// whose longest healthy silence is `timeout_ms`.
fn backstops(timeout_ms: u64) -> (u32, u32, u32, u32) {
    // The kernel takes at most 32767 s for the keepalive times.
    let secs = timeout_ms.div_ceil(1000).clamp(1, 16_000) as u32;
    let idle = 2 * secs;
    let interval = (secs / 3).max(1);
    let count = 3;
    let user_timeout_ms = (idle + (count + 1) * interval) * 1000;
    (idle, interval, count, user_timeout_ms)
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
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    /// The kernel never acts before our heartbeats: keepalive waits twice the longest healthy
    /// silence, and TCP_USER_TIMEOUT (which ends the connection as soon as it has passed with
    /// any probe out) leaves time for every probe.
    #[test]
    fn the_kernels_backstops_wait_for_every_probe_after_our_longest_timeout() {
        let cfg = Config::default();
        let l = Liveness::new(&cfg);
        let longest_ms = l.longest_timeout() as u64 * TICK_MS;
        assert_eq!(longest_ms, 90_000, "1.5 x ping_max");
        for t in [1_000, 2_000, 22_500, 90_000, 7 * 24 * 3_600_000] {
            let (idle, interval, count, user) = backstops(t);
            assert!(idle as u64 * 1000 >= 2 * t.min(16_000_000), "{t}");
            assert!(idle <= 32_767 && interval >= 1);
            assert!(
                user as u64 >= (idle + (count + 1) * interval) as u64 * 1000,
                "{t}: TCP_USER_TIMEOUT {user} ms cuts the probes short"
            );
        }
    }

    #[test]
    fn the_clients_clock_stops_while_the_front_is_late() {
        let mut c = FrontClock::new(1_000 * MS);
        // Normal turns and sleeps: real time.
        assert_eq!(c.tick(1_050 * MS), (5, None));
        c.sleeping(Some(Duration::from_millis(100)));
        assert_eq!(c.tick(1_150 * MS), (15, None));
        // A sleep of 100 ms that took 3 s (SIGSTOP): 2.9 s taken off.
        c.sleeping(Some(Duration::from_millis(100)));
        assert_eq!(c.tick(4_150 * MS), (25, Some(2_900 * MS)));
        // A turn that took 1 s (thousands of accepts): taken off too.
        assert_eq!(c.tick(5_150 * MS), (25, Some(1_000 * MS)));
        // Lateness under LAG_NS is noise: not taken off.
        assert_eq!(c.tick(5_240 * MS), (34, None));
        // An unbounded sleep is never late.
        c.sleeping(None);
        assert_eq!(c.tick(65_240 * MS), (6_034, None));
        // The clock never goes back, whatever it is fed.
        assert_eq!(c.tick(MS).0, 6_034);
    }

    #[test]
    fn a_client_silent_for_its_timeout_in_the_clients_time_is_closed_and_not_before() {
        let cfg = Config {
            ping_min_ms: 1_000,
            ping_max_ms: 1_000,
            heartbeat_timeout_ms: Some(2_000),
            ..Config::default()
        };
        let l = Liveness::new(&cfg);
        let mut clock = FrontClock::new(0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut conn = Conn::new(
            mio::net::TcpStream::from_std(stream),
            0,
            Codec::default(),
            0,
            0,
        );
        conn.state = ConnState::Open;
        conn.ping_outstanding = true;
        // Stopped for 10 s right after hearing from it: its deadline moved by as much.
        clock.sleeping(Some(Duration::from_millis(100)));
        let (now, late) = clock.tick(10_000 * MS);
        assert!(late.is_some());
        assert!(matches!(l.check(&conn, now as u32, now), Verdict::Wait(_)));
        // 2 s of the clients' time later it is closed.
        clock.sleeping(Some(Duration::from_secs(2)));
        let (now, _) = clock.tick(12_000 * MS);
        assert!(matches!(
            l.check(&conn, now as u32, now),
            Verdict::Close(CloseReason::HeartbeatTimeout)
        ));
    }

    #[test]
    fn the_kernels_backstops_are_set_on_an_accepted_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (sock, _) = listener.accept().unwrap();
        let sock = mio::net::TcpStream::from_std(sock);
        configure_socket(&sock, 90_000);
        assert!(getsockopt(&sock, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&sock, sockopt::TcpKeepIdle).unwrap(), 180);
        assert_eq!(getsockopt(&sock, sockopt::TcpKeepInterval).unwrap(), 30);
        assert_eq!(getsockopt(&sock, sockopt::TcpKeepCount).unwrap(), 3);
        assert_eq!(getsockopt(&sock, sockopt::TcpUserTimeout).unwrap(), 300_000);
        assert!(tcp_info(&sock).is_some(), "TCP_INFO of a connected socket");
    }
}
