//! The browser demo: the node serves the official client bundle and the demo page; two
//! headless Chromium pages chat through a development node, one on long-polling; a page
//! uses long-polling across origins where the node allows its origin (CORS), not elsewhere
//! (`tests/interop/browser.test.mjs`, playwright-core driving Debian's chromium, which
//! the test script installs).

mod support;

use support::kafka::free_port;
use support::Server;

#[test]
fn demo_page_in_headless_chromium() {
    // A fixed port, so that the node can name its own page's origin as allowed for the
    // cross-origin test (the page at 127.0.0.1, the node also reached as localhost).
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let origin = format!("http://127.0.0.1:{port}");
    let srv = Server::start_dev(&["--shards", "2", "--listen", &listen, "--cors-origin", &origin]);
    let closed = Server::start(&[]);
    let (status, js) = srv.get("/socket.io/socket.io.min.js");
    assert_eq!(status, 200);
    assert!(js.starts_with("/*!\n * Socket.IO v4.8.3"), "the vendored bundle");
    assert!(srv.get("/socket.io/LICENSE").1.contains("MIT License"));
    let (status, token) = srv.get("/demo/token?sub=alice&tenant=demo");
    assert_eq!(status, 200, "{token}");
    let env = [
        ("SHARDGATE_URL", origin.clone()),
        ("SHARDGATE_CROSS_URL", format!("http://localhost:{port}")),
        ("SHARDGATE_CLOSED_URL", format!("http://{}", closed.addr)),
    ];
    let out = support::interop_suite("browser.test.mjs", &env, || format!("server log:\n{}", srv.log()));
    assert!(out.contains("# pass 3"), "{out}");
    assert!(srv.metric("shardgate_transport_upgrades_total") >= 1, "one page upgraded to WebSocket");
}

#[test]
fn dev_tokens_only_on_the_development_secret() {
    let srv = Server::start(&[]);
    let (status, body) = srv.get("/demo/token?sub=alice");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("development secret"));
    assert_eq!(srv.get("/demo").0, 200, "the page itself is served everywhere");
    let dev = Server::start_dev(&[]);
    assert_eq!(dev.get("/demo/token?sub=a%20b").0, 400, "ids are checked");
}
