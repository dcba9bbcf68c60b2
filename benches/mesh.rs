//! Cross-core queue transfer (criterion): messages moved from a producer thread to a
//! consumer thread through the shard mesh (SegQueue + doorbell, drained in batches), with
//! `std::sync::mpsc` and a bare `crossbeam_queue::SegQueue` measured in the same run as
//! baselines. Run: `cargo bench --bench mesh`.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::SegQueue;
use shardgate_shard::mesh::Mesh;
use shardgate_shard::msg::ShardMsg;

const N: u64 = 100_000;

fn msg() -> ShardMsg {
    ShardMsg::Shutdown
}

/// N messages through the mesh: producer pushes, consumer waits on the doorbell (with a
/// blocking read, as an idle shard does through io_uring) and drains batches.
fn mesh_transfer(iters: u64) -> Duration {
    let (mesh, bells) = Mesh::new(1).unwrap();
    let bell = bells.into_iter().next().unwrap();
    let mut rx = UnixStream::from(bell.fd);
    rx.set_nonblocking(false).unwrap();
    let total = N * iters;
    let start = Instant::now();
    let consumer = std::thread::spawn({
        let mesh = mesh.clone();
        move || {
            let mut got = 0u64;
            let mut batch = Vec::with_capacity(256);
            let mut ring = [0u8; 64];
            while got < total {
                if mesh.backlog(0) == 0 {
                    let _ = rx.read(&mut ring);
                }
                mesh.drain(0, 256, &mut batch);
                got += batch.len() as u64;
                batch.clear();
            }
        }
    });
    for _ in 0..total {
        mesh.send(0, msg());
    }
    consumer.join().unwrap();
    start.elapsed()
}

fn mpsc_transfer(iters: u64) -> Duration {
    let (tx, rx) = std::sync::mpsc::channel::<ShardMsg>();
    let total = N * iters;
    let start = Instant::now();
    let consumer = std::thread::spawn(move || {
        for _ in 0..total {
            rx.recv().unwrap();
        }
    });
    for _ in 0..total {
        tx.send(msg()).unwrap();
    }
    consumer.join().unwrap();
    start.elapsed()
}

fn segqueue_spin(iters: u64) -> Duration {
    let q = Arc::new(SegQueue::<ShardMsg>::new());
    let total = N * iters;
    let start = Instant::now();
    let consumer = std::thread::spawn({
        let q = q.clone();
        move || {
            let mut got = 0;
            while got < total {
                if q.pop().is_some() {
                    got += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    });
    for _ in 0..total {
        q.push(msg());
    }
    consumer.join().unwrap();
    start.elapsed()
}

fn transfer(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_core");
    g.throughput(Throughput::Elements(N));
    g.sample_size(20);
    g.bench_function("mesh_doorbell_batched", |b| b.iter_custom(mesh_transfer));
    g.bench_function("std_mpsc (baseline)", |b| b.iter_custom(mpsc_transfer));
    g.bench_function("segqueue_spinning (baseline, burns a core)", |b| b.iter_custom(segqueue_spin));
    g.finish();
}

criterion_group!(benches, transfer);
criterion_main!(benches);
