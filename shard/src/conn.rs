//! One task per client connection: HTTP requests (plain endpoints, Engine.IO
//! long-polling, each handed to the shard that owns its session), then, once the
//! connection is a WebSocket, the Engine.IO loop.
//!
//! A WebSocket task owns the socket and the bytes of a partly received frame; everything
//! other connections may touch (the outbound queue, timers, the session) lives in the
//! shard's [`crate::state::ConnEntry`]. An idle connection holds no read or write buffer:
//! reads go into the shard's scratch buffer and glommio waits for readiness with a poll,
//! not a pending receive into memory of ours.
//!
//! A request naming a session (long-polling, or the upgrade of a polling session) may
//! arrive on any shard, since the kernel spreads connections over the shards'
//! `SO_REUSEPORT` listeners. The session id names its shard; a request for another shard
//! is not served here: the connection itself (its descriptor, duplicated, and the bytes
//! read so far) is sent to the owner over the mesh ([`ShardMsg::Adopt`]), which parses
//! the request again and serves it and whatever else follows on that connection. The
//! owner alone touches the session, so no state is shared or locked.

use std::future::{poll_fn, Future};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use shardgate_io::engineio;
use shardgate_io::http::{self, Request};
use shardgate_io::ws::{self, close_code, Assembler, DataKind, OpKind, Role, WsError};
use tracing::debug;

use crate::ids::{ConnId, ShardId};
use crate::local::{Shard, SCRATCH};
use crate::metrics::{CloseReason, Counter};
use crate::msg::ShardMsg;
use crate::state::conns::Inbound;
use crate::wire::{self, HeadError};
use crate::{operator, polling, upgrade};

/// A request buffer larger than this is freed between two requests.
const HEAD_KEEP: usize = 4096;
/// Frames at least this large are written straight from the queue, not coalesced.
const DIRECT_WRITE: usize = 16 * 1024;
/// Read/flush rounds one connection may take per poll before it yields to the others.
const POLL_ROUNDS: usize = 32;
/// A partial-frame buffer larger than this is freed once it empties.
const RBUF_KEEP: usize = 4096;
/// Engine.IO's maxPayload counts the packet; a frame may carry this much more (the
/// packet type prefix and a Socket.IO header).
const FRAME_SLACK: usize = 16;

/// What the connection task keeps for itself.
struct ConnIo {
    id: ConnId,
    stream: TcpStream,
    /// Bytes of an incomplete frame (empty, and unallocated, most of the time).
    rbuf: Vec<u8>,
    assembler: Assembler,
    /// The Engine.IO reader's state: the opening request's token, a pending binary packet.
    inbound: Inbound,
}

/// Serves one accepted TCP connection until it closes or is handed to another shard.
pub(crate) fn serve(shard: Rc<Shard>, stream: TcpStream, full: bool) -> impl Future<Output = ()> {
    connection(shard.clone(), http_phase(shard, stream, full, Vec::new(), true))
}

/// Serves a connection another shard accepted and handed over (`read`: what it read).
pub(crate) fn adopt(shard: Rc<Shard>, fd: OwnedFd, read: Vec<u8>) -> impl Future<Output = ()> {
    // SAFETY: the fd is a connected TCP socket that nothing else owns any more.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    connection(shard.clone(), http_phase(shard, stream, false, read, true))
}

/// Where the HTTP phase leaves a connection.
enum Next {
    /// Closed, or handed to another shard.
    Done,
    /// The connection is a WebSocket now.
    WebSocket(Box<ConnIo>),
    /// A long-polling GET was admitted: it waits for its session's packets outside the
    /// HTTP phase, holding no more than a WebSocket connection does.
    Poll(Box<polling::Waiting>),
}

type HttpPhase = Pin<Box<dyn Future<Output = Next>>>;

/// The HTTP phase (one or more requests: plain, long-polling, the upgrade) in a box of its
/// own, so that its buffers and requests are freed before a connection waits: an idle
/// WebSocket or a waiting long-polling GET keeps only [`ConnIo`] or [`polling::Waiting`].
fn http_phase(shard: Rc<Shard>, stream: TcpStream, full: bool, read: Vec<u8>, first: bool) -> HttpPhase {
    Box::pin(http_requests(shard, stream, full, read, first))
}

/// The connection task: HTTP requests, then the WebSocket loop, or a waiting GET and,
/// on a kept-alive connection, the HTTP phase again.
async fn connection(shard: Rc<Shard>, http: HttpPhase) {
    let mut http = Some(http);
    while let Some(phase) = http.take() {
        // The phase's answer is boxed: the task holds a connection's state in one place.
        let mut wait = match phase.await {
            Next::Done => return,
            Next::WebSocket(io) => {
                // A task of its own, holding only what a WebSocket needs for its long life.
                glommio::spawn_local(websocket(shard, io)).detach();
                return;
            }
            Next::Poll(wait) => wait,
        };
        let body = polling::wait(&shard, &mut wait).await;
        // Boxed: the answer's state is not what a waiting GET should carry.
        if Box::pin(polling::answer(&shard, &mut wait, body)).await {
            let polling::Waiting { stream, buf, .. } = *wait;
            http = Some(http_phase(shard.clone(), stream, false, buf, false));
        }
    }
}

/// The task of a WebSocket connection: the Engine.IO loop, then the goodbye.
async fn websocket(shard: Rc<Shard>, mut io: Box<ConnIo>) {
    // Frames pushed while nothing is queued are written at once (`Conns::push`); `finish`
    // retires the entry, and with it this descriptor, before the socket closes.
    if let Some(c) = shard.state.borrow_mut().conns.get_mut(io.id) {
        c.fd = Some(std::os::fd::AsRawFd::as_raw_fd(&io.stream));
    }
    let reason = run(&shard, &mut io).await;
    // Boxed: the idle task should not carry the goodbye's state.
    Box::pin(finish(&shard, &mut io, reason)).await;
}

/// What a request asks of this shard.
enum Route {
    /// Answer this and close.
    Respond(Vec<u8>),
    /// The session lives on another shard: hand the connection over.
    Forward(ShardId),
    /// A new WebSocket session.
    WebSocket,
    /// The upgrade of long-polling session `id` to WebSocket.
    Upgrade(ConnId),
    /// A new long-polling session.
    PollOpen,
    /// A GET of long-polling session `id`.
    PollGet(ConnId),
    /// A POST of long-polling session `id`.
    PollPost(ConnId),
}

/// Serves HTTP requests until the connection becomes a WebSocket, waits with a GET,
/// closes, or is handed to the shard that owns its session. `buf` holds bytes already
/// read; `first`: no request was served on the connection yet.
async fn http_requests(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    full: bool,
    mut buf: Vec<u8>,
    first: bool,
) -> Next {
    let shard = &*shard;
    let m = shard.metrics();
    let mut timeout = if first {
        let _ = stream.set_nodelay(true);
        Duration::from_millis(shard.shared.config.handshake_timeout_ms)
    } else {
        polling::KEEPALIVE_IDLE
    };
    loop {
        let (req, head) = match Box::pin(wire::read_head(shard, &mut stream, &mut buf, timeout)).await {
            Ok(x) => x,
            Err(HeadError::Closed) => return Next::Done,
            Err(HeadError::Timeout) => {
                if timeout != polling::KEEPALIVE_IDLE || !buf.is_empty() {
                    m.closed(CloseReason::HandshakeTimeout);
                    debug!("closed before upgrade: handshake_timeout");
                }
                return Next::Done;
            }
            Err(HeadError::Bad(resp)) => {
                m.inc(Counter::HttpRequests);
                let _ = wire::write_all(&mut stream, &resp).await;
                return Next::Done;
            }
        };
        let route = match route(shard, &req, full) {
            Route::Respond(resp) => {
                m.inc(Counter::HttpRequests);
                // Engine.IO errors readable by the pages of allowed origins too.
                let engineio = req.path.starts_with("/socket.io") && req.method != "OPTIONS";
                let cors = engineio.then(|| polling::cors(shard, &req)).flatten();
                let resp = polling::with_cors(resp, cors.as_deref());
                let _ = Box::pin(wire::write_all(&mut stream, &resp)).await;
                return Next::Done;
            }
            Route::Forward(owner) => {
                hand_off(shard, stream, buf, owner);
                return Next::Done;
            }
            other => other,
        };
        // From here `buf` holds what followed the head.
        buf.drain(..head);
        let keep = match route {
            Route::WebSocket => {
                return match Box::pin(open_websocket(shard, stream, &req, buf)).await {
                    Some(io) => Next::WebSocket(Box::new(io)),
                    None => Next::Done,
                }
            }
            Route::Upgrade(id) => {
                let Some((stream, rbuf, inbound)) =
                    Box::pin(upgrade::probe(shard, stream, &req, id, buf)).await
                else {
                    return Next::Done;
                };
                return Next::WebSocket(Box::new(ConnIo {
                    id,
                    stream,
                    rbuf,
                    assembler: Assembler::default(),
                    inbound,
                }));
            }
            Route::PollOpen => {
                let resp = polling::open(shard, &req);
                Box::pin(wire::write_all(&mut stream, &resp)).await.is_ok() && req.keep_alive
            }
            Route::PollGet(id) => {
                if let Err(resp) = polling::admit_get(shard, id) {
                    let _ = Box::pin(wire::write_all(&mut stream, &resp)).await;
                    return Next::Done;
                }
                if buf.is_empty() {
                    buf = Vec::new();
                }
                let cors = polling::cors(shard, &req);
                return Next::Poll(Box::new(polling::Waiting {
                    stream,
                    id,
                    keep: req.keep_alive,
                    buf,
                    cors,
                }));
            }
            Route::PollPost(id) => Box::pin(polling::post(shard, &mut stream, &req, id, &mut buf)).await,
            Route::Respond(_) | Route::Forward(_) => return Next::Done,
        };
        if !keep {
            return Next::Done;
        }
        if buf.is_empty() && buf.capacity() > HEAD_KEEP {
            buf = Vec::new();
        }
        timeout = polling::KEEPALIVE_IDLE;
    }
}

/// Gives the connection to shard `owner` with the bytes read so far; the owner parses
/// the request again and serves it (and whatever follows on the connection).
fn hand_off(shard: &Shard, stream: TcpStream, read: Vec<u8>, owner: ShardId) {
    // SAFETY: dup(2) of a socket this task owns; the copy outlives `stream`.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    drop(stream);
    if fd < 0 {
        return;
    }
    // SAFETY: a fresh descriptor from dup(2), owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    shard.metrics().inc(Counter::Handoffs);
    shard.shared.mesh.send(owner, ShardMsg::Adopt { fd, read });
}

/// Registers a new WebSocket connection and sends the Engine.IO open packet.
async fn open_websocket(shard: &Shard, stream: TcpStream, req: &Request, rest: Vec<u8>) -> Option<ConnIo> {
    let (id, open) = shard.open_session(None);
    let mut hello = http::upgrade_response(req.ws_key.as_deref().unwrap_or_default());
    ws::encode_frame(OpKind::Text, open.as_bytes(), &mut hello);
    let mut io =
        ConnIo { id, stream, rbuf: rest, assembler: Assembler::default(), inbound: Inbound::opening(req) };
    if wire::write_all(&mut io.stream, &hello).await.is_err() {
        finish(shard, &mut io, CloseReason::TransportError).await;
        return None;
    }
    Some(io)
}

/// Decides what a request asks: plain endpoints, refusals, and the Engine.IO transports.
fn route(shard: &Shard, req: &Request, full: bool) -> Route {
    let shared = &shard.shared;
    let respond = |r| Route::Respond(r);
    if let Some(resp) = operator::response(shard, req, true) {
        return respond(resp);
    }
    match req.path.as_str() {
        "/socket.io/" | "/socket.io" => {}
        _ => {
            let asset = crate::assets::response(shared, req);
            return respond(asset.unwrap_or_else(|| http::response(404, "text/plain", "not found\n")));
        }
    }
    let refuse = |code, msg, detail| Route::Respond(http::engineio_error(code, msg, detail));
    if req.method == "OPTIONS" {
        return Route::Respond(polling::preflight(shard, req));
    }
    if req.query_param("EIO") != Some(engineio::PROTOCOL_VERSION) {
        return refuse(
            5,
            "Unsupported protocol version",
            "shardgate speaks Engine.IO v4 (socket.io-client 3.x and 4.x): use EIO=4",
        );
    }
    let websocket = match req.query_param("transport") {
        Some("websocket") => true,
        Some("polling") => false,
        _ => return refuse(0, "Transport unknown", "transport must be polling or websocket"),
    };
    if websocket {
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
    }
    if let Some(sid) = req.query_param("sid") {
        let owner = shared.sid_key.verify(sid).filter(|(s, _)| *s < shared.mesh.len());
        let Some((owner, id)) = owner else {
            return Route::Respond(polling::unknown_sid(shard));
        };
        if owner != shard.id {
            return Route::Forward(owner);
        }
        if websocket {
            return match upgrade::admit(shard, id) {
                Ok(()) => Route::Upgrade(id),
                Err(resp) => Route::Respond(resp),
            };
        }
        return match req.method.as_str() {
            "GET" => Route::PollGet(id),
            "POST" => Route::PollPost(id),
            _ => refuse(3, "Bad request", "a long-polling request is a GET or a POST"),
        };
    }
    if !websocket && req.method != "GET" {
        return refuse(2, "Bad handshake method", "a new long-polling session starts with a GET");
    }
    if full || shared.closing() {
        shard.metrics().inc(Counter::Refused);
        return respond(http::response(
            503,
            "application/json",
            "{\"code\":503,\"message\":\"Server at capacity or draining\"}",
        ));
    }
    if websocket {
        Route::WebSocket
    } else {
        Route::PollOpen
    }
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
            Poll::Ready(Ok(n)) => {
                m.add(Counter::BytesOut, n as u64);
                c.advance(n);
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
    let mut st = shard.state.borrow_mut();
    if kind == DataKind::Binary {
        return crate::inbound::on_binary(&mut st, io.id, &mut io.inbound, bytes, now);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| CloseReason::MalformedPacket)?;
    crate::inbound::on_text(&mut st, io.id, &mut io.inbound, text, shard.shared.config.max_payload, now)
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
async fn finish(shard: &Shard, io: &mut ConnIo, reason: CloseReason) {
    let now = shard.shared.now();
    let leftover = {
        let mut st = shard.state.borrow_mut();
        let mut leftover = Vec::new();
        if let Some(mut e) = crate::session::retire(&mut st, io.id, reason, now) {
            if !e.close_now {
                for f in e.outbox.drain(..) {
                    leftover.extend_from_slice(&f[e.head_off.min(f.len())..]);
                    e.head_off = 0;
                }
            }
        }
        leftover
    };
    if reason == CloseReason::TransportError {
        return;
    }
    let mut bye = leftover;
    bye.extend_from_slice(&ws::close_frame(close_code_for(reason), reason.as_str()));
    let _ = stream_close(&mut io.stream, &bye).await;
}

async fn stream_close(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    wire::write_all(stream, bytes).await?;
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
                let connect = || glommio::net::TcpStream::connect(addr);
                let shared = crate::bench::shared().unwrap();
                let shard = std::rc::Rc::new(crate::local::Shard::new(0, shared));
                let id = crate::ids::ConnId::from_u64(1);
                // An idle WebSocket: its task, and the connection's state in its box.
                let stream = connect().await.unwrap();
                let io = super::ConnIo {
                    id,
                    stream,
                    rbuf: Vec::new(),
                    assembler: Default::default(),
                    inbound: Default::default(),
                };
                let ws = std::mem::size_of_val(&super::websocket(shard.clone(), Box::new(io)));
                let ws = ws + std::mem::size_of::<super::ConnIo>();
                assert!(ws <= 320, "an idle WebSocket holds {ws} bytes");
                // A waiting long-polling GET: the connection task, and its wait in a box.
                let get = std::mem::size_of_val(&super::serve(shard, connect().await.unwrap(), false));
                let get = get + std::mem::size_of::<crate::polling::Waiting>();
                assert!(get <= ws, "a waiting GET holds {get} bytes, an idle WebSocket {ws}");
                assert!(std::mem::size_of::<crate::state::conns::ConnEntry>() <= 128);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
