//! Socket I/O with deadlines for the HTTP side of a connection: request heads (plain
//! requests, upgrades, long-polling), request bodies and one-shot writes. Reads go
//! through the shard's scratch buffer, so a connection waiting for its next request holds
//! no buffer of its own.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use shardgate_io::http::{self, Request};

use crate::local::Shard;
use crate::metrics::Counter;

/// Longest a single write of a response, handshake answer or goodbye may block.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no request head was read.
pub(crate) enum HeadError {
    /// The peer closed (or reset) the connection first.
    Closed,
    /// The head did not arrive before the deadline.
    Timeout,
    /// The head is malformed or too large: answer this and close.
    Bad(Vec<u8>),
}

/// Writes all of `bytes`, giving up after [`WRITE_TIMEOUT`].
pub(crate) async fn write_all(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let r = stream.write_all(bytes).await;
    let _ = stream.set_write_timeout(None);
    r
}

/// Appends what the socket has to `buf` (through the shard's scratch buffer), waiting at
/// most `left`. `Ok(0)` is end of stream.
pub(crate) async fn read_some(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    left: Duration,
) -> std::io::Result<usize> {
    let _ = stream.set_read_timeout(Some(left));
    let r = poll_fn(|cx| {
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(n)) => {
                buf.extend_from_slice(&scratch[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    })
    .await;
    let _ = stream.set_read_timeout(None);
    if let Ok(n) = r {
        shard.metrics().add(Counter::BytesIn, n as u64);
    }
    r
}

/// Reads until `buf` starts with a complete request head (bytes already in `buf`, from a
/// previous request on the connection or a shard that handed it over, count). Returns
/// the request and the length of its head; what follows stays in `buf`.
pub(crate) async fn read_head(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<(Request, usize), HeadError> {
    let deadline = Instant::now() + timeout;
    loop {
        if !buf.is_empty() {
            match http::parse_request(buf) {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => {}
                Err(http::HttpError::TooLarge) => {
                    return Err(HeadError::Bad(http::response(431, "text/plain", "request head too large\n")))
                }
                Err(e) => return Err(HeadError::Bad(http::response(400, "text/plain", &format!("{e}\n")))),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::Timeout);
        }
        match read_some(shard, stream, buf, left).await {
            Ok(0) => return Err(HeadError::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(HeadError::Timeout),
            Err(_) => return Err(HeadError::Closed),
        }
    }
}

/// Reads until `buf` holds at least `len` bytes, within `timeout`. False if the peer
/// closed or was too slow.
pub(crate) async fn read_to(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    len: usize,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    while buf.len() < len {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match read_some(shard, stream, buf, left).await {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
    }
    true
}
