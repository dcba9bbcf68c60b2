//! Any bytes as a stream of RESP2 replies, decoded one after another the way the bridge
//! reads its Redis connections.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shardgate_io::resp;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((reply, used))) = resp::decode_reply(rest) {
        let _ = resp::as_message(&reply);
        let _ = resp::as_bytes(&reply);
        if used == 0 || used > rest.len() {
            break;
        }
        rest = &rest[used..];
    }
});
