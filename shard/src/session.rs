//! Socket.IO sessions on the default namespace: CONNECT with auth, then the chat events.
//!
//! Runs synchronously on the shard's state for one packet at a time. Every change goes
//! through the state's owners (`st.rooms`, `st.users`, `st.watchers`, `st.pending`, the
//! session in `st.conns`); anything that concerns another shard or node is a
//! [`Dispatch`](crate::state::router::Dispatch) decided by `st.router`.

use serde_json::{json, Value};
use shardgate_io::packet;
use shardgate_io::socketio::{Packet, PacketType};
use tracing::{debug, info};

use crate::auth::Perms;
use crate::history::{self, HistoryQuery};
use crate::ids::{key, key_id, sid, ConnId, Frame, Key};
use crate::metrics::{CloseReason, Counter};
use crate::msg::DeliveryStatus;
use crate::record::{self, Receipt};
use crate::shared::wall_ms;
use crate::state::conns::{ConnEntry, Session};
use crate::state::members::push_small;
use crate::state::pending::Pending;
use crate::state::router::Dispatch;
use crate::state::{event_frame, State};

/// Presence subscriptions one socket may hold.
const MAX_WATCHED: usize = 1000;

/// Handles one Socket.IO packet from connection `id`.
pub(crate) fn on_packet(
    st: &mut State,
    id: ConnId,
    upgrade_token: &mut Option<String>,
    p: Packet,
    attachments: Vec<Vec<u8>>,
    now: u64,
) -> Result<(), CloseReason> {
    let connected = st.conns.session(id).is_some();
    match p.kind {
        PacketType::Connect => on_connect(st, id, upgrade_token, p, connected, now),
        PacketType::Disconnect if p.nsp == "/" => {
            if let Some(s) = st.conns.session_mut(id) {
                s.goodbye = true;
            }
            Err(CloseReason::ClientDisconnect)
        }
        PacketType::Disconnect => Ok(()),
        PacketType::Event | PacketType::BinaryEvent if connected && p.nsp == "/" => {
            on_event(st, id, p, attachments, now)
        }
        // Nothing but CONNECT is processed before auth, and no other namespace exists.
        PacketType::Event | PacketType::BinaryEvent => Err(CloseReason::MalformedPacket),
        PacketType::Ack | PacketType::BinaryAck => Ok(()),
        PacketType::ConnectError => Err(CloseReason::MalformedPacket),
    }
}

fn connect_error(nsp: &str, message: &str, code: &str) -> Frame {
    packet::server_frame(packet::connect_error(nsp, message, code).as_bytes()).into()
}

fn on_connect(
    st: &mut State,
    id: ConnId,
    upgrade_token: &mut Option<String>,
    p: Packet,
    connected: bool,
    now: u64,
) -> Result<(), CloseReason> {
    if p.nsp != "/" {
        st.push(id, &connect_error(&p.nsp, "Invalid namespace", "invalid_namespace"));
        st.close(id, CloseReason::InvalidNamespace, false, now);
        return Ok(());
    }
    if connected {
        return Err(CloseReason::MalformedPacket);
    }
    let token = p
        .data
        .as_ref()
        .and_then(|d| d.get("token"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| upgrade_token.take());
    let verified = match token {
        Some(t) => st.shared.verifier.verify(&t),
        None => Err(crate::auth::AuthError::Missing),
    };
    let identity = match verified {
        Ok(i) => i,
        Err(e) => {
            st.metrics().inc(Counter::AuthFailures);
            tracing::info!(shard = st.shard, "auth refused: {e}");
            st.push(id, &connect_error("/", &e.to_string(), "auth_failed"));
            st.close(id, CloseReason::AuthFailed, false, now);
            return Ok(());
        }
    };
    *upgrade_token = None;
    let mut identity = identity;
    identity.tenant = st.tenant(identity.tenant);
    let user_key = key(&identity.tenant, &identity.user);
    let burst = st.shared.config.event_burst as f64;
    if let Some(c) = st.conns.get_mut(id) {
        c.connect_deadline = 0;
        c.session = Some(Box::new(Session {
            identity,
            user_key: user_key.clone(),
            rooms: Vec::new(),
            watching: Vec::new(),
            typing: Vec::new(),
            tokens: burst,
            refilled: now,
            strikes: 0,
            pid: None,
            goodbye: false,
            registered: false,
        }));
    }
    st.metrics().inc(Counter::Sessions);
    if let Some(s) = st.conns.session(id) {
        socket_event(st, id, s, "connect", json!({}));
    }
    let recovery = st.shared.config.recovery;
    let claim = if recovery { recovery_claim(p.data.as_ref()) } else { None };
    if let Some((pid, offset)) = claim {
        // A reconnect: the bridge restores the session or says there is none
        // (`ShardMsg::Resumed`); the socket takes no messages until then.
        if let Some(s) = st.conns.session_mut(id) {
            s.pid = Some(pid.clone());
        }
        let d = st.router.resume(user_key, st.socket(id), pid, offset);
        st.dispatch(d);
        return Ok(());
    }
    let pid = recovery.then(crate::ids::new_pid);
    if let Some(s) = st.conns.session_mut(id) {
        s.pid = pid.clone();
        s.registered = true;
    }
    // The CONNECT is answered when the user's directory (home shard, or the cluster
    // registry) has the socket: `ShardMsg::Registered`. A connected client is reachable.
    st.users.add(&user_key, id);
    let d = st.router.user_up(user_key, st.socket(id), pid);
    st.dispatch(d);
    Ok(())
}

/// The recovery claim in a CONNECT's auth payload: `pid` (as this server makes them) and
/// `offset` (the last argument of the last event the client processed, a decimal
/// string; absent when it processed none). Anything else is no claim: a new session.
fn recovery_claim(auth: Option<&Value>) -> Option<(std::sync::Arc<str>, Option<u64>)> {
    let auth = auth?;
    let pid = auth.get("pid")?.as_str().filter(|p| crate::ids::valid_pid(p))?;
    let offset = match auth.get("offset") {
        None | Some(Value::Null) => None,
        Some(Value::String(o)) => Some(o.parse::<u64>().ok()?),
        Some(_) => return None,
    };
    Some((pid.into(), offset))
}

/// Replies to an event: the ack (when asked for) with `body`.
fn reply(st: &mut State, id: ConnId, ack: Option<u64>, body: &Value) {
    if let Some(a) = ack {
        st.push_new(id, packet::ack_frame(a, body));
    }
}

/// Refuses an event: an `error` event, and the ack (when asked for) with the same error.
fn refuse(st: &mut State, id: ConnId, ack: Option<u64>, event: &str, code: &str, message: &str) {
    let body = json!({ "ok": false, "code": code, "message": message, "event": event });
    st.push_new(id, packet::event_frame("error", &body));
    reply(st, id, ack, &body);
}

/// Takes one token from the connection's bucket; false when the event must be refused.
fn admit(st: &mut State, id: ConnId, now: u64) -> Result<bool, CloseReason> {
    let cfg = &st.shared.config;
    let (rate, burst) = (cfg.events_per_second as f64, cfg.event_burst as f64);
    let Some(s) = st.conns.session_mut(id) else {
        return Ok(false);
    };
    s.tokens = (s.tokens + (now.saturating_sub(s.refilled)) as f64 * rate / 1000.0).min(burst);
    s.refilled = now;
    if s.tokens >= 1.0 {
        s.tokens -= 1.0;
        s.strikes = 0;
        return Ok(true);
    }
    s.strikes += 1;
    if s.strikes as f64 > 2.0 * burst {
        return Err(CloseReason::RateLimited);
    }
    Ok(false)
}

fn on_event(
    st: &mut State,
    id: ConnId,
    p: Packet,
    attachments: Vec<Vec<u8>>,
    now: u64,
) -> Result<(), CloseReason> {
    st.metrics().inc(Counter::Events);
    let name = p.event_name().unwrap_or_default().to_string();
    if !admit(st, id, now)? {
        st.metrics().inc(Counter::RateLimited);
        refuse(st, id, p.ack_id, &name, "rate_limited", "too many events; slow down");
        return Ok(());
    }
    let args = p.event_args();
    let ack = p.ack_id;
    let perms = st.conns.session(id).map(|s| s.identity.perms).unwrap_or(Perms(0));
    let need = match name.as_str() {
        "message:send" => Perms::SEND,
        "join_room" => Perms::JOIN,
        "presence:subscribe" => Perms::PRESENCE,
        "typing:start" | "typing:stop" => Perms::TYPING,
        "leave_room" | "presence:unsubscribe" | "history:fetch" => Perms(0),
        _ => {
            refuse(st, id, ack, &name, "unknown_event", "this server does not handle that event");
            return Ok(());
        }
    };
    if !perms.allows(need) {
        refuse(st, id, ack, &name, "forbidden", "the token's permissions do not allow this event");
        return Ok(());
    }
    match name.as_str() {
        "join_room" => join_room(st, id, ack, args),
        "leave_room" => leave_room(st, id, ack, args),
        "message:send" => send_message(st, id, ack, args, attachments, now),
        "typing:start" => typing(st, id, ack, args, true, now),
        "typing:stop" => typing(st, id, ack, args, false, now),
        "presence:subscribe" => presence(st, id, ack, args, true),
        "presence:unsubscribe" => presence(st, id, ack, args, false),
        "history:fetch" => fetch_history(st, id, ack, args),
        _ => {}
    }
    Ok(())
}

/// A valid id: non-empty, bounded, no control characters.
fn valid_id(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// The room named by `args[0]`: a string, or `{room}` / `{roomId}`.
fn room_arg(args: &[Value]) -> Option<&str> {
    match args.first()? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("room").or_else(|| o.get("roomId")).and_then(Value::as_str),
        _ => None,
    }
}

fn join_room(st: &mut State, id: ConnId, ack: Option<u64>, args: &[Value]) {
    let max_id = st.shared.config.max_id_len;
    let max_rooms = st.shared.config.max_rooms_per_socket;
    let Some(room) = room_arg(args).filter(|r| valid_id(r, max_id)).map(str::to_string) else {
        return refuse(
            st,
            id,
            ack,
            "join_room",
            "invalid_room",
            "room id must be a non-empty string of at most max_id_len bytes",
        );
    };
    let Some(s) = st.conns.session(id) else { return };
    let k = key(&s.identity.tenant, &room);
    let already = s.rooms.contains(&k);
    if !already && s.rooms.len() >= max_rooms {
        return refuse(
            st,
            id,
            ack,
            "join_room",
            "too_many_rooms",
            "this socket is in max_rooms_per_socket rooms already",
        );
    }
    if !already {
        if let Some(s) = st.conns.session_mut(id) {
            push_small(&mut s.rooms, k.clone());
        }
        st.rooms.add(&k, id);
        if let Some(s) = st.conns.session(id) {
            socket_event(st, id, s, "join", json!({ "room": room }));
            if let Some(pid) = s.pid.clone() {
                let d = st.router.session_room(pid, &k, true);
                st.dispatch(d);
            }
        }
        // Answered now on the embedded bus; in cluster mode by the bridge, once this
        // node receives the room's channel.
        match st.router.room_joined(&k, st.socket(id), ack) {
            Dispatch::Nothing => st.answer_join(id, &k, ack),
            d => st.dispatch(d),
        }
        return;
    }
    st.answer_join(id, &k, ack);
}

fn leave_room(st: &mut State, id: ConnId, ack: Option<u64>, args: &[Value]) {
    let Some(room) = room_arg(args).map(str::to_string) else {
        return refuse(st, id, ack, "leave_room", "invalid_room", "room id must be a string");
    };
    let Some(s) = st.conns.session(id) else { return };
    let k = key(&s.identity.tenant, &room);
    if !s.rooms.contains(&k) {
        return refuse(st, id, ack, "leave_room", "not_in_room", "this socket is not in that room");
    }
    stop_typing(st, id, &k);
    if let Some(s) = st.conns.session_mut(id) {
        s.rooms.retain(|r| *r != k);
    }
    st.rooms.remove(&k, id);
    st.push_new(id, packet::event_frame("room_left", &json!({ "room": room })));
    if let Some(pid) = st.conns.session(id).and_then(|s| s.pid.clone()) {
        let d = st.router.session_room(pid, &k, false);
        st.dispatch(d);
    }
    let d = st.router.room_left(&k, st.shard, id, true);
    st.dispatch(d);
    if let Some(s) = st.conns.session(id) {
        socket_event(st, id, s, "leave", json!({ "room": room }));
    }
    reply(st, id, ack, &json!({ "ok": true, "room": room }));
}

fn send_message(
    st: &mut State,
    id: ConnId,
    ack: Option<u64>,
    args: &[Value],
    attachments: Vec<Vec<u8>>,
    now: u64,
) {
    const EV: &str = "message:send";
    let max_id = st.shared.config.max_id_len;
    let Some(Value::Object(body)) = args.first() else {
        return refuse(st, id, ack, EV, "invalid_message", "expected {to | room, content, clientMsgId?}");
    };
    let to = body.get("to").and_then(Value::as_str);
    let room = body.get("room").and_then(Value::as_str);
    let content = match body.get("content") {
        None | Some(Value::Null) => return refuse(st, id, ack, EV, "invalid_message", "content is required"),
        Some(c) => c.clone(),
    };
    let client_msg_id = body.get("clientMsgId").cloned();
    let wants_receipt = body.get("persistedReceipt") == Some(&Value::Bool(true));
    let Some(s) = st.conns.session(id) else { return };
    let (tenant, from) = (s.identity.tenant.clone(), s.identity.user.clone());
    let msg_id = match st.ids.generate() {
        Ok(u) => u,
        Err(_) => ulid::Ulid::new(),
    };
    let ts = wall_ms();
    // Where it goes, and the conversation it belongs to (the Kafka key).
    let (target, conversation, payload) = match (to, room) {
        (Some(to), None) if valid_id(to, max_id) => {
            let payload =
                json!({ "id": msg_id.to_string(), "from": &*from, "to": to, "content": content, "ts": ts });
            (key(&tenant, to), record::dm_conversation(&from, to), payload)
        }
        (None, Some(room)) if valid_id(room, max_id) => {
            let k = key(&tenant, room);
            if !st.conns.session(id).map(|s| s.rooms.contains(&k)).unwrap_or(false) {
                return refuse(st, id, ack, EV, "not_in_room", "join the room before sending to it");
            }
            let payload = json!({ "id": msg_id.to_string(), "from": &*from, "room": room, "content": content, "ts": ts });
            (k, format!("room:{room}"), payload)
        }
        _ => {
            let why = "give exactly one of `to` (user id) or `room` (room id)";
            return refuse(st, id, ack, EV, "invalid_message", why);
        }
    };
    let frame: Frame = packet::binary_event_frames("message:new", &payload, &attachments).into();
    st.persist(|| {
        let receipt = wants_receipt.then_some(Receipt { shard: st.shard, conn: id, msg_id: msg_id.0 });
        let encoded: Vec<String> = attachments.iter().map(|a| data_encoding::BASE64.encode(a)).collect();
        record::message(&tenant, conversation, &payload, client_msg_id.as_ref(), &encoded, receipt)
    });
    if room.is_some() {
        st.metrics().inc(Counter::RoomMessages);
        if st.conns.session(id).is_some_and(|s| s.pid.is_some()) {
            // Recoverable: the cluster gives it its place in the order every member sees,
            // local members included, so it is delivered from there; the sender hears
            // `sent` once it is logged (or `sent` at the report timeout).
            let deadline = now + st.shared.config.delivery_report_timeout_ms;
            st.pending.insert(msg_id.0, Pending { conn: id, ack_id: ack, client_msg_id, deadline, to: None });
            let d = st.router.room_logged(&target, frame, msg_id.0, st.socket(id));
            st.dispatch(d);
            return;
        }
        st.deliver_room(&target, &frame, Some(id));
        st.broadcast_room(&target, &frame);
        let p = Pending { conn: id, ack_id: ack, client_msg_id, deadline: now, to: None };
        st.pending.insert(msg_id.0, p);
        st.resolve(msg_id.0, DeliveryStatus::Sent);
    } else {
        st.metrics().inc(Counter::DirectMessages);
        let deadline = now + st.shared.config.delivery_report_timeout_ms;
        let to = Some((target.clone(), from.clone()));
        st.pending.insert(msg_id.0, Pending { conn: id, ack_id: ack, client_msg_id, deadline, to });
        let d = st.router.direct(target, frame, msg_id.0, st.socket(id));
        st.dispatch(d);
    }
}

/// `history:fetch`: checked here, read by the history reader (`crate::history`), which
/// answers the ack later through the mesh.
fn fetch_history(st: &mut State, id: ConnId, ack: Option<u64>, args: &[Value]) {
    const EV: &str = "history:fetch";
    let Some(ack_id) = ack else {
        return refuse(st, id, ack, EV, "invalid_history", "history:fetch needs an acknowledgement callback");
    };
    let a = match history::parse_args(args, st.shared.config.max_id_len) {
        Ok(a) => a,
        Err((code, why)) => return refuse(st, id, ack, EV, code, why),
    };
    let Some(s) = st.conns.session(id) else { return };
    let conversation = match (&a.with, &a.room) {
        (Some(with), _) => record::dm_conversation(&s.identity.user, with),
        (None, Some(room)) => {
            if !s.rooms.contains(&key(&s.identity.tenant, room)) {
                return refuse(st, id, ack, EV, "not_in_room", "join the room to read its history");
            }
            format!("room:{room}")
        }
        (None, None) => return,
    };
    let Some(sink) = st.shared.history.clone() else {
        return refuse(st, id, ack, EV, "history_off", "this node has no message store (--mongodb)");
    };
    let q = HistoryQuery {
        shard: st.shard,
        conn: id,
        ack: ack_id,
        tenant: s.identity.tenant.clone(),
        conversation,
        before: a.before,
        limit: a.limit,
    };
    st.metrics().inc(Counter::HistoryQueries);
    if !sink.submit(q) {
        st.metrics().inc(Counter::HistoryBusy);
        refuse(st, id, ack, EV, "busy", "too many history reads in flight; retry shortly");
    }
}

/// A socket event record for session `s` of connection `id`.
fn socket_event(st: &State, id: ConnId, s: &Session, kind: &str, extra: Value) {
    st.persist(|| {
        let sid = sid(st.shard, id);
        record::socket_event(
            kind,
            &s.identity.tenant,
            &s.identity.user,
            &sid,
            &st.shared.server_id,
            extra,
            wall_ms(),
        )
    });
}

fn typing_frame(room: &str, user: &str, on: bool) -> Frame {
    event_frame("typing", &json!({ "room": room, "userId": user, "typing": on }))
}

fn typing(st: &mut State, id: ConnId, ack: Option<u64>, args: &[Value], on: bool, now: u64) {
    let ev = if on { "typing:start" } else { "typing:stop" };
    let Some(room) = room_arg(args).map(str::to_string) else {
        return refuse(st, id, ack, ev, "invalid_room", "expected {room}");
    };
    let ttl = st.shared.config.typing_ttl_ms;
    let Some(s) = st.conns.session(id) else { return };
    let k = key(&s.identity.tenant, &room);
    if !s.rooms.contains(&k) {
        return refuse(st, id, ack, ev, "not_in_room", "join the room first");
    }
    if !on {
        stop_typing(st, id, &k);
        return reply(st, id, ack, &json!({ "ok": true }));
    }
    let user = s.identity.user.clone();
    let Some(s) = st.conns.session_mut(id) else {
        return;
    };
    match s.typing.iter_mut().find(|(r, _)| *r == k) {
        Some((_, until)) => *until = now + ttl,
        None => {
            s.typing.push((k.clone(), now + ttl));
            let frame = typing_frame(&room, &user, true);
            st.deliver_room(&k, &frame, Some(id));
            st.broadcast_room(&k, &frame);
            let d = st.router.typing(&k, user, true);
            st.dispatch(d);
        }
    }
    reply(st, id, ack, &json!({ "ok": true }));
}

/// Ends a typing indicator of `id` in room `k`, telling the room.
pub(crate) fn stop_typing(st: &mut State, id: ConnId, k: &Key) {
    let Some(s) = st.conns.session_mut(id) else {
        return;
    };
    let Some(pos) = s.typing.iter().position(|(r, _)| r == k) else {
        return;
    };
    s.typing.swap_remove(pos);
    let user = s.identity.user.clone();
    let frame = typing_frame(key_id(k), &user, false);
    st.deliver_room(k, &frame, Some(id));
    st.broadcast_room(k, &frame);
    let d = st.router.typing(k, user, false);
    st.dispatch(d);
}

fn presence(st: &mut State, id: ConnId, ack: Option<u64>, args: &[Value], on: bool) {
    let ev = if on { "presence:subscribe" } else { "presence:unsubscribe" };
    let max_id = st.shared.config.max_id_len;
    let ids: Vec<String> = match args.first() {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Object(o)) => o
            .get("userIds")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    if ids.is_empty() || ids.iter().any(|u| !valid_id(u, max_id)) {
        return refuse(st, id, ack, ev, "invalid_users", "expected a non-empty array of user ids");
    }
    let Some(s) = st.conns.session(id) else { return };
    let tenant = s.identity.tenant.clone();
    if on && s.watching.len() + ids.len() > MAX_WATCHED {
        return refuse(st, id, ack, ev, "too_many_subscriptions", "a socket may watch at most 1000 users");
    }
    let socket = st.socket(id);
    for u in &ids {
        let k = key(&tenant, u);
        let Some(s) = st.conns.session_mut(id) else {
            return;
        };
        let watching = s.watching.contains(&k);
        if on && !watching {
            push_small(&mut s.watching, k.clone());
            st.watchers.add(&k, id);
            let d = st.router.watch(k, socket);
            st.dispatch(d);
        } else if !on && watching {
            s.watching.retain(|w| *w != k);
            unwatch(st, &k, id);
        }
    }
    reply(st, id, ack, &json!({ "ok": true }));
}

fn unwatch(st: &mut State, k: &Key, id: ConnId) {
    st.watchers.remove(k, id);
    let d = st.router.unwatch(k.clone(), st.shard);
    st.dispatch(d);
}

/// Forgets connection `id` for good: removes it from the shard, undoes what its session
/// registered and counts the close under `reason`. Returns the entry (with the frames
/// still queued, for the transport's goodbye), or `None` if it was already gone.
pub(crate) fn retire(st: &mut State, id: ConnId, reason: CloseReason, now: u64) -> Option<ConnEntry> {
    let mut e = st.conns.remove(id)?;
    if let Some(session) = e.session.take() {
        teardown(st, id, *session, now, reason);
    }
    let m = st.metrics();
    m.dec(Counter::Open);
    if e.poll.is_some() {
        m.dec(Counter::PollingOpen);
    }
    m.closed(reason);
    match reason {
        CloseReason::ClientClosed | CloseReason::ClientDisconnect | CloseReason::ServerShutdown => {
            debug!(shard = st.shard, reason = reason.as_str(), "connection closed")
        }
        _ => info!(shard = st.shard, reason = reason.as_str(), "connection closed"),
    }
    Some(e)
}

/// Undoes everything a closed session registered.
pub(crate) fn teardown(st: &mut State, id: ConnId, s: Session, _now: u64, reason: CloseReason) {
    for room in &s.rooms {
        socket_event(st, id, &s, "leave", json!({ "room": key_id(room) }));
    }
    socket_event(st, id, &s, "disconnect", json!({ "reason": reason.as_str() }));
    st.metrics().dec(Counter::Sessions);
    for (room, _) in &s.typing {
        let frame = typing_frame(key_id(room), &s.identity.user, false);
        st.deliver_room(room, &frame, Some(id));
        st.broadcast_room(room, &frame);
        let d = st.router.typing(room, s.identity.user.clone(), false);
        st.dispatch(d);
    }
    for room in &s.rooms {
        st.rooms.remove(room, id);
        let d = st.router.room_left(room, st.shard, id, false);
        st.dispatch(d);
    }
    for k in &s.watching {
        unwatch(st, k, id);
    }
    st.users.remove(&s.user_key, id);
    // A client that said goodbye itself (a Socket.IO DISCONNECT) does not come back for
    // its session; any other close, an Engine.IO close included, keeps it.
    let keep = !s.goodbye;
    let d = st.router.user_down(s.user_key, st.socket(id), s.pid, keep, s.registered);
    st.dispatch(d);
}
