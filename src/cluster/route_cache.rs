//! Which other servers hold sockets of a user, learnt from ROUTE replies, so that later
//! messages to that user skip the registry lookup: a direct PUBLISH to each server (or no
//! Redis command at all when every socket is local, delivered from the mirror).
//!
//! How it stays correct: every change of a user's socket set (UP, DOWN, SWEEP scripts)
//! publishes the user on `registry:changes`, and every node drops that user's entry when
//! it hears it. A ROUTE reply is cached only if no change at all arrived between sending
//! the ROUTE and reading its reply (the `epoch` check), so a reply that raced a change is
//! never cached. Entries live at most [`ROUTE_TTL`]; the cache is emptied whenever the
//! pub/sub connection is (re)established, since changes may have been missed. A cached
//! server that no longer listens (PUBLISH reaches nobody) drops the entry, and a message
//! that reached nobody is routed again through the registry. What remains is the pub/sub
//! propagation window: a socket registered on another node becomes visible here when
//! its `registry:changes` push arrives (typically well under a millisecond on a LAN).

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardgate_shard::msg::Key;

/// Longest life of a route cache entry.
pub const ROUTE_TTL: Duration = Duration::from_secs(30);
/// Most users cached; past it the cache starts over.
pub const ROUTE_CACHE_MAX: usize = 100_000;

/// Other servers holding a user's sockets (empty: every socket is on this node).
pub type Servers = Rc<[Arc<str>]>;

/// The route cache of one bridge.
#[derive(Default)]
pub struct RouteCache {
    /// user -> (other servers, when learnt).
    entries: HashMap<Key, (Servers, Instant)>,
    /// Bumped by every `registry:changes` push.
    epoch: u64,
    /// On a Redis Cluster, changes come on each user's own channel: the users whose
    /// channel this node subscribes, `true` once the subscription is confirmed. A route
    /// is cached only for a user whose channel was live before the ROUTE was sent.
    channels: Option<HashMap<Key, bool>>,
}

impl RouteCache {
    /// Changes come on per-user channels (a Redis Cluster) or on the broadcast one.
    pub fn set_per_user(&mut self, on: bool) {
        self.channels = on.then(HashMap::new);
    }

    /// Whether `user`'s registry channel must be subscribed before its route can be
    /// cached (then it counts as subscribing).
    pub fn wants_channel(&mut self, user: &Key) -> bool {
        let Some(channels) = &mut self.channels else { return false };
        if channels.contains_key(user) {
            return false;
        }
        channels.insert(user.clone(), false);
        true
    }

    /// `user`'s registry channel is subscribed: ROUTEs sent from now on may be cached
    /// (the epoch moves, so that no reply to an earlier one is).
    pub fn channel_live(&mut self, user: &Key) {
        if let Some(live) = self.channels.as_mut().and_then(|c| c.get_mut(user)) {
            *live = true;
            self.epoch += 1;
        }
    }

    /// Users whose route is no longer cached: their channels are unsubscribed.
    pub fn prune(&mut self) -> Vec<Key> {
        self.prune_at(Instant::now())
    }

    fn prune_at(&mut self, now: Instant) -> Vec<Key> {
        let Some(channels) = &mut self.channels else { return Vec::new() };
        let entries = &self.entries;
        let fresh =
            |u: &Key| entries.get(u).is_some_and(|(_, at)| now.saturating_duration_since(*at) < ROUTE_TTL);
        let gone: Vec<Key> =
            channels.iter().filter(|(u, live)| **live && !fresh(u)).map(|(u, _)| u.clone()).collect();
        for u in &gone {
            channels.remove(u);
            self.entries.remove(u);
        }
        gone
    }

    /// The epoch to remember when sending a ROUTE, for [`RouteCache::put`].
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The cached servers of `user`, if fresh.
    pub fn get(&mut self, user: &str) -> Option<Servers> {
        self.get_at(user, Instant::now())
    }

    fn get_at(&mut self, user: &str, now: Instant) -> Option<Servers> {
        match self.entries.get(user) {
            Some((servers, at)) if now.saturating_duration_since(*at) < ROUTE_TTL => Some(servers.clone()),
            Some(_) => {
                self.entries.remove(user);
                None
            }
            None => None,
        }
    }

    /// Caches a ROUTE reply sent at `epoch`; ignored if any change arrived since.
    pub fn put(&mut self, user: Key, servers: Servers, epoch: u64) {
        self.put_at(user, servers, epoch, Instant::now())
    }

    fn put_at(&mut self, user: Key, servers: Servers, epoch: u64, now: Instant) {
        if epoch != self.epoch {
            return;
        }
        if let Some(channels) = &self.channels {
            if channels.get(&user) != Some(&true) {
                return;
            }
        }
        if self.entries.len() >= ROUTE_CACHE_MAX {
            self.entries.clear();
        }
        self.entries.insert(user, (servers, now));
    }

    /// `user`'s socket set changed (or a cached server proved gone).
    pub fn invalidate(&mut self, user: &str) {
        self.epoch += 1;
        self.entries.remove(user);
    }

    /// Forgets everything (the pub/sub connection was re-established).
    pub fn clear(&mut self) {
        self.epoch += 1;
        self.entries.clear();
        if let Some(channels) = &mut self.channels {
            channels.clear();
        }
    }

    /// Users cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(names: &[&str]) -> Servers {
        names.iter().map(|&n| Arc::from(n)).collect()
    }

    #[test]
    fn caches_a_reply_only_if_nothing_changed_since_it_was_asked() {
        let mut c = RouteCache::default();
        let asked = c.epoch();
        c.put("t\x1fbob".into(), servers(&["n2"]), asked);
        assert_eq!(c.get("t\x1fbob").as_deref(), Some(&servers(&["n2"])[..]));

        // A change for anybody between ROUTE and its reply: the reply is not cached.
        let asked = c.epoch();
        c.invalidate("t\x1fsomeone-else");
        c.put("t\x1fann".into(), servers(&["n3"]), asked);
        assert!(c.get("t\x1fann").is_none());
        // Bob's entry survives a change of somebody else.
        assert!(c.get("t\x1fbob").is_some());
    }

    #[test]
    fn invalidation_and_clear_drop_entries() {
        let mut c = RouteCache::default();
        c.put("t\x1fbob".into(), servers(&[]), c.epoch());
        assert_eq!(c.get("t\x1fbob").map(|s| s.len()), Some(0), "all-local routes are cached too");
        c.invalidate("t\x1fbob");
        assert!(c.get("t\x1fbob").is_none());
        c.put("t\x1fbob".into(), servers(&["n2"]), c.epoch());
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn entries_expire_and_the_cache_is_bounded() {
        let mut c = RouteCache::default();
        let t0 = Instant::now();
        c.put_at("t\x1fbob".into(), servers(&["n2"]), c.epoch(), t0);
        assert!(c.get_at("t\x1fbob", t0 + ROUTE_TTL - Duration::from_millis(1)).is_some());
        assert!(c.get_at("t\x1fbob", t0 + ROUTE_TTL).is_none());
        assert!(c.is_empty(), "an expired entry is removed when read");
        for i in 0..ROUTE_CACHE_MAX {
            c.put_at(format!("t\x1fu{i}").into(), servers(&[]), c.epoch(), t0);
        }
        assert_eq!(c.len(), ROUTE_CACHE_MAX);
        c.put_at("t\x1fone-more".into(), servers(&[]), c.epoch(), t0);
        assert_eq!(c.len(), 1, "past the bound the cache starts over");
    }

    #[test]
    fn on_per_user_channels_a_route_is_cached_once_its_channel_is_live_and_pruned_with_it() {
        let mut c = RouteCache::default();
        c.set_per_user(true);
        let bob: Key = "t\x1fbob".into();
        assert!(c.wants_channel(&bob), "the first miss subscribes");
        assert!(!c.wants_channel(&bob), "once");
        // A ROUTE sent before the subscription is confirmed is not cached...
        let asked = c.epoch();
        c.channel_live(&bob);
        c.put(bob.clone(), servers(&["n2"]), asked);
        assert!(c.get(&bob).is_none());
        // ...one sent after is.
        c.put(bob.clone(), servers(&["n2"]), c.epoch());
        assert!(c.get(&bob).is_some());
        // A user never subscribed is not cached.
        c.put("t\x1fann".into(), servers(&["n3"]), c.epoch());
        assert!(c.get("t\x1fann").is_none());
        // Once the entry expires, its channel is given up.
        let later = Instant::now() + ROUTE_TTL;
        assert_eq!(c.prune_at(later), vec![bob.clone()]);
        assert!(c.wants_channel(&bob));
    }
}
