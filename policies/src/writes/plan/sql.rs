//! The SQL text of a planned group (`super` decides the groups): the set-based
//! `INSERT … SELECT … FROM ROWS FROM (unnest …)`, `UPDATE ONLY … FROM … WITH
//! ORDINALITY … RETURNING n` or `DELETE FROM ONLY … USING …` of one [`Builder`], its
//! `text[]` parameters, and what may be spliced into SQL at all.
//!
//! Invariants:
//! - Only identifiers quoted by [`ident`] (catalog names) and type names that pass
//!   [`safe_type`] are spliced into SQL; every value travels in a `text[]` parameter
//!   and is converted by PostgreSQL: the client's cast first, then the column's type
//!   ([`convert`]).
//! - UPDATE and DELETE number their source rows and return the numbers they matched,
//!   so an operation whose key is missing (or whose guard no longer holds) is found
//!   exactly.
//! - Tables are named `ONLY schema.table`, so a child table added later is out of a
//!   flush's reach.

use std::collections::HashSet;

use super::{Group, GroupKind, PlanError, Shape};
use crate::writes::TableMeta;
use crate::writes::record::{AssignOp, RowOp, Val};

impl TableMeta {
    /// `ONLY "schema"."table"`: deferred tables have no inheritance children (checked
    /// at startup), and ONLY keeps a child added later out of reach of a flush.
    fn quoted(&self) -> String {
        format!("ONLY {}.{}", ident(&self.schema), ident(&self.table))
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

/// One group being built: the operations of one shape, in order. Whether an
/// operation may join it (same shape, a key not in `keys`) is `super`'s rule.
pub(super) struct Builder {
    pub(super) shape: Shape,
    pub(super) keys: HashSet<Vec<Option<String>>>,
    /// Per source row: key values then column values (Insert: column values only).
    rows: Vec<Vec<Option<String>>>,
    ops: Vec<(usize, usize)>,
}

impl Builder {
    pub(super) fn new(shape: Shape) -> Self {
        Self {
            shape,
            keys: HashSet::new(),
            rows: Vec::new(),
            ops: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, op: &RowOp, key: Vec<Option<String>>, at: (usize, usize)) {
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

    pub(super) fn finish(self, meta: &TableMeta) -> Result<Group, PlanError> {
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

    #[test]
    fn spliced_names_are_quoted_or_checked() {
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
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
