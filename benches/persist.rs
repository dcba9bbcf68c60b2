//! Persistence benchmark against a real Apache Kafka broker (KRaft, started from the jars
//! `scripts/kafka/install.sh` caches) and FerretDB (`scripts/ferretdb/install.sh`): run
//! with `cargo bench --bench persist`. Everything in one run, on the same two cores:
//!
//! 1. **The node's cost.** The same 1:1 workload (4 senders -> 4 recipients, 20 000
//!    messages each, fire and forget, 64-byte content) against a node without `--kafka`
//!    and one with it, a warm-up turn then three turns each, alternating: delivered
//!    messages/s and the node process's CPU per message (from `/proc`), medians and their
//!    ratios; then the Kafka floor: the same number of message records through a bare
//!    librdkafka producer with the node's settings, CPU per record (`kafka_floor`).
//! 2. **The persister's throughput.** The 320 000 messages now in Kafka, consumed by a
//!    fresh `shardgate persist` into FerretDB (messages, conversations, users): documents/s
//!    until its `/metrics` counts them all, against a plain loop of `insert_many`
//!    (batches of 1000, as the persister's) of the same documents into another database
//!    of the same server.
//! 3. **End-to-end lag.** A steady 5 000 messages/s through the node for 20 s: for each
//!    message, the time from its send (the `ts` the node stamped on it) to MongoDB
//!    acknowledging its document (readable from then on), from the persister's
//!    `shardgate_persister_store_lag_milliseconds` histogram: p50 / p99 / p99.9,
//!    interpolated within buckets.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use mongodb::bson::doc;
use serde_json::json;
use support::ferretdb::FerretDb;
use support::kafka::{free_port, Broker};
use support::persister::{Mongo, Persister};
use support::{cpu_seconds, token, Client, Server};

const SENDERS: usize = 4;
const PER_SENDER: usize = 20_000;
/// Turns of the off / on workloads; medians are reported.
const ROUNDS: usize = 3;

/// Delivered messages/s and the node's CPU microseconds per delivered message.
fn measured(srv: &Server, tenant: &str) -> (f64, f64) {
    let cpu = cpu_seconds(srv.pid());
    let rate = workload(srv, tenant);
    let used = cpu_seconds(srv.pid()) - cpu;
    (rate, used * 1e6 / (SENDERS * PER_SENDER) as f64)
}

fn workload(srv: &Server, tenant: &str) -> f64 {
    let receivers: Vec<Client> =
        (0..SENDERS).map(|i| Client::connect(srv.addr, &token(&format!("r{i}"), tenant))).collect();
    let senders: Vec<Client> =
        (0..SENDERS).map(|i| Client::connect(srv.addr, &token(&format!("s{i}"), tenant))).collect();
    let start = Instant::now();
    let body = |i: usize| json!({ "to": format!("r{i}"), "content": "x".repeat(64) });
    let delivered = support::blast(receivers, PER_SENDER, senders, PER_SENDER, body);
    delivered as f64 / start.elapsed().as_secs_f64()
}

/// Fire-and-forget senders: no rate limit, queues large enough for the bursts.
const CONFIG: &str =
    "[runtime]\nevents_per_second = 10000000\nevent_burst = 10000000\noutbound_queue_bytes = 67108864\n";

/// `shardgate persist` with the batches the measurements use.
fn persister(brokers: &str, url: &str) -> Persister {
    Persister::start_with(brokers, url, &["--batch-records", "1000", "--batch-ms", "200"])
}

/// Phase 3 on `node`, printed; (p50, p99, p99.9) in ms.
fn store_lag(node: &Server, persister: &Persister) -> (f64, f64, f64) {
    let (p50, p99, p999, sent) = lag(node, persister, 5_000, Duration::from_secs(20));
    println!("store lag at 5000 msgs/s ({sent} sent): p50 {p50:.1} ms, p99 {p99:.1} ms, p99.9 {p999:.1} ms");
    (p50, p99, p999)
}

/// `PERSIST_BENCH=node` runs only the node with persistence, ten turns (for a profiler
/// attached to the printed pid); `PERSIST_BENCH=lag` only phase 3.
fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let only = std::env::var("PERSIST_BENCH").ok();
    let broker = Broker::start_on(free_port());
    let addr = broker.addr();
    let args = ["--shards", "1"];
    let node = Server::start_with_config(&["--shards", "1", "--kafka", addr.as_str()], Some(CONFIG));
    match only.as_deref() {
        Some("node") => {
            println!("node pid {}", node.pid());
            for _ in 0..10 {
                let (rate, cpu) = measured(&node, "on");
                println!("persistence on: {rate:.0} msgs/s, {cpu:.2} us/message");
            }
            return;
        }
        Some("lag") => {
            let db = FerretDb::start();
            store_lag(&node, &persister(&addr, &db.url("chat")));
            return;
        }
        _ => {}
    }
    // Both nodes up at once, measured in turns: the broker and the machine's noise fall
    // on both alike. Medians of ROUNDS.
    let plain = Server::start_with_config(&args, Some(CONFIG));
    // One turn each to warm up (connections, the tenant's topic), then the measured ones.
    measured(&plain, "off");
    measured(&node, "on");
    let (mut offs, mut ons) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        offs.push(measured(&plain, "off"));
        ons.push(measured(&node, "on"));
    }
    drop(plain);
    let median = |turns: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
        let mut v: Vec<f64> = turns.iter().map(pick).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, cpu_off) = (median(&offs, |t| t.0), median(&offs, |t| t.1));
    let (on, cpu_on) = (median(&ons, |t| t.0), median(&ons, |t| t.1));
    let expected = (SENDERS * PER_SENDER * (ROUNDS + 1)) as u64;
    println!("rounds (msgs/s, node CPU us/message): off {offs:.2?}; on {ons:.2?}");
    println!("messages/s delivered, persistence off: {off:>10.0}   node CPU {cpu_off:.2} us/message (medians of {ROUNDS})");
    println!(
        "messages/s delivered, persistence on:  {on:>10.0}   node CPU {cpu_on:.2} us/message  ({:.2}x throughput, {:.2}x CPU of off)",
        on / off,
        cpu_on / cpu_off
    );
    let end = Instant::now() + Duration::from_secs(300);
    while node.metric("shardgate_kafka_delivered_total") < expected && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let records = node.metric("shardgate_kafka_delivered_total");
    println!("records acknowledged by the broker: {records} (every message and the socket events)");
    let floor = kafka_floor(&addr, SENDERS * PER_SENDER);
    println!(
        "kafka floor: a bare librdkafka producer with the node's settings: {floor:.2} us of CPU per record; the node's extra CPU with persistence: {:.2} us per message (the 1.15x budget: {:.2} us)",
        cpu_on - cpu_off,
        cpu_off * 0.15
    );

    // 2. The persister through the backlog, against plain insert_many of the same documents.
    let db = FerretDb::start();
    let url = db.url("chat");
    let mongo = Mongo::connect(&url);
    let started = Instant::now();
    let persister = persister(&addr, &url);
    let end = Instant::now() + Duration::from_secs(600);
    while persister.metric("shardgate_persister_messages_inserted_total") < expected as i64
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let persist_secs = started.elapsed().as_secs_f64();
    let stored = persister.metric("shardgate_persister_messages_inserted_total");
    let persister_rate = stored as f64 / persist_secs;
    let docs = mongo.find("messages", doc! {});
    let baseline_rate = mongo.insert_loop("baseline", &docs, 1000);
    println!(
        "persister: {stored} messages (+ conversations, users) in {persist_secs:.2}s = {persister_rate:.0} documents/s; plain insert_many of the same {} documents: {baseline_rate:.0}/s ({:.2}x)",
        docs.len(),
        persister_rate / baseline_rate
    );

    // 3. End-to-end lag at a steady 5k messages/s.
    let (p50, p99, p999) = store_lag(&node, &persister);
    println!(
        "RESULT {}",
        json!({ "msgs_per_sec_off": off.round(), "msgs_per_sec_on": on.round(), "ratio_on_off": on / off,
                "cpu_us_per_msg_off": cpu_off, "cpu_us_per_msg_on": cpu_on, "cpu_ratio_on_off": cpu_on / cpu_off,
                "kafka_records": records, "kafka_floor_us_per_record": floor,
                "persister_docs_per_sec": persister_rate.round(), "insert_many_docs_per_sec": baseline_rate.round(),
                "persister_ratio": persister_rate / baseline_rate,
                "lag_ms_p50": p50, "lag_ms_p99": p99, "lag_ms_p999": p999 })
    );
}

/// The floor of the node's Kafka cost: `n` message records like the node's (built by
/// the shard's own `record::message`, keyed by conversation) handed as fast as librdkafka
/// takes them to a bare `ThreadedProducer` with the node's settings
/// (`producer_config`), in this process, until the broker acknowledged every one; the
/// process's CPU (every librdkafka thread included) per record. Handing records over in
/// one tight loop batches them at least as well as the node's bridge does, so this is
/// what one record per message costs at the least.
fn kafka_floor(brokers: &str, n: usize) -> f64 {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    struct Count(Arc<AtomicU64>);
    impl rdkafka::ClientContext for Count {}
    impl ProducerContext for Count {
        type DeliveryOpaque = ();
        fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
            assert!(r.is_ok(), "the floor's record was refused: {:?}", r.as_ref().err());
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    let cfg = shardgate::config::KafkaSettings { brokers: Some(brokers.to_string()), ..Default::default() };
    let topic = "floor.records";
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let spec = NewTopic::new(topic, cfg.partitions, TopicReplication::Fixed(cfg.replication));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let created = rt.block_on(admin.create_topics([&spec], &AdminOptions::new())).expect("create topic");
    assert!(created.iter().all(|r| r.is_ok()), "create {topic}: {created:?}");
    let delivered = Arc::new(AtomicU64::new(0));
    let producer: ThreadedProducer<Count> = shardgate::persist::producer::producer_config(&cfg)
        .create_with_context(Count(delivered.clone()))
        .expect("producer");
    let records: Vec<shardgate_shard::record::Record> = (0..n)
        .map(|i| {
            let (from, to) = (format!("s{}", i % SENDERS), format!("r{}", i % SENDERS));
            let msg = json!({ "id": format!("01JFLOOR{i:018}"), "from": from, "to": to,
                              "content": "x".repeat(64), "ts": 1_764_000_000_000u64 + i as u64 });
            let conversation = shardgate_shard::record::dm_conversation(&from, &to);
            shardgate_shard::record::message("on", conversation, &msg, None, &[], None)
        })
        .collect();
    // A first record up front: the connection, the topic's metadata, the producer id.
    let warm = BaseRecord::to(topic).key(&records[0].key).payload(&records[0].payload);
    producer.send(warm).map_err(|(e, _)| e).expect("first record");
    while delivered.load(Ordering::Relaxed) < 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let cpu = cpu_seconds(std::process::id());
    for r in &records {
        let mut rec = BaseRecord::to(topic).key(&r.key).payload(&r.payload);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err((e, _)) => panic!("floor produce: {e}"),
            }
        }
    }
    let end = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) < n as u64 + 1 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(2));
    }
    let used = cpu_seconds(std::process::id()) - cpu;
    assert_eq!(
        delivered.load(Ordering::Relaxed),
        n as u64 + 1,
        "the broker did not acknowledge every floor record"
    );
    used * 1e6 / n as f64
}

/// Cumulative store-lag bucket counts from the persister's `/metrics`: (le ms, count).
fn lag_buckets(p: &Persister) -> Vec<(f64, f64)> {
    let (_, body) = support::request_at(p.metrics, "GET", "/metrics", "");
    body.lines()
        .filter_map(|l| l.strip_prefix("shardgate_persister_store_lag_milliseconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, n) = l.split_once("\"} ")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, n.parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of the messages counted between two scrapes, interpolated within its
/// bucket (as Prometheus' `histogram_quantile`).
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let d: Vec<(f64, f64)> = after.iter().zip(before).map(|(a, b)| (a.0, a.1 - b.1)).collect();
    let total = d.last().map_or(0.0, |x| x.1);
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in &d {
        if n >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            return lower.0 + (le - lower.0) * (rank - lower.1) / (n - lower.1).max(1.0);
        }
        lower = (le, n);
    }
    lower.0
}

/// Sends `rate` messages/s for `secs` (4 senders, 1:1, fire and forget) and waits until
/// the persister stored them; returns the store lag (ms: p50, p99, p99.9) of those
/// messages, from the persister's histogram, and the count sent.
fn lag(srv: &Server, persister: &Persister, rate: u64, secs: Duration) -> (f64, f64, f64, u64) {
    // The tenant's topic exists and the persister reads it before the clock starts.
    let inserted = || persister.metric("shardgate_persister_messages_inserted_total");
    let mut warm = Client::connect(srv.addr, &token("warm", "lag"));
    let base = inserted();
    warm.emit_ack("message:send", json!({ "to": "nobody", "content": "warm-up" }));
    let end = Instant::now() + Duration::from_secs(60);
    while inserted() == base && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (before, base) = (lag_buckets(persister), inserted());
    let addr = srv.addr;
    let senders: Vec<_> = (0..SENDERS)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = Client::connect(addr, &token(&format!("l{i}"), "lag"));
                let _r = Client::connect(addr, &token(&format!("m{i}"), "lag"));
                let each = Duration::from_secs_f64(SENDERS as f64 / rate as f64);
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < secs {
                    let due = start + each * n as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    s.emit("message:send", json!({ "to": format!("m{i}"), "content": "x".repeat(64) }));
                    n += 1;
                }
                n
            })
        })
        .collect();
    let sent: u64 = senders.into_iter().map(|t| t.join().unwrap()).sum();
    let end = Instant::now() + Duration::from_secs(120);
    while inserted() < base + sent as i64 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = lag_buckets(persister);
    (quantile(&before, &after, 0.5), quantile(&before, &after, 0.99), quantile(&before, &after, 0.999), sent)
}
