//! Engine.IO v4 packets over WebSocket (the public `engine.io-protocol` spec).
//!
//! Over WebSocket every text frame carries one packet: a type digit followed by its
//! payload; a binary frame is a binary message packet with no prefix. This module owns the
//! packet grammar only; the ping schedule and timeouts live with the connection.

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

/// The handshake the server sends first (`0{...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Open {
    /// Engine.IO session id.
    pub sid: String,
    /// Transports the client may upgrade to: none, shardgate serves WebSocket only.
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
}
