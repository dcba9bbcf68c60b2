//! Persistence records: what shards hand to the bridge for Kafka, and their versioned
//! JSON (schema in docs/kafka.md).
//!
//! Records are built on the shard that saw the event and queued on the process's record
//! inbox; shards never touch Kafka. Building one is a JSON serialisation and a queue
//! push; when persistence is off nothing is built at all.

use serde_json::{json, Value};

use crate::ids::ShardId;
use crate::slab::ConnId;

/// Version of every record's JSON shape.
pub const SCHEMA_VERSION: u32 = 1;

/// Where a record goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `messages.{tenant}`: every chat message.
    Messages(String),
    /// `events.socket`: connect, disconnect, join, leave.
    SocketEvents,
    /// `presence.changes`: online / offline.
    Presence,
    /// `notifications`: one per message queued for an offline user.
    Notifications,
}

impl Topic {
    /// The Kafka topic name.
    pub fn name(&self) -> String {
        match self {
            Topic::Messages(t) => format!("messages.{}", topic_safe(t)),
            Topic::SocketEvents => "events.socket".into(),
            Topic::Presence => "presence.changes".into(),
            Topic::Notifications => "notifications".into(),
        }
    }
}

/// Kafka topic names allow `[a-zA-Z0-9._-]`; anything else in a tenant id becomes `_`
/// followed by its hex code, which keeps the mapping one-to-one.
pub fn topic_safe(tenant: &str) -> String {
    let mut s = String::with_capacity(tenant.len());
    for c in tenant.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            s.push(c);
        } else {
            s.push_str(&format!("_{:x}_", c as u32));
        }
    }
    s
}

/// Who asked for a `message:persisted` receipt: the sender's socket and the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// Shard of the sender.
    pub shard: ShardId,
    /// The sender's connection.
    pub conn: ConnId,
    /// The message.
    pub msg_id: u128,
}

/// One record for Kafka.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Destination topic.
    pub topic: Topic,
    /// Partitioning key: the conversation for messages, the user otherwise.
    pub key: String,
    /// Versioned JSON.
    pub payload: Vec<u8>,
    /// Receipt to send once Kafka acknowledged the record.
    pub receipt: Option<Receipt>,
}

fn record(topic: Topic, key: String, mut body: Value, receipt: Option<Receipt>) -> Record {
    if let Value::Object(m) = &mut body {
        m.insert("v".into(), json!(SCHEMA_VERSION));
    }
    Record { topic, key, payload: body.to_string().into_bytes(), receipt }
}

/// The conversation of a direct message: the same for both directions.
pub fn dm_conversation(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    format!("dm:{}:{x}:{y}", x.len())
}

/// A chat message (`messages.{tenant}`). `msg` is the `message:new` payload;
/// `attachments` its binary attachments, base64, in placeholder order.
///
/// On the send path of every message: written straight into the payload buffer from the
/// borrowed parts (no copy of `msg`, no intermediate JSON tree).
pub fn message(
    tenant: &str,
    conversation: String,
    msg: &Value,
    client_msg_id: Option<&Value>,
    attachments: &[String],
    receipt: Option<Receipt>,
) -> Record {
    let mut out = Vec::with_capacity(192);
    let _ =
        std::io::Write::write_fmt(&mut out, format_args!("{{\"v\":{SCHEMA_VERSION},\"type\":\"message\""));
    field(&mut out, "tenantId", tenant);
    field(&mut out, "conversationId", conversation.as_str());
    if let Some(c) = client_msg_id {
        field(&mut out, "clientMsgId", c);
    }
    if let Value::Object(m) = msg {
        for (k, v) in m {
            if !matches!(
                k.as_str(),
                "v" | "type" | "tenantId" | "conversationId" | "clientMsgId" | "attachments"
            ) {
                field(&mut out, k, v);
            }
        }
    }
    if !attachments.is_empty() {
        field(&mut out, "attachments", attachments);
    }
    out.push(b'}');
    Record { topic: Topic::Messages(tenant.to_string()), key: conversation, payload: out, receipt }
}

/// Appends `,"name":value` to a JSON object being written.
fn field<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, name: &str, value: &T) {
    out.push(b',');
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, name);
    out.push(b':');
    let _ = serde_json::to_writer(&mut *out, value);
}

/// A socket event (`events.socket`): `connect`, `disconnect` (with `reason`), `join`,
/// `leave` (with `room`).
pub fn socket_event(
    kind: &str,
    tenant: &str,
    user: &str,
    socket: &str,
    server: &str,
    extra: Value,
    ts: u64,
) -> Record {
    let mut body = json!({ "type": kind, "tenantId": tenant, "userId": user, "socketId": socket, "serverId": server, "ts": ts });
    if let (Value::Object(m), Value::Object(x)) = (&mut body, extra) {
        m.extend(x);
    }
    record(Topic::SocketEvents, format!("{tenant}:{user}"), body, None)
}

/// A presence change (`presence.changes`).
pub fn presence(tenant: &str, user: &str, online: bool, last_seen: u64) -> Record {
    let status = if online { "online" } else { "offline" };
    let body = json!({ "type": "presence", "tenantId": tenant, "userId": user, "status": status, "lastSeen": last_seen });
    record(Topic::Presence, format!("{tenant}:{user}"), body, None)
}

/// A message queued for an offline user (`notifications`).
pub fn notification(tenant: &str, user: &str, message_id: &str, from: &str, ts: u64) -> Record {
    let body = json!({ "type": "offline_message", "tenantId": tenant, "userId": user, "messageId": message_id, "from": from, "ts": ts });
    record(Topic::Notifications, format!("{tenant}:{user}"), body, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversations_are_symmetric_and_unambiguous() {
        assert_eq!(dm_conversation("alice", "bob"), dm_conversation("bob", "alice"));
        assert_ne!(dm_conversation("a:b", "c"), dm_conversation("a", "b:c"));
    }

    #[test]
    fn topic_names_are_kafka_safe_and_distinct() {
        assert_eq!(Topic::Messages("acme".into()).name(), "messages.acme");
        let odd = Topic::Messages("a/b c".into()).name();
        assert!(odd.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)), "{odd}");
        assert_ne!(topic_safe("a_2f_"), topic_safe("a/"));
    }

    #[test]
    fn message_records_hold_the_payload_and_their_own_fields_once() {
        let payload =
            json!({ "id": "01K", "from": "a", "to": "b", "content": {"t": "x\"y"}, "ts": 5, "v": 9 });
        let r =
            message("acme", dm_conversation("a", "b"), &payload, Some(&json!("c1")), &["AAE=".into()], None);
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(
            v,
            json!({ "v": 1, "type": "message", "tenantId": "acme", "conversationId": "dm:1:a:b", "clientMsgId": "c1",
                    "id": "01K", "from": "a", "to": "b", "content": {"t": "x\"y"}, "ts": 5, "attachments": ["AAE="] })
        );
        assert_eq!((r.topic, r.key.as_str()), (Topic::Messages("acme".into()), "dm:1:a:b"));
        let text = String::from_utf8(r.payload).unwrap();
        assert_eq!(text.matches("\"v\"").count(), 1, "{text}");
    }

    #[test]
    fn records_carry_the_schema_version() {
        let r = presence("t", "u", true, 5);
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!((v["v"].as_u64(), v["status"].as_str(), r.key.as_str()), (Some(1), Some("online"), "t:u"));
    }
}
