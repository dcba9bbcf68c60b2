//! What shards say to each other through the [`crate::mesh`].
//!
//! Every cross-shard effect is one of these messages; no shard touches another's state.
//! Frames travel pre-encoded (`Arc<[u8]>`: WebSocket frame bytes, identical for every
//! recipient because server frames are unmasked), so a room message is encoded once per
//! process, not once per member.

use std::sync::Arc;

use crate::mesh::ShardId;
use crate::slab::ConnId;

/// One or more complete WebSocket frames, shared by every recipient.
pub type Frame = Arc<[u8]>;

/// A tenant-qualified id: `"{tenant}\x1f{id}"`. Tenants can never collide.
pub type Key = Arc<str>;

/// Builds the tenant-qualified key of `id`.
pub fn key(tenant: &str, id: &str) -> Key {
    let mut s = String::with_capacity(tenant.len() + id.len() + 1);
    s.push_str(tenant);
    s.push('\x1f');
    s.push_str(id);
    s.into()
}

/// The id part of a tenant-qualified key.
pub fn key_id(key: &str) -> &str {
    key.split_once('\x1f').map(|(_, id)| id).unwrap_or(key)
}

/// A connection anywhere in the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketRef {
    /// Owning shard.
    pub shard: ShardId,
    /// Connection within that shard.
    pub conn: ConnId,
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
    /// Deliver `frame` to every local member of `room`.
    RoomDeliver {
        /// Room key.
        room: Key,
        /// Encoded `message:new` / `typing` event.
        frame: Frame,
    },
    /// To the user's home shard: a socket of `user` came up at `socket`.
    UserUp {
        /// User key.
        user: Key,
        /// The new socket.
        socket: SocketRef,
    },
    /// To the user's home shard: a socket of `user` on `shard` closed.
    UserDown {
        /// User key.
        user: Key,
        /// Shard of the closed socket.
        shard: ShardId,
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
        /// Sender socket.
        origin: SocketRef,
    },
    /// To the home shard: a `DeliverUser` found no socket (it closed meanwhile).
    Bounce {
        /// Recipient key.
        user: Key,
        /// Encoded `message:new`.
        frame: Frame,
        /// Message id.
        msg_id: u128,
        /// Sender socket.
        origin: SocketRef,
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
    /// Wakes a shard so that it notices shutdown.
    Shutdown,
    /// Test-only payload.
    #[cfg(test)]
    Test(u64),
}
