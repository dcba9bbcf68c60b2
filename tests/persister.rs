//! `shardgate persist` end to end, with real Apache Kafka, real FerretDB and the official
//! MongoDB driver to read back: messages through nodes reach `messages` exactly once and
//! fold into `conversations` and `users` with the right counts, through a persister
//! killed with SIGKILL, MongoDB killed for a while, a Kafka broker killed with SIGKILL,
//! and two persisters in one group of which one dies; unreadable records go to the
//! dead-letter topic without stalling their partition; a new tenant's topic is picked
//! up without a restart.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::json;
use support::ferretdb::FerretDb;
use support::kafka::{consume, free_port, Broker};
use support::persister::{Mongo, Persister};
use support::redis::RedisServer;
use support::{token, Client, Server};

/// Long enough for a persister to catch up after a fault.
const CATCH_UP: Duration = Duration::from_secs(90);

fn send(from: &mut Client, arg: serde_json::Value, ids: &mut Vec<String>) {
    let ack = from.emit_ack("message:send", arg);
    assert!(ack["id"].is_string(), "{ack}");
    ids.push(ack["id"].as_str().unwrap().to_string());
}

fn node(brokers: &str, redis: Option<&RedisServer>) -> Server {
    let url = redis.map(RedisServer::url);
    let mut args = vec!["--shards", "2", "--kafka", brokers, "--events-per-second", "10000"];
    if let Some(u) = &url {
        args.extend_from_slice(&["--redis", u, "--liveness-ttl-ms", "600"]);
    }
    let s = Server::start_with_config(&args, Some("[kafka]\npartitions = 2\nlinger_ms = 2\n"));
    if redis.is_some() {
        s.wait_for("bridge connected to redis", |s| s.metric("shardgate_redis_up") == 1);
    }
    s
}

/// The stored message ids equal `ids` (each once, nothing else).
fn assert_exactly(mongo: &Mongo, filter: Document, ids: &[String]) {
    let got: Vec<String> =
        mongo.find("messages", filter).iter().map(|d| d.get_str("_id").unwrap().to_string()).collect();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(
        got.len(),
        ids.len(),
        "stored {} documents for {} acknowledged messages",
        got.len(),
        ids.len()
    );
    assert_eq!(got, want, "each acknowledged message once, nothing else");
}

/// Waits until conversation `conv` of tenant `t` counts `n` messages; returns it.
fn conversation(mongo: &Mongo, t: &str, conv: &str, n: i64) -> Document {
    let docs =
        mongo.wait_docs("conversations", doc! { "tenantId": t, "conversationId": conv }, CATCH_UP, |d| {
            d.first().is_some_and(|c| c.get_i64("messageCount") == Ok(n))
        });
    assert_eq!(docs.len(), 1, "{docs:?}");
    assert_eq!(docs[0].get_i64("messageCount"), Ok(n), "{:?}", docs[0]);
    docs[0].clone()
}

#[test]
fn messages_conversations_and_users_once_through_a_persister_crash_and_a_new_tenant() {
    let broker = Broker::start_on(free_port());
    let db = FerretDb::start();
    let url = db.url("chat");
    let srv = node(&broker.addr(), None);
    let mongo = Mongo::connect(&url);
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
    assert_eq!(mongo.wait_count("messages", doc! {}, 40, CATCH_UP), 40, "every message stored");

    // A persister killed mid-stream and restarted: still exactly once, counts right.
    persister.kill();
    for i in 30..50 {
        send(&mut bob, json!({ "to": "alice", "content": { "text": format!("reply {i}") } }), &mut ids);
    }
    let persister = Persister::start(&broker.addr(), &url);
    assert_eq!(mongo.wait_count("messages", doc! {}, 60, CATCH_UP), 60);
    assert_exactly(&mongo, doc! {}, &ids);
    let dm = conversation(&mongo, "t1", "dm:5:alice:bob", 50);
    let participants: Vec<&str> =
        dm.get_array("participants").unwrap().iter().filter_map(|b| b.as_str()).collect();
    assert_eq!((dm.get_str("type").unwrap(), participants), ("dm", vec!["alice", "bob"]));
    let last = dm.get_document("lastMessage").unwrap();
    assert_eq!((last.get_str("id").unwrap(), last.get_str("from").unwrap()), (ids[59].as_str(), "bob"));
    assert_eq!(last.get_str("preview").unwrap(), "reply 49");
    let room = conversation(&mongo, "t1", "room:lobby", 10);
    assert_eq!((room.get_str("type").unwrap(), room.get_str("room").unwrap()), ("room", "lobby"));

    // Users, from socket events and presence: online with one device each.
    let users = mongo.wait_docs("users", doc! { "tenantId": "t1" }, CATCH_UP, |u| {
        u.len() == 2
            && u.iter().all(|d| d.get_str("status") == Ok("online") && d.get_i64("devicesOnline") == Ok(1))
    });
    assert_eq!(users.len(), 2, "{users:?}");
    for u in &users {
        assert_eq!((u.get_str("status"), u.get_i64("devicesOnline")), (Ok("online"), Ok(1)), "{u:?}");
        assert!(u.get_i64("firstSeen").is_ok() && u.get_i64("lastSeen").is_ok(), "{u:?}");
    }
    // Bob leaves: offline, no device, lastSeen moved on.
    let seen_before = users[1].get_i64("lastSeen").unwrap();
    drop(bob);
    let gone = mongo.wait_docs("users", doc! { "userId": "bob" }, CATCH_UP, |u| {
        u.first().is_some_and(|d| d.get_str("status") == Ok("offline") && d.get_i64("devicesOnline") == Ok(0))
    });
    assert_eq!(gone[0].get_str("status"), Ok("offline"), "{gone:?}");
    assert!(gone[0].get_i64("lastSeen").unwrap() >= seen_before);

    // Unreadable records go to the dead-letter topic with their reason, and the partition
    // goes on: the messages after them are stored.
    let producer: BaseProducer =
        ClientConfig::new().set("bootstrap.servers", broker.addr()).create().unwrap();
    for bad in ["not json at all", r#"{"v":9,"type":"message"}"#] {
        producer.send(BaseRecord::<str, str>::to("messages.t1").key("room:lobby").payload(bad)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    for i in 50..53 {
        send(&mut alice, json!({ "room": "lobby", "content": { "n": i } }), &mut ids);
    }
    assert_eq!(mongo.wait_count("messages", doc! {}, 63, CATCH_UP), 63, "the partition did not stall");
    let dead = consume(&broker.addr(), &["dlq.messages"], 1, Duration::from_secs(30), |got| got.len() >= 2);
    let reasons: Vec<&str> = dead.iter().map(|d| d.value["reason"].as_str().unwrap()).collect();
    assert_eq!(dead.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("not JSON") && reasons[1].contains("unknown schema version"),
        "{reasons:?}"
    );
    assert_eq!(dead[1].value["topic"], "messages.t1");
    assert_eq!(dead[1].value["payload"], r#"{"v":9,"type":"message"}"#);
    conversation(&mongo, "t1", "room:lobby", 13);

    // A new tenant: its topic appears after the persister subscribed, and is consumed.
    let mut carol = Client::connect(srv.addr, &token("carol", "t2"));
    let _dave = Client::connect(srv.addr, &token("dave", "t2"));
    let mut t2 = Vec::new();
    for i in 0..5 {
        send(&mut carol, json!({ "to": "dave", "content": i }), &mut t2);
    }
    assert_eq!(
        mongo.wait_count("messages", doc! { "tenantId": "t2" }, 5, CATCH_UP),
        5,
        "the new tenant's topic"
    );
    let one = mongo.find("messages", doc! { "_id": &t2[0] });
    assert_eq!((one[0].get_str("from").unwrap(), one[0].get_str("to").unwrap()), ("carol", "dave"));
    conversation(&mongo, "t2", "dm:5:carol:dave", 5);

    // Progress on the persister's /metrics.
    assert!(
        persister.metric("shardgate_persister_messages_inserted_total") >= 13,
        "this persister's inserts"
    );
    assert!(persister.metric("shardgate_persister_dead_letters_total") == 2);
    assert!(persister.metric("shardgate_persister_batches_total") > 0);
    assert!(!persister.lag_partitions().is_empty(), "lag per assigned partition");
}

#[test]
fn mongodb_down_pauses_the_partitions_and_nothing_is_lost() {
    let broker = Broker::start_on(free_port());
    let mut db = FerretDb::start();
    let url = db.url("chat");
    let srv = node(&broker.addr(), None);
    let mongo = Mongo::connect(&url);
    let persister = Persister::start(&broker.addr(), &url);
    let mut alice = Client::connect(srv.addr, &token("alice", "t1"));
    let _bob = Client::connect(srv.addr, &token("bob", "t1"));
    let mut ids = Vec::new();
    for i in 0..20 {
        send(&mut alice, json!({ "to": "bob", "content": i }), &mut ids);
    }
    assert_eq!(mongo.wait_count("messages", doc! {}, 20, CATCH_UP), 20);

    db.kill();
    let started = Instant::now();
    for i in 20..60 {
        send(&mut alice, json!({ "to": "bob", "content": i }), &mut ids);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "chat does not wait for MongoDB");
    persister.wait_metric("shardgate_persister_paused", 1, "the partitions paused while MongoDB is down");
    std::thread::sleep(Duration::from_secs(3));
    assert!(persister.metric("shardgate_persister_write_errors_total") > 0);
    assert_eq!(persister.metric("shardgate_persister_paused"), 1, "still paused");

    db.restart();
    assert_eq!(mongo.wait_count("messages", doc! {}, 60, CATCH_UP), 60, "caught up");
    assert_exactly(&mongo, doc! {}, &ids);
    conversation(&mongo, "t1", "dm:5:alice:bob", 60);
    persister.wait_metric("shardgate_persister_paused", 0, "the partitions resumed");
    assert!(persister.metric("shardgate_persister_pauses_total") >= 1);
}

#[test]
fn two_persisters_split_the_partitions_and_one_carries_on_alone() {
    let broker = Broker::start_on(free_port());
    let db = FerretDb::start();
    let url = db.url("chat");
    let srv = node(&broker.addr(), None);
    let mongo = Mongo::connect(&url);
    let mut users: Vec<Client> =
        (0..8).map(|i| Client::connect(srv.addr, &token(&format!("u{i}"), "t1"))).collect();
    // The messages topic exists (2 partitions) before the group forms.
    let mut ids = Vec::new();
    send(&mut users[0], json!({ "to": "u1", "content": "first" }), &mut ids);
    let mut one = Persister::start(&broker.addr(), &url);
    let two = Persister::start(&broker.addr(), &url);
    let end = Instant::now() + CATCH_UP;
    let (a, b) = loop {
        let (a, b) = (one.lag_partitions(), two.lag_partitions());
        let shares = |p: &[String]| p.iter().filter(|l| l.contains("messages.t1")).count();
        if shares(&a) == 1 && shares(&b) == 1 {
            break (a, b);
        }
        assert!(Instant::now() < end, "the two members did not split messages.t1: {a:?} / {b:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let a: BTreeSet<_> = a.into_iter().collect();
    assert!(b.iter().all(|p| !a.contains(p)), "disjoint assignments: {a:?} / {b:?}");
    for round in 0..5 {
        for (i, u) in users.iter_mut().enumerate() {
            let to = format!("u{}", (i + 1 + round) % 8);
            send(u, json!({ "to": to, "content": [round, i] }), &mut ids);
        }
    }
    assert_eq!(mongo.wait_count("messages", doc! {}, ids.len() as u64, CATCH_UP), ids.len() as u64);
    assert!(one.metric("shardgate_persister_messages_inserted_total") > 0, "both members wrote");
    assert!(two.metric("shardgate_persister_messages_inserted_total") > 0, "both members wrote");

    // One dies: the other takes its partitions after the session timeout.
    one.kill();
    for round in 5..10 {
        for (i, u) in users.iter_mut().enumerate() {
            let to = format!("u{}", (i + 1 + round) % 8);
            send(u, json!({ "to": to, "content": [round, i] }), &mut ids);
        }
    }
    assert_eq!(mongo.wait_count("messages", doc! {}, ids.len() as u64, CATCH_UP), ids.len() as u64);
    assert_exactly(&mongo, doc! {}, &ids);
    let total: i64 = mongo
        .wait_docs("conversations", doc! {}, CATCH_UP, |c| {
            c.iter().map(|d| d.get_i64("messageCount").unwrap_or(0)).sum::<i64>() == ids.len() as i64
        })
        .iter()
        .map(|d| d.get_i64("messageCount").unwrap())
        .sum();
    assert_eq!(total, ids.len() as i64, "every message counted once in its conversation");
}

#[test]
fn three_nodes_through_a_broker_crash_store_every_acknowledged_message_once() {
    let redis = RedisServer::start();
    let mut broker = Broker::start_on(free_port());
    let db = FerretDb::start();
    let url = db.url("chat");
    let nodes: Vec<Server> = (0..3).map(|_| node(&broker.addr(), Some(&redis))).collect();
    let mongo = Mongo::connect(&url);
    let _persister = Persister::start(&broker.addr(), &url);
    let names = ["ann", "ben", "cat", "dan", "eve", "fay"];
    let mut clients: Vec<Client> =
        names.iter().enumerate().map(|(i, n)| Client::connect(nodes[i % 3].addr, &token(n, "t1"))).collect();
    for c in &mut clients {
        assert_eq!(c.emit_ack("join_room", json!("all"))["ok"], true);
    }
    let mut ids = Vec::new();
    let chat = |clients: &mut Vec<Client>, round: usize, ids: &mut Vec<String>| {
        for i in 0..clients.len() {
            let arg = if (round + i) % 3 == 0 {
                json!({ "room": "all", "content": [round, i] })
            } else {
                json!({ "to": names[(i + 1) % names.len()], "content": [round, i] })
            };
            send(&mut clients[i], arg, ids);
        }
    };
    for round in 0..10 {
        chat(&mut clients, round, &mut ids);
    }
    // The broker dies; chat goes on, acknowledged as fast as ever.
    broker.kill();
    let started = Instant::now();
    for round in 10..30 {
        chat(&mut clients, round, &mut ids);
    }
    assert!(started.elapsed() < Duration::from_secs(10), "chat waited for Kafka: {:?}", started.elapsed());
    std::thread::sleep(Duration::from_secs(5));
    broker.restart();
    for round in 30..40 {
        chat(&mut clients, round, &mut ids);
    }
    assert_eq!(mongo.wait_count("messages", doc! {}, ids.len() as u64, CATCH_UP), ids.len() as u64);
    assert_exactly(&mongo, doc! {}, &ids);
    for n in &nodes {
        assert_eq!(n.metric("shardgate_kafka_dropped_total"), 0);
    }
    // Every conversation counts its own messages once.
    let stored = mongo.find("messages", doc! {});
    let mut want = std::collections::BTreeMap::<String, i64>::new();
    for m in &stored {
        *want.entry(m.get_str("conversationId").unwrap().to_string()).or_default() += 1;
    }
    for (conv, n) in want {
        conversation(&mongo, "t1", &conv, n);
    }
}

#[test]
fn history_pages_through_what_the_persister_stored() {
    let broker = Broker::start_on(free_port());
    let mut db = FerretDb::start();
    let url = db.url("chat");
    let srv = Server::start_with_config(
        &["--shards", "2", "--kafka", &broker.addr(), "--mongodb", &url, "--events-per-second", "10000"],
        Some("[kafka]\npartitions = 2\nlinger_ms = 2\n[mongodb]\nhistory_timeout_ms = 1500\n"),
    );
    let mongo = Mongo::connect(&url);
    let _persister = Persister::start(&broker.addr(), &url);
    let mut alice = Client::connect(srv.addr, &token("alice", "t1"));
    let mut bob = Client::connect(srv.addr, &token("bob", "t1"));
    let mut carol = Client::connect(srv.addr, &token("carol", "t1"));
    let mut mallory = Client::connect(srv.addr, &token("mallory", "t2"));
    assert_eq!(alice.emit_ack("join_room", json!("lobby"))["ok"], true);
    let (mut dm, mut room) = (Vec::new(), Vec::new());
    for i in 0..25 {
        let (from, to) = if i % 2 == 0 { (&mut alice, "bob") } else { (&mut bob, "alice") };
        send(
            from,
            json!({ "to": to, "content": { "text": format!("m{i}") }, "clientMsgId": format!("c{i}") }),
            &mut dm,
        );
    }
    for i in 0..5 {
        send(&mut alice, json!({ "room": "lobby", "content": i }), &mut room);
    }
    assert_eq!(mongo.wait_count("messages", doc! {}, 30, CATCH_UP), 30);

    // Pages of 10, newest first, each with the cursor of the next; the last has none.
    let mut seen = Vec::new();
    let mut before = serde_json::Value::Null;
    for want in [10, 10, 5] {
        let page = alice.emit_ack("history:fetch", json!({ "with": "bob", "limit": 10, "before": before }));
        assert_eq!(page["ok"], true, "{page}");
        let msgs = page["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), want, "{page}");
        seen.extend(msgs.iter().map(|m| m["id"].as_str().unwrap().to_string()));
        before = page["before"].clone();
        assert_eq!(before.is_string(), want == 10, "{page}");
    }
    // Newest first by id: ids are send times (ms) and, within one millisecond, the order
    // of the shard that made them; two senders' messages of the same millisecond sort by
    // id, not by arrival.
    let mut newest_first = dm.clone();
    newest_first.sort();
    newest_first.reverse();
    assert_eq!(seen, newest_first, "the whole conversation, newest first, once");
    // Message objects as message:new carried them.
    let last = &bob.emit_ack("history:fetch", json!({ "with": "alice", "limit": 1 }))["messages"][0];
    assert_eq!(last["id"], json!(newest_first[0]));
    let i = dm.iter().position(|id| *id == newest_first[0]).unwrap();
    let (from, to) = if i % 2 == 0 { ("alice", "bob") } else { ("bob", "alice") };
    assert_eq!((last["from"].as_str(), last["to"].as_str()), (Some(from), Some(to)));
    let (text, client_id) = (format!("m{i}"), format!("c{i}"));
    assert_eq!(
        (last["content"]["text"].as_str(), last["clientMsgId"].as_str()),
        (Some(&*text), Some(&*client_id))
    );
    assert!(last["ts"].as_i64().unwrap() > 1_700_000_000_000, "{last}");
    assert!(last.get("tenantId").is_none() && last.get("conversationId").is_none(), "{last}");
    // The default page holds the whole 25.
    assert_eq!(
        bob.emit_ack("history:fetch", json!({ "with": "alice" }))["messages"].as_array().unwrap().len(),
        25
    );

    // Rooms: members only.
    let page = alice.emit_ack("history:fetch", json!({ "room": "lobby" }));
    let ids: Vec<&str> =
        page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, room.iter().rev().map(String::as_str).collect::<Vec<_>>(), "one sender: send order");
    let code = |c: &mut Client, arg: serde_json::Value| c.emit_ack("history:fetch", arg)["code"].clone();
    assert_eq!(code(&mut carol, json!({ "room": "lobby" })), "not_in_room");
    // Each refusal has its own code.
    assert_eq!(code(&mut alice, json!({ "with": "bob", "limit": 101 })), "limit_too_large");
    assert_eq!(code(&mut alice, json!({ "with": "bob", "before": "not-an-id" })), "bad_cursor");
    assert_eq!(code(&mut alice, json!({ "with": "bob", "before": room[2] })), "bad_cursor");
    assert_eq!(code(&mut mallory, json!({ "with": "alice", "before": dm[3] })), "other_tenant");
    assert_eq!(code(&mut alice, json!({ "with": "bob", "room": "lobby" })), "invalid_history");
    // Another tenant reads its own (empty) conversation with the same user names.
    let other = mallory.emit_ack("history:fetch", json!({ "with": "alice" }));
    assert_eq!((other["ok"].clone(), other["messages"].as_array().map(Vec::len)), (json!(true), Some(0)));

    // The store gone: a clear error within the timeout, and the node keeps chatting.
    db.kill();
    let started = Instant::now();
    let down = alice.emit_ack("history:fetch", json!({ "with": "bob" }));
    assert!(
        down["code"] == "history_timeout" || down["code"] == "history_unavailable",
        "{down} after {:?}",
        started.elapsed()
    );
    let mut more = Vec::new();
    send(&mut alice, json!({ "to": "bob", "content": "still here" }), &mut more);
    assert!(srv.metric("shardgate_history_errors_total") >= 1);
    db.restart();
    let end = Instant::now() + CATCH_UP;
    loop {
        let page = alice.emit_ack("history:fetch", json!({ "with": "bob", "limit": 1 }));
        if page["ok"] == true && page["messages"][0]["id"] == json!(more[0]) {
            break;
        }
        assert!(Instant::now() < end, "history did not come back: {page}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // A node without a store says so.
    let plain = Server::start(&[]);
    let mut dora = Client::connect(plain.addr, &token("dora", "t1"));
    assert_eq!(code(&mut dora, json!({ "with": "bob" })), "history_off");
}
