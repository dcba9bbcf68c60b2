//! Starting and running the shards.
//!
//! [`start`] binds one `SO_REUSEPORT` listening socket per shard on the calling thread (so
//! bind errors surface before anything runs, and port 0 resolves to one port for all),
//! then starts one pinned glommio executor per shard. Each shard runs three kinds of
//! task: the accept loop (one connection task per client), the inbox task (drains the
//! shard's mesh inbox in batches) and the tick task (timers: pings, timeouts, typing
//! expiry, delivery-report expiry, directory upkeep).

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::AsyncRead;
use glommio::net::{TcpListener, UnixStream};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use tracing::{debug, info, warn};

use crate::auth::Verifier;
use crate::config::RuntimeConfig;
use crate::mesh::{Doorbell, Inbox, Mesh, Owner, ShardId};
use crate::metrics::{Counter, ShardMetrics};
use crate::msg::{BridgeMsg, ShardMsg};
use crate::record::Record;
use crate::state::State;

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
    /// `/readyz` answers 200 while set.
    pub ready: AtomicBool,
    /// Set once shutdown began: accept loops stop, connections close.
    pub stopping: AtomicBool,
    /// Start of shard time.
    pub epoch: Instant,
    /// Address every shard listens on.
    pub listen: SocketAddr,
    /// Extra Prometheus text appended to `/metrics` (process-level facts).
    pub static_metrics: String,
    /// The bridge's inbox in cluster mode; `None` runs the embedded bus.
    pub bridge: Option<Arc<Inbox<BridgeMsg>>>,
    /// This process's cluster-unique server id.
    pub server_id: Arc<str>,
    /// The record inbox when persistence (Kafka) is on.
    pub persist: Option<Arc<Inbox<Record>>>,
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
            stopping: AtomicBool::new(false),
            epoch: Instant::now(),
            listen,
            static_metrics: opts.static_metrics,
            bridge: opts.bridge,
            server_id: opts.server_id,
            persist: opts.persist,
        }
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
            MetricsBlock::Shard(id) => id.min(shards),
            MetricsBlock::Bridge => shards,
            MetricsBlock::KafkaReports => shards + 1,
        };
        &self.metrics[i]
    }
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
}

/// Counter blocks beyond the shards' ([`MetricsBlock::Bridge`],
/// [`MetricsBlock::KafkaReports`]).
const EXTRA_METRIC_BLOCKS: usize = 2;

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
        }
    }
}

/// Running shards.
pub struct ShardsHandle {
    /// Process-wide shared state.
    pub shared: Arc<Shared>,
    handles: Vec<ExecutorJoinHandle<()>>,
}

impl ShardsHandle {
    /// The bound address (with the port resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// Stops accepting and closes every connection with reason `server_shutdown`.
    pub fn shutdown(&self) {
        self.shared.ready.store(false, Ordering::SeqCst);
        self.shared.stopping.store(true, Ordering::SeqCst);
        for s in 0..self.shared.mesh.len() {
            self.shared.mesh.send(s, ShardMsg::Shutdown);
        }
    }

    /// Waits for every shard to exit.
    pub fn join(self) {
        for h in self.handles {
            if let Err(e) = h.join() {
                warn!("shard exited with error: {e}");
            }
        }
    }
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the new limit (what
/// bounds the sockets one process can hold).
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

fn bind(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock)
}

/// Binds the listeners and starts the shards.
pub fn start(opts: StartOptions, verifier: Verifier) -> std::io::Result<ShardsHandle> {
    let n = opts.shards.max(1);
    let first = bind(opts.listen)?;
    let listen = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("listener has no inet address"))?;
    let mut sockets = vec![first];
    for _ in 1..n {
        sockets.push(bind(listen)?);
    }
    let (mesh, bells) = Mesh::new(n)?;
    let cpus = opts.cpus.clone();
    let shared = Arc::new(Shared::new(opts, verifier, mesh, listen));
    let mut handles = Vec::with_capacity(n);
    for ((id, sock), bell) in sockets.into_iter().enumerate().zip(bells) {
        let placement = match cpus.get(id).copied().flatten() {
            Some(cpu) => Placement::Fixed(cpu),
            None => Placement::Unbound,
        };
        let shared = shared.clone();
        let fd = sock.into_raw_fd();
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .spawn(move || async move {
                // SAFETY: `fd` is a listening socket this thread now owns alone.
                let listener = unsafe { TcpListener::from_raw_fd(fd) };
                run_shard(id, shared, listener, bell).await
            })
            .map_err(|e| std::io::Error::other(format!("cannot start shard {id}: {e}")))?;
        handles.push(h);
    }
    shared.ready.store(true, Ordering::SeqCst);
    Ok(ShardsHandle { shared, handles })
}

/// What a shard's tasks share: its state and scratch buffers. Lives on one thread.
pub(crate) struct Shard {
    pub id: ShardId,
    pub shared: Arc<Shared>,
    pub state: RefCell<State>,
    /// Read buffer used by every connection of this shard in turn.
    pub scratch: RefCell<Box<[u8]>>,
    /// Write-coalescing buffer used by every connection in turn.
    pub wbuf: RefCell<Vec<u8>>,
    /// Wakes the shard's main task at shutdown.
    pub stop_waker: RefCell<Option<std::task::Waker>>,
}

/// Accepts clients until cancelled; one connection task each.
async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let shared = &shard.shared;
    let max_open = shared.config.max_connections as u64;
    loop {
        match listener.accept().await {
            Ok(stream) => {
                shared.metrics[shard.id].inc(Counter::Accepted);
                let full = shared.open_connections() >= max_open;
                glommio::spawn_local(crate::conn::serve(shard.clone(), stream, full)).detach();
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                warn!(shard = shard.id, "accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Bytes read from a socket per call; one buffer per shard, not per connection.
pub(crate) const SCRATCH: usize = 64 * 1024;

async fn run_shard(id: ShardId, shared: Arc<Shared>, listener: TcpListener, bell: Doorbell) {
    let shard = Rc::new(Shard {
        id,
        state: RefCell::new(State::new(id, shared.clone())),
        shared: shared.clone(),
        scratch: RefCell::new(vec![0u8; SCRATCH].into_boxed_slice()),
        wbuf: RefCell::new(Vec::with_capacity(SCRATCH)),
        stop_waker: RefCell::new(None),
    });
    debug_assert_eq!(bell.owner, Owner::Shard(id));
    let bell = bell.into_stream();
    let inbox = glommio::spawn_local(inbox_task(shard.clone(), bell));
    let tick = glommio::spawn_local(tick_task(shard.clone()));
    debug!(shard = id, "shard started");
    let acceptor = glommio::spawn_local(accept_loop(shard.clone(), listener));
    // Wait for shutdown: the inbox task wakes us when it sees `ShardMsg::Shutdown`.
    poll_fn(|cx| {
        if shared.stopping.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        *shard.stop_waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    })
    .await;
    // Cancelling the accept task may drop a connection the kernel accepted that very
    // moment; the node is going away, and that client reconnects elsewhere.
    drop(acceptor);
    // Close every connection, then give them a moment to send their close frames.
    {
        let mut st = shard.state.borrow_mut();
        let now = shared.now();
        let ids: Vec<_> = st.conns.iter_mut().map(|(cid, _)| cid).collect();
        for cid in ids {
            st.close(cid, crate::metrics::CloseReason::ServerShutdown, true, now);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while shard.state.borrow().conns.len() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    drop(inbox);
    drop(tick);
    info!(shard = id, "shard stopped");
}

/// Drains the mesh inbox and the shard's local queue, in batches.
async fn inbox_task(shard: Rc<Shard>, mut bell: UnixStream) {
    let mut batch = Vec::with_capacity(256);
    let mut ring = [0u8; 64];
    let mesh = shard.shared.mesh.clone();
    loop {
        poll_fn(|cx| {
            if !shard.state.borrow().local.is_empty() || mesh.backlog(shard.id) > 0 {
                return Poll::Ready(());
            }
            shard.state.borrow_mut().inbox_waker = Some(cx.waker().clone());
            match Pin::new(&mut bell).poll_read(cx, &mut ring) {
                Poll::Ready(_) => Poll::Ready(()),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        mesh.drain(shard.id, 256, &mut batch);
        let now = shard.shared.now();
        let mut stop = false;
        {
            let mut st = shard.state.borrow_mut();
            st.metrics().add(Counter::MeshReceived, batch.len() as u64);
            for m in batch.drain(..) {
                if matches!(m, ShardMsg::Shutdown) {
                    stop = true;
                }
                st.handle(m, now);
            }
            let mut budget = 1024;
            while let Some(m) = st.local.pop_front() {
                st.handle(m, now);
                budget -= 1;
                if budget == 0 {
                    break;
                }
            }
        }
        if stop {
            debug!(shard = shard.id, "inbox saw shutdown");
            if let Some(w) = shard.stop_waker.borrow_mut().take() {
                w.wake();
            }
        }
        glommio::yield_if_needed().await;
    }
}

/// Periodic timers of every connection of the shard, and directory upkeep.
async fn tick_task(shard: Rc<Shard>) {
    let period = Duration::from_millis(shard.shared.config.tick_ms());
    let mut last_sweep = 0;
    loop {
        glommio::timer::sleep(period).await;
        let now = shard.shared.now();
        let mut st = shard.state.borrow_mut();
        crate::session::tick(&mut st, now);
        if now - last_sweep >= 10_000 {
            last_sweep = now;
            st.sweep_directory(now);
        }
    }
}
