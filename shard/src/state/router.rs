//! Where effects that concern other users or other nodes go: the embedded bus (the
//! user's home shard in this process) or the cluster (the bridge, which speaks to Redis).
//!
//! Decided once, when the shard starts: a [`Router`] is one of the two, and each method
//! answers with a [`Dispatch`] the shard carries out. Nothing else in the shard asks
//! which mode it runs in.

use std::sync::Arc;

use crate::ids::{sid, ConnId, Frame, Key, Origin, ShardId, SocketRef};
use crate::mesh::{home_shard, Inbox};
use crate::msg::{BridgeMsg, DeliveryStatus, ShardMsg};

/// How a shard reaches users beyond its own sockets.
pub(crate) enum Router {
    /// One process, no Redis: users are homed on shards ([`home_shard`]), or all on
    /// shard 0 with connection state recovery (its journal orders what they get).
    Embedded {
        /// Shards in the process.
        shards: usize,
        /// Connection state recovery on.
        recovery: bool,
    },
    /// Cluster mode: the bridge's inbox.
    Cluster(Arc<Inbox<BridgeMsg>>),
}

/// Where one routed effect goes.
#[derive(Debug)]
pub(crate) enum Dispatch {
    /// To a shard of this process (possibly the sender itself).
    Shard(ShardId, ShardMsg),
    /// To the bridge.
    Bridge(BridgeMsg),
    /// Nowhere: this mode has nothing to do.
    Nothing,
}

impl Router {
    /// The router of a process with `shards` shards and, in cluster mode, a bridge.
    pub fn new(shards: usize, bridge: Option<Arc<Inbox<BridgeMsg>>>, recovery: bool) -> Router {
        match bridge {
            Some(inbox) => Router::Cluster(inbox),
            None => Router::Embedded { shards, recovery },
        }
    }

    /// The shard that owns `user`'s directory on the embedded bus.
    fn home(user: &str, shards: usize, recovery: bool) -> ShardId {
        if recovery {
            0
        } else {
            home_shard(user, shards)
        }
    }

    /// Cluster mode.
    #[cfg(test)]
    pub fn is_cluster(&self) -> bool {
        matches!(self, Router::Cluster(_))
    }

    /// The bridge's inbox, in cluster mode.
    pub fn bridge(&self) -> Option<&Inbox<BridgeMsg>> {
        match self {
            Router::Cluster(inbox) => Some(inbox),
            Router::Embedded { .. } => None,
        }
    }

    /// A socket of `user` authenticated at `socket` (with its recovery session id).
    pub fn user_up(&self, user: Key, socket: SocketRef, pid: Option<Arc<str>>) -> Dispatch {
        match self {
            Router::Cluster(_) => {
                let sid = sid(socket.shard, socket.conn);
                Dispatch::Bridge(BridgeMsg::SocketUp { user, sid, socket, pid })
            }
            &Router::Embedded { shards, recovery } => {
                Dispatch::Shard(Router::home(&user, shards, recovery), ShardMsg::UserUp { user, socket, pid })
            }
        }
    }

    /// A socket of `user` at `socket` closed; its recovery session `pid` stays
    /// restorable if `keep`. A socket whose recovery claim was still pending
    /// (`registered` false) is nothing to the embedded directory; the bridge needs to hear
    /// of it (it cancels the claim).
    pub fn user_down(
        &self,
        user: Key,
        socket: SocketRef,
        pid: Option<Arc<str>>,
        keep: bool,
        registered: bool,
    ) -> Dispatch {
        let shard = socket.shard;
        match self {
            Router::Cluster(_) => {
                let sid = sid(shard, socket.conn);
                Dispatch::Bridge(BridgeMsg::SocketDown { user, sid, shard, keep })
            }
            Router::Embedded { .. } if !registered => Dispatch::Nothing,
            &Router::Embedded { shards, recovery } => {
                let pid = pid.map(|p| (p, keep));
                Dispatch::Shard(
                    Router::home(&user, shards, recovery),
                    ShardMsg::UserDown { user, socket, pid },
                )
            }
        }
    }

    /// A session was restored for a socket that closed before hearing of it: shard 0
    /// registered it (embedded bus), so it is unregistered now; in cluster mode the
    /// bridge saw the close during the claim and undid it itself.
    pub fn restored_gone(&self, user: Key, socket: SocketRef, pid: Arc<str>) -> Dispatch {
        match self {
            Router::Cluster(_) => Dispatch::Nothing,
            Router::Embedded { .. } => self.user_down(user, socket, Some(pid), true, true),
        }
    }

    /// A reconnecting socket claims recovery session `pid`.
    pub fn resume(&self, user: Key, socket: SocketRef, pid: Arc<str>, offset: Option<u64>) -> Dispatch {
        match self {
            Router::Cluster(_) => {
                let sid = sid(socket.shard, socket.conn);
                Dispatch::Bridge(BridgeMsg::Resume { user, sid, socket, pid, offset })
            }
            Router::Embedded { .. } => Dispatch::Shard(0, ShardMsg::Resume { user, socket, pid, offset }),
        }
    }

    /// Recovery session `pid` joined or left `room` (the cluster learns it from the room
    /// registration itself).
    pub fn session_room(&self, pid: Arc<str>, room: &Key, joined: bool) -> Dispatch {
        match self {
            Router::Cluster(_) => Dispatch::Nothing,
            Router::Embedded { .. } => {
                Dispatch::Shard(0, ShardMsg::SessionRoom { pid, room: room.clone(), joined })
            }
        }
    }

    /// A recoverable room message: ordered, logged and delivered by the cluster.
    pub fn room_logged(&self, room: &Key, frame: Frame, msg_id: u128, origin: SocketRef) -> Dispatch {
        match self {
            Router::Cluster(_) => {
                Dispatch::Bridge(BridgeMsg::RoomLogged { room: room.clone(), frame, msg_id, origin })
            }
            Router::Embedded { .. } => {
                Dispatch::Shard(0, ShardMsg::RoomLogged { room: room.clone(), frame, msg_id, origin })
            }
        }
    }

    /// A 1:1 message from `origin` to `user`.
    pub fn direct(&self, user: Key, frame: Frame, msg_id: u128, origin: SocketRef) -> Dispatch {
        match self {
            Router::Cluster(_) => Dispatch::Bridge(BridgeMsg::ToUser { user, frame, msg_id, origin }),
            &Router::Embedded { shards, recovery } => {
                let home = Router::home(&user, shards, recovery);
                Dispatch::Shard(home, ShardMsg::ToUser { user, frame, msg_id, origin })
            }
        }
    }

    /// A delivery found no local socket of `user` (it closed meanwhile).
    pub fn bounce(&self, user: Key, frame: Frame, msg_id: u128, origin: Origin) -> Dispatch {
        match self {
            Router::Cluster(_) => Dispatch::Bridge(BridgeMsg::Bounce { user, frame, msg_id, origin }),
            &Router::Embedded { shards, recovery } => {
                let home = Router::home(&user, shards, recovery);
                Dispatch::Shard(home, ShardMsg::Bounce { user, frame, msg_id, origin })
            }
        }
    }

    /// The outcome of message `msg_id` for its sender, in this process or another.
    pub fn report(&self, origin: Origin, msg_id: u128, status: DeliveryStatus) -> Dispatch {
        match (&origin.server, self) {
            (Some(_), Router::Cluster(_)) => Dispatch::Bridge(BridgeMsg::Ack { origin, msg_id, status }),
            // A remote origin without a cluster cannot happen; there is nobody to tell.
            (Some(_), Router::Embedded { .. }) => Dispatch::Nothing,
            (None, _) => {
                Dispatch::Shard(origin.shard, ShardMsg::Status { conn: origin.conn, msg_id, status })
            }
        }
    }

    /// Socket `conn` on `shard` joined `room`: `Nothing` means answer at once (embedded
    /// bus); in cluster mode the bridge answers with `RoomReady` once this node receives
    /// the room's channel, so a member never misses a message published after its
    /// `room_joined`.
    pub fn room_joined(&self, room: &Key, socket: SocketRef, ack: Option<u64>) -> Dispatch {
        match self {
            Router::Cluster(_) => {
                let sid = sid(socket.shard, socket.conn);
                Dispatch::Bridge(BridgeMsg::RoomJoin { room: room.clone(), sid, socket, ack })
            }
            Router::Embedded { .. } => Dispatch::Nothing,
        }
    }

    /// Socket `conn` on `shard` left `room` (the cluster registry keeps room members).
    pub fn room_left(&self, room: &Key, shard: ShardId, conn: ConnId, forget: bool) -> Dispatch {
        match self {
            Router::Cluster(_) => {
                Dispatch::Bridge(BridgeMsg::RoomLeave { room: room.clone(), sid: sid(shard, conn), forget })
            }
            Router::Embedded { .. } => Dispatch::Nothing,
        }
    }

    /// A room frame for the other nodes (other shards of this process get it through the
    /// mesh in both modes).
    pub fn room_publish(&self, room: &Key, frame: &Frame) -> Dispatch {
        match self {
            Router::Cluster(_) => {
                Dispatch::Bridge(BridgeMsg::RoomPublish { room: room.clone(), frame: frame.clone() })
            }
            Router::Embedded { .. } => Dispatch::Nothing,
        }
    }

    /// `socket` subscribes to `user`'s presence.
    pub fn watch(&self, user: Key, socket: SocketRef) -> Dispatch {
        match self {
            Router::Cluster(_) => Dispatch::Bridge(BridgeMsg::Watch { user, socket }),
            &Router::Embedded { shards, recovery } => {
                Dispatch::Shard(Router::home(&user, shards, recovery), ShardMsg::Watch { user, socket })
            }
        }
    }

    /// One presence subscription from `shard` ended (the embedded bus and the bridge
    /// count them).
    pub fn unwatch(&self, user: Key, shard: ShardId) -> Dispatch {
        match self {
            Router::Cluster(_) => Dispatch::Bridge(BridgeMsg::Unwatch { user }),
            &Router::Embedded { shards, recovery } => {
                Dispatch::Shard(Router::home(&user, shards, recovery), ShardMsg::Unwatch { user, shard })
            }
        }
    }

    /// A typing indicator started or stopped (the cluster keeps `typing:{room}` keys).
    pub fn typing(&self, room: &Key, user: Arc<str>, on: bool) -> Dispatch {
        match self {
            Router::Cluster(_) => Dispatch::Bridge(BridgeMsg::Typing { room: room.clone(), user, on }),
            Router::Embedded { .. } => Dispatch::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::key;
    use crate::mesh::Owner;

    fn sock() -> SocketRef {
        SocketRef { shard: 1, conn: ConnId::from_u64(9) }
    }

    #[test]
    fn with_recovery_the_embedded_bus_homes_everybody_on_shard_0() {
        let r = Router::new(4, None, true);
        let bob = key("t", "bob");
        let pid: Arc<str> = "p".into();
        assert!(matches!(
            r.user_up(bob.clone(), sock(), Some(pid.clone())),
            Dispatch::Shard(0, ShardMsg::UserUp { .. })
        ));
        let d = r.room_logged(&bob, Frame::from(&b"f"[..]), 1, sock());
        assert!(matches!(d, Dispatch::Shard(0, ShardMsg::RoomLogged { .. })));
        assert!(matches!(
            r.resume(bob.clone(), sock(), pid.clone(), None),
            Dispatch::Shard(0, ShardMsg::Resume { .. })
        ));
        // A claiming socket that closes was never registered: nothing to undo, unless the
        // restore went through meanwhile.
        assert!(matches!(
            r.user_down(bob.clone(), sock(), Some(pid.clone()), true, false),
            Dispatch::Nothing
        ));
        let d = r.restored_gone(bob, sock(), pid);
        assert!(matches!(d, Dispatch::Shard(0, ShardMsg::UserDown { pid: Some((_, true)), .. })));
    }

    #[test]
    fn the_embedded_bus_routes_to_home_shards() {
        let r = Router::new(4, None, false);
        let bob = key("t", "bob");
        let home = home_shard(&bob, 4);
        assert!(
            matches!(r.user_up(bob.clone(), sock(), None), Dispatch::Shard(h, ShardMsg::UserUp { .. }) if h == home)
        );
        let d = r.direct(bob.clone(), Frame::from(&b"f"[..]), 1, sock());
        assert!(matches!(d, Dispatch::Shard(h, ShardMsg::ToUser { .. }) if h == home));
        assert!(matches!(r.room_joined(&bob, sock(), None), Dispatch::Nothing), "answered at once");
        assert!(
            matches!(r.unwatch(bob, 1), Dispatch::Shard(h, ShardMsg::Unwatch { shard: 1, .. }) if h == home)
        );
        let remote = Origin { server: Some("n2".into()), shard: 0, conn: ConnId::from_u64(1) };
        assert!(matches!(r.report(remote, 1, DeliveryStatus::Delivered), Dispatch::Nothing));
    }

    #[test]
    fn the_cluster_routes_to_the_bridge() {
        let (inbox, _) = Inbox::new(Owner::Bridge).unwrap();
        let r = Router::new(4, Some(Arc::new(inbox)), false);
        let bob = key("t", "bob");
        assert!(r.is_cluster());
        let Dispatch::Bridge(BridgeMsg::SocketUp { sid: s, .. }) = r.user_up(bob.clone(), sock(), None)
        else {
            panic!()
        };
        assert_eq!(s, sid(1, ConnId::from_u64(9)));
        assert!(matches!(
            r.room_joined(&bob, sock(), Some(3)),
            Dispatch::Bridge(BridgeMsg::RoomJoin { ack: Some(3), .. })
        ));
        assert!(matches!(r.unwatch(bob.clone(), 1), Dispatch::Bridge(BridgeMsg::Unwatch { .. })));
        let remote = Origin { server: Some("n2".into()), shard: 0, conn: ConnId::from_u64(1) };
        assert!(matches!(
            r.report(remote, 1, DeliveryStatus::Delivered),
            Dispatch::Bridge(BridgeMsg::Ack { .. })
        ));
        let local = Origin { server: None, shard: 2, conn: ConnId::from_u64(1) };
        assert!(matches!(
            r.report(local, 1, DeliveryStatus::Queued),
            Dispatch::Shard(2, ShardMsg::Status { .. })
        ));
    }
}
