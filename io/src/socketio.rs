//! Socket.IO v5 packets (the public `socket.io-protocol` spec), carried inside Engine.IO
//! message packets.
//!
//! Grammar: `<type>[<attachments>-][<namespace>,][<ack id>][<JSON data>]`. A packet with
//! binary attachments (types 5 and 6) is followed by that many binary Engine.IO messages;
//! its JSON holds `{"_placeholder":true,"num":N}` where each one goes. [`decode`] checks
//! the shape the spec gives each type, so the session layer receives only well-formed
//! packets.

use std::fmt::Write as _;

use serde_json::Value;

/// Largest number of binary attachments accepted on one packet.
pub const MAX_ATTACHMENTS: usize = 16;

/// Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    /// `0` namespace connect (client: with auth payload; server: with `{"sid"}`).
    Connect,
    /// `1` namespace disconnect.
    Disconnect,
    /// `2` event.
    Event,
    /// `3` acknowledgement.
    Ack,
    /// `4` refused namespace connect.
    ConnectError,
    /// `5` event with binary attachments.
    BinaryEvent,
    /// `6` acknowledgement with binary attachments.
    BinaryAck,
}

impl PacketType {
    /// The digit that starts this packet type on the wire.
    pub const fn digit(self) -> char {
        match self {
            PacketType::Connect => '0',
            PacketType::Disconnect => '1',
            PacketType::Event => '2',
            PacketType::Ack => '3',
            PacketType::ConnectError => '4',
            PacketType::BinaryEvent => '5',
            PacketType::BinaryAck => '6',
        }
    }

    fn from_byte(b: u8) -> Option<PacketType> {
        Some(match b {
            b'0' => PacketType::Connect,
            b'1' => PacketType::Disconnect,
            b'2' => PacketType::Event,
            b'3' => PacketType::Ack,
            b'4' => PacketType::ConnectError,
            b'5' => PacketType::BinaryEvent,
            b'6' => PacketType::BinaryAck,
            _ => return None,
        })
    }

    /// Types 5 and 6 carry binary attachments.
    pub fn is_binary(self) -> bool {
        matches!(self, PacketType::BinaryEvent | PacketType::BinaryAck)
    }
}

/// A Socket.IO payload that does not follow the spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SioError {
    /// Empty payload.
    #[error("empty socket.io packet")]
    Empty,
    /// Unknown type digit.
    #[error("unknown socket.io packet type {0:?}")]
    UnknownType(char),
    /// Attachment count missing its `-`, not a number, or too many.
    #[error("invalid attachment count")]
    BadAttachments,
    /// Ack id is not a number that fits 63 bits.
    #[error("invalid ack id")]
    BadAckId,
    /// Namespace not terminated by `,` before the data.
    #[error("invalid namespace")]
    BadNamespace,
    /// Data is not JSON.
    #[error("payload is not valid JSON: {0}")]
    BadJson(String),
    /// Data is JSON of the wrong shape for this packet type.
    #[error("invalid payload for {0:?}: {1}")]
    BadShape(PacketType, &'static str),
}

/// A decoded Socket.IO packet.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    /// Packet type.
    pub kind: PacketType,
    /// Namespace, `/` when absent.
    pub nsp: String,
    /// Ack id, when the sender asks for (EVENT) or answers (ACK) an acknowledgement.
    pub ack_id: Option<u64>,
    /// Number of binary attachments that follow.
    pub attachments: usize,
    /// Parsed JSON data.
    pub data: Option<Value>,
}

impl Packet {
    /// Event name of an EVENT / BINARY_EVENT packet.
    pub fn event_name(&self) -> Option<&str> {
        match (&self.kind, &self.data) {
            (PacketType::Event | PacketType::BinaryEvent, Some(Value::Array(a))) => {
                a.first().and_then(Value::as_str)
            }
            _ => None,
        }
    }

    /// Event arguments (everything after the name).
    pub fn event_args(&self) -> &[Value] {
        match &self.data {
            Some(Value::Array(a)) if !a.is_empty() => &a[1..],
            _ => &[],
        }
    }
}

/// Decodes the payload of an Engine.IO message packet.
pub fn decode(s: &str) -> Result<Packet, SioError> {
    let bytes = s.as_bytes();
    let first = s.chars().next().ok_or(SioError::Empty)?;
    let kind = PacketType::from_byte(first as u32 as u8)
        .filter(|_| first.is_ascii())
        .ok_or(SioError::UnknownType(first))?;
    let mut i = 1;

    let mut attachments = 0;
    if kind.is_binary() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i >= bytes.len() || bytes[i] != b'-' || i - start > 3 {
            return Err(SioError::BadAttachments);
        }
        attachments = s[start..i].parse().map_err(|_| SioError::BadAttachments)?;
        if attachments > MAX_ATTACHMENTS {
            return Err(SioError::BadAttachments);
        }
        i += 1;
    }

    let mut nsp = "/";
    if bytes.get(i) == Some(&b'/') {
        let start = i;
        match s[i..].find(',') {
            Some(off) => {
                nsp = &s[start..i + off];
                i += off + 1;
            }
            None => {
                nsp = &s[start..];
                i = bytes.len();
            }
        }
        if nsp.bytes().any(|b| b == b'[' || b == b'{' || b == b'"') {
            return Err(SioError::BadNamespace);
        }
    }

    let start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let ack_id = if i > start {
        if i - start > 18 {
            return Err(SioError::BadAckId);
        }
        Some(s[start..i].parse().map_err(|_| SioError::BadAckId)?)
    } else {
        None
    };

    let rest = &s[i..];
    let data = if rest.is_empty() {
        None
    } else {
        Some(serde_json::from_str::<Value>(rest).map_err(|e| SioError::BadJson(e.to_string()))?)
    };
    check_shape(kind, ack_id, &data)?;
    Ok(Packet { kind, nsp: nsp.to_string(), ack_id, attachments, data })
}

fn check_shape(kind: PacketType, ack_id: Option<u64>, data: &Option<Value>) -> Result<(), SioError> {
    let bad = |why| Err(SioError::BadShape(kind, why));
    match kind {
        PacketType::Connect => match data {
            None | Some(Value::Object(_)) => Ok(()),
            _ => bad("auth payload must be an object"),
        },
        PacketType::Disconnect => match data {
            None => Ok(()),
            _ => bad("disconnect carries no data"),
        },
        PacketType::Event | PacketType::BinaryEvent => match data {
            Some(Value::Array(a)) if a.first().map(Value::is_string).unwrap_or(false) => Ok(()),
            _ => bad("event must be an array starting with the event name"),
        },
        PacketType::Ack | PacketType::BinaryAck => match (data, ack_id) {
            (Some(Value::Array(_)), Some(_)) => Ok(()),
            (_, None) => bad("ack without an ack id"),
            _ => bad("ack data must be an array"),
        },
        PacketType::ConnectError => match data {
            Some(Value::Object(_)) | Some(Value::String(_)) => Ok(()),
            _ => bad("connect error must carry an object"),
        },
    }
}

/// Appends an encoded packet to `out` (which usually already holds the Engine.IO `4`).
pub fn encode(
    kind: PacketType,
    nsp: &str,
    ack_id: Option<u64>,
    attachments: usize,
    data_json: Option<&str>,
    out: &mut String,
) {
    out.push(kind.digit());
    if kind.is_binary() {
        let _ = write!(out, "{attachments}-");
    }
    if nsp != "/" && !nsp.is_empty() {
        out.push_str(nsp);
        out.push(',');
    }
    if let Some(id) = ack_id {
        let _ = write!(out, "{id}");
    }
    if let Some(d) = data_json {
        out.push_str(d);
    }
}

/// Counts `{"_placeholder":true,"num":N}` objects in `v` and checks every `num` is below
/// `attachments`.
pub fn check_placeholders(v: &Value, attachments: usize) -> Result<usize, SioError> {
    fn walk(v: &Value, max: usize, n: &mut usize) -> Result<(), SioError> {
        match v {
            Value::Object(m) => {
                if m.get("_placeholder") == Some(&Value::Bool(true)) {
                    match m.get("num").and_then(Value::as_u64) {
                        Some(num) if (num as usize) < max => {
                            *n += 1;
                            Ok(())
                        }
                        _ => Err(SioError::BadAttachments),
                    }
                } else {
                    m.values().try_for_each(|x| walk(x, max, n))
                }
            }
            Value::Array(a) => a.iter().try_for_each(|x| walk(x, max, n)),
            _ => Ok(()),
        }
    }
    let mut n = 0;
    walk(v, attachments, &mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_spec_examples() {
        let p = decode("0{\"token\":\"123\"}").unwrap();
        assert_eq!(p.kind, PacketType::Connect);
        assert_eq!(p.nsp, "/");
        assert_eq!(p.data.unwrap()["token"], "123");

        let p = decode("0/admin,{\"token\":\"123\"}").unwrap();
        assert_eq!(p.nsp, "/admin");

        let p = decode("2[\"hello\",1]").unwrap();
        assert_eq!(p.event_name(), Some("hello"));
        assert_eq!(p.event_args(), &[Value::from(1)]);

        let p = decode("2/admin,456[\"project:delete\",123]").unwrap();
        assert_eq!((p.nsp.as_str(), p.ack_id), ("/admin", Some(456)));

        let p = decode("3/admin,456[]").unwrap();
        assert_eq!((p.kind, p.ack_id), (PacketType::Ack, Some(456)));

        let p = decode("51-[\"hello\",{\"_placeholder\":true,\"num\":0}]").unwrap();
        assert_eq!((p.kind, p.attachments), (PacketType::BinaryEvent, 1));
        assert_eq!(check_placeholders(p.data.as_ref().unwrap(), 1), Ok(1));
        assert!(check_placeholders(p.data.as_ref().unwrap(), 0).is_err());

        let p = decode("1/admin,").unwrap();
        assert_eq!((p.kind, p.nsp.as_str()), (PacketType::Disconnect, "/admin"));
        assert_eq!(decode("1").unwrap().kind, PacketType::Disconnect);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(decode(""), Err(SioError::Empty));
        assert_eq!(decode("9"), Err(SioError::UnknownType('9')));
        assert!(matches!(decode("2{\"a\":1}"), Err(SioError::BadShape(..))));
        assert!(matches!(decode("2[1]"), Err(SioError::BadShape(..))));
        assert!(matches!(decode("2[\"x\""), Err(SioError::BadJson(_))));
        assert!(matches!(decode("3[]"), Err(SioError::BadShape(..))));
        assert_eq!(decode("5[\"x\"]"), Err(SioError::BadAttachments));
        assert_eq!(decode("599-[\"x\"]"), Err(SioError::BadAttachments));
        assert_eq!(decode("21234567890123456789[\"x\"]"), Err(SioError::BadAckId));
        assert!(matches!(decode("0[]"), Err(SioError::BadShape(..))));
    }

    #[test]
    fn encodes_like_the_reference() {
        let mut s = String::from("4");
        encode(PacketType::Ack, "/", Some(12), 0, Some("[{\"ok\":true}]"), &mut s);
        assert_eq!(s, "4312[{\"ok\":true}]");
        let mut s = String::new();
        encode(PacketType::BinaryEvent, "/chat", None, 2, Some("[\"a\"]"), &mut s);
        assert_eq!(s, "52-/chat,[\"a\"]");
        let mut s = String::new();
        encode(PacketType::ConnectError, "/x", None, 0, Some("{\"message\":\"m\"}"), &mut s);
        assert_eq!(s, "4/x,{\"message\":\"m\"}");
    }

    fn arb_packet() -> impl Strategy<Value = (PacketType, String, Option<u64>, usize, Option<Value>)> {
        let kind = prop_oneof![
            Just(PacketType::Connect),
            Just(PacketType::Disconnect),
            Just(PacketType::Event),
            Just(PacketType::Ack),
            Just(PacketType::ConnectError),
            Just(PacketType::BinaryEvent),
            Just(PacketType::BinaryAck),
        ];
        (
            kind,
            "(/[a-z]{1,8})?",
            proptest::option::of(0u64..1_000_000),
            0usize..4,
            "[a-z:]{1,10}",
            any::<i32>(),
        )
            .prop_map(|(kind, nsp, ack, att, name, num)| {
                let nsp = if nsp.is_empty() { "/".to_string() } else { nsp };
                let att = if kind.is_binary() { att } else { 0 };
                let (ack, data) = match kind {
                    PacketType::Connect => (None, Some(serde_json::json!({ "token": name }))),
                    PacketType::Disconnect => (None, None),
                    PacketType::Event | PacketType::BinaryEvent => {
                        (ack, Some(serde_json::json!([name, num])))
                    }
                    PacketType::Ack | PacketType::BinaryAck => {
                        (Some(ack.unwrap_or(1)), Some(serde_json::json!([num])))
                    }
                    PacketType::ConnectError => (None, Some(serde_json::json!({ "message": name }))),
                };
                (kind, nsp, ack, att, data)
            })
    }

    proptest! {
        #[test]
        fn round_trip((kind, nsp, ack, att, data) in arb_packet()) {
            let mut s = String::new();
            let json = data.as_ref().map(|d| d.to_string());
            encode(kind, &nsp, ack, att, json.as_deref(), &mut s);
            let p = decode(&s).unwrap();
            prop_assert_eq!(p, Packet { kind, nsp, ack_id: ack, attachments: att, data });
        }

        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = decode(&s);
        }
    }
}
