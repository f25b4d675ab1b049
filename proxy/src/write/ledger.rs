//! The flush ledger (`spillway.flush_ledger`), one row per journal: claiming it at
//! start, a shared journal's take-over, and the compare-and-set that opens each batch's
//! transaction ([`open_batch`]). What makes a batch apply exactly once: its
//! compare-and-set from the last sequence number applied commits with it or not at
//! all, and an owner whose epoch was bumped is fenced.
//!
//! Invariant: a batch's transaction is opened in one round trip (BEGIN, the durable
//! COMMIT setting and the compare-and-set in one simple Query), and whatever fails on
//! the way, the connection has left it when [`open_batch`] returns an error.

use spillway_policies::engine::{ApplyError, LedgerKey};
use sqlx::{PgConnection, Row};

/// Takes the ledger row of a shared journal (the NATS stream, whose epoch no local file
/// keeps) over: creates it at epoch 1, or bumps its epoch by one under the row's lock,
/// which fences every earlier owner's next compare-and-set. Returns the new epoch and
/// the last sequence number applied.
pub async fn take_over_ledger(
    conn: &mut PgConnection,
    journal_id: &str,
) -> Result<(u64, u64), ApplyError> {
    let row = sqlx::query(
        "INSERT INTO spillway.flush_ledger AS l (journal_id, epoch, last_seq) VALUES ($1, 1, 0) \
         ON CONFLICT (journal_id) DO UPDATE SET epoch = l.epoch + 1, updated_at = pg_catalog.now() \
         RETURNING epoch, last_seq",
    )
    .bind(journal_id)
    .fetch_one(&mut *conn)
    .await
    .map_err(transient)?;
    let epoch: i64 = row.try_get(0).map_err(transient)?;
    let seq: i64 = row.try_get(1).map_err(transient)?;
    Ok((
        u64::try_from(epoch).unwrap_or(0),
        u64::try_from(seq).unwrap_or(0),
    ))
}

/// Creates the ledger row for this journal if needed and fences older epochs; returns
/// the last sequence number applied (0 for a new journal).
pub async fn claim_ledger(conn: &mut PgConnection, key: &LedgerKey) -> Result<u64, ApplyError> {
    let epoch = i64::try_from(key.epoch).unwrap_or(i64::MAX);
    let row = sqlx::query(
        "INSERT INTO spillway.flush_ledger AS l (journal_id, epoch, last_seq) VALUES ($1, $2, 0) \
         ON CONFLICT (journal_id) DO UPDATE SET epoch = EXCLUDED.epoch, updated_at = pg_catalog.now() \
         WHERE l.epoch <= EXCLUDED.epoch \
         RETURNING last_seq",
    )
    .bind(key.journal_id.clone())
    .bind(epoch)
    .fetch_optional(&mut *conn)
    .await
    .map_err(transient)?;
    match row {
        Some(r) => {
            let seq: i64 = r.try_get(0).map_err(transient)?;
            Ok(u64::try_from(seq).unwrap_or(0))
        }
        None => Err(ApplyError::Fenced {
            journal_id: key.journal_id.clone(),
            epoch: key.epoch,
            expected: 0,
        }),
    }
}

/// The ledger's compare-and-set of one batch: from the last sequence number applied
/// to the batch's last.
pub(super) struct LedgerCas<'a> {
    pub key: &'a LedgerKey,
    pub from: u64,
    pub to: u64,
}

/// Begins a batch's transaction in one round trip: BEGIN, the durable COMMIT (see
/// below) and the ledger's compare-and-set from `from` to `to`, sent as one simple
/// Query (the values as literals: numbers, and the journal's id quoted). On any
/// failure the transaction is left again before returning; a compare-and-set that
/// matched no row is [`ApplyError::Fenced`]. Returns the transaction's id
/// (`pg_current_xact_id()`, from the compare-and-set's RETURNING), by which the read
/// cache recognises the batch's echo in the change stream (ADR 0036).
pub(super) async fn open_batch(
    conn: &mut PgConnection,
    cas: &LedgerCas<'_>,
) -> Result<Option<u64>, ApplyError> {
    use futures_util::TryStreamExt;
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let sql = format!(
        "BEGIN; {DURABLE_COMMIT}; UPDATE spillway.flush_ledger SET last_seq = {to}, \
         updated_at = pg_catalog.now() WHERE journal_id = {id} AND epoch = {epoch} \
         AND last_seq = {from} RETURNING pg_catalog.pg_current_xact_id()::text",
        to = as_i64(cas.to),
        id = quote_literal(&cas.key.journal_id),
        epoch = as_i64(cas.key.epoch),
        from = as_i64(cas.from),
    );
    let results: Result<Vec<_>, _> = sqlx::raw_sql(&sql)
        .fetch_many(&mut *conn)
        .try_collect()
        .await;
    // The compare-and-set (the last statement) matched its row when it returned one
    // (the journal's id is the ledger's key); the durable-commit SELECT before it
    // returns a row of its own when it changes the setting.
    let matched: Option<Option<u64>> = match results {
        Ok(results) => {
            let (mut rows, mut last) = (Vec::new(), None);
            for r in results {
                match r {
                    sqlx::Either::Right(row) => rows.push(row),
                    sqlx::Either::Left(_) => last = Some(std::mem::take(&mut rows)),
                }
            }
            last.and_then(|rows| {
                rows.first().map(|row| {
                    row.try_get::<String, _>(0)
                        .ok()
                        .and_then(|x| x.parse().ok())
                })
            })
        }
        Err(e) => {
            let _ = exec(conn, "ROLLBACK").await;
            return Err(transient(e));
        }
    };
    if let Some(xid) = matched {
        Ok(xid)
    } else {
        let _ = exec(conn, "ROLLBACK").await;
        Err(ApplyError::Fenced {
            journal_id: cas.key.journal_id.clone(),
            epoch: cas.key.epoch,
            expected: cas.from,
        })
    }
}

/// `s` as an SQL string literal whatever `standard_conforming_strings` says: an
/// escape string, its backslashes and quotes doubled.
fn quote_literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Makes the transaction's COMMIT wait for its WAL to be flushed where the server's
/// default is `synchronous_commit = off`: once a batch is in the ledger its records
/// count as applied (and the journal lets go of them), so a commit that a crash of
/// PostgreSQL could still undo would lose them. Stronger settings are kept.
const DURABLE_COMMIT: &str = "SELECT pg_catalog.set_config('synchronous_commit', 'local', true) \
     WHERE pg_catalog.current_setting('synchronous_commit') = 'off'";

/// A driver error as the engine's retryable failure.
pub(super) fn transient(e: sqlx::Error) -> ApplyError {
    ApplyError::Transient(e.to_string())
}

pub(super) async fn exec(conn: &mut PgConnection, sql: &str) -> Result<(), ApplyError> {
    sqlx::raw_sql(sql)
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(transient)
}

#[cfg(test)]
mod tests {
    use super::quote_literal;

    #[test]
    fn a_literal_reads_back_as_the_same_text_whatever_it_holds() {
        assert_eq!(quote_literal("journal-1"), "E'journal-1'");
        assert_eq!(quote_literal("it's"), "E'it''s'");
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
    }
}
