// A minimal socket.io 4.8 server speaking shardgate's chat events, so the load generator
// can measure it side by side with shardgate (benches/peers/compare.sh).
//
//   PORT=3000 JWT_SECRET=... node server.mjs
//
// Clients authenticate with an HS256 JWT in the CONNECT auth payload ({token}), checked
// with node:crypto (signature, exp); `sub` is the user and `tenantId` the tenant. Events:
//   join_room "room" | {room}             -> ack {ok, room}
//   message:send {to | room, content, clientMsgId?}
//       -> recipients (the user's sockets, or the room's members but the sender) get
//          message:new {id, from, to | room, content, ts}; ack {id, clientMsgId, status}
// WebSocket transport only, like shardgate.

import { createServer } from "node:http";
import { createHmac, timingSafeEqual, randomUUID } from "node:crypto";
import { Server } from "socket.io";

const port = Number(process.env.PORT ?? 3000);
const secret = process.env.JWT_SECRET ?? "shardgate-dev-secret-do-not-use-in-production";

function verify(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  const header = JSON.parse(Buffer.from(parts[0], "base64url").toString());
  if (header.alg !== "HS256") return null;
  const want = createHmac("sha256", secret).update(`${parts[0]}.${parts[1]}`).digest();
  const got = Buffer.from(parts[2], "base64url");
  if (got.length !== want.length || !timingSafeEqual(got, want)) return null;
  const claims = JSON.parse(Buffer.from(parts[1], "base64url").toString());
  if (typeof claims.sub !== "string" || typeof claims.tenantId !== "string") return null;
  if (typeof claims.exp === "number" && claims.exp * 1000 < Date.now()) return null;
  return claims;
}

const http = createServer();
const io = new Server(http, { transports: ["websocket"], serveClient: false });

io.use((socket, next) => {
  let claims = null;
  try {
    claims = verify(socket.handshake.auth?.token);
  } catch {
    claims = null;
  }
  if (!claims) return next(new Error("unauthorized"));
  socket.data.user = claims.sub;
  socket.data.tenant = claims.tenantId;
  next();
});

io.on("connection", (socket) => {
  const { user, tenant } = socket.data;
  socket.join(`u:${tenant}:${user}`);
  const reply = (ack, body) => typeof ack === "function" && ack(body);

  socket.on("join_room", (arg, ack) => {
    const room = typeof arg === "string" ? arg : arg?.room;
    if (typeof room !== "string" || room.length === 0) return reply(ack, { ok: false, error: "invalid_room" });
    socket.join(`r:${tenant}:${room}`);
    reply(ack, { ok: true, room });
  });

  socket.on("message:send", (body, ack) => {
    if (body === null || typeof body !== "object" || body.content === undefined) {
      return reply(ack, { error: "invalid_message" });
    }
    const id = randomUUID();
    const ts = Date.now();
    if (typeof body.room === "string") {
      const key = `r:${tenant}:${body.room}`;
      if (!socket.rooms.has(key)) return reply(ack, { error: "not_in_room" });
      socket.to(key).emit("message:new", { id, from: user, room: body.room, content: body.content, ts });
      reply(ack, { id, clientMsgId: body.clientMsgId ?? null, status: "sent" });
    } else if (typeof body.to === "string") {
      io.to(`u:${tenant}:${body.to}`).emit("message:new", { id, from: user, to: body.to, content: body.content, ts });
      reply(ack, { id, clientMsgId: body.clientMsgId ?? null, status: "delivered" });
    } else {
      reply(ack, { error: "invalid_message" });
    }
  });
});

// PORT=0 takes a free port; the line below says which.
http.listen(port, "127.0.0.1", () => console.log(`socket.io peer on 127.0.0.1:${http.address().port}`));
