//! The listening sockets: one per front and listener, sharing the port with SO_REUSEPORT.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};

/// A listening socket with SO_REUSEPORT, so that one per front can share the port.
pub(super) fn listen(addr: SocketAddr, backlog: i32) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{
        bind, listen as nix_listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag,
        SockType, SockaddrStorage,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    nix_listen(&fd, Backlog::new(backlog).unwrap_or(Backlog::MAXCONN))?;
    // SAFETY: `fd` is a listening TCP socket we own; ownership moves into the listener.
    Ok(unsafe { std::net::TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) })
}
