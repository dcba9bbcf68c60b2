//! The shipped load-balancer configs: valid for the real programs (`nginx -t`,
//! `haproxy -c`), and working: nginx and HAProxy from Debian's packages, each with the
//! shipped config pointed at three cluster nodes on loopback, carry the official client's
//! WebSocket sessions, and chat crosses nodes behind them.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::kafka::free_port;
use support::redis::RedisServer;
use support::{temp_dir, wait_listening, Server};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(file)
}

/// A program from Debian's packages: `/usr/sbin` is not on every user's PATH.
fn program(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from(name)
    }
}

/// The shipped config with its three example backends replaced by `nodes` and its
/// listener by `listen`.
fn render(file: &str, listen_from: &str, listen_to: &str, nodes: &[SocketAddr]) -> String {
    let mut text = std::fs::read_to_string(deploy(file)).unwrap();
    assert!(text.contains(listen_from), "{file} no longer has `{listen_from}`");
    text = text.replace(listen_from, listen_to);
    for (i, n) in nodes.iter().enumerate() {
        let example = format!("10.0.0.{}:3000", i + 1);
        assert!(text.contains(&example), "{file} no longer has backend {example}");
        text = text.replace(&example, &n.to_string());
    }
    text
}

/// A proxy process, killed when dropped.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx_args(conf: &Path, prefix: &Path) -> Vec<String> {
    let globals = format!("pid {}; error_log stderr;", prefix.join("nginx.pid").display());
    vec![
        "-c".into(),
        conf.display().to_string(),
        "-p".into(),
        prefix.display().to_string(),
        "-g".into(),
        globals,
    ]
}

#[test]
fn shipped_configs_pass_nginx_and_haproxy_checks() {
    let prefix = temp_dir("nginx-t");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let out =
        Command::new(program("nginx")).arg("-t").args(nginx_args(&deploy("nginx.conf"), &prefix)).output();
    let out = out.expect("nginx must be installed (scripts/test.sh installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("test is successful"), "{err}");

    let out = Command::new(program("haproxy")).args(["-c", "-f"]).arg(deploy("haproxy.cfg")).output();
    let out = out.expect("haproxy must be installed (scripts/test.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("Configuration file is valid"), "{text}");
}

#[test]
fn official_client_through_nginx_and_haproxy_across_three_nodes() {
    through_nginx_and_haproxy(RedisServer::start());
}

/// The same with the nodes on a real Redis Cluster (3 masters, 3 replicas).
#[test]
fn official_client_through_nginx_and_haproxy_across_three_nodes_on_a_redis_cluster() {
    through_nginx_and_haproxy(RedisServer::start_cluster(3));
}

fn through_nginx_and_haproxy(redis: RedisServer) {
    let url = redis.url();
    let nodes: Vec<Server> = (0..3)
        .map(|_| {
            let s = Server::start(&["--shards", "2", "--redis", url.as_str(), "--liveness-ttl-ms", "600"]);
            s.wait_for("ready", |s| s.get("/readyz").0 == 200);
            s
        })
        .collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();

    let ngx_port = free_port();
    let prefix = temp_dir("nginx");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        render("nginx.conf", "listen 80;", &format!("listen 127.0.0.1:{ngx_port};"), &addrs),
    )
    .unwrap();
    let child = Command::new(program("nginx"))
        .args(nginx_args(&conf, &prefix))
        .args(["-g", "daemon off; master_process off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let _nginx = Proxy(child.expect("nginx"));
    wait_listening(ngx_port, "nginx", Duration::from_secs(10));

    let hap_port = free_port();
    let cfg = temp_dir("haproxy").join("haproxy.cfg");
    // The shipped maxconn needs a larger open-file limit than this machine grants.
    let text = render("haproxy.cfg", "bind :80", &format!("bind 127.0.0.1:{hap_port}"), &addrs);
    std::fs::write(&cfg, text.replace("maxconn 200000", "maxconn 4000")).unwrap();
    let child = Command::new(program("haproxy"))
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let _haproxy = Proxy(child.expect("haproxy"));
    wait_listening(hap_port, "haproxy", Duration::from_secs(10));

    let node_urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let env = [
        ("SHARDGATE_NGINX_URL", format!("http://127.0.0.1:{ngx_port}")),
        ("SHARDGATE_HAPROXY_URL", format!("http://127.0.0.1:{hap_port}")),
        ("SHARDGATE_NODE_URLS", node_urls.join(",")),
    ];
    let out = support::interop_suite("lb.test.mjs", &env, String::new);
    assert!(out.contains("# pass 2"), "{out}");
}
