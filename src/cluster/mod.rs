//! Cluster mode: the Redis side of the bridge thread.
//!
//! Shards never talk to Redis: they send [`BridgeMsg`]s to the bridge's inbox, and the
//! bridge answers through their mesh inboxes. Read in this order:
//!
//! * [`state`]: the bridge's cluster state ([`state::Cluster`]) and its effects on shards;
//! * [`link`]: the reconnect loop and the connected loop, over [`conns`]: the Redis
//!   connections (one Redis, or one per master of a Redis Cluster);
//! * [`plan`]: each shard message -> pipelined commands in a [`batch::Batch`], each with
//!   a [`batch::Then`];
//! * [`apply`]: each reply, as its `Then` says;
//! * [`pubsub`]: pushes on this node's channels -> shard messages;
//! * [`sweep`]: this node's liveness, and the sweep of dead nodes' registrations;
//! * [`mirror`]: what this process registered (re-registration, Redis-down delivery,
//!   room subscription counts); [`route_cache`]: who holds a user's sockets;
//! * [`recover`]: connection state recovery (logged messages, restoring a session), with
//!   [`resume`], the claims in progress, and [`logged`], its commands (sessions, logs);
//! * [`keys`]: every key and channel name; [`scripts`]: the Lua scripts;
//!   [`redis`]: one RESP2 connection over glommio.
//!
//! The envelope other nodes publish is decoded by `shardgate_io::envelope`.

pub mod apply;
pub mod batch;
pub mod conns;
pub mod keys;
pub mod link;
pub mod logged;
pub mod mirror;
pub mod plan;
pub mod pubsub;
pub mod recover;
pub mod redis;
pub mod resume;
pub mod route_cache;
pub mod scripts;
pub mod state;
pub mod sweep;

use std::sync::Arc;

use shardgate_shard::mesh::{Doorbell, Inbox};
use shardgate_shard::msg::BridgeMsg;

use crate::config::{Config, ConfigError, RedisUrl};

/// Cluster settings of one node, taken from its [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Redis to use.
    pub redis: RedisUrl,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// This process's server id.
    pub server_id: Arc<str>,
    /// Lifetime of the node's liveness key; refreshed every third of it, and dead nodes
    /// are swept once theirs expired.
    pub liveness_ttl_ms: u64,
    /// `presence:{user}` lifetime while online (refreshed at half of it).
    pub presence_ttl_secs: u64,
    /// How long an offline user's presence (lastSeen) is kept.
    pub presence_retention_secs: u64,
    /// Offline queue bound per user.
    pub offline_queue_len: usize,
    /// Offline queue lifetime.
    pub offline_ttl_secs: u64,
    /// Typing indicator lifetime.
    pub typing_ttl_ms: u64,
    /// Connection state recovery, when on.
    pub recovery: Option<Recovery>,
}

/// Connection state recovery settings (`docs/recovery.md`).
#[derive(Debug, Clone, Copy)]
pub struct Recovery {
    /// How long a disconnected session stays recoverable.
    pub max_disconnection_ms: u64,
    /// Entries kept per log (roughly: `MAXLEN ~`).
    pub log_len: usize,
    /// Lifetime of a connected session's keys and of a log after its last message:
    /// `max_disconnection_ms` plus one presence lifetime, so that the periodic refresh
    /// (every half presence lifetime) always comes first, and a crashed node's sessions
    /// stay recoverable for `max_disconnection_ms` after its last refresh.
    pub live_ttl_ms: u64,
}

impl Settings {
    /// The cluster settings of `cfg` for server `server_id`; `None` without `cluster.redis`.
    pub fn from_config(cfg: &Config, server_id: Arc<str>) -> Result<Option<Settings>, ConfigError> {
        let Some(url) = &cfg.cluster.redis else {
            return Ok(None);
        };
        Ok(Some(Settings {
            redis: RedisUrl::parse(url)?,
            prefix: cfg.cluster.prefix.clone(),
            server_id,
            liveness_ttl_ms: cfg.cluster.liveness_ttl_ms,
            presence_ttl_secs: cfg.cluster.presence_ttl_secs,
            presence_retention_secs: cfg.runtime.presence_retention_secs,
            offline_queue_len: cfg.runtime.offline_queue_len,
            offline_ttl_secs: cfg.runtime.offline_ttl_secs,
            typing_ttl_ms: cfg.runtime.typing_ttl_ms,
            recovery: cfg.runtime.recovery.then(|| Recovery {
                max_disconnection_ms: cfg.runtime.max_disconnection_ms,
                log_len: cfg.runtime.recovery_log_len,
                live_ttl_ms: cfg.runtime.max_disconnection_ms + cfg.cluster.presence_ttl_secs * 1000,
            }),
        }))
    }
}

/// What the bridge thread needs to run the cluster side.
pub struct ClusterPart {
    /// Settings.
    pub settings: Settings,
    /// Inbox of cluster messages.
    pub inbox: Arc<Inbox<BridgeMsg>>,
    /// Its doorbell.
    pub bell: Doorbell,
}

#[cfg(test)]
pub(crate) mod tests {
    //! Helpers for the unit tests of the planner, the reply handler and pub/sub: a
    //! cluster state over one shard with no Redis connection.

    use super::*;
    use shardgate_io::resp::{self, Reply};
    use shardgate_shard::mesh::Owner;
    use shardgate_shard::msg::ShardMsg;

    /// A disconnected cluster state: server `me`, prefix `p:`, one shard.
    pub fn cluster() -> state::Cluster {
        cluster_with(false)
    }

    /// The same, with connection state recovery on or off.
    pub fn cluster_with(recovery: bool) -> state::Cluster {
        let shared = shardgate_shard::bench::shared().expect("mesh");
        // The doorbell's read end is dropped: rings fail silently, the queue still works.
        let (inbox, _) = Inbox::new(Owner::Bridge).expect("inbox");
        let mut cfg = Config::default();
        cfg.cluster.redis = Some("redis://127.0.0.1:1".into());
        cfg.cluster.prefix = "p:".into();
        cfg.runtime.recovery = recovery;
        let settings = Settings::from_config(&cfg, "me".into()).unwrap().unwrap();
        state::Cluster::new(settings, shared, Arc::new(inbox))
    }

    /// The commands of a batch, as raw arguments.
    pub fn commands_raw(b: &batch::Batch) -> Vec<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut rest = &b.buf[..];
        while let Ok(Some((Reply::Array(args), used))) = resp::decode_reply(rest) {
            out.push(args.iter().map(|a| resp::as_bytes(a).unwrap_or_default().to_vec()).collect());
            rest = &rest[used..];
        }
        assert_eq!(out.len(), b.then.len(), "one Then per command");
        out
    }

    /// The commands of a batch, arguments as (lossy) text.
    pub fn commands(b: &batch::Batch) -> Vec<Vec<String>> {
        commands_raw(b)
            .into_iter()
            .map(|c| c.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect())
            .collect()
    }

    /// What the bridge sent to shard `s` so far.
    pub fn drain_shard(c: &state::Cluster, s: usize) -> Vec<ShardMsg> {
        let mut out = Vec::new();
        c.shared.mesh.drain(s, 1024, &mut out);
        out
    }
}
