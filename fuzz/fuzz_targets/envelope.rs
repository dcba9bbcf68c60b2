//! Any bytes as a node-to-node envelope (server and room channels); what decodes must
//! encode back to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shardgate_io::envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = envelope::decode(data) {
        let again = env.to_vec().expect("a decoded envelope encodes");
        assert_eq!(again, data);
    }
    if let Ok(room) = envelope::decode_room(data) {
        let again = room.to_vec().expect("a decoded room envelope encodes");
        assert_eq!(again, data);
    }
    if let Ok(room) = envelope::decode_logged_room(data) {
        let again = room.to_vec().expect("a decoded logged room envelope encodes");
        assert_eq!(again, data);
    }
    if let Ok(Some((seq, inner))) = envelope::split_logged(data) {
        let mut again = format!("S{seq} ").into_bytes();
        again.extend_from_slice(inner);
        // Leading zeros are the one spelling that does not come back.
        if !data.starts_with(b"S0") || data.starts_with(b"S0 ") {
            assert_eq!(again, data);
        }
    }
});
