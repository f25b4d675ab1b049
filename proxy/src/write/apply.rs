//! Applies one batch of journal records upstream, exactly once: a single transaction
//! that advances `spillway.flush_ledger` with a compare-and-set on (journal, epoch,
//! last_seq) and runs the batch's set-based statements. A statement PostgreSQL refuses
//! for its data is isolated by bisection under savepoints; the records that fail land
//! in `spillway.dead_letters` in the same transaction as the rest of the batch.
//! [`PgSink`] is the flush worker's connection as the engine's `Sink`: it opens it on
//! demand (`application_name` [`FLUSH_APP`]), claims the ledger, applies batches, and
//! counts what they did in the metrics. On a journal shared by several instances (the
//! NATS stream) a fenced sink follows the ledger: the newest instance owns flushing.
//!
//! Invariants:
//! - A batch commits whole (ledger advance, applied records, dead letters) or not at
//!   all; the caller may retry a batch whose outcome it does not know, because the
//!   ledger says whether it committed.
//! - Its transaction is opened in one round trip (BEGIN, the durable COMMIT and the
//!   ledger's compare-and-set in one simple Query, [`open_batch`]), so a flush costs
//!   PostgreSQL's link two round trips plus one per set-based statement; whatever
//!   fails on the way, the connection leaves the transaction before `apply_batch`
//!   returns.
//! - A batch's COMMIT is durable when it returns, even on a server whose default is
//!   `synchronous_commit = off`.
//! - A record (one statement or one client transaction) is never split: bisection
//!   stops at a record, and a failing record is dead-lettered whole.
//! - An UPDATE or DELETE whose key is not there at apply time, or whose row no longer
//!   meets its guard (ADR 0035), is a dead letter (SQLSTATE 02000), never silently
//!   dropped; in a record of several operations (a
//!   client transaction) the whole record is then a dead letter, none of it applied.
//! - Write-back tables' operations are folded per key for the first attempt only; when
//!   that attempt meets a data error, the batch is bisected as journaled, so dead
//!   letters and record atomicity are the same for both deferred policies.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

pub use spillway_policies::engine::{ApplyError, DeadLetter, Flushed, LedgerKey};
use spillway_policies::engine::{Batch, Sink};
use spillway_policies::writes::{Group, GroupKind, Record, TableMeta, coalesce, plan_batch};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, Row};

use super::ledger::{LedgerCas, claim_ledger, exec, open_batch, transient};

/// SQLSTATE recorded for an UPDATE/DELETE whose key had no row when applied.
pub const NO_ROW: &str = "02000";

/// `application_name` of the flush worker's backend, so that an operator (or a test)
/// can tell it apart in `pg_stat_activity`.
pub const FLUSH_APP: &str = "spillway flush";

/// Connects to `url` with `application_name` set to `name`.
pub async fn connect_as(url: &str, name: &str) -> Result<PgConnection, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    PgConnection::connect_with(&options.application_name(name)).await
}

/// The flush worker's connection (`engine::Sink`): opened on demand, dropped after a
/// transient failure.
pub struct PgSink {
    url: String,
    conn: Option<PgConnection>,
    /// The journal is shared by several instances (the NATS stream): a fenced sink
    /// follows the ledger instead of stopping the engine.
    shared: bool,
    /// Another instance took the shared journal's ledger over: this sink applies
    /// nothing and reports a batch applied once the ledger is past it.
    following: bool,
}

impl PgSink {
    pub fn new(url: String, shared: bool) -> Self {
        Self {
            url,
            conn: None,
            shared,
            following: false,
        }
    }

    /// A fence on a shared journal: from now on this instance follows the owner.
    fn fenced(&mut self, err: ApplyError) -> ApplyError {
        if !self.shared || !matches!(err, ApplyError::Fenced { .. }) {
            return err;
        }
        if !self.following {
            tracing::info!(
                "another spillway took the shared journal's flushing over (a newer epoch): \
                 this one applies nothing and follows the ledger"
            );
            self.following = true;
        }
        ApplyError::Transient("following the shared journal's owner".to_owned())
    }

    /// The ledger's last applied sequence number, whoever owns it.
    async fn ledger_at(&mut self, ledger: &LedgerKey) -> Result<u64, ApplyError> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT last_seq FROM spillway.flush_ledger WHERE journal_id = $1")
                .bind(ledger.journal_id.clone())
                .fetch_optional(self.conn()?)
                .await
                .map_err(transient)?;
        Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
    }

    fn conn(&mut self) -> Result<&mut PgConnection, ApplyError> {
        self.conn
            .as_mut()
            .ok_or_else(|| ApplyError::Transient("not connected".to_owned()))
    }
}

/// PostgreSQL's WAL insert position as a number: at or past the end of every commit
/// record written so far (also those visible before their WAL is flushed).
pub const WAL_POSITION: &str =
    "SELECT (pg_catalog.pg_current_wal_insert_lsn() - '0/0'::pg_catalog.pg_lsn)::int8";

impl Sink for PgSink {
    async fn connect(&mut self) -> Result<(), ApplyError> {
        if self.conn.is_none() {
            self.conn = Some(connect_as(&self.url, FLUSH_APP).await.map_err(transient)?);
        }
        Ok(())
    }

    fn disconnect(&mut self) {
        self.conn = None;
    }

    async fn claim(&mut self, ledger: &LedgerKey) -> Result<u64, ApplyError> {
        if self.following {
            return self.ledger_at(ledger).await;
        }
        match claim_ledger(self.conn()?, ledger).await {
            Err(err @ ApplyError::Fenced { .. }) if self.shared => {
                self.following = true;
                tracing::info!(%err, "shared journal: following the ledger");
                self.ledger_at(ledger).await
            }
            other => other,
        }
    }

    async fn apply(
        &mut self,
        ledger: &LedgerKey,
        applied_through: u64,
        batch: &Batch,
        tables: &HashMap<String, TableMeta>,
    ) -> Result<Flushed, ApplyError> {
        if self.following {
            let last = batch.last().map_or(applied_through, |(seq, _)| *seq);
            if self.ledger_at(ledger).await? >= last {
                return Ok(Flushed::default());
            }
            return Err(ApplyError::Transient(
                "waiting for the shared journal's owner to apply".to_owned(),
            ));
        }
        let started = Instant::now();
        let result = apply_batch(self.conn()?, ledger, applied_through, batch, tables)
            .await
            .map_err(|e| self.fenced(e));
        match &result {
            Ok(done) => count_applied(done, started),
            Err(ApplyError::Transient(_)) => {
                metrics::counter!(crate::metrics::FLUSH_RETRIES).increment(1);
            }
            Err(_) => {}
        }
        result
    }

    async fn wal_position(&mut self) -> Result<Option<u64>, ApplyError> {
        let lsn: i64 = sqlx::query_scalar(WAL_POSITION)
            .fetch_one(self.conn()?)
            .await
            .map_err(transient)?;
        Ok(u64::try_from(lsn).ok())
    }
}

/// Metrics and log lines of a committed batch (inside its `flush_batch` span).
fn count_applied(done: &Flushed, started: Instant) {
    use crate::metrics as m;
    metrics::counter!(m::FLUSH_BATCHES).increment(1);
    metrics::counter!(m::FLUSH_ROWS).increment(u64::try_from(done.rows).unwrap_or(u64::MAX));
    metrics::counter!(m::UPSTREAM_STATEMENTS)
        .increment(u64::try_from(done.statements).unwrap_or(u64::MAX));
    metrics::histogram!(m::FLUSH_DURATION).record(started.elapsed());
    for d in &done.dead_letters {
        metrics::counter!(m::DEAD_LETTERS, "table" => d.table.clone()).increment(1);
        tracing::error!(
            seq = d.seq, table = %d.table, sqlstate = %d.sqlstate,
            message = %d.message, statement = %d.statement,
            "deferred write refused upstream; stored in spillway.dead_letters"
        );
    }
}

/// Whether an error is worth retrying unchanged (SPEC §6: classes 08, 40, 53, 57; and
/// anything that is not an answer from PostgreSQL about the data).
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().is_none_or(|c| {
            matches!(c.get(..2), Some("08" | "40" | "53" | "57" | "58" | "XX"))
                    // lock_not_available (lock_timeout), object_in_use: contention.
                    || matches!(c.as_ref(), "55P03" | "55006")
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Applies `batch` (contiguous records, in sequence order, the first following
/// `applied_through`) in one transaction.
pub async fn apply_batch(
    conn: &mut PgConnection,
    key: &LedgerKey,
    applied_through: u64,
    batch: &[(u64, Arc<Record>)],
    tables: &HashMap<String, TableMeta>,
) -> Result<Flushed, ApplyError> {
    let Some(last) = batch.last().map(|(seq, _)| *seq) else {
        return Ok(Flushed::default());
    };
    // The fast path: the whole batch as set-based statements, write-back tables'
    // operations folded per key first (the ledger still moves to `last`).
    let coalesced = coalesce(batch, tables);
    let records: Vec<&Record> = coalesced.iter().map(|(_, r)| r.as_ref()).collect();
    let groups = plan_batch(&records, tables).map_err(|e| ApplyError::Unplannable {
        seq: batch.first().map_or(0, |(s, _)| *s),
        reason: e.to_string(),
    })?;
    let cas = LedgerCas {
        key,
        from: applied_through,
        to: last,
    };
    let xid = open_batch(conn, &cas).await?;
    let outcome = apply_open(conn, &cas, xid, batch, tables, &coalesced, &groups).await;
    if outcome.is_err() {
        // Whatever failed, the connection leaves the batch's transaction (a no-op when
        // it is gone or already out of it).
        let _ = exec(conn, "ROLLBACK").await;
    }
    outcome
}

/// The batch inside the transaction [`open_batch`] began (`xid`), up to its COMMIT.
async fn apply_open(
    conn: &mut PgConnection,
    cas: &LedgerCas<'_>,
    xid: Option<u64>,
    batch: &[(u64, Arc<Record>)],
    tables: &HashMap<String, TableMeta>,
    coalesced: &[(u64, Arc<Record>)],
    groups: &[Group],
) -> Result<Flushed, ApplyError> {
    let mut applied = Flushed {
        xid,
        ..Flushed::default()
    };
    let mut failed = None;
    for group in groups {
        match run_group(conn, group, coalesced, &mut applied).await {
            Ok(()) => {}
            Err(e) if is_transient(&e) => return Err(transient(e)),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let folded = batch.iter().any(|(_, r)| {
        r.ops
            .iter()
            .any(|op| tables.get(op.table()).is_some_and(|m| m.coalesce))
    });
    // A coalesced operation whose key was missing would dead-letter a fold of several
    // records, and one in a record of several operations (a client transaction) would
    // leave the rest of it applied: those are judged one by one instead.
    if failed.is_some()
        || (!applied.dead_letters.is_empty()
            && (folded || splits_a_record(batch, &applied.dead_letters)))
    {
        // Start over with bisection: savepoints isolate the records PostgreSQL refuses.
        // It works on the records as journaled, not coalesced, so a record is still
        // applied or refused whole and its dead letter names what the client sent.
        exec(conn, "ROLLBACK").await?;
        let xid = open_batch(conn, cas).await?;
        applied = Flushed {
            xid,
            ..Flushed::default()
        };
        bisect(conn, batch, tables, &mut applied).await?;
    }
    record_dead_letters(conn, cas.key, &applied.dead_letters).await?;
    exec(conn, "COMMIT").await?;
    Ok(applied)
}

/// Runs one set-based statement; UPDATE/DELETE source rows that matched nothing become
/// dead letters.
async fn run_group(
    conn: &mut PgConnection,
    group: &Group,
    batch: &[(u64, Arc<Record>)],
    applied: &mut Flushed,
) -> Result<(), sqlx::Error> {
    let mut query = sqlx::query(&group.sql);
    // Owned binds: borrowed ones make this future fail rustc's higher-ranked `Send`
    // check once it is spawned.
    for p in &group.params {
        query = query.bind(p.clone());
    }
    applied.statements += 1;
    match group.kind {
        GroupKind::Insert => {
            let done = query.execute(&mut *conn).await?;
            applied.rows += usize::try_from(done.rows_affected()).unwrap_or(usize::MAX);
        }
        GroupKind::Update | GroupKind::Delete => {
            let rows = query.fetch_all(&mut *conn).await?;
            let mut matched = vec![false; group.ops.len()];
            for r in &rows {
                let n: i64 = r.try_get(0)?;
                if let Some(m) = usize::try_from(n - 1).ok().and_then(|i| matched.get_mut(i)) {
                    *m = true;
                }
            }
            applied.rows += rows.len();
            for (i, (ri, oi)) in group.ops.iter().enumerate() {
                if matched.get(i).copied().unwrap_or(true) {
                    continue;
                }
                if let Some((seq, record)) = batch.get(*ri)
                    && let Some(op) = record.ops.get(*oi)
                {
                    // A guarded write (ADR 0035) whose row no longer meets its
                    // condition: changed underneath since it was acknowledged.
                    let message = if op.guard().is_empty() {
                        "no row with this key when the write was applied"
                    } else {
                        "no row with this key met the write's condition when it was \
                         applied (changed since the write was acknowledged)"
                    };
                    applied
                        .dead_letters
                        .push(DeadLetter::of(*seq, op, NO_ROW, message));
                }
            }
        }
    }
    Ok(())
}

/// Applies `batch` under savepoints, halving the part that fails until single records
/// are left; those become dead letters.
async fn bisect(
    conn: &mut PgConnection,
    batch: &[(u64, Arc<Record>)],
    tables: &HashMap<String, TableMeta>,
    applied: &mut Flushed,
) -> Result<(), ApplyError> {
    // An explicit stack instead of recursion: async recursion needs boxing, and the
    // order of the parts must stay the batch's order.
    let mut todo: Vec<&[(u64, Arc<Record>)]> = vec![batch];
    while let Some(part) = todo.pop() {
        let records: Vec<&Record> = part.iter().map(|(_, r)| r.as_ref()).collect();
        let groups = plan_batch(&records, tables).map_err(|e| ApplyError::Unplannable {
            seq: part.first().map_or(0, |(s, _)| *s),
            reason: e.to_string(),
        })?;
        exec(conn, "SAVEPOINT spillway_part").await?;
        let mut part_applied = Flushed::default();
        let mut failure = None;
        for group in &groups {
            if let Err(e) = run_group(conn, group, part, &mut part_applied).await {
                if is_transient(&e) {
                    return Err(transient(e));
                }
                failure = Some(e);
                break;
            }
        }
        let split = failure.is_none() && splits_a_record(part, &part_applied.dead_letters);
        if failure.is_none() && !split {
            exec(conn, "RELEASE SAVEPOINT spillway_part").await?;
            applied.statements += part_applied.statements;
            applied.rows += part_applied.rows;
            applied.dead_letters.extend(part_applied.dead_letters);
            continue;
        }
        exec(conn, "ROLLBACK TO SAVEPOINT spillway_part").await?;
        exec(conn, "RELEASE SAVEPOINT spillway_part").await?;
        if let [(seq, record)] = part {
            let (sqlstate, message) = match &failure {
                Some(e) => describe_error(e),
                None => (
                    NO_ROW.to_owned(),
                    "no row with this key when the write was applied; the other writes \
                     of its transaction are not applied either"
                        .to_owned(),
                ),
            };
            for op in &record.ops {
                applied
                    .dead_letters
                    .push(DeadLetter::of(*seq, op, &sqlstate, &message));
            }
        } else {
            let (first, second) = part.split_at(part.len() / 2);
            // Stack: the first half must run first.
            todo.push(second);
            todo.push(first);
        }
    }
    Ok(())
}

/// Whether a missing key (a dead letter) belongs to a record of several operations:
/// applying the rest of that record would split a client transaction.
fn splits_a_record(part: &[(u64, Arc<Record>)], dead: &[DeadLetter]) -> bool {
    dead.iter()
        .any(|d| part.iter().any(|(seq, r)| *seq == d.seq && r.ops.len() > 1))
}

fn describe_error(e: &sqlx::Error) -> (String, String) {
    match e {
        sqlx::Error::Database(db) => (
            db.code()
                .map_or_else(|| "XX000".to_owned(), |c| c.into_owned()),
            db.message().to_owned(),
        ),
        other => ("XX000".to_owned(), other.to_string()),
    }
}

async fn record_dead_letters(
    conn: &mut PgConnection,
    key: &LedgerKey,
    letters: &[DeadLetter],
) -> Result<(), ApplyError> {
    for d in letters {
        sqlx::query(
            "INSERT INTO spillway.dead_letters \
             (journal_id, seq, table_name, statement, parameters, sqlstate, message) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(key.journal_id.clone())
        .bind(i64::try_from(d.seq).unwrap_or(i64::MAX))
        .bind(d.table.clone())
        .bind(d.statement.clone())
        .bind(d.parameters.clone())
        .bind(d.sqlstate.clone())
        .bind(d.message.clone())
        .execute(&mut *conn)
        .await
        .map_err(transient)?;
    }
    Ok(())
}
