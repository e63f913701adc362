//! `ws-echo`: an in-process WebSocket echo server on tokio-tungstenite, the baseline that
//! shmrelay's websocket listener is measured against (`tools/bench/websocket.sh`), alone and
//! behind nginx.
//!
//! Every text or binary message is sent back with its kind; pings are answered and the close
//! handshake is done by tungstenite. Efficiency: the messages that are already readable are
//! echoed and then flushed together (one write for a batch, not one per message).

use std::net::SocketAddr;
use std::process::ExitCode;

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
    /// Largest message accepted (bytes); a longer one closes that connection (1009).
    #[arg(long, default_value_t = 1 << 20)]
    max_message: usize,
    #[command(flatten)]
    server: shmrelay_examples::ServerArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = WebSocketConfig {
        max_message_size: Some(args.max_message),
        max_frame_size: Some(args.max_message),
        ..WebSocketConfig::default()
    };
    let detail = format!("max message {} bytes", args.max_message);
    let server = shmrelay_examples::serve(
        "ws-echo",
        args.listen,
        &args.server,
        &detail,
        move |s| async move {
            // Errors (bad handshakes, resets) only end that connection.
            let _ = echo(s, config).await;
        },
    );
    shmrelay_examples::exit_code("ws-echo", args.server.block_on(server))
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
