//! Cluster benchmarks against a real redis-server (run: `cargo bench --bench cluster`).
//!
//! 1. Bridge pipeline throughput: the bridge's own Redis connection (`RedisConn`, the
//!    `io` RESP codec over a glommio socket) sending batches of 1..1024 commands, as
//!    commands/s and as a ratio to batch size 1 measured in the same run; plus
//!    `redis-benchmark` at the same pipeline depth on one connection, as the reference.
//! 2. Publish-to-delivery latency of 1:1 messages: sender on node A, recipient on node B
//!    (through Redis), against sender and recipient on the same node (same run).
//!
//! Results print as a table and one JSON line (`RESULT {...}`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;
use shardgate::cluster::redis::RedisConn;
use shardgate::cluster::scripts;
use shardgate::config::RedisUrl;
use shardgate_io::resp;
use support::redis::RedisServer;
use support::{token, Client, Incoming, Server};

fn pipeline_throughput(url: &RedisUrl, cmd: Vec<Vec<u8>>, batch: usize, dur: Duration) -> f64 {
    let url = url.clone();
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
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
            done as f64 / start.elapsed().as_secs_f64()
        })
        .unwrap()
        .join()
        .unwrap()
}

fn redis_benchmark(port: u16, pipeline: usize) -> Option<f64> {
    let out = std::process::Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-c", "1", "-n", "200000", "-P", &pipeline.to_string(), "-q"])
        .args(["PUBLISH", "bench:nobody", &"x".repeat(64)])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "PUBLISH bench:nobody xxx: 123456.79 requests per second, p50=..."
    let line = text.lines().rev().find(|l| l.contains("requests per second"))?;
    let rps = line.split("requests per second").next()?.rsplit(':').next()?.trim();
    rps.parse().ok()
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

fn main() {
    if std::env::args().any(|a| a == "--list") {
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
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let mut results = Vec::new();
    for (name, cmd) in [("PUBLISH 64B", publish), ("EVAL ROUTE (offline user)", route)] {
        let base = pipeline_throughput(&url, cmd.clone(), 1, dur);
        for batch in [1usize, 16, 128, 1024] {
            let rate = if batch == 1 { base } else { pipeline_throughput(&url, cmd.clone(), batch, dur) };
            println!("{name:<28} batch {batch:>5}: {rate:>12.0} commands/s  ({:.1}x batch 1)", rate / base);
            results.push(json!({ "command": name, "batch": batch, "commands_per_sec": rate.round(), "ratio_to_batch_1": rate / base }));
        }
        redis.cmd(&["DEL", "offline:{t:nobody}"]);
    }
    let reference = redis_benchmark(redis.port, 128);
    if let Some(r) = reference {
        println!("redis-benchmark PUBLISH -c 1 -P 128: {r:.0} requests/s (reference client, same run)");
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
        json!({ "pipeline": results, "redis_benchmark_publish_p128": reference, "latency_same_node": pct(&h_same), "latency_cross_node": pct(&h_cross), "redis_commands_total": cmds })
    );
}
