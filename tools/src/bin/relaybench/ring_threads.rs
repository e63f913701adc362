//! The in-process baselines of `relaybench ring`: rtrb (throughput and spinning round trip)
//! and crossbeam-queue's `ArrayQueue` (throughput), each between two threads of this process
//! (the second pinned to the second CPU), both sides spinning.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Result};
use crossbeam_queue::ArrayQueue;

use super::ring_data::{
    Frame, Payload, Report, RttSamples, RxState, SplitReader, SplitWriter, TxState, LEN_END,
    LEN_MARK, PREFIX,
};
use super::{pin_current_thread, Case, Clock, Config, Deadline, Outcome, BATCH_RING_FRACTION};

/// Spin iterations between deadline checks.
const SPIN_CHECK: u32 = 1 << 16;

// ----- rtrb -----------------------------------------------------------------------------------

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
    let batch = cfg.batch_frames(frame);
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

/// rtrb between two threads: the same length-prefixed bytes through its chunk API.
pub fn rtrb_throughput(cfg: &Config, case: Case) -> Result<Outcome> {
    let len = case.payload;
    let (mut tx, mut rx) = rtrb::RingBuffer::<u8>::new(cfg.capacity);
    let clock = Clock::start(cfg);
    let dl = clock.deadline;
    let (st, report) = two_threads(
        cfg,
        |abort| rtrb_produce(&mut tx, cfg, len, &clock, abort),
        |abort| rtrb_consume(&mut rx, len, dl, abort),
    )?;
    st.check(&report)?;
    Ok(Outcome::throughput(case, &report, "both sides spin".into()))
}

/// rtrb ping-pong between two threads, both spinning: the in-process floor of a round trip.
pub fn rtrb_rtt(cfg: &Config, case: Case) -> Result<Outcome> {
    let (mut req_tx, mut req_rx) = rtrb::RingBuffer::<u8>::new(cfg.capacity);
    let (mut rep_tx, mut rep_rx) = rtrb::RingBuffer::<u8>::new(cfg.capacity);
    let len = case.payload;
    let frame = PREFIX + len;
    let payload = Payload::new(len);
    let clock = Clock::start(cfg);
    let dl = clock.deadline;
    let client = |abort: &AtomicBool| -> Result<(RttSamples, u64)> {
        let mut scratch = Vec::new();
        let (samples, seq) = clock.ping_pong(|seq| {
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
            Ok(())
        })?;
        rtrb_control(&mut req_tx, LEN_END, dl, abort)?;
        Ok((samples, seq))
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
    let ((samples, seq), served) = two_threads(cfg, client, server)?;
    if served != seq {
        bail!("the rtrb echo answered {served} pings of {seq}");
    }
    Outcome::rtt(case, &samples, "both sides spin".into())
}

// ----- crossbeam-queue ------------------------------------------------------------------------

/// One slot of the `ArrayQueue`: a record of exactly `N` payload bytes, or a control frame.
enum Item<const N: usize> {
    Data([u8; N]),
    Mark,
    End,
}

/// crossbeam-queue's `ArrayQueue` between two threads, one record per slot, moved by value
/// (its slots hold fixed-size values, so only 64 B and 1 KiB payloads: another size is an
/// error).
pub fn crossbeam_throughput(cfg: &Config, case: Case) -> Result<Outcome> {
    let report = match case.payload {
        64 => crossbeam_run::<64>(cfg)?,
        1024 => crossbeam_run::<1024>(cfg)?,
        p => bail!("crossbeam runs 64 B and 1 KiB payloads only, not {p} B"),
    };
    let note = "one record per slot, by value".to_owned();
    Ok(Outcome::throughput(case, &report, note))
}

fn crossbeam_run<const N: usize>(cfg: &Config) -> Result<Report> {
    let q = ArrayQueue::<Item<N>>::new((cfg.capacity / N).max(2));
    let clock = Clock::start(cfg);
    let dl = clock.deadline;
    let (st, report) = two_threads(
        cfg,
        |abort| crossbeam_produce(&q, cfg, &clock, abort),
        |abort| crossbeam_consume(&q, dl, abort),
    )?;
    st.check(&report)?;
    Ok(report)
}

/// Pushes `item`, spinning while the queue is full.
fn crossbeam_push<const N: usize>(
    q: &ArrayQueue<Item<N>>,
    mut item: Item<N>,
    dl: Deadline,
    abort: &AtomicBool,
) -> Result<()> {
    loop {
        match q.push(item) {
            Ok(()) => return Ok(()),
            Err(back) => {
                item = back;
                spin_until(|| !q.is_full(), dl, abort)?;
            }
        }
    }
}

fn crossbeam_produce<const N: usize>(
    q: &ArrayQueue<Item<N>>,
    cfg: &Config,
    clock: &Clock,
    abort: &AtomicBool,
) -> Result<TxState> {
    let payload = Payload::new(N);
    let mut st = TxState::default();
    let mut marked = false;
    loop {
        for _ in 0..cfg.batch {
            let mut rec = [0u8; N];
            payload.fill(&mut rec, st.seq);
            crossbeam_push(q, Item::Data(rec), clock.deadline, abort)?;
            st.sent(&payload);
        }
        let el = clock.start.elapsed();
        if !marked && el >= clock.warm {
            crossbeam_push(q, Item::Mark, clock.deadline, abort)?;
            marked = true;
        } else if marked && el >= clock.end {
            crossbeam_push(q, Item::End, clock.deadline, abort)?;
            return Ok(st);
        }
    }
}

fn crossbeam_consume<const N: usize>(
    q: &ArrayQueue<Item<N>>,
    dl: Deadline,
    abort: &AtomicBool,
) -> Result<Report> {
    let mut st = RxState::new(N);
    while !st.is_done() {
        match q.pop() {
            Some(Item::Data(d)) => st.on_data(&d)?,
            Some(Item::Mark) => st.on_mark(),
            Some(Item::End) => st.on_end(),
            None => spin_until(|| !q.is_empty(), dl, abort)?,
        }
    }
    Ok(st.report(0))
}
