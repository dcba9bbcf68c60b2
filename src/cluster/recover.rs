//! Connection state recovery on the bridge (`docs/recovery.md`).
//!
//! * **Logged messages.** With recovery on, room and 1:1 messages are published by Redis
//!   scripts that give each its sequence number (`S<seq> <envelope>` payloads). They come
//!   back on the pub/sub connection in sequence order, to this node too, and are delivered
//!   from there with the sequence appended as the event's last argument (the client's
//!   offset): [`on_room`], [`hold_user`] (1:1 messages are delivered by `pubsub.rs`).
//! * **Restoring a session.** A reconnecting socket's claim goes through three steps:
//!   SESSION_READ (is the session this user's, which rooms), the room channels subscribed
//!   (a claim waits for their confirmations), then RESUME (everything logged after the
//!   offset, and the socket registered). Messages arriving meanwhile are held for the
//!   claim (`resume.rs`) and follow the replay. The reply comes on the command
//!   connection while pushes come on the pub/sub one, so the session is handed to the
//!   shard only once RESUME's marker (published last by the script) has come through
//!   the pub/sub connection as well: every push up to the replay has been seen by then.
//!   [`on_read`], [`on_subscribed`], [`plan_ready`], [`on_resumed`], [`on_marker`].

use shardgate_io::envelope::{self, Envelope, EnvelopeError};
use shardgate_io::packet;
use shardgate_io::resp::{self, Reply};
use shardgate_shard::metrics::Counter;
use shardgate_shard::msg::{BridgeMsg, Frame, Key, Restored, ShardMsg, SocketRef};
use std::sync::Arc;
use tracing::debug;

use super::batch::{Batch, Then};
use super::keys::{from_redis_id, redis_id, Keys};
use super::plan::{plan, register, registration, Registration};
use super::resume::Claim;
use super::scripts;
use super::state::Cluster;

/// The client frame of logged envelope `env` (a room or a 1:1 message) with offset `seq`.
pub fn logged_frame(seq: u64, env: &[u8]) -> Option<Frame> {
    let frame = match env.first()? {
        b'R' => envelope::decode_logged_room(env).ok()?.frame,
        _ => match envelope::decode(env).ok()? {
            Envelope::Deliver { frame, .. } => frame,
            Envelope::Ack { .. } => return None,
        },
    };
    packet::with_offset(frame, seq).map(Frame::from)
}

/// An offline queue entry as a client frame: a logged 1:1 payload (queued by
/// ROUTE_LOGGED) gets its offset; anything else is a frame already.
pub fn queued_frame(entry: &[u8]) -> Option<Frame> {
    match envelope::split_logged(entry) {
        Ok(Some((seq, env))) => logged_frame(seq, env),
        Ok(None) => Some(Frame::from(entry)),
        Err(_) => None,
    }
}

/// A logged room message from the room's channel: to every local member but its sender,
/// and held for the claims of sessions in the room.
pub fn on_room(c: &Cluster, room: Key, seq: u64, env: &[u8]) -> Result<(), EnvelopeError> {
    let logged = envelope::decode_logged_room(env)?;
    let Some(frame) = packet::with_offset(logged.frame, seq).map(Frame::from) else {
        return Err(EnvelopeError::Truncated("frame"));
    };
    let except = (logged.origin_server == c.me()).then(|| SocketRef::from_remote(logged.origin));
    if !c.claims.borrow().is_empty() {
        c.claims.borrow_mut().hold_room(&room, seq, &frame);
    }
    c.shared.mesh.broadcast(|| ShardMsg::RoomDeliver { room: room.clone(), frame: frame.clone(), except });
    Ok(())
}

/// Holds logged 1:1 message `seq` for the claims of `user`; true if any held it.
pub fn hold_user(c: &Cluster, user: &str, seq: u64, frame: &Frame) -> bool {
    !c.claims.borrow().is_empty() && c.claims.borrow_mut().hold_user(user, seq, frame)
}

/// Tells the claiming socket there is nothing to restore (it connects as a new session).
fn refuse(c: &Cluster, socket: SocketRef, why: &[u8]) {
    let counter = match why {
        b"other_user" => Counter::RecoveryOtherUser,
        b"trimmed" => Counter::RecoveryTrimmed,
        _ => Counter::RecoveryUnknown,
    };
    c.m().inc(counter);
    c.shared.mesh.send(socket.shard, ShardMsg::Resumed { conn: socket.conn, session: None });
}

/// The SESSION_READ reply: open the claim on the session's rooms (subscribing their
/// channels where this node has no member yet), or refuse it.
#[allow(clippy::too_many_arguments)]
pub fn on_read(
    c: &Cluster,
    sid: String,
    socket: SocketRef,
    user: Key,
    pid: Arc<str>,
    offset: Option<u64>,
    reply: Reply,
    followups: &mut Batch,
) {
    let items = match reply {
        Reply::Array(items) => items,
        _ => return refuse(c, socket, b"unknown"),
    };
    let status = items.first().and_then(resp::as_bytes).unwrap_or_default();
    if status != b"ok" {
        return refuse(c, socket, status);
    }
    let rooms: Vec<Key> = items[1..]
        .iter()
        .filter_map(resp::as_bytes)
        .filter_map(|r| std::str::from_utf8(r).ok().and_then(from_redis_id))
        .collect();
    let me = c.me();
    let mut waiting = std::collections::HashSet::new();
    for room in &rooms {
        let channel = c.room_channel(room);
        let first = c.mirror.borrow().members(room) == 0;
        let join = BridgeMsg::RoomJoin { room: room.clone(), sid: sid.clone(), socket, ack: None };
        c.mirror.borrow_mut().observe(&join);
        followups.cmd(&["SADD", &c.keys.room(room), &Keys::room_member(me, &sid)], Then::Ignore);
        let mut pending = c.pending_subs.borrow_mut();
        if first && !pending.contains_key(&channel) {
            followups.cmd(&["SADD", &c.keys.server_rooms(me), &redis_id(room)], Then::Ignore);
            c.subscribe(true, &channel);
            pending.entry(channel.clone()).or_default();
        }
        if pending.contains_key(&channel) {
            waiting.insert(channel);
        }
    }
    let ready = waiting.is_empty();
    let claim = Claim {
        socket,
        user,
        pid,
        offset,
        rooms,
        waiting,
        sent: false,
        cancelled: false,
        held: Vec::new(),
        replay: None,
        marked: false,
    };
    c.claims.borrow_mut().insert(sid.clone(), claim);
    if ready {
        send_resume(c, &sid, followups);
    }
}

/// `channel` is subscribed: claims waiting for it may be ready.
pub fn on_subscribed(c: &Cluster, channel: &str) {
    if !c.claims.borrow().is_empty() {
        c.claims.borrow_mut().subscribed(channel);
    }
}

/// Plans RESUME for every claim whose channels are all subscribed, and completes the
/// claims whose marker arrived.
pub fn plan_ready(c: &Cluster, batch: &mut Batch) {
    let ready = c.claims.borrow_mut().take_ready();
    for sid in ready {
        send_resume(c, &sid, batch);
    }
    let markers = std::mem::take(&mut *c.markers.borrow_mut());
    for sid in markers {
        on_marker(c, &sid, batch);
    }
}

fn send_resume(c: &Cluster, sid: &str, batch: &mut Batch) {
    let (Some(r), Some(claim)) = (
        c.settings.recovery,
        c.claims.borrow_mut().get_mut(sid).map(|cl| {
            cl.sent = true;
            (cl.user.clone(), cl.pid.clone(), cl.offset)
        }),
    ) else {
        return;
    };
    let (user, pid, offset) = claim;
    let offset = offset.map(|o| o.to_string()).unwrap_or_default();
    let live = r.live_ttl_ms.to_string();
    let then = Then::Resume { sid: sid.to_string() };
    if c.sharded.get() {
        // The recovery slot's half; the registration follows its reply (`on_resumed`).
        let (k1, k2, u) = (c.keys.session(&pid), c.keys.recovery_seq(), redis_id(&user));
        let args =
            ["EVAL", scripts::RESUME_LOG, "2", &k1, &k2, c.keys.prefix(), c.me(), sid, &u, &offset, &live];
        batch.cmd(&args, then);
        return;
    }
    registration(c, batch, scripts::RESUME, &user, sid, &[&pid, &offset, &live], then);
}

/// Undoes a claim's room memberships on this node.
fn leave_rooms(c: &Cluster, sid: &str, claim: &Claim, batch: &mut Batch) {
    for room in &claim.rooms {
        let leave = BridgeMsg::RoomLeave { room: room.clone(), sid: sid.to_string(), forget: false };
        plan(c, leave, batch);
    }
}

/// The RESUME reply: the replay is kept with the claim until the script's marker has
/// come through the pub/sub connection too ([`on_marker`]); a refusal undoes the claim.
pub fn on_resumed(c: &Cluster, sid: String, reply: Reply, followups: &mut Batch) {
    let items = match reply {
        Reply::Array(items) => items,
        _ => Vec::new(),
    };
    let status = items.first().and_then(resp::as_bytes).unwrap_or(b"unknown");
    if status != b"ok" {
        let Some(claim) = c.claims.borrow_mut().remove(&sid) else { return };
        leave_rooms(c, &sid, &claim, followups);
        if !claim.cancelled {
            refuse(c, claim.socket, status);
        }
        return;
    }
    let text = |i: usize| items.get(i).and_then(resp::as_bytes).and_then(|b| std::str::from_utf8(b).ok());
    let upto: u64 = text(1).and_then(|t| t.parse().ok()).unwrap_or(0);
    let mut frames = Vec::with_capacity(items.len().saturating_sub(3) / 2);
    for pair in items.get(3..).unwrap_or_default().chunks(2) {
        let seq =
            pair.first().and_then(resp::as_bytes).and_then(|b| std::str::from_utf8(b).ok()?.parse().ok());
        match (seq, pair.get(1).and_then(resp::as_bytes)) {
            (Some(seq), Some(env)) => frames.extend(logged_frame(seq, env)),
            _ => debug!("a replay entry that is not (seq, envelope)"),
        }
    }
    let marked = {
        let mut claims = c.claims.borrow_mut();
        let Some(claim) = claims.get_mut(&sid) else { return };
        if c.sharded.get() {
            // On a Redis Cluster the registration is on the user's slot, after the replay
            // (the offline queue dropped: its messages are in the user's log).
            register(c, followups, &claim.user, &sid, claim.socket, Registration::Restored);
        }
        claim.replay = Some((upto, frames));
        if items.get(2) == Some(&Reply::Integer(1)) {
            c.persist_presence(&claim.user, true);
        }
        claim.marked
    };
    if marked {
        complete(c, sid, followups);
    }
}

/// RESUME's marker for socket `sid` arrived on the pub/sub connection.
fn on_marker(c: &Cluster, sid: &str, followups: &mut Batch) {
    let replied = {
        let mut claims = c.claims.borrow_mut();
        let Some(claim) = claims.get_mut(sid) else { return };
        claim.marked = true;
        claim.replay.is_some()
    };
    if replied {
        complete(c, sid.to_string(), followups);
    }
}

/// Both RESUME's reply and its marker are in: the restored session goes to the socket's
/// shard, the replay then what was held after it. Every later push has a later sequence
/// and reaches the socket as a member.
fn complete(c: &Cluster, sid: String, followups: &mut Batch) {
    let Some(mut claim) = c.claims.borrow_mut().remove(&sid) else { return };
    let Some((upto, mut frames)) = claim.replay.take() else { return };
    let up = BridgeMsg::SocketUp {
        user: claim.user.clone(),
        sid: sid.clone(),
        socket: claim.socket,
        pid: Some(claim.pid.clone()),
    };
    c.mirror.borrow_mut().observe(&up);
    if claim.cancelled {
        // The socket closed while RESUME ran: unregister what it registered.
        leave_rooms(c, &sid, &claim, followups);
        let down = BridgeMsg::SocketDown { user: claim.user, sid, shard: claim.socket.shard, keep: true };
        plan(c, down, followups);
        return;
    }
    frames.extend(claim.held.into_iter().filter(|(seq, _)| *seq > upto).map(|(_, f)| f));
    let session = Restored { user: claim.user, pid: claim.pid, rooms: claim.rooms, frames };
    c.shared
        .mesh
        .send(claim.socket.shard, ShardMsg::Resumed { conn: claim.socket.conn, session: Some(session) });
}

/// The Redis connection is gone: every open claim becomes a new session (its shard
/// registers it again, as any socket, once Redis is back).
pub fn abandon(c: &Cluster) {
    let sids = c.claims.borrow().sids();
    for sid in sids {
        let Some(claim) = c.claims.borrow_mut().remove(&sid) else { continue };
        for room in &claim.rooms {
            let leave = BridgeMsg::RoomLeave { room: room.clone(), sid: sid.clone(), forget: false };
            c.mirror.borrow_mut().observe(&leave);
        }
        if !claim.cancelled {
            c.shared
                .mesh
                .send(claim.socket.shard, ShardMsg::Resumed { conn: claim.socket.conn, session: None });
        }
    }
}
