//! One Socket.IO v4 client connection over a glommio socket, on the `shardgate-io`
//! codecs: WebSocket upgrade, Engine.IO open, namespace CONNECT with a token, events,
//! and ping answers. Works against any Socket.IO v4 server.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use shardgate_io::engineio;
use shardgate_io::socketio::{self, PacketType};
use shardgate_io::ws::{self, OpKind, Role};

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

/// Something the server sent.
#[derive(Debug)]
pub enum Event {
    /// An event: name and arguments.
    Event(String, Vec<serde_json::Value>),
    /// An ack: id and arguments.
    Ack(u64, Vec<serde_json::Value>),
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
                Some(b'0') => {}
                _ => return Err(ErrorKind::Closed),
            }
            let mut s = String::from("4");
            socketio::encode(PacketType::Connect, &c.nsp, None, 0, Some(&auth.to_string()), &mut s);
            c.send_text(&s).await?;
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
                            if text == "2" {
                                self.send_text("3").await?;
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
        let data = serde_json::json!([event, arg]).to_string();
        let mut s = String::from("4");
        socketio::encode(PacketType::Event, &self.nsp, id, 0, Some(&data), &mut s);
        self.send_text(&s).await?;
        Ok(id)
    }

    /// The next event or ack (pings answered on the way).
    pub async fn next_event(&mut self) -> Result<Event, ErrorKind> {
        loop {
            let text = self.next_text().await?;
            let Ok(engineio::Packet::Message(m)) = engineio::decode(&text) else { continue };
            let Ok(p) = socketio::decode(m) else { continue };
            match p.kind {
                PacketType::Event => {
                    let name = p.event_name().unwrap_or_default().to_string();
                    return Ok(Event::Event(name, p.event_args().to_vec()));
                }
                PacketType::Ack => {
                    let args = match p.data {
                        Some(serde_json::Value::Array(a)) => a,
                        _ => vec![],
                    };
                    return Ok(Event::Ack(p.ack_id.unwrap_or(0), args));
                }
                PacketType::Disconnect => return Err(ErrorKind::Closed),
                _ => {}
            }
        }
    }

    /// Waits for the ack `id`, answering pings and ignoring other traffic.
    pub async fn wait_ack(&mut self, id: u64) -> Result<Vec<serde_json::Value>, ErrorKind> {
        loop {
            if let Event::Ack(a, args) = self.next_event().await? {
                if a == id {
                    return Ok(args);
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
