//! Runtime settings the shards read: protocol timers, limits and queue bounds.
//!
//! One serde struct with documented defaults; the binary embeds it in its config file
//! (`[runtime]`) and validates it before any shard starts.

use serde::{Deserialize, Serialize};

/// A configuration value that cannot be used: which field, and what to change.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct InvalidConfig {
    /// Dotted path of the field in the configuration file (`runtime.max_payload`).
    pub field: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl InvalidConfig {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> InvalidConfig {
        InvalidConfig { field: field.into(), reason: reason.into() }
    }
}

/// Smallest outbound queue accepted (unless `max_payload` is smaller): one full write
/// buffer of frames.
const MIN_OUTBOUND_QUEUE: usize = 64 * 1024;
/// Largest `max_payload` accepted: a message is held whole in memory while assembled.
const MAX_PAYLOAD_LIMIT: usize = 64 << 20;

/// Protocol timers and per-connection bounds, shared read-only by every shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Milliseconds between Engine.IO pings the server sends (`pingInterval`).
    pub ping_interval_ms: u64,
    /// Milliseconds a client has to answer a ping before it is closed (`pingTimeout`).
    pub ping_timeout_ms: u64,
    /// Milliseconds after the WebSocket upgrade within which the client must send its
    /// Socket.IO CONNECT (the reference server's `connectTimeout`).
    pub connect_timeout_ms: u64,
    /// Milliseconds a new TCP connection has to deliver its HTTP request head.
    pub handshake_timeout_ms: u64,
    /// Largest WebSocket message accepted, in bytes (`maxPayload`, announced in the open
    /// packet). The reference server's default `maxHttpBufferSize` is 1 MB.
    pub max_payload: usize,
    /// Bytes that may wait in one connection's outbound queue. A client that lets more
    /// pile up is a slow consumer and is disconnected with reason `slow_consumer`.
    pub outbound_queue_bytes: usize,
    /// Sustained client events per second per connection (token bucket rate).
    pub events_per_second: u32,
    /// Burst of client events per connection (token bucket size).
    pub event_burst: u32,
    /// Rooms one socket may be in at once.
    pub max_rooms_per_socket: usize,
    /// Longest room id, user id or tenant id accepted, in bytes.
    pub max_id_len: usize,
    /// Undelivered messages kept per offline user; the oldest is dropped past it.
    pub offline_queue_len: usize,
    /// Seconds an undelivered message is kept for an offline user.
    pub offline_ttl_secs: u64,
    /// Milliseconds a `typing:start` lasts without a refresh before it expires.
    pub typing_ttl_ms: u64,
    /// Milliseconds the origin waits for a delivery report of a 1:1 message before it
    /// answers `message:sent` with status `sent`.
    pub delivery_report_timeout_ms: u64,
    /// Connections the whole process accepts; past it new connections get HTTP 503.
    pub max_connections: usize,
    /// Seconds a user's last-seen time is remembered after their last socket closed.
    pub presence_retention_secs: u64,
    /// Milliseconds over which a draining node (SIGTERM, `POST /admin/drain`) closes its
    /// connections, in batches, so the other nodes get the reconnects spread out.
    pub drain_ms: u64,
    /// Origins (`scheme://host[:port]`) whose pages may use the long-polling transport
    /// from another origin (CORS, with credentials); `*` allows any. Empty: same-origin
    /// pages only. WebSocket is not subject to CORS.
    pub cors_origins: Vec<String>,
    /// Connection state recovery (Socket.IO's protocol, kept in Redis): a client that
    /// reconnects within `max_disconnection_ms`, on any node, gets its rooms back and the
    /// room and 1:1 messages it missed (`docs/recovery.md`). Needs cluster mode.
    pub recovery: bool,
    /// How long after a disconnect (or a node's crash) a session can still be recovered.
    pub max_disconnection_ms: u64,
    /// Entries kept per room log and per user log for recovery (trimmed roughly).
    pub recovery_log_len: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            ping_interval_ms: 25_000,
            ping_timeout_ms: 20_000,
            connect_timeout_ms: 45_000,
            handshake_timeout_ms: 10_000,
            max_payload: 1_000_000,
            outbound_queue_bytes: 1 << 20,
            events_per_second: 50,
            event_burst: 100,
            max_rooms_per_socket: 100,
            max_id_len: 128,
            offline_queue_len: 100,
            offline_ttl_secs: 86_400,
            typing_ttl_ms: 5_000,
            delivery_report_timeout_ms: 5_000,
            max_connections: 1_000_000,
            presence_retention_secs: 86_400,
            drain_ms: 10_000,
            cors_origins: Vec::new(),
            recovery: false,
            max_disconnection_ms: 120_000,
            recovery_log_len: 1000,
        }
    }
}

impl RuntimeConfig {
    /// True if pages from `origin` may use long-polling across origins.
    pub fn cors_allows(&self, origin: &str) -> bool {
        self.cors_origins.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    /// Checks that every value is usable; the message names the field.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let positive = [
            ("ping_interval_ms", self.ping_interval_ms),
            ("ping_timeout_ms", self.ping_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("max_payload", self.max_payload as u64),
            ("events_per_second", self.events_per_second as u64),
            ("event_burst", self.event_burst as u64),
            ("max_rooms_per_socket", self.max_rooms_per_socket as u64),
            ("max_id_len", self.max_id_len as u64),
            ("typing_ttl_ms", self.typing_ttl_ms),
            ("delivery_report_timeout_ms", self.delivery_report_timeout_ms),
            ("max_connections", self.max_connections as u64),
            ("drain_ms", self.drain_ms),
            ("max_disconnection_ms", self.max_disconnection_ms),
            ("recovery_log_len", self.recovery_log_len as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(InvalidConfig::new(format!("runtime.{name}"), "must be greater than 0"));
            }
        }
        if self.outbound_queue_bytes < self.max_payload.min(MIN_OUTBOUND_QUEUE) {
            return Err(InvalidConfig::new(
                "runtime.outbound_queue_bytes",
                "must be at least 64 KiB or max_payload",
            ));
        }
        if self.max_payload > MAX_PAYLOAD_LIMIT {
            return Err(InvalidConfig::new("runtime.max_payload", "must be at most 64 MiB"));
        }
        for o in &self.cors_origins {
            let rest = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://"));
            let ok = o == "*" || rest.is_some_and(|r| !r.is_empty() && !r.contains('/') && !r.contains(' '));
            if !ok {
                return Err(InvalidConfig::new(
                    "runtime.cors_origins",
                    format!("{o:?} is not an origin: use scheme://host[:port] (no path), or *"),
                ));
            }
        }
        Ok(())
    }

    /// Period of the shard's timer scan: fine enough for the shortest timer.
    pub fn tick_ms(&self) -> u64 {
        let shortest = self
            .ping_interval_ms
            .min(self.ping_timeout_ms)
            .min(self.connect_timeout_ms)
            .min(self.typing_ttl_ms)
            .min(self.delivery_report_timeout_ms);
        (shortest / 4).clamp(5, 1000)
    }
}
