//! Graceful drain: SIGTERM and `POST /admin/drain` make the node not ready at once,
//! refuse new sessions, close connections in batches spread over `drain_ms` with a
//! close clients reconnect after (1001 `server_shutdown`), then exit.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{Client, Server};

const ADMIN: &str = "admin-token-0123456789";

/// Status of a Socket.IO WebSocket upgrade request.
fn upgrade_status(srv: &Server) -> u16 {
    let headers = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\n{headers}\r\n").unwrap();
    let mut head = [0u8; 12];
    let _ = s.read_exact(&mut head);
    std::str::from_utf8(&head[9..12]).ok().and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn sigterm_drains_in_batches_then_exits() {
    const CLIENTS: usize = 320;
    let mut srv = Server::start(&["--shards", "2", "--drain-ms", "2000"]);
    let mut clients: Vec<Client> =
        (0..CLIENTS).map(|i| Client::connect(srv.addr, &support::token(&format!("u{i}"), "t"))).collect();
    srv.wait_for("every session open", |s| s.metric("shardgate_sessions_open") == CLIENTS as u64);
    assert_eq!(srv.get("/readyz").0, 200);
    let started = Instant::now();
    srv.signal(libc::SIGTERM);

    // Not ready at once, and no new session while draining.
    srv.wait_for("readyz 503", |s| s.get("/readyz").0 == 503);
    assert_eq!(upgrade_status(&srv), 503);
    assert_eq!(srv.get("/healthz").0, 200, "alive while draining");
    // Closed in batches, not all at once: the first count below the start is most of it.
    let mut first_seen = 0;
    srv.wait_for("the first batch closed", |s| {
        first_seen = s.metric("shardgate_connections_open");
        first_seen < CLIENTS as u64
    });
    assert!(first_seen > CLIENTS as u64 / 2, "{first_seen} of {CLIENTS} still open after the first batch");

    for c in clients.iter_mut() {
        assert_eq!(c.expect_closed(), (1001, "server_shutdown".to_string()));
    }
    let spread = started.elapsed();
    assert!(spread >= Duration::from_millis(1000), "all {CLIENTS} closed within {spread:?}");
    let status = srv.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_millis(2000) + Duration::from_secs(5));
    assert!(srv.log().contains("draining"), "{}", srv.log());
}

#[test]
fn admin_drain_needs_the_admin_token() {
    let off = Server::start(&[]);
    assert_eq!(off.request("POST", "/admin/drain", "").0, 403, "disabled without admin.token");

    let mut srv = Server::start(&["--admin-token", ADMIN, "--drain-ms", "500"]);
    let mut client = Client::connect(srv.addr, &support::token("alice", "t"));
    assert_eq!(srv.request("GET", "/admin/drain", "").0, 405);
    assert_eq!(srv.request("POST", "/admin/drain", "").0, 401);
    let wrong = "Authorization: Bearer admin-token-0123456780\r\n";
    assert_eq!(srv.request("POST", "/admin/drain", wrong).0, 401);
    assert_eq!(srv.get("/readyz").0, 200, "a refused request changes nothing");

    let right = format!("Authorization: Bearer {ADMIN}\r\n");
    let (status, body) = srv.request("POST", "/admin/drain", &right);
    assert_eq!((status, body.as_str()), (202, "{\"draining\":true}"));
    assert_eq!(client.expect_closed(), (1001, "server_shutdown".to_string()));
    assert!(srv.wait_exit(Duration::from_secs(10)).expect("exited").success());
}

#[test]
fn the_official_client_reconnects_elsewhere_after_a_drain() {
    let mut a = Server::start(&["--drain-ms", "1000"]);
    let b = Server::start(&[]);
    let env = [
        ("SHARDGATE_ADDR_A", a.addr.to_string()),
        ("SHARDGATE_ADDR_B", b.addr.to_string()),
        ("SHARDGATE_PID_A", a.pid().to_string()),
    ];
    support::interop_suite("drain.test.mjs", &env, || format!("node A:\n{}", a.log()));
    assert!(a.wait_exit(Duration::from_secs(10)).expect("node A exited").success());
}
