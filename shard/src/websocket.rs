//! A WebSocket connection after its upgrade: a task while its client talks, parked while
//! it is idle.
//!
//! **Running.** The connection's task owns the socket and the reader's state
//! ([`Reader`]: bytes of a partly received frame, the fragment assembler, the Engine.IO
//! reader state); everything other tasks touch (the outbound queue, timers, the session)
//! lives in the shard's [`crate::state::ConnEntry`]. Reads go into the shard's scratch
//! buffer, so a connection holds no read buffer between frames. Frames for the client are
//! written by the shard's writer task; the connection's task writes only what a full
//! socket left behind.
//!
//! **Parked.** A connection whose client said nothing for a tick (the tick sets
//! `ConnEntry::park`) and that has nothing in progress (no partial frame, no pending
//! binary packet, nothing queued) ends its task: the descriptor joins the shard's epoll
//! set (`parked.rs`) and the entry is all that is left, no task, no poll source, no
//! [`Reader`]. When the watcher reports it readable, the writer task calls
//! [`serve_roused`], which reads it *here*, without a task: a pong or an occasional event
//! is decoded and handled, and the connection stays parked. It gets a task again
//! ([`resume`]) when it has a partial frame, reads a full buffer, speaks twice within a
//! tick, must close, or has frames a full socket did not take.

use std::future::poll_fn;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use shardgate_io::http::{self, Request};
use shardgate_io::ws::{self, close_code, Assembler, DataKind, OpKind, Role, WsError};

use crate::ids::ConnId;
use crate::local::{Shard, SCRATCH};
use crate::metrics::{CloseReason, Counter};
use crate::state::conns::Inbound;
use crate::wire;

/// Frames at least this large are written straight from the queue, not coalesced.
const DIRECT_WRITE: usize = 16 * 1024;
/// Read/flush rounds one connection may take per poll before it yields to the others.
const POLL_ROUNDS: usize = 32;
/// A partial-frame buffer larger than this is freed once it empties.
const RBUF_KEEP: usize = 4096;
/// Engine.IO's maxPayload counts the packet; a frame may carry this much more (the
/// packet type prefix and a Socket.IO header).
const FRAME_SLACK: usize = 16;

/// What a running connection's task keeps for itself.
pub(crate) struct ConnIo {
    stream: TcpStream,
    rd: Reader,
}

/// The reader's state between two reads.
struct Reader {
    id: ConnId,
    /// Bytes of an incomplete frame (empty, and unallocated, most of the time).
    rbuf: Vec<u8>,
    assembler: Assembler,
    /// The Engine.IO reader's state: the opening request's token, a pending binary packet.
    inbound: Inbound,
}

impl Reader {
    /// The state of a parked connection: nothing in progress.
    fn at_rest(id: ConnId) -> Reader {
        Reader { id, rbuf: Vec::new(), assembler: Assembler::default(), inbound: Inbound::default() }
    }

    /// Nothing is in progress: the state can be dropped and rebuilt by [`Reader::at_rest`].
    fn is_at_rest(&self) -> bool {
        self.rbuf.is_empty()
            && !self.assembler.in_progress()
            && self.inbound.token.is_none()
            && self.inbound.binary.is_none()
    }
}

/// How a running connection's loop ended.
enum End {
    Close(CloseReason),
    Park,
}

/// A session that was upgraded from long-polling: its socket, the bytes that followed
/// the upgrade and the session's reader state.
pub(crate) fn upgraded(id: ConnId, stream: TcpStream, rbuf: Vec<u8>, inbound: Inbound) -> Box<ConnIo> {
    Box::new(ConnIo { stream, rd: Reader { id, rbuf, assembler: Assembler::default(), inbound } })
}

/// Registers a new WebSocket connection and sends the Engine.IO open packet.
pub(crate) async fn open(
    shard: &Shard,
    stream: TcpStream,
    req: &Request,
    rest: Vec<u8>,
) -> Option<Box<ConnIo>> {
    let (id, open) = shard.open_session(None);
    let mut hello = http::upgrade_response(req.ws_key.as_deref().unwrap_or_default());
    ws::encode_frame(OpKind::Text, open.as_bytes(), &mut hello);
    let rd = Reader { id, rbuf: rest, assembler: Assembler::default(), inbound: Inbound::opening(req) };
    let mut io = Box::new(ConnIo { stream, rd });
    if wire::write_all(&mut io.stream, &hello).await.is_err() {
        finish(shard, &mut io, CloseReason::TransportError).await;
        return None;
    }
    Some(io)
}

/// Runs the connection in a task of its own, holding only what a WebSocket needs.
pub(crate) fn spawn(shard: Rc<Shard>, io: Box<ConnIo>) {
    glommio::spawn_local(task(shard, io)).detach();
}

/// The task of a WebSocket connection: the Engine.IO loop, then the goodbye or parking.
async fn task(shard: Rc<Shard>, mut io: Box<ConnIo>) {
    // Frames pushed to the connection are written by the writer task; `finish` retires
    // the entry, and with it this descriptor, before the socket closes.
    if let Some(c) = shard.state.borrow_mut().conns.get_mut(io.rd.id) {
        c.fd = Some(io.stream.as_raw_fd());
    }
    loop {
        match run(&shard, &mut io).await {
            // Boxed: the running task should not carry the goodbye's state.
            End::Close(reason) => return Box::pin(finish(&shard, &mut io, reason)).await,
            End::Park => match park(&shard, io) {
                Ok(()) => return,
                Err(back) => io = back,
            },
        }
    }
}

/// The goodbye of a connection that was parked when it had to close.
async fn goodbye(shard: Rc<Shard>, mut io: Box<ConnIo>, reason: CloseReason) {
    finish(&shard, &mut io, reason).await
}

/// The connection loop: flush queued frames, honour close and park requests, read and
/// process.
async fn run(shard: &Shard, io: &mut ConnIo) -> End {
    if !io.rd.rbuf.is_empty() {
        let mut early = std::mem::take(&mut io.rd.rbuf);
        let len = early.len();
        if let Err(r) = process(shard, &mut io.rd, &mut early[..len]) {
            return End::Close(r);
        }
    }
    poll_fn(|cx| poll_conn(shard, io, cx)).await
}

fn poll_conn(shard: &Shard, io: &mut ConnIo, cx: &mut Context<'_>) -> Poll<End> {
    let mut heard = false;
    for _ in 0..POLL_ROUNDS {
        if let Err(r) = flush(shard, io, cx) {
            return Poll::Ready(End::Close(r));
        }
        {
            let st = shard.state.borrow();
            let Some(c) = st.conns.get(io.rd.id) else {
                return Poll::Ready(End::Close(CloseReason::ServerShutdown));
            };
            if let Some(r) = c.close {
                if c.close_now || c.outbox.is_empty() || shard.shared.now() >= c.close_by {
                    return Poll::Ready(End::Close(r));
                }
            }
        }
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut io.stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(End::Close(CloseReason::ClientClosed)),
            Poll::Ready(Ok(n)) => {
                heard = true;
                shard.metrics().add(Counter::BytesIn, n as u64);
                if let Err(r) = process(shard, &mut io.rd, &mut scratch[..n]) {
                    return Poll::Ready(End::Close(r));
                }
            }
            Poll::Ready(Err(_)) => return Poll::Ready(End::Close(CloseReason::TransportError)),
            Poll::Pending => {
                let mut st = shard.state.borrow_mut();
                if let Some(c) = st.conns.get_mut(io.rd.id) {
                    c.heard |= heard;
                    // Asked to park (then the request is spent either way): only with
                    // nothing in progress.
                    let asked = std::mem::take(&mut c.park);
                    if asked && !c.heard && c.close.is_none() && c.outbox.is_empty() && io.rd.is_at_rest() {
                        return Poll::Ready(End::Park);
                    }
                    match &c.waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => c.waker = Some(cx.waker().clone()),
                    }
                }
                return Poll::Pending;
            }
        }
    }
    // Busy connection: let the others run.
    if let Some(c) = shard.state.borrow_mut().conns.get_mut(io.rd.id) {
        c.heard = true;
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Writes queued frames until the queue is empty or the socket is full.
fn flush(shard: &Shard, io: &mut ConnIo, cx: &mut Context<'_>) -> Result<(), CloseReason> {
    let mut st = shard.state.borrow_mut();
    let m = &shard.metrics();
    let Some(c) = st.conns.get_mut(io.rd.id) else {
        return Ok(());
    };
    loop {
        let Some(front) = c.outbox.front() else {
            // An idle connection keeps no queue allocation.
            if c.outbox.capacity() > 0 {
                c.outbox = Default::default();
            }
            return Ok(());
        };
        let first = &front[c.head_off..];
        let res = if c.outbox.len() == 1 || first.len() >= DIRECT_WRITE {
            Pin::new(&mut io.stream).poll_write(cx, first)
        } else {
            let mut wbuf = shard.wbuf.borrow_mut();
            wbuf.clear();
            wbuf.extend_from_slice(first);
            for f in c.outbox.iter().skip(1) {
                if wbuf.len() + f.len() > SCRATCH {
                    break;
                }
                wbuf.extend_from_slice(f);
            }
            Pin::new(&mut io.stream).poll_write(cx, &wbuf)
        };
        match res {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(CloseReason::TransportError),
            Poll::Ready(Ok(n)) => {
                m.add(Counter::BytesOut, n as u64);
                c.advance(n);
            }
            Poll::Pending => return Ok(()),
        }
    }
}

/// Ends the connection's task and parks it; gives `io` back if the shard cannot.
fn park(shard: &Shard, io: Box<ConnIo>) -> Result<(), Box<ConnIo>> {
    let Some(parking) = shard.parking.as_ref() else {
        return Err(io);
    };
    // The task's socket is glommio's, with a poll in flight; a duplicate outlives it.
    // SAFETY: fcntl(2) on a descriptor `io` owns; the result is checked.
    let fd = unsafe { libc::fcntl(io.stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io);
    }
    let id = io.rd.id;
    if parking.watch(fd, id).is_err() {
        // SAFETY: our own duplicate, closed once.
        unsafe { libc::close(fd) };
        return Err(io);
    }
    if let Some(c) = shard.state.borrow_mut().conns.get_mut(id) {
        c.fd = Some(fd);
        c.parked = true;
        c.waker = None;
    }
    let m = shard.metrics();
    m.inc(Counter::Parks);
    m.inc(Counter::Parked);
    // Closes the task's descriptor and cancels its poll; the duplicate stays open.
    drop(io);
    Ok(())
}

/// The writer task's turn for parked connections that were roused: reads a readable one
/// here, and gives a task back to those that need one. `ids` may hold connections that
/// are gone or no longer parked.
pub(crate) fn serve_roused(shard: &Rc<Shard>, ids: &mut Vec<ConnId>) {
    serve_each(shard, ids);
    if ids.capacity() > crate::state::conns::LIST_KEEP {
        *ids = Vec::new();
    }
}

fn serve_each(shard: &Rc<Shard>, ids: &mut Vec<ConnId>) {
    for id in ids.drain(..) {
        let (fd, needs_task) = {
            let st = shard.state.borrow();
            match st.conns.get(id) {
                Some(c) if c.parked => match c.fd {
                    Some(fd) => (fd, c.close.is_some() || c.blocked),
                    None => continue,
                },
                _ => continue,
            }
        };
        if needs_task {
            resume(shard, id, fd, Reader::at_rest(id), None);
            continue;
        }
        let mut rd = Reader::at_rest(id);
        let mut scratch = shard.scratch.borrow_mut();
        // SAFETY: recv(2) into the shard's scratch buffer, on the parked connection's
        // open descriptor.
        let n = unsafe { libc::recv(fd, scratch.as_mut_ptr().cast(), scratch.len(), libc::MSG_DONTWAIT) };
        let end = match n {
            0 => Some(CloseReason::ClientClosed),
            n if n < 0 => match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => None,
                _ => Some(CloseReason::TransportError),
            },
            n => {
                let n = n as usize;
                shard.metrics().add(Counter::BytesIn, n as u64);
                shard.metrics().inc(Counter::ParkedReads);
                let r = process(shard, &mut rd, &mut scratch[..n]).err();
                if r.is_none() && (n == scratch.len() || !rd.is_at_rest()) {
                    // More is coming: a task reads it.
                    drop(scratch);
                    resume(shard, id, fd, rd, None);
                    continue;
                }
                r
            }
        };
        drop(scratch);
        if let Some(reason) = end {
            close_parked(shard, id, fd, rd, reason);
            continue;
        }
        // Still parked, unless it spoke twice within a tick or must close. What its
        // events queued is the writer's (a full socket rouses it again).
        let stay = {
            let mut st = shard.state.borrow_mut();
            let Some(c) = st.conns.get_mut(id) else { continue };
            let again = n > 0 && std::mem::replace(&mut c.heard, true);
            c.parked && !again && c.close.is_none() && !c.blocked
        };
        let rearmed = stay && shard.parking.as_ref().is_some_and(|p| p.rearm(fd, id).is_ok());
        if !rearmed {
            resume(shard, id, fd, rd, None);
        }
    }
}

/// Closes parked connection `id` for `reason` (its client closed, or sent what ends it)
/// without giving it a task: with nothing queued, the close frame is one non-blocking
/// send on a socket whose buffer is empty. With frames queued (events the last read
/// answered), a task writes them and says goodbye.
fn close_parked(shard: &Rc<Shard>, id: ConnId, fd: RawFd, rd: Reader, reason: CloseReason) {
    {
        let mut st = shard.state.borrow_mut();
        let Some(c) = st.conns.get_mut(id).filter(|c| c.parked) else { return };
        if !c.outbox.is_empty() {
            drop(st);
            return resume(shard, id, fd, rd, Some(reason));
        }
        c.parked = false;
        c.fd = None;
        let now = shard.shared.now();
        crate::session::retire(&mut st, id, reason, now);
    }
    unwatch(shard, fd);
    if reason != CloseReason::TransportError {
        let bye = ws::close_frame(close_code_for(reason), reason.as_str());
        // SAFETY: send(2) of our buffer on the parked connection's open descriptor.
        unsafe { libc::send(fd, bye.as_ptr().cast(), bye.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    }
    // SAFETY: the parked entry owned the descriptor; the entry is gone, so is this.
    unsafe { libc::close(fd) };
}

/// Gives parked connection `id` (descriptor `fd`, reader state `rd`) a task again; with
/// `reason`, a task that only says goodbye.
fn resume(shard: &Rc<Shard>, id: ConnId, fd: RawFd, rd: Reader, reason: Option<CloseReason>) {
    {
        let mut st = shard.state.borrow_mut();
        let Some(c) = st.conns.get_mut(id).filter(|c| c.parked) else { return };
        c.parked = false;
        c.blocked = false;
        // A fresh task is not asked to park before a whole tick passed.
        c.heard = true;
    }
    unwatch(shard, fd);
    shard.metrics().inc(Counter::Resumes);
    // SAFETY: the parked connection's descriptor, owned by its entry until now.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let io = Box::new(ConnIo { stream, rd });
    match reason {
        None => spawn(shard.clone(), io),
        Some(r) => {
            glommio::spawn_local(goodbye(shard.clone(), io, r)).detach();
        }
    }
}

/// Takes `fd`, parked no more, out of the shard's epoll set.
fn unwatch(shard: &Shard, fd: RawFd) {
    if let Some(p) = &shard.parking {
        p.forget(fd);
    }
    shard.metrics().dec(Counter::Parked);
}

/// Closes the descriptors of connections still parked when the shard stops.
pub(crate) fn release_parked(shard: &Shard) {
    let mut st = shard.state.borrow_mut();
    for (_, c) in st.conns.iter_mut() {
        if std::mem::take(&mut c.parked) {
            if let Some(fd) = c.fd.take() {
                // SAFETY: a parked entry owns its descriptor; closed once, then forgotten.
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// Decodes every complete frame in `data` (plus any earlier partial frame).
fn process(shard: &Shard, rd: &mut Reader, data: &mut [u8]) -> Result<(), CloseReason> {
    let max = shard.shared.config.max_payload;
    if rd.rbuf.is_empty() {
        let used = decode_all(shard, rd, data, max)?;
        if used < data.len() {
            rd.rbuf.extend_from_slice(&data[used..]);
        }
    } else {
        let mut buf = std::mem::take(&mut rd.rbuf);
        buf.extend_from_slice(data);
        let used = decode_all(shard, rd, &mut buf, max)?;
        buf.drain(..used);
        if buf.is_empty() && buf.capacity() > RBUF_KEEP {
            buf = Vec::new();
        }
        rd.rbuf = buf;
    }
    Ok(())
}

fn decode_all(shard: &Shard, rd: &mut Reader, buf: &mut [u8], max: usize) -> Result<usize, CloseReason> {
    let mut pos = 0;
    while let Some((frame, used)) =
        ws::decode_frame(&mut buf[pos..], max + FRAME_SLACK, Role::Server).map_err(ws_reason)?
    {
        let payload = &buf[pos + frame.payload.start..pos + frame.payload.end];
        match frame.op {
            OpKind::Ping => {
                let mut pong = Vec::with_capacity(payload.len() + 2);
                ws::encode_frame(OpKind::Pong, payload, &mut pong);
                shard.state.borrow_mut().push(rd.id, &pong.into());
            }
            OpKind::Pong => {}
            OpKind::Close => return Err(CloseReason::ClientClosed),
            op => {
                let msg = rd.assembler.push(op, frame.fin, payload, max + FRAME_SLACK).map_err(ws_reason)?;
                if let Some((kind, bytes)) = msg {
                    on_message(shard, rd, kind, &bytes)?;
                }
            }
        }
        pos += used;
    }
    Ok(pos)
}

fn ws_reason(e: WsError) -> CloseReason {
    match e {
        WsError::TooBig { .. } => CloseReason::PayloadTooLarge,
        WsError::Protocol(_) => CloseReason::ProtocolError,
    }
}

/// One whole WebSocket message: an Engine.IO packet (text) or a binary attachment.
fn on_message(shard: &Shard, rd: &mut Reader, kind: DataKind, bytes: &[u8]) -> Result<(), CloseReason> {
    let now = shard.shared.now();
    let mut st = shard.state.borrow_mut();
    if kind == DataKind::Binary {
        return crate::inbound::on_binary(&mut st, rd.id, &mut rd.inbound, bytes, now);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| CloseReason::MalformedPacket)?;
    crate::inbound::on_text(&mut st, rd.id, &mut rd.inbound, text, shard.shared.config.max_payload, now)
}

fn close_code_for(r: CloseReason) -> u16 {
    match r {
        CloseReason::ClientClosed | CloseReason::ClientDisconnect => close_code::NORMAL,
        CloseReason::ServerShutdown => close_code::GOING_AWAY,
        CloseReason::ProtocolError => close_code::PROTOCOL,
        CloseReason::MalformedPacket => close_code::INVALID_PAYLOAD,
        CloseReason::PayloadTooLarge => close_code::TOO_BIG,
        _ => close_code::POLICY,
    }
}

/// Removes the connection from the shard, then says goodbye on the socket.
async fn finish(shard: &Shard, io: &mut ConnIo, reason: CloseReason) {
    let now = shard.shared.now();
    let leftover = {
        let mut st = shard.state.borrow_mut();
        let mut leftover = Vec::new();
        if let Some(mut e) = crate::session::retire(&mut st, io.rd.id, reason, now) {
            if !e.close_now {
                for f in e.outbox.drain(..) {
                    leftover.extend_from_slice(&f[e.head_off.min(f.len())..]);
                    e.head_off = 0;
                }
            }
        }
        leftover
    };
    if reason == CloseReason::TransportError {
        return;
    }
    let mut bye = leftover;
    bye.extend_from_slice(&ws::close_frame(close_code_for(reason), reason.as_str()));
    let _ = stream_close(&mut io.stream, &bye).await;
}

async fn stream_close(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    wire::write_all(stream, bytes).await?;
    stream.close().await
}

/// What a running connection holds: its task's future and its boxed state (for the size
/// test in `conn.rs`).
#[cfg(test)]
pub(crate) fn running_size(shard: Rc<Shard>, io: Box<ConnIo>) -> usize {
    std::mem::size_of_val(&task(shard, io)) + std::mem::size_of::<ConnIo>()
}
