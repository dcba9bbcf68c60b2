//! The kernel's floor for room fan-out: what one `send(2)` of a server frame to each of
//! N loopback TCP sockets costs the sending thread, with a reader draining the other ends
//! on another core. shardgate's fan-out cost per delivery (the load generator's `fanout`
//! scenario, `server_cpu_us_per_received`) is read against this number, measured on the
//! same machine in the same session (`docs/performance.md`, "Fan-out against the kernel
//! floor").
//!
//! Run: `cargo bench --bench send_floor -- [--sockets 1000] [--rate 50] [--seconds 10]
//! [--frame 122] [--batch 1] [--sender-cpu 0] [--reader-cpu 1]`. `--batch K` sends K
//! frames per socket per round: as K separate sends, then as one coalesced send of K
//! frames, the two costs side by side.
//!
//! `--target HOST:PORT --server-pid PID` then measures a shardgate server (started with
//! the test secret) against the same reader: as many Socket.IO clients join one room and
//! are drained by this program's epoll reader, one more client sends to the room at
//! `--rate`, and the server process's CPU per delivery is read from `/proc`. The reader
//! matters: a client that waits with one io_uring poll per socket (the load generator,
//! on glommio) makes every send wake it through io_uring, a cost the kernel charges to
//! the *sender*; the floor's reader and this one use one epoll set. With `--batch K` the
//! sender writes K messages per round in one write, so each member gets K frames in one
//! pass of the server (which its writer sends as one `sendmsg`), and the ratios against
//! both floors (K separate sends, one coalesced send) are printed.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/floor.rs"]
mod floor;
#[path = "../tests/support/mod.rs"]
mod support;

use floor::{epoll_add, loopback_pairs, pin, thread_cpu_us};

struct Args {
    target: Option<std::net::SocketAddr>,
    server_pid: u32,
    sockets: usize,
    rate: u64,
    seconds: u64,
    frame: usize,
    batch: usize,
    sender_cpu: usize,
    reader_cpu: usize,
}

fn args() -> Args {
    let mut a = Args {
        target: None,
        server_pid: 0,
        sockets: 1000,
        rate: 50,
        seconds: 10,
        frame: 122,
        batch: 1,
        sender_cpu: 0,
        reader_cpu: 1,
    };
    for (name, v) in floor::flags() {
        if name == "--target" {
            a.target = v.parse().ok();
            continue;
        }
        let Ok(v) = v.parse::<u64>() else { continue };
        match name.as_str() {
            "--server-pid" => a.server_pid = v as u32,
            "--sockets" => a.sockets = v as usize,
            "--rate" => a.rate = v.max(1),
            "--seconds" => a.seconds = v.max(1),
            "--frame" => a.frame = v as usize,
            "--batch" => a.batch = (v as usize).max(1),
            "--sender-cpu" => a.sender_cpu = v as usize,
            "--reader-cpu" => a.reader_cpu = v as usize,
            _ => {}
        }
    }
    a
}

/// A server frame of `len` bytes in all (2-byte header, text opcode), as shardgate sends.
fn frame(len: usize) -> Vec<u8> {
    let payload = len.saturating_sub(2).min(125);
    let mut f = vec![0x81, payload as u8];
    f.extend(std::iter::repeat_n(b'x', payload));
    f
}

/// Drains every socket of `readers` until `stop`, counting bytes, with epoll.
fn drain(readers: Vec<TcpStream>, stop: Arc<AtomicBool>, bytes: Arc<AtomicU64>) {
    // SAFETY: epoll on descriptors owned by `readers`, which outlive the loop.
    let ep = unsafe { libc::epoll_create1(0) };
    for (i, r) in readers.iter().enumerate() {
        r.set_nonblocking(true).unwrap();
        epoll_add(ep, r.as_raw_fd(), i as u64);
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    let mut readers = readers;
    while !stop.load(Ordering::Relaxed) {
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 50) };
        for ev in events.iter().take(n.max(0) as usize) {
            let r = &mut readers[ev.u64 as usize];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        bytes.fetch_add(k as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
    }
    unsafe { libc::close(ep) };
}

/// The epoll reader on its own thread, pinned to `cpu`, until [`Reader::finish`].
struct Reader {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Reader {
    fn start(readers: Vec<TcpStream>, cpu: usize) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let (s, b) = (stop.clone(), bytes.clone());
        let thread = std::thread::spawn(move || {
            pin(cpu);
            drain(readers, s, b)
        });
        Reader { stop, bytes, thread }
    }

    /// Bytes drained so far.
    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Stops the reader; the bytes it drained.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Calls `step` `count` times, `rate` times a second.
fn paced(rate: u64, count: u64, mut step: impl FnMut()) {
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now();
    for i in 0..count {
        if let Some(wait) = (start + period * i as u32).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        step();
    }
}

/// Rounds at `rate` per second for `seconds`; each round writes `chunks` (one buffer per
/// send) to every socket. Returns the sender thread's CPU microseconds and sends made.
fn run(writers: &mut [TcpStream], chunks: &[Vec<u8>], rate: u64, seconds: u64) -> (u64, u64) {
    let cpu0 = thread_cpu_us();
    let mut sends = 0u64;
    paced(rate, rate * seconds, || {
        for w in writers.iter_mut() {
            for c in chunks {
                w.write_all(c).unwrap();
                sends += 1;
            }
        }
    });
    (thread_cpu_us() - cpu0, sends)
}

fn main() {
    let a = args();
    let (readers, mut writers): (Vec<_>, Vec<_>) = loopback_pairs(a.sockets).into_iter().unzip();
    let reader = Reader::start(readers, a.reader_cpu);
    pin(a.sender_cpu);
    let f = frame(a.frame);
    let separate: Vec<Vec<u8>> = (0..a.batch).map(|_| f.clone()).collect();
    let (cpu, sends) = run(&mut writers, &separate, a.rate, a.seconds);
    let per_send = cpu as f64 / sends as f64;
    println!(
        "send_floor: {} sockets, {} rounds/s, {} s, {}-byte frames, {} per socket per round",
        a.sockets,
        a.rate,
        a.seconds,
        f.len(),
        a.batch
    );
    println!("  separate sends: {sends} sends, sender CPU {cpu} us, {per_send:.2} us per send");
    let mut coalesced_per_frame = None;
    if a.batch > 1 {
        let coalesced = vec![separate.concat()];
        let (cpu, sends) = run(&mut writers, &coalesced, a.rate, a.seconds);
        let frames = sends * a.batch as u64;
        coalesced_per_frame = Some(cpu as f64 / frames as f64);
        println!(
            "  coalesced: {sends} sends of {} frames, sender CPU {cpu} us, {:.2} us per frame ({:.2} us per send)",
            a.batch,
            cpu as f64 / frames as f64,
            cpu as f64 / sends as f64
        );
    }
    println!("  reader drained {} bytes", reader.finish());
    if let Some(target) = a.target {
        let server = server_fanout(target, &a);
        println!("  ratio shardgate / floor (same reader): {:.2}x", server / per_send);
        if let Some(per_frame) = coalesced_per_frame {
            println!("  ratio shardgate / coalesced floor (same reader): {:.2}x", server / per_frame);
        }
    }
}

/// shardgate at `target` fanning out to `a.sockets` members of one room, drained by the
/// same epoll reader; returns the server's CPU microseconds per delivery.
fn server_fanout(target: std::net::SocketAddr, a: &Args) -> f64 {
    use support::{token, Client};
    let room = serde_json::json!("floor");
    let mut readers = Vec::with_capacity(a.sockets);
    for i in 0..a.sockets {
        let mut c = Client::connect(target, &token(&format!("r{i}"), "floor"));
        assert_eq!(c.emit_ack("join_room", room.clone())["ok"], true);
        readers.push(c.into_stream());
    }
    let mut sender = Client::connect(target, &token("sender", "floor"));
    assert_eq!(sender.emit_ack("join_room", room.clone())["ok"], true);
    let reader = Reader::start(readers, a.reader_cpu);
    // The same 40 bytes of content as the load generator's fan-out; `batch` messages per
    // round in one write.
    let body = serde_json::json!(["message:send", { "room": "floor", "content": "x".repeat(40) }]);
    let mut round = Vec::new();
    for _ in 0..a.batch {
        let text = format!("42{body}");
        shardgate_io::ws::encode_masked_frame(
            shardgate_io::ws::OpKind::Text,
            text.as_bytes(),
            [7, 1, 3, 9],
            &mut round,
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = support::cpu_seconds(a.server_pid);
    let bytes0 = reader.bytes();
    let rounds = a.rate * a.seconds;
    let messages = rounds * a.batch as u64;
    paced(a.rate, rounds, || sender.send_raw(&round));
    std::thread::sleep(Duration::from_millis(300));
    let cpu = (support::cpu_seconds(a.server_pid) - cpu0) * 1e6;
    let drained = reader.finish() - bytes0;
    let deliveries = messages * a.sockets as u64;
    let per = cpu / deliveries as f64;
    println!(
        "shardgate: room of {}, {} rounds/s of {} messages, {} s: {messages} messages, {deliveries} deliveries, {drained} bytes drained ({} per delivery), server CPU {cpu:.0} us, {per:.2} us per delivery",
        a.sockets,
        a.rate,
        a.batch,
        a.seconds,
        drained / deliveries.max(1)
    );
    per
}
