//! What connection state recovery costs, against a real redis-server (run:
//! `cargo bench --bench recovery`). Two nodes on one Redis, without and with `--recovery`,
//! in the same run, alternating turns (a warm-up turn, then three each; medians):
//!
//! * **1:1**: 4 senders on node A -> 4 recipients on node B, and 4 -> 4 on node A alone
//!   (without recovery a same-node 1:1 needs no Redis command), 10 000 messages per
//!   sender, fire and forget, 64-byte content;
//! * **room**: 4 senders on A, 8 members (4 on A, 4 on B), 2 500 messages per sender;
//! * the same 1:1 and room workloads on one node without Redis (the embedded bus, where
//!   shard 0's journal orders recoverable messages).
//!
//! For each: delivered messages/s, CPU per delivered message of both node processes and
//! of redis-server (from `/proc`), Redis commands executed per message (`INFO
//! commandstats`: script bodies' calls included) and commands the bridges sent. Results
//! print as a table and one JSON line (`RESULT {...}`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use serde_json::json;
use support::redis::RedisServer;
use support::{cpu_seconds, token, Client, Server};

const SENDERS: usize = 4;
const ROUNDS: usize = 3;

/// Fire-and-forget senders: no rate limit, queues large enough for the bursts.
const CONFIG: &str =
    "[runtime]\nevents_per_second = 10000000\nevent_burst = 10000000\noutbound_queue_bytes = 67108864\n";

/// Commands redis-server executed so far (scripts' inner calls included).
fn redis_calls(redis: &RedisServer) -> u64 {
    let shardgate_io::resp::Reply::BulkString(info) = redis.cmd(&["INFO", "commandstats"]) else { return 0 };
    String::from_utf8_lossy(&info)
        .lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

#[derive(Clone, Copy)]
enum Shape {
    /// Senders on A, recipients on B.
    Cross,
    /// Senders and recipients on A.
    Same,
    /// Senders on A, a room with members on A and B.
    Room,
}

struct Turn {
    rate: f64,
    node_us: f64,
    redis_us: f64,
    redis_calls: f64,
    bridge_cmds: f64,
}

fn run(redis: &RedisServer, a: &Server, b: &Server, shape: Shape, tenant: &str) -> Turn {
    let (per_sender, members_per_node) = match shape {
        Shape::Room => (2_500, SENDERS),
        _ => (10_000, 0),
    };
    let recv_node = if matches!(shape, Shape::Cross) { b } else { a };
    let receivers: Vec<Client> = match shape {
        Shape::Room => (0..2 * members_per_node)
            .map(|i| {
                let node = if i < members_per_node { a } else { b };
                let mut c = Client::connect(node.addr, &token(&format!("m{i}"), tenant));
                assert_eq!(c.emit_ack("join_room", json!("hall"))["ok"], true);
                c
            })
            .collect(),
        _ => {
            (0..SENDERS).map(|i| Client::connect(recv_node.addr, &token(&format!("r{i}"), tenant))).collect()
        }
    };
    let senders: Vec<Client> = (0..SENDERS)
        .map(|i| {
            let mut c = Client::connect(a.addr, &token(&format!("s{i}"), tenant));
            if matches!(shape, Shape::Room) {
                assert_eq!(c.emit_ack("join_room", json!("hall"))["ok"], true);
            }
            c
        })
        .collect();
    let expect = match shape {
        Shape::Room => SENDERS * per_sender,
        _ => per_sender,
    };
    // One process serving both sides (the embedded bus) is counted once.
    let nodes: Vec<&Server> = if std::ptr::eq(a, b) { vec![a] } else { vec![a, b] };
    let node_cpu = || nodes.iter().map(|n| cpu_seconds(n.pid())).sum::<f64>();
    let bridges = || nodes.iter().map(|n| n.metric("shardgate_redis_commands_total")).sum::<u64>();
    let (node0, redis0, calls0, cmds0) =
        (node_cpu(), cpu_seconds(redis.pid()), redis_calls(redis), bridges());
    let start = Instant::now();
    let body = match shape {
        Shape::Room => |_| json!({ "room": "hall", "content": "x".repeat(64) }),
        _ => |i| json!({ "to": format!("r{i}"), "content": "x".repeat(64) }),
    };
    let delivered = support::blast(receivers, expect, senders, per_sender, body);
    let secs = start.elapsed().as_secs_f64();
    let messages = (SENDERS * per_sender) as f64;
    let cmds = bridges() - cmds0;
    let d = delivered.max(1) as f64;
    Turn {
        rate: delivered as f64 / secs,
        node_us: (node_cpu() - node0) * 1e6 / d,
        redis_us: (cpu_seconds(redis.pid()) - redis0) * 1e6 / d,
        // INFO itself is one call between the two readings.
        redis_calls: (redis_calls(redis) - calls0).saturating_sub(1) as f64 / messages,
        bridge_cmds: cmds as f64 / messages,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let redis = RedisServer::start();
    let url = redis.url();
    let node = |recovery: bool| {
        let mut args = vec!["--shards", "1", "--redis", url.as_str()];
        if recovery {
            args.push("--recovery");
        }
        let s = Server::start_with_config(&args, Some(CONFIG));
        s.wait_for("redis up", |s| s.metric("shardgate_redis_up") == 1);
        s
    };
    let off = (node(false), node(false));
    let on = (node(true), node(true));
    let alone = |recovery: bool| {
        let mut args = vec!["--shards", "1"];
        if recovery {
            args.push("--recovery");
        }
        Server::start_with_config(&args, Some(CONFIG))
    };
    let (alone_off, alone_on) = (alone(false), alone(true));
    let mut results = Vec::new();
    println!("== connection state recovery: off vs on (2 nodes, 1 shard each, one redis-server)");
    let workloads = [
        ("1:1 across nodes", Shape::Cross, false),
        ("1:1 same node", Shape::Same, false),
        ("room of 8 on 2 nodes", Shape::Room, false),
        ("embedded bus: 1:1", Shape::Same, true),
        ("embedded bus: room of 8", Shape::Room, true),
    ];
    for (name, shape, embedded) in workloads {
        let mut turns: [Vec<Turn>; 2] = [Vec::new(), Vec::new()];
        for round in 0..=ROUNDS {
            let pairs = if embedded {
                [(&alone_off, &alone_off), (&alone_on, &alone_on)]
            } else {
                [(&off.0, &off.1), (&on.0, &on.1)]
            };
            for (i, (a, b)) in pairs.into_iter().enumerate() {
                let t = run(&redis, a, b, shape, &format!("t{round}{i}{}", name.len()));
                if round > 0 {
                    turns[i].push(t);
                }
            }
        }
        let pick = |i: usize, f: fn(&Turn) -> f64| median(turns[i].iter().map(f).collect());
        let row = |i: usize| {
            (
                pick(i, |t| t.rate),
                pick(i, |t| t.node_us),
                pick(i, |t| t.redis_us),
                pick(i, |t| t.redis_calls),
                pick(i, |t| t.bridge_cmds),
            )
        };
        let (r0, n0, x0, c0, b0) = row(0);
        let (r1, n1, x1, c1, b1) = row(1);
        println!("{name}:");
        println!("  off: {r0:>9.0} msgs/s  nodes {n0:>6.2} us/msg  redis {x0:>6.2} us/msg  redis calls {c0:>5.2}/msg  bridge commands {b0:>5.2}/msg");
        println!("  on:  {r1:>9.0} msgs/s  nodes {n1:>6.2} us/msg  redis {x1:>6.2} us/msg  redis calls {c1:>5.2}/msg  bridge commands {b1:>5.2}/msg");
        println!(
            "  on/off: throughput {:.2}x, node CPU {:.2}x, redis CPU {:.2}x",
            r1 / r0,
            n1 / n0.max(1e-9),
            x1 / x0.max(1e-9)
        );
        results.push(json!({
            "workload": name,
            "off": { "msgs_per_sec": r0.round(), "node_us": n0, "redis_us": x0, "redis_calls": c0, "bridge_commands": b0 },
            "on": { "msgs_per_sec": r1.round(), "node_us": n1, "redis_us": x1, "redis_calls": c1, "bridge_commands": b1 },
        }));
    }
    println!("RESULT {}", json!({ "recovery": results }));
}
