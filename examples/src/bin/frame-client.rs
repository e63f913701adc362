//! `frame-client`: talk to a shmrelay (or any server of its wire protocol) by hand.
//!
//! The wire protocol is binary (a 4-byte big-endian length, then that many payload bytes), so
//! `nc` or `telnet` cannot speak it. This client sends each MESSAGE given on the command line
//! (or each line of standard input when none is given) as one frame, waits for one reply frame
//! per request and prints its payload as text (invalid UTF-8 is shown as U+FFFD), one per line.
//!
//! Exit status: 0 when every message was answered and no frame was an error frame; 1 when the
//! server sent an error frame (a payload starting with `shmrelay-error:`, which the relay
//! sends before it closes a connection for bad input), closed the connection before replying,
//! or did not reply in time, or when the client could not connect or read its input.
//!
//! ```text
//! frame-client hello world              # two frames, two reply lines
//! frame-client --heartbeat              # a length-0 frame; prints "heartbeat ok"
//! echo hi | frame-client --addr 127.0.0.1:7879
//! ```

use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

/// Send frames of the shmrelay wire protocol and print the replies.
#[derive(Parser, Debug)]
#[command(name = "frame-client", version)]
struct Args {
    /// Server address (shmrelay listens on 127.0.0.1:7878 by default, tokio-echo on :7879).
    #[arg(long, default_value = "127.0.0.1:7878")]
    addr: String,
    /// Send a heartbeat (length-0 frame) first and print `heartbeat ok` when it is answered.
    #[arg(long)]
    heartbeat: bool,
    /// Seconds to wait for the connection and for each reply before giving up.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// After the last reply, keep printing frames the server pushes for this many seconds.
    #[arg(long, default_value_t = 0.0)]
    wait: f64,
    /// Largest reply payload accepted (bytes).
    #[arg(long, default_value_t = 16 << 20)]
    max_frame: u32,
    /// Messages to send, one frame each; without any, each line of standard input is one.
    messages: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("frame-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn secs(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| anyhow!("{what} must be a non-negative number of seconds"))
}

/// How the relay's error frames start (`length-prefixed` codec).
const ERROR_PREFIX: &[u8] = b"shmrelay-error:";

/// The first error frame the server sent: what it answered (or `None` for a push) and its text.
struct ErrorFrame {
    answering: Option<usize>,
    text: String,
}

impl ErrorFrame {
    /// Records `reply` as the first error frame, if it is one and none was seen before.
    fn note(first: &mut Option<ErrorFrame>, answering: Option<usize>, reply: &[u8]) {
        if first.is_none() && reply.starts_with(ERROR_PREFIX) {
            *first = Some(ErrorFrame {
                answering,
                text: String::from_utf8_lossy(reply).into_owned(),
            });
        }
    }

    fn describe(&self) -> String {
        match self.answering {
            Some(n) => format!(
                "the server answered message {n} with an error frame: {}",
                self.text
            ),
            None => format!("the server sent an error frame: {}", self.text),
        }
    }
}

fn run(args: Args) -> Result<()> {
    let timeout = secs(args.timeout, "--timeout")?;
    if timeout.is_zero() {
        bail!("--timeout must be above 0");
    }
    let wait = secs(args.wait, "--wait")?;
    let mut conn = Conn::connect(&args.addr, timeout, args.max_frame)?;
    let mut out = std::io::stdout().lock();

    if args.heartbeat {
        conn.send(b"")?;
        let reply = conn.recv("the heartbeat")?;
        if !reply.is_empty() {
            bail!(
                "the heartbeat was answered with a {}-byte frame, expected a length-0 frame",
                reply.len()
            );
        }
        writeln!(out, "heartbeat ok")?;
        out.flush()?;
    }

    let mut error = None;
    let talked = talk(&args, wait, &mut conn, &mut out, &mut error);
    conn.close();
    // An error frame usually comes with a close, so a message after it fails too: both count.
    match (error, talked) {
        (None, talked) => talked,
        (Some(e), Ok(())) => Err(anyhow!("{}", e.describe())),
        (Some(e), Err(later)) => Err(later.context(e.describe())),
    }
}

/// Sends the messages (arguments or standard input) one at a time, printing each reply, then
/// prints pushes for `wait`; the first error frame seen goes to `error`.
fn talk(
    args: &Args,
    wait: Duration,
    conn: &mut Conn,
    out: &mut std::io::StdoutLock,
    error: &mut Option<ErrorFrame>,
) -> Result<()> {
    let mut exchange = |msg: &[u8], n: usize| -> Result<()> {
        conn.send(msg)?;
        let reply = conn.recv(&format!("message {n}"))?;
        writeln!(out, "{}", String::from_utf8_lossy(&reply))?;
        out.flush()?;
        ErrorFrame::note(error, Some(n), &reply);
        Ok(())
    };
    if !args.messages.is_empty() {
        for (i, m) in args.messages.iter().enumerate() {
            exchange(m.as_bytes(), i + 1)?;
        }
    } else if !args.heartbeat {
        for (i, line) in std::io::stdin().lock().split(b'\n').enumerate() {
            let mut line = line.context("cannot read standard input")?;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            exchange(&line, i + 1)?;
        }
    }

    if !wait.is_zero() {
        let until = Instant::now() + wait;
        while let Some(reply) = conn.recv_until(until)? {
            writeln!(out, "{}", String::from_utf8_lossy(&reply))?;
            out.flush()?;
            ErrorFrame::note(error, None, &reply);
        }
    }
    Ok(())
}

struct Conn {
    stream: TcpStream,
    addr: String,
    timeout: Duration,
    max_frame: u32,
}

impl Conn {
    fn connect(addr: &str, timeout: Duration, max_frame: u32) -> Result<Conn> {
        let targets: Vec<_> = addr
            .to_socket_addrs()
            .with_context(|| format!("bad address {addr:?} (expected HOST:PORT)"))?
            .collect();
        let mut last_err = None;
        for target in targets {
            match TcpStream::connect_timeout(&target, timeout) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(Conn {
                        stream,
                        addr: addr.to_string(),
                        timeout,
                        max_frame,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        match last_err {
            Some(e) => Err(anyhow!(
                "cannot connect to {addr}: {e} (is the server running there?)"
            )),
            None => Err(anyhow!("{addr} resolves to no address")),
        }
    }

    fn send(&mut self, payload: &[u8]) -> Result<()> {
        let len =
            u32::try_from(payload.len()).map_err(|_| anyhow!("a message is longer than 4 GiB"))?;
        let mut frame = Vec::with_capacity(4 + payload.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(payload);
        self.stream
            .write_all(&frame)
            .with_context(|| format!("cannot send to {}", self.addr))
    }

    /// Reads one reply frame, waiting at most the timeout; `what` names it in errors.
    fn recv(&mut self, what: &str) -> Result<Vec<u8>> {
        let until = Instant::now() + self.timeout;
        match self.read_frame(until) {
            Ok(Some(f)) => Ok(f),
            Ok(None) => bail!(
                "no reply to {what} from {} within {:?}",
                self.addr,
                self.timeout
            ),
            Err(ReadError::Closed) => {
                bail!(
                    "the server at {} closed the connection before replying to {what}",
                    self.addr
                )
            }
            Err(ReadError::Other(e)) => {
                Err(e.context(format!("while waiting for the reply to {what}")))
            }
        }
    }

    /// Reads one frame if one arrives before `until`; `None` when the time is up.
    fn recv_until(&mut self, until: Instant) -> Result<Option<Vec<u8>>> {
        match self.read_frame(until) {
            Ok(f) => Ok(f),
            Err(ReadError::Closed) => Ok(None),
            Err(ReadError::Other(e)) => Err(e),
        }
    }

    fn read_frame(&mut self, until: Instant) -> Result<Option<Vec<u8>>, ReadError> {
        let mut header = [0u8; 4];
        if !self.read_exact_until(&mut header, until, true)? {
            return Ok(None);
        }
        let len = u32::from_be_bytes(header);
        if len > self.max_frame {
            return Err(ReadError::Other(anyhow!(
                "the server sent a {len}-byte frame, more than --max-frame {}",
                self.max_frame
            )));
        }
        let mut payload = vec![0u8; len as usize];
        // Once a header has arrived, the rest of its frame must follow (same deadline rule).
        if !self.read_exact_until(
            &mut payload,
            until.max(Instant::now() + self.timeout),
            false,
        )? {
            return Err(ReadError::Other(anyhow!(
                "a reply frame from {} stopped half-way",
                self.addr
            )));
        }
        Ok(Some(payload))
    }

    /// Fills `buf`. Returns false if the deadline passed before anything was read (only when
    /// `may_time_out_empty`); a deadline in the middle of `buf` is an error.
    fn read_exact_until(
        &mut self,
        buf: &mut [u8],
        until: Instant,
        may_time_out_empty: bool,
    ) -> Result<bool, ReadError> {
        let mut got = 0;
        while got < buf.len() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if got == 0 && may_time_out_empty {
                    return Ok(false);
                }
                return Err(ReadError::Other(anyhow!(
                    "timed out in the middle of a frame from {}",
                    self.addr
                )));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| ReadError::Other(e.into()))?;
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(n) => got += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(ReadError::Closed)
                }
                Err(e) => {
                    return Err(ReadError::Other(
                        anyhow!(e).context(format!("cannot read from {}", self.addr)),
                    ))
                }
            }
        }
        Ok(true)
    }

    fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

enum ReadError {
    Closed,
    Other(anyhow::Error),
}
