// What the recovery interop suites share: official clients with reconnection on that
// record every message:new (content and offset) and every reconnect, traffic with acks
// (room and 1:1), and the check that nobody missed or got twice a message meant for them.
import assert from "node:assert/strict";
import { io } from "socket.io-client";
import { token, transports } from "./support.mjs";

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// Client `u{i}` of tenant `tenant` on `url`, recording what it gets.
export function client(url, i, tenant, opts = {}) {
  return new Promise((resolve, reject) => {
    const s = io(url, {
      ...transports(), forceNew: true, reconnectionDelay: 100, reconnectionDelayMax: 500,
      auth: { token: token(process.env.SHARDGATE_SECRET, `u${i}`, { tenant }) }, ...opts,
    });
    s.user = `u${i}`;
    s.got = [];
    s.offsets = [];
    s.drops = 0;
    s.reconnects = [];
    s.on("message:new", (m, offset) => { s.got.push(m.content); s.offsets.push(Number(offset)); });
    s.attempts = 0;
    s.io.on("reconnect_attempt", () => { s.attempts += 1; });
    s.on("disconnect", () => { s.drops += 1; s.lostAt = Date.now(); s.attempts = 0; });
    s.on("connect", () => {
      if (s.lostAt !== undefined) {
        s.reconnects.push({ recovered: s.recovered, ms: Date.now() - s.lostAt, attempts: s.attempts, at: s.got.length });
      }
    });
    s.once("connect", () => resolve(s));
    s.once("connect_error", reject);
  });
}

/// Every client that dropped since `before` (drops per client) is back within 10 s;
/// returns them.
export async function everyoneBack(clients, before) {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const dropped = clients.filter((s) => s.drops > before.get(s));
    const back = dropped.every((s) => s.connected && s.reconnects.length >= s.drops);
    if (dropped.length > 0 && back) return dropped;
    assert.ok(Date.now() < deadline, `not back within 10 s: ${dropped.filter((s) => !s.connected).map((s) => s.user)}`);
    await sleep(20);
  }
}

/// Drops per client now.
export const drops = (clients) => new Map(clients.map((s) => [s, s.drops]));

/// Every 40 ms each client sends to room `room` or to the next user, with an ack;
/// `acked` collects what was acknowledged. Returns `stop()`, which resolves once every
/// sender stopped.
export function traffic(clients, room, acked) {
  let n = 0;
  let running = true;
  const senders = clients.map(async (s, i) => {
    while (running) {
      const content = `m${n++}`;
      const to = n % 2 === 0 ? `u${(i + 1) % clients.length}` : null;
      const body = to ? { to, content } : { room, content };
      s.timeout(3000).emitWithAck("message:send", body)
        .then((ack) => { if (ack.ok !== false && ack.status) acked.push({ content, to, from: s.user }); })
        .catch(() => {}); // no ack (the sender's connection died): not counted as acknowledged
      await sleep(40);
    }
  });
  return () => { running = false; return Promise.all(senders); };
}

/// Every reconnect recovered; every acknowledged message reached each of its recipients
/// once (a room message every member but its sender, a 1:1 message its recipient), in
/// offset order. Returns (reconnects, messages received).
export function verify(clients, acked) {
  const reconnects = clients.flatMap((s) => s.reconnects);
  assert.ok(reconnects.every((r) => r.recovered === true), `recovered: ${JSON.stringify(reconnects)}`);
  const expected = new Map(clients.map((s) => [s.user, new Set()]));
  for (const m of acked) {
    for (const s of clients) {
      if (m.to ? s.user === m.to : s.user !== m.from) expected.get(s.user).add(m.content);
    }
  }
  let received = 0;
  for (const s of clients) {
    const first = new Map();
    const twice = [];
    s.got.forEach((c, i) => (first.has(c) ? twice.push(`${c} at ${first.get(c)} and ${i}`) : first.set(c, i)));
    assert.deepEqual(twice, [], `${s.user} got messages twice; reconnects ${JSON.stringify(s.reconnects)}`);
    const missing = [...expected.get(s.user)].filter((c) => !first.has(c));
    assert.deepEqual(missing, [], `${s.user} missed acknowledged messages`);
    for (let i = 1; i < s.offsets.length; i++) assert.ok(s.offsets[i] > s.offsets[i - 1], `${s.user}: offsets in order`);
    received += s.got.length;
  }
  return { reconnects, received };
}
