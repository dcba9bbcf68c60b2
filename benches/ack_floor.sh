#!/usr/bin/env bash
# The acked-message path against the kernel's floor, in one session on this machine
# (benches/ack_floor.rs): a minimal epoll server on core 0 answering each client frame
# with one write, then shardgate (one shard) and the socketioxide peer (one tokio worker)
# on core 0 in turn, all driven by the same epoll client on core 1 at the same rate;
# rounds alternate and the medians and ratios are printed. Repeat it: the machine is
# shared and noisy.
#
#   benches/ack_floor.sh [rate] [rounds] [seconds]     (release builds are made first)
set -euo pipefail
cd "$(dirname "$0")/.."
rate="${1:-10000}"
rounds="${2:-3}"
secs="${3:-8}"
secret="integration-test-secret-0123456789" # tests/support's SECRET: the bench mints tokens with it
cargo build --release --quiet --locked --bins -p shardgate
cargo build --release --quiet --locked --manifest-path benches/peers/socketioxide/Cargo.toml
cargo bench --quiet --locked --bench ack_floor --no-run 2>/dev/null
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"' EXIT
printf '[runtime]\nevents_per_second = 10000000\nevent_burst = 10000000\n' >"$dir/shardgate.toml"
ready() { for _ in $(seq 100); do curl -s "http://127.0.0.1:$1/" >/dev/null 2>&1 && return; sleep 0.1; done; }

port=$((20000 + RANDOM % 20000))
taskset -c 0 ./target/release/shardgate serve --config "$dir/shardgate.toml" --listen "127.0.0.1:$port" \
  --shards 1 --no-pin --jwt-secret "$secret" >/dev/null 2>&1 &
pids+=($!)
sg="shardgate=127.0.0.1:$port/$!"
ready "$port"
port2=$((port + 1))
PORT=$port2 JWT_SECRET=$secret WORKERS=1 taskset -c 0 \
  benches/peers/socketioxide/target/release/shardgate-peer-socketioxide >/dev/null 2>&1 &
pids+=($!)
ox="socketioxide=127.0.0.1:$port2/$!"
ready "$port2"
cargo bench --quiet --locked --bench ack_floor -- --rate "$rate" --rounds "$rounds" --seconds "$secs" \
  --server-cpu 0 --client-cpu 1 --target "$sg" --target "$ox" 2>/dev/null
