//! A deferred table as the engine and the proxy's write path see it: its policy
//! (`[tables."schema.name"]`) and the catalog facts the proxy loaded at startup or at
//! a reload. Plain data: the proxy fills it from PostgreSQL's catalog, the engine only
//! reads it.

use std::collections::HashMap;

use crate::TableConfig;
use crate::writes::TableMeta;

/// What a deferred statement does to its rows; decides the privilege it needs and the
/// command tag its client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Insert,
    Update,
    Delete,
}

impl Verb {
    /// The command tag PostgreSQL gives for `rows` rows.
    pub fn tag(self, rows: usize) -> String {
        match self {
            Verb::Insert => format!("INSERT 0 {rows}"),
            Verb::Update => format!("UPDATE {rows}"),
            Verb::Delete => format!("DELETE {rows}"),
        }
    }

    /// The table privilege PostgreSQL checks for it.
    pub fn privilege(self) -> &'static str {
        match self {
            Verb::Insert => "INSERT",
            Verb::Update => "UPDATE",
            Verb::Delete => "DELETE",
        }
    }
}

/// Column defaults spillway evaluates or answers itself (ADR 0030).
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// Columns whose default is a clock or random function (`now()`,
    /// `CURRENT_TIMESTAMP`, `gen_random_uuid()` …), with the default as `pg_get_expr`
    /// prints it: an INSERT that leaves one out gets the value at acknowledgement,
    /// filled in by the proxy (a default evaluated at flush time would differ;
    /// ADR 0030).
    pub clock: Vec<(String, String)>,
    /// Columns whose default is a constant of the column's own type, with its value's
    /// input text (`None`: NULL): what an INSERT leaving one out stores, for RETURNING.
    pub constant: Vec<(String, Option<String>)>,
}

/// A deferred table: its policy and its catalog facts.
#[derive(Debug, Clone)]
pub struct DeferredTable {
    pub oid: u32,
    pub config: TableConfig,
    pub meta: TableMeta,
    /// Column → type OID, for decoding binary parameters.
    pub type_oids: HashMap<String, u32>,
    /// Column → `atttypmod` (length limits of varchar/bpchar).
    pub typmods: HashMap<String, i32>,
    /// NOT NULL columns, and those of them an INSERT must give (no default).
    pub not_null: Vec<String>,
    pub required: Vec<String>,
    /// What an INSERT that leaves a column out stores, where spillway can know it.
    pub defaults: Defaults,
    /// The enum types among the columns', with their labels as the table was loaded
    /// (a value prints as its label; only a label is accepted as input).
    pub enum_types: HashMap<u32, Vec<String>>,
    /// The primary-key constraint's name, for 23505 errors spillway reports itself.
    pub pkey_name: String,
    /// `SELECT EXISTS (… WHERE key = $1 …)` with text parameters: the point read of
    /// `row_counts = "exact"`.
    pub exists_sql: String,
    /// Every column in table order (`RETURNING *`), as a RowDescription describes it.
    pub columns: Vec<Column>,
    /// What besides a write itself may change the rows it stores.
    pub row_changes: RowChanges,
    /// The sequence behind a single integer key column (a `serial`'s `nextval`
    /// default or an identity): an INSERT leaving the key out gets a value spillway
    /// reserved from it.
    pub key_sequence: Option<KeySequence>,
    /// Columns an INSERT may not give a value (identity `GENERATED ALWAYS`, generated
    /// columns): PostgreSQL refuses such an INSERT, so it is never deferred.
    pub generated_always: Vec<String>,
}

/// What besides a write itself may change a deferred table's rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowChanges {
    /// A BEFORE ROW trigger or a rule may change (or replace) the row a write stores,
    /// so a RETURNING answered from the statement's own values could be wrong.
    pub rewritten: bool,
    /// A foreign key of this table has an ON DELETE or ON UPDATE action (CASCADE, SET
    /// NULL, SET DEFAULT): a write to the referenced table may change or delete this
    /// table's rows, so a value decided from the row's own writes could be wrong
    /// (guards, ADR 0035).
    pub by_parents: bool,
}

/// The sequence a key column's default draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySequence {
    /// The sequence's OID.
    pub oid: u32,
    /// The key column's type (int2, int4 or int8): a reserved value outside it is
    /// not handed out.
    pub type_oid: u32,
}

/// A column as `pg_attribute`/`pg_type` give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub attnum: i16,
    pub type_oid: u32,
    /// `pg_type.typlen` (-1 variable, -2 C string).
    pub typlen: i16,
    pub typmod: i32,
}
