use super::*;
use crate::writes::plan::plan_batch;

fn metas(coalesce: bool) -> HashMap<String, TableMeta> {
    let mut m = HashMap::new();
    for name in ["public.c", "public.log"] {
        let (schema, table) = name.split_once('.').expect("qualified");
        m.insert(
            name.to_owned(),
            TableMeta {
                name: name.to_owned(),
                schema: schema.to_owned(),
                table: table.to_owned(),
                key: vec!["id".to_owned()],
                types: [
                    ("id", "integer"),
                    ("n", "bigint"),
                    ("amount", "numeric(12,2)"),
                    ("f", "double precision"),
                    ("v", "text"),
                ]
                .into_iter()
                .map(|(c, t)| (c.to_owned(), t.to_owned()))
                .collect(),
                coalesce: coalesce && name == "public.c",
                plain: true,
                parents: Vec::new(),
                overriding: false,
            },
        );
    }
    m
}

fn val(v: &str) -> Val {
    Val::plain(Some(v))
}

fn insert(table: &str, id: &str, cols: &[(&str, Option<&str>)]) -> RowOp {
    let mut columns = vec!["id".to_owned()];
    let mut values = vec![val(id)];
    for (c, v) in cols {
        columns.push((*c).to_owned());
        values.push(Val::plain(*v));
    }
    RowOp::Insert {
        table: table.into(),
        columns,
        values,
    }
}

fn update(id: &str, set: &[(&str, AssignOp, Option<&str>)]) -> RowOp {
    RowOp::Update {
        table: "public.c".into(),
        key: vec![val(id)],
        set: set
            .iter()
            .map(|(c, op, v)| Assign {
                column: (*c).to_owned(),
                op: *op,
                value: Val::plain(*v),
            })
            .collect(),
        guard: Vec::new(),
    }
}

fn delete(id: &str) -> RowOp {
    RowOp::Delete {
        table: "public.c".into(),
        key: vec![val(id)],
        guard: Vec::new(),
    }
}

/// One record per operation, numbered from 1.
fn batch(ops: Vec<RowOp>) -> Vec<(u64, Arc<Record>)> {
    (1..)
        .zip(ops)
        .map(|(seq, op)| (seq, Arc::new(Record { ops: vec![op] })))
        .collect()
}

fn ops_of(out: &[(u64, Arc<Record>)]) -> Vec<RowOp> {
    out.iter().flat_map(|(_, r)| r.ops.clone()).collect()
}

use AssignOp::{Add, Set, Sub};

#[test]
fn deltas_on_one_key_are_summed_exactly() {
    let ops: Vec<RowOp> = (0..1000)
        .map(|i| {
            if i % 3 == 2 {
                update("1", &[("n", Sub, Some("2"))])
            } else {
                update("1", &[("n", Add, Some("5"))])
            }
        })
        .collect();
    let out = coalesce(&batch(ops), &metas(true));
    // 667 × +5, 333 × −2.
    assert_eq!(ops_of(&out), vec![update("1", &[("n", Add, Some("2669"))])]);
    assert_eq!(
        out.first().map(|(s, _)| *s),
        Some(1000),
        "the last seq that touched it"
    );
}

#[test]
fn numeric_deltas_sum_exactly_and_floats_are_not_combined() {
    let ops = vec![
        update("1", &[("amount", Add, Some("0.10"))]),
        update("1", &[("amount", Add, Some("0.20"))]),
        update("2", &[("f", Add, Some("0.1"))]),
        update("2", &[("f", Add, Some("0.2"))]),
        // A scale beyond the column's would round at each step: kept apart.
        update("3", &[("amount", Add, Some("0.005"))]),
        update("3", &[("amount", Add, Some("0.005"))]),
    ];
    let out = ops_of(&coalesce(&batch(ops), &metas(true)));
    assert!(out.contains(&update("1", &[("amount", Add, Some("0.30"))])));
    assert_eq!(
        out.iter()
            .filter(|o| **o == update("2", &[("f", Add, Some("0.1"))]))
            .count(),
        1
    );
    assert_eq!(
        out.iter()
            .filter(|o| **o == update("2", &[("f", Add, Some("0.2"))]))
            .count(),
        1
    );
    assert_eq!(
        out.iter()
            .filter(|o| **o == update("3", &[("amount", Add, Some("0.005"))]))
            .count(),
        2
    );
}

#[test]
fn assignments_keep_the_last_image_and_absorb_later_deltas() {
    let ops = vec![
        update("1", &[("n", Add, Some("4")), ("v", Set, Some("a"))]),
        update("1", &[("n", Set, Some("10"))]),
        update("1", &[("n", Sub, Some("3")), ("v", Set, Some("b"))]),
        update("1", &[("amount", Set, None)]),
        update("1", &[("amount", Add, Some("1.00"))]),
    ];
    let out = ops_of(&coalesce(&batch(ops), &metas(true)));
    assert_eq!(
        out,
        vec![update(
            "1",
            &[
                ("n", Set, Some("7")),
                ("v", Set, Some("b")),
                ("amount", Set, None)
            ]
        )],
        "NULL + 1.00 stays NULL"
    );
}

#[test]
fn insert_then_update_merges_and_insert_then_delete_cancels() {
    let ops = vec![
        insert("public.c", "1", &[("n", Some("1")), ("v", Some("x"))]),
        update(
            "1",
            &[
                ("n", Add, Some("2")),
                ("v", Set, Some("y")),
                ("amount", Set, Some("3.50")),
            ],
        ),
        insert("public.c", "2", &[("v", Some("gone"))]),
        update("2", &[("v", Set, Some("still gone"))]),
        delete("2"),
        // A delta on a column the INSERT left to its default cannot be folded in.
        insert("public.c", "3", &[("v", Some("d"))]),
        update("3", &[("n", Add, Some("1"))]),
    ];
    let out = ops_of(&coalesce(&batch(ops), &metas(true)));
    assert_eq!(
        out,
        vec![
            insert(
                "public.c",
                "1",
                &[("n", Some("3")), ("v", Some("y")), ("amount", Some("3.50"))]
            ),
            insert("public.c", "3", &[("v", Some("d"))]),
            update("3", &[("n", Add, Some("1"))]),
        ]
    );
}

#[test]
fn update_then_delete_is_the_delete_and_delete_then_insert_stays_in_order() {
    let ops = vec![
        update("1", &[("n", Add, Some("2"))]),
        delete("1"),
        delete("2"),
        insert("public.c", "2", &[("v", Some("again"))]),
        update("2", &[("v", Set, Some("again and again"))]),
        delete("3"),
        insert("public.c", "3", &[("v", Some("x"))]),
        delete("3"),
    ];
    let out = ops_of(&coalesce(&batch(ops), &metas(true)));
    assert_eq!(
        out,
        vec![
            // Round one, sorted by shape: inserts, updates, deletes.
            delete("1"),
            delete("2"),
            delete("3"),
            // Round two.
            insert("public.c", "2", &[("v", Some("again and again"))]),
        ]
    );
}

#[test]
fn other_tables_pass_through_in_order_before_the_coalesced_state() {
    let ops = vec![
        insert("public.log", "1", &[("v", Some("a"))]),
        update("1", &[("n", Add, Some("1"))]),
        insert("public.log", "2", &[("v", Some("b"))]),
        update("1", &[("n", Add, Some("1"))]),
    ];
    let input = batch(ops);
    let out = coalesce(&input, &metas(true));
    assert_eq!(
        ops_of(&out),
        vec![
            insert("public.log", "1", &[("v", Some("a"))]),
            insert("public.log", "2", &[("v", Some("b"))]),
            update("1", &[("n", Add, Some("2"))]),
        ]
    );
    assert_eq!(
        out.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 3, 4]
    );
    // Nothing coalescing: the batch is returned as it came.
    let plain = coalesce(&input, &metas(false));
    assert_eq!(plain.len(), 4);
    assert_eq!(ops_of(&plain), ops_of(&input));
}

#[test]
fn a_hot_key_workload_plans_as_one_statement_per_shape() {
    let mut ops = Vec::new();
    for i in 0..10_000 {
        ops.push(update(&(i % 100).to_string(), &[("n", Add, Some("1"))]));
    }
    let out = coalesce(&batch(ops), &metas(true));
    assert_eq!(out.len(), 100);
    let records: Vec<&Record> = out.iter().map(|(_, r)| r.as_ref()).collect();
    let groups = plan_batch(&records, &metas(true)).expect("plans");
    assert_eq!(groups.len(), 1, "one UPDATE … FROM unnest for 100 keys");
    for op in ops_of(&out) {
        let RowOp::Update { set, .. } = op else {
            panic!("{op:?}")
        };
        assert_eq!(
            set.first().and_then(|a| a.value.text.clone()).as_deref(),
            Some("100")
        );
    }
}

/// Applies operations to an in-memory table the way PostgreSQL would (no
/// constraints): the model the coalesced list must agree with.
fn apply(rows: &mut HashMap<String, HashMap<String, Option<String>>>, op: &RowOp) {
    let num = |v: &Option<String>| v.as_deref().map(|t| t.parse::<i128>().expect("int"));
    match op {
        RowOp::Insert {
            columns, values, ..
        } => {
            let row: HashMap<String, Option<String>> = columns
                .iter()
                .cloned()
                .zip(values.iter().map(|v| v.text.clone()))
                .collect();
            let id = row.get("id").cloned().flatten().expect("id");
            rows.entry(id).or_insert(row);
        }
        RowOp::Update { key, set, .. } => {
            let id = key.first().and_then(|v| v.text.clone()).expect("id");
            if let Some(row) = rows.get_mut(&id) {
                for a in set {
                    let cur = row.get(&a.column).cloned().flatten();
                    let new = match a.op {
                        Set => a.value.text.clone(),
                        Add | Sub => match (num(&cur), num(&a.value.text)) {
                            (Some(c), Some(d)) => {
                                Some(if a.op == Add { c + d } else { c - d }.to_string())
                            }
                            _ => None,
                        },
                    };
                    row.insert(a.column.clone(), new);
                }
            }
        }
        RowOp::Delete { key, .. } => {
            let id = key.first().and_then(|v| v.text.clone()).expect("id");
            rows.remove(&id);
        }
    }
}

#[test]
fn random_sequences_end_in_the_same_state_coalesced_or_not() {
    // A small xorshift: seeded, reproducible, no dependency.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _case in 0..300 {
        // Only sequences exact row counts acknowledge: INSERT of a key that does not
        // exist, UPDATE and DELETE of one that does (the rest never reaches a record).
        let mut exists = [false; 4];
        let mut ops = Vec::new();
        for _ in 0..next(40) + 1 {
            let k = usize::try_from(next(4)).expect("small");
            let id = k.to_string();
            let v = next(20).to_string();
            let op = if exists[k] {
                match next(4) {
                    0 => update(&id, &[("n", Add, Some(v.as_str()))]),
                    1 => update(&id, &[("n", Sub, Some(v.as_str())), ("v", Set, Some("u"))]),
                    2 => update(&id, &[("n", Set, Some(v.as_str()))]),
                    _ => delete(&id),
                }
            } else if next(2) == 0 {
                insert("public.c", &id, &[("n", Some(v.as_str()))])
            } else {
                insert("public.c", &id, &[("v", Some("t"))])
            };
            exists[k] = !matches!(op, RowOp::Delete { .. });
            ops.push(op);
        }
        let mut plain = HashMap::new();
        for op in &ops {
            apply(&mut plain, op);
        }
        let mut folded = HashMap::new();
        for op in ops_of(&coalesce(&batch(ops.clone()), &metas(true))) {
            apply(&mut folded, &op);
        }
        assert_eq!(folded, plain, "{ops:#?}");
    }
}
