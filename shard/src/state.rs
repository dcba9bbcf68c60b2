//! The state one shard owns: its connections, the rooms and users they belong to, the
//! presence subscriptions of its sockets, pending delivery reports, and the directory of
//! the users homed on this shard.
//!
//! Everything here is single-threaded (`RefCell` inside the shard, never shared). Effects
//! on other shards leave as [`ShardMsg`]s through [`State::send`]; messages a shard sends
//! to itself go through a local queue so that no handler runs inside another.
//!
//! The home-shard directory: each user key hashes to one shard ([`home_shard`]) which
//! alone knows on which shards that user has sockets, their presence and last-seen time,
//! their offline queue and which shards watch their presence. That single owner is what
//! makes "online", "offline", "queued" and drain order consistent without locks.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::task::Waker;

use serde_json::{json, Value};
use shardgate_io::socketio::{self, PacketType};
use shardgate_io::ws::{self, OpKind};

use crate::auth::Identity;
use crate::mesh::{home_shard, ShardId};
use crate::metrics::{CloseReason, Counter, ShardMetrics};
use crate::msg::{key_id, BridgeMsg, DeliveryStatus, Frame, Key, Origin, ShardMsg, SocketRef};
use crate::record::{self, Record};
use crate::runtime::Shared;
use crate::slab::{ConnId, Slab};

/// One client connection as the shard sees it (the socket itself lives in its task).
#[derive(Default)]
pub(crate) struct ConnEntry {
    /// Frames waiting to be written, oldest first.
    pub outbox: VecDeque<Frame>,
    /// Bytes of the front frame already written.
    pub head_off: usize,
    /// Bytes queued in `outbox` (minus `head_off`).
    pub out_bytes: usize,
    /// Wakes the connection task when something is queued or it must close.
    pub waker: Option<Waker>,
    /// Set when the connection must close; frames still queued are flushed first unless
    /// `close_now`.
    pub close: Option<CloseReason>,
    /// Drop the outbox instead of flushing it.
    pub close_now: bool,
    /// Shard time (ms) after which a close is forced even if the flush is stuck.
    pub close_by: u64,
    /// Shard time (ms) of the next Engine.IO ping.
    pub next_ping: u64,
    /// Shard time (ms) by which a pong must arrive; 0 when no ping is outstanding.
    pub pong_deadline: u64,
    /// Shard time (ms) by which the Socket.IO CONNECT must arrive; 0 once connected.
    pub connect_deadline: u64,
    /// The authenticated session, once the namespace CONNECT succeeded.
    pub session: Option<Box<Session>>,
}

/// An authenticated Socket.IO session on the default namespace.
pub(crate) struct Session {
    pub identity: Identity,
    pub user_key: Key,
    pub rooms: Vec<Key>,
    pub watching: Vec<Key>,
    /// Rooms this socket is typing in, with the shard time the indicator expires.
    pub typing: Vec<(Key, u64)>,
    /// Token bucket: events available now.
    pub tokens: f64,
    /// Shard time (ms) of the last refill.
    pub refilled: u64,
    /// Consecutive refused events; past a bound the socket is closed.
    pub strikes: u32,
}

/// A 1:1 message waiting for its delivery report.
pub(crate) struct Pending {
    pub conn: ConnId,
    pub ack_id: Option<u64>,
    pub client_msg_id: Option<Value>,
    pub deadline: u64,
    /// Recipient (tenant-qualified) and sender, for the notification of a queued message.
    pub to: Option<(Key, Arc<str>)>,
}

/// What the home shard knows about one user.
#[derive(Default)]
pub(crate) struct UserDir {
    /// Sockets per shard.
    sockets: Vec<(ShardId, u32)>,
    /// Presence subscriptions per shard.
    watchers: Vec<(ShardId, u32)>,
    /// Wall-clock ms of the last time the user went offline (or came online).
    last_seen: u64,
    /// Undelivered `message:new` frames with the shard time they were queued.
    offline: VecDeque<(u64, Frame)>,
}

impl UserDir {
    fn online(&self) -> bool {
        self.sockets.iter().any(|&(_, n)| n > 0)
    }
}

fn bump(list: &mut Vec<(ShardId, u32)>, shard: ShardId, up: bool) {
    match list.iter_mut().find(|(s, _)| *s == shard) {
        Some((_, n)) if up => *n += 1,
        Some((_, n)) => *n = n.saturating_sub(1),
        None if up => list.push((shard, 1)),
        None => {}
    }
    list.retain(|&(_, n)| n > 0);
}

/// The state of one shard.
pub(crate) struct State {
    pub shard: ShardId,
    pub shared: Arc<Shared>,
    pub conns: Slab<ConnEntry>,
    /// Local members of each room.
    pub rooms: HashMap<Key, Vec<ConnId>>,
    /// Local sockets of each user.
    pub users: HashMap<Key, Vec<ConnId>>,
    /// Local presence subscribers of each watched user.
    pub watchers: HashMap<Key, Vec<ConnId>>,
    /// 1:1 messages sent from this shard awaiting a report.
    pub pending: HashMap<u128, Pending>,
    /// Users homed on this shard.
    directory: HashMap<Key, UserDir>,
    /// Messages this shard sent to itself, handled by its inbox task.
    pub local: VecDeque<ShardMsg>,
    pub inbox_waker: Option<Waker>,
    /// Monotonic message ids.
    pub ids: ulid::Generator,
    /// Shared ping frame.
    pub ping: Frame,
}

impl State {
    pub fn new(shard: ShardId, shared: Arc<Shared>) -> State {
        State {
            shard,
            shared,
            conns: Slab::default(),
            rooms: HashMap::new(),
            users: HashMap::new(),
            watchers: HashMap::new(),
            pending: HashMap::new(),
            directory: HashMap::new(),
            local: VecDeque::new(),
            inbox_waker: None,
            ids: ulid::Generator::new(),
            ping: text_frame("2"),
        }
    }

    pub fn metrics(&self) -> &ShardMetrics {
        &self.shared.metrics[self.shard]
    }

    /// Sends `msg` to shard `to` (to this shard through the local queue).
    pub fn send(&mut self, to: ShardId, msg: ShardMsg) {
        if to == self.shard {
            self.local.push_back(msg);
            if let Some(w) = self.inbox_waker.take() {
                w.wake();
            }
        } else {
            self.shared.mesh.send(to, msg);
        }
    }

    pub fn home(&self, user: &str) -> ShardId {
        home_shard(user, self.shared.mesh.len())
    }

    /// Queues `frame` on connection `id`; closes it as a slow consumer past the bound.
    pub fn push(&mut self, id: ConnId, frame: &Frame) -> bool {
        let limit = self.shared.config.outbound_queue_bytes;
        let m = &self.shared.metrics[self.shard];
        push_to(&mut self.conns, m, limit, id, frame)
    }

    /// Asks connection `id` to close; queued frames are flushed first unless `now`.
    pub fn close(&mut self, id: ConnId, reason: CloseReason, now: bool, at: u64) {
        if let Some(c) = self.conns.get_mut(id) {
            if c.close.is_none() {
                c.close = Some(reason);
                c.close_by = at + 2_000;
            }
            if now {
                c.close_now = true;
                c.outbox.clear();
                c.out_bytes = 0;
                c.head_off = 0;
            }
            if let Some(w) = c.waker.take() {
                w.wake();
            }
        }
    }

    /// Delivers `frame` to every local member of `room` but `except`.
    pub fn deliver_room(&mut self, room: &str, frame: &Frame, except: Option<ConnId>) -> usize {
        let limit = self.shared.config.outbound_queue_bytes;
        let m = &self.shared.metrics[self.shard];
        let Some(members) = self.rooms.get(room) else {
            return 0;
        };
        let mut n = 0;
        for &id in members {
            if Some(id) != except && push_to(&mut self.conns, m, limit, id, frame) {
                n += 1;
            }
        }
        n
    }

    /// Sends `frame` to `room` on every other shard.
    pub fn broadcast_room(&mut self, room: &Key, frame: &Frame) {
        for s in 0..self.shared.mesh.len() {
            if s != self.shard {
                self.shared.mesh.send(s, ShardMsg::RoomDeliver { room: room.clone(), frame: frame.clone() });
            }
        }
        if let Some(b) = &self.shared.bridge {
            b.send(BridgeMsg::RoomPublish { room: room.clone(), frame: frame.clone() });
        }
    }

    /// Answers the sender of message `msg_id` once; later reports are ignored.
    pub fn resolve(&mut self, msg_id: u128, status: DeliveryStatus) {
        let Some(p) = self.pending.remove(&msg_id) else {
            return;
        };
        let id = ulid::Ulid(msg_id).to_string();
        if let (DeliveryStatus::Queued, Some((to, from))) = (status, &p.to) {
            let (tenant, user) = to.split_once('\x1f').unwrap_or(("", to));
            self.persist(|| record::notification(tenant, user, &id, from, wall_ms()));
        }
        let body = json!({ "id": id, "clientMsgId": p.client_msg_id, "status": status.as_str() });
        let frame = event_frame("message:sent", &body);
        self.push(p.conn, &frame);
        if let Some(ack) = p.ack_id {
            let frame = ack_frame(ack, &body);
            self.push(p.conn, &frame);
        }
    }

    /// Hands a record to the Kafka producer; `make` runs only when persistence is on.
    pub fn persist(&self, make: impl FnOnce() -> Record) {
        if let Some(inbox) = &self.shared.persist {
            inbox.send(make());
        }
    }

    /// Handles one message from the mesh (or from this shard itself).
    pub fn handle(&mut self, msg: ShardMsg, now: u64) {
        match msg {
            ShardMsg::RoomDeliver { room, frame } => {
                self.deliver_room(&room, &frame, None);
            }
            ShardMsg::DeliverUser { user, frame, msg_id, origin } => {
                let delivered = self.deliver_user(&user, &frame);
                if delivered > 0 {
                    self.status_to(origin, msg_id, DeliveryStatus::Delivered);
                } else if let Some(bridge) = &self.shared.bridge {
                    bridge.send(BridgeMsg::Bounce { user, frame, msg_id, origin });
                } else {
                    let home = self.home(&user);
                    self.send(home, ShardMsg::Bounce { user, frame, msg_id, origin });
                }
            }
            ShardMsg::Status { msg_id, status, .. } => self.resolve(msg_id, status),
            ShardMsg::Registered { conn, frames } => {
                let hello = text_frame(&format!("40{{\"sid\":\"{}\"}}", crate::conn::sid(self.shard, conn)));
                self.push(conn, &hello);
                for f in &frames {
                    self.push(conn, f);
                }
            }
            ShardMsg::RoomReady { conn, room, ack } => self.answer_join(conn, &room, ack),
            ShardMsg::OfflineDrain { conn, frames } => {
                for f in &frames {
                    self.push(conn, f);
                }
            }
            ShardMsg::Presence { user, conn, online, last_seen } => {
                let body = json!({
                    "userId": key_id(&user),
                    "status": if online { "online" } else { "offline" },
                    "lastSeen": last_seen,
                });
                let frame = event_frame("presence", &body);
                match conn {
                    Some(c) => {
                        self.push(c, &frame);
                    }
                    None => {
                        let subs = self.watchers.get(&user).cloned().unwrap_or_default();
                        for c in subs {
                            self.push(c, &frame);
                        }
                    }
                }
            }
            ShardMsg::UserUp { user, socket } => self.dir_user_up(user, socket, now),
            ShardMsg::UserDown { user, shard } => self.dir_user_down(user, shard),
            ShardMsg::ToUser { user, frame, msg_id, origin } => {
                self.dir_route(user, frame, msg_id, origin.into(), now, false)
            }
            ShardMsg::Bounce { user, frame, msg_id, origin } => {
                self.dir_route(user, frame, msg_id, origin, now, true)
            }
            ShardMsg::Watch { user, socket } => {
                let dir = self.directory.entry(user.clone()).or_default();
                bump(&mut dir.watchers, socket.shard, true);
                let (online, last_seen) = (dir.online(), dir.last_seen);
                let reply = ShardMsg::Presence { user, conn: Some(socket.conn), online, last_seen };
                self.send(socket.shard, reply);
            }
            ShardMsg::Unwatch { user, shard } => {
                if let Some(dir) = self.directory.get_mut(&user) {
                    bump(&mut dir.watchers, shard, false);
                }
            }
            ShardMsg::Persisted { conn, msg_id } => {
                let frame =
                    event_frame("message:persisted", &json!({ "id": ulid::Ulid(msg_id).to_string() }));
                self.push(conn, &frame);
            }
            ShardMsg::Shutdown => {}
            #[cfg(test)]
            ShardMsg::Test(_) => {}
        }
    }

    fn deliver_user(&mut self, user: &str, frame: &Frame) -> usize {
        let limit = self.shared.config.outbound_queue_bytes;
        let m = &self.shared.metrics[self.shard];
        let Some(socks) = self.users.get(user) else {
            return 0;
        };
        socks.iter().filter(|&&id| push_to(&mut self.conns, m, limit, id, frame)).count()
    }

    fn dir_user_up(&mut self, user: Key, socket: SocketRef, now: u64) {
        let ttl = self.shared.config.offline_ttl_secs * 1000;
        let dir = self.directory.entry(user.clone()).or_default();
        let was_online = dir.online();
        bump(&mut dir.sockets, socket.shard, true);
        dir.last_seen = wall_ms();
        let mut expired = 0;
        let frames: Vec<Frame> = dir
            .offline
            .drain(..)
            .filter(|(at, _)| {
                let keep = now.saturating_sub(*at) <= ttl;
                expired += u64::from(!keep);
                keep
            })
            .map(|(_, f)| f)
            .collect();
        let watchers: Vec<ShardId> = dir.watchers.iter().map(|&(s, _)| s).collect();
        let last_seen = dir.last_seen;
        self.metrics().add(Counter::OfflineDropped, expired);
        self.send(socket.shard, ShardMsg::Registered { conn: socket.conn, frames });
        if !was_online {
            let (tenant, id) = user.split_once('\x1f').unwrap_or(("", &user));
            self.persist(|| record::presence(tenant, id, true, last_seen));
            for s in watchers {
                let msg = ShardMsg::Presence { user: user.clone(), conn: None, online: true, last_seen };
                self.send(s, msg);
            }
        }
    }

    fn dir_user_down(&mut self, user: Key, shard: ShardId) {
        let Some(dir) = self.directory.get_mut(&user) else {
            return;
        };
        let was_online = dir.online();
        bump(&mut dir.sockets, shard, false);
        if was_online && !dir.online() {
            dir.last_seen = wall_ms();
            let last_seen = dir.last_seen;
            let watchers: Vec<ShardId> = dir.watchers.iter().map(|&(s, _)| s).collect();
            let (tenant, id) = user.split_once('\x1f').unwrap_or(("", &user));
            self.persist(|| record::presence(tenant, id, false, last_seen));
            for s in watchers {
                let msg = ShardMsg::Presence { user: user.clone(), conn: None, online: false, last_seen };
                self.send(s, msg);
            }
        }
    }

    /// Routes a 1:1 message at the recipient's home shard. A bounce (the socket closed
    /// between lookup and delivery) is queued only if the user is now fully offline.
    fn dir_route(&mut self, user: Key, frame: Frame, msg_id: u128, origin: Origin, now: u64, bounced: bool) {
        let cap = self.shared.config.offline_queue_len;
        let dir = self.directory.entry(user.clone()).or_default();
        if dir.online() {
            if bounced {
                return; // another socket of the user got it; the report timeout covers the rest
            }
            let targets: Vec<ShardId> = dir.sockets.iter().map(|&(s, _)| s).collect();
            for s in targets {
                let msg = ShardMsg::DeliverUser {
                    user: user.clone(),
                    frame: frame.clone(),
                    msg_id,
                    origin: origin.clone(),
                };
                self.send(s, msg);
            }
            return;
        }
        let mut dropped = 0;
        while cap > 0 && dir.offline.len() >= cap {
            dir.offline.pop_front();
            dropped += 1;
        }
        let queued = cap > 0;
        if queued {
            dir.offline.push_back((now, frame));
        }
        self.metrics().add(Counter::OfflineDropped, dropped + u64::from(!queued));
        self.metrics().add(Counter::OfflineQueued, u64::from(queued));
        let status = if queued { DeliveryStatus::Queued } else { DeliveryStatus::Sent };
        self.status_to(origin, msg_id, status);
    }

    /// Reports the outcome of message `msg_id` to its sender, here or on another node.
    pub fn status_to(&mut self, origin: Origin, msg_id: u128, status: DeliveryStatus) {
        match (&origin.server, &self.shared.bridge) {
            (Some(_), Some(bridge)) => bridge.send(BridgeMsg::Ack { origin, msg_id, status }),
            (Some(_), None) => {}
            (None, _) => {
                let msg = ShardMsg::Status { conn: origin.conn, msg_id, status };
                self.send(origin.shard, msg)
            }
        }
    }

    // ---- routing: the embedded bus (home shards) or the bridge (cluster mode) ----

    /// A socket of `user` authenticated.
    pub fn user_up(&mut self, user: Key, socket: SocketRef, sid: String) {
        match &self.shared.bridge {
            Some(b) => b.send(BridgeMsg::SocketUp { user, sid, socket }),
            None => {
                let home = self.home(&user);
                self.send(home, ShardMsg::UserUp { user, socket });
            }
        }
    }

    /// A socket of `user` closed.
    pub fn user_down(&mut self, user: Key, sid: String) {
        let shard = self.shard;
        match &self.shared.bridge {
            Some(b) => b.send(BridgeMsg::SocketDown { user, sid, shard }),
            None => {
                let home = self.home(&user);
                self.send(home, ShardMsg::UserDown { user, shard });
            }
        }
    }

    /// Routes a 1:1 message.
    pub fn route_direct(&mut self, user: Key, frame: Frame, msg_id: u128, origin: SocketRef) {
        match &self.shared.bridge {
            Some(b) => b.send(BridgeMsg::ToUser { user, frame, msg_id, origin }),
            None => {
                let home = self.home(&user);
                self.send(home, ShardMsg::ToUser { user, frame, msg_id, origin });
            }
        }
    }

    /// Room membership of socket `sid` changed (cluster registry only).
    pub fn room_left(&mut self, room: &Key, sid: String) {
        if let Some(b) = &self.shared.bridge {
            b.send(BridgeMsg::RoomLeave { room: room.clone(), sid });
        }
    }

    /// Socket `id` joined `room`: answered now on the embedded bus; in cluster mode once
    /// the bridge confirms this node receives the room's channel (`RoomReady`), so a
    /// member never misses a message published after its `room_joined`.
    pub fn room_joined(&mut self, room: &Key, id: ConnId, ack: Option<u64>) {
        match &self.shared.bridge {
            Some(b) => {
                let sid = crate::conn::sid(self.shard, id);
                let socket = SocketRef { shard: self.shard, conn: id };
                b.send(BridgeMsg::RoomJoin { room: room.clone(), sid, socket, ack });
            }
            None => self.answer_join(id, room, ack),
        }
    }

    /// Emits `room_joined` and the ack of a `join_room`.
    pub fn answer_join(&mut self, id: ConnId, room: &str, ack: Option<u64>) {
        let room = key_id(room);
        self.push(id, &event_frame("room_joined", &serde_json::json!({ "room": room })));
        if let Some(a) = ack {
            let frame = ack_frame(a, &serde_json::json!({ "ok": true, "room": room }));
            self.push(id, &frame);
        }
    }

    /// Subscribes `socket` to `user`'s presence.
    pub fn watch(&mut self, user: Key, socket: SocketRef) {
        match &self.shared.bridge {
            Some(b) => b.send(BridgeMsg::Watch { user, socket }),
            None => {
                let home = self.home(&user);
                self.send(home, ShardMsg::Watch { user, socket });
            }
        }
    }

    /// Ends one presence subscription from this shard (the embedded bus counts them).
    pub fn unwatch_home(&mut self, user: Key) {
        if self.shared.bridge.is_none() {
            let home = self.home(&user);
            let shard = self.shard;
            self.send(home, ShardMsg::Unwatch { user, shard });
        }
    }

    /// Records a typing indicator in the cluster registry.
    pub fn typing_key(&mut self, room: &Key, user: Arc<str>, on: bool) {
        if let Some(b) = &self.shared.bridge {
            b.send(BridgeMsg::Typing { room: room.clone(), user, on });
        }
    }

    /// Periodic upkeep of the directory: expired offline messages and forgotten users.
    pub fn sweep_directory(&mut self, now: u64) {
        let ttl = self.shared.config.offline_ttl_secs * 1000;
        let keep_for = self.shared.config.presence_retention_secs * 1000;
        let wall = wall_ms();
        let mut dropped = 0;
        self.directory.retain(|_, d| {
            let before = d.offline.len();
            d.offline.retain(|(at, _)| now.saturating_sub(*at) <= ttl);
            dropped += (before - d.offline.len()) as u64;
            d.online()
                || !d.watchers.is_empty()
                || !d.offline.is_empty()
                || wall.saturating_sub(d.last_seen) < keep_for
        });
        self.metrics().add(Counter::OfflineDropped, dropped);
    }
}

fn push_to(conns: &mut Slab<ConnEntry>, m: &ShardMetrics, limit: usize, id: ConnId, frame: &Frame) -> bool {
    let Some(c) = conns.get_mut(id) else {
        return false;
    };
    if c.close.is_some() {
        return false;
    }
    if c.out_bytes + frame.len() > limit {
        c.close = Some(CloseReason::SlowConsumer);
        c.close_now = true;
        c.outbox.clear();
        c.out_bytes = 0;
        c.head_off = 0;
    } else {
        c.outbox.push_back(frame.clone());
        c.out_bytes += frame.len();
        m.inc(Counter::Deliveries);
    }
    if let Some(w) = c.waker.take() {
        w.wake();
    }
    c.close.is_none()
}

/// Milliseconds since the Unix epoch.
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A WebSocket text frame carrying an Engine.IO packet.
pub(crate) fn text_frame(text: &str) -> Frame {
    let mut out = Vec::with_capacity(text.len() + 4);
    ws::encode_frame(OpKind::Text, text.as_bytes(), &mut out);
    out.into()
}

/// `42["name",payload]` as a frame, serialized straight into the packet buffer (the
/// default namespace needs no prefix).
pub(crate) fn event_frame(name: &str, payload: &Value) -> Frame {
    let mut packet = Vec::with_capacity(96);
    packet.extend_from_slice(b"42");
    write_args(&mut packet, Some(name), payload);
    packet_frame(&packet)
}

/// `[name,payload]` (or `[payload]` without a name) appended to `out`.
fn write_args(out: &mut Vec<u8>, name: Option<&str>, payload: &Value) {
    out.push(b'[');
    if let Some(name) = name {
        // Writing into a Vec cannot fail, and a Value always serializes.
        let _ = serde_json::to_writer(&mut *out, name);
        out.push(b',');
    }
    let _ = serde_json::to_writer(&mut *out, payload);
    out.push(b']');
}

/// A finished Engine.IO packet as one WebSocket text frame.
fn packet_frame(packet: &[u8]) -> Frame {
    let mut out = Vec::with_capacity(packet.len() + 10);
    ws::encode_frame(OpKind::Text, packet, &mut out);
    out.into()
}

/// An event with binary attachments: the packet frame followed by one binary frame per
/// attachment, as one contiguous frame group.
pub(crate) fn binary_event_frame(name: &str, payload: &Value, attachments: &[Vec<u8>]) -> Frame {
    if attachments.is_empty() {
        return event_frame(name, payload);
    }
    let data = json!([name, payload]).to_string();
    let mut s = String::from("4");
    socketio::encode(PacketType::BinaryEvent, "/", None, attachments.len(), Some(&data), &mut s);
    let mut out = Vec::new();
    ws::encode_frame(OpKind::Text, s.as_bytes(), &mut out);
    for a in attachments {
        ws::encode_frame(OpKind::Binary, a, &mut out);
    }
    out.into()
}

/// `43<id>[payload]` as a frame.
pub(crate) fn ack_frame(ack_id: u64, payload: &Value) -> Frame {
    use std::io::Write;
    let mut packet = Vec::with_capacity(96);
    let _ = write!(packet, "43{ack_id}");
    write_args(&mut packet, None, payload);
    packet_frame(&packet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardgate_io::{engineio, ws::Role};

    /// The payload of a single unmasked server frame.
    fn text_of(frame: &Frame) -> String {
        let mut buf = frame.to_vec();
        let (f, used) = ws::decode_frame(&mut buf, 1 << 20, Role::Client).unwrap().unwrap();
        assert_eq!(used, frame.len());
        String::from_utf8(buf[f.payload].to_vec()).unwrap()
    }

    #[test]
    fn event_and_ack_frames_decode_as_the_codec_reads_them() {
        let payload = json!({ "id": "01KA", "from": "a\"b", "content": { "t": 1, "x": [1.5, null, "é\n"] } });
        let text = text_of(&event_frame("message:new", &payload));
        let engineio::Packet::Message(m) = engineio::decode(&text).unwrap() else { panic!("{text}") };
        let p = socketio::decode(m).unwrap();
        assert_eq!((p.kind, p.nsp.as_ref(), p.ack_id), (PacketType::Event, "/", None));
        assert_eq!(p.event_name(), Some("message:new"));
        assert_eq!(p.event_args(), std::slice::from_ref(&payload));

        let text = text_of(&ack_frame(4_000_000_001, &payload));
        let engineio::Packet::Message(m) = engineio::decode(&text).unwrap() else { panic!("{text}") };
        let p = socketio::decode(m).unwrap();
        assert_eq!((p.kind, p.ack_id), (PacketType::Ack, Some(4_000_000_001)));
        assert_eq!(p.data, Some(json!([payload])));
    }
}
