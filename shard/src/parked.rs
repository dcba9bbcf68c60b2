//! The readiness watch of parked WebSockets: idle connections that are not a task.
//!
//! A WebSocket whose client has sent nothing for a tick gives up its glommio task and
//! its poll source (two thirds of what an idle connection cost) and is *parked*: its
//! descriptor joins this shard's epoll set (one-shot, `EPOLLIN | EPOLLRDHUP`) and its
//! entry in the shard's connection slab is all that is left of it. A watcher thread per
//! shard sleeps in `epoll_wait` and turns every ready descriptor into a
//! [`ShardMsg::Readable`] on the shard's inbox (the mesh), so the shard hears of it like
//! of any other message, on its own thread, with no lock. Writes to a parked connection
//! need no task either: the shard's writer sends them (`Conns::poll_write_dirty`).
//!
//! Why a thread: glommio waits for descriptors only through its own ring, and offers no
//! way to wait for an arbitrary descriptor such as an epoll instance; the thread costs a
//! wake-up per batch of ready connections, and only on idle connections, which are idle
//! because they rarely speak (a pong every ping interval). Active connections keep their
//! task and glommio's ring.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::ids::{ConnId, ShardId};
use crate::mesh::Mesh;
use crate::msg::ShardMsg;

/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;
/// The epoll data of the stop descriptor; no connection id reaches it (slot index
/// `u32::MAX`).
const STOP: u64 = u64::MAX;

/// One shard's epoll set of parked connections and the thread that watches it.
pub(crate) struct Parking {
    epoll: OwnedFd,
    /// An eventfd in the set: written once to stop the watcher.
    stop: OwnedFd,
    watcher: Option<JoinHandle<()>>,
}

impl Parking {
    /// Creates shard `shard`'s epoll set and starts its watcher, which reports ready
    /// connections on `mesh`.
    pub fn start(shard: ShardId, mesh: Arc<Mesh>) -> io::Result<Parking> {
        // SAFETY: plain syscalls; each result is checked before it is owned.
        let epoll = unsafe { owned(libc::epoll_create1(libc::EPOLL_CLOEXEC))? };
        let stop = unsafe { owned(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))? };
        ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, stop.as_raw_fd(), libc::EPOLLIN as u32, STOP)?;
        let epfd = epoll.as_raw_fd();
        let watcher = std::thread::Builder::new()
            .name(format!("shard-{shard}-parked"))
            .spawn(move || watch(epfd, shard, &mesh))?;
        Ok(Parking { epoll, stop, watcher: Some(watcher) })
    }

    /// Watches `fd` for connection `id`: the first readiness (data, the peer's close, an
    /// error) is reported once, then the descriptor waits for [`Parking::rearm`].
    pub fn watch(&self, fd: RawFd, id: ConnId) -> io::Result<()> {
        ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, INTEREST, id.as_u64())
    }

    /// Reports `fd`'s next readiness (after one was reported and served).
    pub fn rearm(&self, fd: RawFd, id: ConnId) -> io::Result<()> {
        ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, INTEREST, id.as_u64())
    }

    /// Stops watching `fd` (its connection gets a task again).
    pub fn forget(&self, fd: RawFd) {
        let _ = ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, 0, 0);
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        let one = 1u64;
        // SAFETY: an 8-byte write of a valid u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

/// What a parked connection waits for.
const INTEREST: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;

fn ctl(epoll: RawFd, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: `ev` is a valid epoll_event for the call's duration.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// # Safety
/// `fd` must be a fresh descriptor (or negative on error) that nothing else owns.
unsafe fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from_raw_fd(fd))
}

/// The watcher thread: every ready connection becomes a `Readable` on the shard's inbox
/// (one doorbell per batch at most), until the stop descriptor is written.
fn watch(epoll: RawFd, shard: ShardId, mesh: &Mesh) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    loop {
        // SAFETY: `events` holds EVENTS entries; `epoll` outlives this thread (the
        // `Parking` that owns it joins the thread before closing it).
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), EVENTS as i32, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(shard, "epoll_wait failed: {}", io::Error::last_os_error());
            return;
        }
        for e in &events[..n as usize] {
            let data = e.u64;
            if data == STOP {
                return;
            }
            mesh.send(shard, ShardMsg::Readable(ConnId::from_u64(data)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_ready_socket_is_reported_once_until_rearmed_and_the_watcher_stops_on_drop() {
        let (mesh, _bells) = Mesh::new(1).unwrap();
        let parking = Parking::start(0, mesh.clone()).unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let id = ConnId::from_u64(7 << 32 | 3);
        parking.watch(b.as_raw_fd(), id).unwrap();
        let next = || {
            let mut out = Vec::new();
            for _ in 0..200 {
                mesh.drain(0, 16, &mut out);
                if !out.is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            out
        };
        a.write_all(b"x").unwrap();
        let got = next();
        assert!(matches!(got.as_slice(), [ShardMsg::Readable(c)] if *c == id), "one report");
        // Still readable, but one-shot: nothing more until re-armed.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(next_now(&mesh).is_empty());
        parking.rearm(b.as_raw_fd(), id).unwrap();
        assert_eq!(next().len(), 1, "reported again once re-armed");
        parking.forget(b.as_raw_fd());
        drop(parking);
    }

    fn next_now(mesh: &Mesh) -> Vec<ShardMsg> {
        let mut out = Vec::new();
        mesh.drain(0, 16, &mut out);
        out
    }
}
