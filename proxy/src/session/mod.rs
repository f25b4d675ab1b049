//! One client session, from the first byte to the close.
//!
//! Three seams (HOUSE_STYLE): bytes (`conn::Conn`, the event loop in [`relay`]),
//! protocol state ([`state::ProtocolState`], which only ever sees messages, fed by the
//! [`state::Outbox`]), and the [`handler`] deciding where each message goes (the cache
//! and the write policies). The state machine never knows where an answer came from.
//! The upstream connection is the session's by a [`lease::Lease`], not owned.
//!
//! Invariants:
//! - A session holds a lease on exactly one upstream connection, opened after the
//!   client's StartupMessage and closed when the session ends (session mode), or
//!   earlier when it ends while the session is idle and PostgreSQL is unreachable
//!   (the session detaches).
//! - Per session, spillway buffers one client message of at most
//!   `server.max_message_bytes` (64 KiB before authentication; held twice while it is
//!   queued) plus a fixed window per direction ([`relay::WINDOW`]); a backend message of
//!   [`relay::STREAM_THRESHOLD`] or more, of any type, is streamed, never held whole.
//! - Every way a session ends is logged exactly once, in [`serve`].

pub mod auth;
pub mod clients;
pub mod handler;
pub mod lease;
pub mod relay;
pub(crate) mod startup;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::config::Config;
use crate::error::SessionError;
use crate::net::cancel::CancelRegistry;
use crate::net::conn::Conn;
pub use crate::net::signal::ShutdownSignals;
use crate::net::stream::Stream;
use crate::net::upstream::Connector;
use crate::protocol::startup::StartupMessage;

/// What every session shares. Read-only after start, except the cancel registry and
/// what a reload swaps (behind `reload`, the cache and the write service).
pub struct Shared {
    pub config: Arc<Config>,
    pub connector: Connector,
    pub cancel: Arc<CancelRegistry>,
    pub tls: Option<TlsAcceptor>,
    pub signals: Arc<ShutdownSignals>,
    /// The read cache; `None` when `cache.enabled = false`.
    pub cache: Option<Arc<crate::read::cache::ReadCache>>,
    /// Deferred tables and the database they are in; `None` when no table has a
    /// deferred policy.
    pub writes: Option<(Arc<crate::write::service::WriteService>, String)>,
    /// Sessions past startup, for the admin console's `SHOW CLIENTS`.
    pub clients: Arc<clients::Clients>,
    /// The admin console (`ops::admin`), when `admin.users` is set: connections that
    /// log in to it are handed over after their startup packet.
    pub console: Option<Arc<dyn Console>>,
    /// Transaction mode's pools and credentials (`auth.rs`), when some database or
    /// user is in transaction mode.
    pub pooling: Option<Arc<auth::Pooling>>,
}

/// The boxed future a [`Console`] returns.
pub type ConsoleFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, SessionError>> + Send + 'a>>;

/// Where connections for the admin console go. The session layer only recognises
/// them and hands them over; what the console answers is `ops::admin`'s.
pub trait Console: Send + Sync {
    /// Whether this startup packet logs in to the console, not to PostgreSQL.
    fn is_console(&self, startup: &StartupMessage) -> bool;
    /// Authenticates the console login (inside the startup timeout).
    fn login<'a>(&'a self, client: &'a mut Conn, user: &'a str) -> ConsoleFuture<'a, ()>;
    /// Serves the logged-in console session until it ends.
    fn serve<'a>(
        &'a self,
        client: Conn,
        startup: &'a StartupMessage,
        peer: SocketAddr,
    ) -> ConsoleFuture<'a, End>;
}

impl Shared {
    pub fn max_message_bytes(&self) -> usize {
        usize::try_from(self.config.server.max_message_bytes.as_u64()).unwrap_or(usize::MAX)
    }
}

/// Runs one client connection to completion. Never returns an error: the outcome is
/// logged here, once.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let span = tracing::info_span!("session", %peer, user = tracing::field::Empty, database = tracing::field::Empty);
    async move {
        let _client = GaugeGuard::new(crate::metrics::CLIENT_CONNECTIONS);
        match run(tcp, peer, &shared).await {
            Ok(end) => tracing::debug!(?end, "session closed"),
            Err(err) => log_end(&err),
        }
    }
    .instrument(span)
    .await
}

/// One more on a gauge for as long as it lives.
pub struct GaugeGuard(metrics::Gauge);

impl GaugeGuard {
    pub fn new(name: &'static str) -> Self {
        let g = metrics::gauge!(name);
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn log_end(err: &SessionError) {
    match (err, err.side()) {
        (SessionError::Shutdown, _) => tracing::info!("session closed by shutdown (57P01)"),
        (SessionError::ClientIo(e), _)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            tracing::info!(error = %err, "client disconnected")
        }
        (_, side) => tracing::warn!(
            error = %err,
            side = side.as_str(),
            sqlstate = %err.sqlstate(),
            retryable = err.is_retryable(),
            "session ended with an error"
        ),
    }
}

/// How a session ended without error.
#[derive(Debug)]
pub enum End {
    /// A CancelRequest was handled (forwarded or ignored).
    Cancel,
    /// The client sent Terminate or closed its socket at a message boundary.
    ClientClosed,
    /// PostgreSQL ended the session with its own FATAL error (relayed verbatim).
    UpstreamFatal,
    /// Authentication was refused upstream; PostgreSQL's error was relayed.
    AuthRefused,
}

async fn run(tcp: TcpStream, peer: SocketAddr, shared: &Shared) -> Result<End, SessionError> {
    // The client connection stays owned here through startup, so that whatever ends
    // the startup phase — a bad packet, an unreachable upstream, the timeout — can
    // still be reported to the client before the connection closes.
    let mut client = Conn::new(Stream::Plain(tcp));
    let timeout = shared.config.server.startup_timeout;
    let established =
        match tokio::time::timeout(timeout, startup::establish(&mut client, shared)).await {
            Ok(Ok(established)) => established,
            Ok(Err(err)) => return Err(report(&mut client, err).await),
            Err(_) => return Err(report(&mut client, SessionError::StartupTimeout(timeout)).await),
        };
    let (lease, state, _cancel_key, startup) = match established {
        startup::Established::Done(end) => return Ok(end),
        // Outside the startup timeout: a console session lasts as long as its client.
        startup::Established::Admin(console, startup) => {
            return console.serve(client, &startup, peer).await;
        }
        startup::Established::Session {
            upstream,
            state,
            cancel_key,
            startup,
        } => {
            let lease = lease::Lease::new(
                upstream,
                shared.connector.clone(),
                shared.cancel.clone(),
                &cancel_key,
                &startup,
            );
            (lease, state, cancel_key, startup)
        }
        startup::Established::Pooled {
            pool,
            hub,
            state,
            cancel_key,
            startup,
        } => {
            let lease = lease::Lease::pooled(
                pool,
                hub,
                shared.cache.clone(),
                shared.connector.clone(),
                shared.cancel.clone(),
                &cancel_key,
                &startup,
            );
            (lease, state, cancel_key, startup)
        }
    };
    let _listed = shared.clients.register(
        peer,
        startup.user(),
        startup.database(),
        startup.param("application_name").unwrap_or(""),
        matches!(client.stream, Stream::ServerTls(_)),
    );
    let handler = match &shared.cache {
        Some(cache) => handler::Handler::caching(
            cache.clone(),
            shared
                .writes
                .as_ref()
                .filter(|(_, db)| db == startup.database())
                .map(|(w, _)| w.clone()),
            &startup,
            &state,
        ),
        None => handler::Handler::passthrough(),
    };
    let mut relay = relay::Relay::new(client, lease, state, shared.max_message_bytes(), handler);
    relay.run(&shared.signals.subscribe()).await
}

/// Delivers `err` to the client as a FATAL ErrorResponse (if it can take one) and
/// closes the connection; returns `err` for logging.
async fn report(client: &mut Conn, err: SessionError) -> SessionError {
    use tokio::io::AsyncWriteExt;
    if let Some(msg) = err.to_client() {
        let deliver = async {
            client.send(&msg).await?;
            client.stream.shutdown().await
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), deliver).await;
    }
    err
}

/// Refuses a connection before its session starts (over the client limit) the way
/// PostgreSQL does: the startup negotiation runs as for any session (an SSLRequest is
/// answered, TLS set up, a CancelRequest forwarded), and `err` is the answer to the
/// StartupMessage. Bounded by `server.startup_timeout` like a session's startup.
pub(crate) async fn refuse(tcp: TcpStream, shared: &Shared, err: SessionError) {
    let mut client = Conn::new(Stream::Plain(tcp));
    let timeout = shared.config.server.startup_timeout;
    let err = match tokio::time::timeout(timeout, startup::negotiate(&mut client, shared)).await {
        Ok(Ok(Some(_))) => report(&mut client, err).await,
        // A CancelRequest, handled as for any connection.
        Ok(Ok(None)) => return,
        Ok(Err(other)) => {
            let other = report(&mut client, other).await;
            tracing::info!(error = %other, "client over the limit ended before its startup packet");
            return;
        }
        Err(_) => {
            report(&mut client, SessionError::StartupTimeout(timeout)).await;
            return;
        }
    };
    tracing::warn!(error = %err, sqlstate = %err.sqlstate(), "client refused");
}

/// Refuses a connection at once, without reading from it: for when even the
/// refusals in negotiation are over their bound.
pub(crate) async fn refuse_at_once(tcp: TcpStream, err: SessionError) {
    let err = report(&mut Conn::new(Stream::Plain(tcp)), err).await;
    tracing::warn!(error = %err, sqlstate = %err.sqlstate(), "client refused without negotiation");
}
