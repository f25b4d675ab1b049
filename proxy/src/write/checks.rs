//! [`PgChecks`]: the engine's questions on the write path (`engine::Checks`), asked on
//! a few check connections of their own (`application_name` [`CHECKS_APP`]): whether
//! a role may write a table (`has_table_privilege`, by OID) and whether a key exists
//! (the point reads of `row_counts = "exact"`). How long answers are reused is the
//! engine's rule (`engine/privileges.rs`).
//!
//! Invariants:
//! - A check never waits longer than [`CHECK_CONNECT_TIMEOUT`] for a connection: while
//!   PostgreSQL is unreachable a write that needs a check is refused (retryable 08006)
//!   rather than held.
//! - Only a lost or refused connection is `Unreachable` (which lets an old privilege
//!   answer stand); a lock or statement timeout is an answer, `Failed`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use spillway_policies::engine::{CheckError, Checks, DeferredTable, Verb};
use sqlx::PgConnection;

use super::apply::{self, connect_as};

/// `application_name` of the check connections' backends, so that an operator (or a
/// test) can tell them apart in `pg_stat_activity`.
pub const CHECKS_APP: &str = "spillway checks";

/// How long opening a check connection may take.
const CHECK_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Upstream connections for point reads (`row_counts = "exact"`) and privilege checks.
const CHECK_CONNECTIONS: usize = 4;

type Query<'c, T> = Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'c>>;

/// The check connections of the backend database.
pub struct PgChecks {
    url: String,
    /// [`CHECK_CONNECTIONS`] slots, each connected on first use: concurrent point
    /// reads of different sessions run side by side instead of queueing on one.
    slots: Vec<tokio::sync::Mutex<Option<PgConnection>>>,
    /// Where the next check that finds every slot busy waits.
    next: AtomicUsize,
}

/// A check connection's failure: unreachable for now, or an answer.
fn unreachable_or_failed(e: &sqlx::Error) -> CheckError {
    let lost = match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P0")),
        _ => false,
    };
    if lost {
        CheckError::Unreachable(e.to_string())
    } else {
        CheckError::Failed(e.to_string())
    }
}

impl PgChecks {
    pub fn new(url: String) -> Self {
        Self {
            url,
            slots: (0..CHECK_CONNECTIONS)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Runs `f` on a check connection, connecting (once more after a failure).
    async fn check<T>(
        &self,
        f: impl for<'c> Fn(&'c mut PgConnection) -> Query<'c, T>,
    ) -> Result<T, CheckError> {
        // A free slot if there is one, else the next in turn.
        let mut guard = match self.slots.iter().find_map(|m| m.try_lock().ok()) {
            Some(guard) => guard,
            None => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
                match self.slots.get(i) {
                    Some(slot) => slot.lock().await,
                    None => return Err(CheckError::Failed("no check connection".to_owned())),
                }
            }
        };
        for attempt in 0..2 {
            if guard.is_none() {
                let connected =
                    tokio::time::timeout(CHECK_CONNECT_TIMEOUT, connect_as(&self.url, CHECKS_APP))
                        .await
                        .map_err(|_| {
                            CheckError::Unreachable(format!(
                                "no connection within {CHECK_CONNECT_TIMEOUT:?}"
                            ))
                        })?;
                *guard = Some(connected.map_err(|e| unreachable_or_failed(&e))?);
            }
            let Some(conn) = guard.as_mut() else { continue };
            match f(conn).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 && apply::is_transient(&e) => *guard = None,
                Err(e) => return Err(unreachable_or_failed(&e)),
            }
        }
        Err(CheckError::Unreachable(
            "check connection failed twice".to_owned(),
        ))
    }
}

impl Checks for PgChecks {
    async fn privilege(
        &self,
        user: &str,
        table: &DeferredTable,
        verb: Verb,
    ) -> Result<bool, CheckError> {
        let oid = i64::from(table.oid);
        let privilege = verb.privilege();
        let user = user.to_owned();
        self.check(|conn| {
            let user = user.clone();
            Box::pin(async move {
                // By OID: a name would need quoting, and could match another table.
                sqlx::query_scalar(
                    "SELECT pg_catalog.has_table_privilege($1, $2::int8::oid, $3) \
                     AND (NOT $4 OR pg_catalog.has_table_privilege($1, $2::int8::oid, 'SELECT'))",
                )
                .bind(user)
                .bind(oid)
                .bind(privilege)
                // UPDATE/DELETE … WHERE key = … also needs SELECT in PostgreSQL.
                .bind(verb != Verb::Insert)
                .fetch_one(conn)
                .await
            })
        })
        .await
    }

    async fn exists(&self, table: &DeferredTable, key: &[String]) -> Result<bool, CheckError> {
        let sql = table.exists_sql.clone();
        let key = key.to_vec();
        self.check(|conn| {
            let sql = sql.clone();
            let key = key.clone();
            Box::pin(async move {
                let mut q = sqlx::query_scalar::<_, bool>(&sql);
                for k in key {
                    q = q.bind(k);
                }
                q.fetch_one(conn).await
            })
        })
        .await
    }
}
