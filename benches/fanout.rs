//! In-shard room fan-out (criterion): one room message queued on every member
//! connection of a shard and their tasks woken, then each task taking its frames (the
//! user-space half of a delivery; the socket write is the kernel's half). Baseline in the
//! same run: pushing an `Arc` clone per member into a plain `Vec`, the least any fan-out
//! can do. Run: `cargo bench --bench fanout`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardgate_shard::bench::RoomFanout;

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("room_fanout");
    let frame = RoomFanout::frame(100);
    for members in [10usize, 100, 1000, 10_000] {
        g.throughput(Throughput::Elements(members as u64 - 1));
        let mut room = RoomFanout::new(members).expect("mesh");
        // Every member but the sender gets the frame, and its task is woken.
        assert_eq!(room.deliver(&frame), members - 1);
        assert_eq!((room.drain(), room.wakes()), (members - 1, members as u64 - 1));
        g.bench_function(BenchmarkId::new("deliver_and_drain", members), |b| {
            b.iter(|| {
                let n = room.deliver(black_box(&frame));
                black_box(n + room.drain())
            })
        });
        let mut queues: Vec<Vec<std::sync::Arc<[u8]>>> =
            (0..members).map(|_| Vec::with_capacity(1)).collect();
        g.bench_function(BenchmarkId::new("baseline_arc_push", members), |b| {
            b.iter(|| {
                for q in queues.iter_mut().skip(1) {
                    q.push(frame.clone());
                }
                for q in queues.iter_mut() {
                    q.clear();
                }
                black_box(queues.len())
            })
        });
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_message_frame_100B", |b| {
        b.iter(|| black_box(RoomFanout::frame(black_box(100))))
    });
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
