//! Socket.IO sessions on the default namespace: CONNECT with auth, then the chat events.
//!
//! Runs synchronously on the shard's state for one packet at a time; anything that
//! concerns another shard leaves as a [`ShardMsg`]. Also holds the per-shard timer scan
//! ([`tick`]) because every timer it checks belongs to a session or its connection.

use serde_json::{json, Value};
use shardgate_io::socketio::{Packet, PacketType};

use crate::auth::Perms;
use crate::metrics::{CloseReason, Counter};
use crate::msg::{key, DeliveryStatus, Key, SocketRef};
use crate::record::{self, Receipt};
use crate::slab::ConnId;
use crate::state::{
    ack_frame, binary_event_frame, event_frame, text_frame, wall_ms, Pending, Session, State,
};

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
    let connected = st.conns.get(id).map(|c| c.session.is_some()).unwrap_or(false);
    match p.kind {
        PacketType::Connect => on_connect(st, id, upgrade_token, p, connected, now),
        PacketType::Disconnect if p.nsp == "/" => Err(CloseReason::ClientDisconnect),
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

fn connect_error(nsp: &str, message: &str, code: &str) -> crate::msg::Frame {
    let data = json!({ "message": message, "data": { "code": code } }).to_string();
    let mut s = String::from("4");
    shardgate_io::socketio::encode(PacketType::ConnectError, nsp, None, 0, Some(&data), &mut s);
    text_frame(&s)
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
    let user_key = key(&identity.tenant, &identity.user);
    let burst = st.shared.config.event_burst as f64;
    let sid = crate::conn::sid(st.shard, id);
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
        }));
    }
    st.metrics().inc(Counter::Sessions);
    // The CONNECT is answered when the user's directory (home shard, or the cluster
    // registry) has the socket: `ShardMsg::Registered`. A connected client is reachable.
    st.users.entry(user_key.clone()).or_default().push(id);
    let socket = SocketRef { shard: st.shard, conn: id };
    if let Some(s) = session_of(st, id) {
        socket_event(st, id, s, "connect", json!({}));
    }
    st.user_up(user_key, socket, sid);
    Ok(())
}

/// Replies to an event: the ack (when asked for) with `body`.
fn reply(st: &mut State, id: ConnId, ack: Option<u64>, body: &Value) {
    if let Some(a) = ack {
        st.push(id, &ack_frame(a, body));
    }
}

/// Refuses an event: an `error` event, and the ack (when asked for) with the same error.
fn refuse(st: &mut State, id: ConnId, ack: Option<u64>, event: &str, code: &str, message: &str) {
    let body = json!({ "ok": false, "code": code, "message": message, "event": event });
    st.push(id, &event_frame("error", &body));
    reply(st, id, ack, &body);
}

/// Takes one token from the connection's bucket; false when the event must be refused.
fn admit(st: &mut State, id: ConnId, now: u64) -> Result<bool, CloseReason> {
    let cfg = &st.shared.config;
    let (rate, burst) = (cfg.events_per_second as f64, cfg.event_burst as f64);
    let Some(s) = st.conns.get_mut(id).and_then(|c| c.session.as_mut()) else {
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
    let perms =
        st.conns.get(id).and_then(|c| c.session.as_ref()).map(|s| s.identity.perms).unwrap_or(Perms(0));
    let need = match name.as_str() {
        "message:send" => Perms::SEND,
        "join_room" => Perms::JOIN,
        "presence:subscribe" => Perms::PRESENCE,
        "typing:start" | "typing:stop" => Perms::TYPING,
        "leave_room" | "presence:unsubscribe" => Perms(0),
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

fn session_of(st: &State, id: ConnId) -> Option<&Session> {
    st.conns.get(id).and_then(|c| c.session.as_deref())
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
    let Some(s) = session_of(st, id) else { return };
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
        if let Some(s) = st.conns.get_mut(id).and_then(|c| c.session.as_mut()) {
            s.rooms.push(k.clone());
        }
        st.rooms.entry(k.clone()).or_default().push(id);
        if let Some(s) = session_of(st, id) {
            socket_event(st, id, s, "join", json!({ "room": room }));
        }
        return st.room_joined(&k, id, ack);
    }
    st.answer_join(id, &k, ack);
}

fn leave_room(st: &mut State, id: ConnId, ack: Option<u64>, args: &[Value]) {
    let Some(room) = room_arg(args).map(str::to_string) else {
        return refuse(st, id, ack, "leave_room", "invalid_room", "room id must be a string");
    };
    let Some(s) = session_of(st, id) else { return };
    let k = key(&s.identity.tenant, &room);
    if !s.rooms.contains(&k) {
        return refuse(st, id, ack, "leave_room", "not_in_room", "this socket is not in that room");
    }
    stop_typing(st, id, &k);
    if let Some(s) = st.conns.get_mut(id).and_then(|c| c.session.as_mut()) {
        s.rooms.retain(|r| *r != k);
    }
    remove_member(st, &k, id);
    st.push(id, &event_frame("room_left", &json!({ "room": room })));
    st.room_left(&k, crate::conn::sid(st.shard, id));
    if let Some(s) = session_of(st, id) {
        socket_event(st, id, s, "leave", json!({ "room": room }));
    }
    reply(st, id, ack, &json!({ "ok": true, "room": room }));
}

fn remove_member(st: &mut State, k: &Key, id: ConnId) {
    if let Some(members) = st.rooms.get_mut(k) {
        if let Some(pos) = members.iter().position(|&m| m == id) {
            members.swap_remove(pos);
        }
        if members.is_empty() {
            st.rooms.remove(k);
        }
    }
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
    let Some(s) = session_of(st, id) else { return };
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
            if !session_of(st, id).map(|s| s.rooms.contains(&k)).unwrap_or(false) {
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
    let frame = binary_event_frame("message:new", &payload, &attachments);
    st.persist(|| {
        let receipt = wants_receipt.then_some(Receipt { shard: st.shard, conn: id, msg_id: msg_id.0 });
        let mut msg = payload.clone();
        if !attachments.is_empty() {
            let encoded: Vec<String> = attachments.iter().map(|a| data_encoding::BASE64.encode(a)).collect();
            msg["attachments"] = json!(encoded);
        }
        record::message(&tenant, conversation, &msg, client_msg_id.as_ref(), receipt)
    });
    if room.is_some() {
        st.metrics().inc(Counter::RoomMessages);
        st.deliver_room(&target, &frame, Some(id));
        st.broadcast_room(&target, &frame);
        st.pending
            .insert(msg_id.0, Pending { conn: id, ack_id: ack, client_msg_id, deadline: now, to: None });
        st.resolve(msg_id.0, DeliveryStatus::Sent);
    } else {
        st.metrics().inc(Counter::DirectMessages);
        let deadline = now + st.shared.config.delivery_report_timeout_ms;
        let to = Some((target.clone(), from.clone()));
        st.pending.insert(msg_id.0, Pending { conn: id, ack_id: ack, client_msg_id, deadline, to });
        let origin = SocketRef { shard: st.shard, conn: id };
        st.route_direct(target, frame, msg_id.0, origin);
    }
}

/// A socket event record for session `s` of connection `id`.
fn socket_event(st: &State, id: ConnId, s: &Session, kind: &str, extra: Value) {
    st.persist(|| {
        let sid = crate::conn::sid(st.shard, id);
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

fn typing_frame(room: &str, user: &str, on: bool) -> crate::msg::Frame {
    event_frame("typing", &json!({ "room": room, "userId": user, "typing": on }))
}

fn typing(st: &mut State, id: ConnId, ack: Option<u64>, args: &[Value], on: bool, now: u64) {
    let ev = if on { "typing:start" } else { "typing:stop" };
    let Some(room) = room_arg(args).map(str::to_string) else {
        return refuse(st, id, ack, ev, "invalid_room", "expected {room}");
    };
    let ttl = st.shared.config.typing_ttl_ms;
    let Some(s) = session_of(st, id) else { return };
    let k = key(&s.identity.tenant, &room);
    if !s.rooms.contains(&k) {
        return refuse(st, id, ack, ev, "not_in_room", "join the room first");
    }
    if !on {
        stop_typing(st, id, &k);
        return reply(st, id, ack, &json!({ "ok": true }));
    }
    let user = s.identity.user.clone();
    let Some(s) = st.conns.get_mut(id).and_then(|c| c.session.as_mut()) else {
        return;
    };
    match s.typing.iter_mut().find(|(r, _)| *r == k) {
        Some((_, until)) => *until = now + ttl,
        None => {
            s.typing.push((k.clone(), now + ttl));
            let frame = typing_frame(&room, &user, true);
            st.deliver_room(&k, &frame, Some(id));
            st.broadcast_room(&k, &frame);
            st.typing_key(&k, user, true);
        }
    }
    reply(st, id, ack, &json!({ "ok": true }));
}

/// Ends a typing indicator of `id` in room `k`, telling the room.
fn stop_typing(st: &mut State, id: ConnId, k: &Key) {
    let Some(s) = st.conns.get_mut(id).and_then(|c| c.session.as_mut()) else {
        return;
    };
    let Some(pos) = s.typing.iter().position(|(r, _)| r == k) else {
        return;
    };
    s.typing.swap_remove(pos);
    let user = s.identity.user.clone();
    let frame = typing_frame(crate::msg::key_id(k), &user, false);
    st.deliver_room(k, &frame, Some(id));
    st.broadcast_room(k, &frame);
    st.typing_key(k, user, false);
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
    let Some(s) = session_of(st, id) else { return };
    let tenant = s.identity.tenant.clone();
    if on && s.watching.len() + ids.len() > MAX_WATCHED {
        return refuse(st, id, ack, ev, "too_many_subscriptions", "a socket may watch at most 1000 users");
    }
    let socket = SocketRef { shard: st.shard, conn: id };
    for u in &ids {
        let k = key(&tenant, u);
        let Some(s) = st.conns.get_mut(id).and_then(|c| c.session.as_mut()) else {
            return;
        };
        let watching = s.watching.contains(&k);
        if on && !watching {
            s.watching.push(k.clone());
            st.watchers.entry(k.clone()).or_default().push(id);
            st.watch(k, socket);
        } else if !on && watching {
            s.watching.retain(|w| *w != k);
            unwatch(st, &k, id);
        }
    }
    reply(st, id, ack, &json!({ "ok": true }));
}

fn unwatch(st: &mut State, k: &Key, id: ConnId) {
    if let Some(list) = st.watchers.get_mut(k) {
        list.retain(|&c| c != id);
        if list.is_empty() {
            st.watchers.remove(k);
        }
    }
    st.unwatch_home(k.clone());
}

/// Undoes everything a closed session registered.
pub(crate) fn teardown(st: &mut State, id: ConnId, s: Session, _now: u64, reason: CloseReason) {
    for room in &s.rooms {
        socket_event(st, id, &s, "leave", json!({ "room": crate::msg::key_id(room) }));
    }
    socket_event(st, id, &s, "disconnect", json!({ "reason": reason.as_str() }));
    st.metrics().dec(Counter::Sessions);
    for (room, _) in &s.typing {
        let frame = typing_frame(crate::msg::key_id(room), &s.identity.user, false);
        st.deliver_room(room, &frame, Some(id));
        st.broadcast_room(room, &frame);
        st.typing_key(room, s.identity.user.clone(), false);
    }
    let sid = crate::conn::sid(st.shard, id);
    for room in &s.rooms {
        remove_member(st, room, id);
        st.room_left(room, sid.clone());
    }
    for k in &s.watching {
        unwatch(st, k, id);
    }
    if let Some(list) = st.users.get_mut(&s.user_key) {
        list.retain(|&c| c != id);
        if list.is_empty() {
            st.users.remove(&s.user_key);
        }
    }
    st.user_down(s.user_key, sid);
}

/// The shard's timer scan: pings, pong and connect timeouts, forced closes, typing
/// expiry and delivery-report expiry.
pub(crate) fn tick(st: &mut State, now: u64) {
    let (interval, timeout) = (st.shared.config.ping_interval_ms, st.shared.config.ping_timeout_ms);
    let ping = st.ping.clone();
    let mut closes = Vec::new();
    let mut typing_expired = Vec::new();
    for (id, c) in st.conns.iter_mut() {
        if c.close.is_some() {
            if now >= c.close_by && !c.close_now {
                c.close_now = true;
                if let Some(w) = c.waker.take() {
                    w.wake();
                }
            }
            continue;
        }
        if c.connect_deadline != 0 && now >= c.connect_deadline {
            closes.push((id, CloseReason::ConnectTimeout));
            continue;
        }
        if c.pong_deadline != 0 && now >= c.pong_deadline {
            closes.push((id, CloseReason::PingTimeout));
            continue;
        }
        if now >= c.next_ping && c.pong_deadline == 0 {
            c.next_ping = now + interval;
            c.pong_deadline = now + timeout;
            c.outbox.push_back(ping.clone());
            c.out_bytes += ping.len();
            if let Some(w) = c.waker.take() {
                w.wake();
            }
        }
        if let Some(s) = c.session.as_ref() {
            for (room, until) in &s.typing {
                if now >= *until {
                    typing_expired.push((id, room.clone()));
                }
            }
        }
    }
    for (id, reason) in closes {
        st.close(id, reason, true, now);
    }
    for (id, room) in typing_expired {
        stop_typing(st, id, &room);
    }
    let expired: Vec<u128> = st.pending.iter().filter(|(_, p)| now >= p.deadline).map(|(k, _)| *k).collect();
    for msg_id in expired {
        st.metrics().inc(Counter::ReportTimeouts);
        st.resolve(msg_id, DeliveryStatus::Sent);
    }
}
