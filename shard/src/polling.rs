//! Engine.IO v4 HTTP long-polling, served on the shard that owns the session.
//!
//! A long-polling session is a connection entry like any other (`state/conns.rs`): frames
//! for it are queued on its outbox by the same code that serves WebSocket clients. What
//! differs is who takes them out: not a connection task but the session's waiting GET,
//! which answers with every queued packet as one payload (`\x1e`-joined, binary as `b` +
//! base64, taken out of the queued WebSocket frames) as soon as one is there. Each POST
//! body is split into packets and handed to the same Engine.IO reader (`inbound.rs`).
//!
//! Requests reach the owner whatever shard accepted them: the session id names its shard,
//! and `conn.rs` hands a connection whose request belongs elsewhere to the owner over the
//! mesh before anything here runs. So every function here runs on the owner, touching
//! the entry without locks.
//!
//! Nothing holds a session between two requests, so a close must also retire it when no
//! GET waits ([`close`]); the tick does the same for timeouts.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::AsyncRead;
use glommio::net::TcpStream;
use shardgate_io::engineio::{self, PayloadPacket};
use shardgate_io::http::{self, Request};
use shardgate_io::ws::{self, OpKind};

use crate::ids::ConnId;
use crate::local::Shard;
use crate::metrics::{CloseReason, Counter};
use crate::state::conns::{ConnEntry, Inbound, Polling};
use crate::state::State;
use crate::wire;

/// How long a kept-alive connection may sit idle between two requests (Node's default).
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);

const PAYLOAD_TYPE: &str = "text/plain; charset=UTF-8";

/// Closes session `id` (frames queued are answered first unless `now`) and, if no GET
/// waits to notice, retires it at once.
pub(crate) fn close(st: &mut State, id: ConnId, reason: CloseReason, now: bool, at: u64) {
    st.close(id, reason, now, at);
    if st.conns.get(id).is_some_and(ConnEntry::detached) {
        crate::session::retire(st, id, reason, at);
    }
}

/// CORS response headers for a request from a page of another origin, if the
/// configuration (`runtime.cors_origins`) allows that origin; `None` otherwise (and for
/// same-origin requests, which carry no `Origin` on GET).
pub(crate) fn cors(shard: &Shard, req: &Request) -> Option<Box<str>> {
    let origin = req.origin.as_deref()?;
    shard.shared.config.cors_allows(origin).then(|| {
        format!("Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\nVary: Origin\r\n").into()
    })
}

/// The answer to a CORS preflight (`OPTIONS /socket.io/`).
pub(crate) fn preflight(shard: &Shard, req: &Request) -> Vec<u8> {
    match cors(shard, req) {
        Some(allow) => http::with_headers(
            http::response(204, "text/plain", ""),
            &format!(
                "{allow}Access-Control-Allow-Methods: GET, POST\r\nAccess-Control-Allow-Headers: content-type, authorization\r\nAccess-Control-Max-Age: 86400\r\n"
            ),
        ),
        None => http::response(
            403,
            "application/json",
            "{\"code\":403,\"message\":\"origin not allowed: list it in runtime.cors_origins (--cors-origin)\"}",
        ),
    }
}

/// `resp` with the CORS headers `cors`, if any.
pub(crate) fn with_cors(resp: Vec<u8>, cors: Option<&str>) -> Vec<u8> {
    match cors {
        Some(h) => http::with_headers(resp, h),
        None => resp,
    }
}

/// The handshake (`GET /socket.io/?EIO=4&transport=polling`, no sid): opens a session on
/// this shard and answers its open packet, offering the upgrade to WebSocket.
pub(crate) fn open(shard: &Shard, req: &Request) -> Vec<u8> {
    let poll = Box::new(Polling { inbound: Inbound::opening(req), ..Polling::default() });
    let (_, open) = shard.open_session(Some(poll));
    let resp = http::response_bytes(200, PAYLOAD_TYPE, open.as_bytes(), req.keep_alive);
    with_cors(resp, cors(shard, req).as_deref())
}

/// The answer to a request naming a session that is closed, was never opened here, or
/// whose id is not this process's (counted): Engine.IO code 1, and the client connects
/// again.
pub(crate) fn unknown_sid(shard: &Shard) -> Vec<u8> {
    shard.metrics().inc(Counter::UnknownSids);
    http::engineio_error(
        1,
        "Session ID unknown",
        "the session is closed or was never opened by this server: connect again",
    )
}

fn upgraded() -> Vec<u8> {
    http::engineio_error(3, "Bad request", "the session was upgraded to websocket: polling is over for it")
}

/// Admits a GET of session `id`: refused (the answer to write) if the session is gone,
/// upgraded, or already has a GET waiting (which ends the session: Engine.IO allows one
/// at a time, and the waiting GET answers the close packet).
pub(crate) fn admit_get(shard: &Shard, id: ConnId) -> Result<(), Vec<u8>> {
    shard.metrics().inc(Counter::PollingRequests);
    let mut st = shard.state.borrow_mut();
    let now = shard.shared.now();
    match st.conns.get_mut(id).map(|c| c.poll.as_deref_mut()) {
        None => Err(unknown_sid(shard)),
        Some(None) => Err(upgraded()),
        Some(Some(p)) if p.get => {
            close(&mut st, id, CloseReason::ProtocolError, false, now);
            Err(http::engineio_error(3, "Bad request", "overlapping GET requests for one session"))
        }
        Some(Some(p)) => {
            p.get = true;
            Ok(())
        }
    }
}

/// An admitted GET waiting for packets: what its connection task keeps.
pub(crate) struct Waiting {
    /// The GET's connection.
    pub stream: TcpStream,
    /// The session.
    pub id: ConnId,
    /// The connection may carry another request after the answer.
    pub keep: bool,
    /// Bytes of a pipelined next request.
    pub buf: Vec<u8>,
    /// CORS headers for the answer (a page of another, allowed origin).
    pub cors: Option<Box<str>>,
}

/// An admitted GET: waits until the session has packets (or a close, or the upgrade probe
/// asks it to let go); `None` if the client went away meanwhile (the connection is
/// watched while the GET waits; bytes of a pipelined next request are kept in `buf`).
/// A plain future over `wait`, so that a waiting GET costs its connection task only a
/// reference.
pub(crate) fn wait<'a>(
    shard: &'a Shard,
    wait: &'a mut Waiting,
) -> impl Future<Output = Option<Vec<u8>>> + 'a {
    poll_fn(move |cx| {
        if let Poll::Ready(body) = next_payload(shard, wait.id, cx) {
            return Poll::Ready(Some(body));
        }
        loop {
            let mut scratch = shard.scratch.borrow_mut();
            match Pin::new(&mut wait.stream).poll_read(cx, &mut scratch[..]) {
                Poll::Ready(Ok(n)) if n > 0 && wait.buf.len() < http::MAX_HEAD => {
                    wait.buf.extend_from_slice(&scratch[..n])
                }
                Poll::Ready(_) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
}

/// The answer to a GET that waited: `body` (from [`wait`]) written, or, if its client
/// went away, the session ended (its next packets would have nowhere to go). True if the
/// connection may carry another request.
pub(crate) async fn answer(shard: &Shard, wait: &mut Waiting, body: Option<Vec<u8>>) -> bool {
    let id = wait.id;
    match body {
        Some(body) => respond(shard, wait, body).await,
        None => {
            let mut st = shard.state.borrow_mut();
            if let Some(p) = st.conns.get_mut(id).and_then(|c| c.poll.as_deref_mut()) {
                p.get = false;
            }
            close(&mut st, id, CloseReason::ClientClosed, false, shard.shared.now());
            false
        }
    }
}

/// Writes a GET's answer.
async fn respond(shard: &Shard, wait: &mut Waiting, body: Vec<u8>) -> bool {
    let (stream, id, keep) = (&mut wait.stream, wait.id, wait.keep);
    let resp = with_cors(http::response_bytes(200, PAYLOAD_TYPE, &body, keep), wait.cors.as_deref());
    drop(body);
    shard.metrics().add(Counter::BytesOut, resp.len() as u64);
    if wire::write_all(stream, &resp).await.is_err() {
        // The packets taken out of the queue are lost with this response: end the session
        // rather than let the client believe it has them all.
        let mut st = shard.state.borrow_mut();
        close(&mut st, id, CloseReason::TransportError, true, shard.shared.now());
        return false;
    }
    keep
}

/// The waiting GET's poll: `Ready` with the payload to answer.
fn next_payload(shard: &Shard, id: ConnId, cx: &mut Context<'_>) -> Poll<Vec<u8>> {
    let mut st = shard.state.borrow_mut();
    let Some(c) = st.conns.get_mut(id) else {
        return Poll::Ready(vec![engineio::kind::CLOSE]);
    };
    let Some(p) = c.poll.as_deref_mut() else {
        // Upgraded meanwhile: the client waits for this answer before switching.
        return Poll::Ready(vec![engineio::kind::NOOP]);
    };
    if let Some(reason) = c.close {
        let mut body = Vec::new();
        if !c.close_now {
            take_payload(c, &mut body);
        }
        engineio::append_text(&mut body, &[engineio::kind::CLOSE]);
        crate::session::retire(&mut st, id, reason, shard.shared.now());
        return Poll::Ready(body);
    }
    if !c.outbox.is_empty() {
        p.get = false;
        let mut body = Vec::with_capacity(c.out_bytes);
        take_payload(c, &mut body);
        return Poll::Ready(body);
    }
    if p.noop {
        p.noop = false;
        p.get = false;
        return Poll::Ready(vec![engineio::kind::NOOP]);
    }
    match &c.waker {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => c.waker = Some(cx.waker().clone()),
    }
    Poll::Pending
}

/// Moves every queued frame of `c` into a long-polling payload.
fn take_payload(c: &mut ConnEntry, body: &mut Vec<u8>) {
    for frame in c.outbox.drain(..) {
        for (op, payload) in ws::server_frames(&frame) {
            match op {
                OpKind::Text => engineio::append_text(body, payload),
                OpKind::Binary => engineio::append_binary(body, payload),
                // WebSocket control frames mean nothing on this transport.
                _ => {}
            }
        }
    }
    c.outbox = Default::default();
    c.out_bytes = 0;
    c.head_off = 0;
}

/// A POST: reads the body (`buf` holds what already arrived after the head; the body is
/// taken out of it) and hands its packets to the session. True if the connection may
/// carry another request.
pub(crate) async fn post(
    shard: &Shard,
    stream: &mut TcpStream,
    req: &Request,
    id: ConnId,
    buf: &mut Vec<u8>,
) -> bool {
    let cors = cors(shard, req);
    shard.metrics().inc(Counter::PollingRequests);
    let max = shard.shared.config.max_payload;
    let admitted = {
        let mut st = shard.state.borrow_mut();
        let now = shard.shared.now();
        let refuse = |st: &mut State, reason, resp| {
            close(st, id, reason, false, now);
            Err(resp)
        };
        match st.conns.get_mut(id).map(|c| c.poll.as_deref_mut()) {
            None => Err(unknown_sid(shard)),
            Some(None) => Err(upgraded()),
            Some(Some(p)) if p.post => refuse(
                &mut st,
                CloseReason::ProtocolError,
                http::engineio_error(3, "Bad request", "overlapping POST requests for one session"),
            ),
            Some(Some(p)) => match req.content_length {
                _ if req.chunked || req.bad_length => refuse(
                    &mut st,
                    CloseReason::ProtocolError,
                    http::engineio_error(3, "Bad request", "send the payload with one valid Content-Length"),
                ),
                None => refuse(
                    &mut st,
                    CloseReason::ProtocolError,
                    http::engineio_error_with(411, 3, "Length required", "a POST needs Content-Length"),
                ),
                Some(len) if len > max => refuse(
                    &mut st,
                    CloseReason::PayloadTooLarge,
                    http::engineio_error_with(
                        413,
                        3,
                        "Payload too large",
                        &format!("the body is {len} bytes; maxPayload is {max}"),
                    ),
                ),
                Some(len) => {
                    p.post = true;
                    Ok(len)
                }
            },
        }
    };
    let len = match admitted {
        Ok(len) => len,
        Err(resp) => {
            // The body was not read: the connection cannot carry another request.
            let _ = wire::write_all(stream, &with_cors(resp, cors.as_deref())).await;
            return false;
        }
    };
    let timeout = Duration::from_millis(shard.shared.config.handshake_timeout_ms);
    let complete = wire::read_to(shard, stream, buf, len, timeout).await;
    let now = shard.shared.now();
    let result = {
        let mut st = shard.state.borrow_mut();
        if let Some(p) = st.conns.get_mut(id).and_then(|c| c.poll.as_deref_mut()) {
            p.post = false;
        }
        if !complete {
            close(&mut st, id, CloseReason::TransportError, false, now);
            return false;
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        match deliver(&mut st, id, &body, max, now) {
            Ok(()) => Ok(()),
            // A client saying goodbye is no error.
            Err(CloseReason::ClientDisconnect) => {
                close(&mut st, id, CloseReason::ClientDisconnect, false, now);
                Ok(())
            }
            Err(reason) => {
                close(&mut st, id, reason, false, now);
                Err(reason)
            }
        }
    };
    let resp = match result {
        Ok(()) => http::response_bytes(200, "text/html", b"ok", req.keep_alive),
        Err(reason) => {
            http::engineio_error(3, "Bad request", &format!("the session is closed: {}", reason.as_str()))
        }
    };
    let resp = with_cors(resp, cors.as_deref());
    wire::write_all(stream, &resp).await.is_ok() && result.is_ok() && req.keep_alive
}

/// Hands the packets of one POST body to the session's Engine.IO reader.
fn deliver(st: &mut State, id: ConnId, body: &[u8], max: usize, now: u64) -> Result<(), CloseReason> {
    let text = std::str::from_utf8(body).map_err(|_| CloseReason::MalformedPacket)?;
    let Some(mut inb) =
        st.conns.get_mut(id).and_then(|c| c.poll.as_deref_mut()).map(|p| std::mem::take(&mut p.inbound))
    else {
        return Ok(());
    };
    let mut result = Ok(());
    for packet in engineio::decode_payload(text) {
        result = match packet {
            Ok(PayloadPacket::Text(t)) => crate::inbound::on_text(st, id, &mut inb, t, max, now),
            Ok(PayloadPacket::Binary(b)) => crate::inbound::on_binary(st, id, &mut inb, &b, now),
            Err(_) => Err(CloseReason::MalformedPacket),
        };
        if result.is_err() {
            break;
        }
    }
    if let Some(p) = st.conns.get_mut(id).and_then(|c| c.poll.as_deref_mut()) {
        p.inbound = inb;
    }
    result
}
