// Measures the server's resident memory per idle authenticated connection.
//
//   node scripts/idle-rss.mjs --url ws://127.0.0.1:3000 --secret S --pid PID --connections 10000 [--transport polling|upgrade]
//
// Opens N WebSocket connections (Engine.IO v4 + Socket.IO CONNECT with a JWT per user),
// or with `--transport polling` N long-polling sessions (each with its GET waiting, as an
// idle polling client has, on kept-alive HTTP connections), or with `--transport upgrade`
// N sessions opened on long-polling and upgraded to WebSocket (the official client's
// default), puts each socket in one of 100 rooms, answers pings, waits for the server to
// settle, then reads the server's VmRSS from /proc and /proc/net/sockstat before and after.
// Connections spread over source addresses 127.0.0.1..127.0.0.9 to stay clear of the
// ephemeral-port limit. Uses the `ws` package installed with the interop suite.
import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

import http from "node:http";

const require = createRequire(new URL("../tests/interop/package.json", import.meta.url));
const WebSocket = require("ws");

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));
const url = args.url ?? "ws://127.0.0.1:3000";
const secret = args.secret;
const pid = Number(args.pid);
const total = Number(args.connections ?? 10000);
const concurrency = Number(args.concurrency ?? 200);
const polling = args.transport === "polling";
const upgrade = args.transport === "upgrade";
const settleMs = Number(args["settle-ms"] ?? 2000);
if (!secret || !pid) throw new Error("--secret and --pid are required");

const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
const head = b64({ alg: "HS256", typ: "JWT" });
function token(sub) {
  const body = b64({ sub, tenantId: "bench", exp: Math.floor(Date.now() / 1000) + 3600 });
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}
const rss = () => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]) * 1024;
const sockstat = () => readFileSync("/proc/net/sockstat", "utf8").split("\n").find((l) => l.startsWith("TCP:"));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const sockets = [];
let ready = 0, failed = 0;
function open(i) {
  return new Promise((resolve) => {
    const ws = new WebSocket(`${url}/socket.io/?EIO=4&transport=websocket`, { localAddress: `127.0.0.${1 + (i % 9)}`, perMessageDeflate: false });
    sockets.push(ws);
    ws.on("message", (data) => {
      const s = data.toString();
      if (s.startsWith("0")) ws.send(`40${JSON.stringify({ token: token(`user${i}`) })}`);
      else if (s.startsWith("40")) ws.send(`421["join_room","room-${i % 100}"]`);
      else if (s.startsWith("431")) { ready++; resolve(); }
      else if (s === "2") ws.send("3");
    });
    ws.on("error", () => { failed++; resolve(); });
    ws.on("close", () => resolve());
  });
}

// One long-polling session: handshake, CONNECT, join, then a GET always waiting.
const agents = Array.from({ length: 9 }, (_, k) => new http.Agent({ keepAlive: true, maxSockets: Infinity, localAddress: `127.0.0.${1 + k}` }));
const base = url.replace(/^ws/, "http") + "/socket.io/?EIO=4&transport=polling";
function request(agent, method, path, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(path, { method, agent, headers: body ? { "content-type": "text/plain;charset=UTF-8" } : {} }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d) => (text += d));
      res.on("end", () => (res.statusCode === 200 ? resolve(text) : reject(new Error(`${res.statusCode} ${text}`))));
    });
    req.on("error", reject);
    req.end(body);
  });
}
function openPolling(i) {
  return new Promise((resolve) => {
    const agent = agents[i % 9];
    let path;
    const loop = async () => {
      for (;;) {
        const body = await request(agent, "GET", path);
        for (const p of body.split("\x1e")) {
          if (p === "2") await request(agent, "POST", path, "3");
          else if (p.startsWith("40")) await request(agent, "POST", path, `421["join_room","room-${i % 100}"]`);
          else if (p.startsWith("431")) { ready++; resolve(); }
          else if (p === "1") return;
        }
      }
    };
    request(agent, "GET", base)
      .then((open) => {
        path = `${base}&sid=${JSON.parse(open.slice(1)).sid}`;
        return request(agent, "POST", path, `40${JSON.stringify({ token: token(`user${i}`) })}`);
      })
      .then(loop)
      .catch(() => { failed++; resolve(); });
  });
}

// A session opened on long-polling, then upgraded: probe, `5`, the rest over WebSocket.
function openUpgraded(i) {
  return new Promise((resolve) => {
    const agent = agents[i % 9];
    request(agent, "GET", base)
      .then(async (open) => {
        const sid = JSON.parse(open.slice(1)).sid;
        await request(agent, "POST", `${base}&sid=${sid}`, `40${JSON.stringify({ token: token(`user${i}`) })}`);
        const ws = new WebSocket(`${url}/socket.io/?EIO=4&transport=websocket&sid=${sid}`, { localAddress: `127.0.0.${1 + (i % 9)}`, perMessageDeflate: false });
        sockets.push(ws);
        ws.on("open", () => ws.send("2probe"));
        ws.on("message", (data) => {
          const s = data.toString();
          if (s === "3probe") { ws.send("5"); ws.send(`421["join_room","room-${i % 100}"]`); }
          else if (s.startsWith("431")) { ready++; resolve(); }
          else if (s === "2") ws.send("3");
        });
        ws.on("error", () => { failed++; resolve(); });
        ws.on("close", () => resolve());
      })
      .catch(() => { failed++; resolve(); });
  });
}

await sleep(500);
const before = rss();
const sockBefore = sockstat();
const t0 = Date.now();
for (let i = 0; i < total; i += concurrency) {
  await Promise.all(Array.from({ length: Math.min(concurrency, total - i) }, (_, k) => (polling ? openPolling : upgrade ? openUpgraded : open)(i + k)));
}
const connectMs = Date.now() - t0;
await sleep(settleMs);
const after = rss();
const result = {
  transport: polling ? "polling" : upgrade ? "upgrade" : "websocket",
  connections: ready,
  failed,
  connect_seconds: connectMs / 1000,
  server_rss_before_bytes: before,
  server_rss_after_bytes: after,
  rss_bytes_per_connection: Math.round((after - before) / Math.max(ready, 1)),
  sockstat_before: sockBefore,
  sockstat_after: sockstat(),
};
console.log(JSON.stringify(result, null, 2));
for (const ws of sockets) ws.terminate();
process.exit(0);
