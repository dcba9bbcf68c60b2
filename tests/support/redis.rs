//! A real `redis-server` on a free loopback port, started and stopped by the test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shardgate_io::resp::{self, Reply};

/// A running redis-server, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    /// Starts redis-server without persistence on a free port.
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut r = RedisServer { child: None, port };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if self.try_cmd(&["PING"]).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (all data is lost, as in a crash without persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The redis-server process id (benchmarks read its CPU time).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
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

    fn try_cmd(&self, args: &[&str]) -> Option<Reply> {
        self.session(&[args])
    }

    /// Runs commands on one connection; returns the last reply.
    fn session(&self, cmds: &[&[&str]]) -> Option<Reply> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
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
    }
}
