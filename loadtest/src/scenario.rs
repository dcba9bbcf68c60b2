//! The scenarios, as what one executor does with its share of the connections.
//!
//! Connection `i` belongs to slot `i % stride`, a slot being one executor of one worker
//! process (`stride` = processes x executors), so every executor of every process opens
//! its connections at `rate / stride` and all schedules line up on the run's shared
//! start time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use shardgate_shard::auth::{mint_hs256, Claims};

use crate::client::{self, Client, ErrorKind};
use crate::stats::{new_hist, Stats, Wave};
use crate::Common;

/// Which scenario, with its own options.
#[derive(Clone, Debug)]
pub enum Kind {
    Idle,
    AckRtt { msg_rate: f64, payload_bytes: usize, send_event: String },
    Direct { msg_rate: f64, payload_bytes: usize, send_event: String },
    Fanout { publishers: usize, msg_rate: f64, payload_bytes: usize },
    ConnectStorm,
}

impl Kind {
    /// Report name.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::AckRtt { .. } => "ack-rtt",
            Kind::Direct { .. } => "direct",
            Kind::Fanout { .. } => "fanout",
            Kind::ConnectStorm => "connect-storm",
        }
    }
}

/// What every executor of a process needs to know.
pub struct Run {
    pub common: Common,
    pub kind: Kind,
    /// Servers, connection i going to `targets[i % len]`.
    pub targets: Vec<(SocketAddr, String)>,
    pub sources: Vec<IpAddr>,
    pub tokens: Vec<String>,
    /// The run's start, shared by every worker process.
    pub start: Instant,
    pub deadline: Instant,
    /// Executors in this process.
    pub workers: usize,
    /// This process's index among `procs` worker processes.
    pub proc_index: usize,
    pub procs: usize,
}

impl Run {
    /// Slots over all processes.
    pub fn stride(&self) -> usize {
        self.workers * self.procs
    }

    /// Connections of executor `exec` of this process.
    fn mine(&self, exec: usize) -> impl Iterator<Item = usize> {
        (self.proc_index * self.workers + exec..self.common.connections).step_by(self.stride())
    }

    /// Connects per second of one executor.
    fn slot_rate(&self) -> f64 {
        (self.common.rate / self.stride() as f64).max(0.001)
    }

    /// When the connect phase (every connection opened at `rate`) is over.
    pub fn connect_phase(&self) -> Duration {
        Duration::from_secs_f64(self.common.connections as f64 / self.common.rate.max(0.001))
    }

    /// When senders start: a second after the connect phase, so the server is not
    /// loaded with messages while connections still arrive, and every member of a room
    /// is there for its first message.
    pub fn sending_from(&self) -> Instant {
        self.start + self.connect_phase() + Duration::from_secs(1)
    }

    /// Seconds of the run in which messages are sent.
    pub fn send_window(&self) -> f64 {
        self.deadline.saturating_duration_since(self.sending_from()).as_secs_f64().max(0.001)
    }

    /// Microseconds since the run's start: the send time carried in payloads, valid in
    /// every worker process.
    fn now_us(&self) -> u64 {
        Instant::now().saturating_duration_since(self.start).as_micros() as u64
    }

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

/// Sleeps until `at` (no-op if it passed).
async fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        glommio::timer::sleep(at - now).await;
    }
}

/// Connects connection `i` and joins its room; counts failures.
async fn open(run: &Run, i: usize, stats: &Stats) -> Option<Client> {
    let source = (!run.sources.is_empty()).then(|| run.sources[i % run.sources.len()]);
    let auth = json!({ run.common.auth_field.clone(): run.token(i) });
    // A step may take 10 s, but never keeps the run much past its deadline.
    let left = run.deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    let timeout = Duration::from_secs(10).min(left);
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
        Ok(None) => Ok(Ok(())),
        Err(k) => Ok(Err(k)),
    };
    match joined {
        Ok(Ok(_)) => {
            stats.up();
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

/// Runs executor `exec`'s share of the scenario; connect-storm returns its waves.
pub async fn executor(run: Arc<Run>, exec: usize, stats: Arc<Stats>) -> Vec<Wave> {
    match run.kind.clone() {
        Kind::Idle => {
            spawn_paced(&run, exec, run.start, |i, _| idle_one(run.clone(), i, stats.clone())).await;
        }
        Kind::AckRtt { msg_rate, payload_bytes, send_event } => {
            ack_rtt(&run, exec, &stats, msg_rate, payload_bytes, send_event, false).await
        }
        Kind::Direct { msg_rate, payload_bytes, send_event } => {
            ack_rtt(&run, exec, &stats, msg_rate, payload_bytes, send_event, true).await
        }
        Kind::Fanout { publishers, msg_rate, payload_bytes, .. } => {
            fanout(&run, exec, &stats, publishers, msg_rate, payload_bytes).await
        }
        Kind::ConnectStorm => return storm(&run, exec, &stats).await,
    }
    Vec::new()
}

/// Spawns `one(i, due)` for each of the executor's connections at its share of the rate
/// counted from `began` (`due` is when connection i was scheduled), until the deadline;
/// then waits for them all and returns what they returned.
async fn spawn_paced<F, Fut, T>(run: &Run, exec: usize, began: Instant, mut one: F) -> Vec<T>
where
    F: FnMut(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = T> + 'static,
    T: 'static,
{
    let mut tasks = Vec::new();
    for (k, i) in run.mine(exec).enumerate() {
        let due = began + Duration::from_secs_f64(k as f64 / run.slot_rate());
        sleep_until(due).await;
        if Instant::now() >= run.deadline {
            break;
        }
        tasks.push(glommio::spawn_local(one(i, due)));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await);
    }
    out
}

/// One idle connection: connect, join a room, hold until the deadline.
async fn idle_one(run: Arc<Run>, i: usize, stats: Arc<Stats>) {
    let Some(mut c) = open(&run, i, &stats).await else { return };
    let held = c.idle_until(run.deadline).await;
    stats.down(1);
    if let Err(k) = held {
        stats.error(k);
    }
}

/// What the sending connections of one executor share.
struct Sends {
    exec: usize,
    interval: Duration,
    send_event: String,
    content: String,
    /// `direct`: send to the next user, carry the send time, time deliveries here.
    direct: bool,
}

/// `ack-rtt` and `direct`: every connection sends at `msg_rate / connections`, from the
/// end of the connect phase (see [`Run::sending_from`]).
async fn ack_rtt(
    run: &Arc<Run>,
    exec: usize,
    stats: &Arc<Stats>,
    msg_rate: f64,
    payload_bytes: usize,
    send_event: String,
    direct: bool,
) {
    let n = run.common.connections.max(1);
    let interval = Duration::from_secs_f64(n as f64 / msg_rate.max(0.001));
    let sends = Rc::new(Sends { exec, interval, send_event, content: "x".repeat(payload_bytes), direct });
    let begin = run.sending_from();
    spawn_paced(run, exec, run.start, |i, _| {
        // Spread the connections' schedules over one interval so sends do not bunch up.
        let first = begin + interval.mul_f64(i as f64 / n as f64);
        ack_rtt_one(run.clone(), sends.clone(), i, stats.clone(), first)
    })
    .await;
}

/// One connection sending at its fixed schedule and timing every ack from the send's
/// scheduled time (so a stalled server cannot hide its backlog: coordinated omission).
async fn ack_rtt_one(run: Arc<Run>, sends: Rc<Sends>, i: usize, stats: Arc<Stats>, first: Instant) {
    let Some(mut c) = open(&run, i, &stats).await else { return };
    let mut scheduled: HashMap<u64, Instant> = HashMap::new();
    let mut next = first;
    let me = format!("user{i}");
    let to = format!("user{}", (i + 1) % run.common.connections.max(1));
    while Instant::now() < run.deadline {
        match c.next_event_until(next.min(run.deadline)).await {
            Ok(None) => {
                if Instant::now() >= run.deadline {
                    break;
                }
                let arg = if sends.direct {
                    json!({ "to": to, "content": { "t": run.now_us(), "pad": sends.content } })
                } else {
                    json!({ "to": me, "content": sends.content })
                };
                match c.emit(&sends.send_event, &arg, true).await {
                    Ok(Some(id)) => {
                        scheduled.insert(id, next);
                        stats.sent();
                    }
                    Ok(None) => {}
                    Err(k) => {
                        stats.error(k);
                        break;
                    }
                }
                next += sends.interval;
            }
            Ok(Some(client::Event::Ack(id))) => {
                if let Some(t) = scheduled.remove(&id) {
                    stats.latency(sends.exec, t.elapsed().as_micros() as u64);
                }
            }
            Ok(Some(client::Event::Event { name, t })) if sends.direct && name == "message:new" => {
                if let Some(us) = transit(&run, t) {
                    stats.delivery(sends.exec, us);
                }
            }
            Ok(Some(_)) => {}
            Err(k) => {
                stats.error(k);
                break;
            }
        }
    }
    stats.down(1);
}

/// The send-to-receive time of a `message:new` whose content carries `t`.
fn transit(run: &Run, t: Option<u64>) -> Option<u64> {
    Some(run.now_us().saturating_sub(t?))
}

/// `fanout`: members connect first; publishers (the lowest indexes of each room) start
/// once the connect phase is over (see [`Run::sending_from`]).
async fn fanout(
    run: &Arc<Run>,
    exec: usize,
    stats: &Arc<Stats>,
    publishers: usize,
    msg_rate: f64,
    payload_bytes: usize,
) {
    let rooms = run.common.rooms.max(1);
    let publishers = (rooms * publishers.max(1)).min(run.common.connections).max(1);
    let interval = Duration::from_secs_f64(publishers as f64 / msg_rate.max(0.001));
    let sends = Rc::new(Sends {
        exec,
        interval,
        send_event: "message:send".into(),
        content: "x".repeat(payload_bytes),
        direct: false,
    });
    let begin = run.sending_from();
    spawn_paced(run, exec, run.start, |i, _| {
        let first = (i < publishers).then(|| begin + interval.mul_f64(i as f64 / publishers as f64));
        fanout_one(run.clone(), sends.clone(), i, stats.clone(), first)
    })
    .await;
}

/// One fan-out member: a publisher sends `{t, pad}` to its room on a fixed schedule from
/// `first`; everyone times the messages they receive from the `t` inside.
async fn fanout_one(run: Arc<Run>, sends: Rc<Sends>, i: usize, stats: Arc<Stats>, first: Option<Instant>) {
    let Some(mut c) = open(&run, i, &stats).await else { return };
    let room = format!("room-{}", i % run.common.rooms.max(1));
    let mut next = first;
    while Instant::now() < run.deadline {
        let until = next.map_or(run.deadline, |n| n.min(run.deadline));
        match c.next_event_until(until).await {
            Ok(None) => {
                let Some(at) = next.as_mut().filter(|_| Instant::now() < run.deadline) else { continue };
                let arg = json!({ "room": room, "content": { "t": run.now_us(), "pad": sends.content } });
                if let Err(k) = c.emit(&sends.send_event, &arg, false).await {
                    stats.error(k);
                    break;
                }
                stats.sent();
                *at += sends.interval;
            }
            Ok(Some(client::Event::Event { name, t })) if name == "message:new" => {
                if let Some(us) = transit(&run, t) {
                    stats.latency(sends.exec, us);
                }
            }
            Ok(Some(_)) => {}
            Err(k) => {
                stats.error(k);
                break;
            }
        }
    }
    stats.down(1);
}

/// `connect-storm`: a first wave, everything dropped at once, a second wave (the mass
/// reconnect).
async fn storm(run: &Arc<Run>, exec: usize, stats: &Arc<Stats>) -> Vec<Wave> {
    let mut waves = Vec::new();
    for _ in 0..2 {
        let hist = Rc::new(RefCell::new(new_hist()));
        let began = Instant::now();
        let opened = spawn_paced(run, exec, began, |i, due| {
            let (run, stats, hist) = (run.clone(), stats.clone(), hist.clone());
            async move {
                let c = open(&run, i, &stats).await;
                if c.is_some() {
                    hist.borrow_mut().saturating_record((due.elapsed().as_micros() as u64).max(1));
                }
                c
            }
        })
        .await;
        let clients: Vec<Client> = opened.into_iter().flatten().collect();
        let seconds = began.elapsed().as_secs_f64();
        // Everyone drops at once: the server sees the whole wave go.
        let n = clients.len() as u64;
        stats.down(n);
        drop(clients);
        waves.push(Wave { latency: hist.borrow().clone(), seconds, connected: n });
        glommio::timer::sleep(Duration::from_millis(200)).await;
    }
    waves
}
