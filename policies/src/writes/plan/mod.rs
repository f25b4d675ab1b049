//! Turns a run of journal records into set-based statements: consecutive row
//! operations of the same table and shape become one `INSERT … SELECT … FROM unnest`,
//! `UPDATE … FROM unnest` or `DELETE … USING unnest` (`ROWS FROM` zips the arrays), each value passed as one element
//! of a `text[]` parameter and converted by PostgreSQL with the column's type.
//!
//! Invariants:
//! - Order is kept: groups are formed from consecutive operations only (in journal
//!   order, or table by table for a batch of INSERTs where that cannot change the
//!   outcome: [`super::order`]), and a group
//!   never holds two operations on the same key (a set-based UPDATE with two source
//!   rows for one target row applies only one of them), so applying the groups in
//!   order equals applying the operations one by one.
//! - UPDATE and DELETE groups number their source rows (`WITH ORDINALITY`) and return
//!   the numbers they matched, so an operation whose key is missing upstream is found
//!   exactly (it becomes a dead letter; nothing is silent).
//! - Only identifiers from the catalog (quoted) and type names checked by
//!   [`safe_type`] are spliced into SQL; every value travels as a parameter. The SQL
//!   text and its parameters are `sql.rs`'s.

use std::collections::HashMap;

pub use super::meta::{ForeignKey, TableMeta};
use super::record::{AssignOp, Cmp, Guard, Record, RowOp};

mod sql;

use sql::Builder;
pub(crate) use sql::{checked_cast, convert};
pub use sql::{ident, safe_type};

impl TableMeta {
    pub(crate) fn type_of(&self, column: &str) -> Result<&str, PlanError> {
        self.types
            .get(column)
            .map(String::as_str)
            .ok_or_else(|| PlanError::UnknownColumn {
                table: self.name.clone(),
                column: column.to_owned(),
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("table {0} is not a deferred table")]
    UnknownTable(String),
    #[error("table {table} has no column {column}")]
    UnknownColumn { table: String, column: String },
    #[error("cast to {0:?} is not a plain type name")]
    UnsafeCast(String),
    #[error("operation on {0} does not give every primary-key column")]
    KeyMissing(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    Insert,
    Update,
    Delete,
}

/// One set-based statement and the operations it applies.
#[derive(Debug, Clone)]
pub struct Group {
    pub kind: GroupKind,
    pub table: String,
    pub sql: String,
    /// One `text[]` per `$n`, in order; all of the same length (the group's size).
    pub params: Vec<Vec<Option<String>>>,
    /// (record index in the planned slice, operation index in the record), in the
    /// order of the source rows: UPDATE/DELETE return 1-based positions in this list.
    pub ops: Vec<(usize, usize)>,
}

/// Plans `records` (a batch or part of one) as groups to apply in order.
pub fn plan_batch(
    records: &[&Record],
    tables: &HashMap<String, TableMeta>,
) -> Result<Vec<Group>, PlanError> {
    let mut groups: Vec<Builder> = Vec::new();
    for (ri, oi) in super::order::plan_order(records, tables) {
        let Some(op) = records.get(ri).and_then(|r| r.ops.get(oi)) else {
            continue;
        };
        let meta = tables
            .get(op.table())
            .ok_or_else(|| PlanError::UnknownTable(op.table().to_owned()))?;
        let shape = Shape::of(op, meta)?;
        let key = key_of(op, meta)?;
        let joins = groups
            .last()
            .is_some_and(|g| g.shape == shape && !g.keys.contains(&key));
        if !joins {
            groups.push(Builder::new(shape));
        }
        if let Some(g) = groups.last_mut() {
            g.push(op, key, (ri, oi));
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let meta = tables
                .get(&g.shape.table)
                .ok_or_else(|| PlanError::UnknownTable(g.shape.table.clone()))?;
            g.finish(meta)
        })
        .collect()
}

/// What makes two operations mergeable: table, kind, columns, assignment operators and
/// casts. Values are not part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    table: String,
    kind: GroupKind,
    /// Insert: the listed columns; Update: the assigned columns; Delete: empty.
    columns: Vec<(String, Option<AssignOp>, Option<String>)>,
    /// Casts of the key values (Update/Delete).
    key_casts: Vec<Option<String>>,
    /// Conditions beyond the key (Update/Delete, ADR 0035): column, comparison, cast.
    guard: Vec<(String, Cmp, Option<String>)>,
}

fn guard_shape(
    guard: &[Guard],
    meta: &TableMeta,
) -> Result<Vec<(String, Cmp, Option<String>)>, PlanError> {
    guard
        .iter()
        .map(|g| {
            meta.type_of(&g.column)?;
            Ok((g.column.clone(), g.cmp, checked_cast(&g.value)?))
        })
        .collect()
}

impl Shape {
    fn of(op: &RowOp, meta: &TableMeta) -> Result<Self, PlanError> {
        let table = op.table().to_owned();
        Ok(match op {
            RowOp::Insert {
                columns, values, ..
            } => {
                for c in columns {
                    meta.type_of(c)?;
                }
                Shape {
                    table,
                    kind: GroupKind::Insert,
                    columns: columns
                        .iter()
                        .zip(values)
                        .map(|(c, v)| Ok((c.clone(), None, checked_cast(v)?)))
                        .collect::<Result<_, PlanError>>()?,
                    key_casts: Vec::new(),
                    guard: Vec::new(),
                }
            }
            RowOp::Update {
                key, set, guard, ..
            } => {
                for a in set {
                    meta.type_of(&a.column)?;
                }
                Shape {
                    table,
                    kind: GroupKind::Update,
                    columns: set
                        .iter()
                        .map(|a| Ok((a.column.clone(), Some(a.op), checked_cast(&a.value)?)))
                        .collect::<Result<_, PlanError>>()?,
                    key_casts: key.iter().map(checked_cast).collect::<Result<_, _>>()?,
                    guard: guard_shape(guard, meta)?,
                }
            }
            RowOp::Delete { key, guard, .. } => Shape {
                table,
                kind: GroupKind::Delete,
                columns: Vec::new(),
                key_casts: key.iter().map(checked_cast).collect::<Result<_, _>>()?,
                guard: guard_shape(guard, meta)?,
            },
        })
    }
}

/// The operation's primary-key values (canonical text, from the record), in the
/// table's key order.
pub fn key_of(op: &RowOp, meta: &TableMeta) -> Result<Vec<Option<String>>, PlanError> {
    match op {
        RowOp::Insert {
            columns, values, ..
        } => meta
            .key
            .iter()
            .map(|k| {
                columns
                    .iter()
                    .position(|c| c == k)
                    .and_then(|i| values.get(i))
                    .map(|v| v.text.clone())
                    .ok_or_else(|| PlanError::KeyMissing(meta.name.clone()))
            })
            .collect(),
        RowOp::Update { key, .. } | RowOp::Delete { key, .. } => {
            if key.len() != meta.key.len() {
                return Err(PlanError::KeyMissing(meta.name.clone()));
            }
            Ok(key.iter().map(|v| v.text.clone()).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writes::record::{Assign, Val};

    fn meta() -> HashMap<String, TableMeta> {
        let mut m = HashMap::new();
        for (name, key) in [("public.t", vec!["id"]), ("public.c", vec!["a", "b"])] {
            let (schema, table) = name.split_once('.').expect("qualified");
            m.insert(
                name.to_owned(),
                TableMeta {
                    name: name.to_owned(),
                    schema: schema.to_owned(),
                    table: table.to_owned(),
                    key: key.into_iter().map(str::to_owned).collect(),
                    types: [
                        ("id", "integer"),
                        ("v", "text"),
                        ("n", "bigint"),
                        ("a", "integer"),
                        ("b", "text"),
                    ]
                    .into_iter()
                    .map(|(c, t)| (c.to_owned(), t.to_owned()))
                    .collect(),
                    coalesce: false,
                    plain: true,
                    parents: Vec::new(),
                    overriding: false,
                },
            );
        }
        m
    }

    fn insert(id: &str, v: &str) -> RowOp {
        RowOp::Insert {
            table: "public.t".into(),
            columns: vec!["id".into(), "v".into()],
            values: vec![Val::plain(Some(id)), Val::plain(Some(v))],
        }
    }

    fn bump(id: &str, by: &str) -> RowOp {
        RowOp::Update {
            table: "public.t".into(),
            key: vec![Val::plain(Some(id))],
            set: vec![Assign {
                column: "n".into(),
                op: AssignOp::Add,
                value: Val::plain(Some(by)),
            }],
            guard: Vec::new(),
        }
    }

    fn delete(id: &str) -> RowOp {
        RowOp::Delete {
            table: "public.t".into(),
            key: vec![Val::plain(Some(id))],
            guard: Vec::new(),
        }
    }

    fn plan(ops: Vec<Vec<RowOp>>) -> Vec<Group> {
        let records: Vec<Record> = ops.into_iter().map(|ops| Record { ops }).collect();
        let refs: Vec<&Record> = records.iter().collect();
        plan_batch(&refs, &meta()).expect("plans")
    }

    #[test]
    fn consecutive_same_shape_operations_merge_across_records() {
        let g = plan(vec![
            vec![insert("1", "a")],
            vec![insert("2", "b"), insert("3", "c")],
            vec![bump("1", "5")],
            vec![bump("2", "-1")],
            vec![delete("3")],
        ]);
        assert_eq!(g.len(), 3);
        assert_eq!(g[0].kind, GroupKind::Insert);
        assert_eq!(
            g[0].sql,
            "INSERT INTO \"public\".\"t\" (\"id\", \"v\") SELECT u.c0::integer, u.c1::text \
             FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[])) \
             AS u(c0, c1)"
        );
        assert_eq!(
            g[0].params,
            vec![
                vec![Some("1".into()), Some("2".into()), Some("3".into())],
                vec![Some("a".into()), Some("b".into()), Some("c".into())]
            ]
        );
        assert_eq!(g[0].ops, vec![(0, 0), (1, 0), (1, 1)]);
        assert_eq!(
            g[1].sql,
            "UPDATE ONLY \"public\".\"t\" AS t SET \"n\" = t.\"n\" + u.s0::bigint FROM \
             ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[])) \
             WITH ORDINALITY AS u(k0, s0, n) \
             WHERE t.\"id\" = u.k0::integer RETURNING u.n"
        );
        assert_eq!(g[1].ops, vec![(2, 0), (3, 0)]);
        assert_eq!(
            g[2].sql,
            "DELETE FROM ONLY \"public\".\"t\" AS t USING ROWS FROM (pg_catalog.unnest($1::text[])) \
             WITH ORDINALITY AS u(k0, n) WHERE t.\"id\" = u.k0::integer RETURNING u.n"
        );
    }

    #[test]
    fn a_repeated_key_starts_a_new_group_so_no_update_is_lost() {
        let g = plan(vec![
            vec![bump("1", "1")],
            vec![bump("2", "1")],
            vec![bump("1", "1")],
        ]);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].ops, vec![(0, 0), (1, 0)]);
        assert_eq!(g[1].ops, vec![(2, 0)]);
        let g = plan(vec![
            vec![insert("1", "a")],
            vec![delete("1")],
            vec![insert("1", "b")],
        ]);
        assert_eq!(g.len(), 3, "order across kinds is kept");
    }

    #[test]
    fn identity_always_keys_are_inserted_overriding_the_system_value() {
        // Mutation caught: the flag ignored (PostgreSQL refuses every reserved key of a
        // GENERATED ALWAYS identity, 428C9, and the records dead-letter).
        let mut m = meta();
        m.entry("public.t".to_owned())
            .and_modify(|t| t.overriding = true);
        let records = [Record {
            ops: vec![insert("1", "a")],
        }];
        let g = plan_batch(&records.iter().collect::<Vec<_>>(), &m).expect("plans");
        assert!(
            g[0].sql
                .contains("(\"id\", \"v\") OVERRIDING SYSTEM VALUE SELECT ")
        );
    }

    #[test]
    fn different_shapes_or_casts_do_not_merge() {
        let mut cast = bump("2", "1");
        if let RowOp::Update { set, .. } = &mut cast {
            set[0].value.cast = Some("int8".into());
        }
        let g = plan(vec![vec![bump("1", "1")], vec![cast]]);
        assert_eq!(g.len(), 2);
        assert!(g[1].sql.contains("u.s0::int8::bigint"), "{}", g[1].sql);
    }

    #[test]
    fn composite_keys_and_quoting() {
        let op = RowOp::Update {
            table: "public.c".into(),
            key: vec![Val::plain(Some("1")), Val::plain(Some("x"))],
            set: vec![Assign {
                column: "v".into(),
                op: AssignOp::Set,
                value: Val::plain(None),
            }],
            guard: Vec::new(),
        };
        let g = plan(vec![vec![op]]);
        assert!(
            g[0].sql
                .contains("WHERE t.\"a\" = u.k0::integer AND t.\"b\" = u.k1::text"),
            "{}",
            g[0].sql
        );
        assert_eq!(g[0].params[2], vec![None]);
    }

    #[test]
    fn unsafe_casts_unknown_tables_and_columns_are_refused() {
        let mut op = bump("1", "1");
        if let RowOp::Update { set, .. } = &mut op {
            set[0].value.cast = Some("int); DROP TABLE t; --".into());
        }
        let r = Record { ops: vec![op] };
        assert!(matches!(
            plan_batch(&[&r], &meta()),
            Err(PlanError::UnsafeCast(_))
        ));
        let r = Record {
            ops: vec![RowOp::Delete {
                table: "public.nope".into(),
                key: vec![],
                guard: Vec::new(),
            }],
        };
        assert!(matches!(
            plan_batch(&[&r], &meta()),
            Err(PlanError::UnknownTable(_))
        ));
        let r = Record {
            ops: vec![RowOp::Insert {
                table: "public.t".into(),
                columns: vec!["v".into()],
                values: vec![Val::plain(Some("x"))],
            }],
        };
        assert!(matches!(
            plan_batch(&[&r], &meta()),
            Err(PlanError::KeyMissing(_))
        ));
    }
}
