//! `shardgate persist` as a child process (killed on drop), its `/metrics`, and reads
//! of what it wrote through the official MongoDB driver.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mongodb::bson::Document;

/// A running persister.
pub struct Persister {
    child: Child,
    /// Where its `/metrics` is served.
    pub metrics: SocketAddr,
}

impl Persister {
    /// Starts `shardgate persist` with short batch, refresh and session timings.
    pub fn start(brokers: &str, mongodb: &str) -> Persister {
        Persister::start_with(brokers, mongodb, &[])
    }

    /// Same, with extra arguments.
    pub fn start_with(brokers: &str, mongodb: &str, extra: &[&str]) -> Persister {
        let mut args =
            vec!["persist", "--kafka", brokers, "--mongodb", mongodb, "--metrics-listen", "127.0.0.1:0"];
        for (flag, value) in [
            ("--batch-ms", "100"),
            ("--topic-refresh-ms", "500"),
            ("--session-timeout-ms", "6000"),
            ("--partitions", "2"),
        ] {
            if !extra.contains(&flag) {
                args.extend_from_slice(&[flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("shardgate persist");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let metrics = line
            .trim()
            .rsplit_once("http://")
            .and_then(|(_, a)| a.strip_suffix("/metrics"))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("persister did not start: {line:?}"));
        Persister { child, metrics }
    }

    /// The value of an unlabelled metric (0 when absent).
    pub fn metric(&self, name: &str) -> i64 {
        let (_, body) = super::request_at(self.metrics, "GET", "/metrics", "");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    /// Waits until metric `name` reads `want` (at most 30 s); `what` names it in the failure.
    pub fn wait_metric(&self, name: &str, want: i64, what: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        while self.metric(name) != want {
            assert!(Instant::now() < end, "timed out waiting for {what} ({name} = {want})");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Partitions it reports lag for (its assignment).
    pub fn lag_partitions(&self) -> Vec<String> {
        let (_, body) = super::request_at(self.metrics, "GET", "/metrics", "");
        body.lines()
            .filter_map(|l| l.strip_prefix("shardgate_persister_lag_records{"))
            .filter_map(|l| l.split_once('}').map(|(labels, _)| labels.to_string()))
            .collect()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking view of one database through the official driver.
pub struct Mongo {
    rt: tokio::runtime::Runtime,
    db: mongodb::Database,
}

impl Mongo {
    /// Connects to `url` (`mongodb://host:port/DB`).
    pub fn connect(url: &str) -> Mongo {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let db = rt.block_on(async {
            mongodb::Client::with_uri_str(url).await.unwrap().default_database().unwrap()
        });
        Mongo { rt, db }
    }

    /// Documents of `coll` matching `filter`, sorted by `_id`.
    pub fn find(&self, coll: &str, filter: Document) -> Vec<Document> {
        self.rt.block_on(async {
            let c = self.db.collection::<Document>(coll);
            let mut cur = c.find(filter).sort(mongodb::bson::doc! { "_id": 1 }).await.unwrap();
            let mut out = Vec::new();
            while cur.advance().await.unwrap() {
                out.push(cur.deserialize_current().unwrap());
            }
            out
        })
    }

    /// Whether `coll` holds a document with `_id` `id` (a lookup by `_id`, which every
    /// server answers from its primary key).
    pub fn has(&self, coll: &str, id: &str) -> bool {
        self.rt.block_on(async {
            let c = self.db.collection::<Document>(coll);
            c.find_one(mongodb::bson::doc! { "_id": id }).await.ok().flatten().is_some()
        })
    }

    /// Number of documents of `coll` matching `filter`; None while the server is away.
    pub fn count(&self, coll: &str, filter: Document) -> Option<u64> {
        self.rt.block_on(async { self.db.collection::<Document>(coll).count_documents(filter).await.ok() })
    }

    /// Waits until `coll` has at least `want` documents matching `filter` (at most `max`);
    /// returns the count seen last.
    pub fn wait_count(&self, coll: &str, filter: Document, want: u64, max: Duration) -> u64 {
        let end = Instant::now() + max;
        loop {
            let n = self.count(coll, filter.clone()).unwrap_or(0);
            if n >= want || Instant::now() > end {
                return n;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Inserts `docs` into collection `coll` with unordered `insert_many` in batches of
    /// `batch`; documents per second.
    pub fn insert_loop(&self, coll: &str, docs: &[Document], batch: usize) -> f64 {
        let c = self.db.collection::<Document>(coll);
        let start = Instant::now();
        self.rt.block_on(async {
            for chunk in docs.chunks(batch) {
                c.insert_many(chunk).ordered(false).await.unwrap();
            }
        });
        docs.len() as f64 / start.elapsed().as_secs_f64()
    }

    /// Waits until `check` holds for the documents of `coll` matching `filter`.
    pub fn wait_docs(
        &self,
        coll: &str,
        filter: Document,
        max: Duration,
        check: impl Fn(&[Document]) -> bool,
    ) -> Vec<Document> {
        let end = Instant::now() + max;
        loop {
            let docs = self.find(coll, filter.clone());
            if check(&docs) || Instant::now() > end {
                return docs;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
