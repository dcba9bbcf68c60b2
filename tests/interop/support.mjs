// What the interop suites share: HS256 tokens as shardgate reads them, an official
// client connected on the transports the run asks for, and the next occurrence of an event.
import { createHmac } from "node:crypto";
import net from "node:net";
import { io } from "socket.io-client";

const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");

/// A token for user `sub`; `alg: "none"` gives an unsigned one (which must be refused).
export function token(secret, sub, { tenant = "t1", ttl = 3600, alg = "HS256" } = {}) {
  const head = b64({ alg, typ: "JWT" });
  const body = b64({ sub, tenantId: tenant, exp: Math.floor(Date.now() / 1000) + ttl });
  if (alg === "none") return `${head}.${body}.`;
  return `${head}.${body}.${createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url")}`;
}

/// The client's transport options for this run: SHARDGATE_TRANSPORTS=default leaves the
/// client's default (long-polling, then the upgrade to WebSocket), =polling keeps it on
/// long-polling, anything else (or unset) starts on WebSocket.
export function transports() {
  switch (process.env.SHARDGATE_TRANSPORTS) {
    case "default": return {};
    case "polling": return { transports: ["polling"] };
    default: return { transports: ["websocket"] };
  }
}

/// A connected client (no reconnection unless `ioOpts` asks for it).
export function connect(url, auth, ioOpts = {}) {
  const s = io(url, { ...transports(), reconnection: false, forceNew: true, auth, ...ioOpts });
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`connect timeout on ${url}`)), 5000);
    s.once("connect", () => { clearTimeout(t); resolve(s); });
    s.once("connect_error", (e) => { clearTimeout(t); reject(e); });
  });
}

/// The first argument of the next `event` on `s`, within `ms`.
export function next(s, event, ms = 5000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${event} within ${ms}ms`)), ms);
    s.once(event, (...args) => { clearTimeout(t); resolve(args[0]); });
  });
}

/// Round-robin TCP balancer that skips a backend refusing connections.
export function balancer(backends) {
  let next = 0;
  const server = net.createServer((client) => {
    client.pause();
    const tryBackend = (left) => {
      if (left === 0) return client.destroy();
      const [host, port] = backends[next++ % backends.length].split(":");
      const up = net.connect(Number(port), host);
      up.once("connect", () => {
        client.pipe(up).pipe(client);
        client.resume();
      });
      up.once("error", () => (up.readyState === "opening" ? tryBackend(left - 1) : client.destroy()));
      client.once("error", () => up.destroy());
      client.once("close", () => up.destroy());
      up.once("close", () => client.destroy());
    };
    tryBackend(backends.length);
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}
