//! Row-level knowledge of statements: which primary key a point read depends on and
//! which keys a write changes, as canonical key text (`spillway_policies::changes::
//! canonical_key`, the form the change stream and the write side use), so one row has
//! one key whichever way a statement names it.
//!
//! Invariants:
//! - A key is given only when it is certain: the table is a plain table with no
//!   inheritance (its rows are read and written under its OID alone), the statement
//!   fixes every primary-key column with a constant or a parameter, and each value's
//!   type is one whose text has a canonical form and compares as the column does
//!   (integers with integers, text/varchar with text/varchar, uuid with uuid; a cast
//!   to anything else, such as `bpchar`, which ignores trailing blanks, is not).
//!   Anything else is `None`: the caller depends on (or invalidates) the whole table.
//! - Parameters are resolved with the Bind's values: a text-format value through the
//!   column type's canonical form, a binary one by its parameter type (declared in
//!   Parse, else the cast's, else the column's, as PostgreSQL infers it).

use spillway_policies::changes::key_types::{INT2, INT4, INT8, TEXT, UUID, VARCHAR};
use spillway_policies::changes::{canonical_binary_key, canonical_key};

use crate::read::catalog::{Catalog, Relation};
use crate::read::classify::{ConflictTarget, OnConflict, Operand, PointFilter, Value, WriteShape};

/// One primary-key column's value as a statement gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// A constant, already canonical.
    Known(String),
    /// Bind parameter `index` (0-based), compared with a column of type `column`;
    /// `cast`: the type the text casts it to, if any.
    Param {
        index: usize,
        column: u32,
        cast: Option<u32>,
    },
}

/// The row a point read depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointKey {
    pub table: u32,
    pub parts: Vec<KeyPart>,
}

/// The rows a write changes: every row's key, on one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteKeys {
    pub table: u32,
    pub rows: Vec<Vec<KeyPart>>,
}

/// A Bind's parameters as the key resolution needs them.
pub struct Params<'a> {
    /// Types declared in Parse (0 = unspecified), by position.
    pub declared: &'a [u32],
    /// Per parameter: binary format, and its bytes (`None`: NULL).
    pub values: &'a [(bool, Option<&'a [u8]>)],
}

impl Params<'_> {
    /// No parameters (a simple Query).
    pub const NONE: Params<'static> = Params {
        declared: &[],
        values: &[],
    };
}

/// The key a point read of `oid` fixes, if its filter fixes the whole primary key.
pub fn point_key(filter: &PointFilter, oid: u32, catalog: &Catalog) -> Option<PointKey> {
    let rel = single_table(catalog, &filter.table)?;
    if rel.oid != oid {
        return None;
    }
    let parts = key_parts(catalog, oid, &filter.equalities)?;
    Some(PointKey { table: oid, parts })
}

/// The keys a deferrable-shaped write changes, if they are certain (see the module
/// docs; an UPDATE must not assign a key column).
pub fn write_keys(shape: &WriteShape, catalog: &Catalog) -> Option<WriteKeys> {
    let rel = single_table(catalog, shape.table())?;
    if rel.write_side_effects {
        return None;
    }
    let pk = catalog.primary_key(rel.oid)?;
    let rows = match shape {
        WriteShape::Update { set, key, .. } => {
            if set.iter().any(|(c, _)| pk.iter().any(|(k, _)| k == c)) {
                return None;
            }
            vec![key_parts(catalog, rel.oid, key)?]
        }
        WriteShape::Delete { key, .. } => vec![key_parts(catalog, rel.oid, key)?],
        WriteShape::Insert {
            columns,
            rows,
            on_conflict,
            ..
        } => {
            // DO UPDATE changes the row whose arbiter conflicts: the given key's only
            // when the arbiter is the primary key and the key is not assigned.
            if let Some(OnConflict {
                target,
                update: Some(set),
            }) = on_conflict
            {
                let on_pk = match target {
                    ConflictTarget::Columns(cols) => {
                        cols.len() == pk.len() && pk.iter().all(|(k, _)| cols.contains(k))
                    }
                    ConflictTarget::Constraint(_) => false,
                };
                if !on_pk || set.iter().any(|(c, _)| pk.iter().any(|(k, _)| k == c)) {
                    return None;
                }
            }
            rows.iter()
                .map(|row| {
                    let named: Vec<(String, Value)> =
                        columns.iter().cloned().zip(row.iter().cloned()).collect();
                    key_parts(catalog, rel.oid, &named)
                })
                .collect::<Option<_>>()?
        }
    };
    Some(WriteKeys {
        table: rel.oid,
        rows,
    })
}

impl PointKey {
    /// The canonical key with `params`, or `None` (depend on the whole table).
    pub fn resolve(&self, params: &Params<'_>) -> Option<Vec<String>> {
        resolve(&self.parts, params)
    }
}

impl WriteKeys {
    /// Every row's canonical key with `params`, or `None` (the whole table changed).
    pub fn resolve(&self, params: &Params<'_>) -> Option<Vec<Vec<String>>> {
        self.rows.iter().map(|row| resolve(row, params)).collect()
    }
}

fn resolve(parts: &[KeyPart], params: &Params<'_>) -> Option<Vec<String>> {
    parts
        .iter()
        .map(|part| match part {
            KeyPart::Known(k) => Some(k.clone()),
            KeyPart::Param {
                index,
                column,
                cast,
            } => {
                let (binary, value) = params.values.get(*index)?;
                let value = (*value)?;
                let declared = params.declared.get(*index).copied().unwrap_or(0);
                let ty = match (declared, cast) {
                    (0, Some(c)) => *c,
                    (0, None) => *column,
                    (d, _) => d,
                };
                if family(ty)? != family(*column)? {
                    return None;
                }
                if *binary {
                    canonical_binary_key(value, ty).ok()
                } else {
                    canonical_key(std::str::from_utf8(value).ok()?, *column).ok()
                }
            }
        })
        .collect()
}

/// The one relation `name` denotes, when it is a standalone plain table.
fn single_table<'c>(
    catalog: &'c Catalog,
    name: &crate::read::classify::RelName,
) -> Option<&'c Relation> {
    match catalog
        .resolve(name.schema.as_deref(), &name.name)
        .as_slice()
    {
        [rel] if catalog.is_standalone_table(rel.oid) => Some(rel),
        _ => None,
    }
}

/// The key parts of table `oid` that `equalities` fix, in key order; `None` unless
/// every primary-key column is fixed by a usable value.
fn key_parts(catalog: &Catalog, oid: u32, equalities: &[(String, Value)]) -> Option<Vec<KeyPart>> {
    let pk = catalog.primary_key(oid)?;
    pk.iter()
        .map(|(column, ty)| {
            let (_, value) = equalities.iter().find(|(c, _)| c == column)?;
            let cast = match &value.cast {
                None => None,
                Some(name) => Some(cast_type(name)?),
            };
            if let Some(c) = cast
                && family(c)? != family(*ty)?
            {
                return None;
            }
            match &value.operand {
                Operand::Literal(Some(text)) => canonical_key(text, *ty).ok().map(KeyPart::Known),
                Operand::Literal(None) | Operand::Clock(_) => None,
                Operand::Param(n) => Some(KeyPart::Param {
                    index: usize::from(*n).checked_sub(1)?,
                    column: *ty,
                    cast,
                }),
            }
        })
        .collect()
}

/// The type OID of a cast's name as pg_query spells it, for the key types only (no
/// type modifier: `varchar(2)` truncates).
fn cast_type(name: &str) -> Option<u32> {
    Some(match name {
        "int2" => INT2,
        "int4" => INT4,
        "int8" => INT8,
        "text" => TEXT,
        "varchar" => VARCHAR,
        "uuid" => UUID,
        _ => return None,
    })
}

/// Types whose values compare with each other exactly as their canonical texts do.
fn family(ty: u32) -> Option<u8> {
    match ty {
        INT2 | INT4 | INT8 => Some(0),
        TEXT | VARCHAR => Some(1),
        UUID => Some(2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::catalog::tests::sample;
    use crate::read::classify::analyze;

    fn catalog() -> Catalog {
        // public.accounts (1): key (id int4); audit.accounts (2): key (a text, b uuid).
        sample().with_primary_keys(vec![
            (1, "id".into(), INT4),
            (2, "a".into(), TEXT),
            (2, "b".into(), UUID),
        ])
    }

    fn point(sql: &str) -> Option<PointKey> {
        let a = analyze(sql);
        let filter = a.statements[0].point.as_ref()?;
        let c = catalog();
        let oid = c.resolve(filter.table.schema.as_deref(), &filter.table.name)[0].oid;
        point_key(filter, oid, &c)
    }

    fn known(sql: &str) -> Option<Vec<String>> {
        point(sql)?.resolve(&Params::NONE)
    }

    #[test]
    fn literals_give_canonical_keys() {
        let k = |s: &[&str]| Some(s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            known("SELECT * FROM public.accounts WHERE id = 5"),
            k(&["5"])
        );
        assert_eq!(
            known("SELECT v FROM public.accounts WHERE '05' = id AND v > 3"),
            k(&["5"])
        );
        assert_eq!(
            known("SELECT v FROM public.accounts a WHERE a.id = 5::int8 ORDER BY v"),
            k(&["5"])
        );
        assert_eq!(
            known(
                "SELECT * FROM audit.accounts WHERE (b, a) = \
                 ('A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', 'x')"
            ),
            None,
            "a row comparison is not a conjunction of equalities"
        );
        assert_eq!(
            known(
                "SELECT * FROM audit.accounts WHERE b = 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11' \
                 AND a = 'x'"
            ),
            k(&["x", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"])
        );
    }

    #[test]
    fn anything_uncertain_depends_on_the_table() {
        for sql in [
            "SELECT * FROM public.accounts WHERE id > 5",
            "SELECT * FROM public.accounts WHERE id = 5 OR id = 6",
            "SELECT * FROM public.accounts WHERE id = 5.0",
            "SELECT * FROM public.accounts WHERE id = 5::numeric",
            "SELECT * FROM audit.accounts WHERE a = 'x'",
            "SELECT * FROM audit.accounts WHERE a = 'x '::bpchar \
             AND b = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
            "SELECT * FROM accounts WHERE id = 5",
            "SELECT *, (SELECT count(*) FROM public.accounts) FROM public.accounts WHERE id = 5",
            "SELECT * FROM public.accounts WHERE id = 5 \
             AND EXISTS (SELECT 1 FROM public.accounts b WHERE b.id = 6)",
            "SELECT * FROM public.accounts x, public.accounts y WHERE x.id = 5",
            "SELECT * FROM public.accounts WHERE id = 5 UNION SELECT * FROM public.accounts",
            "SELECT * FROM public.accounts WHERE other.id = 5",
        ] {
            assert_eq!(known(sql), None, "{sql}");
        }
    }

    #[test]
    fn parameters_resolve_by_format_and_type() {
        let p = point("SELECT * FROM public.accounts WHERE id = $1").expect("point");
        let text = [(false, Some(&b" 7"[..]))];
        let params = |values, declared| Params { declared, values };
        assert_eq!(p.resolve(&params(&text, &[])), Some(vec!["7".into()]));
        let bin8 = 7i64.to_be_bytes();
        let bin = [(true, Some(&bin8[..]))];
        assert_eq!(p.resolve(&params(&bin, &[INT8])), Some(vec!["7".into()]));
        assert_eq!(p.resolve(&params(&bin, &[])), None, "int4 expects 4 bytes");
        assert_eq!(p.resolve(&params(&text, &[TEXT])), None, "text vs int");
        assert_eq!(p.resolve(&params(&[(false, None)], &[])), None);
        let cast = point("SELECT * FROM public.accounts WHERE id = $1::int8").expect("point");
        assert_eq!(cast.resolve(&params(&bin, &[])), Some(vec!["7".into()]));
    }

    #[test]
    fn writes_with_certain_keys() {
        let c = catalog();
        let keys = |sql: &str| {
            let a = analyze(sql);
            let shape = a.statements[0].shape.clone()?.ok()?;
            write_keys(&shape, &c)?.resolve(&Params::NONE)
        };
        assert_eq!(
            keys("UPDATE public.accounts SET v = 1 WHERE id = 3"),
            Some(vec![vec!["3".into()]])
        );
        assert_eq!(
            keys("INSERT INTO public.accounts (v, id) VALUES (1, 3), (2, '04')"),
            Some(vec![vec!["3".into()], vec!["4".into()]])
        );
        assert_eq!(
            keys("DELETE FROM public.accounts WHERE id = 3"),
            Some(vec![vec!["3".into()]])
        );
        assert_eq!(keys("UPDATE public.accounts SET id = 4 WHERE id = 3"), None);
        assert_eq!(keys("INSERT INTO public.accounts (v) VALUES (1)"), None);
        assert_eq!(keys("UPDATE public.accounts SET v = 1 WHERE v = 3"), None);
        assert_eq!(keys("UPDATE accounts SET v = 1 WHERE id = 3"), None);
    }
}

#[cfg(test)]
mod decide_tests {
    use super::*;
    use crate::read::cache::decide::{TableSettings, decide};
    use crate::read::catalog::tests::sample;
    use crate::read::classify::analyze;

    #[test]
    fn decisions_carry_point_and_write_keys() {
        let c = sample().with_primary_keys(vec![(1, "id".into(), INT4)]);
        let settings = TableSettings {
            default_ttl: std::time::Duration::from_secs(60),
            invalidate_on_unknown: true,
            by_table: std::collections::HashMap::new(),
        };
        let d = decide(
            &analyze("SELECT v FROM public.accounts WHERE id = $1"),
            Some(&c),
            &settings,
        );
        assert!(d.point.is_some(), "{d:?}");
        let d = decide(
            &analyze("SELECT v FROM public.accounts WHERE id = 7"),
            Some(&c),
            &settings,
        );
        assert!(d.point.is_some(), "{d:?}");
        let d = decide(
            &analyze("UPDATE public.accounts SET v = 'a' WHERE id = 7"),
            Some(&c),
            &settings,
        );
        let e = d.effects_with(&Params::NONE);
        assert_eq!(e.keyed_tables, vec![1], "{d:?}");
        assert_eq!(e.keys, vec![(1, vec!["7".to_owned()])]);
    }
}
