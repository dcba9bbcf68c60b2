//! The bundled load generator against the real binary: every scenario, worker processes
//! merged into one report (with the HTML charts), errors counted by kind, runs bounded by
//! `--duration` even against a server that never answers.

mod support;

use std::process::Command;

use support::{Server, SECRET};

/// Runs `shardgate-loadtest SCENARIO_AND_FLAGS --url URL --jwt-secret SECRET EXTRA --json`
/// and returns its report; `ok` demands exit 0.
fn loadtest(flags: &str, url: &str, secret: &str, extra: &[&str], ok: bool) -> serde_json::Value {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_shardgate")).with_file_name("shardgate-loadtest");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --workspace --bins` (scripts/test.sh does)",
        bin.display()
    );
    let out = Command::new(&bin)
        .args(flags.split_whitespace())
        .args(["--url", url, "--jwt-secret", secret])
        .args(extra)
        .arg("--json")
        .output()
        .unwrap();
    if ok {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let report = serde_json::from_slice(&out.stdout);
    report.unwrap_or_else(|e| panic!("no JSON report ({e}): {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn idle_scenario_holds_every_connection_and_reports_memory() {
    let srv = Server::start(&["--shards", "2"]);
    let pid = srv.pid().to_string();
    let url = format!("http://{}", srv.addr);
    let r = loadtest(
        "idle --connections 300 --rate 3000 --duration 3s --cores 2 --source-ips 127.0.0.1-127.0.0.3",
        &url,
        SECRET,
        &["--server-pid", &pid],
        true,
    );
    assert_eq!(r["connections_peak"], 300, "{r}");
    assert!(r["errors"].as_object().unwrap().values().all(|v| v == 0), "{r}");
    assert!(r["rss_bytes_per_connection"].as_u64().is_some(), "{r}");
    assert!(srv.metric("shardgate_connections_accepted_total") >= 300);

    // Refused tokens are counted, not hidden.
    let r = loadtest("idle --connections 5 --duration 1s", &url, "a-different-secret-altogether", &[], false);
    assert_eq!(r["errors"]["auth"], 5, "{r}");
}

#[test]
fn ack_rtt_scenario_times_every_acked_message() {
    let srv = Server::start(&["--shards", "2"]);
    let url = format!("http://{}", srv.addr);
    let r =
        loadtest("ack-rtt --connections 20 --msg-rate 200 --duration 3s --cores 2", &url, SECRET, &[], true);
    let m = &r["messages"];
    let (sent, acked) = (m["sent"].as_u64().unwrap(), m["acked"].as_u64().unwrap());
    // About 200/s for the seconds left after connecting; every ack that came back timed.
    assert!(sent > 200 && acked + 20 >= sent, "{r}");
    assert!(m["latency_us"]["p50"].as_u64().unwrap() > 0, "{r}");
    assert!(m["latency_us"]["max"].as_u64().unwrap() >= m["latency_us"]["p99"].as_u64().unwrap(), "{r}");
    // The server saw them (a few in flight when the generator closed may be cut off).
    let seen = srv.metric("shardgate_messages_direct_total");
    assert!(seen <= sent && seen + 40 >= sent, "server saw {seen}, generator sent {sent}");
}

#[test]
fn fanout_scenario_counts_deliveries_and_latency() {
    let srv = Server::start(&["--shards", "2"]);
    let url = format!("http://{}", srv.addr);
    let r = loadtest(
        "fanout --connections 60 --room-size 20 --msg-rate 30 --rate 600 --duration 4s",
        &url,
        SECRET,
        &[],
        true,
    );
    let f = &r["fanout"];
    assert_eq!((f["rooms"].as_u64(), f["room_size"].as_u64()), (Some(3), Some(20)), "{r}");
    let (got, want) = (f["deliveries"].as_u64().unwrap(), f["expected_deliveries"].as_u64().unwrap());
    // Every message reaches the 19 other members (a few may be in flight at the end).
    assert!(want > 0 && got * 10 >= want * 9 && got <= want, "{r}");
    assert!(f["latency_us"]["p50"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn connect_storm_measures_a_wave_and_a_mass_reconnect() {
    let srv = Server::start(&["--shards", "2"]);
    let url = format!("http://{}", srv.addr);
    let r = loadtest("connect-storm --connections 100 --rate 2000 --duration 5s", &url, SECRET, &[], true);
    let waves = r["waves"].as_array().unwrap();
    assert_eq!(waves.len(), 2, "{r}");
    for w in waves {
        assert_eq!(w["connected"], 100, "{r}");
        assert!(w["connects_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(r["errors"].as_object().unwrap().values().all(|v| v == 0), "{r}");
    assert!(srv.metric("shardgate_connections_accepted_total") >= 200);
}

#[test]
fn direct_scenario_pairs_users_across_nodes() {
    direct_across_nodes(support::redis::RedisServer::start());
}

/// The same with the nodes on a real Redis Cluster (3 masters, 3 replicas).
#[test]
fn direct_scenario_pairs_users_across_nodes_on_a_redis_cluster() {
    direct_across_nodes(support::redis::RedisServer::start_cluster(3));
}

fn direct_across_nodes(redis: support::redis::RedisServer) {
    let url = redis.url();
    let nodes: Vec<Server> = (0..2).map(|_| Server::start(&["--redis", &url])).collect();
    for n in &nodes {
        n.wait_for("redis up", |s| s.metric("shardgate_redis_up") == 1);
    }
    let urls = format!("http://{},http://{}", nodes[0].addr, nodes[1].addr);
    let r = loadtest("direct --connections 20 --msg-rate 100 --duration 3s", &urls, SECRET, &[], true);
    let m = &r["messages"];
    let (sent, delivered) = (m["sent"].as_u64().unwrap(), m["delivered"].as_u64().unwrap());
    assert!(sent > 100 && delivered + 20 >= sent, "{r}");
    assert!(m["delivery_latency_us"]["p50"].as_u64().unwrap() > 0, "{r}");
    // Every message crossed nodes: user i on node i % 2 sends to user i + 1 on the other.
    let remote: u64 = nodes.iter().map(|n| n.metric("shardgate_messages_direct_total")).sum();
    assert!(remote + 20 >= sent, "{r}");
}

#[test]
fn worker_processes_split_a_run_and_merge_one_report() {
    let srv = Server::start(&["--shards", "2"]);
    let pid = srv.pid().to_string();
    let url = format!("http://{}", srv.addr);
    let dir = std::env::temp_dir().join(format!("shardgate-lt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let html = dir.join("fanout.html");
    let r = loadtest(
        "fanout --connections 90 --room-size 30 --msg-rate 30 --rate 600 --duration 4s --cores 1 --processes 3",
        &url,
        SECRET,
        &["--server-pid", &pid, "--report", html.to_str().unwrap()],
        true,
    );
    assert_eq!(r["processes"], 3, "{r}");
    assert_eq!(r["connections_peak"], 90, "{r}");
    // Members and publishers of one room sit in different processes: the send time in
    // the payload is on the run's shared clock, so transit times stay meaningful.
    let f = &r["fanout"];
    let (got, want) = (f["deliveries"].as_u64().unwrap(), f["expected_deliveries"].as_u64().unwrap());
    assert!(want > 0 && got * 10 >= want * 9 && got <= want, "{r}");
    let p99 = f["latency_us"]["p99"].as_u64().unwrap();
    assert!(p99 > 0 && p99 < 2_000_000, "{r}");
    // The server's CPU time over the steady window is reported per delivery.
    assert!(r["steady"]["server_cpu_us_per_received"].as_f64().is_some(), "{r}");
    assert!(r["timeline"].as_array().unwrap().len() >= 6, "{r}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("Latency by percentile"), "no charts in the report");
    // A fan-out receives far more than it sends: each has its own chart and scale.
    assert!(page.contains("Sent over time") && page.contains("Received over time"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_run_past_the_open_file_limit_asks_for_more_processes() {
    let r = Command::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_shardgate")).with_file_name("shardgate-loadtest"),
    )
    .args(["idle", "--url", "http://127.0.0.1:9", "--jwt-secret", SECRET])
    .args(["--connections", "10000000", "--processes", "1"])
    .output()
    .unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("open-file limit") && err.contains("--processes"), "{err}");
}

#[test]
fn a_server_that_never_answers_is_counted_and_the_run_stays_bounded() {
    // Accepts TCP (the kernel's backlog) but never answers the upgrade.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let began = std::time::Instant::now();
    let r = loadtest("idle --connections 5 --duration 2s", &url, SECRET, &[], true);
    assert_eq!(r["errors"]["timeout"], 5, "{r}");
    assert_eq!(r["connections_peak"], 0, "{r}");
    assert!(began.elapsed() < std::time::Duration::from_secs(6), "took {:?}", began.elapsed());
}
