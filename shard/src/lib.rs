//! The per-core runtime of shardgate.
//!
//! One [`runtime::start`] call starts N shards: glommio executors pinned to cores, each
//! with its own `SO_REUSEPORT` listener, owning the connections it accepted and their
//! rooms. Shards share nothing mutable; they talk through the lock-free [`mesh`].
//!
//! Read top-down: [`runtime`] (executors, listener, tasks; [`shared`] is what they share)
//! -> `conn` (one task per connection: HTTP upgrade, WebSocket frames, Engine.IO) ->
//! `session` (Socket.IO namespace connect, auth, chat events) -> `state` (the shard's
//! state as a composition of owners: connections, members, pending reports, the
//! home-shard directory, the router) -> `timers` (the per-tick scan) -> [`mesh`]
//! (cross-core queues, [`msg::ShardMsg`]) and [`ids`] (the names everything uses).
#![warn(missing_docs)]

mod assets;
pub mod auth;
#[doc(hidden)]
pub mod bench;
pub mod config;
mod conn;
pub mod history;
pub mod ids;
mod inbound;
mod local;
pub mod mesh;
pub mod metrics;
pub mod msg;
mod operator;
mod parked;
mod polling;
pub mod record;
pub mod runtime;
mod session;
pub mod shared;
mod slab;
mod state;
mod timers;
mod upgrade;
mod websocket;
mod wire;

pub use slab::ConnId;

pub use config::RuntimeConfig;
pub use runtime::{start, ShardsHandle, Shared};
