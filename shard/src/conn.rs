//! One task per client connection: HTTP requests (plain endpoints, Engine.IO
//! long-polling, each handed to the shard that owns its session), until the connection
//! becomes a WebSocket, whose life goes on in `websocket.rs`.
//!
//! A request naming a session (long-polling, or the upgrade of a polling session) may
//! arrive on any shard, since the kernel spreads connections over the shards'
//! `SO_REUSEPORT` listeners. The session id names its shard; a request for another shard
//! is not served here: the connection itself (its descriptor, duplicated, and the bytes
//! read so far) is sent to the owner over the mesh ([`ShardMsg::Adopt`]), which parses
//! the request again and serves it and whatever else follows on that connection. The
//! owner alone touches the session, so no state is shared or locked.

use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use glommio::net::TcpStream;
use shardgate_io::engineio;
use shardgate_io::http::{self, Request};
use tracing::debug;

use crate::ids::{ConnId, ShardId};
use crate::local::Shard;
use crate::metrics::{CloseReason, Counter};
use crate::msg::ShardMsg;
use crate::websocket::{self, ConnIo};
use crate::wire::{self, HeadError};
use crate::{operator, polling, upgrade};

/// A request buffer larger than this is freed between two requests.
const HEAD_KEEP: usize = 4096;

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
                websocket::spawn(shard, io);
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
                return match Box::pin(websocket::open(shard, stream, &req, buf)).await {
                    Some(io) => Next::WebSocket(io),
                    None => Next::Done,
                }
            }
            Route::Upgrade(id) => {
                let Some((stream, rbuf, inbound)) =
                    Box::pin(upgrade::probe(shard, stream, &req, id, buf)).await
                else {
                    return Next::Done;
                };
                return Next::WebSocket(websocket::upgraded(id, stream, rbuf, inbound));
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

#[cfg(test)]
mod tests {
    /// The connection task is what every running connection costs, and a parked one is its
    /// entry alone: keep them small.
    #[test]
    fn connection_state_stays_small() {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(|| async move {
                let l = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = l.local_addr().unwrap();
                let connect = || glommio::net::TcpStream::connect(addr);
                let shared = crate::bench::shared().unwrap();
                let shard = std::rc::Rc::new(crate::local::Shard::new(0, shared));
                let id = crate::ids::ConnId::from_u64(1);
                // A running WebSocket: its task, and the connection's state in its box.
                let io =
                    crate::websocket::upgraded(id, connect().await.unwrap(), Vec::new(), Default::default());
                let ws = crate::websocket::running_size(shard.clone(), io);
                assert!(ws <= 320, "a running WebSocket holds {ws} bytes");
                // A waiting long-polling GET: the connection task, and its wait in a box.
                let get = std::mem::size_of_val(&super::serve(shard, connect().await.unwrap(), false));
                let get = get + std::mem::size_of::<crate::polling::Waiting>();
                assert!(get <= ws, "a waiting GET holds {get} bytes, a running WebSocket {ws}");
                // A parked WebSocket is its entry alone.
                assert!(std::mem::size_of::<crate::state::conns::ConnEntry>() <= 128);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
