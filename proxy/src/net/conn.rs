//! A connection with its read buffer: the sequential helpers the startup phase uses,
//! and the polled ones of the relay's loop (one read, as much of a write as the socket
//! takes now).
//!
//! Invariant: a buffer that grew for one large message is replaced by a small one
//! once it is empty ([`shrink_if_idle`]), so a session does not keep a peak-sized
//! allocation for its whole life.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use crate::error::SessionError;
use crate::net::stream::Stream;
use crate::protocol::frame;

/// Initial read-buffer capacity; buffers grow to the largest message seen.
pub const READ_CHUNK: usize = 16 * 1024;
/// A buffer that grew past this for one large message is replaced once it is empty.
const SHRINK_ABOVE: usize = 1024 * 1024;

pub struct Conn {
    pub stream: Stream,
    pub inbuf: BytesMut,
}

impl Conn {
    pub fn new(stream: Stream) -> Self {
        Self {
            stream,
            inbuf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Reads at least one more byte; `Ok(false)` on a clean EOF.
    pub async fn fill(&mut self) -> std::io::Result<bool> {
        self.inbuf.reserve(READ_CHUNK);
        Ok(self.stream.read_buf(&mut self.inbuf).await? > 0)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// One read into the buffer, if the socket has bytes: `Ok(true)` with data,
    /// `Ok(false)` on EOF.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        self.inbuf.reserve(READ_CHUNK);
        let room = self.inbuf.capacity() - self.inbuf.len();
        match poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.inbuf) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(false)),
            Poll::Ready(Ok(n)) => {
                // A short read took everything there was: skip the EAGAIN round trip.
                if n < room {
                    self.stream.note_drained();
                }
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Replaces an empty buffer that grew for one large message with a small one.
pub fn shrink_if_idle(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > SHRINK_ABOVE {
        *buf = BytesMut::with_capacity(READ_CHUNK);
    }
}

/// Writes all of `buf` and flushes (closing words).
pub async fn write_out(stream: &mut Stream, buf: &mut BytesMut) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    stream.write_all(buf).await?;
    buf.clear();
    stream.flush().await
}

/// Writes as much of `buf` as the socket takes now. `Pending` is not an error: the
/// waker is registered and the rest goes out on a later poll.
pub fn poll_drain(stream: &mut Stream, buf: &mut BytesMut, cx: &mut Context<'_>) -> io::Result<()> {
    while !buf.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => buf.advance(n),
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(()),
        }
    }
    shrink_if_idle(buf);
    // TLS keeps written plaintext in its session until flushed; TCP's flush is a no-op.
    match Pin::new(stream).poll_flush(cx) {
        Poll::Ready(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Reads one whole regular message from upstream.
pub async fn read_upstream_frame(conn: &mut Conn) -> Result<(u8, Bytes), SessionError> {
    loop {
        if let Some(msg) =
            frame::parse(&mut conn.inbuf, usize::MAX).map_err(SessionError::UpstreamMalformed)?
        {
            return Ok((msg[0], msg.freeze()));
        }
        if !conn.fill().await.map_err(SessionError::UpstreamIo)? {
            return Err(SessionError::UpstreamClosed);
        }
    }
}

/// Reads one whole regular message from the client, enforcing `limit`.
pub async fn read_client_frame(conn: &mut Conn, limit: usize) -> Result<Bytes, SessionError> {
    loop {
        if let Some(msg) = frame::parse(&mut conn.inbuf, limit)? {
            return Ok(msg.freeze());
        }
        if !conn.fill().await.map_err(SessionError::ClientIo)? {
            return Err(SessionError::ClientIo(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
    }
}
