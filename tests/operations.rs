//! What an operator runs: the operator endpoints on their own address, `/metrics` as
//! Prometheus reads it (`promtool check metrics`), the Grafana dashboard's queries against
//! what the node exports, the systemd unit (`systemd-analyze verify`), the Kubernetes
//! manifests (parsed, cross-checked, their config checked by `shardgate check-config`),
//! and JSON logs. The test script installs promtool (Debian's `prometheus`) and PyYAML.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{request_at, temp_dir, token, Client, Server};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Names of the metric families in a Prometheus text page.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn operator_endpoints_live_on_the_admin_address_only() {
    let mut srv =
        Server::start(&["--admin-listen", "127.0.0.1:0", "--admin-token", "operator-token-0123456789"]);
    let admin = srv.admin_addr();
    assert_ne!(admin, srv.addr);
    // The public port keeps health and readiness (load balancers) but hides the rest.
    assert_eq!(srv.get("/healthz").0, 200);
    assert_eq!(srv.get("/readyz").0, 200);
    let (status, body) = srv.get("/metrics");
    assert_eq!(status, 404);
    assert!(body.contains("admin address"), "{body}");
    let auth = "Authorization: Bearer operator-token-0123456789\r\n";
    assert_eq!(srv.request("POST", "/admin/drain", auth).0, 404);
    // The admin address serves them, and nothing of Socket.IO.
    let (status, metrics) = request_at(admin, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(metrics.contains("shardgate_connections_open"));
    assert_eq!(request_at(admin, "GET", "/socket.io/?EIO=4&transport=polling", "").0, 404);
    assert_eq!(request_at(admin, "GET", "/readyz", "").0, 200);
    let _client = Client::connect(srv.addr, &token("u", "t"));
    assert_eq!(srv.metric("shardgate_sessions_open"), 1, "Server::metric reads the admin address");
    assert_eq!(
        request_at(admin, "POST", "/admin/drain", "Authorization: Bearer wrong-token-0123456789\r\n").0,
        401
    );
    assert_eq!(request_at(admin, "POST", "/admin/drain", auth).0, 202);
    assert!(srv.wait_exit(Duration::from_secs(20)).is_some(), "drained and exited");
}

#[test]
fn metrics_pass_promtool_and_the_dashboard_queries_exported_metrics() {
    let srv = Server::start(&["--shards", "2"]);
    // Some traffic, so that labelled families have samples.
    let mut c = Client::connect(srv.addr, &token("m", "t"));
    c.emit_ack("join_room", serde_json::json!("r"));
    let (_, page) = srv.get("/metrics");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), page.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool: {report}");

    let exported = families(&page);
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("deploy/grafana/shardgate.json")).unwrap())
            .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut named = BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            let mut found = false;
            while let Some(i) = rest.find("shardgate_") {
                let name: String =
                    rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                assert!(
                    exported.contains(&name),
                    "panel {} queries {name}, which the node does not export",
                    p["title"]
                );
                named.insert(name.clone());
                rest = &rest[i + name.len()..];
                found = true;
            }
            assert!(found, "query without a shardgate metric: {expr}");
        }
    }
    for wanted in [
        "shardgate_connections_open",
        "shardgate_connections_closed_total",
        "shardgate_redis_up",
        "shardgate_kafka_delivered_total",
    ] {
        assert!(named.contains(wanted), "the dashboard shows {wanted}");
    }
    // The metrics catalogue documents every family the node exports.
    let catalogue = std::fs::read_to_string(repo("docs/metrics.md")).unwrap();
    for name in &exported {
        assert!(catalogue.contains(&format!("`{name}`")), "docs/metrics.md lacks {name}");
    }
}

#[test]
fn systemd_unit_verifies() {
    // The unit as shipped, with ExecStart pointing at the binary under test.
    let unit = std::fs::read_to_string(repo("deploy/shardgate.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/shardgate serve"));
    let unit = unit.replace("/usr/local/bin/shardgate", env!("CARGO_BIN_EXE_shardgate"));
    let dir = temp_dir("systemd");
    let path = dir.join("shardgate.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("shardgate.service")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {err}");
}

/// Every document of every manifest in deploy/k8s, as JSON (PyYAML parses them).
fn manifests() -> Vec<Value> {
    let dir = repo("deploy/k8s");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    let script = "import json, sys, yaml\nprint(json.dumps([d for f in sorted(sys.argv[1:]) for d in yaml.safe_load_all(open(f)) if d]))";
    let out = Command::new("python3").arg("-c").arg(script).args(&files).output().expect("python3");
    assert!(out.status.success(), "YAML: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let docs = manifests();
    let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k);
    let one = |k: &'static str| kind(k).next().unwrap_or_else(|| panic!("no {k} in deploy/k8s"));
    let deploy = one("Deployment");
    let labels = &deploy["spec"]["selector"]["matchLabels"];
    assert_eq!(&deploy["spec"]["template"]["metadata"]["labels"], labels);
    let pod = &deploy["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let ports: BTreeSet<(String, u64)> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_u64().unwrap()))
        .collect();
    assert!(
        ports.contains(&("socketio".into(), 3000)) && ports.contains(&("admin".into(), 9090)),
        "{ports:?}"
    );

    // The config the pods run: valid for the binary, and its ports and drain match the pod.
    let cm = one("ConfigMap");
    let toml = cm["data"]["shardgate.toml"].as_str().unwrap();
    assert!(toml.contains("listen = \"0.0.0.0:3000\"") && toml.contains("listen = \"0.0.0.0:9090\""));
    let key = repo("tests/keys/ec-public.pem");
    let file = temp_dir("k8s").join("shardgate.toml");
    std::fs::write(&file, toml.replace("/etc/shardgate/jwt/public.pem", key.to_str().unwrap())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardgate")).arg("check-config").arg(&file).output().unwrap();
    assert!(out.status.success(), "check-config: {}", String::from_utf8_lossy(&out.stderr));
    let drain_ms: u64 = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("drain_ms = "))
        .and_then(|v| v.parse().ok())
        .expect("drain_ms in the ConfigMap");
    let pre_stop: u64 = c["lifecycle"]["preStop"]["exec"]["command"][1].as_str().unwrap().parse().unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > pre_stop + drain_ms / 1000 + 3,
        "grace {grace}s must outlast preStop {pre_stop}s + drain + 3 s"
    );

    // Services: one sticky for clients, one headless; both select the pods.
    let services: Vec<&Value> = kind("Service").collect();
    assert!(services.iter().any(|s| s["spec"]["sessionAffinity"] == "ClientIP"));
    assert!(services.iter().any(|s| s["spec"]["clusterIP"] == "None"));
    for s in &services {
        assert_eq!(&s["spec"]["selector"], labels);
    }
    let pdb = one("PodDisruptionBudget");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let hpa = one("HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], deploy["metadata"]["name"]);
    let metrics: Vec<String> = hpa["spec"]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["resource"]["name"].as_str().or(m["pods"]["metric"]["name"].as_str()).unwrap().to_string())
        .collect();
    assert!(
        metrics.contains(&"cpu".to_string()) && metrics.contains(&"shardgate_connections_open".to_string())
    );
    // The kustomization lists every manifest.
    let kust = one("Kustomization");
    let listed: BTreeSet<&str> =
        kust["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    for e in std::fs::read_dir(repo("deploy/k8s")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name != "kustomization.yaml" {
            assert!(listed.contains(name.as_str()), "kustomization.yaml lacks {name}");
        }
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let srv = Server::start(&["--log-format", "json"]);
    let _c = Client::connect(srv.addr, &token("j", "t"));
    srv.wait_for("a log line", |s| !s.log().is_empty());
    for line in srv.log().lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
    }
}

#[test]
fn admin_listen_must_differ_from_the_public_address() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["serve", "--listen", "127.0.0.1:39391", "--admin-listen", "127.0.0.1:39391", "--jwt-secret"])
        .arg(support::SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin.listen"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
