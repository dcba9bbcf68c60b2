// Runs the same load-generator scenarios against shardgate, the Node socket.io peer and
// the socketioxide peer, one server at a time on the same cores, and prints a ratio
// table (shardgate / peer) including the server's CPU time per message.
//
//   benches/peers/compare.sh            (builds everything, then runs this)
//   node benches/peers/compare.mjs [--quick] [--only P1,P3,P4,P6] [--servers shardgate,socket.io]
//
// Environment: SERVER_CPUS (default "0") — the cores every server gets (shardgate runs
// one shard per core there, socketioxide one tokio worker per core; Node is one thread);
// LOAD_CPUS (default: the other cores) — where the load generator runs.
// Results: the table on stdout (Markdown) and every raw report in
// target/peers/compare-<time>.json.

import { spawn, spawnSync } from "node:child_process";
import { mkdirSync, writeFileSync, existsSync } from "node:fs";
import { connect } from "node:net";
import { availableParallelism } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const args = process.argv.slice(2);
const flag = (name) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const quick = args.includes("--quick");
const only = (flag("--only") ?? "P1,P3,P4,P6").split(",");
const secret = "compare-secret-0123456789abcdef";
const cpus = availableParallelism();
const serverCpus = process.env.SERVER_CPUS ?? "0";
const serverCores = serverCpus.split(",").length;
const loadCpus =
  process.env.LOAD_CPUS ??
  ([...Array(cpus).keys()].filter((c) => !serverCpus.split(",").includes(String(c))).join(",") || "0");
const loadCores = loadCpus.split(",").length;
const shardgate = join(root, "target/release/shardgate");
const loadtest = join(root, "target/release/shardgate-loadtest");
const oxide = join(root, "benches/peers/socketioxide/target/release/shardgate-peer-socketioxide");
for (const bin of [shardgate, loadtest, oxide]) {
  if (!existsSync(bin)) throw new Error(`${bin} missing: run benches/peers/compare.sh (it builds everything)`);
}
const outDir = join(root, "target/peers");
mkdirSync(outDir, { recursive: true });
// shardgate's per-connection event rate limit would throttle the generator; the peers
// have none, so it is lifted for the comparison.
const config = join(outDir, "shardgate-compare.toml");
writeFileSync(config, "[runtime]\nevents_per_second = 10000000\nevent_burst = 10000000\n");

const servers = {
  shardgate: (port) => [
    "taskset",
    ["-c", serverCpus, shardgate, "serve", "--config", config, "--listen", `127.0.0.1:${port}`,
      "--shards", String(serverCores), "--no-pin", "--jwt-secret", secret],
    {},
  ],
  "socket.io": (port) => [
    "taskset",
    ["-c", serverCpus, "node", join(root, "benches/peers/node/server.mjs")],
    { PORT: String(port), JWT_SECRET: secret },
  ],
  socketioxide: (port) => [
    "taskset",
    ["-c", serverCpus, oxide],
    { PORT: String(port), JWT_SECRET: secret, WORKERS: String(serverCores) },
  ],
};
const names = (flag("--servers") ?? Object.keys(servers).join(",")).split(",");

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitPort(port, ms = 15000) {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    const ok = await new Promise((res) => {
      const s = connect(port, "127.0.0.1", () => {
        s.destroy();
        res(true);
      });
      s.on("error", () => res(false));
    });
    if (ok) return;
    await sleep(100);
  }
  throw new Error(`nothing listens on ${port}`);
}

let nextPort = 4100 + (process.pid % 500) * 8;

/** Starts `count` processes of server `name` on their own ports; returns them. */
async function start(name, count = 1) {
  const procs = [];
  for (let i = 0; i < count; i++) {
    const port = nextPort++;
    const [cmd, argv, env] = servers[name](port);
    const child = spawn(cmd, argv, { env: { ...process.env, ...env, RUST_LOG: "warn" }, stdio: ["ignore", "ignore", "inherit"] });
    procs.push({ child, port });
  }
  for (const p of procs) await waitPort(p.port);
  await sleep(500);
  return procs;
}

async function stop(procs) {
  for (const p of procs) p.child.kill("SIGTERM");
  await Promise.all(procs.map((p) => new Promise((r) => (p.child.exitCode !== null ? r() : p.child.on("exit", r)))));
}

function run(scenario, procs, extra) {
  const url = procs.map((p) => `http://127.0.0.1:${p.port}`).join(",");
  const pids = procs.map((p) => p.child.pid).join(",");
  const argv = ["-c", loadCpus, loadtest, scenario, "--url", url, "--jwt-secret", secret,
    "--server-pid", pids, "--cores", String(loadCores), "--source-ips", "127.0.0.1-127.0.0.9", "--json", ...extra];
  const r = spawnSync("taskset", argv, { encoding: "utf8", maxBuffer: 64 << 20, timeout: 300_000 });
  if (r.status !== 0) throw new Error(`loadtest ${scenario} failed: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

const conns = quick ? 2000 : 10000;
const large = quick ? 6000 : 50000;
const results = {};
const raw = {};

for (const name of names) {
  const m = (results[name] = {});
  const keep = (key, report) => ((raw[name] ??= {})[key] = report);
  process.stderr.write(`== ${name}\n`);
  if (only.includes("P1")) {
    let procs = await start(name);
    let r = keep("P1", run("idle", procs, ["--connections", String(conns), "--rate", "2000", "--duration", `${conns / 1000 + 6}s`]));
    m.p1 = r.rss_bytes_per_connection;
    m.p1_errors = Object.values(r.errors).reduce((a, b) => a + b, 0);
    await stop(procs);
    // Past one process's open-file limit: three server processes on their own ports.
    procs = await start(name, 3);
    r = keep("P1_large", run("idle", procs, ["--connections", String(large), "--rate", "2000", "--duration", `${large / 1000 + 8}s`]));
    m.p1_large = r.rss_bytes_per_connection;
    m.p1_large_errors = Object.values(r.errors).reduce((a, b) => a + b, 0);
    await stop(procs);
  }
  if (only.includes("P3")) {
    const procs = await start(name);
    const r = keep("P3", run("fanout", procs, ["--connections", "1000", "--room-size", "1000", "--msg-rate", quick ? "20" : "50",
      "--payload-bytes", "100", "--rate", "2000", "--duration", quick ? "5s" : "10s"]));
    m.p3_deliveries_per_sec = r.steady?.received_per_sec;
    m.p3_cpu_us = r.steady?.server_cpu_us_per_received;
    m.p3_user_us = r.steady?.server_user_cpu_us_per_received;
    m.p3_per_core_second = m.p3_cpu_us ? 1e6 / m.p3_cpu_us : null;
    m.p3_p99 = r.fanout.latency_us.p99;
    m.p3_complete = r.fanout.deliveries / Math.max(1, r.fanout.expected_deliveries);
    await stop(procs);
  }
  if (only.includes("P4")) {
    // The peak: the highest offered rate the server still acks in full (>= 97%), found
    // by doubling from 10k/s and then halving the gap twice. Open-loop overload past the
    // peak is not a throughput measurement: queues only grow.
    const ackRun = async (rate, secs) => {
      const procs = await start(name);
      const r = run("ack-rtt", procs, ["--connections", "200", "--msg-rate", String(rate), "--rate", "2000", "--duration", `${secs}s`]);
      await stop(procs);
      return r;
    };
    const secs = quick ? 3 : 5;
    const holds = (r, rate) => (r.steady?.received_per_sec ?? 0) >= 0.97 * rate;
    let good = 0;
    let bad = 0;
    let peakReport = null;
    for (let rate = 10000; rate <= 640000; rate *= 2) {
      const r = await ackRun(rate, secs);
      if (!holds(r, rate)) {
        bad = rate;
        break;
      }
      good = rate;
      peakReport = r;
    }
    for (let i = 0; i < 2 && bad > 0 && good > 0; i++) {
      const mid = Math.round((good + bad) / 2);
      const r = await ackRun(mid, secs);
      if (holds(r, mid)) {
        good = mid;
        peakReport = r;
      } else {
        bad = mid;
      }
    }
    keep("P4_peak", peakReport);
    m.p4_peak = good || null;
    m.p4_peak_busy = peakReport ? peakReport.steady?.server_cpu_seconds / peakReport.steady?.seconds : null;
    const half = Math.max(1000, Math.round((good || 2000) / 2));
    const r = keep("P4", await ackRun(half, quick ? 4 : 8));
    m.p4_rate = half;
    m.p4_p50 = r.messages.latency_us.p50;
    m.p4_p99 = r.messages.latency_us.p99;
    m.p4_cpu_us = r.steady?.server_cpu_us_per_received;
    m.p4_user_us = r.steady?.server_user_cpu_us_per_received;
    // CPU per message at one rate every server holds, so the costs compare directly.
    const same = keep("P4_same", await ackRun(10000, secs));
    m.p4_same_cpu_us = same.steady?.server_cpu_us_per_received;
    m.p4_same_p99 = same.messages.latency_us.p99;
  }
  if (only.includes("P6")) {
    let procs = await start(name);
    const r = keep("P6", run("connect-storm", procs, ["--connections", quick ? "2000" : "5000", "--rate", "100000", "--duration", "20s"]));
    m.p6_first = r.waves?.[0]?.connects_per_sec;
    m.p6_reconnect = r.waves?.[1]?.connects_per_sec;
    m.p6_errors = Object.values(r.errors).reduce((a, b) => a + b, 0);
    await stop(procs);
    // The same at a paced 2000/s, which every server can take: connect latency.
    procs = await start(name);
    const paced = keep("P6_paced", run("connect-storm", procs, ["--connections", quick ? "2000" : "5000", "--rate", "2000", "--duration", "20s"]));
    m.p6_paced_p99 = paced.waves?.[0]?.connect_latency_us?.p99;
    m.p6_paced_p50 = paced.waves?.[0]?.connect_latency_us?.p50;
    m.p6_errors += Object.values(paced.errors).reduce((a, b) => a + b, 0);
    await stop(procs);
  }
}

const stamp = new Date().toISOString().replace(/[:.]/g, "-");
const file = join(outDir, `compare-${stamp}.json`);
writeFileSync(file, JSON.stringify({ serverCpus, loadCpus, quick, results, raw }, null, 1));

const rows = [
  ["P1 idle memory, bytes/conn", `${conns} conns`, "p1", "lower"],
  ["P1 idle memory, bytes/conn", `${large} conns, 3 procs`, "p1_large", "lower"],
  ["P3 fan-out deliveries per server CPU-second", "room 1000, 100 B", "p3_per_core_second", "higher"],
  ["P3 server CPU µs per delivery", "user + kernel", "p3_cpu_us", "lower"],
  ["P3 server user-space CPU µs per delivery", "", "p3_user_us", "lower"],
  ["P3 deliveries/s achieved", "", "p3_deliveries_per_sec", "higher"],
  ["P3 delivery p99 µs", "", "p3_p99", "lower"],
  ["P4 peak acked msgs/s (held >= 97%)", "200 conns", "p4_peak", "higher"],
  ["P4 server CPU busy at peak", "", "p4_peak_busy", "info"],
  ["P4 ack rate at 50% of own peak, msgs/s", "", "p4_rate", "info"],
  ["P4 ack p99 µs at 50% of own peak", "", "p4_p99", "lower"],
  ["P4 server CPU µs per message at 50%", "user + kernel", "p4_cpu_us", "lower"],
  ["P4 server user-space CPU µs per message at 50%", "", "p4_user_us", "lower"],
  ["P4 server CPU µs per message at 10k/s", "same rate for all", "p4_same_cpu_us", "lower"],
  ["P4 ack p99 µs at 10k/s", "same rate for all", "p4_same_p99", "lower"],
  ["P6 connects/s, first wave", "5000 at once", "p6_first", "higher"],
  ["P6 connects/s, mass reconnect", "5000 at once", "p6_reconnect", "higher"],
  ["P6 connect p50 µs, paced", "2000/s", "p6_paced_p50", "lower"],
  ["P6 connect p99 µs, paced", "2000/s", "p6_paced_p99", "lower"],
];
const fmt = (v) =>
  v === undefined || v === null || Number.isNaN(v)
    ? "-"
    : Math.abs(v) >= 100
      ? Math.round(v).toLocaleString("en-US")
      : v.toFixed(2);
const peers = names.filter((n) => n !== "shardgate");
const head = ["metric", "setup", ...names, ...peers.map((p) => `shardgate / ${p}`), "better"];
console.log(`server cores: ${serverCpus} (${serverCores}), load generator cores: ${loadCpus}${quick ? ", quick" : ""}\n`);
console.log(`| ${head.join(" | ")} |`);
console.log(`|${head.map(() => "---").join("|")}|`);
for (const [label, setup, key, better] of rows) {
  if (names.every((n) => results[n][key] === undefined)) continue;
  const sg = results.shardgate?.[key];
  const ratios = peers.map((p) => (sg && results[p][key] ? `${(sg / results[p][key]).toFixed(2)}x` : "-"));
  console.log(`| ${[label, setup, ...names.map((n) => fmt(results[n][key])), ...ratios, better].join(" | ")} |`);
}
const errs = names.map((n) => `${n}: ${["p1_errors", "p1_large_errors", "p6_errors"].map((k) => results[n][k] ?? "-").join("/")}`);
console.log(`\nconnection errors (P1 / P1 large / P6): ${errs.join(", ")}; P3 completeness: ${names.map((n) => `${n} ${fmt(results[n].p3_complete)}`).join(", ")}`);
console.log(`raw reports: ${file}`);
