//! Every Redis key and channel name the bridge uses, built and parsed here only.
//!
//! Names follow docs/redis.md: an optional global prefix, then the seed's names, with
//! tenant-qualified ids written as `tenant:id` ([`redis_id`]). The owner of a key (a user,
//! a room, a server) is in braces, a Redis Cluster hash tag: every key one decision
//! touches shares a slot (`docs/redis-cluster.md`). The scripts (`scripts.rs`) get their
//! keys in KEYS, built here; the table in docs/redis.md is the contract.

use shardgate_shard::msg::{key, Key};

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

/// A channel the pub/sub connection receives, as the bridge understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// `room:{tenant}:{room}`: a room broadcast.
    Room(Key),
    /// `server:{id}`: directed delivery and delivery acks for one node.
    Server,
    /// `registry:changes`: a user's socket set changed somewhere.
    RegistryChanges,
    /// `presence:updates`: a user went online or offline cluster-wide.
    PresenceUpdates,
    /// `registry:changes:{T:U}`: the same for one user (a Redis Cluster).
    UserRegistry(Key),
    /// `presence:updates:{T:U}`: the same for one user (a Redis Cluster).
    UserPresence(Key),
}

/// The names of one deployment (one prefix).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Names under `prefix` (may be empty).
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_string() }
    }

    /// The global prefix, as the scripts receive it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn name(&self, parts: &[&str]) -> String {
        let mut s = String::with_capacity(self.prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
        s.push_str(&self.prefix);
        for p in parts {
            s.push_str(p);
        }
        s
    }

    /// `room:{T:R}`: the room's member set (`server|sid`) and its broadcast channel.
    pub fn room(&self, room: &str) -> String {
        self.name(&["room:{", &redis_id(room), "}"])
    }

    /// `room:{T:R}` of a room as `rooms:{S}` lists it (`T:R`, see [`redis_id`]).
    pub fn room_of_id(&self, id: &str) -> String {
        self.name(&["room:{", id, "}"])
    }

    /// `rooms:{S}`: rooms with members on `server` (for the sweep of a dead node).
    pub fn server_rooms(&self, server: &str) -> String {
        self.name(&["rooms:{", server, "}"])
    }

    /// `connections:{S}`: the sockets of `server` (sid -> user), for its sweep.
    pub fn connections(&self, server: &str) -> String {
        self.name(&["connections:{", server, "}"])
    }

    /// `server:{S}`: the node's own channel.
    pub fn server(&self, server: &str) -> String {
        self.name(&["server:{", server, "}"])
    }

    /// `user:{T:U}:sockets`: every socket of the user, `server|sid`.
    pub fn user_sockets(&self, user: &str) -> String {
        self.name(&["user:{", &redis_id(user), "}:sockets"])
    }

    /// `presence:{T:U}`: `online|ts` or `offline|lastSeen`.
    pub fn presence(&self, user: &str) -> String {
        self.name(&["presence:{", &redis_id(user), "}"])
    }

    /// `offline:{T:U}`: the user's offline queue.
    pub fn offline(&self, user: &str) -> String {
        self.name(&["offline:{", &redis_id(user), "}"])
    }

    /// The keys of the user scripts (UP, DOWN, ROUTE, ...): sockets, presence, queue.
    pub fn user_keys(&self, user: &str) -> [String; 3] {
        [self.user_sockets(user), self.presence(user), self.offline(user)]
    }

    /// `typing:{T:R}`: hash user -> expiry.
    pub fn typing(&self, room: &str) -> String {
        self.name(&["typing:{", &redis_id(room), "}"])
    }

    /// `{recovery}:session:PID`: a recovery session (hash: `user`, `from`, `sid`); its
    /// rooms are `{recovery}:session:PID:rooms` (hash: room -> sequence number at the
    /// join). Every recovery key is in the one `{recovery}` slot (`docs/recovery.md`).
    pub fn session(&self, pid: &str) -> String {
        self.name(&["{recovery}:session:", pid])
    }

    /// `{recovery}:session:PID:rooms`.
    pub fn session_rooms(&self, pid: &str) -> String {
        self.name(&["{recovery}:session:", pid, ":rooms"])
    }

    /// `{recovery}:sessions:T:U`: the sockets (`S|sid`) holding a session of the user,
    /// the receivers of its recoverable 1:1 messages on a Redis Cluster.
    pub fn sessions_of(&self, user: &str) -> String {
        self.name(&["{recovery}:sessions:", &redis_id(user)])
    }

    /// `{recovery}:seq`: the one sequence of recoverable messages.
    pub fn recovery_seq(&self) -> String {
        self.name(&["{recovery}:seq"])
    }

    /// `{recovery}:log:room:T:R`.
    pub fn room_log(&self, room: &str) -> String {
        self.name(&["{recovery}:log:room:", &redis_id(room)])
    }

    /// `{recovery}:log:user:T:U`.
    pub fn user_log(&self, user: &str) -> String {
        self.name(&["{recovery}:log:user:", &redis_id(user)])
    }

    /// `{recovery}:server:S`: node S's channel of recoverable 1:1 messages and RESUME
    /// markers on a Redis Cluster (in the recovery slot, so that one master orders them
    /// with the room messages).
    pub fn recovery_server(&self, server: &str) -> String {
        self.name(&["{recovery}:server:", server])
    }

    /// `{recovery}:room:T:R`: a room's channel of recoverable messages on a Redis Cluster.
    pub fn recovery_room(&self, room: &str) -> String {
        self.name(&["{recovery}:room:", &redis_id(room)])
    }

    /// `node:{S}`: the node's liveness key.
    pub fn node(&self, server: &str) -> String {
        self.name(&["node:{", server, "}"])
    }

    /// `sweep:{S}`: the lease of the node sweeping dead server `S`.
    pub fn sweep(&self, server: &str) -> String {
        self.name(&["sweep:{", server, "}"])
    }

    /// `nodes`: every node that registered.
    pub fn nodes(&self) -> String {
        self.name(&["nodes"])
    }

    /// `registry:changes:{T:U}`: the user's own registry channel (a Redis Cluster).
    pub fn user_registry(&self, user: &str) -> String {
        self.name(&["registry:changes:{", &redis_id(user), "}"])
    }

    /// `presence:updates:{T:U}`: the user's own presence channel (a Redis Cluster).
    pub fn user_presence(&self, user: &str) -> String {
        self.name(&["presence:updates:{", &redis_id(user), "}"])
    }

    /// `registry:changes` channel.
    pub fn registry_changes(&self) -> String {
        self.name(&["registry:changes"])
    }

    /// `presence:updates` channel.
    pub fn presence_updates(&self) -> String {
        self.name(&["presence:updates"])
    }

    /// A room member as stored in `room:{room}`: `{server}|{sid}`.
    pub fn room_member(server: &str, sid: &str) -> String {
        format!("{server}|{sid}")
    }

    /// What `channel` (as received on the pub/sub connection) is; `None` for anything
    /// this deployment does not publish.
    pub fn parse_channel(&self, channel: &[u8]) -> Option<Channel> {
        let name = std::str::from_utf8(channel).ok()?.strip_prefix(self.prefix.as_str())?;
        if let Some(room) = name.strip_prefix("room:{").and_then(|r| r.strip_suffix('}')) {
            return from_redis_id(room).map(Channel::Room);
        }
        if let Some(room) = name.strip_prefix("{recovery}:room:") {
            return from_redis_id(room).map(Channel::Room);
        }
        if name.starts_with("{recovery}:server:") {
            return Some(Channel::Server);
        }
        let user = |rest: &str| rest.strip_prefix('{')?.strip_suffix('}').and_then(from_redis_id);
        if let Some(rest) = name.strip_prefix("registry:changes:") {
            return user(rest).map(Channel::UserRegistry);
        }
        if let Some(rest) = name.strip_prefix("presence:updates:") {
            return user(rest).map(Channel::UserPresence);
        }
        match name {
            "registry:changes" => Some(Channel::RegistryChanges),
            "presence:updates" => Some(Channel::PresenceUpdates),
            _ if name.starts_with("server:{") => Some(Channel::Server),
            _ => None,
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
    fn names_are_built_and_parsed_in_one_place() {
        let k = Keys::new("sg:");
        let room = key("acme", "lobby");
        assert_eq!(k.room(&room), "sg:room:{acme:lobby}");
        assert_eq!(k.user_sockets(&key("acme", "bob")), "sg:user:{acme:bob}:sockets");
        assert_eq!(k.parse_channel(k.room(&room).as_bytes()), Some(Channel::Room(room.clone())));
        assert_eq!(k.parse_channel(k.server("n1").as_bytes()), Some(Channel::Server));
        assert_eq!(k.parse_channel(k.registry_changes().as_bytes()), Some(Channel::RegistryChanges));
        assert_eq!(k.parse_channel(k.presence_updates().as_bytes()), Some(Channel::PresenceUpdates));
        let bob = key("acme", "bob");
        assert_eq!(k.user_registry(&bob), "sg:registry:changes:{acme:bob}");
        assert_eq!(
            k.parse_channel(k.user_registry(&bob).as_bytes()),
            Some(Channel::UserRegistry(bob.clone()))
        );
        assert_eq!(k.parse_channel(k.user_presence(&bob).as_bytes()), Some(Channel::UserPresence(bob)));
        assert_eq!(k.parse_channel(k.recovery_room(&room).as_bytes()), Some(Channel::Room(room.clone())));
        assert_eq!(k.parse_channel(k.recovery_server("n1").as_bytes()), Some(Channel::Server));
        assert_eq!(k.recovery_room(&room), "sg:{recovery}:room:acme:lobby");
        assert_eq!(k.parse_channel(b"other:room:{acme:lobby}"), None);
        assert_eq!(k.parse_channel(b"sg:room:{no-tenant-separator}"), None);
        assert_eq!(k.parse_channel(b"sg:\xff"), None);
        assert_eq!(k.presence(&key("acme", "bob")), "sg:presence:{acme:bob}");
        assert_eq!(k.offline(&key("acme", "bob")), "sg:offline:{acme:bob}");
        assert_eq!(k.typing(&key("acme", "r")), "sg:typing:{acme:r}");
        assert_eq!(
            (k.node("n1"), k.nodes(), k.server_rooms("n1"), k.connections("n1")),
            ("sg:node:{n1}".into(), "sg:nodes".into(), "sg:rooms:{n1}".into(), "sg:connections:{n1}".into())
        );
        assert_eq!(Keys::room_member("n1", "00ab"), "n1|00ab");
    }
}
