//! Codec costs per packet (criterion): WebSocket frames, Engine.IO + Socket.IO packets,
//! RESP. Run: `cargo bench --bench codecs`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardgate_io::ws::{self, OpKind, Role};
use shardgate_io::{engineio, resp, socketio};
use std::hint::black_box;

const EVENT: &str = r#"42["message:send",{"to":"bob","content":"hello, this is a chat message of ordinary length","clientMsgId":"c-123"}]"#;

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws");
    for size in [64usize, 1024, 16 * 1024] {
        let payload = vec![b'x'; size];
        let mut masked = Vec::new();
        ws::encode_masked_frame(OpKind::Text, &payload, [1, 2, 3, 4], &mut masked);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("decode_masked", size), &masked, |b, m| {
            let mut buf = m.clone();
            // Each decode unmasks in place (the next one re-masks): same work every time.
            b.iter(|| black_box(ws::decode_frame(black_box(&mut buf), 1 << 20, Role::Server).unwrap()));
        });
        g.bench_with_input(BenchmarkId::new("encode_server", size), &payload, |b, p| {
            let mut out = Vec::with_capacity(size + 16);
            b.iter(|| {
                out.clear();
                ws::encode_frame(OpKind::Text, black_box(p), &mut out);
                black_box(out.len())
            });
        });
    }
    g.finish();
}

fn packets(c: &mut Criterion) {
    let mut g = c.benchmark_group("packet");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_event", |b| {
        b.iter(|| {
            let engineio::Packet::Message(m) = engineio::decode(black_box(EVENT)).unwrap() else {
                unreachable!()
            };
            black_box(socketio::decode(m).unwrap())
        })
    });
    let data = r#"["message:new",{"id":"01KA0000000000000000000000","from":"alice","to":"bob","content":"hello","ts":1795729196016}]"#;
    g.bench_function("encode_event", |b| {
        let mut s = String::with_capacity(256);
        b.iter(|| {
            s.clear();
            s.push('4');
            socketio::encode(socketio::PacketType::Event, "/", None, 0, Some(black_box(data)), &mut s);
            black_box(s.len())
        })
    });
    g.bench_function("resp_encode_publish", |b| {
        let mut out = Vec::with_capacity(256);
        let payload = vec![b'x'; 128];
        b.iter(|| {
            out.clear();
            resp::encode_command(&[b"PUBLISH".as_slice(), b"room:t:lobby", &payload], &mut out);
            black_box(out.len())
        })
    });
    let reply = b"*3\r\n$7\r\nmessage\r\n$12\r\nroom:t:lobby\r\n$5\r\nhello\r\n";
    g.bench_function("resp_decode_push", |b| {
        b.iter(|| black_box(resp::decode_reply(black_box(reply)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, frames, packets);
criterion_main!(benches);
