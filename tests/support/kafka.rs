//! A real Apache Kafka broker (KRaft, one node acting as broker and controller) on free
//! loopback ports, started from the jars `scripts/kafka/install.sh` caches, and a consumer
//! that reads what shardgate produced.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// A running Kafka broker with its own data directory, killed (and the directory
/// removed) on drop.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    home: PathBuf,
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The cached Kafka installation (`lib/*.jar`, `log4j2.properties`), installed on first use.
fn kafka_home() -> PathBuf {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka/install.sh");
    let out = Command::new("bash").arg(script).output().expect("bash");
    assert!(out.status.success(), "installing Kafka failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `java` with the broker's class path and logging.
fn java(home: &std::path::Path) -> Command {
    let mut c = Command::new("java");
    // C1 only: the broker starts in a few seconds instead of warming up the C2 compiler.
    c.args(["-XX:TieredStopAtLevel=1", "-Xmx512m", "-XX:+UseSerialGC"])
        .arg(format!("-Dlog4j2.configurationFile={}", home.join("log4j2.properties").display()))
        .arg("-cp")
        .arg(format!("{}/*", home.join("lib").display()));
    c
}

impl Broker {
    /// Formats a fresh data directory and starts a broker on `port`; waits until it
    /// accepts connections.
    pub fn start_on(port: u16) -> Broker {
        let home = kafka_home();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("shardgate-kafka-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let controller = free_port();
        let props = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={}\n\
             num.partitions=1\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=1\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=1\n\
             group.initial.rebalance.delay.ms=0\n\
             broker.heartbeat.interval.ms=500\n\
             broker.session.timeout.ms=2000\n",
            dir.join("data").display()
        );
        let config = dir.join("server.properties");
        std::fs::write(&config, props).unwrap();
        let format = java(&home)
            .args(["kafka.tools.StorageTool", "format", "--standalone", "-t", "c2hhcmRnYXRlLXRlc3Rz", "-c"])
            .arg(&config)
            .output()
            .expect("java must be installed (a JDK 17)");
        assert!(format.status.success(), "kafka storage format: {}", String::from_utf8_lossy(&format.stderr));
        let mut broker = Broker { child: None, port, dir, home };
        broker.spawn();
        broker
    }

    /// Starts the broker process on the formatted data directory and waits for its port.
    fn spawn(&mut self) {
        let child = java(&self.home)
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the kafka broker");
        self.child = Some(child);
        super::wait_listening(self.port, "kafka", Duration::from_secs(60));
    }

    /// Kills the broker with SIGKILL (its data stays, as after a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data after [`Broker::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the process (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes it (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.signal(libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: serde_json::Value,
}

/// Reads every record of `topics` (partitions `0..partitions`) from the beginning until
/// `done` says enough, or `timeout` passes.
pub fn consume(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
    timeout: Duration,
    mut done: impl FnMut(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..partitions {
            tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let end = Instant::now() + timeout;
    while Instant::now() < end && !done(&out) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let value =
                m.payload().and_then(|p| serde_json::from_slice(p).ok()).unwrap_or(serde_json::Value::Null);
            let key = m.key().map(|k| String::from_utf8_lossy(k).to_string()).unwrap_or_default();
            out.push(Consumed {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key,
                value,
            });
        }
    }
    out
}
