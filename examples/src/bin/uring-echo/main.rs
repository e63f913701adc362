//! `uring-echo`: an echo server for the shmrelay wire protocol on io_uring, in one process and
//! one thread: the prototype of an io_uring front's socket I/O (issue 14), measured against
//! the epoll echo (`examples/c/epoll-echo.c`) by `tools/bench/compare.sh` (system `uring`).
//!
//! Same semantics as `epoll-echo` and `tokio-echo`: every frame (4-byte big-endian length,
//! then that many bytes) is sent back byte for byte, heartbeats included; a length above
//! `--max-frame` closes the connection after the frames before it are sent.
//!
//! How: a multishot accept; per connection one multishot receive into a ring of provided
//! buffers (no buffer per connection, no re-arm per read); the whole frames of a received
//! buffer are sent straight from it (a frame split across buffers is collected and copied
//! once); one SENDMSG in flight per connection carries everything queued since the last one
//! (a batch of iovecs); and one `io_uring_enter` per loop turn submits all new requests and
//! waits for completions. A connection with more than `--max-pending` bytes waiting stops
//! receiving (its receive is cancelled) until half of that is out, so a client that does not
//! read cannot take every buffer.
//!
//! Exit status: 0 never (it runs until killed), 1 on an error, 3 when io_uring is not
//! available here (ENOSYS, EPERM, or a kernel without multishot receives and buffer rings).

mod bufring;
mod conn;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use bufring::BufRing;
use conn::Conn;

/// Echo server for the length-prefixed wire protocol on io_uring (multishot receive into
/// provided buffers, batched sends, one submission per loop turn).
#[derive(Parser, Debug)]
#[command(name = "uring-echo", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the `listening on` line shows it).
    #[arg(long, default_value = "127.0.0.1:7881")]
    listen: SocketAddr,
    /// Largest payload accepted (bytes); a longer length closes that connection.
    #[arg(long, default_value_t = 1 << 20)]
    max_frame: u32,
    /// Listen backlog.
    #[arg(long, default_value_t = 4096)]
    backlog: i32,
    /// Provided buffers (a power of two up to 32768).
    #[arg(long, default_value_t = 4096)]
    buffers: u16,
    /// Size of each provided buffer (bytes).
    #[arg(long, default_value_t = 32 * 1024)]
    buffer_size: u32,
    /// Let the kernel fill each buffer with several receives (`IOU_PBUF_RING_INC`, Linux
    /// 6.12): large buffers then waste no space on short reads.
    #[arg(long)]
    incremental: bool,
    /// Bytes waiting to be sent (held buffers counted whole; with `--incremental` the bytes
    /// received, so a client that does not read can keep every buffer its bytes landed in
    /// from going back) above which a connection stops receiving.
    #[arg(long, default_value_t = 1 << 20)]
    max_pending: usize,
}

/// What a completion is for: the low byte of its user data (the rest is the connection slot).
const OP_ACCEPT: u64 = 0;
const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
const OP_CANCEL: u64 = 3;
const BUF_GROUP: u16 = 0;

fn user_data(slot: usize, op: u64) -> u64 {
    ((slot as u64) << 8) | op
}

/// Setting up io_uring failed in a way that means "not here" rather than "broken".
struct Unavailable(io::Error);

/// The server. Field order matters: `ring` (the io_uring) drops before `bufs`, whose memory
/// the kernel may use until then.
struct Server {
    ring: IoUring,
    bufs: BufRing,
    listener: TcpListener,
    conns: Vec<Option<Box<Conn>>>,
    free_slots: Vec<usize>,
    /// Connections whose receive ended for want of buffers: re-armed once some are back.
    starved: Vec<usize>,
    freed: Vec<u16>,
    max_frame: u32,
    max_pending: usize,
}

fn unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::EOPNOTSUPP)
    )
}

impl Server {
    fn new(args: &Args, listener: TcpListener) -> Result<Server, Unavailable> {
        // Single issuer + deferred task work: completions are posted only inside our own
        // io_uring_enter, never by interrupting the loop. Older kernels take the plain setup.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(16384)
            .build(4096)
            .or_else(|_| IoUring::builder().setup_cqsize(16384).build(4096))
            .map_err(Unavailable)?;
        let bufs = BufRing::new(
            &ring.submitter(),
            args.buffers,
            args.buffer_size,
            BUF_GROUP,
            args.incremental,
        )
        .map_err(Unavailable)?;
        Ok(Server {
            ring,
            bufs,
            listener,
            conns: Vec::new(),
            free_slots: Vec::new(),
            starved: Vec::new(),
            freed: Vec::new(),
            max_frame: args.max_frame,
            max_pending: args.max_pending,
        })
    }

    /// Queues a request, submitting early only if the submission queue is full.
    fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every pointer in the entries built here (a connection's msghdr and
            // iovecs, the buffer ring) stays valid until the request's last completion: a
            // connection is boxed and freed only when nothing of it is in flight.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let fd = types::Fd(self.listener.as_raw_fd());
        let sqe = opcode::AcceptMulti::new(fd)
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(0, OP_ACCEPT));
        self.push(sqe)
    }

    fn arm_recv(&mut self, slot: usize) -> io::Result<()> {
        let c = self.conns[slot].as_mut().expect("live slot");
        c.recv_armed = true;
        let sqe = opcode::RecvMulti::new(types::Fd(c.fd), self.bufs.group)
            .build()
            .user_data(user_data(slot, OP_RECV));
        self.push(sqe)
    }

    fn send(&mut self, slot: usize) -> io::Result<()> {
        let c = self.conns[slot].as_mut().expect("live slot");
        let Some(msg) = c.start_send(&self.bufs) else {
            return Ok(());
        };
        let sqe = opcode::SendMsg::new(types::Fd(c.fd), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data(slot, OP_SEND));
        self.push(sqe)
    }

    fn cancel_recv(&mut self, slot: usize) -> io::Result<()> {
        let sqe = opcode::AsyncCancel::new(user_data(slot, OP_RECV))
            .build()
            .user_data(user_data(slot, OP_CANCEL));
        self.push(sqe)
    }

    fn give_back_freed(&mut self) {
        for bid in self.freed.drain(..) {
            self.bufs.release(bid);
        }
    }

    /// Closes the connection once nothing of it is in flight and nothing more will be sent.
    fn maybe_close(&mut self, slot: usize) {
        let c = self.conns[slot].as_mut().expect("live slot");
        if !c.finished() {
            return;
        }
        c.discard(&mut self.freed);
        // SAFETY: the fd is this connection's own, and no request of it is in flight.
        unsafe { libc::close(c.fd) };
        self.conns[slot] = None;
        self.free_slots.push(slot);
        self.give_back_freed();
    }

    fn on_accept(&mut self, res: i32, more: bool) -> io::Result<()> {
        if res >= 0 {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads `one` (an int, its size given) during the call.
            unsafe {
                libc::setsockopt(
                    res,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            let slot = self.free_slots.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            self.conns[slot] = Some(Conn::new(res));
            self.arm_recv(slot)?;
        } else {
            eprintln!(
                "uring-echo: accept failed: {}",
                io::Error::from_raw_os_error(-res)
            );
        }
        if !more {
            self.arm_accept()?;
        }
        Ok(())
    }

    fn on_recv(&mut self, slot: usize, res: i32, flags: u32) -> io::Result<()> {
        let more = cqueue::more(flags);
        let max_frame = self.max_frame;
        let c = self.conns[slot].as_mut().expect("live slot");
        if !more {
            c.recv_armed = false;
        }
        if res > 0 {
            let bid = cqueue::buffer_select(flags).expect("a receive with data names its buffer");
            let len = res as usize;
            let off = self.bufs.received(bid, len, cqueue::buffer_more(flags));
            let weight = self.bufs.weight(len);
            let was_bad = c.bad;
            if c.ingest(bid, off, self.bufs.data(bid, off, len), max_frame, weight) {
                self.bufs.hold(bid);
            }
            self.bufs.settle(bid);
            let stop = (c.bad && !was_bad) || (!c.paused && c.pending() > self.max_pending);
            if c.pending() > self.max_pending {
                c.paused = true;
            }
            let rearm = !more && !c.paused && !c.bad && !c.dead;
            if stop && more {
                self.cancel_recv(slot)?;
            }
            self.send(slot)?;
            if rearm {
                self.arm_recv(slot)?;
            }
        } else if res == -libc::ENOBUFS {
            self.starved.push(slot);
        } else if res != -libc::ECANCELED {
            c.read_done = true; // EOF or a receive error
        } else if !more && !c.paused && !c.bad && !c.dead && !c.read_done {
            self.arm_recv(slot)?;
        }
        self.maybe_close(slot);
        Ok(())
    }

    fn on_send(&mut self, slot: usize, res: i32) -> io::Result<()> {
        let low = self.max_pending / 2;
        let c = self.conns[slot].as_mut().expect("live slot");
        if res < 0 {
            c.sending = false;
            c.dead = true;
            c.discard(&mut self.freed);
            self.give_back_freed();
            if self.conns[slot].as_ref().is_some_and(|c| c.recv_armed) {
                self.cancel_recv(slot)?;
            }
        } else {
            c.sent(res as usize, &mut self.freed);
            let resume = c.paused && c.pending() <= low;
            if resume {
                c.paused = false;
            }
            let armed = c.recv_armed || c.read_done || c.bad;
            self.give_back_freed();
            self.send(slot)?;
            if resume && !armed {
                self.arm_recv(slot)?;
            }
        }
        self.maybe_close(slot);
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        self.arm_accept()?;
        let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(4096);
        loop {
            if !self.starved.is_empty() && self.bufs.available() > 0 {
                for slot in std::mem::take(&mut self.starved) {
                    let c = self.conns[slot].as_ref();
                    if c.is_some_and(|c| {
                        !c.recv_armed && !c.paused && !c.bad && !c.dead && !c.read_done
                    }) {
                        self.arm_recv(slot)?;
                    }
                }
            }
            self.bufs.publish();
            // The one system call of a loop turn: submit what the last turn queued, wait.
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            done.extend(
                self.ring
                    .completion()
                    .map(|e| (e.user_data(), e.result(), e.flags())),
            );
            for (data, res, flags) in done.drain(..) {
                let slot = (data >> 8) as usize;
                match data & 0xff {
                    OP_ACCEPT => self.on_accept(res, cqueue::more(flags))?,
                    OP_RECV => self.on_recv(slot, res, flags)?,
                    OP_SEND => self.on_send(slot, res)?,
                    _ => {} // a cancel's own completion: its receive's says it all
                }
            }
        }
    }
}

fn listen(args: &Args) -> Result<TcpListener> {
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("cannot bind {}", args.listen))?;
    // std's backlog is fixed; a second listen() on a listening socket sets ours.
    // SAFETY: a plain call on the listener's own fd.
    if unsafe { libc::listen(listener.as_raw_fd(), args.backlog) } != 0 {
        return Err(io::Error::last_os_error()).context("cannot set the listen backlog");
    }
    Ok(listener)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match listen(&args) {
        Ok(l) => l,
        Err(e) => return shmrelay_examples::exit_code("uring-echo", Err(e)),
    };
    let mut server = match Server::new(&args, listener) {
        Ok(s) => s,
        Err(Unavailable(e)) if unavailable(&e) => {
            eprintln!("uring-echo: io_uring unavailable: {e}");
            return ExitCode::from(3);
        }
        Err(Unavailable(e)) => {
            return shmrelay_examples::exit_code(
                "uring-echo",
                Err(anyhow::Error::new(e).context("io_uring setup failed")),
            )
        }
    };
    let local = match server.listener.local_addr() {
        Ok(a) => a,
        Err(e) => return shmrelay_examples::exit_code("uring-echo", Err(e.into())),
    };
    println!(
        "uring-echo: listening on {local} (max frame {} bytes, {} buffers of {} bytes)",
        args.max_frame, args.buffers, args.buffer_size
    );
    let result = server.run().context("the io_uring loop failed");
    shmrelay_examples::exit_code("uring-echo", result)
}
