//! `shardgate persist`: the Kafka -> MongoDB persister, a process of its own.
//!
//! A consumer-group member (rdkafka) subscribed to `^messages\..*` by pattern (a new
//! tenant's topic is picked up without a restart), `presence.changes` and
//! `events.socket`. Each batch (bounded by count and time) is written in three steps,
//! each safe to repeat ([`super::documents`], [`super::store`]):
//!
//! 1. `messages`: unordered `insert_many`, `_id` = message id (a duplicate key, a replay,
//!    is success for that document);
//! 2. `conversations`: each conversation's records folded into its document (count, last
//!    message, participants or room), written conditionally on the revision read;
//! 3. `users`: socket events and presence folded likewise (status, lastSeen, firstSeen,
//!    devices online).
//!
//! Only then are the batch's offsets committed (exactly the records handled, as
//! `offset + 1` per partition): a crash at any point replays records and never skips one,
//! and replays change nothing twice. A MongoDB error keeps the batch and retries it with
//! backoff. A record the persister cannot read goes to the dead-letter topic
//! [`DLQ_TOPIC`] with its reason (a JSON envelope), is counted and logged, and its offset
//! is committed once Kafka acknowledged the dead letter: it never stalls its partition.
//!
//! **Slow or absent MongoDB.** A write still running after [`PAUSE_AFTER`] pauses every
//! assigned partition: librdkafka stops fetching (memory stays bounded by
//! `queued.max.messages.kbytes`), while the thread keeps polling the consumer so the
//! group still hears from this member and rebalances are served; records already polled
//! meanwhile are carried into the next batch. When the write completes the partitions
//! resume from where the batch ended.
//!
//! The driver runs on a current-thread tokio runtime owned by the consumer's thread.
//! Progress and lag are on `/metrics` ([`super::monitor`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mongodb::bson::Document;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message as KafkaMessage, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tracing::{info, warn};

use super::documents::{self, Message, Parsed, Pos};
use super::monitor::{self, now_ms, Monitor};
use super::store::{Store, UserRecord};

/// Where unreadable records go, with the reason. Outside the subscription.
pub const DLQ_TOPIC: &str = "dlq.messages";
/// What the persister consumes: every tenant's messages, presence and socket events.
pub const SOURCES: [&str; 3] = ["^messages\\..*", "presence.changes", "events.socket"];
/// A batch write still running after this pauses the partitions.
pub const PAUSE_AFTER: Duration = Duration::from_secs(1);
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
    /// Partitions of `presence.changes` / `events.socket` if the persister creates them.
    pub partitions: i32,
    /// Where `/metrics` and `/healthz` are served (None: not served).
    pub metrics_listen: Option<SocketAddr>,
}

/// The consumer's context: quiet librdkafka logs, lag from its statistics, rebalances
/// logged.
struct GroupContext {
    monitor: Arc<Monitor>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        super::producer::quiet_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // A pattern no topic matches yet, a broker away: reported by lag and by the
        // consumer's own reconnects; one line at info, not an error per attempt.
        info!("kafka: {error}: {reason}");
    }

    fn stats(&self, stats: Statistics) {
        let mut lag = std::collections::BTreeMap::new();
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                // Partitions this member no longer (or not yet) fetches stay in the
                // statistics with their last numbers: only assigned ones count.
                let assigned = !matches!(part.fetch_state.as_str(), "none" | "stopping" | "stopped");
                // Nothing committed or consumed yet: the whole partition is behind.
                let n = if part.consumer_lag >= 0 {
                    part.consumer_lag
                } else if part.hi_offset >= 0 && part.lo_offset >= 0 {
                    part.hi_offset - part.lo_offset
                } else {
                    continue;
                };
                if *p >= 0 && assigned {
                    lag.insert((topic.clone(), *p), n);
                }
            }
        }
        if let Ok(mut l) = self.monitor.lag.lock() {
            *l = lag;
        }
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => info!(partitions = tpl.count(), "partitions assigned"),
            Rebalance::Revoke(tpl) => info!(partitions = tpl.count(), "partitions revoked"),
            Rebalance::Error(e) => warn!("rebalance error: {e}"),
        }
    }
}

type Consumer_ = BaseConsumer<GroupContext>;

/// The records of one batch, sorted by what they update.
#[derive(Default)]
struct Batch {
    messages: Vec<(Message, Pos)>,
    users: Vec<(UserRecord, Pos)>,
    dead: Vec<String>,
    /// Next offset to commit per (topic, partition): a few entries, scanned, so no key is
    /// allocated per record.
    next: Vec<(String, i32, i64)>,
    records: usize,
}

impl Batch {
    fn take<M: KafkaMessage>(&mut self, m: &M, monitor: &Monitor) {
        self.records += 1;
        monitor.records.fetch_add(1, Relaxed);
        let pos = Pos { partition: m.partition(), offset: m.offset() };
        let (topic, partition, after) = (m.topic(), m.partition(), m.offset() + 1);
        match self.next.iter_mut().find(|(t, p, _)| *p == partition && t == topic) {
            Some((_, _, next)) => *next = (*next).max(after),
            None => self.next.push((topic.to_string(), partition, after)),
        }
        let payload = m.payload().unwrap_or_default();
        let parsed = documents::read_on(m.topic(), payload);
        match parsed {
            Ok(Parsed::Message(msg)) => self.messages.push((msg, pos)),
            Ok(Parsed::Socket(e)) => self.users.push((UserRecord::Socket(e), pos)),
            Ok(Parsed::Presence(p)) => self.users.push((UserRecord::Presence(p), pos)),
            Err(e) => {
                monitor.dead_letters.fetch_add(1, Relaxed);
                warn!(
                    topic = m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    "record to {DLQ_TOPIC}: {e}"
                );
                let letter = serde_json::json!({
                    "reason": e.to_string(),
                    "topic": m.topic(),
                    "partition": m.partition(),
                    "offset": m.offset(),
                    "payload": String::from_utf8_lossy(payload),
                });
                self.dead.push(letter.to_string());
            }
        }
    }
}

/// Runs the persister until the process is stopped.
pub fn run(settings: PersisterSettings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let monitor = Arc::new(Monitor::default());
    let store = rt.block_on(async {
        let db = super::store::database(&settings.mongodb).await?;
        Store::open(&db).await.context("creating the indexes")
    })?;
    let consumer: Consumer_ = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", settings.topic_refresh_ms.to_string())
        .set("session.timeout.ms", settings.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (settings.session_timeout_ms / 3).max(100).to_string())
        .set("queued.max.messages.kbytes", "16384")
        .set("statistics.interval.ms", "1000")
        .create_with_context(GroupContext { monitor: monitor.clone() })
        .context("creating the Kafka consumer")?;
    rt.block_on(create_topics(&settings.brokers, settings.partitions))?;
    consumer.subscribe(&SOURCES).context("subscribing")?;
    let dlq: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .create()
        .context("creating the dead-letter producer")?;
    let metrics = match settings.metrics_listen {
        Some(addr) => {
            let bound =
                monitor::serve(addr, monitor.clone()).with_context(|| format!("metrics on {addr}"))?;
            format!("; metrics on http://{bound}/metrics")
        }
        None => String::new(),
    };
    info!(brokers = %settings.brokers, group = %settings.group, "persister consuming {SOURCES:?} into MongoDB");
    println!("persister running{metrics}");
    let mut carry: Vec<OwnedMessage> = Vec::new();
    let mut quiet = Quiet::default();
    loop {
        let mut batch = Batch::default();
        for m in carry.drain(..) {
            batch.take(&m, &monitor);
        }
        let deadline = Instant::now() + Duration::from_millis(settings.batch_ms);
        while batch.records < settings.batch_records {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match consumer.poll(left) {
                None => break,
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition))) => {
                    tracing::debug!("no topic matches {} yet", SOURCES[0]);
                }
                Some(Err(e)) => quiet.warn(&e),
                Some(Ok(m)) => batch.take(&m, &monitor),
            }
        }
        if batch.records == 0 {
            continue;
        }
        let started = Instant::now();
        let write = write(&store, &batch, &monitor);
        rt.block_on(serving_the_group(&consumer, write, &monitor, &mut carry, &mut quiet));
        let stored_at = now_ms();
        send_dead_letters(&dlq, &batch.dead);
        // Only now: every record of the batch is in MongoDB (or a dead letter).
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, next) in &batch.next {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            monitor.commit_errors.fetch_add(1, Relaxed);
            warn!("offset commit failed (the batch will be replayed, harmlessly): {e}");
        }
        monitor.batches.fetch_add(1, Relaxed);
        monitor.write_micros.fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        if let Some(ts) = batch.messages.iter().map(|(m, _)| m.ts).max() {
            monitor.newest_ts.fetch_max(ts, Relaxed);
        }
        for (m, _) in &batch.messages {
            monitor.stored_after(stored_at.saturating_sub(m.ts).max(0) as u64);
        }
        tracing::debug!(records = batch.records, messages = batch.messages.len(), "batch stored");
    }
}

/// Consumer errors (a broker away is reported on every poll): each kind once per
/// [`Quiet::EVERY`], the repeats at debug level.
#[derive(Default)]
struct Quiet {
    last: Option<(String, Instant)>,
}

impl Quiet {
    const EVERY: Duration = Duration::from_secs(10);

    fn warn(&mut self, e: &KafkaError) {
        let text = e.to_string();
        match &self.last {
            Some((t, at)) if *t == text && at.elapsed() < Quiet::EVERY => tracing::debug!("kafka: {text}"),
            _ => {
                warn!("kafka: {text} (repeats within {:?} logged at debug level)", Quiet::EVERY);
                self.last = Some((text, Instant::now()));
            }
        }
    }
}

/// Runs `write` to completion; once it has taken [`PAUSE_AFTER`], pauses the assigned
/// partitions and keeps polling the consumer (group membership, rebalances) until it
/// completes, then resumes them. Records polled meanwhile go to `carry`.
async fn serving_the_group(
    consumer: &Consumer_,
    write: impl Future<Output = ()>,
    monitor: &Monitor,
    carry: &mut Vec<OwnedMessage>,
    quiet: &mut Quiet,
) {
    tokio::pin!(write);
    let mut paused = false;
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + PAUSE_AFTER, Duration::from_millis(200));
    loop {
        tokio::select! {
            () = &mut write => break,
            _ = tick.tick() => {
                // Pause whatever is assigned now (a rebalance may have added partitions).
                if let Ok(a) = consumer.assignment() {
                    if consumer.pause(&a).is_ok() && !paused {
                        paused = true;
                        monitor.paused.store(1, Relaxed);
                        monitor.pauses.fetch_add(1, Relaxed);
                        warn!(partitions = a.count(), "MongoDB is slow or down: partitions paused");
                    }
                }
                while let Some(r) = consumer.poll(Duration::ZERO) {
                    match r {
                        Ok(m) => carry.push(m.detach()),
                        Err(e) => quiet.warn(&e),
                    }
                }
            }
        }
    }
    if paused {
        if let Ok(a) = consumer.assignment() {
            let _ = consumer.resume(&a);
        }
        monitor.paused.store(0, Relaxed);
        info!("MongoDB took the batch: partitions resumed");
    }
}

/// Writes one batch: messages, then conversations and users (side by side), each
/// retried until MongoDB takes it.
async fn write(store: &Store, batch: &Batch, monitor: &Monitor) {
    let docs: Vec<Document> = batch.messages.iter().map(|(m, _)| m.doc.clone()).collect();
    let inserted = retry("messages", monitor, || store.insert_messages(&docs)).await;
    monitor.inserted.fetch_add(inserted, Relaxed);
    monitor.duplicates.fetch_add(docs.len() as u64 - inserted, Relaxed);
    // Conversations and users are independent of each other: written side by side.
    let (c, u) = tokio::join!(
        retry("conversations", monitor, || store.fold_conversations(&batch.messages)),
        retry("users", monitor, || store.fold_users(&batch.users)),
    );
    monitor.conversations.fetch_add(c.written, Relaxed);
    monitor.users.fetch_add(u.written, Relaxed);
    monitor.conflicts.fetch_add(c.conflicts + u.conflicts, Relaxed);
}

async fn retry<T, F, Fut>(what: &str, monitor: &Monitor, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, mongodb::error::Error>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(t) => return t,
            Err(e) => {
                monitor.write_errors.fetch_add(1, Relaxed);
                warn!("MongoDB refused the batch's {what}, retrying in {backoff:?}: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The dead-letter topic (one partition: dead letters are rare) and the two shared topics
/// the node would create, if missing.
async fn create_topics(brokers: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().context("Kafka admin client")?;
    let topics = [
        NewTopic::new(DLQ_TOPIC, 1, TopicReplication::Fixed(-1)),
        NewTopic::new(SOURCES[1], partitions, TopicReplication::Fixed(-1)),
        NewTopic::new(SOURCES[2], partitions, TopicReplication::Fixed(-1)),
    ];
    let results = admin.create_topics(&topics, &AdminOptions::new()).await.context("creating topics")?;
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
