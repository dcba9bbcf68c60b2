//! What a run measures, and how it travels.
//!
//! The executors of a process record into one [`Stats`]: lock-free counters, and latency
//! histograms kept per executor behind an uncontended mutex. A sampler thread drains the
//! histograms every [`SAMPLE_EVERY`] into a [`Sample`]; samples feed the live progress,
//! the throughput-over-time timeline and, when the run is spread over several worker
//! processes, the parent, which reads them as JSON lines from each worker's stdout and
//! merges them in a [`Timeline`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::client::ErrorKind;

/// How often the sampler drains the histograms.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// An empty latency histogram in microseconds (1 µs .. 1 h, 3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds")
}

/// Counters and histograms shared by the executors of one process.
pub struct Stats {
    /// Connections open and in their room right now.
    pub connected: AtomicU64,
    /// The most that were open at once.
    pub peak: AtomicU64,
    errors: [AtomicU64; 5],
    /// Messages sent.
    pub sent: AtomicU64,
    /// Per executor: ack latencies (`ack-rtt`, `direct`) or send-to-receive latencies
    /// (`fanout`), since the last sample.
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Per executor: send-to-delivery latencies (`direct`), since the last sample.
    delivery: Vec<Mutex<Histogram<u64>>>,
}

impl Stats {
    /// Stats for `executors` executors.
    pub fn new(executors: usize) -> Stats {
        Stats {
            connected: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            errors: Default::default(),
            sent: AtomicU64::new(0),
            latency: (0..executors).map(|_| Mutex::new(new_hist())).collect(),
            delivery: (0..executors).map(|_| Mutex::new(new_hist())).collect(),
        }
    }

    /// Counts an error of kind `k`.
    pub fn error(&self, k: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|x| *x == k).unwrap_or(0);
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A connection is up (and in its room).
    pub fn up(&self) {
        let now = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// `n` connections went down.
    pub fn down(&self, n: u64) {
        self.connected.fetch_sub(n, Ordering::Relaxed);
    }

    /// A message went out.
    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an ack or receive latency on executor `exec`.
    pub fn latency(&self, exec: usize, us: u64) {
        record(&self.latency[exec], us);
    }

    /// Records a send-to-delivery latency on executor `exec`.
    pub fn delivery(&self, exec: usize, us: u64) {
        record(&self.delivery[exec], us);
    }

    /// Errors so far, by kind.
    pub fn errors(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.errors[i].load(Ordering::Relaxed))
    }

    /// Everything now, draining the histograms (their contents move into the sample).
    pub fn sample(&self, t: f64) -> Sample {
        Sample {
            t,
            connected: self.connected.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            errors: self.errors(),
            latency: drain(&self.latency),
            delivery: drain(&self.delivery),
        }
    }
}

fn record(h: &Mutex<Histogram<u64>>, us: u64) {
    let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
    h.saturating_record(us.clamp(1, 3_600_000_000));
}

fn drain(hs: &[Mutex<Histogram<u64>>]) -> Histogram<u64> {
    let mut out = new_hist();
    for h in hs {
        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.add(&*h);
        h.reset();
    }
    out
}

/// One sample of one process: gauges and cumulative counters at `t` seconds into the
/// run, and the latencies recorded since the previous sample.
#[derive(Clone, Serialize, Deserialize)]
pub struct Sample {
    pub t: f64,
    pub connected: u64,
    pub sent: u64,
    pub errors: [u64; 5],
    #[serde(with = "pairs")]
    pub latency: Histogram<u64>,
    #[serde(with = "pairs")]
    pub delivery: Histogram<u64>,
}

/// One connect-storm wave of one process.
#[derive(Clone, Serialize, Deserialize)]
pub struct Wave {
    #[serde(with = "pairs")]
    pub latency: Histogram<u64>,
    pub seconds: f64,
    pub connected: u64,
}

/// Adds `from` into `into` wave by wave (executors of a process, or processes): a wave
/// lasts as long as its slowest part.
pub fn merge_waves(into: &mut Vec<Wave>, from: Vec<Wave>) {
    for (i, w) in from.into_iter().enumerate() {
        match into.get_mut(i) {
            Some(m) => {
                let _ = m.latency.add(&w.latency);
                m.seconds = m.seconds.max(w.seconds);
                m.connected += w.connected;
            }
            None => into.push(w),
        }
    }
}

/// What a process reports.
#[derive(Serialize, Deserialize)]
pub enum Report {
    /// A periodic sample (index `k` is at `k * SAMPLE_EVERY`).
    Sample(usize, Sample),
    /// The last word: a sample of what is left, the peak, and connect-storm waves.
    Final { rest: Sample, peak: u64, waves: Vec<Wave> },
    /// The process failed.
    Failed(String),
}

/// Histograms travel as `[[value, count], ...]`; re-recording each value lands in the
/// same bucket.
mod pairs {
    use hdrhistogram::Histogram;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        let v: Vec<(u64, u64)> =
            h.iter_recorded().map(|x| (x.value_iterated_to(), x.count_at_value())).collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let v: Vec<(u64, u64)> = Vec::deserialize(d)?;
        let mut h = super::new_hist();
        for (value, count) in v {
            h.saturating_record_n(value.clamp(1, 3_600_000_000), count);
        }
        Ok(h)
    }
}

/// Samples of every process merged by time, and the totals.
pub struct Timeline {
    procs: usize,
    /// Per sample index: how many processes reported, and their sum.
    points: Vec<(usize, Sample)>,
    /// Per process: its latest cumulative counters and gauges.
    latest: Vec<Option<Sample>>,
    finals: usize,
    /// Every latency recorded, all processes.
    pub latency: Histogram<u64>,
    pub delivery: Histogram<u64>,
    pub peak: u64,
    pub waves: Vec<Wave>,
}

/// A merged point of the timeline.
pub struct Point {
    pub t: f64,
    pub connected: u64,
    pub sent: u64,
    /// Messages sent, and latencies recorded (acks or deliveries), per second over the
    /// interval ending at `t`.
    pub sent_per_sec: f64,
    pub received_per_sec: f64,
    pub errors: u64,
    /// Latencies recorded in the interval ending at `t`.
    pub latency: Histogram<u64>,
}

impl Timeline {
    /// A timeline for `procs` processes.
    pub fn new(procs: usize) -> Timeline {
        Timeline {
            procs,
            points: Vec::new(),
            latest: vec![None; procs],
            finals: 0,
            latency: new_hist(),
            delivery: new_hist(),
            peak: 0,
            waves: Vec::new(),
        }
    }

    /// Takes process `proc`'s report; returns the index of a point every process has
    /// now reported, if this completed one.
    pub fn add(&mut self, proc: usize, report: Report) -> Option<usize> {
        match report {
            Report::Sample(k, s) => {
                let _ = self.latency.add(&s.latency);
                let _ = self.delivery.add(&s.delivery);
                while self.points.len() <= k {
                    let mut empty = Sample {
                        t: self.points.len() as f64 * SAMPLE_EVERY.as_secs_f64(),
                        connected: 0,
                        sent: 0,
                        errors: [0; 5],
                        latency: new_hist(),
                        delivery: new_hist(),
                    };
                    empty.t = (empty.t * 1000.0).round() / 1000.0;
                    self.points.push((0, empty));
                }
                let (seen, p) = &mut self.points[k];
                *seen += 1;
                p.connected += s.connected;
                p.sent += s.sent;
                for (a, b) in p.errors.iter_mut().zip(s.errors) {
                    *a += b;
                }
                let _ = p.latency.add(&s.latency);
                let _ = p.delivery.add(&s.delivery);
                self.latest[proc] = Some(s);
                (*seen == self.procs).then_some(k)
            }
            Report::Final { rest, peak, waves } => {
                let _ = self.latency.add(&rest.latency);
                let _ = self.delivery.add(&rest.delivery);
                self.latest[proc] = Some(rest);
                self.peak += peak;
                merge_waves(&mut self.waves, waves);
                self.finals += 1;
                None
            }
            Report::Failed(_) => {
                self.finals += 1;
                None
            }
        }
    }

    /// Every process has said its last word.
    pub fn done(&self) -> bool {
        self.finals >= self.procs
    }

    /// Complete points, in time order.
    pub fn points(&self) -> impl Iterator<Item = Point> + '_ {
        (0..self.points.len()).filter_map(|k| self.point(k))
    }

    /// Point `k`, once every process reported it.
    pub fn point(&self, k: usize) -> Option<Point> {
        let (seen, s) = self.points.get(k)?;
        let before = k.checked_sub(1).and_then(|j| self.points.get(j)).map_or(0, |(_, p)| p.sent);
        (*seen == self.procs).then(|| Point {
            t: s.t,
            connected: s.connected,
            sent: s.sent,
            sent_per_sec: s.sent.saturating_sub(before) as f64 / SAMPLE_EVERY.as_secs_f64(),
            received_per_sec: s.latency.len() as f64 / SAMPLE_EVERY.as_secs_f64(),
            errors: s.errors.iter().sum(),
            latency: s.latency.clone(),
        })
    }

    /// Latest cumulative numbers over all processes: (connected, sent, errors by kind).
    pub fn latest(&self) -> (u64, u64, [u64; 5]) {
        let mut errors = [0; 5];
        let (mut connected, mut sent) = (0, 0);
        for s in self.latest.iter().flatten() {
            connected += s.connected;
            sent += s.sent;
            for (a, b) in errors.iter_mut().zip(s.errors) {
                *a += b;
            }
        }
        (connected, sent, errors)
    }
}
