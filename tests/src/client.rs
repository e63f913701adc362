//! Wire-protocol clients of the relay under test: [`Client`] (buffered reads that never lose
//! a partial frame to a timeout, and plain blocking reads of exactly one frame), sockets with
//! options set before the handshake, and the background [`Probe`].

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};

use crate::{frame, pattern, HEADER};

/// What a read from the relay gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recv {
    /// One whole frame's payload (empty for a heartbeat).
    Frame(Vec<u8>),
    /// The relay closed the connection (FIN); `leftover` bytes of a partial frame were pending.
    Eof { leftover: usize },
    /// The connection was reset (RST).
    Reset,
    /// Nothing (complete) arrived in time.
    Timeout,
}

/// Reads `stream`'s frames on a thread of its own until the connection ends: answers each
/// length-0 frame (the front's ping) with one if `answer_pings` (what a healthy client
/// does), and passes every other frame's payload on; `None` once the connection is closed
/// (or the receiver gone). For tests that keep many clients answering while they do
/// something else.
pub fn read_frames(
    stream: TcpStream,
    answer_pings: bool,
) -> std::sync::mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = stream;
        loop {
            let mut h = [0u8; HEADER];
            if reader.read_exact(&mut h).is_err() {
                let _ = tx.send(None);
                return;
            }
            let mut p = vec![0u8; u32::from_be_bytes(h) as usize];
            if reader.read_exact(&mut p).is_err() {
                let _ = tx.send(None);
                return;
            }
            if p.is_empty() {
                if answer_pings && (&reader).write_all(&[0u8; HEADER]).is_err() {
                    let _ = tx.send(None);
                    return;
                }
            } else if tx.send(Some(p)).is_err() {
                return;
            }
        }
    });
    rx
}

/// A blocking wire-protocol client, with two ways to read:
/// - buffered ([`recv_within`](Client::recv_within), [`roundtrip_within`](Client::roundtrip_within),
///   [`recv_data`](Client::recv_data), [`wait_closed`](Client::wait_closed), ...): its own read
///   buffer, so a read timeout never loses a partial frame;
/// - plain ([`recv`](Client::recv), [`roundtrip`](Client::roundtrip),
///   [`try_roundtrip`](Client::try_roundtrip), [`closed_within`](Client::closed_within)): straight
///   from the socket, exactly one frame at a time, so a test can go on reading `stream` itself.
///
/// Use one way per client: the plain reads do not look into the buffer.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Set once EOF or a reset was seen.
    done: Option<Recv>,
}

/// Options of a client socket, set before `connect`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketOpts {
    /// Source address (127.0.0.2, ... to spread over ephemeral port ranges).
    pub source: Option<Ipv4Addr>,
    /// SO_RCVBUF, bytes (the kernel doubles it).
    pub rcvbuf: Option<usize>,
}

impl Client {
    /// Connects with a 20 s read timeout (for the plain reads; the buffered reads set their
    /// own) and no write timeout, so a write waits as long as the relay does not read.
    pub fn connect(addr: SocketAddr) -> Client {
        let c = Client::connect_with(addr, SocketOpts::default(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        c.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        c.stream.set_write_timeout(None).unwrap();
        c
    }

    /// Connects from a chosen loopback source address (127.0.0.2, ...), with the timeouts of
    /// [`Client::connect`].
    pub fn connect_from(addr: SocketAddr, src: Ipv4Addr) -> Client {
        let opts = SocketOpts {
            source: Some(src),
            ..SocketOpts::default()
        };
        let stream = raw_connect(addr, opts, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to {addr} from {src}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client::from_stream(stream)
    }

    /// A client on a connected socket, its options left as they are (e.g. a `try_clone` of
    /// another client's stream, to write from a second thread).
    pub fn from_stream(stream: TcpStream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
            done: None,
        }
    }

    /// Connects with socket options applied before the handshake, and 10 s read and write
    /// timeouts (a write blocked that long fails).
    pub fn connect_with(
        addr: SocketAddr,
        opts: SocketOpts,
        timeout: Duration,
    ) -> io::Result<Client> {
        let stream = raw_connect(addr, opts, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client {
            stream,
            buf: Vec::new(),
            done: None,
        })
    }

    /// Sends one frame.
    pub fn try_send(&mut self, payload: &[u8]) -> io::Result<()> {
        self.stream.write_all(&frame(payload))
    }

    /// Sends one frame; panics if it cannot.
    pub fn send(&mut self, payload: &[u8]) {
        self.try_send(payload).expect("send");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads the next frame, or EOF / reset, waiting at most `limit` (buffered).
    pub fn recv_within(&mut self, limit: Duration) -> Recv {
        let end = Instant::now() + limit;
        loop {
            if self.buf.len() >= HEADER {
                let len = u32::from_be_bytes(self.buf[..HEADER].try_into().unwrap()) as usize;
                if self.buf.len() >= HEADER + len {
                    let payload = self.buf[HEADER..HEADER + len].to_vec();
                    self.buf.drain(..HEADER + len);
                    return Recv::Frame(payload);
                }
            }
            if let Some(done) = &self.done {
                return done.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Recv::Timeout;
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("set_read_timeout");
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.done = Some(Recv::Eof {
                        leftover: self.buf.len(),
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    self.done = Some(Recv::Reset)
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// Reads the next frame that is not a heartbeat (answering pings on the way).
    pub fn recv_data(&mut self, limit: Duration) -> Recv {
        let end = Instant::now() + limit;
        loop {
            match self.recv_within(end.saturating_duration_since(Instant::now())) {
                Recv::Frame(p) if p.is_empty() => {
                    // The front's ping: answer it, as a live client does.
                    let _ = self.try_send(b"");
                }
                other => return other,
            }
        }
    }

    /// Sends `payload` and waits for the next data frame (buffered).
    pub fn roundtrip_within(&mut self, payload: &[u8], limit: Duration) -> Recv {
        if let Err(e) = self.try_send(payload) {
            return match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Recv::Reset,
                _ => panic!("send: {e}"),
            };
        }
        self.recv_data(limit)
    }

    /// Waits until the relay closes the connection; returns what ended it and the frames that
    /// came first, or None if it was still open after `limit`.
    pub fn wait_closed(&mut self, limit: Duration) -> Option<(Recv, Vec<Vec<u8>>)> {
        let end = Instant::now() + limit;
        let mut frames = Vec::new();
        loop {
            match self.recv_within(end.saturating_duration_since(Instant::now())) {
                Recv::Frame(p) => frames.push(p),
                Recv::Timeout => return None,
                closed => return Some((closed, frames)),
            }
        }
    }

    /// Whether the relay closed the connection, looking without waiting.
    pub fn is_closed(&mut self) -> bool {
        loop {
            match self.recv_within(Duration::from_millis(1)) {
                Recv::Frame(_) => continue,
                Recv::Timeout => return false,
                _ => return true,
            }
        }
    }

    pub fn shutdown_write(&self) {
        self.stream.shutdown(Shutdown::Write).expect("shutdown");
    }

    /// Reads one frame straight from the socket (a ping included); None on a clean close or
    /// a reset. Panics on other errors, a read timeout included.
    pub fn recv(&mut self) -> Option<Vec<u8>> {
        let mut h = [0u8; 4];
        match self.stream.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("recv: {e}"),
        }
        let mut p = vec![0u8; u32::from_be_bytes(h) as usize];
        self.stream.read_exact(&mut p).expect("frame body");
        Some(p)
    }

    /// Sends `payload` and reads the next frame (plain: a ping may be what comes back).
    pub fn roundtrip(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        self.send(payload);
        self.recv()
    }

    /// A plain round trip that skips pings and reports a refused or closed connection (or a
    /// read timeout) as None instead of panicking.
    pub fn try_roundtrip(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        let mut buf = (payload.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(payload);
        self.stream.write_all(&buf).ok()?;
        loop {
            let mut h = [0u8; 4];
            self.stream.read_exact(&mut h).ok()?;
            let mut p = vec![0u8; u32::from_be_bytes(h) as usize];
            self.stream.read_exact(&mut p).ok()?;
            // A ping (or the answer to a heartbeat) may come first: the wire allows it anywhere.
            if !p.is_empty() || payload.is_empty() {
                return Some(p);
            }
        }
    }

    /// True if the server closed the connection (EOF or reset) within `limit`; what arrives
    /// meanwhile is read and dropped. Leaves the socket's read timeout at `limit`.
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let mut b = [0u8; 4096];
        let end = Instant::now() + limit;
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {
                    if Instant::now() >= end {
                        return false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Connects a TCP socket with options that must be set before the handshake.
pub fn raw_connect(addr: SocketAddr, opts: SocketOpts, timeout: Duration) -> io::Result<TcpStream> {
    if opts.source.is_none() && opts.rcvbuf.is_none() {
        return TcpStream::connect_timeout(&addr, timeout);
    }
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    if let Some(n) = opts.rcvbuf {
        setsockopt(&fd, sockopt::RcvBuf, &n).map_err(io::Error::from)?;
    }
    if let Some(src) = opts.source {
        bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))
            .map_err(io::Error::from)?;
    }
    // Connect without blocking forever: a nonblocking connect, then wait for writability.
    // SAFETY: a socket we own, not yet connected.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    stream.set_nonblocking(true)?;
    let sa = SockaddrIn::from(v4);
    match nix::sys::socket::connect(stream.as_raw_fd(), &sa) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe {
        libc::poll(
            &mut pfd,
            1,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    if r == 0 {
        return Err(io::ErrorKind::TimedOut.into());
    }
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    stream.peer_addr()?; // ENOTCONN if the handshake did not complete
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Makes `close` send a reset instead of a FIN (SO_LINGER with a zero timeout).
pub fn set_linger_zero(stream: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(stream, sockopt::Linger, &l);
}

/// A well-behaved client doing round trips in the background (and answering pings), to show
/// that the relay keeps serving others while a test abuses it.
pub struct Probe {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<ProbeReport>>,
}

/// What a probe saw.
#[derive(Debug)]
pub struct ProbeReport {
    pub rounds: u64,
    /// Round trips that did not come back as the same bytes within the limit (with the first
    /// such outcome).
    pub failures: u64,
    pub first_failure: Option<Recv>,
    pub max_rtt: Duration,
    /// Longest time between two completed round trips.
    pub max_gap: Duration,
}

impl Probe {
    /// Round trips to `addr` every `every`, each allowed `limit`.
    pub fn start(addr: SocketAddr, every: Duration, limit: Duration) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let mut c = Client::connect(addr);
        let thread = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                let mut r = ProbeReport {
                    rounds: 0,
                    failures: 0,
                    first_failure: None,
                    max_rtt: Duration::ZERO,
                    max_gap: Duration::ZERO,
                };
                let mut last = Instant::now();
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let p = pattern(usize::MAX, seq, 1 + seq % 200);
                    seq += 1;
                    let t = Instant::now();
                    let got = c.roundtrip_within(&p, limit);
                    if got == Recv::Frame(p) {
                        r.rounds += 1;
                        rounds.fetch_add(1, Ordering::Relaxed);
                        r.max_rtt = r.max_rtt.max(t.elapsed());
                        r.max_gap = r.max_gap.max(last.elapsed());
                        last = Instant::now();
                    } else {
                        r.failures += 1;
                        r.first_failure.get_or_insert(got);
                        break;
                    }
                    std::thread::sleep(every);
                }
                r
            })
        };
        Probe {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    pub fn finish(mut self) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("not joined")
            .join()
            .expect("probe thread")
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
