//! Runs the interop suite (`tests/interop/*.test.mjs`, official `socket.io-client`) with
//! node against the real binary. The test command installs the npm packages first
//! (`npm ci` in `tests/interop`); a missing install fails here with the command to run.

mod support;

use support::Server;

/// The chat suite on one two-shard node, with the client on `transports` (see
/// `tests/interop/support.mjs`).
fn chat_suite(transports: &str) -> Server {
    let srv = Server::start(&["--shards", "2"]);
    let env =
        [("SHARDGATE_URL", format!("http://{}", srv.addr)), ("SHARDGATE_TRANSPORTS", transports.to_string())];
    support::interop_suite("chat.test.mjs", &env, || format!("server log:\n{}", srv.log()));
    srv
}

#[test]
fn official_socket_io_client_interop() {
    let srv = chat_suite("websocket");
    assert_eq!(srv.metric("shardgate_polling_requests_total"), 0);
}

/// The official client's defaults: long-polling first, then the upgrade to WebSocket.
#[test]
fn official_client_with_default_transports() {
    let srv = chat_suite("default");
    let upgrades = srv.metric("shardgate_transport_upgrades_total");
    assert!(upgrades >= 10, "every client opened on polling and upgraded: {upgrades}");
    assert!(srv.metric("shardgate_polling_handoffs_total") > 0, "requests were handed between shards");
}

/// Clients that cannot use WebSocket (a proxy in the way) stay on long-polling.
#[test]
fn official_client_on_long_polling_only() {
    let srv = chat_suite("polling");
    assert_eq!(srv.metric("shardgate_transport_upgrades_total"), 0);
    assert!(srv.metric("shardgate_polling_requests_total") > 50);
}

/// Clients the node parks while they are idle (a short ping interval makes its tick
/// short), on the official client's default transports.
#[test]
fn official_client_on_parked_websockets() {
    let srv = Server::start(&["--shards", "2", "--ping-interval-ms", "400", "--ping-timeout-ms", "400"]);
    let env =
        [("SHARDGATE_URL", format!("http://{}", srv.addr)), ("SHARDGATE_TRANSPORTS", "default".to_string())];
    support::interop_suite("parked.test.mjs", &env, || format!("server log:\n{}", srv.log()));
    assert!(srv.metric("shardgate_websocket_parks_total") >= 2);
}
