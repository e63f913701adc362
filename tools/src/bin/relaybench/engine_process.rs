//! The threads of one process of a load-engine run: each connects its share of the
//! connections, reports, waits for the go, runs its connections (a [`Workload`]'s tasks, or a
//! [`Bench`]'s own loop) and hands its counts back; `run_process` drives them and measures the
//! window.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::rc::Rc;
use std::sync::mpsc;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot::{self, error::TryRecvError};
use tokio::sync::{Notify, Semaphore};

use super::{
    self_cpu_seconds, sleep_until, Bench, Plan, ProcReport, Start, Tally, Window, Workload,
};

/// Runs this process's share of the plan. `gate` is called once every connection attempt has
/// finished, with the connect counts, and returns when the run may start (a child process
/// reports to its parent and waits for the go there). `at_window` is called at the start and
/// at the end of the measurement window (the caller samples server CPU there).
pub(super) fn run_process<W: Bench>(
    plan: &Plan<W>,
    gate: impl FnOnce(&W::Tally) -> Result<()>,
    mut at_window: impl FnMut(bool),
) -> Result<ProcReport<W::Tally>> {
    let mut go_txs = Vec::new();
    let mut stop_txs = Vec::new();
    let threads = Threads::spawn(W::NAME, plan, |share| {
        let (go_tx, go_rx) = oneshot::channel::<Instant>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        go_txs.push(go_tx);
        stop_txs.push(stop_tx);
        let plan = plan.clone();
        let ctl = ThreadCtl {
            ids: share.ids,
            concurrency: share.concurrency,
            ready_tx: share.ready_tx,
            go_rx,
            stop_rx,
        };
        move || W::run_thread(&plan, ctl)
    })?;
    let mut connect = W::Tally::default();
    let failure = threads
        .wait_ready(|c| connect.add(&c))
        .and_then(|()| gate(&connect))
        .err();
    let mut report = ProcReport::<W::Tally>::default();
    if failure.is_none() {
        let start = Instant::now();
        for tx in go_txs.drain(..) {
            let _ = tx.send(start);
        }
        let w = Window::new(plan, start);
        sleep_until(w.measure_start);
        let cpu0 = self_cpu_seconds();
        at_window(true);
        sleep_until(w.measure_end);
        report.cpu_seconds = self_cpu_seconds() - cpu0;
        report.rss_kb = shmrelay::procfs::rss_kib(None).unwrap_or(0);
        at_window(false);
    }
    // Dropping a go sender without sending tells its thread to stop at once.
    drop(go_txs);
    for tx in stop_txs {
        let _ = tx.send(());
    }
    threads.join(failure, |t| report.tally.add(&t))?;
    Ok(report)
}

/// The OS threads of one process: thread `t` of `n` takes the process's connections
/// `t, t + n, ...` and its share of the connect concurrency, and reports its connect counts
/// (`C`) once its connection attempts are done; it ends with a `C` too.
struct Threads<C> {
    /// For thread names and messages: "load" or "hold".
    kind: &'static str,
    handles: Vec<std::thread::JoinHandle<Result<C>>>,
    ready_rx: mpsc::Receiver<C>,
}

/// What one thread of [`Threads`] is given.
struct ThreadShare<C> {
    /// Global indices of its connections.
    ids: Vec<usize>,
    /// Its connection attempts in flight at once.
    concurrency: usize,
    /// Where it sends its connect counts once every attempt is done.
    ready_tx: mpsc::Sender<C>,
}

impl<C: Send + 'static> Threads<C> {
    /// Starts `plan.threads` threads (no more than there are connections); `make` turns each
    /// thread's share into the function the thread runs.
    fn spawn<W, F>(
        kind: &'static str,
        plan: &Plan<W>,
        mut make: impl FnMut(ThreadShare<C>) -> F,
    ) -> Result<Self>
    where
        F: FnOnce() -> Result<C> + Send + 'static,
    {
        let ids = plan.conn_ids();
        let threads = plan.threads.clamp(1, ids.len().max(1));
        let concurrency = plan.connect_concurrency.div_ceil(threads).max(1);
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut handles = Vec::new();
        for t in 0..threads {
            let body = make(ThreadShare {
                ids: ids.iter().skip(t).step_by(threads).copied().collect(),
                concurrency,
                ready_tx: ready_tx.clone(),
            });
            let h = std::thread::Builder::new()
                .name(format!("{kind}-{t}"))
                .spawn(body)
                .with_context(|| format!("cannot start a {kind} thread"))?;
            handles.push(h);
        }
        Ok(Threads {
            kind,
            handles,
            ready_rx,
        })
    }

    /// Waits for every thread's connect counts, handing them to `each`; an error if a thread
    /// ended before it sent them.
    fn wait_ready(&self, mut each: impl FnMut(C) -> Result<()>) -> Result<()> {
        for _ in 0..self.handles.len() {
            match self.ready_rx.recv() {
                Ok(c) => each(c)?,
                Err(_) => bail!("a {} thread failed while connecting", self.kind),
            }
        }
        Ok(())
    }

    /// Waits for every thread to end and hands its result to `merge`. The error is `failure`
    /// (what went wrong before) if any, else the first error of a thread or of `merge`.
    fn join(
        self,
        mut failure: Option<anyhow::Error>,
        mut merge: impl FnMut(C) -> Result<()>,
    ) -> Result<()> {
        for h in self.handles {
            match h.join() {
                Ok(Ok(r)) => merge(r)?,
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => failure = failure.or(Some(anyhow!("a {} thread panicked", self.kind))),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// What the body of one thread is given: its share of the connections and its line to the
/// process's coordinator.
pub(crate) struct ThreadCtl<C> {
    /// Global indices of its connections.
    pub ids: Vec<usize>,
    /// Its connection attempts in flight at once.
    pub concurrency: usize,
    ready_tx: mpsc::Sender<C>,
    go_rx: oneshot::Receiver<Instant>,
    stop_rx: oneshot::Receiver<()>,
}

impl<C> ThreadCtl<C> {
    /// Hands over the thread's connect counts: every attempt of the thread has finished.
    pub fn ready(&self, counts: C) {
        // The coordinator is gone only if it failed; the go that never comes says so.
        let _ = self.ready_tx.send(counts);
    }

    /// Whether the run has started, without waiting: `Ready(Some(t))` started at `t`,
    /// `Ready(None)` never will (something failed elsewhere: stop at once), `Pending` not yet.
    pub fn poll_go(&mut self) -> Poll<Option<Instant>> {
        match self.go_rx.try_recv() {
            Ok(t) => Poll::Ready(Some(t)),
            Err(TryRecvError::Closed) => Poll::Ready(None),
            Err(TryRecvError::Empty) => Poll::Pending,
        }
    }

    /// True once the thread is to cut its connections and end (the window is over, or the
    /// coordinator gave up).
    pub fn should_stop(&mut self) -> bool {
        !matches!(self.stop_rx.try_recv(), Err(TryRecvError::Empty))
    }
}

/// Connection attempts of a thread not finished yet, and the wakeup for when they are.
struct Attempts {
    left: Cell<usize>,
    done: Notify,
}

impl Attempts {
    fn finished_one(&self) {
        let left = self.left.get() - 1;
        self.left.set(left);
        if left == 0 {
            self.done.notify_one();
        }
    }
}

/// The body of a [`Workload`]'s thread: a tokio current-thread runtime with one task per
/// connection.
pub(super) fn thread_main<W: Workload>(
    plan: &Plan<W>,
    ctl: ThreadCtl<W::Tally>,
) -> Result<W::Tally> {
    let ThreadCtl {
        ids,
        concurrency,
        ready_tx,
        go_rx,
        stop_rx,
    } = ctl;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    let th = Rc::new(W::thread(plan));
    let start = Rc::new(Start::default());
    let attempts = Rc::new(Attempts {
        left: Cell::new(ids.len()),
        done: Notify::new(),
    });
    rt.block_on(local.run_until(async {
        let connector = Rc::new(Connector::new(plan, concurrency));
        let tasks: Vec<_> = ids
            .iter()
            .map(|&id| {
                let task = conn_task::<W>(
                    id,
                    connector.clone(),
                    attempts.clone(),
                    th.clone(),
                    start.clone(),
                );
                tokio::task::spawn_local(task)
            })
            .collect();
        if !ids.is_empty() {
            attempts.done.notified().await;
        }
        let _ = ready_tx.send(W::tally(&th).borrow().clone());
        let started = match go_rx.await {
            Ok(t0) => {
                start.set(Window::new(plan, t0));
                true
            }
            // No go: something failed elsewhere; stop at once.
            Err(_) => false,
        };
        if started && W::ENDS_ITSELF {
            for t in tasks {
                let _ = t.await;
            }
        } else {
            if started {
                let _ = stop_rx.await;
            }
            W::at_end(&th);
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }));
    let tally = W::tally(&th).take();
    Ok(tally)
}

/// One connection: open it, count it, then hand it to the workload.
async fn conn_task<W: Workload>(
    id: usize,
    connector: Rc<Connector>,
    attempts: Rc<Attempts>,
    th: Rc<W::Thread>,
    start: Rc<Start>,
) {
    // Boxed so that the connect machinery is freed once open instead of sizing the task.
    let opened = Box::pin(async move { connector.connect(id).await }).await;
    match opened {
        Ok(stream) => {
            W::tally(&th).borrow_mut().base_mut().connected += 1;
            attempts.finished_one();
            W::conn(th, start, id, stream).await;
        }
        Err(e) => {
            let mut t = W::tally(&th).borrow_mut();
            let base = t.base_mut();
            base.connect_errors += 1;
            base.note_error(|| format!("{e:#}"));
            drop(t);
            attempts.finished_one();
        }
    }
}

/// The connect phase of one thread: its limits, shared by its connection attempts.
struct Connector {
    addr: SocketAddr,
    /// Source addresses, used round robin by global connection index (empty: any).
    src_ips: Vec<IpAddr>,
    /// Attempts in flight at once.
    sem: Semaphore,
    /// End of the connect phase (`--ramp-limit` after the connector was made).
    ramp_end: tokio::time::Instant,
    /// Time one attempt may take (`--connect-timeout`).
    per_connect: Duration,
}

impl Connector {
    /// Starts the connect phase: `concurrency` attempts at a time, all done within
    /// `plan.ramp_limit` from now.
    fn new<W>(plan: &Plan<W>, concurrency: usize) -> Connector {
        Connector {
            addr: plan.addr,
            src_ips: plan.src_ips.clone(),
            sem: Semaphore::new(concurrency),
            ramp_end: tokio::time::Instant::now() + Duration::from_secs_f64(plan.ramp_limit),
            per_connect: Duration::from_secs_f64(plan.connect_timeout),
        }
    }

    /// Opens connection `id` (global index) once an attempt slot is free, from its source
    /// address if there are any.
    async fn connect(&self, id: usize) -> Result<TcpStream> {
        let addr = self.addr;
        let src = (!self.src_ips.is_empty()).then(|| self.src_ips[id % self.src_ips.len()]);
        let attempt = async {
            let _permit = self.sem.acquire().await.map_err(|e| anyhow!("{e}"))?;
            let deadline = (tokio::time::Instant::now() + self.per_connect).min(self.ramp_end);
            match tokio::time::timeout_at(deadline, connect_one(addr, src)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!("connect to {addr} timed out")),
            }
        };
        match tokio::time::timeout_at(self.ramp_end, attempt).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("connection not open within --ramp-limit")),
        }
    }
}

async fn connect_one(addr: SocketAddr, src: Option<IpAddr>) -> Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create a socket")?;
    if let Some(ip) = src {
        set_bind_address_no_port(&sock);
        sock.bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("cannot bind source address {ip}"))?;
    }
    let stream = sock.connect(addr).await.with_context(|| match src {
        Some(ip) => format!("connect {ip} -> {addr}"),
        None => format!("connect {addr}"),
    })?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Without IP_BIND_ADDRESS_NO_PORT, bind(ip, 0) reserves an ephemeral port for every
/// destination, capping a source address at ~28K connections in total instead of per
/// destination; with it the port is chosen at connect time from the whole 4-tuple.
pub(crate) fn set_bind_address_no_port(sock: &impl AsFd) {
    use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
    // Best effort: without it a source address only holds fewer connections.
    let _ = setsockopt(sock, IpBindAddressNoPort, &true);
}
