//! The history reader: `history:fetch` answered from MongoDB's `messages` collection
//! (written by `shardgate persist`) without any shard waiting on it.
//!
//! **Where the read runs.** One thread per process (`history`), with a current-thread
//! tokio runtime that owns the official driver's client (the driver needs tokio; shards
//! run glommio and must never block). Shards check what they can alone
//! (`shardgate_shard::history`: arguments, cursor syntax, limit, room membership, tenant
//! scope) and `try_send` a query into a bounded channel ([`QUEUE`] deep): a full queue
//! answers `busy` at once. The thread runs at most [`IN_FLIGHT`] reads at a time, each
//! bounded by a timeout (`history_timeout`); the answer, a ready ack frame, goes back to
//! the asking shard through the mesh (`ShardMsg::History`), like the Kafka producer's
//! receipts. A connection that closed meanwhile simply gets nothing (its id's
//! generation no longer matches).
//!
//! Reads are scoped to the asker's tenant by the filter itself. A cursor (`before`, a
//! message id) that names a stored message of another tenant is refused as
//! `other_tenant`, of another conversation as `bad_cursor`; an id not stored is a plain
//! position (ids are time-ordered ULIDs).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mongodb::bson::{doc, Document};
use mongodb::{Client, Collection};
use serde_json::{json, Map, Value};
use shardgate_io::packet;
use shardgate_shard::history::{HistoryQuery, HistorySink};
use shardgate_shard::metrics::Counter;
use shardgate_shard::msg::ShardMsg;
use shardgate_shard::shared::MetricsBlock;
use shardgate_shard::Shared;
use tokio::sync::{mpsc, Semaphore};
use tracing::{info, warn};

/// Queries waiting for the reader before shards answer `busy`.
pub const QUEUE: usize = 1024;
/// Reads in flight at once.
pub const IN_FLIGHT: usize = 16;

/// The shards' end: a bounded channel that never blocks.
pub struct Queue(mpsc::Sender<HistoryQuery>);

impl HistorySink for Queue {
    fn submit(&self, q: HistoryQuery) -> bool {
        self.0.try_send(q).is_ok()
    }
}

/// The reader's end, until [`start`] takes it.
pub struct Reader(mpsc::Receiver<HistoryQuery>);

/// The channel between shards and the reader (made before the shards start).
pub fn channel() -> (Arc<Queue>, Reader) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (Arc::new(Queue(tx)), Reader(rx))
}

/// Starts the reader thread on `uri` (`mongodb://host:port/DB`); fails if the URI is not
/// usable (the server itself may be down: reads then answer `history_unavailable`).
pub fn start(
    uri: &str,
    reader: Reader,
    shared: Arc<Shared>,
    timeout: Duration,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let uri = uri.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new().name("history".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e.into()));
                return;
            }
        };
        rt.block_on(async move {
            let messages = match open(&uri).await {
                Ok(m) => m,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            serve(reader, messages, shared, timeout).await;
        });
    })?;
    ready_rx.recv().context("the history thread died at start")??;
    Ok(thread)
}

async fn open(uri: &str) -> anyhow::Result<Collection<Document>> {
    let client = Client::with_uri_str(uri).await.context("--mongodb URI")?;
    let db =
        client.default_database().context("the --mongodb URI names no database (mongodb://host:port/DB)")?;
    Ok(db.collection("messages"))
}

async fn serve(mut reader: Reader, messages: Collection<Document>, shared: Arc<Shared>, timeout: Duration) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    info!("history reader on MongoDB ({IN_FLIGHT} reads in flight at most, {timeout:?} each)");
    while let Some(q) = reader.0.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (messages, shared) = (messages.clone(), shared.clone());
        tokio::spawn(async move {
            let body = match tokio::time::timeout(timeout, read(&messages, &q)).await {
                Ok(Ok(body)) => body,
                Ok(Err(Failure::Refused(code, message))) => refusal(code, message),
                Ok(Err(Failure::Store(e))) => {
                    shared.block(MetricsBlock::History).inc(Counter::HistoryErrors);
                    warn!("history read failed: {e}");
                    refusal("history_unavailable", "the message store did not answer; retry later")
                }
                Err(_) => {
                    shared.block(MetricsBlock::History).inc(Counter::HistoryErrors);
                    refusal("history_timeout", "the message store took too long; retry later")
                }
            };
            shared
                .mesh
                .send(q.shard, ShardMsg::History { conn: q.conn, frame: packet::ack_frame(q.ack, &body) });
            drop(slot);
        });
    }
}

fn refusal(code: &str, message: &str) -> Value {
    json!({ "ok": false, "code": code, "message": message, "event": "history:fetch" })
}

enum Failure {
    Refused(&'static str, &'static str),
    Store(mongodb::error::Error),
}

impl From<mongodb::error::Error> for Failure {
    fn from(e: mongodb::error::Error) -> Failure {
        Failure::Store(e)
    }
}

/// One page: `{ok: true, messages: [newest first], before?: cursor of the next page}`.
async fn read(messages: &Collection<Document>, q: &HistoryQuery) -> Result<Value, Failure> {
    let mut filter = doc! { "tenantId": &*q.tenant, "conversationId": &q.conversation };
    if let Some(before) = &q.before {
        let at = messages
            .find_one(doc! { "_id": before })
            .projection(doc! { "tenantId": 1, "conversationId": 1 })
            .await?;
        if let Some(d) = at {
            if d.get_str("tenantId").ok() != Some(&*q.tenant) {
                return Err(Failure::Refused("other_tenant", "that cursor belongs to another tenant"));
            }
            if d.get_str("conversationId").ok() != Some(q.conversation.as_str()) {
                return Err(Failure::Refused("bad_cursor", "that cursor belongs to another conversation"));
            }
        }
        filter.insert("_id", doc! { "$lt": before });
    }
    let mut cur = messages.find(filter).sort(doc! { "_id": -1 }).limit(q.limit as i64 + 1).await?;
    let mut page = Vec::with_capacity(q.limit as usize);
    let mut more = false;
    while cur.advance().await? {
        if page.len() == q.limit as usize {
            more = true;
            break;
        }
        page.push(message_new(cur.deserialize_current()?));
    }
    let mut body = json!({ "ok": true, "messages": page });
    if more {
        let oldest = body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m.get("id")).cloned();
        body["before"] = oldest.unwrap_or(Value::Null);
    }
    Ok(body)
}

/// A stored message as the `message:new` object clients know: `id`, `from`, `to` or
/// `room`, `content`, `ts`, plus `clientMsgId` and `attachments` (base64, in placeholder
/// order) when it had them.
fn message_new(d: Document) -> Value {
    let mut m = Map::new();
    for (k, v) in d {
        let k = match k.as_str() {
            "_id" => "id".to_string(),
            "tenantId" | "conversationId" => continue,
            _ => k,
        };
        // Relaxed extended JSON: numbers stay plain JSON numbers.
        m.insert(k, v.into_relaxed_extjson());
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_read_back_as_message_new_objects() {
        let d = doc! { "_id": "01K", "tenantId": "t", "conversationId": "room:r", "from": "a", "room": "r",
        "content": { "text": "hi", "n": [1, 2.5] }, "ts": 1795729196016_i64 };
        assert_eq!(
            message_new(d),
            json!({ "id": "01K", "from": "a", "room": "r", "content": { "text": "hi", "n": [1, 2.5] }, "ts": 1795729196016_i64 })
        );
    }
}
