//! The `shardgate` binary: parses configuration, sets up logging and the file limit, and
//! starts the shards. Everything else lives in the library crates.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use shardgate_shard::auth::{mint_hs256, Claims, Verifier};
use shardgate_shard::runtime::StartOptions;
use tracing::{info, warn};

use shardgate::bridge;
use shardgate::cluster::{self, ClusterPart};
use shardgate::config::{Config, DEV_SECRET};
use shardgate::persist::PersistPart;
use shardgate_shard::mesh::{Inbox, Owner};

/// Beyond `drain_ms`, how long a drain waits for the last closes (a closing connection
/// may flush its queue for up to two seconds).
const DRAIN_GRACE: Duration = Duration::from_secs(3);

/// Thread-per-core Socket.IO v4 WebSocket edge server for real-time chat.
#[derive(Parser)]
#[command(name = "shardgate", version, about)]
struct Cli {
    /// Log lines as `text` (human-readable) or `json` (one object per line, for log
    /// shippers); the level filter is `RUST_LOG` (default `info`).
    #[arg(long, global = true, env = "SHARDGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (with no options: a development node on 127.0.0.1:3000).
    Serve(Box<ServeArgs>),
    /// Mint an HS256 token for development and tests.
    Token(TokenArgs),
    /// Check a configuration file without starting.
    CheckConfig {
        /// TOML file to check.
        file: PathBuf,
    },
    /// Run the Kafka -> MongoDB persister (a process of its own).
    Persist(PersistArgs),
}

#[derive(Args)]
struct PersistArgs {
    /// Kafka brokers `host:port[,host:port...]`.
    #[arg(long, env = "SHARDGATE_KAFKA")]
    kafka: String,
    /// `mongodb://host:port/DB` (the database is the URI's).
    #[arg(long, env = "SHARDGATE_MONGODB")]
    mongodb: String,
    /// Consumer group: persisters in one group split the partitions.
    #[arg(long, env = "SHARDGATE_PERSIST_GROUP", default_value = "shardgate-persister")]
    group: String,
    /// Most records per MongoDB batch.
    #[arg(long, default_value_t = 1000)]
    batch_records: usize,
    /// Longest a batch waits to fill, in milliseconds.
    #[arg(long, default_value_t = 200)]
    batch_ms: u64,
    /// How often new `messages.*` topics are looked for, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    topic_refresh_ms: u64,
    /// Milliseconds before a silent (crashed) persister's partitions go to the others.
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// Partitions of `presence.changes` and `events.socket` when the persister creates them.
    #[arg(long, env = "SHARDGATE_PERSIST_PARTITIONS", default_value_t = 6)]
    partitions: i32,
    /// Where `/metrics` (progress, lag) and `/healthz` are served; `off` for nowhere.
    #[arg(long, env = "SHARDGATE_PERSIST_METRICS", default_value = "127.0.0.1:9465")]
    metrics_listen: String,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "SHARDGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address of every shard.
    #[arg(long, env = "SHARDGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Number of shards (0: all cores but one).
    #[arg(long, env = "SHARDGATE_SHARDS")]
    shards: Option<usize>,
    /// HS256 secret for tokens.
    #[arg(long, env = "SHARDGATE_JWT_SECRET", conflicts_with = "jwt_public_key", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM public key (RSA: RS256, P-256: ES256) for tokens.
    #[arg(long, env = "SHARDGATE_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<PathBuf>,
    /// Engine.IO ping interval in milliseconds.
    #[arg(long, env = "SHARDGATE_PING_INTERVAL_MS")]
    ping_interval_ms: Option<u64>,
    /// Engine.IO ping timeout in milliseconds.
    #[arg(long, env = "SHARDGATE_PING_TIMEOUT_MS")]
    ping_timeout_ms: Option<u64>,
    /// Milliseconds to wait for the Socket.IO CONNECT after the upgrade.
    #[arg(long, env = "SHARDGATE_CONNECT_TIMEOUT_MS")]
    connect_timeout_ms: Option<u64>,
    /// Largest message accepted, in bytes.
    #[arg(long, env = "SHARDGATE_MAX_PAYLOAD")]
    max_payload: Option<usize>,
    /// Client events per second per connection.
    #[arg(long, env = "SHARDGATE_EVENTS_PER_SECOND")]
    events_per_second: Option<u32>,
    /// Bytes allowed in one connection's outbound queue.
    #[arg(long, env = "SHARDGATE_OUTBOUND_QUEUE_BYTES")]
    outbound_queue_bytes: Option<usize>,
    /// Do not pin shards to cores.
    #[arg(long)]
    no_pin: bool,
    /// Cluster mode: `redis://[user[:password]@]host[:port][/db]`.
    #[arg(long, env = "SHARDGATE_REDIS")]
    redis: Option<String>,
    /// Prefix of every Redis key and channel.
    #[arg(long, env = "SHARDGATE_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// This process's cluster id (default: random per process).
    #[arg(long, env = "SHARDGATE_SERVER_ID")]
    server_id: Option<String>,
    /// Lifetime of the node's liveness key in Redis, in milliseconds.
    #[arg(long, env = "SHARDGATE_LIVENESS_TTL_MS")]
    liveness_ttl_ms: Option<u64>,
    /// Connection state recovery: reconnecting clients get their rooms and missed messages
    /// back (on any node, with --redis).
    #[arg(long, env = "SHARDGATE_RECOVERY")]
    recovery: bool,
    /// How long after a disconnect a session can be recovered, in milliseconds.
    #[arg(long, env = "SHARDGATE_MAX_DISCONNECTION_MS")]
    max_disconnection_ms: Option<u64>,
    /// Milliseconds over which a draining node closes its connections.
    #[arg(long, env = "SHARDGATE_DRAIN_MS")]
    drain_ms: Option<u64>,
    /// Bearer token of `POST /admin/drain` (unset: no admin endpoints).
    #[arg(long, env = "SHARDGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Origin whose pages may use long-polling across origins (CORS); repeat it, or `*`.
    #[arg(long = "cors-origin", env = "SHARDGATE_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// Internal address of `/metrics` and `/admin/*` (off the public port when set).
    #[arg(long, env = "SHARDGATE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Persistence: Kafka brokers `host:port[,host:port...]`.
    #[arg(long, env = "SHARDGATE_KAFKA")]
    kafka: Option<String>,
    /// Message history (`history:fetch`): `mongodb://host:port/DB`, the persister's store.
    #[arg(long, env = "SHARDGATE_MONGODB")]
    mongodb: Option<String>,
}

#[derive(Args)]
struct TokenArgs {
    /// User id (`sub`).
    #[arg(long)]
    sub: String,
    /// Tenant id (`tenantId`).
    #[arg(long, default_value = "demo")]
    tenant: String,
    /// Comma-separated permissions (default: no claim, which grants all).
    #[arg(long)]
    permissions: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// HS256 secret (default: the development secret of `serve` on loopback).
    #[arg(long, env = "SHARDGATE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().with_current_span(false).init();
    } else {
        logs.init();
    }
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => {
            let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + args.ttl;
            let claims = Claims {
                sub: args.sub,
                tenant_id: args.tenant,
                permissions: args.permissions.map(|p| p.split(',').map(|s| s.trim().to_string()).collect()),
                exp,
            };
            let secret = args.jwt_secret.unwrap_or_else(|| DEV_SECRET.to_string());
            println!("{}", mint_hs256(secret.as_bytes(), &claims));
            Ok(())
        }
        Command::Persist(a) => {
            shardgate::persist::persister::run(shardgate::persist::persister::PersisterSettings {
                brokers: a.kafka,
                mongodb: a.mongodb,
                group: a.group,
                batch_records: a.batch_records.max(1),
                batch_ms: a.batch_ms.max(1),
                topic_refresh_ms: a.topic_refresh_ms.max(100),
                session_timeout_ms: a.session_timeout_ms,
                partitions: a.partitions.max(1),
                metrics_listen: match a.metrics_listen.as_str() {
                    "off" => None,
                    addr => Some(addr.parse().with_context(|| format!("--metrics-listen {addr}"))?),
                },
            })
        }
        Command::CheckConfig { file } => {
            let cfg = Config::from_file(&file)?;
            cfg.validate()?;
            build_verifier(&cfg)?;
            println!(
                "{}: OK (listen {}, {} shards, ping {}ms/{}ms, max payload {} bytes)",
                file.display(),
                cfg.listen,
                cfg.shard_count(),
                cfg.runtime.ping_interval_ms,
                cfg.runtime.ping_timeout_ms,
                cfg.runtime.max_payload
            );
            Ok(())
        }
    }
}

fn load(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    macro_rules! set {
        ($field:expr, $arg:expr) => {
            if let Some(v) = $arg.clone() {
                $field = v;
            }
        };
    }
    set!(cfg.listen, args.listen);
    set!(cfg.shards, args.shards);
    set!(cfg.runtime.ping_interval_ms, args.ping_interval_ms);
    set!(cfg.runtime.ping_timeout_ms, args.ping_timeout_ms);
    set!(cfg.runtime.connect_timeout_ms, args.connect_timeout_ms);
    set!(cfg.runtime.max_payload, args.max_payload);
    set!(cfg.runtime.events_per_second, args.events_per_second);
    set!(cfg.runtime.outbound_queue_bytes, args.outbound_queue_bytes);
    set!(cfg.runtime.drain_ms, args.drain_ms);
    set!(cfg.runtime.max_disconnection_ms, args.max_disconnection_ms);
    if args.recovery {
        cfg.runtime.recovery = true;
    }
    if args.admin_token.is_some() {
        cfg.admin.token = args.admin_token.clone();
    }
    if !args.cors_origins.is_empty() {
        cfg.runtime.cors_origins = args.cors_origins.clone();
    }
    if args.admin_listen.is_some() {
        cfg.admin.listen = args.admin_listen;
    }
    if args.jwt_secret.is_some() {
        cfg.auth.jwt_secret = args.jwt_secret.clone();
        cfg.auth.jwt_public_key = None;
    }
    if args.jwt_public_key.is_some() {
        cfg.auth.jwt_public_key = args.jwt_public_key.clone();
        cfg.auth.jwt_secret = None;
    }
    if args.no_pin {
        cfg.pin = false;
    }
    if args.redis.is_some() {
        cfg.cluster.redis = args.redis.clone();
    }
    set!(cfg.cluster.prefix, args.redis_prefix);
    if args.server_id.is_some() {
        cfg.cluster.server_id = args.server_id.clone();
    }
    set!(cfg.cluster.liveness_ttl_ms, args.liveness_ttl_ms);
    if args.kafka.is_some() {
        cfg.kafka.brokers = args.kafka.clone();
    }
    if args.mongodb.is_some() {
        cfg.mongodb.uri = args.mongodb.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

fn build_verifier(cfg: &Config) -> anyhow::Result<Verifier> {
    let leeway = cfg.auth.leeway_secs;
    let max_id = cfg.runtime.max_id_len;
    if let Some(path) = &cfg.auth.jwt_public_key {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        return Ok(Verifier::public_key_pem(&pem, leeway, max_id)?);
    }
    let secret = cfg.auth.jwt_secret.as_deref().unwrap_or(DEV_SECRET);
    Ok(Verifier::hs256(secret.as_bytes(), leeway, max_id))
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts later), so that
/// the main thread alone receives them through `sigwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: initialising and installing a signal mask for the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Returns the pages this thread's mimalloc heap holds freed to the OS now, instead of
/// when the allocator next runs on it (an idle shard may not for hours).
fn release_memory() {
    // SAFETY: a plain call into the allocator, on the calling thread's own heap.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// No transparent huge pages for this process: mimalloc asks for them on its arenas, and
/// khugepaged then makes every touched 2 MiB region resident in full, which cost an idle
/// node about 400 bytes per connection (`docs/performance.md`).
fn no_huge_pages() {
    // SAFETY: prctl(2) with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        warn!("cannot disable transparent huge pages: {}", std::io::Error::last_os_error());
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    no_huge_pages();
    let cfg = load(&args)?;
    let verifier = build_verifier(&cfg)?;
    let dev_secret = cfg.auth.jwt_secret.is_none() && cfg.auth.jwt_public_key.is_none();
    let fds = shardgate_shard::runtime::raise_fd_limit();
    // Listeners, doorbells, the bridge and the process itself need a few descriptors.
    let capacity = fds.saturating_sub(64);
    if (capacity as usize) < cfg.runtime.max_connections {
        warn!(
            "open-file limit {fds} caps this process at about {capacity} connections (max_connections = {}); \
             raise the hard limit (LimitNOFILE=, ulimit -Hn) or run several processes on the same port",
            cfg.runtime.max_connections
        );
    }
    let static_metrics = format!(
        "# HELP shardgate_fd_limit The process's open-file limit.\n# TYPE shardgate_fd_limit gauge\nshardgate_fd_limit {fds}\n\
         # HELP shardgate_connection_capacity Connections this process can hold (open-file limit and max_connections).\n\
         # TYPE shardgate_connection_capacity gauge\nshardgate_connection_capacity {}\n",
        capacity.min(cfg.runtime.max_connections as u64)
    );
    let sigs = block_signals();
    let server_id: Arc<str> = cfg
        .cluster
        .server_id
        .clone()
        .unwrap_or_else(|| format!("{:016x}", ulid::Ulid::new().random() as u64))
        .into();
    // The bridge's two inboxes, created before the shards so that every shard gets their
    // send ends; the doorbells go to the bridge thread.
    let cluster_settings = cluster::Settings::from_config(&cfg, server_id.clone())?;
    let cluster_inbox = match cluster_settings {
        Some(settings) => {
            let (inbox, bell) = Inbox::new(Owner::Bridge)?;
            Some(ClusterPart { settings, inbox: Arc::new(inbox), bell })
        }
        None => None,
    };
    let persist_inbox = match &cfg.kafka.brokers {
        Some(_) => {
            let (inbox, bell) = Inbox::new(Owner::Records)?;
            Some(PersistPart { settings: cfg.kafka.clone(), inbox: Arc::new(inbox), bell })
        }
        None => None,
    };
    let history = cfg.mongodb.uri.as_ref().map(|_| shardgate::history::channel());
    let opts = StartOptions {
        listen: cfg.listen,
        shards: cfg.shard_count(),
        cpus: cfg.placement(),
        config: cfg.runtime.clone(),
        static_metrics,
        bridge: cluster_inbox.as_ref().map(|p| p.inbox.clone()),
        server_id: server_id.clone(),
        persist: persist_inbox.as_ref().map(|p| p.inbox.clone()),
        history: history.as_ref().map(|(q, _)| q.clone() as Arc<dyn shardgate_shard::history::HistorySink>),
        admin_token: cfg.admin.token.clone(),
        dev_secret: dev_secret.then(|| DEV_SECRET.to_string()),
        admin_listen: cfg.admin.listen,
        release_memory: Some(release_memory),
    };
    let shards = opts.shards;
    let handle =
        shardgate_shard::start(opts, verifier).with_context(|| format!("starting on {}", cfg.listen))?;
    let addr = handle.local_addr();
    let (cluster_part, persist_part) = (cluster_inbox, persist_inbox);
    let mut bridge_thread = None;
    if cluster_part.is_some() || persist_part.is_some() {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let cpu = cfg.pin.then_some(cores - 1);
        bridge_thread = Some(bridge::start(handle.shared.clone(), cluster_part, persist_part, cpu)?);
    }
    // The history reader lives as long as the process (it holds no state to flush).
    if let (Some((_, reader)), Some(uri)) = (history, &cfg.mongodb.uri) {
        let timeout = Duration::from_millis(cfg.mongodb.history_timeout_ms);
        shardgate::history::start(uri, reader, handle.shared.clone(), timeout)?;
    }
    let persistence = match &cfg.kafka.brokers {
        Some(b) => format!("persistence on: kafka {b}"),
        None => "persistence off: no --kafka".to_string(),
    };
    let cluster = match &cfg.cluster.redis {
        Some(url) => {
            format!("cluster on: server id {server_id}, redis {}", url.split('@').next_back().unwrap_or(url))
        }
        None => "cluster off: no --redis".to_string(),
    };
    info!(
        "shardgate listening on http://{addr} ({shards} shards, capacity {} connections, {persistence}, {cluster})",
        capacity.min(cfg.runtime.max_connections as u64)
    );
    // The actual address on stdout, for scripts and tests that pass port 0.
    println!("listening on {addr}");
    if let Some(admin) = handle.shared.admin_listen {
        info!(
            "operator endpoints (/metrics, /admin/drain, health) on http://{admin}; not on the public port"
        );
        println!("admin on {admin}");
    }
    if dev_secret {
        warn!("no --jwt-secret or --jwt-public-key: using the built-in development secret (loopback only)");
        println!("get a development token: shardgate token --sub alice --tenant demo");
        println!("demo chat in a browser: http://{addr}/demo");
    }
    let mut sig: libc::c_int = 0;
    // SAFETY: waits on the signal set blocked above.
    if unsafe { libc::sigwait(&sigs, &mut sig) } != 0 {
        bail!("sigwait failed");
    }
    // Drain: not ready at once, no new sessions, connections closed in batches over
    // drain_ms; then shut down (the bridge removes what is left of this node in Redis).
    let open = handle.shared.open_connections();
    let drain_ms = cfg.runtime.drain_ms;
    info!("signal {sig}: draining {open} connections over {drain_ms} ms");
    handle.drain();
    if !handle.wait_closed(Duration::from_millis(drain_ms) + DRAIN_GRACE) {
        warn!("{} connections still open after the drain; closing them", handle.shared.open_connections());
    }
    info!("shutting down");
    handle.shutdown();
    handle.join();
    if let Some(b) = bridge_thread {
        let _ = b.join();
    }
    info!("stopped");
    Ok(())
}
