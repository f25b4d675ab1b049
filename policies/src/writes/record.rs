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
    },
    Delete {
        table: String,
        key: Vec<Val>,
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
                format!("UPDATE {table} SET {} WHERE <key> = ?", set.join(", "))
            }
            RowOp::Delete { table, .. } => format!("DELETE FROM {table} WHERE <key> = ?"),
        }
    }

    /// Every value of the operation, key first, as text (NULL as `None`).
    pub fn parameters(&self) -> Vec<Option<String>> {
        match self {
            RowOp::Insert { values, .. } => values.iter().map(|v| v.text.clone()).collect(),
            RowOp::Update { key, set, .. } => key
                .iter()
                .chain(set.iter().map(|a| &a.value))
                .map(|v| v.text.clone())
                .collect(),
            RowOp::Delete { key, .. } => key.iter().map(|v| v.text.clone()).collect(),
        }
    }
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
                },
                RowOp::Delete {
                    table: "s.u".into(),
                    key: vec![Val::plain(Some("x'y"))],
                },
            ],
        };
        let back = Record::decode(&r.encode().expect("encodes")).expect("decodes");
        assert_eq!(back, r);
        assert_eq!(back.tables(), vec!["public.t", "s.u"]);
        assert!(Record::decode(b"{\"ops\": [{\"Nope\": 1}]}").is_err());
    }
}
