//! What one shard's tasks share on its thread: the shard's state and the buffers every
//! connection of the shard uses in turn. `!Send` by construction (`RefCell`, `Rc`): it
//! never leaves the executor that created it.

use std::cell::RefCell;
use std::sync::Arc;
use std::task::Waker;

use shardgate_io::engineio::Open;

use crate::ids::{ConnId, ShardId};
use crate::metrics::{Counter, ShardMetrics};
use crate::parked::Parking;
use crate::shared::{MetricsBlock, Shared};
use crate::state::conns::{ConnEntry, Polling};
use crate::state::State;

/// Bytes read from a socket per call, and the most a write coalesces: one buffer per
/// shard, not per connection.
pub(crate) const SCRATCH: usize = 64 * 1024;

/// What a shard's tasks share: its state and scratch buffers. Lives on one thread.
pub(crate) struct Shard {
    /// This shard.
    pub id: ShardId,
    /// What the process shares.
    pub shared: Arc<Shared>,
    /// The shard's state (never borrowed across an `.await`).
    pub state: RefCell<State>,
    /// Read buffer used by every connection of this shard in turn.
    pub scratch: RefCell<Box<[u8]>>,
    /// Write-coalescing buffer used by every connection in turn.
    pub wbuf: RefCell<Vec<u8>>,
    /// Wakes the shard's main task at shutdown.
    pub stop_waker: RefCell<Option<Waker>>,
    /// The epoll set and watcher of parked WebSockets (`None`: connections never park).
    pub parking: Option<Parking>,
}

impl Shard {
    /// Shard `id` of the process, with empty state.
    pub fn new(id: ShardId, shared: Arc<Shared>) -> Shard {
        Shard {
            id,
            state: RefCell::new(State::new(id, shared.clone())),
            shared,
            scratch: RefCell::new(vec![0u8; SCRATCH].into_boxed_slice()),
            wbuf: RefCell::new(Vec::with_capacity(SCRATCH)),
            stop_waker: RefCell::new(None),
            parking: None,
        }
    }

    /// Opens an Engine.IO session on this shard: registers its entry (ping and CONNECT
    /// timers running), counts it, and returns its id and the encoded open packet. `poll`
    /// makes it a long-polling session, which is offered the upgrade to WebSocket.
    pub fn open_session(&self, poll: Option<Box<Polling>>) -> (ConnId, String) {
        let cfg = &self.shared.config;
        let now = self.shared.now();
        let polling = poll.is_some();
        let id = self.state.borrow_mut().conns.insert(ConnEntry {
            next_ping: now + cfg.ping_interval_ms,
            connect_deadline: now + cfg.connect_timeout_ms,
            poll,
            ..ConnEntry::default()
        });
        let m = self.metrics();
        m.inc(Counter::Open);
        if polling {
            m.inc(Counter::PollingOpen);
        }
        let open = Open {
            sid: self.shared.sid_key.engine_sid(self.id, id),
            upgrades: if polling { vec!["websocket".into()] } else { vec![] },
            ping_interval: cfg.ping_interval_ms,
            ping_timeout: cfg.ping_timeout_ms,
            max_payload: cfg.max_payload as u64,
        };
        (id, open.encode())
    }

    /// This shard's counters.
    pub fn metrics(&self) -> &ShardMetrics {
        self.shared.block(MetricsBlock::Shard(self.id))
    }
}
