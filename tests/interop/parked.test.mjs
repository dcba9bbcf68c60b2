// The official socket.io-client on parked WebSockets: clients open on long-polling,
// upgrade, go idle until the node parks them (no task, epoll watch), then chat both ways,
// answer several ping rounds while parked, and chat again. Started by tests/interop.rs
// with SHARDGATE_URL (a node with a 400 ms ping interval: its tick is 100 ms).
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect as connectTo, next, token as makeToken } from "./support.mjs";

const URL = process.env.SHARDGATE_URL;
const SECRET = process.env.SHARDGATE_SECRET;
assert.ok(URL && SECRET, "SHARDGATE_URL and SHARDGATE_SECRET must be set");

const connect = (sub) => connectTo(URL, { token: makeToken(SECRET, sub) });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function metric(name) {
  const body = await (await fetch(`${URL}/metrics`)).text();
  const line = body.split("\n").find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(" ")[1]) : 0;
}

async function untilParked(n) {
  for (let i = 0; i < 100; i++) {
    if ((await metric("shardgate_websockets_parked")) === n) return;
    await sleep(50);
  }
  assert.fail(`${await metric("shardgate_websockets_parked")} parked, not ${n}`);
}

test("parked clients chat, stay through ping rounds, and chat again", async () => {
  const alice = await connect("alice");
  const bob = await connect("bob");
  for (const s of [alice, bob]) {
    if (s.io.engine.transport.name !== "websocket") await next(s.io.engine, "upgrade");
    assert.equal((await s.timeout(3000).emitWithAck("join_room", "lobby")).ok, true);
  }
  await untilParked(2);

  const got = next(alice, "message:new");
  const ack = await bob.timeout(3000).emitWithAck("message:send", { room: "lobby", content: "hello" });
  assert.ok(ack.id, JSON.stringify(ack));
  assert.equal((await got).content, "hello");
  assert.ok((await metric("shardgate_websocket_parked_reads_total")) >= 1, "read while parked");

  // Several ping rounds: the client's pongs are read while parked.
  await sleep(2000);
  assert.ok(alice.connected && bob.connected, "still connected after the ping rounds");
  await untilParked(2);
  const dm = next(bob, "message:new");
  await alice.timeout(3000).emitWithAck("message:send", { to: "bob", content: "psst" });
  assert.equal((await dm).content, "psst");
  alice.close();
  bob.close();
});
