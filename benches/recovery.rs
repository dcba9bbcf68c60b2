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

use std::time::{Duration, Instant};

use serde_json::json;
use support::redis::RedisServer;
use support::{token, Client, Incoming, Server};

const SENDERS: usize = 4;
const ROUNDS: usize = 3;

/// Fire-and-forget senders: no rate limit, queues large enough for the bursts.
const CONFIG: &str =
    "[runtime]\nevents_per_second = 10000000\nevent_burst = 10000000\noutbound_queue_bytes = 67108864\n";

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    (ticks(11) + ticks(12)) / (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

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
    let mut receivers: Vec<Client> = match shape {
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
    let mut senders: Vec<Client> = (0..SENDERS)
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
    let pids =
        if std::ptr::eq(a, b) { vec![a.pid(), redis.pid()] } else { vec![a.pid(), b.pid(), redis.pid()] };
    let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let bridges = |a: &Server, b: &Server| {
        let m = |s: &Server| s.metric("shardgate_redis_commands_total");
        if std::ptr::eq(a, b) {
            m(a)
        } else {
            m(a) + m(b)
        }
    };
    let (calls0, cmds0) = (redis_calls(redis), bridges(a, b));
    let start = Instant::now();
    let rx: Vec<_> = receivers
        .drain(..)
        .map(|mut r| {
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(60);
                let mut n = 0;
                while n < expect && Instant::now() < end {
                    if let Some(Incoming::Event(name, _, _)) = r.recv_until(end) {
                        n += usize::from(name == "message:new");
                    }
                }
                n
            })
        })
        .collect();
    let tx: Vec<_> = senders
        .drain(..)
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || {
                for _ in 0..per_sender {
                    let body = match shape {
                        Shape::Room => json!({ "room": "hall", "content": "x".repeat(64) }),
                        _ => json!({ "to": format!("r{i}"), "content": "x".repeat(64) }),
                    };
                    s.emit("message:send", body);
                }
                s
            })
        })
        .collect();
    let _senders: Vec<Client> = tx.into_iter().map(|t| t.join().unwrap()).collect();
    let delivered: usize = rx.into_iter().map(|t| t.join().unwrap()).sum();
    let secs = start.elapsed().as_secs_f64();
    let mut cpu: Vec<f64> = pids.iter().zip(&cpu0).map(|(&p, c0)| cpu_seconds(p) - c0).collect();
    if cpu.len() == 2 {
        cpu.insert(1, 0.0);
    }
    let messages = (SENDERS * per_sender) as f64;
    let cmds = bridges(a, b) - cmds0;
    let d = delivered.max(1) as f64;
    Turn {
        rate: delivered as f64 / secs,
        node_us: (cpu[0] + cpu[1]) * 1e6 / d,
        redis_us: cpu[2] * 1e6 / d,
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
