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
    /// The WebSocket's descriptor while its connection task runs: a frame pushed while
    /// nothing is queued is written at once from here ([`Conns::push`]), without waking
    /// the task. Cleared before the socket can be closed (the task retires the entry
    /// first).
    pub fd: Option<std::os::fd::RawFd>,
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

    /// Queues `frame` without a bound (server pings: tiny and at most one outstanding).
    pub fn push_unbounded(&mut self, frame: &Frame) {
        self.outbox.push_back(frame.clone());
        self.out_bytes += frame.len();
        self.wake();
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
        } else {
            m.inc(Counter::Deliveries);
            // Nothing queued: the socket has every earlier byte, so the frame may go out
            // now, in order, without a wake-up and a poll of the connection's task.
            let sent = match c.fd {
                Some(fd) if c.outbox.is_empty() && c.poll.is_none() => send_now(fd, frame),
                _ => 0,
            };
            if sent > 0 {
                m.add(Counter::BytesOut, sent as u64);
            }
            if sent == frame.len() {
                return true;
            }
            // The rest waits for the task, which waits for the socket to drain.
            c.outbox.push_back(frame.clone());
            c.head_off = sent;
            c.out_bytes += frame.len() - sent;
        }
        c.wake();
        c.close.is_none()
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
        c.wake();
    }
}

/// Writes as much of `frame` as the socket takes without blocking (`send` with
/// `MSG_DONTWAIT`); 0 when it takes nothing or fails (the connection's task then meets
/// the error on its own write).
fn send_now(fd: std::os::fd::RawFd, frame: &[u8]) -> usize {
    // SAFETY: `fd` is the connection's open socket (cleared from the entry before the
    // socket is closed), and the buffer is a live slice of the given length.
    let n = unsafe {
        libc::send(fd, frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    n.max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_goes_out_at_once_while_nothing_is_queued_and_in_order_after() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let (mut conns, m) = (Conns::default(), ShardMetrics::default());
        let id = conns.insert(ConnEntry { fd: Some(server.as_raw_fd()), ..Default::default() });
        assert!(conns.push(&m, 1 << 20, id, &Frame::from(&b"one"[..])));
        assert!(conns.get(id).unwrap().outbox.is_empty(), "written, not queued");
        let mut got = [0u8; 3];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one");
        // Something queued (a write the task has not finished): later frames queue behind.
        conns.get_mut(id).unwrap().outbox.push_back(Frame::from(&b"two"[..]));
        assert!(conns.push(&m, 1 << 20, id, &Frame::from(&b"three"[..])));
        assert_eq!(conns.get(id).unwrap().outbox.len(), 2);
        // A long-polling session is never written from here.
        let id2 = conns.insert(ConnEntry {
            fd: Some(server.as_raw_fd()),
            poll: Some(Box::default()),
            ..Default::default()
        });
        assert!(conns.push(&m, 1 << 20, id2, &Frame::from(&b"polled"[..])));
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
