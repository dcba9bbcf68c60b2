//! Persistence: records produced to a real Apache Kafka broker (KRaft) started by the
//! test, read back with an rdkafka consumer; the broker paused, killed and restarted.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use support::kafka::{consume, free_port, Broker, Consumed};
use support::{token, Client, Server};

const CONFIG: &str = "[kafka]\npartitions = 2\nlinger_ms = 2\n";
const WAIT: Duration = Duration::from_secs(30);

fn node(brokers: &str) -> Server {
    Server::start_with_config(
        &["--shards", "2", "--kafka", brokers, "--events-per-second", "10000"],
        Some(CONFIG),
    )
}

fn of<'a>(records: &'a [Consumed], topic: &str) -> Vec<&'a Consumed> {
    records.iter().filter(|r| r.topic == topic).collect()
}

#[test]
fn messages_events_presence_and_notifications_reach_kafka() {
    let broker = Broker::start_on(free_port());
    let srv = node(&broker.addr());
    let mut alice = Client::connect(srv.addr, &token("alice", "t1"));
    let mut bob = Client::connect(srv.addr, &token("bob", "t1"));
    alice.emit_ack("join_room", json!("lobby"));
    bob.emit_ack("join_room", json!("lobby"));
    let mut ids = Vec::new();
    for i in 0..20 {
        let ack = alice
            .emit_ack("message:send", json!({ "to": "bob", "content": i, "clientMsgId": format!("c{i}") }));
        ids.push(ack["id"].as_str().unwrap().to_string());
        let ack = bob.emit_ack("message:send", json!({ "room": "lobby", "content": i }));
        ids.push(ack["id"].as_str().unwrap().to_string());
    }
    // A persisted receipt, and a message queued for an offline user.
    let ack =
        alice.emit_ack("message:send", json!({ "to": "bob", "content": "keep", "persistedReceipt": true }));
    let receipt = alice.expect_event("message:persisted");
    assert_eq!(receipt["id"], ack["id"]);
    ids.push(ack["id"].as_str().unwrap().to_string());
    let ack = alice.emit_ack("message:send", json!({ "to": "dave", "content": "later" }));
    assert_eq!(ack["status"], "queued");
    ids.push(ack["id"].as_str().unwrap().to_string());
    drop(bob);

    let topics = ["messages.t1", "events.socket", "presence.changes", "notifications"];
    let got = consume(&broker.addr(), &topics, 2, WAIT, |r| {
        of(r, "messages.t1").len() >= ids.len()
            && !of(r, "notifications").is_empty()
            && of(r, "presence.changes")
                .iter()
                .any(|p| p.value["userId"] == "bob" && p.value["status"] == "offline")
            && of(r, "events.socket").iter().any(|e| e.value["type"] == "disconnect")
    });

    // Every message exactly once, keyed by conversation, in order per conversation.
    let messages = of(&got, "messages.t1");
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for m in &messages {
        *seen.entry(m.value["id"].as_str().unwrap()).or_default() += 1;
        assert_eq!(m.value["v"], 1);
        assert_eq!(m.key, m.value["conversationId"].as_str().unwrap());
    }
    for id in &ids {
        assert_eq!(seen.get(id.as_str()), Some(&1), "message {id} must appear exactly once");
    }
    assert_eq!(messages.len(), ids.len());
    let mut by_conv: HashMap<String, Vec<(i32, i64, String)>> = HashMap::new();
    for m in &messages {
        by_conv.entry(m.key.clone()).or_default().push((
            m.partition,
            m.offset,
            m.value["id"].as_str().unwrap().into(),
        ));
    }
    for (conv, list) in by_conv {
        assert!(list.iter().all(|(p, _, _)| *p == list[0].0), "{conv} spans partitions");
        let mut in_offset_order = list.clone();
        in_offset_order.sort_by_key(|(_, o, _)| *o);
        let ids_by_offset: Vec<_> = in_offset_order.iter().map(|(_, _, id)| id.clone()).collect();
        let mut sorted = ids_by_offset.clone();
        sorted.sort(); // ULIDs sort in send order
        assert_eq!(ids_by_offset, sorted, "{conv} out of order");
    }
    let dm = messages.iter().find(|m| m.value["to"] == "bob").unwrap();
    assert_eq!((dm.value["from"].as_str(), dm.key.as_str()), (Some("alice"), "dm:5:alice:bob"));
    assert!(messages.iter().any(|m| m.value["clientMsgId"] == "c3"));

    let events = of(&got, "events.socket");
    for kind in ["connect", "join", "disconnect"] {
        assert!(
            events.iter().any(|e| e.value["type"] == kind && e.value["userId"] == "bob"),
            "no {kind} event"
        );
    }
    let bye = events.iter().find(|e| e.value["type"] == "disconnect").unwrap();
    // Dropping the test client resets the TCP connection: a transport-level close.
    assert!(
        ["client_closed", "transport_error"].contains(&bye.value["reason"].as_str().unwrap()),
        "{}",
        bye.value
    );
    let presence = of(&got, "presence.changes");
    assert!(presence.iter().any(|p| p.value["userId"] == "alice" && p.value["status"] == "online"));
    let notes = of(&got, "notifications");
    assert_eq!(
        (notes[0].value["userId"].as_str(), notes[0].value["from"].as_str()),
        (Some("dave"), Some("alice"))
    );
    assert_eq!(srv.metric("shardgate_kafka_failed_total"), 0);
}

/// Sends 1:1 message `i` from `alice` to bob, which must be acknowledged `delivered`
/// whatever the broker does; records its id.
fn send_to_bob(alice: &mut Client, i: usize, ids: &mut Vec<String>) {
    let ack = alice.emit_ack("message:send", json!({ "to": "bob", "content": i }));
    assert_eq!(ack["status"], "delivered", "chat goes on whatever the broker does");
    ids.push(ack["id"].as_str().unwrap().to_string());
}

/// Every message of `ids` is on the topic exactly once.
fn assert_each_once(got: &[Consumed], ids: &[String]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in got {
        *counts.entry(r.value["id"].as_str().unwrap()).or_default() += 1;
    }
    for id in ids {
        assert_eq!(counts.get(id.as_str()), Some(&1), "message {id} lost or duplicated");
    }
}

#[test]
fn chat_keeps_working_through_a_kafka_outage_and_nothing_is_lost() {
    // The broker is not there yet: records wait, chat goes on.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let srv = node(&addr);
    let mut alice = Client::connect(srv.addr, &token("alice", "t2"));
    let mut bob = Client::connect(srv.addr, &token("bob", "t2"));
    let mut ids = Vec::new();
    for i in 0..50 {
        send_to_bob(&mut alice, i, &mut ids);
    }
    let broker = Broker::start_on(port);
    // Now the broker stops answering for a while (SIGSTOP), then comes back.
    srv.wait_for("first records delivered", |s| s.metric("shardgate_kafka_delivered_total") >= 50);
    broker.pause();
    for i in 50..120 {
        send_to_bob(&mut alice, i, &mut ids);
    }
    for _ in 0..120 {
        bob.expect_event("message:new");
    }
    broker.resume();
    let got = consume(&broker.addr(), &["messages.t2"], 2, WAIT, |r| r.len() >= ids.len());
    assert_each_once(&got, &ids);
    assert_eq!(srv.metric("shardgate_kafka_dropped_total"), 0);
}

#[test]
fn a_broker_killed_and_restarted_loses_no_acknowledged_record() {
    let port = free_port();
    let mut broker = Broker::start_on(port);
    let srv = node(&broker.addr());
    let mut alice = Client::connect(srv.addr, &token("alice", "t4"));
    let mut bob = Client::connect(srv.addr, &token("bob", "t4"));
    let mut ids = Vec::new();
    for i in 0..50 {
        send_to_bob(&mut alice, i, &mut ids);
    }
    srv.wait_for("first records delivered", |s| s.metric("shardgate_kafka_delivered_total") >= 50);
    // kill -9: Kafka keeps what it acknowledged on disk; the node keeps chatting.
    broker.kill();
    for i in 50..120 {
        send_to_bob(&mut alice, i, &mut ids);
    }
    for _ in 0..120 {
        bob.expect_event("message:new");
    }
    broker.restart();
    let got = consume(&broker.addr(), &["messages.t4"], 2, WAIT, |r| r.len() >= ids.len());
    assert_each_once(&got, &ids);
    assert_eq!(srv.metric("shardgate_kafka_dropped_total"), 0);
}

#[test]
fn past_the_buffer_bound_the_newest_records_are_dropped_and_counted() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = "[kafka]\npartitions = 2\nproducer_queue = 10\nbuffer_records = 20\n";
    let srv = Server::start_with_config(&["--kafka", &addr, "--events-per-second", "10000"], Some(config));
    let mut alice = Client::connect(srv.addr, &token("alice", "t3"));
    let mut ids = Vec::new();
    for i in 0..100 {
        let ack = alice.emit_ack("message:send", json!({ "to": "nobody", "content": i }));
        assert_eq!(ack["status"], "queued", "chat goes on without Kafka");
        ids.push(ack["id"].as_str().unwrap().to_string());
    }
    srv.wait_for("drops counted", |s| s.metric("shardgate_kafka_dropped_total") > 0);
    let broker = Broker::start_on(port);
    srv.wait_for("buffer flushed", |s| s.metric("shardgate_kafka_buffered") == 0);
    let got = consume(&broker.addr(), &["messages.t3"], 2, Duration::from_secs(5), |_| false);
    let mut kept: Vec<String> = got.iter().map(|r| r.value["id"].as_str().unwrap().to_string()).collect();
    kept.sort();
    assert!(
        !kept.is_empty() && kept.len() < ids.len(),
        "kept {} of {}: {}\n{}",
        kept.len(),
        ids.len(),
        srv.log(),
        srv.get("/metrics").1
    );
    // The oldest survived, the newest were dropped.
    assert_eq!(kept, ids[..kept.len()].to_vec());
}

#[test]
fn cluster_mode_presence_changes_are_persisted() {
    presence_changes_persisted(support::redis::RedisServer::start());
}

/// The same on a real Redis Cluster (3 masters, 3 replicas).
#[test]
fn cluster_mode_presence_changes_are_persisted_on_a_redis_cluster() {
    presence_changes_persisted(support::redis::RedisServer::start_cluster(3));
}

fn presence_changes_persisted(redis: support::redis::RedisServer) {
    let broker = Broker::start_on(free_port());
    let url = redis.url();
    let srv = Server::start_with_config(&["--redis", &url, "--kafka", &broker.addr()], Some(CONFIG));
    srv.wait_for("redis up", |s| s.metric("shardgate_redis_up") == 1);
    let carol = Client::connect(srv.addr, &token("carol", "t4"));
    drop(carol);
    let got = consume(&broker.addr(), &["presence.changes"], 2, WAIT, |r| r.len() >= 2);
    let states: Vec<&str> = got
        .iter()
        .filter(|r| r.value["userId"] == "carol")
        .map(|r| r.value["status"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["online", "offline"]);
}
