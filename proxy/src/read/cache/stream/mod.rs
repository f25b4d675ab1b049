//! The change stream of `cache.invalidation = "replication"` (ADR 0024): each
//! database's service connection (`read/cache/service.rs`) follows the database's
//! logical replication slot with pgoutput, through the SQL interface
//! (`pg_logical_slot_peek_binary_changes`, then `pg_replication_slot_advance`), and
//! hands every committed transaction to the read cache and to every registered
//! [`ChangeSink`] ([`super::ReadCache::add_change_sink`]).
//!
//! Invariants:
//! - The slot's confirmed position moves past a transaction only after the cache and
//!   every sink took it: a crash or a lost connection in between replays it.
//! - A failure that may have skipped changes (a lost connection, an undecodable
//!   message, a slot dropped by an operator, the retained-WAL bound, a publication
//!   that stopped covering a table or publishing an action) drops every cached entry
//!   of the database (an epoch bump) and tells the sinks ([`ChangeSink::lost`])
//!   before anything else is served; the database is served uncached until the
//!   stream follows again.
//! - Changes are applied only up to a WAL position read together with the
//!   publication's definition, and only while that definition is the one last
//!   checked whole: an ALTER PUBLICATION is noticed at the first round after it,
//!   before a change it left out could be taken for "nothing happened".
//! - After a (re)connect the slot is drained before the catalog is installed, so
//!   changes made while spillway was stopped are applied before any cached read.
//! - A change invalidates its rows unless spillway already accounted for it
//!   (`echo.rs`, ADR 0036: its own flush's rows by xid, a write-through statement's
//!   echo by credit); anything that may have skipped changes drops what was
//!   accounted.

pub mod assemble;
pub mod setup;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spillway_policies::changes::{Change, ChangeSink, Commit};
use sqlx::{PgConnection, Row};
use tokio::time::Instant;

use super::DbState;
use crate::config::ReplicationConfig;
use crate::protocol::pgoutput;
use assemble::{Assembler, Step};

/// Changes asked for per call; a call stops at the end of the transaction that
/// reaches it, so transactions are whole.
const BATCH_CHANGES: i32 = 20_000;
/// How often the slot's existence, its retained WAL and the publication's coverage
/// are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Microseconds from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Sql(#[from] sqlx::Error),
    #[error("undecodable replication message at {lsn}: {reason}")]
    Decode { lsn: String, reason: String },
    #[error("replication slot {0} does not exist (dropped by an operator?)")]
    SlotMissing(String),
    #[error(
        "replication slot {slot} holds back {bytes} bytes of WAL, over replication.max_retained_wal"
    )]
    Retained { slot: String, bytes: u64 },
    #[error("{0}")]
    Setup(#[from] setup::SetupError),
}

impl StreamError {
    /// Failures after which the slot's position is recreated rather than retried.
    pub fn resets_slot(&self) -> bool {
        matches!(
            self,
            StreamError::Decode { .. } | StreamError::SlotMissing(_) | StreamError::Retained { .. }
        )
    }
}

/// The consumers of the change stream besides the read cache itself.
#[derive(Default)]
pub struct Sinks(RwLock<Vec<Arc<dyn ChangeSink>>>);

impl Sinks {
    pub fn add(&self, sink: Arc<dyn ChangeSink>) {
        match self.0.write() {
            Ok(mut v) => v.push(sink),
            Err(poisoned) => poisoned.into_inner().push(sink),
        }
    }

    fn each(&self, f: impl Fn(&dyn ChangeSink)) {
        let sinks = match self.0.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for s in &sinks {
            f(s.as_ref());
        }
    }
}

/// A database's stream as `/metrics` and `SHOW REPLICATION` report it.
#[derive(Default, Debug)]
pub struct Status {
    pub following: AtomicBool,
    /// WAL between the server's position and the slot's confirmed one.
    pub lag_bytes: AtomicU64,
    /// From the last applied commit to its application.
    pub lag_micros: AtomicU64,
    /// WAL the slot holds back (from its restart position).
    pub retained_bytes: AtomicU64,
    pub commits: AtomicU64,
    pub confirmed_lsn: AtomicU64,
    /// Slot positions recreated (dropped slot, bound, undecodable message).
    pub resets: AtomicU64,
    /// The last failure logged (a repeated one is logged once).
    last_failure: Mutex<String>,
}

impl Status {
    /// Records a failure; true when it differs from the previous one (log it).
    pub fn note_failure(&self, reason: &str) -> bool {
        let mut last = match self.last_failure.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if *last == reason {
            return false;
        }
        reason.clone_into(&mut last);
        true
    }

    /// Sets the `spillway_replication_*` metrics of database `name`.
    #[allow(clippy::cast_precision_loss)]
    pub fn export(&self, name: &str) {
        use crate::metrics as m;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let db = name.to_owned();
        metrics::gauge!(m::REPLICATION_FOLLOWING, "database" => db.clone())
            .set(f64::from(u8::from(self.following.load(Ordering::Relaxed))));
        metrics::counter!(m::REPLICATION_COMMITS, "database" => db.clone())
            .absolute(load(&self.commits));
        metrics::counter!(m::REPLICATION_RESETS, "database" => db.clone())
            .absolute(load(&self.resets));
        metrics::gauge!(m::REPLICATION_LAG_BYTES, "database" => db.clone())
            .set(load(&self.lag_bytes) as f64);
        metrics::gauge!(m::REPLICATION_LAG_SECONDS, "database" => db.clone())
            .set(load(&self.lag_micros) as f64 / 1e6);
        metrics::gauge!(m::REPLICATION_RETAINED_WAL, "database" => db)
            .set(load(&self.retained_bytes) as f64);
    }

    fn clear_failure(&self) {
        match self.last_failure.lock() {
            Ok(mut l) => l.clear(),
            Err(poisoned) => poisoned.into_inner().clear(),
        }
    }
}

/// Formats an LSN as PostgreSQL does (`16/B374D848`).
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Following one database's slot over one connection.
pub struct Follower {
    pub slot: String,
    publication: String,
    max_retained: u64,
    asm: Assembler,
    /// Primary-key column names per relation OID, in key order (`None`: no key).
    pks: HashMap<u32, Option<Vec<String>>>,
    /// The server's WAL flush position when the last complete round began.
    seen_wal: u64,
    check_at: Instant,
    /// The publication's definition when it was last checked whole (see `poll`).
    publication_sig: Option<String>,
}

impl Follower {
    pub fn new(config: &ReplicationConfig, database: &str) -> Self {
        Self {
            slot: config.slot_for(database),
            publication: config.publication.clone(),
            max_retained: config.max_retained_wal.as_u64(),
            asm: Assembler::default(),
            pks: HashMap::new(),
            seen_wal: 0,
            check_at: Instant::now(),
            publication_sig: None,
        }
    }

    /// Checks and, with `create`, creates what the stream needs on this connection's
    /// database; then drains the slot. Run before the catalog is installed.
    pub async fn start(
        &mut self,
        conn: &mut PgConnection,
        db: &DbState,
        sinks: &Sinks,
        create: bool,
    ) -> Result<(), StreamError> {
        setup::check(conn, &self.publication, &self.slot, create).await?;
        // Writes between the last change applied and the slot's position (a
        // recreated slot skips them) are covered by dropping every entry.
        db.versions.bump_all();
        db.echoes.reset();
        while self.poll(conn, db, sinks).await? {}
        db.stream.following.store(true, Ordering::Relaxed);
        db.stream.clear_failure();
        sinks.each(|s| s.resumed(&db.name));
        Ok(())
    }

    /// One round: applies what the slot has (up to [`BATCH_CHANGES`]) and confirms
    /// it. True when there may be more right away.
    pub async fn poll(
        &mut self,
        conn: &mut PgConnection,
        db: &DbState,
        sinks: &Sinks,
    ) -> Result<bool, StreamError> {
        if Instant::now() >= self.check_at {
            self.check(conn, db).await?;
            self.check_at = Instant::now() + CHECK_EVERY;
        }
        // Before the flush position is read: what was accounted before now waits for
        // a change committed (and, with synchronous commits, flushed) before it.
        let round = db.echoes.round_started();
        // The flush position: decoding reads flushed WAL only, so a commit written but
        // not yet flushed (synchronous_commit = off) must not count as seen. With it,
        // in the same round trip, the publication's definition: an ALTER PUBLICATION
        // (a table dropped from it, `publish` narrowed) takes effect for changes after
        // its commit, so a definition unchanged since the last whole check, read
        // before the changes up to `wal` are peeked, means they were all published.
        let (wal, sig): (i64, Option<String>) = sqlx::query_as(
            "SELECT (pg_current_wal_flush_lsn() - '0/0')::int8, \
                    (SELECT concat_ws(':', p.xmin, p.puballtables, p.pubinsert, p.pubupdate, \
                                      p.pubdelete, p.pubtruncate, \
                                      (SELECT count(*) || '/' || coalesce(max(r.xmin::text), '') \
                                       FROM pg_publication_rel r WHERE r.prpubid = p.oid)) \
                     FROM pg_publication p WHERE p.pubname = $1)",
        )
        .bind(&self.publication)
        .fetch_one(&mut *conn)
        .await?;
        if sig != self.publication_sig {
            // Altered (or first seen): checked whole before anything more is trusted.
            self.publication_sig = None;
            self.check(conn, db).await?;
            self.check_at = Instant::now() + CHECK_EVERY;
            self.publication_sig = sig;
        }
        let wal = u64::try_from(wal).unwrap_or(0);
        if wal == self.seen_wal {
            db.stream.lag_bytes.store(0, Ordering::Relaxed);
            db.stream.lag_micros.store(0, Ordering::Relaxed);
            // Everything committed before `wal` was delivered in an earlier round.
            sinks.each(|s| s.passed(&db.name, wal));
            db.echoes.round_complete(round);
            return Ok(false);
        }
        let rows = sqlx::query(
            "SELECT (lsn - '0/0')::int8 AS lsn, data FROM pg_logical_slot_peek_binary_changes(\
             $1, ('0/0'::pg_lsn + $4::int8), $2, 'proto_version', '1', 'publication_names', $3)",
        )
        .bind(&self.slot)
        .bind(BATCH_CHANGES)
        .bind(&self.publication)
        // Only transactions committed before the definition above was read.
        .bind(i64::try_from(wal).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("42704") => {
                StreamError::SlotMissing(self.slot.clone())
            }
            _ => StreamError::from(e),
        })?;
        let full = rows.len() >= usize::try_from(BATCH_CHANGES).unwrap_or(usize::MAX);
        self.asm.reset();
        let mut confirmed = None;
        for row in rows {
            let lsn: i64 = row.try_get("lsn")?;
            let data: Vec<u8> = row.try_get("data")?;
            let bad = |reason: String| StreamError::Decode {
                lsn: lsn_text(u64::try_from(lsn).unwrap_or(0)),
                reason,
            };
            let msg = pgoutput::decode(&data).map_err(|e| bad(e.to_string()))?;
            match self
                .asm
                .push(&db.name, msg)
                .map_err(|e| bad(e.to_string()))?
            {
                Step::Nothing => {}
                Step::Relation(rel) => {
                    let pk = self.primary_key(conn, rel.oid).await?;
                    self.asm.relation(&rel, pk.as_deref());
                }
                Step::Commit {
                    commit,
                    commit_time,
                } => {
                    apply(db, &commit);
                    sinks.each(|s| s.committed(&commit));
                    db.stream.commits.fetch_add(1, Ordering::Relaxed);
                    let lag = now_pg_micros().saturating_sub(commit_time).max(0);
                    db.stream
                        .lag_micros
                        .store(u64::try_from(lag).unwrap_or(0), Ordering::Relaxed);
                    confirmed = Some(commit.lsn);
                }
            }
        }
        if let Some(lsn) = confirmed {
            sqlx::query("SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)")
                .bind(&self.slot)
                .bind(lsn_text(lsn))
                .execute(&mut *conn)
                .await?;
            db.stream.confirmed_lsn.store(lsn, Ordering::Relaxed);
        }
        db.stream.lag_bytes.store(
            wal.saturating_sub(confirmed.unwrap_or(wal)),
            Ordering::Relaxed,
        );
        if !full {
            // The peek decoded every transaction that committed up to the flush
            // position read before it, and each was applied above.
            self.seen_wal = wal;
            sinks.each(|s| s.passed(&db.name, wal));
            db.echoes.round_complete(round);
        }
        Ok(full)
    }

    /// The slot exists and holds back less than the bound; the publication covers
    /// every cached table.
    async fn check(&mut self, conn: &mut PgConnection, db: &DbState) -> Result<(), StreamError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT COALESCE((pg_current_wal_lsn() - confirmed_flush_lsn)::int8, 0), \
                    COALESCE((pg_current_wal_lsn() - restart_lsn)::int8, 0) \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((lag, retained)) = row else {
            return Err(StreamError::SlotMissing(self.slot.clone()));
        };
        let retained = u64::try_from(retained).unwrap_or(0);
        db.stream
            .lag_bytes
            .store(u64::try_from(lag).unwrap_or(0), Ordering::Relaxed);
        db.stream.retained_bytes.store(retained, Ordering::Relaxed);
        if retained > self.max_retained {
            return Err(StreamError::Retained {
                slot: self.slot.clone(),
                bytes: retained,
            });
        }
        setup::coverage(conn, &self.publication).await?;
        // The shape of a relation may have changed with DDL: asked again when next seen.
        self.pks.clear();
        Ok(())
    }

    async fn primary_key(
        &mut self,
        conn: &mut PgConnection,
        oid: u32,
    ) -> Result<Option<Vec<String>>, StreamError> {
        if let Some(pk) = self.pks.get(&oid) {
            return Ok(pk.clone());
        }
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1::int8::oid AND i.indisprimary ORDER BY k.n",
        )
        .bind(i64::from(oid))
        .fetch_all(&mut *conn)
        .await?;
        let pk = (!names.is_empty()).then_some(names);
        self.pks.insert(oid, pk.clone());
        Ok(pk)
    }

    /// After a failure that may have skipped changes (see the module docs): with
    /// `reset`, the slot is recreated at the current position (a new connection may
    /// be needed; errors are the caller's to retry).
    pub async fn recover(
        &mut self,
        conn: &mut PgConnection,
        err: &StreamError,
    ) -> Result<(), StreamError> {
        if err.resets_slot() {
            setup::recreate_slot(conn, &self.slot).await?;
            self.seen_wal = 0;
        }
        Ok(())
    }
}

/// Everything derived from the stream for `db` may be wrong from now on.
pub fn lost(db: &DbState, sinks: &Sinks) {
    db.stream.following.store(false, Ordering::Relaxed);
    db.versions.bump_all();
    db.echoes.reset();
    sinks.each(|s| s.lost(&db.name));
}

/// The read cache's own part of a commit: each change invalidates its row (a known
/// key) or its table, and the tables it writes through (parents of a partition),
/// except what spillway already accounted for (`echo.rs`).
fn apply(db: &DbState, commit: &Commit) {
    let Some(catalog) = db.catalog() else {
        // No snapshot (start, after DDL): nothing is served from this database's
        // entries until one is installed, but entries older than the gap must go.
        db.versions.bump_all();
        db.echoes.reset();
        return;
    };
    let mut targets = Vec::new();
    for change in &commit.changes {
        targets.clear();
        let table = change.table();
        if table.oid == 0 {
            db.versions.bump_all();
            db.echoes.reset();
            continue;
        }
        catalog.write_targets_by_oid(table.oid, &mut targets);
        if !targets.contains(&table.oid) {
            targets.push(table.oid);
        }
        let keys: Vec<&Vec<String>> = match change {
            Change::Insert { key, .. } | Change::Delete { key, .. } => vec![key],
            Change::Update { key, old_key, .. } => std::iter::once(key).chain(old_key).collect(),
            Change::Table { .. } => Vec::new(),
        };
        if keys.is_empty() {
            db.versions.bump_tables(
                targets
                    .iter()
                    .copied()
                    .filter(|&oid| !db.echoes.table_echo(commit.xid, oid)),
            );
        } else {
            for &oid in &targets {
                for key in &keys {
                    if !db.echoes.echo(commit.xid, oid, key) {
                        db.versions.bump_key(oid, key);
                    }
                }
            }
        }
    }
}

fn now_pg_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    unix - PG_EPOCH_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_is_postgresqls() {
        assert_eq!(lsn_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(lsn_text(0), "0/0");
    }
}
