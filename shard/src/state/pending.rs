//! 1:1 messages sent from this shard that wait for their delivery report.
//!
//! Each is resolved exactly once: by the first report (`delivered`, `queued`), or by the
//! report timeout (`sent`). Later reports find nothing and are ignored.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::ids::{ConnId, Key};

/// A message waiting for its report.
pub(crate) struct Pending {
    /// The sender's connection.
    pub conn: ConnId,
    /// The sender's Socket.IO ack id, if it asked for one.
    pub ack_id: Option<u64>,
    /// The sender's own id of the message, echoed in `message:sent`.
    pub client_msg_id: Option<Value>,
    /// Shard time (ms) after which the report is `sent`.
    pub deadline: u64,
    /// Recipient (tenant-qualified) and sender, for the notification of a queued message.
    pub to: Option<(Key, Arc<str>)>,
}

/// Every pending report of one shard, by message id.
#[derive(Default)]
pub(crate) struct PendingReports {
    map: HashMap<u128, Pending>,
}

impl PendingReports {
    /// Waits for the report of `msg_id`.
    pub fn insert(&mut self, msg_id: u128, p: Pending) {
        self.map.insert(msg_id, p);
    }

    /// The pending message `msg_id`, once: a second report finds nothing.
    pub fn take(&mut self, msg_id: u128) -> Option<Pending> {
        self.map.remove(&msg_id)
    }

    /// Message ids whose deadline passed at `now`.
    pub fn expired(&self, now: u64) -> Vec<u128> {
        self.map.iter().filter(|(_, p)| now >= p.deadline).map(|(&k, _)| k).collect()
    }

    /// Messages waiting.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(deadline: u64) -> Pending {
        Pending { conn: ConnId::from_u64(1), ack_id: None, client_msg_id: None, deadline, to: None }
    }

    #[test]
    fn resolves_once_and_expires_by_deadline() {
        let mut p = PendingReports::default();
        p.insert(1, pending(100));
        p.insert(2, pending(200));
        assert_eq!(p.expired(99), Vec::<u128>::new());
        assert_eq!(p.expired(150), vec![1]);
        assert!(p.take(1).is_some());
        assert!(p.take(1).is_none(), "a second report finds nothing");
        assert_eq!(p.len(), 1);
    }
}
