//! Sans-IO codecs of shardgate.
//!
//! Every item here is a pure function of bytes (or a small state machine fed with bytes):
//! no sockets, no runtime, no clocks. The shard runtime (`shardgate-shard`), the load
//! generator and the fuzz targets all drive the same code.
//!
//! The data path reads top-down through the modules:
//! [`http`] (request head, upgrade, plain responses) -> [`ws`] (WebSocket frames) ->
//! [`engineio`] (Engine.IO v4 packets) -> [`socketio`] (Socket.IO v5 packets) -> [`packet`]
//! (everything sent, encoded in one place); [`resp`]
//! (RESP2) and [`envelope`] (what nodes publish to each other) are the bridge's side.
//!
//! Bytes from the network never reach `unwrap`, indexing or `panic!` here: every parser
//! returns a typed error that names what was wrong, and each has a fuzz target.
#![warn(missing_docs)]

pub mod engineio;
pub mod envelope;
pub mod http;
pub mod packet;
pub mod resp;
pub mod socketio;
pub mod ws;
