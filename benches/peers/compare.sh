#!/usr/bin/env bash
# Builds shardgate, the load generator and both peers (release), installs the pinned
# socket.io of the Node peer, then runs the side-by-side comparison (compare.mjs).
# Arguments go to compare.mjs (--quick, --only P1,P3, --servers shardgate,socket.io).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v node >/dev/null || { echo "node is required (apt-get install nodejs npm)" >&2; exit 1; }
command -v taskset >/dev/null || { echo "taskset is required (util-linux)" >&2; exit 1; }
cargo build --release --locked --bins -p shardgate -p shardgate-loadtest
cargo build --release --locked --manifest-path benches/peers/socketioxide/Cargo.toml
(cd benches/peers/node && npm ci --no-audit --no-fund --silent)
exec node benches/peers/compare.mjs "$@"
