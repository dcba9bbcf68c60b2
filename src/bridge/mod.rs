//! The bridge: one pinned thread per process that owns all of its Redis traffic.
//!
//! Exactly two Redis connections: a command connection that carries the commands of every
//! shard in pipelined batches (one write, then every reply in order), and a pub/sub
//! connection subscribed to `server:{me}`, `presence:updates` and the `room:{id}` channels
//! of rooms with local members. Shards talk to the bridge only through its lock-free
//! inbox ([`BridgeMsg`]); the bridge answers through the shards' mesh inboxes.
//!
//! One task runs a connected session: each round it applies every pub/sub push already
//! received, writes pending (un)subscriptions, then turns everything in the inbox into
//! one pipelined batch. Applying pushes first is what keeps the route cache honest.
//!
//! The bridge keeps a mirror of what this process registered (sockets, users per shard,
//! room members) so that it can re-register everything after Redis comes back, serve
//! local 1:1 delivery while Redis is down, and reference-count room subscriptions.
//! Redis down never stops a shard: messages that needed Redis are counted as unroutable.

pub mod kafka;
pub mod redis;
pub mod scripts;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, FutureExt};
use glommio::net::UnixStream;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use shardgate_io::resp::{self, Reply};
use shardgate_shard::mesh::{Doorbell, Inbox, ShardId};
use shardgate_shard::metrics::{Counter, ShardMetrics};
use shardgate_shard::msg::{
    key, parse_sid, BridgeMsg, DeliveryStatus, Frame, Key, Origin, ShardMsg, SocketRef,
};
use shardgate_shard::{ConnId, Shared};
use tracing::{info, warn};

pub use redis::{RedisConn, RedisUrl};

/// Cluster settings.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Redis to use.
    pub redis: RedisUrl,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// This process's server id.
    pub server_id: Arc<str>,
    /// Lifetime of the node's liveness key; refreshed every third of it, and dead nodes
    /// are swept once theirs expired.
    pub liveness_ttl_ms: u64,
    /// `presence:{user}` lifetime while online (refreshed at half of it).
    pub presence_ttl_secs: u64,
    /// How long an offline user's presence (lastSeen) is kept.
    pub presence_retention_secs: u64,
    /// Offline queue bound per user.
    pub offline_queue_len: usize,
    /// Offline queue lifetime.
    pub offline_ttl_secs: u64,
    /// Typing indicator lifetime.
    pub typing_ttl_ms: u64,
}

/// What this process registered, mirrored for re-registration and local fallback.
#[derive(Default)]
struct Mirror {
    /// sid -> (user, shard).
    sockets: HashMap<String, (Key, ShardId)>,
    /// user -> sockets per shard.
    users: HashMap<Key, Vec<(ShardId, u32)>>,
    /// room -> local member sids.
    rooms: HashMap<Key, HashSet<String>>,
}

impl Mirror {
    fn shards_of(&self, user: &str) -> Vec<ShardId> {
        self.users.get(user).map(|v| v.iter().map(|&(s, _)| s).collect()).unwrap_or_default()
    }
}

/// What to do with the reply of one pipelined command.
enum Then {
    Ignore,
    /// UP script: the offline queue to drain to the socket; `answer` answers its CONNECT.
    Drain {
        socket: SocketRef,
        answer: bool,
        user: Key,
    },
    /// DOWN script: 1 when it was the user's last socket.
    Down(Key),
    /// ROUTE script; `epoch` is the route cache epoch when it was sent.
    Route {
        user: Key,
        frame: Frame,
        msg_id: u128,
        origin: SocketRef,
        epoch: u64,
    },
    /// PUBLISH to a cached server; `tally` counts (replies pending, receivers) over all
    /// of the message's PUBLISHes; when none reached anybody and nothing was delivered
    /// locally, the message is routed again through the registry.
    Cached {
        user: Key,
        frame: Frame,
        msg_id: u128,
        origin: SocketRef,
        tally: Tally,
        local: bool,
    },
    /// QUEUE_IF_OFFLINE for a bounce.
    Bounced {
        origin: Origin,
        msg_id: u128,
    },
    /// GET presence.
    Presence {
        user: Key,
        socket: SocketRef,
    },
    /// SMEMBERS nodes: sweep the others.
    Nodes,
    /// SWEEP script.
    Swept,
}

/// A `join_room` waiting for its room channel's subscription: socket, room, ack id.
type JoinWaiter = (SocketRef, Key, Option<u64>);

/// Replies pending and receivers counted over the PUBLISHes of one cached route.
type Tally = Rc<std::cell::Cell<(usize, i64)>>;

struct Bridge {
    cfg: BridgeConfig,
    shared: Arc<Shared>,
    inbox: Arc<Inbox<BridgeMsg>>,
    mirror: RefCell<Mirror>,
    /// Pub/sub (un)subscriptions waiting for the pub/sub task.
    /// `Some` while connected: (un)subscribe commands for the pub/sub connection.
    subs: RefCell<Option<Vec<u8>>>,
    /// Route cache: user -> other servers holding their sockets (see [`RouteCache`]).
    routes: RefCell<RouteCache>,
    /// Room channels whose SUBSCRIBE is not confirmed yet, with the joins waiting on it.
    pending_subs: RefCell<HashMap<String, Vec<JoinWaiter>>>,
}

/// Which other servers hold sockets of a user, learnt from ROUTE replies, so that later
/// messages to that user skip the registry lookup: a direct PUBLISH to each server (or
/// no Redis command at all when every socket is local, delivered from the mirror).
///
/// How it stays correct: every change of a user's socket set (UP, DOWN, SWEEP scripts)
/// publishes the user on `registry:changes`, and every node drops that user's entry when
/// it hears it. A ROUTE reply is cached only if no change at all arrived between sending
/// the ROUTE and reading its reply (the `epoch` check), so a reply that raced a change is
/// never cached. Entries live at most [`ROUTE_TTL`]; the cache is emptied whenever the
/// pub/sub connection is (re)established, since changes may have been missed. A cached
/// server that no longer listens (PUBLISH reaches nobody) drops the entry, and a message
/// that reached nobody is routed again through the registry. What remains is the pub/sub
/// propagation window: a socket registered on another node becomes visible here when
/// its `registry:changes` push arrives (typically well under a millisecond on a LAN).
#[derive(Default)]
struct RouteCache {
    /// user -> (other servers, when learnt).
    entries: HashMap<Key, CachedRoute>,
    /// Bumped by every `registry:changes` push.
    epoch: u64,
}

/// Other servers holding a user's sockets, and when that was learnt.
type CachedRoute = (Rc<[Arc<str>]>, Instant);

/// Longest life of a route cache entry.
const ROUTE_TTL: Duration = Duration::from_secs(30);
/// Most users cached; past it the cache starts over.
const ROUTE_CACHE_MAX: usize = 100_000;

impl RouteCache {
    fn get(&mut self, user: &str) -> Option<Rc<[Arc<str>]>> {
        match self.entries.get(user) {
            Some((servers, at)) if at.elapsed() < ROUTE_TTL => Some(servers.clone()),
            Some(_) => {
                self.entries.remove(user);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, user: Key, servers: Rc<[Arc<str>]>, epoch: u64) {
        if epoch != self.epoch {
            return;
        }
        if self.entries.len() >= ROUTE_CACHE_MAX {
            self.entries.clear();
        }
        self.entries.insert(user, (servers, Instant::now()));
    }

    fn invalidate(&mut self, user: &str) {
        self.epoch += 1;
        self.entries.remove(user);
    }

    fn clear(&mut self) {
        self.epoch += 1;
        self.entries.clear();
    }
}

impl Bridge {
    fn m(&self) -> &ShardMetrics {
        self.shared.metrics_of(self.shared.mesh.len())
    }

    fn k(&self, parts: &[&str]) -> String {
        let mut s = self.cfg.prefix.clone();
        for p in parts {
            s.push_str(p);
        }
        s
    }

    fn status(&self, origin: SocketRef, msg_id: u128, status: DeliveryStatus) {
        self.shared.mesh.send(origin.shard, ShardMsg::Status { conn: origin.conn, msg_id, status });
    }

    fn subscribe(&self, verb: &str, channel: &str) {
        if let Some(out) = self.subs.borrow_mut().as_mut() {
            resp::encode_command(&[verb, channel], out);
        }
    }
}

/// A tenant-qualified key as it appears inside Redis keys: `{tenant}:{id}` with `%` and
/// `:` of the tenant percent-encoded, so the mapping stays one-to-one.
pub fn redis_id(k: &str) -> String {
    let (tenant, id) = k.split_once('\x1f').unwrap_or(("", k));
    let mut s = String::with_capacity(k.len() + 4);
    for c in tenant.chars() {
        match c {
            '%' => s.push_str("%25"),
            ':' => s.push_str("%3A"),
            c => s.push(c),
        }
    }
    s.push(':');
    s.push_str(id);
    s
}

/// Inverse of [`redis_id`].
pub fn from_redis_id(s: &str) -> Option<Key> {
    let (tenant, id) = s.split_once(':')?;
    let tenant = tenant.replace("%3A", ":").replace("%25", "%");
    Some(key(&tenant, id))
}

/// The cluster half of the bridge: Redis settings and the inbox the shards write to.
pub struct ClusterPart {
    /// Redis settings.
    pub cfg: BridgeConfig,
    /// Inbox of cluster messages.
    pub inbox: Arc<Inbox<BridgeMsg>>,
    /// Its doorbell.
    pub bell: Doorbell,
}

/// The persistence half of the bridge: Kafka settings and the record inbox.
pub struct PersistPart {
    /// Producer settings.
    pub cfg: kafka::KafkaConfig,
    /// Inbox of records.
    pub inbox: Arc<Inbox<shardgate_shard::record::Record>>,
    /// Its doorbell.
    pub bell: Doorbell,
}

/// Starts the bridge thread with the cluster part, the persistence part, or both.
pub fn start(
    shared: Arc<Shared>,
    cluster: Option<ClusterPart>,
    persist: Option<PersistPart>,
    cpu: Option<usize>,
) -> std::io::Result<ExecutorJoinHandle<()>> {
    let placement = cpu.map(Placement::Fixed).unwrap_or(Placement::Unbound);
    // The persistence part's delivery reports count in their own block (another thread).
    let reports_block = shared.mesh.len() + 1;
    let persister = match persist {
        Some(p) => {
            let producer = kafka::Persister::new(p.cfg, shared.clone(), p.inbox, reports_block)
                .map_err(|e| std::io::Error::other(format!("kafka producer: {e}")))?;
            Some((producer, p.bell))
        }
        None => None,
    };
    LocalExecutorBuilder::new(placement)
        .name("bridge")
        .spawn(move || async move {
            let kafka_task = persister.map(|(producer, bell)| {
                // SAFETY: the doorbell's read end belongs to the bridge alone.
                let bell = unsafe { UnixStream::from_raw_fd(bell.fd.into_raw_fd()) };
                glommio::spawn_local(kafka::run(producer, bell))
            });
            if let Some(c) = cluster {
                // SAFETY: as above.
                let bell = unsafe { UnixStream::from_raw_fd(c.bell.fd.into_raw_fd()) };
                let bridge = Rc::new(Bridge {
                    cfg: c.cfg,
                    shared,
                    inbox: c.inbox,
                    mirror: Default::default(),
                    subs: RefCell::new(None),
                    routes: Default::default(),
                    pending_subs: Default::default(),
                });
                run(bridge, bell).await;
            }
            if let Some(t) = kafka_task {
                t.await;
            }
        })
        .map_err(|e| std::io::Error::other(format!("cannot start the bridge: {e}")))
}

async fn run(b: Rc<Bridge>, mut bell: UnixStream) {
    let mut backoff = Duration::from_millis(100);
    while !b.shared.stopping.load(Ordering::Relaxed) {
        let timeout = Duration::from_secs(2);
        let conns = async {
            Ok::<_, std::io::Error>((
                RedisConn::connect(&b.cfg.redis, timeout).await?,
                RedisConn::connect(&b.cfg.redis, timeout).await?,
            ))
        };
        match conns.await {
            Ok((cmd, sub)) => {
                backoff = Duration::from_millis(100);
                b.m().inc(Counter::RedisConnects);
                b.m().add(Counter::RedisUp, 1);
                info!(
                    server = &*b.cfg.server_id,
                    "connected to redis {}:{}", b.cfg.redis.host, b.cfg.redis.port
                );
                if let Err(e) = session(&b, cmd, sub, &mut bell).await {
                    warn!("redis connection lost: {e}; serving local traffic, reconnecting");
                }
                b.m().dec(Counter::RedisUp);
                *b.subs.borrow_mut() = None;
                // Joins waiting for a subscription get their answer now; the channel is
                // subscribed again on reconnect.
                let channels: Vec<String> = b.pending_subs.borrow().keys().cloned().collect();
                for ch in channels {
                    release_joins(&b, &ch);
                }
            }
            Err(e) => warn!(
                "cannot reach redis {}:{}: {e}; retrying in {backoff:?}",
                b.cfg.redis.host, b.cfg.redis.port
            ),
        }
        // Disconnected: keep draining the inbox (local fallback) until the next attempt.
        let until = std::time::Instant::now() + backoff;
        while std::time::Instant::now() < until && !b.shared.stopping.load(Ordering::Relaxed) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            wait_inbox(&b, &mut bell, left).await;
            let mut batch = Vec::new();
            b.inbox.drain(1024, &mut batch);
            for msg in batch {
                offline(&b, msg);
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Waits until the inbox has work or `max` passes.
async fn wait_inbox(b: &Bridge, bell: &mut UnixStream, max: Duration) {
    wait_bell(&b.inbox, bell, max).await
}

/// Waits until `inbox` has work (its doorbell rang) or `max` passes.
pub(crate) async fn wait_bell<T>(inbox: &Inbox<T>, bell: &mut UnixStream, max: Duration) {
    let mut ring = [0u8; 64];
    let ready = poll_fn(|cx| {
        if inbox.backlog() > 0 {
            return Poll::Ready(());
        }
        match Pin::new(&mut *bell).poll_read(cx, &mut ring) {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    });
    ready.or(async { glommio::timer::sleep(max).await }).await;
}

/// Handles a message while Redis is unreachable: local delivery where possible, the
/// rest counted as unroutable; registrations only update the mirror.
fn offline(b: &Bridge, msg: BridgeMsg) {
    match msg {
        BridgeMsg::ToUser { user, frame, msg_id, origin } => {
            let shards = b.mirror.borrow().shards_of(&user);
            if shards.is_empty() {
                b.m().inc(Counter::Unroutable);
                b.status(origin, msg_id, DeliveryStatus::Sent);
            }
            deliver(b, &shards, &user, &frame, msg_id, origin.into());
        }
        BridgeMsg::Watch { user, socket } => {
            let online = !b.mirror.borrow().shards_of(&user).is_empty();
            let msg = ShardMsg::Presence { user, conn: Some(socket.conn), online, last_seen: 0 };
            b.shared.mesh.send(socket.shard, msg);
        }
        BridgeMsg::Bounce { origin, msg_id, .. } => {
            b.m().inc(Counter::Unroutable);
            if origin.server.is_none() {
                b.status(SocketRef { shard: origin.shard, conn: origin.conn }, msg_id, DeliveryStatus::Sent);
            }
        }
        BridgeMsg::RoomPublish { .. } | BridgeMsg::Ack { .. } => b.m().inc(Counter::Unroutable),
        BridgeMsg::Typing { .. } => {}
        BridgeMsg::RoomJoin { socket, ref room, ack, .. } => {
            record(b, &msg);
            // Not subscribed while Redis is down: the room works locally; the channel is
            // subscribed on reconnect.
            b.shared
                .mesh
                .send(socket.shard, ShardMsg::RoomReady { conn: socket.conn, room: room.clone(), ack });
        }
        BridgeMsg::SocketUp { socket, .. } => {
            record(b, &msg);
            // Unregistered for now (re-registered on reconnect): answer the CONNECT.
            b.shared.mesh.send(socket.shard, ShardMsg::Registered { conn: socket.conn, frames: Vec::new() });
        }
        other => record(b, &other),
    }
}

/// Queues a `presence.changes` record (cluster mode decides first / last socket in Redis).
fn persist_presence(b: &Bridge, user: &str, online: bool) {
    if let Some(inbox) = &b.shared.persist {
        let (tenant, id) = user.split_once('\x1f').unwrap_or(("", user));
        let now = now_ms().parse().unwrap_or(0);
        inbox.send(shardgate_shard::record::presence(tenant, id, online, now));
    }
}

/// Answers the joins that waited for `channel`'s subscription.
fn release_joins(b: &Bridge, channel: &str) {
    let waiters = b.pending_subs.borrow_mut().remove(channel).unwrap_or_default();
    for (socket, room, ack) in waiters {
        b.shared.mesh.send(socket.shard, ShardMsg::RoomReady { conn: socket.conn, room, ack });
    }
}

/// Hands a 1:1 frame to the local shards holding sockets of `user`.
fn deliver(b: &Bridge, shards: &[ShardId], user: &Key, frame: &Frame, msg_id: u128, origin: Origin) {
    for &s in shards {
        let msg = ShardMsg::DeliverUser {
            user: user.clone(),
            frame: frame.clone(),
            msg_id,
            origin: origin.clone(),
        };
        b.shared.mesh.send(s, msg);
    }
}

/// Updates the mirror for registration messages.
fn record(b: &Bridge, msg: &BridgeMsg) {
    let mut m = b.mirror.borrow_mut();
    match msg {
        BridgeMsg::SocketUp { user, sid, socket } => {
            m.sockets.insert(sid.clone(), (user.clone(), socket.shard));
            let v = m.users.entry(user.clone()).or_default();
            match v.iter_mut().find(|(s, _)| *s == socket.shard) {
                Some((_, n)) => *n += 1,
                None => v.push((socket.shard, 1)),
            }
        }
        BridgeMsg::SocketDown { user, sid, shard } => {
            m.sockets.remove(sid);
            if let Some(v) = m.users.get_mut(user) {
                if let Some((_, n)) = v.iter_mut().find(|(s, _)| s == shard) {
                    *n = n.saturating_sub(1);
                }
                v.retain(|&(_, n)| n > 0);
                if v.is_empty() {
                    m.users.remove(user);
                }
            }
        }
        BridgeMsg::RoomJoin { room, sid, .. } => {
            m.rooms.entry(room.clone()).or_default().insert(sid.clone());
        }
        BridgeMsg::RoomLeave { room, sid } => {
            if let Some(set) = m.rooms.get_mut(room) {
                set.remove(sid);
                if set.is_empty() {
                    m.rooms.remove(room);
                }
            }
        }
        _ => {}
    }
}

/// A batch of pipelined commands and what to do with each reply.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    then: Vec<Then>,
}

impl Batch {
    fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A], then: Then) {
        resp::encode_command(args, &mut self.buf);
        self.then.push(then);
    }
}

fn now_ms() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
        .to_string()
}

/// Turns one shard message into commands.
fn plan(b: &Bridge, msg: BridgeMsg, batch: &mut Batch) {
    let c = &b.cfg;
    let p = c.prefix.as_str();
    let me = &*c.server_id;
    record(b, &msg);
    match msg {
        BridgeMsg::SocketUp { user, sid, socket } => {
            let ttl = c.presence_ttl_secs.to_string();
            batch.cmd(
                &["EVAL", scripts::UP, "0", p, me, &sid, &redis_id(&user), &now_ms(), &ttl],
                Then::Drain { socket, answer: true, user: user.clone() },
            );
        }
        BridgeMsg::SocketDown { user, sid, .. } => {
            let keep = c.presence_retention_secs.to_string();
            batch.cmd(
                &["EVAL", scripts::DOWN, "0", p, me, &sid, &redis_id(&user), &now_ms(), &keep],
                Then::Down(user.clone()),
            );
        }
        BridgeMsg::RoomJoin { room, sid, socket, ack } => {
            let r = redis_id(&room);
            let channel = b.k(&["room:", &r]);
            batch.cmd(&["SADD", &channel, &format!("{me}|{sid}")], Then::Ignore);
            let first = b.mirror.borrow().rooms.get(&room).map(|s| s.len() == 1).unwrap_or(false);
            let mut pending = b.pending_subs.borrow_mut();
            if first {
                batch.cmd(&["SADD", &b.k(&["rooms:", me]), &r], Then::Ignore);
                b.subscribe("SUBSCRIBE", &channel);
                pending.entry(channel).or_default().push((socket, room, ack));
            } else if let Some(waiters) = pending.get_mut(&channel) {
                waiters.push((socket, room, ack));
            } else {
                b.shared.mesh.send(socket.shard, ShardMsg::RoomReady { conn: socket.conn, room, ack });
            }
        }
        BridgeMsg::RoomLeave { room, sid } => {
            let r = redis_id(&room);
            batch.cmd(&["SREM", &b.k(&["room:", &r]), &format!("{me}|{sid}")], Then::Ignore);
            if !b.mirror.borrow().rooms.contains_key(&room) {
                batch.cmd(&["SREM", &b.k(&["rooms:", me]), &r], Then::Ignore);
                b.subscribe("UNSUBSCRIBE", &b.k(&["room:", &r]));
            }
        }
        BridgeMsg::RoomPublish { room, frame } => {
            let mut env = Vec::with_capacity(frame.len() + me.len() + 2);
            env.extend_from_slice(&(me.len() as u16).to_be_bytes());
            env.extend_from_slice(me.as_bytes());
            env.extend_from_slice(&frame);
            batch.cmd(
                &[b"PUBLISH".as_slice(), b.k(&["room:", &redis_id(&room)]).as_bytes(), &env],
                Then::Ignore,
            );
        }
        BridgeMsg::ToUser { user, frame, msg_id, origin } => {
            let cached = b.routes.borrow_mut().get(&user);
            if let Some(servers) = cached {
                let local = b.mirror.borrow().shards_of(&user);
                if !(servers.is_empty() && local.is_empty()) {
                    b.m().inc(Counter::RouteCacheHits);
                    deliver(b, &local, &user, &frame, msg_id, origin.into());
                    let env = envelope::deliver(&user, msg_id, me, origin.shard, origin.conn, &frame);
                    let tally = Rc::new(std::cell::Cell::new((servers.len(), 0)));
                    for server in servers.iter() {
                        let then = Then::Cached {
                            user: user.clone(),
                            frame: frame.clone(),
                            msg_id,
                            origin,
                            tally: tally.clone(),
                            local: !local.is_empty(),
                        };
                        batch.cmd(&[b"PUBLISH".as_slice(), b.k(&["server:", server]).as_bytes(), &env], then);
                    }
                    return;
                }
                b.routes.borrow_mut().invalidate(&user);
            }
            let epoch = b.routes.borrow().epoch;
            let f = frame.clone();
            let env = envelope::deliver(&user, msg_id, me, origin.shard, origin.conn, &frame);
            let (cap, ttl) = (c.offline_queue_len.max(1).to_string(), c.offline_ttl_secs.to_string());
            let u = redis_id(&user);
            let args: [&[u8]; 10] = [
                b"EVAL",
                scripts::ROUTE.as_bytes(),
                b"0",
                p.as_bytes(),
                me.as_bytes(),
                u.as_bytes(),
                &env,
                cap.as_bytes(),
                ttl.as_bytes(),
                &f,
            ];
            batch.cmd(&args, Then::Route { user, frame, msg_id, origin, epoch });
        }
        BridgeMsg::Ack { origin, msg_id, status } => {
            let Some(server) = origin.server.as_deref() else { return };
            let env = envelope::ack(msg_id, origin.shard, origin.conn, status);
            batch.cmd(&[b"PUBLISH".as_slice(), b.k(&["server:", server]).as_bytes(), &env], Then::Ignore);
        }
        BridgeMsg::Bounce { user, frame, msg_id, origin } => {
            let (cap, ttl) = (c.offline_queue_len.max(1).to_string(), c.offline_ttl_secs.to_string());
            let u = redis_id(&user);
            let args: [&[u8]; 8] = [
                b"EVAL",
                scripts::QUEUE_IF_OFFLINE.as_bytes(),
                b"0",
                p.as_bytes(),
                u.as_bytes(),
                cap.as_bytes(),
                ttl.as_bytes(),
                &frame,
            ];
            batch.cmd(&args, Then::Bounced { origin, msg_id });
        }
        BridgeMsg::Watch { user, socket } => {
            batch.cmd(&["GET", &b.k(&["presence:", &redis_id(&user)])], Then::Presence { user, socket });
        }
        BridgeMsg::Typing { room, user, on } => {
            let k = b.k(&["typing:", &redis_id(&room)]);
            if on {
                let until = (now_ms().parse::<u64>().unwrap_or(0) + c.typing_ttl_ms).to_string();
                batch.cmd(&["HSET", &k, &user, &until], Then::Ignore);
                batch.cmd(&["PEXPIRE", &k, &c.typing_ttl_ms.to_string()], Then::Ignore);
            } else {
                batch.cmd(&["HDEL", &k, &user], Then::Ignore);
            }
        }
    }
}

/// Binary envelopes on `server:{id}` channels.
mod envelope {
    use super::*;

    /// `D`: deliver `frame` to `user`'s sockets; origin server, shard, conn for the ack.
    pub fn deliver(
        user: &str,
        msg_id: u128,
        server: &str,
        shard: ShardId,
        conn: ConnId,
        frame: &[u8],
    ) -> Vec<u8> {
        let mut v = Vec::with_capacity(frame.len() + user.len() + server.len() + 40);
        v.push(b'D');
        v.extend_from_slice(&(user.len() as u16).to_be_bytes());
        v.extend_from_slice(user.as_bytes());
        v.extend_from_slice(&msg_id.to_be_bytes());
        v.extend_from_slice(&(server.len() as u16).to_be_bytes());
        v.extend_from_slice(server.as_bytes());
        v.extend_from_slice(&(shard as u16).to_be_bytes());
        v.extend_from_slice(&conn.as_u64().to_be_bytes());
        v.extend_from_slice(frame);
        v
    }

    /// `A`: the outcome of message `msg_id` for the origin socket.
    pub fn ack(msg_id: u128, shard: ShardId, conn: ConnId, status: DeliveryStatus) -> Vec<u8> {
        let mut v = Vec::with_capacity(28);
        v.push(b'A');
        v.extend_from_slice(&msg_id.to_be_bytes());
        v.extend_from_slice(&(shard as u16).to_be_bytes());
        v.extend_from_slice(&conn.as_u64().to_be_bytes());
        v.push(match status {
            DeliveryStatus::Delivered => 0,
            DeliveryStatus::Queued => 1,
            DeliveryStatus::Sent => 2,
        });
        v
    }

    /// A cursor over an envelope; every read is bounds-checked.
    pub struct Reader<'a>(pub &'a [u8]);

    impl<'a> Reader<'a> {
        pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        pub fn u16(&mut self) -> Option<u16> {
            self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
        }
        pub fn u64(&mut self) -> Option<u64> {
            self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
        }
        pub fn u128(&mut self) -> Option<u128> {
            self.take(16).and_then(|b| b.try_into().ok()).map(u128::from_be_bytes)
        }
        pub fn str(&mut self) -> Option<&'a str> {
            let n = self.u16()? as usize;
            std::str::from_utf8(self.take(n)?).ok()
        }
    }
}

/// Applies the reply of one command.
fn apply(b: &Bridge, then: Then, reply: Reply, followups: &mut Batch) {
    if let Reply::Error(e) = &reply {
        warn!("redis error: {e}");
    }
    match then {
        Then::Down(user) => {
            if reply == Reply::Integer(1) {
                persist_presence(b, &user, false);
            }
        }
        Then::Ignore | Then::Swept => {
            if let (Then::Swept, Reply::Integer(n)) = (&then, &reply) {
                b.m().add(Counter::SweptSockets, *n as u64);
            }
        }
        Then::Drain { socket, answer, user } => {
            let items = match reply {
                Reply::Array(items) => items,
                _ => Vec::new(),
            };
            if items.first() == Some(&Reply::Integer(1)) {
                persist_presence(b, &user, true);
            }
            let frames: Vec<Frame> =
                items.iter().skip(1).filter_map(resp::as_bytes).map(Frame::from).collect();
            let conn = socket.conn;
            if answer {
                b.shared.mesh.send(socket.shard, ShardMsg::Registered { conn, frames });
            } else if !frames.is_empty() {
                b.shared.mesh.send(socket.shard, ShardMsg::OfflineDrain { conn, frames });
            }
        }
        Then::Cached { user, frame, msg_id, origin, tally, local } => {
            let (pending, reached) = tally.get();
            let got = if let Reply::Integer(n) = reply { n } else { 0 };
            if got == 0 {
                b.routes.borrow_mut().invalidate(&user);
            }
            tally.set((pending.saturating_sub(1), reached + got));
            if pending == 1 && reached + got == 0 && !local {
                // Every cached server was gone: ask the registry.
                plan(b, BridgeMsg::ToUser { user, frame, msg_id, origin }, followups);
            }
        }
        Then::Route { user, frame, msg_id, origin, epoch } => match reply {
            Reply::Array(items) => {
                let reached = match items.first() {
                    Some(Reply::Integer(n)) => *n,
                    _ => 0,
                };
                if reached < 0 {
                    b.m().inc(Counter::OfflineQueued);
                    b.status(origin, msg_id, DeliveryStatus::Queued);
                    return;
                }
                let servers: Rc<[Arc<str>]> = items
                    .get(1)
                    .and_then(resp::as_bytes)
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .map(|csv| csv.split(',').filter(|s| !s.is_empty()).map(Arc::from).collect())
                    .unwrap_or_default();
                let sids = items.get(2..).unwrap_or_default();
                if reached > 0 || !sids.is_empty() {
                    b.routes.borrow_mut().put(user.clone(), servers, epoch);
                }
                let mut shards: Vec<ShardId> = sids
                    .iter()
                    .filter_map(resp::as_bytes)
                    .filter_map(|sid| parse_sid(std::str::from_utf8(sid).ok()?))
                    .map(|(shard, _)| shard)
                    .collect();
                shards.sort_unstable();
                shards.dedup();
                deliver(b, &shards, &user, &frame, msg_id, origin.into());
            }
            _ => b.status(origin, msg_id, DeliveryStatus::Sent),
        },
        Then::Bounced { origin, msg_id } => {
            if reply == Reply::Integer(1) {
                b.m().inc(Counter::OfflineQueued);
                let status = DeliveryStatus::Queued;
                match origin.server {
                    None => b.status(SocketRef { shard: origin.shard, conn: origin.conn }, msg_id, status),
                    Some(_) => plan(b, BridgeMsg::Ack { origin, msg_id, status }, followups),
                }
            }
        }
        Then::Presence { user, socket } => {
            let v = resp::as_bytes(&reply).and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("");
            let (status, seen) = v.split_once('|').unwrap_or(("offline", "0"));
            let msg = ShardMsg::Presence {
                user,
                conn: Some(socket.conn),
                online: status == "online",
                last_seen: seen.parse().unwrap_or(0),
            };
            b.shared.mesh.send(socket.shard, msg);
        }
        Then::Nodes => {
            if let Reply::Array(ids) = reply {
                let (now, keep) = (now_ms(), b.cfg.presence_retention_secs.to_string());
                for id in ids.iter().filter_map(resp::as_bytes).filter_map(|i| std::str::from_utf8(i).ok()) {
                    if id != &*b.cfg.server_id {
                        followups.cmd(
                            &["EVAL", scripts::SWEEP, "0", &b.cfg.prefix, id, &now, &keep, "check"],
                            Then::Swept,
                        );
                    }
                }
            }
        }
    }
}

/// Runs one connected session; returns when either connection fails.
async fn session(
    b: &Rc<Bridge>,
    mut cmd: RedisConn,
    mut sub: RedisConn,
    bell: &mut UnixStream,
) -> std::io::Result<()> {
    let me = b.cfg.server_id.clone();
    // Clear what an earlier session of this process left, then register everything live.
    let mut batch = Batch::default();
    let (now, keep) = (now_ms(), b.cfg.presence_retention_secs.to_string());
    batch.cmd(&["EVAL", scripts::SWEEP, "0", &b.cfg.prefix, &me, &now, &keep, "force"], Then::Ignore);
    liveness(b, &mut batch);
    let (sockets, rooms) = {
        let m = b.mirror.borrow();
        (m.sockets.clone(), m.rooms.clone())
    };
    // Changes may have been missed while disconnected: start the route cache over.
    b.routes.borrow_mut().clear();
    let mut channels = vec![b.k(&["registry:changes"]), b.k(&["server:", &me]), b.k(&["presence:updates"])];
    for (sid, (user, _)) in sockets {
        let Some((shard, conn)) = parse_sid(&sid) else { continue };
        let ttl = b.cfg.presence_ttl_secs.to_string();
        batch.cmd(
            &["EVAL", scripts::UP, "0", &b.cfg.prefix, &me, &sid, &redis_id(&user), &now, &ttl],
            Then::Drain { socket: SocketRef { shard, conn }, answer: false, user: user.clone() },
        );
    }
    for (room, sids) in rooms {
        let r = redis_id(&room);
        batch.cmd(&["SADD", &b.k(&["rooms:", &me]), &r], Then::Ignore);
        for sid in sids {
            batch.cmd(&["SADD", &b.k(&["room:", &r]), &format!("{me}|{sid}")], Then::Ignore);
        }
        channels.push(b.k(&["room:", &r]));
    }
    // Subscribe first, and only then register: a socket must never be in the registry
    // while its node is deaf to its server channel (messages to it would be queued).
    let mut subscribe = Vec::new();
    for ch in &channels {
        resp::encode_command(&["SUBSCRIBE", ch], &mut subscribe);
    }
    sub.write(&subscribe).await?;
    for _ in &channels {
        let reply = sub.read_reply().await?;
        on_pubsub(b, reply);
    }
    *b.subs.borrow_mut() = Some(Vec::new());
    exec(b, &mut cmd, batch).await?;

    let live_every = Duration::from_millis((b.cfg.liveness_ttl_ms / 3).max(50));
    let presence_every = Duration::from_secs((b.cfg.presence_ttl_secs / 2).max(1));
    let mut next_live = std::time::Instant::now() + live_every;
    let mut next_presence = std::time::Instant::now() + presence_every;
    let mut next_sweep = std::time::Instant::now();
    loop {
        if b.shared.stopping.load(Ordering::Relaxed) {
            return leave(b, &mut cmd, bell).await;
        }
        let pending_subs = b.subs.borrow_mut().as_mut().map(std::mem::take).unwrap_or_default();
        if !pending_subs.is_empty() {
            sub.write(&pending_subs).await?;
        }
        let wake = next_live.min(next_presence).min(next_sweep);
        let max = wake.saturating_duration_since(std::time::Instant::now()).min(Duration::from_millis(200));
        wait_any(b, bell, &mut sub, max).await?;
        // Barrier: every push already received (registry changes above all) is applied
        // before anything in the inbox is routed.
        let mut pushes = Vec::new();
        sub.take_ready(&mut pushes)?;
        for reply in pushes {
            on_pubsub(b, reply);
        }
        let mut batch = Batch::default();
        let now = std::time::Instant::now();
        if now >= next_live {
            next_live = now + live_every;
            liveness(b, &mut batch);
        }
        if now >= next_presence {
            next_presence = now + presence_every;
            let (ts, ttl) = (now_ms(), b.cfg.presence_ttl_secs.to_string());
            let users: Vec<Key> = b.mirror.borrow().users.keys().cloned().collect();
            for u in users {
                batch.cmd(
                    &["SET", &b.k(&["presence:", &redis_id(&u)]), &format!("online|{ts}"), "EX", &ttl],
                    Then::Ignore,
                );
            }
        }
        if now >= next_sweep {
            next_sweep = now + Duration::from_millis(b.cfg.liveness_ttl_ms);
            batch.cmd(&["SMEMBERS", &b.k(&["nodes"])], Then::Nodes);
        }
        let mut msgs = Vec::new();
        b.inbox.drain(4096, &mut msgs);
        for msg in msgs {
            plan(b, msg, &mut batch);
        }
        if !batch.then.is_empty() {
            exec(b, &mut cmd, batch).await?;
        }
    }
}

/// Graceful exit: let the shards close their clients (their unregistrations arrive
/// here and are applied), then take this node out of the registry at once instead of
/// waiting for its liveness key to expire.
async fn leave(b: &Bridge, cmd: &mut RedisConn, bell: &mut UnixStream) -> std::io::Result<()> {
    let until = Instant::now() + Duration::from_secs(4);
    loop {
        let mut batch = Batch::default();
        let mut msgs = Vec::new();
        b.inbox.drain(4096, &mut msgs);
        for msg in msgs {
            plan(b, msg, &mut batch);
        }
        exec(b, cmd, batch).await?;
        if (b.shared.open_connections() == 0 && b.inbox.backlog() == 0) || Instant::now() >= until {
            break;
        }
        wait_inbox(b, bell, Duration::from_millis(20)).await;
    }
    let me = &*b.cfg.server_id;
    let (now, keep) = (now_ms(), b.cfg.presence_retention_secs.to_string());
    let mut batch = Batch::default();
    batch.cmd(&["EVAL", scripts::SWEEP, "0", &b.cfg.prefix, me, &now, &keep, "force"], Then::Swept);
    batch.cmd(&["DEL", &b.k(&["node:", me])], Then::Ignore);
    batch.cmd(&["SREM", &b.k(&["nodes"]), me], Then::Ignore);
    exec(b, cmd, batch).await?;
    info!(server = me, "left the cluster");
    Ok(())
}

fn liveness(b: &Bridge, batch: &mut Batch) {
    let me = &*b.cfg.server_id;
    batch.cmd(&["SET", &b.k(&["node:", me]), "1", "PX", &b.cfg.liveness_ttl_ms.to_string()], Then::Ignore);
    batch.cmd(&["SADD", &b.k(&["nodes"]), me], Then::Ignore);
}

/// Writes a batch, reads every reply in order, applies them; follow-ups run as the next
/// batch.
async fn exec(b: &Bridge, cmd: &mut RedisConn, mut batch: Batch) -> std::io::Result<()> {
    while !batch.then.is_empty() {
        b.m().inc(Counter::RedisBatches);
        b.m().add(Counter::RedisCommands, batch.then.len() as u64);
        cmd.write(&batch.buf).await?;
        let mut followups = Batch::default();
        for then in batch.then {
            let reply = cmd.read_reply().await?;
            apply(b, then, reply, &mut followups);
        }
        batch = followups;
    }
    Ok(())
}

/// Waits until the inbox has work, the pub/sub connection has data, or `max` passes.
async fn wait_any(
    b: &Bridge,
    bell: &mut UnixStream,
    sub: &mut RedisConn,
    max: Duration,
) -> std::io::Result<()> {
    let mut ring = [0u8; 64];
    let ready = poll_fn(|cx| {
        if b.inbox.backlog() > 0 {
            return Poll::Ready(Ok(()));
        }
        if let Poll::Ready(reply) = sub.poll_reply(cx) {
            on_pubsub(b, reply?);
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut *bell).poll_read(cx, &mut ring) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    });
    let timer = async {
        glommio::timer::sleep(max).await;
        Ok(())
    };
    ready.or(timer).await
}

/// One reply or push from the pub/sub connection.
fn on_pubsub(b: &Bridge, reply: Reply) {
    if let Some((channel, payload)) = resp::as_message(&reply) {
        on_push(b, channel, payload);
    } else if let Reply::Array(a) = &reply {
        // ["subscribe", channel, count]: the node now receives that channel.
        if a.first().and_then(resp::as_bytes) == Some(b"subscribe".as_slice()) {
            if let Some(channel) = a.get(1).and_then(resp::as_bytes).map(String::from_utf8_lossy) {
                release_joins(b, &channel);
            }
        }
    }
}

fn on_push(b: &Bridge, channel: &[u8], payload: &[u8]) {
    let Ok(channel) = std::str::from_utf8(channel) else { return };
    let Some(name) = channel.strip_prefix(b.cfg.prefix.as_str()) else { return };
    if let Some(room) = name.strip_prefix("room:") {
        let mut r = envelope::Reader(payload);
        let Some(origin) = r.str() else { return };
        if origin == &*b.cfg.server_id {
            return; // this node delivered it to its own shards already
        }
        let (Some(room), frame) = (from_redis_id(room), Frame::from(r.0)) else { return };
        b.shared.mesh.broadcast(|| ShardMsg::RoomDeliver { room: room.clone(), frame: frame.clone() });
    } else if name == "registry:changes" {
        if let Some(user) = std::str::from_utf8(payload).ok().and_then(from_redis_id) {
            b.routes.borrow_mut().invalidate(&user);
        }
    } else if name == "presence:updates" {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else { return };
        let Some(user) = v["user"].as_str().and_then(from_redis_id) else { return };
        let online = v["status"] == "online";
        let last_seen = v["lastSeen"].as_u64().unwrap_or(0);
        b.shared.mesh.broadcast(|| ShardMsg::Presence { user: user.clone(), conn: None, online, last_seen });
    } else if name.starts_with("server:") {
        let mut r = envelope::Reader(payload);
        match r.take(1) {
            Some(b"D") => {
                let parsed = (|| {
                    let user: Key = r.str()?.into();
                    let msg_id = r.u128()?;
                    let server: Arc<str> = r.str()?.into();
                    let shard = r.u16()? as usize;
                    let conn = ConnId::from_u64(r.u64()?);
                    Some((user, msg_id, Origin { server: Some(server), shard, conn }))
                })();
                let Some((user, msg_id, origin)) = parsed else { return };
                let frame = Frame::from(r.0);
                let shards = b.mirror.borrow().shards_of(&user);
                if shards.is_empty() {
                    b.inbox.send(BridgeMsg::Bounce { user, frame, msg_id, origin });
                    return;
                }
                deliver(b, &shards, &user, &frame, msg_id, origin);
            }
            Some(b"A") => {
                let parsed =
                    (|| Some((r.u128()?, r.u16()? as usize, ConnId::from_u64(r.u64()?), r.take(1)?[0])))();
                let Some((msg_id, shard, conn, st)) = parsed else { return };
                let status = match st {
                    0 => DeliveryStatus::Delivered,
                    1 => DeliveryStatus::Queued,
                    _ => DeliveryStatus::Sent,
                };
                b.status(SocketRef { shard, conn }, msg_id, status);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_ids_are_one_to_one() {
        let a = key("t:1", "u");
        let b = key("t", "1:u");
        assert_ne!(redis_id(&a), redis_id(&b));
        assert_eq!(from_redis_id(&redis_id(&a)).unwrap(), a);
        assert_eq!(from_redis_id(&redis_id(&b)).unwrap(), b);
        let c = key("50%", "x");
        assert_eq!(from_redis_id(&redis_id(&c)).unwrap(), c);
    }

    #[test]
    fn envelopes_round_trip() {
        let conn = ConnId::from_u64(0x1234_0000_0007);
        let d = envelope::deliver("t:bob", 42, "srv", 3, conn, b"frame");
        let mut r = envelope::Reader(&d);
        assert_eq!(r.take(1), Some(&b"D"[..]));
        assert_eq!(
            (r.str(), r.u128(), r.str(), r.u16(), r.u64()),
            (Some("t:bob"), Some(42), Some("srv"), Some(3), Some(conn.as_u64()))
        );
        assert_eq!(r.0, b"frame");
        let mut short = envelope::Reader(&d[..5]);
        short.take(1);
        assert_eq!(short.str(), None);
    }
}
