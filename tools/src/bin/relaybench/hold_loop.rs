//! The event loop of one `relaybench hold` thread: its connections as compact slots in one
//! table, driven by epoll (mio) and the relay's hashed timing wheel, with no task, future or
//! buffer per connection.
//!
//! A connection costs the thread a [`Conn`] (20 bytes), its global index (8) and one wheel
//! entry (16) while it has a heartbeat scheduled; reads go through one scratch buffer per
//! thread and the only bytes ever written are zeros from a static buffer. Sockets are
//! registered once, edge-triggered, for both directions: a connect completes with a writable
//! event, and a writable event later only matters while answers are waiting to be written.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::task::Poll as Go;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage};
use shmrelay::timer::{Key, Wheel};

use super::{unit, Heartbeats, HoldTally};
use crate::engine::{set_bind_address_no_port, Plan, ThreadCtl};

/// Resolution of heartbeat timers: ample for intervals of tenths of a second and more.
const TICK: Duration = Duration::from_millis(10);
/// Slots of the timing wheel: 4096 ticks (41 s); a later deadline is looked at once per turn
/// of the wheel until it is due.
const WHEEL_SLOTS: usize = 4096;
/// Readiness events taken per `epoll_wait`.
const EVENTS: usize = 1024;
/// Bytes one read takes at most (idle connections get 4-byte frames).
const SCRATCH: usize = 16 * 1024;

/// Zero bytes: every frame a holding connection sends is a length-0 frame.
static ZEROS: [u8; 64] = [0; 64];

/// Where a connection is in its life.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Its connect has not been started yet.
    Waiting,
    Connecting,
    Open,
    /// Failed to connect, or closed (by the server or by an error).
    Done,
}

/// One connection of the thread.
struct Conn {
    /// The socket while connecting or open (`None` before and after: dropping it closes it).
    sock: Option<TcpStream>,
    /// Zero bytes still to write (answers and heartbeats the socket did not take at once).
    pending: u32,
    /// While `head` > 0, the frame length read so far (big-endian, byte by byte); otherwise
    /// the payload bytes of a data frame still to skip.
    len: u32,
    /// Own heartbeats due so far (draws each interval's jitter).
    beats: u16,
    /// Bytes of the current frame header received so far (0..=3).
    head: u8,
    phase: Phase,
    /// Own heartbeat sent and not yet answered.
    outstanding: bool,
}

/// What a thread's loop keeps: the table of its connections, the poller, the timers and the
/// counts.
pub(super) struct HoldLoop<'p> {
    plan: &'p Plan<Heartbeats>,
    ids: Vec<usize>,
    conns: Vec<Conn>,
    poll: Poll,
    wheel: Wheel,
    /// The timers that came due in a turn (kept to reuse its memory).
    due: Vec<(Key, u64)>,
    /// `wheel`'s tick 0.
    epoch: Instant,
    scratch: Box<[u8]>,
    heartbeat: Option<Duration>,
    /// Connections not started yet begin at this index.
    next: usize,
    /// Connects in flight, with the time each gives up, in the order they started (so their
    /// deadlines only grow).
    connecting: VecDeque<(Instant, usize)>,
    concurrency: usize,
    per_connect: Duration,
    ramp_end: Instant,
    /// Attempts finished (opened or failed).
    finished: usize,
    /// Connections open now.
    open: u64,
    /// Start of the hold window, once the run has started.
    window: Option<Instant>,
    pub(super) tally: HoldTally,
}

/// Runs one thread: connect its share, report, hold until told to stop, count.
pub(super) fn run(plan: &Plan<Heartbeats>, mut ctl: ThreadCtl<HoldTally>) -> Result<HoldTally> {
    let mut lp = HoldLoop::new(plan, std::mem::take(&mut ctl.ids), ctl.concurrency)?;
    let mut events = Events::with_capacity(EVENTS);
    while lp.finished < lp.conns.len() {
        lp.start_connects();
        lp.turn(&mut events)?;
    }
    ctl.ready(lp.tally.clone());
    let started = loop {
        match ctl.poll_go() {
            Go::Ready(Some(t0)) => break Some(t0),
            Go::Ready(None) => break None,
            Go::Pending => lp.turn(&mut events)?,
        }
    };
    if let Some(t0) = started {
        lp.window = Some(t0);
        let c = &lp.tally.counters;
        let before = (c.heartbeats_answered, c.pings_answered);
        while !ctl.should_stop() {
            lp.turn(&mut events)?;
        }
        let c = &mut lp.tally.counters;
        c.heartbeats_answered_in_window = c.heartbeats_answered - before.0;
        c.pings_answered_in_window = c.pings_answered - before.1;
    }
    lp.tally.counters.open_at_end = lp.open;
    lp.cut();
    Ok(lp.tally)
}

impl<'p> HoldLoop<'p> {
    fn new(plan: &'p Plan<Heartbeats>, ids: Vec<usize>, concurrency: usize) -> Result<Self> {
        let now = Instant::now();
        let w = &plan.work;
        Ok(HoldLoop {
            plan,
            conns: ids
                .iter()
                .map(|_| Conn {
                    sock: None,
                    pending: 0,
                    len: 0,
                    beats: 0,
                    head: 0,
                    phase: Phase::Waiting,
                    outstanding: false,
                })
                .collect(),
            ids,
            poll: Poll::new().context("cannot create an epoll instance")?,
            wheel: Wheel::new(WHEEL_SLOTS, 0),
            due: Vec::new(),
            epoch: now,
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            heartbeat: (w.heartbeat > 0.0).then(|| Duration::from_secs_f64(w.heartbeat)),
            next: 0,
            connecting: VecDeque::new(),
            concurrency: concurrency.max(1),
            per_connect: Duration::from_secs_f64(plan.connect_timeout),
            ramp_end: now + Duration::from_secs_f64(plan.ramp_limit),
            finished: 0,
            open: 0,
            window: None,
            tally: HoldTally::default(),
        })
    }

    /// Waits for readiness or the next tick (at most one tick), handles what came, then expires
    /// connects and fires the heartbeats that are due.
    fn turn(&mut self, events: &mut Events) -> Result<()> {
        let wait = self
            .wheel
            .next_due()
            .map_or(TICK, |t| {
                self.at(t).saturating_duration_since(Instant::now())
            })
            .min(TICK);
        match self.poll.poll(events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("epoll_wait failed"),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            match self.conns[i].phase {
                Phase::Connecting => {
                    if ev.is_writable() || ev.is_error() || ev.is_write_closed() {
                        self.finish_connect(i);
                    }
                    if self.conns[i].phase == Phase::Open && ev.is_readable() {
                        self.read(i);
                    }
                }
                Phase::Open => {
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        self.read(i);
                    }
                    if ev.is_writable() {
                        self.flush(i);
                    }
                }
                Phase::Waiting | Phase::Done => {}
            }
        }
        let now = Instant::now();
        self.expire_connects(now);
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(self.tick(now), &mut due);
        for ((i, _), _) in due.drain(..) {
            self.beat(i as usize);
        }
        self.due = due;
        Ok(())
    }

    fn tick(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.epoch).as_nanos() / TICK.as_nanos()) as u64
    }

    fn at(&self, tick: u64) -> Instant {
        self.epoch + TICK * tick as u32
    }

    /// Starts connects while fewer than `concurrency` are in flight; after the ramp limit every
    /// connection not started yet fails.
    fn start_connects(&mut self) {
        let now = Instant::now();
        if now >= self.ramp_end {
            while self.next < self.conns.len() {
                let i = self.next;
                self.next += 1;
                self.connect_failed(i, "connection not open within --ramp-limit".into(), None);
            }
            return;
        }
        while self.connecting.len() < self.concurrency && self.next < self.conns.len() {
            let i = self.next;
            self.next += 1;
            let id = self.ids[i];
            let src = (!self.plan.src_ips.is_empty())
                .then(|| self.plan.src_ips[id % self.plan.src_ips.len()]);
            let addr = self.plan.addr;
            match start_connect(addr, src) {
                Ok(sock) => {
                    let fd = sock.as_raw_fd();
                    let reg = self.poll.registry().register(
                        &mut SourceFd(&fd),
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    if let Err(e) = reg {
                        self.connect_failed(i, format!("cannot watch a socket: {e}"), Some(&e));
                        continue;
                    }
                    let c = &mut self.conns[i];
                    c.sock = Some(sock);
                    c.phase = Phase::Connecting;
                    let give_up = (now + self.per_connect).min(self.ramp_end);
                    self.connecting.push_back((give_up, i));
                }
                Err(e) => {
                    let msg = format!("{}: {e}", connect_what(addr, src));
                    self.connect_failed(i, msg, Some(&e));
                }
            }
        }
    }

    /// A writable (or error) event on a connecting socket: it opened, failed, or (spuriously)
    /// is still in progress.
    fn finish_connect(&mut self, i: usize) {
        let sock = self.conns[i]
            .sock
            .as_ref()
            .expect("a connecting slot has a socket");
        let outcome = match sock.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match sock.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == ErrorKind::NotConnected => return,
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => return,
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(()) => {
                // Answers are 4 bytes each: they must not wait for an ACK (Nagle).
                let _ = sock.set_nodelay(true);
                self.conns[i].phase = Phase::Open;
                self.open += 1;
                self.finished += 1;
                self.tally.counters.base.connected += 1;
                if let Some(hb) = self.heartbeat {
                    // The first beat at a random point of the first interval, so the
                    // connections do not beat in step.
                    let at = Instant::now() + hb.mul_f64(unit(self.ids[i], 0));
                    self.wheel.schedule((i as u32, 0), self.tick(at));
                }
            }
            Err(e) => {
                let src = sock.local_addr().ok().map(|a| a.ip());
                let msg = format!("{}: {e}", connect_what(self.plan.addr, src));
                self.conns[i].sock = None;
                self.connect_failed(i, msg, Some(&e));
            }
        }
    }

    /// Fails the connects whose time is up.
    fn expire_connects(&mut self, now: Instant) {
        while let Some(&(give_up, i)) = self.connecting.front() {
            if self.conns[i].phase != Phase::Connecting {
                self.connecting.pop_front();
                continue;
            }
            if give_up > now {
                break;
            }
            self.connecting.pop_front();
            self.conns[i].sock = None;
            let msg = if give_up >= self.ramp_end {
                "connection not open within --ramp-limit".to_string()
            } else {
                format!("connect to {} timed out", self.plan.addr)
            };
            let e = io::Error::from(ErrorKind::TimedOut);
            self.connect_failed(i, msg, Some(&e));
        }
    }

    fn connect_failed(&mut self, i: usize, msg: String, e: Option<&io::Error>) {
        self.conns[i].phase = Phase::Done;
        self.finished += 1;
        let kind = e.map_or_else(|| "RampLimit".to_string(), kind_name);
        *self.tally.connect_error_kinds.entry(kind).or_default() += 1;
        let base = &mut self.tally.counters.base;
        base.connect_errors += 1;
        base.note_error(|| msg);
    }

    /// Reads what arrived (until a short read: the socket is drained) and answers the pings in
    /// it; closes the connection at end of stream or on an error.
    fn read(&mut self, i: usize) {
        loop {
            let c = &mut self.conns[i];
            let Some(sock) = c.sock.as_mut() else { return };
            match sock.read(&mut self.scratch) {
                Ok(0) => return self.close(i, None),
                Ok(n) => {
                    let full = n == self.scratch.len();
                    parse(c, &self.scratch[..n], &mut self.tally);
                    if !full {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.close(i, Some(e)),
            }
        }
        self.flush(i);
    }

    /// Writes the zero bytes waiting, as far as the socket takes them.
    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        while c.pending > 0 {
            let Some(sock) = c.sock.as_mut() else { return };
            let k = (c.pending as usize).min(ZEROS.len());
            match sock.write(&ZEROS[..k]) {
                Ok(n) => c.pending -= n as u32,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.close(i, Some(e)),
            }
        }
    }

    /// Connection `i`'s own heartbeat is due: send it (or count it skipped while the last one
    /// is unanswered) and schedule the next.
    fn beat(&mut self, i: usize) {
        let Some(hb) = self.heartbeat else { return };
        let c = &mut self.conns[i];
        if c.phase != Phase::Open {
            return;
        }
        c.beats = c.beats.wrapping_add(1);
        let counters = &mut self.tally.counters;
        if c.outstanding {
            counters.heartbeats_skipped += 1;
        } else {
            c.outstanding = true;
            c.pending = c.pending.saturating_add(4);
            counters.heartbeats_sent += 1;
        }
        let f = 1.0 + self.plan.work.jitter * (2.0 * unit(self.ids[i], c.beats.into()) - 1.0);
        let at = Instant::now() + hb.mul_f64(f);
        self.wheel.schedule((i as u32, 0), self.tick(at));
        self.flush(i);
    }

    /// Closes every connection at the end of the run. What the server sent last (a ping) is
    /// read first: closing a socket with unread bytes sends a reset instead of a FIN, which the
    /// server would count as an error of its own.
    fn cut(&mut self) {
        for c in &mut self.conns {
            if let Some(mut sock) = c.sock.take() {
                while matches!(sock.read(&mut self.scratch), Ok(n) if n > 0) {}
            }
        }
    }

    /// The server ended connection `i`: with a FIN (`None`) or an error.
    fn close(&mut self, i: usize, error: Option<io::Error>) {
        let c = &mut self.conns[i];
        c.sock = None;
        c.phase = Phase::Done;
        self.open -= 1;
        let id = self.ids[i];
        self.tally
            .closed(error, id, self.window, self.plan.work.bucket);
    }
}

/// Parses received bytes: counts data frames (and skips their payloads), answers pings and
/// takes answers to the connection's own heartbeat.
fn parse(c: &mut Conn, mut buf: &[u8], tally: &mut HoldTally) {
    let t = &mut tally.counters;
    while let Some((&b, rest)) = buf.split_first() {
        if c.head == 0 && c.len > 0 {
            let k = (c.len as usize).min(buf.len());
            c.len -= k as u32;
            buf = &buf[k..];
            continue;
        }
        buf = rest;
        c.len = (c.len << 8) | u32::from(b);
        c.head += 1;
        if c.head < 4 {
            continue;
        }
        c.head = 0;
        if c.len > 0 {
            t.data_frames += 1; // its payload is skipped next
        } else if c.outstanding {
            c.outstanding = false;
            t.heartbeats_answered += 1;
        } else {
            c.pending = c.pending.saturating_add(4);
            t.pings_answered += 1;
        }
    }
}

/// Opens a non-blocking socket (bound to `src` if given) and starts its connect.
fn start_connect(addr: SocketAddr, src: Option<IpAddr>) -> io::Result<TcpStream> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if let Some(ip) = src {
        set_bind_address_no_port(&fd);
        socket::bind(
            fd.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(ip, 0)),
        )?;
    }
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(TcpStream::from(fd)),
        Err(e) => Err(e.into()),
    }
}

fn connect_what(addr: SocketAddr, src: Option<IpAddr>) -> String {
    match src {
        Some(ip) => format!("connect {ip} -> {addr}"),
        None => format!("connect {addr}"),
    }
}

/// A short name for what went wrong, to count errors by: the errno's name where there is one.
pub(super) fn kind_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{:?}", nix::errno::Errno::from_raw(n)),
        None => format!("{:?}", e.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        Conn {
            sock: None,
            pending: 0,
            len: 0,
            beats: 0,
            head: 0,
            phase: Phase::Open,
            outstanding: false,
        }
    }

    #[test]
    fn a_connection_slot_stays_small() {
        assert!(std::mem::size_of::<Conn>() <= 20);
    }

    #[test]
    fn pings_are_answered_and_answers_taken_across_split_reads() {
        let (mut c, mut t) = (conn(), HoldTally::default());
        // Two pings, the second split over three reads.
        parse(&mut c, &[0, 0, 0, 0, 0], &mut t);
        parse(&mut c, &[0, 0], &mut t);
        assert_eq!((t.counters.pings_answered, c.pending), (1, 4));
        parse(&mut c, &[0], &mut t);
        assert_eq!((t.counters.pings_answered, c.pending), (2, 8));
        // With a heartbeat of its own outstanding, a length-0 frame is its answer.
        c.outstanding = true;
        parse(&mut c, &[0, 0, 0, 0], &mut t);
        assert!(!c.outstanding);
        assert_eq!(t.counters.heartbeats_answered, 1);
        assert_eq!(t.counters.pings_answered, 2);
    }

    #[test]
    fn data_frames_are_skipped_whole_even_when_split() {
        let (mut c, mut t) = (conn(), HoldTally::default());
        // A 300-byte frame of zeros (zeros must not be taken for pings), its header split,
        // then a ping.
        let mut wire = vec![0, 0, 1];
        parse(&mut c, &wire, &mut t);
        wire = vec![44];
        wire.extend(std::iter::repeat_n(0, 300));
        wire.extend([0, 0, 0, 0]);
        parse(&mut c, &wire[..100], &mut t);
        parse(&mut c, &wire[100..], &mut t);
        assert_eq!(t.counters.data_frames, 1);
        assert_eq!(t.counters.pings_answered, 1);
        assert_eq!((c.head, c.len, c.pending), (0, 0, 4));
    }

    #[test]
    fn errors_are_named_by_errno() {
        let e = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(kind_name(&e), "ECONNRESET");
        assert_eq!(kind_name(&io::Error::from(ErrorKind::TimedOut)), "TimedOut");
    }
}
