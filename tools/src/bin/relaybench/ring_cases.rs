//! The transports, each in both roles: the parent side (producer, or ping-pong client, which
//! keeps the clock) and the child side (consumer, or echo server). Cross-process transports run
//! their child side in a re-executed `relaybench ring --child`; rtrb runs it in a thread.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use shm_ring::{Consumer, Meta, Producer, ReserveError, RingStorage, ShmRing};

use super::ring_data::{
    Frame, FrameReader, FrameWriter, Payload, RxState, SplitReader, SplitWriter, TxState, LEN_END,
    LEN_MARK, PREFIX,
};
use super::ring_sys::{
    futex_wait, futex_wake, pin_current_thread, pipe, set_pipe_size, set_socket_buffers, ChildProc,
    Ctl, Deadline, Msg, Report, SharedPage,
};
use super::{Case, ChildSpec, Config, Mode, Outcome, Transport, Wake};

const TAG_DATA: u16 = 1;
const TAG_MARK: u16 = 2;
const TAG_END: u16 = 3;
/// How long one blocking wait lasts before the waiter checks its deadline and its peer.
const POLL: Duration = Duration::from_millis(50);
/// Spin iterations between deadline checks.
const SPIN_CHECK: u32 = 1 << 16;
/// A batch (records per publish or release, frames per rtrb chunk) also ends once it holds this
/// fraction of the ring: a producer that filled the whole ring before publishing, or a consumer
/// that read all of it before releasing, would leave the other side idle half the time.
const BATCH_RING_FRACTION: usize = 16;

/// Frames of `frame_bytes` in one batch: `--batch`, fewer for large frames.
fn batch_frames(cfg: &Config, frame_bytes: usize) -> usize {
    cfg.batch
        .min((cfg.capacity / BATCH_RING_FRACTION / frame_bytes.max(1)).max(1))
}

type ShmProducer = Producer<Arc<ShmRing>>;
type ShmConsumer = Consumer<Arc<ShmRing>>;

// ---------------------------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------------------------

/// Runs one case and returns its figures.
pub fn run_case(cfg: &Config, case: &Case) -> Result<Outcome> {
    match (case.transport, case.mode) {
        (Transport::ShmRing, Mode::Throughput) => shm_throughput(cfg, case),
        (Transport::ShmRing, Mode::Rtt) => shm_rtt(cfg, case),
        (Transport::Rtrb, Mode::Throughput) => rtrb_throughput(cfg, case),
        (Transport::Rtrb, Mode::Rtt) => rtrb_rtt(cfg, case),
        (Transport::Uds | Transport::Pipe, Mode::Throughput) => stream_throughput(cfg, case),
        (Transport::Uds | Transport::Pipe, Mode::Rtt) => stream_rtt(cfg, case),
        (Transport::Futex, Mode::Rtt) => futex_rtt(cfg, case),
        (Transport::Futex, Mode::Throughput) => bail!("futex has no throughput mode"),
    }
}

/// Warm-up (not counted), then the measured phase.
struct Clock {
    start: Instant,
    warm: Duration,
    end: Duration,
    deadline: Deadline,
}

/// A round-trip case goes on past its time until it has this many samples (on a saturated
/// machine a round trip can take longer than a short run), within its deadline.
const MIN_RTT_SAMPLES: u64 = 20;

impl Clock {
    /// True when a round-trip loop that started an iteration `since` the start may stop.
    fn rtt_done(&self, since: Duration, hist: &Histogram<u64>) -> bool {
        since >= self.end && hist.len() >= MIN_RTT_SAMPLES
    }

    fn start(cfg: &Config) -> Clock {
        let start = Instant::now();
        let end = cfg.warmup + cfg.measure;
        Clock {
            start,
            warm: cfg.warmup,
            end,
            deadline: Deadline(start + end + cfg.grace),
        }
    }
}

fn throughput_outcome(case: &Case, r: &Report, note: String) -> Outcome {
    let fps = r.measured_frames as f64 * 1e9 / r.measured_ns as f64;
    Outcome {
        case: *case,
        frames_per_sec: Some(fps),
        gbytes_per_sec: Some(fps * case.payload as f64 / 1e9),
        rtt_p50_ns: None,
        rtt_p99_ns: None,
        note,
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn rtt_outcome(case: &Case, h: &Histogram<u64>, note: String) -> Result<Outcome> {
    if h.is_empty() {
        bail!("no round trip was measured (the run was too short?)");
    }
    Ok(Outcome {
        case: *case,
        frames_per_sec: None,
        gbytes_per_sec: None,
        rtt_p50_ns: Some(h.value_at_quantile(0.5)),
        rtt_p99_ns: Some(h.value_at_quantile(0.99)),
        note,
    })
}

fn record(h: &mut Histogram<u64>, t0: Instant) {
    h.saturating_record(t0.elapsed().as_nanos() as u64);
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

// ----- shm-ring -------------------------------------------------------------------------------

/// Pushes a payload-less control record, waiting for space if need be, and publishes it.
fn shm_control(tx: &mut ShmProducer, tag: u16, child: &mut ChildProc, dl: Deadline) -> Result<()> {
    loop {
        match tx.push(Meta::tag(tag), &[]) {
            Ok(_) => {
                tx.publish();
                return Ok(());
            }
            Err(ReserveError::Full) => {
                if !tx.wait_for_space(0, Some(POLL))? {
                    child.check_alive()?;
                    dl.check("waiting for ring space")?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn shm_throughput(cfg: &Config, case: &Case) -> Result<Outcome> {
    let ring = Arc::new(ShmRing::create_memfd("relaybench-tput", cfg.capacity)?);
    let mut child = ChildProc::spawn(&cfg.child_spec(case), &[ring.fd().as_raw_fd()])?;
    child.expect_ready()?;
    let mut tx = Producer::new(ring)?;
    let len = case.payload;
    let payload = Payload::new(len);
    let mut st = TxState::default();
    let batch = batch_frames(cfg, shm_ring::layout::record_size(len) as usize);
    let clock = Clock::start(cfg);
    let mut marked = false;
    loop {
        // One batch: commit records in place, then make them visible with one store.
        let mut n = 0;
        while n < batch {
            match tx.reserve(len) {
                Ok(mut grant) => {
                    payload.fill(&mut grant, st.seq);
                    grant.commit(len, Meta::tag(TAG_DATA));
                    st.sent(&payload);
                    n += 1;
                }
                Err(ReserveError::Full) => {
                    // Publishes what is committed, spins, then parks until the consumer
                    // releases space.
                    if !tx.wait_for_space(len, Some(POLL))? {
                        child.check_alive()?;
                        clock.deadline.check("waiting for ring space")?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        tx.publish();
        let el = clock.start.elapsed();
        if !marked && el >= clock.warm {
            shm_control(&mut tx, TAG_MARK, &mut child, clock.deadline)?;
            marked = true;
        } else if marked && el >= clock.end {
            shm_control(&mut tx, TAG_END, &mut child, clock.deadline)?;
            break;
        }
    }
    let report = child.expect_report(cfg.grace)?;
    child.finish()?;
    st.check(&report)?;
    let tx_parks = tx.storage().header().producer.parks.load(Ordering::Relaxed);
    let note = format!("parks: consumer {}, producer {}", report.parks, tx_parks);
    Ok(throughput_outcome(case, &report, note))
}

/// Waits until `rx` has records it has not released. Spin: polls the tail, never sleeps.
/// Park: sleeps at once, through the consumer's park protocol (announce, fence, re-check, futex
/// on the announced word), which is `Consumer::wait` without its spin phase. Returns how many
/// times it went to sleep in the kernel.
fn shm_wait(
    rx: &mut ShmConsumer,
    wake: Wake,
    dl: Deadline,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<u64> {
    match wake {
        Wake::Spin => {
            let mut i = 0u32;
            while !rx.has_new() {
                std::hint::spin_loop();
                i = i.wrapping_add(1);
                if i % SPIN_CHECK == 0 {
                    dl.check("spinning for a record")?;
                    alive()?;
                }
            }
            Ok(0)
        }
        Wake::Park => {
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
                    let word = &rx.storage().header().consumer_sleep;
                    futex_wait(word, 1, POLL);
                    parks += 1;
                }
                rx.finish_park();
            }
            Ok(parks)
        }
    }
}

fn shm_rtt(cfg: &Config, case: &Case) -> Result<Outcome> {
    let wake = case
        .wake
        .ok_or_else(|| anyhow!("shm-ring rtt needs a wake mode"))?;
    let req = Arc::new(ShmRing::create_memfd("relaybench-req", cfg.capacity)?);
    let rep = Arc::new(ShmRing::create_memfd("relaybench-rep", cfg.capacity)?);
    let fds = [req.fd().as_raw_fd(), rep.fd().as_raw_fd()];
    let mut child = ChildProc::spawn(&cfg.child_spec(case), &fds)?;
    child.expect_ready()?;
    let mut tx = Producer::new(req)?;
    let mut rx = Consumer::new(rep)?;
    let len = case.payload;
    let payload = Payload::new(len);
    let mut hist = new_histogram();
    let (mut seq, mut parks) = (0u64, 0u64);
    let clock = Clock::start(cfg);
    loop {
        let t0 = Instant::now();
        let since = t0 - clock.start;
        if clock.rtt_done(since, &hist) {
            break;
        }
        match tx.reserve(len) {
            Ok(mut grant) => {
                payload.fill(&mut grant, seq);
                grant.commit(len, Meta::tag(TAG_DATA));
            }
            Err(e) => bail!("the request ring refused a ping: {e}"),
        }
        tx.publish();
        parks += shm_wait(&mut rx, wake, clock.deadline, &mut || child.check_alive())?;
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
        if since >= clock.warm {
            record(&mut hist, t0);
        }
        seq += 1;
    }
    shm_control(&mut tx, TAG_END, &mut child, clock.deadline)?;
    let report = child.expect_report(cfg.grace)?;
    child.finish()?;
    if report.frames != seq {
        bail!("the server answered {} pings of {seq}", report.frames);
    }
    let note = if wake == Wake::Park {
        parked_note(parks, report.parks, seq)
    } else {
        String::new()
    };
    rtt_outcome(case, &hist, note)
}

// ----- rtrb (one process, two threads) --------------------------------------------------------

/// Spins until `cond` holds; errors at the deadline or when the other thread gave up.
fn spin_until(mut cond: impl FnMut() -> bool, dl: Deadline, abort: &AtomicBool) -> Result<()> {
    let mut i = 0u32;
    while !cond() {
        std::hint::spin_loop();
        i = i.wrapping_add(1);
        if i % SPIN_CHECK == 0 {
            dl.check("spinning on rtrb")?;
            if abort.load(Ordering::Relaxed) {
                bail!("the other rtrb thread failed");
            }
        }
    }
    Ok(())
}

/// Writes a payload-less control frame.
fn rtrb_control(
    tx: &mut rtrb::Producer<u8>,
    len: u32,
    dl: Deadline,
    abort: &AtomicBool,
) -> Result<()> {
    spin_until(|| tx.slots() >= PREFIX, dl, abort)?;
    let mut chunk = tx.write_chunk_uninit(PREFIX)?;
    let (a, b) = chunk.as_mut_slices();
    SplitWriter::new(a, b).put(&len.to_be_bytes());
    // SAFETY: all PREFIX bytes of the chunk were written just above.
    unsafe { chunk.commit_all() };
    Ok(())
}

/// Reads the frames of one read chunk (at most about `limit` bytes, whole frames) and gives
/// their space back; `on_frame` sees each frame.
fn rtrb_read_chunk(
    rx: &mut rtrb::Consumer<u8>,
    limit: usize,
    scratch: &mut Vec<u8>,
    mut on_frame: impl FnMut(Frame<'_>) -> Result<()>,
) -> Result<()> {
    let chunk = rx.read_chunk(rx.slots())?;
    let (a, b) = chunk.as_slices();
    let mut r = SplitReader::new(a, b);
    while r.remaining() > 0 && r.consumed() < limit {
        let len = u32::from_be_bytes(r.take(PREFIX, scratch).try_into().expect("4 bytes"));
        match len {
            LEN_MARK => on_frame(Frame::Mark)?,
            LEN_END => on_frame(Frame::End)?,
            n => on_frame(Frame::Data(r.take(n as usize, scratch)))?,
        }
    }
    let n = r.consumed();
    chunk.commit(n);
    Ok(())
}

fn rtrb_consume(
    rx: &mut rtrb::Consumer<u8>,
    len: usize,
    dl: Deadline,
    abort: &AtomicBool,
) -> Result<Report> {
    let limit = rx.buffer().capacity() / BATCH_RING_FRACTION;
    let mut st = RxState::new(len);
    let mut scratch = Vec::new();
    while !st.is_done() {
        spin_until(|| !rx.is_empty(), dl, abort)?;
        rtrb_read_chunk(rx, limit, &mut scratch, |f| {
            match f {
                Frame::Data(d) => st.on_data(d)?,
                Frame::Mark => st.on_mark(),
                Frame::End => st.on_end(),
            }
            Ok(())
        })?;
    }
    Ok(st.report(0))
}

fn rtrb_produce(
    tx: &mut rtrb::Producer<u8>,
    cfg: &Config,
    len: usize,
    clock: &Clock,
    abort: &AtomicBool,
) -> Result<TxState> {
    let payload = Payload::new(len);
    let frame = PREFIX + len;
    let batch = batch_frames(cfg, frame);
    let prefix = (len as u32).to_be_bytes();
    let mut st = TxState::default();
    let mut marked = false;
    loop {
        // As many whole frames as fit, up to one batch, written in place into one chunk.
        let k = match tx.write_chunk_uninit(batch * frame) {
            Ok(_) => batch,
            Err(rtrb::chunks::ChunkError::TooFewSlots(n)) => n / frame,
        };
        if k == 0 {
            spin_until(|| tx.slots() >= frame, clock.deadline, abort)?;
            continue;
        }
        let mut chunk = tx.write_chunk_uninit(k * frame)?;
        let (a, b) = chunk.as_mut_slices();
        let mut w = SplitWriter::new(a, b);
        for _ in 0..k {
            w.put(&prefix);
            payload.fill_split(&mut w, st.seq);
            st.sent(&payload);
        }
        debug_assert_eq!(w.written(), k * frame);
        // SAFETY: the loop above wrote k frames of `frame` bytes: every byte of the chunk.
        unsafe { chunk.commit_all() };
        let el = clock.start.elapsed();
        if !marked && el >= clock.warm {
            rtrb_control(tx, LEN_MARK, clock.deadline, abort)?;
            marked = true;
        } else if marked && el >= clock.end {
            rtrb_control(tx, LEN_END, clock.deadline, abort)?;
            return Ok(st);
        }
    }
}

/// Runs `parent` on this thread and `other` on a second one (pinned to the child CPU), and
/// makes either give up when the other fails.
fn two_threads<A, B>(
    cfg: &Config,
    parent: impl FnOnce(&AtomicBool) -> Result<A>,
    other: impl FnOnce(&AtomicBool) -> Result<B> + Send,
) -> Result<(A, B)>
where
    B: Send,
{
    let abort = AtomicBool::new(false);
    std::thread::scope(|s| {
        let abort = &abort;
        let handle = s.spawn(move || {
            if let Some((_, cpu)) = cfg.cpus {
                pin_current_thread(cpu)?;
            }
            let r = other(abort);
            if r.is_err() {
                abort.store(true, Ordering::Relaxed);
            }
            r
        });
        let a = parent(abort);
        if a.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        let b = handle
            .join()
            .map_err(|_| anyhow!("the rtrb thread panicked"))?;
        Ok((a?, b?))
    })
}

fn rtrb_throughput(cfg: &Config, case: &Case) -> Result<Outcome> {
    let (mut tx, mut rx) = rtrb::RingBuffer::<u8>::new(cfg.capacity);
    let len = case.payload;
    let clock = Clock::start(cfg);
    let dl = clock.deadline;
    let (st, report) = two_threads(
        cfg,
        |abort| rtrb_produce(&mut tx, cfg, len, &clock, abort),
        |abort| rtrb_consume(&mut rx, len, dl, abort),
    )?;
    st.check(&report)?;
    Ok(throughput_outcome(case, &report, String::new()))
}

fn rtrb_rtt(cfg: &Config, case: &Case) -> Result<Outcome> {
    if case.wake != Some(Wake::Spin) {
        bail!("rtrb has no way to park: its rtt is spin only");
    }
    let (mut req_tx, mut req_rx) = rtrb::RingBuffer::<u8>::new(cfg.capacity);
    let (mut rep_tx, mut rep_rx) = rtrb::RingBuffer::<u8>::new(cfg.capacity);
    let len = case.payload;
    let frame = PREFIX + len;
    let payload = Payload::new(len);
    let clock = Clock::start(cfg);
    let dl = clock.deadline;
    let client = |abort: &AtomicBool| -> Result<(Histogram<u64>, u64)> {
        let mut hist = new_histogram();
        let mut scratch = Vec::new();
        let mut seq = 0u64;
        loop {
            let t0 = Instant::now();
            let since = t0 - clock.start;
            if clock.rtt_done(since, &hist) {
                break;
            }
            let mut chunk = req_tx.write_chunk_uninit(frame)?;
            let (a, b) = chunk.as_mut_slices();
            let mut w = SplitWriter::new(a, b);
            w.put(&(len as u32).to_be_bytes());
            payload.fill_split(&mut w, seq);
            // SAFETY: the prefix and the payload fill the whole chunk.
            unsafe { chunk.commit_all() };
            spin_until(|| rep_rx.slots() >= frame, dl, abort)?;
            let mut got = 0;
            rtrb_read_chunk(&mut rep_rx, usize::MAX, &mut scratch, |f| match f {
                Frame::Data(d) => {
                    got += 1;
                    payload.verify(d, seq)
                }
                _ => bail!("unexpected control frame in a reply"),
            })?;
            if got != 1 {
                bail!("{got} replies to one ping");
            }
            if since >= clock.warm {
                record(&mut hist, t0);
            }
            seq += 1;
        }
        rtrb_control(&mut req_tx, LEN_END, dl, abort)?;
        Ok((hist, seq))
    };
    let server = |abort: &AtomicBool| -> Result<u64> {
        let mut scratch = Vec::new();
        let (mut served, mut done) = (0u64, false);
        while !done {
            spin_until(|| !req_rx.is_empty(), dl, abort)?;
            rtrb_read_chunk(&mut req_rx, usize::MAX, &mut scratch, |f| {
                match f {
                    Frame::Data(d) => {
                        let mut chunk = rep_tx.write_chunk_uninit(PREFIX + d.len())?;
                        let (a, b) = chunk.as_mut_slices();
                        let mut w = SplitWriter::new(a, b);
                        w.put(&(d.len() as u32).to_be_bytes());
                        w.put(d);
                        // SAFETY: the prefix and the copied payload fill the whole chunk.
                        unsafe { chunk.commit_all() };
                        served += 1;
                    }
                    Frame::End => done = true,
                    Frame::Mark => {}
                }
                Ok(())
            })?;
        }
        Ok(served)
    };
    let ((hist, seq), served) = two_threads(cfg, client, server)?;
    if served != seq {
        bail!("the rtrb server answered {served} pings of {seq}");
    }
    rtt_outcome(case, &hist, String::new())
}

// ----- Unix socket and pipe -------------------------------------------------------------------

fn stream_produce<W: Write>(
    w: W,
    cfg: &Config,
    len: usize,
    child: &mut ChildProc,
) -> Result<TxState> {
    let payload = Payload::new(len);
    let mut fw = FrameWriter::new(w, cfg.stream_batch, len);
    let mut st = TxState::default();
    let clock = Clock::start(cfg);
    let mut marked = false;
    loop {
        for _ in 0..cfg.batch {
            fw.push(&payload, st.seq).context("writing to the child")?;
            st.sent(&payload);
        }
        let el = clock.start.elapsed();
        if !marked && el >= clock.warm {
            fw.flush()?;
            fw.push_control(LEN_MARK)?;
            marked = true;
        } else if marked && el >= clock.end {
            fw.flush()?;
            fw.push_control(LEN_END)?;
            return Ok(st);
        }
        if st.seq % (64 * cfg.batch as u64) == 0 {
            child.check_alive()?;
        }
    }
}

fn stream_throughput(cfg: &Config, case: &Case) -> Result<Outcome> {
    let len = case.payload;
    let spec = cfg.child_spec(case);
    let (mut child, st) = if case.transport == Transport::Uds {
        let (mine, theirs) = UnixStream::pair()?;
        set_socket_buffers(mine.as_raw_fd(), cfg.capacity);
        set_socket_buffers(theirs.as_raw_fd(), cfg.capacity);
        let mut child = ChildProc::spawn(&spec, &[theirs.as_raw_fd()])?;
        drop(theirs);
        child.expect_ready()?;
        let st = stream_produce(&mine, cfg, len, &mut child)?;
        (child, st)
    } else {
        let (r, w) = pipe()?;
        set_pipe_size(&w, cfg.capacity);
        let mut child = ChildProc::spawn(&spec, &[r.as_raw_fd()])?;
        drop(r);
        child.expect_ready()?;
        let st = stream_produce(std::fs::File::from(w), cfg, len, &mut child)?;
        (child, st)
    };
    let report = child.expect_report(cfg.grace)?;
    child.finish()?;
    st.check(&report)?;
    let note = if cfg.stream_batch > 1 {
        format!("{} frames per write", cfg.stream_batch)
    } else {
        "one write per frame".into()
    };
    Ok(throughput_outcome(case, &report, note))
}

fn stream_client<R: Read, W: Write>(
    r: R,
    w: W,
    cfg: &Config,
    case: &Case,
    child: &mut ChildProc,
) -> Result<Outcome> {
    let len = case.payload;
    let payload = Payload::new(len);
    let mut fr = FrameReader::new(r, len);
    let mut fw = FrameWriter::new(w, 1, len);
    let mut hist = new_histogram();
    let mut seq = 0u64;
    let clock = Clock::start(cfg);
    loop {
        let t0 = Instant::now();
        let since = t0 - clock.start;
        if clock.rtt_done(since, &hist) {
            break;
        }
        fw.push(&payload, seq)?;
        match fr.next()? {
            Frame::Data(d) => payload.verify(d, seq)?,
            _ => bail!("unexpected control frame in a reply"),
        }
        if since >= clock.warm {
            record(&mut hist, t0);
        }
        seq += 1;
    }
    fw.push_control(LEN_END)?;
    let report = child.expect_report(cfg.grace)?;
    if report.frames != seq {
        bail!("the server answered {} pings of {seq}", report.frames);
    }
    rtt_outcome(case, &hist, "blocking read".into())
}

fn stream_rtt(cfg: &Config, case: &Case) -> Result<Outcome> {
    let spec = cfg.child_spec(case);
    if case.transport == Transport::Uds {
        let (mine, theirs) = UnixStream::pair()?;
        let mut child = ChildProc::spawn(&spec, &[theirs.as_raw_fd()])?;
        drop(theirs);
        child.expect_ready()?;
        let out = stream_client(&mine, &mine, cfg, case, &mut child)?;
        child.finish()?;
        Ok(out)
    } else {
        let (req_r, req_w) = pipe()?;
        let (rep_r, rep_w) = pipe()?;
        let mut child = ChildProc::spawn(&spec, &[req_r.as_raw_fd(), rep_w.as_raw_fd()])?;
        drop((req_r, rep_w));
        child.expect_ready()?;
        let (r, w) = (std::fs::File::from(rep_r), std::fs::File::from(req_w));
        let out = stream_client(r, w, cfg, case, &mut child)?;
        child.finish()?;
        Ok(out)
    }
}

// ----- raw futex ping-pong --------------------------------------------------------------------

/// Line of the shared page the client rings (1 = ping, 2 = stop).
const PING: usize = 0;
/// Line the server rings (1 = pong).
const PONG: usize = 1;

fn futex_rtt(cfg: &Config, case: &Case) -> Result<Outcome> {
    let page = SharedPage::create()?;
    let mut child = ChildProc::spawn(&cfg.child_spec(case), &[page.fd()])?;
    child.expect_ready()?;
    let (ping, pong) = (page.word(PING), page.word(PONG));
    let mut hist = new_histogram();
    let (mut seq, mut parks) = (0u64, 0u64);
    let clock = Clock::start(cfg);
    loop {
        let t0 = Instant::now();
        let since = t0 - clock.start;
        if clock.rtt_done(since, &hist) {
            break;
        }
        ping.store(1, Ordering::Release);
        futex_wake(ping);
        let mut round = 0;
        while pong.load(Ordering::Acquire) == 0 {
            if round > 0 {
                clock.deadline.check("waiting for a futex pong")?;
                child.check_alive()?;
            }
            futex_wait(pong, 0, POLL);
            parks += 1;
            round += 1;
        }
        pong.store(0, Ordering::Relaxed);
        if since >= clock.warm {
            record(&mut hist, t0);
        }
        seq += 1;
    }
    ping.store(2, Ordering::Release);
    futex_wake(ping);
    let report = child.expect_report(cfg.grace)?;
    child.finish()?;
    if report.frames != seq {
        bail!("the futex server answered {} pings of {seq}", report.frames);
    }
    rtt_outcome(case, &hist, parked_note(parks, report.parks, seq))
}

// ---------------------------------------------------------------------------------------------
// Child side
// ---------------------------------------------------------------------------------------------

/// Runs the child side of `spec` with the inherited descriptors.
pub fn child_main(spec: &ChildSpec) -> Result<()> {
    if let Some(cpu) = spec.cpu {
        pin_current_thread(cpu)?;
    }
    let dl = Deadline(Instant::now() + Duration::from_secs_f64(spec.limit_secs));
    let nfds = match (spec.transport, spec.mode) {
        (Transport::ShmRing, Mode::Rtt) | (Transport::Pipe, Mode::Rtt) => 2,
        _ => 1,
    };
    let (mut ctl, mut fds) = super::ring_sys::take_child_fds(nfds);
    let mut fd = || fds.remove(0);
    match (spec.transport, spec.mode) {
        (Transport::ShmRing, Mode::Throughput) => shm_consumer(spec, &mut ctl, fd(), dl),
        (Transport::ShmRing, Mode::Rtt) => {
            let req = fd();
            shm_server(spec, &mut ctl, req, fd(), dl)
        }
        (Transport::Uds, Mode::Throughput) => {
            stream_consumer(UnixStream::from(fd()), spec.payload, &mut ctl)
        }
        (Transport::Pipe, Mode::Throughput) => {
            stream_consumer(std::fs::File::from(fd()), spec.payload, &mut ctl)
        }
        (Transport::Uds, Mode::Rtt) => {
            let s = UnixStream::from(fd());
            stream_server(&s, &s, spec.payload, &mut ctl)
        }
        (Transport::Pipe, Mode::Rtt) => {
            let r = std::fs::File::from(fd());
            stream_server(r, std::fs::File::from(fd()), spec.payload, &mut ctl)
        }
        (Transport::Futex, Mode::Rtt) => futex_server(&mut ctl, fd(), dl),
        (t, m) => bail!("no child side for {t:?} {m:?}"),
    }
}

fn attach(fd: OwnedFd) -> Result<Arc<ShmRing>> {
    Ok(Arc::new(ShmRing::open_fd(fd, Duration::from_secs(5))?))
}

fn shm_consumer(spec: &ChildSpec, ctl: &mut Ctl, fd: OwnedFd, dl: Deadline) -> Result<()> {
    let mut rx = Consumer::new(attach(fd)?)?;
    ctl.send(&Msg::Ready)?;
    let mut st = RxState::new(spec.payload);
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
    ctl.send(&Msg::Report(st.report(parks)))
}

fn shm_server(
    spec: &ChildSpec,
    ctl: &mut Ctl,
    req: OwnedFd,
    rep: OwnedFd,
    dl: Deadline,
) -> Result<()> {
    let wake = spec
        .wake
        .ok_or_else(|| anyhow!("shm-ring rtt needs a wake mode"))?;
    let mut rx = Consumer::new(attach(req)?)?;
    let mut tx = Producer::new(attach(rep)?)?;
    ctl.send(&Msg::Ready)?;
    let (mut served, mut parks, mut done) = (0u64, 0u64, false);
    while !done {
        parks += shm_wait(&mut rx, wake, dl, &mut || Ok(()))?;
        let mut last = None;
        for rec in rx.records()? {
            let rec = rec?;
            match rec.tag() {
                TAG_DATA => {
                    // The echo reads every byte of the request while copying it into the reply.
                    let p = rec.payload();
                    match tx.reserve(p.len()) {
                        Ok(mut grant) => {
                            grant.copy_from_slice(p);
                            grant.commit(p.len(), Meta::tag(TAG_DATA));
                        }
                        Err(e) => bail!("the reply ring refused a pong: {e}"),
                    }
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
    ctl.send(&Msg::Report(Report {
        frames: served,
        parks,
        ..Report::default()
    }))
}

fn stream_consumer<R: Read>(r: R, len: usize, ctl: &mut Ctl) -> Result<()> {
    let mut fr = FrameReader::new(r, len);
    ctl.send(&Msg::Ready)?;
    let mut st = RxState::new(len);
    while !st.is_done() {
        match fr.next()? {
            Frame::Data(d) => st.on_data(d)?,
            Frame::Mark => st.on_mark(),
            Frame::End => st.on_end(),
        }
    }
    ctl.send(&Msg::Report(st.report(0)))
}

fn stream_server<R: Read, W: Write>(r: R, w: W, len: usize, ctl: &mut Ctl) -> Result<()> {
    let mut fr = FrameReader::new(r, len);
    let mut fw = FrameWriter::new(w, 1, len);
    ctl.send(&Msg::Ready)?;
    let mut served = 0u64;
    loop {
        match fr.next()? {
            Frame::Data(d) => {
                fw.push_bytes(d)?;
                served += 1;
            }
            Frame::Mark => {}
            Frame::End => break,
        }
    }
    ctl.send(&Msg::Report(Report {
        frames: served,
        ..Report::default()
    }))
}

fn futex_server(ctl: &mut Ctl, fd: OwnedFd, dl: Deadline) -> Result<()> {
    let page = SharedPage::map(fd)?;
    let (ping, pong) = (page.word(PING), page.word(PONG));
    ctl.send(&Msg::Ready)?;
    let (mut served, mut parks) = (0u64, 0u64);
    loop {
        let mut round = 0;
        let v = loop {
            let v = ping.load(Ordering::Acquire);
            if v != 0 {
                break v;
            }
            if round > 0 {
                dl.check("waiting for a futex ping")?;
            }
            futex_wait(ping, 0, POLL);
            parks += 1;
            round += 1;
        };
        ping.store(0, Ordering::Relaxed);
        if v == 2 {
            break;
        }
        served += 1;
        pong.store(1, Ordering::Release);
        futex_wake(pong);
    }
    ctl.send(&Msg::Report(Report {
        frames: served,
        parks,
        ..Report::default()
    }))
}
