//! `history:fetch`: the shard's half. The shard checks everything it can answer alone
//! (arguments, cursor syntax, limit, room membership, tenant scope) and hands a
//! [`HistoryQuery`] to a [`HistorySink`] without waiting; the reader (a thread of the
//! process, `src/history.rs`, that owns a MongoDB client) answers later with a ready ack
//! frame in [`crate::msg::ShardMsg::History`]. Shards never block on MongoDB.

use std::sync::Arc;

use serde_json::Value;

use crate::ids::ShardId;
use crate::slab::ConnId;

/// Most messages one `history:fetch` returns.
pub const MAX_LIMIT: u32 = 100;
/// Messages returned when the client gives no `limit`.
pub const DEFAULT_LIMIT: u32 = 50;

/// One page of one conversation, newest first, for connection `conn` of `shard`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryQuery {
    /// The asking connection's shard.
    pub shard: ShardId,
    /// The asking connection.
    pub conn: ConnId,
    /// Ack id to answer.
    pub ack: u64,
    /// The asker's tenant (from its token): every read is scoped to it.
    pub tenant: Arc<str>,
    /// Conversation id (`dm:…` or `room:…`, as in the `messages` documents).
    pub conversation: String,
    /// Only messages older than this message id.
    pub before: Option<String>,
    /// Most messages (1..=[`MAX_LIMIT`]).
    pub limit: u32,
}

/// Where shards send queries. `submit` must not block; false means the reader is
/// saturated (the client gets `busy`).
pub trait HistorySink: Send + Sync {
    /// Queues `q`.
    fn submit(&self, q: HistoryQuery) -> bool;
}

/// Why a `history:fetch` is refused before any read: `(code, message)`.
pub type Refusal = (&'static str, &'static str);

/// The arguments of a `history:fetch`: `{with: userId}` or `{room}`, `before?`, `limit?`.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    /// The other user of a 1:1 conversation.
    pub with: Option<String>,
    /// A room.
    pub room: Option<String>,
    /// Cursor: a message id.
    pub before: Option<String>,
    /// Page size.
    pub limit: u32,
}

/// Reads and checks the arguments (`max_id`: longest user or room id).
pub fn parse_args(args: &[Value], max_id: usize) -> Result<Args, Refusal> {
    const SHAPE: Refusal =
        ("invalid_history", "expected {with: userId} or {room}, and optionally before, limit");
    let Some(Value::Object(o)) = args.first() else { return Err(SHAPE) };
    let id = |k: &str| match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= max_id && !s.chars().any(char::is_control) => {
            Ok(Some(s.clone()))
        }
        Some(_) => Err(SHAPE),
    };
    let (with, room) = (id("with")?, id("room")?);
    if with.is_some() == room.is_some() {
        return Err(SHAPE);
    }
    let before = match o.get("before") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if ulid::Ulid::from_string(s).is_ok() => Some(s.to_ascii_uppercase()),
        Some(_) => return Err(("bad_cursor", "before must be a message id from this conversation")),
    };
    let limit = match o.get("limit") {
        None | Some(Value::Null) => DEFAULT_LIMIT,
        Some(v) => match v.as_u64() {
            Some(n) if n > MAX_LIMIT as u64 => return Err(("limit_too_large", "limit is at most 100")),
            Some(n) if n >= 1 => n as u32,
            _ => return Err(("invalid_history", "limit must be a positive integer")),
        },
    };
    Ok(Args { with, room, before, limit })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_are_checked_with_their_own_codes() {
        let ok = parse_args(&[json!({"with": "bob"})], 64).unwrap();
        assert_eq!((ok.with.as_deref(), ok.limit, ok.before), (Some("bob"), DEFAULT_LIMIT, None));
        let id = ulid::Ulid::new().to_string();
        let page = parse_args(&[json!({"room": "r", "before": id, "limit": 100})], 64).unwrap();
        assert_eq!((page.room.as_deref(), page.limit, page.before), (Some("r"), 100, Some(id)));
        let code = |v: Value| parse_args(&[v], 64).unwrap_err().0;
        assert_eq!(code(json!({"with": "a", "room": "r"})), "invalid_history");
        assert_eq!(code(json!({})), "invalid_history");
        assert_eq!(code(json!({"with": 5})), "invalid_history");
        assert_eq!(code(json!({"with": "a", "before": "nope"})), "bad_cursor");
        assert_eq!(code(json!({"with": "a", "before": 12})), "bad_cursor");
        assert_eq!(code(json!({"with": "a", "limit": 101})), "limit_too_large");
        assert_eq!(code(json!({"with": "a", "limit": 0})), "invalid_history");
        assert_eq!(code(json!({"with": "a", "limit": 2.5})), "invalid_history");
        assert_eq!(parse_args(&[json!("x")], 64).unwrap_err().0, "invalid_history");
    }
}
