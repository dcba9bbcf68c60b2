//! Following a run (live progress, server sampling) and reporting it: the result as
//! JSON, the final table, and a self-contained HTML report with SVG charts.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::client::ErrorKind;
use crate::scenario::{Kind, Run};
use crate::stats::{Report, Timeline};
use crate::Common;

/// A server process's resident memory in bytes.
fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// A server process's CPU time in seconds: user space, and in the kernel on its behalf.
fn cpu_seconds(pid: u32) -> Option<Cpu> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Cpu { user: f.get(11)?.parse::<f64>().ok()? / hz, system: f.get(12)?.parse::<f64>().ok()? / hz })
}

/// CPU seconds, user space and kernel.
#[derive(Clone, Copy, Default)]
pub struct Cpu {
    pub user: f64,
    pub system: f64,
}

impl std::iter::Sum for Cpu {
    fn sum<I: Iterator<Item = Cpu>>(iter: I) -> Cpu {
        iter.fold(Cpu::default(), |a, b| Cpu { user: a.user + b.user, system: a.system + b.system })
    }
}

/// Summed over the server processes; `None` if any cannot be read.
fn servers<T: std::iter::Sum>(pids: &[u32], f: impl Fn(u32) -> Option<T>) -> Option<T> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| f(*p)).sum()
}

fn sockstat() -> String {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("TCP:")).map(str::to_string))
        .unwrap_or_default()
}

/// The server at one moment.
#[derive(Default, Clone)]
pub struct ServerSample {
    /// Seconds into the run.
    pub t: f64,
    pub rss: Option<u64>,
    pub cpu: Option<Cpu>,
    pub sockstat: String,
    /// Connections open then (over every worker process).
    pub connected: u64,
}

impl ServerSample {
    fn take(pids: &[u32], t: f64, connected: u64) -> ServerSample {
        ServerSample {
            t,
            rss: servers(pids, rss),
            cpu: servers(pids, cpu_seconds),
            sockstat: sockstat(),
            connected,
        }
    }
}

/// Everything a run produced.
pub struct Outcome {
    pub timeline: Timeline,
    pub before: ServerSample,
    /// Once every connection was up (or failed) for a second: the steady state begins.
    pub steady: Option<(usize, ServerSample)>,
    /// `idle` only: a second before the deadline, once the connections have been idle
    /// for most of the run (a server may shed per-connection state from idle ones).
    pub settled: Option<ServerSample>,
    /// At the deadline.
    pub end: ServerSample,
    /// Seconds until every connection was up or failed.
    pub connect_secs: Option<f64>,
    /// A worker process that failed.
    pub failure: Option<String>,
}

/// Follows the run to its end: merges reports, draws the progress, samples the server.
pub fn follow(
    common: &Common,
    kind: &Kind,
    procs: usize,
    start: Instant,
    rx: mpsc::Receiver<(usize, Report)>,
) -> Outcome {
    let pids = &common.server_pid;
    let bar = ProgressBar::new(common.connections as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:24}] {pos:>7}/{len:<7} conns  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    let mut out = Outcome {
        timeline: Timeline::new(procs),
        before: ServerSample::take(pids, 0.0, 0),
        steady: None,
        settled: None,
        end: ServerSample::default(),
        connect_secs: None,
        failure: None,
    };
    let mut end = None;
    while !out.timeline.done() {
        let got = rx.recv_timeout(Duration::from_millis(100));
        if end.is_none() && start.elapsed() >= common.duration {
            let (connected, _, _) = out.timeline.latest();
            end = Some(ServerSample::take(pids, start.elapsed().as_secs_f64(), connected));
        }
        let (proc, report) = match got {
            Ok(x) => x,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if let Report::Failed(e) = &report {
            bar.println(format!("worker {proc}: {e}"));
            out.failure.get_or_insert_with(|| e.clone());
        }
        let Some(k) = out.timeline.add(proc, report) else { continue };
        let Some(p) = out.timeline.point(k) else { continue };
        let mut msg = format!("errors {}", p.errors);
        if !matches!(kind, Kind::Idle | Kind::ConnectStorm) {
            msg = format!(
                "sent {:>7.0}/s  recv {:>8.0}/s  p99 {:>8} µs  {msg}",
                p.sent_per_sec,
                p.received_per_sec,
                p.latency.value_at_quantile(0.99)
            );
        }
        bar.set_position(p.connected);
        bar.set_message(msg);
        if out.connect_secs.is_none() && p.connected + p.errors >= common.connections as u64 {
            out.connect_secs = Some(p.t);
        }
        // The steady state begins a second after every connection is up or failed; a
        // connection still hanging at the end must not leave the run without a sample.
        let late = p.t + 1.0 >= common.duration.as_secs_f64();
        if out.steady.is_none() && (out.connect_secs.is_some_and(|c| p.t >= c + 1.0) || late) {
            out.steady = Some((k, ServerSample::take(pids, p.t, p.connected)));
        }
        if matches!(kind, Kind::Idle) && late && out.steady.is_some() && out.settled.is_none() {
            out.settled = Some(ServerSample::take(pids, p.t, p.connected));
        }
    }
    bar.finish_and_clear();
    let (connected, _, _) = out.timeline.latest();
    out.end = end.unwrap_or_else(|| ServerSample::take(pids, start.elapsed().as_secs_f64(), connected));
    out
}

fn percentiles(h: &Histogram<u64>) -> Value {
    let q = |p: f64| h.value_at_quantile(p);
    json!({ "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99_9": q(0.999), "max": h.max() })
}

/// The result of a run as JSON (what `--json` prints).
pub fn result(run: &Run, procs: usize, o: &Outcome) -> Value {
    let (common, kind) = (&run.common, &run.kind);
    let tl = &o.timeline;
    let (_, sent, errors) = tl.latest();
    let errors: serde_json::Map<String, Value> =
        ErrorKind::ALL.iter().zip(errors).map(|(k, n)| (k.as_str().to_string(), json!(n))).collect();
    let timeline: Vec<Value> = tl
        .points()
        .map(|p| {
            json!({
                "t": p.t,
                "connected": p.connected,
                "sent_per_sec": p.sent_per_sec,
                "received_per_sec": p.received_per_sec,
                "p50_us": p.latency.value_at_quantile(0.5),
                "p99_us": p.latency.value_at_quantile(0.99),
                "errors": p.errors,
            })
        })
        .collect();
    let mut r = json!({
        "scenario": kind.name(),
        "url": common.url,
        "processes": procs,
        "workers": procs * common.cores.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        "connections_target": common.connections,
        "connections_peak": tl.peak,
        "connect_seconds": o.connect_secs,
        "errors": errors,
        "duration_seconds": common.duration.as_secs_f64(),
        "sockstat_before": o.before.sockstat,
        "sockstat_after": o.steady.as_ref().map_or(&o.end.sockstat, |s| &s.1.sockstat),
        "server_rss_before_bytes": o.before.rss,
        "server_rss_after_bytes": o.steady.as_ref().and_then(|s| s.1.rss),
        "rss_bytes_per_connection": Value::Null,
        "rss_bytes_per_connection_at_connect": Value::Null,
        "timeline": timeline,
    });
    let per_conn = |s: &ServerSample| match (o.before.rss, s.rss) {
        (Some(b), Some(a)) => a.saturating_sub(b).checked_div(s.connected),
        _ => None,
    };
    if let Some((k, s)) = &o.steady {
        // Idle memory is read once the connections have been idle (`settled`); the
        // sample a second after the last connect is kept beside it.
        r["rss_bytes_per_connection_at_connect"] = json!(per_conn(s));
        let settled = o.settled.as_ref().filter(|x| x.connected == s.connected && x.rss.is_some());
        r["rss_bytes_per_connection"] = json!(per_conn(settled.unwrap_or(s)));
        if let Some(x) = settled {
            r["server_rss_after_bytes"] = json!(x.rss);
        }
        // The steady window: from the steady sample to the deadline.
        let received_before: u64 = tl.points().take(k + 1).map(|p| p.latency.len()).sum();
        let sent_before = tl.point(*k).map_or(0, |p| p.sent);
        let seconds = (o.end.t.min(common.duration.as_secs_f64()) - s.t).max(0.001);
        let received = tl.latency.len().saturating_sub(received_before);
        let cpu = match (s.cpu, o.end.cpu) {
            (Some(a), Some(b)) => Some(Cpu { user: b.user - a.user, system: b.system - a.system }),
            _ => None,
        };
        let per = |secs: f64| (received > 0).then(|| secs * 1e6 / received as f64);
        r["steady"] = json!({
            "from_seconds": s.t,
            "seconds": seconds,
            "sent": sent.saturating_sub(sent_before),
            "received": received,
            "received_per_sec": received as f64 / seconds,
            "server_cpu_seconds": cpu.map(|c| c.user + c.system),
            "server_user_cpu_seconds": cpu.map(|c| c.user),
            "server_cpu_us_per_received": cpu.and_then(|c| per(c.user + c.system)),
            "server_user_cpu_us_per_received": cpu.and_then(|c| per(c.user)),
        });
    }
    let h = &tl.latency;
    match kind {
        Kind::AckRtt { msg_rate, .. } | Kind::Direct { msg_rate, .. } => {
            r["messages"] = json!({
                "target_rate": msg_rate,
                "sent": sent,
                "acked": h.len(),
                "send_window_seconds": run.send_window(),
                "achieved_rate": sent as f64 / run.send_window(),
                "latency_us": percentiles(h),
            });
            if matches!(kind, Kind::Direct { .. }) {
                r["messages"]["delivered"] = json!(tl.delivery.len());
                r["messages"]["delivery_latency_us"] = percentiles(&tl.delivery);
            }
        }
        Kind::Fanout { publishers, msg_rate, .. } => {
            let members = common.connections / common.rooms.max(1);
            let send_secs = run.send_window();
            r["fanout"] = json!({
                "rooms": common.rooms,
                "room_size": members,
                "publishers_per_room": publishers,
                "target_rate": msg_rate,
                "sent": sent,
                "deliveries": h.len(),
                "expected_deliveries": sent * members.saturating_sub(1) as u64,
                "send_window_seconds": send_secs,
                "deliveries_per_sec": h.len() as f64 / send_secs,
                "latency_us": percentiles(h),
            });
        }
        Kind::ConnectStorm => {
            let waves: Vec<Value> = tl
                .waves
                .iter()
                .zip(["first", "mass_reconnect"])
                .map(|(w, name)| {
                    json!({
                        "wave": name, "connected": w.connected, "seconds": w.seconds,
                        "connects_per_sec": w.connected as f64 / w.seconds.max(0.001),
                        "connect_latency_us": percentiles(&w.latency),
                    })
                })
                .collect();
            r["waves"] = json!(waves);
        }
        Kind::Idle => {}
    }
    r
}

/// The final table.
pub fn table(r: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(x) => x.clone(),
        v => v.to_string(),
    };
    let _ = writeln!(out, "scenario            {}", s(&r["scenario"]));
    let _ = writeln!(
        out,
        "connections         {} of {} (peak), all up after {} s, {} process(es)",
        s(&r["connections_peak"]),
        s(&r["connections_target"]),
        s(&r["connect_seconds"]),
        s(&r["processes"])
    );
    let _ = writeln!(out, "errors              {}", r["errors"]);
    for key in ["messages", "fanout", "waves", "steady"] {
        if !r[key].is_null() {
            let _ = writeln!(out, "{key:<20}{}", r[key]);
        }
    }
    if !r["server_rss_after_bytes"].is_null() {
        let _ = writeln!(
            out,
            "server rss          {} -> {} bytes ({} bytes per connection; {} right after connecting)",
            s(&r["server_rss_before_bytes"]),
            s(&r["server_rss_after_bytes"]),
            s(&r["rss_bytes_per_connection"]),
            s(&r["rss_bytes_per_connection_at_connect"])
        );
    }
    let _ = writeln!(out, "sockstat            {} -> {}", s(&r["sockstat_before"]), s(&r["sockstat_after"]));
    out
}

/// One line of an SVG chart.
struct Series {
    name: &'static str,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Round tick values for an axis over `lo..=hi`: multiples of 1, 2, 2.5 or 5 times a power
/// of ten, about `n` of them, from the first at or below `lo` to the first at or above
/// `hi` (so an axis can end on a tick).
fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::EPSILON);
    let raw = span / n.max(1) as f64;
    let pow = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * pow).find(|s| *s >= raw).unwrap_or(10.0 * pow);
    let first = (lo / step).floor() * step;
    let mut ticks = Vec::new();
    let mut k = 0.0;
    loop {
        let t = first + k * step;
        // Rounded to the step's precision: 0.30000000000000004 reads as 0.3.
        let t = (t / step).round() * step;
        ticks.push(t);
        if t >= hi - step * 1e-9 {
            return ticks;
        }
        k += 1.0;
    }
}

/// A line chart; `x_ticks` label chosen x positions (else round values over the data).
fn chart(title: &str, y_label: &str, series: &[Series], x_ticks: Option<&[(f64, &str)]>) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 280.0, 70.0, 40.0, 30.0, 40.0);
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    // The y axis runs from 0 to the first round tick at or above the data.
    let y_ticks = nice_ticks(0.0, if y1 <= 0.0 { 1.0 } else { y1 }, 4);
    let y1 = y_ticks.last().copied().unwrap_or(1.0);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| top + (1.0 - y / y1) * (h - top - bottom);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><text x="{left}" y="18" font-size="13" font-weight="bold">{}</text><text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{}</text>"#,
        esc(title),
        h / 2.0,
        h / 2.0,
        esc(y_label)
    );
    for &y in &y_ticks {
        svg += &format!(
            r##"<line x1="{left}" x2="{}" y1="{py}" y2="{py}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            w - right,
            left - 4.0,
            py(y) + 4.0,
            fmt_num(y),
            py = py(y)
        );
    }
    let round: Vec<(f64, String)> = nice_ticks(x0, x1, 5)
        .into_iter()
        .filter(|x| *x >= x0 - 1e-9 && *x <= x1 + 1e-9)
        .map(|x| (x, fmt_num(x)))
        .collect();
    let ticks: Vec<(f64, String)> = match x_ticks {
        Some(t) => t.iter().map(|(x, l)| (*x, l.to_string())).collect(),
        None => round,
    };
    for (x, label) in ticks {
        svg += &format!(
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            px(x),
            h - bottom + 16.0,
            esc(&label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        svg += &format!(
            r#"<polyline fill="none" stroke="{}" stroke-width="1.8" points="{}"/><text x="{}" y="{}" fill="{}">{}</text>"#,
            s.color,
            pts.join(" "),
            w - right - 180.0 + 90.0 * (i % 2) as f64,
            18.0 + 12.0 * (i / 2) as f64,
            s.color,
            esc(s.name)
        );
    }
    svg + "</svg>"
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

/// `v` with at most two decimals and no trailing zeros (2.5, 40, 0.25).
fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A self-contained HTML report: latency percentile distribution, throughput, latency
/// and connections over time, and the full JSON result.
pub fn html(r: &Value, tl: &Timeline) -> String {
    let mut sent = Vec::new();
    let mut received = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut conns = Vec::new();
    for p in tl.points() {
        sent.push((p.t, p.sent_per_sec));
        received.push((p.t, p.received_per_sec));
        if !p.latency.is_empty() {
            p50.push((p.t, p.latency.value_at_quantile(0.5) as f64));
            p99.push((p.t, p.latency.value_at_quantile(0.99) as f64));
        }
        conns.push((p.t, p.connected as f64));
    }
    // Percentile distribution on a log scale of 1 / (1 - q): 0, 1 (90%), 2 (99%), ...
    let mut dist = Vec::new();
    if !tl.latency.is_empty() {
        let mut x = 0.0;
        while x <= 5.0 {
            let q = 1.0 - 10f64.powf(-x);
            dist.push((x, tl.latency.value_at_quantile(q) as f64));
            x += 0.05;
        }
    }
    let ticks = [(0.0, "0%"), (1.0, "90%"), (2.0, "99%"), (3.0, "99.9%"), (4.0, "99.99%"), (5.0, "99.999%")];
    let mut body = String::new();
    if !dist.is_empty() {
        body += &chart(
            "Latency by percentile",
            "µs",
            &[Series { name: "latency", color: "#c0392b", points: dist }],
            Some(&ticks),
        );
        // Sent and received each on their own scale: a fan-out run receives far more than
        // it sends, and one axis would flatten the sends to zero.
        body += &chart(
            "Sent over time (per second; x: seconds)",
            "messages sent/s",
            &[Series { name: "sent", color: "#2980b9", points: sent }],
            None,
        );
        body += &chart(
            "Received over time (per second; x: seconds)",
            "messages received/s",
            &[Series { name: "received", color: "#27ae60", points: received }],
            None,
        );
        body += &chart(
            "Latency over time (x: seconds)",
            "µs",
            &[
                Series { name: "p50", color: "#8e44ad", points: p50 },
                Series { name: "p99", color: "#c0392b", points: p99 },
            ],
            None,
        );
    }
    body += &chart(
        "Connections over time (x: seconds)",
        "connections",
        &[Series { name: "connected", color: "#16a085", points: conns }],
        None,
    );
    let mut summary = r.clone();
    if let Some(o) = summary.as_object_mut() {
        o.remove("timeline");
    }
    let pretty = serde_json::to_string_pretty(&summary).unwrap_or_default();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>shardgate-loadtest: {name}</title>\
         <style>body{{font-family:sans-serif;max-width:800px;margin:2em auto}}svg{{display:block;margin:1.5em 0}}\
         pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>\
         <h1>shardgate-loadtest: {name}</h1><p>{url}</p>{body}<h2>Result</h2><pre>{json}</pre></body></html>\n",
        name = esc(r["scenario"].as_str().unwrap_or_default()),
        url = esc(r["url"].as_str().unwrap_or_default()),
        json = esc(&pretty),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_values() {
        assert_eq!(nice_ticks(0.0, 7434.0, 4), vec![0.0, 2000.0, 4000.0, 6000.0, 8000.0]);
        assert_eq!(nice_ticks(0.0, 5240.0, 4), vec![0.0, 2000.0, 4000.0, 6000.0]);
        assert_eq!(nice_ticks(0.0, 6615.0, 4), vec![0.0, 2000.0, 4000.0, 6000.0, 8000.0]);
        assert_eq!(nice_ticks(0.0, 1.0, 4), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(nice_ticks(0.4, 37.2, 5), vec![0.0, 10.0, 20.0, 30.0, 40.0]);
        assert_eq!(nice_ticks(0.0, 20.0, 4), vec![0.0, 5.0, 10.0, 15.0, 20.0]);
        assert_eq!(fmt_num(2500.0), "2500");
        assert_eq!(fmt_num(25000.0), "25k");
        assert_eq!(fmt_num(0.25), "0.25");
    }

    #[test]
    fn sent_and_received_have_their_own_charts_and_axes() {
        let svg = chart(
            "t",
            "y",
            &[Series { name: "sent", color: "#000", points: vec![(0.0, 0.0), (10.0, 20.0)] }],
            None,
        );
        assert!(svg.contains(">20</text>") && svg.contains(">10</text>"), "{svg}");
        assert!(!svg.contains(">21</text>"), "no axis label off the round values");
    }
}
