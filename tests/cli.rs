//! The binary's surface: public-key auth, `token`, `check-config`, and shutdown on SIGTERM.

mod support;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use shardgate_shard::auth::Claims;
use support::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_shardgate");

fn keys() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

fn claims(sub: &str) -> Claims {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    Claims { sub: sub.into(), tenant_id: "t1".into(), permissions: None, exp }
}

fn start_with_key(public: &str) -> Server {
    // `--jwt-public-key` replaces the harness's `--jwt-secret`.
    let path = keys().join(public);
    Server::start(&["--jwt-public-key", path.to_str().unwrap()])
}

#[test]
fn rs256_and_es256_public_keys_verify_and_refuse_algorithm_confusion() {
    for (public, private, alg) in [
        ("rsa-public.pem", "rsa-private.pem", Algorithm::RS256),
        ("ec-public.pem", "ec-private.pem", Algorithm::ES256),
    ] {
        let srv = start_with_key(public);
        let pem = std::fs::read(keys().join(private)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let good = encode(&Header::new(alg), &claims("pk-user"), &key).unwrap();
        let mut c = Client::connect(srv.addr, &good);
        assert_eq!(c.emit_ack("join_room", json!("r"))["ok"], true);

        // HS256 "signed" with the public key bytes: the classic confusion attack.
        let public_bytes = std::fs::read(keys().join(public)).unwrap();
        let forged =
            encode(&Header::new(Algorithm::HS256), &claims("x"), &EncodingKey::from_secret(&public_bytes))
                .unwrap();
        let mut bad = Client::upgrade(srv.addr, "", "");
        let err = bad.sio_connect(Some(json!({ "token": forged }))).unwrap_err();
        assert_eq!(err["message"], "token algorithm not accepted");
    }
}

#[test]
fn token_command_mints_tokens_the_dev_node_accepts() {
    let out = Command::new(BIN)
        .args(["token", "--sub", "alice", "--tenant", "demo", "--jwt-secret", support::SECRET])
        .output()
        .unwrap();
    assert!(out.status.success());
    let tok = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let srv = Server::start(&[]);
    let mut c = Client::connect(srv.addr, &tok);
    assert_eq!(c.emit_ack("join_room", json!("r"))["ok"], true);
}

#[test]
fn check_config_accepts_good_files_and_names_the_bad_field() {
    let dir = std::env::temp_dir();
    let good = dir.join(format!("sg-good-{}.toml", std::process::id()));
    std::fs::write(&good, "listen = \"127.0.0.1:4000\"\n[runtime]\nping_interval_ms = 1000\n").unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));

    let bad = dir.join(format!("sg-bad-{}.toml", std::process::id()));
    std::fs::write(&bad, "[runtime]\nping_interval_ms = 0\n").unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("runtime.ping_interval_ms"));

    std::fs::write(&bad, "listen = \"0.0.0.0:4000\"\n").unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&bad).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("required when listening beyond loopback"));
}

#[test]
fn sigterm_closes_clients_with_going_away_and_exits() {
    let mut srv = Server::start(&["--shards", "2"]);
    let mut clients: Vec<Client> =
        (0..4).map(|i| Client::connect(srv.addr, &support::token(&format!("u{i}"), "t"))).collect();
    let started = Instant::now();
    srv.signal(libc::SIGTERM);
    for c in clients.iter_mut() {
        assert_eq!(c.expect_closed(), (1001, "server_shutdown".to_string()));
    }
    let status = srv.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(10));
}
