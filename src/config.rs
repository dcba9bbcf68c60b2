//! The node's configuration: one serde struct with defaults, read from an optional TOML
//! file, then overridden by environment variables and flags, then validated.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shardgate_shard::RuntimeConfig;

/// HS256 secret used when none is configured and the node listens on loopback only.
pub const DEV_SECRET: &str = "shardgate-dev-secret-do-not-use-in-production";

/// Everything `shardgate serve` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address every shard listens on (SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Number of shards; 0 means one per core but the one reserved for the bridge.
    pub shards: usize,
    /// Pin shard i to `cpus[i]`; empty pins shard i to core i.
    pub cpus: Vec<usize>,
    /// Pin shards to cores at all.
    pub pin: bool,
    /// Token verification.
    pub auth: AuthConfig,
    /// Protocol timers and limits.
    pub runtime: RuntimeConfig,
    /// Cluster mode (Redis); off unless `cluster.redis` is set.
    pub cluster: ClusterConfig,
    /// Persistence (Kafka); off unless `kafka.brokers` is set.
    pub kafka: KafkaSettings,
}

/// Kafka production settings (librdkafka names in parentheses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]`; unset turns persistence off.
    pub brokers: Option<String>,
    /// Milliseconds librdkafka waits to fill a batch (`linger.ms`).
    pub linger_ms: u64,
    /// Largest batch in bytes (`batch.size`).
    pub batch_bytes: usize,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd` (`compression.type`).
    pub compression: String,
    /// Records librdkafka holds (`queue.buffering.max.messages`).
    pub producer_queue: usize,
    /// Records the bridge holds beyond that; past it the newest are dropped and counted.
    pub buffer_records: usize,
    /// Partitions of the topics shardgate creates.
    pub partitions: i32,
    /// Replication factor of the topics shardgate creates.
    pub replication: i32,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: None,
            linger_ms: 5,
            batch_bytes: 1 << 20,
            compression: "lz4".into(),
            producer_queue: 100_000,
            buffer_records: 100_000,
            partitions: 6,
            replication: 1,
        }
    }
}

/// Cluster membership through Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://[user[:password]@]host[:port][/db]`; unset runs the embedded bus.
    pub redis: Option<String>,
    /// Prefix of every Redis key and channel.
    pub prefix: String,
    /// This process's id in the cluster; unset picks a random one per process.
    pub server_id: Option<String>,
    /// Lifetime of the node's liveness key, in milliseconds.
    pub liveness_ttl_ms: u64,
    /// Lifetime of an online user's presence key, in seconds (refreshed at half).
    pub presence_ttl_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis: None,
            prefix: String::new(),
            server_id: None,
            liveness_ttl_ms: 15_000,
            presence_ttl_secs: 60,
        }
    }
}

/// JWT settings. Exactly one of `jwt_secret` and `jwt_public_key` is used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret.
    pub jwt_secret: Option<String>,
    /// PEM file with an RSA (RS256) or P-256 (ES256) public key.
    pub jwt_public_key: Option<PathBuf>,
    /// Seconds of clock skew tolerated on `exp`.
    pub leeway_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:3000".parse().expect("static address"),
            shards: 0,
            cpus: Vec::new(),
            pin: true,
            auth: AuthConfig { leeway_secs: 5, ..AuthConfig::default() },
            runtime: RuntimeConfig::default(),
            cluster: ClusterConfig::default(),
            kafka: KafkaSettings::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown keys are errors, missing keys take defaults.
    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks the whole configuration; the message names what to change.
    pub fn validate(&self) -> Result<(), String> {
        self.runtime.validate()?;
        if self.auth.jwt_secret.is_some() && self.auth.jwt_public_key.is_some() {
            return Err("auth: set either jwt_secret or jwt_public_key, not both".into());
        }
        if matches!(&self.auth.jwt_secret, Some(s) if s.len() < 16) {
            return Err("auth.jwt_secret must be at least 16 bytes".into());
        }
        if let Some(p) = &self.auth.jwt_public_key {
            if !p.exists() {
                return Err(format!("auth.jwt_public_key: {} does not exist", p.display()));
            }
        }
        if self.auth.jwt_secret.is_none()
            && self.auth.jwt_public_key.is_none()
            && !self.listen.ip().is_loopback()
        {
            return Err(
                "auth: a jwt_secret or jwt_public_key is required when listening beyond loopback".into()
            );
        }
        if let Some(url) = &self.cluster.redis {
            crate::bridge::RedisUrl::parse(url).map_err(|e| format!("cluster.redis: {e}"))?;
            if let Some(id) = &self.cluster.server_id {
                let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
                if id.is_empty() || id.len() > 64 || !id.chars().all(ok) {
                    return Err("cluster.server_id: 1..=64 characters of A-Z a-z 0-9 - _ .".into());
                }
            }
            if self.cluster.liveness_ttl_ms < 300 || self.cluster.presence_ttl_secs < 2 {
                return Err("cluster.liveness_ttl_ms must be >= 300 and presence_ttl_secs >= 2".into());
            }
        }
        if self.kafka.brokers.is_some() {
            let k = &self.kafka;
            if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&k.compression.as_str()) {
                return Err("kafka.compression must be none, gzip, snappy, lz4 or zstd".into());
            }
            if k.partitions < 1 || k.replication < 1 || k.producer_queue == 0 || k.buffer_records == 0 {
                return Err(
                    "kafka: partitions, replication, producer_queue and buffer_records must be >= 1".into()
                );
            }
        }
        if self.shards > 1024 {
            return Err("shards must be at most 1024".into());
        }
        Ok(())
    }

    /// Shards to run: the configured number, or all cores but one (at least one).
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        cores.saturating_sub(1).max(1)
    }

    /// CPU of each shard.
    pub fn placement(&self) -> Vec<Option<usize>> {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (0..self.shard_count())
            .map(|i| {
                if !self.pin {
                    None
                } else if self.cpus.is_empty() {
                    Some(i % cores)
                } else {
                    self.cpus.get(i % self.cpus.len()).copied()
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_validates() {
        let c: Config =
            toml::from_str("listen = \"0.0.0.0:4000\"\n[runtime]\nping_interval_ms = 1000\n").unwrap();
        assert_eq!(c.listen.port(), 4000);
        assert_eq!(c.runtime.ping_interval_ms, 1000);
        assert_eq!(c.runtime.ping_timeout_ms, RuntimeConfig::default().ping_timeout_ms);
        assert!(c.validate().unwrap_err().contains("required when listening beyond loopback"));
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        assert!(Config::default().validate().is_ok());
    }
}
