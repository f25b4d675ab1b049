//! One service connection per database the cache serves (sqlx, ADR 0018): it loads
//! the catalog snapshot, reloads it on request (DDL, unknown names) and periodically,
//! and with `cache.invalidation = "notify"` LISTENs on `spillway_invalidate` (a
//! `PgListener`), bumping the version of each table an external writer changed.
//!
//! The task runs while the database is leased (sessions on it, the write side on its
//! own): [`IDLE_RELEASE`] after the last lease is dropped it closes the connection and
//! ends, and the next lease starts a new one, so spillway never keeps a database
//! nobody uses (or one that was dropped) busy. A release
//! ([`super::ReadCache::release_databases`]) closes the connection at once and keeps
//! it closed for [`RELEASE_HOLD`] unless a session takes a new lease.
//!
//! Invariant: while the connection is down the database has no catalog (nothing is
//! served or stored), and in notify mode every entry of the database is invalidated
//! whenever it closes, since notifications sent meanwhile are gone. Reconnects back
//! off up to [`MAX_BACKOFF`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use spillway_policies::Invalidation;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Acquire, PgConnection};

use tokio::time::Instant;

use super::stream::{self, Follower, StreamError};
use super::{DbState, ReadCache, Want};
use crate::net::upstream::Connector;
use crate::read::catalog::{self, Catalog};

/// Notification channel the triggers installed by `spillway install-triggers` use.
pub const CHANNEL: &str = "spillway_invalidate";
/// `application_name` of the service connections' backends.
pub const SERVICE_APP: &str = "spillway cache service";
/// External DDL is not announced; a periodic reload bounds how long it goes unseen.
const RELOAD_EVERY: Duration = Duration::from_secs(60);
const MIN_RELOAD_GAP: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a database nobody uses keeps its service connection: short enough that a
/// `DROP DATABASE` sent elsewhere right after the last session left succeeds
/// (PostgreSQL waits up to 5 s for other sessions to go), long enough that a client
/// connecting per request does not reload the catalog every time.
const IDLE_RELEASE: Duration = Duration::from_secs(3);
/// How long a released connection stays closed unless a session takes a new lease:
/// the statement that asked for the release runs meanwhile.
const RELEASE_HOLD: Duration = Duration::from_secs(10);

pub struct Spawner {
    pub runtime: tokio::runtime::Handle,
    pub connector: Connector,
    pub url: String,
}

impl Spawner {
    pub fn spawn(&self, cache: Arc<ReadCache>, db: Arc<DbState>) {
        let timeout = self.connector.connect_timeout;
        let url = self.url.clone();
        self.runtime
            .spawn(async move { run(cache, db, url, timeout).await });
    }
}

async fn run(cache: Arc<ReadCache>, db: Arc<DbState>, url: String, timeout: Duration) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let exit = match db.want() {
            Want::Serve => match Service::connect(&url, &db.name, timeout).await {
                Ok(mut service) => {
                    backoff = Duration::from_millis(100);
                    let exit = serve(&cache, &db, &mut service.listener).await;
                    // Closed before anyone is told: a DROP DATABASE waits for this.
                    service.close().await;
                    exit
                }
                Err(reason) => {
                    tracing::warn!(database = %db.name, %reason, "cache service connection failed; retrying");
                    Exit::Lost
                }
            },
            Want::Idle => Exit::Idle,
            Want::Release => Exit::Released,
        };
        // The stream is marked lost before the catalog goes: a read served uncached
        // from here on never finds it still reported as following.
        if cache.invalidation == Invalidation::Replication {
            stream::lost(&db, &cache.sinks);
        } else if cache.invalidation == Invalidation::Notify {
            // Writes by others are not heard while it is closed.
            db.versions.bump_all();
        }
        db.set_catalog(None);
        match exit {
            Exit::Lost => {
                // Leases and release requests are looked at again after the pause.
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = db.changed() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Exit::Idle => {}
            Exit::Released => hold(&db).await,
        }
        if !db.carry_on() {
            tracing::debug!(database = %db.name, "no session uses the database; its cache service connection is closed");
            return;
        }
    }
}

/// Why [`serve`] returned.
enum Exit {
    /// The connection was lost (or could not be opened).
    Lost,
    /// Nobody held a lease for [`IDLE_RELEASE`].
    Idle,
    /// A statement needs the database to itself ([`super::ReadCache::release_databases`]).
    Released,
}

/// After a release: the connection stays closed for [`RELEASE_HOLD`] (the statement
/// that asked for it is running), unless a session takes a new lease meanwhile.
async fn hold(db: &DbState) {
    let taken = db.released();
    let until = tokio::time::Instant::now() + RELEASE_HOLD;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return,
            () = db.changed() => {
                if db.taken() != taken || db.want() == Want::Idle {
                    return;
                }
            }
        }
    }
}

/// The service connection of one database: a one-connection pool (what sqlx's
/// `PgListener` is built on), held by the listener.
struct Service {
    pool: PgPool,
    listener: PgListener,
}

impl Service {
    /// Connects to `database` with `url`'s host, credentials and TLS settings, within
    /// `timeout`.
    async fn connect(url: &str, database: &str, timeout: Duration) -> Result<Self, String> {
        let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| e.to_string())?;
        let options = options.database(database).application_name(SERVICE_APP);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(timeout)
            .test_before_acquire(false)
            .connect_with(options);
        let pool = tokio::time::timeout(timeout, pool)
            .await
            .map_err(|_| format!("no connection within {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|e| e.to_string())?;
        // A lost connection is reported (and handled here), never reopened silently:
        // notifications sent meanwhile are gone.
        listener.eager_reconnect(false);
        listener.ignore_pool_close_event(true);
        Ok(Self { pool, listener })
    }

    /// Closes the connection (Terminate), and returns once it is closed.
    async fn close(self) {
        drop(self.listener);
        self.pool.close().await;
    }
}

/// Runs until the connection fails, nobody uses the database for [`IDLE_RELEASE`], or
/// a release is requested; returns which.
async fn serve(cache: &ReadCache, db: &DbState, listener: &mut PgListener) -> Exit {
    if db.want() == Want::Release {
        return Exit::Released;
    }
    if cache.invalidation == Invalidation::Notify
        && let Err(err) = listener.listen(CHANNEL).await
    {
        return lost(db, &err.to_string());
    }
    let mut follower = (cache.invalidation == Invalidation::Replication)
        .then(|| Follower::new(&cache.replication, &db.name));
    if let Some(f) = &mut follower {
        // Before the catalog: nothing is served from the cache until the slot is
        // drained (changes made while spillway was away are applied first).
        if let Err(err) = follow(cache, db, listener, f).await {
            return lost(db, &err.to_string());
        }
    }
    if let Err(err) = reload(db, listener).await {
        return lost(db, &err.to_string());
    }
    let poll_every = cache.replication.poll_interval;
    let mut poll_at = Instant::now();
    let mut reload_at = Instant::now() + RELOAD_EVERY;
    let mut idle_since: Option<Instant> = None;
    loop {
        let idle_until = match db.want() {
            Want::Release => {
                if let Some(f) = follower.as_ref().filter(|_| cache.replication.create) {
                    // The statement that asked may be a DROP DATABASE, which a slot
                    // on the database would block; the slot is recreated (and the
                    // cache dropped) when the database is served again.
                    drop_slot(db, listener, &f.slot).await;
                }
                return Exit::Released;
            }
            Want::Idle => {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= IDLE_RELEASE {
                    return Exit::Idle;
                }
                since + IDLE_RELEASE
            }
            Want::Serve => {
                idle_since = None;
                reload_at
            }
        };
        let mut poll_now = false;
        tokio::select! {
            () = tokio::time::sleep_until(poll_at), if follower.is_some() => poll_now = true,
            // Cancel-safe: a message is consumed only once it is whole.
            received = listener.try_recv(), if follower.is_none() => match received {
                Ok(Some(n)) => match (n.payload().parse::<u32>(), db.catalog()) {
                    // The trigger names the table the statement targeted; its parents
                    // and partitions change with it.
                    (Ok(oid), Some(catalog)) => {
                        let mut tables = Vec::new();
                        catalog.write_targets_by_oid(oid, &mut tables);
                        db.versions.bump_tables(tables);
                    }
                    _ => db.versions.bump_all(),
                },
                Ok(None) => return lost(db, "connection closed"),
                Err(err) => return lost(db, &err.to_string()),
            },
            () = db.refresh.notified() => {
                // A snapshot that exists but lacks a name is refreshed at most once
                // per interval (a client repeating a query on a missing table must not
                // turn into a reload loop); a discarded one (DDL) is reloaded now.
                if db.catalog().is_some() {
                    tokio::time::sleep(MIN_RELOAD_GAP).await;
                }
                if let Err(err) = reload(db, listener).await {
                    return lost(db, &err.to_string());
                }
                reload_at = Instant::now() + RELOAD_EVERY;
            }
            () = tokio::time::sleep_until(reload_at) => {
                if let Err(err) = reload(db, listener).await {
                    return lost(db, &err.to_string());
                }
                reload_at = Instant::now() + RELOAD_EVERY;
            }
            // Leases or a release request changed; the idle period may be over.
            () = db.changed() => {}
            () = tokio::time::sleep_until(idle_until) => {}
        }
        if let (true, Some(f)) = (poll_now, &mut follower) {
            let more = match poll(cache, db, listener, f).await {
                Ok(more) => more,
                Err(err) => return lost(db, &err.to_string()),
            };
            poll_at = if more {
                Instant::now()
            } else {
                Instant::now() + poll_every
            };
        }
    }
}

/// One round of the change stream (a failure that needs a new slot position gets it,
/// see [`follow`]).
async fn poll(
    cache: &ReadCache,
    db: &DbState,
    listener: &mut PgListener,
    f: &mut Follower,
) -> Result<bool, StreamError> {
    let conn: &mut PgConnection = listener.acquire().await?;
    match f.poll(conn, db, &cache.sinks).await {
        Err(err) if err.resets_slot() => {
            reset(cache, db, conn, f, &err).await?;
            Ok(false)
        }
        other => other,
    }
}

/// (Re)starts following: the checks, the slot drained (recreated first when it is
/// gone, undecodable or over its bound). The catalog may stay installed across a
/// reset: the epoch bumps and the drained, recreated slot keep it exact.
async fn follow(
    cache: &ReadCache,
    db: &DbState,
    listener: &mut PgListener,
    f: &mut Follower,
) -> Result<(), StreamError> {
    let conn: &mut PgConnection = listener.acquire().await?;
    match f
        .start(conn, db, &cache.sinks, cache.replication.create)
        .await
    {
        Err(err) if err.resets_slot() => reset(cache, db, conn, f, &err).await,
        other => other,
    }
}

/// Drops the database's cache, recreates the slot at the current position, follows
/// from there; logged once per reset with its reason.
async fn reset(
    cache: &ReadCache,
    db: &DbState,
    conn: &mut PgConnection,
    f: &mut Follower,
    err: &StreamError,
) -> Result<(), StreamError> {
    stream::lost(db, &cache.sinks);
    db.stream.resets.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(database = %db.name, slot = %f.slot, reason = %err, "change stream reset: the database's cached entries are dropped and the slot recreated at the current position");
    f.recover(conn, err).await?;
    f.start(conn, db, &cache.sinks, cache.replication.create)
        .await
}

async fn drop_slot(db: &DbState, listener: &mut PgListener, slot: &str) {
    let dropped = match listener.acquire().await {
        Ok(conn) => stream::setup::drop_slot(conn, slot)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(reason) = dropped {
        tracing::warn!(database = %db.name, slot, %reason, "could not drop the database's replication slot before releasing it");
    }
}

/// Logs a lost connection (or change stream): once per distinct reason in a row.
fn lost(db: &DbState, reason: &str) -> Exit {
    if db.stream.note_failure(reason) {
        tracing::warn!(database = %db.name, %reason, "cache service connection lost; database served uncached until it is back");
    } else {
        tracing::debug!(database = %db.name, %reason, "cache service connection still failing");
    }
    Exit::Lost
}

async fn reload(db: &DbState, listener: &mut PgListener) -> Result<(), sqlx::Error> {
    loop {
        let generation = db.generation.load(Ordering::SeqCst);
        let conn: &mut PgConnection = listener.acquire().await?;
        let catalog: Catalog = catalog::load::load(conn).await?;
        let relations = catalog.relation_count();
        // DDL acknowledged while loading: this snapshot may predate it; load again.
        if db.install(Arc::new(catalog), generation) {
            tracing::debug!(database = %db.name, relations, "catalog loaded");
            return Ok(());
        }
    }
}
