//! A connection with its read buffer, and the sequential helpers the startup phase
//! uses. (The steady-state relay polls the stream directly instead.)

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::SessionError;
use crate::net::stream::Stream;
use crate::protocol::frame;

/// Initial read-buffer capacity; buffers grow to the largest message seen.
pub const READ_CHUNK: usize = 16 * 1024;

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
