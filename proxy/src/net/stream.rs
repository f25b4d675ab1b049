//! One type for every connection spillway holds, plain or TLS, client or upstream, so
//! the session code is written once.
//!
//! All variants are `Unpin`, which is why the poll methods can use `Pin::new` without
//! any unsafe projection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Plain(TcpStream),
    /// TLS toward a client (spillway is the server).
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS toward PostgreSQL (spillway is the client).
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// The socket was handed to a TLS handshake that did not complete, or dropped
    /// when its session detached from PostgreSQL; nothing can be read or written any
    /// more.
    Detached,
}

impl Stream {
    /// After a read returned less than it asked for, the socket is drained: tells the
    /// runtime so without the `recv` that would return EAGAIN. Safe against lost
    /// wakeups on the current-thread runtimes sessions run on: the I/O driver does not
    /// run while this task does, so data that arrived after the `recv` is still an
    /// undelivered edge-triggered event in epoll and sets readiness again.
    pub fn note_drained(&self) {
        if let Stream::Plain(tcp) = self {
            let _ = tcp.try_io(tokio::io::Interest::READABLE, || {
                Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
            });
        }
    }
}

impl Stream {
    /// Whether nothing can have arrived since the last read: a plain socket whose
    /// readiness the runtime has not seen set (no read attempted, no buffer touched).
    /// `false` means "maybe": TLS may hold decrypted bytes, so it always says so.
    pub fn surely_quiet(&self, cx: &mut Context<'_>) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.poll_read_ready(cx).is_pending(),
            _ => false,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Detached => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Detached => Poll::Ready(Ok(())),
        }
    }
}

fn detached() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection gone (lost in a TLS handshake, or dropped by a detached session)",
    )
}
