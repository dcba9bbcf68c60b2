//! Recovery claims in progress on this node: a reconnecting socket whose session is being
//! restored, between the bridge reading the session and Redis answering the RESUME
//! script.
//!
//! While a claim is open, recoverable messages for its rooms and its user are delivered
//! to everybody else as usual and also *held* for it: its shard does not count it as a
//! member or a socket of the user yet (it must not get live messages before its missed
//! ones). When RESUME answers with the sequence number it read up to, the held messages
//! after that number follow the replay; the ones at or below it are in the replay
//! already. So nothing is missed and nothing comes twice (`docs/recovery.md`).
//!
//! Pure bookkeeping, indexed by room and user so that a push costs a lookup, not a scan
//! of every claim; the cluster logic around it is in `recover.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use shardgate_shard::msg::{Frame, Key, SocketRef};

/// One claim: the socket, whose session it claims, and what was held for it.
#[derive(Debug)]
pub struct Claim {
    /// The new socket.
    pub socket: SocketRef,
    /// Its user.
    pub user: Key,
    /// The session claimed.
    pub pid: Arc<str>,
    /// The client's last processed offset.
    pub offset: Option<u64>,
    /// The session's rooms.
    pub rooms: Vec<Key>,
    /// Room channels whose SUBSCRIBE is not confirmed yet.
    pub waiting: HashSet<String>,
    /// The RESUME script is in flight.
    pub sent: bool,
    /// The socket closed while RESUME was in flight: undo what it registers.
    pub cancelled: bool,
    /// Recoverable messages for it since the claim opened: (sequence, frame), in order.
    pub held: Vec<(u64, Frame)>,
    /// RESUME's answer: the sequence it read up to, and the replay.
    pub replay: Option<(u64, Vec<Frame>)>,
    /// RESUME's marker arrived on the pub/sub connection: every push up to the replay's
    /// sequence has been received (the reply and the pushes come on two connections).
    pub marked: bool,
}

/// Every open claim of this node, by socket id.
#[derive(Debug, Default)]
pub struct Claims {
    by_sid: HashMap<String, Claim>,
    rooms: HashMap<Key, Vec<String>>,
    users: HashMap<Key, Vec<String>>,
    /// Claims whose channels are all subscribed, for the next round to send RESUME.
    ready: Vec<String>,
}

fn unindex(index: &mut HashMap<Key, Vec<String>>, key: &Key, sid: &str) {
    if let Some(v) = index.get_mut(key) {
        v.retain(|s| s != sid);
        if v.is_empty() {
            index.remove(key);
        }
    }
}

impl Claims {
    /// No claim open.
    pub fn is_empty(&self) -> bool {
        self.by_sid.is_empty()
    }

    /// Opens a claim for socket `sid`.
    pub fn insert(&mut self, sid: String, claim: Claim) {
        for room in &claim.rooms {
            self.rooms.entry(room.clone()).or_default().push(sid.clone());
        }
        self.users.entry(claim.user.clone()).or_default().push(sid.clone());
        if let Some(old) = self.by_sid.insert(sid.clone(), claim) {
            // A socket id claims once; a second claim replaces the first's indexes.
            self.unindex(&sid, &old);
        }
    }

    fn unindex(&mut self, sid: &str, claim: &Claim) {
        for room in &claim.rooms {
            unindex(&mut self.rooms, room, sid);
        }
        unindex(&mut self.users, &claim.user, sid);
    }

    /// Closes the claim of `sid`.
    pub fn remove(&mut self, sid: &str) -> Option<Claim> {
        let claim = self.by_sid.remove(sid)?;
        self.unindex(sid, &claim);
        Some(claim)
    }

    /// Socket `sid` closed: a claim whose RESUME is in flight is marked cancelled (its
    /// answer undoes what it registered); one not sent yet ends now, and its rooms are
    /// returned for the caller to leave.
    pub fn cancel(&mut self, sid: &str) -> Vec<Key> {
        match self.by_sid.get_mut(sid) {
            Some(c) if c.sent => {
                c.cancelled = true;
                Vec::new()
            }
            Some(_) => self.remove(sid).map(|c| c.rooms).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// The claim of `sid`.
    pub fn get_mut(&mut self, sid: &str) -> Option<&mut Claim> {
        self.by_sid.get_mut(sid)
    }

    /// Socket ids of every open claim.
    pub fn sids(&self) -> Vec<String> {
        self.by_sid.keys().cloned().collect()
    }

    /// `channel` is subscribed now: claims that wait for nothing more become ready.
    pub fn subscribed(&mut self, channel: &str) {
        for (sid, c) in self.by_sid.iter_mut() {
            if c.waiting.remove(channel) && c.waiting.is_empty() && !c.sent {
                self.ready.push(sid.clone());
            }
        }
    }

    /// The claims that became ready since the last call.
    pub fn take_ready(&mut self) -> Vec<String> {
        std::mem::take(&mut self.ready)
    }

    /// Holds room `room`'s message `seq` for every claim of a session in that room.
    pub fn hold_room(&mut self, room: &str, seq: u64, frame: &Frame) {
        let Some(sids) = self.rooms.get(room) else { return };
        for sid in sids {
            if let Some(c) = self.by_sid.get_mut(sid) {
                c.held.push((seq, frame.clone()));
            }
        }
    }

    /// Holds 1:1 message `seq` for every claim of `user`; true if any held it.
    pub fn hold_user(&mut self, user: &str, seq: u64, frame: &Frame) -> bool {
        let Some(sids) = self.users.get(user) else { return false };
        let mut held = false;
        for sid in sids {
            if let Some(c) = self.by_sid.get_mut(sid) {
                c.held.push((seq, frame.clone()));
                held = true;
            }
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardgate_shard::msg::key;
    use shardgate_shard::ConnId;

    fn claim(user: &str, rooms: &[&str], waiting: &[&str]) -> Claim {
        Claim {
            socket: SocketRef { shard: 0, conn: ConnId::from_u64(1) },
            user: key("t", user),
            pid: "p".into(),
            offset: Some(3),
            rooms: rooms.iter().map(|r| key("t", r)).collect(),
            waiting: waiting.iter().map(|s| s.to_string()).collect(),
            sent: false,
            cancelled: false,
            held: Vec::new(),
            replay: None,
            marked: false,
        }
    }

    #[test]
    fn messages_are_held_by_room_and_user_until_the_claim_closes() {
        let mut cs = Claims::default();
        cs.insert("a".into(), claim("ann", &["r1", "r2"], &["ch1"]));
        cs.insert("b".into(), claim("bob", &["r2"], &[]));
        let f = Frame::from(&b"x"[..]);
        cs.hold_room(&key("t", "r2"), 7, &f);
        cs.hold_room(&key("t", "r3"), 8, &f);
        assert!(cs.hold_user(&key("t", "ann"), 9, &f));
        assert!(!cs.hold_user(&key("t", "cat"), 10, &f));
        let a = cs.remove("a").unwrap();
        assert_eq!(a.held.iter().map(|h| h.0).collect::<Vec<_>>(), [7, 9]);
        cs.hold_room(&key("t", "r1"), 11, &f);
        let b = cs.remove("b").unwrap();
        assert_eq!(b.held.iter().map(|h| h.0).collect::<Vec<_>>(), [7]);
        assert!(cs.is_empty() && cs.rooms.is_empty() && cs.users.is_empty());
    }

    #[test]
    fn a_claim_is_ready_once_its_channels_are_subscribed() {
        let mut cs = Claims::default();
        cs.insert("a".into(), claim("ann", &["r1", "r2"], &["ch1", "ch2"]));
        cs.subscribed("ch1");
        cs.subscribed("other");
        assert!(cs.take_ready().is_empty());
        cs.subscribed("ch2");
        assert_eq!(cs.take_ready(), ["a"]);
        assert!(cs.take_ready().is_empty());
        cs.get_mut("a").unwrap().waiting.insert("ch3".into());
        cs.get_mut("a").unwrap().sent = true;
        cs.subscribed("ch3");
        assert!(cs.take_ready().is_empty(), "a sent claim is not planned twice");
    }

    #[test]
    fn a_closing_socket_cancels_its_claim() {
        let mut cs = Claims::default();
        cs.insert("a".into(), claim("ann", &["r1"], &[]));
        cs.insert("b".into(), claim("bob", &["r2"], &[]));
        cs.get_mut("b").unwrap().sent = true;
        assert_eq!(cs.cancel("a"), [key("t", "r1")], "not sent: ends, its rooms to leave");
        assert!(cs.get_mut("a").is_none());
        assert!(cs.cancel("b").is_empty(), "in flight: kept, marked");
        assert!(cs.get_mut("b").unwrap().cancelled);
        assert!(cs.cancel("c").is_empty());
    }
}
