//! The commands of connection state recovery (`docs/recovery.md`): sessions kept in
//! Redis as they change, and recoverable messages numbered and logged. Restoring a
//! session is `recover.rs`'s; this module only plans commands.
//!
//! Every recovery key is in the `{recovery}` slot. On a single Redis the recoverable
//! pushes use the node and room channels; on a Redis Cluster they use channels of the
//! recovery slot (`{recovery}:server:S`, `{recovery}:room:T:R`), so that one master
//! publishes them all, in sequence order, and a node receives them on one connection.

use std::sync::Arc;

use shardgate_io::envelope::LoggedRoom;
use shardgate_shard::metrics::Counter;
use shardgate_shard::msg::{Frame, Key, SocketRef};

use super::batch::{Batch, Then};
use super::keys::{redis_id, Keys};
use super::scripts;
use super::state::Cluster;

/// Lifetime of a connected session's keys (ms, as text).
fn live_ttl(c: &Cluster) -> String {
    c.settings.recovery.map(|r| r.live_ttl_ms.to_string()).unwrap_or_default()
}

/// Opens session `pid` of `user` on socket `sid` of this node.
pub fn session_open(c: &Cluster, batch: &mut Batch, user: &Key, sid: &str, pid: &str) {
    let (k1, k2, k3) = (c.keys.session(pid), c.keys.recovery_seq(), c.keys.sessions_of(user));
    let at = Keys::room_member(c.me(), sid);
    let args = ["EVAL", scripts::SESSION_OPEN, "3", &k1, &k2, &k3, &redis_id(user), &live_ttl(c), &at];
    batch.cmd(&args, Then::Ignore);
}

/// Socket `sid` of session `pid` closed: the session stays recoverable for
/// `max_disconnection_ms` (`keep`), or is deleted (the client's own goodbye).
pub fn session_close(c: &Cluster, batch: &mut Batch, user: &Key, sid: &str, pid: &str, keep: bool) {
    let Some(r) = c.settings.recovery else { return };
    let ttl = if keep { r.max_disconnection_ms.to_string() } else { "del".to_string() };
    let (k1, k2, k3) = (c.keys.session(pid), c.keys.session_rooms(pid), c.keys.sessions_of(user));
    let at = Keys::room_member(c.me(), sid);
    batch.cmd(&["EVAL", scripts::SESSION_CLOSE, "3", &k1, &k2, &k3, &at, &ttl], Then::Ignore);
}

/// Session `pid` joined `room` now.
pub fn session_join(c: &Cluster, batch: &mut Batch, pid: &str, room: &Key) {
    let (k1, k2) = (c.keys.session_rooms(pid), c.keys.recovery_seq());
    batch.cmd(&["EVAL", scripts::SESSION_JOIN, "2", &k1, &k2, &redis_id(room), &live_ttl(c)], Then::Ignore);
}

/// Reads session `pid` for a claim by socket `sid` of `user` (SESSION_READ).
pub fn session_read(
    c: &Cluster,
    batch: &mut Batch,
    user: Key,
    sid: String,
    socket: SocketRef,
    pid: Arc<str>,
    offset: Option<u64>,
) {
    let (k1, k2, u) = (c.keys.session(&pid), c.keys.session_rooms(&pid), redis_id(&user));
    let then = Then::ResumeRead { sid, socket, user, pid, offset };
    batch.cmd(&["EVAL", scripts::SESSION_READ, "2", &k1, &k2, &u], then);
}

/// Keeps the sessions of connected sockets (and each local user's session set) alive.
pub fn refresh_sessions(c: &Cluster, batch: &mut Batch) {
    let live = live_ttl(c);
    let (pids, users): (Vec<Arc<str>>, Vec<Key>) = {
        let m = c.mirror.borrow();
        (m.pids().cloned().collect(), m.users().cloned().collect())
    };
    for pid in pids {
        batch.cmd(&["PEXPIRE", &c.keys.session(&pid), &live], Then::Ignore);
        batch.cmd(&["PEXPIRE", &c.keys.session_rooms(&pid), &live], Then::Ignore);
    }
    for user in users {
        batch.cmd(&["PEXPIRE", &c.keys.sessions_of(&user), &live], Then::Ignore);
    }
}

/// A recoverable room message (LOG_ROOM): numbered, logged, published on the room's
/// channel of recoverable messages; the sender hears `sent` once it is logged.
pub fn log_room(c: &Cluster, batch: &mut Batch, room: &Key, frame: &Frame, msg_id: u128, origin: SocketRef) {
    let Some(r) = c.settings.recovery else { return };
    c.m().inc(Counter::RecoveryLogged);
    let env = LoggedRoom { origin_server: c.me(), origin: origin.remote(), frame };
    let env = env.to_vec().unwrap_or_default();
    let (k1, k2, len) = (c.keys.recovery_seq(), c.keys.room_log(room), r.log_len.to_string());
    let (channel, live) = (c.room_channel(room), live_ttl(c));
    let args: [&[u8]; 10] = [
        b"EVAL",
        scripts::LOG_ROOM.as_bytes(),
        b"2",
        k1.as_bytes(),
        k2.as_bytes(),
        &env,
        len.as_bytes(),
        live.as_bytes(),
        channel.as_bytes(),
        c.publish(),
    ];
    batch.cmd(&args, Then::Logged { origin, msg_id });
}

/// A recoverable 1:1 message: always through Redis (the script gives it its sequence
/// number and logs it), delivered by every node holding the user's sockets, this one
/// included, from its channel; the route cache is not used. On a single Redis the
/// ROUTE_LOGGED script also finds the receivers in the user's socket set and queues the
/// message when nobody is reachable; on a Redis Cluster LOG_USER finds them in the
/// user's session set (in the recovery slot) and the queueing is a follow-up on the
/// user's slot.
pub fn route_logged(
    c: &Cluster,
    batch: &mut Batch,
    user: Key,
    frame: &Frame,
    msg_id: u128,
    origin: SocketRef,
) {
    let (s, Some(r)) = (&c.settings, c.settings.recovery) else { return };
    c.m().inc(Counter::RecoveryLogged);
    let env = c.deliver_envelope(&user, msg_id, origin, frame);
    let (len, live) = (r.log_len.to_string(), r.live_ttl_ms.to_string());
    if c.sharded.get() {
        let (k1, k2, k3) = (c.keys.recovery_seq(), c.keys.user_log(&user), c.keys.sessions_of(&user));
        let args: [&[u8]; 10] = [
            b"EVAL",
            scripts::LOG_USER.as_bytes(),
            b"3",
            k1.as_bytes(),
            k2.as_bytes(),
            k3.as_bytes(),
            c.keys.prefix().as_bytes(),
            &env,
            len.as_bytes(),
            live.as_bytes(),
        ];
        batch.cmd(&args, Then::LoggedUser { origin, msg_id, user });
        return;
    }
    let (cap, ttl) = (s.offline_queue_len.max(1).to_string(), s.offline_ttl_secs.to_string());
    let u = redis_id(&user);
    let (k1, k2) = (c.keys.user_sockets(&user), c.keys.offline(&user));
    let args: [&[u8]; 12] = [
        b"EVAL",
        scripts::ROUTE_LOGGED.as_bytes(),
        b"2",
        k1.as_bytes(),
        k2.as_bytes(),
        c.keys.prefix().as_bytes(),
        u.as_bytes(),
        &env,
        cap.as_bytes(),
        ttl.as_bytes(),
        len.as_bytes(),
        live.as_bytes(),
    ];
    batch.cmd(&args, Then::Logged { origin, msg_id });
}
