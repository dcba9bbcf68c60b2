//! The bridge thread: one pinned glommio executor per process that hosts the process's
//! only Redis link ([`crate::cluster`]) and its only Kafka producer
//! ([`crate::persist::producer`]), each as one task fed by its own inbox.
//!
//! The thread runs when cluster mode (`--redis`), persistence (`--kafka`) or both are on.

use std::rc::Rc;
use std::sync::Arc;

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use shardgate_shard::runtime::MetricsBlock;
use shardgate_shard::Shared;

use crate::cluster::{self, state::Cluster, ClusterPart};
use crate::persist::{producer, PersistPart};

/// Starts the bridge thread with the cluster part, the persistence part, or both, pinned
/// to `cpu` when given.
pub fn start(
    shared: Arc<Shared>,
    cluster: Option<ClusterPart>,
    persist: Option<PersistPart>,
    cpu: Option<usize>,
) -> std::io::Result<ExecutorJoinHandle<()>> {
    let placement = cpu.map(Placement::Fixed).unwrap_or(Placement::Unbound);
    let producer = match persist {
        Some(p) => {
            // Delivery reports run on librdkafka's own thread: their own counter block.
            let reports = MetricsBlock::KafkaReports;
            let producer = producer::RecordProducer::new(p.settings, shared.clone(), p.inbox, reports)
                .map_err(|e| std::io::Error::other(format!("kafka producer: {e}")))?;
            Some((producer, p.bell))
        }
        None => None,
    };
    LocalExecutorBuilder::new(placement)
        .name("bridge")
        .spawn(move || async move {
            let kafka_task = producer
                .map(|(producer, bell)| glommio::spawn_local(producer::run(producer, bell.into_stream())));
            if let Some(part) = cluster {
                let state = Rc::new(Cluster::new(part.settings, shared, part.inbox));
                cluster::link::run(state, part.bell.into_stream()).await;
            }
            if let Some(t) = kafka_task {
                t.await;
            }
        })
        .map_err(|e| std::io::Error::other(format!("cannot start the bridge: {e}")))
}
