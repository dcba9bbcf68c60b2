//! Lua scripts the bridge runs with EVAL. Each one is atomic in Redis, which is what makes
//! "first socket of a user" / "last socket" / "no socket anywhere, so queue" decisions
//! correct when several nodes act on the same user at once.
//!
//! Every script takes the key prefix as `ARGV[1]` and builds the documented keys itself
//! (docs/redis.md); they assume a single Redis (not Redis Cluster). Steps two scripts
//! share are Lua functions defined once (the macros below) and prepended with `concat!`.

/// `unregister(p, server, sid, user, now, ttl)`: removes the socket from the user's set
/// and announces the change; on the user's last socket cluster-wide, records lastSeen
/// and publishes offline. Returns true if the user went offline.
macro_rules! lua_unregister {
    () => {
        r#"
local function unregister(p, s, sid, u, now, ttl)
  local k = p..'user:'..u..':sockets'
  redis.call('SREM', k, s..'|'..sid)
  redis.call('PUBLISH', p..'registry:changes', u)
  if redis.call('SCARD', k) > 0 then return false end
  redis.call('SET', p..'presence:'..u, 'offline|'..now, 'EX', ttl)
  redis.call('PUBLISH', p..'presence:updates', cjson.encode({user=u, status='offline', lastSeen=tonumber(now)}))
  return true
end
"#
    };
}

/// `enqueue(p, user, frame, cap, ttl)`: appends to the user's bounded offline queue.
macro_rules! lua_enqueue {
    () => {
        r#"
local function enqueue(p, u, frame, cap, ttl)
  local q = p..'offline:'..u
  redis.call('RPUSH', q, frame)
  redis.call('LTRIM', q, -tonumber(cap), -1)
  redis.call('EXPIRE', q, ttl)
end
"#
    };
}

/// Register socket `ARGV[3]` of user `ARGV[4]` on server `ARGV[2]`; mark online (publishing on
/// the user's first socket cluster-wide); return {1 if it was the first socket else 0,
/// the user's offline queue...} and clear the queue.
/// ARGV: prefix, server, sid, user, now_ms, presence_ttl_secs.
pub const UP: &str = r#"
local p, me, sid, u, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
redis.call('HSET', p..'connections:'..me, sid, u)
local k = p..'user:'..u..':sockets'
redis.call('SADD', k, me..'|'..sid)
redis.call('SET', p..'presence:'..u, 'online|'..now, 'EX', ARGV[6])
if redis.call('SCARD', k) == 1 then
  redis.call('PUBLISH', p..'presence:updates', cjson.encode({user=u, status='online', lastSeen=tonumber(now)}))
end
redis.call('PUBLISH', p..'registry:changes', u)
local out = {0}
if redis.call('SCARD', k) == 1 then out[1] = 1 end
local q = redis.call('LRANGE', p..'offline:'..u, 0, -1)
if #q > 0 then redis.call('DEL', p..'offline:'..u) end
for _, f in ipairs(q) do table.insert(out, f) end
return out
"#;

/// Unregister socket `ARGV[3]` of user `ARGV[4]`; on the user's last socket cluster-wide,
/// record lastSeen and publish offline. ARGV: prefix, server, sid, user, now_ms,
/// retention_secs.
pub const DOWN: &str = concat!(
    lua_unregister!(),
    r#"
local p, me, sid, u, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
redis.call('HDEL', p..'connections:'..me, sid)
if unregister(p, me, sid, u, now, ARGV[6]) then return 1 end
return 0
"#
);

/// Route a 1:1 message: publish envelope `ARGV[4]` to every other server holding a socket
/// of user `ARGV[3]`; return {receivers, "server,server,...", local sids...}, or {-1}
/// after queueing frame `ARGV[7]` when no socket is reachable. ARGV: prefix, server, user, envelope, cap,
/// offline_ttl_secs, frame.
pub const ROUTE: &str = concat!(
    lua_enqueue!(),
    r#"
local p, me, u = ARGV[1], ARGV[2], ARGV[3]
local servers, names, out = {}, {}, {0, ''}
for _, m in ipairs(redis.call('SMEMBERS', p..'user:'..u..':sockets')) do
  local s, sid = string.match(m, '^(.-)|(.*)$')
  if s == me then table.insert(out, sid) elseif s then servers[s] = true end
end
for s, _ in pairs(servers) do
  out[1] = out[1] + redis.call('PUBLISH', p..'server:'..s, ARGV[4])
  table.insert(names, s)
end
out[2] = table.concat(names, ',')
if out[1] == 0 and #out == 2 then
  enqueue(p, u, ARGV[7], ARGV[5], ARGV[6])
  return {-1}
end
return out
"#
);

/// Queue frame `ARGV[5]` for user `ARGV[2]` if the user has no socket anywhere; 1 if queued.
/// ARGV: prefix, user, cap, offline_ttl_secs, frame.
pub const QUEUE_IF_OFFLINE: &str = concat!(
    lua_enqueue!(),
    r#"
local p, u = ARGV[1], ARGV[2]
if redis.call('SCARD', p..'user:'..u..':sockets') > 0 then return 0 end
enqueue(p, u, ARGV[5], ARGV[3], ARGV[4])
return 1
"#
);

/// Remove every registry entry of server `ARGV[2]` if its liveness key is gone (or
/// `ARGV[5]` == 'force': a node clearing its own stale entries after a reconnect). Users
/// left without sockets go offline. Returns the number of sockets removed.
/// ARGV: prefix, server, now_ms, retention_secs, force.
pub const SWEEP: &str = concat!(
    lua_unregister!(),
    r#"
local p, id, now = ARGV[1], ARGV[2], ARGV[3]
if ARGV[5] ~= 'force' and redis.call('EXISTS', p..'node:'..id) == 1 then return 0 end
local conns = redis.call('HGETALL', p..'connections:'..id)
for i = 1, #conns, 2 do
  unregister(p, id, conns[i], conns[i + 1], now, ARGV[4])
end
for _, r in ipairs(redis.call('SMEMBERS', p..'rooms:'..id)) do
  for _, m in ipairs(redis.call('SMEMBERS', p..'room:'..r)) do
    if string.sub(m, 1, #id + 1) == id..'|' then redis.call('SREM', p..'room:'..r, m) end
  end
end
redis.call('DEL', p..'connections:'..id, p..'rooms:'..id)
if ARGV[5] ~= 'force' then redis.call('SREM', p..'nodes', id) end
return #conns / 2
"#
);
