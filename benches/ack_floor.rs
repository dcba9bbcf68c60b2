//! The kernel's floor for the acked-message path: what a minimal epoll server pays per
//! message when it reads one client frame and answers with one write, with the client on
//! the other core sending at a steady rate spread over many connections. shardgate's and
//! the peers' CPU per acked message at the same rate (`docs/performance.md`, "The ack path
//! against its floor") is read against this number, measured in the same session with the
//! same client.
//!
//! Run: `cargo bench --bench ack_floor -- [--connections 200] [--rate 10000] [--seconds 8]
//! [--content 100] [--reply 320] [--rounds 3] [--server-cpu 0] [--client-cpu 1]
//! [--target NAME=HOST:PORT/PID ...]` (`benches/ack_floor.sh` starts shardgate and the
//! socketioxide peer and passes them).
//!
//! * **The floor**: one thread pinned to `--server-cpu` waits on one epoll set over the
//!   accepted sockets; for each readable socket it reads once, counts the complete client
//!   frames and writes that many `--reply`-byte ack frames in one `write`. Its CPU (user +
//!   system, `getrusage(RUSAGE_THREAD)`) per message.
//! * **A target**: a Socket.IO server started with the test secret (`tests/support`); the
//!   client connects `--connections` sockets (WebSocket, CONNECT with a JWT), then sends
//!   `message:send {to: itself, content}` with an ack id; the server process's CPU (from
//!   `/proc/PID/stat`) per acked message.
//!
//! The client is the same for both: one thread pinned to `--client-cpu`, one epoll set
//! over its sockets and a `timerfd` armed for the next send (nanosecond deadlines, so the
//! sends do not bunch into millisecond batches); message `i` goes out at `i / rate` on
//! connection `i % connections`, like the load generator's `ack-rtt`. Every run checks
//! that every message was acked. Turns alternate (floor, each target, floor, ...) for
//! `--rounds`, and the medians and ratios are printed.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/floor.rs"]
mod floor;
#[path = "../tests/support/mod.rs"]
mod support;

use floor::{epoll_add, loopback_pairs, pin, thread_cpu_us};
use shardgate_io::ws::{self, OpKind, Role};

struct Args {
    connections: usize,
    rate: u64,
    seconds: u64,
    content: usize,
    reply: usize,
    rounds: usize,
    server_cpu: usize,
    client_cpu: usize,
    targets: Vec<(String, SocketAddr, u32)>,
}

fn args() -> Args {
    let mut a = Args {
        connections: 200,
        rate: 10_000,
        seconds: 8,
        content: 100,
        reply: 320,
        rounds: 3,
        server_cpu: 0,
        client_cpu: 1,
        targets: Vec::new(),
    };
    for (name, v) in floor::flags() {
        if name == "--target" {
            // NAME=HOST:PORT/PID
            let t = v.split_once('=').and_then(|(name, rest)| {
                let (addr, pid) = rest.split_once('/')?;
                Some((name.to_string(), addr.parse().ok()?, pid.parse().ok()?))
            });
            a.targets.push(t.unwrap_or_else(|| panic!("--target wants NAME=HOST:PORT/PID, got {v:?}")));
            continue;
        }
        let Ok(v) = v.parse::<u64>() else { continue };
        match name.as_str() {
            "--connections" => a.connections = (v as usize).max(1),
            "--rate" => a.rate = v.max(1),
            "--seconds" => a.seconds = v.max(1),
            "--content" => a.content = v as usize,
            "--reply" => a.reply = (v as usize).max(8),
            "--rounds" => a.rounds = (v as usize).max(1),
            "--server-cpu" => a.server_cpu = v as usize,
            "--client-cpu" => a.client_cpu = v as usize,
            _ => {}
        }
    }
    a
}

/// Splits the complete frames off the front of `pending` (masked client frames for
/// `Role::Server`, server frames for `Role::Client`), calling `each` with every payload.
fn frames(pending: &mut Vec<u8>, role: Role, mut each: impl FnMut(&[u8])) {
    let mut at = 0;
    while let Some((frame, used)) =
        ws::decode_frame(&mut pending[at..], usize::MAX, role).expect("a well-formed frame")
    {
        each(&pending[at + frame.payload.start..at + frame.payload.end]);
        at += used;
    }
    pending.drain(..at);
}

/// An unmasked server text frame carrying an ack packet, `len` bytes in all.
fn ack_frame(len: usize) -> Vec<u8> {
    let mut payload = b"430[{\"ok\":true,\"pad\":\"".to_vec();
    payload.resize(len.saturating_sub(4 + 3).max(payload.len()), b'x');
    payload.extend_from_slice(b"\"}]");
    let mut f = Vec::new();
    ws::encode_frame(OpKind::Text, &payload, &mut f);
    f
}

/// The minimal server: one epoll set, one read per readable socket, one write of as many
/// ack frames as it read complete frames. Runs until `stop`; returns its thread's CPU
/// microseconds and the messages it answered.
fn floor_server(mut socks: Vec<TcpStream>, reply: Vec<u8>, stop: Arc<AtomicBool>, cpu: usize) -> (u64, u64) {
    pin(cpu);
    // SAFETY: epoll over descriptors owned by `socks`, which outlive the loop.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    for (i, s) in socks.iter().enumerate() {
        s.set_nonblocking(true).unwrap();
        epoll_add(ep, s.as_raw_fd(), i as u64);
    }
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    let mut answered = 0u64;
    let cpu0 = thread_cpu_us();
    while !stop.load(Ordering::Relaxed) {
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 50) };
        for ev in events.iter().take(n.max(0) as usize) {
            let i = ev.u64 as usize;
            let k = match socks[i].read(&mut buf) {
                Ok(k) => k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => panic!("floor server read: {e}"),
            };
            pending[i].extend_from_slice(&buf[..k]);
            out.clear();
            frames(&mut pending[i], Role::Server, |_| {
                out.extend_from_slice(&reply);
                answered += 1;
            });
            if !out.is_empty() {
                socks[i].write_all(&out).unwrap();
            }
        }
    }
    let used = thread_cpu_us() - cpu0;
    unsafe { libc::close(ep) };
    (used, answered)
}

/// Arms `tfd` to fire at `at` (CLOCK_MONOTONIC).
fn arm(tfd: i32, at: Instant, base: (Instant, libc::timespec)) {
    let ns = base.1.tv_sec as u128 * 1_000_000_000
        + base.1.tv_nsec as u128
        + at.saturating_duration_since(base.0).as_nanos();
    let spec = libc::itimerspec {
        it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
        it_value: libc::timespec {
            tv_sec: (ns / 1_000_000_000) as i64,
            tv_nsec: (ns % 1_000_000_000) as i64,
        },
    };
    // SAFETY: `tfd` is a timerfd; `spec` is a valid absolute deadline.
    unsafe { libc::timerfd_settime(tfd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
}

/// The client: sends `message` (one masked frame, the same bytes each time but a fresh
/// ack id for Socket.IO targets) at `rate` for `seconds` over `socks`, reads every reply,
/// and counts the ack frames. Returns the acks counted and the bytes received.
fn client(socks: &mut [TcpStream], rate: u64, seconds: u64, content: usize) -> (u64, u64) {
    // SAFETY: epoll and timerfd descriptors created and closed here.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let tfd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) };
    for (i, s) in socks.iter().enumerate() {
        s.set_nonblocking(true).unwrap();
        epoll_add(ep, s.as_raw_fd(), i as u64);
    }
    epoll_add(ep, tfd, u64::MAX);
    let n = socks.len();
    let total = rate * seconds;
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let mut now_ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now_ts) };
    let start = Instant::now();
    let base = (start, now_ts);
    let pad = "x".repeat(content);
    let mut next_id = vec![0u64; n];
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    let mut frame = Vec::new();
    let (mut sent, mut acks, mut bytes) = (0u64, 0u64, 0u64);
    let give_up = start + Duration::from_secs(seconds + 10);
    arm(tfd, start, base);
    while acks < total && Instant::now() < give_up {
        let k = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100) };
        for ev in events.iter().take(k.max(0) as usize) {
            if ev.u64 == u64::MAX {
                let mut ticks = [0u8; 8];
                unsafe { libc::read(tfd, ticks.as_mut_ptr().cast(), 8) };
                let now = Instant::now();
                while sent < total && start + period * sent as u32 <= now {
                    let c = sent as usize % n;
                    let text = format!(
                        "42{}[\"message:send\",{{\"to\":\"u{c}\",\"content\":\"{pad}\"}}]",
                        next_id[c]
                    );
                    next_id[c] += 1;
                    frame.clear();
                    ws::encode_masked_frame(OpKind::Text, text.as_bytes(), [7, 1, 3, 9], &mut frame);
                    socks[c].write_all(&frame).expect("client write");
                    sent += 1;
                }
                if sent < total {
                    arm(tfd, start + period * sent as u32, base);
                }
                continue;
            }
            let i = ev.u64 as usize;
            loop {
                match socks[i].read(&mut buf) {
                    Ok(0) => panic!("the server closed connection {i}"),
                    Ok(k) => {
                        bytes += k as u64;
                        pending[i].extend_from_slice(&buf[..k]);
                        let mut pings = 0;
                        frames(&mut pending[i], Role::Client, |payload| {
                            if payload.starts_with(b"43") {
                                acks += 1;
                            } else if payload == b"2" {
                                pings += 1;
                            }
                        });
                        // An Engine.IO ping from a target: answer it.
                        for _ in 0..pings {
                            let mut pong = Vec::new();
                            ws::encode_masked_frame(OpKind::Text, b"3", [1, 2, 3, 4], &mut pong);
                            let _ = socks[i].write_all(&pong);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }
    }
    unsafe {
        libc::close(tfd);
        libc::close(ep);
    }
    assert_eq!(sent, total, "the client fell behind its schedule");
    (acks, bytes)
}

/// One turn of the floor: CPU microseconds per message.
fn floor_turn(a: &Args) -> f64 {
    let (mut clients, accepted): (Vec<_>, Vec<_>) = loopback_pairs(a.connections).into_iter().unzip();
    let stop = Arc::new(AtomicBool::new(false));
    let (s, reply, cpu) = (stop.clone(), ack_frame(a.reply), a.server_cpu);
    let server = std::thread::spawn(move || floor_server(accepted, reply, s, cpu));
    pin(a.client_cpu);
    let (acks, _) = client(&mut clients, a.rate, a.seconds, a.content);
    stop.store(true, Ordering::Relaxed);
    let (used, answered) = server.join().unwrap();
    let total = a.rate * a.seconds;
    assert_eq!((acks, answered), (total, total), "the floor server lost messages");
    used as f64 / total as f64
}

/// One turn against a Socket.IO server: its process CPU microseconds per acked message and
/// the bytes it sent per message.
fn target_turn(a: &Args, addr: SocketAddr, pid: u32) -> (f64, u64) {
    pin(a.client_cpu);
    let mut socks: Vec<TcpStream> = (0..a.connections)
        .map(|i| {
            let c = support::Client::connect(addr, &support::token(&format!("u{i}"), "ackfloor"));
            let s = c.into_stream();
            s.set_nodelay(true).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = support::cpu_seconds(pid);
    let (acks, bytes) = client(&mut socks, a.rate, a.seconds, a.content);
    let used = (support::cpu_seconds(pid) - cpu0) * 1e6;
    let total = a.rate * a.seconds;
    assert_eq!(acks, total, "the server at {addr} did not ack every message");
    (used / total as f64, bytes / total)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let a = args();
    println!(
        "ack_floor: {} connections, {} msgs/s, {} s a turn, {}-byte content, {}-byte reply, {} rounds",
        a.connections, a.rate, a.seconds, a.content, a.reply, a.rounds
    );
    let mut floor = Vec::new();
    let mut per_target: Vec<Vec<f64>> = vec![Vec::new(); a.targets.len()];
    for round in 0..a.rounds {
        let f = floor_turn(&a);
        println!("  round {}: floor {f:.2} us per message", round + 1);
        floor.push(f);
        for (t, (name, addr, pid)) in a.targets.iter().enumerate() {
            let (v, bytes) = target_turn(&a, *addr, *pid);
            println!(
                "  round {}: {name} {v:.2} us per message ({:.2}x the floor), {bytes} bytes received per message",
                round + 1,
                v / f
            );
            per_target[t].push(v);
        }
    }
    let f = median(&mut floor);
    println!("median: floor {f:.2} us per message");
    for ((name, _, _), v) in a.targets.iter().zip(per_target.iter_mut()) {
        let m = median(v);
        println!("median: {name} {m:.2} us per message, {:.2}x the floor", m / f);
    }
}
