//! The listener: accepts clients, enforces `server.max_client_conn`, spawns one task
//! per session, and runs the shutdown sequence.
//!
//! Shutdown (SPEC §3): stop accepting; signal `draining` so idle sessions close at once
//! with 57P01 and busy ones as soon as they are idle; after `server.shutdown_timeout`
//! signal `terminate` so the rest get 57P01 immediately; wait for the tasks to end.
//!
//! Invariant: at most `max_client_conn` sessions hold a permit; a client over the limit
//! is answered 53300 (like PostgreSQL's "too many clients") instead of queueing
//! invisibly in the accept backlog. As in PostgreSQL the refusal answers the startup
//! packet, after the SSLRequest (or CancelRequest) before it was dealt with as usual;
//! at most [`refusal_bound`] refusals negotiate at once, and beyond that a client gets
//! the 53300 as soon as it is accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::SessionError;
use crate::net::cancel::CancelRegistry;
use crate::net::tls;
use crate::net::upstream::Connector;
use crate::net::workers::Workers;
use crate::session::{self, Shared, ShutdownSignals};

/// Time sessions get after `terminate` to deliver their 57P01 and close.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(#[from] spillway_policies::config::ValidationError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot start session workers: {0}")]
    Workers(std::io::Error),
    #[error(transparent)]
    Writes(#[from] crate::write::start::WritesStartError),
    #[error("cache.invalidation = \"replication\": {0}")]
    Replication(#[from] crate::read::cache::stream::setup::SetupError),
    #[error("cannot serve metrics on {addr}: {error}")]
    Metrics {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("auth.file: {0}")]
    AuthFile(String),
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// Checks what the config names on disk (TLS certificate and key) without binding
/// anything: `spillway check-config` uses it so that a bad file is caught before `run`.
pub fn check_files(config: &Config) -> Result<(), ServerError> {
    if let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) {
        tls::acceptor(cert, key)?;
    }
    Ok(())
}

pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    reload: Arc<crate::ops::reload::Reloader>,
    /// The flush worker and its journal, when some table is deferred.
    writes: Option<crate::write::start::Running>,
    /// Stops the metrics endpoint.
    metrics: Option<CancellationToken>,
    permits: Arc<Semaphore>,
    /// Refused clients whose startup negotiation is still running.
    refusals: Arc<Semaphore>,
    workers: Workers,
}

/// How many refused clients may be in their startup negotiation at once: each holds a
/// socket and, with TLS, a handshake's state for up to `server.startup_timeout`. Four
/// times the limit (at least 4,096): a storm of 5,000 connections against the default
/// 1,000 is refused as drivers expect (53300 after the startup packet), not at accept,
/// where a driver that sent an SSLRequest reports a failed SSL negotiation.
pub fn refusal_bound(max_client_conn: usize) -> usize {
    max_client_conn.saturating_mul(4).max(4096)
}

impl Server {
    /// Binds the listener and prepares TLS. Nothing is accepted until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        Self::bind_with(config, None).await
    }

    /// Like [`Server::bind`]; with `source`, reloads (SIGHUP, `RELOAD`) read the
    /// config from it again.
    pub async fn bind_with(
        config: Config,
        source: Option<crate::ops::reload::ReloadSource>,
    ) -> Result<Server, ServerError> {
        config.validate()?;
        let target = config.backend_target()?;
        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let connector = Connector {
            target,
            tls: tls::upstream_connector()?,
            connect_timeout: config.backend.connect_timeout,
        };
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| ServerError::Bind { addr, error })?;
        let permits = Arc::new(Semaphore::new(config.server.max_client_conn));
        let refusals = Arc::new(Semaphore::new(refusal_bound(config.server.max_client_conn)));
        let workers = Workers::start(config.server.workers, config.server.pin_workers)
            .map_err(ServerError::Workers)?;
        tracing::debug!(workers = workers.len(), "session workers started");
        if config.cache.enabled
            && config.cache.invalidation == spillway_policies::Invalidation::Replication
        {
            crate::read::cache::stream::setup::check_backend(
                &config.backend.url,
                &config.replication,
            )
            .await?;
        }
        let cache = crate::read::cache::ReadCache::new(
            &config,
            connector.clone(),
            tokio::runtime::Handle::current(),
        );
        // Before the first session: the journal's unapplied records go upstream first.
        let writes = crate::write::start::start(&config, cache.as_ref()).await?;
        // The key index follows the change stream of the deferred tables' database
        // (it answers exact row counts only while that stream follows, ADR 0023).
        if let (Some(cache), Some(w)) = (cache.as_ref(), writes.as_ref()) {
            cache.add_change_sink(w.change_sink());
        }
        if !config.admin.users.is_empty() {
            // The console's SHOW STATS reads the recorder even without metrics.listen.
            crate::metrics::install();
        }
        let metrics = crate::ops::http::start(
            &config,
            cache.clone(),
            writes.as_ref().map(|w| w.service.clone()),
            connector.clone(),
            workers.runtimes(tokio::runtime::Handle::current()),
        )
        .await
        .map_err(|error| ServerError::Metrics {
            addr: config.metrics.listen.unwrap_or(addr),
            error,
        })?;
        let reload = Arc::new(crate::ops::reload::Reloader::new(
            config.clone(),
            source,
            cache.clone(),
            writes.as_ref().map(|w| w.service.clone()),
        ));
        let config = Arc::new(config);
        let writes_shared = writes
            .as_ref()
            .map(|w| (w.service.clone(), w.database.clone()));
        let clients: Arc<crate::session::clients::Clients> = Arc::default();
        let signals = Arc::new(ShutdownSignals::default());
        let pooling = crate::session::auth::Pooling::new(&config, connector.clone())
            .map_err(ServerError::AuthFile)?;
        let console: Option<Arc<dyn session::Console>> =
            (!config.admin.users.is_empty()).then(|| {
                Arc::new(crate::ops::admin::Console {
                    config: config.clone(),
                    cache: cache.clone(),
                    writes: writes_shared.clone(),
                    clients: clients.clone(),
                    signals: signals.clone(),
                    reload: reload.clone(),
                    pooling: pooling.clone(),
                }) as Arc<dyn session::Console>
            });
        let shared = Arc::new(Shared {
            pooling,
            console,
            writes: writes_shared,
            cache,
            config,
            connector,
            cancel: Arc::new(CancelRegistry::default()),
            tls,
            signals,
            clients,
        });
        Ok(Server {
            listener,
            shared,
            reload,
            writes,
            metrics,
            permits,
            refusals,
            workers,
        })
    }

    /// Applies reloads to this server (SIGHUP in `main`, the console's `RELOAD`).
    pub fn reloader(&self) -> Arc<crate::ops::reload::Reloader> {
        self.reload.clone()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then drains (see module docs).
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Keepalive like PostgreSQL's own: a client that vanished while idle is
            // noticed, and its permit and upstream backend are released.
            let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
            if let Err(err) = tcp
                .set_nodelay(true)
                .and_then(|()| socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive))
            {
                tracing::debug!(%err, %peer, "could not set socket options");
            }
            self.spawn_session(&tracker, tcp, peer);
        }
        let Server {
            listener,
            shared,
            writes,
            metrics,
            ..
        } = self;
        drop(listener);
        drain(&shared, tracker).await;
        if let Some(w) = writes {
            w.stop(shared.config.server.shutdown_timeout).await;
        }
        if let Some(m) = metrics {
            m.cancel();
        }
    }

    fn spawn_session(&self, tracker: &TaskTracker, tcp: TcpStream, peer: SocketAddr) {
        // Move the socket to its worker: deregister here, register there.
        let std_tcp = match tcp.into_std() {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(%err, %peer, "could not hand the connection to a worker");
                return;
            }
        };
        let shared = Arc::clone(&self.shared);
        let permit = Arc::clone(&self.permits).try_acquire_owned();
        let refusal = match permit {
            Ok(_) => None,
            Err(_) => Some(Arc::clone(&self.refusals).try_acquire_owned()),
        };
        let session = tracker.track_future(async move {
            let tcp = match TcpStream::from_std(std_tcp) {
                Ok(t) => t,
                Err(err) => {
                    tracing::warn!(%err, %peer, "could not register the connection");
                    return;
                }
            };
            match permit {
                Ok(permit) => {
                    session::serve(tcp, peer, shared).await;
                    drop(permit);
                }
                Err(_) => {
                    let err = SessionError::TooManyClients(shared.config.server.max_client_conn);
                    match refusal {
                        Some(Ok(_negotiating)) => session::refuse(tcp, &shared, err).await,
                        _ => session::refuse_at_once(tcp, err).await,
                    }
                }
            }
        });
        self.workers.pick().spawn(session);
    }
}

async fn drain(shared: &Shared, tracker: TaskTracker) {
    tracker.close();
    let signals = &shared.signals;
    let timeout = shared.config.server.shutdown_timeout;
    tracing::info!(
        sessions = tracker.len(),
        ?timeout,
        "shutting down: draining sessions"
    );
    signals.drain();
    if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
        tracing::warn!(
            sessions = tracker.len(),
            "drain deadline passed: terminating remaining sessions with 57P01"
        );
        signals.terminate();
        if tokio::time::timeout(TERMINATE_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                sessions = tracker.len(),
                "sessions still open after terminate; they end with their workers"
            );
            return;
        }
    }
    tracing::info!("all sessions closed");
}
