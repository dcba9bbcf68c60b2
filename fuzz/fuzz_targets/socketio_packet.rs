//! Any UTF-8 text as a Socket.IO packet; a packet that decodes must encode back to one
//! that decodes to the same packet.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shardgate_io::socketio;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(p) = socketio::decode(text) else { return };
    if let Some(d) = &p.data {
        let _ = socketio::check_placeholders(d, p.attachments);
    }
    let json = p.data.as_ref().map(|d| d.to_string());
    let mut again = String::new();
    socketio::encode(p.kind, &p.nsp, p.ack_id, p.attachments, json.as_deref(), &mut again);
    let q = socketio::decode(&again).expect("re-encoded packet decodes");
    assert_eq!(p, q);
});
