// Connection state recovery with the official socket.io-client (default reconnection on),
// behind a small balancer over three shardgate nodes sharing one Redis: under traffic
// (room and 1:1 messages with acks), node C is killed with SIGKILL, then node B is
// drained with SIGTERM. Every client that lost its node is back within 10 s with
// `socket.recovered === true`, still in its room without joining it again; no client
// misses a message meant for it or gets one twice; no acknowledged message is lost.
// Started by tests/recovery.rs with SHARDGATE_ADDRS (three host:port), SHARDGATE_PIDS
// (the node processes) and SHARDGATE_SECRET.
import { test } from "node:test";
import assert from "node:assert/strict";
import { balancer } from "./support.mjs";
import { client, drops, everyoneBack, sleep, traffic, verify } from "./recovery.mjs";

const env = process.env;
const ADDRS = (env.SHARDGATE_ADDRS ?? "").split(",");
const PIDS = (env.SHARDGATE_PIDS ?? "").split(",").map(Number);
assert.equal(ADDRS.length, 3, "SHARDGATE_ADDRS names three nodes");

test("sessions survive a node kill and a drain, with rooms and every message", async () => {
  const lb = await balancer(ADDRS);
  const url = `http://127.0.0.1:${lb.address().port}`;
  const clients = await Promise.all(Array.from({ length: 12 }, (_, i) => client(url, i, "rec")));
  let stop = () => Promise.resolve();
  try {
    for (const s of clients) assert.equal((await s.timeout(5000).emitWithAck("join_room", "hall")).ok, true);
    const acked = [];
    stop = traffic(clients, "hall", acked);
    await sleep(800);
    let before = drops(clients);
    process.kill(PIDS[2], "SIGKILL");
    const killed = await everyoneBack(clients, before);
    await sleep(800);
    before = drops(clients);
    process.kill(PIDS[1], "SIGTERM");
    const drained = await everyoneBack(clients, before);
    await sleep(800);
    await stop();
    await sleep(1500);
    const { reconnects, received } = verify(clients, acked);
    console.log(`# reconnect ms after the kill: ${killed.map((s) => s.reconnects[0].ms)}; ` +
      `after the drain: ${drained.map((s) => s.reconnects.at(-1).ms)}`);
    console.log(`# killed node: ${killed.length} clients moved; drained node: ${drained.length}; ` +
      `${reconnects.length} reconnects, all recovered, slowest ${Math.max(...reconnects.map((r) => r.ms))} ms; ` +
      `${acked.length} messages acknowledged, ${received} received, none missed or twice`);
  } finally {
    await stop();
    for (const s of clients) s.close();
    lb.close();
  }
});
