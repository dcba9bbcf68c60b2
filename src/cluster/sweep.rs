//! This node's liveness and the sweep of dead servers' registrations
//! (`docs/redis-cluster.md`): every step touches the keys of one slot, so the sweep runs
//! the same on a single Redis and on a Redis Cluster.
//!
//! * ALIVE (every `liveness_ttl_ms / 3`) refreshes `node:{S}` and tells whether it had
//!   expired or a sweep of this node is running: then the node registers everything again.
//! * LEASE takes `sweep:{S}` of a server whose `node:{S}` is gone: one sweeper at a time.
//! * The sweep reads the server's socket and room lists, runs DOWN per socket and
//!   ROOM_SWEEP per room, and ends ([`end_sweep`]) once every step has its reply.

use std::sync::Arc;

use super::batch::{Batch, Sweep, Then};
use super::scripts;
use super::state::Cluster;

/// How long a sweeper holds its lease on a dead server.
const SWEEP_LEASE_MS: &str = "30000";

/// Sweeps what `server` registered, in steps of one slot each: its socket and room lists
/// are read, each socket unregistered (DOWN) and each room cleared of its members
/// (ROOM_SWEEP), then the lists deleted ([`Then::SweepEnd`]). A dead server's sweep runs
/// under a lease ([`claim_dead`]).
pub fn sweep(c: &Cluster, batch: &mut Batch, server: &str, kind: Sweep) {
    let s: Arc<str> = server.into();
    batch.cmd(&["HGETALL", &c.keys.connections(server)], Then::SweepSockets(s.clone()));
    batch.cmd(&["SMEMBERS", &c.keys.server_rooms(server)], Then::SweepRooms(s, kind));
}

/// Takes the sweep lease on `server` if its liveness key is gone (LEASE script); the
/// reply starts the sweep.
pub fn claim_dead(c: &Cluster, batch: &mut Batch, server: &str) {
    let (k1, k2) = (c.keys.node(server), c.keys.sweep(server));
    batch.cmd(&["EVAL", scripts::LEASE, "2", &k1, &k2, c.me(), SWEEP_LEASE_MS], Then::Lease(server.into()));
}

/// The last steps of a sweep, once every socket and room step is done.
pub fn end_sweep(c: &Cluster, batch: &mut Batch, server: &str, kind: Sweep) {
    batch.cmd(&["DEL", &c.keys.connections(server), &c.keys.server_rooms(server)], Then::Ignore);
    match kind {
        Sweep::Own => {}
        Sweep::Dead => {
            batch.cmd(&["SREM", &c.keys.nodes(), server], Then::Ignore);
            batch.cmd(&["DEL", &c.keys.sweep(server)], Then::Ignore);
        }
        Sweep::Leave => {
            batch.cmd(&["DEL", &c.keys.node(server)], Then::Ignore);
            batch.cmd(&["SREM", &c.keys.nodes(), server], Then::Ignore);
        }
    }
}

/// Refreshes this node's liveness key and membership.
pub fn liveness(c: &Cluster, batch: &mut Batch) {
    let me = c.me();
    let ttl = c.settings.liveness_ttl_ms.to_string();
    let (k1, k2) = (c.keys.node(me), c.keys.sweep(me));
    batch.cmd(&["EVAL", scripts::ALIVE, "2", &k1, &k2, &ttl], Then::Alive);
    batch.cmd(&["SADD", &c.keys.nodes(), me], Then::Ignore);
}
