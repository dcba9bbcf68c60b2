// Connection state recovery with the official socket.io-client (default reconnection on),
// behind a small balancer over three shardgate nodes sharing one Redis: under traffic
// (room and 1:1 messages with acks), nodes are stopped one after the other as
// SHARDGATE_STEPS says (`SIGKILL:2,SIGTERM:1`: node 2 killed, then node 1 drained). After
// each, every client that lost its node is back within 10 s with
// `socket.recovered === true`, still in its room without joining it again; no client
// misses a message meant for it or gets one twice; no acknowledged message is lost.
// Started by tests/recovery.rs with SHARDGATE_ADDRS (three host:port), SHARDGATE_PIDS
// (the node processes), SHARDGATE_STEPS and SHARDGATE_SECRET.
import { test } from "node:test";
import assert from "node:assert/strict";
import { balancer } from "./support.mjs";
import { client, drops, everyoneBack, sleep, traffic, verify } from "./recovery.mjs";

const env = process.env;
const ADDRS = (env.SHARDGATE_ADDRS ?? "").split(",");
const PIDS = (env.SHARDGATE_PIDS ?? "").split(",").map(Number);
const STEPS = (env.SHARDGATE_STEPS ?? "").split(",").map((step) => step.split(":"));
assert.equal(ADDRS.length, 3, "SHARDGATE_ADDRS names three nodes");
assert.ok(STEPS.every(([sig, node]) => sig && PIDS[Number(node)]), "SHARDGATE_STEPS: SIGNAL:node,...");

test(`sessions survive ${env.SHARDGATE_STEPS}, with rooms and every message`, async () => {
  const lb = await balancer(ADDRS);
  const url = `http://127.0.0.1:${lb.address().port}`;
  const clients = await Promise.all(Array.from({ length: 12 }, (_, i) => client(url, i, "rec")));
  let stop = () => Promise.resolve();
  try {
    for (const s of clients) assert.equal((await s.timeout(5000).emitWithAck("join_room", "hall")).ok, true);
    const acked = [];
    stop = traffic(clients, "hall", acked);
    const moved = [];
    for (const [sig, node] of STEPS) {
      await sleep(800);
      const before = drops(clients);
      process.kill(PIDS[Number(node)], sig);
      const back = await everyoneBack(clients, before);
      moved.push(`${sig} node ${node}: ${back.length} clients moved, back after ${back.map((s) => `${s.reconnects.at(-1).ms} ms (${s.reconnects.at(-1).attempts} attempts)`)}`);
    }
    await sleep(800);
    await stop();
    await sleep(1500);
    const { reconnects, received } = verify(clients, acked);
    console.log(`# ${moved.join("; ")}`);
    console.log(`# ${reconnects.length} reconnects, all recovered, slowest ${Math.max(...reconnects.map((r) => r.ms))} ms; ` +
      `${acked.length} messages acknowledged, ${received} received, none missed or twice`);
  } finally {
    await stop();
    for (const s of clients) s.close();
    lb.close();
  }
});
