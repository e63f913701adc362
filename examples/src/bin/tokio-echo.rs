//! `tokio-echo`: an in-process tokio echo server for the shmrelay wire protocol.
//!
//! Every frame (4-byte big-endian length, then that many payload bytes) is sent back byte for
//! byte; a heartbeat (length 0) is answered with a length-0 frame. There is no second process
//! and no ring: this is the upper-bound baseline that the relay is measured against.
//!
//! Efficiency: one buffered read per wake-up, the whole run of complete frames in it written
//! back with one `write_all` (no system call per frame), the partial frame at the end kept for
//! the next read. The read buffer starts small and grows when reads fill it (and shrinks back
//! when the connection is quiet), so idle connections stay cheap.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use shmrelay_examples::frames::scan;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Smallest read buffer of a connection (bytes).
const MIN_BUF: usize = 8 * 1024;
/// A buffer grows up to this size when reads keep filling it (bigger frames grow it further).
const MAX_BATCH_BUF: usize = 256 * 1024;

/// In-process tokio echo server for the length-prefixed wire protocol (baseline for shmrelay).
#[derive(Parser, Debug)]
#[command(name = "tokio-echo", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the `listening on` line shows it).
    #[arg(long, default_value = "127.0.0.1:7879")]
    listen: SocketAddr,
    /// Largest payload accepted (bytes); a longer length closes that connection.
    #[arg(long, default_value_t = 1 << 20)]
    max_frame: u32,
    #[command(flatten)]
    server: shmrelay_examples::ServerArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let max_frame = args.max_frame;
    let detail = format!("max frame {max_frame} bytes");
    let server = shmrelay_examples::serve(
        "tokio-echo",
        args.listen,
        &args.server,
        &detail,
        move |s| async move {
            // Errors (resets, a client vanishing) only end that connection.
            let _ = echo(s, max_frame).await;
        },
    );
    shmrelay_examples::exit_code("tokio-echo", args.server.block_on(server))
}

async fn echo(mut stream: TcpStream, max_frame: u32) -> std::io::Result<()> {
    let mut buf = vec![0u8; MIN_BUF];
    let mut filled = 0usize;
    loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(());
        }
        let filled_whole_space = filled + n == buf.len();
        filled += n;
        let s = scan(&buf[..filled], max_frame);
        if s.complete > 0 {
            // One write for every complete frame of this read: the echo is the input itself.
            stream.write_all(&buf[..s.complete]).await?;
        }
        if s.oversized {
            // Protocol error: close this connection (frames before it were answered).
            return Ok(());
        }
        if s.complete > 0 {
            buf.copy_within(s.complete..filled, 0);
            filled -= s.complete;
        }
        // Size the buffer for what comes next.
        let need = s.pending_frame.unwrap_or(0);
        if need > buf.len() {
            buf.resize(need, 0);
        } else if filled_whole_space && buf.len() < MAX_BATCH_BUF {
            buf.resize((buf.len() * 2).min(MAX_BATCH_BUF).max(need), 0);
        } else if !filled_whole_space
            && buf.len() > MIN_BUF
            && filled <= MIN_BUF / 2
            && need <= MIN_BUF
        {
            buf.truncate(MIN_BUF);
            buf.shrink_to_fit();
        }
    }
}
