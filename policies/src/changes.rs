//! Committed row changes, as the change stream reports them (PostgreSQL's logical
//! replication, `cache.invalidation = "replication"`), and who consumes them: the read
//! cache (per-row and per-table invalidation) and the write side's key index (which
//! primary keys exist). The proxy decodes the stream and hands each committed
//! transaction to every [`ChangeSink`]; this module is the contract between them and
//! knows nothing of the wire.
//!
//! Invariants:
//! - A [`Commit`] is delivered whole, in commit order, and only after PostgreSQL
//!   committed it; a sink never sees part of a transaction.
//! - Keys are canonical text, the form the write side's key overlay uses
//!   (`write/params.rs::canonical_key`: integers in decimal, uuids lower-case with
//!   dashes, text as is), one entry per primary-key column in key order. A change
//!   whose key is not known (no replica identity, a column that was not sent) is
//!   [`Change::Table`]: consumers treat the whole table as changed.
//! - After [`ChangeSink::lost`], nothing a sink derived from the stream may be trusted
//!   until [`ChangeSink::resumed`]: the stream may have skipped changes.

/// A table as the stream names it: its OID and `schema.name` (unquoted, as in the
/// config's `[tables."schema.name"]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableRef {
    pub oid: u32,
    pub name: String,
}

/// One change of a committed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A row was inserted with this key.
    Insert { table: TableRef, key: Vec<String> },
    /// A row was updated; `old_key` when the update changed the key itself.
    Update {
        table: TableRef,
        key: Vec<String>,
        old_key: Option<Vec<String>>,
    },
    /// The row with this key was deleted.
    Delete { table: TableRef, key: Vec<String> },
    /// Rows of the table changed in ways whose keys are not known (TRUNCATE, a
    /// table without a usable replica identity, a relation whose shape changed).
    Table { table: TableRef },
}

impl Change {
    pub fn table(&self) -> &TableRef {
        match self {
            Change::Insert { table, .. }
            | Change::Update { table, .. }
            | Change::Delete { table, .. }
            | Change::Table { table } => table,
        }
    }
}

/// One committed transaction of one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub database: String,
    /// The commit's end position in the WAL (the slot may be confirmed up to it once
    /// every sink has taken the commit).
    pub lsn: u64,
    /// The transaction was spillway's own flush (its writes are already accounted
    /// for where they were acknowledged and applied).
    pub own: bool,
    pub changes: Vec<Change>,
}

/// A consumer of the change stream. Calls come from the stream's task, one at a
/// time per database; implementations must not block for long (they run before the
/// slot's position may advance).
pub trait ChangeSink: Send + Sync {
    /// A committed transaction.
    fn committed(&self, commit: &Commit);
    /// The stream of `database` stopped or fell behind its bound: changes may be
    /// missed from now on.
    fn lost(&self, database: &str);
    /// The stream of `database` is following again from a position after which no
    /// change was missed (everything derived before [`ChangeSink::lost`] must be
    /// rebuilt or dropped by the sink itself).
    fn resumed(&self, database: &str);
}
