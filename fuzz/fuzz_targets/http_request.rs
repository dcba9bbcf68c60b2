//! Any bytes as an HTTP request head: parse, and if it parses, derive every response.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shardgate_io::http;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = http::parse_request(data) {
        assert!(used <= data.len());
        let _ = req.is_websocket_upgrade();
        if let Some(k) = &req.ws_key {
            let _ = http::upgrade_response(k);
        }
    }
});
