//! The shard's connections as other tasks see them: the outbound queue, the timers and
//! the Socket.IO session of each, in a generational slab.
//!
//! On WebSocket the socket itself lives in its connection task (`conn.rs`); on HTTP
//! long-polling there is no lasting socket, and the session's reader state lives here
//! ([`Polling`]) for whichever request comes next (`polling.rs`). Everything here is what
//! other tasks of the shard touch to reach a client: [`Conns::push`] queues a frame
//! (closing a slow consumer past its bound) and wakes the task that writes it (the
//! WebSocket task or the waiting GET), [`Conns::close`] asks it to close.

use std::collections::VecDeque;
use std::task::Waker;

use shardgate_io::socketio;

use crate::auth::Identity;
use crate::ids::{ConnId, Frame, Key};
use crate::metrics::{CloseReason, Counter, ShardMetrics};
use crate::slab::Slab;

/// How long a closing connection may take to flush its queue before it is dropped.
pub(crate) const CLOSE_FLUSH_MS: u64 = 2_000;

/// One client connection as the shard sees it.
#[derive(Default)]
pub(crate) struct ConnEntry {
    /// Frames waiting to be written, oldest first.
    pub outbox: VecDeque<Frame>,
    /// Bytes of the front frame already written.
    pub head_off: usize,
    /// Bytes queued in `outbox` (minus `head_off`).
    pub out_bytes: usize,
    /// Wakes the connection task when something is queued or it must close.
    pub waker: Option<Waker>,
    /// Set when the connection must close; frames still queued are flushed first unless
    /// `close_now`.
    pub close: Option<CloseReason>,
    /// Drop the outbox instead of flushing it.
    pub close_now: bool,
    /// Shard time (ms) after which a close is forced even if the flush is stuck.
    pub close_by: u64,
    /// Shard time (ms) of the next Engine.IO ping.
    pub next_ping: u64,
    /// Shard time (ms) by which a pong must arrive; 0 when no ping is outstanding.
    pub pong_deadline: u64,
    /// Shard time (ms) by which the Socket.IO CONNECT must arrive; 0 once connected.
    pub connect_deadline: u64,
    /// The authenticated session, once the namespace CONNECT succeeded.
    pub session: Option<Box<Session>>,
    /// Set while the session is on HTTP long-polling; `None` on WebSocket (from the
    /// start, or once upgraded).
    pub poll: Option<Box<Polling>>,
    /// The WebSocket's descriptor, whether its connection runs as a task or is parked:
    /// frames pushed to it are written by the shard's writer task
    /// ([`Conns::poll_write_dirty`]), without waking the connection's task. Cleared
    /// before the socket can be closed (the task retires the entry first).
    pub fd: Option<std::os::fd::RawFd>,
    /// The WebSocket is parked: no task, its descriptor in the shard's epoll set
    /// (`parked.rs`); what would wake its task lists it for the writer task instead
    /// ([`Conns::rouse`]), which serves it or gives it a task again.
    pub parked: bool,
    /// The tick asks the connection's task to park once it has nothing in progress.
    pub park: bool,
    /// The client sent something since the last tick (a task that reads sets it).
    pub heard: bool,
    /// The writer left frames queued that the socket did not take: a parked connection
    /// needs its task to wait for the socket.
    pub blocked: bool,
}

/// A binary packet waiting for its attachments.
pub(crate) struct PendingBinary {
    /// The packet, with placeholders where the attachments go.
    pub packet: socketio::Packet,
    /// Attachments received so far.
    pub attachments: Vec<Vec<u8>>,
}

/// What a connection's Engine.IO reader keeps between packets.
#[derive(Default)]
pub(crate) struct Inbound {
    /// Token from the opening request (header or query), used if CONNECT carries none.
    pub token: Option<String>,
    /// A binary packet still collecting attachments.
    pub binary: Option<Box<PendingBinary>>,
}

impl Inbound {
    /// The reader state of a session opened by `req`: its bearer header or `?token=`.
    pub fn opening(req: &shardgate_io::http::Request) -> Inbound {
        let token = req.bearer.clone().or_else(|| req.query_param("token").map(str::to_string));
        Inbound { token, binary: None }
    }
}

/// A session on the HTTP long-polling transport, between and during its requests.
#[derive(Default)]
pub(crate) struct Polling {
    /// The reader state, used by each POST in turn.
    pub inbound: Inbound,
    /// A GET is waiting for packets (its task's waker is the entry's `waker`).
    pub get: bool,
    /// A POST body is being read.
    pub post: bool,
    /// A WebSocket is probing an upgrade of this session.
    pub probing: bool,
    /// The waiting GET should return a noop (the upgrade probe asked it to let go).
    pub noop: bool,
}

impl Polling {
    /// No GET waits, so no task will notice a close: whoever closes the session must
    /// also retire it (an upgrade probe does not hold it; it fails if the session goes).
    pub fn detached(&self) -> bool {
        !self.get
    }
}

impl ConnEntry {
    /// Drops everything queued.
    fn discard_outbox(&mut self) {
        self.outbox.clear();
        self.out_bytes = 0;
        self.head_off = 0;
    }

    /// `n` more bytes of the queue were written.
    pub fn advance(&mut self, mut n: usize) {
        self.out_bytes = self.out_bytes.saturating_sub(n);
        while n > 0 {
            let Some(f) = self.outbox.front() else { break };
            let left = f.len() - self.head_off;
            if n >= left {
                n -= left;
                self.outbox.pop_front();
                self.head_off = 0;
            } else {
                self.head_off += n;
                n = 0;
            }
        }
    }

    /// A WebSocket (running or parked): its frames are sent by the shard's writer task.
    pub fn is_websocket(&self) -> bool {
        self.fd.is_some() && self.poll.is_none()
    }

    /// True for a long-polling session that no request or probe holds.
    pub fn detached(&self) -> bool {
        self.poll.as_ref().is_some_and(|p| p.detached())
    }

    /// Wakes the connection task, if it is parked.
    pub fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// An authenticated Socket.IO session on the default namespace.
pub(crate) struct Session {
    /// Who the token says this is.
    pub identity: Identity,
    /// Tenant-qualified user key.
    pub user_key: Key,
    /// Rooms joined (tenant-qualified).
    pub rooms: Vec<Key>,
    /// Users whose presence this socket watches (tenant-qualified).
    pub watching: Vec<Key>,
    /// Rooms this socket is typing in, with the shard time the indicator expires.
    pub typing: Vec<(Key, u64)>,
    /// Token bucket: events available now.
    pub tokens: f64,
    /// Shard time (ms) of the last refill.
    pub refilled: u64,
    /// Consecutive refused events; past a bound the socket is closed.
    pub strikes: u32,
    /// Private session id (connection state recovery on).
    pub pid: Option<std::sync::Arc<str>>,
    /// The client sent a Socket.IO DISCONNECT: it will not come back for its session
    /// (an Engine.IO close, a transport closing, is not a goodbye).
    pub goodbye: bool,
    /// Registered with its user's directory (false while a recovery claim is pending).
    pub registered: bool,
}

/// Every connection of one shard.
#[derive(Default)]
pub(crate) struct Conns {
    slab: Slab<ConnEntry>,
    /// WebSockets whose queue went from empty to not empty in this pass: the shard's
    /// writer task sends their frames, coalesced, once the running task yields.
    dirty: Vec<ConnId>,
    /// Parked WebSockets that became readable or were woken (a close, a full socket):
    /// the writer task serves them ([`Conns::take_roused`]).
    roused: Vec<ConnId>,
    /// Wakes the writer task when `dirty` or `roused` gets its first entry.
    writer: Option<Waker>,
}

impl Conns {
    /// Registers a new connection.
    pub fn insert(&mut self, entry: ConnEntry) -> ConnId {
        self.slab.insert(entry)
    }

    /// Forgets a closed connection.
    pub fn remove(&mut self, id: ConnId) -> Option<ConnEntry> {
        self.slab.remove(id)
    }

    /// Connection `id`, if it is still open.
    pub fn get(&self, id: ConnId) -> Option<&ConnEntry> {
        self.slab.get(id)
    }

    /// Connection `id`, if it is still open.
    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut ConnEntry> {
        self.slab.get_mut(id)
    }

    /// The session of connection `id`, once connected.
    pub fn session(&self, id: ConnId) -> Option<&Session> {
        self.slab.get(id).and_then(|c| c.session.as_deref())
    }

    /// The session of connection `id`, once connected.
    pub fn session_mut(&mut self, id: ConnId) -> Option<&mut Session> {
        self.slab.get_mut(id).and_then(|c| c.session.as_deref_mut())
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Every open connection.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (ConnId, &mut ConnEntry)> {
        self.slab.iter_mut()
    }

    /// Queues `frame` on connection `id` and wakes its task; past `limit` bytes queued
    /// the connection is closed as a slow consumer and its queue dropped. True if queued.
    pub fn push(&mut self, m: &ShardMetrics, limit: usize, id: ConnId, frame: &Frame) -> bool {
        let Some(c) = self.slab.get_mut(id) else {
            return false;
        };
        if c.close.is_some() {
            return false;
        }
        if c.out_bytes + frame.len() > limit {
            c.close = Some(CloseReason::SlowConsumer);
            c.close_now = true;
            c.discard_outbox();
            rouse(c, id, &mut self.roused, &mut self.writer);
            return false;
        }
        m.inc(Counter::Deliveries);
        self.queue(id, frame);
        true
    }

    /// Queues `frame` on connection `id` without a bound (server pings: tiny, at most
    /// one outstanding).
    pub fn push_unbounded(&mut self, id: ConnId, frame: &Frame) {
        self.queue(id, frame);
    }

    fn queue(&mut self, id: ConnId, frame: &Frame) {
        let Some(c) = self.slab.get_mut(id) else { return };
        let was_empty = c.outbox.is_empty();
        c.outbox.push_back(frame.clone());
        c.out_bytes += frame.len();
        if c.is_websocket() {
            // A WebSocket: its frames of this pass go out in one send from the writer
            // task, without waking the connection's own task (or giving a parked one a
            // task).
            if was_empty {
                self.dirty.push(id);
                if let Some(w) = self.writer.take() {
                    w.wake();
                }
            }
        } else {
            c.wake();
        }
    }

    /// Wakes connection `id`'s task, or, if it is parked, lists it for the writer task
    /// (from the parking watcher: it is readable).
    pub fn rouse(&mut self, id: ConnId) {
        if let Some(c) = self.slab.get_mut(id) {
            rouse(c, id, &mut self.roused, &mut self.writer);
        }
    }

    /// The parked connections roused since the last call (possibly stale or repeated:
    /// check `parked`).
    pub fn take_roused(&mut self, into: &mut Vec<ConnId>) {
        into.append(&mut self.roused);
        if self.roused.capacity() > LIST_KEEP {
            self.roused = Vec::new();
        }
    }

    /// The writer task's turn: every connection that got frames since its last turn
    /// sends them now, coalesced into one `sendmsg` (`MSG_DONTWAIT`); what a socket does
    /// not take stays queued and the connection's task is woken to wait for it. `Pending`
    /// when there is nothing to write (the writer's waker is kept).
    pub fn poll_write_dirty(
        &mut self,
        m: &ShardMetrics,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.dirty.is_empty() {
            if !self.roused.is_empty() {
                return std::task::Poll::Ready(());
            }
            self.writer = Some(cx.waker().clone());
            return std::task::Poll::Pending;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        for id in &dirty {
            let Some(c) = self.slab.get_mut(*id) else { continue };
            let Some(fd) = c.fd else { continue };
            if c.close.is_some() || c.outbox.is_empty() {
                continue;
            }
            let sent = send_queued(fd, c);
            if sent > 0 {
                m.add(Counter::BytesOut, sent as u64);
                c.advance(sent);
            }
            if c.outbox.is_empty() && c.parked {
                // A parked connection keeps no queue allocation (a running task frees it
                // when it flushes).
                c.outbox = Default::default();
            } else if !c.outbox.is_empty() {
                c.blocked = true;
                rouse(c, *id, &mut self.roused, &mut self.writer);
            }
        }
        // Keep the list's allocation for the next pass, unless a wave (pings to every
        // connection) made it large.
        dirty.clear();
        if dirty.capacity() > LIST_KEEP {
            dirty = Vec::new();
        }
        self.dirty = dirty;
        std::task::Poll::Ready(())
    }

    /// Asks connection `id` to close; queued frames are flushed first (for at most
    /// [`CLOSE_FLUSH_MS`]) unless `now`. The first reason given is the one reported.
    pub fn close(&mut self, id: ConnId, reason: CloseReason, now: bool, at: u64) {
        let Some(c) = self.slab.get_mut(id) else {
            return;
        };
        if c.close.is_none() {
            c.close = Some(reason);
            c.close_by = at + CLOSE_FLUSH_MS;
        }
        if now {
            c.close_now = true;
            c.discard_outbox();
        }
        rouse(c, id, &mut self.roused, &mut self.writer);
    }
}

/// Wakes `c`'s task, or lists it in `roused` (waking the writer) if it is parked.
fn rouse(c: &mut ConnEntry, id: ConnId, roused: &mut Vec<ConnId>, writer: &mut Option<Waker>) {
    if c.parked {
        roused.push(id);
        if let Some(w) = writer.take() {
            w.wake();
        }
    } else {
        c.wake();
    }
}

/// Entries the writer's lists keep room for between passes (a larger one is freed
/// once empty: idle connections must not pay for a wave's list).
pub(crate) const LIST_KEEP: usize = 4096;

/// Most frames gathered into one `sendmsg`.
const GATHER: usize = 64;

/// Writes as much of `c`'s queue as the socket takes without blocking (one `sendmsg` of
/// up to [`GATHER`] frames, `MSG_DONTWAIT`); 0 when it takes nothing or fails (the
/// connection's task then meets the error on its own write).
fn send_queued(fd: std::os::fd::RawFd, c: &ConnEntry) -> usize {
    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; GATHER];
    let mut n = 0;
    for (i, f) in c.outbox.iter().take(GATHER).enumerate() {
        let bytes = if i == 0 { &f[c.head_off.min(f.len())..] } else { &f[..] };
        iov[n] = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
        n += 1;
    }
    // SAFETY: `fd` is the connection's open socket (cleared from the entry before the
    // socket is closed); a zeroed msghdr points at `n` iovecs over frames `c` holds for
    // the call.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n as _;
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    sent.max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_of_frames_goes_out_in_one_write_from_the_writer_in_order() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let (mut conns, m) = (Conns::default(), ShardMetrics::default());
        let waker = std::task::Waker::noop().clone();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(conns.poll_write_dirty(&m, &mut cx).is_pending(), "nothing to write");
        let id = conns.insert(ConnEntry { fd: Some(server.as_raw_fd()), ..Default::default() });
        for f in [&b"one,"[..], b"two,", b"three"] {
            assert!(conns.push(&m, 1 << 20, id, &Frame::from(f)));
        }
        assert_eq!(conns.dirty, vec![id], "listed once");
        assert!(conns.poll_write_dirty(&m, &mut cx).is_ready());
        assert!(conns.get(id).unwrap().outbox.is_empty(), "all written");
        assert_eq!(m.get(Counter::BytesOut), 13);
        let mut got = [0u8; 13];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one,two,three");
        // A long-polling session is left to its request.
        let id2 = conns.insert(ConnEntry {
            fd: Some(server.as_raw_fd()),
            poll: Some(Box::default()),
            ..Default::default()
        });
        assert!(conns.push(&m, 1 << 20, id2, &Frame::from(&b"polled"[..])));
        assert!(conns.dirty.is_empty());
        assert_eq!(conns.get(id2).unwrap().outbox.len(), 1);
    }

    #[test]
    fn a_slow_consumer_is_closed_and_its_queue_dropped() {
        let (mut conns, m) = (Conns::default(), ShardMetrics::default());
        let id = conns.insert(ConnEntry::default());
        let frame = Frame::from(&[0u8; 40][..]);
        assert!(conns.push(&m, 100, id, &frame));
        assert!(conns.push(&m, 100, id, &frame));
        assert!(!conns.push(&m, 100, id, &frame), "the third frame passes the bound");
        let c = conns.get(id).unwrap();
        assert_eq!(
            (c.close, c.close_now, c.outbox.len(), c.out_bytes),
            (Some(CloseReason::SlowConsumer), true, 0, 0)
        );
        assert_eq!(m.get(Counter::Deliveries), 2);
        assert!(!conns.push(&m, 100, id, &frame), "nothing is queued on a closing connection");
    }

    #[test]
    fn the_first_close_reason_wins_and_now_drops_the_queue() {
        let (mut conns, m) = (Conns::default(), ShardMetrics::default());
        let id = conns.insert(ConnEntry::default());
        conns.push(&m, 1000, id, &Frame::from(&b"x"[..]));
        conns.close(id, CloseReason::PingTimeout, false, 10);
        conns.close(id, CloseReason::ServerShutdown, true, 20);
        let c = conns.get(id).unwrap();
        assert_eq!(
            (c.close, c.close_by, c.outbox.len()),
            (Some(CloseReason::PingTimeout), 10 + CLOSE_FLUSH_MS, 0)
        );
    }
}
