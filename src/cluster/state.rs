//! The cluster side's state on the bridge thread, and the effects it has on shards.
//!
//! One [`Cluster`] lives on the bridge executor (single-threaded: `RefCell`s, never held
//! across an `.await`). It owns the mirror of this process's registrations, the route
//! cache, the room channels whose SUBSCRIBE is not confirmed yet, and the buffer of
//! (un)subscribe commands for the pub/sub connection. Its methods are the bridge's only
//! ways to reach shards (through the mesh) and Kafka (through the record inbox).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use shardgate_io::envelope::Envelope;
use shardgate_shard::mesh::Inbox;
use shardgate_shard::metrics::ShardMetrics;
use shardgate_shard::msg::{BridgeMsg, DeliveryStatus, Frame, Key, Origin, ShardId, ShardMsg, SocketRef};
use shardgate_shard::runtime::MetricsBlock;
use shardgate_shard::shared::wall_ms;
use shardgate_shard::Shared;

use super::keys::Keys;
use super::mirror::Mirror;
use super::resume::Claims;
use super::route_cache::RouteCache;
use super::Settings;

/// A `join_room` waiting for its room channel's subscription: socket, room, ack id.
pub type JoinWaiter = (SocketRef, Key, Option<u64>);

/// The bridge's cluster state (see the module doc).
pub struct Cluster {
    /// Settings of this node.
    pub settings: Settings,
    /// Key and channel names.
    pub keys: Keys,
    /// The process's shards.
    pub shared: Arc<Shared>,
    /// What shards send to the bridge.
    pub inbox: Arc<Inbox<BridgeMsg>>,
    /// This process's registrations.
    pub mirror: RefCell<Mirror>,
    /// `Some` while connected: (un)subscriptions (`true` to subscribe) waiting for the
    /// pub/sub connections.
    pub subs: RefCell<Option<Vec<(bool, String)>>>,
    /// Connected to a Redis Cluster: server and room channels are sharded (`SPUBLISH`),
    /// and registry and presence changes go on per-user channels.
    pub sharded: Cell<bool>,
    /// Presence subscriptions of local sockets, by watched user (kept across Redis
    /// sessions: on a Redis Cluster, each watched user's channel is subscribed).
    pub watches: RefCell<HashMap<Key, u32>>,
    /// Presence channels whose subscription is not confirmed yet, with the watchers
    /// waiting to be told the current state.
    pub watch_waiters: RefCell<HashMap<String, Vec<(Key, SocketRef)>>>,
    /// Watchers whose channel is live: their presence is read in the next batch.
    pub ready_watches: RefCell<Vec<(Key, SocketRef)>>,
    /// user -> other servers holding their sockets.
    pub routes: RefCell<RouteCache>,
    /// Room channels whose SUBSCRIBE is not confirmed yet, with the joins waiting on it.
    pub pending_subs: RefCell<HashMap<String, Vec<JoinWaiter>>>,
    /// Recovery claims in progress (connection state recovery).
    pub claims: RefCell<Claims>,
    /// RESUME markers received on the pub/sub connection, for the next round.
    pub markers: RefCell<Vec<String>>,
    /// This node's liveness key had expired (or a sweep of it was running) at its last
    /// refresh: its registrations may be gone, so the session starts over.
    pub swept: Cell<bool>,
}

impl Cluster {
    /// A disconnected cluster state for `shared`'s shards.
    pub fn new(settings: Settings, shared: Arc<Shared>, inbox: Arc<Inbox<BridgeMsg>>) -> Cluster {
        Cluster {
            keys: Keys::new(&settings.prefix),
            settings,
            shared,
            inbox,
            mirror: Default::default(),
            subs: RefCell::new(None),
            routes: Default::default(),
            pending_subs: Default::default(),
            claims: Default::default(),
            markers: Default::default(),
            swept: Cell::new(false),
            sharded: Cell::new(false),
            watches: Default::default(),
            watch_waiters: Default::default(),
            ready_watches: Default::default(),
        }
    }

    /// This node's server id.
    pub fn me(&self) -> &str {
        &self.settings.server_id
    }

    /// The bridge thread's counters.
    pub fn m(&self) -> &ShardMetrics {
        self.shared.block(MetricsBlock::Bridge)
    }

    /// Tells the sender's shard the outcome of its message.
    pub fn status(&self, origin: SocketRef, msg_id: u128, status: DeliveryStatus) {
        self.shared.mesh.send(origin.shard, ShardMsg::Status { conn: origin.conn, msg_id, status });
    }

    /// Queues the subscription (`on`) or unsubscription of `channel` for the pub/sub
    /// connections; a no-op while disconnected (everything is subscribed again on
    /// reconnect).
    pub fn subscribe(&self, on: bool, channel: &str) {
        if let Some(out) = self.subs.borrow_mut().as_mut() {
            out.push((on, channel.to_string()));
        }
    }

    /// The command publishing on a server or room channel: `SPUBLISH` on a Redis
    /// Cluster (sharded pub/sub), else `PUBLISH`.
    pub fn publish(&self) -> &'static [u8] {
        if self.sharded.get() {
            b"SPUBLISH"
        } else {
            b"PUBLISH"
        }
    }

    /// Hands a 1:1 frame to the local shards holding sockets of `user`.
    pub fn deliver(&self, shards: &[ShardId], user: &Key, frame: &Frame, msg_id: u128, origin: Origin) {
        for &s in shards {
            let msg = ShardMsg::DeliverUser {
                user: user.clone(),
                frame: frame.clone(),
                msg_id,
                origin: origin.clone(),
            };
            self.shared.mesh.send(s, msg);
        }
    }

    /// Queues a `presence.changes` record (cluster mode decides first / last socket in
    /// Redis, so the bridge, not a home shard, reports it).
    pub fn persist_presence(&self, user: &str, online: bool) {
        if let Some(inbox) = &self.shared.persist {
            let (tenant, id) = user.split_once('\x1f').unwrap_or(("", user));
            inbox.send(shardgate_shard::record::presence(tenant, id, online, wall_ms()));
        }
    }

    /// The channel room `room`'s messages come on: its `{recovery}` channel when
    /// recoverable messages are ordered by one Redis Cluster master, else `room:{T:R}`.
    pub fn room_channel(&self, room: &str) -> String {
        if self.sharded.get() && self.settings.recovery.is_some() {
            self.keys.recovery_room(room)
        } else {
            self.keys.room(room)
        }
    }

    /// The `D` envelope of a 1:1 message from `origin` on this node.
    pub fn deliver_envelope(&self, user: &str, msg_id: u128, origin: SocketRef, frame: &[u8]) -> Vec<u8> {
        let env =
            Envelope::Deliver { user, msg_id, origin_server: self.me(), origin: origin.remote(), frame };
        // User keys are bounded by max_id_len and server ids by validation: both fit a u16.
        env.to_vec().unwrap_or_default()
    }

    /// `'1'` when registry and presence changes go on per-user sharded channels (a Redis
    /// Cluster), as the UP and DOWN scripts take it.
    pub fn per_user(&self) -> &'static str {
        if self.sharded.get() {
            "1"
        } else {
            "0"
        }
    }

    /// Counts a presence subscription to `user` (`on`) or its end; true when it was the
    /// first one, or the last one ended.
    pub fn watch(&self, user: &Key, on: bool) -> bool {
        let mut watches = self.watches.borrow_mut();
        if on {
            let n = watches.entry(user.clone()).or_default();
            *n += 1;
            return *n == 1;
        }
        match watches.get_mut(user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                watches.remove(user);
                true
            }
            None => false,
        }
    }

    /// The watchers that waited for presence channel `channel` are told the state next.
    pub fn release_watchers(&self, channel: &str) {
        let waiters = self.watch_waiters.borrow_mut().remove(channel).unwrap_or_default();
        self.ready_watches.borrow_mut().extend(waiters);
    }

    /// Answers the joins that waited for `channel`'s subscription.
    pub fn release_joins(&self, channel: &str) {
        let waiters = self.pending_subs.borrow_mut().remove(channel).unwrap_or_default();
        for (socket, room, ack) in waiters {
            self.shared.mesh.send(socket.shard, ShardMsg::RoomReady { conn: socket.conn, room, ack });
        }
    }

    /// Answers every join still waiting (the pub/sub connection is gone; the channels
    /// are subscribed again on reconnect).
    pub fn release_all_joins(&self) {
        let channels: Vec<String> = self.pending_subs.borrow().keys().cloned().collect();
        for ch in channels {
            self.release_joins(&ch);
        }
        // Watchers waiting for a presence channel are told after the reconnect.
        let waiting: Vec<String> = self.watch_waiters.borrow().keys().cloned().collect();
        for ch in waiting {
            self.release_watchers(&ch);
        }
    }
}
