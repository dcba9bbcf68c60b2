//! `shardgate persist`: the Kafka -> MongoDB persister, a process of its own.
//!
//! A consumer-group member (rdkafka) subscribed by pattern to `^messages\..*`, so a new
//! tenant's topic is picked up without a restart. Records are batched (bounded by count
//! and time), written to MongoDB's `messages` collection with the official driver
//! (`_id` = the message id; unordered `insert_many`, where a duplicate key, a replay, is
//! success for that document), and the batch's offsets are committed only after MongoDB
//! acknowledged it: a crash at any point replays records, never skips one, and replays
//! cost nothing but duplicate-key errors. Any other write error keeps the batch and
//! retries it with backoff. A record that is not a version-1 message goes to the
//! dead-letter topic [`DLQ_TOPIC`] with the reason (a JSON envelope), is counted and
//! logged, and its offset is committed with the batch once the dead letter is
//! acknowledged: it never stalls its partition and is never silently dropped.
//!
//! The driver runs on a current-thread tokio runtime owned by the consumer's thread: the
//! thread polls Kafka, then blocks on the batch's write.

use std::time::{Duration, Instant};

use anyhow::Context;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::ErrorKind;
use mongodb::options::IndexOptions;
use mongodb::{Client, Collection, IndexModel};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::Value;
use tracing::{info, warn};

/// Where unreadable records go, with the reason. Outside the `^messages\..*` pattern.
pub const DLQ_TOPIC: &str = "dlq.messages";

/// Duplicate key: the document is already there (a replayed record).
const DUPLICATE_KEY: i32 = 11000;
/// Longest wait between two write attempts of a batch MongoDB refused.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the persister needs.
#[derive(Debug, Clone)]
pub struct PersisterSettings {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// `mongodb://host:port/db`: the database is the URI's.
    pub mongodb: String,
    /// Consumer group id.
    pub group: String,
    /// Most records per batch.
    pub batch_records: usize,
    /// Longest a batch waits to fill.
    pub batch_ms: u64,
    /// How often librdkafka looks for new topics matching the pattern.
    pub topic_refresh_ms: u64,
    /// How long the group waits for a silent member (a crashed persister) before its
    /// partitions go to the others (`session.timeout.ms`; the broker allows 6 s at least
    /// by default).
    pub session_timeout_ms: u64,
}

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
}

/// The `messages` document of one version-1 message record.
pub fn message_document(payload: &[u8]) -> Result<Document, RecordError> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| RecordError::Json(e.to_string()))?;
    match v.get("v").and_then(Value::as_u64) {
        Some(1) => {}
        other => return Err(RecordError::Version(format!("{other:?}"))),
    }
    if v.get("type").and_then(Value::as_str) != Some("message") {
        return Err(RecordError::Field("type"));
    }
    let text = |f: &'static str| v.get(f).and_then(Value::as_str).ok_or(RecordError::Field(f));
    let mut d = doc! {
        "_id": text("id")?,
        "tenantId": text("tenantId")?,
        "conversationId": text("conversationId")?,
        "from": text("from")?,
        "ts": v.get("ts").and_then(Value::as_i64).ok_or(RecordError::Field("ts"))?,
    };
    match (v.get("to").and_then(Value::as_str), v.get("room").and_then(Value::as_str)) {
        (Some(to), None) => d.insert("to", to),
        (None, Some(room)) => d.insert("room", room),
        _ => return Err(RecordError::Field("to | room")),
    };
    let content = v.get("content").ok_or(RecordError::Field("content"))?;
    d.insert("content", Bson::try_from(content.clone()).map_err(|_| RecordError::Field("content"))?);
    for optional in ["clientMsgId", "attachments"] {
        if let Some(x) = v.get(optional) {
            d.insert(optional, Bson::try_from(x.clone()).map_err(|_| RecordError::Field("attachments"))?);
        }
    }
    Ok(d)
}

/// Runs the persister until the process is stopped.
pub fn run(settings: PersisterSettings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let messages: Collection<Document> = rt.block_on(async {
        let client = Client::with_uri_str(&settings.mongodb).await.context("MongoDB URI")?;
        let db = client
            .default_database()
            .context("the MongoDB URI names no database (mongodb://host:port/DB)")?;
        let messages = db.collection::<Document>("messages");
        let index = IndexModel::builder()
            .keys(doc! { "tenantId": 1, "conversationId": 1, "_id": -1 })
            .options(IndexOptions::builder().name("by_conversation".to_string()).build())
            .build();
        messages.create_index(index).await.context("creating the messages index")?;
        anyhow::Ok(messages)
    })?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", settings.topic_refresh_ms.to_string())
        .set("session.timeout.ms", settings.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (settings.session_timeout_ms / 3).max(100).to_string())
        .create()
        .context("creating the Kafka consumer")?;
    consumer.subscribe(&["^messages\\..*"]).context("subscribing to ^messages\\..*")?;
    let dlq: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .create()
        .context("creating the dead-letter producer")?;
    rt.block_on(create_dlq(&settings.brokers))?;
    info!(brokers = %settings.brokers, group = %settings.group, "persister consuming ^messages\\..* into MongoDB");
    println!("persister running");
    let (mut stored, mut skipped) = (0u64, 0u64);
    loop {
        let mut batch = Vec::with_capacity(settings.batch_records);
        let mut dead = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(settings.batch_ms);
        let mut polled = 0usize;
        while batch.len() < settings.batch_records {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match consumer.poll(left) {
                None => break,
                Some(Err(e)) => warn!("kafka: {e}"),
                Some(Ok(m)) => {
                    polled += 1;
                    match message_document(m.payload().unwrap_or_default()) {
                        Ok(d) => batch.push(d),
                        Err(e) => {
                            skipped += 1;
                            warn!(topic = m.topic(), offset = m.offset(), "record to {DLQ_TOPIC}: {e}");
                            let letter = serde_json::json!({
                                "reason": e.to_string(),
                                "topic": m.topic(),
                                "partition": m.partition(),
                                "offset": m.offset(),
                                "payload": String::from_utf8_lossy(m.payload().unwrap_or_default()),
                            });
                            dead.push(letter.to_string());
                        }
                    }
                }
            }
        }
        if polled == 0 {
            continue;
        }
        let n = batch.len();
        rt.block_on(write(&messages, batch));
        send_dead_letters(&dlq, &dead);
        // Only now: everything polled so far is in MongoDB (or was unreadable).
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            warn!("offset commit failed (the batch will be replayed, harmlessly): {e}");
        }
        stored += n as u64;
        info!(batch = n, stored, skipped, "batch stored");
    }
}

/// The dead-letter topic, created if missing (one partition: dead letters are rare).
async fn create_dlq(brokers: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().context("Kafka admin client")?;
    let topic = NewTopic::new(DLQ_TOPIC, 1, TopicReplication::Fixed(-1));
    let results = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .context("creating the dead-letter topic")?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("cannot create {name}: {code}"),
        }
    }
    Ok(())
}

/// Produces `letters` to the dead-letter topic and waits until Kafka acknowledged them
/// all (retrying while it does not): only then may their offsets be committed.
fn send_dead_letters(dlq: &BaseProducer, letters: &[String]) {
    if letters.is_empty() {
        return;
    }
    for letter in letters {
        loop {
            match dlq.send(BaseRecord::<(), String>::to(DLQ_TOPIC).payload(letter)) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    dlq.poll(Duration::from_millis(100));
                }
                Err((e, _)) => {
                    warn!("dead letter not queued, retrying: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
    while let Err(e) = dlq.flush(Duration::from_secs(30)) {
        warn!("dead letters not acknowledged yet: {e}");
    }
}

/// Writes one batch, retrying with backoff until MongoDB took every document (a
/// duplicate key counts as taken).
async fn write(messages: &Collection<Document>, batch: Vec<Document>) {
    if batch.is_empty() {
        return;
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let err = match messages.insert_many(batch.iter()).ordered(false).await {
            Ok(_) => return,
            Err(e) => e,
        };
        if let ErrorKind::InsertMany(ref m) = *err.kind {
            let only_duplicates = m.write_concern_error.is_none()
                && m.write_errors.as_ref().is_some_and(|w| w.iter().all(|e| e.code == DUPLICATE_KEY));
            if only_duplicates {
                return;
            }
        }
        warn!("MongoDB refused the batch, retrying in {backoff:?}: {err}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
