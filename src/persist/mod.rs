//! Persistence: every message, socket event, presence change and notification produced
//! to Kafka from the bridge thread ([`producer`]). Shards build the records
//! (`shardgate_shard::record`) and hand them to the record inbox. The persister
//! ([`persister`], `shardgate persist`, a process of its own) writes them to MongoDB.

pub mod documents;
pub mod monitor;
pub mod persister;
pub mod producer;
pub mod store;

use std::sync::Arc;

use shardgate_shard::mesh::{Doorbell, Inbox};
use shardgate_shard::record::Record;

use crate::config::KafkaSettings;

/// What the bridge thread needs to run the producer.
pub struct PersistPart {
    /// Producer settings.
    pub settings: KafkaSettings,
    /// Inbox of records.
    pub inbox: Arc<Inbox<Record>>,
    /// Its doorbell.
    pub bell: Doorbell,
}
