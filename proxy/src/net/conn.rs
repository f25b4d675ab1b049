//! A connection with its read buffer: the sequential helpers the startup phase uses,
//! and the polled ones of the relay's loop (one read, as much of a write as the socket
//! takes now).
//!
//! Invariants:
//! - A buffer that grew for one large message is replaced by a small one once it is
//!   empty ([`shrink_if_idle`]), so a session does not keep a peak-sized allocation
//!   for its whole life.
//! - [`ReadWake`] skips a read only when the connection it last polled is the same
//!   one (its [`Conn::id`]), that read answered Pending through the `ReadWake`'s own
//!   waker, and that waker has not fired since: the runtime then holds that waker for
//!   the socket's next readiness, so nothing can have arrived unseen.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

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

/// Connections made so far in the process: each [`Conn`]'s id is unique.
static CONNS: AtomicU64 = AtomicU64::new(1);

pub struct Conn {
    pub stream: Stream,
    pub inbuf: BytesMut,
    /// Unique in the process (never 0), for [`ReadWake`].
    id: u64,
}

impl Conn {
    pub fn new(stream: Stream) -> Self {
        Self {
            stream,
            inbuf: BytesMut::with_capacity(READ_CHUNK),
            id: CONNS.fetch_add(1, Ordering::Relaxed),
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

/// One side of a relay's reads, polled with a waker of its own: a task woken by the
/// other side does not pay a read of this one that can only answer Pending (a cache
/// hit's session mode: the server connection is not read at all). See the module's
/// invariant.
pub struct ReadWake {
    flag: Arc<WakeFlag>,
    waker: Waker,
    /// The connection last polled here (0: none yet).
    conn: u64,
}

/// Set when the runtime wakes [`ReadWake`]'s waker; the task that polls is woken too.
#[derive(Default)]
struct WakeFlag {
    readable: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.readable.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for ReadWake {
    fn default() -> Self {
        let flag = Arc::new(WakeFlag::default());
        Self {
            waker: Waker::from(flag.clone()),
            flag,
            conn: 0,
        }
    }
}

impl ReadWake {
    /// [`Conn::poll_fill`] of `conn`, unless nothing can have arrived since it last
    /// answered Pending here (then Pending at once). `cx`'s task is woken when the
    /// connection becomes readable.
    pub fn poll_fill(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let maybe_readable = self.flag.readable.swap(false, Ordering::AcqRel);
        if conn.id == self.conn && !maybe_readable {
            return self.pending(cx);
        }
        self.conn = conn.id;
        match conn.poll_fill(&mut Context::from_waker(&self.waker)) {
            Poll::Pending => self.pending(cx),
            ready => {
                // More may be there: the next call reads again.
                self.flag.readable.store(true, Ordering::Release);
                ready
            }
        }
    }

    /// Pending, with `cx`'s task to be woken by the flag's waker; a wake that came
    /// before the task was registered there wakes it now.
    fn pending(&self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        self.flag.task.register(cx.waker());
        if self.flag.readable.load(Ordering::Acquire) {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
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

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::{Conn, ReadWake};
    use crate::net::stream::Stream;

    /// A connection spillway reads, and the peer that writes to it.
    async fn pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (ours, _) = listener.accept().await.expect("accept");
        (Conn::new(Stream::Plain(ours)), peer)
    }

    async fn read(reads: &mut ReadWake, conn: &mut Conn) -> bool {
        tokio::time::timeout(
            Duration::from_secs(5),
            poll_fn(|cx| reads.poll_fill(conn, cx)),
        )
        .await
        .expect("woken when bytes arrive")
        .expect("read")
    }

    #[tokio::test]
    async fn a_read_skipped_for_its_own_waker_is_woken_by_the_next_bytes() {
        let (mut conn, mut peer) = pair().await;
        let mut reads = ReadWake::default();
        for round in 0..3u8 {
            // Pending first (nothing sent), then the bytes wake the waiting task.
            let writer = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                peer.write_all(&[round]).await.expect("write");
            };
            let (got, ()) = tokio::join!(read(&mut reads, &mut conn), writer);
            assert!(got, "data, not EOF");
            assert_eq!(conn.inbuf.split().as_ref(), &[round]);
        }
        drop(peer);
        assert!(!read(&mut reads, &mut conn).await, "EOF is seen too");
    }

    #[tokio::test]
    async fn another_connection_is_read_even_when_the_last_one_answered_pending() {
        let (mut first, _first_peer) = pair().await;
        let (mut second, mut second_peer) = pair().await;
        let mut reads = ReadWake::default();
        // The first answers Pending: the flag is down, its waker registered there.
        let pending = poll_fn(|cx| std::task::Poll::Ready(reads.poll_fill(&mut first, cx))).await;
        assert!(pending.is_pending());
        // Bytes already waiting on the second are read, not skipped.
        second_peer.write_all(b"x").await.expect("write");
        assert!(read(&mut reads, &mut second).await);
        assert_eq!(second.inbuf.as_ref(), b"x");
    }
}
