//! Applies the reply of each pipelined command as its [`Then`] says: answers CONNECTs
//! with the offline queue, caches routes, reports delivery outcomes, sweeps dead nodes.
//! Commands a reply calls for (a route retried through the registry, an ack to another
//! node, the sweep of each dead node) are planned into `followups`, the next batch.

use shardgate_io::resp::{self, Reply};
use shardgate_shard::metrics::Counter;
use shardgate_shard::msg::{parse_sid, BridgeMsg, DeliveryStatus, Frame, ShardId, ShardMsg, SocketRef};
use tracing::warn;

use super::batch::{Batch, Sweep, Then};
use super::keys::{from_redis_id, Keys};
use super::plan::{enqueue, parse_servers, plan, publish_to_servers, unregister};
use super::recover;
use super::scripts;
use super::state::Cluster;
use super::sweep::{claim_dead, end_sweep, sweep};

/// A bulk reply as text.
fn text(r: &Reply) -> Option<&str> {
    resp::as_bytes(r).and_then(|b| std::str::from_utf8(b).ok())
}

/// Applies the reply of one command.
pub fn apply(c: &Cluster, then: Then, reply: Reply, followups: &mut Batch) {
    if let Reply::Error(e) = &reply {
        warn!("redis error: {e}");
    }
    match then {
        Then::Ignore => {}
        Then::Alive => {
            if reply != Reply::Integer(1) {
                c.swept.set(true);
            }
        }
        Then::Lease(server) => {
            if reply == Reply::Integer(1) {
                sweep(c, followups, &server, Sweep::Dead);
            }
        }
        Then::SweepSockets(server) => {
            let Reply::Array(pairs) = reply else { return };
            for pair in pairs.chunks_exact(2) {
                let (Some(sid), Some(user)) = (text(&pair[0]), text(&pair[1])) else { continue };
                let Some(user) = from_redis_id(user) else { continue };
                c.m().inc(Counter::SweptSockets);
                unregister(c, followups, &server, &user, sid, Then::Down(user.clone()));
                if c.settings.recovery.is_some() {
                    // Its sessions stay recoverable, but no longer receive.
                    let at = Keys::room_member(&server, sid);
                    followups.cmd(&["SREM", &c.keys.sessions_of(&user), &at], Then::Ignore);
                }
            }
        }
        Then::SweepRooms(server, kind) => {
            if let Reply::Array(rooms) = reply {
                for room in rooms.iter().filter_map(text) {
                    let k = c.keys.room_of_id(room);
                    followups.cmd(&["EVAL", scripts::ROOM_SWEEP, "1", &k, &server], Then::Ignore);
                }
            }
            // After every step above (a batch's replies are all in before any is applied).
            followups.cmd(&["EXISTS", &c.keys.connections(&server)], Then::SweepEnd(server, kind));
        }
        Then::SweepEnd(server, kind) => end_sweep(c, followups, &server, kind),
        Then::Down(user) => {
            if reply == Reply::Integer(1) {
                c.persist_presence(&user, false);
            }
        }
        Then::Drain { socket, answer, user } => {
            let items = match reply {
                Reply::Array(items) => items,
                _ => Vec::new(),
            };
            if items.first() == Some(&Reply::Integer(1)) {
                c.persist_presence(&user, true);
            }
            let frames: Vec<Frame> =
                items.iter().skip(1).filter_map(resp::as_bytes).filter_map(recover::queued_frame).collect();
            let conn = socket.conn;
            if answer {
                c.shared.mesh.send(socket.shard, ShardMsg::Registered { conn, frames });
            } else if !frames.is_empty() {
                c.shared.mesh.send(socket.shard, ShardMsg::OfflineDrain { conn, frames });
            }
        }
        Then::Cached { user, frame, msg_id, origin, tally, local, registry } => {
            let (pending, reached) = tally.get();
            let got = if let Reply::Integer(n) = reply { n } else { 0 };
            if got == 0 {
                c.routes.borrow_mut().invalidate(&user);
            }
            tally.set((pending.saturating_sub(1), reached + got));
            if pending == 1 && reached + got == 0 && !local {
                if registry {
                    // The registry's servers are gone too (not swept yet): queue it.
                    enqueue(c, followups, &user, &frame);
                    c.m().inc(Counter::OfflineQueued);
                    c.status(origin, msg_id, DeliveryStatus::Queued);
                } else {
                    // Every cached server was gone: ask the registry.
                    plan(c, BridgeMsg::ToUser { user, frame, msg_id, origin }, followups);
                }
            }
        }
        Then::Route { user, frame, msg_id, origin, epoch } => {
            let Reply::Array(items) = reply else {
                return c.status(origin, msg_id, DeliveryStatus::Sent);
            };
            let reached = match items.first() {
                Some(Reply::Integer(n)) => *n,
                _ => 0,
            };
            if reached < 0 {
                c.m().inc(Counter::OfflineQueued);
                return c.status(origin, msg_id, DeliveryStatus::Queued);
            }
            let servers = items
                .get(1)
                .and_then(resp::as_bytes)
                .and_then(|b| std::str::from_utf8(b).ok())
                .map(parse_servers)
                .unwrap_or_default();
            let sids = items.get(2..).unwrap_or_default();
            // On a Redis Cluster the script published nothing: publish to its servers.
            let publish = c.sharded.get() && !servers.is_empty();
            if reached > 0 || !sids.is_empty() || publish {
                c.routes.borrow_mut().put(user.clone(), servers.clone(), epoch);
            }
            if publish {
                let local = !sids.is_empty();
                publish_to_servers(c, followups, &servers, &user, &frame, msg_id, origin, local, true);
            }
            let mut shards: Vec<ShardId> = sids
                .iter()
                .filter_map(resp::as_bytes)
                .filter_map(|sid| parse_sid(std::str::from_utf8(sid).ok()?))
                .map(|(shard, _)| shard)
                .collect();
            shards.sort_unstable();
            shards.dedup();
            c.deliver(&shards, &user, &frame, msg_id, origin.into());
        }
        Then::Logged { origin, msg_id } => match reply {
            Reply::Array(items) if items.first() == Some(&Reply::Integer(-1)) => {
                c.m().inc(Counter::OfflineQueued);
                c.status(origin, msg_id, DeliveryStatus::Queued);
            }
            // Published: every node that delivers it reports (this one through the mesh).
            Reply::Array(_) => {}
            // A room message logged (its receivers), or an error: nothing better to say.
            _ => c.status(origin, msg_id, DeliveryStatus::Sent),
        },
        Then::LoggedUser { origin, msg_id, user } => match reply {
            Reply::Array(items) if items.first() == Some(&Reply::Integer(-1)) => {
                let payload = items.get(1).and_then(resp::as_bytes).unwrap_or_default();
                enqueue(c, followups, &user, &Frame::from(payload));
                c.m().inc(Counter::OfflineQueued);
                c.status(origin, msg_id, DeliveryStatus::Queued);
            }
            Reply::Array(_) => {}
            _ => c.status(origin, msg_id, DeliveryStatus::Sent),
        },
        Then::ResumeRead { sid, socket, user, pid, offset } => {
            recover::on_read(c, sid, socket, user, pid, offset, reply, followups)
        }
        Then::Resume { sid } => recover::on_resumed(c, sid, reply, followups),
        Then::Bounced { origin, msg_id } => {
            if reply == Reply::Integer(1) {
                c.m().inc(Counter::OfflineQueued);
                let status = DeliveryStatus::Queued;
                match origin.server {
                    None => c.status(SocketRef { shard: origin.shard, conn: origin.conn }, msg_id, status),
                    Some(_) => plan(c, BridgeMsg::Ack { origin, msg_id, status }, followups),
                }
            }
        }
        Then::Presence { user, socket } => {
            let v = resp::as_bytes(&reply).and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("");
            let (status, seen) = v.split_once('|').unwrap_or(("offline", "0"));
            let msg = ShardMsg::Presence {
                user,
                conn: Some(socket.conn),
                online: status == "online",
                last_seen: seen.parse().unwrap_or(0),
            };
            c.shared.mesh.send(socket.shard, msg);
        }
        Then::Nodes => {
            if let Reply::Array(ids) = reply {
                for id in ids.iter().filter_map(resp::as_bytes).filter_map(|i| std::str::from_utf8(i).ok()) {
                    if id != c.me() {
                        claim_dead(c, followups, id);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cluster, commands, drain_shard};
    use super::*;
    use shardgate_shard::msg::{key, sid, Origin};
    use shardgate_shard::ConnId;
    use std::rc::Rc;

    fn bulk(s: &str) -> Reply {
        Reply::BulkString(s.as_bytes().to_vec())
    }

    fn origin() -> SocketRef {
        SocketRef { shard: 0, conn: ConnId::from_u64(7) }
    }

    fn route(user: &str, epoch: u64) -> Then {
        Then::Route {
            user: key("t", user),
            frame: Frame::from(&b"f"[..]),
            msg_id: 5,
            origin: origin(),
            epoch,
        }
    }

    #[test]
    fn a_route_reply_delivers_locally_and_is_cached() {
        let c = cluster();
        let local = sid(0, ConnId::from_u64(3));
        let reply = Reply::Array(vec![Reply::Integer(1), bulk("n2"), bulk(&local)]);
        let mut next = Batch::default();
        let epoch = c.routes.borrow().epoch();
        apply(&c, route("bob", epoch), reply, &mut next);
        assert!(next.is_empty());
        assert!(matches!(drain_shard(&c, 0)[..], [ShardMsg::DeliverUser { msg_id: 5, .. }]));
        let cached = c.routes.borrow_mut().get(&key("t", "bob")).unwrap();
        assert_eq!(&*cached[0], "n2");
    }

    #[test]
    fn a_route_reply_that_raced_a_change_is_not_cached() {
        let c = cluster();
        let asked = c.routes.borrow().epoch();
        c.routes.borrow_mut().invalidate(&key("t", "bob"));
        let reply = Reply::Array(vec![Reply::Integer(1), bulk("n2")]);
        apply(&c, route("bob", asked), reply, &mut Batch::default());
        assert!(c.routes.borrow_mut().get(&key("t", "bob")).is_none());
    }

    #[test]
    fn an_offline_recipient_is_reported_queued() {
        let c = cluster();
        apply(&c, route("bob", 0), Reply::Array(vec![Reply::Integer(-1)]), &mut Batch::default());
        let got = drain_shard(&c, 0);
        assert!(matches!(got[..], [ShardMsg::Status { msg_id: 5, status: DeliveryStatus::Queued, .. }]));
        // A Redis error is not a delivery: the sender hears `sent`.
        apply(&c, route("bob", 0), Reply::Error("ERR x".into()), &mut Batch::default());
        let got = drain_shard(&c, 0);
        assert!(matches!(got[..], [ShardMsg::Status { status: DeliveryStatus::Sent, .. }]));
    }

    #[test]
    fn cached_servers_that_reached_nobody_send_the_message_through_the_registry() {
        let c = cluster();
        let tally = Rc::new(std::cell::Cell::new((2, 0)));
        let cached = |tally: &Rc<_>| Then::Cached {
            user: key("t", "bob"),
            frame: Frame::from(&b"f"[..]),
            msg_id: 5,
            origin: origin(),
            tally: Rc::clone(tally),
            local: false,
            registry: false,
        };
        let mut next = Batch::default();
        apply(&c, cached(&tally), Reply::Integer(0), &mut next);
        assert!(next.is_empty(), "one PUBLISH reply is still pending");
        apply(&c, cached(&tally), Reply::Integer(0), &mut next);
        assert!(matches!(next.then[..], [Then::Route { .. }]));
    }

    #[test]
    fn a_queued_bounce_from_another_node_is_acked_to_it() {
        let c = cluster();
        let origin = Origin { server: Some("n2".into()), shard: 1, conn: ConnId::from_u64(9) };
        let mut next = Batch::default();
        apply(&c, Then::Bounced { origin, msg_id: 4 }, Reply::Integer(1), &mut next);
        assert_eq!(commands(&next)[0][..2], ["PUBLISH", "p:server:{n2}"]);
    }

    #[test]
    fn the_node_list_sweeps_every_other_dead_node_under_a_lease() {
        let c = cluster();
        let mut next = Batch::default();
        let reply = Reply::Array(vec![bulk("me"), bulk("n2"), bulk("n3")]);
        apply(&c, Then::Nodes, reply, &mut next);
        let cmds = commands(&next);
        assert_eq!(cmds.len(), 2);
        assert_eq!(&cmds[0][3..5], ["p:node:{n2}", "p:sweep:{n2}"]);
        assert_eq!(cmds[1][3], "p:node:{n3}");
        // n2 is alive: nothing more; n3 is dead and the lease is ours: sweep it.
        let mut next = Batch::default();
        apply(&c, Then::Lease("n2".into()), Reply::Integer(0), &mut next);
        assert!(next.is_empty());
        apply(&c, Then::Lease("n3".into()), Reply::Integer(1), &mut next);
        let cmds = commands(&next);
        assert_eq!(cmds, [vec!["HGETALL", "p:connections:{n3}"], vec!["SMEMBERS", "p:rooms:{n3}"]]);
        // Each socket unregistered on its user's slot, each room cleared, then the end.
        let mut steps = Batch::default();
        let sockets = Reply::Array(vec![bulk("00ab"), bulk("t:bob"), bulk("01cd"), bulk("t:amy")]);
        apply(&c, Then::SweepSockets("n3".into()), sockets, &mut steps);
        apply(
            &c,
            Then::SweepRooms("n3".into(), Sweep::Dead),
            Reply::Array(vec![bulk("t:lobby")]),
            &mut steps,
        );
        let cmds = commands(&steps);
        assert_eq!(cmds.len(), 4);
        assert_eq!(
            (cmds[0][3].as_str(), cmds[0][6].as_str(), cmds[0][7].as_str()),
            ("p:user:{t:bob}:sockets", "n3", "00ab")
        );
        assert_eq!(cmds[1][3], "p:user:{t:amy}:sockets");
        assert_eq!((cmds[2][3].as_str(), cmds[2][4].as_str()), ("p:room:{t:lobby}", "n3"));
        assert!(matches!(steps.then[3], Then::SweepEnd(_, Sweep::Dead)));
        let mut end = Batch::default();
        apply(&c, Then::SweepEnd("n3".into(), Sweep::Dead), Reply::Integer(1), &mut end);
        assert_eq!(
            commands(&end),
            [
                vec!["DEL", "p:connections:{n3}", "p:rooms:{n3}"],
                vec!["SREM", "p:nodes", "n3"],
                vec!["DEL", "p:sweep:{n3}"]
            ]
        );
    }
}
