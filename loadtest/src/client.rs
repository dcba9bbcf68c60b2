//! One Socket.IO v4 client connection over a glommio socket, on the `shardgate-io`
//! codecs: WebSocket upgrade, Engine.IO open, namespace CONNECT with a token, events,
//! and ping answers. Works against any Socket.IO v4 server.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use shardgate_io::socketio::{self, PacketType};
use shardgate_io::ws::{self, OpKind, Role};
use shardgate_io::{engineio, packet};

/// Socket.IO packet type digits as the header reader sees them.
const EVENT: u8 = PacketType::Event.digit() as u8;
const BINARY_EVENT: u8 = PacketType::BinaryEvent.digit() as u8;
const ACK: u8 = PacketType::Ack.digit() as u8;
const BINARY_ACK: u8 = PacketType::BinaryAck.digit() as u8;
const DISCONNECT: u8 = PacketType::Disconnect.digit() as u8;

/// Why a connection attempt or a session failed; counted by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// TCP connect failed.
    Connect,
    /// The HTTP upgrade was refused.
    Upgrade,
    /// The namespace CONNECT was refused (CONNECT_ERROR).
    Auth,
    /// A step did not finish in time.
    Timeout,
    /// The server closed the connection or sent something unexpected.
    Closed,
}

impl ErrorKind {
    /// Every kind, in report order.
    pub const ALL: [ErrorKind; 5] =
        [ErrorKind::Connect, ErrorKind::Upgrade, ErrorKind::Auth, ErrorKind::Timeout, ErrorKind::Closed];

    /// Report name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Upgrade => "upgrade",
            ErrorKind::Auth => "auth",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Closed => "closed",
        }
    }
}

/// Something the server sent. Events are not decoded into JSON: the generator needs
/// only their name and the send time `t` its own payloads carry, and a full decode of
/// every delivery would make the generator, not the server, the bottleneck.
#[derive(Debug)]
pub enum Event {
    /// An event: its name, and the first `"t":<number>` inside it, if any.
    Event { name: String, t: Option<u64> },
    /// An ack and its id.
    Ack(u64),
}

/// A Socket.IO packet's header, read without decoding its JSON data.
struct Head<'a> {
    kind: u8,
    ack_id: Option<u64>,
    data: &'a str,
}

impl<'a> Head<'a> {
    /// `<type>[<attachments>-][/<nsp>,][<ack id>]<data>`.
    fn parse(m: &'a str) -> Option<Head<'a>> {
        let b = m.as_bytes();
        let kind = *b.first()?;
        let mut i = 1;
        if kind == b'5' || kind == b'6' {
            while b.get(i)?.is_ascii_digit() {
                i += 1;
            }
            if b.get(i) != Some(&b'-') {
                return None;
            }
            i += 1;
        }
        if b.get(i) == Some(&b'/') {
            i += m[i..].find(',').map_or(m.len() - i, |o| o + 1);
        }
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let ack_id = (i > start).then(|| m[start..i].parse().ok()).flatten();
        Some(Head { kind, ack_id, data: &m[i..] })
    }

    /// The event name of `["name", ...]`.
    fn event_name(&self) -> &'a str {
        let rest = self.data.strip_prefix("[\"").unwrap_or_default();
        &rest[..rest.find('"').unwrap_or(0)]
    }
}

/// The number after the first `"t":` in `data` (the send time in generator payloads).
fn find_t(data: &str) -> Option<u64> {
    let at = data.find("\"t\":")? + 4;
    let digits = data[at..].bytes().take_while(u8::is_ascii_digit).count();
    data[at..at + digits].parse().ok()
}

/// A connected Socket.IO client.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    nsp: String,
    next_ack: u64,
}

fn masked(op: OpKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    // Masking protects proxies from crafted clients; a fixed key is fine for load.
    ws::encode_masked_frame(op, payload, [0x37, 0xfa, 0x21, 0x3d], &mut out);
    out
}

impl Client {
    /// Connects from `source` (if given), upgrades, and CONNECTs to `nsp` with `auth`.
    pub async fn connect(
        target: SocketAddr,
        source: Option<IpAddr>,
        host: &str,
        nsp: &str,
        auth: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Client, ErrorKind> {
        let stream = tcp_connect(target, source)?;
        let mut c = Client { stream, buf: Vec::with_capacity(4096), nsp: nsp.to_string(), next_ack: 1 };
        let req = format!(
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let fut = async {
            // The first write waits for the connection to be established.
            c.stream.write_all(req.as_bytes()).await.map_err(|_| ErrorKind::Connect)?;
            loop {
                if let Some(pos) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    if !c.buf.starts_with(b"HTTP/1.1 101") {
                        return Err(ErrorKind::Upgrade);
                    }
                    c.buf.drain(..pos + 4);
                    break;
                }
                c.fill().await?;
            }
            // Engine.IO open.
            match c.next_text().await?.as_bytes().first() {
                Some(&engineio::kind::OPEN) => {}
                _ => return Err(ErrorKind::Closed),
            }
            c.send_text(&packet::connect_request(&c.nsp, auth)).await?;
            loop {
                let text = c.next_text().await?;
                if let Ok(engineio::Packet::Message(m)) = engineio::decode(&text) {
                    match socketio::decode(m).map(|p| p.kind) {
                        Ok(PacketType::Connect) => return Ok(()),
                        Ok(PacketType::ConnectError) => return Err(ErrorKind::Auth),
                        _ => {}
                    }
                }
            }
        };
        match glommio::timer::timeout(timeout, async { Ok(fut.await) }).await {
            Ok(Ok(())) => Ok(c),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ErrorKind::Timeout),
        }
    }

    async fn fill(&mut self) -> Result<(), ErrorKind> {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => Err(ErrorKind::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// The next text frame (Engine.IO packet); pings are answered on the way.
    async fn next_text(&mut self) -> Result<String, ErrorKind> {
        loop {
            match ws::decode_frame(&mut self.buf, 64 << 20, Role::Client) {
                Ok(Some((f, used))) => {
                    let payload = self.buf[f.payload.clone()].to_vec();
                    self.buf.drain(..used);
                    match f.op {
                        OpKind::Text => {
                            let text = String::from_utf8(payload).map_err(|_| ErrorKind::Closed)?;
                            if text == packet::PING {
                                self.send_text(packet::PONG).await?;
                                continue;
                            }
                            return Ok(text);
                        }
                        OpKind::Close => return Err(ErrorKind::Closed),
                        _ => continue,
                    }
                }
                Ok(None) => self.fill().await?,
                Err(_) => return Err(ErrorKind::Closed),
            }
        }
    }

    async fn send_text(&mut self, text: &str) -> Result<(), ErrorKind> {
        self.stream.write_all(&masked(OpKind::Text, text.as_bytes())).await.map_err(|_| ErrorKind::Closed)
    }

    /// Emits `event` with `arg`; with `ack`, returns the ack id to wait for.
    pub async fn emit(
        &mut self,
        event: &str,
        arg: &serde_json::Value,
        ack: bool,
    ) -> Result<Option<u64>, ErrorKind> {
        let id = ack.then(|| {
            self.next_ack += 1;
            self.next_ack
        });
        self.send_text(&packet::event(&self.nsp, event, arg, id)).await?;
        Ok(id)
    }

    /// The next event or ack (pings answered on the way).
    pub async fn next_event(&mut self) -> Result<Event, ErrorKind> {
        loop {
            let text = self.next_text().await?;
            // Only Engine.IO message packets carry Socket.IO packets; anything else is skipped.
            let message = engineio::kind::MESSAGE as char;
            let Some(head) = text.strip_prefix(message).and_then(Head::parse) else { continue };
            match head.kind {
                EVENT | BINARY_EVENT => {
                    return Ok(Event::Event { name: head.event_name().to_string(), t: find_t(head.data) })
                }
                ACK | BINARY_ACK => return Ok(Event::Ack(head.ack_id.unwrap_or(0))),
                DISCONNECT => return Err(ErrorKind::Closed),
                _ => {}
            }
        }
    }

    /// Waits for the ack `id`, answering pings and ignoring other traffic.
    pub async fn wait_ack(&mut self, id: u64) -> Result<(), ErrorKind> {
        loop {
            if let Event::Ack(a) = self.next_event().await? {
                if a == id {
                    return Ok(());
                }
            }
        }
    }

    /// Holds the connection open until `until`, answering pings.
    pub async fn idle_until(&mut self, until: std::time::Instant) -> Result<(), ErrorKind> {
        while self.next_event_until(until).await?.is_some() {}
        Ok(())
    }

    /// The next event or ack, or `None` once `until` passed first. glommio reads wait
    /// for readiness before taking bytes, so giving up on a read loses nothing.
    pub async fn next_event_until(&mut self, until: std::time::Instant) -> Result<Option<Event>, ErrorKind> {
        let wait = until.saturating_duration_since(std::time::Instant::now());
        futures_lite::future::or(async { self.next_event().await.map(Some) }, async {
            glommio::timer::sleep(wait).await;
            Ok(None)
        })
        .await
    }
}

/// Starts a non-blocking connect from an optional source address and hands the socket
/// to glommio; the first write completes once the connection is established, so a
/// server slow to accept stalls only this connection, never the executor.
fn tcp_connect(target: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, ErrorKind> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))
        .map_err(|_| ErrorKind::Connect)?;
    if let Some(ip) = source {
        sock.bind(&SockAddr::from(SocketAddr::new(ip, 0))).map_err(|_| ErrorKind::Connect)?;
    }
    sock.set_nonblocking(true).map_err(|_| ErrorKind::Connect)?;
    let _ = sock.set_nodelay(true);
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(_) => return Err(ErrorKind::Connect),
    }
    // SAFETY: a socket we own; glommio takes it over.
    Ok(unsafe { TcpStream::from_raw_fd(sock.into_raw_fd()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_send_times_are_read_without_decoding() {
        let h = Head::parse(r#"2["message:new",{"content":{"pad":"xx","t":123},"ts":9}]"#).unwrap();
        assert_eq!((h.kind, h.ack_id, h.event_name()), (b'2', None, "message:new"));
        assert_eq!(find_t(h.data), Some(123));
        let h = Head::parse(r#"3/chat,17[{"ok":true}]"#).unwrap();
        assert_eq!((h.kind, h.ack_id), (b'3', Some(17)));
        let h = Head::parse(r#"51-/chat,["bin",{"_placeholder":true,"num":0}]"#).unwrap();
        assert_eq!((h.kind, h.event_name()), (b'5', "bin"));
        assert_eq!(find_t(r#"["message:new",{"ts":5,"content":"x"}]"#), None);
        assert!(Head::parse("").is_none());
        assert!(Head::parse("5x").is_none());
    }
}
