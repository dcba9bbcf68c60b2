//! Cluster mode: shardgate processes on different ports sharing one real redis-server,
//! and the same tests again on a real Redis Cluster (3 masters, 3 replicas) started by
//! the test (`on_both!` at the end).

#[macro_use]
mod support;

use std::time::Duration;

use serde_json::json;
use support::redis::RedisServer;
use support::{token, Client, Server};

fn node(redis: &RedisServer, extra: &[&str]) -> Server {
    node_at(redis, &redis.url(), extra)
}

/// A node pointed at `url` (one member of `redis`).
fn node_at(redis: &RedisServer, url: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2", "--redis", url];
    if !extra.contains(&"--liveness-ttl-ms") {
        args.extend_from_slice(&["--liveness-ttl-ms", "600"]);
    }
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    s.wait_for("bridge connected to redis", |s| s.metric("shardgate_redis_up") == 1);
    if redis.is_cluster() {
        // (Metrics may come from another process on a shared port: the log is this one's.)
        s.wait_for("connected in cluster mode", |s| {
            s.log().contains("connected to the redis cluster: 3 masters")
        });
    }
    s
}

fn direct_messages_rooms_offline_and_presence_across_nodes(redis: RedisServer) {
    let nodes: Vec<Server> = (0..3).map(|_| node(&redis, &[])).collect();

    // 1:1 across nodes with a delivered ack.
    let mut alice = Client::connect(nodes[0].addr, &token("alice", "t1"));
    let mut bob = Client::connect(nodes[1].addr, &token("bob", "t1"));
    let mut bob_phone = Client::connect(nodes[2].addr, &token("bob", "t1"));
    let ack = alice.emit_ack("message:send", json!({ "to": "bob", "content": "hi", "clientMsgId": "c1" }));
    assert_eq!(ack["status"], "delivered", "{ack}");
    for b in [&mut bob, &mut bob_phone] {
        let m = b.expect_event("message:new");
        assert_eq!((&m["from"], &m["content"], &m["id"]), (&json!("alice"), &json!("hi"), &ack["id"]));
        b.expect_no_event("message:new", Duration::from_millis(150));
    }

    // A room with members on all three nodes: each other member exactly once.
    let mut members: Vec<Client> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Client::connect(n.addr, &token(&format!("m{i}"), "t1")))
        .collect();
    for m in members.iter_mut() {
        assert_eq!(m.emit_ack("join_room", json!("global"))["ok"], true);
    }
    // No waiting: a join is answered once the member's node receives the room.
    let ack = members[0].emit_ack("message:send", json!({ "room": "global", "content": "all" }));
    assert_eq!(ack["status"], "sent");
    for m in members.iter_mut().skip(1) {
        assert_eq!(m.expect_event("message:new")["content"], "all");
        m.expect_no_event("message:new", Duration::from_millis(200));
    }
    members[0].expect_no_event("message:new", Duration::from_millis(100));

    // Offline: queued in Redis, drained in order on another node.
    for i in 0..3 {
        let ack = alice.emit_ack("message:send", json!({ "to": "carol", "content": i }));
        assert_eq!(ack["status"], "queued", "{ack}");
    }
    let mut carol = Client::connect(nodes[2].addr, &token("carol", "t1"));
    for i in 0..3 {
        assert_eq!(carol.expect_event("message:new")["content"], i);
    }

    // Presence across nodes, multi-device aware.
    let mut watcher = Client::connect(nodes[0].addr, &token("watcher", "t1"));
    watcher.emit_ack("presence:subscribe", json!(["dave"]));
    assert_eq!(watcher.expect_event("presence")["status"], "offline");
    let d1 = Client::connect(nodes[1].addr, &token("dave", "t1"));
    assert_eq!(watcher.expect_event("presence")["status"], "online");
    let d2 = Client::connect(nodes[2].addr, &token("dave", "t1"));
    drop(d1);
    watcher.expect_no_event("presence", Duration::from_millis(300));
    drop(d2);
    let p = watcher.expect_event("presence");
    assert_eq!((&p["userId"], &p["status"]), (&json!("dave"), &json!("offline")));
    if redis.is_cluster() {
        // Presence and registry changes go only to the nodes that care: the watcher's
        // node subscribes dave's own channel, nobody the broadcast ones.
        assert_eq!(redis.subscribers("presence:updates:{t1:dave}"), 1);
        assert_eq!(redis.subscribers("registry:changes:{t1:bob}"), 1, "alice's node caches bob's route");
        for &port in &redis.ports {
            for ch in ["presence:updates", "registry:changes"] {
                assert_eq!(redis.classic_subscribers(port, ch), 0, "{ch} on {port}");
            }
        }
    }

    // Redis forgets the scripts behind the bridge's back: the next calls are sent again
    // with their text (NOSCRIPT), and nothing is lost.
    for &port in &redis.ports {
        redis.cmd_at(port, &["SCRIPT", "FLUSH"]);
    }
    let eve = Client::connect(nodes[2].addr, &token("eve", "t1"));
    drop(eve);
    let mut erin = Client::connect(nodes[1].addr, &token("erin", "t1"));
    let ack = alice.emit_ack("message:send", json!({ "to": "erin", "content": "after flush" }));
    assert_eq!(ack["status"], "delivered", "{ack}");
    assert_eq!(erin.expect_event("message:new")["content"], "after flush");
    let noscript: u64 = redis
        .ports
        .iter()
        .filter_map(|&p| match redis.cmd_at(p, &["INFO", "errorstats"]) {
            Some(shardgate_io::resp::Reply::BulkString(b)) => {
                String::from_utf8_lossy(&b).lines().find_map(|l| {
                    l.strip_prefix("errorstat_NOSCRIPT:count=").and_then(|n| n.trim().parse::<u64>().ok())
                })
            }
            _ => None,
        })
        .sum();
    assert!(noscript > 0, "the flushed scripts were asked for by SHA-1 first");

    // Tenant isolation across nodes.
    let mut other = Client::connect(nodes[1].addr, &token("bob", "t2"));
    let ack = alice.emit_ack("message:send", json!({ "to": "bob", "content": "t1 only" }));
    assert_eq!(ack["status"], "delivered");
    other.expect_no_event("message:new", Duration::from_millis(300));

    // Registry keys as documented.
    let sockets = redis.members("user:{t1:bob}:sockets");
    assert_eq!(sockets.len(), 2, "{sockets:?}");
    assert!(redis.members("nodes").len() >= 3);
}

fn expect_presence(c: &mut Client, status: &str) {
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < end {
        if c.expect_event("presence")["status"] == status {
            return;
        }
    }
    panic!("no presence {status}");
}

fn crashed_node_users_go_offline_and_redis_restart_recovers(mut redis: RedisServer) {
    let a = node(&redis, &[]);
    let mut b = node(&redis, &[]);
    let mut watcher = Client::connect(a.addr, &token("w", "t1"));
    let _victim = Client::connect(b.addr, &token("victim", "t1"));
    watcher.emit_ack("presence:subscribe", json!(["victim"]));
    // The victim's registration may land just after the subscription's answer.
    expect_presence(&mut watcher, "online");

    b.signal(libc::SIGKILL);
    b.wait_exit(Duration::from_secs(5)).expect("killed");
    // Liveness TTL 600 ms: the survivor sweeps the dead node's registry. (An "online"
    // may be seen twice first: the subscription's answer and the earlier publish.)
    expect_presence(&mut watcher, "offline");
    assert!(redis.members("user:{t1:victim}:sockets").is_empty());
    a.wait_for("sweep counted", |s| s.metric("shardgate_cluster_swept_sockets_total") >= 1);

    // Redis restarts with nothing: nodes reconnect, re-register and route again.
    let c = node(&redis, &[]);
    let mut bob = Client::connect(c.addr, &token("bob", "t1"));
    redis.restart();
    a.wait_for("node a reconnected", |s| s.metric("shardgate_redis_connects_total") >= 2);
    c.wait_for("node c reconnected", |s| s.metric("shardgate_redis_connects_total") >= 2);
    a.wait_for("bob re-registered", |_| redis.members("user:{t1:bob}:sockets").len() == 1);
    let ack = watcher.emit_ack("message:send", json!({ "to": "bob", "content": "after restart" }));
    assert_eq!(ack["status"], "delivered", "{ack}");
    assert_eq!(bob.expect_event("message:new")["content"], "after restart");
}

fn official_client_across_nodes(redis: RedisServer) {
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    let env = [
        ("SHARDGATE_URL_A", format!("http://{}", a.addr)),
        ("SHARDGATE_URL_B", format!("http://{}", b.addr)),
    ];
    support::interop_suite("cluster.test.mjs", &env, String::new);
}

fn processes_sharing_one_port_are_distinct_members(redis: RedisServer) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let (a, b) = (node(&redis, &["--listen", &listen]), node(&redis, &["--listen", &listen]));
    assert_eq!(a.addr, b.addr);
    // SO_REUSEPORT spreads connections over both processes; each registers under its id.
    let mut clients = Vec::new();
    let servers = || {
        redis.members("nodes").iter().filter(|s| matches!(redis.cmd(&["HLEN", &format!("connections:{{{s}}}")]), shardgate_io::resp::Reply::Integer(n) if n > 0)).count()
    };
    while servers() < 2 {
        assert!(clients.len() < 64, "connections never reached the second process");
        clients.push(Client::connect(a.addr, &token(&format!("u{}", clients.len()), "t1")));
    }
    // Every client can reach every other, whichever process holds it.
    let mut first = clients.remove(0);
    for (i, c) in clients.iter_mut().enumerate() {
        let ack = first.emit_ack("message:send", json!({ "to": format!("u{}", i + 1), "content": i }));
        assert_eq!(ack["status"], "delivered");
        assert_eq!(c.expect_event("message:new")["content"], i);
    }
}

#[test]
fn redis_password_and_database_index_are_honoured() {
    let redis = RedisServer::start();
    redis.cmd(&["CONFIG", "SET", "requirepass", "s3cret-pass"]);
    let url = format!("redis://:s3cret-pass@127.0.0.1:{}/3", redis.port);
    let s = Server::start(&["--redis", &url, "--liveness-ttl-ms", "600"]);
    s.wait_for("bridge connected", |s| s.metric("shardgate_redis_up") == 1);
    let _c = Client::connect(s.addr, &token("zed", "t1"));
    assert_eq!(
        redis.cmd_authed("s3cret-pass", 3, &["SCARD", "user:{t1:zed}:sockets"]),
        shardgate_io::resp::Reply::Integer(1)
    );
    assert_eq!(
        redis.cmd_authed("s3cret-pass", 0, &["SCARD", "user:{t1:zed}:sockets"]),
        shardgate_io::resp::Reply::Integer(0)
    );

    let bad = format!("redis://:wrong@127.0.0.1:{}/3", redis.port);
    let s = Server::start(&["--redis", &bad]);
    s.wait_for("auth failure logged", |s| s.log().contains("AUTH refused"));
    assert_eq!(s.metric("shardgate_redis_up"), 0);
}

fn route_cache_serves_repeat_messages_and_follows_registry_changes(redis: RedisServer) {
    let (a, b, c) = (node(&redis, &[]), node(&redis, &[]), node(&redis, &["--server-id", "node-c"]));
    let mut alice = Client::connect(a.addr, &token("alice", "t1"));
    let mut bob = Client::connect(b.addr, &token("bob", "t1"));
    let send = |alice: &mut Client, content: i32| {
        alice.emit_ack("message:send", json!({ "to": "bob", "content": content }))
    };
    // Until a lookup did not race bob's own registration push, routes come from Redis.
    let mut n = 0;
    while a.metric("shardgate_cluster_route_cache_hits_total") == 0 {
        assert!(n < 6, "route never cached");
        n += 1;
        assert_eq!(send(&mut alice, n)["status"], "delivered");
    }
    for i in 1..=n {
        assert_eq!(bob.expect_event("message:new")["content"], i);
    }

    // A new device on a third node invalidates the cached route: it gets the next one.
    let mut phone = Client::connect(c.addr, &token("bob", "t1"));
    assert_eq!(send(&mut alice, 100)["status"], "delivered");
    assert_eq!(bob.expect_event("message:new")["content"], 100);
    assert_eq!(phone.expect_event("message:new")["content"], 100);

    // Bob's desktop closes; the phone's node dies before anyone sweeps it: the cached
    // PUBLISH reaches nobody, the registry is asked again, and the message is queued.
    drop(bob);
    b.wait_for("bob's desktop unregistered", |_| redis.members("user:{t1:bob}:sockets").len() == 1);
    let mut c = c;
    c.signal(libc::SIGKILL);
    c.wait_exit(Duration::from_secs(5)).expect("killed");
    // Once Redis noticed the dead node's pub/sub connection, nobody receives its channel.
    a.wait_for("redis dropped node c's subscription", |_| redis.subscribers("server:{node-c}") == 0);
    assert_eq!(send(&mut alice, 101)["status"], "queued");
    let mut back = Client::connect(a.addr, &token("bob", "t1"));
    assert_eq!(back.expect_event("message:new")["content"], 101);

    // Both on one node: after the first lookup no Redis command is needed at all.
    let mut carol = Client::connect(a.addr, &token("carol", "t1"));
    let to_carol =
        |alice: &mut Client| alice.emit_ack("message:send", json!({ "to": "carol", "content": "x" }));
    // Warm up: a lookup that raced carol's own registration push is not cached.
    let mut sent = 0;
    loop {
        let before = a.metric("shardgate_cluster_route_cache_hits_total");
        assert_eq!(to_carol(&mut alice)["status"], "delivered");
        sent += 1;
        if a.metric("shardgate_cluster_route_cache_hits_total") > before {
            break;
        }
        assert!(sent < 5, "route never cached");
    }
    let before = a.metric("shardgate_cluster_route_cache_hits_total");
    for _ in 0..5 {
        assert_eq!(to_carol(&mut alice)["status"], "delivered");
    }
    assert_eq!(a.metric("shardgate_cluster_route_cache_hits_total"), before + 5);
    for _ in 0..sent + 5 {
        carol.expect_event("message:new");
    }
}

fn sigterm_leaves_the_cluster_at_once(redis: RedisServer) {
    // A long liveness TTL: only a graceful leave can make the user offline quickly.
    let a = node(&redis, &["--liveness-ttl-ms", "60000"]);
    let mut b = node(&redis, &["--liveness-ttl-ms", "60000"]);
    let mut watcher = Client::connect(a.addr, &token("w", "t1"));
    let mut leaving = Client::connect(b.addr, &token("leaving", "t1"));
    leaving.emit_ack("join_room", json!("r"));
    watcher.emit_ack("presence:subscribe", json!(["leaving"]));
    expect_presence(&mut watcher, "online");
    b.signal(libc::SIGTERM);
    assert_eq!(leaving.expect_closed().1, "server_shutdown");
    expect_presence(&mut watcher, "offline");
    assert!(b.wait_exit(Duration::from_secs(10)).expect("exited").success());
    assert!(redis.members("user:{t1:leaving}:sockets").is_empty());
    assert!(redis.members("room:{t1:r}").is_empty());
    assert_eq!(redis.members("nodes").len(), 1);
}

fn a_starting_node_is_ready_only_once_registered_and_then_takes_traffic(mut redis: RedisServer) {
    redis.stop();
    let url = redis.url();
    let srv = Server::start(&["--shards", "2", "--redis", url.as_str(), "--liveness-ttl-ms", "600"]);
    // Alive, but not ready while it cannot register and subscribe.
    assert_eq!(srv.get("/healthz").0, 200);
    assert_eq!(srv.get("/readyz").0, 503);
    redis.restart();
    srv.wait_for("ready once registered", |s| s.get("/readyz").0 == 200);
    assert_eq!(srv.metric("shardgate_redis_up"), 1);
    assert_eq!(redis.members("nodes").len(), 1, "registered before it said ready");
    let mut a = Client::connect(srv.addr, &token("a", "t1"));
    let mut b = Client::connect(srv.addr, &token("b", "t1"));
    let ack = a.emit_ack("message:send", json!({ "to": "b", "content": "first" }));
    assert_eq!(ack["status"], "delivered", "{ack}");
    assert_eq!(b.expect_event("message:new")["content"], "first");
}

fn acknowledged_messages_survive_a_node_crash(redis: RedisServer) {
    let a = node(&redis, &[]);
    let mut c = node(&redis, &["--server-id", "crashing"]);
    let b = node(&redis, &[]);
    let mut alice = Client::connect(a.addr, &token("alice", "t1"));
    let mut bob = Client::connect(c.addr, &token("bob", "t1"));
    let send = |alice: &mut Client, i: usize| {
        let ack = alice.emit_ack("message:send", json!({ "to": "bob", "content": format!("m{i}") }));
        ack["status"].as_str().unwrap_or_default().to_string()
    };
    // Before the crash: delivered, and bob has them.
    for i in 0..5 {
        assert_eq!(send(&mut alice, i), "delivered");
        assert_eq!(bob.expect_event("message:new")["content"], format!("m{i}"));
    }
    // Bob's node dies with his socket still in the registry: every later message is
    // reported queued (the PUBLISH to the dead node reaches nobody), never lost.
    c.signal(libc::SIGKILL);
    c.wait_exit(Duration::from_secs(5)).expect("killed");
    // From the moment Redis noticed the dead node's pub/sub connection (before it, a
    // PUBLISH still counts the dead subscriber, and the sender hears `sent` at the report
    // timeout).
    a.wait_for("redis dropped the dead node's subscription", |_| redis.subscribers("server:{crashing}") == 0);
    for i in 5..10 {
        assert_eq!(send(&mut alice, i), "queued", "m{i}");
    }
    // Bob reconnects on another node: the queued ones, in order, once.
    let mut bob = Client::connect(b.addr, &token("bob", "t1"));
    for i in 5..10 {
        assert_eq!(bob.expect_event("message:new")["content"], format!("m{i}"));
    }
    bob.expect_no_event("message:new", Duration::from_millis(300));
    // And a message after the reconnect is delivered to the new socket.
    assert_eq!(send(&mut alice, 10), "delivered");
    assert_eq!(bob.expect_event("message:new")["content"], "m10");
}

fn a_drained_node_leaves_without_flapping_presence_of_users_connected_elsewhere(redis: RedisServer) {
    let a = node(&redis, &[]);
    let mut b = node(&redis, &["--drain-ms", "500"]);
    let mut watcher = Client::connect(a.addr, &token("w", "t1"));
    let _laptop = Client::connect(a.addr, &token("carol", "t1"));
    let mut phone = Client::connect(b.addr, &token("carol", "t1"));
    phone.emit_ack("join_room", json!("r"));
    watcher.emit_ack("presence:subscribe", json!(["carol"]));
    expect_presence(&mut watcher, "online");
    b.signal(libc::SIGTERM);
    assert_eq!(phone.expect_closed(), (1001, "server_shutdown".to_string()));
    assert!(b.wait_exit(Duration::from_secs(10)).expect("exited").success());
    // Carol is still online on her laptop: nobody was told otherwise.
    let end = std::time::Instant::now() + Duration::from_millis(300);
    while std::time::Instant::now() < end {
        if let Some(support::Incoming::Event(name, args, _)) = watcher.recv_until(end) {
            assert!(name != "presence" || args[0]["status"] == "online", "{name} {args:?}");
        }
    }
    assert_eq!(redis.members("user:{t1:carol}:sockets").len(), 1, "only the laptop is registered");
    assert!(redis.members("room:{t1:r}").is_empty());
    assert_eq!(redis.members("nodes").len(), 1);
}

#[test]
fn chat_resumes_after_a_redis_cluster_master_fails_over() {
    let mut redis = RedisServer::start_cluster(3);
    // Each node pointed at a different member: any member will do.
    let urls: Vec<String> = redis.ports[..3].iter().map(|p| format!("redis://127.0.0.1:{p}")).collect();
    let nodes: Vec<Server> = urls.iter().map(|u| node_at(&redis, u, &[])).collect();
    let env = [
        ("SHARDGATE_URL_A", format!("http://{}", nodes[0].addr)),
        ("SHARDGATE_URL_B", format!("http://{}", nodes[1].addr)),
        ("SHARDGATE_URL_C", format!("http://{}", nodes[2].addr)),
    ];
    support::interop_suite("cluster.test.mjs", &env, String::new);

    let mut alice = Client::connect(nodes[0].addr, &token("alice", "t1"));
    let mut bob = Client::connect(nodes[1].addr, &token("bob", "t1"));
    let send = |alice: &mut Client, content: String| {
        let ack = alice.emit_ack("message:send", json!({ "to": "bob", "content": content }));
        ack["status"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(send(&mut alice, "before".into()), "delivered");
    assert_eq!(bob.expect_event("message:new")["content"], "before");

    // The master of bob's keys dies; its replica takes over after the node timeout (2 s).
    let killed = redis.kill_master_of("user:{t1:bob}:sockets");
    let t0 = std::time::Instant::now();
    let mut statuses = Vec::new();
    loop {
        let status = send(&mut alice, format!("m{}", statuses.len()));
        statuses.push(status.clone());
        if status == "delivered" {
            break;
        }
        if t0.elapsed() > Duration::from_secs(40) {
            let tail = |s: &Server| s.log().lines().rev().take(15).collect::<Vec<_>>().join("\n");
            panic!(
                "chat never resumed after {} messages\nnode a:\n{}\nnode b:\n{}",
                statuses.len(),
                tail(&nodes[0]),
                tail(&nodes[1])
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let gap = t0.elapsed();
    // Every message was answered; what was not delivered was counted, never dropped
    // silently; each delivered or queued message reaches bob (a queued one when his node
    // registers him again), in order.
    let unanswered = statuses.iter().filter(|s| *s == "sent").count() as u64;
    let unroutable: u64 = nodes.iter().map(|n| n.metric("shardgate_cluster_unroutable_total")).sum();
    assert!(unroutable >= unanswered.min(1), "{statuses:?}, unroutable {unroutable}");
    let wanted: Vec<String> = statuses
        .iter()
        .enumerate()
        .filter(|(_, s)| *s == "delivered" || *s == "queued")
        .map(|(i, _)| format!("m{i}"))
        .collect();
    let mut got = Vec::new();
    while got.len() < wanted.len() {
        let m = bob.expect_event("message:new");
        got.push(m["content"].as_str().unwrap_or_default().to_string());
    }
    let got: Vec<String> = got.into_iter().filter(|m| wanted.contains(m)).collect();
    assert_eq!(got, wanted);
    assert_ne!(redis.owner("user:{t1:bob}:sockets"), killed, "a replica serves bob's slot now");
    println!(
        "failover gap: {} ms from SIGKILL of the master on port {killed} to the first delivered message; \
         {} messages meanwhile ({} answered sent, {} queued); unroutable counted: {unroutable}",
        gap.as_millis(),
        statuses.len() - 1,
        unanswered,
        statuses.iter().filter(|s| *s == "queued").count()
    );

    // After the failover: the official client's flows across the three nodes again.
    redis.wait_cluster_ok();
    for n in &nodes {
        n.wait_for("reconnected to the cluster", |s| s.metric("shardgate_redis_up") == 1);
    }
    support::interop_suite("cluster.test.mjs", &env, String::new);
}

#[test]
fn chat_follows_slots_that_move_between_masters() {
    let redis = RedisServer::start_cluster(3);
    let a = node(&redis, &["--server-id", "node-a"]);
    let b = node(&redis, &["--server-id", "node-b"]);
    let mut alice = Client::connect(a.addr, &token("alice", "t1"));
    let mut bob = Client::connect(b.addr, &token("bob", "t1"));
    let mut watcher = Client::connect(a.addr, &token("w", "t1"));
    watcher.emit_ack("presence:subscribe", json!(["bob"]));
    expect_presence(&mut watcher, "online");
    let mut send = |content: &str| {
        let ack = alice.emit_ack("message:send", json!({ "to": "bob", "content": content }));
        ack["status"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(send("before"), "delivered");
    assert_eq!(bob.expect_event("message:new")["content"], "before");

    // Bob's slot starts moving: a new device of his registers meanwhile (its script's
    // keys are split between the two masters: TRYAGAIN until the keys have moved), then
    // the move completes (MOVED from then on).
    let moving = redis.begin_migration("user:{t1:bob}:sockets");
    let b_addr = b.addr;
    let phone = std::thread::spawn(move || Client::connect(b_addr, &token("bob", "t1")));
    std::thread::sleep(Duration::from_millis(150));
    redis.finish_migration(moving);
    let mut phone = phone.join().expect("the phone connected");
    assert_eq!(redis.members("user:{t1:bob}:sockets").len(), 2, "both devices registered on the new master");
    b.wait_for("TRYAGAIN / MOVED counted", |s| s.metric("shardgate_cluster_redirects_total") > 0);
    // Node a watches bob's presence: Redis unsubscribed that channel with the slot, and
    // node a subscribes it again at the new owner.
    a.wait_for("node a followed the move", |s| s.metric("shardgate_cluster_resubscribes_total") >= 1);
    let status = send("after bob's slot moved");
    let tail = |s: &Server| s.log().lines().rev().take(12).collect::<Vec<_>>().join("\n");
    assert_eq!(status, "delivered", "node a:\n{}\nnode b:\n{}", tail(&a), tail(&b));
    for c in [&mut bob, &mut phone] {
        assert_eq!(c.expect_event("message:new")["content"], "after bob's slot moved");
    }

    // Node b's own channel moves: Redis unsubscribes it there, node b subscribes at the
    // new owner, and messages to bob arrive through it.
    let moving = redis.begin_migration("server:{node-b}");
    redis.finish_migration(moving);
    b.wait_for("node b subscribed its channel at the new owner", |_| {
        redis.subscribers("server:{node-b}") == 1
    });
    assert!(b.metric("shardgate_cluster_resubscribes_total") >= 1);
    for i in 0..3 {
        let content = format!("after node b's channel moved {i}");
        assert_eq!(send(&content), "delivered");
        for c in [&mut bob, &mut phone] {
            assert_eq!(c.expect_event("message:new")["content"], content.as_str());
        }
    }
    // Presence still follows: both of bob's devices leave, the watcher hears it.
    drop((bob, phone));
    expect_presence(&mut watcher, "offline");
    assert_eq!(a.metric("shardgate_redis_up") + b.metric("shardgate_redis_up"), 2, "no session was lost");
}

// Every test above taking a `RedisServer` runs on a single redis-server (`single::…`)
// and on a real Redis Cluster of 3 masters and 3 replicas (`redis_cluster::…`).
on_both!(
    direct_messages_rooms_offline_and_presence_across_nodes,
    crashed_node_users_go_offline_and_redis_restart_recovers,
    official_client_across_nodes,
    processes_sharing_one_port_are_distinct_members,
    route_cache_serves_repeat_messages_and_follows_registry_changes,
    sigterm_leaves_the_cluster_at_once,
    a_starting_node_is_ready_only_once_registered_and_then_takes_traffic,
    acknowledged_messages_survive_a_node_crash,
    a_drained_node_leaves_without_flapping_presence_of_users_connected_elsewhere,
);
