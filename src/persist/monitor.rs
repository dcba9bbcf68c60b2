//! The persister's own `/metrics` and `/healthz`: counters the consumer thread bumps,
//! consumer lag from librdkafka's statistics, served by one small blocking HTTP thread
//! (`--metrics-listen`), apart from the consumer so a scrape never delays a batch.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardgate_io::http;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Upper bounds (ms) of the store-lag histogram's buckets.
pub const LAG_BUCKETS_MS: [u64; 16] =
    [1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 500, 1000, 2000, 5000, 10_000, 30_000];

/// Counters and gauges of one persister process.
#[derive(Default)]
pub struct Monitor {
    /// Records polled from Kafka.
    pub records: AtomicU64,
    /// `messages` documents inserted (new).
    pub inserted: AtomicU64,
    /// Message records already stored (replays).
    pub duplicates: AtomicU64,
    /// `conversations` documents written.
    pub conversations: AtomicU64,
    /// `users` documents written.
    pub users: AtomicU64,
    /// Conditional writes that lost to another writer (folded again).
    pub conflicts: AtomicU64,
    /// Records sent to the dead-letter topic.
    pub dead_letters: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Failed MongoDB attempts (each retried).
    pub write_errors: AtomicU64,
    /// Offset commits Kafka refused (the batch replays, harmlessly).
    pub commit_errors: AtomicU64,
    /// Microseconds spent writing batches (sum).
    pub write_micros: AtomicU64,
    /// 1 while partitions are paused because MongoDB is slow or down.
    pub paused: AtomicU64,
    /// Times partitions were paused.
    pub pauses: AtomicU64,
    /// `ts` (ms since the epoch) of the newest message stored.
    pub newest_ts: AtomicI64,
    /// Messages stored by how long after their send (`ts`) MongoDB acknowledged them:
    /// counts per [`LAG_BUCKETS_MS`] bucket (the last is +Inf).
    pub store_lag: [AtomicU64; LAG_BUCKETS_MS.len() + 1],
    /// Sum of those lags, in milliseconds.
    pub store_lag_sum_ms: AtomicU64,
    /// Records behind the partitions' ends, per `topic/partition`, from librdkafka's
    /// statistics.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
}

impl Monitor {
    /// Counts one message stored `ms` after it was sent.
    pub fn stored_after(&self, ms: u64) {
        let i = LAG_BUCKETS_MS.iter().position(|&b| ms <= b).unwrap_or(LAG_BUCKETS_MS.len());
        self.store_lag[i].fetch_add(1, Relaxed);
        self.store_lag_sum_ms.fetch_add(ms, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, now_ms: i64) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let c = |a: &AtomicU64| a.load(Relaxed);
        metric(
            "shardgate_persister_records_total",
            "counter",
            "Records polled from Kafka.",
            c(&self.records),
        );
        metric(
            "shardgate_persister_messages_inserted_total",
            "counter",
            "Message documents inserted.",
            c(&self.inserted),
        );
        metric(
            "shardgate_persister_messages_duplicate_total",
            "counter",
            "Message records already stored (replays).",
            c(&self.duplicates),
        );
        metric(
            "shardgate_persister_conversations_written_total",
            "counter",
            "Conversation documents written.",
            c(&self.conversations),
        );
        metric(
            "shardgate_persister_users_written_total",
            "counter",
            "User documents written.",
            c(&self.users),
        );
        metric(
            "shardgate_persister_write_conflicts_total",
            "counter",
            "Conditional writes that lost to another writer and were folded again.",
            c(&self.conflicts),
        );
        metric(
            "shardgate_persister_dead_letters_total",
            "counter",
            "Unreadable records sent to the dead-letter topic.",
            c(&self.dead_letters),
        );
        metric(
            "shardgate_persister_batches_total",
            "counter",
            "Batches written and committed.",
            c(&self.batches),
        );
        metric(
            "shardgate_persister_write_errors_total",
            "counter",
            "MongoDB write attempts that failed (each retried).",
            c(&self.write_errors),
        );
        metric(
            "shardgate_persister_commit_errors_total",
            "counter",
            "Offset commits Kafka refused (the batch replays).",
            c(&self.commit_errors),
        );
        metric(
            "shardgate_persister_write_microseconds_total",
            "counter",
            "Microseconds spent writing batches to MongoDB.",
            c(&self.write_micros),
        );
        metric(
            "shardgate_persister_paused",
            "gauge",
            "1 while partitions are paused because MongoDB is slow or down.",
            c(&self.paused),
        );
        metric(
            "shardgate_persister_pauses_total",
            "counter",
            "Times partitions were paused.",
            c(&self.pauses),
        );
        let newest = self.newest_ts.load(Relaxed);
        let behind = if newest > 0 { (now_ms - newest).max(0) as u64 } else { 0 };
        metric(
            "shardgate_persister_newest_age_milliseconds",
            "gauge",
            "Milliseconds from the newest stored message's send time to now (0 before the first).",
            behind,
        );
        let name = "shardgate_persister_store_lag_milliseconds";
        let _ = writeln!(
            out,
            "# HELP {name} From a message's send (its ts) to MongoDB acknowledging its document.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, n) in self.store_lag.iter().enumerate() {
            cumulative += n.load(Relaxed);
            let le = LAG_BUCKETS_MS.get(i).map_or("+Inf".to_string(), u64::to_string);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ =
            writeln!(out, "{name}_sum {}\n{name}_count {cumulative}", self.store_lag_sum_ms.load(Relaxed));
        let lag = self.lag.lock().map(|l| l.clone()).unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP shardgate_persister_lag_records Records between the committed position and the end of each assigned partition.\n# TYPE shardgate_persister_lag_records gauge"
        );
        for ((topic, partition), n) in &lag {
            let _ = writeln!(
                out,
                "shardgate_persister_lag_records{{topic=\"{topic}\",partition=\"{partition}\"}} {n}"
            );
        }
        let total: i64 = lag.values().sum();
        let _ = writeln!(
            out,
            "# HELP shardgate_persister_lag_records_sum Records behind, over all assigned partitions.\n# TYPE shardgate_persister_lag_records_sum gauge\nshardgate_persister_lag_records_sum {total}"
        );
        out
    }
}

/// Serves `/metrics` and `/healthz` on `addr` from a thread of its own; returns the
/// bound address.
pub fn serve(addr: SocketAddr, monitor: Arc<Monitor>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("persister-metrics".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = answer(conn, &monitor);
        }
    })?;
    Ok(bound)
}

fn answer(mut conn: TcpStream, monitor: &Monitor) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    let req = loop {
        let got = conn.read(&mut buf[n..])?;
        if got == 0 {
            return Ok(());
        }
        n += got;
        match http::parse_request(&buf[..n]) {
            Ok(Some((req, _))) => break req,
            Ok(None) if n < buf.len() => continue,
            _ => return conn.write_all(&http::response(400, "text/plain", "bad request\n")),
        }
    };
    let resp = match req.path.as_str() {
        "/metrics" => http::response(200, "text/plain; version=0.0.4", &monitor.render(now_ms())),
        "/healthz" => http::response(200, "text/plain", "ok\n"),
        _ => http::response(404, "text/plain", "not found\n"),
    };
    conn.write_all(&resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_and_lag_per_partition() {
        let m = Monitor::default();
        m.inserted.store(7, Relaxed);
        m.newest_ts.store(1_000, Relaxed);
        m.lag.lock().unwrap().insert(("messages.t".into(), 1), 5);
        m.lag.lock().unwrap().insert(("presence.changes".into(), 0), 2);
        let text = m.render(1_500);
        assert!(text.contains("shardgate_persister_messages_inserted_total 7\n"), "{text}");
        assert!(text.contains("shardgate_persister_newest_age_milliseconds 500\n"));
        assert!(text.contains("shardgate_persister_lag_records{topic=\"messages.t\",partition=\"1\"} 5\n"));
        assert!(text.contains("shardgate_persister_lag_records_sum 7\n"));
        m.stored_after(0);
        m.stored_after(120);
        m.stored_after(60_000);
        let text = m.render(1_500);
        assert!(text.contains("shardgate_persister_store_lag_milliseconds_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("shardgate_persister_store_lag_milliseconds_bucket{le=\"150\"} 2\n"));
        assert!(text.contains("shardgate_persister_store_lag_milliseconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("shardgate_persister_store_lag_milliseconds_count 3\n"));
        let families = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(families, text.lines().filter(|l| l.starts_with("# HELP")).count());
    }
}
