// Cluster interop: the official socket.io-client on two or three shardgate nodes that
// share one Redis or one Redis Cluster. Started by tests/cluster.rs with SHARDGATE_URL_A,
// SHARDGATE_URL_B, optionally SHARDGATE_URL_C, and SHARDGATE_SECRET.
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect as connectTo, next, token } from "./support.mjs";

const [A, B, SECRET] = [process.env.SHARDGATE_URL_A, process.env.SHARDGATE_URL_B, process.env.SHARDGATE_SECRET];
const C = process.env.SHARDGATE_URL_C ?? B;
assert.ok(A && B && SECRET, "SHARDGATE_URL_A, SHARDGATE_URL_B and SHARDGATE_SECRET must be set");

const connect = (url, sub) => connectTo(url, { token: token(SECRET, sub, { tenant: "js" }) });

test("1:1 from node A to node B is delivered with an ack", async () => {
  const alice = await connect(A, "alice");
  const bob = await connect(B, "bob");
  const got = next(bob, "message:new");
  const ack = await alice.emitWithAck("message:send", { to: "bob", content: "across", clientMsgId: "k" });
  assert.equal(ack.status, "delivered");
  assert.deepEqual([(await got).content, (await got).id], ["across", ack.id]);
  alice.close();
  bob.close();
});

test("a room spanning both nodes: each other member once", async () => {
  const [a, b1, b2] = await Promise.all([connect(A, "ra"), connect(B, "rb1"), connect(B, "rb2")]);
  // A join is answered once the member's node receives the room: no waiting needed.
  for (const s of [a, b1, b2]) await s.emitWithAck("join_room", "span");
  const got = [];
  for (const s of [a, b1, b2]) s.on("message:new", (m) => got.push([s, m.content]));
  const ack = await a.emitWithAck("message:send", { room: "span", content: "hello all" });
  assert.equal(ack.status, "sent");
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(got.length, 2);
  assert.ok(got.every(([s, c]) => s !== a && c === "hello all"));
  for (const s of [a, b1, b2]) s.close();
});

test("three nodes: 1:1 both ways, a room on each, presence across nodes", async () => {
  const [a, b, c] = await Promise.all([connect(A, "tri-a"), connect(B, "tri-b"), connect(C, "tri-c")]);
  // Presence of a user on another node, then 1:1 from C to A and from A to C.
  const online = await a.emitWithAck("presence:subscribe", ["tri-c"]);
  assert.ok(online !== undefined);
  const toA = next(a, "message:new");
  assert.equal((await c.emitWithAck("message:send", { to: "tri-a", content: "c->a" })).status, "delivered");
  assert.equal((await toA).content, "c->a");
  const toC = next(c, "message:new");
  assert.equal((await a.emitWithAck("message:send", { to: "tri-c", content: "a->c" })).status, "delivered");
  assert.equal((await toC).content, "a->c");
  // A room with one member per node: a message from each reaches the two others once.
  for (const s of [a, b, c]) await s.emitWithAck("join_room", "tri");
  const got = new Map([a, b, c].map((s) => [s, []]));
  for (const s of [a, b, c]) s.on("message:new", (m) => m.room === "tri" && got.get(s).push(m.content));
  for (const [i, s] of [a, b, c].entries()) {
    assert.equal((await s.emitWithAck("message:send", { room: "tri", content: `from${i}` })).status, "sent");
  }
  const until = Date.now() + 3000;
  while ([...got.values()].some((l) => l.length < 2) && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 200));
  for (const [i, s] of [a, b, c].entries()) {
    assert.deepEqual([...got.get(s)].sort(), [0, 1, 2].filter((j) => j !== i).map((j) => `from${j}`));
  }
  // C leaves: A is told C went offline.
  const offline = new Promise((resolve) =>
    a.on("presence", (p) => p.userId === "tri-c" && p.status === "offline" && resolve(p)),
  );
  c.close();
  assert.equal((await offline).status, "offline");
  a.close();
  b.close();
});
