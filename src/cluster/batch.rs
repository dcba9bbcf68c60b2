//! A pipelined batch: RESP-encoded commands, each with its hash slot (for a Redis
//! Cluster) and what to do with its reply ([`Then`], carried out by `apply.rs`).
//! Scripts the bridge loads on connect are encoded as `EVALSHA` (`scripts::ALL`).

use std::rc::Rc;
use std::sync::Arc;

use shardgate_io::resp;
use shardgate_shard::msg::{Frame, Key, Origin, SocketRef};

use super::scripts;

/// What to do with the reply of one pipelined command.
#[derive(Debug)]
pub enum Then {
    /// Nothing (errors are logged).
    Ignore,
    /// UP script: the offline queue to drain to the socket; `answer` answers its CONNECT.
    Drain {
        /// The registered socket.
        socket: SocketRef,
        /// Answer the socket's CONNECT (false when re-registering after a reconnect).
        answer: bool,
        /// Its user.
        user: Key,
    },
    /// DOWN script: 1 when it was the user's last socket.
    Down(Key),
    /// ROUTE script; `epoch` is the route cache epoch when it was sent.
    Route {
        /// Recipient.
        user: Key,
        /// Encoded `message:new`.
        frame: Frame,
        /// Message id.
        msg_id: u128,
        /// Sender.
        origin: SocketRef,
        /// Route cache epoch at send time.
        epoch: u64,
    },
    /// PUBLISH to a cached server; `tally` counts (replies pending, receivers) over all
    /// of the message's PUBLISHes; when none reached anybody and nothing was delivered
    /// locally, the message is routed again through the registry.
    Cached {
        /// Recipient.
        user: Key,
        /// Encoded `message:new`.
        frame: Frame,
        /// Message id.
        msg_id: u128,
        /// Sender.
        origin: SocketRef,
        /// Shared by the message's PUBLISHes.
        tally: Tally,
        /// Some sockets of the recipient are local (delivered already).
        local: bool,
        /// The servers came from the registry just now (a Redis Cluster, where the ROUTE
        /// script cannot publish to another slot's channel): when nobody is reached the
        /// message is queued, not routed again.
        registry: bool,
    },
    /// QUEUE_IF_OFFLINE for a bounce.
    Bounced {
        /// Sender, here or on another node.
        origin: Origin,
        /// Message id.
        msg_id: u128,
    },
    /// GET presence.
    Presence {
        /// Watched user.
        user: Key,
        /// Subscriber.
        socket: SocketRef,
    },
    /// ROUTE_LOGGED or LOG_ROOM script (recovery on): a 1:1 message was queued or
    /// published (its receivers report); a room message is logged: the sender hears `sent`.
    Logged {
        /// Sender.
        origin: SocketRef,
        /// Message id.
        msg_id: u128,
    },
    /// LOG_USER script (recovery on a Redis Cluster): published to its receivers, or
    /// `{-1, payload}` when nobody was reachable: queued on the user's slot.
    LoggedUser {
        /// Sender.
        origin: SocketRef,
        /// Message id.
        msg_id: u128,
        /// Recipient.
        user: Key,
    },
    /// SESSION_READ script: open the claim of `sid` on the session's rooms.
    ResumeRead {
        /// The claiming socket's id.
        sid: String,
        /// The claiming socket.
        socket: SocketRef,
        /// Its user.
        user: Key,
        /// The session claimed.
        pid: Arc<str>,
        /// The client's last offset.
        offset: Option<u64>,
    },
    /// RESUME script: restore the session of the claim of `sid`.
    Resume {
        /// The claiming socket's id.
        sid: String,
    },
    /// SMEMBERS nodes: try to sweep the others.
    Nodes,
    /// LEASE script on a server: 1 when it is dead and this node sweeps it.
    Lease(Arc<str>),
    /// HGETALL `connections:{S}`: unregister each socket of the swept server.
    SweepSockets(Arc<str>),
    /// SMEMBERS `rooms:{S}`: remove its members from each room, then end the sweep.
    SweepRooms(Arc<str>, Sweep),
    /// Planned after every step of a sweep: delete the server's lists (and more, by kind).
    SweepEnd(Arc<str>, Sweep),
    /// ALIVE script (the periodic liveness refresh): anything but 1 means this node's
    /// registrations may have been swept.
    Alive,
}

/// Why a server's registrations are swept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Another node, dead (its liveness key expired); this node holds the lease.
    Dead,
    /// This node's own, left by an earlier session, before it registers again.
    Own,
    /// This node's own, as it leaves the cluster.
    Leave,
}

/// Replies pending and receivers counted over the PUBLISHes of one cached route.
pub type Tally = Rc<std::cell::Cell<(usize, i64)>>;

/// A batch of pipelined commands and what to do with each reply, in order.
#[derive(Default)]
pub struct Batch {
    /// RESP-encoded commands.
    pub buf: Vec<u8>,
    /// One entry per command.
    pub then: Vec<Then>,
    /// Where each command ends in `buf`.
    pub ends: Vec<usize>,
    /// Each command's hash slot (its key's), `None` for a command without a key, which
    /// any Redis Cluster master serves.
    pub slots: Vec<Option<u16>>,
}

impl Batch {
    /// Appends one command.
    pub fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A], then: Then) {
        // A script the bridge loads when it connects goes by its SHA-1 (`scripts::ALL`).
        let sha = match args.first().map(AsRef::as_ref) {
            Some(b"EVAL") => args.get(1).and_then(|s| scripts::sha_of(s.as_ref())),
            _ => None,
        };
        match sha {
            Some(sha) => {
                let mut by_sha: Vec<&[u8]> = args.iter().map(AsRef::as_ref).collect();
                by_sha[0] = b"EVALSHA";
                by_sha[1] = sha.as_bytes();
                resp::encode_command(&by_sha, &mut self.buf);
            }
            _ => resp::encode_command(args, &mut self.buf),
        }
        self.then.push(then);
        self.ends.push(self.buf.len());
        self.slots.push(key_of(args).map(resp::key_slot));
    }

    /// The encoded bytes of command `i`.
    pub fn command(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[start..self.ends[i]]
    }

    /// No command planned.
    pub fn is_empty(&self) -> bool {
        self.then.is_empty()
    }
}

/// The key a command is routed by in a Redis Cluster: an EVAL's first key (its keys
/// share one slot), a sharded PUBLISH's channel, else the first argument; `None` for a
/// script without keys and a classic PUBLISH.
fn key_of<A: AsRef<[u8]>>(args: &[A]) -> Option<&[u8]> {
    let name = args.first()?.as_ref();
    if name.eq_ignore_ascii_case(b"EVAL") {
        return match args.get(2)?.as_ref() {
            b"0" => None,
            _ => args.get(3).map(AsRef::as_ref),
        };
    }
    if name.eq_ignore_ascii_case(b"PUBLISH") {
        return None;
    }
    args.get(1).map(AsRef::as_ref)
}
