//! Batched Kafka production for the whole process (rdkafka), on the bridge thread.
//!
//! Shards hand [`Record`]s to the record inbox; this task moves them, in order, into
//! librdkafka, which batches (`linger.ms`, `batch.size`), compresses and delivers them
//! with an idempotent producer. Delivery reports arrive on librdkafka's polling thread:
//! failures are counted and logged, successes with a receipt become `message:persisted`
//! events for the sender.
//!
//! A Kafka outage never blocks chat. librdkafka retries without a deadline
//! (`message.timeout.ms = 0`) while it holds at most `queue.buffering.max.messages`;
//! records beyond that wait here, up to `buffer_records`. Past that bound the *newest*
//! records are dropped and counted (`shardgate_kafka_dropped_total`): everything older is
//! already queued in order and cannot be taken back from librdkafka, and dropping the
//! newest keeps each conversation's persisted history a gap-free prefix. When the broker
//! returns, buffered records flow in order. `messages.{tenant}` topics are created the
//! first time a tenant speaks; records wait for their topic in the same bound.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use shardgate_shard::mesh::{wait_ring, Inbox};
use shardgate_shard::metrics::{Counter, ShardMetrics};
use shardgate_shard::msg::ShardMsg;
use shardgate_shard::record::{Receipt, Record, Topic};
use shardgate_shard::runtime::MetricsBlock;
use shardgate_shard::Shared;
use tracing::{info, warn};

use crate::config::KafkaSettings as KafkaConfig;

/// Longest sleep of the producer task when no record arrives (it re-checks shutdown).
const IDLE_WAKE: Duration = Duration::from_millis(100);
/// Pause before asking again for a topic whose creation failed.
const TOPIC_RETRY: Duration = Duration::from_secs(1);
/// Timeout of one admin request (topic creation).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Records taken from the inbox per round.
const RECORD_BATCH: usize = 8192;
/// After a wake-up, how long the task lets records gather before taking them (at most
/// `linger_ms`, which librdkafka waits anyway): under load one wake-up per interval
/// instead of one per handful of records, and the shards' doorbell stays rung meanwhile,
/// so they skip their doorbell writes too.
const GATHER: Duration = Duration::from_millis(1);
/// At shutdown, how long librdkafka may take to deliver what it holds.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// Runs on librdkafka's polling thread: counts outcomes, sends receipts.
struct Reports {
    shared: Arc<Shared>,
    /// Counter block of this thread (its only writer).
    block: MetricsBlock,
}

impl ClientContext for Reports {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        quiet_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Broker-down errors repeat every few hundred milliseconds during an outage; the
        // outage shows in shardgate_kafka_buffered and in the delivery counters.
        tracing::debug!("kafka client error: {error}: {reason}");
    }
}

/// librdkafka's own log lines, one level down: an outage is reported by our counters
/// and one warning per failed admin request, not by a line every 500 ms.
pub(crate) fn quiet_log(level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
    use rdkafka::config::RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error => tracing::info!(facility = fac, "librdkafka: {msg}"),
        _ => tracing::debug!(facility = fac, "librdkafka: {msg}"),
    }
}

/// The admin client's context: quiet like the producer's.
struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        quiet_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!("kafka admin client error: {error}: {reason}");
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Option<Receipt>>;

    fn delivery(&self, result: &DeliveryResult<'_>, receipt: Self::DeliveryOpaque) {
        let m = self.shared.block(self.block);
        match result {
            Ok(_) => {
                m.inc(Counter::KafkaDelivered);
                if let Some(r) = *receipt {
                    self.shared.mesh.send(r.shard, ShardMsg::Persisted { conn: r.conn, msg_id: r.msg_id });
                }
            }
            Err((e, msg)) => {
                m.inc(Counter::KafkaFailed);
                use rdkafka::message::Message;
                warn!(topic = msg.topic(), "kafka delivery failed: {e}");
            }
        }
    }
}

/// The producer side of the bridge thread.
pub struct RecordProducer {
    cfg: KafkaConfig,
    shared: Arc<Shared>,
    inbox: Arc<Inbox<Record>>,
    producer: ThreadedProducer<Reports>,
    /// Topics known to exist.
    topics: HashSet<String>,
    /// Records in order, waiting for librdkafka (or for their topic).
    buffer: VecDeque<Record>,
    /// Last failed attempt to create a topic, to pace retries.
    creating: HashMap<String, Instant>,
    /// Kept between rounds so that their capacity is reused: the inbox's batch, and the
    /// buffer's other half while `flush` sorts records out.
    scratch: Vec<Record>,
    spare: VecDeque<Record>,
}

fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.brokers.as_deref().unwrap_or_default());
    c
}

/// The producer's librdkafka settings: idempotent, every replica acknowledging, batched
/// and compressed as configured, never expiring a record. `benches/persist.rs` measures a
/// bare producer with these same settings as the floor of the node's Kafka cost.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.size", cfg.batch_bytes.to_string())
        .set("compression.type", &cfg.compression)
        .set("queue.buffering.max.messages", cfg.producer_queue.to_string())
        .set("message.timeout.ms", "0");
    c
}

impl RecordProducer {
    /// Builds the producer and the admin client; connects lazily.
    pub fn new(
        cfg: KafkaConfig,
        shared: Arc<Shared>,
        inbox: Arc<Inbox<Record>>,
        block: MetricsBlock,
    ) -> Result<RecordProducer, KafkaError> {
        let producer: ThreadedProducer<Reports> =
            producer_config(&cfg).create_with_context(Reports { shared: shared.clone(), block })?;
        Ok(RecordProducer {
            cfg,
            shared,
            inbox,
            producer,
            topics: HashSet::new(),
            buffer: VecDeque::new(),
            creating: HashMap::new(),
            scratch: Vec::new(),
            spare: VecDeque::new(),
        })
    }

    fn m(&self) -> &ShardMetrics {
        self.shared.block(MetricsBlock::Bridge)
    }

    /// Creates `names` if missing; returns those that exist now.
    async fn ensure_topics(&mut self, names: Vec<String>) {
        let now = Instant::now();
        let mut names = names;
        names.sort();
        names.dedup(); // a CreateTopics request naming a topic twice is refused whole
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| !self.topics.contains(n))
            .filter(|n| self.creating.get(n).map(|t| now.duration_since(*t) > TOPIC_RETRY).unwrap_or(true))
            .collect();
        if names.is_empty() {
            return;
        }
        let specs: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, self.cfg.partitions, TopicReplication::Fixed(self.cfg.replication)))
            .collect();
        let opts = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
        // A fresh admin client per attempt: one that first met a dead broker may have
        // settled on fallback protocol versions the broker then refuses.
        let admin: AdminClient<QuietContext> =
            match client_config(&self.cfg).create_with_context(QuietContext) {
                Ok(a) => a,
                Err(e) => {
                    warn!("kafka admin client: {e}");
                    return;
                }
            };
        match admin.create_topics(&specs, &opts).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(name) => {
                            info!(topic = name, "kafka topic created");
                            self.topics.insert(name);
                        }
                        Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                            self.topics.insert(name);
                        }
                        Err((name, e)) => {
                            warn!(topic = name, "cannot create kafka topic: {e}");
                            self.creating.insert(name, now);
                        }
                    }
                }
            }
            Err(e) => {
                warn!("kafka admin request failed: {e}; records wait in the buffer");
                for n in names {
                    self.creating.insert(n, now);
                }
            }
        }
    }

    /// Takes new records from the inbox, bounded; drops the newest past the bound.
    fn take(&mut self) {
        let mut batch = std::mem::take(&mut self.scratch);
        self.inbox.drain(RECORD_BATCH, &mut batch);
        let room = self.cfg.buffer_records.saturating_sub(self.buffer.len());
        let dropped = batch.len().saturating_sub(room);
        batch.truncate(room);
        self.buffer.extend(batch.drain(..));
        self.scratch = batch;
        if dropped > 0 {
            self.m().add(Counter::KafkaDropped, dropped as u64);
            warn!("kafka buffer full ({} records): dropped the {dropped} newest", self.cfg.buffer_records);
        }
    }

    /// Hands buffered records to librdkafka in order, while their topics exist and
    /// librdkafka has room. A record whose topic is missing holds back only its own
    /// topic: order within a topic is all Kafka keeps, and all this keeps.
    fn flush(&mut self) -> Vec<String> {
        let mut missing: Vec<String> = Vec::new();
        let mut blocked: HashSet<String> = HashSet::new();
        let mut keep = std::mem::take(&mut self.spare);
        let mut full = false;
        let mut produced = 0;
        // Runs of records share a topic: its name is made once per run.
        let mut named: Option<(Topic, String)> = None;
        while let Some(r) = self.buffer.pop_front() {
            if named.as_ref().is_none_or(|(t, _)| *t != r.topic) {
                named = Some((r.topic.clone(), r.topic.name()));
            }
            let name: &str = named.as_ref().map(|(_, n)| n.as_str()).unwrap_or_default();
            if full || blocked.contains(name) || !self.topics.contains(name) {
                if !self.topics.contains(name) && !missing.iter().any(|m| m == name) {
                    missing.push(name.to_string());
                }
                blocked.insert(name.to_string());
                keep.push_back(r);
                continue;
            }
            let receipt = Box::new(r.receipt);
            let rec = BaseRecord::with_opaque_to(name, receipt).key(r.key.as_bytes()).payload(&r.payload);
            match self.producer.send(rec) {
                Ok(()) => produced += 1,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    full = true;
                    keep.push_back(r);
                }
                Err((e, _)) => {
                    self.m().inc(Counter::KafkaFailed);
                    warn!(topic = name, "kafka refused a record: {e}");
                }
            }
        }
        self.m().add(Counter::KafkaProduced, produced);
        // The drained buffer (empty, with its capacity) becomes the next spare.
        self.spare = std::mem::replace(&mut self.buffer, keep);
        missing
    }

    /// Waiting records (gauge).
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

/// The producer task on the bridge executor.
pub async fn run(mut p: RecordProducer, mut bell: glommio::net::UnixStream) {
    info!(brokers = p.cfg.brokers.as_deref().unwrap_or_default(), "persistence on: producing to kafka");
    let fixed: Vec<String> =
        [Topic::SocketEvents, Topic::Presence, Topic::Notifications].iter().map(Topic::name).collect();
    p.ensure_topics(fixed).await;
    let mut last_gauge = 0u64;
    while !p.shared.stopping.load(std::sync::atomic::Ordering::Relaxed) || p.inbox.backlog() > 0 {
        wait_ring(&p.inbox, &mut bell, IDLE_WAKE).await;
        let gather = GATHER.min(Duration::from_millis(p.cfg.linger_ms));
        if !gather.is_zero() && p.inbox.backlog() < RECORD_BATCH {
            glommio::timer::sleep(gather).await;
        }
        p.take();
        let missing = p.flush();
        if !missing.is_empty() {
            let mut wanted = missing;
            wanted
                .extend([Topic::SocketEvents, Topic::Presence, Topic::Notifications].iter().map(Topic::name));
            p.ensure_topics(wanted).await;
            p.flush();
        }
        let now = p.buffered() as u64;
        p.m().add(Counter::KafkaBuffered, now.wrapping_sub(last_gauge));
        last_gauge = now;
    }
    // Shutdown: give librdkafka a bounded moment to deliver what it holds.
    let _ = p.producer.flush(FLUSH_GRACE);
    info!("kafka producer stopped");
}
