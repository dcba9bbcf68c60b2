//! `shardgate persist` end to end: messages through a node with `--kafka` reach MongoDB
//! (FerretDB) exactly once, through a persister killed with SIGKILL and restarted;
//! unreadable records go to the dead-letter topic without stalling their partition; a
//! new tenant's topic is picked up without a restart. Real Apache Kafka, real FerretDB,
//! the official MongoDB driver to read back.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::json;
use support::ferretdb::FerretDb;
use support::kafka::{consume, free_port, Broker};
use support::{token, Client, Server};

struct Persister(Child);

impl Persister {
    fn start(brokers: &str, mongodb: &str) -> Persister {
        let child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .args(["persist", "--kafka", brokers, "--mongodb", mongodb])
            .args(["--batch-ms", "100", "--topic-refresh-ms", "500", "--session-timeout-ms", "6000"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("shardgate persist");
        Persister(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `filter` matches `want` documents (at most 60 s); returns the count seen.
fn wait_count(rt: &tokio::runtime::Runtime, url: &str, filter: Document, want: u64) -> u64 {
    rt.block_on(async {
        let client = mongodb::Client::with_uri_str(url).await.unwrap();
        let messages = client.default_database().unwrap().collection::<Document>("messages");
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let n = messages.count_documents(filter.clone()).await.unwrap();
            if n >= want || Instant::now() > end {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

fn send(alice: &mut Client, arg: serde_json::Value, ids: &mut Vec<String>) {
    let ack = alice.emit_ack("message:send", arg);
    assert!(ack["id"].is_string(), "{ack}");
    ids.push(ack["id"].as_str().unwrap().to_string());
}

#[test]
fn messages_reach_mongodb_once_through_a_persister_crash_and_a_new_tenant() {
    let broker = Broker::start_on(free_port());
    let db = FerretDb::start();
    let url = db.url("chat");
    let srv = Server::start_with_config(
        &["--shards", "2", "--kafka", &broker.addr(), "--events-per-second", "10000"],
        Some("[kafka]\npartitions = 2\nlinger_ms = 2\n"),
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut persister = Persister::start(&broker.addr(), &url);

    let mut alice = Client::connect(srv.addr, &token("alice", "t1"));
    let mut bob = Client::connect(srv.addr, &token("bob", "t1"));
    assert_eq!(alice.emit_ack("join_room", json!("lobby"))["ok"], true);
    assert_eq!(bob.emit_ack("join_room", json!("lobby"))["ok"], true);
    let mut ids = Vec::new();
    for i in 0..30 {
        send(&mut alice, json!({ "to": "bob", "content": { "n": i } }), &mut ids);
    }
    for i in 0..10 {
        send(&mut alice, json!({ "room": "lobby", "content": format!("room {i}") }), &mut ids);
    }
    assert_eq!(wait_count(&rt, &url, doc! {}, 40), 40, "every message stored");

    // A persister killed mid-stream and restarted: still exactly once.
    persister.kill();
    for i in 30..50 {
        send(&mut alice, json!({ "to": "bob", "content": { "n": i } }), &mut ids);
    }
    let _persister = Persister::start(&broker.addr(), &url);
    assert_eq!(wait_count(&rt, &url, doc! {}, 60), 60);
    let stored: Vec<String> = rt.block_on(async {
        let client = mongodb::Client::with_uri_str(&url).await.unwrap();
        let messages = client.default_database().unwrap().collection::<Document>("messages");
        let mut ids = Vec::new();
        let mut cur = messages.find(doc! {}).await.unwrap();
        while cur.advance().await.unwrap() {
            ids.push(cur.deserialize_current().unwrap().get_str("_id").unwrap().to_string());
        }
        ids
    });
    let mut want = ids.clone();
    want.sort();
    let mut got = stored;
    got.sort();
    assert_eq!(got, want, "each acknowledged message once, nothing else");

    // Unreadable records go to the dead-letter topic with their reason, and the partition
    // goes on: the messages after them are stored.
    let producer: BaseProducer =
        ClientConfig::new().set("bootstrap.servers", broker.addr()).create().unwrap();
    for bad in ["not json at all", r#"{"v":9,"type":"message"}"#] {
        producer.send(BaseRecord::<str, str>::to("messages.t1").key("room:lobby").payload(bad)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    for i in 50..53 {
        send(&mut alice, json!({ "to": "bob", "content": { "n": i } }), &mut ids);
    }
    assert_eq!(wait_count(&rt, &url, doc! {}, 63), 63, "the partition did not stall");
    let dead = consume(&broker.addr(), &["dlq.messages"], 1, Duration::from_secs(30), |got| got.len() >= 2);
    let reasons: Vec<&str> = dead.iter().map(|d| d.value["reason"].as_str().unwrap()).collect();
    assert_eq!(dead.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("not JSON") && reasons[1].contains("unknown schema version"),
        "{reasons:?}"
    );
    assert_eq!(dead[1].value["topic"], "messages.t1");
    assert_eq!(dead[1].value["payload"], r#"{"v":9,"type":"message"}"#);

    // A new tenant: its topic appears after the persister subscribed, and is consumed.
    let mut carol = Client::connect(srv.addr, &token("carol", "t2"));
    let _dave = Client::connect(srv.addr, &token("dave", "t2"));
    let mut t2 = Vec::new();
    for i in 0..5 {
        send(&mut carol, json!({ "to": "dave", "content": i }), &mut t2);
    }
    assert_eq!(wait_count(&rt, &url, doc! { "tenantId": "t2" }, 5), 5, "the new tenant's topic is consumed");
    let one = rt.block_on(async {
        let client = mongodb::Client::with_uri_str(&url).await.unwrap();
        let messages = client.default_database().unwrap().collection::<Document>("messages");
        messages.find_one(doc! { "_id": &t2[0] }).await.unwrap().unwrap()
    });
    assert_eq!((one.get_str("from").unwrap(), one.get_str("to").unwrap()), ("carol", "dave"));
}
