//! Outbound packets: the one place where the Engine.IO and Socket.IO digits of what
//! shardgate (and its load generator) send are written.
//!
//! Each function returns or appends the text of one Engine.IO packet; framing is the
//! caller's (unmasked WebSocket frames on the server, masked ones in a client). The
//! server-side helpers at the bottom ([`server_frame`], [`event_frame`], …) do both.

use std::io::Write;

use serde_json::Value;

use crate::engineio::kind;
use crate::socketio::{self, PacketType};
use crate::ws::{self, OpKind};

/// Engine.IO ping (`2`), sent by the server every ping interval.
pub const PING: &str = "2";
/// Engine.IO pong (`3`) without probe data.
pub const PONG: &str = "3";

/// Engine.IO pong answering a ping that carried `data`.
pub fn pong(data: &str) -> String {
    let mut s = String::with_capacity(data.len() + 1);
    s.push(kind::PONG as char);
    s.push_str(data);
    s
}

/// Appends `4` + the Socket.IO packet: the start every Socket.IO packet shares.
fn message(
    kind_: PacketType,
    nsp: &str,
    ack_id: Option<u64>,
    attachments: usize,
    data: Option<&str>,
) -> String {
    let mut s = String::with_capacity(data.map_or(0, str::len) + nsp.len() + 24);
    s.push(kind::MESSAGE as char);
    socketio::encode(kind_, nsp, ack_id, attachments, data, &mut s);
    s
}

/// Socket.IO CONNECT sent by a client, with its auth payload.
pub fn connect_request(nsp: &str, auth: &Value) -> String {
    message(PacketType::Connect, nsp, None, 0, Some(&auth.to_string()))
}

/// Socket.IO CONNECT answered by the server on the default namespace: `40{"sid":…}`.
pub fn connect_reply(sid: &str) -> String {
    let data = serde_json::json!({ "sid": sid }).to_string();
    message(PacketType::Connect, "/", None, 0, Some(&data))
}

/// The CONNECT answer of a session with connection state recovery:
/// `40{"sid":…,"pid":…}` (the client sends `pid` back when it reconnects).
pub fn connect_reply_with_pid(sid: &str, pid: &str) -> String {
    // Written in this order whatever serde_json's map features are.
    let (sid, pid) = (Value::from(sid), Value::from(pid));
    let data = format!("{{\"sid\":{sid},\"pid\":{pid}}}");
    message(PacketType::Connect, "/", None, 0, Some(&data))
}

/// Socket.IO CONNECT_ERROR `44{"message":…,"data":{"code":…}}` on namespace `nsp`.
pub fn connect_error(nsp: &str, message_: &str, code: &str) -> String {
    let data = serde_json::json!({ "message": message_, "data": { "code": code } }).to_string();
    message(PacketType::ConnectError, nsp, None, 0, Some(&data))
}

/// Socket.IO DISCONNECT of namespace `nsp`.
pub fn disconnect(nsp: &str) -> String {
    message(PacketType::Disconnect, nsp, None, 0, None)
}

/// Engine.IO close (`1`).
pub const CLOSE: &str = "1";

/// Socket.IO EVENT `["name",payload]` on `nsp`, with an ack id when one is wanted.
pub fn event(nsp: &str, name: &str, payload: &Value, ack_id: Option<u64>) -> String {
    let data = serde_json::json!([name, payload]).to_string();
    message(PacketType::Event, nsp, ack_id, 0, Some(&data))
}

/// Appends `42["name",payload]` (an event on the default namespace) to `out`, serialized
/// straight into the buffer: the hot path of every `message:new`.
pub fn write_event(out: &mut Vec<u8>, name: &str, payload: &Value) {
    out.push(kind::MESSAGE);
    out.push(PacketType::Event.digit() as u8);
    write_args(out, Some(name), payload);
}

/// Appends `43<id>[payload]` (an ack on the default namespace) to `out`.
pub fn write_ack(out: &mut Vec<u8>, ack_id: u64, payload: &Value) {
    out.push(kind::MESSAGE);
    out.push(PacketType::Ack.digit() as u8);
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{ack_id}");
    write_args(out, None, payload);
}

/// `[name,payload]` (or `[payload]` without a name) appended to `out`.
fn write_args(out: &mut Vec<u8>, name: Option<&str>, payload: &Value) {
    out.push(b'[');
    if let Some(name) = name {
        // Writing into a Vec cannot fail, and a Value always serializes.
        let _ = serde_json::to_writer(&mut *out, name);
        out.push(b',');
    }
    let _ = serde_json::to_writer(&mut *out, payload);
    out.push(b']');
}

/// Socket.IO BINARY_EVENT header packet `45<n>-["name",payload]` on the default
/// namespace; the `n` attachments follow as binary frames.
pub fn binary_event(name: &str, payload: &Value, attachments: usize) -> String {
    let data = serde_json::json!([name, payload]).to_string();
    message(PacketType::BinaryEvent, "/", None, attachments, Some(&data))
}

// ---- server frames: the packet above as one unmasked WebSocket text frame ----

/// One Engine.IO packet as an unmasked WebSocket text frame.
pub fn server_frame(packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(packet.len() + 10);
    ws::encode_frame(OpKind::Text, packet, &mut out);
    out
}

/// `42["name",payload]` as one server frame.
pub fn event_frame(name: &str, payload: &Value) -> Vec<u8> {
    let mut packet = Vec::with_capacity(96);
    write_event(&mut packet, name, payload);
    server_frame(&packet)
}

/// `43<id>[payload]` as one server frame.
pub fn ack_frame(ack_id: u64, payload: &Value) -> Vec<u8> {
    let mut packet = Vec::with_capacity(96);
    write_ack(&mut packet, ack_id, payload);
    server_frame(&packet)
}

/// `frames` (a server frame group: an event, possibly followed by its binary
/// attachments) with `offset` appended as the event's last argument, a JSON string:
/// `42["message:new",{…}]` becomes `42["message:new",{…},"17"]`. That is how the
/// connection-state-recovery protocol tells a client which event it processed last.
/// `None` if the first frame is not a text frame whose packet ends with `]`.
pub fn with_offset(frames: &[u8], offset: u64) -> Option<Vec<u8>> {
    let (op, payload) = ws::server_frames(frames).next()?;
    if op != OpKind::Text || payload.last() != Some(&b']') {
        return None;
    }
    // What follows the first frame (attachments) is kept as it is.
    let first_end = (payload.as_ptr() as usize - frames.as_ptr() as usize) + payload.len();
    let rest = frames.get(first_end..).unwrap_or_default();
    let mut packet = Vec::with_capacity(payload.len() + 24);
    packet.extend_from_slice(&payload[..payload.len() - 1]);
    // Writing into a Vec cannot fail.
    let _ = write!(packet, ",\"{offset}\"]");
    let mut out = server_frame(&packet);
    out.extend_from_slice(rest);
    Some(out)
}

/// An event with binary attachments as one contiguous frame group: the header packet,
/// then one binary frame per attachment (without attachments, a plain event frame).
pub fn binary_event_frames(name: &str, payload: &Value, attachments: &[Vec<u8>]) -> Vec<u8> {
    if attachments.is_empty() {
        return event_frame(name, payload);
    }
    let mut out = server_frame(binary_event(name, payload, attachments.len()).as_bytes());
    for a in attachments {
        ws::encode_frame(OpKind::Binary, a, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engineio;
    use crate::ws::Role;
    use serde_json::json;

    /// The payload of a single unmasked server frame.
    fn text_of(frame: &[u8]) -> String {
        let mut buf = frame.to_vec();
        let (f, used) = ws::decode_frame(&mut buf, 1 << 20, Role::Client).unwrap().unwrap();
        assert_eq!(used, frame.len());
        String::from_utf8(buf[f.payload].to_vec()).unwrap()
    }

    fn sio(text: &str) -> socketio::Packet {
        let engineio::Packet::Message(m) = engineio::decode(text).unwrap() else { panic!("{text}") };
        socketio::decode(m).unwrap()
    }

    #[test]
    fn event_and_ack_frames_decode_as_the_codec_reads_them() {
        let payload = json!({ "id": "01KA", "from": "a\"b", "content": { "t": 1, "x": [1.5, null, "é\n"] } });
        let p = sio(&text_of(&event_frame("message:new", &payload)));
        assert_eq!((p.kind, p.nsp.as_ref(), p.ack_id), (PacketType::Event, "/", None));
        assert_eq!(p.event_name(), Some("message:new"));
        assert_eq!(p.event_args(), std::slice::from_ref(&payload));

        let p = sio(&text_of(&ack_frame(4_000_000_001, &payload)));
        assert_eq!((p.kind, p.ack_id), (PacketType::Ack, Some(4_000_000_001)));
        assert_eq!(p.data, Some(json!([payload])));
    }

    #[test]
    fn control_packets_are_the_spec_digits() {
        assert_eq!(engineio::decode(PING), Ok(engineio::Packet::Ping("")));
        assert_eq!(engineio::decode(&pong("probe")), Ok(engineio::Packet::Pong("probe")));
        assert_eq!(engineio::decode(CLOSE), Ok(engineio::Packet::Close));
        assert_eq!(connect_reply("ab"), "40{\"sid\":\"ab\"}");
        let p = sio(&connect_error("/admin", "Invalid namespace", "invalid_namespace"));
        assert_eq!((p.kind, p.nsp.as_ref()), (PacketType::ConnectError, "/admin"));
        assert_eq!(p.data.unwrap()["data"]["code"], "invalid_namespace");
        let p = sio(&connect_request("/", &json!({ "token": "t" })));
        assert_eq!((p.kind, p.data), (PacketType::Connect, Some(json!({ "token": "t" }))));
        assert_eq!(sio(&disconnect("/")).kind, PacketType::Disconnect);
        let p = sio(&event("/", "join_room", &json!("r1"), Some(7)));
        assert_eq!((p.event_name(), p.ack_id), (Some("join_room"), Some(7)));
    }

    #[test]
    fn binary_events_carry_their_attachments() {
        let frames = binary_event_frames(
            "message:new",
            &json!({ "f": { "_placeholder": true, "num": 0 } }),
            &[vec![1, 2, 3]],
        );
        let mut buf = frames.clone();
        let (f, used) = ws::decode_frame(&mut buf, 1 << 20, Role::Client).unwrap().unwrap();
        let p = sio(std::str::from_utf8(&buf[f.payload]).unwrap());
        assert_eq!((p.kind, p.attachments), (PacketType::BinaryEvent, 1));
        let mut rest = frames[used..].to_vec();
        let (f, _) = ws::decode_frame(&mut rest, 1 << 20, Role::Client).unwrap().unwrap();
        assert_eq!((f.op, &rest[f.payload]), (OpKind::Binary, &[1u8, 2, 3][..]));
    }

    #[test]
    fn an_offset_becomes_the_last_argument() {
        let f = event_frame("message:new", &json!({ "id": "a" }));
        let with = with_offset(&f, 17).unwrap();
        let (_, payload) = ws::server_frames(&with).next().unwrap();
        assert_eq!(payload, br#"42["message:new",{"id":"a"},"17"]"#);
        // Attachments after the header packet stay as they were.
        let b =
            binary_event_frames("m", &json!({ "f": { "_placeholder": true, "num": 0 } }), &[vec![9; 200]]);
        let with = with_offset(&b, 3).unwrap();
        let frames: Vec<_> = ws::server_frames(&with).collect();
        assert_eq!(frames.len(), 2);
        assert!(frames[0].1.ends_with(br#","3"]"#));
        assert_eq!(frames[1], (OpKind::Binary, &[9u8; 200][..]));
        assert!(with_offset(b"", 1).is_none());
        assert!(with_offset(&server_frame(b"40{}"), 1).is_none());
        assert_eq!(connect_reply_with_pid("s", "p"), r#"40{"sid":"s","pid":"p"}"#);
    }
}
