//! Any bytes as a stream of client frames: decode frame after frame as a server would,
//! reassembling fragments under a small payload limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shardgate_io::ws::{decode_frame, Assembler, OpKind, Role};

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut pos = 0;
    let mut asm = Assembler::default();
    while let Ok(Some((frame, used))) = decode_frame(&mut buf[pos..], 4096, Role::Server) {
        assert!(used > 0 && pos + used <= buf.len());
        let payload = &buf[pos + frame.payload.start..pos + frame.payload.end];
        if !matches!(frame.op, OpKind::Ping | OpKind::Pong | OpKind::Close) {
            if let Ok(Some((_, msg))) = asm.push(frame.op, frame.fin, payload, 4096) {
                assert!(msg.len() <= 4096);
            }
        }
        pos += used;
    }
});
