//! Runs the interop suite (`tests/interop/*.test.mjs`, official `socket.io-client`) with
//! node against the real binary. The test command installs the npm packages first
//! (`npm ci` in `tests/interop`); a missing install fails here with the command to run.

mod support;

use std::process::Command;

use support::{Server, SECRET};

#[test]
fn official_socket_io_client_interop() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/socket.io-client").exists(),
        "npm packages missing: run `npm ci --prefix tests/interop` (scripts/test.sh does)"
    );
    let srv = Server::start(&["--shards", "2"]);
    let out = Command::new("node")
        .args(["--test", "--test-timeout=20000", "chat.test.mjs"])
        .current_dir(&dir)
        .env("SHARDGATE_URL", format!("http://{}", srv.addr))
        .env("SHARDGATE_SECRET", SECRET)
        .output()
        .expect("node must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "interop suite failed:\n{stdout}\nserver log:\n{}", srv.log());
    assert!(stdout.contains("# fail 0"), "{stdout}");
}
