//! One task per client connection: the HTTP request head, then either a plain response
//! (health, readiness, metrics, errors) or the WebSocket upgrade and the Engine.IO loop.
//!
//! The task owns the socket and the bytes of a partly received frame; everything other
//! connections may touch (the outbound queue, timers, the session) lives in the shard's
//! [`crate::state::ConnEntry`]. An idle connection holds no read or write buffer: reads go
//! into the shard's scratch buffer and glommio waits for readiness with a poll, not a
//! pending receive into memory of ours.

use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use shardgate_io::engineio::{self, Open};
use shardgate_io::http::{self, Request};
use shardgate_io::socketio;
use shardgate_io::ws::{self, close_code, Assembler, DataKind, OpKind, Role, WsError};
use tracing::{debug, info};

use shardgate_io::packet;

use crate::ids::{sid, ConnId};
use crate::local::{Shard, SCRATCH};
use crate::metrics::{CloseReason, Counter};
use crate::state::conns::ConnEntry;

/// First allocation for a request head; most heads of Socket.IO clients fit.
const HEAD_BUF: usize = 1024;
/// Bytes read per call while reading a request head (bounded by http's 8 KiB limit).
const HEAD_CHUNK: usize = 2048;
/// Frames at least this large are written straight from the queue, not coalesced.
const DIRECT_WRITE: usize = 16 * 1024;
/// Read/flush rounds one connection may take per poll before it yields to the others.
const POLL_ROUNDS: usize = 32;
/// A partial-frame buffer larger than this is freed once it empties.
const RBUF_KEEP: usize = 4096;
/// Engine.IO's maxPayload counts the packet; a frame may carry this much more (the
/// packet type prefix and a Socket.IO header).
const FRAME_SLACK: usize = 16;
/// Longest a single write of a handshake answer or goodbye may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A binary packet waiting for its attachments.
struct PendingBinary {
    packet: socketio::Packet,
    attachments: Vec<Vec<u8>>,
}

/// What the connection task keeps for itself.
struct ConnIo {
    id: ConnId,
    stream: TcpStream,
    /// Bytes of an incomplete frame (empty, and unallocated, most of the time).
    rbuf: Vec<u8>,
    assembler: Assembler,
    /// Token from the upgrade request (header or query), used if CONNECT carries none.
    upgrade_token: Option<String>,
    binary: Option<Box<PendingBinary>>,
}

/// Serves one accepted TCP connection until it closes.
///
/// The handshake runs in its own boxed future so that its buffers and the request are
/// freed before the long idle life of the connection begins: the connection task keeps
/// only [`ConnIo`].
pub(crate) async fn serve(shard: Rc<Shard>, stream: TcpStream, full: bool) {
    let Some(mut io) = Box::pin(handshake(&shard, stream, full)).await else {
        return;
    };
    let reason = run(&shard, &mut io).await;
    // Boxed for the same reason: the idle task should not carry the goodbye's state.
    Box::pin(finish(&shard, io, reason)).await;
}

/// Reads the request head; answers plain HTTP, or upgrades, registers the connection and
/// sends the Engine.IO open packet.
async fn handshake(shard: &Shard, mut stream: TcpStream, full: bool) -> Option<ConnIo> {
    let m = &shard.metrics();
    let _ = stream.set_nodelay(true);
    let timeout = Duration::from_millis(shard.shared.config.handshake_timeout_ms);
    let (req, rest) = match read_head(&mut stream, timeout).await {
        Ok(Some(x)) => x,
        Ok(None) => return None,
        Err(HeadError::Timeout) => {
            m.closed(CloseReason::HandshakeTimeout);
            debug!("closed before upgrade: handshake_timeout");
            return None;
        }
        Err(HeadError::Bad(resp)) => {
            m.inc(Counter::HttpRequests);
            let _ = write_all(&mut stream, &resp).await;
            return None;
        }
    };
    if let Some(resp) = plain_response(shard, &req, full) {
        m.inc(Counter::HttpRequests);
        let _ = write_all(&mut stream, &resp).await;
        return None;
    }
    let cfg = &shard.shared.config;
    let now = shard.shared.now();
    let id = shard.state.borrow_mut().conns.insert(ConnEntry {
        next_ping: now + cfg.ping_interval_ms,
        connect_deadline: now + cfg.connect_timeout_ms,
        ..ConnEntry::default()
    });
    let open = Open {
        sid: sid(shard.id, id),
        upgrades: vec![],
        ping_interval: cfg.ping_interval_ms,
        ping_timeout: cfg.ping_timeout_ms,
        max_payload: cfg.max_payload as u64,
    };
    let mut hello = http::upgrade_response(req.ws_key.as_deref().unwrap_or_default());
    ws::encode_frame(OpKind::Text, open.encode().as_bytes(), &mut hello);
    m.inc(Counter::Open);
    let mut io = ConnIo {
        id,
        stream,
        rbuf: rest,
        assembler: Assembler::default(),
        upgrade_token: req.bearer.clone().or_else(|| req.query_param("token").map(str::to_string)),
        binary: None,
    };
    if write_all(&mut io.stream, &hello).await.is_err() {
        finish(shard, io, CloseReason::TransportError).await;
        return None;
    }
    Some(io)
}

enum HeadError {
    Timeout,
    Bad(Vec<u8>),
}

async fn read_head(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<(Request, Vec<u8>)>, HeadError> {
    let mut buf = Vec::with_capacity(HEAD_BUF);
    let mut chunk = vec![0u8; HEAD_CHUNK];
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(HeadError::Timeout);
        }
        let _ = stream.set_read_timeout(Some(left));
        let n = match stream.read(&mut chunk).await {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(HeadError::Timeout),
            Err(_) => return Ok(None),
        };
        buf.extend_from_slice(&chunk[..n]);
        match http::parse_request(&buf) {
            Ok(Some((req, len))) => {
                let _ = stream.set_read_timeout(None);
                let rest = buf.split_off(len);
                return Ok(Some((req, rest)));
            }
            Ok(None) => continue,
            Err(http::HttpError::TooLarge) => {
                return Err(HeadError::Bad(http::response(431, "text/plain", "request head too large\n")))
            }
            Err(e) => return Err(HeadError::Bad(http::response(400, "text/plain", &format!("{e}\n")))),
        }
    }
}

/// Answers everything that is not a Socket.IO WebSocket upgrade.
fn plain_response(shard: &Shard, req: &Request, full: bool) -> Option<Vec<u8>> {
    let shared = &shard.shared;
    match req.path.as_str() {
        "/healthz" => return Some(http::response(200, "text/plain", "ok\n")),
        "/readyz" => {
            return Some(if shared.ready.load(std::sync::atomic::Ordering::Relaxed) {
                http::response(200, "text/plain", "ready\n")
            } else {
                http::response(503, "text/plain", "not ready\n")
            })
        }
        "/metrics" => {
            let mut body = String::with_capacity(8192);
            crate::metrics::render(&shared.metrics, shared.mesh.len(), &mut body);
            body.push_str(&shared.static_metrics);
            return Some(http::response(200, "text/plain; version=0.0.4", &body));
        }
        "/admin/drain" => return Some(admin_drain(shard, req)),
        "/socket.io/" | "/socket.io" => {}
        _ => return Some(http::response(404, "text/plain", "not found\n")),
    }
    let refuse = |code, msg, detail| Some(http::engineio_error(code, msg, detail));
    if req.query_param("EIO") != Some(engineio::PROTOCOL_VERSION) {
        return refuse(
            5,
            "Unsupported protocol version",
            "shardgate speaks Engine.IO v4 (socket.io-client 3.x and 4.x): use EIO=4",
        );
    }
    if req.query_param("transport") != Some("websocket") {
        return refuse(
            0,
            "Transport unknown",
            "shardgate serves the websocket transport only: set transports: [\"websocket\"] in the client",
        );
    }
    if req.method != "GET" || !req.is_websocket_upgrade() {
        return refuse(
            3,
            "Bad request",
            "expected a GET with Upgrade: websocket, Connection: Upgrade and Sec-WebSocket-Key",
        );
    }
    if req.ws_version.as_deref() != Some("13") {
        return refuse(3, "Bad request", "unsupported Sec-WebSocket-Version: only 13 is served");
    }
    if req.has_body {
        return refuse(3, "Bad request", "an upgrade request carries no body");
    }
    if full || shared.closing() {
        shard.metrics().inc(Counter::Refused);
        return Some(http::response(
            503,
            "application/json",
            "{\"code\":503,\"message\":\"Server at capacity or draining\"}",
        ));
    }
    None
}

/// `POST /admin/drain` with `Authorization: Bearer <admin.token>`: the same drain as
/// SIGTERM (the process signals itself; the main thread runs the drain and exits).
fn admin_drain(shard: &Shard, req: &Request) -> Vec<u8> {
    let json = "application/json";
    let Some(token) = shard.shared.admin_token.as_deref() else {
        let body = "{\"code\":403,\"message\":\"admin endpoints are disabled: set admin.token\"}";
        return http::response(403, json, body);
    };
    if req.method != "POST" {
        return http::response(405, json, "{\"code\":405,\"message\":\"use POST\"}");
    }
    let given = req.bearer.as_deref().unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        shard.metrics().inc(Counter::AuthFailures);
        let body = "{\"code\":401,\"message\":\"Authorization: Bearer <admin.token> required\"}";
        return http::response(401, json, body);
    }
    if !shard.shared.closing() {
        info!(shard = shard.id, "drain requested through /admin/drain");
        // SAFETY: kill(2) on this process; the main thread waits for SIGTERM with sigwait.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
    }
    http::response(202, json, "{\"draining\":true}")
}

/// Compares secrets without a timing side channel on the position of the first
/// difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn write_all(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let r = stream.write_all(bytes).await;
    let _ = stream.set_write_timeout(None);
    r
}

/// The connection loop: flush queued frames, honour close requests, read and process.
async fn run(shard: &Shard, io: &mut ConnIo) -> CloseReason {
    if !io.rbuf.is_empty() {
        let mut early = std::mem::take(&mut io.rbuf);
        let len = early.len();
        if let Err(r) = process(shard, io, &mut early[..len]) {
            return r;
        }
    }
    poll_fn(|cx| poll_conn(shard, io, cx)).await
}

fn poll_conn(shard: &Shard, io: &mut ConnIo, cx: &mut Context<'_>) -> Poll<CloseReason> {
    for _ in 0..POLL_ROUNDS {
        if let Err(r) = flush(shard, io, cx) {
            return Poll::Ready(r);
        }
        {
            let st = shard.state.borrow();
            let Some(c) = st.conns.get(io.id) else {
                return Poll::Ready(CloseReason::ServerShutdown);
            };
            if let Some(r) = c.close {
                if c.close_now || c.outbox.is_empty() || shard.shared.now() >= c.close_by {
                    return Poll::Ready(r);
                }
            }
        }
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut io.stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(CloseReason::ClientClosed),
            Poll::Ready(Ok(n)) => {
                shard.metrics().add(Counter::BytesIn, n as u64);
                if let Err(r) = process(shard, io, &mut scratch[..n]) {
                    return Poll::Ready(r);
                }
            }
            Poll::Ready(Err(_)) => return Poll::Ready(CloseReason::TransportError),
            Poll::Pending => {
                let mut st = shard.state.borrow_mut();
                if let Some(c) = st.conns.get_mut(io.id) {
                    match &c.waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => c.waker = Some(cx.waker().clone()),
                    }
                }
                return Poll::Pending;
            }
        }
    }
    // Busy connection: let the others run.
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Writes queued frames until the queue is empty or the socket is full.
fn flush(shard: &Shard, io: &mut ConnIo, cx: &mut Context<'_>) -> Result<(), CloseReason> {
    let mut st = shard.state.borrow_mut();
    let m = &shard.metrics();
    let Some(c) = st.conns.get_mut(io.id) else {
        return Ok(());
    };
    loop {
        let Some(front) = c.outbox.front() else {
            // An idle connection keeps no queue allocation.
            if c.outbox.capacity() > 0 {
                c.outbox = Default::default();
            }
            return Ok(());
        };
        let first = &front[c.head_off..];
        let res = if c.outbox.len() == 1 || first.len() >= DIRECT_WRITE {
            Pin::new(&mut io.stream).poll_write(cx, first)
        } else {
            let mut wbuf = shard.wbuf.borrow_mut();
            wbuf.clear();
            wbuf.extend_from_slice(first);
            for f in c.outbox.iter().skip(1) {
                if wbuf.len() + f.len() > SCRATCH {
                    break;
                }
                wbuf.extend_from_slice(f);
            }
            Pin::new(&mut io.stream).poll_write(cx, &wbuf)
        };
        match res {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(CloseReason::TransportError),
            Poll::Ready(Ok(mut n)) => {
                m.add(Counter::BytesOut, n as u64);
                c.out_bytes = c.out_bytes.saturating_sub(n);
                while n > 0 {
                    let Some(f) = c.outbox.front() else { break };
                    let left = f.len() - c.head_off;
                    if n >= left {
                        n -= left;
                        c.outbox.pop_front();
                        c.head_off = 0;
                    } else {
                        c.head_off += n;
                        n = 0;
                    }
                }
            }
            Poll::Pending => return Ok(()),
        }
    }
}

/// Decodes every complete frame in `data` (plus any earlier partial frame).
fn process(shard: &Shard, io: &mut ConnIo, data: &mut [u8]) -> Result<(), CloseReason> {
    let max = shard.shared.config.max_payload;
    if io.rbuf.is_empty() {
        let used = decode_all(shard, io, data, max)?;
        if used < data.len() {
            io.rbuf.extend_from_slice(&data[used..]);
        }
    } else {
        let mut buf = std::mem::take(&mut io.rbuf);
        buf.extend_from_slice(data);
        let used = decode_all(shard, io, &mut buf, max)?;
        buf.drain(..used);
        if buf.is_empty() && buf.capacity() > RBUF_KEEP {
            buf = Vec::new();
        }
        io.rbuf = buf;
    }
    Ok(())
}

fn decode_all(shard: &Shard, io: &mut ConnIo, buf: &mut [u8], max: usize) -> Result<usize, CloseReason> {
    let mut pos = 0;
    while let Some((frame, used)) =
        ws::decode_frame(&mut buf[pos..], max + FRAME_SLACK, Role::Server).map_err(ws_reason)?
    {
        let payload = &buf[pos + frame.payload.start..pos + frame.payload.end];
        match frame.op {
            OpKind::Ping => {
                let mut pong = Vec::with_capacity(payload.len() + 2);
                ws::encode_frame(OpKind::Pong, payload, &mut pong);
                shard.state.borrow_mut().push(io.id, &pong.into());
            }
            OpKind::Pong => {}
            OpKind::Close => return Err(CloseReason::ClientClosed),
            op => {
                let msg = io.assembler.push(op, frame.fin, payload, max + FRAME_SLACK).map_err(ws_reason)?;
                if let Some((kind, bytes)) = msg {
                    on_message(shard, io, kind, &bytes)?;
                }
            }
        }
        pos += used;
    }
    Ok(pos)
}

fn ws_reason(e: WsError) -> CloseReason {
    match e {
        WsError::TooBig { .. } => CloseReason::PayloadTooLarge,
        WsError::Protocol(_) => CloseReason::ProtocolError,
    }
}

/// One whole WebSocket message: an Engine.IO packet (text) or a binary attachment.
fn on_message(shard: &Shard, io: &mut ConnIo, kind: DataKind, bytes: &[u8]) -> Result<(), CloseReason> {
    let now = shard.shared.now();
    if kind == DataKind::Binary {
        let Some(pending) = io.binary.as_mut() else {
            return Err(CloseReason::MalformedPacket);
        };
        pending.attachments.push(bytes.to_vec());
        if pending.attachments.len() == pending.packet.attachments {
            if let Some(p) = io.binary.take() {
                let mut st = shard.state.borrow_mut();
                crate::session::on_packet(
                    &mut st,
                    io.id,
                    &mut io.upgrade_token,
                    p.packet,
                    p.attachments,
                    now,
                )?;
            }
        }
        return Ok(());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| CloseReason::MalformedPacket)?;
    if text.len() > shard.shared.config.max_payload {
        return Err(CloseReason::PayloadTooLarge);
    }
    match engineio::decode(text).map_err(|_| CloseReason::MalformedPacket)? {
        engineio::Packet::Pong(_) => {
            if let Some(c) = shard.state.borrow_mut().conns.get_mut(io.id) {
                c.pong_deadline = 0;
            }
        }
        engineio::Packet::Ping(data) => {
            let pong = packet::server_frame(packet::pong(data).as_bytes());
            shard.state.borrow_mut().push_new(io.id, pong);
        }
        engineio::Packet::Close => return Err(CloseReason::ClientDisconnect),
        engineio::Packet::Message(payload) => {
            if io.binary.is_some() {
                return Err(CloseReason::MalformedPacket);
            }
            let packet = socketio::decode(payload).map_err(|e| {
                debug!("malformed socket.io packet: {e}");
                CloseReason::MalformedPacket
            })?;
            if packet.kind.is_binary() && packet.attachments > 0 {
                if let Some(data) = &packet.data {
                    socketio::check_placeholders(data, packet.attachments)
                        .map_err(|_| CloseReason::MalformedPacket)?;
                }
                io.binary = Some(Box::new(PendingBinary { packet, attachments: Vec::new() }));
                return Ok(());
            }
            let mut st = shard.state.borrow_mut();
            crate::session::on_packet(&mut st, io.id, &mut io.upgrade_token, packet, Vec::new(), now)?;
        }
        engineio::Packet::Upgrade | engineio::Packet::Noop => {}
        engineio::Packet::Open(_) => return Err(CloseReason::MalformedPacket),
    }
    Ok(())
}

fn close_code_for(r: CloseReason) -> u16 {
    match r {
        CloseReason::ClientClosed | CloseReason::ClientDisconnect => close_code::NORMAL,
        CloseReason::ServerShutdown => close_code::GOING_AWAY,
        CloseReason::ProtocolError => close_code::PROTOCOL,
        CloseReason::MalformedPacket => close_code::INVALID_PAYLOAD,
        CloseReason::PayloadTooLarge => close_code::TOO_BIG,
        _ => close_code::POLICY,
    }
}

/// Removes the connection from the shard, then says goodbye on the socket.
async fn finish(shard: &Shard, mut io: ConnIo, reason: CloseReason) {
    let now = shard.shared.now();
    let m = &shard.metrics();
    let leftover = {
        let mut st = shard.state.borrow_mut();
        let entry = st.conns.remove(io.id);
        let mut leftover = Vec::new();
        if let Some(mut e) = entry {
            if !e.close_now {
                for f in e.outbox.drain(..) {
                    leftover.extend_from_slice(&f[e.head_off.min(f.len())..]);
                    e.head_off = 0;
                }
            }
            if let Some(session) = e.session.take() {
                crate::session::teardown(&mut st, io.id, *session, now, reason);
            }
        }
        leftover
    };
    m.dec(Counter::Open);
    m.closed(reason);
    match reason {
        CloseReason::ClientClosed | CloseReason::ClientDisconnect | CloseReason::ServerShutdown => {
            debug!(shard = shard.id, reason = reason.as_str(), "connection closed")
        }
        _ => info!(shard = shard.id, reason = reason.as_str(), "connection closed"),
    }
    if reason == CloseReason::TransportError {
        return;
    }
    let mut bye = leftover;
    bye.extend_from_slice(&ws::close_frame(close_code_for(reason), reason.as_str()));
    let _ = stream_close(&mut io.stream, &bye).await;
}

async fn stream_close(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    write_all(stream, bytes).await?;
    stream.close().await
}
#[cfg(test)]
mod tests {
    /// The connection task is what every idle connection costs: keep it small.
    #[test]
    fn idle_connection_task_stays_small() {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(|| async move {
                let l = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = l.local_addr().unwrap();
                let c = glommio::net::TcpStream::connect(addr).await.unwrap();
                let shared = crate::bench::shared().unwrap();
                let shard = std::rc::Rc::new(crate::local::Shard::new(0, shared));
                let task = super::serve(shard, c, false);
                let size = std::mem::size_of_val(&task);
                assert!(size <= 512, "connection task grew to {size} bytes");
                assert!(std::mem::size_of::<crate::state::conns::ConnEntry>() <= 128);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
