//! The bridge's link to Redis: the reconnect loop, the connected loop, the Redis-down
//! mode and the graceful leave.
//!
//! Exactly two Redis connections per process: a command connection that carries the
//! commands of every shard in pipelined batches (one write, then every reply in order),
//! and a pub/sub connection subscribed to `server:{me}`, `presence:updates`,
//! `registry:changes` and the `room:{id}` channels of rooms with local members.
//!
//! Each round of the connected loop applies every pub/sub push already received, writes
//! pending (un)subscriptions, then turns everything in the inbox into one pipelined
//! batch. Applying pushes first is what keeps the route cache honest (route_cache.rs).
//! Redis down never stops a shard: the inbox keeps draining; messages that need Redis
//! are counted as unroutable, 1:1 messages to local users are still delivered.

use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, FutureExt};
use glommio::net::UnixStream;
use shardgate_io::resp::Reply;
use shardgate_shard::mesh::{wait_ring, RING_READ};
use shardgate_shard::metrics::Counter;
use shardgate_shard::msg::{parse_sid, BridgeMsg, DeliveryStatus, ShardMsg, SocketRef};
use tracing::{info, warn};

use super::apply::apply;
use super::batch::{Batch, Sweep, Then};
use super::conns::Conns;
use super::keys::{redis_id, Keys};
use super::plan::{plan, plan_watches, refresh_presence, register, Registration};
use super::pubsub::on_pubsub;
use super::recover;
use super::state::Cluster;
use super::sweep::{liveness, sweep};

/// Time allowed to open one Redis connection (TCP, AUTH, SELECT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First reconnect delay; doubled after each failure.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest reconnect delay (a failed-over Redis Cluster master is replaced within
/// seconds: the node should follow soon after).
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Inbox messages handled per round while Redis is down.
const OFFLINE_BATCH: usize = 1024;
/// Inbox messages planned into one pipelined batch.
const PIPELINE_BATCH: usize = 4096;
/// Longest sleep of the connected loop between checks of its timers.
const IDLE_WAKE: Duration = Duration::from_millis(200);
/// How long a leaving node waits for its shards' unregistrations.
const LEAVE_GRACE: Duration = Duration::from_secs(4);
/// Poll period while leaving.
const LEAVE_POLL: Duration = Duration::from_millis(20);

/// Connects, serves, reconnects with backoff, until the process stops.
pub async fn run(c: Rc<Cluster>, mut bell: UnixStream) {
    let mut backoff = BACKOFF_START;
    let url = c.settings.redis.clone();
    // Every node of the last Redis Cluster slot map: where to reconnect when the
    // configured one is down.
    let mut known: Vec<String> = Vec::new();
    while !c.shared.stopping.load(Ordering::Relaxed) {
        match Conns::open(&url, &known, CONNECT_TIMEOUT).await {
            Ok(conns) => {
                backoff = BACKOFF_START;
                if let Some(map) = conns.map() {
                    known.clone_from(&map.nodes);
                }
                c.m().inc(Counter::RedisConnects);
                c.m().add(Counter::RedisUp, 1);
                match conns.map() {
                    Some(map) => info!(
                        server = c.me(),
                        "connected to the redis cluster: {} masters",
                        map.masters.len()
                    ),
                    None => info!(server = c.me(), "connected to redis {}:{}", url.host, url.port),
                }
                if let Err(e) = connected(&c, conns, &mut bell).await {
                    warn!("redis connection lost: {e}; serving local traffic, reconnecting");
                }
                c.m().dec(Counter::RedisUp);
                *c.subs.borrow_mut() = None;
                // Joins waiting for a subscription get their answer now; the channel is
                // subscribed again on reconnect.
                c.release_all_joins();
                recover::abandon(&c);
            }
            Err(e) => warn!("cannot reach redis {}:{}: {e}; retrying in {backoff:?}", url.host, url.port),
        }
        // Disconnected: keep draining the inbox (local fallback) until the next attempt.
        let until = Instant::now() + backoff;
        while Instant::now() < until && !c.shared.stopping.load(Ordering::Relaxed) {
            wait_ring(&c.inbox, &mut bell, until.saturating_duration_since(Instant::now())).await;
            let mut batch = Vec::new();
            c.inbox.drain(OFFLINE_BATCH, &mut batch);
            for msg in batch {
                offline(&c, msg);
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Handles a message while Redis is unreachable: local delivery where possible, the
/// rest counted as unroutable; registrations only update the mirror.
fn offline(c: &Cluster, msg: BridgeMsg) {
    c.mirror.borrow_mut().observe(&msg);
    match msg {
        BridgeMsg::ToUser { user, frame, msg_id, origin } => {
            let shards = c.mirror.borrow().shards_of(&user);
            if shards.is_empty() {
                c.m().inc(Counter::Unroutable);
                c.status(origin, msg_id, DeliveryStatus::Sent);
            }
            c.deliver(&shards, &user, &frame, msg_id, origin.into());
        }
        BridgeMsg::Unwatch { user } => {
            c.watch(&user, false);
        }
        BridgeMsg::Watch { user, socket } => {
            c.watch(&user, true);
            let online = !c.mirror.borrow().shards_of(&user).is_empty();
            let msg = ShardMsg::Presence { user, conn: Some(socket.conn), online, last_seen: 0 };
            c.shared.mesh.send(socket.shard, msg);
        }
        BridgeMsg::Bounce { origin, msg_id, .. } => {
            c.m().inc(Counter::Unroutable);
            if origin.server.is_none() {
                c.status(SocketRef { shard: origin.shard, conn: origin.conn }, msg_id, DeliveryStatus::Sent);
            }
        }
        BridgeMsg::RoomPublish { .. } | BridgeMsg::Ack { .. } => c.m().inc(Counter::Unroutable),
        BridgeMsg::RoomLogged { room, frame, msg_id, origin } => {
            // Not ordered or logged while Redis is down: local members get it (no offset).
            c.m().inc(Counter::Unroutable);
            c.status(origin, msg_id, DeliveryStatus::Sent);
            let except = Some(origin);
            c.shared.mesh.broadcast(|| ShardMsg::RoomDeliver {
                room: room.clone(),
                frame: frame.clone(),
                except,
            });
        }
        BridgeMsg::Resume { socket, .. } => {
            // Sessions live in Redis: nothing to restore while it is down.
            c.m().inc(Counter::Unroutable);
            c.shared.mesh.send(socket.shard, ShardMsg::Resumed { conn: socket.conn, session: None });
        }
        BridgeMsg::Typing { .. } | BridgeMsg::SocketDown { .. } | BridgeMsg::RoomLeave { .. } => {}
        BridgeMsg::RoomJoin { socket, room, ack, .. } => {
            // Not subscribed while Redis is down: the room works locally; the channel is
            // subscribed on reconnect.
            c.shared.mesh.send(socket.shard, ShardMsg::RoomReady { conn: socket.conn, room, ack });
        }
        BridgeMsg::SocketUp { socket, .. } => {
            // Unregistered for now (re-registered on reconnect): answer the CONNECT.
            c.shared.mesh.send(socket.shard, ShardMsg::Registered { conn: socket.conn, frames: Vec::new() });
        }
    }
}

/// Runs one connected session; returns when a connection fails.
async fn connected(c: &Rc<Cluster>, mut conns: Conns, bell: &mut UnixStream) -> std::io::Result<()> {
    let me = c.me().to_string();
    c.sharded.set(conns.map().is_some());
    // Alive again: unless a sweep of this node is running (then wait for its end).
    let mut batch = Batch::default();
    liveness(c, &mut batch);
    if conns.exec(&batch).await?.first() == Some(&Reply::Integer(2)) {
        return Err(std::io::Error::other("another node is sweeping this node's registrations; waiting"));
    }
    c.swept.set(false);
    // Clear what an earlier session of this process left, then register everything live.
    let mut batch = Batch::default();
    sweep(c, &mut batch, &me, Sweep::Own);
    exec(c, &mut conns, batch).await?;
    let mut batch = Batch::default();
    let mirror = c.mirror.borrow().clone();
    // Changes may have been missed while disconnected: start the route cache over.
    c.routes.borrow_mut().set_per_user(c.sharded.get());
    c.routes.borrow_mut().clear();
    let mut channels = vec![c.keys.server(&me)];
    if c.sharded.get() && c.settings.recovery.is_some() {
        // Recoverable 1:1 messages and RESUME markers, from the recovery slot's master.
        channels.push(c.keys.recovery_server(&me));
    }
    if c.sharded.get() {
        // Registry and presence changes on per-user channels: the presence of every
        // user watched here (registry channels follow the route cache).
        channels.extend(c.watches.borrow().keys().map(|u| c.keys.user_presence(u)));
    } else {
        channels.extend([c.keys.registry_changes(), c.keys.presence_updates()]);
    }
    for (sid, (user, _)) in &mirror.sockets {
        let Some((shard, conn)) = parse_sid(sid) else { continue };
        register(c, &mut batch, user, sid, SocketRef { shard, conn }, Registration::Again);
    }
    for (room, sids) in &mirror.rooms {
        batch.cmd(&["SADD", &c.keys.server_rooms(&me), &redis_id(room)], Then::Ignore);
        for sid in sids {
            batch.cmd(&["SADD", &c.keys.room(room), &Keys::room_member(&me, sid)], Then::Ignore);
        }
        channels.push(c.room_channel(room));
    }
    // Subscribe first, and only then register: a socket must never be in the registry
    // while its node is deaf to its server channel (messages to it would be queued).
    conns.subscribe_all(&channels, |reply| on_pubsub(c, reply)).await?;
    *c.subs.borrow_mut() = Some(Vec::new());
    exec(c, &mut conns, batch).await?;
    // Registered and subscribed: the node may take traffic (a no-op once draining).
    c.shared.mark_ready();

    let s = &c.settings;
    let live_every = Duration::from_millis((s.liveness_ttl_ms / 3).max(50));
    let presence_every = Duration::from_secs((s.presence_ttl_secs / 2).max(1));
    let sweep_every = Duration::from_millis(s.liveness_ttl_ms);
    let mut next_live = Instant::now() + live_every;
    let mut next_presence = Instant::now() + presence_every;
    let mut next_sweep = Instant::now();
    loop {
        if c.shared.stopping.load(Ordering::Relaxed) {
            return leave(c, &mut conns, bell).await;
        }
        if c.swept.get() {
            return Err(std::io::Error::other(
                "this node's liveness key had expired: registering everything again",
            ));
        }
        let pending_subs = c.subs.borrow_mut().as_mut().map(std::mem::take).unwrap_or_default();
        if !pending_subs.is_empty() {
            conns.subscribe(&pending_subs).await?;
        }
        let wake = next_live.min(next_presence).min(next_sweep);
        let max = wake.saturating_duration_since(Instant::now()).min(IDLE_WAKE);
        wait_any(c, bell, &mut conns, max).await?;
        // Barrier: every push already received (registry changes above all) is applied
        // before anything in the inbox is routed.
        let mut pushes = Vec::new();
        conns.take_ready(&mut pushes)?;
        for reply in pushes {
            on_pubsub(c, reply);
        }
        conns.repair().await?;
        c.m().add(Counter::ClusterRedirects, std::mem::take(&mut conns.redirects));
        c.m().add(Counter::ClusterResubscribes, std::mem::take(&mut conns.resubscribes));
        let mut batch = Batch::default();
        let now = Instant::now();
        if now >= next_live {
            next_live = now + live_every;
            liveness(c, &mut batch);
        }
        if now >= next_presence {
            next_presence = now + presence_every;
            refresh_presence(c, &mut batch);
            let gone = c.routes.borrow_mut().prune();
            for user in gone {
                c.subscribe(false, &c.keys.user_registry(&user));
            }
        }
        plan_watches(c, &mut batch);
        if now >= next_sweep {
            next_sweep = now + sweep_every;
            batch.cmd(&["SMEMBERS", &c.keys.nodes()], Then::Nodes);
        }
        recover::plan_ready(c, &mut batch);
        let mut msgs = Vec::new();
        c.inbox.drain(PIPELINE_BATCH, &mut msgs);
        for msg in msgs {
            plan(c, msg, &mut batch);
        }
        if !batch.is_empty() {
            exec(c, &mut conns, batch).await?;
        }
    }
}

/// Graceful exit: let the shards close their clients (their unregistrations arrive
/// here and are applied), then take this node out of the registry at once instead of
/// waiting for its liveness key to expire.
async fn leave(c: &Cluster, conns: &mut Conns, bell: &mut UnixStream) -> std::io::Result<()> {
    let until = Instant::now() + LEAVE_GRACE;
    loop {
        let mut batch = Batch::default();
        let mut msgs = Vec::new();
        c.inbox.drain(PIPELINE_BATCH, &mut msgs);
        for msg in msgs {
            plan(c, msg, &mut batch);
        }
        exec(c, conns, batch).await?;
        if (c.shared.open_connections() == 0 && c.inbox.backlog() == 0) || Instant::now() >= until {
            break;
        }
        wait_ring(&c.inbox, bell, LEAVE_POLL).await;
    }
    let me = c.me();
    let mut batch = Batch::default();
    sweep(c, &mut batch, me, Sweep::Leave);
    exec(c, conns, batch).await?;
    info!(server = me, "left the cluster");
    Ok(())
}

/// Runs a batch and applies every reply in order; follow-ups run as the next batch.
/// When a connection fails, what is still waiting for a reply is answered as if Redis
/// had refused it (senders hear `sent`, counted as unroutable): never silently dropped.
async fn exec(c: &Cluster, conns: &mut Conns, mut batch: Batch) -> std::io::Result<()> {
    while !batch.is_empty() {
        c.m().inc(Counter::RedisBatches);
        c.m().add(Counter::RedisCommands, batch.then.len() as u64);
        let replies = match conns.exec(&batch).await {
            Ok(replies) => replies,
            Err(e) => {
                abandon(c, batch.then);
                return Err(e);
            }
        };
        let mut followups = Batch::default();
        for (then, reply) in batch.then.into_iter().zip(replies) {
            apply(c, then, reply, &mut followups);
        }
        batch = followups;
    }
    Ok(())
}

/// Answers the commands of a batch lost with its connection.
fn abandon(c: &Cluster, thens: Vec<Then>) {
    let lost = Reply::Error("connection lost".into());
    let mut ignored = Batch::default();
    for then in thens {
        match then {
            Then::Route { .. }
            | Then::Cached { .. }
            | Then::Logged { .. }
            | Then::LoggedUser { .. }
            | Then::Bounced { .. } => {
                c.m().inc(Counter::Unroutable);
                apply(c, then, lost.clone(), &mut ignored);
            }
            Then::Drain { .. } | Then::Presence { .. } | Then::ResumeRead { .. } | Then::Resume { .. } => {
                apply(c, then, lost.clone(), &mut ignored)
            }
            _ => {}
        }
    }
}

/// Waits until the inbox has work, a pub/sub connection has data, or `max` passes.
async fn wait_any(
    c: &Cluster,
    bell: &mut UnixStream,
    conns: &mut Conns,
    max: Duration,
) -> std::io::Result<()> {
    let mut ring = [0u8; RING_READ];
    let ready = poll_fn(|cx| {
        if c.inbox.backlog() > 0 {
            return Poll::Ready(Ok(()));
        }
        if let Poll::Ready(reply) = conns.poll_push(cx) {
            on_pubsub(c, reply?);
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
