//! One Redis connection over a glommio (io_uring) socket, speaking RESP2 through the
//! `shardgate-io` codec: connect with AUTH and SELECT, pipelined batches, and single
//! replies or pub/sub pushes read one at a time.

use std::net::ToSocketAddrs;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use shardgate_io::resp::{self, Reply};

use crate::config::RedisUrl;

/// A connected Redis socket with its read buffer.
pub struct RedisConn {
    stream: TcpStream,
    rbuf: Vec<u8>,
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl RedisConn {
    /// Connects (bounded by `timeout`), authenticates and selects the database.
    pub async fn connect(url: &RedisUrl, timeout: Duration) -> std::io::Result<RedisConn> {
        let addr = (url.host.as_str(), url.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| other(format!("cannot resolve {}", url.host)))?;
        let stream = glommio::timer::timeout(timeout, async { TcpStream::connect(addr).await })
            .await
            .map_err(|e| other(format!("connect {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let mut conn = RedisConn { stream, rbuf: Vec::with_capacity(16 * 1024) };
        if let Some(pass) = &url.password {
            let reply = match &url.username {
                Some(user) => conn.call(&["AUTH", user, pass]).await?,
                None => conn.call(&["AUTH", pass]).await?,
            };
            if let Reply::Error(e) = reply {
                return Err(other(format!("AUTH refused: {e}")));
            }
        }
        if url.db != 0 {
            if let Reply::Error(e) = conn.call(&["SELECT", &url.db.to_string()]).await? {
                return Err(other(format!("SELECT {} refused: {e}", url.db)));
            }
        }
        Ok(conn)
    }

    /// Sends one command and reads its reply.
    pub async fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> std::io::Result<Reply> {
        let mut out = Vec::new();
        resp::encode_command(args, &mut out);
        self.stream.write_all(&out).await?;
        self.read_reply().await
    }

    /// Writes `batch` (already encoded commands).
    pub async fn write(&mut self, batch: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(batch).await
    }

    /// Every reply the kernel already holds for this socket, without waiting. Reads with
    /// a plain non-blocking `recv`, because glommio only retries a receive after its
    /// readiness poll completed, and the caller needs what has *already* arrived (the
    /// bridge's barrier: apply every pub/sub push received before routing).
    pub fn take_ready(&mut self, out: &mut Vec<Reply>) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.stream.as_raw_fd();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            // SAFETY: recv into a live local buffer of the given length.
            let n = unsafe { libc::recv(fd, chunk.as_mut_ptr().cast(), chunk.len(), libc::MSG_DONTWAIT) };
            match n {
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "redis closed the connection",
                    ))
                }
                n if n > 0 => self.rbuf.extend_from_slice(&chunk[..n as usize]),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        break;
                    }
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        while let Some((reply, used)) = resp::decode_reply(&self.rbuf).map_err(other)? {
            self.rbuf.drain(..used);
            out.push(reply);
        }
        Ok(())
    }

    /// A reply already received, if any, without waiting: `Pending` registers the task
    /// for the socket's readiness.
    pub fn poll_reply(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<Reply>> {
        use std::task::Poll;
        loop {
            match resp::decode_reply(&self.rbuf) {
                Ok(Some((reply, used))) => {
                    self.rbuf.drain(..used);
                    return Poll::Ready(Ok(reply));
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(other(e))),
            }
            let mut chunk = [0u8; 16 * 1024];
            match std::pin::Pin::new(&mut self.stream).poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(0)) => {
                    let eof =
                        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "redis closed the connection");
                    return Poll::Ready(Err(eof));
                }
                Poll::Ready(Ok(n)) => self.rbuf.extend_from_slice(&chunk[..n]),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Reads the next reply or push.
    pub async fn read_reply(&mut self) -> std::io::Result<Reply> {
        loop {
            if let Some((reply, used)) = resp::decode_reply(&self.rbuf).map_err(other)? {
                self.rbuf.drain(..used);
                return Ok(reply);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "redis closed the connection",
                ));
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}
