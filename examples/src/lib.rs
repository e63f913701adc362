//! What the example servers (`tokio-echo`, `ws-echo`, `uring-echo`) share: their flags, their
//! tokio runtime, their listening socket and accept loop, the frame scan, so that the baselines
//! the relay is measured against are set up alike.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::{TcpSocket, TcpStream};

pub mod frames;

/// The flags every example server takes besides its address (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Runtime threads: 1 = current-thread runtime, N > 1 = multi-thread runtime with N workers.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Listen backlog.
    #[arg(long, default_value_t = 4096)]
    pub backlog: u32,
}

impl ServerArgs {
    /// Runs `server` to its end on a tokio runtime with `--threads` threads: 1 is a
    /// current-thread runtime (one core, like one relay front), N > 1 a multi-thread runtime.
    ///
    /// # Errors
    ///
    /// `--threads` is 0, the runtime cannot start, or `server` fails.
    pub fn block_on(&self, server: impl Future<Output = Result<()>>) -> Result<()> {
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        let mut builder = if self.threads == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(self.threads);
            b
        };
        let rt = builder
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        rt.block_on(server)
    }
}

/// Listens on `addr` (SO_REUSEADDR, so a restarted benchmark binds again at once), prints
/// `NAME: listening on ADDR (threads N, DETAIL)` on stdout, then serves every accepted
/// connection (TCP_NODELAY: latency matters more than packet count for small echoes) in a
/// task of its own running `conn`. Runs until the process ends; a failed accept (EMFILE,
/// ECONNABORTED) is reported and retried after 10 ms.
///
/// # Errors
///
/// The socket cannot be created, bound or put in listening state.
pub async fn serve<F, Fut>(
    name: &str,
    addr: SocketAddr,
    args: &ServerArgs,
    detail: &str,
    conn: F,
) -> Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("cannot create the listening socket")?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot bind {addr}"))?;
    let listener = socket
        .listen(args.backlog)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{name}: listening on {local} (threads {}, {detail})",
            args.threads
        )?;
        out.flush()?;
    }
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(conn(stream));
            }
            Err(e) => {
                eprintln!("{name}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The exit status of an example server: 0, or 1 with the error's chain on stderr, prefixed
/// with the program's `name`.
pub fn exit_code(name: &str, result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
