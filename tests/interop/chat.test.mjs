// Interop tests: the official socket.io-client (pinned in package-lock.json) against a
// running shardgate node. Started by tests/interop.rs, which passes SHARDGATE_URL and
// SHARDGATE_SECRET; run with `node --test`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { io } from "socket.io-client";
import { connect as connectTo, next, token as makeToken, transports } from "./support.mjs";

const URL = process.env.SHARDGATE_URL;
const SECRET = process.env.SHARDGATE_SECRET;
assert.ok(URL && SECRET, "SHARDGATE_URL and SHARDGATE_SECRET must be set");

function token(sub, tenant = "t1", ttl = 3600, alg = "HS256", secret = SECRET) {
  return makeToken(secret, sub, { tenant, ttl, alg });
}

function connect(sub, opts = {}) {
  return connectTo(URL, { token: token(sub, opts.tenant) }, opts.io);
}

function refused(tok) {
  const s = io(URL, { ...transports(), reconnection: false, forceNew: true, auth: { token: tok } });
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("no connect_error")), 5000);
    s.once("connect", () => { clearTimeout(t); s.close(); reject(new Error("bad token accepted")); });
    s.once("connect_error", (e) => { clearTimeout(t); s.close(); resolve(e); });
  });
}

test("connects with a token in the auth payload", async () => {
  const s = await connect("alice");
  assert.ok(s.id);
  s.close();
});

test("runs on the transport the run asked for (default: polling, then the upgrade)", async () => {
  const s = await connect("transport-check");
  const want = process.env.SHARDGATE_TRANSPORTS === "polling" ? "polling" : "websocket";
  if (process.env.SHARDGATE_TRANSPORTS === "default") {
    // Opened on long-polling (tests/interop.rs checks the server counted the upgrades).
    if (s.io.engine.transport.name !== "websocket") {
      await new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error("no upgrade within 5 s")), 5000);
        s.io.engine.once("upgrade", () => { clearTimeout(t); resolve(); });
      });
    }
  }
  assert.equal(s.io.engine.transport.name, want);
  const ack = await s.timeout(3000).emitWithAck("join_room", "transport-room");
  assert.equal(ack.ok, true);
  s.close();
});

test("forged, expired and alg none tokens are refused with a reason", async () => {
  let e = await refused(token("mallory", "t1", 3600, "HS256", "not-the-secret-at-all"));
  assert.match(e.message, /invalid token signature/);
  assert.equal(e.data.code, "auth_failed");
  e = await refused(token("mallory", "t1", -3600));
  assert.match(e.message, /token expired/);
  e = await refused(token("mallory", "t1", 3600, "none"));
  assert.match(e.message, /algorithm not accepted/);
});

test("rooms: every other member receives once, sender excluded", async () => {
  const [a, b, c] = await Promise.all([connect("ra"), connect("rb"), connect("rc")]);
  for (const s of [a, b, c]) {
    const joined = next(s, "room_joined");
    assert.deepEqual(await s.emitWithAck("join_room", "js-room"), { ok: true, room: "js-room" });
    assert.deepEqual(await joined, { room: "js-room" });
  }
  const got = [];
  for (const s of [a, b, c]) s.on("message:new", (m) => got.push([s, m]));
  const ack = await a.emitWithAck("message:send", { room: "js-room", content: "hello", clientMsgId: "x1" });
  assert.equal(ack.status, "sent");
  assert.equal(ack.clientMsgId, "x1");
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(got.length, 2);
  assert.ok(got.every(([s, m]) => s !== a && m.content === "hello" && m.from === "ra" && m.id === ack.id));
  for (const s of [a, b, c]) s.close();
});

test("1:1 message with ack: delivered, and message:sent", async () => {
  const alice = await connect("alice2");
  const bob = await connect("bob2");
  const incoming = next(bob, "message:new");
  const sentEvent = next(alice, "message:sent");
  const ack = await alice.emitWithAck("message:send", { to: "bob2", content: { text: "hi bob" }, clientMsgId: "c-1" });
  assert.equal(ack.status, "delivered");
  const m = await incoming;
  assert.deepEqual([m.from, m.to, m.content.text, m.id], ["alice2", "bob2", "hi bob", ack.id]);
  assert.deepEqual(await sentEvent, ack);
  alice.close();
  bob.close();
});

test("offline queue drains in order on connect", async () => {
  const alice = await connect("alice3");
  for (let i = 0; i < 3; i++) {
    const ack = await alice.emitWithAck("message:send", { to: "carol3", content: i });
    assert.equal(ack.status, "queued");
  }
  const got = [];
  const carol = io(URL, { ...transports(), reconnection: false, forceNew: true, auth: { token: token("carol3") } });
  carol.on("message:new", (m) => got.push(m.content));
  await next(carol, "connect");
  const end = Date.now() + 5000;
  while (got.length < 3 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(got, [0, 1, 2]);
  alice.close();
  carol.close();
});

test("presence and typing", async () => {
  const w = await connect("watcher4");
  const initial = next(w, "presence");
  await w.emitWithAck("presence:subscribe", ["dan4"]);
  assert.equal((await initial).status, "offline");
  const online = next(w, "presence");
  const dan = await connect("dan4");
  assert.deepEqual([(await online).userId, (await online).status], ["dan4", "online"]);
  await w.emitWithAck("join_room", "t4");
  await dan.emitWithAck("join_room", "t4");
  const typing = next(w, "typing");
  await dan.emitWithAck("typing:start", { room: "t4" });
  assert.deepEqual(await typing, { room: "t4", userId: "dan4", typing: true });
  const offline = next(w, "presence");
  dan.close();
  assert.equal((await offline).status, "offline");
  w.close();
});

test("binary content travels as binary", async () => {
  const a = await connect("bina");
  const b = await connect("binb");
  const incoming = next(b, "message:new");
  const ack = await a.emitWithAck("message:send", { to: "binb", content: Buffer.from([1, 2, 3, 250]) });
  assert.equal(ack.status, "delivered");
  const m = await incoming;
  assert.deepEqual([...new Uint8Array(m.content)], [1, 2, 3, 250]);
  a.close();
  b.close();
});

test("tenants are isolated: same room name and user id, no crossing", async () => {
  const a = await connect("same-user", { tenant: "tenant-a" });
  const b = await connect("same-user", { tenant: "tenant-b" });
  await a.emitWithAck("join_room", "same-room");
  await b.emitWithAck("join_room", "same-room");
  let leaked = 0;
  b.on("message:new", () => leaked++);
  const other = await connect("other", { tenant: "tenant-a" });
  await other.emitWithAck("join_room", "same-room");
  const got = next(a, "message:new");
  await other.emitWithAck("message:send", { room: "same-room", content: "a only" });
  const dm = await other.emitWithAck("message:send", { to: "same-user", content: "dm a only" });
  assert.equal(dm.status, "delivered");
  assert.equal((await got).content, "a only");
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(leaked, 0);
  for (const s of [a, b, other]) s.close();
});
