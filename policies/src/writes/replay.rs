//! A held transaction's row operations as plain SQL statements, one per operation, for
//! replaying them upstream inside the client's transaction when it cannot stay
//! deferred (SPEC §6). Each statement's command tag is what the client was told for
//! that operation (one row, or none for a key that did not exist).
//!
//! Invariants: values are rendered as SQL string literals (`'…'`, quotes doubled;
//! the session runs with `standard_conforming_strings = on`, checked before a
//! statement is deferred) converted like the flusher converts them (the client's cast,
//! then the column's type); identifiers are quoted; casts are checked plain type names.

use super::plan::{PlanError, TableMeta, checked_cast, convert, ident};
use super::record::{Assign, AssignOp, Cmp, Guard, RowOp, Val};

/// `'text'` (or `NULL`) converted to `column_type` like the client's value.
fn value(v: &Val, column_type: &str) -> Result<String, PlanError> {
    let cast = checked_cast(v)?;
    let literal = match &v.text {
        Some(t) => format!("'{}'", t.replace('\'', "''")),
        None => "NULL".to_owned(),
    };
    Ok(convert(&literal, cast.as_deref(), column_type))
}

/// `key1 = v1 AND …` for an UPDATE/DELETE of `key` (in primary-key order).
fn key_predicate(meta: &TableMeta, key: &[Val]) -> Result<String, PlanError> {
    if key.len() != meta.key.len() || key.iter().any(|v| v.text.is_none()) {
        return Err(PlanError::KeyMissing(meta.name.clone()));
    }
    let parts: Result<Vec<String>, PlanError> = meta
        .key
        .iter()
        .zip(key)
        .map(|(c, v)| Ok(format!("{} = {}", ident(c), value(v, meta.type_of(c)?)?)))
        .collect();
    Ok(parts?.join(" AND "))
}

/// The key predicate and the guard's conditions (ADR 0035), so a replayed guarded
/// write matches the rows PostgreSQL's own statement would have.
fn predicate(meta: &TableMeta, key: &[Val], guard: &[Guard]) -> Result<String, PlanError> {
    let mut sql = key_predicate(meta, key)?;
    for g in guard {
        sql.push_str(&format!(
            " AND {} {} {}",
            ident(&g.column),
            g.cmp.sql(),
            value(&g.value, meta.type_of(&g.column)?)?
        ));
    }
    Ok(sql)
}

/// One statement applying `op` to its table, as the client's statement would have.
pub fn statement(op: &RowOp, meta: &TableMeta) -> Result<String, PlanError> {
    let table = format!("{}.{}", ident(&meta.schema), ident(&meta.table));
    match op {
        RowOp::Insert {
            columns, values, ..
        } => {
            let cols: Vec<String> = columns.iter().map(|c| ident(c)).collect();
            let vals: Result<Vec<String>, PlanError> = columns
                .iter()
                .zip(values)
                .map(|(c, v)| value(v, meta.type_of(c)?))
                .collect();
            Ok(format!(
                "INSERT INTO {table} ({}){} VALUES ({})",
                cols.join(", "),
                meta.overriding_clause(),
                vals?.join(", ")
            ))
        }
        RowOp::Update {
            key, set, guard, ..
        } => Ok(format!(
            "UPDATE ONLY {table} SET {} WHERE {}",
            assignments(set, meta, "")?,
            predicate(meta, key, guard)?
        )),
        RowOp::Delete { key, guard, .. } => Ok(format!(
            "DELETE FROM ONLY {table} WHERE {}",
            predicate(meta, key, guard)?
        )),
    }
}

/// A SET list: `c = v`, or `c = {old}c ± v` for increments (`old`: empty, or the
/// table's name and a dot where the old row must be named).
fn assignments(set: &[Assign], meta: &TableMeta, old: &str) -> Result<String, PlanError> {
    let assigns: Result<Vec<String>, PlanError> = set
        .iter()
        .map(|a| {
            let col = ident(&a.column);
            let v = value(&a.value, meta.type_of(&a.column)?)?;
            Ok(match a.op {
                AssignOp::Set => format!("{col} = {v}"),
                AssignOp::Add => format!("{col} = {old}{col} + {v}"),
                AssignOp::Sub => format!("{col} = {old}{col} - {v}"),
            })
        })
        .collect();
    Ok(assigns?.join(", "))
}

/// `INSERT … ON CONFLICT (primary key)` of one row: `insert`, and `update` (the row's
/// DO UPDATE, as a [`RowOp::Update`] of its key) or DO NOTHING. Replayed as the upsert,
/// not as what it resolved to: upstream, the key's existence is PostgreSQL's to decide.
/// The update's guard, if any, is DO UPDATE's WHERE on the existing row (`c = v`, `c
/// IS NULL` for a NULL value): a held upsert whose RETURNING gave stored values is
/// replayed so that it updates nothing, and the replay's count differs, if those
/// values changed (ADR 0038).
pub fn upsert(
    insert: &RowOp,
    update: Option<&RowOp>,
    meta: &TableMeta,
) -> Result<String, PlanError> {
    let mut sql = statement(insert, meta)?;
    let key: Vec<String> = meta.key.iter().map(|c| ident(c)).collect();
    sql.push_str(&format!(" ON CONFLICT ({}) DO ", key.join(", ")));
    match update {
        None => sql.push_str("NOTHING"),
        Some(RowOp::Update { set, guard, .. }) => {
            // In DO UPDATE, the old row's column is named through its table.
            let old = format!("{}.", ident(&meta.table));
            sql.push_str(&format!("UPDATE SET {}", assignments(set, meta, &old)?));
            let mut conditions = Vec::with_capacity(guard.len());
            for g in guard {
                let col = format!("{old}{}", ident(&g.column));
                conditions.push(match (&g.value.text, g.cmp) {
                    (None, Cmp::Eq) => format!("{col} IS NULL"),
                    _ => format!(
                        "{col} {} {}",
                        g.cmp.sql(),
                        value(&g.value, meta.type_of(&g.column)?)?
                    ),
                });
            }
            if !conditions.is_empty() {
                sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
            }
        }
        Some(_) => return Err(PlanError::KeyMissing(meta.name.clone())),
    }
    Ok(sql)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writes::record::Assign;
    use std::collections::HashMap;

    fn meta() -> TableMeta {
        TableMeta {
            name: "public.t".into(),
            schema: "public".into(),
            table: "t".into(),
            key: vec!["id".into()],
            types: HashMap::from([
                ("id".to_owned(), "bigint".to_owned()),
                ("v".to_owned(), "text".to_owned()),
                ("n".to_owned(), "integer".to_owned()),
            ]),
            coalesce: false,
            plain: true,
            parents: Vec::new(),
            overriding: false,
        }
    }

    #[test]
    fn upserts_replay_as_upserts() {
        let m = meta();
        let insert = RowOp::Insert {
            table: "public.t".into(),
            columns: vec!["id".into(), "n".into()],
            values: vec![Val::plain(Some("1")), Val::plain(Some("2"))],
        };
        let update = RowOp::Update {
            table: "public.t".into(),
            key: vec![Val::plain(Some("1"))],
            set: vec![Assign {
                column: "n".into(),
                op: AssignOp::Add,
                value: Val::plain(Some("2")),
            }],
            guard: Vec::new(),
        };
        let head =
            "INSERT INTO \"public\".\"t\" (\"id\", \"n\") VALUES ('1'::bigint, '2'::integer)";
        assert_eq!(
            upsert(&insert, None, &m).expect("renders"),
            format!("{head} ON CONFLICT (\"id\") DO NOTHING")
        );
        assert_eq!(
            upsert(&insert, Some(&update), &m).expect("renders"),
            format!("{head} ON CONFLICT (\"id\") DO UPDATE SET \"n\" = \"t\".\"n\" + '2'::integer")
        );
        // A held upsert's RETURNING of stored values, checked by the replay.
        let RowOp::Update { set, key, .. } = update else {
            panic!("an update");
        };
        let checked = RowOp::Update {
            table: "public.t".into(),
            key,
            set,
            guard: vec![
                Guard {
                    column: "v".into(),
                    cmp: Cmp::Eq,
                    value: Val::plain(Some("x")),
                },
                Guard {
                    column: "n".into(),
                    cmp: Cmp::Eq,
                    value: Val::plain(None),
                },
            ],
        };
        assert_eq!(
            upsert(&insert, Some(&checked), &m).expect("renders"),
            format!(
                "{head} ON CONFLICT (\"id\") DO UPDATE SET \"n\" = \"t\".\"n\" + '2'::integer \
                 WHERE \"t\".\"v\" = 'x'::text AND \"t\".\"n\" IS NULL"
            )
        );
    }

    #[test]
    fn operations_render_as_the_statements_they_replay() {
        let m = meta();
        let insert = RowOp::Insert {
            table: "public.t".into(),
            columns: vec!["id".into(), "v".into()],
            values: vec![Val::plain(Some("1")), Val::plain(Some("it's"))],
        };
        assert_eq!(
            statement(&insert, &m).expect("renders"),
            "INSERT INTO \"public\".\"t\" (\"id\", \"v\") VALUES ('1'::bigint, 'it''s'::text)"
        );
        // A reserved key of a GENERATED ALWAYS identity overrides the system value.
        let always = TableMeta {
            overriding: true,
            ..meta()
        };
        assert_eq!(
            statement(&insert, &always).expect("renders"),
            "INSERT INTO \"public\".\"t\" (\"id\", \"v\") OVERRIDING SYSTEM VALUE VALUES \
             ('1'::bigint, 'it''s'::text)"
        );
        let update = RowOp::Update {
            table: "public.t".into(),
            key: vec![Val::plain(Some("1"))],
            set: vec![
                Assign {
                    column: "n".into(),
                    op: AssignOp::Add,
                    value: Val {
                        text: Some("2".into()),
                        cast: Some("int8".into()),
                    },
                },
                Assign {
                    column: "v".into(),
                    op: AssignOp::Set,
                    value: Val::plain(None),
                },
            ],
            guard: Vec::new(),
        };
        assert_eq!(
            statement(&update, &m).expect("renders"),
            "UPDATE ONLY \"public\".\"t\" SET \"n\" = \"n\" + '2'::int8::integer, \
             \"v\" = NULL::text WHERE \"id\" = '1'::bigint"
        );
        let delete = RowOp::Delete {
            table: "public.t".into(),
            key: vec![Val::plain(Some("1"))],
            guard: Vec::new(),
        };
        assert_eq!(
            statement(&delete, &m).expect("renders"),
            "DELETE FROM ONLY \"public\".\"t\" WHERE \"id\" = '1'::bigint"
        );
        // A cast that is not a plain type name, an unknown column: refused.
        let bad = RowOp::Delete {
            table: "public.t".into(),
            key: vec![Val {
                text: Some("1".into()),
                cast: Some("int); DROP TABLE t; --".into()),
            }],
            guard: Vec::new(),
        };
        assert!(statement(&bad, &m).is_err());
        let unknown = RowOp::Insert {
            table: "public.t".into(),
            columns: vec!["nope".into()],
            values: vec![Val::plain(Some("1"))],
        };
        assert!(statement(&unknown, &m).is_err());
    }
}
