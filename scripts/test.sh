#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with the Rust toolchain:
# installs what the tests need (redis-server, nginx, HAProxy, Chromium, Node.js and the C
# toolchain for librdkafka from Debian packages, a JDK and Maven if missing, the Apache
# Kafka broker's jars from Maven Central, FerretDB built from the Go module proxy, the
# pinned npm packages of the interop suite and of the socket.io peer), then runs the gate:
# formatting, clippy with warnings as errors, every test.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

apt_install() {
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  fi
}

missing=()
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
command -v redis-server >/dev/null || missing+=(redis-server)
# The load-balancer tests check and run the shipped deploy/nginx.conf and haproxy.cfg.
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing+=(nginx)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || missing+=(haproxy)
# The browser test drives Debian's Chromium headless (playwright-core from npm).
[ -x /usr/bin/chromium ] || missing+=(chromium)
# The operations tests: promtool (Debian's prometheus), PyYAML for the Kubernetes manifests,
# systemd-analyze for the unit.
command -v promtool >/dev/null || missing+=(prometheus)
python3 -c "import yaml" 2>/dev/null || missing+=(python3-yaml)
command -v systemd-analyze >/dev/null || missing+=(systemd)
# librdkafka is built from source by rdkafka-sys: a C toolchain, make, zlib headers.
command -v cc >/dev/null && command -v make >/dev/null || missing+=(build-essential)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v python3 >/dev/null || missing+=(python3)
dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
# The Kafka broker of the persistence tests runs on a JDK (17+), its jars come via Maven.
command -v java >/dev/null || missing+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || missing+=(maven)
# FerretDB (the MongoDB-protocol server of the tests) is built with Go (1.22 or newer:
# Debian 12's golang-go is older, so a Go in /usr/local/go is used when present).
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || missing+=(golang-go)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing from Debian packages: ${missing[*]}"
  apt_install "${missing[@]}"
fi
# The cluster tests start their own redis-server on free ports; a packaged instance
# started by the install is not needed.
# The same for the packaged nginx and HAProxy: the tests run their own.
if command -v systemctl >/dev/null; then
  systemctl stop redis-server nginx haproxy >/dev/null 2>&1 || true
fi

# The Apache Kafka broker of the persistence tests: jars from Maven Central, cached in
# ~/.cache/shardgate (about 15 s and 44 MB once); the tests start it in KRaft mode.
log "Apache Kafka for the persistence tests (scripts/kafka/install.sh)"
scripts/kafka/install.sh

# FerretDB v1 (SQLite backend): built from the Go module proxy and cached in
# ~/.cache/shardgate (about 2 to 5 minutes once); the tests start it on free ports.
log "FerretDB for the MongoDB tests (scripts/ferretdb/install.sh)"
scripts/ferretdb/install.sh

log "npm packages of the interop suite (tests/interop/package-lock.json)"
npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error

log "npm packages of the socket.io peer (benches/peers/node/package-lock.json)"
npm ci --prefix benches/peers/node --no-audit --no-fund --loglevel=error
node --check benches/peers/compare.mjs

log "layout: no module loops, no source file over 700 lines (scripts/check-layout.py)"
python3 scripts/check-layout.py

log "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path benches/peers/socketioxide/Cargo.toml -- --check

log "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "fuzz targets compile (cargo check; run them with cargo +nightly fuzz)"
cargo check --manifest-path fuzz/Cargo.toml --bins --locked

log "cargo build --bins (the integration tests drive shardgate, shardgate-loadtest and the socketioxide peer)"
cargo build --workspace --bins --locked
cargo clippy --manifest-path benches/peers/socketioxide/Cargo.toml --locked -- -D warnings
cargo build --manifest-path benches/peers/socketioxide/Cargo.toml --locked

log "cargo test"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo test --workspace --locked 2>&1 | tee "$out"
# One closing line for the whole suite (the last binary cargo runs is often a doc-test
# binary with nothing in it).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "\nsuite: %d passed, %d failed, %d skipped\n", p, f, s }' "$out"
