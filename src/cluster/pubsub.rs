//! What arrives on the pub/sub connection: subscription confirmations (which release
//! waiting `join_room`s) and pushes on this node's channels, turned into shard messages.
//!
//! Payloads come from other processes: envelopes are decoded by the bounds-checked codec
//! in `shardgate_io::envelope`; anything that does not parse is counted and dropped.

use shardgate_io::envelope::{self, Envelope};
use shardgate_io::packet;
use shardgate_io::resp::{self, Reply};
use shardgate_shard::metrics::Counter;
use shardgate_shard::msg::{BridgeMsg, DeliveryStatus, Frame, Key, Origin, ShardMsg, SocketRef};
use tracing::debug;

use super::keys::{from_redis_id, Channel};
use super::recover;
use super::state::Cluster;

/// One reply or push from the pub/sub connection.
pub fn on_pubsub(c: &Cluster, reply: Reply) {
    if let Some((channel, payload)) = resp::as_message(&reply) {
        on_push(c, channel, payload);
    } else if let Reply::Array(a) = &reply {
        // ["subscribe" or "ssubscribe", channel, count]: the node now receives that channel.
        if matches!(a.first().and_then(resp::as_bytes), Some(b"subscribe" | b"ssubscribe")) {
            if let Some(channel) = a.get(1).and_then(resp::as_bytes).map(String::from_utf8_lossy) {
                c.release_joins(&channel);
                recover::on_subscribed(c, &channel);
                match c.keys.parse_channel(channel.as_bytes()) {
                    Some(Channel::UserRegistry(user)) => c.routes.borrow_mut().channel_live(&user),
                    Some(Channel::UserPresence(_)) => c.release_watchers(&channel),
                    _ => {}
                }
            }
        }
    }
}

fn on_push(c: &Cluster, channel: &[u8], payload: &[u8]) {
    let Some(channel) = c.keys.parse_channel(channel) else { return };
    // RESUME's marker: every push before it has been handled (see `recover`).
    if let (Channel::Server, Some((&b'M', sid))) = (&channel, payload.split_first()) {
        if let Ok(sid) = std::str::from_utf8(sid) {
            c.markers.borrow_mut().push(sid.to_string());
        }
        return;
    }
    // Recoverable messages come as `S<seq> <envelope>` from the recovery scripts.
    let (seq, payload) = match envelope::split_logged(payload) {
        Ok(Some((seq, env))) => (Some(seq), env),
        Ok(None) => (None, payload),
        Err(e) => return bad_envelope(c, &e),
    };
    if let (Channel::Room(room), Some(seq)) = (&channel, seq) {
        if let Err(e) = recover::on_room(c, room.clone(), seq, payload) {
            bad_envelope(c, &e);
        }
        return;
    }
    match channel {
        Channel::Room(room) => {
            let env = match envelope::decode_room(payload) {
                Ok(env) => env,
                Err(e) => return bad_envelope(c, &e),
            };
            if env.origin_server == c.me() {
                return; // this node delivered it to its own shards already
            }
            let frame = Frame::from(env.frame);
            c.shared.mesh.broadcast(|| ShardMsg::RoomDeliver {
                room: room.clone(),
                frame: frame.clone(),
                except: None,
            });
        }
        Channel::RegistryChanges | Channel::UserRegistry(_) => {
            if let Some(user) = std::str::from_utf8(payload).ok().and_then(from_redis_id) {
                c.routes.borrow_mut().invalidate(&user);
            }
        }
        Channel::PresenceUpdates | Channel::UserPresence(_) => {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else { return };
            let Some(user) = v["user"].as_str().and_then(from_redis_id) else { return };
            let online = v["status"] == "online";
            let last_seen = v["lastSeen"].as_u64().unwrap_or(0);
            c.shared.mesh.broadcast(|| ShardMsg::Presence {
                user: user.clone(),
                conn: None,
                online,
                last_seen,
            });
        }
        Channel::Server => match envelope::decode(payload) {
            Ok(Envelope::Deliver { user, msg_id, origin_server, origin, frame }) => {
                // A logged message carries its offset; this node's own (recovery routes
                // to every node, this one included) reports to its sender locally.
                let frame = match seq {
                    Some(seq) => match packet::with_offset(frame, seq) {
                        Some(f) => Frame::from(f),
                        None => return bad_envelope(c, &envelope::EnvelopeError::Truncated("frame")),
                    },
                    None => Frame::from(frame),
                };
                let user: Key = user.into();
                let at = SocketRef::from_remote(origin);
                let server = (origin_server != c.me()).then(|| origin_server.into());
                let origin = Origin { server, shard: at.shard, conn: at.conn };
                let held = seq.is_some_and(|seq| recover::hold_user(c, &user, seq, &frame));
                let shards = c.mirror.borrow().shards_of(&user);
                if !shards.is_empty() {
                    c.deliver(&shards, &user, &frame, msg_id, origin);
                } else if held {
                    // The restoring socket gets it with its replay.
                    match origin.server {
                        None => c.status(at, msg_id, DeliveryStatus::Delivered),
                        Some(_) => {
                            c.inbox.send(BridgeMsg::Ack { origin, msg_id, status: DeliveryStatus::Delivered })
                        }
                    }
                } else {
                    c.inbox.send(BridgeMsg::Bounce { user, frame, msg_id, origin });
                }
            }
            Ok(Envelope::Ack { msg_id, origin, status }) => {
                c.status(SocketRef::from_remote(origin), msg_id, status.into());
            }
            Err(e) => bad_envelope(c, &e),
        },
    }
}

fn bad_envelope(c: &Cluster, e: &envelope::EnvelopeError) {
    c.m().inc(Counter::BadEnvelopes);
    debug!("dropped a pub/sub payload: {e}");
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cluster, drain_shard};
    use super::*;
    use shardgate_io::envelope::{AckStatus, RemoteSocket, RoomEnvelope};
    use shardgate_shard::msg::key;
    use shardgate_shard::msg::DeliveryStatus;

    fn push(channel: &str, payload: &[u8]) -> Reply {
        let b = |s: &[u8]| Reply::BulkString(s.to_vec());
        Reply::Array(vec![b(b"message"), b(channel.as_bytes()), b(payload)])
    }

    #[test]
    fn room_pushes_from_other_nodes_reach_every_shard_once() {
        let c = cluster();
        let room = key("t", "lobby");
        let ch = c.keys.room(&room);
        let other = RoomEnvelope { origin_server: "n2", frame: b"f" }.to_vec().unwrap();
        on_pubsub(&c, push(&ch, &other));
        assert!(matches!(drain_shard(&c, 0)[..], [ShardMsg::RoomDeliver { .. }]));
        let own = RoomEnvelope { origin_server: "me", frame: b"f" }.to_vec().unwrap();
        on_pubsub(&c, push(&ch, &own));
        assert!(drain_shard(&c, 0).is_empty(), "this node's own publish is not delivered twice");
    }

    #[test]
    fn server_pushes_deliver_ack_or_bounce() {
        let c = cluster();
        let ch = c.keys.server("me");
        let origin = RemoteSocket { shard: 1, conn: 2 };
        let d = Envelope::Deliver { user: "t\x1fbob", msg_id: 8, origin_server: "n2", origin, frame: b"f" };
        on_pubsub(&c, push(&ch, &d.to_vec().unwrap()));
        assert!(drain_shard(&c, 0).is_empty());
        let mut bounced = Vec::new();
        c.inbox.drain(10, &mut bounced);
        assert!(matches!(bounced[..], [BridgeMsg::Bounce { msg_id: 8, .. }]), "bob has no socket here");

        let a = Envelope::Ack {
            msg_id: 8,
            origin: RemoteSocket { shard: 0, conn: 2 },
            status: AckStatus::Delivered,
        };
        on_pubsub(&c, push(&ch, &a.to_vec().unwrap()));
        assert!(matches!(
            drain_shard(&c, 0)[..],
            [ShardMsg::Status { status: DeliveryStatus::Delivered, .. }]
        ));
    }

    #[test]
    fn garbage_is_counted_and_dropped() {
        let c = cluster();
        on_pubsub(&c, push(&c.keys.server("me"), b"Zjunk"));
        on_pubsub(&c, push(&c.keys.room(&key("t", "r")), b"\xff"));
        on_pubsub(&c, push("unrelated", b"x"));
        assert_eq!(c.m().get(Counter::BadEnvelopes), 2);
        assert!(drain_shard(&c, 0).is_empty());
    }

    #[test]
    fn registry_changes_invalidate_the_route() {
        let c = cluster();
        let bob = key("t", "bob");
        c.routes.borrow_mut().put(bob.clone(), super::super::plan::parse_servers("n2"), 0);
        on_pubsub(&c, push(&c.keys.registry_changes(), b"t:bob"));
        assert!(c.routes.borrow_mut().get(&bob).is_none());
    }
}
