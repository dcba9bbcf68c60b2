//! The state one shard owns, as a composition of owners that each keep their own
//! invariants: its connections ([`conns`]), the rooms, users and presence subscribers of
//! its sockets ([`members`]), the 1:1 messages waiting for a report ([`pending`]), the
//! users homed on it ([`directory`]) and the way it reaches everything else
//! ([`router`]: the embedded bus or the cluster bridge, decided once).
//!
//! Everything here is single-threaded (`RefCell` inside the shard, never shared, never
//! borrowed across an `.await`). Effects on other shards leave as [`ShardMsg`]s through
//! [`State::send`]; messages a shard sends to itself go through a local queue so that no
//! handler runs inside another.

pub(crate) mod conns;
pub(crate) mod directory;
pub(crate) mod journal;
pub(crate) mod members;
pub(crate) mod pending;
pub(crate) mod router;

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Waker;

use serde_json::{json, Value};
use shardgate_io::packet;

use crate::ids::{key_id, sid, ConnId, Frame, Key, ShardId, SocketRef};
use crate::metrics::{CloseReason, Counter, ShardMetrics};
use crate::msg::{DeliveryStatus, Restored, ShardMsg};
use crate::record::{self, Record};
use crate::shared::{wall_ms, MetricsBlock, Shared};

use conns::Conns;
use directory::{Directory, Effect, Limits};
use journal::{Journal, LogKey, Refusal};
use members::Members;
use pending::PendingReports;
use router::{Dispatch, Router};

/// The state of one shard.
pub(crate) struct State {
    /// This shard.
    pub shard: ShardId,
    /// What the whole process shares.
    pub shared: Arc<Shared>,
    /// Connections: outbound queues, timers, sessions.
    pub conns: Conns,
    /// Local members of each room.
    pub rooms: Members,
    /// Local sockets of each user.
    pub users: Members,
    /// Local presence subscribers of each watched user.
    pub watchers: Members,
    /// 1:1 messages sent from this shard awaiting a report.
    pub pending: PendingReports,
    /// Users homed on this shard (embedded bus).
    directory: Directory,
    /// Connection state recovery on the embedded bus: shard 0's sequence, logs and
    /// sessions.
    journal: Option<Journal>,
    /// Embedded bus or cluster.
    pub router: Router,
    /// Messages this shard sent to itself, handled by its inbox task.
    pub local: VecDeque<ShardMsg>,
    /// Wakes the inbox task when `local` gets a message.
    pub inbox_waker: Option<Waker>,
    /// Connections other shards handed over (`ShardMsg::Adopt`), for the inbox task to
    /// spawn a connection task for each.
    pub adopted: Vec<(std::os::fd::OwnedFd, Vec<u8>)>,
    /// Monotonic message ids.
    pub ids: ulid::Generator,
    /// The Engine.IO ping every connection gets, encoded once.
    pub ping: Frame,
    /// One copy of each tenant id the shard's sessions name (a tenant has many
    /// connections; each would otherwise hold its own copy); swept with the directory.
    tenants: std::collections::HashSet<Arc<str>>,
}

impl State {
    /// The empty state of shard `shard`.
    pub fn new(shard: ShardId, shared: Arc<Shared>) -> State {
        let cfg = &shared.config;
        let limits = Limits {
            offline_queue_len: cfg.offline_queue_len,
            offline_ttl_ms: cfg.offline_ttl_secs * 1000,
            retention_ms: cfg.presence_retention_secs * 1000,
        };
        State {
            shard,
            router: Router::new(shared.mesh.len(), shared.bridge.clone(), cfg.recovery),
            directory: Directory::new(limits),
            journal: (cfg.recovery && shared.bridge.is_none() && shard == 0)
                .then(|| Journal::new(cfg.recovery_log_len, cfg.max_disconnection_ms)),
            shared,
            conns: Conns::default(),
            rooms: Members::default(),
            users: Members::default(),
            watchers: Members::default(),
            pending: PendingReports::default(),
            local: VecDeque::new(),
            inbox_waker: None,
            adopted: Vec::new(),
            ids: ulid::Generator::new(),
            ping: packet::server_frame(packet::PING.as_bytes()).into(),
            tenants: Default::default(),
        }
    }

    /// This shard's counters.
    pub fn metrics(&self) -> &ShardMetrics {
        self.shared.block(MetricsBlock::Shard(self.shard))
    }

    /// This shard's socket reference for connection `id`.
    pub fn socket(&self, id: ConnId) -> SocketRef {
        SocketRef { shard: self.shard, conn: id }
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

    /// Carries out what the router decided.
    pub fn dispatch(&mut self, d: Dispatch) {
        match d {
            Dispatch::Shard(to, msg) => self.send(to, msg),
            Dispatch::Bridge(msg) => {
                if let Some(b) = self.router.bridge() {
                    b.send(msg);
                }
            }
            Dispatch::Nothing => {}
        }
    }

    /// Queues `frame` on connection `id`; closes it as a slow consumer past the bound.
    pub fn push(&mut self, id: ConnId, frame: &Frame) -> bool {
        let limit = self.shared.config.outbound_queue_bytes;
        let m = self.shared.block(MetricsBlock::Shard(self.shard));
        self.conns.push(m, limit, id, frame)
    }

    /// Queues a freshly encoded frame on connection `id`.
    pub fn push_new(&mut self, id: ConnId, frame: Vec<u8>) -> bool {
        self.push(id, &Frame::from(frame))
    }

    /// Asks connection `id` to close; queued frames are flushed first unless `now`.
    pub fn close(&mut self, id: ConnId, reason: CloseReason, now: bool, at: u64) {
        self.conns.close(id, reason, now, at)
    }

    /// Delivers `frame` to every local member of `room` but `except`.
    pub fn deliver_room(&mut self, room: &str, frame: &Frame, except: Option<ConnId>) -> usize {
        let limit = self.shared.config.outbound_queue_bytes;
        let m = self.shared.block(MetricsBlock::Shard(self.shard));
        let mut n = 0;
        for &id in self.rooms.of(room) {
            if Some(id) != except && self.conns.push(m, limit, id, frame) {
                n += 1;
            }
        }
        n
    }

    /// Sends `frame` to `room` on every other shard, and to the other nodes.
    pub fn broadcast_room(&mut self, room: &Key, frame: &Frame) {
        for s in 0..self.shared.mesh.len() {
            if s != self.shard {
                let msg = ShardMsg::RoomDeliver { room: room.clone(), frame: frame.clone(), except: None };
                self.shared.mesh.send(s, msg);
            }
        }
        let d = self.router.room_publish(room, frame);
        self.dispatch(d);
    }

    /// Answers the sender of message `msg_id` once; later reports are ignored.
    pub fn resolve(&mut self, msg_id: u128, status: DeliveryStatus) {
        let Some(p) = self.pending.take(msg_id) else {
            return;
        };
        let id = ulid::Ulid(msg_id).to_string();
        if let (DeliveryStatus::Queued, Some((to, from))) = (status, &p.to) {
            let (tenant, user) = to.split_once('\x1f').unwrap_or(("", to));
            self.persist(|| record::notification(tenant, user, &id, from, wall_ms()));
        }
        let body = json!({ "id": id, "clientMsgId": p.client_msg_id, "status": status.as_str() });
        self.push_new(p.conn, packet::event_frame("message:sent", &body));
        if let Some(ack) = p.ack_id {
            self.push_new(p.conn, packet::ack_frame(ack, &body));
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
            ShardMsg::RoomDeliver { room, frame, except } => {
                let except = except.filter(|s| s.shard == self.shard).map(|s| s.conn);
                self.deliver_room(&room, &frame, except);
            }
            ShardMsg::DeliverUser { user, frame, msg_id, origin } => {
                let delivered = self.deliver_user(&user, &frame);
                let d = if delivered > 0 {
                    self.router.report(origin, msg_id, DeliveryStatus::Delivered)
                } else {
                    self.router.bounce(user, frame, msg_id, origin)
                };
                self.dispatch(d);
            }
            ShardMsg::Status { msg_id, status, .. } => self.resolve(msg_id, status),
            ShardMsg::Registered { conn, frames } => self.answer_connect(conn, &frames),
            ShardMsg::Resumed { conn, session } => self.resumed(conn, session),
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
                let frame: Frame = packet::event_frame("presence", &body).into();
                match conn {
                    Some(c) => {
                        self.push(c, &frame);
                    }
                    None => {
                        let subs = self.watchers.of(&user).to_vec();
                        for c in subs {
                            self.push(c, &frame);
                        }
                    }
                }
            }
            ShardMsg::UserUp { user, socket, pid } => {
                if let (Some(j), Some(pid)) = (self.journal.as_mut(), pid) {
                    j.open(pid, user.clone(), socket);
                }
                let mut out = Vec::new();
                self.directory.user_up(user, socket, now, wall_ms(), &mut out);
                self.apply(out);
            }
            ShardMsg::UserDown { user, socket, pid } => {
                if let (Some(j), Some((pid, keep))) = (self.journal.as_mut(), pid) {
                    j.down(&pid, socket, keep, now);
                }
                let mut out = Vec::new();
                self.directory.user_down(user, socket.shard, wall_ms(), &mut out);
                self.apply(out);
            }
            ShardMsg::SessionRoom { pid, room, joined } => {
                if let Some(j) = self.journal.as_mut() {
                    j.room(&pid, room, joined);
                }
            }
            ShardMsg::Resume { user, socket, pid, offset } => self.restore(user, socket, &pid, offset, now),
            ShardMsg::RoomLogged { room, frame, msg_id, origin } => {
                let frame = match self.journal.as_mut() {
                    Some(j) => j.append(LogKey::Room(room.clone()), &frame, now),
                    None => frame,
                };
                for s in 0..self.shared.mesh.len() {
                    let except = Some(origin);
                    self.send(s, ShardMsg::RoomDeliver { room: room.clone(), frame: frame.clone(), except });
                }
                let status = ShardMsg::Status { conn: origin.conn, msg_id, status: DeliveryStatus::Sent };
                self.send(origin.shard, status);
            }
            ShardMsg::ToUser { user, frame, msg_id, origin } => {
                let frame = match self.journal.as_mut() {
                    Some(j) => j.append(LogKey::User(user.clone()), &frame, now),
                    None => frame,
                };
                let mut out = Vec::new();
                self.directory.route(user, frame, msg_id, origin.into(), now, false, &mut out);
                self.apply(out);
            }
            ShardMsg::Bounce { user, frame, msg_id, origin } => {
                let mut out = Vec::new();
                self.directory.route(user, frame, msg_id, origin, now, true, &mut out);
                self.apply(out);
            }
            ShardMsg::Watch { user, socket } => {
                let mut out = Vec::new();
                self.directory.watch(user, socket, &mut out);
                self.apply(out);
            }
            ShardMsg::Unwatch { user, shard } => self.directory.unwatch(&user, shard),
            ShardMsg::Persisted { conn, msg_id } => {
                let body = json!({ "id": ulid::Ulid(msg_id).to_string() });
                self.push_new(conn, packet::event_frame("message:persisted", &body));
            }
            ShardMsg::History { conn, frame } => {
                self.push_new(conn, frame);
            }
            ShardMsg::Adopt { fd, read } => self.adopted.push((fd, read)),
            ShardMsg::Readable(conn) => self.conns.rouse(conn),
            ShardMsg::Shutdown => {}
            #[cfg(test)]
            ShardMsg::Test(_) => {}
        }
    }

    /// Shard 0 on the embedded bus: restores session `pid` on `socket` (registered with
    /// its user at once, the offline queue dropped: its messages are in the replay) or
    /// refuses it; either way the socket's shard hears `Resumed`.
    fn restore(&mut self, user: Key, socket: SocketRef, pid: &str, offset: Option<u64>, now: u64) {
        let restored = match self.journal.as_mut() {
            Some(j) => j.restore(pid, &user, offset, socket, now),
            None => Err(Refusal::Unknown),
        };
        let session = match restored {
            Ok(r) => {
                let mut out = Vec::new();
                self.directory.user_resumed(user.clone(), socket, wall_ms(), &mut out);
                self.apply(out);
                Some(Restored { user, pid: pid.into(), rooms: r.rooms, frames: r.frames })
            }
            Err(why) => {
                self.metrics().inc(match why {
                    Refusal::Unknown => Counter::RecoveryUnknown,
                    Refusal::OtherUser => Counter::RecoveryOtherUser,
                    Refusal::Trimmed => Counter::RecoveryTrimmed,
                });
                None
            }
        };
        self.send(socket.shard, ShardMsg::Resumed { conn: socket.conn, session });
    }

    /// Carries out what the directory decided.
    fn apply(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Send(to, msg) => self.send(to, msg),
                Effect::Report(origin, msg_id, status) => {
                    let d = self.router.report(origin, msg_id, status);
                    self.dispatch(d);
                }
                Effect::PresenceChanged { user, online, last_seen } => {
                    let (tenant, id) = user.split_once('\x1f').unwrap_or(("", &user));
                    self.persist(|| record::presence(tenant, id, online, last_seen));
                }
                Effect::Count(c, n) => self.metrics().add(c, n),
            }
        }
    }

    fn deliver_user(&mut self, user: &str, frame: &Frame) -> usize {
        let limit = self.shared.config.outbound_queue_bytes;
        let m = self.shared.block(MetricsBlock::Shard(self.shard));
        let socks = self.users.of(user);
        socks.iter().filter(|&&id| self.conns.push(m, limit, id, frame)).count()
    }

    /// Answers connection `conn`'s CONNECT (with its recovery session id, if it has one),
    /// then queues `frames`.
    fn answer_connect(&mut self, conn: ConnId, frames: &[Frame]) {
        let Some(s) = self.conns.session(conn) else { return };
        let sid = sid(self.shard, conn);
        let reply = match &s.pid {
            Some(pid) => packet::connect_reply_with_pid(&sid, pid),
            None => packet::connect_reply(&sid),
        };
        self.push_new(conn, packet::server_frame(reply.as_bytes()));
        for f in frames {
            self.push(conn, f);
        }
    }

    /// The bridge's answer to a recovery claim: the session restored (its rooms joined
    /// here, the missed messages sent after the CONNECT answer), or a new session.
    fn resumed(&mut self, conn: ConnId, restored: Option<Restored>) {
        let Some(s) = self.conns.session_mut(conn) else {
            // Closed meanwhile: undo the registration the restore made.
            if let Some(r) = restored {
                let d = self.router.restored_gone(r.user, self.socket(conn), r.pid);
                self.dispatch(d);
            }
            return;
        };
        s.registered = true;
        let user = s.user_key.clone();
        match restored {
            Some(r) => {
                s.rooms = r.rooms.clone();
                for room in &r.rooms {
                    self.rooms.add(room, conn);
                }
                self.users.add(&user, conn);
                self.metrics().inc(Counter::RecoveryRestored);
                self.metrics().add(Counter::RecoveryReplayed, r.frames.len() as u64);
                self.answer_connect(conn, &r.frames);
            }
            None => {
                // Nothing to restore: a new session with a new private id.
                let pid = crate::ids::new_pid();
                s.pid = Some(pid.clone());
                self.users.add(&user, conn);
                let d = self.router.user_up(user, self.socket(conn), Some(pid));
                self.dispatch(d);
            }
        }
    }

    /// Emits `room_joined` and the ack of a `join_room`.
    pub fn answer_join(&mut self, id: ConnId, room: &str, ack: Option<u64>) {
        let room = key_id(room);
        self.push_new(id, packet::event_frame("room_joined", &json!({ "room": room })));
        if let Some(a) = ack {
            self.push_new(id, packet::ack_frame(a, &json!({ "ok": true, "room": room })));
        }
    }

    /// Periodic upkeep of the directory: expired offline messages and forgotten users.
    /// The shard's one copy of tenant id `tenant`.
    pub fn tenant(&mut self, tenant: Arc<str>) -> Arc<str> {
        if let Some(t) = self.tenants.get(&tenant) {
            return t.clone();
        }
        self.tenants.insert(tenant.clone());
        tenant
    }

    pub fn sweep_directory(&mut self, now: u64) {
        // Tenants no session names any more.
        self.tenants.retain(|t| Arc::strong_count(t) > 1);
        let mut out = Vec::new();
        self.directory.sweep(now, wall_ms(), &mut out);
        if let Some(j) = self.journal.as_mut() {
            j.sweep(now);
        }
        self.apply(out);
    }
}

/// `42["name",payload]` as a shared frame.
pub(crate) fn event_frame(name: &str, payload: &Value) -> Frame {
    packet::event_frame(name, payload).into()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    #[test]
    fn a_shard_keeps_one_copy_of_each_tenant_until_no_session_names_it() {
        let mut st = super::State::new(0, crate::bench::shared().unwrap());
        let a = st.tenant("acme".into());
        let b = st.tenant(Arc::from("acme"));
        assert!(Arc::ptr_eq(&a, &b), "the second session shares the first one's copy");
        st.sweep_directory(0);
        assert!(Arc::ptr_eq(&st.tenant("acme".into()), &a), "still named: kept");
        drop((a, b));
        st.sweep_directory(0);
        assert_eq!(st.tenants.len(), 0, "named by no session: dropped");
    }
}
