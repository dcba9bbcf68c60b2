//! Connection state recovery on the embedded bus: what Redis does for a cluster, shard 0
//! does for its process (`docs/recovery.md`).
//!
//! With recovery on, every user is homed on shard 0 and every recoverable message passes
//! through it: the journal gives it the next sequence number, keeps it in the room's or
//! the user's log (bounded rings), and shard 0 alone sends it on. Each shard receives
//! shard 0's messages in the order they were sent (one producer, one FIFO inbox), so
//! every socket sees recoverable messages in sequence order, and a session restored
//! here (its rooms, the logged messages after the client's offset) is followed by
//! exactly the messages sequenced after it.
//!
//! Pure bookkeeping: no sending, tested on plain values.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use shardgate_io::packet;

use crate::ids::{Frame, Key, SocketRef};

/// A log: a room's or a user's recoverable messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LogKey {
    /// Room messages.
    Room(Key),
    /// 1:1 messages to a user.
    User(Key),
}

#[derive(Default)]
struct Log {
    /// (sequence, frame with its offset), oldest first.
    entries: VecDeque<(u64, Frame)>,
    /// Highest sequence number dropped by the bound.
    trimmed: u64,
    /// Shard time of the last append.
    touched: u64,
}

/// One recovery session.
struct SessionRec {
    user: Key,
    /// Sequence number when it began.
    from: u64,
    /// Rooms, with the sequence number at the join.
    rooms: HashMap<Key, u64>,
    /// The socket it is on now, if connected.
    socket: Option<SocketRef>,
    /// Shard time it expires, once disconnected.
    expires: Option<u64>,
}

/// Why a recovery claim restores nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No such session (never, expired, or the client said goodbye).
    Unknown,
    /// Another user's or tenant's session.
    OtherUser,
    /// A log lost messages after the client's offset.
    Trimmed,
}

/// A restored session: its rooms and the missed messages, in order.
pub(crate) struct Restore {
    /// Rooms.
    pub rooms: Vec<Key>,
    /// Frames after the offset, with their offsets.
    pub frames: Vec<Frame>,
}

/// The sequence, the logs and the sessions of one process.
pub(crate) struct Journal {
    seq: u64,
    logs: HashMap<LogKey, Log>,
    sessions: HashMap<Arc<str>, SessionRec>,
    log_len: usize,
    max_disconnection_ms: u64,
}

impl Journal {
    /// An empty journal keeping `log_len` entries per log and disconnected sessions for
    /// `max_disconnection_ms`.
    pub fn new(log_len: usize, max_disconnection_ms: u64) -> Journal {
        Journal { seq: 0, logs: HashMap::new(), sessions: HashMap::new(), log_len, max_disconnection_ms }
    }

    /// Gives `frame` the next sequence number and keeps it in `log`; returns the frame
    /// with its offset (the frame itself if it is not an event).
    pub fn append(&mut self, log: LogKey, frame: &Frame, now: u64) -> Frame {
        self.seq += 1;
        let seq = self.seq;
        let frame: Frame = packet::with_offset(frame, seq).map(Frame::from).unwrap_or_else(|| frame.clone());
        let l = self.logs.entry(log).or_default();
        l.entries.push_back((seq, frame.clone()));
        while l.entries.len() > self.log_len {
            if let Some((s, _)) = l.entries.pop_front() {
                l.trimmed = s;
            }
        }
        l.touched = now;
        frame
    }

    /// A new session `pid` of `user` on `socket`.
    pub fn open(&mut self, pid: Arc<str>, user: Key, socket: SocketRef) {
        let rec =
            SessionRec { user, from: self.seq, rooms: HashMap::new(), socket: Some(socket), expires: None };
        self.sessions.insert(pid, rec);
    }

    /// Session `pid` joined (`true`) or left `room`.
    pub fn room(&mut self, pid: &str, room: Key, joined: bool) {
        let seq = self.seq;
        if let Some(s) = self.sessions.get_mut(pid) {
            if joined {
                s.rooms.insert(room, seq);
            } else {
                s.rooms.remove(&room);
            }
        }
    }

    /// The socket of session `pid` closed: it stays restorable for
    /// `max_disconnection_ms` (`keep`), or ends. A socket the session has moved away
    /// from changes nothing.
    pub fn down(&mut self, pid: &str, socket: SocketRef, keep: bool, now: u64) {
        let Some(s) = self.sessions.get_mut(pid) else { return };
        if s.socket != Some(socket) {
            return;
        }
        if keep {
            s.socket = None;
            s.expires = Some(now + self.max_disconnection_ms);
        } else {
            self.sessions.remove(pid);
        }
    }

    /// Restores session `pid` for `user` on `socket`: every logged message of the user's
    /// log and the session's rooms after `offset` (or after the session began; for a
    /// room, never before its join), in sequence order.
    pub fn restore(
        &mut self,
        pid: &str,
        user: &str,
        offset: Option<u64>,
        socket: SocketRef,
        now: u64,
    ) -> Result<Restore, Refusal> {
        let s =
            self.sessions.get(pid).filter(|s| s.expires.is_none_or(|e| now <= e)).ok_or(Refusal::Unknown)?;
        if *s.user != *user {
            return Err(Refusal::OtherUser);
        }
        let from = offset.unwrap_or(s.from);
        let mut streams = vec![(LogKey::User(s.user.clone()), from)];
        streams.extend(s.rooms.iter().map(|(r, &joined)| (LogKey::Room(r.clone()), from.max(joined))));
        let mut frames: Vec<(u64, Frame)> = Vec::new();
        for (key, after) in &streams {
            let Some(log) = self.logs.get(key) else { continue };
            if log.trimmed > *after {
                return Err(Refusal::Trimmed);
            }
            frames.extend(log.entries.iter().filter(|(seq, _)| seq > after).cloned());
        }
        frames.sort_by_key(|(seq, _)| *seq);
        let rooms = s.rooms.keys().cloned().collect();
        if let Some(s) = self.sessions.get_mut(pid) {
            s.socket = Some(socket);
            s.expires = None;
        }
        Ok(Restore { rooms, frames: frames.into_iter().map(|(_, f)| f).collect() })
    }

    /// Drops expired sessions and logs nobody can need any more (idle for longer than a
    /// session stays restorable).
    pub fn sweep(&mut self, now: u64) {
        self.sessions.retain(|_, s| s.expires.is_none_or(|e| now <= e));
        let idle = self.max_disconnection_ms;
        self.logs.retain(|_, l| now.saturating_sub(l.touched) <= idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{key, ConnId};

    fn sock(n: u64) -> SocketRef {
        SocketRef { shard: 0, conn: ConnId::from_u64(n) }
    }

    fn ev(s: &str) -> Frame {
        packet::event_frame("message:new", &serde_json::json!(s)).into()
    }

    fn texts(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| {
                String::from_utf8_lossy(shardgate_io::ws::server_frames(f).next().unwrap().1).into_owned()
            })
            .collect()
    }

    #[test]
    fn a_session_restores_its_rooms_and_what_came_after_the_offset() {
        let mut j = Journal::new(10, 1000);
        let (ann, lobby) = (key("t", "ann"), key("t", "lobby"));
        j.append(LogKey::Room(lobby.clone()), &ev("before"), 0);
        j.open("p".into(), ann.clone(), sock(1));
        j.room("p", lobby.clone(), true);
        let live = j.append(LogKey::Room(lobby.clone()), &ev("r2"), 0);
        assert!(texts(&[live])[0].ends_with(r#""r2","2"]"#));
        j.down("p", sock(1), true, 10);
        j.append(LogKey::User(ann.clone()), &ev("d3"), 20);
        j.append(LogKey::Room(key("t", "other")), &ev("x4"), 20);
        j.append(LogKey::Room(lobby.clone()), &ev("r5"), 20);
        let r = j.restore("p", &ann, Some(2), sock(2), 30).ok().unwrap();
        assert_eq!(r.rooms, std::slice::from_ref(&lobby));
        assert_eq!(texts(&r.frames), [r#"42["message:new","d3","3"]"#, r#"42["message:new","r5","5"]"#]);
        // Without an offset: everything since the session began (never before the join).
        j.down("p", sock(2), true, 40);
        let r = j.restore("p", &ann, None, sock(3), 50).ok().unwrap();
        assert_eq!(r.frames.len(), 3);
    }

    #[test]
    fn refusals() {
        let mut j = Journal::new(2, 100);
        let ann = key("t", "ann");
        j.open("p".into(), ann.clone(), sock(1));
        assert_eq!(j.restore("p", &key("t", "eve"), None, sock(2), 0).err(), Some(Refusal::OtherUser));
        assert_eq!(j.restore("nope", &ann, None, sock(2), 0).err(), Some(Refusal::Unknown));
        for i in 0..3 {
            j.append(LogKey::User(ann.clone()), &ev(&i.to_string()), 0);
        }
        assert_eq!(j.restore("p", &ann, Some(0), sock(2), 0).err(), Some(Refusal::Trimmed));
        assert!(j.restore("p", &ann, Some(1), sock(2), 0).is_ok());
        // A socket the session moved away from does not end it.
        j.down("p", sock(1), false, 0);
        assert!(j.restore("p", &ann, Some(1), sock(3), 0).is_ok());
        j.down("p", sock(3), true, 10);
        assert_eq!(j.restore("p", &ann, Some(1), sock(4), 111).err(), Some(Refusal::Unknown), "expired");
        j.sweep(1000);
        assert!(j.sessions.is_empty() && j.logs.is_empty());
        // A client that said goodbye has no session.
        j.open("q".into(), ann.clone(), sock(5));
        j.down("q", sock(5), false, 0);
        assert_eq!(j.restore("q", &ann, None, sock(6), 0).err(), Some(Refusal::Unknown));
    }
}
