//! Test harness: starts the real `shardgate` binary on a free loopback port and drives it
//! with a small blocking Socket.IO client built on the `shardgate-io` codecs.
//!
//! Every wait is bounded; nothing sleeps where it can poll.
#![allow(dead_code)]

/// Declares, for each named `fn name(redis: RedisServer)` of the test file, two tests:
/// `single::name` on one redis-server and `redis_cluster::name` on a real Redis Cluster
/// of 3 masters and 3 replicas (the file declares `#[macro_use] mod support;`).
#[allow(unused_macros)]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod single {
            $(#[test] fn $name() { super::$name(crate::support::redis::RedisServer::start()) })*
        }
        mod redis_cluster {
            $(#[test] fn $name() { super::$name(crate::support::redis::RedisServer::start_cluster(3)) })*
        }
    };
}

pub mod ferretdb;
pub mod kafka;
pub mod persister;
pub mod polling;
pub mod redis;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use shardgate_io::engineio::{self, Open};
use shardgate_io::socketio::{self, PacketType};
use shardgate_io::ws::{self, OpKind, Role};
use shardgate_shard::auth::{mint_hs256, Claims};

/// Secret every test server is started with.
pub const SECRET: &str = "integration-test-secret-0123456789";
/// Default bound of every wait.
pub const WAIT: Duration = Duration::from_secs(5);

/// Waits until something listens on loopback `port` (a server the test started), at most
/// `max`; `what` names it in the failure.
pub fn wait_listening(port: u16, what: &str, max: Duration) {
    let end = Instant::now() + max;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "{what} did not listen on {port} within {max:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP request to `addr` with extra header lines (`headers` ends each with CRLF);
/// the status and the body.
pub fn request_at(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A running `shardgate serve`, killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    admin: std::sync::Arc<std::sync::Mutex<Option<SocketAddr>>>,
}

impl Server {
    /// Starts the binary with `--listen 127.0.0.1:0 --jwt-secret SECRET` plus `args`.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_config(args, None)
    }

    /// Like [`Server::start`], with a TOML config file holding `toml`.
    pub fn start_with_config(args: &[&str], toml: Option<&str>) -> Server {
        Server::spawn(args, toml, true)
    }

    /// A development node: no secret given, so it runs on the built-in one (loopback).
    pub fn start_dev(args: &[&str]) -> Server {
        Server::spawn(args, None, false)
    }

    fn spawn(args: &[&str], toml: Option<&str>, secret: bool) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardgate"));
        cmd.args(["serve", "--no-pin"]);
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if secret && !args.contains(&"--jwt-public-key") {
            cmd.args(["--jwt-secret", SECRET]);
        }
        if let Some(t) = toml {
            let path =
                std::env::temp_dir().join(format!("shardgate-test-{}-{}.toml", std::process::id(), nanos()));
            std::fs::write(&path, t).unwrap();
            cmd.arg("--config").arg(path);
        }
        cmd.args(args).env("RUST_LOG", "info").stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn shardgate");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let admin = std::sync::Arc::new(std::sync::Mutex::new(None));
        let admin2 = admin.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.parse::<SocketAddr>().unwrap());
                } else if let Some(a) = line.strip_prefix("admin on ") {
                    *admin2.lock().unwrap() = a.parse::<SocketAddr>().ok();
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("shardgate did not start: {}", log.lock().unwrap());
            }
        };
        Server { child, addr, log, admin }
    }

    /// The operator address printed at start (`--admin-listen`), waiting for it.
    pub fn admin_addr(&self) -> SocketAddr {
        let end = Instant::now() + WAIT;
        loop {
            if let Some(a) = *self.admin.lock().unwrap() {
                return a;
            }
            assert!(Instant::now() < end, "no admin address printed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// GET `path`; returns status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path, "")
    }

    /// One HTTP request with extra header lines (`headers` ends each with CRLF); the
    /// status and the body.
    pub fn request(&self, method: &str, path: &str, headers: &str) -> (u16, String) {
        request_at(self.addr, method, path, headers)
    }

    /// Value of an unlabelled metric (or with its label set, e.g. `x{reason="y"}`).
    pub fn metric(&self, name: &str) -> u64 {
        let at = self.admin.lock().unwrap().unwrap_or(self.addr);
        let (_, body) = request_at(at, "GET", "/metrics", "");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    /// Polls `f` until it is true or `WAIT` passes.
    pub fn wait_for(&self, what: &str, mut f: impl FnMut(&Server) -> bool) {
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            if f(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out waiting for {what}");
    }
}

impl Server {
    /// Sends `sig` to the server process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits up to `d` for the process to exit.
    pub fn wait_exit(&mut self, d: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// A fresh directory under the system temp dir, unique to this process and moment.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shardgate-{name}-{}-{}", std::process::id(), nanos()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `tests/interop/<file>` with `node --test` (the official socket.io-client) and
/// `env`; returns its TAP output after asserting that every test passed. `context` is
/// printed on failure (a server log, say). Node 20 applies `--test-timeout` to each
/// file as a whole too (the browser suite takes up to 20 s on a loaded machine); every
/// step inside a suite has its own, shorter timeout.
pub fn interop_suite(file: &str, env: &[(&str, String)], context: impl FnOnce() -> String) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/socket.io-client").exists(),
        "npm packages missing: run `npm ci --prefix tests/interop` (scripts/test.sh does)"
    );
    let out = Command::new("node")
        .args(["--test", "--test-timeout=90000", file])
        .current_dir(&dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("SHARDGATE_SECRET", SECRET)
        .output()
        .expect("node must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("# fail 0"), "{file} failed:\n{stdout}\n{}", context());
    stdout
}

/// A token for `sub` in `tenant`, valid for an hour.
pub fn token(sub: &str, tenant: &str) -> String {
    token_with(sub, tenant, 3600, None)
}

/// A token with a chosen lifetime (negative: expired) and permissions.
pub fn token_with(sub: &str, tenant: &str, ttl: i64, perms: Option<&[&str]>) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = Claims {
        sub: sub.into(),
        tenant_id: tenant.into(),
        permissions: perms.map(|p| p.iter().map(|s| s.to_string()).collect()),
        exp: (now + ttl) as u64,
    };
    mint_hs256(SECRET.as_bytes(), &claims)
}

/// Something the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// An event with its arguments and binary attachments.
    Event(String, Vec<Value>, Vec<Vec<u8>>),
    /// An ack answer.
    Ack(u64, Vec<Value>),
    /// CONNECT_ERROR with its data.
    ConnectError(Value),
    /// Socket.IO DISCONNECT.
    Disconnect,
    /// WebSocket close with code and reason, or the TCP connection ended (code 0).
    Closed(u16, String),
}

/// A blocking Socket.IO v4 client over WebSocket.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    pub open: Open,
    pub sid: String,
    /// The recovery session id of the CONNECT answer (connection state recovery on).
    pub pid: Option<String>,
    /// Answer pings automatically.
    pub auto_pong: bool,
    next_ack: u64,
    pending_binary: Option<(socketio::Packet, Vec<Vec<u8>>)>,
    /// Items received while waiting for something else, returned first.
    backlog: std::collections::VecDeque<Incoming>,
    pub closed: bool,
}

impl Client {
    /// Connects and completes the WebSocket upgrade and Engine.IO open.
    pub fn upgrade(addr: SocketAddr, query: &str, headers: &str) -> Client {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        write!(
            stream,
            "GET /socket.io/?EIO=4&transport=websocket{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        )
        .unwrap();
        let mut c = Client {
            stream,
            buf: Vec::new(),
            open: Open {
                sid: String::new(),
                upgrades: vec![],
                ping_interval: 0,
                ping_timeout: 0,
                max_payload: 0,
            },
            sid: String::new(),
            pid: None,
            auto_pong: true,
            next_ack: 1,
            pending_binary: None,
            backlog: Default::default(),
            closed: false,
        };
        let end = Instant::now() + WAIT;
        loop {
            if let Some(pos) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&c.buf[..pos]).to_string();
                assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
                c.buf.drain(..pos + 4);
                break;
            }
            assert!(Instant::now() < end, "no upgrade response");
            c.fill();
        }
        let text = c.next_text().expect("open packet");
        match engineio::decode(&text).unwrap() {
            engineio::Packet::Open(json) => c.open = Open::parse(json).unwrap(),
            other => panic!("expected open, got {other:?}"),
        }
        c
    }

    /// Upgrade, then Socket.IO CONNECT with `{"token": token}`; panics unless accepted.
    /// The socket itself, for a reader that drains it without decoding (benchmarks).
    #[allow(dead_code)]
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    pub fn connect(addr: SocketAddr, token: &str) -> Client {
        let mut c = Client::upgrade(addr, "", "");
        let r = c.sio_connect(Some(json!({ "token": token })));
        assert!(r.is_ok(), "connect refused: {r:?}");
        c
    }

    /// Sends CONNECT with `auth`; Ok(sid) or Err(connect error data).
    pub fn sio_connect(&mut self, auth: Option<Value>) -> Result<String, Value> {
        let data = auth.map(|a| a.to_string());
        self.send_packet(PacketType::Connect, "/", None, data.as_deref());
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            let Some(text) = self.next_text() else {
                continue;
            };
            let Ok(engineio::Packet::Message(m)) = engineio::decode(&text) else {
                continue;
            };
            let p = socketio::decode(m).unwrap();
            match p.kind {
                PacketType::Connect => {
                    let data = p.data.unwrap();
                    self.sid = data["sid"].as_str().unwrap().to_string();
                    self.pid = data["pid"].as_str().map(str::to_string);
                    return Ok(self.sid.clone());
                }
                PacketType::ConnectError => return Err(p.data.unwrap()),
                _ => {}
            }
        }
        panic!("no answer to CONNECT");
    }

    /// Shard that owns this socket (from the sid's first two hex digits).
    pub fn shard(&self) -> usize {
        usize::from_str_radix(&self.sid[..2], 16).unwrap()
    }

    /// Writes one masked text frame with an Engine.IO packet.
    pub fn send_text(&mut self, text: &str) {
        let mut out = Vec::new();
        ws::encode_masked_frame(OpKind::Text, text.as_bytes(), [9, 8, 7, 6], &mut out);
        let _ = self.stream.write_all(&out);
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    fn send_packet(&mut self, kind: PacketType, nsp: &str, ack: Option<u64>, data: Option<&str>) {
        let mut s = String::from("4");
        socketio::encode(kind, nsp, ack, 0, data, &mut s);
        self.send_text(&s);
    }

    /// Emits an event without asking for an ack.
    pub fn emit(&mut self, event: &str, arg: Value) {
        let data = json!([event, arg]).to_string();
        self.send_packet(PacketType::Event, "/", None, Some(&data));
    }

    /// Emits an event with binary attachments.
    pub fn emit_binary(&mut self, event: &str, arg: Value, attachments: &[&[u8]]) {
        let data = json!([event, arg]).to_string();
        let mut s = String::from("4");
        socketio::encode(PacketType::BinaryEvent, "/", None, attachments.len(), Some(&data), &mut s);
        self.send_text(&s);
        for a in attachments {
            let mut out = Vec::new();
            ws::encode_masked_frame(OpKind::Binary, a, [1, 2, 3, 4], &mut out);
            let _ = self.stream.write_all(&out);
        }
    }

    /// Emits an event and waits for its ack (other traffic is kept).
    pub fn emit_ack(&mut self, event: &str, arg: Value) -> Value {
        let id = self.next_ack;
        self.next_ack += 1;
        let data = json!([event, arg]).to_string();
        self.send_packet(PacketType::Event, "/", Some(id), Some(&data));
        let end = Instant::now() + WAIT;
        let mut kept = Vec::new();
        while Instant::now() < end {
            match self.recv_until(end) {
                Some(Incoming::Ack(a, args)) if a == id => {
                    self.backlog.extend(kept);
                    return args.into_iter().next().unwrap_or(Value::Null);
                }
                Some(Incoming::Closed(code, r)) => {
                    panic!("closed while waiting for ack: {code} {r}")
                }
                Some(other) => kept.push(other),
                None => {}
            }
        }
        panic!("no ack for {event}");
    }

    /// Waits for the next event named `name`; other traffic before it is dropped.
    pub fn expect_event(&mut self, name: &str) -> Value {
        self.expect_event_full(name).0
    }

    /// Waits for the next event named `name`; returns all its arguments.
    pub fn expect_event_args(&mut self, name: &str) -> Vec<Value> {
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            match self.recv_until(end) {
                Some(Incoming::Event(n, args, _)) if n == name => return args,
                Some(Incoming::Closed(code, r)) => panic!("closed while waiting for {name}: {code} {r}"),
                _ => {}
            }
        }
        panic!("no {name} event within {WAIT:?}");
    }

    /// Like [`Client::expect_event`] with the binary attachments.
    pub fn expect_event_full(&mut self, name: &str) -> (Value, Vec<Vec<u8>>) {
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            match self.recv_until(end) {
                Some(Incoming::Event(n, args, bin)) if n == name => {
                    return (args.into_iter().next().unwrap_or(Value::Null), bin)
                }
                Some(Incoming::Closed(code, r)) => {
                    panic!("closed while waiting for {name}: {code} {r}")
                }
                _ => {}
            }
        }
        panic!("no {name} event within {WAIT:?}");
    }

    /// Asserts no event named `name` arrives within `d`.
    pub fn expect_no_event(&mut self, name: &str, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if let Some(Incoming::Event(n, args, _)) = self.recv_until(end) {
                assert_ne!(n, name, "unexpected {name}: {args:?}");
            }
        }
    }

    /// Waits until the server closes; returns the close code and reason.
    pub fn expect_closed(&mut self) -> (u16, String) {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Some(Incoming::Closed(c, r)) = self.recv_until(end) {
                return (c, r);
            }
        }
        panic!("connection still open");
    }

    /// Next incoming item before `end`, answering pings if `auto_pong`.
    pub fn recv_until(&mut self, end: Instant) -> Option<Incoming> {
        if let Some(x) = self.backlog.pop_front() {
            return Some(x);
        }
        while Instant::now() < end {
            if self.closed {
                return Some(Incoming::Closed(0, String::new()));
            }
            match self.next_frame() {
                Some((OpKind::Close, p)) => {
                    self.closed = true;
                    let code = if p.len() >= 2 { u16::from_be_bytes([p[0], p[1]]) } else { 0 };
                    let reason = String::from_utf8_lossy(p.get(2..).unwrap_or_default()).to_string();
                    return Some(Incoming::Closed(code, reason));
                }
                Some((OpKind::Binary, p)) => {
                    if let Some((packet, mut bins)) = self.pending_binary.take() {
                        bins.push(p);
                        if bins.len() == packet.attachments {
                            let name = packet.event_name().unwrap_or_default().to_string();
                            return Some(Incoming::Event(name, packet.event_args().to_vec(), bins));
                        }
                        self.pending_binary = Some((packet, bins));
                    }
                }
                Some((OpKind::Text, p)) => {
                    let text = String::from_utf8(p).unwrap();
                    match engineio::decode(&text).unwrap() {
                        engineio::Packet::Ping(_) if self.auto_pong => self.send_text("3"),
                        engineio::Packet::Message(m) => {
                            let p = socketio::decode(m).unwrap();
                            match p.kind {
                                PacketType::Event => {
                                    let name = p.event_name().unwrap().to_string();
                                    return Some(Incoming::Event(name, p.event_args().to_vec(), vec![]));
                                }
                                PacketType::BinaryEvent => self.pending_binary = Some((p, vec![])),
                                PacketType::Ack => {
                                    let args = match p.data {
                                        Some(Value::Array(a)) => a,
                                        _ => vec![],
                                    };
                                    return Some(Incoming::Ack(p.ack_id.unwrap(), args));
                                }
                                PacketType::ConnectError => {
                                    return Some(Incoming::ConnectError(p.data.unwrap()))
                                }
                                PacketType::Disconnect => return Some(Incoming::Disconnect),
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                }
                Some(_) | None => {}
            }
        }
        None
    }

    fn next_text(&mut self) -> Option<String> {
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            if let Some((op, p)) = self.next_frame() {
                if op == OpKind::Text {
                    return Some(String::from_utf8(p).unwrap());
                }
            }
        }
        None
    }

    /// One frame, or None after a short read timeout.
    fn next_frame(&mut self) -> Option<(OpKind, Vec<u8>)> {
        loop {
            if let Some((f, used)) =
                ws::decode_frame(&mut self.buf, 64 << 20, Role::Client).expect("server frame")
            {
                let payload = self.buf[f.payload.clone()].to_vec();
                self.buf.drain(..used);
                return Some((f.op, payload));
            }
            if !self.fill() {
                return None;
            }
        }
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                self.closed = true;
                false
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => false,
        }
    }
}

/// A raw client that upgrades, connects as `user`, joins `room` and then never reads
/// again: its socket fills once the node sends it enough.
pub fn silent_member(addr: SocketAddr, user: &str, room: &str) -> TcpStream {
    let mut slow = TcpStream::connect(addr).unwrap();
    let mut hello = "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".as_bytes().to_vec();
    for text in [format!("40{{\"token\":\"{}\"}}", token(user, "t")), format!("42[\"join_room\",\"{room}\"]")]
    {
        ws::encode_masked_frame(OpKind::Text, text.as_bytes(), [1, 2, 3, 4], &mut hello);
    }
    slow.write_all(&hello).unwrap();
    slow
}

/// `sender` (a member of `room`) floods it with 16 KiB messages until the node counts a
/// slow-consumer close (20 s at most), then checks the sender is still served.
pub fn flood_until_slow_consumer(srv: &Server, sender: &mut Client, room: &str) {
    let big = "y".repeat(16 * 1024);
    let end = Instant::now() + Duration::from_secs(20);
    while srv.metric("shardgate_connections_closed_total{reason=\"slow_consumer\"}") == 0 {
        assert!(Instant::now() < end, "the slow consumer was never cut off");
        for _ in 0..50 {
            sender.emit("message:send", json!({ "room": room, "content": big }));
        }
        sender.emit_ack("join_room", json!(room));
    }
    assert_eq!(sender.emit_ack("join_room", json!("other"))["ok"], true);
}

/// CPU seconds (user + system) process `pid` used so far, from `/proc`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64;
    // Fields 14 and 15 of stat (utime, stime), counted after the command name.
    (ticks(11) + ticks(12)) / hz
}

/// Fire-and-forget load for the benchmark programs: each sender `i` emits
/// `message:send` with `body(i)` `per_sender` times, while each receiver counts
/// `message:new` events until it has `expect` (or 60 s pass); one thread per client.
/// Returns the messages received, all receivers together.
pub fn blast(
    receivers: Vec<Client>,
    expect: usize,
    senders: Vec<Client>,
    per_sender: usize,
    body: fn(usize) -> Value,
) -> usize {
    let rx: Vec<_> = receivers
        .into_iter()
        .map(|mut r| {
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(60);
                let mut n = 0;
                while n < expect && Instant::now() < end {
                    if let Some(Incoming::Event(name, _, _)) = r.recv_until(end) {
                        n += usize::from(name == "message:new");
                    }
                }
                n
            })
        })
        .collect();
    let tx: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || {
                for _ in 0..per_sender {
                    s.emit("message:send", body(i));
                }
                s
            })
        })
        .collect();
    let _senders: Vec<Client> = tx.into_iter().map(|t| t.join().unwrap()).collect();
    rx.into_iter().map(|t| t.join().unwrap()).sum()
}
