//! Server connections shared by sessions in transaction mode: one [`Pool`] per
//! (database, user), each at most `pool.size` connections, logged in with a password
//! spillway holds (auth file) or, where it holds only a SCRAM verifier, with the keys
//! a client's SCRAM proof revealed (passthrough), kept idle between leases.
//!
//! A session asks for a connection with [`Pool::acquire`] when it has something for
//! PostgreSQL, and gives it back with [`Leased::release`] at ReadyForQuery `I`. Waiting
//! is bounded by `pool.limits.queue_timeout` (then 53300). Nothing here reads what flows on a
//! leased connection: the session decides when the connection is idle.
//!
//! Invariants:
//! - At most `size` connections of a pool exist at once, leased or idle (a semaphore
//!   permit travels with each lease, and idle connections hold none but count
//!   against the pool through `open`).
//! - A connection goes back idle only when its session saw it idle; a connection whose
//!   lease ended any other way (the session ended mid-transaction, an I/O error) is
//!   closed, so no other client ever sees its state.
//! - Idle connections older than `pool.limits.lifetime` or idle longer than
//!   `pool.limits.idle_timeout` are never handed out, and are closed by the pool's sweep
//!   ([`sweep`], a task per pool) within a quarter of the shorter of the two (50 ms to
//!   10 s) even if nobody uses the pool again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::config::pool::PoolConfig;
use crate::error::SessionError;
use crate::net::cancel::UpstreamKey;
use crate::net::conn::Conn;
use crate::net::upstream::Connector;
use crate::protocol::prepared::ServerStatements;
use crate::protocol::scram::ScramKeys;
use crate::protocol::startup::StartupMessage;
use control::Control;
use login::login;
pub use login::md5_answer;
pub use show::{PoolStats, ServerRow};
use upkeep::{reset, still_open, sweep};

mod control;
mod login;
mod show;
mod upkeep;

/// `application_name` of pooled server connections.
const POOL_APP: &str = "spillway pool";

/// Every pool, by (database, user).
pub struct Pools {
    config: PoolConfig,
    connector: Connector,
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
    /// What the console paused (`PAUSE [db]`): pools created meanwhile start paused.
    paused: Mutex<control::Paused>,
}

impl Pools {
    pub fn new(config: PoolConfig, connector: Connector) -> Self {
        Self {
            config,
            connector,
            pools: Mutex::new(HashMap::new()),
            paused: Mutex::new(control::Paused::default()),
        }
    }

    /// The pool of `database` and `user`, created on first use; `secret` is what its
    /// connections log in with (`None`: nothing new; a password is kept over keys).
    pub fn get(&self, database: &str, user: &str, secret: Option<PoolSecret>) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        let pool = pools
            .entry((database.to_owned(), user.to_owned()))
            .or_insert_with(|| {
                let size = self.config.size_for(database, user) as usize;
                let paused = {
                    let p = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
                    p.all || p.databases.contains(database)
                };
                let pool = Arc::new(Pool {
                    control: Control::new(paused),
                    database: database.to_owned(),
                    user: user.to_owned(),
                    secret: Mutex::new(None),
                    permits: Arc::new(Semaphore::new(size)),
                    idle: Mutex::new(Vec::new()),
                    params: Mutex::new(None),
                    connector: self.connector.clone(),
                    limits: Limits {
                        size,
                        queue_timeout: self.config.queue_timeout,
                        idle_timeout: self.config.idle_timeout,
                        lifetime: self.config.lifetime,
                        reset_query: self.config.reset_query.clone(),
                        max_prepared: self.config.max_prepared_statements as usize,
                    },
                    open: AtomicUsize::new(0),
                    waiting: AtomicUsize::new(0),
                    wait_seconds: metrics::histogram!(crate::metrics::POOL_WAIT_SECONDS),
                    leases: metrics::counter!(crate::metrics::POOL_LEASES),
                    servers: Arc::new(Mutex::new(HashMap::new())),
                });
                tokio::spawn(sweep(Arc::downgrade(&pool)));
                pool
            })
            .clone();
        if let Some(new) = secret {
            let mut held = pool.secret.lock().unwrap_or_else(PoisonError::into_inner);
            if !matches!(
                (&*held, &new),
                (Some(PoolSecret::Password(_)), PoolSecret::Scram(_))
            ) {
                *held = Some(new);
            }
        }
        pool
    }
}

/// What a pool's connections log in with.
#[derive(Clone)]
pub enum PoolSecret {
    /// The password (auth file): cleartext, md5 or SCRAM, as PostgreSQL asks.
    Password(String),
    /// SCRAM passthrough: the keys a client's proof revealed (only a verifier held).
    Scram(ScramKeys),
    /// md5 passthrough: the hex of md5(password || user) (only an md5 hash held),
    /// which is all PostgreSQL's md5 method needs.
    Md5(String),
}

pub struct Pool {
    /// PAUSE and RECONNECT (`control.rs`).
    control: Control,
    database: String,
    user: String,
    secret: Mutex<Option<PoolSecret>>,
    permits: Arc<Semaphore>,
    /// Boxed: a connection moves between the stack and its leases by pointer (it
    /// moves at every lease and return; its struct is several hundred bytes).
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<Server>>>,
    /// The ParameterStatus a connection of this pool reported at login.
    params: Mutex<Option<Vec<(String, String)>>>,
    connector: Connector,
    limits: Limits,
    /// Connections open (leased or idle).
    open: AtomicUsize,
    waiting: AtomicUsize,
    /// Metric handles resolved once (a lease records both).
    wait_seconds: metrics::Histogram,
    leases: metrics::Counter,
    /// Its connections by backend pid (`SHOW SERVERS`).
    servers: Registry,
}

/// A pool's settings, resolved from `[pool]` and its overrides for the pool's
/// database and user.
struct Limits {
    size: usize,
    queue_timeout: Duration,
    idle_timeout: Duration,
    lifetime: Duration,
    reset_query: Option<String>,
    /// `pool.max_prepared_statements`.
    max_prepared: usize,
}

/// One server connection of a pool.
pub struct Server {
    pub conn: Conn,
    pub key: UpstreamKey,
    /// The pool's generation when it was opened: an older one is closed instead of
    /// going back idle (`RECONNECT`).
    generation: u64,
    /// The named statements spillway prepared on it for its clients
    /// (`protocol/prepared/`).
    pub statements: ServerStatements,
    created: Instant,
    idle_since: Instant,
    /// In the pool's idle stack (counted in `spillway_pool_idle_connections`).
    idle: bool,
    /// The pool's view of its connections, which this one leaves when dropped.
    registry: Registry,
    /// `spillway_pool_idle_connections`, resolved once (marked at every lease).
    idle_gauge: metrics::Gauge,
}

/// The pool's connections by backend pid, for `SHOW SERVERS`.
type Registry = Arc<Mutex<HashMap<i32, ServerInfo>>>;

#[derive(Debug, Clone, Copy)]
struct ServerInfo {
    created: Instant,
    /// The pool's generation when it was opened (older: to be closed, `RECONNECT`).
    generation: u64,
}

impl Server {
    /// Leased (`true`) or back in the idle stack.
    fn mark(&mut self, leased: bool) {
        if self.idle == leased {
            self.idle_gauge.increment(if leased { -1.0 } else { 1.0 });
        }
        self.idle = !leased;
    }
}

/// A server connection leased to one session. Dropped without
/// [`Leased::release`], the connection is closed.
pub struct Leased {
    /// `None` only once released.
    server: Option<Box<Server>>,
    pool: Arc<Pool>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Leased {
    fn drop(&mut self) {
        if self.server.take().is_some() {
            // Not released: the connection closes with its lease.
            self.pool.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::POOL_SERVER_CONNECTIONS).decrement(1.0);
        if self.idle {
            self.idle_gauge.decrement(1.0);
        }
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key.pid);
    }
}

impl Pool {
    /// A server connection for one transaction: an idle one, or a new one while the
    /// pool has room; waits up to `pool.limits.queue_timeout` for one to come back.
    pub async fn acquire(self: &Arc<Self>) -> Result<Leased, SessionError> {
        match self.try_acquire() {
            Ok(leased) => Ok(leased),
            Err(permit) => self.clone().acquire_waiting(permit).await,
        }
    }

    /// A lease taken at once, when a permit is free and an idle connection usable: no
    /// future, no timer, no allocation (the common case of a busy pool). Else the
    /// permit taken, if any, for [`Pool::acquire_waiting`].
    pub fn try_acquire(self: &Arc<Self>) -> Result<Leased, Option<OwnedSemaphorePermit>> {
        if self.control.paused.load(Ordering::Relaxed) {
            return Err(None);
        }
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => return Err(None),
        };
        self.wait_seconds.record(0.0);
        let Some(server) = self.take_idle() else {
            return Err(Some(permit));
        };
        self.leases.increment(1);
        Ok(Leased {
            server: Some(server),
            pool: self.clone(),
            permit: Some(permit),
        })
    }

    /// What [`Pool::try_acquire`] could not do at once: wait for a permit (unless one
    /// was taken), then an idle connection or a new one.
    pub async fn acquire_waiting(
        self: Arc<Self>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<Leased, SessionError> {
        let permit = match permit {
            Some(permit) => permit,
            None => self.queue().await?,
        };
        // Paused (the console's PAUSE) after the permit was taken: in flight, goes on.
        let server = match self.take_idle() {
            Some(server) => server,
            None => self.connect().await?,
        };
        self.leases.increment(1);
        Ok(Leased {
            server: Some(server),
            pool: self,
            permit: Some(permit),
        })
    }

    /// Waits in the pool's queue for a permit, up to `pool.limits.queue_timeout`.
    async fn queue(self: &Arc<Self>) -> Result<OwnedSemaphorePermit, SessionError> {
        let started = Instant::now();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::POOL_WAITING).increment(1.0);
        // While paused, first the RESUME, then a permit: one timeout for both.
        let permit = tokio::time::timeout(self.limits.queue_timeout, async {
            self.until_resumed().await;
            self.permits.clone().acquire_owned().await
        })
        .await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::POOL_WAITING).decrement(1.0);
        self.wait_seconds.record(started.elapsed().as_secs_f64());
        match permit {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                metrics::counter!(crate::metrics::POOL_WAIT_TIMEOUTS).increment(1);
                Err(SessionError::PoolTimeout(self.limits.queue_timeout))
            }
        }
    }

    /// `pool.max_prepared_statements`: statements one connection holds for clients.
    pub fn max_prepared(&self) -> usize {
        self.limits.max_prepared
    }

    fn take_idle(&self) -> Option<Box<Server>> {
        let now = Instant::now();
        loop {
            // The lock is held for the pop only: the checks below need none.
            let mut server = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()?;
            if server.generation == self.control.generation.load(Ordering::Relaxed)
                && now.saturating_duration_since(server.idle_since) < self.limits.idle_timeout
                && now.saturating_duration_since(server.created) < self.limits.lifetime
                && still_open(&mut server.conn)
            {
                server.mark(true);
                return Some(server);
            }
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The ParameterStatus a client of this pool is greeted with: a connection's, or
    /// `None` when no connection could be made yet.
    pub fn params(&self) -> Option<Vec<(String, String)>> {
        self.params
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes sure the pool knows its server's parameters: opens one connection (kept
    /// idle) if none was ever made. An error means PostgreSQL cannot be reached or
    /// refused the login.
    pub async fn warm(self: &Arc<Self>) -> Result<(), SessionError> {
        if self.params().is_some() {
            return Ok(());
        }
        let leased = self.acquire().await?;
        leased.release();
        Ok(())
    }

    /// Opens a server connection logged in as this pool's role, outside the pool (not
    /// counted against `pool.size`): the database's listener connection
    /// (`net/notify/`), named `application_name` `app`.
    pub async fn connect_dedicated(&self, app: &str) -> Result<(Conn, UpstreamKey), SessionError> {
        let (conn, key, _) = self.open_logged_in(app).await?;
        Ok((conn, key))
    }

    /// A new connection to the pool's database, logged in as its role.
    async fn open_logged_in(
        &self,
        app: &str,
    ) -> Result<(Conn, UpstreamKey, Vec<(String, String)>), SessionError> {
        let mut conn = Conn::new(self.connector.connect().await?);
        let startup = StartupMessage::build(&[
            ("user", &self.user),
            ("database", &self.database),
            ("application_name", app),
            ("client_encoding", "UTF8"),
        ]);
        conn.send(&startup)
            .await
            .map_err(SessionError::UpstreamIo)?;
        let secret = self
            .secret
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (key, params) = login(&mut conn, &self.user, secret.as_ref()).await?;
        Ok((conn, key, params))
    }

    /// Opens and logs in a new server connection.
    async fn connect(&self) -> Result<Box<Server>, SessionError> {
        let generation = self.control.generation.load(Ordering::SeqCst);
        let (conn, key, params) = self.open_logged_in(POOL_APP).await?;
        *self.params.lock().unwrap_or_else(PoisonError::into_inner) = Some(params);
        self.open.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::POOL_SERVER_CONNECTIONS).increment(1.0);
        let now = Instant::now();
        self.servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                key.pid,
                ServerInfo {
                    created: now,
                    generation,
                },
            );
        Ok(Box::new(Server {
            conn,
            key,
            statements: ServerStatements::default(),
            created: now,
            generation,
            idle_since: now,
            idle: false,
            registry: self.servers.clone(),
            idle_gauge: metrics::gauge!(crate::metrics::POOL_IDLE_CONNECTIONS),
        }))
    }

    fn put_idle(&self, mut server: Box<Server>) {
        let now = Instant::now();
        if now.saturating_duration_since(server.created) >= self.limits.lifetime
            || server.generation != self.control.generation.load(Ordering::Relaxed)
        {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        server.idle_since = now;
        server.mark(false);
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(server);
    }
}

impl Leased {
    /// The leased connection.
    pub fn conn(&mut self) -> Option<&mut Conn> {
        self.server.as_mut().map(|s| &mut s.conn)
    }

    /// The leased connection and the statements it holds for clients.
    pub fn parts(&mut self) -> Option<(&mut Conn, &mut ServerStatements)> {
        self.server
            .as_mut()
            .map(|s| (&mut s.conn, &mut s.statements))
    }

    /// PostgreSQL's key of the leased connection, for cancel requests.
    pub fn key(&self) -> Option<&UpstreamKey> {
        self.server.as_ref().map(|s| &s.key)
    }

    /// The session saw the connection idle (ReadyForQuery `I`, nothing outstanding):
    /// it goes back to the pool, after `pool.limits.reset_query` when one is set. (Dropping
    /// a lease instead closes its connection.)
    pub fn release(self) {
        self.release_with(None);
    }

    /// [`Leased::release`], running `extra` (the session changed settings: `RESET
    /// ALL`) before `pool.limits.reset_query`.
    pub fn release_with(mut self, extra: Option<&'static str>) {
        let (Some(mut server), Some(permit)) = (self.server.take(), self.permit.take()) else {
            return;
        };
        if extra.is_none() && self.pool.limits.reset_query.is_none() {
            // Back idle before the permit (dropped on return) is, so a session the
            // permit wakes finds the connection.
            self.pool.put_idle(server);
            return;
        }
        let pool = self.pool.clone();
        let queries: Vec<String> = extra
            .map(str::to_owned)
            .into_iter()
            .chain(pool.limits.reset_query.clone())
            .collect();
        // The permit stays taken until the reset is done: nobody may lease the
        // connection before.
        tokio::spawn(async move {
            let _permit = permit;
            for query in &queries {
                if reset(&mut server.conn, query).await.is_err() {
                    pool.open.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                let lower = query.to_ascii_lowercase();
                if lower.contains("discard") || lower.contains("deallocate") {
                    // Its prepared statements may be gone.
                    server.statements.clear();
                }
            }
            pool.put_idle(server);
        });
    }
}

/// The ParameterStatus a pooled client is greeted with when no server connection
/// could be made (PostgreSQL down): what drivers need to go on.
pub fn fallback_params() -> Vec<(String, String)> {
    [
        ("server_version", "16.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}
