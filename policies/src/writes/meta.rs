//! What the flush planner knows of a deferred table, from the catalog: its name, key,
//! column types, whether it folds (write-back), whether its rows may be planned apart
//! from other tables', and its foreign keys. Plain data; `plan/` and `order.rs` read
//! it.

use std::collections::HashMap;

/// What the flusher needs to know about a deferred table (from the catalog).
#[derive(Debug, Clone)]
pub struct TableMeta {
    /// `schema.name`, as in the config and in records.
    pub name: String,
    pub schema: String,
    pub table: String,
    /// Primary-key columns, in key order.
    pub key: Vec<String>,
    /// Every column's type as `format_type` spells it.
    pub types: HashMap<String, String>,
    /// Write-back: the flusher folds the table's operations per key
    /// ([`super::coalesce`]) instead of applying them one by one.
    pub coalesce: bool,
    /// No triggers and no rules: its INSERTs may be planned apart from other tables'
    /// (`order.rs`).
    pub plain: bool,
    /// Its foreign keys (the tables it references).
    pub parents: Vec<ForeignKey>,
    /// The key is an identity `GENERATED ALWAYS` whose values spillway reserves: its
    /// INSERTs are applied with `OVERRIDING SYSTEM VALUE` (an INSERT giving the key
    /// itself is never deferred, since PostgreSQL would refuse it).
    pub overriding: bool,
}

impl TableMeta {
    /// ` OVERRIDING SYSTEM VALUE` for a table whose key is an identity `GENERATED
    /// ALWAYS` (its INSERTs carry the value spillway reserved from the identity's
    /// sequence), else nothing: what `plan/sql.rs` and `replay.rs` put after the column
    /// list of an INSERT.
    pub fn overriding_clause(&self) -> &'static str {
        if self.overriding {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        }
    }
}

/// A foreign key of a deferred table: its columns reference `references` of `parent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignKey {
    /// `schema.name` of the referenced table.
    pub parent: String,
    pub columns: Vec<String>,
    pub references: Vec<String>,
}
