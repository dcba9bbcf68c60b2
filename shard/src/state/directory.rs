//! The home-shard user directory of the embedded bus.
//!
//! Each user key hashes to one shard ([`crate::mesh::home_shard`]) which alone knows on
//! which shards that user has sockets, their presence and last-seen time, their offline
//! queue and which shards watch their presence. That single owner is what makes
//! "online", "offline", "queued" and drain order consistent without locks.
//!
//! The directory never sends anything itself: each operation returns the [`Effect`]s
//! the shard carries out (messages to shards, delivery reports, presence records,
//! counters), so its decisions are unit-tested on plain values.

use std::collections::{HashMap, VecDeque};

use crate::ids::{Frame, Key, Origin, ShardId, SocketRef};
use crate::metrics::Counter;
use crate::msg::{DeliveryStatus, ShardMsg};
use crate::state::members::push_small;

/// What the directory asks its shard to do.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Send `msg` to shard `to` (possibly this one).
    Send(ShardId, ShardMsg),
    /// Report the outcome of message `msg_id` to its sender.
    Report(Origin, u128, DeliveryStatus),
    /// The user went online or offline: tell persistence.
    PresenceChanged {
        /// User key.
        user: Key,
        /// Now online.
        online: bool,
        /// Wall-clock ms of the change.
        last_seen: u64,
    },
    /// Add to a counter of the shard.
    Count(Counter, u64),
}

/// Limits the directory applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Messages kept per offline user (0: none).
    pub offline_queue_len: usize,
    /// Milliseconds an offline message is kept.
    pub offline_ttl_ms: u64,
    /// Milliseconds a user with nothing else is remembered after going offline.
    pub retention_ms: u64,
}

/// What the home shard knows about one user.
#[derive(Default)]
struct UserEntry {
    /// Sockets per shard.
    sockets: Vec<(ShardId, u32)>,
    /// Presence subscriptions per shard.
    watchers: Vec<(ShardId, u32)>,
    /// Wall-clock ms of the last time the user went offline (or came online).
    last_seen: u64,
    /// Undelivered `message:new` frames with the shard time they were queued.
    offline: VecDeque<(u64, Frame)>,
}

impl UserEntry {
    fn online(&self) -> bool {
        self.sockets.iter().any(|&(_, n)| n > 0)
    }
}

fn bump(list: &mut Vec<(ShardId, u32)>, shard: ShardId, up: bool) {
    match list.iter_mut().find(|(s, _)| *s == shard) {
        Some((_, n)) if up => *n += 1,
        Some((_, n)) => *n = n.saturating_sub(1),
        None if up => push_small(list, (shard, 1)),
        None => {}
    }
    list.retain(|&(_, n)| n > 0);
}

/// The users homed on one shard.
pub(crate) struct Directory {
    users: HashMap<Key, UserEntry>,
    limits: Limits,
}

impl Directory {
    /// An empty directory.
    pub fn new(limits: Limits) -> Directory {
        Directory { users: HashMap::new(), limits }
    }

    /// A socket of `user` came up at `socket`: answer its registration with the offline
    /// queue (oldest first, expired ones dropped) and, on the first socket, announce
    /// online. `now` is shard time, `wall` wall-clock ms.
    pub fn user_up(&mut self, user: Key, socket: SocketRef, now: u64, wall: u64, out: &mut Vec<Effect>) {
        let ttl = self.limits.offline_ttl_ms;
        let entry = self.users.entry(user.clone()).or_default();
        let was_online = entry.online();
        bump(&mut entry.sockets, socket.shard, true);
        entry.last_seen = wall;
        let mut expired = 0;
        let frames: Vec<Frame> = entry
            .offline
            .drain(..)
            .filter(|(at, _)| {
                let keep = now.saturating_sub(*at) <= ttl;
                expired += u64::from(!keep);
                keep
            })
            .map(|(_, f)| f)
            .collect();
        if expired > 0 {
            out.push(Effect::Count(Counter::OfflineDropped, expired));
        }
        out.push(Effect::Send(socket.shard, ShardMsg::Registered { conn: socket.conn, frames }));
        if !was_online {
            announce(&user, entry, true, out);
        }
    }

    /// A restored session's socket of `user` came up at `socket` (connection state
    /// recovery): registered like any, but its offline queue is dropped, not sent (those
    /// messages are in the replay), and its CONNECT is answered by the restore.
    pub fn user_resumed(&mut self, user: Key, socket: SocketRef, wall: u64, out: &mut Vec<Effect>) {
        let entry = self.users.entry(user.clone()).or_default();
        let was_online = entry.online();
        bump(&mut entry.sockets, socket.shard, true);
        entry.last_seen = wall;
        entry.offline.clear();
        if !was_online {
            announce(&user, entry, true, out);
        }
    }

    /// A socket of `user` on `shard` closed; on the last one, announce offline.
    pub fn user_down(&mut self, user: Key, shard: ShardId, wall: u64, out: &mut Vec<Effect>) {
        let Some(entry) = self.users.get_mut(&user) else {
            return;
        };
        let was_online = entry.online();
        bump(&mut entry.sockets, shard, false);
        if was_online && !entry.online() {
            entry.last_seen = wall;
            announce(&user, entry, false, out);
        }
    }

    /// Routes a 1:1 message: to every shard with sockets of the user, or into the
    /// offline queue. A bounce (a socket closed between lookup and delivery) is queued
    /// only if the user is now fully offline; if another socket remains it got the
    /// message, and the report timeout covers the rest.
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        &mut self,
        user: Key,
        frame: Frame,
        msg_id: u128,
        origin: Origin,
        now: u64,
        bounced: bool,
        out: &mut Vec<Effect>,
    ) {
        let cap = self.limits.offline_queue_len;
        let entry = self.users.entry(user.clone()).or_default();
        if entry.online() {
            if bounced {
                return;
            }
            for &(s, _) in &entry.sockets {
                let msg = ShardMsg::DeliverUser {
                    user: user.clone(),
                    frame: frame.clone(),
                    msg_id,
                    origin: origin.clone(),
                };
                out.push(Effect::Send(s, msg));
            }
            return;
        }
        let mut dropped = 0;
        while cap > 0 && entry.offline.len() >= cap {
            entry.offline.pop_front();
            dropped += 1;
        }
        let queued = cap > 0;
        if queued {
            entry.offline.push_back((now, frame));
            out.push(Effect::Count(Counter::OfflineQueued, 1));
        }
        let dropped = dropped + u64::from(!queued);
        if dropped > 0 {
            out.push(Effect::Count(Counter::OfflineDropped, dropped));
        }
        let status = if queued { DeliveryStatus::Queued } else { DeliveryStatus::Sent };
        out.push(Effect::Report(origin, msg_id, status));
    }

    /// `socket` subscribes to `user`'s presence: count it and answer the current state.
    pub fn watch(&mut self, user: Key, socket: SocketRef, out: &mut Vec<Effect>) {
        let entry = self.users.entry(user.clone()).or_default();
        bump(&mut entry.watchers, socket.shard, true);
        let (online, last_seen) = (entry.online(), entry.last_seen);
        let reply = ShardMsg::Presence { user, conn: Some(socket.conn), online, last_seen };
        out.push(Effect::Send(socket.shard, reply));
    }

    /// One presence subscription from `shard` ended.
    pub fn unwatch(&mut self, user: &str, shard: ShardId) {
        if let Some(entry) = self.users.get_mut(user) {
            bump(&mut entry.watchers, shard, false);
        }
    }

    /// Periodic upkeep: expired offline messages, and users nobody needs any more
    /// (offline, unwatched, nothing queued, last seen longer ago than the retention).
    pub fn sweep(&mut self, now: u64, wall: u64, out: &mut Vec<Effect>) {
        let Limits { offline_ttl_ms, retention_ms, .. } = self.limits;
        let mut dropped = 0;
        self.users.retain(|_, d| {
            let before = d.offline.len();
            d.offline.retain(|(at, _)| now.saturating_sub(*at) <= offline_ttl_ms);
            dropped += (before - d.offline.len()) as u64;
            d.online()
                || !d.watchers.is_empty()
                || !d.offline.is_empty()
                || wall.saturating_sub(d.last_seen) < retention_ms
        });
        if dropped > 0 {
            out.push(Effect::Count(Counter::OfflineDropped, dropped));
        }
    }

    /// Users known.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.users.len()
    }
}

/// Presence of `user` changed: persistence and every shard watching.
fn announce(user: &Key, entry: &UserEntry, online: bool, out: &mut Vec<Effect>) {
    let last_seen = entry.last_seen;
    out.push(Effect::PresenceChanged { user: user.clone(), online, last_seen });
    for &(s, _) in &entry.watchers {
        let msg = ShardMsg::Presence { user: user.clone(), conn: None, online, last_seen };
        out.push(Effect::Send(s, msg));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{key, ConnId};

    const LIMITS: Limits = Limits { offline_queue_len: 2, offline_ttl_ms: 1_000, retention_ms: 5_000 };

    fn sock(shard: ShardId) -> SocketRef {
        SocketRef { shard, conn: ConnId::from_u64(shard as u64 + 1) }
    }

    fn origin() -> Origin {
        sock(3).into()
    }

    fn frame(b: &[u8]) -> Frame {
        Frame::from(b)
    }

    fn sends(out: &[Effect]) -> Vec<ShardId> {
        out.iter().filter_map(|e| if let Effect::Send(s, _) = e { Some(*s) } else { None }).collect()
    }

    #[test]
    fn offline_messages_queue_bounded_and_drain_in_order_on_connect() {
        let (mut d, bob) = (Directory::new(LIMITS), key("t", "bob"));
        let mut out = Vec::new();
        for (i, f) in [&b"1"[..], b"2", b"3"].into_iter().enumerate() {
            d.route(bob.clone(), frame(f), i as u128, origin(), 10, false, &mut out);
        }
        let queued = out.iter().filter(|e| matches!(e, Effect::Report(_, _, DeliveryStatus::Queued))).count();
        assert_eq!(queued, 3);
        assert!(out.iter().any(|e| matches!(e, Effect::Count(Counter::OfflineDropped, 1))), "bound 2");
        let mut out = Vec::new();
        d.user_up(bob.clone(), sock(1), 20, 99, &mut out);
        let Some(Effect::Send(1, ShardMsg::Registered { frames, .. })) = out.first() else {
            panic!("{out:?}")
        };
        assert_eq!(frames.iter().map(|f| f[0]).collect::<Vec<_>>(), vec![b'2', b'3'], "oldest first");
        assert!(matches!(out[1], Effect::PresenceChanged { online: true, last_seen: 99, .. }));
    }

    #[test]
    fn expired_offline_messages_are_dropped_not_delivered() {
        let (mut d, bob) = (Directory::new(LIMITS), key("t", "bob"));
        let mut out = Vec::new();
        d.route(bob.clone(), frame(b"old"), 1, origin(), 0, false, &mut out);
        let mut out = Vec::new();
        d.user_up(bob, sock(0), 1_001, 5, &mut out);
        assert!(matches!(out[0], Effect::Count(Counter::OfflineDropped, 1)));
        assert!(matches!(&out[1], Effect::Send(0, ShardMsg::Registered { frames, .. }) if frames.is_empty()));
    }

    #[test]
    fn online_users_get_delivered_on_every_shard_with_sockets() {
        let (mut d, bob) = (Directory::new(LIMITS), key("t", "bob"));
        let mut out = Vec::new();
        d.user_up(bob.clone(), sock(0), 0, 1, &mut out);
        d.user_up(bob.clone(), sock(2), 0, 1, &mut out);
        assert_eq!(out.iter().filter(|e| matches!(e, Effect::PresenceChanged { .. })).count(), 1);
        let mut out = Vec::new();
        d.route(bob.clone(), frame(b"m"), 7, origin(), 0, false, &mut out);
        assert_eq!(sends(&out), vec![0, 2]);
        // A bounce while another socket remains: nothing (the report timeout covers it).
        let mut out = Vec::new();
        d.route(bob, frame(b"m"), 7, origin(), 0, true, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn presence_is_multi_device_aware_and_told_to_watchers() {
        let (mut d, bob) = (Directory::new(LIMITS), key("t", "bob"));
        let mut out = Vec::new();
        d.watch(bob.clone(), sock(1), &mut out);
        assert!(matches!(
            &out[..],
            [Effect::Send(1, ShardMsg::Presence { online: false, conn: Some(_), .. })]
        ));
        let mut out = Vec::new();
        d.user_up(bob.clone(), sock(0), 0, 10, &mut out);
        d.user_up(bob.clone(), sock(0), 0, 11, &mut out);
        assert_eq!(sends(&out), vec![0, 1, 0], "registered, watcher told once, registered");
        let mut out = Vec::new();
        d.user_down(bob.clone(), 0, 12, &mut out);
        assert!(out.is_empty(), "one device is still online");
        d.user_down(bob.clone(), 0, 13, &mut out);
        assert!(matches!(out[0], Effect::PresenceChanged { online: false, last_seen: 13, .. }));
        assert!(matches!(out[1], Effect::Send(1, ShardMsg::Presence { online: false, conn: None, .. })));
        // The watcher leaves; the user is forgotten after the retention.
        d.unwatch(&bob, 1);
        let mut out = Vec::new();
        d.sweep(0, 13 + 4_999, &mut out);
        assert_eq!(d.len(), 1);
        d.sweep(0, 13 + 5_000, &mut out);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn without_an_offline_queue_messages_are_reported_sent() {
        let mut d = Directory::new(Limits { offline_queue_len: 0, ..LIMITS });
        let mut out = Vec::new();
        d.route(key("t", "bob"), frame(b"m"), 1, origin(), 0, false, &mut out);
        assert!(matches!(
            out[..],
            [Effect::Count(Counter::OfflineDropped, 1), Effect::Report(_, 1, DeliveryStatus::Sent)]
        ));
    }
}
