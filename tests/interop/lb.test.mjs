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

const connect = (url, sub, tenant, io = {}) => connectTo(url, { token: token(SECRET, sub, { tenant }) }, io);
// Through the balancer with the client's defaults (long-polling, then the upgrade), and
// one client that stays on long-polling. `withCredentials` lets the Node client keep the
// balancer's stickiness cookie, as a browser does by itself.
const DEFAULTS = { transports: ["polling", "websocket"], withCredentials: true };
const POLLING = { transports: ["polling"], withCredentials: true };

async function chatThrough(lbUrl, tenant) {
  // Alice and Carol come through the balancer; Bob has a device directly on every node
  // (WebSocket), so at least two of them are on another node than Alice and Carol.
  const alice = await connect(lbUrl, "alice", tenant, DEFAULTS);
  const carol = await connect(lbUrl, "carol", tenant, POLLING);
  const bobs = await Promise.all(NODES.map((u) => connect(u, "bob", tenant, { transports: ["websocket"] })));
  const got = bobs.map((b) => next(b, "message:new"));
  const ack = await alice.timeout(5000).emitWithAck("message:send", { to: "bob", content: "through the balancer" });
  assert.equal(ack.status, "delivered");
  for (const m of await Promise.all(got)) assert.deepEqual([m.from, m.content, m.id], ["alice", "through the balancer", ack.id]);

  const toCarol = next(carol, "message:new");
  const ack2 = await bobs[2].timeout(5000).emitWithAck("message:send", { to: "carol", content: "to a polling client" });
  assert.equal(ack2.status, "delivered");
  assert.equal((await toCarol).content, "to a polling client");

  const all = [alice, carol, ...bobs];
  for (const s of all) assert.equal((await s.timeout(5000).emitWithAck("join_room", "lobby")).ok, true);
  const roomGot = [carol, ...bobs].map((b) => next(b, "message:new"));
  await alice.timeout(5000).emitWithAck("message:send", { room: "lobby", content: "hello room" });
  for (const m of await Promise.all(roomGot)) assert.deepEqual([m.room, m.content], ["lobby", "hello room"]);
  assert.equal(alice.io.engine.transport.name, "websocket", "alice upgraded through the balancer");
  assert.equal(carol.io.engine.transport.name, "polling");
  for (const s of all) s.close();
}

test("nginx in front of three nodes: 1:1 and room across nodes", () => chatThrough(env.SHARDGATE_NGINX_URL, "ngx"));
test("HAProxy in front of three nodes: 1:1 and room across nodes", () => chatThrough(env.SHARDGATE_HAPROXY_URL, "hap"));
