//! RESP2 (the Redis protocol) through the `redis-protocol` crate: commands encoded as
//! arrays of bulk strings, replies and pub/sub pushes decoded from a byte buffer.
//!
//! Sans-IO like the rest of this crate: the bridge owns the sockets and the buffers.

use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::encode::encode_borrowed;
use redis_protocol::resp2::types::BorrowedFrame;

/// A decoded reply (or pub/sub push).
pub use redis_protocol::resp2::types::OwnedFrame as Reply;

/// Bytes that are not RESP2.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid RESP reply: {0}")]
pub struct RespError(pub String);

/// Appends the command `args` (name first) to `out`.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A], out: &mut Vec<u8>) {
    let parts: Vec<BorrowedFrame<'_>> = args.iter().map(|a| BorrowedFrame::BulkString(a.as_ref())).collect();
    let frame = BorrowedFrame::Array(&parts);
    let start = out.len();
    out.resize(start + frame.encode_len(false), 0);
    // The buffer was sized with the frame's own length: encoding cannot run short.
    let _ = encode_borrowed(&mut out[start..], &frame, false);
}

/// Decodes the first reply in `buf`: `Ok(None)` when incomplete, else the reply and the
/// bytes it used.
pub fn decode_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    decode(buf).map_err(|e| RespError(e.to_string()))
}

/// The bytes of a bulk or simple string reply.
pub fn as_bytes(r: &Reply) -> Option<&[u8]> {
    match r {
        Reply::BulkString(b) | Reply::SimpleString(b) => Some(b),
        _ => None,
    }
}

/// A pub/sub push, classic (`message`) or sharded (`smessage`, Redis Cluster):
/// `(channel, payload)`.
pub fn as_message(r: &Reply) -> Option<(&[u8], &[u8])> {
    match r {
        Reply::Array(a) if a.len() == 3 && matches!(as_bytes(&a[0]), Some(b"message" | b"smessage")) => {
            Some((as_bytes(&a[1])?, as_bytes(&a[2])?))
        }
        _ => None,
    }
}

/// The Redis Cluster hash slot of `key` (0..16384), honouring a `{hash tag}`.
pub fn key_slot(key: &[u8]) -> u16 {
    redis_protocol::redis_keyslot(key)
}

/// A `MOVED slot host:port` or `ASK slot host:port` redirection: `(ask, slot, address)`.
pub fn redirection(r: &Reply) -> Option<(bool, u16, &str)> {
    let Reply::Error(e) = r else { return None };
    let mut parts = e.split(' ');
    let ask = match parts.next()? {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    let slot = parts.next()?.parse().ok()?;
    let addr = parts.next()?;
    parts.next().is_none().then_some((ask, slot, addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slots_and_redirections() {
        // Values from `redis-cli cluster keyslot`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"user:{t:bob}:sockets"), key_slot(b"t:bob"));
        let moved = Reply::Error("MOVED 3999 127.0.0.1:6381".into());
        assert_eq!(redirection(&moved), Some((false, 3999, "127.0.0.1:6381")));
        let ask = Reply::Error("ASK 12 10.0.0.2:7000".into());
        assert_eq!(redirection(&ask), Some((true, 12, "10.0.0.2:7000")));
        assert_eq!(redirection(&Reply::Error("ERR MOVED 1 a:1".into())), None);
        assert_eq!(redirection(&Reply::Error("MOVED x a:1".into())), None);
        let push = |kind: &str| {
            Reply::Array(vec![
                Reply::BulkString(kind.into()),
                Reply::BulkString(b"ch".to_vec()),
                Reply::BulkString(b"p".to_vec()),
            ])
        };
        assert_eq!(as_message(&push("smessage")), Some((&b"ch"[..], &b"p"[..])));
        assert_eq!(as_message(&push("pmessage")), None);
    }

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        let mut out = Vec::new();
        encode_command(&["SET", "k", "v"], &mut out);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n");
    }

    #[test]
    fn decodes_replies_and_pushes() {
        assert_eq!(decode_reply(b"+OK\r\n").unwrap(), Some((Reply::SimpleString(b"OK".to_vec()), 5)));
        assert_eq!(decode_reply(b":12\r\n").unwrap(), Some((Reply::Integer(12), 5)));
        assert_eq!(decode_reply(b"$-1\r\n").unwrap(), Some((Reply::Null, 5)));
        assert_eq!(decode_reply(b"$5\r\nhel").unwrap(), None);
        let push = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nabc\r\n";
        let (r, n) = decode_reply(push).unwrap().unwrap();
        assert_eq!(n, push.len());
        assert_eq!(as_message(&r), Some((&b"ch"[..], &b"abc"[..])));
        assert!(matches!(decode_reply(b"-ERR nope\r\n").unwrap(), Some((Reply::Error(_), _))));
        assert!(decode_reply(b"?what\r\n").is_err());
    }

    proptest! {
        #[test]
        fn command_round_trip(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..6)) {
            let mut out = Vec::new();
            encode_command(&args, &mut out);
            let (r, n) = decode_reply(&out).unwrap().unwrap();
            prop_assert_eq!(n, out.len());
            prop_assert_eq!(r, Reply::Array(args.into_iter().map(Reply::BulkString).collect()));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_reply(&bytes);
        }
    }
}
