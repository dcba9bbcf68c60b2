//! The planner: turns each message from the shards into pipelined Redis commands, each
//! with what to do with its reply (a [`Then`] in a [`Batch`], carried out by `apply.rs`).
//!
//! Planning is synchronous and touches only the bridge's own state: it updates the
//! mirror first, answers what needs no Redis (room joins of an already subscribed room,
//! 1:1 messages whose route is cached and local), and appends commands to a [`Batch`].

use std::rc::Rc;
use std::sync::Arc;

use shardgate_io::envelope::{Envelope, RoomEnvelope};
use shardgate_shard::metrics::Counter;
use shardgate_shard::msg::{BridgeMsg, Frame, Key, ShardMsg, SocketRef};
use shardgate_shard::shared::wall_ms;

use super::batch::{Batch, Then};
use super::keys::{redis_id, Keys};
use super::logged;
use super::scripts;
use super::state::Cluster;

/// Why a socket is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// A new connection: its CONNECT is answered once registered, with the offline queue.
    New,
    /// Again, after a Redis reconnect: the offline queue (if any) is drained to it.
    Again,
    /// A restored recovery session on a Redis Cluster: the offline queue is dropped (its
    /// messages are in the user's log, replayed).
    Restored,
}

/// Registers socket `sid` of `user`: in the server's socket list (for its sweep), then
/// the UP script on the user's keys.
pub fn register(c: &Cluster, batch: &mut Batch, user: &Key, sid: &str, socket: SocketRef, how: Registration) {
    let queue = if how == Registration::Restored { "drop" } else { "" };
    let then = Then::Drain { socket, answer: how == Registration::New, user: user.clone() };
    registration(c, batch, scripts::UP, user, sid, &[c.per_user(), queue], then);
}

/// A registering script (UP, or RESUME on a single Redis) for socket `sid` of `user`,
/// after the socket's entry in the server's socket list: KEYS the user's, ARGV prefix,
/// server, sid, user, now, presence lifetime, then `extra`.
pub fn registration(
    c: &Cluster,
    batch: &mut Batch,
    script: &str,
    user: &Key,
    sid: &str,
    extra: &[&str],
    then: Then,
) {
    let s = &c.settings;
    let (now, ttl, u) = (wall_ms().to_string(), s.presence_ttl_secs.to_string(), redis_id(user));
    batch.cmd(&["HSET", &c.keys.connections(c.me()), sid, &u], Then::Ignore);
    let [k1, k2, k3] = c.keys.user_keys(user);
    let mut args = vec!["EVAL", script, "3", &k1, &k2, &k3, c.keys.prefix(), c.me(), sid, &u, &now, &ttl];
    args.extend_from_slice(extra);
    batch.cmd(&args, then);
}

/// Unregisters socket `sid` of `user` on `server` (the DOWN script on the user's keys);
/// the socket list of the server is the caller's.
pub fn unregister(c: &Cluster, batch: &mut Batch, server: &str, user: &Key, sid: &str, then: Then) {
    let (now, retention) = (wall_ms().to_string(), c.settings.presence_retention_secs.to_string());
    let (k1, k2) = (c.keys.user_sockets(user), c.keys.presence(user));
    let args = [
        "EVAL",
        scripts::DOWN,
        "2",
        &k1,
        &k2,
        c.keys.prefix(),
        server,
        sid,
        &redis_id(user),
        &now,
        &retention,
        c.per_user(),
    ];
    batch.cmd(&args, then);
}

/// Refreshes the presence key of every user with local sockets, and the recovery
/// sessions of the sockets.
pub fn refresh_presence(c: &Cluster, batch: &mut Batch) {
    let (ts, ttl) = (wall_ms(), c.settings.presence_ttl_secs.to_string());
    let users: Vec<Key> = c.mirror.borrow().users().cloned().collect();
    for u in users {
        batch.cmd(&["SET", &c.keys.presence(&u), &format!("online|{ts}"), "EX", &ttl], Then::Ignore);
    }
    if c.settings.recovery.is_some() {
        logged::refresh_sessions(c, batch);
    }
}

/// Reads the presence of users whose watchers waited for the presence channel.
pub fn plan_watches(c: &Cluster, batch: &mut Batch) {
    let ready = std::mem::take(&mut *c.ready_watches.borrow_mut());
    for (user, socket) in ready {
        batch.cmd(&["GET", &c.keys.presence(&user)], Then::Presence { user, socket });
    }
}

/// Turns one shard message into commands.
pub fn plan(c: &Cluster, msg: BridgeMsg, batch: &mut Batch) {
    let s = &c.settings;
    let me = c.me();
    // The socket's recovery session, read before the mirror forgets a closed socket.
    let pid = match &msg {
        BridgeMsg::SocketDown { sid, .. }
        | BridgeMsg::RoomJoin { sid, .. }
        | BridgeMsg::RoomLeave { sid, .. } => c.mirror.borrow().pid(sid),
        _ => None,
    };
    c.mirror.borrow_mut().observe(&msg);
    match msg {
        BridgeMsg::SocketUp { user, sid, socket, pid } => {
            register(c, batch, &user, &sid, socket, Registration::New);
            if let Some(pid) = pid {
                logged::session_open(c, batch, &user, &sid, &pid);
            }
        }
        BridgeMsg::SocketDown { user, sid, keep, .. } => {
            // A claim still open for this socket ends with it.
            let rooms = c.claims.borrow_mut().cancel(&sid);
            for room in rooms {
                plan(c, BridgeMsg::RoomLeave { room, sid: sid.clone(), forget: false }, batch);
            }
            batch.cmd(&["HDEL", &c.keys.connections(me), &sid], Then::Ignore);
            unregister(c, batch, me, &user, &sid, Then::Down(user.clone()));
            if let Some(pid) = pid {
                logged::session_close(c, batch, &user, &sid, &pid, keep);
            }
        }
        BridgeMsg::Resume { user, sid, socket, pid, offset } => {
            logged::session_read(c, batch, user, sid, socket, pid, offset)
        }
        BridgeMsg::RoomLogged { room, frame, msg_id, origin } => {
            logged::log_room(c, batch, &room, &frame, msg_id, origin)
        }
        BridgeMsg::RoomJoin { room, sid, socket, ack } => {
            batch.cmd(&["SADD", &c.keys.room(&room), &Keys::room_member(me, &sid)], Then::Ignore);
            if let Some(pid) = &pid {
                logged::session_join(c, batch, pid, &room);
            }
            let channel = c.room_channel(&room);
            let first = c.mirror.borrow().members(&room) == 1;
            let mut pending = c.pending_subs.borrow_mut();
            if first {
                batch.cmd(&["SADD", &c.keys.server_rooms(me), &redis_id(&room)], Then::Ignore);
                c.subscribe(true, &channel);
                pending.entry(channel).or_default().push((socket, room, ack));
            } else if let Some(waiters) = pending.get_mut(&channel) {
                waiters.push((socket, room, ack));
            } else {
                c.shared.mesh.send(socket.shard, ShardMsg::RoomReady { conn: socket.conn, room, ack });
            }
        }
        BridgeMsg::RoomLeave { room, sid, forget } => {
            batch.cmd(&["SREM", &c.keys.room(&room), &Keys::room_member(me, &sid)], Then::Ignore);
            if let (Some(pid), true) = (&pid, forget) {
                batch.cmd(&["HDEL", &c.keys.session_rooms(pid), &redis_id(&room)], Then::Ignore);
            }
            if c.mirror.borrow().members(&room) == 0 {
                batch.cmd(&["SREM", &c.keys.server_rooms(me), &redis_id(&room)], Then::Ignore);
                c.subscribe(false, &c.room_channel(&room));
            }
        }
        BridgeMsg::RoomPublish { room, frame } => {
            let env = RoomEnvelope { origin_server: me, frame: &frame }.to_vec().unwrap_or_default();
            batch.cmd(&[c.publish(), c.keys.room(&room).as_bytes(), &env], Then::Ignore);
        }
        BridgeMsg::ToUser { user, frame, msg_id, origin } if s.recovery.is_some() => {
            logged::route_logged(c, batch, user, &frame, msg_id, origin)
        }
        BridgeMsg::ToUser { user, frame, msg_id, origin } => route(c, batch, user, frame, msg_id, origin),
        BridgeMsg::Ack { origin, msg_id, status } => {
            let Some(server) = origin.server.as_deref() else { return };
            let at = SocketRef { shard: origin.shard, conn: origin.conn }.remote();
            let env = Envelope::Ack { msg_id, origin: at, status: status.into() };
            let env = env.to_vec().unwrap_or_default();
            batch.cmd(&[c.publish(), c.keys.server(server).as_bytes(), &env], Then::Ignore);
        }
        BridgeMsg::Bounce { user, frame, msg_id, origin } => {
            let (cap, ttl) = (s.offline_queue_len.max(1).to_string(), s.offline_ttl_secs.to_string());
            let (k1, k2) = (c.keys.user_sockets(&user), c.keys.offline(&user));
            let args: [&[u8]; 8] = [
                b"EVAL",
                scripts::QUEUE_IF_OFFLINE.as_bytes(),
                b"2",
                k1.as_bytes(),
                k2.as_bytes(),
                cap.as_bytes(),
                ttl.as_bytes(),
                &frame,
            ];
            batch.cmd(&args, Then::Bounced { origin, msg_id });
        }
        BridgeMsg::Watch { user, socket } => {
            let first = c.watch(&user, true);
            if c.sharded.get() {
                // The first watcher of a user subscribes to its presence channel; the
                // state is read once the subscription is live (no change falls between).
                let channel = c.keys.user_presence(&user);
                if first {
                    c.subscribe(true, &channel);
                }
                let mut waiting = c.watch_waiters.borrow_mut();
                if first || waiting.contains_key(&channel) {
                    waiting.entry(channel).or_default().push((user, socket));
                    return;
                }
            }
            batch.cmd(&["GET", &c.keys.presence(&user)], Then::Presence { user, socket });
        }
        BridgeMsg::Unwatch { user } => {
            if c.watch(&user, false) && c.sharded.get() {
                c.subscribe(false, &c.keys.user_presence(&user));
            }
        }
        BridgeMsg::Typing { room, user, on } => {
            let k = c.keys.typing(&room);
            if on {
                let until = (wall_ms() + s.typing_ttl_ms).to_string();
                batch.cmd(&["HSET", &k, &user, &until], Then::Ignore);
                batch.cmd(&["PEXPIRE", &k, &s.typing_ttl_ms.to_string()], Then::Ignore);
            } else {
                batch.cmd(&["HDEL", &k, &user], Then::Ignore);
            }
        }
    }
}

/// Routes a 1:1 message: through the route cache when it knows the recipient's servers,
/// else through the registry (the ROUTE script, which also queues for offline users).
fn route(c: &Cluster, batch: &mut Batch, user: Key, frame: Frame, msg_id: u128, origin: SocketRef) {
    let cached = c.routes.borrow_mut().get(&user);
    if let Some(servers) = cached {
        let local = c.mirror.borrow().shards_of(&user);
        if !(servers.is_empty() && local.is_empty()) {
            c.m().inc(Counter::RouteCacheHits);
            c.deliver(&local, &user, &frame, msg_id, origin.into());
            publish_to_servers(c, batch, &servers, &user, &frame, msg_id, origin, !local.is_empty(), false);
            return;
        }
        c.routes.borrow_mut().invalidate(&user);
    }
    if c.routes.borrow_mut().wants_channel(&user) {
        // A Redis Cluster: routes to this user are cached once its registry channel is.
        c.subscribe(true, &c.keys.user_registry(&user));
    }
    let s = &c.settings;
    let epoch = c.routes.borrow().epoch();
    let env = c.deliver_envelope(&user, msg_id, origin, &frame);
    let (cap, ttl) = (s.offline_queue_len.max(1).to_string(), s.offline_ttl_secs.to_string());
    let u = redis_id(&user);
    let f = frame.clone();
    let (k1, k2) = (c.keys.user_sockets(&user), c.keys.offline(&user));
    let args: [&[u8]; 13] = [
        b"EVAL",
        scripts::ROUTE.as_bytes(),
        b"2",
        k1.as_bytes(),
        k2.as_bytes(),
        c.keys.prefix().as_bytes(),
        c.me().as_bytes(),
        u.as_bytes(),
        &env,
        cap.as_bytes(),
        ttl.as_bytes(),
        &f,
        if c.sharded.get() { b"0" } else { b"1" },
    ];
    batch.cmd(&args, Then::Route { user, frame, msg_id, origin, epoch });
}

/// Publishes a 1:1 message's envelope to each of `servers` (the route cache's, or the
/// registry's on a Redis Cluster), each reply counted in one tally.
#[allow(clippy::too_many_arguments)]
pub fn publish_to_servers(
    c: &Cluster,
    batch: &mut Batch,
    servers: &[Arc<str>],
    user: &Key,
    frame: &Frame,
    msg_id: u128,
    origin: SocketRef,
    local: bool,
    registry: bool,
) {
    let env = c.deliver_envelope(user, msg_id, origin, frame);
    let tally = Rc::new(std::cell::Cell::new((servers.len(), 0)));
    for server in servers {
        let then = Then::Cached {
            user: user.clone(),
            frame: frame.clone(),
            msg_id,
            origin,
            tally: tally.clone(),
            local,
            registry,
        };
        batch.cmd(&[c.publish(), c.keys.server(server).as_bytes(), &env], then);
    }
}

/// Appends `frame` to `user`'s bounded offline queue (the ROUTE script's `enqueue`, as
/// commands on the user's slot).
pub fn enqueue(c: &Cluster, batch: &mut Batch, user: &Key, frame: &Frame) {
    let s = &c.settings;
    let q = c.keys.offline(user);
    let cap = format!("-{}", s.offline_queue_len.max(1));
    batch.cmd(&[b"RPUSH".as_slice(), q.as_bytes(), frame], Then::Ignore);
    batch.cmd(&["LTRIM", &q, &cap, "-1"], Then::Ignore);
    batch.cmd(&["EXPIRE", &q, &s.offline_ttl_secs.to_string()], Then::Ignore);
}

/// Other servers as the ROUTE script lists them (`a,b,c`).
pub fn parse_servers(csv: &str) -> Rc<[Arc<str>]> {
    csv.split(',').filter(|s| !s.is_empty()).map(Arc::from).collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cluster, commands, commands_raw, drain_shard};
    use super::*;
    use shardgate_io::envelope::{AckStatus, RemoteSocket};
    use shardgate_shard::msg::{key, DeliveryStatus, Origin};
    use shardgate_shard::ConnId;

    fn socket() -> SocketRef {
        SocketRef { shard: 0, conn: ConnId::from_u64(7) }
    }

    #[test]
    fn socket_up_registers_through_the_up_script() {
        let c = cluster();
        let mut b = Batch::default();
        plan(
            &c,
            BridgeMsg::SocketUp { user: key("t", "bob"), sid: "00ab".into(), socket: socket(), pid: None },
            &mut b,
        );
        let cmds = commands(&b);
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0], ["HSET", "p:connections:{me}", "00ab", "t:bob"]);
        // By the script's SHA-1 (loaded on connect), not its text.
        assert_eq!(
            (cmds[1][0].as_str(), cmds[1][1].as_str(), cmds[1][2].as_str()),
            ("EVALSHA", scripts::sha_of(scripts::UP.as_bytes()).unwrap(), "3")
        );
        // The user's keys, all in one slot (the hash tag), then the values.
        assert_eq!(&cmds[1][3..6], ["p:user:{t:bob}:sockets", "p:presence:{t:bob}", "p:offline:{t:bob}"]);
        assert_eq!(&cmds[1][6..10], ["p:", "me", "00ab", "t:bob"]);
        assert!(matches!(b.then[1], Then::Drain { answer: true, .. }));
        assert_eq!(c.mirror.borrow().shards_of(&key("t", "bob")), vec![0]);
    }

    #[test]
    fn the_first_local_member_subscribes_and_later_joins_wait_for_it() {
        let c = cluster();
        *c.subs.borrow_mut() = Some(Vec::new());
        let room = key("t", "lobby");
        let mut b = Batch::default();
        let join = |sid: &str| BridgeMsg::RoomJoin {
            room: room.clone(),
            sid: sid.into(),
            socket: socket(),
            ack: Some(1),
        };
        plan(&c, join("a"), &mut b);
        plan(&c, join("b"), &mut b);
        let cmds = commands(&b);
        assert_eq!(cmds[0], ["SADD", "p:room:{t:lobby}", "me|a"]);
        assert_eq!(cmds[1], ["SADD", "p:rooms:{me}", "t:lobby"]);
        assert_eq!(cmds[2], ["SADD", "p:room:{t:lobby}", "me|b"]);
        assert_eq!(cmds.len(), 3);
        let subs = c.subs.borrow().clone().unwrap();
        assert_eq!(subs, [(true, "p:room:{t:lobby}".to_string())]);
        assert!(drain_shard(&c, 0).is_empty(), "nobody is answered before the subscription");
        c.release_joins("p:room:{t:lobby}");
        let ready = drain_shard(&c, 0);
        assert_eq!(ready.len(), 2);
        assert!(ready.iter().all(|m| matches!(m, ShardMsg::RoomReady { ack: Some(1), .. })));
        // A third member of a subscribed room is answered at once.
        plan(&c, join("c"), &mut b);
        assert_eq!(drain_shard(&c, 0).len(), 1);
        // The last one out unsubscribes.
        let mut b = Batch::default();
        for sid in ["a", "b", "c"] {
            plan(&c, BridgeMsg::RoomLeave { room: room.clone(), sid: sid.into(), forget: true }, &mut b);
        }
        let cmds = commands(&b);
        assert_eq!(cmds.last().unwrap(), &["SREM", "p:rooms:{me}", "t:lobby"]);
        assert_eq!(cmds.len(), 4);
        let subs = c.subs.borrow().clone().unwrap();
        assert_eq!(subs.iter().filter(|(on, _)| !on).count(), 1);
    }

    #[test]
    fn direct_messages_use_the_route_cache_when_it_knows() {
        let c = cluster();
        let bob = key("t", "bob");
        let frame: Frame = Arc::from(&b"frame"[..]);
        let to = |b: &mut Batch| {
            plan(
                &c,
                BridgeMsg::ToUser { user: bob.clone(), frame: frame.clone(), msg_id: 9, origin: socket() },
                b,
            )
        };
        // Unknown: ask the registry.
        let mut b = Batch::default();
        to(&mut b);
        assert!(matches!(b.then[..], [Then::Route { msg_id: 9, .. }]));
        // Known on another server: one PUBLISH with a Deliver envelope.
        let epoch = c.routes.borrow().epoch();
        c.routes.borrow_mut().put(bob.clone(), parse_servers("n2"), epoch);
        let mut b = Batch::default();
        to(&mut b);
        let cmds = commands(&b);
        assert_eq!((cmds.len(), cmds[0][0].as_str(), cmds[0][1].as_str()), (1, "PUBLISH", "p:server:{n2}"));
        assert!(matches!(b.then[..], [Then::Cached { local: false, .. }]));
        // Known all-local: no Redis command, delivered on the shard.
        c.mirror.borrow_mut().observe(&BridgeMsg::SocketUp {
            user: bob.clone(),
            sid: "x".into(),
            socket: socket(),
            pid: None,
        });
        let epoch = c.routes.borrow().epoch();
        c.routes.borrow_mut().put(bob.clone(), parse_servers(""), epoch);
        let mut b = Batch::default();
        to(&mut b);
        assert!(b.is_empty());
        assert!(matches!(drain_shard(&c, 0)[..], [ShardMsg::DeliverUser { msg_id: 9, .. }]));
    }

    #[test]
    fn acks_to_other_nodes_carry_an_ack_envelope() {
        let c = cluster();
        let origin = Origin { server: Some("n2".into()), shard: 1, conn: ConnId::from_u64(5) };
        let mut b = Batch::default();
        plan(&c, BridgeMsg::Ack { origin, msg_id: 3, status: DeliveryStatus::Queued }, &mut b);
        let cmds = commands(&b);
        assert_eq!(cmds[0][1], "p:server:{n2}");
        let raw = commands_raw(&b);
        let env = shardgate_io::envelope::decode(&raw[0][2]).unwrap();
        assert_eq!(
            env,
            Envelope::Ack {
                msg_id: 3,
                origin: RemoteSocket { shard: 1, conn: 5 },
                status: AckStatus::Queued
            }
        );
        // An ack for a sender on this node is not published.
        let local = Origin { server: None, shard: 0, conn: ConnId::from_u64(5) };
        let mut b = Batch::default();
        plan(&c, BridgeMsg::Ack { origin: local, msg_id: 3, status: DeliveryStatus::Queued }, &mut b);
        assert!(b.is_empty());
    }
}
