//! Engine.IO v4 packets (the public `engine.io-protocol` spec), over WebSocket and over
//! HTTP long-polling.
//!
//! Over WebSocket every text frame carries one packet: a type digit followed by its
//! payload; a binary frame is a binary message packet with no prefix. Over long-polling a
//! request or response body is a *payload*: packets joined by the record separator
//! `\x1e`, a binary packet written as `b` and its base64. This module owns the grammar
//! only; the ping schedule and timeouts live with the connection.

use serde::{Deserialize, Serialize};

/// The protocol revision served: the `EIO` query parameter of every request.
pub const PROTOCOL_VERSION: &str = "4";

/// Engine.IO packet types (the digit that starts a text frame).
pub mod kind {
    /// `0` open.
    pub const OPEN: u8 = b'0';
    /// `1` close.
    pub const CLOSE: u8 = b'1';
    /// `2` ping.
    pub const PING: u8 = b'2';
    /// `3` pong.
    pub const PONG: u8 = b'3';
    /// `4` message.
    pub const MESSAGE: u8 = b'4';
    /// `5` upgrade.
    pub const UPGRADE: u8 = b'5';
    /// `6` noop.
    pub const NOOP: u8 = b'6';
}

/// One decoded text packet; payloads borrow the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Open, with the handshake JSON (sent by servers only).
    Open(&'a str),
    /// The peer closes the transport.
    Close,
    /// Ping with optional probe data.
    Ping(&'a str),
    /// Pong with optional probe data.
    Pong(&'a str),
    /// A message: for Socket.IO, one encoded Socket.IO packet.
    Message(&'a str),
    /// Transport upgrade (meaningless on a WebSocket-only connection, tolerated).
    Upgrade,
    /// Noop.
    Noop,
}

/// A text frame that is not an Engine.IO packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EioError {
    /// Empty frame.
    #[error("empty engine.io packet")]
    Empty,
    /// First character is not a known packet type.
    #[error("unknown engine.io packet type {0:?}")]
    UnknownType(char),
}

/// Decodes one text frame.
pub fn decode(text: &str) -> Result<Packet<'_>, EioError> {
    let first = text.chars().next().ok_or(EioError::Empty)?;
    if !first.is_ascii_digit() {
        return Err(EioError::UnknownType(first));
    }
    let rest = &text[1..];
    let first = first as u8;
    Ok(match first {
        kind::OPEN => Packet::Open(rest),
        kind::CLOSE => Packet::Close,
        kind::PING => Packet::Ping(rest),
        kind::PONG => Packet::Pong(rest),
        kind::MESSAGE => Packet::Message(rest),
        kind::UPGRADE => Packet::Upgrade,
        kind::NOOP => Packet::Noop,
        other => return Err(EioError::UnknownType(other as char)),
    })
}

/// Joins the packets of a long-polling payload (Engine.IO v4: ASCII record separator).
pub const RECORD_SEPARATOR: u8 = 0x1e;

/// One packet of a long-polling payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadPacket<'a> {
    /// A text packet, as a WebSocket text frame would carry it.
    Text(&'a str),
    /// A binary message (`b` + base64 on the wire), decoded.
    Binary(Vec<u8>),
}

/// A long-polling payload that breaks the grammar.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// An empty packet between two separators (or an empty body).
    #[error("empty packet in payload")]
    Empty,
    /// A `b` packet whose data is not base64.
    #[error("binary packet is not base64")]
    Base64,
}

/// Splits a long-polling request body into its packets, decoding binary ones.
pub fn decode_payload(body: &str) -> impl Iterator<Item = Result<PayloadPacket<'_>, PayloadError>> {
    body.split(RECORD_SEPARATOR as char).map(|p| match p.as_bytes().first() {
        None => Err(PayloadError::Empty),
        Some(b'b') => data_encoding::BASE64
            .decode(&p.as_bytes()[1..])
            .map(PayloadPacket::Binary)
            .map_err(|_| PayloadError::Base64),
        Some(_) => Ok(PayloadPacket::Text(p)),
    })
}

/// Appends one text packet to a long-polling payload being built in `out`.
pub fn append_text(out: &mut Vec<u8>, packet: &[u8]) {
    if !out.is_empty() {
        out.push(RECORD_SEPARATOR);
    }
    out.extend_from_slice(packet);
}

/// Appends one binary message (`b` + base64) to a long-polling payload in `out`.
pub fn append_binary(out: &mut Vec<u8>, data: &[u8]) {
    if !out.is_empty() {
        out.push(RECORD_SEPARATOR);
    }
    out.push(b'b');
    let start = out.len();
    out.resize(start + data_encoding::BASE64.encode_len(data.len()), 0);
    data_encoding::BASE64.encode_mut(data, &mut out[start..]);
}

/// The handshake the server sends first (`0{...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Open {
    /// Engine.IO session id.
    pub sid: String,
    /// Transports the client may upgrade to: `["websocket"]` for a long-polling session,
    /// none on WebSocket.
    pub upgrades: Vec<String>,
    /// Milliseconds between server pings.
    pub ping_interval: u64,
    /// Milliseconds the client has to answer a ping.
    pub ping_timeout: u64,
    /// Largest packet the server accepts, in bytes.
    pub max_payload: u64,
}

impl Open {
    /// Encodes as an Engine.IO text packet.
    pub fn encode(&self) -> String {
        let mut s = String::from("0");
        // Serializing a struct of strings and integers cannot fail.
        s.push_str(&serde_json::to_string(self).unwrap_or_default());
        s
    }

    /// Parses the payload of an open packet (client side).
    pub fn parse(json: &str) -> Result<Open, serde_json::Error> {
        serde_json::from_str(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_every_type() {
        assert_eq!(decode("2").unwrap(), Packet::Ping(""));
        assert_eq!(decode("3probe").unwrap(), Packet::Pong("probe"));
        assert_eq!(decode("42[\"a\"]").unwrap(), Packet::Message("2[\"a\"]"));
        assert_eq!(decode("1").unwrap(), Packet::Close);
        assert_eq!(decode("6").unwrap(), Packet::Noop);
        assert_eq!(decode(""), Err(EioError::Empty));
        assert_eq!(decode("9"), Err(EioError::UnknownType('9')));
    }

    #[test]
    fn open_round_trip() {
        let open = Open {
            sid: "abc".into(),
            upgrades: vec![],
            ping_interval: 25000,
            ping_timeout: 20000,
            max_payload: 1_000_000,
        };
        let text = open.encode();
        assert!(text.starts_with("0{\"sid\":\"abc\",\"upgrades\":[],\"pingInterval\":25000"));
        match decode(&text).unwrap() {
            Packet::Open(json) => assert_eq!(Open::parse(json).unwrap(), open),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = decode(&s);
        }
    }

    #[test]
    fn payload_round_trip() {
        let mut body = Vec::new();
        append_text(&mut body, b"2");
        append_text(&mut body, b"42[\"hi\"]");
        append_binary(&mut body, &[0, 1, 2, 255]);
        assert_eq!(body, b"2\x1e42[\"hi\"]\x1ebAAEC/w==");
        let got: Vec<_> = decode_payload(std::str::from_utf8(&body).unwrap()).collect();
        assert_eq!(
            got,
            vec![
                Ok(PayloadPacket::Text("2")),
                Ok(PayloadPacket::Text("42[\"hi\"]")),
                Ok(PayloadPacket::Binary(vec![0, 1, 2, 255]))
            ]
        );
        assert_eq!(decode_payload("4a\x1e\x1e").nth(1), Some(Err(PayloadError::Empty)));
        assert_eq!(decode_payload("b!!").next(), Some(Err(PayloadError::Base64)));
    }

    proptest! {
        #[test]
        fn payload_decoding_never_panics(s in "\\PC*") {
            for _ in decode_payload(&s) {}
        }
    }
}
