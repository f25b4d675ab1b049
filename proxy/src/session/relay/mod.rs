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
//! The relay owns the client connection and the [`Outbox`]; it borrows the server
//! connection through the session's [`Lease`]. Every whole client message is offered to
//! the handler, every whole backend message too, and what they produce goes into the
//! outbox, which feeds the protocol state machine.
//!
//! Memory bound per session: output toward each side is capped by [`WINDOW`] (a side
//! is not read while the other side's output is over it); a client message is buffered
//! whole up to `server.max_message_bytes`; a backend message of [`STREAM_THRESHOLD`]
//! bytes or more that spillway does not need to inspect is streamed through as it
//! arrives instead of being buffered whole.
//!
//! When the server connection ends while nothing is outstanding there (no request sent
//! and unanswered, no transaction, no COPY; messages the handler holds or a deferred
//! write awaiting its ack never went upstream):
//! - with PostgreSQL's FATAL saying the server or the connection goes away (57P01,
//!   57P02, 57P03, class 08), the relay asks whether PostgreSQL still accepts sessions
//!   ([`Lease::probe`]), reading nothing meanwhile. If it does, this backend alone was
//!   ended (`pg_terminate_backend`): the FATAL is relayed and the session ends, as on
//!   a direct connection. If it does not (stopping, restarting, unreachable), the FATAL
//!   is swallowed (logged once) and the session detaches;
//! - without a word (EOF, an I/O error: a crashed backend, a lost link), it detaches.
//!
//! A detached session's handler answers what needs no upstream (`handler/detached.rs`);
//! the first message that needs PostgreSQL ends it with FATAL 08006 after the answers
//! already queued. With a request outstanding, the upstream's end is relayed as ever.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};

use super::End;
use super::handler::{Delivery, Handler};
use super::lease::Lease;
use super::state::{Outbox, ProtocolState};
use crate::error::SessionError;
use crate::net::conn::{Conn, ReadWake, poll_drain, shrink_if_idle};
use crate::net::signal::{Phase, Subscription};
use crate::protocol::backend;
use crate::protocol::frame::{Header, peek_header};
use crate::protocol::prepared::Reply;

mod client;
mod close;

/// Output buffered toward one side before spillway stops reading from the other.
pub const WINDOW: usize = 256 * 1024;
/// Backend messages at least this large are streamed, not buffered whole.
pub const STREAM_THRESHOLD: usize = 256 * 1024;
/// PostgreSQL never sends a message over 1 GiB; anything longer is a broken upstream.
const MAX_BACKEND_MESSAGE: usize = 0x4000_0000;
/// How long closing words (a final error, a Terminate) may take to deliver.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

const TERMINATE: &[u8] = b"X\0\0\0\x04";

pub struct Relay {
    client: Conn,
    /// The server connection, borrowed through the session's lease on it.
    lease: Lease,
    out: Outbox,
    max_message: usize,
    /// Bytes of a large backend message still to pass through unframed.
    streaming: usize,
    /// Decides where each frontend message goes (cache or upstream).
    handler: Handler,
    /// PostgreSQL ended the idle session's backend with a FATAL; whether the session
    /// detaches or ends with it depends on the probe.
    ending: Option<Ending>,
    /// PostgreSQL's FATAL relayed to the client, for the log line of the session's end.
    server_fatal: Option<String>,
    /// Transaction mode: the client sent Terminate (never forwarded to a pool's).
    pooled_terminated: bool,
    /// The client's reads, and in session mode the server connection's, each with a
    /// waker of its own: a side is read only when it may have something (a cache hit
    /// does not read the server connection; PostgreSQL's answer does not read the
    /// client's). In transaction mode the server connection changes between
    /// transactions and the pool checks idle ones, so it is read on every poll.
    client_reads: ReadWake,
    upstream_reads: ReadWake,
}

/// A FATAL that may detach the session, while the relay asks whether PostgreSQL still
/// accepts sessions.
struct Ending {
    fatal: Bytes,
    cause: String,
    probe: Pin<Box<dyn Future<Output = bool> + Send>>,
}

enum Step {
    Io(Result<Progress, SessionError>),
    Terminate,
    /// The probe answered: PostgreSQL accepts sessions (`true`) or not.
    Probed(bool),
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

impl Read {
    fn of(data: bool) -> Self {
        if data { Read::Data } else { Read::Eof }
    }
}

impl Relay {
    pub fn new(
        client: Conn,
        lease: Lease,
        state: ProtocolState,
        max_message: usize,
        handler: Handler,
    ) -> Self {
        Self {
            client,
            lease,
            out: Outbox::new(state),
            max_message,
            streaming: 0,
            handler,
            ending: None,
            server_fatal: None,
            pooled_terminated: false,
            client_reads: ReadWake::default(),
            upstream_reads: ReadWake::default(),
        }
    }

    pub async fn run(&mut self, shutdown: &Subscription) -> Result<End, SessionError> {
        // Bytes that arrived in the same reads as the end of startup: upstream's (a
        // notice or FATAL right behind ReadyForQuery) and the client's (requests
        // pipelined behind its authentication answer, possibly a Terminate).
        if self.lease.server().is_some_and(|s| !s.inbuf.is_empty())
            && let Err(err) = self.on_upstream_data()
        {
            return self.close_with(err).await;
        }
        if !self.client.inbuf.is_empty()
            && self.ending.is_none()
            && let Err(err) = self.on_client_data()
        {
            return self.close_with(err).await;
        }
        loop {
            let step = poll_fn(|cx| match shutdown.poll_phase(cx) {
                Phase::Terminating => Poll::Ready(Step::Terminate),
                // Answers still queued for the client go out before the 57P01
                // (close_with appends after them), so idle is the only condition.
                Phase::Draining if self.out.state().is_idle() => Poll::Ready(Step::Terminate),
                _ => {
                    if let Some(ending) = self.ending.as_mut()
                        && let Poll::Ready(up) = ending.probe.as_mut().poll(cx)
                    {
                        return Poll::Ready(Step::Probed(up));
                    }
                    self.poll_io(cx).map(Step::Io)
                }
            })
            .await;
            let progress = match step {
                Step::Terminate => return self.close_with(SessionError::Shutdown).await,
                Step::Probed(true) => return self.ended_by_postgres().await,
                Step::Probed(false) => {
                    if let Some(ending) = self.ending.take() {
                        self.detach(ending.cause);
                    }
                    Progress {
                        client: (!self.client.inbuf.is_empty()).then_some(Read::Data),
                        ..Progress::default()
                    }
                }
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
            if self.ending.is_some() {
                // Nothing is taken from the client until the probe says what happens.
                continue;
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
            if self.pooled_terminated {
                self.release_if_idle();
                self.out.to_upstream().clear();
                self.flush_for_close().await;
                return Ok(End::ClientClosed);
            }
            self.release_if_idle();
            if self.lease.is_lost() && self.out.client_terminated() {
                // Nobody upstream to wait for: the Terminate ends the session now.
                self.out.to_upstream().clear();
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
        !self.lease.is_lost()
            && !self.lease.is_pooled()
            && self.ending.is_none()
            && !self.out.state().upstream_fatal
            && self.streaming == 0
            && idle_upstream(self.out.state(), &self.handler)
    }

    /// Transaction mode: gives the server connection back to the pool once the session
    /// is idle upstream (ReadyForQuery `I` with nothing outstanding, nothing queued or
    /// streaming, no extended cycle half sent).
    fn release_if_idle(&mut self) {
        if !self.lease.is_pooled() || self.streaming > 0 || self.ending.is_some() {
            return;
        }
        let state = self.out.state();
        let idle = state.awaiting_ready == 0
            && state.tx_status == b'I'
            && !state.upstream_fatal
            && self.handler.can_release(state.unsynced);
        if idle
            && self.out.to_upstream().is_empty()
            && self.lease.server().is_some_and(|s| s.inbuf.is_empty())
        {
            self.lease.release();
        }
    }

    /// Nothing is owed to the client or half sent to it, and no transaction is open:
    /// a notification may go to it now (PostgreSQL sends them while idle, between
    /// transactions).
    fn owes_client_nothing(&mut self) -> bool {
        let state = self.out.state();
        self.streaming == 0
            && self.ending.is_none()
            && state.awaiting_ready == 0
            && !state.unsynced
            && state.tx_status == b'I'
            && !state.client_terminated
            && !self.handler.is_blocked()
            && self.out.to_upstream().is_empty()
    }

    /// Goes on without the upstream connection: see the module documentation.
    fn detach(&mut self, cause: String) {
        tracing::info!(%cause, "upstream connection ended while the session was idle; session detached (serving deferred writes and cache hits until it needs PostgreSQL)");
        self.handler.detach();
        self.out.to_upstream().clear();
        self.lease.lose(cause);
    }

    /// The probe found PostgreSQL accepting sessions: the idle session's backend was
    /// ended on its own (an operator, a timeout). Its FATAL goes to the client, which
    /// learns of it as it would directly, and the session ends.
    async fn ended_by_postgres(&mut self) -> Result<End, SessionError> {
        if let Some(ending) = self.ending.take() {
            tracing::info!(cause = %ending.cause, "PostgreSQL ended the idle session's backend and still accepts sessions; its error is relayed and the session ends");
            self.out.relay(&ending.fatal);
        }
        self.out.to_upstream().clear();
        self.flush_for_close().await;
        Ok(End::UpstreamFatal)
    }

    /// Writes what can be written, then reads from whichever side may be read.
    /// Ready once at least one read produced bytes or EOF. While a probe runs, only
    /// writes go on.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Result<Progress, SessionError>> {
        let probing = self.ending.is_some();
        if self.lease.is_pooled() && !self.out.to_upstream().is_empty() {
            let state = self.out.state();
            let tx = super::lease::TxView {
                status: state.tx_status,
                awaiting: state.awaiting_ready,
            };
            match self.lease.poll_pooled(self.out.to_upstream(), tx, cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Answered without a server connection: read as PostgreSQL's answers.
                Poll::Ready(Ok(true)) => {
                    let upstream = Some(Read::Data);
                    return Poll::Ready(Ok(Progress {
                        upstream,
                        ..Progress::default()
                    }));
                }
                Poll::Ready(Ok(false)) | Poll::Pending => {}
            }
        }
        if self.lease.is_pooled() && self.owes_client_nothing() {
            // Notifications from the listener connection, between messages.
            self.lease
                .poll_notifications(cx, self.out.to_client(), WINDOW);
        }
        if let Err(e) = self.lease.poll_write(self.out.to_upstream(), cx) {
            return Poll::Ready(Err(SessionError::UpstreamIo(e)));
        }
        if let Err(e) = poll_drain(&mut self.client.stream, self.out.to_client(), cx) {
            return Poll::Ready(Err(SessionError::ClientIo(e)));
        }
        let mut progress = Progress::default();
        if probing {
            return Poll::Pending;
        }
        if self.handler.is_blocked() && self.handler.poll_unblocked(cx).is_ready() {
            progress.unblocked = true;
        }
        // After Terminate the client has nothing more to say; answers to what it sent
        // before still flow until PostgreSQL closes, as on a direct connection. While
        // the handler holds a message back, nothing more is read behind it.
        // Answers from the cache land in the client's queue without any upstream
        // traffic, so the client is read only while both windows have room.
        if self.out.to_upstream().len() < WINDOW
            && self.out.to_client().len() < WINDOW
            && !self.out.client_terminated()
            && !self.handler.is_blocked()
        {
            match self.client_reads.poll_fill(&mut self.client, cx) {
                Poll::Ready(Ok(data)) => progress.client = Some(Read::of(data)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionError::ClientIo(e))),
                Poll::Pending => {}
            }
        }
        let pooled = self.lease.is_pooled();
        if self.out.to_client().len() < WINDOW
            && let Some(server) = self.lease.server()
        {
            let polled = if pooled {
                server.poll_fill(cx)
            } else {
                self.upstream_reads.poll_fill(server, cx)
            };
            match polled {
                Poll::Ready(Ok(data)) => progress.upstream = Some(Read::of(data)),
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

    /// Frames backend messages toward the client, streaming large ones.
    fn on_upstream_data(&mut self) -> Result<(), SessionError> {
        if let Some((cause, fatal)) = self.on_backend_messages()? {
            tracing::debug!(%cause, "the idle session's backend ended; asking whether PostgreSQL accepts sessions");
            self.ending = Some(Ending {
                fatal,
                cause,
                probe: Box::pin(self.lease.probe()),
            });
        }
        Ok(())
    }

    /// [`Relay::on_upstream_data`]'s loop; `Some((cause, FATAL))` when PostgreSQL
    /// ended an idle session with a FATAL the session may survive (not relayed yet).
    fn on_backend_messages(&mut self) -> Result<Option<(String, Bytes)>, SessionError> {
        let Some((server, mut filter)) = self.lease.server_filtered() else {
            return Ok(None);
        };
        let inbuf = &mut server.inbuf;
        loop {
            if self.streaming > 0 {
                let n = self.streaming.min(inbuf.len());
                self.out.stream(&inbuf[..n]);
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
                // (Only an ErrorResponse is this large: it passes the filter.)
                if !self.handler.may_stream(h.tag) {
                    return Err(SessionError::UpstreamProtocol {
                        tag: char::from(h.tag),
                        phase: "a read overlaid with pending writes (a row too large to hold)",
                    });
                }
                filter.as_mut().map(|f| f.on_backend(h.tag));
                if h.tag == backend::ERROR_RESPONSE
                    && backend::prefix_is_fatal(&inbuf[Header::SIZE..])
                {
                    self.out.streamed_fatal();
                    self.server_fatal = Some("a FATAL error too large to hold".to_owned());
                }
                self.handler.on_backend_streamed(h.tag);
                self.streaming = h.total_len;
                continue;
            }
            if h.tag == b'A'
                && let Some(f) = filter.as_ref()
            {
                f.map_notification_pid(&mut inbuf[..h.total_len]);
            }
            let msg = &inbuf[..h.total_len];
            let fatal =
                h.tag == backend::ERROR_RESPONSE && backend::prefix_is_fatal(&msg[Header::SIZE..]);
            if fatal {
                if idle_upstream(self.out.state(), &self.handler)
                    && let Some(cause) = backend::detaching_fatal(&msg[Header::SIZE..])
                {
                    // PostgreSQL closes right after its FATAL; whatever follows is moot.
                    let fatal = Bytes::copy_from_slice(msg);
                    inbuf.clear();
                    return Ok(Some((cause, fatal)));
                }
                self.server_fatal = Some(backend::describe_error(&msg[Header::SIZE..]));
            }
            if let Some(f) = filter.as_mut() {
                f.watch(h.tag, msg);
            }
            let reply = filter.as_mut().map_or(Reply::Pass, |f| f.on_backend(h.tag));
            let Some(msg) = reply.apply(msg) else {
                inbuf.advance(h.total_len); // the answer to spillway's own request
                continue;
            };
            let h = Header { tag: msg[0], ..h };
            match self.handler.on_backend(h.tag, msg) {
                Delivery::Pass => self.out.relay(msg),
                Delivery::Swallow => self.out.swallow(msg),
                Delivery::Status(status) => self.out.ready(status),
                Delivery::Replace(bytes) => self.out.relay(&bytes),
                Delivery::End => {
                    return Err(SessionError::UpstreamProtocol {
                        tag: char::from(h.tag),
                        phase: "a pipelined read whose row could not be overlaid",
                    });
                }
            }
            inbuf.advance(h.total_len);
        }
        shrink_if_idle(inbuf);
        Ok(None)
    }

    async fn upstream_closed(&mut self) -> Result<End, SessionError> {
        let state = self.out.state();
        if !state.client_terminated {
            // Why the session was not detached instead.
            tracing::debug!(
                awaiting_ready = state.awaiting_ready,
                unsynced = state.unsynced,
                tx_status = %char::from(state.tx_status),
                handler_idle = self.handler.can_detach(),
                fatal = state.upstream_fatal,
                "upstream connection ended while the session was busy"
            );
        }
        if state.client_terminated {
            // PostgreSQL closed because the client said Terminate.
            self.flush_for_close().await;
            Ok(End::ClientClosed)
        } else if state.upstream_fatal {
            // PostgreSQL said why it is closing (a timeout, an operator, a shutdown):
            // its error, already queued, is the client's answer. Not spillway's error.
            tracing::info!(
                error = self.server_fatal.as_deref().unwrap_or("a FATAL error"),
                "PostgreSQL ended the session"
            );
            self.flush_for_close().await;
            Ok(End::UpstreamFatal)
        } else {
            self.close_with(SessionError::UpstreamClosed).await
        }
    }

    async fn client_closed(&mut self) -> Result<End, SessionError> {
        let cut_short = !self.client.inbuf.is_empty() || !self.out.state().is_idle();
        self.cancel_running_query();
        // Complete requests already queued go upstream, as they would have on a
        // direct connection; only a partial message (still in inbuf) is dropped. A
        // pool's connection gets no Terminate: it is released if idle, else closed.
        if self.lease.is_pooled() {
            self.release_if_idle();
        } else {
            self.out.release(TERMINATE);
        }
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
        if self.out.state().awaiting_ready > 0 {
            self.lease.cancel_running();
        }
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
