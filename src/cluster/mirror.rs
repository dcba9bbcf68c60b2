//! What this process registered in Redis, mirrored on the bridge: sockets, the shards
//! each user has sockets on, and the local members of each room.
//!
//! The mirror is what lets the bridge re-register everything after Redis comes back,
//! deliver 1:1 messages to local users while Redis is down, and reference-count room
//! channel subscriptions (subscribe on the first local member, unsubscribe after the
//! last). It is updated from the registration messages themselves ([`Mirror::observe`]),
//! before any Redis command for them is planned, so it never lags the shards' intent.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use shardgate_shard::msg::{BridgeMsg, Key, ShardId};

/// The bridge's copy of this process's registrations.
#[derive(Default, Clone)]
pub struct Mirror {
    /// sid -> (user, shard).
    pub sockets: HashMap<String, (Key, ShardId)>,
    /// user -> sockets per shard.
    users: HashMap<Key, Vec<(ShardId, u32)>>,
    /// room -> local member sids.
    pub rooms: HashMap<Key, HashSet<String>>,
    /// sid -> recovery session id (connection state recovery on).
    pids: HashMap<String, Arc<str>>,
}

impl Mirror {
    /// Shards of this process holding sockets of `user`.
    pub fn shards_of(&self, user: &str) -> Vec<ShardId> {
        self.users.get(user).map(|v| v.iter().map(|&(s, _)| s).collect()).unwrap_or_default()
    }

    /// Users with at least one socket in this process.
    pub fn users(&self) -> impl Iterator<Item = &Key> {
        self.users.keys()
    }

    /// The recovery session of socket `sid`.
    pub fn pid(&self, sid: &str) -> Option<Arc<str>> {
        self.pids.get(sid).cloned()
    }

    /// Recovery sessions of the sockets in this process.
    pub fn pids(&self) -> impl Iterator<Item = &Arc<str>> {
        self.pids.values()
    }

    /// Local members of `room`.
    pub fn members(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, HashSet::len)
    }

    /// Updates the mirror for a registration message; other messages change nothing.
    pub fn observe(&mut self, msg: &BridgeMsg) {
        match msg {
            BridgeMsg::SocketUp { user, sid, socket, pid } => {
                self.sockets.insert(sid.clone(), (user.clone(), socket.shard));
                if let Some(pid) = pid {
                    self.pids.insert(sid.clone(), pid.clone());
                }
                let v = self.users.entry(user.clone()).or_default();
                match v.iter_mut().find(|(s, _)| *s == socket.shard) {
                    Some((_, n)) => *n += 1,
                    None => v.push((socket.shard, 1)),
                }
            }
            BridgeMsg::SocketDown { user, sid, shard, .. } => {
                self.sockets.remove(sid);
                self.pids.remove(sid);
                if let Some(v) = self.users.get_mut(user) {
                    if let Some((_, n)) = v.iter_mut().find(|(s, _)| s == shard) {
                        *n = n.saturating_sub(1);
                    }
                    v.retain(|&(_, n)| n > 0);
                    if v.is_empty() {
                        self.users.remove(user);
                    }
                }
            }
            BridgeMsg::RoomJoin { room, sid, .. } => {
                self.rooms.entry(room.clone()).or_default().insert(sid.clone());
            }
            BridgeMsg::RoomLeave { room, sid, .. } => {
                if let Some(set) = self.rooms.get_mut(room) {
                    set.remove(sid);
                    if set.is_empty() {
                        self.rooms.remove(room);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardgate_shard::msg::{key, SocketRef};
    use shardgate_shard::ConnId;

    fn up(user: &Key, sid: &str, shard: ShardId) -> BridgeMsg {
        let socket = SocketRef { shard, conn: ConnId::from_u64(1) };
        BridgeMsg::SocketUp { user: user.clone(), sid: sid.into(), socket, pid: None }
    }

    fn down(user: &Key, sid: &str, shard: ShardId) -> BridgeMsg {
        BridgeMsg::SocketDown { user: user.clone(), sid: sid.into(), shard, keep: true }
    }

    #[test]
    fn counts_sockets_per_user_and_shard() {
        let (mut m, bob) = (Mirror::default(), key("t", "bob"));
        m.observe(&up(&bob, "a", 0));
        m.observe(&up(&bob, "b", 0));
        m.observe(&up(&bob, "c", 1));
        assert_eq!(m.shards_of(&bob), vec![0, 1]);
        m.observe(&down(&bob, "a", 0));
        assert_eq!(m.shards_of(&bob), vec![0, 1]);
        m.observe(&down(&bob, "b", 0));
        assert_eq!(m.shards_of(&bob), vec![1]);
        m.observe(&down(&bob, "c", 1));
        assert!(m.shards_of(&bob).is_empty());
        assert_eq!(m.users().count(), 0);
        assert!(m.sockets.is_empty());
        // A stray down (already gone) changes nothing.
        m.observe(&down(&bob, "c", 1));
        assert!(m.shards_of(&bob).is_empty());
    }

    #[test]
    fn counts_room_members() {
        let (mut m, room) = (Mirror::default(), key("t", "lobby"));
        let socket = SocketRef { shard: 0, conn: ConnId::from_u64(1) };
        for sid in ["a", "b"] {
            m.observe(&BridgeMsg::RoomJoin { room: room.clone(), sid: sid.into(), socket, ack: None });
        }
        assert_eq!(m.members(&room), 2);
        m.observe(&BridgeMsg::RoomLeave { room: room.clone(), sid: "a".into(), forget: true });
        m.observe(&BridgeMsg::RoomLeave { room: room.clone(), sid: "b".into(), forget: true });
        assert_eq!(m.members(&room), 0);
        assert!(!m.rooms.contains_key(&room));
    }
}
