//! What every shard of a process shares, read-only: configuration, token verification,
//! the mesh, the counter blocks, readiness and shutdown flags, and the send ends of the
//! bridge's inboxes. Built once by [`crate::runtime::start`] (or by a test or benchmark)
//! through [`Shared::new`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::auth::Verifier;
use crate::config::RuntimeConfig;
use crate::ids::{ShardId, SidKey};
use crate::mesh::{Inbox, Mesh};
use crate::metrics::{Counter, ShardMetrics};
use crate::msg::BridgeMsg;
use crate::record::Record;

/// Read-only state of the whole process, shared by every shard.
pub struct Shared {
    /// Protocol timers and limits.
    pub config: RuntimeConfig,
    /// Token verification.
    pub verifier: Verifier,
    /// Cross-core queues.
    pub mesh: Arc<Mesh>,
    /// One counter block per shard.
    pub metrics: Box<[ShardMetrics]>,
    /// `/readyz` answers 200 while set: the shards run and, in cluster mode, the node is
    /// registered and subscribed in Redis; cleared for good when a drain begins.
    pub ready: AtomicBool,
    /// Set once a drain began: no new sessions, connections closed in batches.
    pub draining: AtomicBool,
    /// Set once shutdown began: accept loops stop, connections close.
    pub stopping: AtomicBool,
    /// Bearer token of the admin endpoints; `None` disables them.
    pub admin_token: Option<String>,
    /// Start of shard time.
    pub epoch: Instant,
    /// Address every shard listens on.
    pub listen: SocketAddr,
    /// The internal address of the operator endpoints, if they are kept off the public
    /// port (resolved: port 0 picks a free one).
    pub admin_listen: Option<SocketAddr>,
    /// Returns to the OS what the calling thread's allocator holds freed
    /// ([`StartOptions::release_memory`]).
    pub release_memory: Option<fn()>,
    /// Extra Prometheus text appended to `/metrics` (process-level facts).
    pub static_metrics: String,
    /// The bridge's inbox in cluster mode; `None` runs the embedded bus.
    pub bridge: Option<Arc<Inbox<BridgeMsg>>>,
    /// This process's cluster-unique server id.
    pub server_id: Arc<str>,
    /// The record inbox when persistence (Kafka) is on.
    pub persist: Option<Arc<Inbox<Record>>>,
    /// The history reader when the node has `--mongodb` (`history:fetch`).
    pub history: Option<Arc<dyn crate::history::HistorySink>>,
    /// Signs and checks Engine.IO session ids (`ids::SidKey`).
    pub sid_key: SidKey,
    /// The built-in development secret, when the node runs on it (loopback only): the
    /// demo page gets tokens minted with it.
    pub dev_secret: Option<String>,
}

impl Shared {
    /// Process-wide state for the shards of `mesh`, configured by `opts`, listening on
    /// `listen` (the resolved address); not ready until the shards run.
    pub fn new(opts: StartOptions, verifier: Verifier, mesh: Arc<Mesh>, listen: SocketAddr) -> Shared {
        let blocks = mesh.len() + EXTRA_METRIC_BLOCKS;
        Shared {
            config: opts.config,
            verifier,
            mesh,
            metrics: (0..blocks).map(|_| ShardMetrics::default()).collect(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            admin_token: opts.admin_token,
            epoch: Instant::now(),
            listen,
            admin_listen: opts.admin_listen,
            release_memory: opts.release_memory,
            static_metrics: opts.static_metrics,
            bridge: opts.bridge,
            server_id: opts.server_id,
            persist: opts.persist,
            history: opts.history,
            sid_key: SidKey::random(),
            dev_secret: opts.dev_secret,
        }
    }

    /// Reports ready, unless a drain or shutdown already began (which never ends).
    pub fn mark_ready(&self) {
        if !self.draining.load(Ordering::SeqCst) && !self.stopping.load(Ordering::SeqCst) {
            self.ready.store(true, Ordering::SeqCst);
        }
    }

    /// No new session is accepted: draining or stopping.
    pub fn closing(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.stopping.load(Ordering::Relaxed)
    }

    /// Milliseconds since the process started (shard time).
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// WebSocket connections open in the whole process.
    pub fn open_connections(&self) -> u64 {
        self.metrics.iter().map(|m| m.get(Counter::Open)).sum()
    }

    /// The counter block `block` (each has exactly one writing thread).
    pub fn block(&self, block: MetricsBlock) -> &ShardMetrics {
        let shards = self.mesh.len();
        let i = match block {
            MetricsBlock::Shard(id) => id,
            MetricsBlock::Bridge => shards,
            MetricsBlock::KafkaReports => shards + 1,
            MetricsBlock::History => shards + 2,
        };
        &self.metrics[i]
    }
}

/// Milliseconds since the Unix epoch (wall-clock time, as records and presence carry it).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Which counter block a thread writes: one per shard, one for the bridge thread and
/// one for librdkafka's delivery-report thread. Summed at scrape time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsBlock {
    /// Shard `i`.
    Shard(ShardId),
    /// The bridge thread (Redis and the Kafka producer task).
    Bridge,
    /// librdkafka's delivery-report thread.
    KafkaReports,
    /// The history reader thread (`history:fetch`).
    History,
}

/// Counter blocks beyond the shards' ([`MetricsBlock::Bridge`],
/// [`MetricsBlock::KafkaReports`], [`MetricsBlock::History`]).
const EXTRA_METRIC_BLOCKS: usize = 3;

/// How to start the shards.
pub struct StartOptions {
    /// Listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Number of shards.
    pub shards: usize,
    /// CPU of each shard; `None` leaves a shard unpinned.
    pub cpus: Vec<Option<usize>>,
    /// Protocol timers and limits.
    pub config: RuntimeConfig,
    /// Extra process-level Prometheus text.
    pub static_metrics: String,
    /// The bridge's inbox (cluster mode).
    pub bridge: Option<Arc<Inbox<BridgeMsg>>>,
    /// This process's server id.
    pub server_id: Arc<str>,
    /// The record inbox (persistence on).
    pub persist: Option<Arc<Inbox<Record>>>,
    /// The history reader (`--mongodb`).
    pub history: Option<Arc<dyn crate::history::HistorySink>>,
    /// Bearer token of the admin endpoints (`None`: disabled).
    pub admin_token: Option<String>,
    /// The built-in development secret, if the node runs on it (`Shared::dev_secret`).
    pub dev_secret: Option<String>,
    /// Serve `/metrics` and `/admin/*` on this internal address only (`--admin-listen`).
    pub admin_listen: Option<SocketAddr>,
    /// Returns to the OS the pages the calling thread's allocator holds freed (the binary
    /// knows its allocator): a shard calls it after a wave of connections parked
    /// (`websocket.rs`), whose tasks' memory would otherwise stay resident.
    pub release_memory: Option<fn()>,
}

impl Default for StartOptions {
    /// One unpinned shard on a free loopback port, default limits, the embedded bus, no
    /// persistence.
    fn default() -> StartOptions {
        StartOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            shards: 1,
            cpus: Vec::new(),
            config: RuntimeConfig::default(),
            static_metrics: String::new(),
            bridge: None,
            server_id: "local".into(),
            persist: None,
            history: None,
            admin_token: None,
            dev_secret: None,
            admin_listen: None,
            release_memory: None,
        }
    }
}
