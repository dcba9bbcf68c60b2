//! A real MongoDB-protocol server for the tests: FerretDB v1 with its SQLite backend
//! (`scripts/ferretdb/install.sh` builds and caches it; the test script runs that first),
//! on a free loopback port, its data in a temp directory that survives a kill -9.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::kafka::free_port;
use super::temp_dir;

/// A running FerretDB, killed on drop.
pub struct FerretDb {
    child: Option<Child>,
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
}

fn binary() -> PathBuf {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ferretdb/install.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/ferretdb/install.sh");
    assert!(out.status.success(), "FerretDB install failed (scripts/ferretdb/install.sh)");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

impl FerretDb {
    /// Starts a fresh instance.
    pub fn start() -> FerretDb {
        let mut db = FerretDb { child: None, bin: binary(), dir: temp_dir("ferretdb"), port: free_port() };
        db.spawn();
        db
    }

    fn spawn(&mut self) {
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let child = Command::new(&self.bin)
            .arg("--handler=sqlite")
            .arg(format!("--sqlite-url=file:{}/", data.display()))
            .arg(format!("--listen-addr=127.0.0.1:{}", self.port))
            .arg("--debug-addr=-")
            .arg(format!("--state-dir={}", self.dir.display()))
            .arg("--telemetry=disable")
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start FerretDB");
        self.child = Some(child);
        super::wait_listening(self.port, "FerretDB", Duration::from_secs(10));
    }

    /// `mongodb://127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("mongodb://127.0.0.1:{}/{db}", self.port)
    }

    /// SIGKILL, then a new process on the same port and data.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGKILL: the server is gone until [`FerretDb::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new process on the same port and data.
    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for FerretDb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
