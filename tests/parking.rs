//! Idle WebSockets park (no task, their descriptor in the shard's epoll set) and keep
//! every behaviour of a running connection: they receive, they speak (read without a
//! task), they answer pings, they get a task back for a fragmented message or a burst,
//! and they close, by either side, with the right reason. Against the real binary.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use shardgate_io::ws::{self, OpKind};
use support::{token, Client, Incoming, Server};

const PARKED: &str = "shardgate_websockets_parked";

/// A node whose tick is short (a quarter of the 400 ms ping interval): idle connections
/// park within a fraction of a second.
fn node() -> Server {
    Server::start(&[
        "--shards",
        "1",
        "--ping-interval-ms",
        "400",
        "--ping-timeout-ms",
        "400",
        "--events-per-second",
        "100000",
    ])
}

/// Waits, answering pings, until the node counts `n` parked WebSockets.
fn until_parked(srv: &Server, clients: &mut [&mut Client], n: u64) {
    let end = Instant::now() + Duration::from_secs(10);
    while srv.metric(PARKED) != n {
        assert!(Instant::now() < end, "{} parked, not {n}", srv.metric(PARKED));
        for c in clients.iter_mut() {
            c.expect_no_event("nothing", Duration::from_millis(20));
        }
    }
}

#[test]
fn parked_websockets_receive_speak_and_answer_pings() {
    let srv = node();
    let mut alice = Client::connect(srv.addr, &token("alice", "t"));
    let mut bob = Client::connect(srv.addr, &token("bob", "t"));
    for c in [&mut alice, &mut bob] {
        assert_eq!(c.emit_ack("join_room", json!("lobby"))["ok"], true);
    }
    until_parked(&srv, &mut [&mut alice, &mut bob], 2);
    let (parks, resumes) =
        (srv.metric("shardgate_websocket_parks_total"), srv.metric("shardgate_websocket_resumes_total"));
    assert!(parks >= 2);

    // Bob speaks while parked: read and handled without a task; Alice, parked, receives.
    let ack = bob.emit_ack("message:send", json!({ "room": "lobby", "content": "hello" }));
    assert!(ack["id"].is_string(), "{ack}");
    assert_eq!(alice.expect_event("message:new")["content"], "hello");
    assert!(srv.metric("shardgate_websocket_parked_reads_total") >= 1);
    assert_eq!(srv.metric("shardgate_websocket_resumes_total"), resumes, "no task was needed");

    // Several ping rounds later both are still there: pongs are read while parked.
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        for c in [&mut alice, &mut bob] {
            c.expect_no_event("nothing", Duration::from_millis(20));
        }
    }
    assert_eq!(srv.metric("shardgate_connections_open"), 2);
    assert!(srv.metric("shardgate_websocket_parked_reads_total") >= 4, "pongs read while parked");
    until_parked(&srv, &mut [&mut alice, &mut bob], 2);
    let ack = alice.emit_ack("message:send", json!({ "to": "bob", "content": "psst" }));
    assert!(ack["id"].is_string(), "{ack}");
    assert_eq!(bob.expect_event("message:new")["content"], "psst");
}

#[test]
fn a_parked_websocket_gets_a_task_back_for_a_fragment_or_a_burst() {
    let srv = node();
    let mut c = Client::connect(srv.addr, &token("frag", "t"));
    until_parked(&srv, &mut [&mut c], 1);
    let resumes = srv.metric("shardgate_websocket_resumes_total");
    // The first fragment of a message: a partial message needs the task's reader.
    let text = b"42[\"join_room\",\"frag\"]";
    let mut first = Vec::new();
    ws::encode_masked_frame(OpKind::Text, &text[..6], [5, 6, 7, 8], &mut first);
    first[0] &= 0x7f; // clear FIN
    c.send_raw(&first);
    let end = Instant::now() + Duration::from_secs(5);
    while srv.metric("shardgate_websocket_resumes_total") == resumes {
        assert!(Instant::now() < end, "the fragment did not give the connection a task");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rest = Vec::new();
    ws::encode_masked_frame(OpKind::Continuation, &text[6..], [1, 2, 3, 4], &mut rest);
    c.send_raw(&rest);
    assert_eq!(c.expect_event("room_joined")["room"], "frag");

    // Parked again, then a burst of events larger than one read: the first read fills
    // the buffer, the connection gets a task, and every event is answered.
    until_parked(&srv, &mut [&mut c], 1);
    let resumes = srv.metric("shardgate_websocket_resumes_total");
    let pad = "p".repeat(1000);
    let mut burst = Vec::new();
    for i in 0..200 {
        let packet = format!("42{i}[\"message:send\",{{\"room\":\"frag\",\"content\":\"m{i}{pad}\"}}]");
        ws::encode_masked_frame(OpKind::Text, packet.as_bytes(), [3, 1, 4, 1], &mut burst);
    }
    c.send_raw(&burst);
    let mut acked = std::collections::BTreeSet::new();
    let end = Instant::now() + Duration::from_secs(10);
    while acked.len() < 200 {
        assert!(Instant::now() < end, "{} of 200 acks", acked.len());
        if let Some(Incoming::Ack(id, args)) = c.recv_until(end) {
            assert!(args[0]["id"].is_string(), "{args:?}");
            acked.insert(id);
        }
    }
    assert!(srv.metric("shardgate_websocket_resumes_total") > resumes);
}

#[test]
fn parked_websockets_close_from_either_side_with_their_reason() {
    let srv = node();
    // The client goes away while parked: the node notices at once, not at the ping
    // timeout.
    let gone = Client::connect(srv.addr, &token("gone", "t"));
    let mut quiet = Client::connect(srv.addr, &token("quiet", "t"));
    let mut stays = Client::connect(srv.addr, &token("stays", "t"));
    until_parked(&srv, &mut [&mut quiet, &mut stays], 3);
    drop(gone);
    srv.wait_for("the closed client to be gone", |s| s.metric("shardgate_connections_open") == 2);
    assert_eq!(srv.metric("shardgate_connections_closed_total{reason=\"client_closed\"}"), 1);

    // A parked client that stops answering pings is closed by the ping timeout.
    quiet.auto_pong = false;
    assert_eq!(quiet.expect_closed().1, "ping_timeout");

    // A parked client whose socket fills (it reads nothing) is cut off as a slow consumer
    // once its queue passes the bound, and neighbours are unaffected.
    let srv = Server::start(&[
        "--shards",
        "1",
        "--ping-interval-ms",
        "400",
        "--ping-timeout-ms",
        "60000",
        "--outbound-queue-bytes",
        "65536",
        "--events-per-second",
        "100000",
        "--drain-ms",
        "500",
    ]);
    let slow = support::silent_member(srv.addr, "slow", "flood");
    let mut sender = Client::connect(srv.addr, &token("sender", "t"));
    sender.emit_ack("join_room", json!("flood"));
    srv.wait_for("the silent client to park", |s| s.metric(PARKED) >= 1);
    support::flood_until_slow_consumer(&srv, &mut sender, "flood");
    drop(slow);

    // A drain says goodbye to parked connections with 1001 server_shutdown.
    let mut parked = Client::connect(srv.addr, &token("parked", "t"));
    srv.wait_for("both to park", |s| s.metric(PARKED) == 2);
    srv.signal(libc::SIGTERM);
    assert_eq!(parked.expect_closed(), (1001, "server_shutdown".to_string()));
}
