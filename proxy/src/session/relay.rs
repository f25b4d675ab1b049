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
//!
//! Detached sessions: when the upstream connection ends (PostgreSQL's FATAL 57P01,
//! 57P02, 57P03 or class 08, an EOF, an I/O error) while nothing is outstanding
//! there — no request sent and unanswered, no transaction, no COPY; messages the
//! handler holds or a deferred write awaiting its ack never went upstream — it is not
//! ended: the FATAL is swallowed (logged once), the upstream socket is dropped, and the
//! handler answers what needs no upstream (`handler/detached.rs`). The first
//! message that needs PostgreSQL ends the session with FATAL 08006 after the answers
//! already queued. With a request outstanding, the upstream's end is relayed as ever.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use super::handler::{Delivery, Disposition, Handler, Out};
use super::state::ProtocolState;
use super::{End, GaugeGuard};
use crate::error::SessionError;
use crate::net::cancel::CancelRegistry;
use crate::net::conn::{Conn, READ_CHUNK};
use crate::net::signal::{Phase, Subscription};
use crate::net::stream::Stream;
use crate::net::upstream::Canceller;
use crate::protocol::backend;
use crate::protocol::frame::{Header, peek_header};

/// Output buffered toward one side before spillway stops reading from the other.
pub const WINDOW: usize = 256 * 1024;
/// Backend messages at least this large are streamed, not buffered whole.
pub const STREAM_THRESHOLD: usize = 256 * 1024;
/// PostgreSQL never sends a message over 1 GiB; anything longer is a broken upstream.
const MAX_BACKEND_MESSAGE: usize = 0x4000_0000;
/// A buffer that grew past this for one large message is replaced once it is empty,
/// so a session does not keep a peak-sized allocation for its whole life.
const SHRINK_ABOVE: usize = 4 * WINDOW;
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
    /// Stops a running query whose client is gone (disconnect, shutdown).
    canceller: Option<Canceller>,
    /// Decides where each frontend message goes (cache or upstream).
    handler: Handler,
    /// What changes when the session detaches.
    attachment: Attachment,
    /// Set once the session is detached: how its upstream connection ended.
    detached: Option<String>,
}

/// The session's ties to its upstream connection that outlive the socket.
pub struct Attachment {
    /// The registry holding the session's client-facing cancel key, and the key's pid
    /// and entry: the key is marked detached with the session.
    pub cancel: Arc<CancelRegistry>,
    pub client_pid: i32,
    pub cancel_id: crate::net::cancel::EntryId,
    /// `spillway_upstream_connections` while attached, `spillway_detached_sessions`
    /// once detached.
    pub gauge: GaugeGuard,
}

enum Step {
    Io(Result<Progress, SessionError>),
    Terminate,
}

#[derive(Default)]
struct Progress {
    client: Option<Read>,
    upstream: Option<Read>,
    /// The handler may take the message it held back.
    unblocked: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    Data,
    Eof,
}

impl Relay {
    pub fn new(
        client: Conn,
        upstream: Conn,
        state: ProtocolState,
        max_message: usize,
        canceller: Option<Canceller>,
        handler: Handler,
        attachment: Attachment,
    ) -> Self {
        Self {
            client,
            upstream,
            to_client: BytesMut::with_capacity(READ_CHUNK),
            to_upstream: BytesMut::with_capacity(READ_CHUNK),
            state,
            max_message,
            streaming: 0,
            canceller,
            handler,
            attachment,
            detached: None,
        }
    }

    pub async fn run(&mut self, shutdown: &Subscription) -> Result<End, SessionError> {
        // Bytes that arrived in the same reads as the end of startup: upstream's (a
        // notice or FATAL right behind ReadyForQuery) and the client's (requests
        // pipelined behind its authentication answer, possibly a Terminate).
        if !self.upstream.inbuf.is_empty()
            && let Err(err) = self.on_upstream_data()
        {
            return self.close_with(err).await;
        }
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
                Step::Io(Err(SessionError::UpstreamIo(e))) if self.can_detach() => {
                    self.detach(format!("upstream connection lost: {e}"));
                    // The same poll may have read client bytes before the upstream
                    // failed; they would otherwise wait for the client's next bytes.
                    let unread = !self.client.inbuf.is_empty() && !self.handler.is_blocked();
                    Progress {
                        client: unread.then_some(Read::Data),
                        ..Progress::default()
                    }
                }
                Step::Io(Err(err)) => return self.close_with(err).await,
            };
            match progress.upstream {
                Some(Read::Data) => {
                    if let Err(err) = self.on_upstream_data() {
                        return self.close_with(err).await;
                    }
                }
                Some(Read::Eof) if self.can_detach() => {
                    self.detach("PostgreSQL closed the connection".to_owned());
                }
                Some(Read::Eof) => return self.upstream_closed().await,
                None => {}
            }
            if progress.unblocked
                && let Err(err) = self.on_client_data()
            {
                return self.close_with(err).await;
            }
            match progress.client {
                Some(Read::Data) => {
                    if let Err(err) = self.on_client_data() {
                        return self.close_with(err).await;
                    }
                }
                Some(Read::Eof) => return self.client_closed().await,
                None => {}
            }
            if self.detached.is_some() && self.state.client_terminated {
                // Nobody upstream to wait for: the Terminate ends the session now.
                self.to_upstream.clear();
                self.flush_for_close().await;
                return Ok(End::ClientClosed);
            }
        }
    }

    /// The upstream connection may end without ending the session: nothing is owed
    /// from upstream, no transaction is open, nothing is streaming, and the handler
    /// sent nothing upstream that awaits an answer (an extended cycle it still holds,
    /// or a deferred write waiting for its journal ack, never went there).
    fn can_detach(&self) -> bool {
        self.detached.is_none()
            && !self.state.upstream_fatal
            && self.streaming == 0
            && idle_upstream(&self.state, &self.handler)
    }

    /// Goes on without the upstream connection: see the module documentation.
    fn detach(&mut self, cause: String) {
        tracing::info!(%cause, "upstream connection ended while the session was idle; session detached (serving deferred writes and cache hits until it needs PostgreSQL)");
        self.handler.detach();
        self.upstream.stream = Stream::Detached;
        self.upstream.inbuf.clear();
        self.to_upstream.clear();
        // Nothing left upstream to cancel.
        self.canceller = None;
        self.attachment
            .cancel
            .detach(self.attachment.client_pid, self.attachment.cancel_id);
        self.detached = Some(cause);
        self.attachment.gauge = GaugeGuard::new(crate::metrics::DETACHED_SESSIONS);
    }

    /// Writes what can be written, then reads from whichever side may be read.
    /// Ready once at least one read produced bytes or EOF.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Result<Progress, SessionError>> {
        let attached = self.detached.is_none();
        if attached && let Err(e) = poll_drain(&mut self.upstream.stream, &mut self.to_upstream, cx)
        {
            return Poll::Ready(Err(SessionError::UpstreamIo(e)));
        }
        if let Err(e) = poll_drain(&mut self.client.stream, &mut self.to_client, cx) {
            return Poll::Ready(Err(SessionError::ClientIo(e)));
        }
        let mut progress = Progress::default();
        if self.handler.is_blocked() && self.handler.poll_unblocked(cx).is_ready() {
            progress.unblocked = true;
        }
        // After Terminate the client has nothing more to say; answers to what it sent
        // before still flow until PostgreSQL closes, as on a direct connection. While
        // the handler holds a message back, nothing more is read behind it.
        // Answers from the cache land in `to_client` without any upstream traffic, so
        // the client is read only while both windows have room.
        if self.to_upstream.len() < WINDOW
            && self.to_client.len() < WINDOW
            && !self.state.client_terminated
            && !self.handler.is_blocked()
        {
            match poll_read(&mut self.client, cx) {
                Poll::Ready(Ok(r)) => progress.client = Some(r),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionError::ClientIo(e))),
                Poll::Pending => {}
            }
        }
        if attached && self.to_client.len() < WINDOW {
            match poll_read(&mut self.upstream, cx) {
                Poll::Ready(Ok(r)) => progress.upstream = Some(r),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionError::UpstreamIo(e))),
                Poll::Pending => {}
            }
        }
        if progress.client.is_some() || progress.upstream.is_some() || progress.unblocked {
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
            let mut out = Out {
                upstream: &mut self.to_upstream,
                client: &mut self.to_client,
                state: &mut self.state,
            };
            let msg = &self.client.inbuf[..h.total_len];
            match self.handler.on_frontend(msg, &mut out) {
                Disposition::Consumed => {}
                Disposition::Blocked => break,
                Disposition::NeedsUpstream => {
                    return Err(SessionError::UpstreamLost {
                        cause: self
                            .detached
                            .clone()
                            .unwrap_or_else(|| "not connected".to_owned()),
                    });
                }
            }
            self.client.inbuf.advance(h.total_len);
            if self.state.client_terminated {
                break;
            }
        }
        shrink_if_idle(&mut self.client.inbuf);
        Ok(())
    }

    /// Frames backend messages toward the client, streaming large ones.
    fn on_upstream_data(&mut self) -> Result<(), SessionError> {
        if let Some(cause) = self.on_backend_messages()? {
            self.detach(cause);
        }
        Ok(())
    }

    /// [`Relay::on_upstream_data`]'s loop; `Some(cause)` when PostgreSQL ended an
    /// idle session with a FATAL the session survives (swallowed, not relayed).
    fn on_backend_messages(&mut self) -> Result<Option<String>, SessionError> {
        let inbuf = &mut self.upstream.inbuf;
        loop {
            if self.streaming > 0 {
                let n = self.streaming.min(inbuf.len());
                self.to_client.extend_from_slice(&inbuf[..n]);
                inbuf.advance(n);
                self.streaming -= n;
                if self.streaming > 0 {
                    return Ok(None);
                }
                continue;
            }
            let Some(h) =
                peek_header(inbuf, MAX_BACKEND_MESSAGE).map_err(SessionError::UpstreamMalformed)?
            else {
                break;
            };
            if inbuf.len() < h.total_len {
                if h.total_len < STREAM_THRESHOLD {
                    inbuf.reserve(h.total_len - inbuf.len());
                    break;
                }
                // Any message this large is streamed, whatever its type (a client can
                // make PostgreSQL raise a 300 MB error). Of what spillway tracks, only
                // an error's severity matters here, and PostgreSQL sends it first.
                if h.tag == backend::ERROR_RESPONSE
                    && backend::prefix_is_fatal(&inbuf[Header::SIZE..])
                {
                    self.state.upstream_fatal = true;
                }
                self.handler.on_backend_streamed(h.tag);
                self.streaming = h.total_len;
                continue;
            }
            let msg = &inbuf[..h.total_len];
            if h.tag == backend::ERROR_RESPONSE
                && backend::prefix_is_fatal(&msg[Header::SIZE..])
                && idle_upstream(&self.state, &self.handler)
                && let Some(cause) = detaching_fatal(&msg[Header::SIZE..])
            {
                // PostgreSQL closes right after its FATAL; whatever follows is moot.
                return Ok(Some(cause));
            }
            match self.handler.on_backend(h.tag, msg) {
                Delivery::Pass => {
                    self.state.on_backend(h.tag, &msg[Header::SIZE..]);
                    self.to_client.extend_from_slice(msg);
                }
                Delivery::Swallow => self.state.on_backend(h.tag, &msg[Header::SIZE..]),
                Delivery::Status(status) => {
                    let rfq = crate::protocol::frontend::ready_for_query(status);
                    self.state.on_backend(rfq[0], &rfq[Header::SIZE..]);
                    self.to_client.extend_from_slice(&rfq);
                }
            }
            inbuf.advance(h.total_len);
        }
        shrink_if_idle(inbuf);
        Ok(None)
    }

    async fn upstream_closed(&mut self) -> Result<End, SessionError> {
        if !self.state.client_terminated {
            // Why the session was not detached instead.
            tracing::debug!(
                awaiting_ready = self.state.awaiting_ready,
                unsynced = self.state.unsynced,
                tx_status = %char::from(self.state.tx_status),
                handler_idle = self.handler.can_detach(),
                fatal = self.state.upstream_fatal,
                "upstream connection ended while the session was busy"
            );
        }
        if self.state.client_terminated {
            // PostgreSQL closed because the client said Terminate.
            self.flush_for_close().await;
            Ok(End::ClientClosed)
        } else if self.state.upstream_fatal {
            // PostgreSQL said why it is closing; that error is already queued.
            self.flush_for_close().await;
            Ok(End::UpstreamFatal)
        } else {
            self.close_with(SessionError::UpstreamClosed).await
        }
    }

    async fn client_closed(&mut self) -> Result<End, SessionError> {
        let cut_short = !self.client.inbuf.is_empty() || !self.state.is_idle();
        self.cancel_running_query();
        // Complete requests already queued go upstream, as they would have on a
        // direct connection; only a partial message (still in inbuf) is dropped.
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

    /// A query still running upstream has nobody left to answer to: cancel it rather
    /// than let PostgreSQL finish it (a direct connection's backend would only notice
    /// the client is gone when it next writes).
    fn cancel_running_query(&mut self) {
        if self.state.awaiting_ready > 0
            && let Some(canceller) = self.canceller.take()
        {
            canceller.spawn();
        }
    }

    /// Ends the session because of `err`: queues the client-facing error (if the
    /// client can still take one), tells PostgreSQL goodbye, flushes briefly.
    async fn close_with(&mut self, err: SessionError) -> Result<End, SessionError> {
        let client_broken = matches!(err, SessionError::ClientIo(_));
        if client_broken || matches!(err, SessionError::Shutdown) {
            self.cancel_running_query();
        }
        let upstream_broken = self.detached.is_some()
            || matches!(
                err,
                SessionError::UpstreamIo(_) | SessionError::UpstreamClosed
            );
        if client_broken {
            self.to_client.clear();
        } else if self.streaming > 0 {
            // Part of a large message may already be on the wire: an ErrorResponse now
            // would be read as the rest of it. Deliver what is queued and just close;
            // the client sees the connection end mid-message, as it would directly.
        } else if let Some(msg) = err.to_client() {
            // Whatever else was queued is delivered first.
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

    /// Delivers what is queued toward both sides at once (one side not reading must not
    /// hold back the other's final words), then closes both, within [`CLOSE_GRACE`].
    async fn flush_for_close(&mut self) {
        let Relay {
            client,
            upstream,
            to_client,
            to_upstream,
            ..
        } = self;
        let to_upstream = async {
            let _ = write_out(&mut upstream.stream, to_upstream).await;
            let _ = upstream.stream.shutdown().await;
        };
        let to_client = async {
            let _ = write_out(&mut client.stream, to_client).await;
            let _ = client.stream.shutdown().await;
        };
        let _ =
            tokio::time::timeout(CLOSE_GRACE, async { tokio::join!(to_upstream, to_client) }).await;
    }
}

/// Nothing is outstanding upstream and no transaction is open there. `unsynced`
/// alone does not count: the handler says whether those messages went upstream.
fn idle_upstream(state: &ProtocolState, handler: &Handler) -> bool {
    !state.client_terminated
        && state.awaiting_ready == 0
        && state.tx_status == b'I'
        && handler.can_detach()
}

/// For a FATAL that says the server or the connection is going away (57P01 admin
/// shutdown, 57P02 crash shutdown, 57P03 cannot connect now, class 08), the cause a
/// detached session reports later; `None` for any other FATAL (relayed as ever).
fn detaching_fatal(body: &[u8]) -> Option<String> {
    let fields = backend::parse_error_fields(body).ok()?;
    let detaches = matches!(fields.code.as_str(), "57P01" | "57P02" | "57P03")
        || fields.code.starts_with("08");
    detaches.then(|| format!("PostgreSQL: {} ({})", fields.message, fields.code))
}

/// Replaces an empty buffer that grew for one large message with a small one.
fn shrink_if_idle(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > SHRINK_ABOVE {
        *buf = BytesMut::with_capacity(READ_CHUNK);
    }
}

async fn write_out(stream: &mut Stream, buf: &mut BytesMut) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    stream.write_all(buf).await?;
    buf.clear();
    stream.flush().await
}

fn poll_read(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<Read>> {
    conn.inbuf.reserve(READ_CHUNK);
    let room = conn.inbuf.capacity() - conn.inbuf.len();
    match poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.inbuf) {
        Poll::Ready(Ok(0)) => Poll::Ready(Ok(Read::Eof)),
        Poll::Ready(Ok(n)) => {
            // A short read took everything there was: skip the EAGAIN round trip.
            if n < room {
                conn.stream.note_drained();
            }
            Poll::Ready(Ok(Read::Data))
        }
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
    shrink_if_idle(buf);
    // TLS keeps written plaintext in its session until flushed; TCP's flush is a no-op.
    match Pin::new(stream).poll_flush(cx) {
        Poll::Ready(Err(e)) => Err(e),
        _ => Ok(()),
    }
}
