// Cluster interop: the official socket.io-client on two shardgate nodes that share one
// Redis. Started by tests/cluster.rs with SHARDGATE_URL_A, SHARDGATE_URL_B and
// SHARDGATE_SECRET.
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect as connectTo, next, token } from "./support.mjs";

const [A, B, SECRET] = [process.env.SHARDGATE_URL_A, process.env.SHARDGATE_URL_B, process.env.SHARDGATE_SECRET];
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
