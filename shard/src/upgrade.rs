//! The upgrade of a long-polling session to WebSocket (Engine.IO v4): the client opens a
//! WebSocket naming the session id, probes it (`2probe` -> `3probe`) while polling goes
//! on, then sends `5`; from then on the session's frames go over the WebSocket, the
//! waiting GET (if any) is answered with a noop, and the session id is refused on
//! polling and on any other WebSocket.
//!
//! Runs on the shard that owns the session (`conn.rs` hands the request over first). The
//! probe does not hold the session: if it closes meanwhile, the probe fails and the
//! WebSocket is closed.

use std::time::{Duration, Instant};

use glommio::net::TcpStream;
use shardgate_io::engineio;
use shardgate_io::http::{self, Request};
use shardgate_io::packet;
use shardgate_io::ws::{self, close_code, OpKind, Role};
use tracing::debug;

use crate::ids::ConnId;
use crate::local::Shard;
use crate::metrics::Counter;
use crate::state::conns::Inbound;
use crate::wire;

/// How long a probing WebSocket may take to complete the upgrade (the reference
/// server's `upgradeTimeout`).
pub(crate) const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// Refuses a WebSocket for session `id` unless it is on polling and not being probed;
/// marks it probed otherwise.
pub(crate) fn admit(shard: &Shard, id: ConnId) -> Result<(), Vec<u8>> {
    let mut st = shard.state.borrow_mut();
    match st.conns.get_mut(id).map(|c| (c.close.is_some(), c.poll.as_deref_mut())) {
        None | Some((true, _)) => Err(crate::polling::unknown_sid(shard)),
        Some((_, None)) => Err(http::engineio_error(3, "Bad request", "the session is already on websocket")),
        Some((_, Some(p))) if p.probing => {
            Err(http::engineio_error(3, "Bad request", "an upgrade of this session is already being probed"))
        }
        Some((_, Some(p))) => {
            p.probing = true;
            Ok(())
        }
    }
}

/// Completes the upgrade of session `id` (admitted by [`admit`]) on `stream`; `rbuf`
/// holds bytes that followed the request head. Returns the stream, the bytes that
/// followed the upgrade packet and the session's reader state, ready for the WebSocket
/// loop; `None` if the probe failed (the WebSocket is closed, polling goes on).
pub(crate) async fn probe(
    shard: &Shard,
    mut stream: TcpStream,
    req: &Request,
    id: ConnId,
    mut rbuf: Vec<u8>,
) -> Option<(TcpStream, Vec<u8>, Inbound)> {
    let hello = http::upgrade_response(req.ws_key.as_deref().unwrap_or_default());
    let outcome = if wire::write_all(&mut stream, &hello).await.is_ok() {
        exchange(shard, &mut stream, id, &mut rbuf).await
    } else {
        None
    };
    match outcome {
        Some(inbound) => Some((stream, rbuf, inbound)),
        None => {
            if let Some(p) = shard.state.borrow_mut().conns.get_mut(id).and_then(|c| c.poll.as_deref_mut()) {
                p.probing = false;
            }
            debug!(shard = shard.id, "upgrade probe failed; the session stays on polling");
            let _ =
                wire::write_all(&mut stream, &ws::close_frame(close_code::POLICY, "upgrade failed")).await;
            None
        }
    }
}

/// The probe exchange; the session's reader state once `5` arrived.
async fn exchange(shard: &Shard, stream: &mut TcpStream, id: ConnId, rbuf: &mut Vec<u8>) -> Option<Inbound> {
    let deadline = Instant::now() + UPGRADE_TIMEOUT;
    let max = shard.shared.config.max_payload;
    loop {
        while let Some((frame, used)) = ws::decode_frame(rbuf, max, Role::Server).ok()? {
            let payload = &rbuf[frame.payload.clone()];
            match frame.op {
                OpKind::Text if frame.fin => {
                    match engineio::decode(std::str::from_utf8(payload).ok()?).ok()? {
                        engineio::Packet::Ping("probe") => {
                            let pong = packet::server_frame(packet::pong("probe").as_bytes());
                            wire::write_all(stream, &pong).await.ok()?;
                            // Let the waiting GET go, so the client can pause polling.
                            let mut st = shard.state.borrow_mut();
                            let c = st.conns.get_mut(id)?;
                            c.poll.as_deref_mut()?.noop = true;
                            c.wake();
                        }
                        engineio::Packet::Upgrade => {
                            rbuf.drain(..used);
                            return switch(shard, id);
                        }
                        _ => return None,
                    }
                }
                OpKind::Ping => {
                    let mut pong = Vec::with_capacity(payload.len() + 2);
                    ws::encode_frame(OpKind::Pong, payload, &mut pong);
                    wire::write_all(stream, &pong).await.ok()?;
                }
                OpKind::Pong => {}
                _ => return None,
            }
            rbuf.drain(..used);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || shard.state.borrow().conns.get(id).is_none() {
            return None;
        }
        match wire::read_some(shard, stream, rbuf, left).await {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
    }
}

/// The session moves to WebSocket: polling state dropped, the waiting GET woken (it
/// answers a noop), the reader state handed to the WebSocket loop.
fn switch(shard: &Shard, id: ConnId) -> Option<Inbound> {
    let mut st = shard.state.borrow_mut();
    let c = st.conns.get_mut(id)?;
    if c.close.is_some() {
        return None;
    }
    let poll = c.poll.take()?;
    c.wake();
    let m = shard.metrics();
    m.dec(Counter::PollingOpen);
    m.inc(Counter::Upgrades);
    Some(poll.inbound)
}
