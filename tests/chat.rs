//! Chat behaviour of a single node, driven through the real binary with the workspace's
//! Socket.IO test client: auth, rooms, 1:1 across shards, acks, offline queue, presence,
//! typing and tenant isolation.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{token, token_with, Client, Incoming, Server};

#[test]
fn connect_with_token_from_auth_header_or_query() {
    let srv = Server::start(&["--shards", "2"]);
    let c = Client::connect(srv.addr, &token("alice", "t1"));
    assert_eq!(c.open.upgrades, Vec::<String>::new());
    assert!(c.open.ping_interval > 0 && c.open.max_payload > 0);

    let hdr = format!("Authorization: Bearer {}\r\n", token("bob", "t1"));
    let mut c = Client::upgrade(srv.addr, "", &hdr);
    assert!(c.sio_connect(None).is_ok());

    let q = format!("&token={}", token("carol", "t1"));
    let mut c = Client::upgrade(srv.addr, &q, "");
    assert!(c.sio_connect(Some(json!({}))).is_ok());
}

#[test]
fn bad_tokens_are_refused_with_a_reason_then_closed() {
    let srv = Server::start(&[]);
    let forged = {
        let t = token("alice", "t1");
        let (head, _) = t.rsplit_once('.').unwrap();
        format!("{head}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    };
    let expired = token_with("alice", "t1", -3600, None);
    let payload = token("alice", "t1").split('.').nth(1).unwrap().to_string();
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    for (tok, want) in [
        (Some(forged), "invalid token signature"),
        (Some(expired), "token expired"),
        (Some(none), "token algorithm not accepted"),
        (Some("not-a-jwt".to_string()), "malformed token"),
        (None, "authentication required"),
    ] {
        let mut c = Client::upgrade(srv.addr, "", "");
        let auth = tok.map(|t| json!({ "token": t }));
        let err = c.sio_connect(auth).expect_err("token must be refused");
        let msg = err["message"].as_str().unwrap();
        assert!(msg.contains(want), "{msg} should contain {want}");
        assert_eq!(err["data"]["code"], "auth_failed");
        let (code, reason) = c.expect_closed();
        assert_eq!((code, reason.as_str()), (1008, "auth_failed"));
    }
    srv.wait_for("auth failures counted", |s| s.metric("shardgate_auth_failures_total") == 5);
    assert_eq!(srv.metric("shardgate_connections_closed_total{reason=\"auth_failed\"}"), 5);
}

#[test]
fn events_before_connect_close_the_connection() {
    let srv = Server::start(&[]);
    let mut c = Client::upgrade(srv.addr, "", "");
    c.emit("join_room", json!("r"));
    assert_eq!(c.expect_closed().1, "malformed_packet");
}

#[test]
fn unknown_namespace_gets_connect_error() {
    let srv = Server::start(&[]);
    let mut c = Client::upgrade(srv.addr, "", "");
    c.send_text(&format!("40/admin,{{\"token\":\"{}\"}}", token("a", "t")));
    let end = std::time::Instant::now() + support::WAIT;
    let mut saw_error = false;
    while let Some(i) = c.recv_until(end) {
        match i {
            Incoming::ConnectError(d) => {
                assert_eq!(d["message"], "Invalid namespace");
                saw_error = true;
            }
            Incoming::Closed(_, r) => {
                assert_eq!(r, "invalid_namespace");
                break;
            }
            _ => {}
        }
    }
    assert!(saw_error);
}

#[test]
fn room_messages_reach_every_member_once_across_shards() {
    let srv = Server::start(&["--shards", "3"]);
    let mut members: Vec<Client> =
        (0..9).map(|i| Client::connect(srv.addr, &token(&format!("u{i}"), "t1"))).collect();
    let shards: std::collections::HashSet<usize> = members.iter().map(Client::shard).collect();
    assert!(shards.len() >= 2, "members should spread over shards: {shards:?}");
    for m in members.iter_mut() {
        let ack = m.emit_ack("join_room", json!("lobby"));
        assert_eq!(ack, json!({ "ok": true, "room": "lobby" }));
        assert_eq!(m.expect_event("room_joined"), json!({ "room": "lobby" }));
    }
    let ack = members[0]
        .emit_ack("message:send", json!({ "room": "lobby", "content": "hello", "clientMsgId": "m1" }));
    assert_eq!(ack["status"], "sent");
    assert_eq!(ack["clientMsgId"], "m1");
    let id = ack["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 26, "ULID");
    for m in members.iter_mut().skip(1) {
        let msg = m.expect_event("message:new");
        assert_eq!(
            (msg["id"].as_str(), &msg["room"], &msg["from"], &msg["content"]),
            (Some(id.as_str()), &json!("lobby"), &json!("u0"), &json!("hello"))
        );
        m.expect_no_event("message:new", Duration::from_millis(100));
    }
    members[0].expect_no_event("message:new", Duration::from_millis(200));

    // Leaving stops delivery; sending to a room one is not in is refused.
    let ack = members[1].emit_ack("leave_room", json!("lobby"));
    assert_eq!(ack["ok"], true);
    let ack = members[1].emit_ack("message:send", json!({ "room": "lobby", "content": "x" }));
    assert_eq!(ack["code"], "not_in_room");
    members[2].emit_ack("message:send", json!({ "room": "lobby", "content": "again" }));
    members[1].expect_no_event("message:new", Duration::from_millis(300));
    assert_eq!(members[3].expect_event("message:new")["content"], "again");
}

#[test]
fn direct_messages_cross_shards_with_acks_and_reach_every_device() {
    let srv = Server::start(&["--shards", "2"]);
    let alice = Client::connect(srv.addr, &token("alice", "t1"));
    // Bob's devices: keep connecting until one sits on a shard other than Alice's.
    let mut bobs: Vec<Client> = Vec::new();
    while bobs.iter().all(|b| b.shard() == alice.shard()) {
        assert!(bobs.len() < 40, "SO_REUSEPORT never spread connections");
        bobs.push(Client::connect(srv.addr, &token("bob", "t1")));
    }
    let mut alice = alice;
    let ack =
        alice.emit_ack("message:send", json!({ "to": "bob", "content": { "text": "hi" }, "clientMsgId": 7 }));
    assert_eq!(ack["status"], "delivered");
    assert_eq!(ack["clientMsgId"], 7);
    let sent = alice.expect_event("message:sent");
    assert_eq!(sent, ack);
    for b in bobs.iter_mut() {
        let m = b.expect_event("message:new");
        assert_eq!(
            (&m["from"], &m["to"], &m["content"]["text"]),
            (&json!("alice"), &json!("bob"), &json!("hi"))
        );
        assert_eq!(m["id"], ack["id"]);
    }
}

#[test]
fn offline_messages_are_queued_and_drained_in_order() {
    let srv = Server::start(&["--shards", "2"]);
    let mut alice = Client::connect(srv.addr, &token("alice", "t1"));
    for i in 0..5 {
        let ack = alice.emit_ack("message:send", json!({ "to": "dave", "content": i }));
        assert_eq!(ack["status"], "queued");
    }
    let mut dave = Client::connect(srv.addr, &token("dave", "t1"));
    for i in 0..5 {
        assert_eq!(dave.expect_event("message:new")["content"], i);
    }
    // Drained once: a second device sees nothing old.
    let mut dave2 = Client::connect(srv.addr, &token("dave", "t1"));
    dave2.expect_no_event("message:new", Duration::from_millis(300));
    assert_eq!(srv.metric("shardgate_offline_queued_total"), 5);
}

#[test]
fn presence_is_multi_device_aware() {
    let srv = Server::start(&["--shards", "2"]);
    let mut watcher = Client::connect(srv.addr, &token("watcher", "t1"));
    assert_eq!(watcher.emit_ack("presence:subscribe", json!(["erin"]))["ok"], true);
    let p = watcher.expect_event("presence");
    assert_eq!((&p["userId"], &p["status"]), (&json!("erin"), &json!("offline")));

    let e1 = Client::connect(srv.addr, &token("erin", "t1"));
    let p = watcher.expect_event("presence");
    assert_eq!(p["status"], "online");
    let e2 = Client::connect(srv.addr, &token("erin", "t1"));
    drop(e1);
    watcher.expect_no_event("presence", Duration::from_millis(400));
    drop(e2);
    let p = watcher.expect_event("presence");
    assert_eq!(p["status"], "offline");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let last_seen = p["lastSeen"].as_u64().unwrap();
    assert!(now - last_seen < 5_000, "lastSeen {last_seen} vs now {now}");

    assert_eq!(watcher.emit_ack("presence:unsubscribe", json!(["erin"]))["ok"], true);
    let _e3 = Client::connect(srv.addr, &token("erin", "t1"));
    watcher.expect_no_event("presence", Duration::from_millis(300));
}

#[test]
fn typing_indicators_broadcast_and_expire() {
    let srv = Server::start_with_config(&["--shards", "2"], Some("[runtime]\ntyping_ttl_ms = 300\n"));
    let mut a = Client::connect(srv.addr, &token("a", "t1"));
    let mut b = Client::connect(srv.addr, &token("b", "t1"));
    a.emit_ack("join_room", json!("r"));
    b.emit_ack("join_room", json!("r"));
    assert_eq!(a.emit_ack("typing:start", json!({ "room": "r" }))["ok"], true);
    let t = b.expect_event("typing");
    assert_eq!(t, json!({ "room": "r", "userId": "a", "typing": true }));
    // Expires on its own.
    let t = b.expect_event("typing");
    assert_eq!(t["typing"], false);
    a.emit_ack("typing:start", json!({ "room": "r" }));
    assert_eq!(b.expect_event("typing")["typing"], true);
    a.emit_ack("typing:stop", json!({ "room": "r" }));
    assert_eq!(b.expect_event("typing")["typing"], false);
    a.expect_no_event("typing", Duration::from_millis(100));
}

#[test]
fn tenants_never_see_each_other() {
    let srv = Server::start(&["--shards", "2"]);
    let mut a1 = Client::connect(srv.addr, &token("alice", "t1"));
    let mut a2 = Client::connect(srv.addr, &token("alice", "t2"));
    let mut b2 = Client::connect(srv.addr, &token("bob", "t2"));
    for c in [&mut a1, &mut a2, &mut b2] {
        c.emit_ack("join_room", json!("shared-name"));
    }
    a1.emit_ack("message:send", json!({ "room": "shared-name", "content": "t1 only" }));
    b2.expect_no_event("message:new", Duration::from_millis(300));
    // "bob" of t1 does not exist: t2's bob must not get it, it is queued for t1's bob.
    let ack = a1.emit_ack("message:send", json!({ "to": "bob", "content": "t1 bob" }));
    assert_eq!(ack["status"], "queued");
    b2.expect_no_event("message:new", Duration::from_millis(300));
    // Presence of t2's alice is not visible to t1.
    a1.emit_ack("presence:subscribe", json!(["bob"]));
    assert_eq!(a1.expect_event("presence")["status"], "offline");
    a2.expect_no_event("message:new", Duration::from_millis(100));
}

#[test]
fn binary_attachments_are_forwarded() {
    let srv = Server::start(&["--shards", "2"]);
    let mut a = Client::connect(srv.addr, &token("a", "t1"));
    let mut b = Client::connect(srv.addr, &token("b", "t1"));
    let blob: Vec<u8> = (0..=255).collect();
    a.emit_binary(
        "message:send",
        json!({ "to": "b", "content": { "_placeholder": true, "num": 0 } }),
        &[&blob],
    );
    let (m, bins) = b.expect_event_full("message:new");
    assert_eq!(m["content"], json!({ "_placeholder": true, "num": 0 }));
    assert_eq!(bins, vec![blob]);
}

#[test]
fn permissions_claim_limits_events() {
    let srv = Server::start(&[]);
    let mut c = Client::connect(srv.addr, &token_with("ro", "t1", 3600, Some(&["room:join"])));
    assert_eq!(c.emit_ack("join_room", json!("r"))["ok"], true);
    let ack = c.emit_ack("message:send", json!({ "room": "r", "content": "x" }));
    assert_eq!(ack["code"], "forbidden");
    let e = c.expect_event("error");
    assert_eq!(e["event"], "message:send");
}

#[test]
fn invalid_arguments_get_specific_errors() {
    let srv = Server::start(&[]);
    let mut c = Client::connect(srv.addr, &token("a", "t1"));
    assert_eq!(c.emit_ack("join_room", json!(""))["code"], "invalid_room");
    assert_eq!(c.emit_ack("join_room", json!("x".repeat(200)))["code"], "invalid_room");
    assert_eq!(c.emit_ack("message:send", json!({ "content": "x" }))["code"], "invalid_message");
    assert_eq!(c.emit_ack("message:send", json!({ "to": "b" }))["code"], "invalid_message");
    assert_eq!(
        c.emit_ack("message:send", json!({ "to": "b", "room": "r", "content": 1 }))["code"],
        "invalid_message"
    );
    assert_eq!(c.emit_ack("no:such:event", json!(1))["code"], "unknown_event");
    assert_eq!(c.emit_ack("presence:subscribe", json!(42))["code"], "invalid_users");
}
