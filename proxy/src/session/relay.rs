//! The steady-state event loop of a session: moves messages between client and
//! upstream in both directions at once, without ever blocking one direction on the
//! other.
//!
//! Why one hand-polled loop instead of two copy tasks: the handler needs to see both
//! directions in order (a cache fill pairs a request with its answer), and why not a
//! plain `write_all` in the loop: a blocked write to PostgreSQL while PostgreSQL is
//! blocked writing to us would deadlock a pipelining client that direct PostgreSQL
//! serves fine. Here every read and write is polled in one `poll_io`, so whichever side
//! can make progress does.
//!
//! Memory bound per session: output toward each side is capped by [`WINDOW`] (a side
//! is not read while the other side's output is over it); a client message is buffered
//! whole up to `server.max_message_bytes`; a backend message of [`STREAM_THRESHOLD`]
//! bytes or more that spillway does not need to inspect is streamed through as it
//! arrives instead of being buffered whole.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use super::End;
use super::conn::{Conn, READ_CHUNK};
use super::signal::{Phase, Subscription};
use super::state::ProtocolState;
use crate::error::SessionError;
use crate::protocol::backend;
use crate::protocol::frame::peek_header;
use crate::stream::Stream;

/// Output buffered toward one side before spillway stops reading from the other.
pub const WINDOW: usize = 256 * 1024;
/// Backend messages at least this large are streamed, not buffered whole.
pub const STREAM_THRESHOLD: usize = 256 * 1024;
/// How long closing words (a final error, a Terminate) may take to deliver.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

const TERMINATE: &[u8] = b"X\0\0\0\x04";

pub struct Relay {
    client: Conn,
    upstream: Conn,
    to_client: BytesMut,
    to_upstream: BytesMut,
    state: ProtocolState,
    max_message: usize,
    /// Bytes of a large backend message still to pass through unframed.
    streaming: usize,
}

enum Step {
    Io(Result<Progress, SessionError>),
    Terminate,
}

#[derive(Default)]
struct Progress {
    client: Option<Read>,
    upstream: Option<Read>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    Data,
    Eof,
}

impl Relay {
    pub fn new(client: Conn, upstream: Conn, state: ProtocolState, max_message: usize) -> Self {
        Self {
            client,
            upstream,
            to_client: BytesMut::with_capacity(READ_CHUNK),
            to_upstream: BytesMut::with_capacity(READ_CHUNK),
            state,
            max_message,
            streaming: 0,
        }
    }

    pub async fn run(&mut self, shutdown: &Subscription) -> Result<End, SessionError> {
        // Bytes the client pipelined behind its authentication answer.
        if !self.client.inbuf.is_empty()
            && let Err(err) = self.on_client_data()
        {
            return self.close_with(err).await;
        }
        loop {
            let step = poll_fn(|cx| match shutdown.poll_phase(cx) {
                Phase::Terminating => Poll::Ready(Step::Terminate),
                // Answers still queued for the client go out before the 57P01
                // (close_with appends after them), so idle is the only condition.
                Phase::Draining if self.state.is_idle() => Poll::Ready(Step::Terminate),
                _ => self.poll_io(cx).map(Step::Io),
            })
            .await;
            let progress = match step {
                Step::Terminate => return self.close_with(SessionError::Shutdown).await,
                Step::Io(Ok(p)) => p,
                Step::Io(Err(err)) => return self.close_with(err).await,
            };
            match progress.upstream {
                Some(Read::Data) => {
                    if let Err(err) = self.on_upstream_data() {
                        return self.close_with(err).await;
                    }
                }
                Some(Read::Eof) => return self.upstream_closed().await,
                None => {}
            }
            match progress.client {
                Some(Read::Data) => {
                    if let Err(err) = self.on_client_data() {
                        return self.close_with(err).await;
                    }
                    if self.state.client_terminated {
                        self.flush_for_close().await;
                        return Ok(End::ClientClosed);
                    }
                }
                Some(Read::Eof) => return self.client_closed().await,
                None => {}
            }
        }
    }

    /// Writes what can be written, then reads from whichever side may be read.
    /// Ready once at least one read produced bytes or EOF.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Result<Progress, SessionError>> {
        if let Err(e) = poll_drain(&mut self.upstream.stream, &mut self.to_upstream, cx) {
            return Poll::Ready(Err(SessionError::UpstreamIo(e)));
        }
        if let Err(e) = poll_drain(&mut self.client.stream, &mut self.to_client, cx) {
            return Poll::Ready(Err(SessionError::ClientIo(e)));
        }
        let mut progress = Progress::default();
        if self.to_upstream.len() < WINDOW {
            match poll_read(&mut self.client, cx) {
                Poll::Ready(Ok(r)) => progress.client = Some(r),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionError::ClientIo(e))),
                Poll::Pending => {}
            }
        }
        if self.to_client.len() < WINDOW {
            match poll_read(&mut self.upstream, cx) {
                Poll::Ready(Ok(r)) => progress.upstream = Some(r),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionError::UpstreamIo(e))),
                Poll::Pending => {}
            }
        }
        if progress.client.is_some() || progress.upstream.is_some() {
            Poll::Ready(Ok(progress))
        } else {
            Poll::Pending
        }
    }

    /// Frames complete client messages and hands each to the handler.
    fn on_client_data(&mut self) -> Result<(), SessionError> {
        while let Some(h) = peek_header(&self.client.inbuf, self.max_message)? {
            if self.client.inbuf.len() < h.total_len {
                self.client
                    .inbuf
                    .reserve(h.total_len - self.client.inbuf.len());
                break;
            }
            self.on_frontend(h.tag, h.total_len);
            self.client.inbuf.advance(h.total_len);
            if self.state.client_terminated {
                break;
            }
        }
        Ok(())
    }

    /// The handler seam for frontend messages: the whole message is the first `len`
    /// bytes of the client buffer. Today every message goes upstream untouched; the
    /// cache and write policies decide here.
    fn on_frontend(&mut self, tag: u8, len: usize) {
        self.state.on_frontend(tag);
        self.to_upstream
            .extend_from_slice(&self.client.inbuf[..len]);
    }

    /// Frames backend messages toward the client, streaming large ones.
    fn on_upstream_data(&mut self) -> Result<(), SessionError> {
        let inbuf = &mut self.upstream.inbuf;
        loop {
            if self.streaming > 0 {
                let n = self.streaming.min(inbuf.len());
                self.to_client.extend_from_slice(&inbuf[..n]);
                inbuf.advance(n);
                self.streaming -= n;
                if self.streaming > 0 {
                    return Ok(());
                }
                continue;
            }
            let Some(h) = peek_header(inbuf, usize::MAX)? else {
                return Ok(());
            };
            if inbuf.len() < h.total_len {
                if h.total_len >= STREAM_THRESHOLD && is_streamable(h.tag) {
                    self.streaming = h.total_len;
                    continue;
                }
                inbuf.reserve(h.total_len - inbuf.len());
                return Ok(());
            }
            let msg = &inbuf[..h.total_len];
            self.state.on_backend(h.tag, &msg[5..]);
            self.to_client.extend_from_slice(msg);
            inbuf.advance(h.total_len);
        }
    }

    async fn upstream_closed(&mut self) -> Result<End, SessionError> {
        if self.state.upstream_fatal {
            // PostgreSQL said why it is closing; that error is already queued.
            self.flush_for_close().await;
            Ok(End::UpstreamFatal)
        } else {
            self.close_with(SessionError::UpstreamClosed).await
        }
    }

    async fn client_closed(&mut self) -> Result<End, SessionError> {
        let cut_short = !self.client.inbuf.is_empty() || !self.state.is_idle();
        self.to_upstream.clear();
        self.to_upstream.extend_from_slice(TERMINATE);
        self.flush_for_close().await;
        if cut_short {
            Err(SessionError::ClientIo(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client disconnected in the middle of a request or transaction",
            )))
        } else {
            Ok(End::ClientClosed)
        }
    }

    /// Ends the session because of `err`: queues the client-facing error (if the
    /// client can still take one), tells PostgreSQL goodbye, flushes briefly.
    async fn close_with(&mut self, err: SessionError) -> Result<End, SessionError> {
        let client_broken = matches!(err, SessionError::ClientIo(_));
        let upstream_broken = matches!(
            err,
            SessionError::UpstreamIo(_) | SessionError::UpstreamClosed
        );
        if client_broken {
            self.to_client.clear();
        } else if let Some(msg) = err.to_client() {
            // Whatever else was queued is delivered first; a streamed message cut short
            // cannot be completed, so it is dropped rather than followed by garbage.
            if self.streaming > 0 {
                self.to_client.clear();
            }
            self.to_client.extend_from_slice(&msg);
        }
        if upstream_broken {
            self.to_upstream.clear();
        } else {
            self.to_upstream.extend_from_slice(TERMINATE);
        }
        self.flush_for_close().await;
        Err(err)
    }

    async fn flush_for_close(&mut self) {
        let flush = async {
            if !self.to_upstream.is_empty() {
                let _ = write_out(&mut self.upstream.stream, &mut self.to_upstream).await;
            }
            if !self.to_client.is_empty() {
                let _ = write_out(&mut self.client.stream, &mut self.to_client).await;
            }
            let _ = self.client.stream.shutdown().await;
            let _ = self.upstream.stream.shutdown().await;
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, flush).await;
    }
}

fn is_streamable(tag: u8) -> bool {
    !matches!(
        tag,
        backend::ERROR_RESPONSE | backend::READY_FOR_QUERY | backend::PARAMETER_STATUS
    )
}

async fn write_out(stream: &mut Stream, buf: &mut BytesMut) -> io::Result<()> {
    stream.write_all(buf).await?;
    buf.clear();
    stream.flush().await
}

fn poll_read(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<Read>> {
    conn.inbuf.reserve(READ_CHUNK);
    match poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.inbuf) {
        Poll::Ready(Ok(0)) => Poll::Ready(Ok(Read::Eof)),
        Poll::Ready(Ok(_)) => Poll::Ready(Ok(Read::Data)),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// Writes as much of `buf` as the socket takes now. `Pending` is not an error: the
/// waker is registered and the rest goes out on a later poll.
fn poll_drain(stream: &mut Stream, buf: &mut BytesMut, cx: &mut Context<'_>) -> io::Result<()> {
    while !buf.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => buf.advance(n),
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(()),
        }
    }
    // TLS keeps written plaintext in its session until flushed; TCP's flush is a no-op.
    match Pin::new(stream).poll_flush(cx) {
        Poll::Ready(Err(e)) => Err(e),
        _ => Ok(()),
    }
}
