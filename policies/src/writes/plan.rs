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
//! - Only identifiers from the catalog (quoted here) and type names checked by
//!   [`safe_type`] are spliced into SQL; every value travels as a parameter.

use std::collections::{HashMap, HashSet};

pub use super::meta::{ForeignKey, TableMeta};
use super::record::{AssignOp, Cmp, Guard, Record, RowOp, Val};

impl TableMeta {
    /// `ONLY "schema"."table"`: deferred tables have no inheritance children (checked
    /// at startup), and ONLY keeps a child added later out of reach of a flush.
    fn quoted(&self) -> String {
        format!("ONLY {}.{}", ident(&self.schema), ident(&self.table))
    }

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

pub(crate) fn checked_cast(v: &Val) -> Result<Option<String>, PlanError> {
    match &v.cast {
        None => Ok(None),
        Some(c) if safe_type(c) => Ok(Some(c.clone())),
        Some(c) => Err(PlanError::UnsafeCast(c.clone())),
    }
}

/// A type name that can be spliced into SQL as is: letters, digits, `_`, spaces,
/// dots, a typmod in parentheses, array brackets. No quotes, no operators.
pub fn safe_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | ' ' | '.' | '(' | ')' | ',' | '[' | ']')
        })
        && t.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

struct Builder {
    shape: Shape,
    keys: HashSet<Vec<Option<String>>>,
    /// Per source row: key values then column values (Insert: column values only).
    rows: Vec<Vec<Option<String>>>,
    ops: Vec<(usize, usize)>,
}

impl Builder {
    fn new(shape: Shape) -> Self {
        Self {
            shape,
            keys: HashSet::new(),
            rows: Vec::new(),
            ops: Vec::new(),
        }
    }

    fn push(&mut self, op: &RowOp, key: Vec<Option<String>>, at: (usize, usize)) {
        let row = match op {
            RowOp::Insert { values, .. } => values.iter().map(|v| v.text.clone()).collect(),
            RowOp::Update {
                key, set, guard, ..
            } => key
                .iter()
                .map(|v| v.text.clone())
                .chain(set.iter().map(|a| a.value.text.clone()))
                .chain(guard.iter().map(|g| g.value.text.clone()))
                .collect(),
            RowOp::Delete { key, guard, .. } => key
                .iter()
                .map(|v| v.text.clone())
                .chain(guard.iter().map(|g| g.value.text.clone()))
                .collect(),
        };
        self.keys.insert(key);
        self.rows.push(row);
        self.ops.push(at);
    }

    fn finish(self, meta: &TableMeta) -> Result<Group, PlanError> {
        let width = self.rows.first().map_or(0, Vec::len);
        let mut params: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(self.rows.len()); width];
        for row in self.rows {
            for (i, v) in row.into_iter().enumerate() {
                if let Some(p) = params.get_mut(i) {
                    p.push(v);
                }
            }
        }
        // ROWS FROM (unnest(a), unnest(b)) zips the arrays; the short form unnest(a, b)
        // exists only unqualified, and names are always qualified here.
        let arrays: Vec<String> = (1..=width)
            .map(|n| format!("pg_catalog.unnest(${n}::text[])"))
            .collect();
        let arrays = format!("ROWS FROM ({})", arrays.join(", "));
        let table = meta.quoted();
        let key_match = |casts: &[Option<String>]| -> Result<String, PlanError> {
            meta.key
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let cast = casts.get(i).cloned().flatten();
                    Ok(format!(
                        "t.{} = {}",
                        ident(k),
                        convert(&format!("u.k{i}"), cast.as_deref(), meta.type_of(k)?)
                    ))
                })
                .collect::<Result<Vec<_>, PlanError>>()
                .map(|v| v.join(" AND "))
        };
        let key_names: Vec<String> = (0..meta.key.len()).map(|i| format!("k{i}")).collect();
        // The guard's conditions on the target row (ADR 0035): a row that no longer
        // meets them is not matched, so its operation is found and dead-lettered like
        // one whose key is missing.
        let guard_names: Vec<String> = (0..self.shape.guard.len())
            .map(|i| format!("g{i}"))
            .collect();
        let guard_match = self
            .shape
            .guard
            .iter()
            .enumerate()
            .map(|(i, (c, cmp, cast))| {
                Ok(format!(
                    " AND t.{} {} {}",
                    ident(c),
                    cmp.sql(),
                    convert(&format!("u.g{i}"), cast.as_deref(), meta.type_of(c)?)
                ))
            })
            .collect::<Result<String, PlanError>>()?;
        let sql = match self.shape.kind {
            GroupKind::Insert => {
                let cols: Vec<String> = self.shape.columns.iter().map(|c| ident(&c.0)).collect();
                let names: Vec<String> = (0..width).map(|i| format!("c{i}")).collect();
                let exprs = self
                    .shape
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, (c, _, cast))| {
                        Ok(convert(
                            &format!("u.c{i}"),
                            cast.as_deref(),
                            meta.type_of(c)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, PlanError>>()?;
                let table = format!("{}.{}", ident(&meta.schema), ident(&meta.table));
                format!(
                    "INSERT INTO {table} ({}){} SELECT {} FROM {arrays} AS u({})",
                    cols.join(", "),
                    meta.overriding_clause(),
                    exprs.join(", "),
                    names.join(", ")
                )
            }
            GroupKind::Update => {
                let sets = self
                    .shape
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, (c, op, cast))| {
                        let v = convert(&format!("u.s{i}"), cast.as_deref(), meta.type_of(c)?);
                        let c = ident(c);
                        Ok(match op {
                            Some(AssignOp::Add) => format!("{c} = t.{c} + {v}"),
                            Some(AssignOp::Sub) => format!("{c} = t.{c} - {v}"),
                            _ => format!("{c} = {v}"),
                        })
                    })
                    .collect::<Result<Vec<_>, PlanError>>()?;
                let names: Vec<String> = key_names
                    .iter()
                    .cloned()
                    .chain((0..self.shape.columns.len()).map(|i| format!("s{i}")))
                    .chain(guard_names.iter().cloned())
                    .collect();
                format!(
                    "UPDATE {table} AS t SET {} FROM {arrays} WITH ORDINALITY \
                     AS u({}, n) WHERE {}{guard_match} RETURNING u.n",
                    sets.join(", "),
                    names.join(", "),
                    key_match(&self.shape.key_casts)?
                )
            }
            GroupKind::Delete => {
                let names: Vec<String> = key_names
                    .iter()
                    .cloned()
                    .chain(guard_names.iter().cloned())
                    .collect();
                format!(
                    "DELETE FROM {table} AS t USING {arrays} WITH ORDINALITY \
                     AS u({}, n) WHERE {}{guard_match} RETURNING u.n",
                    names.join(", "),
                    key_match(&self.shape.key_casts)?
                )
            }
        };
        Ok(Group {
            kind: self.shape.kind,
            table: self.shape.table,
            sql,
            params,
            ops: self.ops,
        })
    }
}

/// `expr` (text) converted like the client's value: its own cast first, then the
/// column's type.
pub(crate) fn convert(expr: &str, cast: Option<&str>, column_type: &str) -> String {
    match cast {
        Some(c) => format!("{expr}::{c}::{column_type}"),
        None => format!("{expr}::{column_type}"),
    }
}

/// A quoted identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writes::record::Assign;

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
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
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
        for ok in [
            "integer",
            "numeric(10,2)",
            "timestamp with time zone",
            "text[]",
            "pg_catalog.int4",
        ] {
            assert!(safe_type(ok), "{ok}");
        }
        for bad in ["", "int'", "a;b", "\"x\"", "1int", "a-b"] {
            assert!(!safe_type(bad), "{bad}");
        }
    }
}
