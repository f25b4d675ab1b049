//! `WriteService`: the deferred-write side of the backend database as the session
//! handler, the admin console, the reloader and `/metrics` use it. A thin facade over
//! the write-policy engine (`spillway_policies::engine`: pending records, the key
//! overlay, decisions, due rules, back-pressure, barriers, the flush loop), which it
//! runs with the journal and spillway's sqlx connections: [`PgChecks`] (privileges and
//! point reads) and [`PgSink`] (the flush worker's batches and ledger).
//!
//! It adds what is the proxy's: the ledger claim at start, metrics gauges, and the
//! rate-limited fallback log lines. Every rule is the engine's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::Guard;
use spillway_policies::engine::overlay::{Assigned, Needs, Refusal};
use spillway_policies::engine::{self, KeyIndex, KeyStats, LedgerKey, Log};
use spillway_policies::{FlushConfig, KeyIndexConfig};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use super::apply::PgSink;
use super::checks::PgChecks;
use super::fallbacks::FallbackLog;
use super::ledger;
use super::log::JournalLog;
use super::returning::Returning;
use super::sequences::Reservations;

pub use engine::{
    Applied, ApplyError, DeferError, DeferredTable, Known, Outcome, StoredValues, TableSet,
    TablesChange, TxOutcome,
};

pub use super::convert::Converted;
/// One statement of a held transaction.
pub type TxStatement = engine::TxStatement<Returning>;

/// The engine as the proxy runs it.
type Engine = engine::Engine<PgChecks, JournalLog>;

pub struct WriteService {
    engine: Arc<Engine>,
    /// `backend.url`: the flush worker connects with it.
    url: String,
    /// Rate-limited log lines of writes that ran write-through instead.
    pub fallbacks: FallbackLog,
    /// Key values reserved from the deferred tables' `serial`/identity sequences.
    pub reservations: Arc<Reservations>,
}

/// Why the write side cannot start on this journal and ledger.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Ledger(#[from] ApplyError),
    #[error(transparent)]
    Journal(#[from] engine::StartError),
}

/// Whether a record may change whether a key exists (an INSERT or a DELETE): only such
/// a write of another instance makes a decision taken before it stale.
fn changes_existence(payload: &[u8]) -> bool {
    use spillway_policies::writes::{Record, RowOp};
    Record::decode(payload).map_or(true, |r| {
        r.ops.iter().any(|op| !matches!(op, RowOp::Update { .. }))
    })
}

impl WriteService {
    /// Claims the journal's ledger row on `conn`, then starts the engine: the
    /// recovered records the ledger does not hold become pending (the flusher replays
    /// them first).
    pub async fn start(
        journal: JournalLog,
        recovered: Vec<spillway_policies::journal::Record>,
        tables: HashMap<String, DeferredTable>,
        flush: FlushConfig,
        url: String,
        conn: &mut PgConnection,
    ) -> Result<Arc<Self>, StartError> {
        let key = LedgerKey {
            journal_id: journal.id(),
            epoch: journal.epoch(),
        };
        let applied = ledger::claim_ledger(conn, &key).await?;
        let checks = PgChecks::new(url.clone(), Some(key.journal_id.clone()));
        let engine = Engine::start(journal, recovered, applied, tables, flush, checks)?;
        Ok(Arc::new(Self {
            engine,
            url,
            fallbacks: FallbackLog::default(),
            reservations: Arc::new(Reservations::default()),
        }))
    }

    /// On a shared log (NATS): makes other instances' records pending here too, in
    /// stream order, as the log's follower delivers them; `on_noted` gets what each
    /// writes, to invalidate this instance's cached reads of it as a write acknowledged
    /// here does (issue 17: invalidations reach every instance). Once; nothing on the
    /// local journal.
    pub fn follow_others(
        &self,
        on_noted: impl Fn(&spillway_policies::engine::state::Applied) + Send + 'static,
    ) {
        let JournalLog::Nats(log) = self.engine.log() else {
            return;
        };
        let Some(mut foreign) = log.take_follower() else {
            return;
        };
        let engine = self.engine.clone();
        tokio::spawn(async move {
            while let Some((seq, subject, payload)) = foreign.recv().await {
                match engine.note_foreign(seq, &payload) {
                    Ok(written) => on_noted(&written),
                    Err(err) => tracing::error!(%err, "journal: a record of another instance"),
                }
                // Only now may a keyed append expect it: the overlay has it.
                if let JournalLog::Nats(log) = engine.log() {
                    log.seen(&subject, seq, changes_existence(&payload));
                }
            }
        });
    }

    /// The flush worker: runs until `shutdown`, then drains what it can (the caller
    /// bounds that; the rest stays journaled). `on_applied` gets the tables of every
    /// applied batch before its barrier opens.
    pub async fn run_flusher(
        self: Arc<Self>,
        shutdown: CancellationToken,
        on_applied: impl Fn(&spillway_policies::engine::state::Applied),
    ) {
        let shared = matches!(self.engine.log(), JournalLog::Nats(_));
        let sink = PgSink::new(self.url.clone(), shared);
        self.engine
            .clone()
            .run_flusher(sink, shutdown, on_applied)
            .await;
    }

    /// Fills in the timestamptz texts of `returning` that need the session's zone
    /// rules (ADR 0035's addendum: a session whose TimeZone is not UTC), asking
    /// PostgreSQL; a no-op when it has none.
    pub async fn resolve_zoned(&self, returning: &mut Returning) -> Result<(), DeferError> {
        let Some((zone, values)) = returning.zoned() else {
            return Ok(());
        };
        let texts = self
            .engine
            .checks()
            .timestamptz_texts(&zone, &values)
            .await
            .map_err(DeferError::from)?;
        returning.resolve(texts).map_err(DeferError::Upstream)
    }

    /// The deferred tables now (one atomic load; hold it briefly).
    pub fn tables(&self) -> Guard<Arc<TableSet>> {
        self.engine.tables()
    }

    /// Decides and journals a deferrable statement of role `user` on `table`; returns
    /// once its record is durable and pending (or at once when it writes nothing).
    pub async fn defer(
        &self,
        user: &str,
        table: &str,
        converted: Converted,
    ) -> Result<Outcome, DeferError> {
        self.engine.defer(user, table, converted).await
    }

    /// What a held transaction's `stmts` would write now, without journaling.
    pub async fn preview(
        &self,
        user: &str,
        stmts: &[TxStatement],
        known: &mut Known,
    ) -> Result<(Applied, StoredValues), DeferError> {
        self.engine.preview(user, stmts, known).await
    }

    /// [`Self::preview`] without waiting, when nothing needs PostgreSQL.
    pub fn preview_now(
        &self,
        user: &str,
        stmts: &[TxStatement],
        known: &Known,
    ) -> Option<Result<(Applied, StoredValues), DeferError>> {
        self.engine.preview_now(user, stmts, known)
    }

    /// A held transaction's statements as one record, if the answers its client was
    /// given (`expected`) still hold.
    pub async fn defer_tx(
        &self,
        user: &str,
        stmts: Vec<TxStatement>,
        expected: Option<Applied>,
        known: Known,
    ) -> Result<TxOutcome, DeferError> {
        self.engine.defer_tx(user, stmts, expected, known).await
    }

    /// A session forwards (or finished) a write that may touch deferred tables outside
    /// the key overlay.
    pub fn note_outside_write(&self) {
        self.engine.note_outside_write();
    }

    /// How many such writes so far.
    pub fn outside_writes(&self) -> u64 {
        self.engine.outside_writes()
    }

    /// The highest sequence number applied upstream.
    pub fn applied(&self) -> u64 {
        self.engine.applied()
    }

    /// The highest sequence number acknowledged so far (`SPILLWAY FLUSH`).
    pub fn highest(&self) -> u64 {
        self.engine.highest()
    }

    /// Whether `table` is at its `max_pending` (for `when_full = "write-through"`).
    pub fn is_full(&self, table: &str) -> bool {
        self.engine.is_full(table)
    }

    /// The sequence number a barrier on `tables` must wait for, if any of them has
    /// pending writes.
    pub fn barrier_target<'a>(&self, tables: impl IntoIterator<Item = &'a str>) -> Option<u64> {
        self.engine.barrier_target(tables)
    }

    /// What a request touching `tables` must wait for, as their `consistency` says
    /// (`reads_only`: it only reads; `own_seq`: the session's latest deferred write).
    pub fn barrier<'a>(
        &self,
        tables: impl IntoIterator<Item = &'a str>,
        reads_only: bool,
        own_seq: u64,
    ) -> Option<u64> {
        self.engine.barrier(tables, reads_only, own_seq)
    }

    /// Starts an overlaid read of row `key` of `table` that `needs` these columns (ADR
    /// 0039): its watch, or why the row's pending writes make no overlay. Never on a shared log: another
    /// instance's flusher does not know this instance's watches.
    pub fn watch_row(&self, table: &str, key: &[String], needs: Needs) -> Result<Watched, Refusal> {
        if matches!(self.engine.log(), JournalLog::Nats(_)) {
            return Err(Refusal::Expired);
        }
        let id = self.engine.watch_row(table, key, needs)?;
        Ok(Watched {
            engine: self.engine.clone(),
            id,
        })
    }

    /// Returns once everything up to `seq` is applied upstream.
    pub async fn wait_applied(&self, seq: u64) -> Result<(), DeferError> {
        self.engine.wait_applied(seq).await
    }

    /// Why deferred writes cannot be served, if they cannot.
    pub fn health(&self) -> Result<(), String> {
        self.engine.health()?;
        match self.engine.log().unavailable() {
            Some(why) => Err(format!("journal: {why}")),
            None => Ok(()),
        }
    }

    /// Pending record count and age of the oldest, per table (metrics, console).
    pub fn pending_by_table(&self) -> Vec<(String, usize, Option<Duration>)> {
        self.engine.pending_by_table()
    }

    /// Names of the deferred tables (not those leaving deferral).
    pub fn deferred_names(&self) -> Vec<String> {
        self.engine.deferred_names()
    }

    /// Reload step 1: the new table set, tables leaving deferral marked leaving.
    pub fn begin_reload(&self, change: TablesChange) -> (Vec<String>, Arc<TableSet>) {
        self.engine.begin_reload(change)
    }

    /// Reload step 2: the leaving tables' deferrals in flight and pending writes done.
    pub async fn drain_leaving(&self, leaving: &[String]) -> Result<(), DeferError> {
        self.engine.drain_leaving(leaving).await
    }

    /// Reload step 3: the leaving tables gone from the set.
    pub fn finish_reload(&self) {
        self.engine.finish_reload();
    }

    /// Puts back the set of before a reload that could not finish.
    pub fn restore(&self, set: Arc<TableSet>) {
        self.engine.restore(set);
    }

    /// Installs new `[flush]` settings.
    pub fn set_flush(&self, flush: FlushConfig) {
        self.engine.set_flush(flush);
    }

    /// The key index of the deferred tables: the change stream's sink for the write
    /// side (register it with the replication task; until the stream calls
    /// `resumed`, the index is untrusted and exact counts use point reads).
    pub fn key_index(&self) -> Arc<KeyIndex> {
        self.engine.key_index().clone()
    }

    /// Sets the database whose commits the key index takes, and `[key_index]`.
    pub fn configure_keys(&self, database: &str, config: &KeyIndexConfig) {
        self.engine.configure_keys(database, config);
    }

    /// Loads the key index's tables as they need it (in chunks), until `shutdown`.
    pub async fn run_key_loader(self: Arc<Self>, shutdown: CancellationToken) {
        self.engine.clone().run_key_loader(shutdown).await;
    }

    /// Each deferred table's key index (console, metrics).
    pub fn key_stats(&self) -> Vec<KeyStats> {
        self.engine.key_stats()
    }

    /// Keys read by point reads and the queries that read them, per table.
    pub fn point_read_counts(&self) -> Vec<(String, u64, u64)> {
        self.engine.point_read_counts()
    }

    /// Sets the pending-write and journal gauges (called when a scrape arrives).
    #[allow(clippy::cast_precision_loss)]
    pub fn export_gauges(&self) {
        use crate::metrics as m;
        for (table, pending, age) in self.pending_by_table() {
            metrics::gauge!(m::PENDING_WRITES, "table" => table.clone()).set(pending as f64);
            metrics::gauge!(m::PENDING_OLDEST_AGE, "table" => table)
                .set(age.map_or(0.0, |a| a.as_secs_f64()));
        }
        if let Some(journal) = self.engine.log().local() {
            metrics::gauge!(m::JOURNAL_BYTES).set(journal.bytes() as f64);
            let stats = journal.stats();
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            metrics::counter!(m::JOURNAL_FSYNCS).absolute(load(&stats.fsyncs));
            metrics::counter!(m::JOURNAL_FSYNC_MICROS).absolute(load(&stats.fsync_micros));
            metrics::counter!(m::JOURNAL_REFUSALS, "reason" => "full").absolute(load(&stats.full));
            metrics::counter!(m::JOURNAL_REFUSALS, "reason" => "no_space")
                .absolute(load(&stats.no_space));
        }
        for (table, keys, queries) in self.point_read_counts() {
            metrics::counter!(m::POINT_READS, "table" => table.clone()).absolute(keys);
            metrics::counter!(m::POINT_READ_QUERIES, "table" => table).absolute(queries);
        }
        for s in self.key_stats() {
            metrics::gauge!(m::KEY_INDEX_KEYS, "table" => s.table.clone()).set(s.keys as f64);
            metrics::gauge!(m::KEY_INDEX_BYTES, "table" => s.table.clone()).set(s.bytes as f64);
            for phase in engine::Phase::ALL {
                let on = if phase == s.phase { 1.0 } else { 0.0 };
                metrics::gauge!(m::KEY_INDEX_STATE, "table" => s.table.clone(), "state" => phase.as_str())
                    .set(on);
            }
        }
    }
}

/// A row watched for an overlaid read; the watch ends when this is dropped.
pub struct Watched {
    engine: Arc<Engine>,
    id: u64,
}

impl Watched {
    /// The row's assigned columns now that PostgreSQL's image of it arrived.
    pub fn overlay(&self) -> Result<Assigned, Refusal> {
        self.engine.overlay(self.id)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.engine.unwatch(self.id);
    }
}
