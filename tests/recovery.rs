//! Connection state recovery (`--recovery`, docs/recovery.md) on nodes sharing one real
//! redis-server: a session restored on another node with its rooms and every message
//! it missed, in order, once; refusals (another user's pid, a guessed one, an expired
//! session) connect as new sessions and are counted. The official client's view of the
//! same, with a node killed and another drained under traffic, is
//! `tests/interop/recovery.test.mjs`. Every test with Redis runs on a single redis-server
//! and again on a real Redis Cluster of 3 masters and 3 replicas (`on_both!` at the end).

#[macro_use]
mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::redis::RedisServer;
use support::{token, Client, Server};

fn node(redis: &RedisServer, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--shards", "2", "--redis", url.as_str(), "--liveness-ttl-ms", "600", "--recovery"];
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    s.wait_for("bridge connected to redis", |s| s.metric("shardgate_redis_up") == 1);
    if redis.is_cluster() {
        s.wait_for("connected in cluster mode", |s| {
            s.log().contains("connected to the redis cluster: 3 masters")
        });
    }
    s
}

/// Connects with a recovery claim (`pid`, `offset`).
fn reconnect(srv: &Server, token: &str, pid: &str, offset: Option<&str>) -> Client {
    let mut c = Client::upgrade(srv.addr, "", "");
    let r = c.sio_connect(Some(json!({ "token": token, "pid": pid, "offset": offset })));
    assert!(r.is_ok(), "connect refused: {r:?}");
    c
}

/// Content and offset of the next `message:new`.
fn next_message(c: &mut Client) -> (String, String) {
    let args = c.expect_event_args("message:new");
    let content = args[0]["content"].as_str().unwrap_or_default().to_string();
    (content, args.get(1).and_then(Value::as_str).unwrap_or_default().to_string())
}

fn a_session_is_restored_on_another_node_with_its_rooms_and_missed_messages(redis: RedisServer) {
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    restore_scenario(&a, &b);
    // One sequence numbered every recoverable message, in the recovery slot.
    let seq = match redis.cmd(&["GET", "{recovery}:seq"]) {
        shardgate_io::resp::Reply::BulkString(b) => String::from_utf8_lossy(&b).parse::<u64>().unwrap_or(0),
        other => panic!("{other:?}"),
    };
    assert!(seq > 0);
}

/// The same protocol on the embedded bus: within one process, on any of its shards.
#[test]
fn a_session_is_restored_within_one_process_without_redis() {
    let a = Server::start(&["--shards", "2", "--recovery"]);
    restore_scenario(&a, &a);
    // Every shard takes restored sessions: reconnect until one lands on the other shard.
    let mut ann = Client::connect(a.addr, &token("cat", "t1"));
    let first = ann.shard();
    let pid = ann.pid.clone().unwrap();
    for _ in 0..20 {
        drop(ann);
        ann = reconnect(&a, &token("cat", "t1"), &pid, None);
        assert_eq!(ann.pid.as_deref(), Some(pid.as_str()));
        if ann.shard() != first {
            return;
        }
    }
    panic!("20 reconnects all landed on shard {first}");
}

/// Ann (on `a`) and bob (on `b`) in a room; ann drops, misses room and 1:1 messages,
/// and comes back on `b` with her pid and offset.
fn restore_scenario(a: &Server, b: &Server) {
    let mut ann = Client::connect(a.addr, &token("ann", "t1"));
    let mut bob = Client::connect(b.addr, &token("bob", "t1"));
    let pid = ann.pid.clone().expect("a pid in the CONNECT answer");
    assert_eq!(pid.len(), 32);
    assert_ne!(bob.pid, ann.pid);
    for c in [&mut ann, &mut bob] {
        assert_eq!(c.emit_ack("join_room", json!("lobby"))["ok"], true);
    }
    // Live messages carry their offset; a room message reaches the other member only.
    assert_eq!(bob.emit_ack("message:send", json!({ "room": "lobby", "content": "r0" }))["status"], "sent");
    let (content, offset) = next_message(&mut ann);
    assert_eq!(content, "r0");
    assert!(offset.parse::<u64>().is_ok(), "offset {offset:?}");
    bob.expect_no_event("message:new", Duration::from_millis(200));

    // Ann's transport dies; while she is away bob sends to the room and to her.
    drop(ann);
    a.wait_for("ann's socket closed", |s| {
        s.metric("shardgate_sessions_open") == u64::from(std::ptr::eq(a, b))
    });
    for i in 1..=3 {
        bob.emit_ack("message:send", json!({ "room": "lobby", "content": format!("r{i}") }));
        let ack = bob.emit_ack("message:send", json!({ "to": "ann", "content": format!("d{i}") }));
        assert_eq!(ack["status"], "queued", "{ack}");
    }
    // She comes back on node b with her pid and offset: same pid, missed messages in
    // order, once, then live ones; still in the room without joining it again.
    let mut ann = reconnect(b, &token("ann", "t1"), &pid, Some(&offset));
    assert_eq!(ann.pid.as_deref(), Some(pid.as_str()), "recovered: the same pid");
    let mut last = offset.parse::<u64>().unwrap();
    let mut got = Vec::new();
    for _ in 0..6 {
        let (content, off) = next_message(&mut ann);
        let off: u64 = off.parse().unwrap();
        assert!(off > last, "offsets increase: {off} after {last}");
        last = off;
        got.push(content);
    }
    assert_eq!(got, ["r1", "d1", "r2", "d2", "r3", "d3"]);
    ann.expect_no_event("message:new", Duration::from_millis(300));
    bob.emit_ack("message:send", json!({ "room": "lobby", "content": "live" }));
    assert_eq!(next_message(&mut ann).0, "live");
    assert_eq!(b.metric("shardgate_recovery_restored_total"), 1);
    assert_eq!(b.metric("shardgate_recovery_replayed_total"), 6);
    // The queued 1:1 messages came with the replay, not again from the offline queue.
    ann.expect_no_event("message:new", Duration::from_millis(300));
}

fn a_pid_restores_nothing_for_another_user_when_guessed_or_expired(redis: RedisServer) {
    let a = node(&redis, &["--max-disconnection-ms", "400"]);
    let mut ann = Client::connect(a.addr, &token("ann", "t1"));
    assert_eq!(ann.emit_ack("join_room", json!("lobby"))["ok"], true);
    let pid = ann.pid.clone().unwrap();
    drop(ann);
    a.wait_for("ann's socket closed", |s| s.metric("shardgate_sessions_open") == 0);

    // Another user presenting ann's pid, or ann's pid in another tenant: a new session.
    for t in [token("eve", "t1"), token("ann", "t2")] {
        let mut c = reconnect(&a, &t, &pid, Some("0"));
        assert_ne!(c.pid.as_deref(), Some(pid.as_str()));
        let ack = c.emit_ack("message:send", json!({ "room": "lobby", "content": "x" }));
        assert_eq!(ack["code"], "not_in_room", "no rooms were restored: {ack}");
    }
    assert_eq!(a.metric("shardgate_recovery_refused_other_user_total"), 2);
    // A guessed pid, and one that is not even a pid.
    let guess = reconnect(&a, &token("ann", "t1"), "0123456789abcdef0123456789abcdef", None);
    assert_ne!(guess.pid.as_deref(), Some(pid.as_str()));
    let junk = reconnect(&a, &token("ann", "t1"), "../x", None);
    assert!(junk.pid.as_deref().is_some_and(|p| p != pid && p.len() == 32));
    assert_eq!(a.metric("shardgate_recovery_refused_unknown_total"), 1);

    // The session itself is still there; after max_disconnection_ms it is not.
    drop((guess, junk));
    std::thread::sleep(Duration::from_millis(600));
    let c = reconnect(&a, &token("ann", "t1"), &pid, Some("0"));
    assert_ne!(c.pid.as_deref(), Some(pid.as_str()), "expired");
    assert_eq!(a.metric("shardgate_recovery_refused_unknown_total"), 2);
    assert_eq!(a.metric("shardgate_recovery_restored_total"), 0);
}

fn a_client_that_said_goodbye_has_no_session_to_restore(redis: RedisServer) {
    let a = node(&redis, &[]);
    let mut ann = Client::connect(a.addr, &token("ann", "t1"));
    let pid = ann.pid.clone().unwrap();
    ann.send_text("41");
    assert_eq!(ann.expect_closed().0, 1000);
    a.wait_for("ann's socket closed", |s| s.metric("shardgate_sessions_open") == 0);
    let c = reconnect(&a, &token("ann", "t1"), &pid, None);
    assert_ne!(c.pid.as_deref(), Some(pid.as_str()));
    assert_eq!(a.metric("shardgate_recovery_refused_unknown_total"), 1);
}

/// Three nodes on one Redis behind the interop suite's balancer, stopped as `steps` says
/// (`tests/interop/recovery.test.mjs`); returns the restored sessions and replayed
/// messages counted by the nodes left.
fn three_nodes_stopped(redis: RedisServer, steps: &str) -> (u64, u64) {
    let nodes: Vec<Server> = (0..3).map(|_| node(&redis, &["--drain-ms", "1000"])).collect();
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    let pids: Vec<String> = nodes.iter().map(|n| n.pid().to_string()).collect();
    let env = [
        ("SHARDGATE_ADDRS", addrs.join(",")),
        ("SHARDGATE_PIDS", pids.join(",")),
        ("SHARDGATE_STEPS", steps.to_string()),
    ];
    let out = support::interop_suite("recovery.test.mjs", &env, || {
        nodes.iter().map(|n| n.log()).collect::<Vec<_>>().join("\n---\n")
    });
    assert!(out.contains("all recovered"), "{out}");
    let stopped: Vec<&str> = steps.split(',').filter_map(|s| s.split(':').nth(1)).collect();
    let survivors = nodes.iter().enumerate().filter(|(i, _)| !stopped.contains(&i.to_string().as_str()));
    let sum = |name: &str| survivors.clone().map(|(_, n)| n.metric(name)).sum::<u64>();
    let counts = (sum("shardgate_recovery_restored_total"), sum("shardgate_recovery_replayed_total"));
    println!("restored {} sessions, replayed {} messages", counts.0, counts.1);
    counts
}

fn the_official_client_recovers_after_a_node_is_killed(redis: RedisServer) {
    let (restored, _) = three_nodes_stopped(redis, "SIGKILL:2");
    assert!(restored > 0);
}

fn the_official_client_recovers_after_a_node_is_drained_then_another_killed(redis: RedisServer) {
    let (restored, _) = three_nodes_stopped(redis, "SIGTERM:1,SIGKILL:2");
    assert!(restored > 0);
}

/// On WebSocket, on the client's default (long-polling, then the upgrade) and on
/// long-polling alone, where a dropped transport is an Engine.IO close (not a goodbye).
#[test]
fn the_official_client_recovers_from_transport_drops_without_redis() {
    let srv = Server::start(&["--shards", "2", "--recovery"]);
    for (i, transports) in ["websocket", "default", "polling"].into_iter().enumerate() {
        let env = [
            ("SHARDGATE_URL", format!("http://{}", srv.addr)),
            ("SHARDGATE_TRANSPORTS", transports.to_string()),
            ("SHARDGATE_TENANT", format!("one-{transports}")),
        ];
        let out = support::interop_suite("recovery-one.test.mjs", &env, || srv.log());
        assert!(out.contains("all recovered"), "{transports}: {out}");
        assert_eq!(srv.metric("shardgate_recovery_restored_total"), 8 * (i as u64 + 1), "{transports}");
    }
}

fn a_client_further_behind_than_the_logs_gets_a_new_session(redis: RedisServer) {
    let url = redis.url();
    let toml = "[runtime]\nrecovery = true\nrecovery_log_len = 5\nevents_per_second = 100000\nevent_burst = 100000\n";
    let a = Server::start_with_config(&["--shards", "1", "--redis", url.as_str()], Some(toml));
    a.wait_for("bridge connected to redis", |s| s.metric("shardgate_redis_up") == 1);
    let mut ann = Client::connect(a.addr, &token("ann", "t1"));
    let mut bob = Client::connect(a.addr, &token("bob", "t1"));
    for c in [&mut ann, &mut bob] {
        assert_eq!(c.emit_ack("join_room", json!("lobby"))["ok"], true);
    }
    bob.emit_ack("message:send", json!({ "room": "lobby", "content": "seen" }));
    let (_, offset) = next_message(&mut ann);
    let pid = ann.pid.clone().unwrap();
    drop(ann);
    a.wait_for("ann's socket closed", |s| s.metric("shardgate_sessions_open") == 1);
    // Far more than the log keeps (it is trimmed 64 entries past its length).
    for i in 0..300 {
        bob.emit("message:send", json!({ "room": "lobby", "content": format!("m{i}") }));
    }
    assert_eq!(bob.emit_ack("message:send", json!({ "room": "lobby", "content": "last" }))["status"], "sent");
    let mut ann = reconnect(&a, &token("ann", "t1"), &pid, Some(&offset));
    assert_ne!(ann.pid.as_deref(), Some(pid.as_str()), "a new session");
    assert_eq!(a.metric("shardgate_recovery_refused_trimmed_total"), 1);
    let ack = ann.emit_ack("message:send", json!({ "room": "lobby", "content": "x" }));
    assert_eq!(ack["code"], "not_in_room", "nothing restored: {ack}");
}

// Every test above taking a `RedisServer` runs on a single redis-server (`single::…`)
// and on a real Redis Cluster of 3 masters and 3 replicas (`redis_cluster::…`).
on_both!(
    a_session_is_restored_on_another_node_with_its_rooms_and_missed_messages,
    a_pid_restores_nothing_for_another_user_when_guessed_or_expired,
    a_client_that_said_goodbye_has_no_session_to_restore,
    a_client_further_behind_than_the_logs_gets_a_new_session,
    the_official_client_recovers_after_a_node_is_killed,
    the_official_client_recovers_after_a_node_is_drained_then_another_killed,
);
