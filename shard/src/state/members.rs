//! Key -> local connections: a room's members on this shard, a user's sockets on this
//! shard, the subscribers of a user's presence on this shard.
//!
//! One owner keeps the invariant every such map needs: a key with no connection left is
//! removed (so an idle shard holds no empty lists, and "last local member left" is a
//! return value, not a second lookup). That a connection appears at most once per key is
//! the caller's to keep: each session records its own rooms and watches, so a join does
//! not scan a room of 100 000 members.

use std::collections::HashMap;

use crate::ids::{ConnId, Key};

/// Pushes `item` on `list`, allocating room for one only when the list is new: most
/// lists of a connection's state hold one entry (a user's socket, a socket's room), and
/// the usual first allocation for four would cost every idle connection 50 bytes or more.
pub(crate) fn push_small<T>(list: &mut Vec<T>, item: T) {
    if list.capacity() == 0 {
        list.reserve_exact(1);
    }
    list.push(item);
}

/// Local connections per key.
#[derive(Default)]
pub(crate) struct Members {
    map: HashMap<Key, Vec<ConnId>>,
}

impl Members {
    /// Adds `id` under `key` (not there yet: see the module doc); true when it is the
    /// first local connection of `key`.
    pub fn add(&mut self, key: &Key, id: ConnId) -> bool {
        let list = self.map.entry(key.clone()).or_default();
        debug_assert!(!list.contains(&id), "a connection joins a key once");
        push_small(list, id);
        list.len() == 1
    }

    /// Removes `id` from `key`; true when that left `key` with no local connection.
    pub fn remove(&mut self, key: &str, id: ConnId) -> bool {
        let Some(list) = self.map.get_mut(key) else {
            return false;
        };
        if let Some(pos) = list.iter().position(|&m| m == id) {
            list.swap_remove(pos);
        }
        if list.is_empty() {
            self.map.remove(key);
            return true;
        }
        false
    }

    /// The local connections under `key` (empty if none).
    pub fn of(&self, key: &str) -> &[ConnId] {
        self.map.get(key).map_or(&[], Vec::as_slice)
    }

    /// Keys with at least one local connection.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// For benchmarks: `key` holds exactly `ids`.
    #[doc(hidden)]
    pub fn set(&mut self, key: Key, ids: Vec<ConnId>) {
        self.map.insert(key, ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::key;

    #[test]
    fn a_list_of_one_allocates_for_one_then_grows_as_usual() {
        let mut list = Vec::new();
        push_small(&mut list, 1u64);
        assert_eq!(list.capacity(), 1);
        push_small(&mut list, 2);
        assert!(list.capacity() >= 2);
        assert_eq!(list, [1, 2]);
    }

    #[test]
    fn reports_first_and_last_and_drops_empty_keys() {
        let (mut m, room) = (Members::default(), key("t", "lobby"));
        let (a, b) = (ConnId::from_u64(1), ConnId::from_u64(2));
        assert!(m.add(&room, a), "the first local member");
        assert!(!m.add(&room, b));
        assert_eq!(m.of(&room).len(), 2);
        assert!(!m.remove(&room, a));
        assert!(m.remove(&room, b), "the last member leaving empties the key");
        assert_eq!((m.len(), m.of(&room)), (0, &[][..]));
        assert!(!m.remove(&room, b), "removing from an absent key is a no-op");
    }
}
