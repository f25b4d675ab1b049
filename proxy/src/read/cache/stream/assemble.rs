//! Decoded pgoutput messages → whole [`Commit`]s, without I/O.
//!
//! Invariants: a commit is produced only at its Commit message, with every change
//! between its Begin and it; a change whose key cannot be read (no primary key, a
//! replica identity other than the key, an unsent TOAST value, a relation not
//! described) is [`Change::Table`], never a guessed key. Keys are in primary-key
//! order: the caller supplies each relation's primary-key column names in that order
//! ([`Assembler::relation`]). Each commit carries its transaction's id from the Begin
//! (the read cache tells spillway's own flushes by it, ADR 0036) and whether it
//! advanced spillway's flush ledger (the key index's notion of "own").

use std::collections::HashMap;

use spillway_policies::changes::{Change, Commit, TableRef};

use crate::protocol::pgoutput::{Message, Old, Relation, Value};

/// spillway's own flush ledger: a transaction that touches it is a flush (the key
/// index expects its changes).
const LEDGER: (&str, &str) = ("spillway", "flush_ledger");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssembleError {
    #[error("{0} outside a transaction")]
    Outside(&'static str),
    #[error("Begin inside a transaction")]
    NestedBegin,
}

/// How to read one relation's key from its rows.
#[derive(Debug, Clone)]
struct Shape {
    table: TableRef,
    /// Column positions of the primary key, in key order; `None`: keys unknown.
    key: Option<Vec<usize>>,
}

#[derive(Default)]
pub struct Assembler {
    relations: HashMap<u32, Shape>,
    open: Option<Open>,
}

struct Open {
    xid: u32,
    own: bool,
    changes: Vec<Change>,
}

/// What one message meant.
#[derive(Debug)]
pub enum Step {
    Nothing,
    /// A relation was described; its primary key is wanted (`Assembler::relation`).
    Relation(Relation),
    Commit {
        commit: Commit,
        /// Microseconds since 2000-01-01.
        commit_time: i64,
    },
}

impl Assembler {
    /// Records a relation's shape: `pk` are its primary key's column names in key
    /// order (`None`: it has none).
    pub fn relation(&mut self, rel: &Relation, pk: Option<&[String]>) {
        let identity_is_key = {
            let flagged: Vec<&str> = rel
                .columns
                .iter()
                .filter(|c| c.key)
                .map(|c| c.name.as_str())
                .collect();
            pk.is_some_and(|pk| {
                flagged.len() == pk.len() && pk.iter().all(|p| flagged.contains(&p.as_str()))
            })
        };
        // With REPLICA IDENTITY FULL the old row has every column, the key among them.
        let usable = identity_is_key || rel.replica_identity == b'f';
        let key = pk.filter(|_| usable).and_then(|pk| {
            pk.iter()
                .map(|name| rel.columns.iter().position(|c| &c.name == name))
                .collect::<Option<Vec<usize>>>()
        });
        self.relations.insert(
            rel.oid,
            Shape {
                table: TableRef {
                    oid: rel.oid,
                    name: format!("{}.{}", rel.schema, rel.name),
                },
                key,
            },
        );
    }

    /// Drops a half-received transaction (the connection was lost).
    pub fn reset(&mut self) {
        self.open = None;
    }

    /// One decoded message of `database`.
    pub fn push(&mut self, database: &str, msg: Message) -> Result<Step, AssembleError> {
        match msg {
            Message::Begin { xid, .. } => {
                if self.open.is_some() {
                    return Err(AssembleError::NestedBegin);
                }
                self.open = Some(Open {
                    xid,
                    own: false,
                    changes: Vec::new(),
                });
                Ok(Step::Nothing)
            }
            Message::Commit {
                end_lsn,
                commit_time,
                ..
            } => {
                let open = self.open.take().ok_or(AssembleError::Outside("Commit"))?;
                Ok(Step::Commit {
                    commit: Commit {
                        database: database.to_owned(),
                        lsn: end_lsn,
                        xid: open.xid,
                        own: open.own,
                        changes: open.changes,
                    },
                    commit_time,
                })
            }
            Message::Relation(rel) => Ok(Step::Relation(rel)),
            Message::Insert { rel, new } => {
                let change = self.keyed(rel, |table, key| Change::Insert { table, key }, &new);
                self.add(change, "Insert")
            }
            Message::Update { rel, old, new } => {
                let old_key = match &old {
                    Some(Old::Key(v) | Old::Row(v)) => Some(self.key_of(rel, v)),
                    None => None,
                };
                let change = match (self.key_of(rel, &new), old_key) {
                    (Some(key), None) => self.table(rel).map(|table| Change::Update {
                        table,
                        key,
                        old_key: None,
                    }),
                    (Some(key), Some(Some(old))) => self.table(rel).map(|table| Change::Update {
                        table,
                        old_key: (old != key).then_some(old),
                        key,
                    }),
                    _ => self.table(rel).map(|table| Change::Table { table }),
                };
                self.add(change, "Update")
            }
            Message::Delete { rel, old } => {
                let (Old::Key(v) | Old::Row(v)) = &old;
                let change = self.keyed(rel, |table, key| Change::Delete { table, key }, v);
                self.add(change, "Delete")
            }
            Message::Truncate { rels } => {
                for rel in rels {
                    let change = self.table(rel).map(|table| Change::Table { table });
                    self.add(change, "Truncate")?;
                }
                Ok(Step::Nothing)
            }
            Message::Other(_) => Ok(Step::Nothing),
        }
    }

    fn add(&mut self, change: Option<Change>, what: &'static str) -> Result<Step, AssembleError> {
        let open = self.open.as_mut().ok_or(AssembleError::Outside(what))?;
        let change = change.unwrap_or_else(|| Change::Table {
            // A change of a relation never described: its OID is all there is.
            table: TableRef {
                oid: 0,
                name: String::new(),
            },
        });
        if (change.table().name.split_once('.')) == Some(LEDGER) {
            open.own = true;
        }
        open.changes.push(change);
        Ok(Step::Nothing)
    }

    fn table(&self, rel: u32) -> Option<TableRef> {
        Some(
            self.relations
                .get(&rel)
                .map_or_else(|| unknown(rel), |s| s.table.clone()),
        )
    }

    fn keyed(
        &self,
        rel: u32,
        make: impl FnOnce(TableRef, Vec<String>) -> Change,
        values: &[Value],
    ) -> Option<Change> {
        let table = self.table(rel)?;
        Some(match self.key_of(rel, values) {
            Some(key) => make(table, key),
            None => Change::Table { table },
        })
    }

    fn key_of(&self, rel: u32, values: &[Value]) -> Option<Vec<String>> {
        let shape = self.relations.get(&rel)?;
        shape
            .key
            .as_ref()?
            .iter()
            .map(|&i| match values.get(i) {
                Some(Value::Text(s)) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
}

fn unknown(oid: u32) -> TableRef {
    TableRef {
        oid,
        name: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pgoutput::Column;

    fn rel(oid: u32, schema: &str, name: &str, cols: &[(&str, bool)]) -> Relation {
        Relation {
            oid,
            schema: schema.into(),
            name: name.into(),
            replica_identity: b'd',
            columns: cols
                .iter()
                .map(|(n, k)| Column {
                    key: *k,
                    name: (*n).into(),
                    type_oid: 25,
                })
                .collect(),
        }
    }

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn begin() -> Message {
        Message::Begin {
            final_lsn: 1,
            commit_time: 0,
            xid: 1,
        }
    }

    fn commit(a: &mut Assembler) -> Commit {
        match a
            .push(
                "db",
                Message::Commit {
                    lsn: 9,
                    end_lsn: 10,
                    commit_time: 0,
                },
            )
            .expect("test input")
        {
            Step::Commit { commit, .. } => commit,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_come_in_primary_key_order() {
        let mut a = Assembler::default();
        // Columns b, x, a; the key is (a, b).
        let r = rel(5, "public", "t", &[("b", true), ("x", false), ("a", true)]);
        a.relation(&r, Some(&["a".to_owned(), "b".to_owned()]));
        a.push("db", begin()).expect("test input");
        a.push(
            "db",
            Message::Insert {
                rel: 5,
                new: vec![t("2"), t("x"), t("1")],
            },
        )
        .expect("test input");
        a.push(
            "db",
            Message::Update {
                rel: 5,
                old: Some(Old::Key(vec![t("2"), Value::Null, t("0")])),
                new: vec![t("2"), t("y"), t("1")],
            },
        )
        .expect("test input");
        a.push("db", Message::Truncate { rels: vec![5] })
            .expect("test input");
        let c = commit(&mut a);
        assert_eq!((c.lsn, c.xid, c.own), (10, 1, false));
        let table = TableRef {
            oid: 5,
            name: "public.t".into(),
        };
        assert_eq!(
            c.changes,
            vec![
                Change::Insert {
                    table: table.clone(),
                    key: vec!["1".into(), "2".into()]
                },
                Change::Update {
                    table: table.clone(),
                    key: vec!["1".into(), "2".into()],
                    old_key: Some(vec!["0".into(), "2".into()]),
                },
                Change::Table { table },
            ]
        );
    }

    #[test]
    fn unknown_keys_are_the_whole_table() {
        let mut a = Assembler::default();
        a.relation(&rel(6, "public", "nokey", &[("a", false)]), None);
        // Replica identity on another index than the key.
        a.relation(
            &rel(7, "public", "other", &[("a", true), ("b", false)]),
            Some(&["b".to_owned()]),
        );
        a.push("db", begin()).expect("test input");
        a.push(
            "db",
            Message::Insert {
                rel: 6,
                new: vec![t("1")],
            },
        )
        .expect("test input");
        a.push(
            "db",
            Message::Delete {
                rel: 7,
                old: Old::Key(vec![t("1"), Value::Null]),
            },
        )
        .expect("test input");
        a.push(
            "db",
            Message::Insert {
                rel: 99,
                new: vec![t("1")],
            },
        )
        .expect("test input");
        let c = commit(&mut a);
        assert!(
            c.changes.iter().all(|c| matches!(c, Change::Table { .. })),
            "{c:?}"
        );
    }

    #[test]
    fn ledger_marks_own_flushes_order_is_checked_and_commits_carry_their_xid() {
        let mut a = Assembler::default();
        a.relation(
            &rel(8, "spillway", "flush_ledger", &[("id", true)]),
            Some(&["id".to_owned()]),
        );
        assert_eq!(
            a.push(
                "db",
                Message::Insert {
                    rel: 8,
                    new: vec![t("1")]
                }
            )
            .expect_err("test input"),
            AssembleError::Outside("Insert")
        );
        a.push("db", begin()).expect("test input");
        assert_eq!(
            a.push("db", begin()).expect_err("test input"),
            AssembleError::NestedBegin
        );
        a.push(
            "db",
            Message::Update {
                rel: 8,
                old: None,
                new: vec![t("1")],
            },
        )
        .expect("test input");
        let c = commit(&mut a);
        assert_eq!((c.xid, c.own), (1, true));
    }
}
