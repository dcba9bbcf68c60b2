// Connection state recovery on the embedded bus (one process, no Redis), with the
// official socket.io-client: under traffic (room and 1:1 messages with acks), every
// client's transport is cut in turn (the engine closed under it, as a network drop
// would); each reconnects, lands on any shard, and comes back `recovered` with its room
// and every message it missed, none twice. Started by tests/recovery.rs with
// SHARDGATE_URL, SHARDGATE_TRANSPORTS (see support.mjs), SHARDGATE_TENANT and
// SHARDGATE_SECRET.
import { test } from "node:test";
import assert from "node:assert/strict";
import { client, drops, everyoneBack, sleep, traffic, verify } from "./recovery.mjs";

test("sessions survive transport drops within one process", async () => {
  const clients = await Promise.all(Array.from({ length: 8 }, (_, i) => client(process.env.SHARDGATE_URL, i, process.env.SHARDGATE_TENANT ?? "one")));
  let stop = () => Promise.resolve();
  try {
    for (const s of clients) assert.equal((await s.timeout(5000).emitWithAck("join_room", "den")).ok, true);
    const acked = [];
    stop = traffic(clients, "den", acked);
    await sleep(500);
    for (const s of clients) {
      const before = drops(clients);
      s.io.engine.close();
      await everyoneBack(clients, before);
      await sleep(150);
    }
    await sleep(300);
    await stop();
    await sleep(1000);
    const { reconnects, received } = verify(clients, acked);
    console.log(`# ${reconnects.length} reconnects, all recovered, slowest ${Math.max(...reconnects.map((r) => r.ms))} ms; ` +
      `${acked.length} messages acknowledged, ${received} received, none missed or twice`);
  } finally {
    await stop();
    for (const s of clients) s.close();
  }
});
