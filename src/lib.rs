//! The shardgate node beyond the shards: configuration ([`config`]), the bridge thread
//! ([`bridge`]) that hosts the process's Redis link ([`cluster`]) and its Kafka producer
//! ([`persist`]). The `shardgate` binary (`main.rs`) parses the command line, then starts
//! the shards and the bridge.
#![warn(missing_docs)]

pub mod bridge;
pub mod cluster;
pub mod config;
pub mod history;
pub mod persist;
