//! The write-policy engine of the deferred policies (SPEC §6), with no network code:
//! which writes are pending and what they leave behind (the key overlay), deciding a
//! statement or a held transaction ([`decide`]: exact row counts, duplicate keys),
//! journaling it ([`defer`], after the reads its decision needs: `answered.rs`), when
//! a flush is due ([`due`]), room and back-pressure ([`room`]), what a request must
//! wait for ([`barrier`]), the flush loop ([`flusher`]:
//! contiguous batches, retry with back-off, the ledger read again after an unknown
//! outcome, poison on a fence), privilege answers ([`privileges`]) and which tables are
//! deferred, including a reload's steps ([`table_set`]).
//!
//! It reaches PostgreSQL only through the traits of [`upstream`] (the proxy implements
//! them with sqlx) and the disk only through [`upstream::Log`] (the journal), so its
//! tests run on a paused clock against an in-memory sink (`tests/`).
//!
//! Invariants:
//! - A record is acknowledged only after the log made it durable and it is in
//!   `pending`; the insertion runs in a spawned task, so a client that disconnects
//!   while waiting cannot leave a durable record out of `pending` (the flusher would
//!   otherwise wait for its sequence number forever).
//! - The flusher applies a contiguous prefix of sequence numbers only: record n + 1 is
//!   never applied before record n, even when their appends completed out of order,
//!   and never beyond the log's `durable_seq`.
//! - `applied` (a watch) only grows, and only after the batch's transaction committed
//!   with the ledger advance; barriers wait on it.
//! - After a transient failure nothing is applied until the ledger was read again on
//!   a new connection: a batch whose COMMIT answer was lost may be in already.
//! - A fenced ledger or an unplannable record stops the flusher for good (poison): the
//!   engine refuses new deferred writes and barriers fail with the cause, instead of
//!   acknowledging writes that would never be applied.
//! - A deferral is counted in flight (`State::inflight`) from the moment its table is
//!   found deferred until its record is pending or it gave up, whether or not the
//!   client still waits: a reload taking the table off deferral waits for these.
//! - Time is tokio's (`tokio::time::Instant`), so a paused clock drives every rule.

mod answered;
pub mod barrier;
pub mod decide;
pub mod defer;
pub mod due;
pub mod flusher;
pub mod guards;
pub mod keys;
pub mod overlay;
pub mod privileges;
pub mod reads;
pub mod room;
pub mod state;
pub mod table;
pub mod table_set;
pub mod upstream;
pub mod watches;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use tokio::sync::{Notify, watch};

use crate::FlushConfig;
use crate::journal::JournalError;
use crate::writes::{Record, RowOp};

pub use decide::{Applied, Converted, IfExists, Outcome, StoredValues, TxOutcome, TxStatement};
pub use guards::exact_spelling;
pub use keys::{Chunk, Cursor, KeyIndex, KeyKind, KeyStats, Phase};
pub use privileges::PRIVILEGE_TTL;
pub use state::Known;
pub use table::{Column, Defaults, DeferredTable, KeySequence, RowChanges, Verb};
pub use table_set::{TableSet, TablesChange};
pub use upstream::{
    ApplyError, Batch, CheckError, Checks, DeadLetter, Flushed, LedgerKey, Log, RowValues, Sink,
};

use privileges::Privileges;
use reads::PointReads;
use state::State;

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
    /// A guarded write (ADR 0035) whose row spillway does not know exactly (a delta
    /// pending on a guarded column, a column's default): the statement runs upstream
    /// instead (a held transaction moves there), where PostgreSQL decides it.
    #[error("the row a guarded write on {0} depends on is not known exactly")]
    RowUnknown(String),
}

impl DeferError {
    /// 53000 (insufficient resources) for back-pressure and a replicated journal without
    /// quorum, 53100 (disk full) when the journal's disk is, 08006 when upstream is
    /// unreachable or a replicated journal's answer was lost (the outcome is unknown),
    /// XX000 otherwise.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            DeferError::Full { .. }
            | DeferError::Journal(JournalError::Full { .. } | JournalError::Unavailable(_)) => {
                "53000"
            }
            DeferError::Journal(JournalError::NoSpace { .. }) => "53100",
            DeferError::Duplicate { .. } => "23505",
            DeferError::Upstream(_)
            | DeferError::Unreachable(_)
            | DeferError::Journal(JournalError::Indeterminate(_)) => "08006",
            DeferError::Diverged(_) | DeferError::Journal(JournalError::Conflict(_)) => "40001",
            _ => "XX000",
        }
    }
}

impl DeferError {
    /// The journal has no room (`journal.max_bytes` or its disk): a table with
    /// `when_full = "write-through"` runs the statement upstream instead.
    pub fn journal_out_of_room(&self) -> bool {
        matches!(self, DeferError::Journal(e) if e.is_out_of_room())
    }
}

impl From<CheckError> for DeferError {
    fn from(e: CheckError) -> Self {
        match e {
            CheckError::Unreachable(m) => DeferError::Unreachable(m),
            CheckError::Failed(m) => DeferError::Upstream(m),
        }
    }
}

/// Why the engine cannot start on this journal and ledger.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
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

/// The engine of one backend database: `C` asks PostgreSQL on the session side, `L`
/// is the journal.
pub struct Engine<C, L> {
    /// The deferred tables; swapped whole by a reload (`table_set`), read with one
    /// atomic load.
    tables: ArcSwap<TableSet>,
    log: L,
    state: Mutex<State>,
    applied: watch::Sender<u64>,
    /// Asks the flusher to look again (a barrier, a full batch, a writer waiting for
    /// room). A wake alone does not make a flush due: see [`Engine::until_due`].
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
    checks: C,
    /// Privilege answers per (role, table, verb) (`privileges.rs`).
    privileges: Mutex<Privileges>,
    /// Which keys exist in each deferred table, while the change stream follows
    /// (`keys/`); asked after the overlay, before a point read.
    keys: Arc<KeyIndex>,
    /// Point reads waiting per table, read together (`reads.rs`).
    reads: PointReads,
}

impl<C: Checks, L: Log> Engine<C, L> {
    /// The session side's way to PostgreSQL (the proxy's check connections).
    pub fn checks(&self) -> &C {
        &self.checks
    }
}

impl<C: Checks, L: Log> Engine<C, L> {
    /// Builds the engine over an open `log` whose ledger row says `applied` (the
    /// caller claimed it); the `recovered` records the ledger does not hold become
    /// pending, and the flusher replays them first.
    pub fn start(
        log: L,
        recovered: Vec<crate::journal::Record>,
        applied: u64,
        tables: HashMap<String, DeferredTable>,
        flush: FlushConfig,
        checks: C,
    ) -> Result<Arc<Self>, StartError> {
        let first_pending = recovered
            .iter()
            .map(|r| r.seq)
            .filter(|s| *s > applied)
            .min();
        check_ledger(&log.id(), applied, log.durable_seq(), first_pending)?;
        let mut state = State::default();
        for r in recovered.into_iter().filter(|r| r.seq > applied) {
            let record = Record::decode(&r.payload).map_err(|e| StartError::Decode {
                seq: r.seq,
                error: e.to_string(),
            })?;
            state.note_pending(r.seq, Arc::new(record));
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
            log,
            state: Mutex::new(state),
            applied: applied_tx,
            wake: Notify::new(),
            wanted: AtomicU64::new(0),
            poisoned: OnceLock::new(),
            outside: AtomicU64::new(0),
            flush: ArcSwap::from_pointee(flush),
            checks,
            privileges: Mutex::new(HashMap::new()),
            keys: Arc::new(KeyIndex::default()),
            reads: PointReads::default(),
        }))
    }

    /// The key index: the change stream's sink for the write side (`ChangeSink`).
    pub fn key_index(&self) -> &Arc<KeyIndex> {
        &self.keys
    }

    /// Sets the key index's database (whose commits count) and `[key_index]`.
    pub fn configure_keys(&self, database: &str, config: &crate::KeyIndexConfig) {
        self.keys.configure(database, config, &self.tables.load());
    }

    /// Each deferred table's key index (console, metrics).
    pub fn key_stats(&self) -> Vec<KeyStats> {
        self.keys.stats()
    }

    /// Keys read by point reads and the queries that read them, per table.
    pub fn point_read_counts(&self) -> Vec<(String, u64, u64)> {
        self.reads.counts()
    }

    /// The deferred tables now (one atomic load; hold it briefly).
    pub fn tables(&self) -> Guard<Arc<TableSet>> {
        self.tables.load()
    }

    /// The journal.
    pub fn log(&self) -> &L {
        &self.log
    }

    /// The ledger row this engine advances.
    pub fn ledger_key(&self) -> LedgerKey {
        LedgerKey {
            journal_id: self.log.id(),
            epoch: self.log.epoch(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
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

    /// The highest sequence number acknowledged so far (`SPILLWAY FLUSH`).
    pub fn highest(&self) -> u64 {
        self.state().highest
    }

    /// Why deferred writes cannot be served, if they cannot.
    pub fn health(&self) -> Result<(), String> {
        if let Some(cause) = self.poisoned.get() {
            return Err(format!("flush worker stopped: {cause}"));
        }
        if self.log.is_poisoned() {
            return Err("journal stopped after an I/O error".to_owned());
        }
        Ok(())
    }

    /// The cause the flusher stopped for good, if it did.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.get().map(String::as_str)
    }

    /// Pending record count and age of the oldest, per table (metrics, console).
    pub fn pending_by_table(&self) -> Vec<(String, usize, Option<Duration>)> {
        self.state()
            .tables
            .iter()
            .map(|(t, s)| (t.clone(), s.pending, s.oldest.map(|o| o.elapsed())))
            .collect()
    }

    /// A record another instance appended to a shared log (the NATS stream), seen by
    /// this instance's follower: pending here too, its keys in the overlay as it
    /// leaves them (a journaled INSERT or UPDATE leaves its row existing, a DELETE
    /// not), so the flusher's contiguous prefix and this instance's decisions include
    /// it. Records already applied or already pending are ignored. Returns what the
    /// record writes (tables, keys), for cached reads of them to be invalidated as
    /// for a write acknowledged here; nothing for an ignored record.
    pub fn note_foreign(&self, seq: u64, payload: &[u8]) -> Result<state::Applied, StartError> {
        if seq <= self.applied() {
            return Ok(state::Applied::default());
        }
        let record = Record::decode(payload).map_err(|e| StartError::Decode {
            seq,
            error: e.to_string(),
        })?;
        let mut written = state::Applied::default();
        let mut after = HashMap::new();
        for op in &record.ops {
            let table = op.table().to_owned();
            if !written.tables.contains(&table) {
                written.tables.push(table.clone());
            }
            match self.key_of(op) {
                Some(key) => {
                    written.keys.push((table.clone(), key.clone()));
                    after.insert((table, key), !matches!(op, RowOp::Delete { .. }));
                }
                None if !written.unkeyed.contains(&table) => written.unkeyed.push(table),
                None => {}
            }
        }
        let mut state = self.state();
        if state.pending.contains_key(&seq) {
            return Ok(state::Applied::default());
        }
        state.reserve(&after);
        let record = Arc::new(record);
        state.note_pending(seq, record.clone());
        state.watches.note(seq, &record, |op| self.key_of(op));
        drop(state);
        if self.until_due().is_zero() {
            self.wake.notify_one();
        }
        Ok(written)
    }

    /// The canonical key of an operation, as the overlay stores it.
    fn key_of(&self, op: &RowOp) -> Option<Vec<String>> {
        let tables = self.tables.load();
        let meta = tables.metas.get(op.table())?;
        // Keys are never NULL in a record (the write path refuses that).
        crate::writes::plan::key_of(op, meta)
            .ok()?
            .into_iter()
            .collect()
    }
}

/// Refuses a journal and a ledger that cannot both be right: the flusher applies the
/// records after the ledger's `applied` in order, so the journal must hold exactly
/// those (`first_pending` is the lowest recovered sequence number above `applied`,
/// `durable` the journal's last).
pub fn check_ledger(
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
