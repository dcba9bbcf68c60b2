//! The servers of `benches/peers/` (socket.io on Node, socketioxide) speak the events the
//! comparison drives: the load generator connects with a JWT, joins rooms, gets its
//! acks and every fan-out delivery from each of them, and a wrong secret is refused.
//! `scripts/test.sh` installs the Node peer's packages and builds the socketioxide peer.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::SECRET;

/// A peer server on a free port; killed on drop.
struct Peer {
    child: Child,
    url: String,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    /// Starts `cmd` with PORT=0 and reads the address from its first line
    /// (`... on 127.0.0.1:PORT ...`).
    fn start(mut cmd: Command) -> Peer {
        let mut child = cmd
            .env("PORT", "0")
            .env("JWT_SECRET", SECRET)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.split_whitespace().find(|w| w.starts_with("127.0.0.1:")).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("no address in {line:?}")
        });
        Peer { url: format!("http://{addr}"), child }
    }
}

fn loadtest(args: &str, url: &str, secret: &str) -> serde_json::Value {
    let bin = Path::new(env!("CARGO_BIN_EXE_shardgate")).with_file_name("shardgate-loadtest");
    let out = Command::new(&bin)
        .args(args.split_whitespace())
        .args(["--url", url, "--jwt-secret", secret, "--json"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (cargo build --workspace --bins)", bin.display()));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)))
}

/// The scenarios the comparison runs, small.
fn speaks_the_compared_events(peer: &Peer) {
    let r = loadtest(
        "fanout --connections 40 --room-size 20 --msg-rate 20 --rate 400 --duration 3s",
        &peer.url,
        SECRET,
    );
    let f = &r["fanout"];
    let (got, want) = (f["deliveries"].as_u64().unwrap(), f["expected_deliveries"].as_u64().unwrap());
    assert!(want > 0 && got * 10 >= want * 9 && got <= want, "{r}");
    assert!(r["errors"].as_object().unwrap().values().all(|v| v == 0), "{r}");

    let r = loadtest("ack-rtt --connections 20 --msg-rate 200 --duration 3s", &peer.url, SECRET);
    let m = &r["messages"];
    let (sent, acked) = (m["sent"].as_u64().unwrap(), m["acked"].as_u64().unwrap());
    assert!(sent > 200 && acked + 20 >= sent, "{r}");

    let r = loadtest("idle --connections 5 --duration 1s", &peer.url, "not-the-peer-secret-0123456789");
    assert_eq!(r["errors"]["auth"], 5, "{r}");
}

#[test]
fn the_socketio_peer_speaks_the_compared_events() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/node");
    assert!(
        dir.join("node_modules/socket.io").exists(),
        "run `npm ci --prefix benches/peers/node` (scripts/test.sh does)"
    );
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("server.mjs"));
    speaks_the_compared_events(&Peer::start(cmd));
}

#[test]
fn the_socketioxide_peer_speaks_the_compared_events() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/socketioxide/target");
    let bin = ["debug", "release"]
        .iter()
        .map(|p| dir.join(p).join("shardgate-peer-socketioxide"))
        .find(|b| b.exists())
        .expect("build it: cargo build --manifest-path benches/peers/socketioxide/Cargo.toml (scripts/test.sh does)");
    let mut cmd = Command::new(bin);
    cmd.env("WORKERS", "1");
    speaks_the_compared_events(&Peer::start(cmd));
}
