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
import { io } from "socket.io-client";
import { balancer, token } from "./support.mjs";

const env = process.env;
const ADDRS = (env.SHARDGATE_ADDRS ?? "").split(",");
const PIDS = (env.SHARDGATE_PIDS ?? "").split(",").map(Number);
assert.equal(ADDRS.length, 3, "SHARDGATE_ADDRS names three nodes");
const USERS = 12;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function client(url, i) {
  return new Promise((resolve, reject) => {
    const s = io(url, {
      transports: ["websocket"], forceNew: true, reconnectionDelay: 100, reconnectionDelayMax: 500,
      auth: { token: token(env.SHARDGATE_SECRET, `u${i}`, { tenant: "rec" }) },
    });
    s.user = `u${i}`;
    s.got = [];
    s.offsets = [];
    s.drops = 0;
    s.reconnects = [];
    s.on("message:new", (m, offset) => { s.got.push(m.content); s.offsets.push(Number(offset)); });
    s.on("disconnect", () => { s.drops += 1; s.lostAt = Date.now(); });
    s.on("connect", () => {
      if (s.lostAt !== undefined) s.reconnects.push({ recovered: s.recovered, ms: Date.now() - s.lostAt, at: s.got.length });
    });
    s.once("connect", () => resolve(s));
    s.once("connect_error", reject);
  });
}

/// Every client that dropped since `before` reconnects within 10 s; returns them.
async function everyoneBack(clients, before) {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const dropped = clients.filter((s) => s.drops > before.get(s));
    const back = dropped.every((s) => s.connected && s.reconnects.length >= s.drops);
    if (dropped.length > 0 && back) return dropped;
    assert.ok(Date.now() < deadline, `not back within 10 s: ${dropped.filter((s) => !s.connected).map((s) => s.user)}`);
    await sleep(20);
  }
}

test("sessions survive a node kill and a drain, with rooms and every message", async () => {
  const lb = await balancer(ADDRS);
  const url = `http://127.0.0.1:${lb.address().port}`;
  const clients = await Promise.all(Array.from({ length: USERS }, (_, i) => client(url, i)));
  let running = true;
  try {
    for (const s of clients) assert.equal((await s.timeout(5000).emitWithAck("join_room", "hall")).ok, true);

    // Traffic: every 40 ms each client sends to the room or to the next user, with an ack.
    const acked = []; // { content, to: user or null (the room), from }
    let n = 0;
    const senders = clients.map(async (s, i) => {
      while (running) {
        const content = `m${n++}`;
        const to = n % 2 === 0 ? `u${(i + 1) % USERS}` : null;
        const body = to ? { to, content } : { room: "hall", content };
        s.timeout(3000).emitWithAck("message:send", body)
          .then((ack) => { if (ack.ok !== false && ack.status) acked.push({ content, to, from: s.user }); })
          .catch(() => {}); // no ack (the sender's node died): not counted as acknowledged
        await sleep(40);
      }
    });

    const drops = () => new Map(clients.map((s) => [s, s.drops]));
    await sleep(800);
    let before = drops();
    process.kill(PIDS[2], "SIGKILL");
    const killed = await everyoneBack(clients, before);
    await sleep(800);
    before = drops();
    process.kill(PIDS[1], "SIGTERM");
    const drained = await everyoneBack(clients, before);
    await sleep(800);
    running = false;
    await Promise.all(senders);
    await sleep(1500);

    const reconnects = clients.flatMap((s) => s.reconnects);
    assert.ok(reconnects.every((r) => r.recovered === true), `recovered: ${JSON.stringify(reconnects)}`);
    const expected = new Map(clients.map((s) => [s.user, new Set()]));
    for (const m of acked) {
      for (const s of clients) {
        if (m.to ? s.user === m.to : s.user !== m.from) expected.get(s.user).add(m.content);
      }
    }
    let replayedOrLive = 0;
    for (const s of clients) {
      const got = new Set(s.got);
      const twice = s.got.flatMap((c, i) => (s.got.indexOf(c) !== i ? [`${c}@${s.got.indexOf(c)}/${i} offsets ${s.offsets[s.got.indexOf(c)]}/${s.offsets[i]}`] : []));
      assert.deepEqual(twice, [], `${s.user} got messages twice; reconnects ${JSON.stringify(s.reconnects)}`);
      const missing = [...expected.get(s.user)].filter((c) => !got.has(c));
      assert.deepEqual(missing, [], `${s.user} missed acknowledged messages`);
      for (let i = 1; i < s.offsets.length; i++) assert.ok(s.offsets[i] > s.offsets[i - 1], `${s.user}: offsets in order`);
      replayedOrLive += s.got.length;
    }
    const maxMs = Math.max(...reconnects.map((r) => r.ms));
    console.log(`# reconnect ms after the kill: ${killed.map((s) => s.reconnects[0].ms)}; ` +
      `after the drain: ${drained.map((s) => s.reconnects.at(-1).ms)}`);
    console.log(`# killed node: ${killed.length} clients moved; drained node: ${drained.length}; ` +
      `${reconnects.length} reconnects, all recovered, slowest ${maxMs} ms; ${acked.length} messages acknowledged, ` +
      `${replayedOrLive} received, none missed or twice`);
  } finally {
    running = false;
    for (const s of clients) s.close();
    lb.close();
  }
});
