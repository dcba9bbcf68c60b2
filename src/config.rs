//! The node's configuration: one serde struct with defaults, read from an optional TOML
//! file, then overridden by environment variables and flags, then validated.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shardgate_shard::config::InvalidConfig;
use shardgate_shard::RuntimeConfig;

/// Most shards one process runs (a sanity bound, far above any core count).
const MAX_SHARDS: usize = 1024;
/// Shortest HS256 secret accepted.
const MIN_SECRET_LEN: usize = 16;
/// Shortest liveness key lifetime: the node refreshes it every third, and a shorter one
/// would make a busy node look dead.
const MIN_LIVENESS_TTL_MS: u64 = 300;
/// Compression codecs librdkafka knows.
const COMPRESSIONS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

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
    /// Operator endpoints (`POST /admin/drain`); off unless `admin.token` is set.
    pub admin: AdminConfig,
    /// The message store read by `history:fetch`; off unless `mongodb.uri` is set.
    pub mongodb: MongoSettings,
}

/// The message store (MongoDB, written by `shardgate persist`) for `history:fetch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MongoSettings {
    /// `mongodb://host:port/DB`; unset: `history:fetch` answers `history_off`.
    pub uri: Option<String>,
    /// Longest a history read may take before the client gets `history_timeout`.
    pub history_timeout_ms: u64,
}

impl Default for MongoSettings {
    fn default() -> Self {
        MongoSettings { uri: None, history_timeout_ms: 5_000 }
    }
}

/// Operator endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token of `POST /admin/drain`; unset disables the admin endpoints.
    pub token: Option<String>,
    /// Internal address serving `/metrics` and `/admin/*` (and health); when set, the
    /// public port no longer answers them.
    pub listen: Option<SocketAddr>,
}

impl AdminConfig {
    /// Checks the admin settings against the public address `public`.
    pub fn validate(&self, public: SocketAddr) -> Result<(), ConfigError> {
        if matches!(&self.token, Some(t) if t.len() < MIN_SECRET_LEN) {
            return Err(invalid("admin.token", "must be at least 16 bytes"));
        }
        if let Some(addr) = self.listen {
            if addr.port() != 0
                && addr.port() == public.port()
                && (addr.ip() == public.ip() || addr.ip().is_unspecified() || public.ip().is_unspecified())
            {
                return Err(invalid("admin.listen", "must differ from the public listen address"));
            }
        }
        Ok(())
    }
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

impl KafkaSettings {
    /// Checks the producer settings (only when persistence is on).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.is_none() {
            return Ok(());
        }
        if !COMPRESSIONS.contains(&self.compression.as_str()) {
            return Err(invalid("kafka.compression", "must be none, gzip, snappy, lz4 or zstd"));
        }
        if self.partitions < 1 || self.replication < 1 || self.producer_queue == 0 || self.buffer_records == 0
        {
            return Err(invalid(
                "kafka",
                "partitions, replication, producer_queue and buffer_records must be >= 1",
            ));
        }
        Ok(())
    }
}

impl ClusterConfig {
    /// Checks the cluster settings (only when cluster mode is on).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(url) = &self.redis else {
            return Ok(());
        };
        RedisUrl::parse(url)?;
        if let Some(id) = &self.server_id {
            let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if id.is_empty() || id.len() > 64 || !id.chars().all(ok) {
                return Err(invalid("cluster.server_id", "1..=64 characters of A-Z a-z 0-9 - _ ."));
            }
        }
        if self.liveness_ttl_ms < MIN_LIVENESS_TTL_MS || self.presence_ttl_secs < 2 {
            return Err(invalid("cluster", "liveness_ttl_ms must be >= 300 and presence_ttl_secs >= 2"));
        }
        Ok(())
    }
}

impl AuthConfig {
    /// Checks the token settings for a node listening on `listen`.
    pub fn validate(&self, listen: SocketAddr) -> Result<(), ConfigError> {
        if self.jwt_secret.is_some() && self.jwt_public_key.is_some() {
            return Err(invalid("auth", "set either jwt_secret or jwt_public_key, not both"));
        }
        if matches!(&self.jwt_secret, Some(s) if s.len() < MIN_SECRET_LEN) {
            return Err(invalid("auth.jwt_secret", "must be at least 16 bytes"));
        }
        if let Some(p) = &self.jwt_public_key {
            if !p.exists() {
                return Err(invalid("auth.jwt_public_key", &format!("{} does not exist", p.display())));
            }
        }
        if self.jwt_secret.is_none() && self.jwt_public_key.is_none() && !listen.ip().is_loopback() {
            return Err(invalid(
                "auth",
                "a jwt_secret or jwt_public_key is required when listening beyond loopback",
            ));
        }
        Ok(())
    }
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
            admin: AdminConfig::default(),
            mongodb: MongoSettings::default(),
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`Config`] (unknown keys are errors).
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said, with the line.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or values contradict each other.
    #[error(transparent)]
    Invalid(#[from] InvalidConfig),
    /// `cluster.redis` is not a Redis URL.
    #[error("cluster.redis: {0}")]
    RedisUrl(#[from] UrlError),
}

fn invalid(field: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid(InvalidConfig::new(field, reason))
}

impl Config {
    /// Reads a TOML file; unknown keys are errors, missing keys take defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), source: Box::new(e) })
    }

    /// Checks the whole configuration, section by section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.runtime.validate()?;
        self.auth.validate(self.listen)?;
        self.cluster.validate()?;
        self.kafka.validate()?;
        if self.mongodb.uri.is_some() && self.mongodb.history_timeout_ms == 0 {
            return Err(invalid("mongodb.history_timeout_ms", "must be at least 1"));
        }
        if matches!(&self.mongodb.uri, Some(u) if !u.starts_with("mongodb://") && !u.starts_with("mongodb+srv://"))
        {
            return Err(invalid(
                "mongodb.uri",
                "must be a mongodb:// or mongodb+srv:// URI naming a database",
            ));
        }
        self.admin.validate(self.listen)?;
        if self.shards > MAX_SHARDS {
            return Err(invalid("shards", "must be at most 1024"));
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

/// Where Redis is: `redis://[user[:password]@]host[:port][/db]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// Host name or address.
    pub host: String,
    /// Port (6379 by default).
    pub port: u16,
    /// ACL user name (Redis 6+), if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<String>,
    /// Database index.
    pub db: u32,
}

/// What is wrong with a Redis URL (the URL itself is not repeated: it may hold a
/// password).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    /// Not `redis://`.
    #[error("expected redis://[user[:password]@]host[:port][/db]")]
    Scheme,
    /// The database index is not a number.
    #[error("the database (after /) must be a number")]
    Database,
    /// The port is not a number.
    #[error("the port must be a number from 1 to 65535")]
    Port,
    /// No host.
    #[error("missing host")]
    Host,
}

/// Redis's default port.
const REDIS_PORT: u16 = 6379;

impl RedisUrl {
    /// Parses a `redis://` URL.
    pub fn parse(url: &str) -> Result<RedisUrl, UrlError> {
        let rest = url.strip_prefix("redis://").ok_or(UrlError::Scheme)?;
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (hostport, db) = match hostpart.split_once('/') {
            Some((h, d)) if !d.is_empty() => (h, d.parse().map_err(|_| UrlError::Database)?),
            Some((h, _)) => (h, 0),
            None => (hostpart, 0),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| UrlError::Port)?),
            None => (hostport, REDIS_PORT),
        };
        if host.is_empty() {
            return Err(UrlError::Host);
        }
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
                None => (None, Some(a.to_string())),
            },
        };
        Ok(RedisUrl { host: host.to_string(), port, username, password, db })
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
        assert!(c.validate().unwrap_err().to_string().contains("required when listening beyond loopback"));
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn parses_urls() {
        let u = RedisUrl::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db, u.password), ("127.0.0.1", 6380, 2, None));
        let u = RedisUrl::parse("redis://app:s3cret@redis.local").unwrap();
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref(), u.port),
            (Some("app"), Some("s3cret"), 6379)
        );
        let u = RedisUrl::parse("redis://:pw@h:1/").unwrap();
        assert_eq!((u.username, u.password.as_deref()), (None, Some("pw")));
        assert_eq!(RedisUrl::parse("http://x"), Err(UrlError::Scheme));
        assert_eq!(RedisUrl::parse("redis://h:port"), Err(UrlError::Port));
    }
}
