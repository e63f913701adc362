//! The cluster pub/sub logic of one worker: its clients' commands, its local subscribers,
//! and what arrives from the other workers and nodes over NATS.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use shmrelay_worker::{CloseReason, ConnId, Handler, Out};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use crate::bridge::{Command, Event, PushOutcome};
use crate::counters::Counters;
use crate::id::ClusterId;
use crate::replies::{ReplyOrder, Token};

/// What a round trip to NATS was for.
enum Pending {
    Push { conn: ConnId, target: String },
    Who { conn: ConnId, local: Vec<String> },
}

/// The cluster pub/sub worker's state. Text commands (one per frame):
///
/// - `sub TOPIC` / `unsub TOPIC`: answered `ok`.
/// - `pub TOPIC MESSAGE`: pushes `TOPIC MESSAGE` to every subscriber of TOPIC on every worker
///   of every node; answered `ok N`, N the subscribers reached on this worker, or
///   `err cluster unavailable (N delivered on this worker)` when NATS cannot take it.
/// - `whoami`: answered `id NODE/WORKER/CONN`, this connection's cluster-wide id.
/// - `push ID MESSAGE`: pushes MESSAGE to that connection, on whichever node holds it;
///   answered `ok`, or `err gone ID`, `err unknown ID`, `err timeout ID`, `err cluster ...`.
/// - `who TOPIC`: answered `members ID...` (sorted), the subscribers of TOPIC on every node.
/// - `presence TOPIC` / `unpresence TOPIC`: this connection gets (or stops getting)
///   `join TOPIC ID` and `leave TOPIC ID` pushes for the topic's subscribers on every node.
///
/// Anything else is answered `err unknown command`.
pub struct Node {
    node: String,
    worker: usize,
    topics: HashMap<Vec<u8>, HashSet<ConnId>>,
    watchers: HashMap<Vec<u8>, HashSet<ConnId>>,
    open: HashSet<ConnId>,
    replies: ReplyOrder,
    pending: HashMap<Token, Pending>,
    next_token: Token,
    commands: Sender<Command>,
    counters: Arc<Counters>,
}

impl Node {
    /// The logic of worker `worker` of node `node`, talking to NATS through `commands`.
    pub fn new(
        node: &str,
        worker: usize,
        commands: Sender<Command>,
        counters: Arc<Counters>,
    ) -> Node {
        Node {
            node: node.to_owned(),
            worker,
            topics: HashMap::new(),
            watchers: HashMap::new(),
            open: HashSet::new(),
            replies: ReplyOrder::default(),
            pending: HashMap::new(),
            next_token: 0,
            commands,
            counters,
        }
    }

    /// The cluster-wide id of a connection of this worker.
    pub fn id(&self, conn: ConnId) -> ClusterId {
        ClusterId {
            node: self.node.clone(),
            worker: self.worker,
            conn,
        }
    }

    /// Handles one event from NATS.
    pub fn on_event(&mut self, event: Event, out: &mut Out<'_>) {
        match event {
            Event::Topic { topic, payload } => {
                self.deliver(&topic, &payload, out);
            }
            Event::Presence { topic, event } => {
                for &w in self.watchers.get(&topic).into_iter().flatten() {
                    let _ = out.send(w, &event);
                }
            }
            Event::PushIn { payload, reply } => {
                let answer = self.push_in(&payload, out);
                if let Some(subject) = reply {
                    self.control(Command::Respond {
                        subject,
                        payload: answer.to_vec(),
                    });
                }
            }
            Event::WhoAsk { topic, reply } => {
                let members = self.members(&topic).join(" ");
                self.control(Command::Respond {
                    subject: reply,
                    payload: members.into_bytes(),
                });
            }
            Event::PushDone { token, outcome } => {
                let Some(Pending::Push { conn, target }) = self.pending.remove(&token) else {
                    return;
                };
                let text = match outcome {
                    PushOutcome::Delivered => "ok".to_owned(),
                    PushOutcome::Gone => format!("err gone {target}"),
                    PushOutcome::Unknown => format!("err unknown {target}"),
                    PushOutcome::TimedOut => format!("err timeout {target}"),
                    PushOutcome::Failed(e) => format!("err cluster {e}"),
                };
                if text != "ok" {
                    Counters::bump(&self.counters.errors);
                }
                self.resolve(conn, token, text.into_bytes(), out);
            }
            Event::WhoDone { token, members } => {
                let Some(Pending::Who { conn, mut local }) = self.pending.remove(&token) else {
                    return;
                };
                let text = match members {
                    Some(remote) => {
                        local.extend(remote);
                        local.sort();
                        local.dedup();
                        let mut t = "members".to_owned();
                        for m in local {
                            t.push(' ');
                            t.push_str(&m);
                        }
                        t
                    }
                    None => {
                        Counters::bump(&self.counters.errors);
                        "err cluster unavailable".to_owned()
                    }
                };
                self.resolve(conn, token, text.into_bytes(), out);
            }
        }
    }

    /// Before stopping: tells the cluster this worker's subscribers leave (best effort: a
    /// worker that is killed says nothing, and `who` stops naming them at once).
    pub fn leave_all(&mut self) {
        let subs: Vec<(Vec<u8>, ConnId)> = self
            .topics
            .iter()
            .flat_map(|(t, s)| s.iter().map(move |c| (t.clone(), *c)))
            .collect();
        for (topic, conn) in subs {
            self.announce(&topic, conn, "leave");
        }
    }

    fn deliver(&self, topic: &[u8], msg: &[u8], out: &mut Out<'_>) -> usize {
        let Some(subs) = self.topics.get(topic) else {
            return 0;
        };
        let mut push = Vec::with_capacity(topic.len() + 1 + msg.len());
        push.extend_from_slice(topic);
        push.push(b' ');
        push.extend_from_slice(msg);
        subs.iter().filter(|&&s| out.send(s, &push).is_ok()).count()
    }

    fn members(&self, topic: &[u8]) -> Vec<String> {
        self.topics
            .get(topic)
            .into_iter()
            .flatten()
            .map(|&c| self.id(c).to_string())
            .collect()
    }

    /// A push from another worker: `ID MESSAGE`, for one of this worker's connections.
    fn push_in(&mut self, payload: &[u8], out: &mut Out<'_>) -> &'static [u8] {
        let mut parts = payload.splitn(2, |&b| b == b' ');
        let (Some(id), msg) = (parts.next(), parts.next().unwrap_or_default()) else {
            return b"gone";
        };
        let Some(id) = std::str::from_utf8(id)
            .ok()
            .and_then(|s| s.parse::<ClusterId>().ok())
        else {
            return b"gone";
        };
        let mine = id.node == self.node && id.worker == self.worker;
        if mine && self.open.contains(&id.conn) && out.send(id.conn, msg).is_ok() {
            b"ok"
        } else {
            b"gone"
        }
    }

    /// Sends a command the bridge must not miss (subscriptions, answers): waits for room.
    fn control(&self, cmd: Command) {
        if self.commands.blocking_send(cmd).is_err() {
            Counters::bump(&self.counters.errors); // the NATS thread is gone
        }
    }

    /// Queues a data command; false (counted) when NATS is down or not keeping up.
    fn data(&self, cmd: Command) -> bool {
        if !self.counters.connected() {
            Counters::bump(&self.counters.errors);
            return false;
        }
        match self.commands.try_send(cmd) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Closed(_)) => {
                Counters::bump(&self.counters.errors);
                false
            }
        }
    }

    /// `join TOPIC ID` / `leave TOPIC ID`.
    fn presence_event(&self, topic: &[u8], conn: ConnId, what: &str) -> Vec<u8> {
        let mut event = format!("{what} ").into_bytes();
        event.extend_from_slice(topic);
        event.push(b' ');
        event.extend_from_slice(self.id(conn).to_string().as_bytes());
        event
    }

    fn announce(&self, topic: &[u8], conn: ConnId, what: &str) {
        let event = self.presence_event(topic, conn, what);
        // Presence events are best effort; `who` is the reference.
        if self.counters.connected() {
            let _ = self.commands.try_send(Command::Presence {
                topic: topic.to_vec(),
                event,
            });
        }
    }

    fn announce_local(&self, topic: &[u8], conn: ConnId, what: &str, out: &mut Out<'_>) {
        let event = self.presence_event(topic, conn, what);
        for &w in self.watchers.get(topic).into_iter().flatten() {
            let _ = out.send(w, &event);
        }
    }

    fn subscribe(&mut self, conn: ConnId, topic: &[u8], out: &mut Out<'_>) {
        let subs = self.topics.entry(topic.to_vec()).or_default();
        let first = subs.is_empty();
        if !subs.insert(conn) {
            return;
        }
        if first {
            self.control(Command::Subscribe(topic.to_vec()));
        }
        self.announce(topic, conn, "join");
        self.announce_local(topic, conn, "join", out);
    }

    fn unsubscribe(&mut self, conn: ConnId, topic: &[u8], out: &mut Out<'_>) {
        let Some(subs) = self.topics.get_mut(topic) else {
            return;
        };
        if !subs.remove(&conn) {
            return;
        }
        if subs.is_empty() {
            self.topics.remove(topic);
            self.control(Command::Unsubscribe(topic.to_vec()));
        }
        self.announce(topic, conn, "leave");
        self.announce_local(topic, conn, "leave", out);
    }

    fn unwatch(&mut self, conn: ConnId, topic: &[u8]) {
        let Some(w) = self.watchers.get_mut(topic) else {
            return;
        };
        if w.remove(&conn) && w.is_empty() {
            self.watchers.remove(topic);
            self.control(Command::Unwatch(topic.to_vec()));
        }
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    fn reply(&mut self, conn: ConnId, bytes: Vec<u8>, out: &mut Out<'_>) {
        if let Some(b) = self.replies.reply(conn, bytes) {
            let _ = out.send(conn, &b);
        }
    }

    fn resolve(&mut self, conn: ConnId, token: Token, bytes: Vec<u8>, out: &mut Out<'_>) {
        for b in self.replies.resolve(conn, token, bytes) {
            let _ = out.send(conn, &b);
        }
    }

    fn command(&mut self, conn: ConnId, frame: &[u8], out: &mut Out<'_>) -> Option<Vec<u8>> {
        let mut parts = frame.splitn(3, |&b| b == b' ');
        let reply = match (parts.next(), parts.next(), parts.next()) {
            (Some(b"sub"), Some(topic), None) => {
                self.subscribe(conn, topic, out);
                b"ok".to_vec()
            }
            (Some(b"unsub"), Some(topic), None) => {
                self.unsubscribe(conn, topic, out);
                b"ok".to_vec()
            }
            (Some(b"pub"), Some(topic), Some(msg)) => {
                let n = self.deliver(topic, msg, out);
                let sent = self.data(Command::Publish {
                    topic: topic.to_vec(),
                    payload: msg.to_vec(),
                });
                if sent {
                    format!("ok {n}").into_bytes()
                } else {
                    format!("err cluster unavailable ({n} delivered on this worker)").into_bytes()
                }
            }
            (Some(b"whoami"), None, None) => format!("id {}", self.id(conn)).into_bytes(),
            (Some(b"push"), Some(id), Some(msg)) => return self.push(conn, id, msg, out),
            (Some(b"who"), Some(topic), None) => {
                let local = self.members(topic);
                let token = self.token();
                if !self.data(Command::Who {
                    token,
                    topic: topic.to_vec(),
                }) {
                    return Some(b"err cluster unavailable".to_vec());
                }
                self.pending.insert(token, Pending::Who { conn, local });
                self.replies.wait(conn, token);
                return None;
            }
            (Some(b"presence"), Some(topic), None) => {
                let w = self.watchers.entry(topic.to_vec()).or_default();
                let first = w.is_empty();
                w.insert(conn);
                if first {
                    self.control(Command::Watch(topic.to_vec()));
                }
                b"ok".to_vec()
            }
            (Some(b"unpresence"), Some(topic), None) => {
                self.unwatch(conn, topic);
                b"ok".to_vec()
            }
            _ => b"err unknown command".to_vec(),
        };
        Some(reply)
    }

    fn push(&mut self, conn: ConnId, id: &[u8], msg: &[u8], out: &mut Out<'_>) -> Option<Vec<u8>> {
        let text = String::from_utf8_lossy(id).into_owned();
        let Ok(target) = text.parse::<ClusterId>() else {
            return Some(format!("err bad id {text}").into_bytes());
        };
        if target.node == self.node && target.worker == self.worker {
            let ok = self.open.contains(&target.conn) && out.send(target.conn, msg).is_ok();
            return Some(if ok {
                b"ok".to_vec()
            } else {
                Counters::bump(&self.counters.errors);
                format!("err gone {target}").into_bytes()
            });
        }
        let mut payload = text.clone().into_bytes();
        payload.push(b' ');
        payload.extend_from_slice(msg);
        let token = self.token();
        let cmd = Command::Push {
            token,
            node: target.node,
            worker: target.worker,
            payload,
        };
        if !self.data(cmd) {
            return Some(format!("err cluster unavailable {text}").into_bytes());
        }
        self.pending
            .insert(token, Pending::Push { conn, target: text });
        self.replies.wait(conn, token);
        None
    }
}

impl Handler for Node {
    fn on_open(&mut self, conn: ConnId, _peer: &str, _out: &mut Out<'_>) {
        self.open.insert(conn);
    }

    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _redelivered: bool, out: &mut Out<'_>) {
        // A replacement worker never saw the OPEN of connections already there.
        self.open.insert(conn);
        if let Some(reply) = self.command(conn, frame, out) {
            self.reply(conn, reply, out);
        }
    }

    fn on_close(&mut self, conn: ConnId, _reason: CloseReason, out: &mut Out<'_>) {
        self.open.remove(&conn);
        self.replies.forget(conn);
        self.pending.retain(|_, p| match p {
            Pending::Push { conn: c, .. } | Pending::Who { conn: c, .. } => *c != conn,
        });
        for t in topics_of(&self.topics, conn) {
            self.unsubscribe(conn, &t, out);
        }
        for t in topics_of(&self.watchers, conn) {
            self.unwatch(conn, &t);
        }
    }
}

/// The topics whose set holds `conn`.
fn topics_of(map: &HashMap<Vec<u8>, HashSet<ConnId>>, conn: ConnId) -> Vec<Vec<u8>> {
    map.iter()
        .filter(|(_, s)| s.contains(&conn))
        .map(|(t, _)| t.clone())
        .collect()
}
