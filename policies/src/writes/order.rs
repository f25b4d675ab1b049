//! The order a batch's operations are planned in. Journal order, except for one case:
//! a batch of INSERTs only, into tables without triggers or rules, is planned table by
//! table (parents of a foreign key first), so that client transactions that interleave
//! tables (an ORM's order, then its lines) become one set-based statement per table
//! instead of one per row.
//!
//! Invariants (why the reordering cannot change the outcome):
//! - Operations on one table keep their journal order (duplicates, unique indexes and
//!   self-references see what they would have seen).
//! - Only INSERTs move, and only into tables with no triggers and no rules: nothing
//!   observes the order across tables but foreign keys between tables of the batch.
//! - A foreign key's parent table is planned before its child table, and the batch is
//!   planned in journal order instead when any child row refers to a parent row that
//!   the journal inserts after it (that INSERT would have failed in order), or when a
//!   value cannot be compared exactly (a cast, a type whose text has several
//!   spellings, a referenced column the parent's INSERT does not give).
//! - Tables linked in a cycle of foreign keys keep journal order.
//!
//! Not covered (the same in any order of the INSERTs of one table): a sequence shared
//! by two tables or a `clock_timestamp()` default numbers or stamps rows in the order
//! they are applied.

use std::collections::{HashMap, HashSet};

pub use super::meta::ForeignKey;
use super::meta::TableMeta;
use super::record::{Record, RowOp, Val};

/// The (record, operation) positions of `records` in the order to plan them.
pub fn plan_order(records: &[&Record], tables: &HashMap<String, TableMeta>) -> Vec<(usize, usize)> {
    let journal: Vec<(usize, usize)> = records
        .iter()
        .enumerate()
        .flat_map(|(ri, r)| (0..r.ops.len()).map(move |oi| (ri, oi)))
        .collect();
    match by_table(records, tables, &journal) {
        Some(order) => order,
        None => journal,
    }
}

fn by_table(
    records: &[&Record],
    tables: &HashMap<String, TableMeta>,
    journal: &[(usize, usize)],
) -> Option<Vec<(usize, usize)>> {
    let op = |&(ri, oi): &(usize, usize)| records.get(ri).and_then(|r| r.ops.get(oi));
    // The INSERTs into `table`: journal position, columns, values.
    let inserts = |table: &str| {
        journal
            .iter()
            .enumerate()
            .filter_map(move |(i, p)| match op(p) {
                Some(RowOp::Insert {
                    table: t,
                    columns,
                    values,
                }) if t == table => Some((i, columns, values)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    // Inserts only, into plain tables; the tables in order of first appearance.
    let mut order: Vec<&str> = Vec::new();
    for p in journal {
        let RowOp::Insert { table, .. } = op(p)? else {
            return None;
        };
        if !tables.get(table)?.plain {
            return None;
        }
        if !order.contains(&table.as_str()) {
            order.push(table);
        }
    }
    if order.len() < 2 {
        return None;
    }
    let present: HashSet<&str> = order.iter().copied().collect();
    // Parents first (Kahn, stable by first appearance); a cycle keeps journal order.
    let mut ranked: Vec<&str> = Vec::with_capacity(order.len());
    while ranked.len() < order.len() {
        let next = order.iter().copied().find(|t| {
            !ranked.contains(t)
                && tables.get(*t).is_some_and(|m| {
                    m.parents.iter().all(|fk| {
                        fk.parent == *t
                            || !present.contains(fk.parent.as_str())
                            || ranked.contains(&fk.parent.as_str())
                    })
                })
        })?;
        ranked.push(next);
    }
    // No child row may refer to a parent row inserted after it.
    for t in &order {
        let meta = tables.get(*t)?;
        for fk in meta
            .parents
            .iter()
            .filter(|fk| fk.parent != *t && present.contains(fk.parent.as_str()))
        {
            let parent = tables.get(&fk.parent)?;
            let mut last: HashMap<Vec<String>, usize> = HashMap::new();
            for (i, columns, values) in inserts(&fk.parent) {
                // NULL in a referenced column: no child can match it.
                if let Some(v) = values_of(columns, values, &fk.references, parent)? {
                    last.insert(v, i);
                }
            }
            for (i, columns, values) in inserts(t) {
                if let Some(v) = values_of(columns, values, &fk.columns, meta)?
                    && last.get(&v).is_some_and(|j| *j > i)
                {
                    return None;
                }
            }
        }
    }
    let rank: HashMap<&str, usize> = ranked.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut planned: Vec<(usize, (usize, usize))> = journal
        .iter()
        .map(|p| {
            let r = op(p)
                .and_then(|o| rank.get(o.table()).copied())
                .unwrap_or(0);
            (r, *p)
        })
        .collect();
    // Stable: each table's operations keep their journal order.
    planned.sort_by_key(|(r, _)| *r);
    Some(planned.into_iter().map(|(_, p)| p).collect())
}

/// The values an INSERT gives `wanted`, comparable across tables: `Some(None)` when one
/// is NULL (a foreign key does not apply), `None` when one cannot be compared exactly
/// (not given, cast, or of a type whose text has several spellings).
fn values_of(
    columns: &[String],
    values: &[Val],
    wanted: &[String],
    meta: &TableMeta,
) -> Option<Option<Vec<String>>> {
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let i = columns.iter().position(|c| c == w)?;
        let v = values.get(i)?;
        if v.cast.is_some() {
            return None;
        }
        let Some(text) = &v.text else {
            return Some(None);
        };
        out.push(comparable(text, meta.types.get(w)?)?);
    }
    Some(Some(out))
}

/// `text` in one spelling per value for integer and text types; `None` otherwise.
fn comparable(text: &str, column_type: &str) -> Option<String> {
    match column_type {
        "smallint" | "integer" | "bigint" => {
            let t = text.trim();
            let (negative, digits) = match t.strip_prefix('-') {
                Some(d) => (true, d),
                None => (false, t.strip_prefix('+').unwrap_or(t)),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let digits = digits.trim_start_matches('0');
            Some(match (negative, digits.is_empty()) {
                (_, true) => "0".to_owned(),
                (true, false) => format!("-{digits}"),
                (false, false) => digits.to_owned(),
            })
        }
        "text" => Some(text.to_owned()),
        t if t.starts_with("character varying") => Some(text.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, parents: Vec<ForeignKey>, plain: bool) -> TableMeta {
        let (schema, table) = name.split_once('.').expect("qualified");
        TableMeta {
            name: name.to_owned(),
            schema: schema.to_owned(),
            table: table.to_owned(),
            key: vec!["id".to_owned()],
            types: [("id", "bigint"), ("order_id", "bigint"), ("v", "text")]
                .into_iter()
                .map(|(c, t)| (c.to_owned(), t.to_owned()))
                .collect(),
            coalesce: false,
            plain,
            parents,
            overriding: false,
        }
    }

    fn tables(plain_items: bool) -> HashMap<String, TableMeta> {
        let fk = ForeignKey {
            parent: "public.orders".into(),
            columns: vec!["order_id".into()],
            references: vec!["id".into()],
        };
        [
            ("public.orders", meta("public.orders", vec![], true)),
            ("public.items", meta("public.items", vec![fk], plain_items)),
            ("public.other", meta("public.other", vec![], true)),
        ]
        .into_iter()
        .map(|(n, m)| (n.to_owned(), m))
        .collect()
    }

    fn insert(table: &str, cols: &[&str], vals: &[Option<&str>]) -> RowOp {
        RowOp::Insert {
            table: table.into(),
            columns: cols.iter().map(|c| (*c).to_owned()).collect(),
            values: vals.iter().map(|v| Val::plain(*v)).collect(),
        }
    }

    /// An ORM transaction: an order and its line.
    fn tx(order: &str, item: &str) -> Record {
        Record {
            ops: vec![
                insert("public.orders", &["id", "v"], &[Some(order), Some("o")]),
                insert(
                    "public.items",
                    &["id", "order_id"],
                    &[Some(item), Some(order)],
                ),
            ],
        }
    }

    fn order_of(records: &[Record], tables: &HashMap<String, TableMeta>) -> Vec<(usize, usize)> {
        let refs: Vec<&Record> = records.iter().collect();
        plan_order(&refs, tables)
    }

    #[test]
    fn interleaved_transactions_are_planned_table_by_table_parents_first() {
        let records = vec![tx("1", "10"), tx("2", "20"), tx("3", "30")];
        assert_eq!(
            order_of(&records, &tables(true)),
            vec![(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
        );
        // The child first in the journal (its own parent earlier): still parents first.
        let records = vec![
            Record {
                ops: vec![insert("public.orders", &["id"], &[Some("1")])],
            },
            Record {
                ops: vec![
                    insert(
                        "public.items",
                        &["id", "order_id"],
                        &[Some("10"), Some("01")],
                    ),
                    insert("public.orders", &["id"], &[Some("2")]),
                ],
            },
        ];
        assert_eq!(
            order_of(&records, &tables(true)),
            vec![(0, 0), (1, 1), (1, 0)]
        );
    }

    #[test]
    fn journal_order_is_kept_whenever_moving_could_change_the_outcome() {
        let journal = |records: &[Record]| -> Vec<(usize, usize)> {
            records
                .iter()
                .enumerate()
                .flat_map(|(ri, r)| (0..r.ops.len()).map(move |oi| (ri, oi)))
                .collect()
        };
        // A line whose order the journal inserts after it (PostgreSQL refuses the
        // line in journal order); spelled differently, the same integer.
        let late_parent = vec![
            Record {
                ops: vec![insert(
                    "public.items",
                    &["id", "order_id"],
                    &[Some("10"), Some("+007")],
                )],
            },
            Record {
                ops: vec![insert("public.orders", &["id"], &[Some("7")])],
            },
        ];
        assert_eq!(order_of(&late_parent, &tables(true)), journal(&late_parent));
        // A table with triggers or rules; an UPDATE in the batch.
        let records = vec![tx("1", "10"), tx("2", "20")];
        assert_eq!(order_of(&records, &tables(false)), journal(&records));
        let mut with_update = vec![tx("1", "10")];
        with_update.push(Record {
            ops: vec![RowOp::Delete {
                table: "public.other".into(),
                key: vec![Val::plain(Some("1"))],
                guard: Vec::new(),
            }],
        });
        assert_eq!(order_of(&with_update, &tables(true)), journal(&with_update));
        // A foreign-key value that cannot be compared exactly (a cast).
        let cast = vec![Record {
            ops: vec![
                insert(
                    "public.items",
                    &["id", "order_id"],
                    &[Some("10"), Some("1")],
                ),
                RowOp::Insert {
                    table: "public.orders".into(),
                    columns: vec!["id".into()],
                    values: vec![Val {
                        text: Some("1".into()),
                        cast: Some("int8".into()),
                    }],
                },
            ],
        }];
        assert_eq!(order_of(&cast, &tables(true)), journal(&cast));
        // A cycle of foreign keys.
        let mut cyclic = tables(true);
        if let Some(o) = cyclic.get_mut("public.orders") {
            o.parents.push(ForeignKey {
                parent: "public.items".into(),
                columns: vec!["v".into()],
                references: vec!["id".into()],
            });
        }
        let records = vec![tx("1", "10"), tx("2", "20")];
        assert_eq!(order_of(&records, &cyclic), journal(&records));
    }

    #[test]
    fn null_references_and_independent_tables_move_freely() {
        let records = vec![
            Record {
                ops: vec![
                    insert("public.other", &["id"], &[Some("1")]),
                    insert("public.items", &["id", "order_id"], &[Some("10"), None]),
                ],
            },
            Record {
                ops: vec![
                    insert("public.other", &["id"], &[Some("2")]),
                    insert("public.items", &["id", "order_id"], &[Some("20"), None]),
                ],
            },
        ];
        assert_eq!(
            order_of(&records, &tables(true)),
            vec![(0, 0), (1, 0), (0, 1), (1, 1)]
        );
    }
}
