//! The listening sockets: one per front and listener, sharing the port with SO_REUSEPORT, and
//! the start-up checks that this sharing stays among this relay's own sockets.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nix::sys::socket::{
    bind, listen as nix_listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, SockaddrStorage,
};

/// A listening socket with SO_REUSEPORT, so that one per front can share the port.
pub(super) fn listen(addr: SocketAddr, backlog: i32) -> std::io::Result<std::net::TcpListener> {
    let fd = socket(family(addr), SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    nix_listen(&fd, Backlog::new(backlog).unwrap_or(Backlog::MAXCONN))?;
    // SAFETY: `fd` is a listening TCP socket we own; ownership moves into the listener.
    Ok(unsafe { std::net::TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) })
}

fn family(addr: SocketAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// Whether two listeners would take connections from one another: the same fixed port, and
/// the same address or a wildcard that covers the other's (`[::]` covers IPv4 too, as Linux
/// binds it dual-stack by default). Port 0 never overlaps: each such listener gets its own port.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |x: SocketAddr, y: SocketAddr| {
        x.ip().is_unspecified() && (x.is_ipv4() == y.is_ipv4() || x.is_ipv6())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// Refuses listeners of one configuration that overlap: with SO_REUSEPORT they would all bind,
/// and the kernel would hand each new connection to either codec and pool at random.
pub(super) fn check_distinct(addrs: &[SocketAddr]) -> Result<()> {
    for (i, &a) in addrs.iter().enumerate() {
        for (j, &b) in addrs.iter().enumerate().skip(i + 1) {
            if overlap(a, b) {
                bail!(
                    "listeners {i} ({a}) and {j} ({b}) share a port: each listener needs an address of its own, or connections land on either at random"
                );
            }
        }
    }
    Ok(())
}

/// Refuses an address another process listens on. SO_REUSEPORT would let this relay bind it
/// too (same user) and take half the other's new connections, so a probe socket without
/// SO_REUSEPORT binds first: that fails with EADDRINUSE if anything listens there. (It has
/// SO_REUSEADDR, so connections of a previous run still in TIME_WAIT do not count.) The probe
/// is closed before the real sockets bind. `patience` retries a busy address that long (the
/// listeners of a dead run's orphans, just killed, close when they have died).
pub(super) fn check_free(addr: SocketAddr, patience: Duration) -> Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let end = Instant::now() + patience;
    loop {
        match probe(addr) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EADDRINUSE) if Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(nix::errno::Errno::EADDRINUSE) => bail!(
                "{addr} is already in use by another process (another relay? `ss -ltnp 'sport = :{}'` shows who listens): refusing to share its port",
                addr.port()
            ),
            // Any other failure shows again, with its context, when the real socket binds.
            Err(_) => return Ok(()),
        }
    }
}

/// Binds (never listens on) a socket without SO_REUSEPORT at `addr`, and closes it.
fn probe(addr: SocketAddr) -> nix::Result<()> {
    let fd = socket(family(addr), SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn listeners_overlap_on_one_fixed_port_of_one_address_or_a_covering_wildcard() {
        assert!(overlap(a("127.0.0.1:7000"), a("127.0.0.1:7000")));
        assert!(overlap(a("0.0.0.0:7000"), a("127.0.0.1:7000")));
        assert!(overlap(a("127.0.0.1:7000"), a("[::]:7000")));
        assert!(!overlap(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(!overlap(a("127.0.0.1:7000"), a("127.0.0.1:7001")));
        assert!(!overlap(a("127.0.0.1:7000"), a("127.0.0.2:7000")));
        assert!(!overlap(a("0.0.0.0:7000"), a("[::1]:7000")));
    }

    #[test]
    fn a_configuration_with_two_listeners_on_one_address_is_refused_naming_it() {
        let e = check_distinct(&[a("127.0.0.1:0"), a("127.0.0.1:7000"), a("127.0.0.1:7000")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("listeners 1 (127.0.0.1:7000) and 2"), "{e}");
        check_distinct(&[a("127.0.0.1:0"), a("127.0.0.1:0"), a("127.0.0.1:7000")]).unwrap();
    }

    #[test]
    fn an_address_someone_listens_on_is_refused_and_a_free_one_is_not() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = busy.local_addr().unwrap();
        let e = check_free(addr, Duration::ZERO).unwrap_err().to_string();
        assert!(e.contains(&addr.to_string()), "{e}");
        drop(busy);
        check_free(addr, Duration::ZERO).unwrap();
        check_free(a("127.0.0.1:0"), Duration::ZERO).unwrap();
    }
}
