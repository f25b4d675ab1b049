//! [`PgChecks`]: the engine's questions on the write path (`engine::Checks`), asked on
//! a few check connections of their own (`application_name` [`CHECKS_APP`]): whether
//! a role may write a table (`has_table_privilege`, by OID) and whether keys exist
//! (the point reads of `row_counts = "exact"`, many keys in one query: the engine
//! batches them); and, on a connection of its own ([`KEYS_APP`]), the key index's
//! loading queries (keyset pagination in key order, one short statement a chunk, so
//! no lock is held for long) and the WAL position. How long answers are reused is the
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

use spillway_policies::engine::{
    CheckError, Checks, Chunk, Cursor, DeferredTable, KeyKind, RowValues, Verb,
};
use spillway_policies::writes::plan::ident;
use sqlx::{PgConnection, Row};

use super::apply::{self, connect_as};

/// `application_name` of the check connections' backends, so that an operator (or a
/// test) can tell them apart in `pg_stat_activity`.
pub const CHECKS_APP: &str = "spillway checks";

/// `application_name` of the key index loader's connection.
pub const KEYS_APP: &str = "spillway keys";

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
    slots: Vec<Slot>,
    /// Where the next check that finds every slot busy waits.
    next: AtomicUsize,
    /// The key index loader's connection (one loader, one query at a time).
    loader: Slot,
    /// This instance's journal id in `spillway.flush_ledger`: a guarded write's read
    /// takes the ledger's position in the same snapshot (ADR 0035).
    journal_id: Option<String>,
}

type Slot = tokio::sync::Mutex<Option<PgConnection>>;

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
    pub fn new(url: String, journal_id: Option<String>) -> Self {
        Self {
            journal_id,
            url,
            slots: (0..CHECK_CONNECTIONS)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            loader: tokio::sync::Mutex::new(None),
        }
    }

    /// `values` (canonical timestamptz text) as PostgreSQL's output gives them with
    /// `TimeZone = zone` and `DateStyle = ISO`: RETURNING's text for a client session
    /// in a zone other than UTC, whose offsets need PostgreSQL's own zone rules. Run in
    /// a transaction of its own so the settings end with it.
    pub async fn timestamptz_texts(
        &self,
        zone: &str,
        values: &[String],
    ) -> Result<Vec<String>, CheckError> {
        let zone = zone.to_owned();
        let values = values.to_vec();
        self.check(|conn| {
            let zone = zone.clone();
            let values = values.clone();
            Box::pin(async move {
                let mut tx = sqlx::Connection::begin(conn).await?;
                sqlx::query(
                    "SELECT pg_catalog.set_config('TimeZone', $1, true), \
                            pg_catalog.set_config('DateStyle', 'ISO', true)",
                )
                .bind(zone)
                .execute(&mut *tx)
                .await?;
                let texts: Vec<String> = sqlx::query_scalar(
                    "SELECT u.v::timestamptz::text FROM pg_catalog.unnest($1::text[]) \
                     WITH ORDINALITY AS u(v, n) ORDER BY u.n",
                )
                .bind(values)
                .fetch_all(&mut *tx)
                .await?;
                tx.rollback().await?;
                Ok(texts)
            })
        })
        .await
    }

    /// Runs `f` on a check connection, connecting (once more after a failure).
    async fn check<T>(
        &self,
        f: impl for<'c> Fn(&'c mut PgConnection) -> Query<'c, T>,
    ) -> Result<T, CheckError> {
        // A free slot if there is one, else the next in turn.
        let guard = match self.slots.iter().find_map(|m| m.try_lock().ok()) {
            Some(guard) => guard,
            None => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
                match self.slots.get(i) {
                    Some(slot) => slot.lock().await,
                    None => return Err(CheckError::Failed("no check connection".to_owned())),
                }
            }
        };
        self.run(guard, CHECKS_APP, f).await
    }

    /// Runs `f` on the connection behind `guard` (named `app`), connecting (once more
    /// after a failure).
    async fn run<T>(
        &self,
        mut guard: tokio::sync::MutexGuard<'_, Option<PgConnection>>,
        app: &str,
        f: impl for<'c> Fn(&'c mut PgConnection) -> Query<'c, T>,
    ) -> Result<T, CheckError> {
        for attempt in 0..2 {
            if guard.is_none() {
                let connected =
                    tokio::time::timeout(CHECK_CONNECT_TIMEOUT, connect_as(&self.url, app))
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

    async fn exists_many(
        &self,
        table: &DeferredTable,
        keys: &[Vec<String>],
    ) -> Result<Vec<bool>, CheckError> {
        let sql = exists_many_sql(table);
        let columns = transpose(keys, table.meta.key.len());
        let found: Vec<i64> = self
            .check(|conn| {
                let sql = sql.clone();
                let columns = columns.clone();
                Box::pin(async move {
                    let mut q = sqlx::query_scalar::<_, i64>(&sql);
                    for c in columns {
                        q = q.bind(c);
                    }
                    q.fetch_all(conn).await
                })
            })
            .await?;
        let mut exists = vec![false; keys.len()];
        for n in found {
            // Ordinals count from 1.
            if let Some(e) = usize::try_from(n - 1).ok().and_then(|i| exists.get_mut(i)) {
                *e = true;
            }
        }
        Ok(exists)
    }

    async fn row_values(
        &self,
        table: &DeferredTable,
        key: &[String],
        columns: &[String],
    ) -> Result<RowValues, CheckError> {
        let sql = row_values_sql(table, columns);
        let key = key.to_vec();
        let width = columns.len();
        let journal = self.journal_id.clone().unwrap_or_default();
        let (found, through, values) = self
            .check(|conn| {
                let sql = sql.clone();
                let key = key.clone();
                let journal = journal.clone();
                Box::pin(async move {
                    let mut q = sqlx::query(&sql).bind(journal);
                    for k in key {
                        q = q.bind(k);
                    }
                    let row = q.fetch_one(conn).await?;
                    let found: bool = row.try_get(0)?;
                    let through: Option<i64> = row.try_get(1)?;
                    let values = (0..width)
                        .map(|i| row.try_get::<Option<String>, _>(i + 2))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((found, through, values))
                })
            })
            .await?;
        Ok(RowValues {
            values: found.then_some(values),
            through: self
                .journal_id
                .as_ref()
                .and(through)
                .and_then(|t| u64::try_from(t).ok()),
        })
    }

    async fn key_chunk(
        &self,
        table: &DeferredTable,
        kind: KeyKind,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Chunk, CheckError> {
        let sql = chunk_sql(table, kind, after.is_some());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = after.cloned();
        let guard = self.loader.lock().await;
        self.run(guard, KEYS_APP, |conn| {
            let sql = sql.clone();
            let after = after.clone();
            Box::pin(async move { read_chunk(conn, &sql, kind, after, limit).await })
        })
        .await
    }

    async fn wal_position(&self) -> Result<u64, CheckError> {
        let guard = self.loader.lock().await;
        let lsn: i64 = self
            .run(guard, KEYS_APP, |conn| {
                Box::pin(async move {
                    sqlx::query_scalar(apply::WAL_POSITION)
                        .fetch_one(conn)
                        .await
                })
            })
            .await?;
        u64::try_from(lsn).map_err(|_| CheckError::Failed(format!("WAL position {lsn}")))
    }
}

/// `keys` (one entry per key column each) as one array per key column.
fn transpose(keys: &[Vec<String>], columns: usize) -> Vec<Vec<String>> {
    (0..columns)
        .map(|i| {
            keys.iter()
                .map(|k| k.get(i).cloned().unwrap_or_default())
                .collect()
        })
        .collect()
}

/// `table` as `"schema"."name"`, and each key column with its type.
fn key_columns(table: &DeferredTable) -> (String, Vec<(String, &str)>) {
    let name = format!("{}.{}", ident(&table.meta.schema), ident(&table.meta.table));
    let cols = table
        .meta
        .key
        .iter()
        .map(|k| {
            let ty = table.meta.types.get(k).map_or("text", String::as_str);
            (ident(k), ty)
        })
        .collect();
    (name, cols)
}

/// A guarded write's point read (ADR 0035), one row always: whether the row with the
/// key (one text parameter per key column, after the journal id `$1`) exists, the
/// flush ledger's last applied sequence number in the same snapshot (the batch that
/// applies records advances it in the same transaction), and `columns` as
/// PostgreSQL's text output.
fn row_values_sql(table: &DeferredTable, columns: &[String]) -> String {
    let (name, cols) = key_columns(table);
    // A timestamptz as its UTC text with `+00` whatever the connection's TimeZone
    // (an upsert's RETURNING of a stored column, ADR 0038; `guards::exact_spelling`
    // takes only the ISO form, so another DateStyle leaves it unknown).
    let select: Vec<String> = columns
        .iter()
        .map(|c| match table.meta.types.get(c).map(String::as_str) {
            Some("timestamp with time zone") => {
                format!("(t.{} AT TIME ZONE 'UTC')::text || '+00'", ident(c))
            }
            _ => format!("t.{}::text", ident(c)),
        })
        .collect();
    let conditions: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, (c, ty))| format!("t.{c} = ${}::text::{ty}", i + 2))
        .collect();
    format!(
        "SELECT t.ctid IS NOT NULL, \
                (SELECT l.last_seq FROM spillway.flush_ledger AS l WHERE l.journal_id = $1), \
                {} \
         FROM (SELECT) AS one LEFT JOIN ONLY {name} AS t ON {}",
        select.join(", "),
        conditions.join(" AND ")
    )
}

/// The batched point read: the ordinals (from 1) of the keys, given as one text array
/// per key column and cast as the single point read casts them, whose row exists.
fn exists_many_sql(table: &DeferredTable) -> String {
    let (name, cols) = key_columns(table);
    let arrays: Vec<String> = (1..=cols.len()).map(|i| format!("${i}::text[]")).collect();
    let aliases: Vec<String> = (1..=cols.len()).map(|i| format!("k{i}")).collect();
    let conditions: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, (c, ty))| format!("t.{c} = u.k{}::{ty}", i + 1))
        .collect();
    format!(
        "SELECT u.n FROM unnest({}) WITH ORDINALITY AS u({}, n) \
         WHERE EXISTS (SELECT 1 FROM ONLY {name} AS t WHERE {})",
        arrays.join(", "),
        aliases.join(", "),
        conditions.join(" AND ")
    )
}

/// One chunk of the key index's load, in key order, after the cursor (`after`): an
/// index range scan of the primary key that stops at the limit (the last parameter).
fn chunk_sql(table: &DeferredTable, kind: KeyKind, after: bool) -> String {
    let (name, cols) = key_columns(table);
    let order: Vec<&str> = cols.iter().map(|(c, _)| c.as_str()).collect();
    let (select, cursor) = match (kind, cols.as_slice()) {
        (KeyKind::Int, [(c, _)]) => (format!("{c}::int8"), format!("{c} > $1::int8")),
        (KeyKind::Uuid, [(c, _)]) => (
            format!("pg_catalog.uuid_send({c})"),
            format!("{c} > pg_catalog.encode($1::bytea, 'hex')::uuid"),
        ),
        _ => {
            let select: Vec<String> = order.iter().map(|c| format!("{c}::text")).collect();
            let params: Vec<String> = cols
                .iter()
                .enumerate()
                .map(|(i, (_, ty))| format!("${}::text::{ty}", i + 1))
                .collect();
            (
                select.join(", "),
                format!("({}) > ({})", order.join(", "), params.join(", ")),
            )
        }
    };
    let limit = if after {
        match kind {
            KeyKind::Int | KeyKind::Uuid => 2,
            KeyKind::Text => cols.len() + 1,
        }
    } else {
        1
    };
    let filter = if after {
        format!(" WHERE {cursor}")
    } else {
        String::new()
    };
    format!(
        "SELECT {select} FROM ONLY {name}{filter} ORDER BY {} LIMIT ${limit}",
        order.join(", ")
    )
}

/// Runs a chunk query of `kind`.
async fn read_chunk(
    conn: &mut PgConnection,
    sql: &str,
    kind: KeyKind,
    after: Option<Cursor>,
    limit: i64,
) -> Result<Chunk, sqlx::Error> {
    let mut q = sqlx::query(sql);
    match after {
        Some(Cursor::Int(v)) => q = q.bind(v),
        Some(Cursor::Uuid(v)) => q = q.bind(v.to_be_bytes().to_vec()),
        Some(Cursor::Text(cols)) => {
            for c in cols {
                q = q.bind(c);
            }
        }
        None => {}
    }
    let rows = q.bind(limit).fetch_all(conn).await?;
    Ok(match kind {
        KeyKind::Int => Chunk::Int(
            rows.iter()
                .map(|r| r.try_get::<i64, _>(0))
                .collect::<Result<_, _>>()?,
        ),
        KeyKind::Uuid => Chunk::Uuid(
            rows.iter()
                .map(|r| {
                    let bytes: Vec<u8> = r.try_get(0)?;
                    let bytes: [u8; 16] = bytes.try_into().map_err(|_| {
                        sqlx::Error::Decode("uuid_send gave other than 16 bytes".into())
                    })?;
                    Ok(u128::from_be_bytes(bytes))
                })
                .collect::<Result<_, sqlx::Error>>()?,
        ),
        KeyKind::Text => Chunk::Text(
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| r.try_get::<String, _>(i))
                        .collect::<Result<Vec<_>, _>>()
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}
