//! Engine.IO HTTP long-polling against the real binary with two shards: sessions served
//! whichever shard accepts each request (handed to the owner), chat between polling and
//! WebSocket clients, keep-alive, pings, the upgrade to WebSocket, and every refusal the
//! spec names.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use shardgate_io::ws::{self, OpKind, Role};
use support::polling::{read_response, request, request_with, write_request, Poller};
use support::{token, Client, Server};

fn two_shards(extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn polling_sessions_chat_with_websocket_clients_across_shards() {
    let srv = two_shards(&[]);
    let mut ws = Client::connect(srv.addr, &token("w", "t"));
    let mut pollers: Vec<Poller> =
        (0..6).map(|i| Poller::connect(srv.addr, &token(&format!("p{i}"), "t"))).collect();
    let first = &pollers[0].open;
    assert_eq!(first.upgrades, vec!["websocket".to_string()]);
    assert!(first.sid.len() >= 18 + 22, "sid carries a 128-bit tag: {}", first.sid);
    // Sessions on both shards (the kernel spreads connections over the shards' listeners
    // at random: more sessions until both hold one); requests land anywhere and are
    // handed to the owner.
    let shards = |ps: &[Poller]| {
        ps.iter().map(|p| p.open.sid[..2].to_string()).collect::<std::collections::BTreeSet<_>>()
    };
    while shards(&pollers).len() < 2 {
        assert!(pollers.len() < 64, "{} sessions all on one shard", pollers.len());
        let name = format!("p{}", pollers.len());
        pollers.push(Poller::connect(srv.addr, &token(&name, "t")));
    }
    assert!(srv.metric("shardgate_polling_handoffs_total") > 0);
    let open = pollers.len() as u64;
    assert_eq!(srv.metric("shardgate_polling_sessions_open"), open);

    // Polling -> WebSocket, WebSocket -> polling, polling -> polling.
    let ack = pollers[0].emit_ack("message:send", json!({ "to": "w", "content": "from polling" }));
    assert_eq!(ack["status"], "delivered", "{ack}");
    assert_eq!(ws.expect_event("message:new")["content"], "from polling");
    assert_eq!(
        ws.emit_ack("message:send", json!({ "to": "p1", "content": "to polling" }))["status"],
        "delivered"
    );
    assert_eq!(pollers[1].expect_event("message:new")["content"], "to polling");
    let ack = pollers[2].emit_ack("message:send", json!({ "to": "p3", "content": "poll to poll" }));
    assert_eq!(ack["status"], "delivered");
    assert_eq!(pollers[3].expect_event("message:new")["content"], "poll to poll");

    // A room with members on both transports and both shards.
    assert_eq!(ws.emit_ack("join_room", json!("r"))["ok"], true);
    for p in pollers.iter_mut().take(4) {
        assert_eq!(p.emit_ack("join_room", json!("r"))["ok"], true);
    }
    pollers[0].emit_ack("message:send", json!({ "room": "r", "content": "all" }));
    assert_eq!(ws.expect_event("message:new")["content"], "all");
    for p in pollers.iter_mut().skip(1).take(3) {
        assert_eq!(p.expect_event("message:new")["content"], "all");
    }

    // Binary attachments ride as base64 (`b` packets) both ways.
    let post = pollers[4].post("451-[\"message:send\",{\"to\":\"w\",\"content\":\"bin\",\"file\":{\"_placeholder\":true,\"num\":0}}]\x1ebAAEC/w==");
    assert_eq!(post.status, 200, "{}", post.text());
    let (_, bin) = ws.expect_event_full("message:new");
    assert_eq!(bin, vec![vec![0u8, 1, 2, 255]]);
    ws.emit_binary(
        "message:send",
        json!({ "to": "p5", "content": "bin back", "file": {"_placeholder": true, "num": 0} }),
        &[&[9, 8, 7]],
    );
    let mut p5 = Vec::new();
    while !p5.iter().any(|p: &String| p.starts_with('b')) {
        p5.push(pollers[5].next_packet());
    }
    assert!(p5.iter().any(|p| p.starts_with("451-[\"message:new\"")), "{p5:?}");
    assert!(p5.contains(&"bCQgH".to_string()), "{p5:?}");

    // A client disconnect ends the session.
    assert_eq!(pollers[0].post("41\x1e1").status, 200);
    srv.wait_for("the session retired", |s| s.metric("shardgate_polling_sessions_open") == open - 1);
    assert_eq!(pollers[0].get().error_code(), Some(1), "a closed session's sid is unknown");
}

#[test]
fn keep_alive_connections_carry_many_requests_and_pipelined_ones() {
    let srv = two_shards(&[]);
    let p = Poller::open(srv.addr, &format!("&token={}", token("k", "t")));
    let mut s = TcpStream::connect(srv.addr).unwrap();
    write_request(&mut s, "POST", &p.path(), b"40", "");
    assert_eq!(read_response(&mut s, Duration::from_secs(5)).text(), "ok");
    write_request(&mut s, "GET", &p.path(), b"", "");
    let r = read_response(&mut s, Duration::from_secs(5));
    assert!(r.text().starts_with("40{\"sid\""), "connect over the query token: {}", r.text());
    // Two requests in one write: both answered, in order.
    let join = format!("421{}", json!(["join_room", "k"]));
    let mut two = Vec::new();
    for (m, b) in [("POST", join.as_bytes()), ("GET", &b""[..])] {
        let mut req = format!("{m} {} HTTP/1.1\r\nHost: x\r\n", p.path()).into_bytes();
        if m == "POST" {
            req.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(b);
        two.extend_from_slice(&req);
    }
    s.write_all(&two).unwrap();
    assert_eq!(read_response(&mut s, Duration::from_secs(5)).text(), "ok");
    let r = read_response(&mut s, Duration::from_secs(5));
    assert!(r.packets().iter().any(|p| p.starts_with("431[{\"ok\":true")), "{:?}", r.packets());
    assert!(!r.head.contains("Connection: close"));
}

#[test]
fn pings_ride_the_polls_and_silent_sessions_time_out() {
    let srv = two_shards(&["--ping-interval-ms", "300", "--ping-timeout-ms", "400"]);
    let mut live = Poller::connect(srv.addr, &token("live", "t"));
    let silent = Poller::connect(srv.addr, &token("silent", "t"));
    // The live one answers pings (next_packet does) and outlives several rounds.
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        let r = live.get();
        assert_eq!(r.status, 200);
        for p in r.packets() {
            if p == "2" {
                assert_eq!(live.post("3").status, 200);
            }
        }
    }
    assert_eq!(live.emit_ack("join_room", json!("r"))["ok"], true);
    // The silent one never polled again: closed by the ping timeout, with nobody holding it.
    assert_eq!(silent.get().error_code(), Some(1));
    assert!(srv.metric("shardgate_connections_closed_total{reason=\"ping_timeout\"}") >= 1);
}

#[test]
fn refusals_follow_the_spec() {
    let srv = two_shards(&["--max-payload", "1000"]);
    let code = |m: &str, path: &str, body: &[u8]| request(srv.addr, m, path, body);
    let base = "/socket.io/?EIO=4&transport=polling";
    // Unknown, forged and foreign session ids.
    assert_eq!(code("GET", &format!("{base}&sid=nope"), b"").error_code(), Some(1));
    let p = Poller::connect(srv.addr, &token("r", "t"));
    let mut forged = p.open.sid.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(code("GET", &format!("{base}&sid={forged}"), b"").error_code(), Some(1));
    assert!(srv.metric("shardgate_unknown_session_ids_total") >= 2);
    // A handshake must be a GET; a session's requests are GETs and POSTs.
    let r = code("POST", base, b"40");
    assert_eq!((r.status, r.error_code()), (400, Some(2)));
    assert_eq!(code("PUT", &p.path(), b"").error_code(), Some(3));
    assert_eq!(code("GET", "/socket.io/?EIO=4&transport=carrier-pigeon", b"").error_code(), Some(0));
    // A body over maxPayload: 413, and the session ends.
    let r = p.post(&"4".repeat(1001));
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(p.get().error_code(), Some(1));
    // A POST without a length: 411.
    let p = Poller::connect(srv.addr, &token("r2", "t"));
    let mut s = TcpStream::connect(srv.addr).unwrap();
    write!(s, "POST {} HTTP/1.1\r\nHost: x\r\n\r\n", p.path()).unwrap();
    assert_eq!(read_response(&mut s, Duration::from_secs(5)).status, 411);
    // Two GETs at once: the second is refused and the session ends (the first gets close).
    let p = Poller::connect(srv.addr, &token("r3", "t"));
    let mut first = TcpStream::connect(srv.addr).unwrap();
    write_request(&mut first, "GET", &p.path(), b"", "");
    std::thread::sleep(Duration::from_millis(200));
    let second = p.get();
    assert_eq!((second.status, second.error_code()), (400, Some(3)), "{}", second.text());
    assert_eq!(
        read_response(&mut first, Duration::from_secs(5)).packets().last().map(String::as_str),
        Some("1")
    );
    // A malformed payload ends the session with a clear error; neighbours are untouched.
    let mut good = Poller::connect(srv.addr, &token("g", "t"));
    let bad = Poller::connect(srv.addr, &token("b", "t"));
    let r = bad.post("4\x1e\x1e");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("malformed_packet"), "{}", r.text());
    assert_eq!(bad.get().error_code(), Some(1));
    assert_eq!(good.emit_ack("join_room", json!("x"))["ok"], true);
}

/// Sends a masked text frame.
fn send_text(s: &mut TcpStream, text: &str) {
    let mut out = Vec::new();
    ws::encode_masked_frame(OpKind::Text, text.as_bytes(), [1, 2, 3, 4], &mut out);
    s.write_all(&out).unwrap();
}

/// Reads the next text frame within 5 s.
fn next_text(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    let end = Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((frame, used)) = ws::decode_frame(buf, 1 << 20, Role::Client).unwrap() {
            let text = String::from_utf8_lossy(&buf[frame.payload.clone()]).to_string();
            buf.drain(..used);
            if frame.op == OpKind::Text {
                return text;
            }
            continue;
        }
        assert!(Instant::now() < end, "no frame");
        if let Ok(n) = s.read(&mut chunk) {
            assert!(n > 0, "closed");
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn upgrade_request(s: &mut TcpStream, sid: &str) -> String {
    write!(
        s,
        "GET /socket.io/?EIO=4&transport=websocket&sid={sid} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[test]
fn upgrade_moves_a_polling_session_to_websocket() {
    let srv = two_shards(&[]);
    let mut ws_peer = Client::connect(srv.addr, &token("peer", "t"));
    assert_eq!(ws_peer.emit_ack("join_room", json!("up"))["ok"], true);
    // Several sessions, so that some upgrades land on the other shard and are handed over.
    let mut upgraded = Vec::new();
    for i in 0..4 {
        let mut p = Poller::connect(srv.addr, &token(&format!("u{i}"), "t"));
        assert_eq!(p.emit_ack("join_room", json!("up"))["ok"], true);
        // A GET waits while the probe runs.
        let mut waiting = TcpStream::connect(srv.addr).unwrap();
        write_request(&mut waiting, "GET", &p.path(), b"", "");
        let mut ws = TcpStream::connect(srv.addr).unwrap();
        let head = upgrade_request(&mut ws, &p.open.sid);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut buf = Vec::new();
        send_text(&mut ws, "2probe");
        assert_eq!(next_text(&mut ws, &mut buf), "3probe");
        // The waiting GET lets go with a noop, and the client switches.
        assert_eq!(read_response(&mut waiting, Duration::from_secs(5)).text(), "6");
        send_text(&mut ws, "5");
        // The session (its rooms, its identity) now speaks WebSocket.
        send_text(
            &mut ws,
            &format!("421{}", json!(["message:send", { "to": "peer", "content": format!("ws {i}") }])),
        );
        assert_eq!(ws_peer.expect_event("message:new")["content"], format!("ws {i}"));
        while !next_text(&mut ws, &mut buf).starts_with("431[{") {}
        assert_eq!(
            ws_peer.emit_ack("message:send", json!({ "room": "up", "content": "room" }))["status"],
            "sent"
        );
        while !next_text(&mut ws, &mut buf).contains("\"content\":\"room\"") {}
        // The sid is now refused on polling and on a second WebSocket.
        assert_eq!(p.get().error_code(), Some(3));
        let mut again = TcpStream::connect(srv.addr).unwrap();
        let head = upgrade_request(&mut again, &p.open.sid);
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        upgraded.push(ws);
    }
    assert_eq!(srv.metric("shardgate_transport_upgrades_total"), 4);
    assert_eq!(srv.metric("shardgate_polling_sessions_open"), 0);
    assert_eq!(srv.metric("shardgate_connections_open"), 5);
}

#[test]
fn cors_lets_allowed_origins_poll_across_origins() {
    let srv = Server::start(&["--cors-origin", "https://app.example,https://admin.example"]);
    let base = "/socket.io/?EIO=4&transport=polling";
    let pre = "Origin: https://app.example\r\nAccess-Control-Request-Method: POST\r\n";
    let r = request_with(srv.addr, "OPTIONS", base, b"", pre);
    assert_eq!(r.status, 204, "{}", r.head);
    assert!(r.head.contains("Access-Control-Allow-Origin: https://app.example"), "{}", r.head);
    assert!(r.head.contains("Access-Control-Allow-Methods: GET, POST"));
    assert_eq!(request_with(srv.addr, "OPTIONS", base, b"", "Origin: https://evil.example\r\n").status, 403);
    // The handshake, POSTs and GETs of an allowed origin carry the headers.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    let from = format!("Origin: https://admin.example\r\nAuthorization: Bearer {}\r\n", token("c", "t"));
    write_request(&mut s, "GET", base, b"", &from);
    let open = read_response(&mut s, Duration::from_secs(5));
    assert!(open.head.contains("Access-Control-Allow-Origin: https://admin.example"), "{}", open.head);
    let sid = serde_json::from_str::<serde_json::Value>(&open.text()[1..]).unwrap()["sid"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    write_request(&mut s, "POST", &path, b"40", &from);
    let post = read_response(&mut s, Duration::from_secs(5));
    assert!(post.head.contains("Access-Control-Allow-Credentials: true"), "{}", post.head);
    write_request(&mut s, "GET", &path, b"", &from);
    let got = read_response(&mut s, Duration::from_secs(5));
    assert!(got.text().starts_with("40{\"sid\""), "{}", got.text());
    assert!(got.head.contains("Access-Control-Allow-Origin: https://admin.example"));
    // Another origin gets no CORS headers (its browser then withholds the answer).
    let other = request_with(srv.addr, "GET", base, b"", "Origin: https://evil.example\r\n");
    assert_eq!(other.status, 200);
    assert!(!other.head.contains("Access-Control"), "{}", other.head);
}
