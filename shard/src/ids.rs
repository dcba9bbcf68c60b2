//! The names every part of a shard uses: shards, tenant-qualified keys, socket ids,
//! sockets anywhere in the process or the cluster, and the frame type they carry.
//!
//! A leaf module: it imports nothing of this crate but the connection slab's id.

use std::sync::Arc;

use shardgate_io::envelope::RemoteSocket;

pub use crate::slab::ConnId;

/// Index of a shard inside one process.
pub type ShardId = usize;

/// One or more complete WebSocket frames, shared by every recipient.
pub type Frame = Arc<[u8]>;

/// A tenant-qualified id: `"{tenant}\x1f{id}"`. Tenants can never collide.
pub type Key = Arc<str>;

/// Builds the tenant-qualified key of `id`.
pub fn key(tenant: &str, id: &str) -> Key {
    let mut s = String::with_capacity(tenant.len() + id.len() + 1);
    s.push_str(tenant);
    s.push('\x1f');
    s.push_str(id);
    s.into()
}

/// The id part of a tenant-qualified key.
pub fn key_id(key: &str) -> &str {
    key.split_once('\x1f').map(|(_, id)| id).unwrap_or(key)
}

/// Scrambles the slot/generation pair so socket ids do not read as counters.
const SID_XOR: u64 = 0x5bd1_e995_9e37_79b9;

/// The socket id (Engine.IO `sid`) of connection `conn` on `shard`: two hex digits of
/// shard, then the connection. Also the socket's name in the cluster registry.
pub fn sid(shard: ShardId, conn: ConnId) -> String {
    format!("{shard:02x}{:016x}", conn.as_u64() ^ SID_XOR)
}

/// Inverse of [`sid`]; `None` for anything that is not one.
pub fn parse_sid(sid: &str) -> Option<(ShardId, ConnId)> {
    let shard = usize::from_str_radix(sid.get(..2)?, 16).ok()?;
    let conn = u64::from_str_radix(sid.get(2..)?, 16).ok()?;
    Some((shard, ConnId::from_u64(conn ^ SID_XOR)))
}

/// Fills `buf` from the kernel's random source (`getrandom(2)`).
fn fill_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most the remaining bytes of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
}

/// A private session id for connection state recovery: 128 random bits as 32 lowercase
/// hex digits. It is a credential (it restores a session), so it comes from the kernel.
pub fn new_pid() -> Arc<str> {
    let mut b = [0u8; 16];
    fill_random(&mut b);
    data_encoding::HEXLOWER.encode(&b).into()
}

/// True for something [`new_pid`] could have made.
pub fn valid_pid(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Length of the tag [`SidKey`] appends to a socket name: 128 bits, base64url.
const TAG_CHARS: usize = 22;

/// The process's secret for Engine.IO session ids. A session id is a credential (any
/// long-polling request or upgrade that names it acts as that client), so it is the
/// socket's name ([`sid`]: where it lives) followed by a 128-bit HMAC-SHA-256 tag of that
/// name under a random per-process key: unguessable, checked without a lookup, costing no
/// memory per connection, and refused by any other process (its key differs).
pub struct SidKey([u8; 32]);

impl SidKey {
    /// A fresh random key from the kernel (`getrandom(2)`).
    pub fn random() -> SidKey {
        let mut key = [0u8; 32];
        fill_random(&mut key);
        SidKey(key)
    }

    fn tag(&self, name: &str) -> String {
        use hmac::Mac;
        // HMAC accepts keys of any length.
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("hmac key");
        mac.update(name.as_bytes());
        let out = mac.finalize().into_bytes();
        data_encoding::BASE64URL_NOPAD.encode(&out[..16])
    }

    /// The Engine.IO session id of connection `conn` on `shard`.
    pub fn engine_sid(&self, shard: ShardId, conn: ConnId) -> String {
        let mut s = sid(shard, conn);
        let tag = self.tag(&s);
        s.push_str(&tag);
        s
    }

    /// The connection an Engine.IO session id names, if its tag is this process's.
    pub fn verify(&self, engine_sid: &str) -> Option<(ShardId, ConnId)> {
        let split = engine_sid.len().checked_sub(TAG_CHARS)?;
        let (name, tag) = (engine_sid.get(..split)?, engine_sid.get(split..)?);
        if !constant_time_eq(self.tag(name).as_bytes(), tag.as_bytes()) {
            return None;
        }
        parse_sid(name)
    }
}

/// Compares secrets (session-id tags, admin tokens) without a timing side channel on the
/// position of the first difference.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A connection anywhere in the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketRef {
    /// Owning shard.
    pub shard: ShardId,
    /// Connection within that shard.
    pub conn: ConnId,
}

/// The sender of a 1:1 message: a socket in this process (`server: None`) or in another
/// cluster member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Server id of another process, or `None` for this one.
    pub server: Option<Arc<str>>,
    /// Shard of the sender inside its process.
    pub shard: ShardId,
    /// Connection of the sender.
    pub conn: ConnId,
}

impl SocketRef {
    /// This socket as another node names it in an envelope.
    pub fn remote(self) -> RemoteSocket {
        RemoteSocket { shard: self.shard as u16, conn: self.conn.as_u64() }
    }

    /// A socket of this process named in an envelope.
    pub fn from_remote(r: RemoteSocket) -> SocketRef {
        SocketRef { shard: r.shard as ShardId, conn: ConnId::from_u64(r.conn) }
    }
}

impl From<SocketRef> for Origin {
    fn from(s: SocketRef) -> Origin {
        Origin { server: None, shard: s.shard, conn: s.conn }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_round_trip() {
        let conn = ConnId::from_u64(0x0000_0003_0000_0011);
        let s = sid(5, conn);
        assert_eq!((s.len(), &s[..2]), (18, "05"));
        assert_eq!(parse_sid(&s), Some((5, conn)));
        assert_eq!(parse_sid("zz"), None);
        assert_eq!(parse_sid(""), None);
    }

    #[test]
    fn engine_sids_carry_an_unforgeable_tag() {
        let (key, other) = (SidKey::random(), SidKey::random());
        let conn = ConnId::from_u64(77);
        let s = key.engine_sid(3, conn);
        assert_eq!(s.len(), sid(3, conn).len() + TAG_CHARS);
        assert_eq!(key.verify(&s), Some((3, conn)));
        assert_eq!(other.verify(&s), None, "another process's key");
        assert_eq!(key.verify(&sid(3, conn)), None, "the bare socket name");
        let mut forged = s.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(key.verify(std::str::from_utf8(&forged).unwrap()), None);
        assert_eq!(key.verify(""), None);
        assert_eq!(key.verify("é"), None);
    }
}
