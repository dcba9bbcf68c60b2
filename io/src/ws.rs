//! WebSocket framing (RFC 6455 section 5) over caller-owned buffers.
//!
//! Frame headers are parsed and written by tungstenite's frame layer
//! ([`tungstenite::protocol::frame::FrameHeader`]); this module adds what a server needs on
//! top of it without tungstenite's per-connection read buffer: in-place unmasking,
//! the checks RFC 6455 asks of a server (masked client frames, no reserved bits, short
//! unfragmented control frames, a payload limit) and reassembly of fragmented messages.
//! The connection that calls [`decode_frame`] owns the bytes; nothing here allocates
//! unless a message arrives fragmented.

use std::borrow::Cow;
use std::io::Cursor;
use std::ops::Range;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Close codes shardgate sends (RFC 6455 section 7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (drain, shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// Data of a type that cannot be accepted.
    pub const UNSUPPORTED: u16 = 1003;
    /// Text that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation (auth, rate limits, slow consumer).
    pub const POLICY: u16 = 1008;
    /// Message larger than the configured maximum.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error.
    pub const INTERNAL: u16 = 1011;
}

/// The kind of a WebSocket frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Continuation of a fragmented message.
    Continuation,
    /// First (or only) frame of a text message.
    Text,
    /// First (or only) frame of a binary message.
    Binary,
    /// Close control frame.
    Close,
    /// Ping control frame.
    Ping,
    /// Pong control frame.
    Pong,
}

impl OpKind {
    /// The kind of a frame header's opcode; `None` for the reserved ones.
    fn from_opcode(op: OpCode) -> Option<OpKind> {
        Some(match op {
            OpCode::Data(Data::Continue) => OpKind::Continuation,
            OpCode::Data(Data::Text) => OpKind::Text,
            OpCode::Data(Data::Binary) => OpKind::Binary,
            OpCode::Control(Control::Close) => OpKind::Close,
            OpCode::Control(Control::Ping) => OpKind::Ping,
            OpCode::Control(Control::Pong) => OpKind::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        matches!(self, OpKind::Close | OpKind::Ping | OpKind::Pong)
    }

    fn opcode(self) -> OpCode {
        match self {
            OpKind::Continuation => OpCode::Data(Data::Continue),
            OpKind::Text => OpCode::Data(Data::Text),
            OpKind::Binary => OpCode::Data(Data::Binary),
            OpKind::Close => OpCode::Control(Control::Close),
            OpKind::Ping => OpCode::Control(Control::Ping),
            OpKind::Pong => OpCode::Control(Control::Pong),
        }
    }
}

/// A frame violated RFC 6455 or a configured limit. Each maps to a close code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WsError {
    /// The peer broke the framing rules.
    #[error("websocket protocol error: {0}")]
    Protocol(&'static str),
    /// A frame or reassembled message exceeds the payload limit.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooBig {
        /// Announced or accumulated length.
        len: u64,
        /// Configured limit.
        max: usize,
    },
}

impl WsError {
    /// The close code a server sends for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => close_code::PROTOCOL,
            WsError::TooBig { .. } => close_code::TOO_BIG,
        }
    }
}

/// One decoded frame; `payload` indexes the buffer given to [`decode_frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// FIN bit.
    pub fin: bool,
    /// Frame kind.
    pub op: OpKind,
    /// Payload position inside the decoded buffer, already unmasked.
    pub payload: Range<usize>,
}

/// Which side of the connection is decoding: servers require masked frames, clients
/// require unmasked ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Decoding frames sent by a client.
    Server,
    /// Decoding frames sent by a server.
    Client,
}

/// Decodes the first frame of `buf`, unmasking its payload in place.
///
/// Returns `Ok(None)` and touches nothing when `buf` holds less than one whole frame;
/// otherwise the frame and the number of bytes it occupied.
pub fn decode_frame(
    buf: &mut [u8],
    max_payload: usize,
    role: Role,
) -> Result<Option<(Frame, usize)>, WsError> {
    let mut cursor = Cursor::new(&*buf);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(_) => return Err(WsError::Protocol("invalid frame header or opcode")),
    };
    let header_len = cursor.position() as usize;
    let op = OpKind::from_opcode(header.opcode).ok_or(WsError::Protocol("reserved opcode"))?;
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(WsError::Protocol("reserved bits set without a negotiated extension"));
    }
    match (role, header.mask.is_some()) {
        (Role::Server, false) => return Err(WsError::Protocol("client frame is not masked")),
        (Role::Client, true) => return Err(WsError::Protocol("server frame is masked")),
        _ => {}
    }
    if op.is_control() && (len > 125 || !header.is_final) {
        return Err(WsError::Protocol("control frame too long or fragmented"));
    }
    if len > max_payload as u64 {
        return Err(WsError::TooBig { len, max: max_payload });
    }
    let len = len as usize;
    let total = header_len + len;
    if buf.len() < total {
        return Ok(None);
    }
    if let Some(mask) = header.mask {
        unmask(&mut buf[header_len..total], mask);
    }
    Ok(Some((Frame { fin: header.is_final, op, payload: header_len..total }, total)))
}

/// XORs `data` with the 4-byte masking key (RFC 6455 section 5.3).
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let mut b = [0u8; 4];
        b.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u32::from_ne_bytes(b) ^ word).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i];
    }
}

/// Appends an unmasked (server) frame with a single fragment to `out`.
pub fn encode_frame(op: OpKind, payload: &[u8], out: &mut Vec<u8>) {
    let header = FrameHeader { is_final: true, opcode: op.opcode(), ..FrameHeader::default() };
    out.reserve(header.len(payload.len() as u64) + payload.len());
    // Writing into a Vec cannot fail.
    let _ = header.format(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Appends a masked (client) frame to `out`.
pub fn encode_masked_frame(op: OpKind, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    let header =
        FrameHeader { is_final: true, opcode: op.opcode(), mask: Some(mask), ..FrameHeader::default() };
    let _ = header.format(payload.len() as u64, out);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask);
}

/// The frames of `buf`, a run of complete unmasked (server) frames as [`encode_frame`]
/// writes them, as (kind, payload) pairs; stops at the first incomplete or masked frame.
/// Lets a transport other than WebSocket (HTTP long-polling) take the payloads out of
/// frames queued for a client.
pub fn server_frames(buf: &[u8]) -> impl Iterator<Item = (OpKind, &[u8])> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let rest = buf.get(pos..)?;
        let mut cursor = Cursor::new(rest);
        let (header, len) = FrameHeader::parse(&mut cursor).ok()??;
        if header.mask.is_some() {
            return None;
        }
        let start = cursor.position() as usize;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        let payload = rest.get(start..end)?;
        let op = OpKind::from_opcode(header.opcode)?;
        pos += end;
        Some((op, payload))
    })
}

/// A server close frame with `code` and a reason cut to fit the 125-byte limit.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    let mut out = Vec::with_capacity(payload.len() + 2);
    encode_frame(OpKind::Close, &payload, &mut out);
    out
}

/// The kind of a complete data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// UTF-8 text (not yet validated).
    Text,
    /// Binary.
    Binary,
}

/// A complete data message: its kind and payload (borrowed when it came in one frame).
pub type Message<'a> = (DataKind, Cow<'a, [u8]>);

/// Reassembles fragmented data messages. Holds no allocation until a message arrives in
/// more than one frame, and releases it when that message completes.
#[derive(Debug, Default)]
pub struct Assembler {
    kind: Option<DataKind>,
    buf: Vec<u8>,
}

impl Assembler {
    /// A fragmented message is in progress.
    pub fn in_progress(&self) -> bool {
        self.kind.is_some()
    }

    /// Feeds one data frame; returns the whole message once its last fragment arrived.
    /// Unfragmented messages are returned borrowed, without a copy.
    pub fn push<'a>(
        &mut self,
        op: OpKind,
        fin: bool,
        payload: &'a [u8],
        max_payload: usize,
    ) -> Result<Option<Message<'a>>, WsError> {
        let kind = match (op, self.kind) {
            (OpKind::Text, None) => DataKind::Text,
            (OpKind::Binary, None) => DataKind::Binary,
            (OpKind::Continuation, Some(k)) => k,
            (OpKind::Continuation, None) => {
                return Err(WsError::Protocol("continuation frame without a message"))
            }
            (OpKind::Text | OpKind::Binary, Some(_)) => {
                return Err(WsError::Protocol("new message before the fragmented one ended"))
            }
            _ => return Err(WsError::Protocol("control frame given to the assembler")),
        };
        if self.kind.is_none() && fin {
            return Ok(Some((kind, Cow::Borrowed(payload))));
        }
        let total = self.buf.len() + payload.len();
        if total > max_payload {
            self.kind = None;
            self.buf = Vec::new();
            return Err(WsError::TooBig { len: total as u64, max: max_payload });
        }
        self.kind = Some(kind);
        self.buf.extend_from_slice(payload);
        if fin {
            self.kind = None;
            Ok(Some((kind, Cow::Owned(std::mem::take(&mut self.buf)))))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn client_frame(op: OpKind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_masked_frame(op, payload, [1, 2, 3, 4], &mut out);
        out
    }

    #[test]
    fn decodes_masked_text() {
        let mut buf = client_frame(OpKind::Text, b"40{}");
        let (f, n) = decode_frame(&mut buf, 1000, Role::Server).unwrap().unwrap();
        assert_eq!(n, buf.len());
        assert!(f.fin);
        assert_eq!(f.op, OpKind::Text);
        assert_eq!(&buf[f.payload], b"40{}");
    }

    #[test]
    fn short_input_consumes_nothing() {
        let full = client_frame(OpKind::Binary, &[7u8; 300]);
        for cut in 0..full.len() {
            let mut part = full[..cut].to_vec();
            assert_eq!(decode_frame(&mut part, 1000, Role::Server).unwrap(), None);
            assert_eq!(part, full[..cut]);
        }
    }

    #[test]
    fn rejects_unmasked_client_frame() {
        let mut buf = Vec::new();
        encode_frame(OpKind::Text, b"2", &mut buf);
        assert_eq!(
            decode_frame(&mut buf, 1000, Role::Server),
            Err(WsError::Protocol("client frame is not masked"))
        );
    }

    #[test]
    fn rejects_oversized_before_payload_arrives() {
        let mut buf = client_frame(OpKind::Text, &[b'a'; 2000]);
        buf.truncate(20);
        assert!(matches!(
            decode_frame(&mut buf, 1000, Role::Server),
            Err(WsError::TooBig { len: 2000, max: 1000 })
        ));
    }

    #[test]
    fn rejects_reserved_bits_and_opcodes() {
        let mut buf = client_frame(OpKind::Text, b"x");
        buf[0] |= 0x40;
        assert!(decode_frame(&mut buf, 10, Role::Server).is_err());
        let mut buf = client_frame(OpKind::Text, b"x");
        buf[0] = 0x83;
        assert!(decode_frame(&mut buf, 10, Role::Server).is_err());
    }

    #[test]
    fn rejects_long_control_frame() {
        let mut buf = client_frame(OpKind::Ping, &[0u8; 126]);
        assert!(decode_frame(&mut buf, 1000, Role::Server).is_err());
    }

    #[test]
    fn close_frame_truncates_reason_on_char_boundary() {
        let reason = "é".repeat(100);
        let mut f = close_frame(1008, &reason);
        let (frame, _) = decode_frame(&mut f, 1000, Role::Client).unwrap().unwrap();
        let payload = &f[frame.payload];
        assert!(payload.len() <= 125);
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1008);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    #[test]
    fn assembler_joins_fragments_and_enforces_limit() {
        let mut a = Assembler::default();
        assert_eq!(a.push(OpKind::Text, false, b"ab", 5).unwrap(), None);
        let (k, m) = a.push(OpKind::Continuation, true, b"cd", 5).unwrap().unwrap();
        assert_eq!((k, &*m), (DataKind::Text, &b"abcd"[..]));
        assert!(!a.in_progress());
        assert_eq!(a.push(OpKind::Binary, false, b"abc", 5).unwrap(), None);
        assert!(matches!(a.push(OpKind::Continuation, true, b"def", 5), Err(WsError::TooBig { .. })));
        assert!(a.push(OpKind::Continuation, true, b"x", 5).is_err());
    }

    proptest! {
        #[test]
        fn masked_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..70_000),
                             mask in any::<[u8; 4]>(), binary in any::<bool>()) {
            let op = if binary { OpKind::Binary } else { OpKind::Text };
            let mut buf = Vec::new();
            encode_masked_frame(op, &payload, mask, &mut buf);
            let (f, n) = decode_frame(&mut buf, 100_000, Role::Server).unwrap().unwrap();
            prop_assert_eq!(n, buf.len());
            prop_assert_eq!(f.op, op);
            prop_assert_eq!(&buf[f.payload], &payload[..]);
        }

        #[test]
        fn server_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = Vec::new();
            encode_frame(OpKind::Binary, &payload, &mut buf);
            let (f, _) = decode_frame(&mut buf, 1000, Role::Client).unwrap().unwrap();
            prop_assert_eq!(&buf[f.payload], &payload[..]);
        }

        #[test]
        fn never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_frame(&mut bytes, 1 << 20, Role::Server);
        }
    }

    #[test]
    fn server_frames_walks_a_run_of_frames() {
        let mut run = Vec::new();
        encode_frame(OpKind::Text, b"42[\"a\"]", &mut run);
        encode_frame(OpKind::Binary, &[1, 2, 3], &mut run);
        encode_frame(OpKind::Text, &[b'x'; 300], &mut run);
        let got: Vec<_> = server_frames(&run).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (OpKind::Text, &b"42[\"a\"]"[..]));
        assert_eq!(got[1], (OpKind::Binary, &[1u8, 2, 3][..]));
        assert_eq!(got[2].1.len(), 300);
        assert_eq!(server_frames(&run[..run.len() - 1]).count(), 2);
    }
}
