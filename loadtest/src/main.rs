//! `shardgate-loadtest`: a thread-per-core Socket.IO v4 load generator.
//!
//! One glommio executor per core it is given; each opens its share of the connections at
//! a controlled rate and runs the scenario on them. It speaks to any Socket.IO v4 server
//! over WebSocket (namespace, auth field and tokens configurable), mints HS256 tokens
//! from a shared secret or reads them from a file, counts every error by kind, and
//! prints a final table or `--json`.
//!
//! Scenarios so far: `idle` (hold N authenticated connections, each in a room, and
//! report the server's resident memory per connection) and `ack-rtt` (open-loop constant
//! rate of acked messages; latency from each send's scheduled time, which corrects for
//! coordinated omission), `fanout` (rooms with publishers; deliveries/s and
//! send-to-receive latency), `connect-storm` (connects/s, then a mass reconnect) and
//! `direct` (1:1 between users on different servers).

mod client;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use client::{Client, ErrorKind};
use glommio::{LocalExecutorBuilder, Placement};
use serde_json::json;
use shardgate_shard::auth::{mint_hs256, Claims};

/// Thread-per-core Socket.IO v4 load generator.
#[derive(Parser)]
#[command(name = "shardgate-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N authenticated connections, each in a room; report server memory per connection.
    Idle(Common),
    /// Open-loop constant rate of `message:send` with acks; ack latency percentiles,
    /// corrected for coordinated omission (measured from each send's scheduled time).
    AckRtt(AckRtt),
    /// Rooms of `--room-size` members, publishers sending at a total `--msg-rate`;
    /// deliveries/s and send-to-receive latency (send time carried in the payload).
    Fanout(Fanout),
    /// Connects/s including upgrade, Engine.IO handshake, auth and a room join; then every
    /// connection drops at once and reconnects (a mass reconnect), measured the same way.
    ConnectStorm(Common),
    /// 1:1 messages between users on different target nodes (`--url A,B`): user i sends
    /// to user i+1 at a total `--msg-rate`; ack latency and send-to-delivery latency.
    Direct(AckRtt),
}

#[derive(Args, Clone, Debug)]
struct Fanout {
    #[command(flatten)]
    common: Common,
    /// Members per room (connections / room-size rooms).
    #[arg(long, default_value_t = 100)]
    room_size: usize,
    /// Publishers per room.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Messages per second, all publishers together.
    #[arg(long, default_value_t = 100.0)]
    msg_rate: f64,
    /// Bytes of padding per message.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
}

#[derive(Args, Clone, Debug)]
struct AckRtt {
    #[command(flatten)]
    common: Common,
    /// Messages per second, all connections together.
    #[arg(long, default_value_t = 1000.0)]
    msg_rate: f64,
    /// Bytes of content per message.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Event to send (`message:send` for shardgate); its ack ends the measurement.
    #[arg(long, default_value = "message:send")]
    send_event: String,
}

/// Flags every scenario shares.
#[derive(Args, Clone, Debug)]
struct Common {
    /// Server URL (`http://host:port`); several, comma-separated, spread connection i
    /// over them round-robin (the `direct` scenario pairs users on different servers).
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// HS256 secret to mint one token per connection (`sub` = user{i}).
    #[arg(long, env = "SHARDGATE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// File with one token per line, used in turn instead of minting.
    #[arg(long)]
    tokens: Option<std::path::PathBuf>,
    /// `tenantId` claim of minted tokens.
    #[arg(long, default_value = "bench")]
    tenant: String,
    /// Socket.IO namespace.
    #[arg(long, default_value = "/")]
    namespace: String,
    /// Field of the CONNECT auth payload that carries the token.
    #[arg(long, default_value = "token")]
    auth_field: String,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// New connections per second (all cores together).
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// How long the run lasts (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Executors (one per core); default: every core.
    #[arg(long)]
    cores: Option<usize>,
    /// Source addresses to spread connections over (`127.0.0.1,127.0.0.2` or
    /// `127.0.0.1-127.0.0.9`), past the ephemeral-port limit of one address.
    #[arg(long)]
    source_ips: Option<String>,
    /// Event joining a room (`join_room` for shardgate).
    #[arg(long, default_value = "join_room")]
    join_event: String,
    /// Rooms the connections are spread over.
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Server process id, to report its resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) =
        s.find(|c: char| !c.is_ascii_digit() && c != '.').map(|i| s.split_at(i)).unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_ips(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (a.parse()?, b.parse()?);
                for v in u32::from(a)..=u32::from(b) {
                    out.push(IpAddr::V4(v.into()));
                }
            }
            None => out.push(part.parse()?),
        }
    }
    Ok(out)
}

/// Records the send-to-receive time of a `message:new` whose content carries `t` (µs
/// since the run started; sender and receiver share this process's clock).
fn record_transit(
    run: &Run,
    args: &[serde_json::Value],
    hist: &std::cell::RefCell<hdrhistogram::Histogram<u64>>,
) {
    if let Some(t) = args.first().and_then(|m| m["content"]["t"].as_u64()) {
        let now = run.start.elapsed().as_micros() as u64;
        let _ = hist.borrow_mut().record(now.saturating_sub(t).max(1));
    }
}

/// An empty latency histogram (1 µs .. 1 h, 3 significant digits).
fn new_hist() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds")
}

/// Latencies (ack or receive), messages sent, delivery latencies (`direct`).
type Timed = (hdrhistogram::Histogram<u64>, u64, hdrhistogram::Histogram<u64>);

/// What a worker hands back to the main thread.
enum Outcome {
    /// Nothing beyond the shared counters (idle).
    Nothing,
    /// Latency histograms and a count of messages sent.
    Timed(Timed),
    /// Connect waves: latency histogram, seconds, connections.
    Waves(Vec<(hdrhistogram::Histogram<u64>, f64, u64)>),
}

/// Shared, lock-free counters of a run.
#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    peak: AtomicU64,
    errors: [AtomicU64; 5],
}

impl Stats {
    fn error(&self, k: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|x| *x == k).unwrap_or(0);
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }

    fn errors_json(&self) -> serde_json::Value {
        let m: serde_json::Map<String, serde_json::Value> = ErrorKind::ALL
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str().to_string(), json!(self.errors[i].load(Ordering::Relaxed))))
            .collect();
        serde_json::Value::Object(m)
    }
}

/// What every worker needs to know.
struct Run {
    common: Common,
    /// Servers, connection i going to `targets[i % len]`.
    targets: Vec<(SocketAddr, String)>,
    sources: Vec<IpAddr>,
    tokens: Vec<String>,
    start: Instant,
    deadline: Instant,
    workers: usize,
}

impl Run {
    fn token(&self, i: usize) -> String {
        if !self.tokens.is_empty() {
            return self.tokens[i % self.tokens.len()].clone();
        }
        let exp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 3600;
        let claims =
            Claims { sub: format!("user{i}"), tenant_id: self.common.tenant.clone(), permissions: None, exp };
        mint_hs256(self.common.jwt_secret.as_deref().unwrap_or_default().as_bytes(), &claims)
    }
}

/// Connects connection `i` and joins its room; counts failures.
async fn open(run: &Run, i: usize, stats: &Stats) -> Option<Client> {
    let source = (!run.sources.is_empty()).then(|| run.sources[i % run.sources.len()]);
    let auth = json!({ run.common.auth_field.clone(): run.token(i) });
    let timeout = Duration::from_secs(10);
    let (target, host) = &run.targets[i % run.targets.len()];
    let connecting = Client::connect(*target, source, host, &run.common.namespace, &auth, timeout);
    let mut c = match connecting.await {
        Ok(c) => c,
        Err(k) => {
            stats.error(k);
            return None;
        }
    };
    let room = format!("room-{}", i % run.common.rooms.max(1));
    let joined = match c.emit(&run.common.join_event, &json!(room), true).await {
        Ok(Some(id)) => glommio::timer::timeout(timeout, async { Ok(c.wait_ack(id).await) }).await,
        Ok(None) => Ok(Ok(vec![])),
        Err(k) => Ok(Err(k)),
    };
    match joined {
        Ok(Ok(_)) => {
            let now = stats.connected.fetch_add(1, Ordering::Relaxed) + 1;
            stats.peak.fetch_max(now, Ordering::Relaxed);
            Some(c)
        }
        Ok(Err(k)) => {
            stats.error(k);
            None
        }
        Err(_) => {
            stats.error(ErrorKind::Timeout);
            None
        }
    }
}

/// What the ack-rtt scenario's connections on one worker share.
struct Sends {
    per_conn_interval: Duration,
    send_event: String,
    content: String,
    /// Ack latencies in microseconds, from each send's scheduled time.
    hist: std::cell::RefCell<hdrhistogram::Histogram<u64>>,
    sent: std::cell::Cell<u64>,
    /// `direct`: send to the next user, carry the send time, time deliveries here.
    direct: bool,
    delivered: std::cell::RefCell<hdrhistogram::Histogram<u64>>,
}

/// One connection sending at its fixed schedule and timing every ack.
async fn ack_rtt_one(
    run: Arc<Run>,
    sends: std::rc::Rc<Sends>,
    i: usize,
    stats: Arc<Stats>,
    offset: Duration,
) {
    let Some(mut c) = open(&run, i, &stats).await else { return };
    let mut scheduled: std::collections::HashMap<u64, Instant> = std::collections::HashMap::new();
    let mut next = Instant::now() + offset;
    let me = format!("user{i}");
    while Instant::now() < run.deadline {
        match c.next_event_until(next.min(run.deadline)).await {
            Ok(None) => {
                if Instant::now() >= run.deadline {
                    break;
                }
                let arg = if sends.direct {
                    let to = format!("user{}", (i + 1) % run.common.connections.max(1));
                    json!({ "to": to, "content": { "t": run.start.elapsed().as_micros() as u64, "pad": sends.content } })
                } else {
                    json!({ "to": me, "content": sends.content })
                };
                match c.emit(&sends.send_event, &arg, true).await {
                    Ok(Some(id)) => {
                        scheduled.insert(id, next);
                        sends.sent.set(sends.sent.get() + 1);
                    }
                    Ok(None) => {}
                    Err(k) => {
                        stats.error(k);
                        break;
                    }
                }
                next += sends.per_conn_interval;
            }
            Ok(Some(client::Event::Ack(id, _))) => {
                if let Some(t) = scheduled.remove(&id) {
                    let us = t.elapsed().as_micros().max(1) as u64;
                    let _ = sends.hist.borrow_mut().record(us.min(3_600_000_000));
                }
            }
            Ok(Some(client::Event::Event(name, args))) if sends.direct && name == "message:new" => {
                record_transit(&run, &args, &sends.delivered);
            }
            Ok(Some(_)) => {}
            Err(k) => {
                stats.error(k);
                break;
            }
        }
    }
    stats.connected.fetch_sub(1, Ordering::Relaxed);
}

/// A worker of the ack-rtt scenario: its share of the connections, each sending at
/// `msg_rate / connections`.
async fn ack_rtt_worker(run: Arc<Run>, idx: usize, stats: Arc<Stats>, opts: AckRtt, direct: bool) -> Timed {
    let n = run.common.connections.max(1);
    let per_conn = Duration::from_secs_f64(n as f64 / opts.msg_rate.max(0.001));
    let sends = std::rc::Rc::new(Sends {
        per_conn_interval: per_conn,
        send_event: opts.send_event,
        content: "x".repeat(opts.payload_bytes),
        hist: std::cell::RefCell::new(new_hist()),
        sent: std::cell::Cell::new(0),
        direct,
        delivered: std::cell::RefCell::new(new_hist()),
    });
    let per_worker_rate = (run.common.rate / run.workers as f64).max(0.001);
    let mut tasks = Vec::new();
    for (k, i) in (idx..run.common.connections).step_by(run.workers).enumerate() {
        let due = run.start + Duration::from_secs_f64(k as f64 / per_worker_rate);
        let now = Instant::now();
        if due > now {
            glommio::timer::sleep(due - now).await;
        }
        // Spread the connections' schedules over one interval so sends do not bunch up.
        let offset = per_conn.mul_f64(i as f64 / n as f64);
        tasks.push(glommio::spawn_local(ack_rtt_one(run.clone(), sends.clone(), i, stats.clone(), offset)));
    }
    for t in tasks {
        t.await;
    }
    let (hist, delivered) = (sends.hist.borrow().clone(), sends.delivered.borrow().clone());
    (hist, sends.sent.get(), delivered)
}

/// One fan-out member: publishers send `{t, pad}` to their room on a fixed schedule;
/// everyone times the messages they receive from the `t` inside.
async fn fanout_one(
    run: Arc<Run>,
    sends: std::rc::Rc<Sends>,
    i: usize,
    stats: Arc<Stats>,
    publisher: bool,
    offset: Duration,
) {
    let Some(mut c) = open(&run, i, &stats).await else { return };
    let room = format!("room-{}", i % run.common.rooms.max(1));
    let mut next = Instant::now() + offset;
    while Instant::now() < run.deadline {
        let until = if publisher { next.min(run.deadline) } else { run.deadline };
        match c.next_event_until(until).await {
            Ok(None) if publisher && Instant::now() < run.deadline => {
                let t = run.start.elapsed().as_micros() as u64;
                let arg = json!({ "room": room, "content": { "t": t, "pad": sends.content } });
                if let Err(k) = c.emit(&sends.send_event, &arg, false).await {
                    stats.error(k);
                    break;
                }
                sends.sent.set(sends.sent.get() + 1);
                next += sends.per_conn_interval;
            }
            Ok(None) => {}
            Ok(Some(client::Event::Event(name, args))) if name == "message:new" => {
                record_transit(&run, &args, &sends.hist);
            }
            Ok(Some(_)) => {}
            Err(k) => {
                stats.error(k);
                break;
            }
        }
    }
    stats.connected.fetch_sub(1, Ordering::Relaxed);
}

/// A worker of the fan-out scenario.
async fn fanout_worker(run: Arc<Run>, idx: usize, stats: Arc<Stats>, opts: Fanout) -> Timed {
    let rooms = run.common.rooms.max(1);
    let publishers = (rooms * opts.publishers.max(1)).min(run.common.connections).max(1);
    let per_pub = Duration::from_secs_f64(publishers as f64 / opts.msg_rate.max(0.001));
    let sends = std::rc::Rc::new(Sends {
        per_conn_interval: per_pub,
        send_event: "message:send".into(),
        content: "x".repeat(opts.payload_bytes),
        hist: std::cell::RefCell::new(new_hist()),
        sent: std::cell::Cell::new(0),
        direct: false,
        delivered: std::cell::RefCell::new(new_hist()),
    });
    let per_worker_rate = (run.common.rate / run.workers as f64).max(0.001);
    let mut tasks = Vec::new();
    // Members connect first; publishers (the lowest indexes) start sending once the
    // connect phase is over, so every member is there for the first message.
    let connect_phase = Duration::from_secs_f64(run.common.connections as f64 / run.common.rate.max(0.001));
    for (k, i) in (idx..run.common.connections).step_by(run.workers).enumerate() {
        let due = run.start + Duration::from_secs_f64(k as f64 / per_worker_rate);
        let now = Instant::now();
        if due > now {
            glommio::timer::sleep(due - now).await;
        }
        let publisher = i < publishers;
        let offset = connect_phase + Duration::from_secs(1) + per_pub.mul_f64(i as f64 / publishers as f64);
        let offset = offset.saturating_sub(run.start.elapsed());
        tasks.push(glommio::spawn_local(fanout_one(
            run.clone(),
            sends.clone(),
            i,
            stats.clone(),
            publisher,
            offset,
        )));
    }
    for t in tasks {
        t.await;
    }
    let hist = sends.hist.borrow().clone();
    (hist, sends.sent.get(), new_hist())
}

/// One connect-storm wave on a worker: its share of connections at the paced rate, each
/// timed from its scheduled start to its joined room; returns the clients and the time
/// the wave took.
async fn storm_wave(
    run: &Arc<Run>,
    idx: usize,
    stats: &Arc<Stats>,
    hist: &std::rc::Rc<std::cell::RefCell<hdrhistogram::Histogram<u64>>>,
) -> (Vec<Client>, f64) {
    let per_worker_rate = (run.common.rate / run.workers as f64).max(0.001);
    let began = Instant::now();
    let mut tasks = Vec::new();
    for (k, i) in (idx..run.common.connections).step_by(run.workers).enumerate() {
        let due = began + Duration::from_secs_f64(k as f64 / per_worker_rate);
        let now = Instant::now();
        if due > now {
            glommio::timer::sleep(due - now).await;
        }
        if Instant::now() >= run.deadline {
            break;
        }
        let (run, stats, hist) = (run.clone(), stats.clone(), hist.clone());
        tasks.push(glommio::spawn_local(async move {
            let c = open(&run, i, &stats).await;
            if c.is_some() {
                let us = due.elapsed().as_micros().max(1) as u64;
                let _ = hist.borrow_mut().record(us.min(3_600_000_000));
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        if let Some(c) = t.await {
            clients.push(c);
        }
    }
    (clients, began.elapsed().as_secs_f64())
}

/// A worker of the connect-storm scenario: a first wave, everything dropped at once, a
/// second wave (the mass reconnect). Returns (first, second) connect latencies and wave
/// durations.
async fn storm_worker(
    run: Arc<Run>,
    idx: usize,
    stats: Arc<Stats>,
) -> Vec<(hdrhistogram::Histogram<u64>, f64, u64)> {
    let mut waves = Vec::new();
    for _ in 0..2 {
        let hist = std::rc::Rc::new(std::cell::RefCell::new(
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds"),
        ));
        let (clients, secs) = storm_wave(&run, idx, &stats, &hist).await;
        let n = clients.len() as u64;
        // Everyone drops at once: the server sees the whole wave go.
        stats.connected.fetch_sub(n, Ordering::Relaxed);
        drop(clients);
        let h = hist.borrow().clone();
        waves.push((h, secs, n));
        glommio::timer::sleep(Duration::from_millis(200)).await;
    }
    waves
}

/// One idle connection: connect, join a room, hold until the deadline.
async fn idle_one(run: Arc<Run>, i: usize, stats: Arc<Stats>) {
    let Some(mut c) = open(&run, i, &stats).await else { return };
    let held = c.idle_until(run.deadline).await;
    stats.connected.fetch_sub(1, Ordering::Relaxed);
    if let Err(k) = held {
        stats.error(k);
    }
}

/// A worker opens connections `idx, idx + workers, ...` at its share of the rate.
async fn idle_worker(run: Arc<Run>, idx: usize, stats: Arc<Stats>) {
    let per_worker_rate = (run.common.rate / run.workers as f64).max(0.001);
    let mut tasks = Vec::new();
    for (k, i) in (idx..run.common.connections).step_by(run.workers).enumerate() {
        let due = run.start + Duration::from_secs_f64(k as f64 / per_worker_rate);
        let now = Instant::now();
        if due > now {
            glommio::timer::sleep(due - now).await;
        }
        if Instant::now() >= run.deadline {
            break;
        }
        tasks.push(glommio::spawn_local(idle_one(run.clone(), i, stats.clone())));
    }
    for t in tasks {
        t.await;
    }
}

fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

fn sockstat() -> String {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("TCP:")).map(str::to_string))
        .unwrap_or_default()
}

fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (mut common, ack, fan, storm, direct) = match cli.scenario {
        Scenario::Idle(c) => (c, None, None, false, false),
        Scenario::AckRtt(a) => (a.common.clone(), Some(a), None, false, false),
        Scenario::Fanout(f) => (f.common.clone(), None, Some(f), false, false),
        Scenario::ConnectStorm(c) => (c, None, None, true, false),
        Scenario::Direct(a) => (a.common.clone(), Some(a), None, false, true),
    };
    if let Some(f) = &fan {
        common.rooms = (common.connections / f.room_size.max(1)).max(1);
    }
    let fds = raise_fd_limit();
    if common.connections as u64 + 64 > fds {
        bail!(
            "{} connections need more than this process's open-file limit ({fds}); run several \
             shardgate-loadtest processes with --connections split between them",
            common.connections
        );
    }
    if common.jwt_secret.is_none() && common.tokens.is_none() {
        bail!("give --jwt-secret (tokens are minted) or --tokens FILE");
    }
    let mut targets = Vec::new();
    for url in common.url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let hostport = url.trim_start_matches("http://").trim_start_matches("ws://").trim_end_matches('/');
        let addr = hostport
            .to_socket_addrs()
            .with_context(|| format!("resolving {hostport}"))?
            .next()
            .context("no address for the URL")?;
        targets.push((addr, hostport.to_string()));
    }
    if targets.is_empty() {
        bail!("--url names no server");
    }
    let tokens = match &common.tokens {
        Some(p) => std::fs::read_to_string(p)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None => Vec::new(),
    };
    let sources = match &common.source_ips {
        Some(s) => parse_ips(s)?,
        None => Vec::new(),
    };
    let workers = common
        .cores
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
        .max(1);
    let start = Instant::now();
    let run = Arc::new(Run {
        targets,
        sources,
        tokens,
        start,
        deadline: start + common.duration,
        workers,
        common: common.clone(),
    });
    let stats = Arc::new(Stats::default());
    let rss_before = common.server_pid.and_then(rss);
    let sock_before = sockstat();
    let mut handles = Vec::new();
    for idx in 0..workers {
        let (run, stats, ack, fan) = (run.clone(), stats.clone(), ack.clone(), fan.clone());
        let h = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("loadtest-{idx}"))
            .spawn(move || async move {
                match (ack, fan, storm) {
                    (Some(opts), _, _) => Outcome::Timed(ack_rtt_worker(run, idx, stats, opts, direct).await),
                    (_, Some(opts), _) => Outcome::Timed(fanout_worker(run, idx, stats, opts).await),
                    (_, _, true) => Outcome::Waves(storm_worker(run, idx, stats).await),
                    _ => {
                        idle_worker(run, idx, stats).await;
                        Outcome::Nothing
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("cannot start worker {idx}: {e}"))?;
        handles.push(h);
    }
    // Progress on stderr; the server is sampled once every connection is up (or the
    // connect phase is over) and has had a moment to settle.
    let mut sampled: Option<(Option<u64>, String, f64)> = None;
    let mut all_up_at: Option<Instant> = None;
    while Instant::now() < run.deadline {
        std::thread::sleep(Duration::from_millis(250));
        let up = stats.connected.load(Ordering::Relaxed) as usize;
        let failed: u64 = stats.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum();
        if !common.json {
            eprint!(
                "\r{:>6.1}s  connections {up:>7}/{:<7} errors {failed:<6}",
                start.elapsed().as_secs_f64(),
                common.connections
            );
        }
        if all_up_at.is_none() && up as u64 + failed >= common.connections as u64 {
            all_up_at = Some(Instant::now());
        }
        if sampled.is_none() && all_up_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(1)) {
            let connect_secs = all_up_at.map(|t| t.duration_since(start).as_secs_f64()).unwrap_or(0.0);
            sampled = Some((common.server_pid.and_then(rss), sockstat(), connect_secs));
        }
    }
    let mut hist = new_hist();
    let mut delivered = new_hist();
    let mut sent = 0;
    let mut waves: Vec<(hdrhistogram::Histogram<u64>, f64, u64)> = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Outcome::Timed((h, n, d))) => {
                let _ = hist.add(&h);
                let _ = delivered.add(&d);
                sent += n;
            }
            Ok(Outcome::Waves(ws)) => {
                for (i, (h, secs, n)) in ws.into_iter().enumerate() {
                    if waves.len() <= i {
                        waves.push((h, secs, n));
                    } else {
                        let _ = waves[i].0.add(&h);
                        waves[i].1 = waves[i].1.max(secs);
                        waves[i].2 += n;
                    }
                }
            }
            _ => {}
        }
    }
    if !common.json {
        eprintln!();
    }
    let peak = stats.peak.load(Ordering::Relaxed);
    let (rss_after, sock_after, connect_secs) =
        sampled.unwrap_or((None, sockstat(), run.common.duration.as_secs_f64()));
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if peak > 0 => json!((a.saturating_sub(b)) / peak),
        _ => serde_json::Value::Null,
    };
    let mut result = json!({
        "scenario": if direct { "direct" } else if ack.is_some() { "ack-rtt" } else if fan.is_some() { "fanout" } else if storm { "connect-storm" } else { "idle" },
        "url": common.url,
        "workers": workers,
        "connections_target": common.connections,
        "connections_peak": peak,
        "connect_seconds": connect_secs,
        "errors": stats.errors_json(),
        "server_rss_before_bytes": rss_before,
        "server_rss_after_bytes": rss_after,
        "rss_bytes_per_connection": per_conn,
        "sockstat_before": sock_before,
        "sockstat_after": sock_after,
        "duration_seconds": common.duration.as_secs_f64(),
    });
    if let Some(a) = &ack {
        let q = |p: f64| hist.value_at_quantile(p);
        result["messages"] = json!({
            "target_rate": a.msg_rate,
            "sent": sent,
            "acked": hist.len(),
            "achieved_rate": sent as f64 / common.duration.as_secs_f64(),
            "latency_us": { "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99_9": q(0.999), "max": hist.max() },
        });
        if direct {
            let d = |p: f64| delivered.value_at_quantile(p);
            result["messages"]["delivered"] = json!(delivered.len());
            result["messages"]["delivery_latency_us"] = json!({ "p50": d(0.5), "p90": d(0.9), "p99": d(0.99), "p99_9": d(0.999), "max": delivered.max() });
        }
    }
    if let Some(f) = &fan {
        let q = |p: f64| hist.value_at_quantile(p);
        let members = common.connections / common.rooms.max(1);
        let delivered = hist.len();
        // Publishers start once every member had time to connect (see fanout_worker).
        let connect_phase = common.connections as f64 / common.rate.max(0.001) + 1.0;
        let send_secs = (common.duration.as_secs_f64() - connect_phase).max(0.001);
        result["fanout"] = json!({
            "rooms": common.rooms,
            "room_size": members,
            "publishers_per_room": f.publishers,
            "target_rate": f.msg_rate,
            "sent": sent,
            "deliveries": delivered,
            "expected_deliveries": sent * members.saturating_sub(1) as u64,
            "send_window_seconds": send_secs,
            "deliveries_per_sec": delivered as f64 / send_secs,
            "latency_us": { "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99_9": q(0.999), "max": hist.max() },
        });
    }
    if storm {
        let report: Vec<serde_json::Value> = waves
            .iter()
            .zip(["first", "mass_reconnect"])
            .map(|((h, secs, n), name)| {
                let q = |p: f64| h.value_at_quantile(p);
                json!({
                    "wave": name, "connected": n, "seconds": secs,
                    "connects_per_sec": *n as f64 / secs.max(0.001),
                    "connect_latency_us": { "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": h.max() },
                })
            })
            .collect();
        result["waves"] = json!(report);
    }
    if common.json {
        println!("{result}");
    } else {
        println!("scenario            {}", result["scenario"].as_str().unwrap_or_default());
        if ack.is_some() {
            println!("messages            {}", result["messages"]);
        }
        if fan.is_some() {
            println!("fanout              {}", result["fanout"]);
        }
        if storm {
            println!("waves               {}", result["waves"]);
        }
        println!("connections         {peak} of {} in {connect_secs:.2}s", common.connections);
        println!("errors              {}", result["errors"]);
        if let Some(a) = rss_after {
            println!(
                "server rss          {} -> {a} bytes ({} bytes per connection)",
                rss_before.unwrap_or(0),
                per_conn
            );
        }
        println!("sockstat            {sock_before} -> {sock_after}");
    }
    Ok(())
}
