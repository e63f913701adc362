//! The example workers' logic, shared by their binaries and by `shmrelay`'s built-in default
//! worker.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::{CloseReason, ConnId, Handler, Out};

/// Sends every frame back to its sender.
#[derive(Default)]
pub struct Echo;

impl Handler for Echo {
    #[inline]
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _redelivered: bool, out: &mut Out<'_>) {
        // A failed send means the worker is stopping or the front broke the ring; the
        // request stays unreleased and is redelivered to the replacement.
        let _ = out.send(conn, frame);
    }
}

/// Topic pub/sub over text frames:
///
/// - `sub TOPIC`: subscribe this connection; answered `ok`.
/// - `unsub TOPIC`: answered `ok`.
/// - `pub TOPIC MESSAGE`: pushes `TOPIC MESSAGE` to every subscriber of TOPIC (on any front,
///   including the sender if subscribed); the sender gets `ok N`, N the subscribers reached.
/// - anything else: answered `err unknown command`.
///
/// One pub/sub worker sees only the connections routed to it, so run one worker
/// (`--workers 1`) for a single topic space, or `cluster-worker` (crate `shmrelay-cluster`),
/// the same commands over NATS, for a pool or several hosts.
#[derive(Default)]
pub struct PubSub {
    topics: HashMap<Vec<u8>, HashSet<ConnId>>,
}

impl Handler for PubSub {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _redelivered: bool, out: &mut Out<'_>) {
        let mut parts = frame.splitn(3, |&b| b == b' ');
        let reply = match (parts.next(), parts.next(), parts.next()) {
            (Some(b"sub"), Some(topic), None) => {
                self.topics.entry(topic.to_vec()).or_default().insert(conn);
                b"ok".to_vec()
            }
            (Some(b"unsub"), Some(topic), None) => {
                if let Some(s) = self.topics.get_mut(topic) {
                    s.remove(&conn);
                }
                b"ok".to_vec()
            }
            (Some(b"pub"), Some(topic), Some(msg)) => {
                let mut n = 0;
                if let Some(subs) = self.topics.get(topic) {
                    let mut push = topic.to_vec();
                    push.push(b' ');
                    push.extend_from_slice(msg);
                    for &sub in subs {
                        if out.send(sub, &push).is_ok() {
                            n += 1;
                        }
                    }
                }
                format!("ok {n}").into_bytes()
            }
            _ => b"err unknown command".to_vec(),
        };
        let _ = out.send(conn, &reply);
    }

    fn on_close(&mut self, conn: ConnId, _reason: CloseReason, _out: &mut Out<'_>) {
        self.topics.retain(|_, subs| {
            subs.remove(&conn);
            !subs.is_empty()
        });
    }
}

/// Echo that also keeps a journal of connection events, for tests and for watching what a
/// worker is told: the frame `journal?` is answered with the last events, one per line
/// (`open CONN PEER`, `close CONN REASON`; a websocket client's open also has
/// `path=... protocol=... authorization=... cookie=...`), instead of being echoed. The frame
/// `close! CODE REASON` closes the connection with that close code and reason (websocket);
/// `big! N` is answered with N bytes of `x` (a reply longer than a ring record).
#[derive(Default)]
pub struct Journal {
    events: VecDeque<String>,
}

impl Journal {
    const KEEP: usize = 1000;

    fn log(&mut self, e: String) {
        if self.events.len() == Self::KEEP {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }
}

impl Handler for Journal {
    fn on_open(&mut self, conn: ConnId, peer: &str, _out: &mut Out<'_>) {
        self.log(format!("open {conn} {peer}"));
    }

    fn on_upgrade(&mut self, conn: ConnId, peer: &str, u: &crate::Upgrade<'_>, _: &mut Out<'_>) {
        self.log(format!(
            "open {conn} {peer} path={} protocol={} authorization={} cookie={}",
            u.path, u.subprotocol, u.authorization, u.cookie
        ));
    }

    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _redelivered: bool, out: &mut Out<'_>) {
        if let Some(rest) = frame.strip_prefix(b"close! ") {
            let rest = String::from_utf8_lossy(rest);
            let (code, reason) = rest.split_once(' ').unwrap_or((&rest, ""));
            if out
                .close_with(conn, code.parse().unwrap_or(0), reason)
                .is_err()
            {
                let _ = out.send(conn, b"err bad close code");
            }
        } else if let Some(n) = frame.strip_prefix(b"big! ") {
            let n = std::str::from_utf8(n)
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let _ = out.send(conn, &vec![b'x'; n]);
        } else if frame == b"journal?" {
            let text = self
                .events
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join("\n");
            let _ = out.send(conn, text.as_bytes());
        } else {
            let _ = out.send(conn, frame);
        }
    }

    fn on_close(&mut self, conn: ConnId, reason: CloseReason, _out: &mut Out<'_>) {
        self.log(format!("close {conn} {reason}"));
    }
}
