//! Runs the interop suite (`tests/interop/*.test.mjs`, official `socket.io-client`) with
//! node against the real binary. The test command installs the npm packages first
//! (`npm ci` in `tests/interop`); a missing install fails here with the command to run.

mod support;

use support::Server;

#[test]
fn official_socket_io_client_interop() {
    let srv = Server::start(&["--shards", "2"]);
    support::interop_suite("chat.test.mjs", &[("SHARDGATE_URL", format!("http://{}", srv.addr))], || {
        format!("server log:\n{}", srv.log())
    });
}
