//! What shards say to each other through the [`crate::mesh`].
//!
//! Every cross-shard effect is one of these messages; no shard touches another's state.
//! Frames travel pre-encoded (`Arc<[u8]>`: WebSocket frame bytes, identical for every
//! recipient because server frames are unmasked), so a room message is encoded once per
//! process, not once per member.

use std::sync::Arc;

use shardgate_io::envelope::AckStatus;

pub use crate::ids::{key, key_id, parse_sid, sid, Frame, Key, Origin, ShardId, SocketRef};
use crate::slab::ConnId;

/// What shards (and the bridge's own tasks) ask the bridge to do in cluster mode.
#[derive(Debug)]
pub enum BridgeMsg {
    /// An authenticated socket came up: register it, mark the user online, drain the
    /// user's offline queue to it.
    SocketUp {
        /// User key.
        user: Key,
        /// Socket id (`sid`).
        sid: String,
        /// Where it lives.
        socket: SocketRef,
        /// Its private session id, when connection state recovery is on: the bridge keeps
        /// the session (user, rooms) in Redis under it.
        pid: Option<Arc<str>>,
    },
    /// A socket closed: unregister it, mark the user offline if it was the last.
    SocketDown {
        /// User key.
        user: Key,
        /// Socket id.
        sid: String,
        /// Shard it lived on.
        shard: ShardId,
        /// Keep its recovery session for `max_disconnection_ms` (false when the client
        /// said goodbye itself: it will not come back for it).
        keep: bool,
    },
    /// A reconnecting client presented `pid` (and the offset of the last event it
    /// processed): restore that session on `socket` if it is `user`'s, answered with
    /// `ShardMsg::Resumed`.
    Resume {
        /// User key from the new token.
        user: Key,
        /// Socket id of the new socket.
        sid: String,
        /// The new socket.
        socket: SocketRef,
        /// The private session id presented.
        pid: Arc<str>,
        /// The last offset the client processed (`None`: it processed none).
        offset: Option<u64>,
    },
    /// A socket joined a room.
    RoomJoin {
        /// Room key.
        room: Key,
        /// Socket id.
        sid: String,
        /// The joining socket, answered with `RoomReady` once the node receives the room.
        socket: SocketRef,
        /// Ack id of the client's `join_room`.
        ack: Option<u64>,
    },
    /// A socket left a room.
    RoomLeave {
        /// Room key.
        room: Key,
        /// Socket id.
        sid: String,
        /// The socket left the room itself (`leave_room`): its recovery session forgets
        /// the room too. False when the socket closes (the session keeps its rooms).
        forget: bool,
    },
    /// Publish a room frame to the other cluster members.
    RoomPublish {
        /// Room key.
        room: Key,
        /// Encoded event.
        frame: Frame,
    },
    /// A room message under connection state recovery: logged and published by Redis,
    /// delivered to every member (local ones too) from the room's channel.
    RoomLogged {
        /// Room key.
        room: Key,
        /// Encoded `message:new`, without its offset.
        frame: Frame,
        /// Message id: the sender hears `sent` once Redis has logged it.
        msg_id: u128,
        /// Sender, who does not get it.
        origin: SocketRef,
    },
    /// Route a 1:1 message through the registry.
    ToUser {
        /// Recipient key.
        user: Key,
        /// Encoded `message:new`.
        frame: Frame,
        /// Message id.
        msg_id: u128,
        /// Sender.
        origin: SocketRef,
    },
    /// Tell a remote origin the outcome of its message.
    Ack {
        /// The remote sender.
        origin: Origin,
        /// Message id.
        msg_id: u128,
        /// Outcome.
        status: DeliveryStatus,
    },
    /// A delivery found no local socket (closed meanwhile): queue it if the user is
    /// offline everywhere, and tell the origin.
    Bounce {
        /// Recipient key.
        user: Key,
        /// Encoded `message:new`.
        frame: Frame,
        /// Message id.
        msg_id: u128,
        /// Sender.
        origin: Origin,
    },
    /// A socket subscribes to `user`'s presence: answer the current state.
    Watch {
        /// Watched user key.
        user: Key,
        /// Subscriber.
        socket: SocketRef,
    },
    /// One presence subscription to `user` ended (a Redis Cluster node subscribes to a
    /// user's presence channel while it has watchers of that user).
    Unwatch {
        /// Watched user key.
        user: Key,
    },
    /// A typing indicator started or stopped (`typing:{room}` key).
    Typing {
        /// Room key.
        room: Key,
        /// User id (without tenant).
        user: Arc<str>,
        /// Started (true) or stopped.
        on: bool,
    },
}

/// A session restored by connection state recovery.
#[derive(Debug)]
pub struct Restored {
    /// Its user.
    pub user: Key,
    /// Its private session id.
    pub pid: Arc<str>,
    /// Its rooms.
    pub rooms: Vec<Key>,
    /// Missed messages, oldest first, with their offsets.
    pub frames: Vec<Frame>,
}

/// Outcome of a 1:1 message, reported to the sender as `message:sent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// A socket of the recipient received it.
    Delivered,
    /// The recipient was offline; it waits in their offline queue.
    Queued,
    /// Accepted, with no delivery report within the report timeout.
    Sent,
}

/// The status as it travels between nodes.
impl From<DeliveryStatus> for AckStatus {
    fn from(s: DeliveryStatus) -> AckStatus {
        match s {
            DeliveryStatus::Delivered => AckStatus::Delivered,
            DeliveryStatus::Queued => AckStatus::Queued,
            DeliveryStatus::Sent => AckStatus::Sent,
        }
    }
}

impl From<AckStatus> for DeliveryStatus {
    fn from(s: AckStatus) -> DeliveryStatus {
        match s {
            AckStatus::Delivered => DeliveryStatus::Delivered,
            AckStatus::Queued => DeliveryStatus::Queued,
            AckStatus::Sent => DeliveryStatus::Sent,
        }
    }
}

impl DeliveryStatus {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Sent => "sent",
        }
    }
}

/// A message between shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// A client connection accepted by another shard whose request belongs to a session
    /// of this one (long-polling, upgrade): serve it here.
    Adopt {
        /// The connection's socket (a duplicate; the sender dropped its own).
        fd: std::os::fd::OwnedFd,
        /// What the sender read from it: the request head and anything after.
        read: Vec<u8>,
    },
    /// From the shard's parking watcher: parked WebSocket `0` is readable (data, its
    /// peer's close or an error).
    Readable(ConnId),
    /// Deliver `frame` to every local member of `room` but `except`.
    RoomDeliver {
        /// Room key.
        room: Key,
        /// Encoded `message:new` / `typing` event.
        frame: Frame,
        /// The sender, when it is a socket of this process that must not get it.
        except: Option<SocketRef>,
    },
    /// To the user's home shard: a socket of `user` came up at `socket`.
    UserUp {
        /// User key.
        user: Key,
        /// The new socket.
        socket: SocketRef,
        /// Its recovery session, opened in the journal (recovery on).
        pid: Option<Arc<str>>,
    },
    /// To the user's home shard: a socket of `user` closed.
    UserDown {
        /// User key.
        user: Key,
        /// The closed socket.
        socket: SocketRef,
        /// Its recovery session, and whether it stays restorable.
        pid: Option<(Arc<str>, bool)>,
    },
    /// To shard 0 (recovery on the embedded bus): session `pid` joined or left `room`.
    SessionRoom {
        /// The session.
        pid: Arc<str>,
        /// Room key.
        room: Key,
        /// Joined (true) or left.
        joined: bool,
    },
    /// To shard 0 (recovery on the embedded bus): restore session `pid` on `socket`,
    /// answered with `Resumed`.
    Resume {
        /// User key from the new token.
        user: Key,
        /// The new socket.
        socket: SocketRef,
        /// The session claimed.
        pid: Arc<str>,
        /// The client's last processed offset.
        offset: Option<u64>,
    },
    /// To shard 0 (recovery on the embedded bus): a room message to sequence, log and
    /// send to every shard.
    RoomLogged {
        /// Room key.
        room: Key,
        /// Encoded `message:new`, without its offset.
        frame: Frame,
        /// Message id (the sender hears `sent`).
        msg_id: u128,
        /// Sender, who does not get it.
        origin: SocketRef,
    },
    /// To the user's home shard: route a 1:1 message.
    ToUser {
        /// Recipient key.
        user: Key,
        /// Encoded `message:new`.
        frame: Frame,
        /// Message id.
        msg_id: u128,
        /// Sender socket, which gets the delivery status.
        origin: SocketRef,
    },
    /// To a shard holding sockets of `user`: deliver to all of them.
    DeliverUser {
        /// Recipient key.
        user: Key,
        /// Encoded `message:new`.
        frame: Frame,
        /// Message id.
        msg_id: u128,
        /// Sender, in this process or another.
        origin: Origin,
    },
    /// To the home shard: a `DeliverUser` found no socket (it closed meanwhile).
    Bounce {
        /// Recipient key.
        user: Key,
        /// Encoded `message:new`.
        frame: Frame,
        /// Message id.
        msg_id: u128,
        /// Sender.
        origin: Origin,
    },
    /// To the sender's shard: the outcome of message `msg_id`.
    Status {
        /// Sender connection.
        conn: ConnId,
        /// Message id.
        msg_id: u128,
        /// Outcome.
        status: DeliveryStatus,
    },
    /// To the shard of a socket that just came up: its user's offline queue, in order.
    OfflineDrain {
        /// The socket.
        conn: ConnId,
        /// Queued `message:new` frames, oldest first.
        frames: Vec<Frame>,
    },
    /// From the bridge: socket `conn` is registered cluster-wide. The shard answers the
    /// client's CONNECT only now, so a connected client is reachable from every node;
    /// `frames` is the user's offline queue, oldest first.
    Registered {
        /// The socket.
        conn: ConnId,
        /// Queued `message:new` frames.
        frames: Vec<Frame>,
    },
    /// From the bridge: the outcome of a `BridgeMsg::Resume`. `Some`: the session is
    /// restored (registered, subscribed): join `rooms` and send `frames` (the missed
    /// messages, in order, with their offsets) after the CONNECT answer. `None`: nothing
    /// to restore; connect as a new session.
    Resumed {
        /// The socket.
        conn: ConnId,
        /// The restored session.
        session: Option<Restored>,
    },
    /// From the bridge: the node receives room `room` from the cluster now; answer the
    /// socket's `join_room`.
    RoomReady {
        /// The joining socket.
        conn: ConnId,
        /// Room key.
        room: Key,
        /// Ack id of the client's `join_room`.
        ack: Option<u64>,
    },
    /// To the user's home shard: `socket` subscribes to `user`'s presence.
    Watch {
        /// Watched user key.
        user: Key,
        /// Subscriber.
        socket: SocketRef,
    },
    /// To the user's home shard: one subscription from `shard` ended.
    Unwatch {
        /// Watched user key.
        user: Key,
        /// Shard of the subscriber.
        shard: ShardId,
    },
    /// Presence of `user`: to one subscriber (`conn`) or to all local subscribers.
    Presence {
        /// User key.
        user: Key,
        /// `Some` for the answer to a subscription, `None` for a change.
        conn: Option<ConnId>,
        /// Online (any socket up).
        online: bool,
        /// Milliseconds since the Unix epoch of the last disconnect (or now, if online).
        last_seen: u64,
    },
    /// From the record producer: Kafka acknowledged message `msg_id`; tell its sender.
    Persisted {
        /// The sender.
        conn: ConnId,
        /// Message id.
        msg_id: u128,
    },
    /// From the history reader: the answer to a `history:fetch`, a ready ack frame.
    History {
        /// The asking connection.
        conn: ConnId,
        /// The encoded ack.
        frame: Vec<u8>,
    },
    /// Wakes a shard so that it notices a drain or shutdown.
    Shutdown,
    /// Test-only payload.
    #[cfg(test)]
    Test(u64),
}
