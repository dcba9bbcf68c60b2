//! The node-to-node envelope: the binary payloads shardgate nodes publish to each other
//! on Redis channels.
//!
//! Every byte here comes from another process (or from anybody who can publish on the
//! Redis instance), so decoding is bounds-checked throughout and never panics; a payload
//! that does not parse is an [`EnvelopeError`] the receiver counts and drops.
//!
//! Layout (integers big-endian, strings as a u16 length then UTF-8 bytes):
//!
//! | envelope | channel | bytes |
//! |---|---|---|
//! | [`Envelope::Deliver`] | `server:{id}` | `D` user msg_id:u128 origin_server origin_shard:u16 origin_conn:u64 frame… |
//! | [`Envelope::Ack`] | `server:{id}` | `A` msg_id:u128 origin_shard:u16 origin_conn:u64 status:u8 |
//! | [`RoomEnvelope`] | `room:{id}` | origin_server frame… |
//!
//! | [`LoggedRoom`] | `room:{id}` | `R` origin_server origin_shard:u16 origin_conn:u64 frame… |
//!
//! `frame` is the rest of the payload: pre-encoded WebSocket frames, passed through.
//!
//! With connection state recovery, a message is published by a Redis script that gives
//! it its place in the cluster's order: the script prefixes the envelope the node built
//! with `S`, the sequence number in ASCII decimal and a space ([`split_logged`]).

/// Outcome of a 1:1 message as it travels back to the sender's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    /// A socket of the recipient received it.
    Delivered,
    /// The recipient was offline; it waits in their offline queue.
    Queued,
    /// Accepted, with no better report.
    Sent,
}

impl AckStatus {
    fn to_byte(self) -> u8 {
        match self {
            AckStatus::Delivered => 0,
            AckStatus::Queued => 1,
            AckStatus::Sent => 2,
        }
    }

    fn from_byte(b: u8) -> Result<AckStatus, EnvelopeError> {
        match b {
            0 => Ok(AckStatus::Delivered),
            1 => Ok(AckStatus::Queued),
            2 => Ok(AckStatus::Sent),
            other => Err(EnvelopeError::UnknownStatus(other)),
        }
    }
}

/// A socket in another node: shard and connection inside that process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSocket {
    /// Shard inside the origin process.
    pub shard: u16,
    /// Connection id inside that shard (opaque here).
    pub conn: u64,
}

/// An envelope on a node's own `server:{id}` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope<'a> {
    /// Deliver `frame` to every local socket of `user`, then report to the origin.
    Deliver {
        /// Tenant-qualified user key of the recipient.
        user: &'a str,
        /// Message id.
        msg_id: u128,
        /// Server id of the sender's node.
        origin_server: &'a str,
        /// The sender's socket inside its node.
        origin: RemoteSocket,
        /// Pre-encoded `message:new` frame.
        frame: &'a [u8],
    },
    /// The outcome of message `msg_id` for the sender's socket `origin`.
    Ack {
        /// Message id.
        msg_id: u128,
        /// The sender's socket inside this node.
        origin: RemoteSocket,
        /// Outcome.
        status: AckStatus,
    },
}

/// A room broadcast on `room:{id}`: which node published it, and the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomEnvelope<'a> {
    /// Server id of the publishing node (which delivered it locally already).
    pub origin_server: &'a str,
    /// Pre-encoded frame.
    pub frame: &'a [u8],
}

/// A recoverable room message on `room:{id}`: who sent it (the sender does not get its
/// own message), and the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRoom<'a> {
    /// Server id of the sender's node.
    pub origin_server: &'a str,
    /// The sender's socket inside its node.
    pub origin: RemoteSocket,
    /// Pre-encoded frame, without its offset.
    pub frame: &'a [u8],
}

/// A payload that is not an envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Shorter than its fields say.
    #[error("envelope truncated while reading {0}")]
    Truncated(&'static str),
    /// A string field is not UTF-8.
    #[error("envelope field {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// The first byte names no envelope kind.
    #[error("unknown envelope kind {0:#04x}")]
    UnknownKind(u8),
    /// The status byte of an ack is not a known status.
    #[error("unknown delivery status {0}")]
    UnknownStatus(u8),
    /// Bytes after an ack.
    #[error("{0} trailing bytes after an ack envelope")]
    Trailing(usize),
    /// The `S` prefix of a logged payload without a valid sequence number.
    #[error("logged payload without a valid sequence number")]
    BadSequence,
    /// A string longer than a u16 length can say (encoding side).
    #[error("envelope field {0} is longer than 65535 bytes")]
    TooLong(&'static str),
}

const DELIVER: u8 = b'D';
const LOGGED_ROOM: u8 = b'R';
const LOGGED: u8 = b'S';
const ACK: u8 = b'A';

impl Envelope<'_> {
    /// Appends the encoded envelope to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
        match self {
            Envelope::Deliver { user, msg_id, origin_server, origin, frame } => {
                out.reserve(frame.len() + user.len() + origin_server.len() + 33);
                out.push(DELIVER);
                put_str(out, user, "user")?;
                out.extend_from_slice(&msg_id.to_be_bytes());
                put_str(out, origin_server, "origin_server")?;
                put_socket(out, origin);
                out.extend_from_slice(frame);
            }
            Envelope::Ack { msg_id, origin, status } => {
                out.reserve(28);
                out.push(ACK);
                out.extend_from_slice(&msg_id.to_be_bytes());
                put_socket(out, origin);
                out.push(status.to_byte());
            }
        }
        Ok(())
    }

    /// The encoded envelope as a new buffer.
    pub fn to_vec(&self) -> Result<Vec<u8>, EnvelopeError> {
        encoded(|out| self.encode(out))
    }
}

/// Decodes a `server:{id}` payload; borrows from `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    let mut r = Reader(bytes);
    match r.u8("kind")? {
        DELIVER => {
            let user = r.str("user")?;
            let msg_id = r.u128("msg_id")?;
            let origin_server = r.str("origin_server")?;
            let origin = r.socket()?;
            Ok(Envelope::Deliver { user, msg_id, origin_server, origin, frame: r.0 })
        }
        ACK => {
            let msg_id = r.u128("msg_id")?;
            let origin = r.socket()?;
            let status = AckStatus::from_byte(r.u8("status")?)?;
            if !r.0.is_empty() {
                return Err(EnvelopeError::Trailing(r.0.len()));
            }
            Ok(Envelope::Ack { msg_id, origin, status })
        }
        other => Err(EnvelopeError::UnknownKind(other)),
    }
}

impl RoomEnvelope<'_> {
    /// Appends the encoded envelope to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
        out.reserve(self.frame.len() + self.origin_server.len() + 2);
        put_str(out, self.origin_server, "origin_server")?;
        out.extend_from_slice(self.frame);
        Ok(())
    }

    /// The encoded envelope as a new buffer.
    pub fn to_vec(&self) -> Result<Vec<u8>, EnvelopeError> {
        encoded(|out| self.encode(out))
    }
}

/// Decodes a `room:{id}` payload; borrows from `bytes`.
pub fn decode_room(bytes: &[u8]) -> Result<RoomEnvelope<'_>, EnvelopeError> {
    let mut r = Reader(bytes);
    let origin_server = r.str("origin_server")?;
    Ok(RoomEnvelope { origin_server, frame: r.0 })
}

impl LoggedRoom<'_> {
    /// Appends the encoded envelope to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
        out.reserve(self.frame.len() + self.origin_server.len() + 13);
        out.push(LOGGED_ROOM);
        put_str(out, self.origin_server, "origin_server")?;
        put_socket(out, &self.origin);
        out.extend_from_slice(self.frame);
        Ok(())
    }

    /// The encoded envelope as a new buffer.
    pub fn to_vec(&self) -> Result<Vec<u8>, EnvelopeError> {
        encoded(|out| self.encode(out))
    }
}

/// Decodes a [`LoggedRoom`] (the part after [`split_logged`]'s prefix).
pub fn decode_logged_room(bytes: &[u8]) -> Result<LoggedRoom<'_>, EnvelopeError> {
    let mut r = Reader(bytes);
    match r.u8("kind")? {
        LOGGED_ROOM => {
            let origin_server = r.str("origin_server")?;
            let origin = r.socket()?;
            Ok(LoggedRoom { origin_server, origin, frame: r.0 })
        }
        other => Err(EnvelopeError::UnknownKind(other)),
    }
}

/// Splits a logged payload (`S` seq ` ` envelope) into its sequence number and envelope;
/// `Ok(None)` for a payload that is not logged. (A [`RoomEnvelope`] starts with the
/// length of a server id, which is far below the 0x53xx an `S` would make it.)
pub fn split_logged(bytes: &[u8]) -> Result<Option<(u64, &[u8])>, EnvelopeError> {
    let Some((&LOGGED, rest)) = bytes.split_first() else {
        return Ok(None);
    };
    let space = rest.iter().position(|&b| b == b' ').ok_or(EnvelopeError::BadSequence)?;
    let digits = &rest[..space];
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(EnvelopeError::BadSequence);
    }
    let seq =
        std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()).ok_or(EnvelopeError::BadSequence)?;
    Ok(Some((seq, &rest[space + 1..])))
}

/// What `encode` appends, as a new buffer.
fn encoded(encode: impl FnOnce(&mut Vec<u8>) -> Result<(), EnvelopeError>) -> Result<Vec<u8>, EnvelopeError> {
    let mut out = Vec::new();
    encode(&mut out)?;
    Ok(out)
}

fn put_socket(out: &mut Vec<u8>, s: &RemoteSocket) {
    out.extend_from_slice(&s.shard.to_be_bytes());
    out.extend_from_slice(&s.conn.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str, field: &'static str) -> Result<(), EnvelopeError> {
    let len = u16::try_from(s.len()).map_err(|_| EnvelopeError::TooLong(field))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// A cursor over a payload; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], EnvelopeError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(EnvelopeError::Truncated(field))?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, EnvelopeError> {
        self.take::<1>(field).map(|[b]| b)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, EnvelopeError> {
        self.take(field).map(u16::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, EnvelopeError> {
        self.take(field).map(u64::from_be_bytes)
    }

    fn u128(&mut self, field: &'static str) -> Result<u128, EnvelopeError> {
        self.take(field).map(u128::from_be_bytes)
    }

    fn socket(&mut self) -> Result<RemoteSocket, EnvelopeError> {
        Ok(RemoteSocket { shard: self.u16("origin_shard")?, conn: self.u64("origin_conn")? })
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, EnvelopeError> {
        let n = self.u16(field)? as usize;
        if self.0.len() < n {
            return Err(EnvelopeError::Truncated(field));
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        std::str::from_utf8(s).map_err(|_| EnvelopeError::NotUtf8(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn deliver_and_ack_round_trip() {
        let origin = RemoteSocket { shard: 3, conn: 0x1234_0000_0007 };
        let d =
            Envelope::Deliver { user: "t:bob", msg_id: 42, origin_server: "srv", origin, frame: b"frame" };
        let bytes = d.to_vec().unwrap();
        assert_eq!(bytes[0], b'D');
        assert_eq!(decode(&bytes).unwrap(), d);
        let a = Envelope::Ack { msg_id: u128::MAX, origin, status: AckStatus::Queued };
        let bytes = a.to_vec().unwrap();
        assert_eq!(bytes.len(), 28);
        assert_eq!(decode(&bytes).unwrap(), a);
    }

    #[test]
    fn logged_payloads_carry_their_sequence() {
        let origin = RemoteSocket { shard: 1, conn: 9 };
        let room = LoggedRoom { origin_server: "srv", origin, frame: b"f" };
        let mut payload = b"S42 ".to_vec();
        room.encode(&mut payload).unwrap();
        let (seq, inner) = split_logged(&payload).unwrap().unwrap();
        assert_eq!((seq, decode_logged_room(inner).unwrap()), (42, room));
        let plain = RoomEnvelope { origin_server: "srv", frame: b"f" }.to_vec().unwrap();
        assert_eq!(split_logged(&plain), Ok(None));
        for bad in [&b"S"[..], b"S ", b"Sx1 D", b"S99999999999999999999 D"] {
            assert_eq!(split_logged(bad), Err(EnvelopeError::BadSequence), "{bad:?}");
        }
        assert_eq!(decode_logged_room(b"D"), Err(EnvelopeError::UnknownKind(b'D')));
    }

    #[test]
    fn bad_payloads_name_what_is_wrong() {
        let d = Envelope::Deliver {
            user: "t:bob",
            msg_id: 42,
            origin_server: "srv",
            origin: RemoteSocket { shard: 0, conn: 1 },
            frame: b"",
        };
        let bytes = d.to_vec().unwrap();
        assert_eq!(decode(&bytes[..5]), Err(EnvelopeError::Truncated("user")));
        assert_eq!(decode(&bytes[..10]), Err(EnvelopeError::Truncated("msg_id")));
        assert_eq!(decode(b""), Err(EnvelopeError::Truncated("kind")));
        assert_eq!(decode(b"Z"), Err(EnvelopeError::UnknownKind(b'Z')));
        assert_eq!(decode(b"D\x00\x02\xff\xfe"), Err(EnvelopeError::NotUtf8("user")));
        let mut ack =
            Envelope::Ack { msg_id: 1, origin: RemoteSocket { shard: 0, conn: 1 }, status: AckStatus::Sent }
                .to_vec()
                .unwrap();
        ack[27] = 9;
        assert_eq!(decode(&ack), Err(EnvelopeError::UnknownStatus(9)));
        ack[27] = 0;
        ack.push(0);
        assert_eq!(decode(&ack), Err(EnvelopeError::Trailing(1)));
        let long = "x".repeat(70_000);
        let room = RoomEnvelope { origin_server: &long, frame: b"" };
        assert_eq!(room.to_vec(), Err(EnvelopeError::TooLong("origin_server")));
    }

    #[test]
    fn room_envelopes_round_trip() {
        let r = RoomEnvelope { origin_server: "node-a", frame: b"\x81\x02hi" };
        let bytes = r.to_vec().unwrap();
        assert_eq!(decode_room(&bytes).unwrap(), r);
        assert_eq!(decode_room(b"\x00"), Err(EnvelopeError::Truncated("origin_server")));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&bytes);
            let _ = decode_room(&bytes);
        }

        #[test]
        fn deliver_round_trips(user in ".{0,40}", server in "[a-z0-9]{0,20}", msg_id: u128,
                               shard: u16, conn: u64, frame in proptest::collection::vec(any::<u8>(), 0..64)) {
            let d = Envelope::Deliver {
                user: &user, msg_id, origin_server: &server,
                origin: RemoteSocket { shard, conn }, frame: &frame,
            };
            let bytes = d.to_vec().unwrap();
            prop_assert_eq!(decode(&bytes).unwrap(), d);
        }
    }
}
