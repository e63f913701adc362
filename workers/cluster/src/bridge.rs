//! The NATS side of a cluster worker: an async-nats client on a one-thread tokio runtime in a
//! background thread, taking [`Command`]s from the worker loop through a bounded channel and
//! handing [`Event`]s back through a channel plus an eventfd the worker loop polls next to its
//! doorbell.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr};
use futures_util::StreamExt;
use shm_ring::EventFd;
use tokio::sync::mpsc as tmpsc;
use tokio::task::JoinHandle;

use crate::counters::{state, Counters};
use crate::id::Subjects;
use crate::replies::Token;
use crate::settings::{Auth, Settings};

/// Commands queued by the worker loop before it answers a publisher with an error: past it
/// NATS is not keeping up.
pub const QUEUE: usize = 8192;
/// How long a direct push waits for the target node's answer.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a `who` query collects answers: the bound of presence's eventual consistency
/// for nodes that died (they stop answering).
pub const GATHER: Duration = Duration::from_millis(300);
/// NATS events waiting for the worker loop: past it (the worker is behind, say blocked on a
/// full reply ring) messages from NATS are dropped and counted as errors, so memory stays
/// bounded (at-most-once). Answers to our own pushes and queries are never dropped.
pub const INBOUND: usize = 65536;
/// Reconnect backoff: 50 ms, doubling, at most this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the worker loop asks of NATS.
#[derive(Debug)]
pub enum Command {
    /// Local subscribers appeared for a topic: subscribe to its messages and `who` queries.
    Subscribe(Vec<u8>),
    /// The last local subscriber of a topic left.
    Unsubscribe(Vec<u8>),
    /// A local connection watches a topic's presence events (first watcher).
    Watch(Vec<u8>),
    /// The last local watcher of a topic's presence events left.
    Unwatch(Vec<u8>),
    /// Publish a message on a topic.
    Publish { topic: Vec<u8>, payload: Vec<u8> },
    /// Publish a presence event (`join TOPIC ID` / `leave TOPIC ID`).
    Presence { topic: Vec<u8>, event: Vec<u8> },
    /// Send `payload` to the push subject of `(node, worker)` and report the answer.
    Push {
        token: Token,
        node: String,
        worker: usize,
        payload: Vec<u8>,
    },
    /// Ask every node for the members of a topic.
    Who { token: Token, topic: Vec<u8> },
    /// Answer a request (a push or a `who` query from another node).
    Respond { subject: String, payload: Vec<u8> },
}

/// How a direct push ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// The target worker pushed it.
    Delivered,
    /// The target worker does not hold that connection (closed, or never there).
    Gone,
    /// No worker answers for that node and worker (unknown node, node down).
    Unknown,
    /// No answer within [`PUSH_TIMEOUT`].
    TimedOut,
    /// NATS is unreachable or refused.
    Failed(String),
}

/// What NATS hands the worker loop.
#[derive(Debug)]
pub enum Event {
    /// A message published on a topic this worker subscribed to.
    Topic { topic: Vec<u8>, payload: Vec<u8> },
    /// A direct push for one of this worker's connections; answer on `reply` (if any).
    PushIn {
        payload: Vec<u8>,
        reply: Option<String>,
    },
    /// A `who` query for a topic this worker has subscribers of.
    WhoAsk { topic: Vec<u8>, reply: String },
    /// A presence event of a watched topic.
    Presence { topic: Vec<u8>, event: Vec<u8> },
    /// A push of ours ended.
    PushDone { token: Token, outcome: PushOutcome },
    /// A `who` of ours ended: the members other workers named (or `None` if NATS failed).
    WhoDone {
        token: Token,
        members: Option<Vec<String>>,
    },
}

/// The worker loop's end of the bridge.
pub struct Bridge {
    /// Commands to the NATS thread (`try_send`: the worker loop never blocks on NATS).
    pub commands: tmpsc::Sender<Command>,
    /// Events from the NATS thread.
    pub events: mpsc::Receiver<Event>,
    /// Rung after every event: poll it next to the worker's doorbell.
    pub bell: Arc<EventFd>,
    /// Shared counters.
    pub counters: Arc<Counters>,
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// A NATS URL does not parse.
    #[error("NATS URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// The credentials file could not be read.
    #[error("NATS credentials file: {0}")]
    Credentials(std::io::Error),
    /// The eventfd, the runtime or the thread could not be made.
    #[error("starting the NATS thread: {0}")]
    Io(#[from] std::io::Error),
}

impl Bridge {
    /// Starts the NATS thread for worker `worker` of node `settings.node`. It connects in the
    /// background (a NATS down at start is like a NATS lost later: reconnect with backoff).
    ///
    /// # Errors
    ///
    /// [`BridgeError`].
    pub fn start(settings: &Settings, worker: usize) -> Result<Bridge, BridgeError> {
        let addrs = settings
            .urls
            .iter()
            .map(|u| {
                u.parse::<ServerAddr>().map_err(|e| BridgeError::Url {
                    url: u.clone(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let counters = Arc::new(Counters::default());
        let bell = Arc::new(EventFd::new()?);
        let (cmd_tx, cmd_rx) = tmpsc::channel(QUEUE);
        let (ev_tx, ev_rx) = mpsc::sync_channel(INBOUND);
        let opts = rt.block_on(options(settings, worker, counters.clone()))?;
        let nats = Nats {
            subjects: Subjects::new(&settings.prefix),
            node: settings.node.clone(),
            worker,
            events: ev_tx,
            bell: bell.clone(),
            counters: counters.clone(),
            topics: HashMap::new(),
            watches: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("nats".into())
            .spawn(move || rt.block_on(nats.run(addrs, opts, cmd_rx)))?;
        Ok(Bridge {
            commands: cmd_tx,
            events: ev_rx,
            bell,
            counters,
        })
    }
}

async fn options(
    settings: &Settings,
    worker: usize,
    counters: Arc<Counters>,
) -> Result<ConnectOptions, BridgeError> {
    let opts = match &settings.auth {
        Auth::None => ConnectOptions::new(),
        Auth::CredsFile(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(BridgeError::Credentials)?,
        Auth::UserPassword { user, password } => {
            ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        Auth::Token(t) => ConnectOptions::with_token(t.clone()),
    };
    let seen_connect = Arc::new(std::sync::atomic::AtomicBool::new(false));
    Ok(opts
        .name(format!("shmrelay {} worker {worker}", settings.node))
        // A worker delivers its own publishes itself: NATS must not hand them back.
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            let ms = 50u64.saturating_mul(1 << attempts.min(16));
            Duration::from_millis(ms).min(MAX_BACKOFF)
        })
        .event_callback(move |event| {
            let counters = counters.clone();
            let seen = seen_connect.clone();
            async move {
                use std::sync::atomic::Ordering::Relaxed;
                match event {
                    async_nats::Event::Connected => {
                        if seen.swap(true, Relaxed) {
                            Counters::bump(&counters.reconnects);
                        }
                        counters.state.store(state::CONNECTED, Relaxed);
                    }
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        counters.state.store(state::DISCONNECTED, Relaxed)
                    }
                    _ => {}
                }
            }
        }))
}

/// The NATS thread's state.
struct Nats {
    subjects: Subjects,
    node: String,
    worker: usize,
    events: mpsc::SyncSender<Event>,
    bell: Arc<EventFd>,
    counters: Arc<Counters>,
    /// Per topic with local subscribers: the tasks reading its message and `who` subjects.
    topics: HashMap<Vec<u8>, [JoinHandle<()>; 2]>,
    /// Per watched topic: the task reading its presence subject.
    watches: HashMap<Vec<u8>, JoinHandle<()>>,
}

impl Nats {
    async fn run(
        mut self,
        addrs: Vec<ServerAddr>,
        opts: ConnectOptions,
        mut commands: tmpsc::Receiver<Command>,
    ) {
        // With retry_on_initial_connect this returns at once and connects in the background.
        let client = match opts.connect(addrs).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cluster-worker: NATS client: {e}");
                return;
            }
        };
        let push = self.subjects.push(&self.node, self.worker);
        self.spawn_reader(&client, push, |m| Event::PushIn {
            payload: m.payload.to_vec(),
            reply: m.reply.map(|r| r.to_string()),
        })
        .await;
        while let Some(cmd) = commands.recv().await {
            self.handle(&client, cmd).await;
        }
    }

    async fn handle(&mut self, client: &Client, cmd: Command) {
        match cmd {
            Command::Subscribe(topic) => {
                if self.topics.contains_key(&topic) {
                    return;
                }
                let t = topic.clone();
                let msgs = self
                    .spawn_reader(client, self.subjects.topic(&topic), move |m| Event::Topic {
                        topic: t.clone(),
                        payload: m.payload.to_vec(),
                    })
                    .await;
                let t = topic.clone();
                let who = self
                    .spawn_reader(client, self.subjects.who(&topic), move |m| Event::WhoAsk {
                        topic: t.clone(),
                        reply: m.reply.map(|r| r.to_string()).unwrap_or_default(),
                    })
                    .await;
                self.topics.insert(topic, [msgs, who]);
            }
            Command::Unsubscribe(topic) => {
                if let Some(tasks) = self.topics.remove(&topic) {
                    for t in tasks {
                        self.stop_reader(t);
                    }
                }
            }
            Command::Watch(topic) => {
                if self.watches.contains_key(&topic) {
                    return;
                }
                let t = topic.clone();
                let task = self
                    .spawn_reader(client, self.subjects.presence(&topic), move |m| {
                        Event::Presence {
                            topic: t.clone(),
                            event: m.payload.to_vec(),
                        }
                    })
                    .await;
                self.watches.insert(topic, task);
            }
            Command::Unwatch(topic) => {
                if let Some(t) = self.watches.remove(&topic) {
                    self.stop_reader(t);
                }
            }
            Command::Publish { topic, payload } => {
                self.publish(client, self.subjects.topic(&topic), payload)
                    .await
            }
            Command::Presence { topic, event } => {
                self.publish(client, self.subjects.presence(&topic), event)
                    .await
            }
            Command::Respond { subject, payload } => {
                if !subject.is_empty() {
                    self.publish(client, subject, payload).await
                }
            }
            Command::Push {
                token,
                node,
                worker,
                payload,
            } => {
                Counters::bump(&self.counters.messages_out);
                let subject = self.subjects.push(&node, worker);
                let (client, tx, bell) = (client.clone(), self.events.clone(), self.bell.clone());
                tokio::spawn(async move {
                    let outcome = push(&client, subject, payload).await;
                    complete(&tx, &bell, Event::PushDone { token, outcome }).await;
                });
            }
            Command::Who { token, topic } => {
                Counters::bump(&self.counters.messages_out);
                let subject = self.subjects.who(&topic);
                let (client, tx, bell) = (client.clone(), self.events.clone(), self.bell.clone());
                let counters = self.counters.clone();
                tokio::spawn(async move {
                    let members = gather(&client, subject, &counters).await;
                    complete(&tx, &bell, Event::WhoDone { token, members }).await;
                });
            }
        }
    }

    async fn publish(&self, client: &Client, subject: String, payload: Vec<u8>) {
        match client.publish(subject, payload.into()).await {
            Ok(()) => Counters::bump(&self.counters.messages_out),
            Err(_) => Counters::bump(&self.counters.errors),
        }
    }

    /// Subscribes to `subject` and spawns a task turning each message into an event.
    async fn spawn_reader(
        &self,
        client: &Client,
        subject: String,
        to_event: impl Fn(async_nats::Message) -> Event + Send + 'static,
    ) -> JoinHandle<()> {
        let sub = match client.subscribe(subject).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cluster-worker: NATS subscribe: {e}");
                Counters::bump(&self.counters.errors);
                return tokio::spawn(async {});
            }
        };
        Counters::bump(&self.counters.subjects);
        let (tx, bell, counters) = (
            self.events.clone(),
            self.bell.clone(),
            self.counters.clone(),
        );
        tokio::spawn(async move {
            let mut sub = sub;
            while let Some(m) = sub.next().await {
                Counters::bump(&counters.messages_in);
                match tx.try_send(to_event(m)) {
                    Ok(()) => bell.notify(),
                    Err(mpsc::TrySendError::Full(_)) => Counters::bump(&counters.errors),
                    Err(mpsc::TrySendError::Disconnected(_)) => break, // the worker loop is gone
                }
            }
        })
    }

    /// Ends a reader: dropping its subscriber unsubscribes.
    fn stop_reader(&self, task: JoinHandle<()>) {
        task.abort();
        self.counters
            .subjects
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Hands the worker loop the end of one of its round trips, waiting (without blocking the
/// runtime) while the channel is full: a client waits for this answer.
async fn complete(tx: &mpsc::SyncSender<Event>, bell: &EventFd, mut event: Event) {
    loop {
        match tx.try_send(event) {
            Ok(()) => break,
            Err(mpsc::TrySendError::Full(e)) => {
                event = e;
                bell.notify();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return,
        }
    }
    bell.notify();
}

async fn push(client: &Client, subject: String, payload: Vec<u8>) -> PushOutcome {
    use async_nats::client::RequestErrorKind;
    let req = tokio::time::timeout(PUSH_TIMEOUT, client.request(subject, payload.into()));
    match req.await {
        Err(_) => PushOutcome::TimedOut,
        Ok(Ok(m)) if &m.payload[..] == b"ok" => PushOutcome::Delivered,
        Ok(Ok(_)) => PushOutcome::Gone,
        Ok(Err(e)) => match e.kind() {
            RequestErrorKind::NoResponders => PushOutcome::Unknown,
            RequestErrorKind::TimedOut => PushOutcome::TimedOut,
            _ => PushOutcome::Failed(e.to_string()),
        },
    }
}

/// Publishes a `who` query and collects every answer for [`GATHER`].
async fn gather(client: &Client, subject: String, counters: &Counters) -> Option<Vec<String>> {
    // A query while disconnected would wait for the reconnect: the asker gets an error now.
    if client.connection_state() != async_nats::connection::State::Connected {
        return None;
    }
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.ok()?;
    client
        .publish_with_reply(subject, inbox, Vec::new().into())
        .await
        .ok()?;
    tokio::time::timeout(GATHER, client.flush())
        .await
        .ok()?
        .ok()?;
    let mut members = Vec::new();
    let deadline = tokio::time::Instant::now() + GATHER;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
        Counters::bump(&counters.messages_in);
        let text = String::from_utf8_lossy(&m.payload);
        members.extend(text.split(' ').filter(|s| !s.is_empty()).map(str::to_owned));
    }
    Some(members)
}
