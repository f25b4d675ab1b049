//! The deferred-write service of the backend database: the journal, the records
//! acknowledged but not yet applied (pending), and the flush worker that applies them
//! upstream in order, in batches, exactly once (SPEC §6). The flush loop is in
//! `flusher.rs`; which tables are deferred, and how a reload changes that, in
//! `table_set.rs`; the check connections (privileges, point reads) in `checks.rs`.
//!
//! Invariants:
//! - A record is acknowledged only after the journal made it durable and it is in
//!   `pending`; the insertion runs in a spawned task, so a client that disconnects
//!   while waiting cannot leave a durable record out of `pending` (the flusher would
//!   otherwise wait for its sequence number forever).
//! - The flusher applies a contiguous prefix of sequence numbers only: record n + 1 is
//!   never applied before record n, even when their appends completed out of order.
//! - `applied` (a watch) only grows, and only after the batch's transaction committed
//!   with the ledger advance; barriers wait on it.
//! - After a transient failure nothing is applied until the ledger was read again on
//!   a new connection: a batch whose COMMIT answer was lost may be in already.
//! - A fenced ledger or an unplannable record stops the flusher for good (poison): the
//!   service refuses new deferred writes and barriers fail with the cause, instead of
//!   acknowledging writes that would never be applied.
//! - A deferral is counted in flight (`State::inflight`) from the moment its table is
//!   found deferred until its record is pending or it gave up, whether or not the
//!   client still waits: a reload taking the table off deferral waits for these.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::{ArcSwap, Guard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use spillway_policies::journal::{Journal, JournalError};
use spillway_policies::writes::Record;
use spillway_policies::{FlushConfig, WhenFull};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::{Notify, oneshot, watch};

use super::apply::{self, ApplyError, LedgerKey};
use super::convert::Verb;
use super::tables::DeferredTable;
use table_set::InFlight;
pub use table_set::{TableSet, TablesChange};

mod checks;
mod defer;
mod flusher;
mod table_set;

pub use defer::{Applied, Known, TxOutcome, TxStatement};

use checks::{CHECK_CONNECTIONS, Privileges};

/// Longest pause between retries of a batch that failed transiently.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `application_name` of the flush worker's and the check connection's backends, so
/// that an operator (or a test) can tell them apart in `pg_stat_activity`.
pub const FLUSH_APP: &str = "spillway flush";
pub const CHECKS_APP: &str = "spillway checks";

/// Connects to `url` with `application_name` set to `name`.
async fn connect_as(url: &str, name: &str) -> Result<PgConnection, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    PgConnection::connect_with(&options.application_name(name)).await
}

#[derive(Debug, thiserror::Error)]
pub enum DeferError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("table {table} has {pending} pending writes (max_pending); write rejected")]
    Full { table: String, pending: usize },
    #[error("deferred writes stopped: {0}")]
    Stopped(String),
    #[error("journal record does not encode: {0}")]
    Encode(String),
    /// The client's role may not write this table: the statement runs write-through
    /// instead, so PostgreSQL reports the refusal itself.
    #[error("role {user} may not {verb:?} table {table}")]
    NotPermitted {
        user: String,
        table: String,
        verb: Verb,
    },
    #[error("duplicate key value violates unique constraint \"{constraint}\"")]
    Duplicate { constraint: String, detail: String },
    #[error("checking the deferred table upstream: {0}")]
    Upstream(String),
    /// The table is not (or no longer, after a reload) deferred: the statement runs
    /// write-through instead, after its barrier.
    #[error("table {0} is not deferred")]
    NotDeferred(String),
    /// The check connection cannot reach PostgreSQL (down, restarting): retryable.
    #[error("PostgreSQL is unreachable, the deferred write cannot be checked: {0}")]
    Unreachable(String),
    /// A held transaction's statements no longer have the row counts its client was
    /// given (another session wrote the same keys meanwhile): nothing is written, the
    /// transaction is rolled back, the client may retry it.
    #[error("could not serialize access: {0}")]
    Diverged(String),
}

impl DeferError {
    /// 53000 (insufficient resources) for back-pressure, XX000 otherwise.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            DeferError::Full { .. } | DeferError::Journal(JournalError::Full { .. }) => "53000",
            DeferError::Duplicate { .. } => "23505",
            DeferError::Upstream(_) | DeferError::Unreachable(_) => "08006",
            DeferError::Diverged(_) => "40001",
            _ => "XX000",
        }
    }
}

#[derive(Default)]
struct State {
    /// Durable records not yet applied, by sequence number.
    pending: BTreeMap<u64, Arc<Record>>,
    /// When each pending record became pending: the lowest sequence number's is the
    /// age that makes a flush due (`flush.interval`), also while more keep arriving.
    acked_at: BTreeMap<u64, Instant>,
    /// Per table, the highest sequence number acknowledged with `row_counts =
    /// "assumed"`, and the highest replayed at start (acknowledged under a config no
    /// longer known): write-back never folds those records (see `may_fold`), because
    /// folding relies on every operation having been valid when acknowledged.
    assumed_through: HashMap<String, u64>,
    replayed_through: u64,
    /// Pending record count and the oldest pending acknowledgement, per table.
    tables: HashMap<String, TableState>,
    /// Highest sequence number in `pending` so far.
    highest: u64,
    /// Keys with pending writes: whether the row exists once they are applied. The
    /// existence answer for such a key comes from here, never from PostgreSQL (which
    /// does not have those writes yet).
    keys: HashMap<(String, Vec<String>), KeyState>,
    /// Counts the keys the overlay forgot (their pending writes all applied).
    generation: u64,
    /// When each key was last forgotten (a `generation`), up to [`FORGOTTEN_LIMIT`]
    /// keys; forgettings before `forgotten_floor` are no longer known one by one.
    forgotten: HashMap<(String, Vec<String>), u64>,
    forgotten_floor: u64,
    /// Deferrals per table decided but not yet pending or given up ([`InFlight`]).
    inflight: HashMap<String, usize>,
}

/// How many forgotten keys [`State::forgotten`] remembers before it starts over.
const FORGOTTEN_LIMIT: usize = 4096;

impl State {
    /// Whether a decision taken now has an answer for `key` of `table`: its pending
    /// writes (the overlay), or a point read in `known` that was not overtaken by
    /// writes to the key applied (and forgotten) since it began.
    fn answered(&self, table: &str, key: &[String], known: &Known) -> bool {
        let slot = (table.to_owned(), key.to_vec());
        if self.keys.contains_key(&slot) {
            return true;
        }
        known.get(&slot).is_some_and(|(_, since, _)| {
            *since >= self.forgotten_floor && self.forgotten.get(&slot).is_none_or(|g| *g <= *since)
        })
    }
}

#[derive(Clone, Copy)]
struct KeyState {
    pending: u32,
    exists: bool,
}

#[derive(Default, Clone, Copy)]
struct TableState {
    pending: usize,
    oldest: Option<Instant>,
    /// Keys in the overlay (write-back's dirty keys, bounded by `flush.max_dirty_keys`).
    dirty_keys: usize,
}

pub struct WriteService {
    /// The deferred tables; swapped whole by a reload (`table_set`), read with one
    /// atomic load.
    tables: ArcSwap<TableSet>,
    journal: Journal,
    state: Mutex<State>,
    applied: watch::Sender<u64>,
    /// Asks the flusher to look again (a barrier, a full batch, a writer waiting for
    /// room). A wake alone does not make a flush due: see [`Self::until_due`].
    wake: Notify,
    /// The sequence number someone is waiting to see applied (barriers, `SPILLWAY
    /// FLUSH`, writers blocked on `max_pending`); the flusher applies at once while it
    /// is ahead of `applied`.
    wanted: AtomicU64,
    /// Set once when the flusher stops for good.
    poisoned: OnceLock<String>,
    /// Counts writes spillway forwarded to PostgreSQL that may touch deferred tables
    /// outside the key overlay (write-through fallbacks, DDL, unknown side effects): a
    /// held transaction's point reads taken before one are read again at COMMIT.
    outside: AtomicU64,
    /// `[flush]`, swapped by a reload.
    flush: ArcSwap<FlushConfig>,
    url: String,
    /// Privilege answers per (role, table, verb); `checks` below are the connections
    /// that ask them and do the point reads of `row_counts = "exact"`.
    privileges: Mutex<Privileges>,
    /// [`CHECK_CONNECTIONS`] slots, each connected on first use: concurrent point
    /// reads of different sessions run side by side instead of queueing on one.
    checks: Vec<tokio::sync::Mutex<Option<PgConnection>>>,
    /// Where the next check that finds every slot busy waits.
    next_check: std::sync::atomic::AtomicUsize,
    /// Rate-limited log lines of writes that ran write-through instead.
    pub fallbacks: super::fallbacks::FallbackLog,
}

/// A deferred statement's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The journal record, or `None` when nothing was written (an UPDATE/DELETE of a
    /// key that does not exist, with exact row counts).
    pub seq: Option<u64>,
    /// The row count for the command tag.
    pub rows: usize,
    /// Per operation of the statement, in order: whether it writes a row.
    pub applied: Vec<bool>,
}

impl WriteService {
    /// Opens the journal and claims its ledger row; the recovered records the ledger
    /// does not hold become pending (the flusher replays them first).
    pub async fn start(
        journal: Journal,
        recovered: Vec<spillway_policies::journal::Record>,
        tables: HashMap<String, DeferredTable>,
        flush: FlushConfig,
        url: String,
        conn: &mut PgConnection,
    ) -> Result<Arc<Self>, StartError> {
        let key = LedgerKey {
            journal_id: journal.id().to_string(),
            epoch: journal.epoch(),
        };
        let applied = apply::claim_ledger(conn, &key).await?;
        let first_pending = recovered
            .iter()
            .map(|r| r.seq)
            .filter(|s| *s > applied)
            .min();
        check_ledger(
            &key.journal_id,
            applied,
            journal.durable_seq(),
            first_pending,
        )?;
        let mut state = State::default();
        for r in recovered.into_iter().filter(|r| r.seq > applied) {
            let record = Record::decode(&r.payload).map_err(|e| StartError::Decode {
                seq: r.seq,
                error: e.to_string(),
            })?;
            note_pending(&mut state, r.seq, Arc::new(record));
            state.replayed_through = state.replayed_through.max(r.seq);
        }
        if !state.pending.is_empty() {
            tracing::info!(
                records = state.pending.len(),
                from = applied + 1,
                "replaying journal records the ledger does not hold"
            );
        }
        let (applied_tx, _) = watch::channel(applied);
        Ok(Arc::new(Self {
            tables: ArcSwap::from_pointee(TableSet::new(tables)),
            journal,
            state: Mutex::new(state),
            applied: applied_tx,
            wake: Notify::new(),
            wanted: AtomicU64::new(0),
            poisoned: OnceLock::new(),
            outside: AtomicU64::new(0),
            flush: ArcSwap::from_pointee(flush),
            url,
            privileges: Mutex::new(HashMap::new()),
            checks: (0..CHECK_CONNECTIONS)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next_check: std::sync::atomic::AtomicUsize::new(0),
            fallbacks: super::fallbacks::FallbackLog::default(),
        }))
    }

    /// The deferred tables now (one atomic load; hold it briefly).
    pub fn tables(&self) -> Guard<Arc<TableSet>> {
        self.tables.load()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Journals `record`; returns once it is durable and pending.
    async fn append(
        self: &Arc<Self>,
        record: Record,
        inflight: Vec<InFlight>,
        assumed: Vec<String>,
    ) -> Result<u64, DeferError> {
        let payload = Bytes::from(
            record
                .encode()
                .map_err(|e| DeferError::Encode(e.to_string()))?,
        );
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        let record = Arc::new(record);
        // Spawned: see the module invariants.
        tokio::spawn(async move {
            let result = this.journal.append(payload).await;
            if let Ok(seq) = result {
                let mut state = this.state();
                // Under the lock that makes the record pending: the flusher never sees
                // it without knowing how it was acknowledged.
                for table in assumed {
                    let at = state.assumed_through.entry(table).or_default();
                    *at = (*at).max(seq);
                }
                note_pending(&mut state, seq, record);
                drop(state);
                if this.until_due().is_zero() {
                    this.wake.notify_one();
                }
            }
            // Pending (or failed) now, whether or not the client still waits.
            drop(inflight);
            let _ = tx.send(result);
        });
        match rx.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(DeferError::Stopped("journal task ended".to_owned())),
        }
    }

    /// Applies `max_pending`/`when_full = "block" | "reject"` of `table`.
    async fn wait_for_room(&self, t: &DeferredTable) -> Result<(), DeferError> {
        let started = Instant::now();
        let table = t.meta.name.as_str();
        loop {
            let pending = self.state().tables.get(table).map_or(0, |s| s.pending);
            if pending < t.config.max_pending {
                return Ok(());
            }
            if t.config.when_full != WhenFull::Block || started.elapsed() >= t.config.block_timeout
            {
                return Err(DeferError::Full {
                    table: table.to_owned(),
                    pending,
                });
            }
            self.want(self.highest());
            let mut applied = self.applied.subscribe();
            let _ = tokio::time::timeout(Duration::from_millis(20), applied.changed()).await;
        }
    }

    /// A session forwards (or finished) a write that may touch deferred tables outside
    /// the key overlay.
    pub fn note_outside_write(&self) {
        self.outside.fetch_add(1, Ordering::AcqRel);
    }

    /// How many such writes so far (see [`Self::note_outside_write`]).
    pub fn outside_writes(&self) -> u64 {
        self.outside.load(Ordering::Acquire)
    }

    /// The highest sequence number applied upstream.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Whether `table` is at its `max_pending` (for `when_full = "write-through"`).
    pub fn is_full(&self, table: &str) -> bool {
        let pending = self.state().tables.get(table).map_or(0, |s| s.pending);
        self.tables
            .load()
            .deferring(table)
            .is_some_and(|t| pending >= t.config.max_pending)
    }

    /// The sequence number a barrier on `tables` must wait for, if any of them has
    /// pending writes.
    pub fn barrier_target<'a>(&self, tables: impl IntoIterator<Item = &'a str>) -> Option<u64> {
        let state = self.state();
        tables
            .into_iter()
            .any(|t| state.tables.get(t).is_some_and(|s| s.pending > 0))
            .then_some(state.highest)
    }

    /// The highest sequence number acknowledged so far (`SPILLWAY FLUSH`).
    pub fn highest(&self) -> u64 {
        self.state().highest
    }

    /// Returns once everything up to `seq` is applied upstream.
    pub async fn wait_applied(&self, seq: u64) -> Result<(), DeferError> {
        let mut applied = self.applied.subscribe();
        loop {
            if *applied.borrow_and_update() >= seq {
                return Ok(());
            }
            if let Some(cause) = self.poisoned.get() {
                return Err(DeferError::Stopped(cause.clone()));
            }
            self.want(seq);
            // Poison is noticed within this period even without a change.
            let _ = tokio::time::timeout(Duration::from_millis(200), applied.changed()).await;
        }
    }

    /// Asks the flusher to apply everything up to `seq` now.
    fn want(&self, seq: u64) {
        self.wanted.fetch_max(seq, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// How long the pending records may still wait; zero when a flush is due: someone
    /// waits for them, a batch is full, or the oldest is `tick` old. A stale wake (a
    /// barrier already satisfied) therefore never flushes a record early.
    fn until_due(&self) -> Duration {
        let applied = *self.applied.borrow();
        if self.wanted.load(Ordering::Acquire) > applied {
            return Duration::ZERO;
        }
        let tick = self.tick();
        let state = self.state();
        // Write-behind: a full batch of records; write-back: too many dirty keys (its
        // records fold into those, however many there are).
        let (mut records, mut dirty) = (0, 0);
        for (table, s) in &state.tables {
            if self.coalesces(table) {
                dirty += s.dirty_keys;
            } else {
                records += s.pending;
            }
        }
        let flush = self.flush.load();
        if records >= flush.batch_size || dirty >= flush.max_dirty_keys {
            return Duration::ZERO;
        }
        state
            .acked_at
            .first_key_value()
            .map_or(tick, |(_, oldest)| tick.saturating_sub(oldest.elapsed()))
    }

    /// Whether `table` is write-back (its operations fold per key at flush).
    fn coalesces(&self, table: &str) -> bool {
        self.tables
            .load()
            .metas
            .get(table)
            .is_some_and(|m| m.coalesce)
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
        metrics::gauge!(m::JOURNAL_BYTES).set(self.journal.bytes() as f64);
        let stats = self.journal.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        metrics::counter!(m::JOURNAL_FSYNCS).absolute(load(&stats.fsyncs));
        metrics::counter!(m::JOURNAL_FSYNC_MICROS).absolute(load(&stats.fsync_micros));
    }

    /// Why deferred writes cannot be served, if they cannot.
    pub fn health(&self) -> Result<(), String> {
        if let Some(cause) = self.poisoned.get() {
            return Err(format!("flush worker stopped: {cause}"));
        }
        if self.journal.is_poisoned() {
            return Err("journal stopped after an I/O error".to_owned());
        }
        Ok(())
    }

    /// Pending record count and age of the oldest, per table (metrics, console).
    pub fn pending_by_table(&self) -> Vec<(String, usize, Option<Duration>)> {
        self.state()
            .tables
            .iter()
            .map(|(t, s)| (t.clone(), s.pending, s.oldest.map(|o| o.elapsed())))
            .collect()
    }
}

/// Refuses a journal and a ledger that cannot both be right: the flusher applies the
/// records after the ledger's `applied` in order, so the journal must hold exactly
/// those (`first_pending` is the lowest recovered sequence number above `applied`,
/// `durable` the journal's last).
fn check_ledger(
    journal: &str,
    applied: u64,
    durable: u64,
    first_pending: Option<u64>,
) -> Result<(), StartError> {
    if durable < applied {
        return Err(StartError::JournalBehindLedger {
            journal: journal.to_owned(),
            applied,
            durable,
        });
    }
    match first_pending {
        _ if durable == applied => Ok(()),
        Some(first) if first == applied + 1 => Ok(()),
        other => Err(StartError::LedgerBehindJournal {
            journal: journal.to_owned(),
            applied,
            from: applied + 1,
            to: other.map_or(durable, |f| f - 1),
        }),
    }
}

impl WriteService {
    /// The canonical key of an operation, as the overlay stores it.
    fn key_of(&self, op: &spillway_policies::writes::RowOp) -> Option<Vec<String>> {
        let tables = self.tables.load();
        let meta = tables.metas.get(op.table())?;
        // Keys are never NULL in a record (the write path refuses that).
        spillway_policies::writes::plan::key_of(op, meta)
            .ok()?
            .into_iter()
            .collect()
    }
}

fn note_pending(state: &mut State, seq: u64, record: Arc<Record>) {
    for t in record.tables() {
        let s = state.tables.entry(t.to_owned()).or_default();
        s.pending += 1;
        s.oldest.get_or_insert_with(Instant::now);
    }
    state.highest = state.highest.max(seq);
    state.pending.insert(seq, record);
    state.acked_at.insert(seq, Instant::now());
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Ledger(#[from] ApplyError),
    #[error(
        "spillway.flush_ledger says journal {journal} was applied through record {applied}, \
         but the journal ends at record {durable}: the journal directory is older than the \
         database (restored from a backup, or another instance's?). New writes would be \
         numbered as already applied, so spillway does not start; see docs/operations.md, \
         \"The ledger and the journal disagree\""
    )]
    JournalBehindLedger {
        journal: String,
        applied: u64,
        durable: u64,
    },
    #[error(
        "spillway.flush_ledger says journal {journal} was applied through record {applied}, \
         but the journal no longer holds records {from} to {to} (they were confirmed applied \
         and truncated): the database is older than the journal (restored from a backup?) \
         and lacks writes that were acknowledged. spillway does not start; see \
         docs/operations.md, \"The ledger and the journal disagree\""
    )]
    LedgerBehindJournal {
        journal: String,
        applied: u64,
        from: u64,
        to: u64,
    },
    #[error("journal record {seq} does not decode: {error}")]
    Decode { seq: u64, error: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_and_the_journal_must_agree() {
        // Fresh journal; caught up; records pending right after the ledger.
        assert!(check_ledger("j", 0, 0, None).is_ok());
        assert!(check_ledger("j", 7, 7, None).is_ok());
        assert!(check_ledger("j", 7, 9, Some(8)).is_ok());
        // The journal ends before what the ledger says was applied.
        assert!(matches!(
            check_ledger("j", 9, 7, None),
            Err(StartError::JournalBehindLedger {
                applied: 9,
                durable: 7,
                ..
            })
        ));
        // Records after the ledger were truncated away: all of them, or a prefix.
        assert!(matches!(
            check_ledger("j", 3, 9, None),
            Err(StartError::LedgerBehindJournal { from: 4, to: 9, .. })
        ));
        assert!(matches!(
            check_ledger("j", 3, 9, Some(7)),
            Err(StartError::LedgerBehindJournal { from: 4, to: 6, .. })
        ));
    }
}
