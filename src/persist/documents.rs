//! What the persister makes of Kafka records: pure functions, no I/O.
//!
//! * [`read`] turns one record into a [`Parsed`] value or a [`RecordError`] (the
//!   record's dead-letter reason).
//! * `messages` documents are the messages themselves ([`Message::doc`]).
//! * `conversations` and `users` documents are **folds** of the records of one key, in
//!   partition order: [`Conversation::apply`] and [`User::apply`]. Each folded document
//!   remembers the Kafka position (partition, offset) of the last record it took per
//!   source topic, and a record at or before that position is skipped. So a batch that
//!   is replayed, in whole or in part, after a crash or a rebalance changes nothing
//!   twice: counts stay right without any transaction, on MongoDB and FerretDB alike.
//!   A conversation's records (key = conversation id) and a user's records (key =
//!   `{tenant}:{user}`) each stay in one partition, so offsets order them. If a topic's
//!   partition count is raised, keys move; a record from another partition than the
//!   stored one is then taken as new.

use mongodb::bson::{doc, Bson, Document};
use serde_json::Value;

/// Longest `lastMessage.preview`, in characters.
pub const PREVIEW_CHARS: usize = 120;

/// Why a record is not stored.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecordError {
    /// Not JSON.
    #[error("not JSON: {0}")]
    Json(String),
    /// Another schema version.
    #[error("unknown schema version {0}")]
    Version(String),
    /// A required field is missing or of the wrong type.
    #[error("missing or invalid field {0}")]
    Field(&'static str),
    /// An unknown record type.
    #[error("unknown record type {0:?}")]
    Type(String),
    /// A known record type on a topic that does not carry it.
    #[error("a {0} record does not belong on {1}")]
    Topic(&'static str, String),
}

/// Where a record sits in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl Pos {
    /// Whether a record at `self` comes after the last one a document took (`stored`).
    pub fn is_new(self, stored: Option<Pos>) -> bool {
        match stored {
            None => true,
            Some(s) => s.partition != self.partition || self.offset > s.offset,
        }
    }

    fn to_bson(self) -> Document {
        doc! { "p": self.partition, "o": self.offset }
    }

    fn from_bson(d: Option<&Document>) -> Option<Pos> {
        let d = d?;
        Some(Pos { partition: d.get_i32("p").ok()?, offset: d.get_i64("o").ok()? })
    }
}

/// One readable record.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A chat message (`messages.{tenant}`).
    Message(Message),
    /// A socket event (`events.socket`).
    Socket(SocketEvent),
    /// A presence change (`presence.changes`).
    Presence(PresenceChange),
}

/// A chat message record.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Its `messages` document.
    pub doc: Document,
    /// Tenant.
    pub tenant: String,
    /// Conversation id (`dm:…` or `room:…`).
    pub conversation: String,
    /// Message id.
    pub id: String,
    /// Sender.
    pub from: String,
    /// Recipient of a 1:1 message.
    pub to: Option<String>,
    /// Room of a room message.
    pub room: Option<String>,
    /// Milliseconds since the epoch.
    pub ts: i64,
    /// `lastMessage.preview`.
    pub preview: String,
}

/// A socket event record.
#[derive(Debug, Clone, PartialEq)]
pub struct SocketEvent {
    /// `connect`, `disconnect`, `join`, `leave`.
    pub kind: String,
    /// Tenant.
    pub tenant: String,
    /// User.
    pub user: String,
    /// Socket id.
    pub socket: String,
    /// Node that served it.
    pub server: String,
    /// Milliseconds since the epoch.
    pub ts: i64,
}

/// A presence change record.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceChange {
    /// Tenant.
    pub tenant: String,
    /// User.
    pub user: String,
    /// Online (first socket up) or offline (last socket down).
    pub online: bool,
    /// Milliseconds since the epoch.
    pub last_seen: i64,
}

/// Reads one record of any subscribed topic.
pub fn read(payload: &[u8]) -> Result<Parsed, RecordError> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| RecordError::Json(e.to_string()))?;
    match v.get("v").and_then(Value::as_u64) {
        Some(1) => {}
        other => return Err(RecordError::Version(format!("{other:?}"))),
    }
    let text = |f: &'static str| v.get(f).and_then(Value::as_str).ok_or(RecordError::Field(f));
    let ts = |f: &'static str| v.get(f).and_then(Value::as_i64).ok_or(RecordError::Field(f));
    match text("type")? {
        "message" => message(&v).map(Parsed::Message),
        kind @ ("connect" | "disconnect" | "join" | "leave") => Ok(Parsed::Socket(SocketEvent {
            kind: kind.to_string(),
            tenant: text("tenantId")?.to_string(),
            user: text("userId")?.to_string(),
            socket: text("socketId")?.to_string(),
            server: text("serverId")?.to_string(),
            ts: ts("ts")?,
        })),
        "presence" => Ok(Parsed::Presence(PresenceChange {
            tenant: text("tenantId")?.to_string(),
            user: text("userId")?.to_string(),
            online: match text("status")? {
                "online" => true,
                "offline" => false,
                _ => return Err(RecordError::Field("status")),
            },
            last_seen: ts("lastSeen")?,
        })),
        other => Err(RecordError::Type(other.to_string())),
    }
}

/// Reads one record of `topic`: as [`read`], and its type must be one that topic
/// carries (messages on `messages.*`, socket events and presence elsewhere).
pub fn read_on(topic: &str, payload: &[u8]) -> Result<Parsed, RecordError> {
    let p = read(payload)?;
    let kind = match &p {
        Parsed::Message(_) => "message",
        Parsed::Socket(_) => "socket event",
        Parsed::Presence(_) => "presence",
    };
    if matches!(p, Parsed::Message(_)) != topic.starts_with("messages.") {
        return Err(RecordError::Topic(kind, topic.to_string()));
    }
    Ok(p)
}

fn message(v: &Value) -> Result<Message, RecordError> {
    let text = |f: &'static str| v.get(f).and_then(Value::as_str).ok_or(RecordError::Field(f));
    let (id, tenant, conversation, from) =
        (text("id")?, text("tenantId")?, text("conversationId")?, text("from")?);
    let ts = v.get("ts").and_then(Value::as_i64).ok_or(RecordError::Field("ts"))?;
    let mut d =
        doc! { "_id": id, "tenantId": tenant, "conversationId": conversation, "from": from, "ts": ts };
    let (to, room) = match (v.get("to").and_then(Value::as_str), v.get("room").and_then(Value::as_str)) {
        (Some(to), None) => {
            d.insert("to", to);
            (Some(to.to_string()), None)
        }
        (None, Some(room)) => {
            d.insert("room", room);
            (None, Some(room.to_string()))
        }
        _ => return Err(RecordError::Field("to | room")),
    };
    let content = v.get("content").ok_or(RecordError::Field("content"))?;
    d.insert("content", Bson::try_from(content.clone()).map_err(|_| RecordError::Field("content"))?);
    for optional in ["clientMsgId", "attachments"] {
        if let Some(x) = v.get(optional) {
            d.insert(optional, Bson::try_from(x.clone()).map_err(|_| RecordError::Field(optional))?);
        }
    }
    Ok(Message {
        doc: d,
        tenant: tenant.to_string(),
        conversation: conversation.to_string(),
        id: id.to_string(),
        from: from.to_string(),
        to,
        room,
        ts,
        preview: preview(content),
    })
}

/// A short text for conversation lists: the content if it is a string, its `text` field
/// if it has one, its JSON otherwise; at most [`PREVIEW_CHARS`] characters.
pub fn preview(content: &Value) -> String {
    let s = match content {
        Value::String(s) => s.clone(),
        Value::Object(o) if o.get("text").is_some_and(Value::is_string) => {
            o["text"].as_str().unwrap_or("").to_string()
        }
        other => other.to_string(),
    };
    s.chars().take(PREVIEW_CHARS).collect()
}

/// An unambiguous string `_id` for a (tenant, key) pair: `{len(tenant)}:{tenant}:{key}`.
pub fn scoped_id(tenant: &str, key: &str) -> String {
    format!("{}:{tenant}:{key}", tenant.len())
}

/// A `conversations` document being folded. Fields the persister does not own are left
/// alone (it writes with `$set`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    /// `scoped_id(tenant, conversation)`.
    pub id: String,
    /// Revision the stored document had when read (0: none); the write is conditional on
    /// it, so two writers never interleave.
    pub rev: i64,
    /// Tenant.
    pub tenant: String,
    /// Conversation id.
    pub conversation: String,
    /// The two users of a 1:1 conversation, sorted.
    pub participants: Vec<String>,
    /// The room of a room conversation.
    pub room: Option<String>,
    /// `{id, from, preview, ts}` of the last message taken.
    pub last: Option<(String, String, String, i64)>,
    /// Messages taken.
    pub count: i64,
    /// `ts` of the first message taken.
    pub created: Option<i64>,
    /// Position of the last record taken.
    pub pos: Option<Pos>,
}

impl Conversation {
    /// A conversation not stored yet.
    pub fn new(tenant: &str, conversation: &str) -> Conversation {
        Conversation {
            id: scoped_id(tenant, conversation),
            tenant: tenant.to_string(),
            conversation: conversation.to_string(),
            ..Conversation::default()
        }
    }

    /// Takes message `m` at `pos` unless it was taken before; true if it changed.
    pub fn apply(&mut self, m: &Message, pos: Pos) -> bool {
        if !pos.is_new(self.pos) {
            return false;
        }
        self.pos = Some(pos);
        self.count += 1;
        self.created = Some(self.created.map_or(m.ts, |c| c.min(m.ts)));
        match (&m.to, &m.room) {
            (Some(to), _) => {
                let mut p = vec![m.from.clone(), to.clone()];
                p.sort();
                p.dedup();
                self.participants = p;
            }
            (None, Some(room)) => self.room = Some(room.clone()),
            (None, None) => {}
        }
        self.last = Some((m.id.clone(), m.from.clone(), m.preview.clone(), m.ts));
        true
    }

    /// Reads a stored document.
    pub fn from_document(d: &Document) -> Option<Conversation> {
        let last = d.get_document("lastMessage").ok().and_then(|l| {
            Some((
                l.get_str("id").ok()?.to_string(),
                l.get_str("from").ok()?.to_string(),
                l.get_str("preview").ok()?.to_string(),
                l.get_i64("ts").ok()?,
            ))
        });
        Some(Conversation {
            id: d.get_str("_id").ok()?.to_string(),
            rev: d.get_i64("rev").unwrap_or(0),
            tenant: d.get_str("tenantId").ok()?.to_string(),
            conversation: d.get_str("conversationId").ok()?.to_string(),
            participants: d
                .get_array("participants")
                .map(|a| a.iter().filter_map(|b| b.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
            room: d.get_str("room").ok().map(str::to_string),
            last,
            count: d.get_i64("messageCount").unwrap_or(0),
            created: d.get_i64("createdAt").ok(),
            pos: Pos::from_bson(d.get_document("pos").ok()),
        })
    }

    /// The fields the persister owns, for `$set` (with the next revision).
    pub fn fields(&self) -> Document {
        let mut d = doc! {
            "tenantId": &self.tenant,
            "conversationId": &self.conversation,
            "type": if self.room.is_some() { "room" } else { "dm" },
            "messageCount": self.count,
            "rev": self.rev + 1,
        };
        if let Some(room) = &self.room {
            d.insert("room", room);
        } else {
            d.insert("participants", self.participants.clone());
        }
        if let Some((id, from, preview, ts)) = &self.last {
            d.insert("lastMessage", doc! { "id": id, "from": from, "preview": preview, "ts": ts });
            d.insert("updatedAt", ts);
        }
        if let Some(c) = self.created {
            d.insert("createdAt", c);
        }
        if let Some(p) = self.pos {
            d.insert("pos", p.to_bson());
        }
        d
    }
}

/// One device (socket) of a user, as `users.devices` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Socket id.
    pub socket: String,
    /// Node serving it.
    pub server: String,
    /// Connected at (ms since the epoch).
    pub since: i64,
}

/// A `users` document being folded. Fields the persister does not own (a client
/// application's `profile`, `keys`, ...) are left alone: it writes with `$set`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct User {
    /// `scoped_id(tenant, user)`.
    pub id: String,
    /// Revision read (0: none).
    pub rev: i64,
    /// Tenant.
    pub tenant: String,
    /// User id.
    pub user: String,
    /// `online` / `offline` (None until a presence record arrived).
    pub online: Option<bool>,
    /// Last seen (ms since the epoch): the latest presence record's `lastSeen`.
    pub last_seen: Option<i64>,
    /// Earliest connect or presence time.
    pub first_seen: Option<i64>,
    /// Sockets up.
    pub devices: Vec<Device>,
    /// Position of the last `presence.changes` record taken.
    pub presence_pos: Option<Pos>,
    /// Position of the last `events.socket` record taken.
    pub events_pos: Option<Pos>,
}

impl User {
    /// A user not stored yet.
    pub fn new(tenant: &str, user: &str) -> User {
        User {
            id: scoped_id(tenant, user),
            tenant: tenant.to_string(),
            user: user.to_string(),
            ..User::default()
        }
    }

    fn seen(&mut self, ts: i64) {
        self.first_seen = Some(self.first_seen.map_or(ts, |f| f.min(ts)));
    }

    /// Takes a socket event unless taken before; true if it changed.
    pub fn apply_socket(&mut self, e: &SocketEvent, pos: Pos) -> bool {
        if !pos.is_new(self.events_pos) {
            return false;
        }
        self.events_pos = Some(pos);
        match e.kind.as_str() {
            "connect" => {
                self.seen(e.ts);
                if !self.devices.iter().any(|d| d.socket == e.socket) {
                    self.devices.push(Device {
                        socket: e.socket.clone(),
                        server: e.server.clone(),
                        since: e.ts,
                    });
                }
            }
            "disconnect" => self.devices.retain(|d| d.socket != e.socket),
            _ => {}
        }
        true
    }

    /// Takes a presence change unless taken before; true if it changed. Going offline
    /// (the user's last socket anywhere closed) also forgets the devices connected before
    /// then, which covers sockets of a node that died without telling.
    pub fn apply_presence(&mut self, p: &PresenceChange, pos: Pos) -> bool {
        if !pos.is_new(self.presence_pos) {
            return false;
        }
        self.presence_pos = Some(pos);
        self.online = Some(p.online);
        self.seen(p.last_seen);
        self.last_seen = Some(self.last_seen.map_or(p.last_seen, |l| l.max(p.last_seen)));
        if !p.online {
            self.devices.retain(|d| d.since > p.last_seen);
        }
        true
    }

    /// Reads a stored document.
    pub fn from_document(d: &Document) -> Option<User> {
        let pos = d.get_document("pos").ok();
        Some(User {
            id: d.get_str("_id").ok()?.to_string(),
            rev: d.get_i64("rev").unwrap_or(0),
            tenant: d.get_str("tenantId").ok()?.to_string(),
            user: d.get_str("userId").ok()?.to_string(),
            online: d.get_str("status").ok().map(|s| s == "online"),
            last_seen: d.get_i64("lastSeen").ok(),
            first_seen: d.get_i64("firstSeen").ok(),
            devices: d
                .get_array("devices")
                .map(|a| {
                    a.iter()
                        .filter_map(|b| {
                            let b = b.as_document()?;
                            Some(Device {
                                socket: b.get_str("socketId").ok()?.to_string(),
                                server: b.get_str("serverId").ok()?.to_string(),
                                since: b.get_i64("since").ok()?,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
            presence_pos: Pos::from_bson(pos.and_then(|p| p.get_document("presence").ok())),
            events_pos: Pos::from_bson(pos.and_then(|p| p.get_document("events").ok())),
        })
    }

    /// The fields the persister owns, for `$set` (with the next revision).
    pub fn fields(&self) -> Document {
        let devices: Vec<Document> = self
            .devices
            .iter()
            .map(|d| doc! { "socketId": &d.socket, "serverId": &d.server, "since": d.since })
            .collect();
        let mut pos = Document::new();
        if let Some(p) = self.presence_pos {
            pos.insert("presence", p.to_bson());
        }
        if let Some(p) = self.events_pos {
            pos.insert("events", p.to_bson());
        }
        let mut d = doc! {
            "tenantId": &self.tenant,
            "userId": &self.user,
            "devicesOnline": devices.len() as i64,
            "devices": devices,
            "pos": pos,
            "rev": self.rev + 1,
        };
        if let Some(online) = self.online {
            d.insert("status", if online { "online" } else { "offline" });
        }
        if let Some(l) = self.last_seen {
            d.insert("lastSeen", l);
        }
        if let Some(f) = self.first_seen {
            d.insert("firstSeen", f);
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, from: &str, to: &str, ts: i64) -> Message {
        let rec = serde_json::json!({"v":1,"type":"message","id":id,"tenantId":"t","conversationId":"dm:1:a:b",
            "from":from,"to":to,"content":{"text":"hi there"},"ts":ts});
        match read(rec.to_string().as_bytes()).unwrap() {
            Parsed::Message(m) => m,
            other => panic!("{other:?}"),
        }
    }

    fn message_document(rec: &[u8]) -> Result<Document, RecordError> {
        match read_on("messages.t", rec)? {
            Parsed::Message(m) => Ok(m.doc),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn message_records_become_documents() {
        let rec = br#"{"v":1,"type":"message","id":"01K","tenantId":"t","conversationId":"room:r","from":"a","room":"r","content":{"x":[1,2]},"ts":1795729196016,"clientMsgId":"c1"}"#;
        let d = message_document(rec).unwrap();
        assert_eq!(d.get_str("_id").unwrap(), "01K");
        assert_eq!(d.get_str("room").unwrap(), "r");
        assert_eq!(d.get_i64("ts").unwrap(), 1795729196016);
        assert_eq!(d.get_document("content").unwrap().get_array("x").unwrap().len(), 2);
        assert_eq!(d.get_str("clientMsgId").unwrap(), "c1");
        assert!(matches!(message_document(b"nope"), Err(RecordError::Json(_))));
        assert!(matches!(message_document(br#"{"v":2}"#), Err(RecordError::Version(_))));
        let no_id = br#"{"v":1,"type":"message","tenantId":"t","conversationId":"c","from":"a","to":"b","content":1,"ts":1}"#;
        assert_eq!(message_document(no_id), Err(RecordError::Field("id")));
        assert_eq!(read(br#"{"v":1,"type":"bogus"}"#), Err(RecordError::Type("bogus".into())));
        assert_eq!(read_on("events.socket", rec), Err(RecordError::Topic("message", "events.socket".into())));
        let bad_status =
            br#"{"v":1,"type":"presence","tenantId":"t","userId":"u","status":"away","lastSeen":1}"#;
        assert_eq!(read(bad_status), Err(RecordError::Field("status")));
    }

    #[test]
    fn conversations_count_each_record_once_however_batches_replay() {
        let ms: Vec<Message> = (0..5).map(|i| msg(&format!("m{i}"), "b", "a", 100 + i)).collect();
        let mut c = Conversation::new("t", "dm:1:a:b");
        for (i, m) in ms.iter().enumerate().take(3) {
            assert!(c.apply(m, Pos { partition: 0, offset: 10 + i as i64 }));
        }
        // A replay from the start, overlapping what was taken, then new records.
        for (i, m) in ms.iter().enumerate() {
            c.apply(m, Pos { partition: 0, offset: 10 + i as i64 });
        }
        assert_eq!(c.count, 5);
        assert_eq!(c.participants, ["a", "b"]);
        assert_eq!(c.last.as_ref().unwrap().0, "m4");
        assert_eq!(c.last.as_ref().unwrap().2, "hi there");
        assert_eq!(c.created, Some(100));
        // Through the stored form and back, and the revision moves on.
        let mut d = c.fields();
        d.insert("_id", &c.id);
        let mut back = Conversation::from_document(&d).unwrap();
        assert_eq!(back.rev, 1);
        back.rev = 0;
        assert_eq!(back, c);
        assert!(!back.apply(&ms[4], Pos { partition: 0, offset: 14 }));
        assert!(back.apply(&ms[4], Pos { partition: 1, offset: 0 }), "another partition: taken");
    }

    #[test]
    fn users_follow_sockets_and_presence_once() {
        let ev = |kind: &str, socket: &str, ts| SocketEvent {
            kind: kind.into(),
            tenant: "t".into(),
            user: "u".into(),
            socket: socket.into(),
            server: "n1".into(),
            ts,
        };
        let mut u = User::new("t", "u");
        assert!(u.apply_socket(&ev("connect", "s1", 10), Pos { partition: 2, offset: 0 }));
        assert!(u.apply_socket(&ev("connect", "s2", 20), Pos { partition: 2, offset: 1 }));
        assert!(!u.apply_socket(&ev("disconnect", "s1", 30), Pos { partition: 2, offset: 1 }), "replayed");
        assert!(u.apply_presence(
            &PresenceChange { tenant: "t".into(), user: "u".into(), online: true, last_seen: 10 },
            Pos { partition: 0, offset: 5 }
        ));
        assert_eq!((u.devices.len(), u.online, u.first_seen), (2, Some(true), Some(10)));
        assert!(u.apply_socket(&ev("disconnect", "s1", 30), Pos { partition: 2, offset: 2 }));
        assert_eq!(u.devices.len(), 1);
        // Offline: every device connected before goes (a dead node's socket too).
        let off = PresenceChange { tenant: "t".into(), user: "u".into(), online: false, last_seen: 40 };
        assert!(u.apply_presence(&off, Pos { partition: 0, offset: 6 }));
        assert_eq!((u.devices.len(), u.online, u.last_seen), (0, Some(false), Some(40)));
        let mut d = u.fields();
        d.insert("_id", &u.id);
        d.insert("profile", doc! { "name": "U" });
        let mut back = User::from_document(&d).unwrap();
        back.rev = 0;
        assert_eq!(back, u);
        assert_eq!(d.get_i64("devicesOnline").unwrap(), 0);
    }

    #[test]
    fn ids_do_not_collide_across_tenants() {
        assert_ne!(scoped_id("a:b", "c"), scoped_id("a", "b:c"));
        assert_eq!(preview(&serde_json::json!("x".repeat(500))).len(), PREVIEW_CHARS);
        assert_eq!(preview(&serde_json::json!({"n": 1})), r#"{"n":1}"#);
    }
}
