//! The event loop: one turn pumps replies, reads, runs the timers and sleeps until the next
//! event; draining and shutdown at SIGTERM.

use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use shmrelay_worker::codec::ProtocolError;
use shmrelay_worker::CloseReason;
use tracing::{debug, info, warn};

use super::conn::{ConnKey, ConnState};
use super::liveness::{self, Verdict, TICK_MS};
use super::{Front, FrontError, CONTROL, DOORBELL, LISTENER_BASE, MAX_LISTENERS};
use crate::stats::add;

/// Longest sleep of an idle loop (stop flag, worker checks).
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// Doorbell wakes in a row with no work before the doorbell is left unwatched for a moment.
const BELL_EMPTY_LIMIT: u32 = 16;
/// How long the doorbell is left unwatched after too many wakes with no work.
const BELL_PAUSE: Duration = Duration::from_millis(10);
/// Shortest sleep for timers alone: how late a ping or timeout may fire on an idle front.
const TIMER_SLACK: Duration = Duration::from_millis(50);
/// Lateness of the loop logged as a warning (less is logged at debug level: a loaded machine
/// makes plenty).
const LAG_WARN_MS: u64 = 500;
/// Period of the workers' and long replies' checks (ns).
const CHECKS_EVERY_NS: u64 = 100_000_000;
/// Period of the open-fds self-check (ns).
const FD_CHECK_EVERY_NS: u64 = 5_000_000_000;
/// The error of a connection whose partial frame outlived `frame_timeout_ms`.
const FRAME_TIMEOUT: ProtocolError =
    ProtocolError::Invalid("frame not complete within frame_timeout_ms");

impl Front {
    /// Brings the clients' clock up to date (real time minus this front's own lateness: see
    /// `FrontClock`) and stamps the front's activity for the supervisor's hang check.
    pub(super) fn tick(&mut self) {
        let ns = shm_ring::monotonic_ns();
        self.tick_ns = ns;
        let (now, late) = self.clock.tick(ns);
        self.now = now;
        if let Some(late) = late {
            // This process was stopped, starved or busy: its clients could not be heard
            // meanwhile, so the time does not count against them.
            let ms = late / 1_000_000;
            add(&self.fs.lag_ms, ms);
            if ms >= LAG_WARN_MS {
                warn!(
                    front = self.index,
                    late_ms = ms,
                    "front loop was late: every connection's deadlines move by as much"
                );
            } else {
                debug!(front = self.index, late_ms = ms, "front loop was late");
            }
        }
        self.fs.active_ns.store(ns, Ordering::Relaxed);
    }

    /// The loop, until SIGTERM and then until drained (or `drain_ms` passed).
    pub(super) fn run(&mut self) -> Result<(), FrontError> {
        info!(
            front = self.index,
            workers = self.chans.len(),
            "front running"
        );
        let mut events = Events::with_capacity(1024);
        let mut drain_deadline: Option<Instant> = None;
        // Ticked here and after every sleep: a turn begins where the last one's sleep ended,
        // so a second clock read at the top would only repeat the last (issue 15: clock reads
        // were 3-4% of the profile samples of fronts answering heartbeats at 1M connections).
        self.tick();
        loop {
            if crate::signals::stop_requested() && drain_deadline.is_none() {
                info!(front = self.index, conns = self.open, "draining");
                drain_deadline = Some(Instant::now() + Duration::from_millis(self.cfg.drain_ms));
                for l in &mut self.listeners {
                    if let Some(mut sock) = l.sock.take() {
                        let _ = self.poll.registry().deregister(&mut sock);
                    }
                }
                self.ready.clear();
            }
            let mut busy = false;
            for w in 0..self.chans.len() {
                busy |= self.pump_replies(w) > 0;
                self.flush_backlog(w);
            }
            if let Some(deadline) = drain_deadline {
                if self.drained() || Instant::now() >= deadline {
                    break;
                }
            } else {
                self.unblock();
                self.read_ready();
                self.check_timers();
                self.pause_when_overloaded();
                if self.tick_ns.saturating_sub(self.last_checks) >= CHECKS_EVERY_NS {
                    self.last_checks = self.tick_ns;
                    self.check_workers();
                    self.check_splits();
                }
                if self.tick_ns.saturating_sub(self.last_fd_check) >= FD_CHECK_EVERY_NS {
                    self.last_fd_check = self.tick_ns;
                    self.check_fds();
                }
            }
            for ch in &mut self.chans {
                ch.publish();
            }
            let timeout = if busy || !self.ready.is_empty() {
                Some(Duration::ZERO)
            } else {
                self.prepare_park()
            };
            let timeout = self.doorbell_rearm(timeout);
            self.clock.sleeping(timeout);
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            // The events below happened after the sleep: stamp them with the time now, or a
            // frame that arrived would look up to a sleep older and time out early.
            self.tick();
            if timeout != Some(Duration::ZERO) {
                for ch in &mut self.chans {
                    ch.finish_park();
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    Token(t) if t <= LISTENER_BASE && t > LISTENER_BASE - MAX_LISTENERS => {
                        self.accept(LISTENER_BASE - t)
                    }
                    DOORBELL => self.doorbell_rang(),
                    CONTROL => self.control_ready(),
                    Token(t) => {
                        let Some(key) = self.slab.key(t) else {
                            continue;
                        };
                        if ev.is_writable() {
                            self.flush_out(key);
                        }
                        if (ev.is_readable() || ev.is_read_closed() || ev.is_error())
                            && drain_deadline.is_none()
                        {
                            if let Some(c) = self.slab.get(key) {
                                c.hup |= ev.is_read_closed() || ev.is_error();
                                if !c.readable {
                                    c.readable = true;
                                    if c.wants_read() {
                                        self.ready.push(key);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        self.shutdown();
        Ok(())
    }

    /// True when every request was consumed, every reply written and every queue flushed.
    pub(super) fn drained(&mut self) -> bool {
        if !self.chans.iter_mut().all(|ch| ch.is_drained()) {
            return false;
        }
        self.slab.iter().all(|(_, c)| c.flushed())
    }

    /// Closes every connection (`shutdown`) and publishes the CLOSE records.
    pub(super) fn shutdown(&mut self) {
        for key in self.slab.keys() {
            self.close_conn(key, CloseReason::Shutdown);
        }
        for w in 0..self.chans.len() {
            self.flush_backlog(w);
            self.chans[w].req.publish();
        }
        info!(front = self.index, "front stopped");
    }

    /// Announces sleep on every ring this front waits on; returns the poll timeout.
    pub(super) fn prepare_park(&mut self) -> Option<Duration> {
        // Key routing: a worker releases its requests just after it publishes their replies,
        // and a release alone wakes nobody. A release not yet seen is work now; one that may
        // come while asleep is seen within a millisecond.
        let mut routed_wait = false;
        for (w, ch) in self.chans.iter_mut().enumerate() {
            if ch.is_broken() || !self.routing.has_waiters(w) {
                continue;
            }
            if ch
                .req
                .released()
                .is_ok_and(|p| p > self.routing.completed(w))
            {
                return Some(Duration::ZERO);
            }
            routed_wait = true;
        }
        for ch in &mut self.chans {
            if !ch.prepare_park() {
                return Some(Duration::ZERO);
            }
        }
        if routed_wait {
            return Some(Duration::from_millis(1));
        }
        // Sleep until the next deadline, but never less than TIMER_SLACK: liveness deadlines
        // are seconds apart per connection yet spread over every tick across many connections,
        // and waking each tick for them costs more than the precision is worth. Network events
        // wake the loop anyway, and each wakeup processes whatever timers are due.
        let Some(next) = self.wheel.next_due() else {
            return Some(MAX_SLEEP);
        };
        let ms = next.saturating_sub(self.now) * TICK_MS;
        Some(Duration::from_millis(ms).clamp(TIMER_SLACK, MAX_SLEEP))
    }

    /// The doorbell woke the loop. Workers ring it only when this front announced sleep and
    /// they published something; a worker that rings it in a loop (hostile or broken) would
    /// cost the front a core. So after BELL_EMPTY_LIMIT wakes in a row that found no work,
    /// the doorbell is not watched for BELL_PAUSE: the loop then sleeps at most that long and
    /// looks at its rings anyway, so a real reply waits at most BELL_PAUSE, never forever. The
    /// first wake after a pause that finds no work starts another pause at once.
    pub(super) fn doorbell_rang(&mut self) {
        self.doorbell.drain();
        let work = self.chans.iter_mut().any(|ch| ch.has_work());
        if work {
            self.bell_empty = 0;
            return;
        }
        self.bell_empty = self.bell_empty.saturating_add(1);
        if self.bell_empty < BELL_EMPTY_LIMIT {
            return;
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.doorbell);
        if self.poll.registry().deregister(&mut SourceFd(&fd)).is_ok() {
            self.bell_off_until = Some(Instant::now() + BELL_PAUSE);
            add(&self.fs.doorbell_throttled, 1);
            if !std::mem::replace(&mut self.bell_logged, true) {
                warn!(
                    front = self.index,
                    "doorbell rung {} times in a row with no work: a worker rings it in a \
                     loop; watched again after a pause (counted in doorbell_throttled)",
                    self.bell_empty
                );
            }
            // One more empty wake after the pause starts the next one.
            self.bell_empty = BELL_EMPTY_LIMIT - 1;
        }
    }

    /// Watches the doorbell again once its pause is over; until then the loop sleeps no
    /// longer than the pause's end.
    pub(super) fn doorbell_rearm(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let Some(until) = self.bell_off_until else {
            return timeout;
        };
        let now = Instant::now();
        if now >= until {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.doorbell);
            if self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), DOORBELL, Interest::READABLE)
                .is_ok()
            {
                self.bell_off_until = None;
            }
            // A ring that came while it was not watched: its count is still in the eventfd,
            // and registering it raises the event; the rings are looked at this turn anyway.
            return timeout;
        }
        let left = until - now;
        Some(timeout.map_or(left, |t| t.min(left)))
    }

    /// Visits the connections whose deadline came: ping the idle, close the silent.
    pub(super) fn check_timers(&mut self) {
        self.retry_accept();
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(self.now, &mut due);
        let now = self.now as u32;
        for (key, at) in due.drain(..) {
            let key = ConnKey::from_timer(key);
            let Some(mut c) = self.slab.get(key) else {
                continue;
            };
            if c.timer_at != at {
                continue; // superseded entry
            }
            // A partial frame not complete within frame_timeout_ms (any codec).
            let partial_deadline = (self.frame_ticks > 0 && !c.carry.is_empty()).then(|| {
                (self.now + self.frame_ticks as u64)
                    .saturating_sub(now.wrapping_sub(c.partial_since) as u64)
            });
            // The rest of the frame already waiting in the kernel (not read yet: its ring is
            // full, or its edge comes later in this turn) is the front's delay, not the
            // client's: it gets a turn to be read first.
            let waiting = |c: &super::conn::Conn| {
                c.readable || c.blocked || liveness::unread_bytes(&c.stream) > 0
            };
            let partial_deadline = partial_deadline.map(|d| {
                if d <= self.now && waiting(c) {
                    self.now + 1
                } else {
                    d
                }
            });
            if partial_deadline.is_some_and(|d| d <= self.now) && c.state == ConnState::Open {
                add(&self.fs.frame_timeouts, 1);
                debug!(
                    slot = key.slot,
                    "frame not complete within frame_timeout_ms"
                );
                self.fail_conn(key, FRAME_TIMEOUT);
                continue;
            }
            if super::websocket::control_waiting(c) {
                self.ws_after_read(key);
                let Some(again) = self.slab.get(key) else {
                    continue;
                };
                c = again;
            }
            // A websocket handshake not complete within HANDSHAKE_MS.
            if c.handshaking() {
                let limit = super::websocket::handshake_ticks(self.frame_ticks);
                if now.wrapping_sub(c.last_rx) >= limit {
                    add(&self.fs.ws_handshake_timeouts, 1);
                    debug!(slot = key.slot, "websocket handshake not complete in time");
                    self.close_conn(key, CloseReason::ProtocolError);
                    continue;
                }
            }
            // A cheap kernel sample, once per check rather than per frame, and only where the
            // ping interval needs it: a client that beats on its own sets its own pace.
            if c.rtt_us == 0 || !c.client_beats {
                if let Some((rtt, _)) = liveness::tcp_info(&c.stream) {
                    c.rtt_us = rtt;
                    add(&self.fs.rtt_hist[liveness::rtt_bucket(rtt)], 1);
                }
            }
            let mut verdict = self.liveness.check(c, now, self.now);
            if matches!(verdict, Verdict::Close(CloseReason::HeartbeatTimeout)) && waiting(c) {
                // Its bytes wait unread (its worker's ring is full, or its edge was seen and it
                // was not read yet): the peer spoke, it is not silent.
                c.last_rx = now;
                verdict = self.liveness.check(c, now, self.now);
            }
            let next = match verdict {
                Verdict::Close(reason) => {
                    self.close_conn(key, reason);
                    continue;
                }
                Verdict::Ping(next)
                    if super::websocket::mid_reply(c, &self.chans, key.id(self.index).raw()) =>
                {
                    next.min(self.now + 1)
                }
                Verdict::Ping(next) => {
                    c.ping_outstanding = true;
                    c.ping_sent = now;
                    add(&self.fs.pings_sent, 1);
                    let ping = c.codec.ping();
                    if let Err(reason) = self.send(key, &[IoSlice::new(ping)]) {
                        self.close_conn(key, reason);
                        continue;
                    }
                    next
                }
                Verdict::Wait(next) => next,
            };
            let mut next = partial_deadline.map_or(next, |d| next.min(d));
            if self
                .slab
                .get(key)
                .is_some_and(|c| super::websocket::control_waiting(c))
            {
                // Pongs held behind a long reply: looked at again next tick.
                next = next.min(self.now + 1);
            }
            let at = self.wheel.schedule(key.timer(), next);
            if let Some(c) = self.slab.get(key) {
                c.timer_at = at;
            }
        }
        self.due = due;
    }

    /// The connection table against the open fds: every connection holds one socket, and
    /// nothing else should come or go. A difference is a leak (counted once per change).
    pub(super) fn check_fds(&mut self) {
        let fds = count_fds();
        if self.base_fds == 0 {
            self.base_fds = fds.saturating_sub(self.slab.len() as u64);
            return;
        }
        let expected = self.base_fds + self.slab.len() as u64;
        if fds != expected {
            let diff = fds.abs_diff(expected);
            warn!(
                front = self.index,
                fds, expected, "open fds do not match the connection table"
            );
            add(&self.stats.header().leaked_conns, diff);
            // Count each discrepancy once.
            self.base_fds = fds - self.slab.len() as u64;
        }
    }
}

/// Open fds of this process.
pub(super) fn count_fds() -> u64 {
    crate::procfs::open_fds(None).unwrap_or(0)
}
