//! The write service's questions to PostgreSQL on the write path: whether a role may
//! write a table (`has_table_privilege`, answers reused for [`PRIVILEGE_TTL`]) and
//! whether a key exists (the point reads of `row_counts = "exact"`), on a few check
//! connections of their own (`application_name` [`CHECKS_APP`]).
//!
//! Invariants:
//! - A check never waits longer than [`CHECK_CONNECT_TIMEOUT`] for a connection: while
//!   PostgreSQL is unreachable a write that needs a check is refused (retryable 08006)
//!   rather than held.
//! - A privilege answer outlives its TTL only while PostgreSQL cannot be reached (a
//!   lost or refused connection), never after another error.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use super::{CHECKS_APP, DeferError, WriteService, apply, connect_as};
use crate::write::convert::Verb;
use crate::write::tables::DeferredTable;

/// Privilege answers by (role, table, verb), with when they were asked.
pub(super) type Privileges = HashMap<(String, String, Verb), (bool, Instant)>;

/// How long a privilege answer is reused before it is asked again.
const PRIVILEGE_TTL: Duration = Duration::from_secs(5);

/// How long opening the check connection may take.
const CHECK_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Upstream connections for point reads (`row_counts = "exact"`) and privilege checks.
pub(super) const CHECK_CONNECTIONS: usize = 4;

/// A check connection's failure: PostgreSQL unreachable for now (connection loss,
/// shutting down, starting up), or an answer that says something else went wrong.
fn unreachable_or_upstream(e: &sqlx::Error) -> DeferError {
    // Only a lost or refused connection: a lock or statement timeout is an answer, and
    // must not let an old privilege answer stand.
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
        DeferError::Unreachable(e.to_string())
    } else {
        DeferError::Upstream(e.to_string())
    }
}

impl WriteService {
    /// Whether `user` holds the privilege `verb` needs on `table`. An answer is
    /// reused for [`PRIVILEGE_TTL`], so a REVOKE takes effect within it; past it, and
    /// only while PostgreSQL cannot be reached, the last answer is reused.
    pub(super) async fn permitted(
        &self,
        user: &str,
        t: &DeferredTable,
        verb: Verb,
    ) -> Result<bool, DeferError> {
        let table = t.meta.name.as_str();
        let k = (user.to_owned(), t.meta.name.clone(), verb);
        let known = self.privileges_map().get(&k).copied();
        if let Some((ok, at)) = known
            && at.elapsed() < PRIVILEGE_TTL
        {
            return Ok(ok);
        }
        let oid = i64::from(t.oid);
        let privilege = match verb {
            Verb::Insert => "INSERT",
            Verb::Update => "UPDATE",
            Verb::Delete => "DELETE",
        };
        let asked = self
            .check(|conn| {
                let user = user.to_owned();
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
            .await;
        let ok: bool = match (asked, known) {
            (Ok(ok), _) => ok,
            // PostgreSQL cannot be asked (it is down: detached sessions keep writing):
            // the last answer it gave stands until it can be asked again. Nothing can
            // be revoked while it is down, so the answer is at most PRIVILEGE_TTL
            // older than the outage, as it would be anyway.
            (Err(DeferError::Unreachable(e)), Some((ok, _))) => {
                tracing::debug!(user, table, error = %e, "privilege check unreachable; last answer stands");
                return Ok(ok);
            }
            (Err(e), _) => return Err(e),
        };
        self.privileges_map().insert(k, (ok, Instant::now()));
        Ok(ok)
    }

    /// The answer [`Self::permitted`] would give without asking PostgreSQL, if it has
    /// a fresh one.
    pub(super) fn permitted_now(&self, user: &str, t: &DeferredTable, verb: Verb) -> Option<bool> {
        let k = (user.to_owned(), t.meta.name.clone(), verb);
        self.privileges_map()
            .get(&k)
            .filter(|(_, at)| at.elapsed() < PRIVILEGE_TTL)
            .map(|(ok, _)| *ok)
    }

    fn privileges_map(&self) -> std::sync::MutexGuard<'_, Privileges> {
        match self.privileges.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether the row with `key` exists upstream now.
    pub(super) async fn exists_upstream(
        &self,
        t: &DeferredTable,
        key: &[String],
    ) -> Result<bool, DeferError> {
        let sql = t.exists_sql.clone();
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

    /// Runs `f` on the check connection, connecting (once more after a failure).
    async fn check<T>(
        &self,
        f: impl for<'c> Fn(
            &'c mut PgConnection,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, sqlx::Error>> + Send + 'c>,
        >,
    ) -> Result<T, DeferError> {
        // A free slot if there is one, else the next in turn.
        let mut guard = match self.checks.iter().find_map(|m| m.try_lock().ok()) {
            Some(guard) => guard,
            None => {
                let i = self.next_check.fetch_add(1, Ordering::Relaxed) % self.checks.len();
                match self.checks.get(i) {
                    Some(slot) => slot.lock().await,
                    None => return Err(DeferError::Upstream("no check connection".to_owned())),
                }
            }
        };
        for attempt in 0..2 {
            if guard.is_none() {
                // Bounded: while PostgreSQL is unreachable, a write that needs a
                // check is refused (retryable) rather than held for a TCP timeout.
                let connected =
                    tokio::time::timeout(CHECK_CONNECT_TIMEOUT, connect_as(&self.url, CHECKS_APP))
                        .await
                        .map_err(|_| {
                            DeferError::Unreachable(format!(
                                "no connection within {CHECK_CONNECT_TIMEOUT:?}"
                            ))
                        })?;
                *guard = Some(connected.map_err(|e| unreachable_or_upstream(&e))?);
            }
            let Some(conn) = guard.as_mut() else { continue };
            match f(conn).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 && apply::is_transient(&e) => *guard = None,
                Err(e) => return Err(unreachable_or_upstream(&e)),
            }
        }
        Err(DeferError::Unreachable(
            "check connection failed twice".to_owned(),
        ))
    }
}
