//! Per-shard counters, summed at scrape time into Prometheus text.
//!
//! Every counter has exactly one writer, its shard, which bumps it with a relaxed load and
//! store (no locked instruction, no cache line shared with another writer). A scrape reads
//! all shards with relaxed loads and sums; a value may lag by a few increments, never tear.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! labels {
    ($(#[$m:meta])* $name:ident { $($(#[doc = $vdoc:literal])* $v:ident => $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[doc = $vdoc])* $v),* }
        impl $name {
            /// Every variant, in order.
            pub const ALL: &'static [$name] = &[$($name::$v),*];
            /// Label or metric name.
            pub fn as_str(self) -> &'static str { match self { $($name::$v => $s),* } }
            /// The variant's documentation, as one line (the metric's `# HELP`).
            pub fn help(self) -> &'static str { match self { $($name::$v => concat!($($vdoc),*)),* } }
        }
    };
}

labels! {
    /// Why a client connection ended. Every close is counted under one of these.
    CloseReason {
        /// The client closed the WebSocket or the TCP connection.
        ClientClosed => "client_closed",
        /// The client sent a Socket.IO or Engine.IO disconnect.
        ClientDisconnect => "client_disconnect",
        /// Read or write failed.
        TransportError => "transport_error",
        /// No pong within `pingTimeout`.
        PingTimeout => "ping_timeout",
        /// No Socket.IO CONNECT within the connect timeout.
        ConnectTimeout => "connect_timeout",
        /// The HTTP request head did not arrive in time.
        HandshakeTimeout => "handshake_timeout",
        /// The token was missing or refused.
        AuthFailed => "auth_failed",
        /// CONNECT to a namespace this server does not serve.
        InvalidNamespace => "invalid_namespace",
        /// A packet that does not follow Engine.IO / Socket.IO.
        MalformedPacket => "malformed_packet",
        /// A WebSocket frame that breaks RFC 6455, or long-polling requests that break
        /// Engine.IO (overlapping GETs or POSTs, a POST without a length).
        ProtocolError => "protocol_error",
        /// A message larger than `maxPayload`.
        PayloadTooLarge => "payload_too_large",
        /// The outbound queue passed its bound.
        SlowConsumer => "slow_consumer",
        /// Events kept coming far above the rate limit.
        RateLimited => "rate_limited",
        /// The server is shutting down or draining.
        ServerShutdown => "server_shutdown",
    }
}

labels! {
    /// Monotonic counters and gauges of one shard.
    Counter {
        /// TCP connections accepted.
        Accepted => "connections_accepted_total",
        /// Connections refused because the process is at `max_connections`.
        Refused => "connections_refused_total",
        /// Engine.IO sessions open now, WebSocket or long-polling (gauge).
        Open => "connections_open",
        /// Of those, sessions on HTTP long-polling now (gauge).
        PollingOpen => "polling_sessions_open",
        /// Long-polling requests served (GET and POST with a session id).
        PollingRequests => "polling_requests_total",
        /// Requests that arrived on another shard than their session's and were handed
        /// to the owner with their connection.
        Handoffs => "polling_handoffs_total",
        /// WebSockets parked now: idle, without a task, watched by the shard's epoll set
        /// (gauge).
        Parked => "websockets_parked",
        /// WebSockets parked (a task ended because its client was idle).
        Parks => "websocket_parks_total",
        /// Reads served on parked WebSockets without giving them a task (pongs, occasional
        /// events).
        ParkedReads => "websocket_parked_reads_total",
        /// Parked WebSockets given a task again (to read a stream of frames, to write
        /// what a full socket did not take, or to close after flushing what is queued; a
        /// parked connection that closes with nothing queued is closed in place).
        Resumes => "websocket_resumes_total",
        /// Long-polling sessions upgraded to WebSocket.
        Upgrades => "transport_upgrades_total",
        /// Requests naming a session id that is unknown, closed or not this process's.
        UnknownSids => "unknown_session_ids_total",
        /// Authenticated Socket.IO sessions now (gauge).
        Sessions => "sessions_open",
        /// Plain HTTP requests served (health, metrics, errors).
        HttpRequests => "http_requests_total",
        /// Client events received.
        Events => "events_received_total",
        /// Tokens refused.
        AuthFailures => "auth_failures_total",
        /// Events refused by the rate limit.
        RateLimited => "events_rate_limited_total",
        /// 1:1 messages accepted.
        DirectMessages => "messages_direct_total",
        /// Room messages accepted.
        RoomMessages => "messages_room_total",
        /// Frames queued to client sockets (fan-out deliveries).
        Deliveries => "deliveries_total",
        /// Messages stored for offline users.
        OfflineQueued => "offline_queued_total",
        /// Offline messages dropped (queue bound or TTL).
        OfflineDropped => "offline_dropped_total",
        /// 1:1 messages whose delivery report timed out (status `sent`).
        ReportTimeouts => "delivery_report_timeouts_total",
        /// Messages received from other shards.
        MeshReceived => "mesh_messages_received_total",
        /// Bytes written to client sockets.
        BytesOut => "bytes_out_total",
        /// Bytes read from client sockets.
        BytesIn => "bytes_in_total",
        /// Redis commands sent by the bridge.
        RedisCommands => "redis_commands_total",
        /// Pipelined batches (one write, one read of all replies).
        RedisBatches => "redis_batches_total",
        /// Redis (re)connections established.
        RedisConnects => "redis_connects_total",
        /// The bridge is connected to Redis (gauge, 0 or 1).
        RedisUp => "redis_up",
        /// Cluster messages that could not be routed because Redis was down.
        Unroutable => "cluster_unroutable_total",
        /// Registry entries of dead nodes removed by sweeps.
        SweptSockets => "cluster_swept_sockets_total",
        /// 1:1 messages routed from the bridge's route cache (no registry lookup).
        RouteCacheHits => "cluster_route_cache_hits_total",
        /// Redis Cluster commands sent again: `MOVED` / `ASK` followed, `TRYAGAIN` retried.
        ClusterRedirects => "cluster_redirects_total",
        /// Redis Cluster sharded channels subscribed again after their slot moved.
        ClusterResubscribes => "cluster_resubscribes_total",
        /// Payloads on this node's channels that were not envelopes (dropped).
        BadEnvelopes => "cluster_bad_envelopes_total",
        /// Records handed to librdkafka.
        KafkaProduced => "kafka_produced_total",
        /// Records Kafka acknowledged.
        KafkaDelivered => "kafka_delivered_total",
        /// Records that failed (refused or not delivered).
        KafkaFailed => "kafka_failed_total",
        /// Records dropped because the buffer was full (newest first).
        KafkaDropped => "kafka_dropped_total",
        /// Records waiting in the bridge for librdkafka or their topic (gauge).
        KafkaBuffered => "kafka_buffered",
        /// `history:fetch` requests handed to the history reader.
        HistoryQueries => "history_queries_total",
        /// `history:fetch` refused because the reader's queue was full (`busy`).
        HistoryBusy => "history_busy_total",
        /// History reads that failed or timed out (`history_unavailable`, `history_timeout`).
        HistoryErrors => "history_errors_total",
        /// Sessions restored by connection state recovery.
        RecoveryRestored => "recovery_restored_total",
        /// Missed messages replayed to restored sessions.
        RecoveryReplayed => "recovery_replayed_total",
        /// Recovery claims refused: no such session (unknown pid, or expired).
        RecoveryUnknown => "recovery_refused_unknown_total",
        /// Recovery claims refused: the session belongs to another user or tenant.
        RecoveryOtherUser => "recovery_refused_other_user_total",
        /// Recovery claims refused: a log was trimmed past the client's offset.
        RecoveryTrimmed => "recovery_refused_trimmed_total",
        /// Recoverable messages ordered and logged in Redis.
        RecoveryLogged => "recovery_logged_total",
    }
}

/// The counters of one shard, on their own cache lines.
#[repr(align(128))]
pub struct ShardMetrics {
    counters: [AtomicU64; Counter::ALL.len()],
    closes: [AtomicU64; CloseReason::ALL.len()],
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            closes: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl ShardMetrics {
    /// Adds `n` to `c`. Only the owning shard calls this.
    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        let a = &self.counters[c as usize];
        a.store(a.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Adds one to `c`.
    #[inline]
    pub fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    /// Subtracts one from gauge `c`.
    #[inline]
    pub fn dec(&self, c: Counter) {
        self.add(c, u64::MAX);
    }

    /// Counts a close.
    pub fn closed(&self, r: CloseReason) {
        let a = &self.closes[r as usize];
        a.store(a.load(Relaxed) + 1, Relaxed);
    }

    /// Current value of `c`.
    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Relaxed)
    }

    /// Closes counted under `r`.
    pub fn closes(&self, r: CloseReason) -> u64 {
        self.closes[r as usize].load(Relaxed)
    }
}

/// Renders all counter blocks as Prometheus text, summed, plus per-shard open gauges for
/// the first `shard_count` blocks (the rest belong to the bridge).
pub fn render(shards: &[ShardMetrics], shard_count: usize, out: &mut String) {
    for &c in Counter::ALL {
        let total: u64 = shards.iter().map(|s| s.get(c)).sum();
        let kind = if c.as_str().ends_with("_total") { "counter" } else { "gauge" };
        let name = c.as_str();
        let _ = writeln!(out, "# HELP shardgate_{name} {}", c.help().trim());
        let _ = writeln!(out, "# TYPE shardgate_{name} {kind}\nshardgate_{name} {total}");
    }
    let _ = writeln!(out, "# HELP shardgate_connections_closed_total Connections closed, by reason.");
    let _ = writeln!(out, "# TYPE shardgate_connections_closed_total counter");
    for &r in CloseReason::ALL {
        let total: u64 = shards.iter().map(|s| s.closes(r)).sum();
        let _ = writeln!(out, "shardgate_connections_closed_total{{reason=\"{}\"}} {total}", r.as_str());
    }
    let _ = writeln!(out, "# HELP shardgate_shard_connections_open Engine.IO sessions open now, by shard.");
    let _ = writeln!(out, "# TYPE shardgate_shard_connections_open gauge");
    for (i, s) in shards.iter().take(shard_count).enumerate() {
        let _ = writeln!(out, "shardgate_shard_connections_open{{shard=\"{i}\"}} {}", s.get(Counter::Open));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_shards() {
        let shards: Vec<ShardMetrics> = (0..3).map(|_| ShardMetrics::default()).collect();
        shards[0].inc(Counter::Accepted);
        shards[2].add(Counter::Accepted, 4);
        shards[1].inc(Counter::Open);
        shards[1].inc(Counter::Open);
        shards[1].dec(Counter::Open);
        shards[2].closed(CloseReason::SlowConsumer);
        let mut s = String::new();
        render(&shards, 3, &mut s);
        assert!(s.contains("shardgate_connections_accepted_total 5\n"));
        assert!(s.contains("shardgate_connections_open 1\n"));
        assert!(s.contains("shardgate_connections_closed_total{reason=\"slow_consumer\"} 1\n"));
        assert!(s.contains("shardgate_shard_connections_open{shard=\"1\"} 1\n"));
    }
}
