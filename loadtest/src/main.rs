//! `shardgate-loadtest`: a thread-per-core Socket.IO v4 load generator.
//!
//! One glommio executor per core it is given; each opens its share of the connections at
//! a controlled rate and runs the scenario on them (`scenario`). It speaks to any
//! Socket.IO v4 server over WebSocket (namespace, auth field and tokens configurable),
//! mints HS256 tokens from a shared secret or reads them from a file, and counts every
//! error by kind.
//!
//! When one process cannot hold every connection (its open-file limit), the run is spread
//! over worker processes: the same binary started with `--worker K/N@EPOCH`, each taking
//! every N-th slot of the schedule and reporting samples as JSON lines (`stats`). The
//! parent merges them into one timeline, draws the live progress, samples the server's
//! memory and CPU time, and prints the final table, `--json`, or an HTML report
//! (`report`).

mod client;
mod report;
mod scenario;
mod stats;

use std::io::{BufRead, Write};
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use glommio::{LocalExecutorBuilder, Placement};
use scenario::{Kind, Run};
use stats::{Report, Stats, SAMPLE_EVERY};

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
pub struct Common {
    /// Server URL (`http://host:port`); several, comma-separated, spread connection i
    /// over them round-robin (the `direct` scenario pairs users on different servers).
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    pub url: String,
    /// HS256 secret to mint one token per connection (`sub` = user{i}).
    #[arg(long, env = "SHARDGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File with one token per line, used in turn instead of minting.
    #[arg(long)]
    pub tokens: Option<std::path::PathBuf>,
    /// `tenantId` claim of minted tokens.
    #[arg(long, default_value = "bench")]
    pub tenant: String,
    /// Socket.IO namespace.
    #[arg(long, default_value = "/")]
    pub namespace: String,
    /// Field of the CONNECT auth payload that carries the token.
    #[arg(long, default_value = "token")]
    pub auth_field: String,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// New connections per second (all cores together).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// How long the run lasts (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Executors (one per core); default: every core.
    #[arg(long)]
    pub cores: Option<usize>,
    /// Source addresses to spread connections over (`127.0.0.1,127.0.0.2` or
    /// `127.0.0.1-127.0.0.9`), past the ephemeral-port limit of one address.
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Event joining a room (`join_room` for shardgate).
    #[arg(long, default_value = "join_room")]
    pub join_event: String,
    /// Rooms the connections are spread over.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Server process ids (comma-separated), to report their resident memory and CPU time.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write a self-contained HTML report (latency percentiles, throughput and
    /// latency over time) to this file.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    /// Worker processes; default: as many as the per-process open-file limit requires.
    #[arg(long)]
    pub processes: Option<usize>,
    /// Internal: run as worker process `K/N` of a run that started at `@EPOCH_US`
    /// (microseconds since the Unix epoch), reporting JSON lines on stdout.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
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

impl Scenario {
    fn split(self) -> (Common, Kind) {
        match self {
            Scenario::Idle(c) => (c, Kind::Idle),
            Scenario::ConnectStorm(c) => (c, Kind::ConnectStorm),
            Scenario::AckRtt(a) => (
                a.common,
                Kind::AckRtt {
                    msg_rate: a.msg_rate,
                    payload_bytes: a.payload_bytes,
                    send_event: a.send_event,
                },
            ),
            Scenario::Direct(a) => (
                a.common,
                Kind::Direct {
                    msg_rate: a.msg_rate,
                    payload_bytes: a.payload_bytes,
                    send_event: a.send_event,
                },
            ),
            Scenario::Fanout(f) => {
                let mut common = f.common;
                common.rooms = (common.connections / f.room_size.max(1)).max(1);
                let kind = Kind::Fanout {
                    publishers: f.publishers,
                    msg_rate: f.msg_rate,
                    payload_bytes: f.payload_bytes,
                };
                (common, kind)
            }
        }
    }
}

/// File descriptors a process keeps for itself beyond its connections.
const RESERVED_FDS: u64 = 64;

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The `Instant` of a wall-clock time in microseconds since the Unix epoch.
fn instant_of(epoch_us: u64) -> Instant {
    let (now, now_us) = (Instant::now(), unix_us());
    if epoch_us <= now_us {
        now.checked_sub(Duration::from_micros(now_us - epoch_us)).unwrap_or(now)
    } else {
        now + Duration::from_micros(epoch_us - now_us)
    }
}

/// Everything one process needs for its part of the run.
fn build_run(
    common: &Common,
    kind: &Kind,
    start: Instant,
    proc_index: usize,
    procs: usize,
) -> anyhow::Result<Run> {
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
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
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
    Ok(Run {
        common: common.clone(),
        kind: kind.clone(),
        targets,
        sources,
        tokens,
        start,
        deadline: start + common.duration,
        workers,
        proc_index,
        procs,
    })
}

/// Runs this process's part: one executor per core, and a sampler thread that sends a
/// sample every `SAMPLE_EVERY`, then the final report once the executors are done.
fn run_local(run: Arc<Run>) -> anyhow::Result<mpsc::Receiver<Report>> {
    let stats = Arc::new(Stats::new(run.workers));
    let mut handles = Vec::new();
    for exec in 0..run.workers {
        let (run, stats) = (run.clone(), stats.clone());
        let h = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("loadtest-{exec}"))
            .spawn(move || scenario::executor(run, exec, stats))
            .map_err(|e| anyhow::anyhow!("cannot start executor {exec}: {e}"))?;
        handles.push(h);
    }
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name("loadtest-sampler".into()).spawn(move || {
        let mut k = 0;
        loop {
            let at = run.start + SAMPLE_EVERY * k as u32;
            if at > run.deadline {
                break;
            }
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let t = (SAMPLE_EVERY * k as u32).as_secs_f64();
            if tx.send(Report::Sample(k, stats.sample(t))).is_err() {
                return;
            }
            k += 1;
        }
        let mut waves: Vec<stats::Wave> = Vec::new();
        for h in handles {
            match h.join() {
                Ok(ws) => stats::merge_waves(&mut waves, ws),
                Err(e) => {
                    let _ = tx.send(Report::Failed(format!("executor failed: {e}")));
                    return;
                }
            }
        }
        let t = run.start.elapsed().as_secs_f64();
        let peak = stats.peak.load(std::sync::atomic::Ordering::Relaxed);
        let _ = tx.send(Report::Final { rest: stats.sample(t), peak, waves });
    })?;
    Ok(rx)
}

/// Worker-process mode: run the part `K/N@EPOCH_US` names and report on stdout.
fn worker(common: Common, kind: Kind, spec: &str) -> anyhow::Result<()> {
    let parse = || -> Option<(usize, usize, u64)> {
        let (kn, epoch) = spec.split_once('@')?;
        let (k, n) = kn.split_once('/')?;
        Some((k.parse().ok()?, n.parse().ok()?, epoch.parse().ok()?))
    };
    let (k, n, epoch) = parse().with_context(|| format!("bad --worker {spec:?}: want K/N@EPOCH_US"))?;
    shardgate_shard::runtime::raise_fd_limit();
    let rx = run_local(Arc::new(build_run(&common, &kind, instant_of(epoch), k, n)?))?;
    let mut out = std::io::stdout().lock();
    for report in rx {
        serde_json::to_writer(&mut out, &report)?;
        out.write_all(b"\n")?;
        out.flush()?;
    }
    Ok(())
}

/// Starts `procs` worker processes of this binary with the same arguments; their
/// reports arrive tagged with the process index.
fn spawn_workers(procs: usize, epoch_us: u64) -> anyhow::Result<mpsc::Receiver<(usize, Report)>> {
    let exe = std::env::current_exe().context("locating shardgate-loadtest")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let (tx, rx) = mpsc::channel();
    for k in 0..procs {
        let mut child = std::process::Command::new(&exe)
            .args(&args)
            .arg("--worker")
            .arg(format!("{k}/{procs}@{epoch_us}"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting worker process {k}"))?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut finished = false;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Report>(&line) {
                    Ok(r) => {
                        finished |= matches!(r, Report::Final { .. } | Report::Failed(_));
                        if tx.send((k, r)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send((k, Report::Failed(format!("worker {k} sent {e}: {line:.80}"))));
                        finished = true;
                        break;
                    }
                }
            }
            let status = child.wait();
            if !finished {
                let _ = tx.send((k, Report::Failed(format!("worker process {k} ended early: {status:?}"))));
            }
        });
    }
    Ok(rx)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn print(s: &str) {
    let _ = std::io::stdout().lock().write_all(s.as_bytes());
}

fn main() -> anyhow::Result<()> {
    let (common, kind) = Cli::parse().scenario.split();
    if common.jwt_secret.is_none() && common.tokens.is_none() {
        bail!("give --jwt-secret (tokens are minted) or --tokens FILE");
    }
    if let Some(spec) = &common.worker {
        return worker(common.clone(), kind, spec);
    }
    let fds = shardgate_shard::runtime::raise_fd_limit();
    let per_proc = fds.saturating_sub(RESERVED_FDS).max(1) as usize;
    let procs = common.processes.unwrap_or_else(|| common.connections.div_ceil(per_proc)).max(1);
    if common.connections.div_ceil(procs) > per_proc {
        bail!(
            "{} connections over {procs} processes need more than the open-file limit of one \
             process ({fds}); give --processes {} or more",
            common.connections,
            common.connections.div_ceil(per_proc)
        );
    }
    let epoch_us = unix_us();
    let start = instant_of(epoch_us);
    // Validate the arguments here, once, before any worker starts.
    let whole = Arc::new(build_run(&common, &kind, start, 0, 1)?);
    let rx = if procs == 1 {
        let rx = run_local(whole.clone())?;
        let (tx, tagged) = mpsc::channel();
        std::thread::spawn(move || {
            for r in rx {
                if tx.send((0, r)).is_err() {
                    break;
                }
            }
        });
        tagged
    } else {
        spawn_workers(procs, epoch_us)?
    };
    let outcome = report::follow(&common, &kind, procs, start, rx);
    let result = report::result(&whole, procs, &outcome);
    if common.json {
        print(&format!("{result}\n"));
    } else {
        print(&report::table(&result));
    }
    if let Some(path) = &common.report {
        std::fs::write(path, report::html(&result, &outcome.timeline))
            .with_context(|| format!("writing {}", path.display()))?;
        if !common.json {
            print(&format!("report              {}\n", path.display()));
        }
    }
    if let Some(e) = &outcome.failure {
        bail!("{e}");
    }
    Ok(())
}
