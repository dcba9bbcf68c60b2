//! A real MongoDB-protocol server for the tests: FerretDB v1 with its SQLite backend
//! (`scripts/ferretdb/install.sh` builds and caches it; the test script runs that first),
//! on a free loopback port, its data in a temp directory that survives a kill -9.
//!
//! `SHARDGATE_FERRETDB_BACKEND=pg` puts it on its PostgreSQL backend instead (Debian's
//! `postgresql` 15, a throwaway cluster on another free port, run as the `postgres`
//! user): used to compare the two backends with `cargo bench --bench persist`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::kafka::free_port;
use super::temp_dir;

/// A running FerretDB, killed on drop.
pub struct FerretDb {
    child: Option<Child>,
    /// The PostgreSQL cluster behind it (`pg` backend): data directory and port.
    pg: Option<(PathBuf, u16)>,
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
        let mut db =
            FerretDb { child: None, pg: None, bin: binary(), dir: temp_dir("ferretdb"), port: free_port() };
        if std::env::var("SHARDGATE_FERRETDB_BACKEND").as_deref() == Ok("pg") {
            db.pg = Some(postgres(&db.dir));
        }
        db.spawn();
        db
    }

    fn spawn(&mut self) {
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut cmd = Command::new(&self.bin);
        match &self.pg {
            Some((_, port)) => cmd
                .arg("--handler=pg")
                .arg(format!("--postgresql-url=postgres://postgres@127.0.0.1:{port}/ferretdb")),
            None => cmd.arg("--handler=sqlite").arg(format!("--sqlite-url=file:{}/", data.display())),
        };
        let child = cmd
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

/// A throwaway PostgreSQL cluster under `dir` on a free port, with database `ferretdb`.
fn postgres(dir: &std::path::Path) -> (PathBuf, u16) {
    let bin = std::path::Path::new("/usr/lib/postgresql/15/bin");
    let data = dir.join("pg");
    std::fs::create_dir_all(&data).unwrap();
    let ok = Command::new("chown").args(["-R", "postgres:postgres", &dir.display().to_string()]).status();
    assert!(ok.is_ok_and(|s| s.success()), "chown for PostgreSQL");
    let as_postgres = |args: &[&str]| {
        let st =
            Command::new("runuser").args(["-u", "postgres", "--"]).args(args).stdout(Stdio::null()).status();
        assert!(st.is_ok_and(|s| s.success()), "PostgreSQL: {args:?} (apt-get install postgresql)");
    };
    let port = free_port();
    let (initdb, pg_ctl) = (bin.join("initdb"), bin.join("pg_ctl"));
    as_postgres(&[
        &initdb.display().to_string(),
        "-D",
        &data.display().to_string(),
        "--auth=trust",
        "-U",
        "postgres",
    ]);
    let opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", data.display());
    as_postgres(&[
        &pg_ctl.display().to_string(),
        "-D",
        &data.display().to_string(),
        "-o",
        &opts,
        "-w",
        "-l",
        "/dev/null",
        "start",
    ]);
    as_postgres(&[
        "/usr/bin/createdb",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "ferretdb",
    ]);
    (data, port)
}

impl Drop for FerretDb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some((data, _)) = self.pg.take() {
            let pg_ctl = "/usr/lib/postgresql/15/bin/pg_ctl";
            let _ = Command::new("runuser")
                .args([
                    "-u",
                    "postgres",
                    "--",
                    pg_ctl,
                    "-D",
                    &data.display().to_string(),
                    "-m",
                    "immediate",
                    "stop",
                ])
                .stdout(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
