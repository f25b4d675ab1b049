//! The content of one journal record: one acknowledged autocommit statement, or (with
//! deferred transactions) one whole client transaction, as row operations on tables
//! named `schema.name`.
//!
//! Invariants: key values are in the table's primary-key column order and already in
//! canonical text (the proxy canonicalises integers, so `'01'` and `1` are one key);
//! a record is applied whole or not at all.

use serde::{Deserialize, Serialize};

/// A value as PostgreSQL text; `None` is NULL. `cast` is the type the client cast it to
/// (`'5'::int8`), applied before the column's own type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Val {
    pub text: Option<String>,
    pub cast: Option<String>,
}

impl Val {
    pub fn plain(text: Option<&str>) -> Self {
        Self {
            text: text.map(str::to_owned),
            cast: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AssignOp {
    /// `col = v`
    Set,
    /// `col = col + v`
    Add,
    /// `col = col - v`
    Sub,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assign {
    pub column: String,
    pub op: AssignOp,
    pub value: Val,
}

/// How a [`Guard`] compares the row's column with its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cmp {
    /// `col = v`
    Eq,
    /// `col <> v`
    Ne,
    /// `col < v`
    Lt,
    /// `col <= v`
    Le,
    /// `col > v`
    Gt,
    /// `col >= v`
    Ge,
}

impl Cmp {
    pub fn sql(self) -> &'static str {
        match self {
            Cmp::Eq => "=",
            Cmp::Ne => "<>",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
        }
    }
}

/// A condition of an UPDATE's or DELETE's WHERE beyond the key (`AND version = 3`,
/// ADR 0035): the operation writes its row only where it holds. Decided at
/// acknowledgement from what spillway knows of the row, and applied by the flusher
/// with the same predicate (a row changed underneath is not written: a dead letter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    pub column: String,
    pub cmp: Cmp,
    pub value: Val,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RowOp {
    /// One row; `columns` as the client listed them (primary key included).
    Insert {
        table: String,
        columns: Vec<String>,
        values: Vec<Val>,
    },
    Update {
        table: String,
        key: Vec<Val>,
        set: Vec<Assign>,
        /// Conditions beyond the key; empty for a write by key alone (and absent from
        /// records journaled before guards existed).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        guard: Vec<Guard>,
    },
    Delete {
        table: String,
        key: Vec<Val>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        guard: Vec<Guard>,
    },
}

impl RowOp {
    pub fn table(&self) -> &str {
        match self {
            RowOp::Insert { table, .. }
            | RowOp::Update { table, .. }
            | RowOp::Delete { table, .. } => table,
        }
    }

    /// The conditions beyond the key (empty for an INSERT).
    pub fn guard(&self) -> &[Guard] {
        match self {
            RowOp::Insert { .. } => &[],
            RowOp::Update { guard, .. } | RowOp::Delete { guard, .. } => guard,
        }
    }

    /// A short description for dead letters and logs: the statement shape, no values.
    pub fn describe(&self) -> String {
        match self {
            RowOp::Insert { table, columns, .. } => {
                format!("INSERT INTO {table} ({})", columns.join(", "))
            }
            RowOp::Update { table, set, .. } => {
                let set: Vec<String> = set
                    .iter()
                    .map(|a| match a.op {
                        AssignOp::Set => format!("{} = ?", a.column),
                        AssignOp::Add => format!("{0} = {0} + ?", a.column),
                        AssignOp::Sub => format!("{0} = {0} - ?", a.column),
                    })
                    .collect();
                format!(
                    "UPDATE {table} SET {} WHERE <key> = ?{}",
                    set.join(", "),
                    describe_guard(self.guard())
                )
            }
            RowOp::Delete { table, guard, .. } => {
                format!(
                    "DELETE FROM {table} WHERE <key> = ?{}",
                    describe_guard(guard)
                )
            }
        }
    }

    /// Every value of the operation, key first, as text (NULL as `None`).
    pub fn parameters(&self) -> Vec<Option<String>> {
        match self {
            RowOp::Insert { values, .. } => values.iter().map(|v| v.text.clone()).collect(),
            RowOp::Update {
                key, set, guard, ..
            } => key
                .iter()
                .chain(set.iter().map(|a| &a.value))
                .chain(guard.iter().map(|g| &g.value))
                .map(|v| v.text.clone())
                .collect(),
            RowOp::Delete { key, guard, .. } => key
                .iter()
                .chain(guard.iter().map(|g| &g.value))
                .map(|v| v.text.clone())
                .collect(),
        }
    }
}

fn describe_guard(guard: &[Guard]) -> String {
    guard
        .iter()
        .map(|g| format!(" AND {} {} ?", g.column, g.cmp.sql()))
        .collect()
}

/// One journal record's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub ops: Vec<RowOp>,
}

#[derive(Debug, thiserror::Error)]
#[error("journal record does not encode or decode: {0}")]
pub struct CodecError(String);

impl Record {
    // serde_json: records are small, and a human can read a journal in an emergency.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(self).map_err(|e| CodecError(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError(e.to_string()))
    }

    /// Tables the record writes, each once.
    pub fn tables(&self) -> Vec<&str> {
        let mut t: Vec<&str> = self.ops.iter().map(RowOp::table).collect();
        t.sort_unstable();
        t.dedup();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = Record {
            ops: vec![
                RowOp::Insert {
                    table: "public.t".into(),
                    columns: vec!["id".into(), "v".into()],
                    values: vec![Val::plain(Some("1")), Val::plain(None)],
                },
                RowOp::Update {
                    table: "public.t".into(),
                    key: vec![Val::plain(Some("1"))],
                    set: vec![Assign {
                        column: "n".into(),
                        op: AssignOp::Add,
                        value: Val {
                            text: Some("2".into()),
                            cast: Some("int8".into()),
                        },
                    }],
                    guard: Vec::new(),
                },
                RowOp::Delete {
                    table: "s.u".into(),
                    key: vec![Val::plain(Some("x'y"))],
                    guard: Vec::new(),
                },
            ],
        };
        let back = Record::decode(&r.encode().expect("encodes")).expect("decodes");
        assert_eq!(back, r);
        assert_eq!(back.tables(), vec!["public.t", "s.u"]);
        assert!(Record::decode(b"{\"ops\": [{\"Nope\": 1}]}").is_err());
    }
}
