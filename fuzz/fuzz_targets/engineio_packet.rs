//! Any UTF-8 text as an Engine.IO packet (and an open payload).
#![no_main]
use libfuzzer_sys::fuzz_target;
use shardgate_io::engineio;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(engineio::Packet::Open(json)) = engineio::decode(text) {
            let _ = engineio::Open::parse(json);
        }
    }
});
