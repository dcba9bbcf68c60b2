//! Engine.IO packets from a client, whichever transport carried them: a WebSocket message
//! (`conn.rs`) or one packet of a long-polling POST body (`polling.rs`). Pings, pongs and
//! close are answered here; Socket.IO packets (with their binary attachments, which may
//! arrive in later messages) go to the session.

use shardgate_io::{engineio, packet, socketio};
use tracing::debug;

use crate::ids::ConnId;
use crate::metrics::CloseReason;
use crate::state::conns::{Inbound, PendingBinary};
use crate::state::State;

/// One binary message: the next attachment of the pending binary packet.
pub(crate) fn on_binary(
    st: &mut State,
    id: ConnId,
    inb: &mut Inbound,
    bytes: &[u8],
    now: u64,
) -> Result<(), CloseReason> {
    let Some(pending) = inb.binary.as_mut() else {
        return Err(CloseReason::MalformedPacket);
    };
    pending.attachments.push(bytes.to_vec());
    if pending.attachments.len() == pending.packet.attachments {
        if let Some(p) = inb.binary.take() {
            crate::session::on_packet(st, id, &mut inb.token, p.packet, p.attachments, now)?;
        }
    }
    Ok(())
}

/// One text packet of at most `max_payload` bytes.
pub(crate) fn on_text(
    st: &mut State,
    id: ConnId,
    inb: &mut Inbound,
    text: &str,
    max_payload: usize,
    now: u64,
) -> Result<(), CloseReason> {
    if text.len() > max_payload {
        return Err(CloseReason::PayloadTooLarge);
    }
    match engineio::decode(text).map_err(|_| CloseReason::MalformedPacket)? {
        engineio::Packet::Pong(_) => {
            if let Some(c) = st.conns.get_mut(id) {
                c.pong_deadline = 0;
            }
        }
        engineio::Packet::Ping(data) => {
            let pong = packet::server_frame(packet::pong(data).as_bytes());
            st.push_new(id, pong);
        }
        engineio::Packet::Close => return Err(CloseReason::ClientDisconnect),
        engineio::Packet::Message(payload) => {
            if inb.binary.is_some() {
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
                inb.binary = Some(Box::new(PendingBinary { packet, attachments: Vec::new() }));
                return Ok(());
            }
            crate::session::on_packet(st, id, &mut inb.token, packet, Vec::new(), now)?;
        }
        engineio::Packet::Upgrade | engineio::Packet::Noop => {}
        engineio::Packet::Open(_) => return Err(CloseReason::MalformedPacket),
    }
    Ok(())
}
