//! A blocking Engine.IO long-polling client for the tests: each request on a connection
//! of its own (so that, with several shards, requests land on any of them) unless a
//! kept-alive connection is asked for.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shardgate_io::engineio::{self, Open};

use super::WAIT;

/// One HTTP response: status, head, body.
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as a long-polling payload: its packets.
    pub fn packets(&self) -> Vec<String> {
        self.text().split('\x1e').map(str::to_string).collect()
    }

    /// The body as an Engine.IO error (`{code, message}`).
    pub fn error_code(&self) -> Option<u64> {
        serde_json::from_slice::<Value>(&self.body).ok()?["code"].as_u64()
    }
}

/// Reads one response (by Content-Length) from `s`, and not a byte more (a pipelined
/// next response stays in the socket).
pub fn read_response(s: &mut TcpStream, wait: Duration) -> Response {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let end = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut want = None;
    loop {
        if want.is_none() && buf.ends_with(b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            want = Some((buf.len(), len));
        }
        if let Some((head_len, len)) = want {
            if buf.len() == head_len + len {
                let head = String::from_utf8_lossy(&buf[..head_len - 4]).to_string();
                let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
                return Response { status, head, body: buf[head_len..].to_vec() };
            }
        }
        assert!(
            Instant::now() < end,
            "no complete response within {wait:?}: {:?}",
            String::from_utf8_lossy(&buf)
        );
        let room = want.map_or(1, |(h, l)| h + l - buf.len());
        let mut chunk = vec![0u8; room];
        match s.read(&mut chunk) {
            Ok(0) => {
                panic!("connection closed before a complete response: {:?}", String::from_utf8_lossy(&buf))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// Writes one request on `s`.
pub fn write_request(s: &mut TcpStream, method: &str, path: &str, body: &[u8], extra: &str) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}").into_bytes();
    if method == "POST" {
        req.extend_from_slice(
            format!("Content-Type: text/plain;charset=UTF-8\r\nContent-Length: {}\r\n", body.len())
                .as_bytes(),
        );
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
}

/// One request on a new connection.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Response {
    request_with(addr, method, path, body, "")
}

/// One request on a new connection, with extra header lines (each ending in CRLF).
pub fn request_with(addr: SocketAddr, method: &str, path: &str, body: &[u8], headers: &str) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    write_request(&mut s, method, path, body, headers);
    read_response(&mut s, WAIT)
}

/// A long-polling session.
pub struct Poller {
    pub addr: SocketAddr,
    pub open: Open,
    next_ack: u64,
    /// Packets received while waiting for something else, oldest first.
    backlog: std::collections::VecDeque<String>,
}

impl Poller {
    /// The handshake GET (`query` is appended to the URL).
    pub fn open(addr: SocketAddr, query: &str) -> Poller {
        let r = request(addr, "GET", &format!("/socket.io/?EIO=4&transport=polling{query}"), b"");
        assert_eq!(r.status, 200, "handshake refused: {}", r.text());
        let text = r.text();
        let engineio::Packet::Open(json) = engineio::decode(&text).unwrap() else {
            panic!("not an open packet: {text}")
        };
        Poller { addr, open: Open::parse(json).unwrap(), next_ack: 1, backlog: Default::default() }
    }

    /// Handshake, then Socket.IO CONNECT with `{"token": token}`; panics unless accepted.
    pub fn connect(addr: SocketAddr, token: &str) -> Poller {
        let mut p = Poller::open(addr, "");
        assert_eq!(p.post(&format!("40{}", json!({ "token": token }))).status, 200);
        let reply = p.next_packet();
        assert!(reply.starts_with("40{\"sid\""), "connect refused: {reply}");
        p
    }

    /// The session's URL path.
    pub fn path(&self) -> String {
        format!("/socket.io/?EIO=4&transport=polling&sid={}", self.open.sid)
    }

    /// POSTs `payload`.
    pub fn post(&self, payload: &str) -> Response {
        request(self.addr, "POST", &self.path(), payload.as_bytes())
    }

    /// One GET (waits until the server has something).
    pub fn get(&self) -> Response {
        request(self.addr, "GET", &self.path(), b"")
    }

    /// The next packet, polling as needed; server pings are answered.
    pub fn next_packet(&mut self) -> String {
        let end = Instant::now() + WAIT;
        loop {
            if let Some(p) = self.backlog.pop_front() {
                if p == "2" {
                    assert_eq!(self.post("3").status, 200);
                    continue;
                }
                return p;
            }
            assert!(Instant::now() < end, "no packet within {WAIT:?}");
            let r = self.get();
            assert_eq!(r.status, 200, "poll refused: {}", r.text());
            self.backlog.extend(r.packets());
        }
    }

    /// Emits `event` with an ack id and waits for the ack's first argument.
    pub fn emit_ack(&mut self, event: &str, arg: Value) -> Value {
        let id = self.next_ack;
        self.next_ack += 1;
        assert_eq!(self.post(&format!("42{id}{}", json!([event, arg]))).status, 200);
        let prefix = format!("43{id}");
        let mut kept = Vec::new();
        loop {
            let p = self.next_packet();
            if let Some(rest) = p.strip_prefix(&prefix) {
                self.backlog.extend(kept);
                let v: Value = serde_json::from_str(rest).unwrap();
                return v[0].clone();
            }
            kept.push(p);
        }
    }

    /// The next event named `name` (others are dropped).
    pub fn expect_event(&mut self, name: &str) -> Value {
        loop {
            let p = self.next_packet();
            if let Some(rest) = p.strip_prefix("42") {
                let v: Value = serde_json::from_str(rest).unwrap();
                if v[0] == name {
                    return v[1].clone();
                }
            }
        }
    }
}
