//! Shard internals driven directly, for criterion benchmarks (`benches/fanout.rs`) and unit
//! tests. Not a stable API: it exists so in-shard costs can be measured without sockets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

use serde_json::json;

use crate::ids::{key, ConnId, Frame, Key};
use crate::shared::Shared;
use crate::state::conns::ConnEntry;
use crate::state::{event_frame, State};

/// What one shard of a process shares, with the default configuration, the embedded
/// bus and no listener of its own: enough to drive a `State` directly.
pub fn shared() -> std::io::Result<Arc<Shared>> {
    let (mesh, _bells) = crate::mesh::Mesh::new(1)?;
    let opts = crate::runtime::StartOptions { server_id: "bench".into(), ..Default::default() };
    let verifier = crate::auth::Verifier::hs256(b"bench-secret-0123456789", 0, 10);
    Ok(Arc::new(Shared::new(opts, verifier, mesh, ([127, 0, 0, 1], 0).into())))
}

/// Counts wake-ups, standing in for the connection tasks.
struct Wakes(AtomicU64);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// One shard's state with one room of `members` connections.
pub struct RoomFanout {
    state: State,
    room: Key,
    members: Vec<ConnId>,
    waker: Waker,
    wakes: Arc<Wakes>,
}

impl RoomFanout {
    /// A shard (default configuration, embedded bus) with a room of `members`.
    pub fn new(members: usize) -> std::io::Result<RoomFanout> {
        let shared = shared()?;
        let mut state = State::new(0, shared);
        let wakes = Arc::new(Wakes(AtomicU64::new(0)));
        let waker = Waker::from(wakes.clone());
        let room = key("bench", "room-1");
        let members: Vec<ConnId> = (0..members)
            .map(|_| state.conns.insert(ConnEntry { waker: Some(waker.clone()), ..Default::default() }))
            .collect();
        state.rooms.set(room.clone(), members.clone());
        Ok(RoomFanout { state, room, members, waker, wakes })
    }

    /// The `message:new` frame of a room message with `content_bytes` of content, as
    /// the sender's shard encodes it once per message.
    pub fn frame(content_bytes: usize) -> Frame {
        let payload = json!({
            "id": "01KA0000000000000000000000", "from": "user1", "room": "room-1",
            "content": "x".repeat(content_bytes), "ts": 1_795_729_196_016u64,
        });
        event_frame("message:new", &payload)
    }

    /// Delivers `frame` to every member but the first (the sender): queued on each
    /// connection and its task woken. Returns the deliveries.
    pub fn deliver(&mut self, frame: &Frame) -> usize {
        let sender = self.members.first().copied();
        self.state.deliver_room(&self.room, frame, sender)
    }

    /// What each woken connection task does next, short of the socket write: takes its
    /// frames and parks again.
    pub fn drain(&mut self) -> usize {
        let mut frames = 0;
        for &id in &self.members {
            if let Some(c) = self.state.conns.get_mut(id) {
                frames += c.outbox.len();
                c.outbox.clear();
                c.out_bytes = 0;
                c.waker = Some(self.waker.clone());
            }
        }
        frames
    }

    /// Wake-ups so far.
    pub fn wakes(&self) -> u64 {
        self.wakes.0.load(Ordering::Relaxed)
    }
}
