//! What the example servers (`tokio-echo`, `ws-echo`) share: their tokio runtime and their
//! listening socket, so that the baselines the relay is measured against are set up alike.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use tokio::net::{TcpListener, TcpSocket};

/// A tokio runtime with `threads` threads: 1 is a current-thread runtime (one core, like one
/// relay front), N > 1 a multi-thread runtime with N workers.
///
/// # Errors
///
/// `threads` is 0, or the runtime cannot start.
pub fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

/// A listening socket on `addr` (SO_REUSEADDR, so a restarted benchmark can bind again at
/// once) with a listen queue of `backlog`. Call it inside the runtime.
///
/// # Errors
///
/// The socket cannot be created, bound or put in listening state.
pub fn listen(addr: SocketAddr, backlog: u32) -> Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("cannot create the listening socket")?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot bind {addr}"))?;
    socket
        .listen(backlog)
        .with_context(|| format!("cannot listen on {addr}"))
}
