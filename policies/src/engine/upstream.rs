//! The engine's only ways out: the traits the proxy implements with its PostgreSQL
//! driver ([`Checks`] for the session side, [`Sink`] for the flush worker) and the
//! durable log ([`Log`], the [`Journal`] in production). Tests implement all three in
//! memory, so every rule of the engine runs without a socket or a disk.
//!
//! Contracts the implementations keep:
//! - [`Sink::apply`] commits the batch, the ledger compare-and-set from
//!   `applied_through` to the batch's last sequence number and the dead letters in one
//!   transaction, or nothing; [`ApplyError::Fenced`] when the compare-and-set finds the
//!   ledger elsewhere. A [`ApplyError::Transient`] may hide a commit whose answer was
//!   lost: the engine reads the ledger again ([`Sink::claim`]) before anything else.
//! - [`Checks`] never waits long for a connection: an unreachable PostgreSQL is
//!   [`CheckError::Unreachable`], promptly.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::keys::{Chunk, Cursor, KeyKind};
use super::table::{DeferredTable, Verb};
use crate::journal::{Journal, JournalError};
use crate::writes::{Record, RowOp, TableMeta};

/// Which ledger row (`spillway.flush_ledger`) this engine owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerKey {
    pub journal_id: String,
    pub epoch: u64,
}

/// Why a batch (or the ledger read) did not go through.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApplyError {
    /// Connection trouble, serialization failure, shutdown of PostgreSQL, lack of
    /// resources: retry the same batch later.
    #[error("transient error applying a batch: {0}")]
    Transient(String),
    /// The ledger row is not at the expected point: another process took this journal
    /// over (a newer epoch) or the ledger was changed by hand. Stop flushing.
    #[error(
        "flush ledger for journal {journal_id} is not at epoch {epoch}, seq {expected}: \
         another spillway owns this journal, or the ledger was changed; flushing stopped"
    )]
    Fenced {
        journal_id: String,
        epoch: u64,
        expected: u64,
    },
    /// A record cannot even be planned (table no longer configured, unsafe cast):
    /// the flusher cannot make progress without losing it.
    #[error("journal record {seq} cannot be applied: {reason}")]
    Unplannable { seq: u64, reason: String },
}

/// A record PostgreSQL refused, as stored in `spillway.dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: u64,
    pub table: String,
    pub statement: String,
    pub parameters: Vec<Option<String>>,
    pub sqlstate: String,
    pub message: String,
}

impl DeadLetter {
    /// Operation `op` of record `seq`, refused with `sqlstate` and `message`.
    pub fn of(seq: u64, op: &RowOp, sqlstate: &str, message: &str) -> Self {
        Self {
            seq,
            table: op.table().to_owned(),
            statement: op.describe(),
            parameters: op.parameters(),
            sqlstate: sqlstate.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// What a committed batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Flushed {
    pub statements: usize,
    pub rows: usize,
    pub dead_letters: Vec<DeadLetter>,
    /// The batch's transaction id (`pg_current_xact_id()`), when the sink learned it:
    /// the read cache tells the batch's echo in the change stream by it (ADR 0036).
    pub xid: Option<u64>,
}

/// A batch: contiguous records in sequence order.
pub type Batch = [(u64, Arc<Record>)];

/// The flush worker's side of PostgreSQL. Its futures need not be `Send`: the worker
/// runs on a thread and runtime of its own.
pub trait Sink {
    /// Makes sure a connection is open (a no-op when one is).
    fn connect(&mut self) -> impl Future<Output = Result<(), ApplyError>>;
    /// Drops the connection: after a transient failure the next step starts afresh.
    fn disconnect(&mut self);
    /// Creates the ledger row if needed, fences older epochs, and returns the last
    /// sequence number applied (0 for a new journal).
    fn claim(&mut self, ledger: &LedgerKey) -> impl Future<Output = Result<u64, ApplyError>>;
    /// Applies `batch` (the first record follows `applied_through`) in one transaction
    /// with the ledger compare-and-set; `tables` plans it.
    fn apply(
        &mut self,
        ledger: &LedgerKey,
        applied_through: u64,
        batch: &Batch,
        tables: &HashMap<String, TableMeta>,
    ) -> impl Future<Output = Result<Flushed, ApplyError>>;
    /// PostgreSQL's WAL position now (flushed), after the last batch committed: the key
    /// index releases the batch's keys once the change stream passes it. `None` when
    /// this sink cannot tell.
    fn wal_position(&mut self) -> impl Future<Output = Result<Option<u64>, ApplyError>> {
        std::future::ready(Ok(None))
    }
}

/// A check's failure: PostgreSQL unreachable for now (connection loss, shutting down,
/// starting up), or an answer that says something else went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    Unreachable(String),
    Failed(String),
}

/// The session side's questions to PostgreSQL: may a role write a table, do keys
/// exist, which keys a table has (the key index's loader). Their futures run inside
/// session tasks, so they are `Send`.
pub trait Checks: Send + Sync + 'static {
    /// Whether `user` holds the privilege `verb` needs on `table` (UPDATE and DELETE
    /// by key also need SELECT, as in PostgreSQL).
    fn privilege(
        &self,
        user: &str,
        table: &DeferredTable,
        verb: Verb,
    ) -> impl Future<Output = Result<bool, CheckError>> + Send;
    /// Whether the rows with (canonical) `keys` exist upstream now, in their order: the
    /// point reads of `row_counts = "exact"`, in one query (`reads.rs` batches them).
    fn exists_many(
        &self,
        table: &DeferredTable,
        keys: &[Vec<String>],
    ) -> impl Future<Output = Result<Vec<bool>, CheckError>> + Send;
    /// Up to `limit` keys of `table` after `after` (from the first without), in key
    /// order, each read in a short statement of its own: loading the key index.
    fn key_chunk(
        &self,
        table: &DeferredTable,
        kind: KeyKind,
        after: Option<&Cursor>,
        limit: usize,
    ) -> impl Future<Output = Result<Chunk, CheckError>> + Send;
    /// The values of `columns` (as PostgreSQL's text output) of the row with
    /// (canonical) `key` (`None` when it does not exist), and the flush ledger's last
    /// applied sequence number in the same snapshot when the implementation knows the
    /// ledger: what a guarded write is decided against (ADR 0035).
    fn row_values(
        &self,
        table: &DeferredTable,
        key: &[String],
        columns: &[String],
    ) -> impl Future<Output = Result<RowValues, CheckError>> + Send;
    /// PostgreSQL's WAL position now (flushed), on the connection `key_chunk` uses.
    fn wal_position(&self) -> impl Future<Output = Result<u64, CheckError>> + Send;
}

/// A guarded write's point read ([`Checks::row_values`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowValues {
    /// The columns' values, `None` when the row does not exist.
    pub values: Option<Vec<Option<String>>>,
    /// The flush ledger's last applied sequence number in the read's snapshot: the
    /// pending records up to it are in the values, those after it are not.
    pub through: Option<u64>,
}

/// The durable journal as the engine uses it.
pub trait Log: Send + Sync + 'static {
    /// Returns the record's sequence number once it is durable as configured.
    fn append(&self, payload: Bytes) -> impl Future<Output = Result<u64, JournalError>> + Send;
    /// What this log has of `key` (table and key values, NUL-separated) now; the
    /// engine asks under its state lock, when it decides a statement on that key.
    fn key_mark(&self, key: &str) -> u64 {
        let _ = key;
        0
    }
    /// [`Log::append`] of a record that writes one key only, with the key and its
    /// [`Log::key_mark`] at the decision: a log shared by several instances refuses it
    /// with `JournalError::Conflict` when another instance wrote the key since (after
    /// this instance's engine got that write). A local log has no one to conflict with.
    fn append_keyed(
        &self,
        payload: Bytes,
        key: Option<(String, u64)>,
    ) -> impl Future<Output = Result<u64, JournalError>> + Send {
        let _ = key;
        self.append(payload)
    }
    /// Everything up to `seq` is applied upstream: the log may let go of it.
    fn confirm(&self, seq: u64) -> impl Future<Output = Result<(), JournalError>> + Send;
    /// The highest sequence number on stable storage; nothing beyond it is flushed.
    fn durable_seq(&self) -> u64;
    fn is_poisoned(&self) -> bool;
    fn id(&self) -> String;
    fn epoch(&self) -> u64;
}

impl Log for Journal {
    fn append(&self, payload: Bytes) -> impl Future<Output = Result<u64, JournalError>> + Send {
        Journal::append(self, payload)
    }

    fn confirm(&self, seq: u64) -> impl Future<Output = Result<(), JournalError>> + Send {
        Journal::confirm(self, seq)
    }

    fn durable_seq(&self) -> u64 {
        Journal::durable_seq(self)
    }

    fn is_poisoned(&self) -> bool {
        Journal::is_poisoned(self)
    }

    fn id(&self) -> String {
        Journal::id(self).to_string()
    }

    fn epoch(&self) -> u64 {
        Journal::epoch(self)
    }
}
