//! Persistence benchmark against a real Apache Kafka broker (KRaft, started from the jars
//! `scripts/kafka/install.sh` caches): run with
//! `cargo bench --bench persist`.
//!
//! The same 1:1 workload (4 senders -> 4 recipients, 20 000 messages each way, fire and
//! forget, 64-byte content) runs against a node without `--kafka` and one with it, in the
//! same run; reported: delivered messages/s on each, the ratio (the cost of persistence
//! on the node's message throughput), and the records/s the bridge got acknowledged by
//! the broker (every message plus its socket events).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::kafka::{free_port, Broker};
use support::{token, Client, Incoming, Server};

const SENDERS: usize = 4;
const PER_SENDER: usize = 20_000;

fn workload(srv: &Server, tenant: &str) -> f64 {
    let mut receivers: Vec<Client> =
        (0..SENDERS).map(|i| Client::connect(srv.addr, &token(&format!("r{i}"), tenant))).collect();
    let mut senders: Vec<Client> =
        (0..SENDERS).map(|i| Client::connect(srv.addr, &token(&format!("s{i}"), tenant))).collect();
    let start = Instant::now();
    let rx: Vec<_> = receivers
        .drain(..)
        .map(|mut r| {
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(60);
                let mut n = 0;
                while n < PER_SENDER && Instant::now() < end {
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
                for _ in 0..PER_SENDER {
                    s.emit("message:send", json!({ "to": format!("r{i}"), "content": "x".repeat(64) }));
                }
                s
            })
        })
        .collect();
    let _senders: Vec<Client> = tx.into_iter().map(|t| t.join().unwrap()).collect();
    let delivered: usize = rx.into_iter().map(|t| t.join().unwrap()).sum();
    delivered as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // Fire-and-forget senders: no rate limit, queues large enough for the bursts.
    let config =
        "[runtime]\nevents_per_second = 10000000\nevent_burst = 10000000\noutbound_queue_bytes = 67108864\n";
    let args = ["--shards", "1"];
    let plain = Server::start_with_config(&args, Some(config));
    let off = workload(&plain, "off");
    drop(plain);

    let broker = Broker::start_on(free_port());
    let addr = broker.addr();
    let mut with = args.to_vec();
    with.extend_from_slice(&["--kafka", addr.as_str()]);
    let node = Server::start_with_config(&with, Some(config));
    let before = Instant::now();
    let on = workload(&node, "on");
    let expected = (SENDERS * PER_SENDER) as u64;
    println!("messages/s delivered, persistence off: {off:>10.0}");
    println!("messages/s delivered, persistence on:  {on:>10.0}  ({:.2}x of off)", on / off);
    let end = Instant::now() + Duration::from_secs(300);
    while node.metric("shardgate_kafka_delivered_total") < expected && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let kafka_secs = before.elapsed().as_secs_f64();
    let records = node.metric("shardgate_kafka_delivered_total");
    println!(
        "records acknowledged by the broker: {records} in {kafka_secs:.2}s = {:.0} records/s",
        records as f64 / kafka_secs
    );
    println!(
        "RESULT {}",
        json!({ "msgs_per_sec_off": off.round(), "msgs_per_sec_on": on.round(), "ratio_on_off": on / off,
                "kafka_records": records, "kafka_records_per_sec": (records as f64 / kafka_secs).round() })
    );
}
