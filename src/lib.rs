//! The shardgate node beyond the shards: configuration ([`config`]) and the bridge that
//! owns the process's Redis traffic in cluster mode ([`bridge`]). The `shardgate` binary
//! (`main.rs`) parses the command line, then starts the shards and the bridge.
#![warn(missing_docs)]

pub mod bridge;
pub mod config;
