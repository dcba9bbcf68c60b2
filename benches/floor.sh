#!/usr/bin/env bash
# Room fan-out against the kernel's floor, measured in one session on this machine:
#   1. benches/send_floor.rs: one send(2) of a server frame to each of 1000 loopback
#      sockets, 50 rounds/s, a reader draining them on the other core: sender CPU per send;
#   2. shardgate (one shard on core 0) with a room of 1000 at 50 messages/s, the load
#      generator on core 1: server CPU per delivery (`server_cpu_us_per_received`);
# then prints the ratio (shardgate / floor); and 3. the same room of 1000 drained by the
# floor's own epoll reader (send_floor --target), the ratio with the same reader on both
# sides (the load generator waits on io_uring, and each wake-up of its sockets is charged
# to the sender). Repeat it: the machine is shared and noisy.
#
#   benches/floor.sh [seconds]        (release builds are made first)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
secret="floor-bench-secret-0123456789"
cargo build --release --quiet --workspace --bins
cargo bench --quiet --bench send_floor --no-run 2>/dev/null
floor_out=$(cargo bench --quiet --bench send_floor -- --sockets 1000 --rate 50 --seconds "$secs" --frame 122 --sender-cpu 0 --reader-cpu 1 2>/dev/null)
echo "$floor_out"
floor=$(sed -n 's/.* \([0-9.]*\) us per send/\1/p' <<<"$floor_out" | head -1)

port=$((20000 + RANDOM % 20000))
taskset -c 0 ./target/release/shardgate serve --listen "127.0.0.1:$port" --shards 1 --no-pin \
  --jwt-secret "$secret" --events-per-second 100000 >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
json=$(taskset -c 1 ./target/release/shardgate-loadtest fanout --url "http://127.0.0.1:$port" \
  --jwt-secret "$secret" --connections 1000 --room-size 1000 --rooms 1 --msg-rate 50 \
  --payload-bytes 40 --duration "${secs}s" --cores 1 --server-pid "$pid" --json 2>/dev/null)
sg=$(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])["steady"]["server_cpu_us_per_received"], 2))' "$json")
echo "shardgate: room of 1000, 50 msgs/s: ${sg} us of server CPU per delivery"
python3 -c "import sys; f, s = float(sys.argv[1]), float(sys.argv[2]); print(f'ratio shardgate / floor: {s / f:.2f}x')" "$floor" "$sg"

# 3. The same reader on both sides.
port2=$((port + 1))
test_secret="integration-test-secret-0123456789"
taskset -c 0 ./target/release/shardgate serve --listen "127.0.0.1:$port2" --shards 1 --no-pin \
  --jwt-secret "$test_secret" --events-per-second 100000 >/dev/null 2>&1 &
pid2=$!
trap 'kill $pid $pid2 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port2/readyz" >/dev/null && break; sleep 0.1; done
cargo bench --quiet --bench send_floor -- --sockets 1000 --rate 50 --seconds "$secs" --frame 160 \
  --sender-cpu 0 --reader-cpu 1 --target "127.0.0.1:$port2" --server-pid "$pid2" 2>/dev/null | tail -3
