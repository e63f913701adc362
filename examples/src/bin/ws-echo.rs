//! `ws-echo`: an in-process WebSocket echo server on tokio-tungstenite, the baseline that
//! shmrelay's websocket listener is measured against (`tools/bench/websocket.sh`), alone and
//! behind nginx.
//!
//! Every text or binary message is sent back with its kind; pings are answered and the close
//! handshake is done by tungstenite. Efficiency: the messages that are already readable are
//! echoed and then flushed together (one write for a batch, not one per message).

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// In-process WebSocket echo server on tokio-tungstenite (baseline for shmrelay).
#[derive(Parser, Debug)]
#[command(name = "ws-echo", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the `listening on` line shows it).
    #[arg(long, default_value = "127.0.0.1:7880")]
    listen: SocketAddr,
    /// Runtime threads: 1 = current-thread runtime, N > 1 = multi-thread runtime with N workers.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Largest message accepted (bytes); a longer one closes that connection (1009).
    #[arg(long, default_value_t = 1 << 20)]
    max_message: usize,
    /// Listen backlog.
    #[arg(long, default_value_t = 4096)]
    backlog: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ws-echo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    shmrelay_examples::runtime(args.threads)?.block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let listener = shmrelay_examples::listen(args.listen, args.backlog)?;
    let local = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ws-echo: listening on {local} (threads {}, max message {} bytes)",
            args.threads, args.max_message
        )?;
        out.flush()?;
    }
    let config = WebSocketConfig {
        max_message_size: Some(args.max_message),
        max_frame_size: Some(args.max_message),
        ..WebSocketConfig::default()
    };
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                // Latency matters more than packet count for small echoed messages.
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    // Errors (bad handshakes, resets) only end that connection.
                    let _ = echo(stream, config).await;
                });
            }
            Err(e) => {
                // EMFILE / ENFILE / ECONNABORTED: report, back off briefly, keep serving.
                eprintln!("ws-echo: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn echo(stream: TcpStream, config: WebSocketConfig) -> Result<(), WsError> {
    let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    while let Some(msg) = ws.next().await {
        feed(&mut ws, msg?).await?;
        // Echo what is readable already, then flush once for all of it.
        while let Some(next) = ws.next().now_or_never() {
            match next {
                Some(msg) => feed(&mut ws, msg?).await?,
                None => return Ok(()),
            }
        }
        ws.flush().await?;
    }
    Ok(())
}

/// Queues the echo of a data message; control frames are tungstenite's (a ping's pong and
/// the close reply go out with the next flush).
async fn feed(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
    msg: Message,
) -> Result<(), WsError> {
    match msg {
        Message::Text(_) | Message::Binary(_) => ws.feed(msg).await,
        _ => Ok(()),
    }
}
