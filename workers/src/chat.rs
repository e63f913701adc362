//! A chat worker for WebSocket clients (browsers, apps): rooms that connections join and
//! leave, messages broadcast to a room's members, and the last messages of each room, in
//! JSON text messages.
//!
//! # Protocol
//!
//! Each message from a client is one JSON object with a `type`:
//!
//! | client sends | the client gets | the room's other members get |
//! |---|---|---|
//! | `{"type":"join","room":"lobby","name":"ada"}` | `{"type":"joined","room":"lobby","name":"ada","members":["bob","ada"],"history":[MESSAGE...]}` | `{"type":"presence","room":"lobby","name":"ada","event":"join"}` |
//! | `{"type":"say","room":"lobby","text":"hi"}` | MESSAGE | MESSAGE |
//! | `{"type":"leave","room":"lobby"}` | `{"type":"left","room":"lobby"}` | `{"type":"presence","room":"lobby","name":"ada","event":"leave"}` |
//!
//! MESSAGE is `{"type":"message","room":"lobby","from":"ada","text":"hi","id":7}`: every
//! member, the sender too, gets it in the same order (`id` grows by one per message of this
//! worker), so a client shows its own message when the room has it, not before. `history`
//! holds the room's last [`ChatLimits::history`] messages, oldest first. The `name` given in
//! a join is the connection's name from then on (in every room it is in). A connection that
//! closes leaves all its rooms (presence `leave` to the others).
//!
//! A request that cannot be served gets `{"type":"error","code":CODE,"message":TEXT}` (and
//! `"room"` when one was named) and changes nothing: `bad_request` (not JSON, unknown type,
//! missing field), `bad_name` (a name or room empty, too long or with control characters),
//! `too_long` (text empty or over [`ChatLimits::max_text`] bytes), `not_joined` (say or leave
//! in a room the connection is not in: after a worker restart rooms are empty, and a client
//! that gets this joins again), `too_many_rooms` (per connection, or rooms of the worker).
//!
//! # Rooms and workers
//!
//! Rooms live in the worker's memory, so every member of a room must be served by the same
//! worker: run the chat worker alone on its listener (`workers = 1`; the `chat-worker` binary
//! refuses a larger pool). A restarted worker starts with no rooms and no history; clients
//! find out from `not_joined` and join again.
//!
//! # Bounds
//!
//! Everything a client can make the worker keep is bounded ([`ChatLimits`]): the length of
//! names, rooms and texts, the rooms per connection, the rooms of the worker and the history
//! of each. A room nobody is in keeps its history until the worker needs its place for a new
//! room (the empty room that was active longest ago goes first).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use crate::{CloseReason, ConnId, Handler, Out};

/// What the chat worker keeps at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatLimits {
    /// Messages kept per room and sent to a client that joins.
    pub history: usize,
    /// Rooms of the worker (with members or history).
    pub max_rooms: usize,
    /// Rooms one connection may be in at once.
    pub rooms_per_conn: usize,
    /// Bytes of a name or a room name.
    pub max_name: usize,
    /// Bytes of a message's text.
    pub max_text: usize,
}

impl Default for ChatLimits {
    /// 50 messages of history, 1,000 rooms, 16 rooms per connection, names of 64 bytes,
    /// texts of 4 KiB: at most about 200 MiB of history in the worst case.
    fn default() -> ChatLimits {
        ChatLimits {
            history: 50,
            max_rooms: 1000,
            rooms_per_conn: 16,
            max_name: 64,
            max_text: 4096,
        }
    }
}

/// A request from a client.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Request {
    Join { room: String, name: String },
    Say { room: String, text: String },
    Leave { room: String },
}

/// A message of a room, as broadcast and as kept in its history.
#[derive(Serialize)]
struct Message {
    #[serde(rename = "type")]
    kind: &'static str,
    room: Rc<str>,
    from: Rc<str>,
    text: String,
    id: u64,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Event<'a> {
    Joined {
        room: &'a str,
        name: &'a str,
        members: Vec<&'a str>,
        history: Vec<&'a Message>,
    },
    Left {
        room: &'a str,
    },
    Presence {
        room: &'a str,
        name: &'a str,
        event: &'static str,
    },
    Error {
        code: &'static str,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
    },
}

#[derive(Default)]
struct Room {
    /// Members in the order they joined.
    members: Vec<ConnId>,
    history: VecDeque<Rc<Message>>,
    /// [`Chat::clock`] when it was last joined, left or written to.
    active: u64,
}

struct Member {
    name: Rc<str>,
    rooms: Vec<Rc<str>>,
}

/// The chat worker's handler (see the module documentation for the protocol).
///
/// ```
/// use shmrelay_worker::chat::{Chat, ChatLimits};
/// let chat = Chat::new(ChatLimits { history: 10, ..ChatLimits::default() });
/// assert_eq!(chat.rooms(), 0);
/// ```
#[derive(Default)]
pub struct Chat {
    limits: ChatLimits,
    rooms: HashMap<Rc<str>, Room>,
    members: HashMap<ConnId, Member>,
    /// The id of the next message.
    next_id: u64,
    /// Counts requests, to order rooms by activity.
    clock: u64,
}

/// Why a request was refused: the `code` and `message` of the error reply.
struct Refusal(&'static str, String);

impl Chat {
    /// A chat with these limits.
    pub fn new(limits: ChatLimits) -> Chat {
        Chat {
            limits,
            ..Chat::default()
        }
    }

    /// Rooms the worker holds (with members or history).
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn check_name(&self, what: &str, s: &str) -> Result<(), Refusal> {
        if s.is_empty() || s.len() > self.limits.max_name || s.chars().any(char::is_control) {
            return Err(Refusal(
                "bad_name",
                format!(
                    "{what} must be 1 to {} bytes without control characters",
                    self.limits.max_name
                ),
            ));
        }
        Ok(())
    }

    fn join(
        &mut self,
        conn: ConnId,
        room: &str,
        name: &str,
        out: &mut Out<'_>,
    ) -> Result<(), Refusal> {
        self.check_name("room", room)?;
        self.check_name("name", name)?;
        let already = self
            .members
            .get(&conn)
            .is_some_and(|m| m.rooms.iter().any(|r| &**r == room));
        let in_rooms = self.members.get(&conn).map_or(0, |m| m.rooms.len());
        if !already && in_rooms >= self.limits.rooms_per_conn {
            return Err(Refusal(
                "too_many_rooms",
                format!(
                    "a connection may be in {} rooms at once",
                    self.limits.rooms_per_conn
                ),
            ));
        }
        if !self.rooms.contains_key(room) && !self.make_room_for_one() {
            return Err(Refusal(
                "too_many_rooms",
                format!(
                    "the worker holds {} rooms, all in use",
                    self.limits.max_rooms
                ),
            ));
        }
        let member = self.members.entry(conn).or_insert_with(|| Member {
            name: name.into(),
            rooms: Vec::new(),
        });
        if &*member.name != name {
            member.name = name.into();
        }
        let key: Rc<str> = match self.rooms.get_key_value(room) {
            Some((k, _)) => k.clone(),
            None => room.into(),
        };
        if !already {
            member.rooms.push(key.clone());
        }
        let r = self.rooms.entry(key.clone()).or_default();
        r.active = self.clock;
        if !already {
            r.members.push(conn);
        }
        let r = &self.rooms[&key];
        let names: Vec<&str> = r
            .members
            .iter()
            .filter_map(|c| self.members.get(c).map(|m| &*m.name))
            .collect();
        let joined = Event::Joined {
            room,
            name,
            members: names,
            history: r.history.iter().map(|m| &**m).collect(),
        };
        send(out, conn, &joined);
        if !already {
            let presence = Event::Presence {
                room,
                name,
                event: "join",
            };
            broadcast(out, &r.members, Some(conn), &presence);
        }
        Ok(())
    }

    /// True if one more room fits, after evicting the empty room active longest ago if the
    /// worker is full.
    fn make_room_for_one(&mut self) -> bool {
        if self.rooms.len() < self.limits.max_rooms {
            return true;
        }
        let oldest = self
            .rooms
            .iter()
            .filter(|(_, r)| r.members.is_empty())
            .min_by_key(|(_, r)| r.active)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => {
                self.rooms.remove(&k);
                true
            }
            None => false,
        }
    }

    fn say(
        &mut self,
        conn: ConnId,
        room: &str,
        text: String,
        out: &mut Out<'_>,
    ) -> Result<(), Refusal> {
        if text.is_empty() || text.len() > self.limits.max_text {
            return Err(Refusal(
                "too_long",
                format!("text must be 1 to {} bytes", self.limits.max_text),
            ));
        }
        let from = self.joined(conn, room)?;
        let Some((key, r)) = self.rooms.get_key_value(room) else {
            return Err(not_joined(room));
        };
        let msg = Rc::new(Message {
            kind: "message",
            room: key.clone(),
            from,
            text,
            id: self.next_id,
        });
        self.next_id += 1;
        broadcast(out, &r.members, None, &*msg);
        let r = self.rooms.get_mut(room).expect("room looked up above");
        r.active = self.clock;
        if self.limits.history > 0 {
            if r.history.len() == self.limits.history {
                r.history.pop_front();
            }
            r.history.push_back(msg);
        }
        Ok(())
    }

    /// The name of `conn` if it is in `room`.
    fn joined(&self, conn: ConnId, room: &str) -> Result<Rc<str>, Refusal> {
        match self.members.get(&conn) {
            Some(m) if m.rooms.iter().any(|r| &**r == room) => Ok(m.name.clone()),
            _ => Err(not_joined(room)),
        }
    }

    fn leave(&mut self, conn: ConnId, room: &str, out: &mut Out<'_>) -> Result<(), Refusal> {
        let name = self.joined(conn, room)?;
        if let Some(m) = self.members.get_mut(&conn) {
            m.rooms.retain(|r| &**r != room);
            if m.rooms.is_empty() {
                self.members.remove(&conn);
            }
        }
        self.remove_member(conn, room, &name, out);
        send(out, conn, &Event::Left { room });
        Ok(())
    }

    /// Takes `conn` out of `room`'s members and tells the others.
    fn remove_member(&mut self, conn: ConnId, room: &str, name: &str, out: &mut Out<'_>) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.members.retain(|&c| c != conn);
            r.active = self.clock;
            let presence = Event::Presence {
                room,
                name,
                event: "leave",
            };
            broadcast(out, &r.members, None, &presence);
            if r.members.is_empty() && r.history.is_empty() {
                self.rooms.remove(room);
            }
        }
    }
}

fn not_joined(room: &str) -> Refusal {
    Refusal("not_joined", format!("not in room {room:?}: join it first"))
}

/// Sends one event to one connection, as a text message (JSON is text; on a listener of
/// another codec the kind is simply not carried). A push to a connection that closed meanwhile is
/// dropped by the front; a failure for the connection being answered is answered by the SDK
/// (see [`Out::send`]), so nothing is left to do here.
fn send<T: Serialize + ?Sized>(out: &mut Out<'_>, conn: ConnId, event: &T) {
    if let Ok(json) = serde_json::to_string(event) {
        let _ = out.send_text(conn, &json);
    }
}

/// Sends one event to every member of a room but `except`, serialised once.
fn broadcast<T: Serialize + ?Sized>(
    out: &mut Out<'_>,
    members: &[ConnId],
    except: Option<ConnId>,
    event: &T,
) {
    let Ok(json) = serde_json::to_string(event) else {
        return;
    };
    for &m in members.iter().filter(|&&m| Some(m) != except) {
        let _ = out.send_text(m, &json);
    }
}

impl Handler for Chat {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _redelivered: bool, out: &mut Out<'_>) {
        self.clock += 1;
        let request = match serde_json::from_slice::<Request>(frame) {
            Ok(r) => r,
            Err(e) => {
                let message = format!("expected a JSON object with a known type: {e}");
                let error = Event::Error {
                    code: "bad_request",
                    message,
                    room: None,
                };
                return send(out, conn, &error);
            }
        };
        let (room, result) = match request {
            Request::Join { room, name } => {
                let r = self.join(conn, &room, &name, out);
                (room, r)
            }
            Request::Say { room, text } => {
                let r = self.say(conn, &room, text, out);
                (room, r)
            }
            Request::Leave { room } => {
                let r = self.leave(conn, &room, out);
                (room, r)
            }
        };
        if let Err(Refusal(code, message)) = result {
            let error = Event::Error {
                code,
                message,
                room: Some(&room),
            };
            send(out, conn, &error);
        }
    }

    fn on_close(&mut self, conn: ConnId, _reason: CloseReason, out: &mut Out<'_>) {
        self.clock += 1;
        if let Some(m) = self.members.remove(&conn) {
            for room in &m.rooms {
                self.remove_member(conn, room, &m.name, out);
            }
        }
    }
}

#[cfg(test)]
#[path = "chat_tests.rs"]
mod tests;
