//! Starting and running the shards.
//!
//! [`start`] binds one `SO_REUSEPORT` listening socket per shard on the calling thread (so
//! bind errors surface before anything runs, and port 0 resolves to one port for all),
//! then starts one pinned glommio executor per shard. Each shard runs three kinds of
//! task: the accept loop (one connection task per client), the inbox task (drains the
//! shard's mesh inbox in batches) and the tick task (timers: pings, timeouts, typing
//! expiry, delivery-report expiry, directory upkeep).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::AsyncRead;
use glommio::net::{TcpListener, UnixStream};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use tracing::{debug, info, warn};

use crate::auth::Verifier;
use crate::ids::ShardId;
use crate::local::Shard;
use crate::mesh::{Doorbell, Mesh, Owner, RING_READ};
use crate::metrics::Counter;
use crate::msg::ShardMsg;
use crate::parked::Parking;
pub use crate::shared::{MetricsBlock, Shared, StartOptions};

/// Mesh messages handled per wake-up of the inbox task: large enough to amortise the
/// wake-up, small enough that connection tasks run between batches.
const INBOX_BATCH: usize = 256;
/// Messages from the shard to itself handled per wake-up (same trade-off).
const LOCAL_BATCH: usize = 1024;
/// Pause after a failed accept (EMFILE and friends) instead of spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);
/// How long a stopping shard waits for its connections to send their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Poll period of that wait.
const SHUTDOWN_POLL: Duration = Duration::from_millis(10);
/// Period of the home-shard directory upkeep (expired offline messages, old users).
const DIRECTORY_SWEEP_MS: u64 = 10_000;
/// Connections parked or pinged in one tick that make the next tick release the memory
/// the shard's allocator holds freed (`StartOptions::release_memory`).
const RELEASE_AFTER_WAVE: usize = 256;
/// Period of a drain's batches.
const DRAIN_STEP: Duration = Duration::from_millis(100);
/// Fewest connections a shard closes per drain step.
const DRAIN_MIN_BATCH: usize = 8;
/// Backlog of each listening socket.
const LISTEN_BACKLOG: i32 = 4096;

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

    /// Begins a drain: `/readyz` answers 503 from now on, new sessions are refused with
    /// 503, and every shard closes its connections in batches spread over `drain_ms`
    /// (a WebSocket close 1001 `server_shutdown`, which clients treat as a transport
    /// close and reconnect elsewhere). Call [`ShardsHandle::shutdown`] afterwards.
    pub fn drain(&self) {
        self.shared.ready.store(false, Ordering::SeqCst);
        self.shared.draining.store(true, Ordering::SeqCst);
        for s in 0..self.shared.mesh.len() {
            self.shared.mesh.send(s, ShardMsg::Shutdown);
        }
    }

    /// Waits until no connection is open or `max` passed; true if none is left.
    pub fn wait_closed(&self, max: Duration) -> bool {
        let end = Instant::now() + max;
        while self.shared.open_connections() > 0 {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(SHUTDOWN_POLL);
        }
        true
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
    sock.listen(LISTEN_BACKLOG)?;
    Ok(sock)
}

/// Binds the listeners and starts the shards.
pub fn start(mut opts: StartOptions, verifier: Verifier) -> std::io::Result<ShardsHandle> {
    let n = opts.shards.max(1);
    // The operator endpoints' own listener, accepted by shard 0.
    let mut admin = match opts.admin_listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)?;
            opts.admin_listen = Some(l.local_addr()?);
            Some(l.into_raw_fd())
        }
        None => None,
    };
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
        let admin_fd = admin.take();
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .spawn(move || async move {
                // SAFETY: `fd` (and `admin_fd`) are listening sockets this thread now owns alone.
                let listener = unsafe { TcpListener::from_raw_fd(fd) };
                let admin = admin_fd.map(|fd| unsafe { TcpListener::from_raw_fd(fd) });
                run_shard(id, shared, listener, bell, admin).await
            })
            .map_err(|e| std::io::Error::other(format!("cannot start shard {id}: {e}")))?;
        handles.push(h);
    }
    // In cluster mode the bridge reports ready once the node is registered and
    // subscribed in Redis; alone, the node is ready as soon as its shards run.
    if shared.bridge.is_none() {
        shared.mark_ready();
    }
    Ok(ShardsHandle { shared, handles })
}

/// Accepts clients until cancelled; one connection task each.
async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let shared = &shard.shared;
    let max_open = shared.config.max_connections as u64;
    loop {
        match listener.accept().await {
            Ok(stream) => {
                shared.block(MetricsBlock::Shard(shard.id)).inc(Counter::Accepted);
                let full = shared.open_connections() >= max_open;
                glommio::spawn_local(crate::conn::serve(shard.clone(), stream, full)).detach();
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                warn!(shard = shard.id, "accept failed: {e}");
                glommio::timer::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn run_shard(
    id: ShardId,
    shared: Arc<Shared>,
    listener: TcpListener,
    bell: Doorbell,
    admin: Option<TcpListener>,
) {
    let mut shard = Shard::new(id, shared.clone());
    match Parking::start(id, shared.mesh.clone()) {
        Ok(p) => shard.parking = Some(p),
        Err(e) => warn!(shard = id, "idle WebSockets will not park: {e}"),
    }
    let shard = Rc::new(shard);
    debug_assert_eq!(bell.owner, Owner::Shard(id));
    let bell = bell.into_stream();
    let inbox = glommio::spawn_local(inbox_task(shard.clone(), bell));
    let tick = glommio::spawn_local(tick_task(shard.clone()));
    let writer = glommio::spawn_local(writer_task(shard.clone()));
    debug!(shard = id, "shard started");
    let acceptor = glommio::spawn_local(accept_loop(shard.clone(), listener));
    let operator = admin.map(|l| glommio::spawn_local(crate::operator::admin_loop(shard.clone(), l)));
    // Wait for a drain or shutdown: the inbox task wakes us on `ShardMsg::Shutdown`.
    until(&shard, || shared.closing()).await;
    if !shared.stopping.load(Ordering::SeqCst) {
        drain(&shard).await;
        until(&shard, || shared.stopping.load(Ordering::SeqCst)).await;
    }
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
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while shard.state.borrow().conns.len() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(SHUTDOWN_POLL).await;
    }
    drop(inbox);
    drop(tick);
    drop(writer);
    drop(operator);
    crate::websocket::release_parked(&shard);
    info!(shard = id, "shard stopped");
}

/// Waits until `done()`; woken by the inbox task when it sees `ShardMsg::Shutdown`.
async fn until(shard: &Shard, done: impl Fn() -> bool) {
    poll_fn(|cx| {
        if done() {
            return Poll::Ready(());
        }
        *shard.stop_waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// Closes the shard's connections in batches spread over `drain_ms`: every
/// [`DRAIN_STEP`] the next share of what was open when the drain began (at least
/// [`DRAIN_MIN_BATCH`], so a small node does not linger), each with a close 1001
/// `server_shutdown` after its queued frames. Returns once none is left or shutdown
/// began. Connections that finish their handshake meanwhile are closed by later steps.
async fn drain(shard: &Shard) {
    let shared = &shard.shared;
    let open = shard.state.borrow().conns.len();
    let steps = (shared.config.drain_ms / DRAIN_STEP.as_millis() as u64).max(1) as usize;
    let batch = open.div_ceil(steps).max(DRAIN_MIN_BATCH);
    info!(shard = shard.id, open, batch, "draining");
    while !shared.stopping.load(Ordering::SeqCst) {
        {
            let mut st = shard.state.borrow_mut();
            if st.conns.len() == 0 {
                break;
            }
            let now = shared.now();
            let next: Vec<_> = st
                .conns
                .iter_mut()
                .filter(|(_, c)| c.close.is_none())
                .map(|(id, _)| id)
                .take(batch)
                .collect();
            for id in next {
                st.close(id, crate::metrics::CloseReason::ServerShutdown, false, now);
            }
        }
        glommio::timer::sleep(DRAIN_STEP).await;
    }
    info!(shard = shard.id, "drained");
}

/// Drains the mesh inbox and the shard's local queue, in batches.
async fn inbox_task(shard: Rc<Shard>, mut bell: UnixStream) {
    let mut batch = Vec::with_capacity(INBOX_BATCH);
    let mut ring = [0u8; RING_READ];
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
        mesh.drain(shard.id, INBOX_BATCH, &mut batch);
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
            let mut budget = LOCAL_BATCH;
            while let Some(m) = st.local.pop_front() {
                st.handle(m, now);
                budget -= 1;
                if budget == 0 {
                    break;
                }
            }
        }
        // Spawned outside the state's borrow: a new task may run before this one resumes.
        let adopted = std::mem::take(&mut shard.state.borrow_mut().adopted);
        for (fd, read) in adopted {
            glommio::spawn_local(crate::conn::adopt(shard.clone(), fd, read)).detach();
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

/// Sends the frames each pass queued for WebSockets (`Conns::poll_write_dirty`): it runs
/// after the task that queued them yields, so a socket that got several frames in one
/// pass (a burst of room messages) costs one send, and no connection task is woken for
/// it. It also serves the parked WebSockets that were roused (`websocket.rs`).
async fn writer_task(shard: Rc<Shard>) {
    let mut roused = Vec::new();
    loop {
        std::future::poll_fn(|cx| {
            let mut st = shard.state.borrow_mut();
            let ready = st.conns.poll_write_dirty(shard.metrics(), cx);
            st.conns.take_roused(&mut roused);
            ready
        })
        .await;
        // Outside the state's borrow: serving a parked connection runs its events.
        crate::websocket::serve_roused(&shard, &mut roused);
    }
}

/// Periodic timers of every connection of the shard, and directory upkeep.
async fn tick_task(shard: Rc<Shard>) {
    let period = Duration::from_millis(shard.shared.config.tick_ms());
    let mut last_sweep = 0;
    let (mut parks_seen, mut release_due) = (0, false);
    loop {
        glommio::timer::sleep(period).await;
        if std::mem::take(&mut release_due) {
            release_memory(&shard);
        }
        let now = shard.shared.now();
        let mut st = shard.state.borrow_mut();
        let pinged = crate::timers::tick(&mut st, now);
        if now - last_sweep >= DIRECTORY_SWEEP_MS {
            last_sweep = now;
            st.sweep_directory(now);
        }
        drop(st);
        // A wave of parks (their tasks freed) or of pings (their queues, the pongs read
        // in place) leaves freed pages behind: give them back at the next tick, once the
        // wave is over.
        let parks = shard.metrics().get(Counter::Parks);
        if (parks - parks_seen) as usize + pinged >= RELEASE_AFTER_WAVE {
            parks_seen = parks;
            release_due = true;
        }
    }
}

/// Gives the OS the pages this shard's allocator holds freed (`release_memory`).
fn release_memory(shard: &Shard) {
    if let Some(release) = shard.shared.release_memory {
        let started = Instant::now();
        release();
        debug!(shard = shard.id, took_us = started.elapsed().as_micros() as u64, "freed memory released");
    }
}
