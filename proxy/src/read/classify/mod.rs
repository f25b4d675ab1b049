//! Statement classification (SPEC §4): what one query string does, as far as the
//! parse tree tells — pure, no I/O, no catalog.
//!
//! This module owns the [`Analysis`] of a query string (one [`Statement`] per SQL
//! statement in it) and the [`Classifier`] memo that parses each distinct text once.
//! Whether a `Select` may really be cached (function volatility, temp/catalog tables,
//! per-table settings) is decided later against the catalog by other code.
//!
//! Invariants:
//! - Conservative: a statement whose effects are not understood is [`Kind::Unknown`],
//!   never [`Kind::Select`]; `Select` means no data-modifying statement anywhere in
//!   the tree (CTEs included) and no `INTO`.
//! - Text pg_query cannot parse, or longer than `max_parse_bytes`, yields an
//!   `unanalysed` [`Analysis`] with no statements: pass through, never cache, never
//!   defer.
//! - Relation and function names are as PostgreSQL folds them (pg_query already gives
//!   folded identifiers; quoted ones keep their case), never resolved against a
//!   search_path.
//!
//! It is not: a semantic analyser. Views, rules, triggers and function bodies are
//! opaque here; operators are not reported as functions.
//!
//! Layout: `analyze` maps each parsed statement to a [`Kind`], `commands` decodes
//! transaction and SET options, `walk` collects relations/functions/flags from the
//! whole tree, `tree` turns pg_query's protobuf into a generic tree for that walk,
//! `shape` reads the deferrable [`WriteShape`] of an INSERT/UPDATE/DELETE, `memo`
//! holds the [`Classifier`].

mod analyze;
mod commands;
mod memo;
mod shape;
mod tree;
mod walk;

#[cfg(test)]
mod tests;

use std::fmt;
use std::mem::size_of;

pub use analyze::analyze;
pub use memo::{Classifier, ClassifierLimits};
pub use shape::point::PointFilter;
pub use shape::{
    Assign, Clock, Compare, ConflictSet, ConflictTarget, ConflictValue, OnConflict, Operand,
    Returned, Value, WriteShape, reason,
};

/// Result of analysing one query string (which may hold several statements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// One entry per statement, in order. An empty or comment-only string yields a
    /// single [`Kind::Empty`] statement; an `unanalysed` string yields none.
    pub statements: Vec<Statement>,
    /// pg_query could not parse it, or it was over the parse size limit: spillway
    /// must treat it as unknown (pass through, never cache, never defer).
    pub unanalysed: bool,
}

/// What one SQL statement does, as far as its parse tree tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub kind: Kind,
    /// Relations read (FROM/JOIN/subqueries/CTE bodies/USING etc.), as written, CTE
    /// names excluded (scoped: a CTE name hides a table only where the CTE is visible).
    pub reads: Vec<RelName>,
    /// Relations written: INSERT/UPDATE/DELETE/MERGE targets anywhere (including
    /// data-modifying CTEs), COPY FROM target, TRUNCATE targets.
    pub writes: Vec<RelName>,
    /// Relations a DDL statement creates/alters/drops (also those it references
    /// outside a query, e.g. a foreign key's table), where pg_query tells (may be
    /// empty, e.g. `DROP SCHEMA … CASCADE`).
    pub ddl_targets: Vec<RelName>,
    /// Every function called by name (FuncCall nodes, including aggregates/window
    /// functions and SQL-syntax functions pg_query spells `pg_catalog.*`, e.g.
    /// `EXTRACT`), plus TABLESAMPLE methods, as written.
    pub functions: Vec<FuncName>,
    /// Per `set_config()` call: the setting it names (lowercase), when a string
    /// constant does.
    pub set_config: Vec<Option<String>>,
    /// A SQL value function (CURRENT_DATE, CURRENT_TIMESTAMP, LOCALTIME, CURRENT_USER,
    /// SESSION_USER, CURRENT_ROLE, CURRENT_SCHEMA, CURRENT_CATALOG, USER …) appears —
    /// or a string constant such as `'now'` / `'today'` that date/time input turns
    /// into the current time when it is coerced.
    pub sql_value_function: bool,
    /// FOR UPDATE / FOR NO KEY UPDATE / FOR SHARE / FOR KEY SHARE anywhere.
    pub locking: bool,
    /// For a top-level INSERT/UPDATE/DELETE (not under EXPLAIN): its deferrable shape
    /// (SPEC §6), or the [`reason`] it has none. `None` for every other statement,
    /// writes included (MERGE, COPY FROM, a SELECT with a data-modifying CTE, EXPLAIN
    /// ANALYZE of a write), which are never deferrable either.
    pub shape: Option<Result<WriteShape, &'static str>>,
    /// For a top-level SELECT of one table with `col = value` conjuncts and no other
    /// table reference or subquery anywhere: those equalities (`shape/point.rs`); the
    /// read cache makes it a point read when they fix the table's primary key.
    pub point: Option<PointFilter>,
    /// Databases the statement needs no other session connected to (PostgreSQL
    /// refuses it otherwise): `DROP DATABASE d`, `ALTER DATABASE d RENAME`, and the
    /// template of `CREATE DATABASE` (`template1` unless another is named).
    pub vacated: Vec<String>,
}

/// A relation name as written (schema only when qualified; a catalog prefix is dropped).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelName {
    pub schema: Option<String>,
    pub name: String,
}

/// A function name as written (schema only when qualified).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FuncName {
    pub schema: Option<String>,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// SELECT / VALUES / TABLE with no writes anywhere, no INTO: the only kind that
    /// may be cached.
    Select,
    /// Reads that are never cached: SHOW, EXPLAIN without ANALYZE (EXPLAIN ANALYZE of
    /// a write is Write), COPY … TO, FETCH, DECLARE CURSOR, NOTIFY, VACUUM/ANALYZE,
    /// LOCK, CHECKPOINT, CLUSTER, REINDEX.
    OtherRead,
    /// INSERT/UPDATE/DELETE/MERGE, SELECT with a data-modifying CTE, COPY FROM.
    Write,
    /// TRUNCATE (targets in `writes`; `cascade` says whether CASCADE was given).
    Truncate {
        cascade: bool,
    },
    /// CREATE/ALTER/DROP/COMMENT/GRANT/REVOKE/REFRESH MATERIALIZED VIEW/SELECT INTO/
    /// CREATE TABLE AS…; `temp` when it creates a temporary object (TEMP or a
    /// `pg_temp.` name); `global` for cluster-wide objects (roles, databases,
    /// tablespaces, subscriptions, ALTER SYSTEM, DROP/REASSIGN OWNED).
    Ddl {
        temp: bool,
        global: bool,
    },
    Transaction(TxCommand),
    Session(SessionCommand),
    /// DO, CALL, EXECUTE (SQL-level), anything not recognised: unknown side effects.
    Unknown,
    /// Empty query string / only comments.
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxCommand {
    /// BEGIN / START TRANSACTION with its options.
    Begin {
        isolation: Option<Isolation>,
        read_only: bool,
    },
    /// COMMIT / END; `chain`: `AND CHAIN` (which starts a new transaction at once).
    Commit {
        chain: bool,
    },
    /// ROLLBACK / ABORT, also `AND CHAIN`.
    Rollback {
        chain: bool,
    },
    Savepoint,
    Release,
    RollbackTo,
    PrepareTransaction,
    CommitPrepared,
    RollbackPrepared,
    /// SET TRANSACTION … (also SET TRANSACTION SNAPSHOT, with `isolation: None`).
    SetTransaction {
        isolation: Option<Isolation>,
    },
    SetSessionCharacteristics {
        isolation: Option<Isolation>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isolation {
    ReadUncommitted,
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    /// SET [SESSION|LOCAL] name = value / SET name TO DEFAULT / SET TIME ZONE …;
    /// `value` is a canonical text of the value: constants joined with ", " (strings
    /// as SQL literals, `'a', 'b'`), "DEFAULT" for DEFAULT/LOCAL, the deparsed
    /// statement for anything else; `name` lowercased (`timezone` for TIME ZONE).
    Set {
        name: String,
        value: String,
        local: bool,
    },
    Reset {
        name: String,
    },
    ResetAll,
    /// SET ROLE / RESET ROLE / SET SESSION AUTHORIZATION / RESET SESSION
    /// AUTHORIZATION (never reported as Set/Reset of "role" or
    /// "session_authorization").
    Role,
    Discard(DiscardTarget),
    /// SQL PREPARE (its statement is not analysed: it runs only on EXECUTE).
    Prepare {
        name: String,
    },
    /// SQL DEALLOCATE; `None` = ALL.
    Deallocate {
        name: Option<String>,
    },
    Listen,
    Unlisten,
    /// Harmless session commands: LOAD, SET CONSTRAINTS, CLOSE cursor,
    /// `SET name FROM CURRENT`.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiscardTarget {
    All,
    Plans,
    Sequences,
    Temp,
}

impl Analysis {
    /// The analysis of text that is not analysed (unparsable or over the size limit).
    pub fn unanalysed() -> Self {
        Self {
            statements: Vec::new(),
            unanalysed: true,
        }
    }

    /// The statement, when the string holds exactly one.
    pub fn single(&self) -> Option<&Statement> {
        match self.statements.as_slice() {
            [only] => Some(only),
            _ => None,
        }
    }

    /// Exactly one statement, a plain `Select` with no locking clause and no SQL
    /// value function. Functions and tables are checked later against the catalog.
    pub fn is_cacheable_shape(&self) -> bool {
        !self.unanalysed
            && self.single().is_some_and(|s| {
                s.kind == Kind::Select && !s.locking && !s.sql_value_function && s.writes.is_empty()
            })
    }

    /// Whether running this string may change data or schema, as far as the parse
    /// tree tells: any statement that writes a relation or is `Write`, `Truncate`,
    /// `Ddl` or `Unknown` — and an `unanalysed` string, which must be assumed to.
    /// Function side effects are not seen here (a `Select` calling a volatile
    /// function is answered by the catalog check).
    pub fn writes_anything(&self) -> bool {
        self.unanalysed
            || self.statements.iter().any(|s| {
                !s.writes.is_empty()
                    || matches!(
                        s.kind,
                        Kind::Write | Kind::Truncate { .. } | Kind::Ddl { .. } | Kind::Unknown
                    )
            })
    }

    /// Approximate heap + inline footprint, for the memo's weigher.
    pub fn approx_bytes(&self) -> usize {
        size_of::<Self>()
            + self
                .statements
                .iter()
                .map(Statement::approx_bytes)
                .sum::<usize>()
    }
}

impl Statement {
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            reads: Vec::new(),
            writes: Vec::new(),
            ddl_targets: Vec::new(),
            functions: Vec::new(),
            set_config: Vec::new(),
            sql_value_function: false,
            locking: false,
            shape: None,
            point: None,
            vacated: Vec::new(),
        }
    }

    fn approx_bytes(&self) -> usize {
        let rels = self
            .reads
            .iter()
            .chain(&self.writes)
            .chain(&self.ddl_targets);
        let kind_text = match &self.kind {
            Kind::Session(SessionCommand::Set { name, value, .. }) => name.len() + value.len(),
            Kind::Session(SessionCommand::Reset { name } | SessionCommand::Prepare { name }) => {
                name.len()
            }
            Kind::Session(SessionCommand::Deallocate { name: Some(name) }) => name.len(),
            _ => 0,
        };
        size_of::<Self>()
            + kind_text
            + self.vacated.iter().map(String::len).sum::<usize>()
            + rels
                .map(|r| {
                    size_of::<RelName>() + r.name.len() + r.schema.as_ref().map_or(0, String::len)
                })
                .sum::<usize>()
            + self
                .functions
                .iter()
                .map(|f| {
                    size_of::<FuncName>() + f.name.len() + f.schema.as_ref().map_or(0, String::len)
                })
                .sum::<usize>()
            + self
                .shape
                .as_ref()
                .and_then(|s| s.as_ref().ok())
                .map_or(0, WriteShape::heap_bytes)
            + self.point.as_ref().map_or(0, PointFilter::heap_bytes)
    }
}

impl RelName {
    pub fn new(schema: Option<&str>, name: &str) -> Self {
        Self {
            schema: schema.filter(|s| !s.is_empty()).map(str::to_owned),
            name: name.to_owned(),
        }
    }
}

impl FuncName {
    pub fn new(schema: Option<&str>, name: &str) -> Self {
        Self {
            schema: schema.filter(|s| !s.is_empty()).map(str::to_owned),
            name: name.to_owned(),
        }
    }
}

/// `schema.name` or `name`, unquoted (for logs and tests, not for SQL).
impl fmt::Display for RelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// `schema.name` or `name`, unquoted (for logs and tests, not for SQL).
impl fmt::Display for FuncName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}
