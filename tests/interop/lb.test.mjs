// Through a real load balancer: the official socket.io-client reaches three shardgate
// nodes (one Redis) through nginx and through HAProxy, each with the shipped config
// (deploy/nginx.conf, deploy/haproxy.cfg) pointed at the test's nodes. Started by
// tests/lb.rs with SHARDGATE_NGINX_URL, SHARDGATE_HAPROXY_URL, SHARDGATE_NODE_URLS
// (comma-separated, direct to each node) and SHARDGATE_SECRET.
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect as connectTo, next, token } from "./support.mjs";

const env = process.env;
const NODES = (env.SHARDGATE_NODE_URLS ?? "").split(",").filter(Boolean);
const SECRET = env.SHARDGATE_SECRET;
assert.ok(env.SHARDGATE_NGINX_URL && env.SHARDGATE_HAPROXY_URL && NODES.length === 3 && SECRET);

const connect = (url, sub, tenant) => connectTo(url, { token: token(SECRET, sub, { tenant }) });

async function chatThrough(lbUrl, tenant) {
  // Alice comes through the balancer; Bob has a device directly on every node, so at
  // least two of them are on another node than Alice.
  const alice = await connect(lbUrl, "alice", tenant);
  const bobs = await Promise.all(NODES.map((u) => connect(u, "bob", tenant)));
  const got = bobs.map((b) => next(b, "message:new"));
  const ack = await alice.timeout(5000).emitWithAck("message:send", { to: "bob", content: "through the balancer" });
  assert.equal(ack.status, "delivered");
  for (const m of await Promise.all(got)) assert.deepEqual([m.from, m.content, m.id], ["alice", "through the balancer", ack.id]);

  for (const s of [alice, ...bobs]) assert.equal((await s.timeout(5000).emitWithAck("join_room", "lobby")).ok, true);
  const roomGot = bobs.map((b) => next(b, "message:new"));
  await alice.timeout(5000).emitWithAck("message:send", { room: "lobby", content: "hello room" });
  for (const m of await Promise.all(roomGot)) assert.deepEqual([m.room, m.content], ["lobby", "hello room"]);
  for (const s of [alice, ...bobs]) s.close();
}

test("nginx in front of three nodes: 1:1 and room across nodes", () => chatThrough(env.SHARDGATE_NGINX_URL, "ngx"));
test("HAProxy in front of three nodes: 1:1 and room across nodes", () => chatThrough(env.SHARDGATE_HAPROXY_URL, "hap"));
