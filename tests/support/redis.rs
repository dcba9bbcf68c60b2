//! A real `redis-server` on a free loopback port, started and stopped by the test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shardgate_io::resp::{self, Reply};

/// A running redis-server, or a Redis Cluster of them, killed on drop.
pub struct RedisServer {
    children: Vec<Option<Child>>,
    /// Every node's port (one for a single server; masters first for a cluster).
    pub ports: Vec<u16>,
    /// The port of the node the URL names.
    pub port: u16,
    /// Cluster nodes' configuration files live here (kept across a restart).
    dir: Option<PathBuf>,
}

/// A free loopback port below 55536: a cluster node's bus listens on port + 10000.
fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768 and up), so that no client connection of
    // a test running alongside takes the port (or its bus port) between the check and
    // redis-server's bind.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let x = (seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        let p = 12_000 + (x % 10_700) as u16;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()
        {
            return p;
        }
    }
}

impl RedisServer {
    /// Starts redis-server without persistence on a free port.
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut r = RedisServer { children: vec![None], ports: vec![port], port, dir: None };
        r.spawn_all();
        r
    }

    /// Starts a real Redis Cluster on loopback: `masters` masters, each with one
    /// replica, created with `redis-cli --cluster create`, a 2 s node timeout (a
    /// killed master's replica takes over within seconds).
    pub fn start_cluster(masters: usize) -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "shardgate-redis-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < masters * 2 {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let children = ports.iter().map(|_| None).collect();
        let mut r = RedisServer { children, ports: ports.clone(), port: ports[0], dir: Some(dir) };
        r.spawn_all();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = create.output().expect("redis-cli must be installed (scripts/test.sh installs it)");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        r.wait_cluster_ok();
        r
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.dir.is_some()
    }

    fn spawn_all(&mut self) {
        for i in 0..self.ports.len() {
            self.spawn(i);
        }
        for &p in &self.ports {
            let end = Instant::now() + Duration::from_secs(10);
            while at(p, &[&["PING"]]).is_none() {
                assert!(Instant::now() < end, "redis-server did not start on port {p}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn spawn(&mut self, i: usize) {
        let port = self.ports[i].to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        if let Some(dir) = &self.dir {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                "--repl-diskless-sync-delay",
                "0",
            ]);
            cmd.args(["--cluster-config-file", &format!("nodes-{port}.conf")]);
            cmd.arg("--dir").arg(dir);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.children[i] = Some(child);
    }

    /// Waits until every running node of the cluster says `cluster_state:ok` and
    /// agrees on the slot map.
    pub fn wait_cluster_ok(&self) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let live: Vec<u16> =
                self.ports.iter().zip(&self.children).filter(|(_, c)| c.is_some()).map(|(p, _)| *p).collect();
            let ok = live.iter().all(|&p| {
                matches!(at(p, &[&["CLUSTER", "INFO"]]), Some(Reply::BulkString(b)) if String::from_utf8_lossy(&b).contains("cluster_state:ok"))
            });
            let maps: Vec<Option<String>> = live.iter().map(|&p| self.masters_seen_by(p)).collect();
            // A replica that never synchronised cannot take over: wait for every link.
            let synced = live.iter().all(|&p| match at(p, &[&["INFO", "replication"]]) {
                Some(Reply::BulkString(b)) => {
                    let info = String::from_utf8_lossy(&b);
                    !info.contains("role:slave") || info.contains("master_link_status:up")
                }
                _ => false,
            });
            if ok && synced && maps.iter().all(|m| m.is_some() && *m == maps[0]) {
                return;
            }
            assert!(Instant::now() < end, "the redis cluster did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The masters' ports as node `port` sees them (sorted, as text).
    fn masters_seen_by(&self, port: u16) -> Option<String> {
        let Some(Reply::Array(ranges)) = at(port, &[&["CLUSTER", "SLOTS"]]) else { return None };
        let mut masters: Vec<i64> = ranges
            .iter()
            .filter_map(|r| match r {
                Reply::Array(r) => match r.get(2) {
                    Some(Reply::Array(n)) => match n.get(1) {
                        Some(Reply::Integer(p)) => Some(*p),
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            })
            .collect();
        masters.sort_unstable();
        masters.dedup();
        Some(format!("{masters:?}"))
    }

    /// `redis://127.0.0.1:PORT` (for a cluster: its first node).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills every node (all data is lost, as in a crash without persistence).
    pub fn stop(&mut self) {
        for c in &mut self.children {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts every node again on the same ports (a cluster keeps its configuration).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_all();
        if self.is_cluster() {
            self.wait_cluster_ok();
        }
    }

    /// Kills the master serving `key` with SIGKILL; returns its port.
    #[allow(dead_code)]
    pub fn kill_master_of(&mut self, key: &str) -> u16 {
        let port = self.owner(key);
        let i = self.ports.iter().position(|p| *p == port).expect("a node of this cluster");
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        port
    }

    /// The redis-server process id (benchmarks read its CPU time).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.children.first().and_then(Option::as_ref).map_or(0, Child::id)
    }

    /// Starts moving the slot of `key` to another master (`CLUSTER SETSLOT IMPORTING` /
    /// `MIGRATING`): until [`RedisServer::finish_migration`], commands on keys still on
    /// the old master are served there, others get `ASK` (or `TRYAGAIN` when a
    /// command's keys are split).
    #[allow(dead_code)]
    pub fn begin_migration(&self, key: &str) -> Migration {
        let from = self.owner(key);
        let slot = match at(from, &[&["CLUSTER", "KEYSLOT", key]]) {
            Some(Reply::Integer(n)) => n.to_string(),
            other => panic!("CLUSTER KEYSLOT: {other:?}"),
        };
        let to = self.masters().into_iter().find(|p| *p != from).expect("another master");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        assert_eq!(
            at(to, &[&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]]),
            Some(Reply::SimpleString(b"OK".to_vec()))
        );
        assert_eq!(
            at(from, &[&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]]),
            Some(Reply::SimpleString(b"OK".to_vec()))
        );
        Migration { slot, from, to, to_id }
    }

    /// Moves the slot's keys (`MIGRATE`) and gives the slot to its new master on every
    /// master (`CLUSTER SETSLOT NODE`); returns once every node agrees.
    #[allow(dead_code)]
    pub fn finish_migration(&self, m: Migration) {
        loop {
            let keys: Vec<String> = match at(m.from, &[&["CLUSTER", "GETKEYSINSLOT", &m.slot, "100"]]) {
                Some(Reply::Array(k)) => k
                    .iter()
                    .filter_map(resp::as_bytes)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect(),
                other => panic!("GETKEYSINSLOT: {other:?}"),
            };
            if keys.is_empty() {
                break;
            }
            let to = m.to.to_string();
            let mut cmd = vec!["MIGRATE", "127.0.0.1", to.as_str(), "", "0", "5000", "KEYS"];
            cmd.extend(keys.iter().map(String::as_str));
            let reply = at(m.from, &[&cmd]);
            assert_eq!(reply, Some(Reply::SimpleString(b"OK".to_vec())), "MIGRATE");
        }
        for p in [m.to, m.from].into_iter().chain(self.masters()) {
            at(p, &[&["CLUSTER", "SETSLOT", &m.slot, "NODE", &m.to_id]]);
        }
        let end = Instant::now() + Duration::from_secs(10);
        while !self.live_ports().iter().all(|&p| {
            matches!(at(p, &[&["CLUSTER", "SLOTS"]]), Some(Reply::Array(r)) if r.iter().any(|range| {
                let Reply::Array(range) = range else { return false };
                let slot: i64 = m.slot.parse().unwrap_or(-1);
                matches!((range.first(), range.get(1), range.get(2)), (Some(Reply::Integer(a)), Some(Reply::Integer(b)), Some(Reply::Array(n)))
                    if *a <= slot && slot <= *b && n.get(1) == Some(&Reply::Integer(m.to as i64)))
            }))
        }) {
            assert!(Instant::now() < end, "the slot move did not propagate");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The ports of the live masters.
    #[allow(dead_code)]
    pub fn masters(&self) -> Vec<u16> {
        self.live_ports()
            .into_iter()
            .filter(|&p| matches!(at(p, &[&["INFO", "replication"]]), Some(Reply::BulkString(b)) if String::from_utf8_lossy(&b).contains("role:master")))
            .collect()
    }

    fn node_id(&self, port: u16) -> String {
        match at(port, &[&["CLUSTER", "MYID"]]) {
            Some(Reply::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            other => panic!("CLUSTER MYID: {other:?}"),
        }
    }

    /// The port of the node serving `key` (following `MOVED`); the one server's port
    /// without a cluster.
    pub fn owner(&self, key: &str) -> u16 {
        if !self.is_cluster() {
            return self.port;
        }
        for &p in self.live_ports().iter() {
            match at(p, &[&["EXISTS", key]]) {
                Some(Reply::Error(e)) if e.starts_with("MOVED ") => {
                    let addr = e.rsplit(' ').next().unwrap_or_default();
                    return addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(p);
                }
                Some(Reply::Error(_)) | None => continue,
                Some(_) => return p,
            }
        }
        panic!("no node serves {key}");
    }

    fn live_ports(&self) -> Vec<u16> {
        self.ports.iter().zip(&self.children).filter(|(_, c)| c.is_some()).map(|(p, _)| *p).collect()
    }

    /// Runs one command on node `port`.
    #[allow(dead_code)]
    pub fn cmd_at(&self, port: u16, args: &[&str]) -> Option<Reply> {
        at(port, &[args])
    }

    /// Classic (unsharded) subscribers of `channel` that node `port` knows of.
    #[allow(dead_code)]
    pub fn classic_subscribers(&self, port: u16, channel: &str) -> i64 {
        match at(port, &[&["PUBSUB", "NUMSUB", channel]]) {
            Some(Reply::Array(r)) => match r.get(1) {
                Some(Reply::Integer(n)) => *n,
                _ => -1,
            },
            _ => -1,
        }
    }

    /// How many nodes subscribe to a server or room channel (sharded on a cluster).
    pub fn subscribers(&self, channel: &str) -> i64 {
        let reply = if self.is_cluster() {
            at(self.owner(channel), &[&["PUBSUB", "SHARDNUMSUB", channel]])
        } else {
            self.try_cmd(&["PUBSUB", "NUMSUB", channel])
        };
        match reply {
            Some(Reply::Array(r)) => match r.get(1) {
                Some(Reply::Integer(n)) => *n,
                _ => -1,
            },
            _ => -1,
        }
    }

    /// Runs one command.
    pub fn cmd(&self, args: &[&str]) -> Reply {
        self.try_cmd(args).expect("redis command")
    }

    /// Runs one command after AUTH and SELECT on a fresh connection.
    pub fn cmd_authed(&self, password: &str, db: u32, args: &[&str]) -> Reply {
        let db = db.to_string();
        let cmds: [&[&str]; 3] = [&["AUTH", password], &["SELECT", &db], args];
        self.session(&cmds).expect("redis command")
    }

    /// Runs `args` on the node serving its key (`args[1]`).
    fn try_cmd(&self, args: &[&str]) -> Option<Reply> {
        let port = match args.get(1) {
            Some(key) if self.is_cluster() => self.owner(key),
            _ => self.port,
        };
        at(port, &[args])
    }

    /// Runs commands on one connection; returns the last reply.
    fn session(&self, cmds: &[&[&str]]) -> Option<Reply> {
        at(self.port, cmds)
    }

    /// SMEMBERS as strings.
    pub fn members(&self, key: &str) -> Vec<String> {
        match self.cmd(&["SMEMBERS", key]) {
            Reply::Array(a) => {
                a.iter().filter_map(resp::as_bytes).map(|b| String::from_utf8_lossy(b).to_string()).collect()
            }
            _ => vec![],
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A slot being moved between two masters (`RedisServer::begin_migration`).
pub struct Migration {
    slot: String,
    from: u16,
    to: u16,
    to_id: String,
}

/// Runs commands on one fresh connection to `port`; returns the last reply.
fn at(port: u16, cmds: &[&[&str]]) -> Option<Reply> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut out = Vec::new();
    for args in cmds {
        resp::encode_command(args, &mut out);
    }
    s.write_all(&out).ok()?;
    let mut buf = Vec::new();
    let mut left = cmds.len();
    let mut chunk = [0u8; 4096];
    loop {
        while let Ok(Some((r, used))) = resp::decode_reply(&buf) {
            buf.drain(..used);
            left -= 1;
            if left == 0 {
                return Some(r);
            }
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
