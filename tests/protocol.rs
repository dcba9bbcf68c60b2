//! Protocol limits and bad input against the real binary: timeouts, payload limit,
//! malformed frames and packets, slow consumers, rate limits and the HTTP surface. Each
//! bad client must be closed with a specific reason while its neighbours keep working.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use shardgate_io::ws::{self, OpKind};
use support::{token, Client, Server};

#[test]
fn http_surface() {
    let srv = Server::start(&[]);
    assert_eq!(srv.get("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(srv.get("/readyz").0, 200);
    let (status, body) = srv.get("/socket.io/?EIO=4&transport=polling");
    assert_eq!(status, 200, "long-polling handshake: {body}");
    assert!(body.starts_with("0{\"sid\""), "{body}");
    let (status, body) = srv.get("/socket.io/?EIO=4&transport=flashsocket");
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["code"].as_u64(), v["message"].as_str()), (Some(0), Some("Transport unknown")));
    assert!(v["detail"].as_str().unwrap().contains("polling or websocket"));
    let (status, body) = srv.get("/socket.io/?EIO=3&transport=websocket");
    assert_eq!(status, 400);
    assert!(body.contains("Unsupported protocol version"));
    let (status, body) = srv.get("/socket.io/?EIO=4&transport=websocket");
    assert_eq!(status, 400, "a websocket request without upgrade headers: {body}");
    assert_eq!(srv.get("/nope").0, 404);
    let (status, metrics) = srv.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("# TYPE shardgate_connections_accepted_total counter"));
    assert!(metrics.contains("shardgate_fd_limit"));
}

#[test]
fn ping_timeout_closes_silent_clients_only() {
    let srv = Server::start(&["--ping-interval-ms", "200", "--ping-timeout-ms", "300"]);
    let mut quiet = Client::connect(srv.addr, &token("quiet", "t"));
    quiet.auto_pong = false;
    let mut live = Client::connect(srv.addr, &token("live", "t"));
    assert_eq!((quiet.open.ping_interval, quiet.open.ping_timeout), (200, 300));
    // The ponging client outlives several ping rounds.
    let live = std::thread::spawn(move || {
        live.expect_no_event("nothing", Duration::from_millis(1500));
        assert_eq!(live.emit_ack("join_room", json!("r"))["ok"], true);
    });
    let started = Instant::now();
    assert_eq!(quiet.expect_closed().1, "ping_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    live.join().unwrap();
}

#[test]
fn connect_timeout_closes_clients_that_never_connect() {
    let srv = Server::start(&["--connect-timeout-ms", "300"]);
    let mut c = Client::upgrade(srv.addr, "", "");
    assert_eq!(c.expect_closed().1, "connect_timeout");
}

#[test]
fn handshake_timeout_drops_silent_tcp_connections() {
    let srv = Server::start_with_config(&[], Some("[runtime]\nhandshake_timeout_ms = 200\n"));
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    srv.wait_for("handshake timeout counted", |s| {
        s.metric("shardgate_connections_closed_total{reason=\"handshake_timeout\"}") == 1
    });
}

#[test]
fn oversized_payload_is_refused_with_1009() {
    let srv = Server::start(&["--max-payload", "1000"]);
    let mut c = Client::connect(srv.addr, &token("a", "t"));
    let mut other = Client::connect(srv.addr, &token("b", "t"));
    assert_eq!(c.open.max_payload, 1000);
    c.emit("message:send", json!({ "to": "b", "content": "x".repeat(5000) }));
    assert_eq!(c.expect_closed(), (1009, "payload_too_large".to_string()));
    assert_eq!(other.emit_ack("join_room", json!("r"))["ok"], true);
}

#[test]
fn malformed_packets_close_with_a_reason_and_spare_neighbours() {
    let srv = Server::start(&["--shards", "2"]);
    let mut bystander = Client::connect(srv.addr, &token("bystander", "t"));
    bystander.emit_ack("join_room", json!("r"));
    type Case = (&'static str, Box<dyn Fn(&mut Client)>, &'static str);
    let cases: Vec<Case> = vec![
        ("unknown engine.io type", Box::new(|c: &mut Client| c.send_text("9")), "malformed_packet"),
        ("unknown socket.io type", Box::new(|c: &mut Client| c.send_text("49[]")), "malformed_packet"),
        ("broken json", Box::new(|c: &mut Client| c.send_text("42[\"message:send\",{")), "malformed_packet"),
        ("event not an array", Box::new(|c: &mut Client| c.send_text("42{\"a\":1}")), "malformed_packet"),
        (
            "invalid utf-8",
            Box::new(|c: &mut Client| {
                let mut f = Vec::new();
                ws::encode_masked_frame(OpKind::Text, &[b'4', b'2', 0xff, 0xfe], [1, 1, 1, 1], &mut f);
                c.send_raw(&f);
            }),
            "malformed_packet",
        ),
        (
            "unmasked frame",
            Box::new(|c: &mut Client| {
                let mut f = Vec::new();
                ws::encode_frame(OpKind::Text, b"2", &mut f);
                c.send_raw(&f);
            }),
            "protocol_error",
        ),
        (
            "stray binary",
            Box::new(|c: &mut Client| {
                let mut f = Vec::new();
                ws::encode_masked_frame(OpKind::Binary, b"\x01\x02", [1, 1, 1, 1], &mut f);
                c.send_raw(&f);
            }),
            "malformed_packet",
        ),
        (
            "reserved opcode",
            Box::new(|c: &mut Client| c.send_raw(&[0x83, 0x80, 1, 2, 3, 4])),
            "protocol_error",
        ),
    ];
    for (what, send, reason) in cases {
        let mut c = Client::connect(srv.addr, &token("bad", "t"));
        send(&mut c);
        let (_, got) = c.expect_closed();
        assert_eq!(got, reason, "{what}");
    }
    let ack = bystander.emit_ack("message:send", json!({ "room": "r", "content": "still here" }));
    assert_eq!(ack["status"], "sent");
}

#[test]
fn fragmented_messages_and_websocket_pings_work() {
    let srv = Server::start(&[]);
    let mut c = Client::connect(srv.addr, &token("a", "t"));
    // "42["join_room","frag"]" in three fragments with a ping between them.
    let text = b"42[\"join_room\",\"frag\"]";
    let mut raw = Vec::new();
    for (i, part) in [&text[..4], &text[4..10], &text[10..]].iter().enumerate() {
        let start = raw.len();
        ws::encode_masked_frame(
            if i == 0 { OpKind::Text } else { OpKind::Continuation },
            part,
            [5, 6, 7, 8],
            &mut raw,
        );
        if i < 2 {
            raw[start] &= 0x7f; // clear FIN
        }
        if i == 1 {
            ws::encode_masked_frame(OpKind::Ping, b"p", [1, 2, 3, 4], &mut raw);
        }
    }
    c.send_raw(&raw);
    assert_eq!(c.expect_event("room_joined")["room"], "frag");
}

#[test]
fn slow_consumers_are_disconnected_and_counted() {
    let srv = Server::start(&["--outbound-queue-bytes", "65536", "--events-per-second", "100000"]);
    // A raw client that upgrades, connects, joins and then never reads again.
    let _slow = support::silent_member(srv.addr, "slow", "flood");
    let mut sender = Client::connect(srv.addr, &token("sender", "t"));
    sender.emit_ack("join_room", json!("flood"));
    support::flood_until_slow_consumer(&srv, &mut sender, "flood");
}

#[test]
fn rate_limit_refuses_then_disconnects_floods() {
    let srv = Server::start(&["--events-per-second", "5"]);
    let mut c = Client::connect(srv.addr, &token("a", "t"));
    let mut refused = 0;
    for _ in 0..400 {
        c.emit("join_room", json!("r"));
    }
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match c.recv_until(end) {
            Some(support::Incoming::Event(n, args, _)) if n == "error" => {
                assert_eq!(args[0]["code"], "rate_limited");
                refused += 1;
            }
            Some(support::Incoming::Closed(_, r)) => {
                assert_eq!(r, "rate_limited");
                break;
            }
            None => panic!("flood not disconnected"),
            _ => {}
        }
    }
    assert!(refused > 0);
    assert!(srv.metric("shardgate_events_rate_limited_total") > 0);
}

#[test]
fn malformed_http_gets_400() {
    let srv = Server::start(&[]);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00garbage\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}
