//! Cross-core queues: one lock-free MPSC inbox per shard.
//!
//! Each inbox is a `crossbeam_queue::SegQueue` plus a doorbell: a Unix socket pair whose
//! read end the owning shard awaits through io_uring. A sender pushes, then rings only
//! if the inbox is not already rung (one `AtomicBool` swap), so a busy shard receives
//! whole batches for a single wake-up and an idle shard sleeps in the kernel instead of
//! spinning. Senders may be shards or any other thread (the bridge).
//!
//! Ordering: messages from one sender to one shard arrive in the order they were sent.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::SegQueue;

pub use crate::ids::ShardId;
use crate::msg::ShardMsg;

/// A lock-free MPSC inbox with a doorbell; `T` is what it carries.
pub struct Inbox<T> {
    queue: SegQueue<T>,
    rung: AtomicBool,
    bell: UnixStream,
    rings: AtomicU64,
}

/// Who drains an inbox: a shard, or one of the bridge thread's two tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Shard `i`'s inbox task.
    Shard(ShardId),
    /// The bridge's Redis side (cluster messages).
    Bridge,
    /// The bridge's Kafka side (records).
    Records,
}

/// The read end of an inbox's doorbell, handed once to the task that owns the inbox.
pub struct Doorbell {
    /// Whom this doorbell wakes.
    pub owner: Owner,
    /// Non-blocking read end of the socket pair.
    pub fd: OwnedFd,
}

impl Doorbell {
    /// The read end as a glommio stream, for the owner's executor (call it on that
    /// executor's thread: the stream registers with its io_uring).
    pub fn into_stream(self) -> glommio::net::UnixStream {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: the doorbell owns its descriptor; `into_raw_fd` hands that ownership to
        // the stream, and nothing else holds it.
        unsafe { glommio::net::UnixStream::from_raw_fd(self.fd.into_raw_fd()) }
    }
}

/// Waits until `inbox` has work (its doorbell rang) or `max` passes.
pub async fn wait_ring<T>(inbox: &Inbox<T>, bell: &mut glommio::net::UnixStream, max: std::time::Duration) {
    use futures_lite::{AsyncRead, FutureExt};
    let mut ring = [0u8; RING_READ];
    let ready = std::future::poll_fn(|cx| {
        if inbox.backlog() > 0 {
            return std::task::Poll::Ready(());
        }
        match std::pin::Pin::new(&mut *bell).poll_read(cx, &mut ring) {
            std::task::Poll::Ready(_) => std::task::Poll::Ready(()),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    });
    ready.or(async { glommio::timer::sleep(max).await }).await;
}

/// Doorbell bytes consumed per read: any number of rings means "look at the queue", so
/// one read of a few bytes re-arms it.
pub const RING_READ: usize = 64;

impl<T> Inbox<T> {
    /// A new inbox and the doorbell its owner waits on.
    pub fn new(owner: Owner) -> std::io::Result<(Inbox<T>, Doorbell)> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        let inbox = Inbox {
            queue: SegQueue::new(),
            rung: AtomicBool::new(false),
            bell: tx,
            rings: AtomicU64::new(0),
        };
        Ok((inbox, Doorbell { owner, fd: rx.into() }))
    }

    /// Queues `msg` and wakes the owner if it may be asleep.
    pub fn send(&self, msg: T) {
        self.queue.push(msg);
        if !self.rung.swap(true, Ordering::AcqRel) {
            self.rings.fetch_add(1, Ordering::Relaxed);
            // A full socket buffer means a wake-up is already pending: nothing is lost.
            let _ = (&self.bell).write(&[1]);
        }
    }

    /// Re-arms the doorbell and takes up to `max` messages. Owner only, after it consumed
    /// the doorbell bytes.
    pub fn drain(&self, max: usize, out: &mut Vec<T>) {
        self.rung.swap(false, Ordering::AcqRel);
        while out.len() < max {
            match self.queue.pop() {
                Some(m) => out.push(m),
                None => break,
            }
        }
        if !self.queue.is_empty() {
            // More than one batch waits: keep the bell rung so the owner comes back.
            self.rung.store(true, Ordering::Release);
        }
    }

    /// Messages waiting (approximate).
    pub fn backlog(&self) -> usize {
        self.queue.len()
    }

    /// Doorbell writes so far (wake-ups).
    pub fn rings(&self) -> u64 {
        self.rings.load(Ordering::Relaxed)
    }
}

/// All shard inboxes of the process; cloned (`Arc`) into every shard and the bridge.
pub struct Mesh {
    inboxes: Box<[Inbox<ShardMsg>]>,
}

impl Mesh {
    /// Builds `n` inboxes and returns their doorbells, one per shard, in shard order.
    pub fn new(n: usize) -> std::io::Result<(Arc<Mesh>, Vec<Doorbell>)> {
        let mut inboxes = Vec::with_capacity(n);
        let mut bells = Vec::with_capacity(n);
        for shard in 0..n {
            let (inbox, bell) = Inbox::new(Owner::Shard(shard))?;
            inboxes.push(inbox);
            bells.push(bell);
        }
        Ok((Arc::new(Mesh { inboxes: inboxes.into_boxed_slice() }), bells))
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.inboxes.len()
    }

    /// The mesh has no shards.
    pub fn is_empty(&self) -> bool {
        self.inboxes.is_empty()
    }

    /// Queues `msg` for shard `to` and wakes it if it may be asleep.
    pub fn send(&self, to: ShardId, msg: ShardMsg) {
        if let Some(inbox) = self.inboxes.get(to) {
            inbox.send(msg);
        }
    }

    /// Sends a copy of `make(shard)` to every shard.
    pub fn broadcast(&self, mut make: impl FnMut() -> ShardMsg) {
        for inbox in self.inboxes.iter() {
            inbox.send(make());
        }
    }

    /// Drains shard `me`'s inbox (see [`Inbox::drain`]).
    pub fn drain(&self, me: ShardId, max: usize, out: &mut Vec<ShardMsg>) {
        if let Some(inbox) = self.inboxes.get(me) {
            inbox.drain(max, out);
        }
    }

    /// Messages waiting for shard `me` (approximate, for metrics).
    pub fn backlog(&self, me: ShardId) -> usize {
        self.inboxes.get(me).map(Inbox::backlog).unwrap_or(0)
    }

    /// Doorbell writes made for shard `me` so far (wake-ups, for metrics).
    pub fn rings(&self, me: ShardId) -> u64 {
        self.inboxes.get(me).map(Inbox::rings).unwrap_or(0)
    }
}

/// The shard that owns global state for `key` (a user's directory entry).
pub fn home_shard(key: &str, shards: usize) -> ShardId {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same key maps to the same shard in every shard.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    key.hash(&mut h);
    (h.finish() % shards.max(1) as u64) as ShardId
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn rings_once_per_batch_and_keeps_order() {
        let (mesh, bells) = Mesh::new(2).unwrap();
        for i in 0..10u64 {
            mesh.send(1, ShardMsg::Test(i));
        }
        assert_eq!(mesh.rings(1), 1);
        let mut rx = UnixStream::from(bells.into_iter().nth(1).unwrap().fd);
        let mut b = [0u8; 8];
        assert_eq!(rx.read(&mut b).unwrap(), 1);
        let mut out = Vec::new();
        mesh.drain(1, 4, &mut out);
        mesh.drain(1, 100, &mut out);
        let got: Vec<u64> = out
            .iter()
            .map(|m| match m {
                ShardMsg::Test(i) => *i,
                _ => 99,
            })
            .collect();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        mesh.send(1, ShardMsg::Test(10));
        assert_eq!(mesh.rings(1), 2);
    }

    #[test]
    fn home_shard_is_stable_and_spread() {
        let a = home_shard("t1\x1falice", 4);
        assert_eq!(a, home_shard("t1\x1falice", 4));
        let spread: std::collections::HashSet<_> =
            (0..100).map(|i| home_shard(&format!("t\x1fu{i}"), 4)).collect();
        assert_eq!(spread.len(), 4);
    }
}
