//! Cluster benchmarks against a real redis-server (run: `cargo bench --bench cluster`).
//!
//! 1. Bridge pipeline throughput: the bridge's own Redis connection (`RedisConn`, the
//!    `io` RESP codec over a glommio socket) sending batches of 1..1024 commands, as
//!    commands/s and as a ratio to batch size 1 measured in the same run; plus
//!    `redis-benchmark` at the same pipeline depth on one connection, as the reference.
//! 2. Publish-to-delivery latency of 1:1 messages: sender on node A, recipient on node B
//!    (through Redis), against sender and recipient on the same node (same run).
//! 3. Redis cost per operation on a real Redis Cluster (3 masters + 3 replicas, three
//!    shardgate nodes): commands (by name, `SPUBLISH` / `PUBLISH` among them: Redis counts
//!    the commands scripts call too) and bytes in and out of the masters per connect,
//!    join, 1:1 message (first to a user, and cached), room message, presence change
//!    (a user's last socket closing), and the periodic refresh per online user; the same
//!    run on a single redis-server for comparison; and the bridge's batch sizes (commands
//!    per pipelined write) meanwhile. `docs/capacity.md` projects these numbers.
//!
//! Results print as a table and one JSON line (`RESULT {...}`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;
use shardgate::cluster::redis::RedisConn;
use shardgate::cluster::scripts;
use shardgate::config::RedisUrl;
use shardgate_io::resp::{self, Reply};
use support::redis::RedisServer;
use support::{token, Client, Incoming, Server};

/// Commands/s through one connection at `batch` commands per write, and the Redis
/// server's CPU time per command meanwhile (µs).
fn pipeline_throughput(
    redis: &RedisServer,
    url: &RedisUrl,
    cmd: Vec<Vec<u8>>,
    batch: usize,
    dur: Duration,
) -> (f64, f64) {
    let cpu0 = support::cpu_seconds(redis.pid());
    let url = url.clone();
    let rate = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let mut conn = RedisConn::connect(&url, Duration::from_secs(2)).await.unwrap();
            let mut buf = Vec::new();
            for _ in 0..batch {
                resp::encode_command(&cmd, &mut buf);
            }
            let start = Instant::now();
            let mut done = 0u64;
            while start.elapsed() < dur {
                conn.write(&buf).await.unwrap();
                for _ in 0..batch {
                    conn.read_reply().await.unwrap();
                }
                done += batch as u64;
            }
            (done, start.elapsed().as_secs_f64())
        })
        .unwrap()
        .join()
        .unwrap();
    let (done, secs) = rate;
    let cpu = support::cpu_seconds(redis.pid()) - cpu0;
    (done as f64 / secs, cpu * 1e6 / done as f64)
}

/// `redis-benchmark` PUBLISH with `clients` connections at `pipeline` commands per write:
/// requests/s and the Redis server's CPU time per command (µs).
fn redis_benchmark(redis: &RedisServer, clients: usize, pipeline: usize) -> Option<(f64, f64)> {
    let n = 200_000;
    let cpu0 = support::cpu_seconds(redis.pid());
    let out = std::process::Command::new("redis-benchmark")
        .args(["-p", &redis.port.to_string(), "-c", &clients.to_string(), "-n", &n.to_string()])
        .args(["-P", &pipeline.to_string(), "-q"])
        .args(["PUBLISH", "bench:nobody", &"x".repeat(64)])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "PUBLISH bench:nobody xxx: 123456.79 requests per second, p50=..."
    let line = text.lines().rev().find(|l| l.contains("requests per second"))?;
    let rps = line.split("requests per second").next()?.rsplit(':').next()?.trim();
    let cpu = support::cpu_seconds(redis.pid()) - cpu0;
    Some((rps.parse().ok()?, cpu * 1e6 / n as f64))
}

fn latency(sender: &mut Client, recipient: Client, to: &str, n: usize) -> Histogram<u64> {
    let epoch = Instant::now();
    let rx = std::thread::spawn(move || {
        let mut recipient = recipient;
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let end = Instant::now() + Duration::from_secs(60);
        while h.len() < n as u64 && Instant::now() < end {
            if let Some(Incoming::Event(name, args, _)) = recipient.recv_until(end) {
                if name == "message:new" {
                    let sent = args[0]["content"].as_u64().unwrap();
                    let now = epoch.elapsed().as_micros() as u64;
                    h.record(now.saturating_sub(sent).max(1)).unwrap();
                }
            }
        }
        h
    });
    for _ in 0..n {
        let sent = epoch.elapsed().as_micros() as u64;
        sender.emit("message:send", json!({ "to": to, "content": sent }));
        std::thread::sleep(Duration::from_micros(500));
    }
    rx.join().unwrap()
}

fn pct(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50_us": h.value_at_quantile(0.5), "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99), "max_us": h.max(), "count": h.len()
    })
}

/// What the masters of a Redis (Cluster) have served so far: calls per command (scripts'
/// inner commands included), bytes in and out.
#[derive(Default, Clone)]
struct Served {
    calls: BTreeMap<String, u64>,
    bytes_in: u64,
    bytes_out: u64,
}

/// Commands the harness itself sends (not counted).
const HARNESS: [&str; 5] = ["info", "cluster|info", "cluster|slots", "exists", "replconf"];

fn served(redis: &RedisServer) -> Served {
    let mut out = Served::default();
    for &port in &redis.ports {
        let info = |section: &str| match redis.cmd_at(port, &["INFO", section]) {
            Some(Reply::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            _ => String::new(),
        };
        if !info("replication").contains("role:master") {
            continue;
        }
        for line in info("commandstats").lines() {
            // cmdstat_spublish:calls=12,usec=...
            let Some((name, rest)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else {
                continue;
            };
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls=")).and_then(|v| v.parse().ok());
            if !HARNESS.contains(&name) {
                *out.calls.entry(name.to_string()).or_default() += calls.unwrap_or(0);
            }
        }
        for line in info("stats").lines() {
            if let Some(v) = line.strip_prefix("total_net_input_bytes:") {
                out.bytes_in += v.trim().parse::<u64>().unwrap_or(0);
            }
            if let Some(v) = line.strip_prefix("total_net_output_bytes:") {
                out.bytes_out += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    out
}

/// Per-operation cost between two snapshots, for `n` operations.
fn per_op(before: &Served, after: &Served, n: usize) -> serde_json::Value {
    let mut by_cmd = serde_json::Map::new();
    let mut total = 0.0;
    for (name, calls) in &after.calls {
        let d = calls - before.calls.get(name).copied().unwrap_or(0);
        if d > 0 {
            let v = d as f64 / n as f64;
            total += v;
            by_cmd.insert(name.clone(), json!((v * 100.0).round() / 100.0));
        }
    }
    json!({
        "commands": (total * 100.0).round() / 100.0,
        "by_command": by_cmd,
        "bytes_in": ((after.bytes_in - before.bytes_in) as f64 / n as f64).round(),
        "bytes_out": ((after.bytes_out - before.bytes_out) as f64 / n as f64).round(),
    })
}

/// Runs the operations on three nodes sharing `redis` and returns their costs.
fn operation_costs(redis: &RedisServer, label: &str) -> serde_json::Value {
    const N: usize = 60;
    // Presence refresh and liveness rare: background traffic stays out of the windows.
    let toml = "[cluster]\npresence_ttl_secs = 3600\nliveness_ttl_ms = 60000\n";
    let url = redis.url();
    let args = ["--shards", "1", "--redis", url.as_str(), "--events-per-second", "100000"];
    let nodes: Vec<Server> = (0..3).map(|_| Server::start_with_config(&args, Some(toml))).collect();
    for n in &nodes {
        n.wait_for("redis up", |s| s.metric("shardgate_redis_up") == 1);
    }
    let mut results = serde_json::Map::new();
    let mut measure = |name: &str, n: usize, op: &mut dyn FnMut()| {
        let cmds0: u64 = nodes.iter().map(|s| s.metric("shardgate_redis_commands_total")).sum();
        let batches0: u64 = nodes.iter().map(|s| s.metric("shardgate_redis_batches_total")).sum();
        std::thread::sleep(Duration::from_millis(100));
        let before = served(redis);
        op();
        std::thread::sleep(Duration::from_millis(300));
        let after = served(redis);
        let mut cost = per_op(&before, &after, n);
        let cmds: u64 = nodes.iter().map(|s| s.metric("shardgate_redis_commands_total")).sum::<u64>() - cmds0;
        let batches: u64 =
            nodes.iter().map(|s| s.metric("shardgate_redis_batches_total")).sum::<u64>() - batches0;
        cost["bridge_commands_per_batch"] =
            json!(((cmds as f64 / batches.max(1) as f64) * 10.0).round() / 10.0);
        println!(
            "{label:<8} {name:<28} {:>6} commands  {:>6} B in  {:>6} B out  {}",
            cost["commands"], cost["bytes_in"], cost["bytes_out"], cost["by_command"]
        );
        results.insert(name.to_string(), cost);
    };
    // Users u0..: one socket each, round-robin over the nodes.
    let mut users: Vec<Client> = Vec::new();
    measure("connect", N, &mut || {
        for i in 0..N {
            users.push(Client::connect(nodes[i % 3].addr, &token(&format!("u{i}"), "cap")));
        }
    });
    measure("join (rooms of 10, 3 nodes)", N, &mut || {
        for (i, u) in users.iter_mut().enumerate() {
            u.emit_ack("join_room", json!(format!("room{}", i / 10)));
        }
    });
    // 1:1 from u(3k) on node 0 to u(3k+1) on node 1: first message, then cached.
    let pairs: Vec<usize> = (0..N / 3).map(|k| 3 * k).collect();
    let send = |users: &mut Vec<Client>, i: usize, what: &str| {
        let to = format!("u{}", i + 1);
        let ack = users[i].emit_ack("message:send", json!({ "to": to, "content": what }));
        assert_eq!(ack["status"], "delivered", "{ack}");
    };
    measure("1:1 message, first to a user", pairs.len(), &mut || {
        for &i in &pairs {
            send(&mut users, i, "first");
        }
    });
    // (The first message subscribed the recipient's registry channel on a cluster: the
    // second one caches the route.)
    for &i in &pairs {
        send(&mut users, i, "second");
    }
    measure("1:1 message, route cached", pairs.len() * 3, &mut || {
        for _ in 0..3 {
            for &i in &pairs {
                send(&mut users, i, "again");
            }
        }
    });
    // All senders at once: the same commands, fewer pipelined writes.
    measure("1:1 message, cached, burst", pairs.len() * 10, &mut || {
        for _ in 0..10 {
            for &i in &pairs {
                users[i].emit("message:send", json!({ "to": format!("u{}", i + 1), "content": "burst" }));
            }
        }
        for &i in &pairs {
            let mut got = 0;
            while got < 10 {
                // (Earlier messages are still in the recipient's buffer: skipped.)
                if users[i + 1].expect_event("message:new")["content"] == "burst" {
                    got += 1;
                }
            }
        }
    });
    measure("room message (10 members)", N, &mut || {
        for k in 0..N {
            let i = (k % (N / 10)) * 10;
            let ack =
                users[i].emit_ack("message:send", json!({ "room": format!("room{}", i / 10), "content": k }));
            assert_eq!(ack["status"], "sent", "{ack}");
        }
    });
    // Every user watched from another node; then the last socket of N/2 users closes.
    let mut watchers: Vec<Client> =
        (0..3).map(|k| Client::connect(nodes[k].addr, &token(&format!("w{k}"), "cap"))).collect();
    for (k, w) in watchers.iter_mut().enumerate() {
        let watched: Vec<String> = (0..N).filter(|i| i % 3 != k).map(|i| format!("u{i}")).collect();
        w.emit_ack("presence:subscribe", json!(watched));
    }
    let leaving = N / 2;
    measure("presence change (last socket closes)", leaving, &mut || {
        users.truncate(N - leaving);
        std::thread::sleep(Duration::from_millis(500));
    });
    drop((users, watchers, nodes));
    results.insert("refresh per online user".into(), refresh_cost(redis, label));
    serde_json::Value::Object(results)
}

/// The periodic refresh: every online user's presence every presence lifetime / 2
/// (here 4 s / 2), on three fresh nodes.
fn refresh_cost(redis: &RedisServer, label: &str) -> serde_json::Value {
    const ONLINE: usize = 60;
    let toml = "[cluster]\npresence_ttl_secs = 4\nliveness_ttl_ms = 60000\n";
    let url = redis.url();
    let args = ["--shards", "1", "--redis", url.as_str()];
    let nodes: Vec<Server> = (0..3).map(|_| Server::start_with_config(&args, Some(toml))).collect();
    for n in &nodes {
        n.wait_for("redis up", |s| s.metric("shardgate_redis_up") == 1);
    }
    let _users: Vec<Client> =
        (0..ONLINE).map(|i| Client::connect(nodes[i % 3].addr, &token(&format!("r{i}"), "cap"))).collect();
    std::thread::sleep(Duration::from_millis(500));
    let window = Duration::from_secs(8);
    let before = served(redis);
    std::thread::sleep(window);
    let after = served(redis);
    let refreshes = (ONLINE as f64 * window.as_secs_f64() / 2.0).round() as usize;
    let mut refresh = per_op(&before, &after, refreshes);
    refresh["note"] =
        json!(format!("{ONLINE} users online for {window:?}: per user per refresh (every presence_ttl/2)"));
    println!(
        "{label:<8} {:<28} {:>6} commands  {:>6} B in  {:>6} B out  {}",
        "refresh, per user",
        refresh["commands"],
        refresh["bytes_in"],
        refresh["bytes_out"],
        refresh["by_command"]
    );
    refresh
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::env::args().any(|a| a == "--costs") {
        println!("== Redis cost per operation (commands and bytes at the masters)");
        let cluster = RedisServer::start_cluster(3);
        let on_cluster = operation_costs(&cluster, "cluster");
        drop(cluster);
        let single = RedisServer::start();
        let on_single = operation_costs(&single, "single");
        println!("RESULT {}", json!({ "redis_cluster": on_cluster, "single_redis": on_single }));
        return;
    }
    let redis = RedisServer::start();
    let url = RedisUrl::parse(&redis.url()).unwrap();
    let dur = Duration::from_millis(1500);

    println!("== bridge pipeline throughput (one connection, redis-server {} on loopback)", redis.port);
    let publish: Vec<Vec<u8>> = vec![b"PUBLISH".to_vec(), b"bench:nobody".to_vec(), vec![b'x'; 64]];
    let route: Vec<Vec<u8>> = [
        "EVAL",
        scripts::ROUTE,
        "2",
        "user:{t:nobody}:sockets",
        "offline:{t:nobody}",
        "",
        "me",
        "t:nobody",
        "env",
        "100",
        "60",
        "frame",
        "1",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // The same call by SHA-1, as the bridge sends it (scripts loaded on connect).
    redis.cmd(&["SCRIPT", "LOAD", scripts::ROUTE]);
    let mut route_sha = route.clone();
    route_sha[0] = b"EVALSHA".to_vec();
    route_sha[1] = scripts::sha_of(scripts::ROUTE.as_bytes()).unwrap().as_bytes().to_vec();
    // A recoverable room message (LOG_ROOM: INCR, XADD, PEXPIRE, the trim check,
    // PUBLISH): the rate of one master at this is the ceiling of recoverable messages
    // for a whole cluster (every recovery key is in one slot).
    redis.cmd(&["SCRIPT", "LOAD", scripts::LOG_ROOM]);
    let env = "x".repeat(120);
    let log_room: Vec<Vec<u8>> = [
        "EVALSHA",
        scripts::sha_of(scripts::LOG_ROOM.as_bytes()).unwrap(),
        "2",
        "{recovery}:seq",
        "{recovery}:log:room:t:bench",
        env.as_str(),
        "1000",
        "120000",
        "room:{t:bench}",
        "PUBLISH",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let mut results = Vec::new();
    let commands = [
        ("PUBLISH 64B", publish),
        ("EVAL ROUTE (offline user)", route),
        ("EVALSHA ROUTE (same)", route_sha),
        ("EVALSHA LOG_ROOM (120 B)", log_room),
    ];
    for (name, cmd) in commands {
        let (base, base_cpu) = pipeline_throughput(&redis, &url, cmd.clone(), 1, dur);
        for batch in [1usize, 16, 128, 1024] {
            let (rate, cpu) = if batch == 1 {
                (base, base_cpu)
            } else {
                pipeline_throughput(&redis, &url, cmd.clone(), batch, dur)
            };
            println!(
                "{name:<28} batch {batch:>5}: {rate:>12.0} commands/s  ({:.1}x batch 1)  redis CPU {cpu:.2} us/command ({:.2}x batch 1)",
                rate / base,
                cpu / base_cpu
            );
            results.push(json!({ "command": name, "batch": batch, "commands_per_sec": rate.round(), "ratio_to_batch_1": rate / base, "redis_cpu_us_per_command": cpu }));
        }
        redis.cmd(&["DEL", "offline:{t:nobody}"]);
    }
    let reference = redis_benchmark(&redis, 1, 128).map(|r| r.0);
    if let Some(r) = reference {
        println!("redis-benchmark PUBLISH -c 1 -P 128: {r:.0} requests/s (reference client, same run)");
    }
    // Many connections each writing little (many nodes, each with few commands per
    // master per round): what Redis spends per command then.
    let mut many = Vec::new();
    for (clients, pipeline) in [(100usize, 1usize), (100, 4), (100, 16)] {
        if let Some((rps, cpu)) = redis_benchmark(&redis, clients, pipeline) {
            println!("redis-benchmark PUBLISH -c {clients} -P {pipeline}: {rps:.0} requests/s, redis CPU {cpu:.2} us/command");
            many.push(json!({ "clients": clients, "pipeline": pipeline, "requests_per_sec": rps, "redis_cpu_us_per_command": cpu }));
        }
    }

    println!("\n== 1:1 publish-to-delivery latency (2 nodes, 2000 messages each way, 2 kHz)");
    let url_s = redis.url();
    let args = [
        "--shards",
        "1",
        "--redis",
        url_s.as_str(),
        "--events-per-second",
        "100000",
        "--outbound-queue-bytes",
        "16777216",
    ];
    let a = Server::start(&args);
    let b = Server::start(&args);
    for s in [&a, &b] {
        s.wait_for("redis up", |s| s.metric("shardgate_redis_up") == 1);
    }
    let mut alice = Client::connect(a.addr, &token("alice", "bench"));
    let same = Client::connect(a.addr, &token("same", "bench"));
    let cross = Client::connect(b.addr, &token("cross", "bench"));
    let n = 2000;
    let h_same = latency(&mut alice, same, "same", n);
    let h_cross = latency(&mut alice, cross, "cross", n);
    for (label, h) in [("same node", &h_same), ("across nodes", &h_cross)] {
        println!(
            "{label:<14} p50 {:>6} us  p90 {:>6} us  p99 {:>6} us  max {:>7} us  ({} delivered)",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.max(),
            h.len()
        );
    }
    let ratio = h_cross.value_at_quantile(0.5) as f64 / h_same.value_at_quantile(0.5).max(1) as f64;
    println!("cross-node / same-node p50: {ratio:.2}x");
    let cmds = a.metric("shardgate_redis_commands_total") + b.metric("shardgate_redis_commands_total");
    println!("redis commands issued by both nodes during the run: {cmds}");
    println!(
        "RESULT {}",
        json!({ "pipeline": results, "redis_benchmark_publish_p128": reference, "redis_benchmark_many_clients": many, "latency_same_node": pct(&h_same), "latency_cross_node": pct(&h_cross), "redis_commands_total": cmds })
    );
}
