//! Lua scripts the bridge runs with EVAL. Each one is atomic in Redis, which is what makes
//! "first socket of a user" / "last socket" / "no socket anywhere, so queue" decisions
//! correct when several nodes act on the same user at once.
//!
//! Every script declares the keys it touches in KEYS, all of one owner (a user, a room, a
//! server: one hash slot, `docs/redis-cluster.md`), built by `keys.rs`; ARGV carries the
//! prefix (for channel names) and values. A user's keys: `KEYS[1]` = `user:{T:U}:sockets`,
//! `KEYS[2]` = `presence:{T:U}`, `KEYS[3]` = `offline:{T:U}`. Steps two scripts share are
//! Lua functions defined once (the macros below) and prepended with `concat!`. The sweep
//! of a dead server is split in steps of one slot each (LEASE, then DOWN per socket and
//! ROOM_SWEEP per room). The recovery scripts at the end still build keys of several
//! owners themselves: they need a single Redis (`docs/redis-cluster.md`).

/// `announce(p, sh, channel, user, message)`: publishes a registry or presence change of
/// `user`: on the broadcast channel (`PUBLISH`, a single Redis), or with `sh` = '1' on
/// the user's own sharded channel `channel:{user}` (`SPUBLISH`, a Redis Cluster: the
/// channel is in the slot of the user's keys, and only nodes that care subscribe).
macro_rules! lua_announce {
    () => {
        r#"
local function announce(p, sh, ch, u, msg)
  if sh == '1' then
    redis.call('SPUBLISH', p..ch..':{'..u..'}', msg)
  else
    redis.call('PUBLISH', p..ch, msg)
  end
end
"#
    };
}

/// `unregister(sockets, presence, p, server, sid, user, now, ttl, sh)`: removes the socket
/// from the user's set and announces the change; on the user's last socket cluster-wide,
/// records lastSeen and announces offline. Returns true if the user went offline.
macro_rules! lua_unregister {
    () => {
        r#"
local function unregister(k, kp, p, s, sid, u, now, ttl, sh)
  redis.call('SREM', k, s..'|'..sid)
  announce(p, sh, 'registry:changes', u, u)
  if redis.call('SCARD', k) > 0 then return false end
  redis.call('SET', kp, 'offline|'..now, 'EX', ttl)
  announce(p, sh, 'presence:updates', u, cjson.encode({user=u, status='offline', lastSeen=tonumber(now)}))
  return true
end
"#
    };
}

/// `register(sockets, presence, p, server, sid, user, now, ttl, sh)`: adds the socket to
/// the user's set, marks the user online (announcing it on the first socket cluster-wide)
/// and announces the change. Returns true on the user's first socket.
macro_rules! lua_register {
    () => {
        r#"
local function register(k, kp, p, me, sid, u, now, ttl, sh)
  redis.call('SADD', k, me..'|'..sid)
  redis.call('SET', kp, 'online|'..now, 'EX', ttl)
  local first = redis.call('SCARD', k) == 1
  if first then
    announce(p, sh, 'presence:updates', u, cjson.encode({user=u, status='online', lastSeen=tonumber(now)}))
  end
  announce(p, sh, 'registry:changes', u, u)
  return first
end
"#
    };
}

/// `log(key, seq, envelope, maxlen, ttl)`: appends a recoverable message to a log
/// stream under entry id `seq-0`, expiring `ttl` ms after its last message. Once it holds
/// 64 entries more than `maxlen`, the oldest are trimmed in one step down to `maxlen`, and
/// the highest trimmed id is recorded as the stream's `max-deleted-entry-id` (XSETID),
/// which RESUME reads: Redis 7.0 records it for XDEL but not for trimming.
macro_rules! lua_log {
    () => {
        r#"
local function log(key, seq, env, maxlen, ttl)
  redis.call('XADD', key, seq..'-0', 'e', env)
  redis.call('PEXPIRE', key, ttl)
  local extra = redis.call('XLEN', key) - tonumber(maxlen)
  if extra >= 64 then
    local old = redis.call('XRANGE', key, '-', '+', 'COUNT', extra)
    local cut = tonumber(string.match(old[#old][1], '^(%d+)'))
    redis.call('XTRIM', key, 'MINID', (cut + 1)..'-0')
    redis.call('XSETID', key, seq..'-0', 'MAXDELETEDID', cut..'-0')
  end
end
"#
    };
}

/// `servers(set)`: the distinct servers of a set of sockets (`server|sid` members).
macro_rules! lua_servers {
    () => {
        r#"
local function servers(k)
  local seen, names = {}, {}
  for _, m in ipairs(redis.call('SMEMBERS', k)) do
    local s = string.match(m, '^(.-)|')
    if s and not seen[s] then
      seen[s] = true
      table.insert(names, s)
    end
  end
  return names
end
"#
    };
}

/// `enqueue(queue, frame, cap, ttl)`: appends to a user's bounded offline queue.
macro_rules! lua_enqueue {
    () => {
        r#"
local function enqueue(q, frame, cap, ttl)
  redis.call('RPUSH', q, frame)
  redis.call('LTRIM', q, -tonumber(cap), -1)
  redis.call('EXPIRE', q, ttl)
end
"#
    };
}

/// Register socket `ARGV[3]` of user `ARGV[4]` on server `ARGV[2]`; mark online (publishing
/// on the user's first socket cluster-wide); return {1 if it was the first socket else 0,
/// the user's offline queue...} and clear the queue.
/// KEYS: the user's. ARGV: prefix, server, sid, user, now_ms, presence_ttl_secs,
/// sharded ('1' on a Redis Cluster: see `announce`), and 'drop' to delete the queue
/// instead (a restored session on a Redis Cluster: its messages are in the user's log).
pub const UP: &str = concat!(
    lua_announce!(),
    lua_register!(),
    r#"
local p, me, sid, u, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local out = {0}
if register(KEYS[1], KEYS[2], p, me, sid, u, now, ARGV[6], ARGV[7]) then out[1] = 1 end
if ARGV[8] == 'drop' then
  redis.call('DEL', KEYS[3])
  return out
end
local q = redis.call('LRANGE', KEYS[3], 0, -1)
if #q > 0 then redis.call('DEL', KEYS[3]) end
for _, f in ipairs(q) do table.insert(out, f) end
return out
"#
);

/// Unregister socket `ARGV[3]` of user `ARGV[4]`; on the user's last socket cluster-wide,
/// record lastSeen and publish offline; 1 if the user went offline. The sweep of a dead
/// server runs it for each of its sockets. KEYS: the user's sockets and presence.
/// ARGV: prefix, server, sid, user, now_ms, retention_secs, sharded.
pub const DOWN: &str = concat!(
    lua_announce!(),
    lua_unregister!(),
    r#"
if unregister(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]) then return 1 end
return 0
"#
);

/// Route a 1:1 message: publish envelope `ARGV[4]` to every other server holding a socket
/// of user `ARGV[3]`; return {receivers, "server,server,...", local sids...}, or {-1}
/// after queueing frame `ARGV[7]` when no socket is reachable. With `ARGV[8]` = '0' (a
/// Redis Cluster: a script may not publish on another slot's sharded channel) nothing is
/// published: the caller publishes to the servers returned, and the frame is queued here
/// only when the user has no socket at all. KEYS: the user's sockets and queue.
/// ARGV: prefix, server, user, envelope, cap, offline_ttl_secs, frame, publish.
pub const ROUTE: &str = concat!(
    lua_enqueue!(),
    r#"
local p, me = ARGV[1], ARGV[2]
local servers, names, out = {}, {}, {0, ''}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local s, sid = string.match(m, '^(.-)|(.*)$')
  if s == me then table.insert(out, sid) elseif s then servers[s] = true end
end
for s, _ in pairs(servers) do
  if ARGV[8] == '1' then out[1] = out[1] + redis.call('PUBLISH', p..'server:{'..s..'}', ARGV[4]) end
  table.insert(names, s)
end
out[2] = table.concat(names, ',')
if out[1] == 0 and #out == 2 and (ARGV[8] == '1' or #names == 0) then
  enqueue(KEYS[2], ARGV[7], ARGV[5], ARGV[6])
  return {-1}
end
return out
"#
);

/// Queue frame `ARGV[3]` if the user has no socket anywhere; 1 if queued. KEYS: the
/// user's sockets and queue. ARGV: cap, offline_ttl_secs, frame.
pub const QUEUE_IF_OFFLINE: &str = concat!(
    lua_enqueue!(),
    r#"
if redis.call('SCARD', KEYS[1]) > 0 then return 0 end
enqueue(KEYS[2], ARGV[3], ARGV[1], ARGV[2])
return 1
"#
);

/// The sweep of a dead server (`docs/redis-cluster.md`): a lease on it, taken only if
/// its liveness key is gone. 1 when the caller holds the lease and sweeps.
/// KEYS: `node:{S}`, `sweep:{S}` (one slot). ARGV: sweeper, lease_ms.
pub const LEASE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
return 1
"#;

/// A node's liveness refresh: sets its liveness key unless a sweep of it is running.
/// Returns 1 if the key was still there (nothing of the node can have been swept), 0 if
/// it had expired, 2 if a sweeper holds the lease (the key is not set: the node waits
/// for the sweep to end, then registers everything again).
/// KEYS: `node:{S}`, `sweep:{S}`. ARGV: ttl_ms.
pub const ALIVE: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
local was = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return was
"#;

/// Removes every member `ARGV[1]|...` (server `ARGV[1]`'s sockets) from room `KEYS[1]`;
/// returns how many.
pub const ROOM_SWEEP: &str = r#"
local n = 0
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if string.sub(m, 1, #ARGV[1] + 1) == ARGV[1]..'|' then
    redis.call('SREM', KEYS[1], m)
    n = n + 1
  end
end
return n
"#;

// ---- connection state recovery (docs/recovery.md) ----
//
// One sequence, `{recovery}:seq`, orders every recoverable message of the cluster: Redis
// runs one script at a time and a subscriber receives pushes in execution order, so every
// node sees recoverable messages in sequence order. Every recovery key is in the
// `{recovery}` slot, so that on a Redis Cluster one master keeps that order too. Logs:
// `{recovery}:log:room:T:R`, `{recovery}:log:user:T:U` (streams, entry id `seq-0`, field
// `e` = the envelope). Sessions: `{recovery}:session:PID` (hash: `user`, `from` = the
// sequence when it began, `sid`), `{recovery}:session:PID:rooms` (room -> sequence at
// the join), and per user `{recovery}:sessions:T:U` (the sockets holding a session).

/// Open a recovery session for user `ARGV[1]` on socket `ARGV[3]` (`server|sid`),
/// expiring in `ARGV[2]` ms. KEYS: the session, the sequence, the user's sessions.
pub const SESSION_OPEN: &str = r#"
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'from', redis.call('GET', KEYS[2]) or '0', 'sid', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
"#;

/// Socket `ARGV[1]` (`server|sid`) of a session closed: the session expires in `ARGV[2]`
/// ms, or is deleted (`del`), unless another socket has restored it since.
/// KEYS: the session, its rooms, the user's sessions.
pub const SESSION_CLOSE: &str = r#"
redis.call('SREM', KEYS[3], ARGV[1])
local at = redis.call('HGET', KEYS[1], 'sid')
if at and at ~= ARGV[1] then return 0 end
if ARGV[2] == 'del' then
  redis.call('DEL', KEYS[1], KEYS[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"#;

/// A session joined room `ARGV[1]` now (the current sequence).
/// KEYS: the session's rooms, the sequence. ARGV: room, ttl_ms.
pub const SESSION_JOIN: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], redis.call('GET', KEYS[2]) or '0')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
"#;

/// A recoverable room message: next sequence number, logged in the room's log, published
/// as `S<seq> <envelope>` on channel `ARGV[4]` with command `ARGV[5]` (`PUBLISH`, or
/// `SPUBLISH` of the room's `{recovery}` channel on a Redis Cluster). Returns the
/// receivers. KEYS: the sequence, the room's log. ARGV: envelope, log_len, log_ttl_ms,
/// channel, publish command.
pub const LOG_ROOM: &str = concat!(
    lua_log!(),
    r#"
local seq = redis.call('INCR', KEYS[1])
log(KEYS[2], seq, ARGV[1], ARGV[2], ARGV[3])
return redis.call(ARGV[5], ARGV[4], 'S'..seq..' '..ARGV[1])
"#
);

/// A recoverable 1:1 message on a Redis Cluster: next sequence number, logged in the
/// recipient's log, published with SPUBLISH as `S<seq> <envelope>` on the `{recovery}`
/// channel of every server holding a session of the user (this one included: it
/// delivers its own from its channel, in order). The sessions are in this slot, so
/// choosing the receivers and numbering the message are one step. Returns {receivers,
/// "server,..."}, or {-1, payload} when nobody is reachable (the caller queues it on the
/// user's slot). KEYS: the sequence, the user's log, the user's sessions.
/// ARGV: prefix, envelope, log_len, log_ttl_ms.
pub const LOG_USER: &str = concat!(
    lua_log!(),
    lua_servers!(),
    r#"
local p = ARGV[1]
local seq = redis.call('INCR', KEYS[1])
log(KEYS[2], seq, ARGV[2], ARGV[3], ARGV[4])
local payload = 'S'..seq..' '..ARGV[2]
local names, reached = servers(KEYS[3]), 0
for _, s in ipairs(names) do
  reached = reached + redis.call('SPUBLISH', p..'{recovery}:server:'..s, payload)
end
if reached == 0 then return {-1, payload} end
return {reached, table.concat(names, ',')}
"#
);

/// A recoverable 1:1 message: next sequence number, logged in the recipient's log,
/// published as `S<seq> <envelope>` to every server holding a socket of the user (this
/// one included: it delivers its own from its channel, in order). Returns {receivers,
/// "server,..."}, or {-1} after queueing the logged payload when nobody is reachable.
/// KEYS: the user's sockets and queue. ARGV: prefix, user, envelope, cap,
/// offline_ttl_secs, log_len, log_ttl_ms.
pub const ROUTE_LOGGED: &str = concat!(
    lua_enqueue!(),
    lua_log!(),
    lua_servers!(),
    r#"
local p, u = ARGV[1], ARGV[2]
local seq = redis.call('INCR', p..'{recovery}:seq')
log(p..'{recovery}:log:user:'..u, seq, ARGV[3], ARGV[6], ARGV[7])
local payload = 'S'..seq..' '..ARGV[3]
local names, reached = servers(KEYS[1]), 0
for _, s in ipairs(names) do
  reached = reached + redis.call('PUBLISH', p..'server:{'..s..'}', payload)
end
if reached == 0 then
  enqueue(KEYS[2], payload, ARGV[4], ARGV[5])
  return {-1}
end
return {reached, table.concat(names, ',')}
"#
);

/// The rooms of a session if it belongs to user `ARGV[1]`: {'ok', room...}, or
/// {'unknown'} / {'other_user'}. KEYS: the session, its rooms.
pub const SESSION_READ: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'user')
if not owner then return {'unknown'} end
if owner ~= ARGV[1] then return {'other_user'} end
local out = {'ok'}
for _, r in ipairs(redis.call('HKEYS', KEYS[2])) do table.insert(out, r) end
return out
"#;

/// `replay(p, session, user, offset)`: every logged message of the user's log and of the
/// session's rooms after the client's offset (or, without one, after the session began;
/// for a room, never before its join), merged in sequence order; or nil and 'unknown',
/// 'other_user' or 'trimmed' (a log lost entries after the offset).
/// `move(p, session, user, socket, ttl)`: points the session (and the user's sessions
/// set) at `socket` (`server|sid`), both expiring in `ttl` ms.
macro_rules! lua_replay {
    () => {
        r#"
local function replay(p, k, u, offset)
  local owner = redis.call('HGET', k, 'user')
  if not owner then return nil, 'unknown' end
  if owner ~= u then return nil, 'other_user' end
  local from = tonumber(offset) or tonumber(redis.call('HGET', k, 'from')) or 0
  local streams = {{p..'{recovery}:log:user:'..u, from}}
  local rooms = redis.call('HGETALL', k..':rooms')
  for i = 1, #rooms, 2 do
    table.insert(streams, {p..'{recovery}:log:room:'..rooms[i], math.max(from, tonumber(rooms[i + 1]) or 0)})
  end
  for _, s in ipairs(streams) do
    if redis.call('EXISTS', s[1]) == 1 then
      local info = redis.call('XINFO', 'STREAM', s[1])
      for i = 1, #info, 2 do
        if info[i] == 'max-deleted-entry-id' then
          if (tonumber(string.match(info[i + 1], '^(%d+)')) or 0) > s[2] then return nil, 'trimmed' end
        end
      end
    end
  end
  local entries = {}
  for _, s in ipairs(streams) do
    for _, e in ipairs(redis.call('XRANGE', s[1], '('..s[2]..'-0', '+')) do
      table.insert(entries, {tonumber(string.match(e[1], '^(%d+)')), e[2][2]})
    end
  end
  table.sort(entries, function(a, b) return a[1] < b[1] end)
  return entries
end
local function move(p, k, u, at, ttl)
  local ks = p..'{recovery}:sessions:'..u
  local old = redis.call('HGET', k, 'sid')
  if old then redis.call('SREM', ks, old) end
  redis.call('SADD', ks, at)
  redis.call('PEXPIRE', ks, ttl)
  redis.call('HSET', k, 'sid', at)
  redis.call('PEXPIRE', k, ttl)
  redis.call('PEXPIRE', k..':rooms', ttl)
end
local function answer(seq, first, entries)
  local out = {'ok', seq or '0', first}
  for _, e in ipairs(entries) do
    table.insert(out, tostring(e[1]))
    table.insert(out, e[2])
  end
  return out
end
"#
    };
}

/// Restore session `ARGV[7]` on socket `ARGV[3]` of user `ARGV[4]` (single Redis): the
/// replay, the socket registered (as UP), the offline queue dropped (its messages are in
/// the user's log), the session pointed at the socket; last, a marker `M<sid>` on this
/// node's channel: when the node receives it, it has received every push up to the
/// returned sequence. Returns {'ok', current sequence, first socket 0/1, seq, envelope,
/// seq, envelope...}, or {'unknown'}, {'other_user'}, {'trimmed'}, registering nothing.
/// KEYS: the user's. ARGV: prefix, server, sid, user, now_ms, presence_ttl_secs, pid,
/// offset or '', session_ttl_ms.
pub const RESUME: &str = concat!(
    lua_announce!(),
    lua_register!(),
    lua_replay!(),
    r#"
local p, me, sid, u, now, pid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[7]
local k = p..'{recovery}:session:'..pid
local entries, err = replay(p, k, u, ARGV[8])
if not entries then return {err} end
local first = register(KEYS[1], KEYS[2], p, me, sid, u, now, ARGV[6], '0')
redis.call('DEL', KEYS[3])
move(p, k, u, me..'|'..sid, ARGV[9])
redis.call('PUBLISH', p..'server:{'..me..'}', 'M'..sid)
return answer(redis.call('GET', p..'{recovery}:seq'), first and 1 or 0, entries)
"#
);

/// RESUME on a Redis Cluster, the recovery slot's half: the replay, the session pointed
/// at socket `ARGV[3]`, and the marker `M<sid>` on this node's `{recovery}` channel
/// (the registration runs after it, on the user's slot). Returns as RESUME, with 0 for
/// the first-socket flag. KEYS: the session, the sequence. ARGV: prefix, server, sid,
/// user, offset or '', session_ttl_ms.
pub const RESUME_LOG: &str = concat!(
    lua_replay!(),
    r#"
local p, me, sid, u = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local entries, err = replay(p, KEYS[1], u, ARGV[5])
if not entries then return {err} end
move(p, KEYS[1], u, me..'|'..sid, ARGV[6])
redis.call('SPUBLISH', p..'{recovery}:server:'..me, 'M'..sid)
return answer(redis.call('GET', KEYS[2]), 0, entries)
"#
);

/// Every script, loaded on each Redis (each master of a Redis Cluster) when the bridge
/// connects to it: batches then carry `EVALSHA` and the script's SHA-1 instead of its
/// text (about 900 bytes fewer per call, and Redis skips hashing the text).
pub const ALL: [&str; 16] = [
    UP,
    DOWN,
    ROUTE,
    QUEUE_IF_OFFLINE,
    LEASE,
    ALIVE,
    ROOM_SWEEP,
    SESSION_OPEN,
    SESSION_CLOSE,
    SESSION_JOIN,
    LOG_ROOM,
    ROUTE_LOGGED,
    SESSION_READ,
    RESUME,
    LOG_USER,
    RESUME_LOG,
];

/// (SHA-1 in hex, text) of every script in [`ALL`].
fn table() -> &'static [(String, &'static str)] {
    static TABLE: std::sync::OnceLock<Vec<(String, &'static str)>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| ALL.iter().map(|s| (sha1_hex(s.as_bytes()), *s)).collect())
}

fn sha1_hex(text: &[u8]) -> String {
    use sha1::Digest;
    sha1::Sha1::digest(text).iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-1 `EVALSHA` names `script` by, if it is one of [`ALL`].
pub fn sha_of(script: &[u8]) -> Option<&'static str> {
    let t = table();
    let same = |text: &str| text.as_ptr() == script.as_ptr() && text.len() == script.len();
    t.iter()
        .find(|(_, text)| same(text))
        .or_else(|| t.iter().find(|(_, text)| text.as_bytes() == script))
        .map(|(sha, _)| sha.as_str())
}

/// The text of the script whose SHA-1 is `sha` (to send it again as `EVAL` when Redis
/// answered `NOSCRIPT`: a script cache flushed behind the bridge's back).
pub fn text_of(sha: &[u8]) -> Option<&'static str> {
    table().iter().find(|(s, _)| s.as_bytes() == sha).map(|(_, text)| *text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_is_named_by_its_sha1() {
        // `redis-cli SCRIPT LOAD` of the same text gives the same name.
        let sha = sha_of(UP.as_bytes()).unwrap();
        assert_eq!(sha.len(), 40);
        assert_eq!(text_of(sha.as_bytes()), Some(UP));
        assert_eq!(sha_of(UP.to_string().as_bytes()), Some(sha), "found by content too");
        assert_eq!(sha_of(b"return 1"), None);
        assert_eq!(sha1_hex(b"return 1"), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
        let mut names: Vec<&str> = ALL.iter().map(|s| sha_of(s.as_bytes()).unwrap()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }
}
