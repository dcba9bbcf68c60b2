// Drain interop: the official socket.io-client, with its default reconnection, behind a
// small TCP balancer over two shardgate nodes. Node A is drained (SIGTERM); its clients
// see a transport close (so they reconnect, unlike after a Socket.IO DISCONNECT) and
// come back through the balancer on node B. Started by tests/drain.rs with
// SHARDGATE_ADDR_A, SHARDGATE_ADDR_B (host:port), SHARDGATE_PID_A and SHARDGATE_SECRET.
import { test } from "node:test";
import assert from "node:assert/strict";
import { io } from "socket.io-client";
import { balancer, token } from "./support.mjs";

const env = process.env;
const [A, B, PID_A, SECRET] = [env.SHARDGATE_ADDR_A, env.SHARDGATE_ADDR_B, Number(env.SHARDGATE_PID_A), env.SHARDGATE_SECRET];
assert.ok(A && B && PID_A && SECRET, "SHARDGATE_ADDR_A, SHARDGATE_ADDR_B, SHARDGATE_PID_A and SHARDGATE_SECRET must be set");

test("drained clients reconnect to the other node", async () => {
  const lb = await balancer([A, B]);
  const url = `http://127.0.0.1:${lb.address().port}`;
  const clients = await Promise.all(
    Array.from({ length: 10 }, (_, i) => new Promise((resolve, reject) => {
      const s = io(url, { transports: ["websocket"], forceNew: true, auth: { token: token(SECRET, `u${i}`, { tenant: "js" }) },
        reconnectionDelay: 200, reconnectionDelayMax: 1000 });
      s.reasons = [];
      s.on("disconnect", (reason) => s.reasons.push(reason));
      s.once("connect", () => resolve(s));
      s.once("connect_error", reject);
    })),
  );
  const started = Date.now();
  process.kill(PID_A, "SIGTERM");
  // Every client is connected again within 10 s; the drained ones saw a transport close.
  const deadline = started + 10_000;
  while (Date.now() < deadline) {
    const moved = clients.filter((s) => s.reasons.length > 0);
    if (moved.length > 0 && clients.every((s) => s.connected) && moved.every((s) => s.reasons.length === 1)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const moved = clients.filter((s) => s.reasons.length > 0);
  assert.ok(moved.length >= 1, "some clients were on node A");
  for (const s of moved) assert.deepEqual(s.reasons, ["transport close"]);
  assert.ok(clients.every((s) => s.connected), "every client is back within 10 s");
  // They chat again (on node B).
  const acks = await Promise.all(clients.map((s) => s.timeout(5000).emitWithAck("join_room", "after-drain")));
  assert.ok(acks.every((a) => a.ok === true));
  console.log(`# moved ${moved.length} of ${clients.length} clients, all back after ${Date.now() - started} ms`);
  for (const s of clients) s.close();
  lb.close();
});
