//! The cross-process cases of `relaybench ring`: shm-ring throughput and round trips, and the
//! raw futex ping-pong. This process is one side; the other is this binary re-executed as
//! `relaybench ring --child-plan PLAN` (a [`crate::procs`] child) with the rings' memfds
//! inherited.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use shm_ring::wake::{futex_wait_shared, futex_wake_shared};
use shm_ring::{Consumer, Meta, Producer, ReserveError, RingStorage, ShmRing};

use super::ring_data::{Payload, Report, RxState, TxState};
use super::{
    pin_current_thread, Case, Clock, Config, Deadline, Mode, Outcome, ProducerApi,
    BATCH_RING_FRACTION,
};
use crate::procs::Children;

/// Record tags.
const TAG_DATA: u16 = 1;
const TAG_MARK: u16 = 2;
const TAG_END: u16 = 3;
/// How long one blocking wait lasts before the waiter checks its deadline and its peer.
const POLL: Duration = Duration::from_millis(50);
/// Spin iterations between deadline checks.
const SPIN_CHECK: u32 = 1 << 16;

/// What the child process does.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Consume a throughput run from the ring at `fds[0]`.
    Consume { payload: usize },
    /// Echo every request of the ring at `fds[0]` into the ring at `fds[1]`, polling
    /// (`park` false) or parking on every hop.
    Echo { park: bool, api: ProducerApi },
    /// Answer every ping on the futex page at `fds[0]`.
    FutexEcho,
}

/// What the child process is told to do (JSON on its command line).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ChildPlan {
    role: Role,
    /// Memfds inherited at these numbers.
    fds: Vec<RawFd>,
    cpu: Option<usize>,
    /// The child gives up after this long.
    limit_secs: f64,
}

type ShmProducer = Producer<Arc<ShmRing>>;
type ShmConsumer = Consumer<Arc<ShmRing>>;
type Child = Children<(), Report>;

/// Writes one record of `len` bytes that `fill` fills, through the producer API `api`.
#[inline(always)]
fn produce(
    tx: &mut ShmProducer,
    api: ProducerApi,
    len: usize,
    meta: Meta,
    fill: impl FnOnce(&mut [u8]),
) -> Result<u64, ReserveError> {
    match api {
        ProducerApi::Grant => {
            let mut grant = tx.reserve(len)?;
            fill(&mut grant[..len]);
            Ok(grant.commit(len, meta))
        }
        ProducerApi::PushWith => tx.push_with(len, meta, fill),
    }
}

/// Starts the child with `role`, handing it `rings`' memfds, and waits until it is attached.
fn spawn(cfg: &Config, role: Role, rings: &[&ShmRing]) -> Result<Child> {
    // Duplicates without close-on-exec are what the child inherits; ours close after the spawn.
    let inherited: Vec<OwnedFd> = rings
        .iter()
        .map(|r| nix::unistd::dup(r.fd()).context("dup of a ring's memfd"))
        .collect::<Result<_>>()?;
    let plan = ChildPlan {
        role,
        fds: inherited.iter().map(|f| f.as_raw_fd()).collect(),
        cpu: cfg.cpus.map(|c| c.1),
        limit_secs: (cfg.warmup + cfg.measure + 2 * cfg.grace).as_secs_f64(),
    };
    let child = Child::spawn("ring", [plan])?;
    drop(inherited);
    child.wait_ready(Instant::now() + Duration::from_secs(10))?;
    Ok(child)
}

/// Tells the child to stop (its END record or ping is sent) and returns its report.
fn finish(child: Child, cfg: &Config, clock: &Clock) -> Result<Report> {
    let mut report = None;
    child.collect_reports(clock.deadline.0 + cfg.grace, |r| {
        report = Some(r);
        Ok(())
    })?;
    child.finish()?;
    report.ok_or_else(|| anyhow!("the child did not report"))
}

/// Pushes a payload-less control record, waiting for space if need be, and publishes it.
fn control(tx: &mut ShmProducer, tag: u16, child: &mut Child, dl: Deadline) -> Result<()> {
    loop {
        match tx.push(Meta::tag(tag), &[]) {
            Ok(_) => {
                tx.publish();
                return Ok(());
            }
            Err(ReserveError::Full) => {
                if !tx.wait_for_space(0, Some(POLL))? {
                    child.check_running()?;
                    dl.check("waiting for ring space")?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

// ----- throughput -----------------------------------------------------------------------------

pub fn throughput(cfg: &Config, case: Case) -> Result<Outcome> {
    let len = case.payload;
    let ring = Arc::new(ShmRing::create_memfd("relaybench-tput", cfg.capacity)?);
    let mut child = spawn(cfg, Role::Consume { payload: len }, &[&ring])?;
    child.go()?;
    let mut tx = Producer::new(ring)?;
    let payload = Payload::new(len);
    let mut st = TxState::default();
    let batch = cfg.batch_frames(shm_ring::layout::record_size(len) as usize);
    let meta = Meta::tag(TAG_DATA);
    let clock = Clock::start(cfg);
    let mut marked = false;
    loop {
        // One batch: records written in place, then made visible with one store.
        let mut n = 0;
        while n < batch {
            let seq = st.seq;
            match produce(&mut tx, cfg.api, len, meta, |buf| payload.fill(buf, seq)) {
                Ok(_) => {
                    st.sent(&payload);
                    n += 1;
                }
                Err(ReserveError::Full) => {
                    // Publishes what is committed, spins, then parks until the consumer
                    // releases space.
                    if !tx.wait_for_space(len, Some(POLL))? {
                        child.check_running()?;
                        clock.deadline.check("waiting for ring space")?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        tx.publish();
        let el = clock.start.elapsed();
        if !marked && el >= clock.warm {
            control(&mut tx, TAG_MARK, &mut child, clock.deadline)?;
            marked = true;
        } else if marked && el >= clock.end {
            control(&mut tx, TAG_END, &mut child, clock.deadline)?;
            break;
        }
    }
    let report = finish(child, cfg, &clock)?;
    st.check(&report)?;
    let tx_parks = tx.storage().header().producer.parks.load(Ordering::Relaxed);
    let note = format!(
        "parks: consumer {}, producer {}; {} records",
        report.parks, tx_parks, report.frames
    );
    Ok(Outcome::throughput(case, &report, note))
}

/// The consumer process of a throughput run: reads every record until END.
fn consume(rx: &mut ShmConsumer, len: usize, dl: Deadline) -> Result<Report> {
    let mut st = RxState::new(len);
    let limit = (rx.capacity() / BATCH_RING_FRACTION) as u64;
    while !st.is_done() {
        // One batch: the published records read in place (up to a sixteenth of the ring),
        // then one release.
        let mut last = None;
        let from = rx.position();
        for rec in rx.records()? {
            let rec = rec?;
            match rec.tag() {
                TAG_DATA => st.on_data(rec.payload())?,
                TAG_MARK => st.on_mark(),
                TAG_END => st.on_end(),
                t => bail!("unexpected record tag {t}"),
            }
            last = Some(rec.end());
            if rec.end() - from >= limit {
                break;
            }
        }
        match last {
            Some(end) => rx.release(end),
            // Spins, then parks on the futex until the producer publishes.
            None => {
                if !rx.wait(Some(POLL))? {
                    dl.check("waiting for records")?;
                }
            }
        }
    }
    let parks = rx.storage().header().consumer.parks.load(Ordering::Relaxed);
    Ok(st.report(parks))
}

// ----- round trips ----------------------------------------------------------------------------

/// Waits until `rx` has records it has not released. Spin: polls the tail, never sleeps.
/// Park: sleeps at once, through the consumer's park protocol (announce, fence, re-check,
/// futex on the announced word). Returns how many times it slept in the kernel.
fn wait_for_records(
    rx: &mut ShmConsumer,
    park: bool,
    dl: Deadline,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<u64> {
    if !park {
        let mut i = 0u32;
        while !rx.has_new() {
            std::hint::spin_loop();
            i = i.wrapping_add(1);
            if i % SPIN_CHECK == 0 {
                dl.check("spinning for a record")?;
                alive()?;
            }
        }
        return Ok(0);
    }
    let mut parks = 0;
    for round in 0u64.. {
        if !rx.is_empty()? {
            break;
        }
        if round > 0 {
            dl.check("parked for a record")?;
            alive()?;
        }
        if rx.prepare_park()? {
            futex_wait_shared(&rx.storage().header().consumer_sleep, 1, Some(POLL));
            parks += 1;
        }
        rx.finish_park();
    }
    Ok(parks)
}

pub fn rtt(cfg: &Config, case: Case) -> Result<Outcome> {
    let park = case.mode == Mode::RttPark;
    let req = Arc::new(ShmRing::create_memfd("relaybench-req", cfg.capacity)?);
    let rep = Arc::new(ShmRing::create_memfd("relaybench-rep", cfg.capacity)?);
    let role = Role::Echo { park, api: cfg.api };
    let mut child = spawn(cfg, role, &[&req, &rep])?;
    child.go()?;
    let mut tx = Producer::new(req)?;
    let mut rx = Consumer::new(rep)?;
    let len = case.payload;
    let payload = Payload::new(len);
    let mut parks = 0u64;
    let clock = Clock::start(cfg);
    let (samples, seq) = clock.ping_pong(|seq| {
        produce(&mut tx, cfg.api, len, Meta::tag(TAG_DATA), |b| {
            payload.fill(b, seq)
        })
        .map_err(|e| anyhow!("the request ring refused a ping: {e}"))?;
        tx.publish();
        parks += wait_for_records(&mut rx, park, clock.deadline, &mut || child.check_running())?;
        let mut last = None;
        for rec in rx.records()? {
            let rec = rec?;
            if last.is_some() {
                bail!("two replies to one ping");
            }
            payload.verify(rec.payload(), seq)?;
            last = Some(rec.end());
        }
        rx.release(last.ok_or_else(|| anyhow!("woken without a reply"))?);
        Ok(())
    })?;
    control(&mut tx, TAG_END, &mut child, clock.deadline)?;
    let report = finish(child, cfg, &clock)?;
    if report.frames != seq {
        bail!("the echo answered {} pings of {seq}", report.frames);
    }
    let note = if park {
        parked_note(parks, report.parks, seq)
    } else {
        String::new()
    };
    Outcome::rtt(case, &samples, note)
}

/// The echo process: answers every request with a copy of it (reading every byte).
fn echo(
    rx: &mut ShmConsumer,
    tx: &mut ShmProducer,
    (park, api): (bool, ProducerApi),
    dl: Deadline,
) -> Result<Report> {
    let (mut served, mut parks, mut done) = (0u64, 0u64, false);
    while !done {
        parks += wait_for_records(rx, park, dl, &mut || Ok(()))?;
        let mut last = None;
        for rec in rx.records()? {
            let rec = rec?;
            match rec.tag() {
                TAG_DATA => {
                    let p = rec.payload();
                    produce(tx, api, p.len(), Meta::tag(TAG_DATA), |b| {
                        b.copy_from_slice(p)
                    })
                    .map_err(|e| anyhow!("the reply ring refused a pong: {e}"))?;
                    served += 1;
                }
                TAG_END => done = true,
                t => bail!("unexpected record tag {t}"),
            }
            last = Some(rec.end());
        }
        tx.publish();
        if let Some(end) = last {
            rx.release(end);
        }
    }
    Ok(Report {
        frames: served,
        parks,
        ..Report::default()
    })
}

/// Futex waits per round trip on each side: 1.00 means every hop slept in the kernel (more
/// than 1 means some waits timed out or woke spuriously and slept again).
fn parked_note(client: u64, server: u64, round_trips: u64) -> String {
    let per = |n: u64| n as f64 / round_trips.max(1) as f64;
    format!(
        "futex waits per round trip: client {:.2}, server {:.2}",
        per(client),
        per(server)
    )
}

// ----- raw futex ping-pong --------------------------------------------------------------------

/// The two words of the futex ping-pong: the sleep words of a memfd ring's header, used as
/// plain shared words (no producer or consumer attaches). `ping`: 1 = ping, 2 = stop;
/// `pong`: 1 = pong.
fn futex_words(page: &ShmRing) -> (&AtomicU32, &AtomicU32) {
    let h = page.header();
    (&h.consumer_sleep, &h.producer_sleep)
}

/// Waits until `word` is non-zero, sleeping on the futex; returns the value and the sleeps.
fn futex_await(
    word: &AtomicU32,
    dl: Deadline,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<(u32, u64)> {
    let mut sleeps = 0;
    loop {
        let v = word.load(Ordering::Acquire);
        if v != 0 {
            return Ok((v, sleeps));
        }
        if sleeps > 0 {
            dl.check("waiting on the futex")?;
            alive()?;
        }
        futex_wait_shared(word, 0, Some(POLL));
        sleeps += 1;
    }
}

pub fn futex_rtt(cfg: &Config, case: Case) -> Result<Outcome> {
    let page = ShmRing::create_memfd("relaybench-futex", 4096)?;
    let mut child = spawn(cfg, Role::FutexEcho, &[&page])?;
    child.go()?;
    let (ping, pong) = futex_words(&page);
    let mut parks = 0u64;
    let clock = Clock::start(cfg);
    let (samples, seq) = clock.ping_pong(|_| {
        // Release: pairs with the echo's Acquire load of `ping`.
        ping.store(1, Ordering::Release);
        futex_wake_shared(ping);
        let (_, n) = futex_await(pong, clock.deadline, &mut || child.check_running())?;
        parks += n;
        pong.store(0, Ordering::Relaxed);
        Ok(())
    })?;
    ping.store(2, Ordering::Release);
    futex_wake_shared(ping);
    let report = finish(child, cfg, &clock)?;
    if report.frames != seq {
        bail!("the futex echo answered {} pings of {seq}", report.frames);
    }
    Outcome::rtt(case, &samples, parked_note(parks, report.parks, seq))
}

fn futex_echo(page: &ShmRing, dl: Deadline) -> Result<Report> {
    let (ping, pong) = futex_words(page);
    let (mut served, mut parks) = (0u64, 0u64);
    loop {
        let (v, n) = futex_await(ping, dl, &mut || Ok(()))?;
        parks += n;
        ping.store(0, Ordering::Relaxed);
        if v == 2 {
            break;
        }
        served += 1;
        // Release: pairs with the client's Acquire load of `pong`.
        pong.store(1, Ordering::Release);
        futex_wake_shared(pong);
    }
    Ok(Report {
        frames: served,
        parks,
        ..Report::default()
    })
}

// ----- child side -----------------------------------------------------------------------------

/// The child process: attaches to the inherited memfds, reports ready, and once told to go
/// plays its role; `gate` reports ready and waits for the go.
pub fn child(plan: ChildPlan, gate: &dyn Fn(&()) -> Result<()>) -> Result<Report> {
    if let Some(cpu) = plan.cpu {
        pin_current_thread(cpu)?;
    }
    let dl = Deadline(Instant::now() + Duration::from_secs_f64(plan.limit_secs));
    let mut rings = Vec::new();
    for &fd in &plan.fds {
        // SAFETY: the parent made each of `plan.fds` (a duplicate of a memfd without
        // close-on-exec) for this process and closed its own copy; nothing else in this process
        // owns those numbers, and each is taken once, here. `open_fd` checks that it holds a
        // ring before mapping it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        rings.push(Arc::new(ShmRing::open_fd(fd, Duration::from_secs(5))?));
    }
    let mut rings = rings.into_iter();
    let mut next = || {
        rings
            .next()
            .ok_or_else(|| anyhow!("too few fds in the plan"))
    };
    match plan.role {
        Role::Consume { payload } => {
            let mut rx = Consumer::new(next()?)?;
            gate(&())?;
            consume(&mut rx, payload, dl)
        }
        Role::Echo { park, api } => {
            let mut rx = Consumer::new(next()?)?;
            let mut tx = Producer::new(next()?)?;
            gate(&())?;
            echo(&mut rx, &mut tx, (park, api), dl)
        }
        Role::FutexEcho => {
            let page = next()?;
            gate(&())?;
            futex_echo(&page, dl)
        }
    }
}
