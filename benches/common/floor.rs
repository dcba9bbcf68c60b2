//! What the floor programs (`send_floor`, `ack_floor`) share: their command line, pinning
//! a thread to a core, a thread's own CPU time, adding a descriptor to an epoll set, and
//! opening loopback connections.

use std::os::fd::RawFd;

/// The `--name value` pairs of the command line, in order. Anything else (`cargo bench`
/// passes `--bench`) is skipped.
pub fn flags() -> Vec<(String, String)> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        match argv.get(i + 1) {
            Some(v) if argv[i].starts_with("--") && !v.starts_with("--") => {
                out.push((argv[i].clone(), v.clone()));
                i += 2;
            }
            _ => i += 1,
        }
    }
    out
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, applied to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// CPU time (user + system) of the calling thread, in microseconds.
pub fn thread_cpu_us() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// Adds `fd` to the epoll set `ep` for reading, with `token` as its event data.
pub fn epoll_add(ep: RawFd, fd: RawFd, token: u64) {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
    // SAFETY: `ep` and `fd` are open descriptors owned by the caller.
    let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    assert_eq!(rc, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
}

/// `n` loopback TCP connections, each as (the connecting end, the accepted end), both
/// with `TCP_NODELAY`.
pub fn loopback_pairs(n: usize) -> Vec<(std::net::TcpStream, std::net::TcpStream)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (0..n)
        .map(|_| {
            let c = std::net::TcpStream::connect(addr).unwrap();
            let (s, _) = listener.accept().unwrap();
            c.set_nodelay(true).unwrap();
            s.set_nodelay(true).unwrap();
            (c, s)
        })
        .collect()
}
