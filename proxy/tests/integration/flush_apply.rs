//! The flush worker's upstream step against a real PostgreSQL (SPEC §6 "Exactly once",
//! "Failures at apply time"): batches of journal records applied as set-based
//! statements in one transaction with the ledger compare-and-set; a replayed batch is
//! refused by the ledger; a newer epoch fences the older owner; records PostgreSQL
//! refuses land in `spillway.dead_letters` with the rest of their batch applied; order
//! is kept across tables with a foreign key.

use std::collections::HashMap;
use std::sync::Arc;

use spillway::ops::throwaway::ThrowawayPostgres;
use spillway::write::apply::{self, ApplyError, LedgerKey};
use spillway::write::ledger;
use spillway::write::schema;
use spillway_policies::writes::{Assign, AssignOp, Record, RowOp, TableMeta, Val};
use sqlx::{Connection, PgConnection, Row};

use crate::context::{DB, USER};

async fn start() -> (ThrowawayPostgres, PgConnection, HashMap<String, TableMeta>) {
    let pg = tokio::task::spawn_blocking(|| ThrowawayPostgres::builder().start())
        .await
        .expect("pg start task")
        .expect("throwaway PostgreSQL starts");
    let url = pg.url(USER, DB);
    schema::migrate(&url).await.expect("migrate");
    // Qualified: the test role is called `spillway`, so once schema `spillway` exists
    // the default search_path ("$user", public) would put new tables there.
    pg.psql(
        DB,
        "CREATE TABLE public.parent (id int PRIMARY KEY, name text NOT NULL, n bigint NOT NULL DEFAULT 0); \
         CREATE TABLE public.child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES public.parent (id), \
                             qty int NOT NULL CHECK (qty >= 0));",
    )
    .expect("tables");
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let mut tables = HashMap::new();
    let configured: std::collections::BTreeMap<_, _> = ["public.parent", "public.child"]
        .into_iter()
        .map(|t| {
            (
                t.parse().expect("name"),
                spillway_policies::TableConfig {
                    policy: spillway_policies::Policy::WriteBehind,
                    ..Default::default()
                },
            )
        })
        .collect();
    for (name, t) in spillway::write::tables::load(&mut conn, &configured)
        .await
        .expect("deferred tables load")
    {
        tables.insert(name, t.meta);
    }
    (pg, conn, tables)
}

fn v(text: &str) -> Val {
    Val::plain(Some(text))
}

fn insert(table: &str, cols: &[&str], vals: &[&str]) -> Record {
    Record {
        ops: vec![RowOp::Insert {
            table: format!("public.{table}"),
            columns: cols.iter().map(|c| (*c).to_owned()).collect(),
            values: vals.iter().map(|x| v(x)).collect(),
        }],
    }
}

fn add(table: &str, id: &str, column: &str, by: &str) -> Record {
    Record {
        ops: vec![RowOp::Update {
            table: format!("public.{table}"),
            key: vec![v(id)],
            set: vec![Assign {
                column: column.to_owned(),
                op: AssignOp::Add,
                value: v(by),
            }],
            guard: Vec::new(),
        }],
    }
}

fn delete(table: &str, id: &str) -> Record {
    Record {
        ops: vec![RowOp::Delete {
            table: format!("public.{table}"),
            key: vec![v(id)],
            guard: Vec::new(),
        }],
    }
}

fn numbered(records: &[Record], first: u64) -> Vec<(u64, Arc<Record>)> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| (first + i as u64, Arc::new(r.clone())))
        .collect()
}

#[tokio::test]
async fn batches_apply_once_in_order_and_a_replay_is_refused() {
    let (pg, mut conn, tables) = start().await;
    let key = LedgerKey {
        journal_id: "j1".into(),
        epoch: 1,
    };
    assert_eq!(
        ledger::claim_ledger(&mut conn, &key).await.expect("claim"),
        0
    );

    // Parent before child (the foreign key needs that order), counters, a delete.
    let records = vec![
        insert("parent", &["id", "name"], &["1", "a"]),
        insert("parent", &["id", "name"], &["2", "b"]),
        insert("child", &["id", "parent_id", "qty"], &["10", "1", "5"]),
        insert("child", &["id", "parent_id", "qty"], &["11", "2", "5"]),
        add("parent", "1", "n", "3"),
        add("parent", "2", "n", "4"),
        add("parent", "1", "n", "-1"),
        delete("child", "11"),
    ];
    let batch = numbered(&records, 1);
    let applied = apply::apply_batch(&mut conn, &key, 0, &batch, &tables)
        .await
        .expect("batch applies");
    assert!(
        applied.dead_letters.is_empty(),
        "{:?}",
        applied.dead_letters
    );
    // The batch's transaction id came back with the ledger's compare-and-set (after
    // the durable-commit setting's own row: this server's default is off).
    assert!(applied.xid.is_some(), "{applied:?}");
    // Merged: 2 parent inserts, 2 child inserts, 2 updates (key 1 repeats: a second
    // group), 1 delete.
    assert_eq!(applied.statements, 5, "{applied:?}");
    assert_eq!(
        pg.psql(
            DB,
            "SELECT string_agg(id || ':' || n, ',' ORDER BY id) FROM parent"
        )
        .expect("parents")
        .trim(),
        "1:2,2:4"
    );
    assert_eq!(
        pg.psql(
            DB,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM child"
        )
        .expect("children")
        .trim(),
        "10"
    );

    // The same batch again (a retry after an unknown commit outcome) is refused by
    // the ledger and changes nothing.
    let again = apply::apply_batch(&mut conn, &key, 0, &batch, &tables).await;
    assert!(matches!(again, Err(ApplyError::Fenced { .. })), "{again:?}");
    // The refused batch's transaction is left: the connection is back in autocommit
    // (a statement of its own has its transaction's start time).
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let autocommit: bool =
        sqlx::raw_sql("SELECT pg_catalog.now() = pg_catalog.statement_timestamp()")
            .fetch_one(&mut conn)
            .await
            .expect("autocommit check")
            .get(0);
    assert!(autocommit, "the refused batch left its transaction open");
    assert_eq!(
        pg.psql(DB, "SELECT sum(n) FROM parent")
            .expect("sum")
            .trim(),
        "6"
    );
    assert_eq!(
        pg.psql(
            DB,
            "SELECT last_seq FROM spillway.flush_ledger WHERE journal_id = 'j1'"
        )
        .expect("ledger")
        .trim(),
        "8"
    );

    // A newer epoch (the journal reopened elsewhere) fences this owner.
    let newer = LedgerKey {
        journal_id: "j1".into(),
        epoch: 2,
    };
    let mut other = PgConnection::connect(&pg.url(USER, DB))
        .await
        .expect("connect");
    assert_eq!(
        ledger::claim_ledger(&mut other, &newer)
            .await
            .expect("claim"),
        8
    );
    let more = vec![add("parent", "2", "n", "1")];
    let fenced = apply::apply_batch(&mut conn, &key, 8, &numbered(&more, 9), &tables).await;
    assert!(
        matches!(fenced, Err(ApplyError::Fenced { .. })),
        "{fenced:?}"
    );
    // An older epoch cannot claim it back.
    assert!(matches!(
        ledger::claim_ledger(&mut conn, &key).await,
        Err(ApplyError::Fenced { .. })
    ));
    apply::apply_batch(&mut other, &newer, 8, &numbered(&more, 9), &tables)
        .await
        .expect("the new owner applies");
    assert_eq!(
        pg.psql(DB, "SELECT n FROM parent WHERE id = 2")
            .expect("n")
            .trim(),
        "5"
    );
}

#[tokio::test]
async fn refused_records_become_dead_letters_and_the_rest_of_the_batch_applies() {
    let (pg, mut conn, tables) = start().await;
    let key = LedgerKey {
        journal_id: "j2".into(),
        epoch: 1,
    };
    ledger::claim_ledger(&mut conn, &key).await.expect("claim");
    let records = vec![
        insert("parent", &["id", "name"], &["1", "a"]),
        // Duplicate key: 23505.
        insert("parent", &["id", "name"], &["1", "again"]),
        insert("parent", &["id", "name"], &["2", "b"]),
        // Foreign key violation: 23503.
        insert("child", &["id", "parent_id", "qty"], &["10", "99", "1"]),
        insert("child", &["id", "parent_id", "qty"], &["11", "2", "1"]),
        // Check violation: 23514.
        add("child", "11", "qty", "-5"),
        // No such key: 02000.
        add("parent", "42", "n", "1"),
        add("parent", "2", "n", "7"),
    ];
    let applied = apply::apply_batch(&mut conn, &key, 0, &numbered(&records, 1), &tables)
        .await
        .expect("batch commits");
    let mut codes: Vec<(u64, String)> = applied
        .dead_letters
        .iter()
        .map(|d| (d.seq, d.sqlstate.clone()))
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        vec![
            (2, "23505".to_owned()),
            (4, "23503".to_owned()),
            (6, "23514".to_owned()),
            (7, "02000".to_owned())
        ]
    );
    assert_eq!(
        pg.psql(
            DB,
            "SELECT string_agg(id || ':' || name || ':' || n, ',' ORDER BY id) FROM parent"
        )
        .expect("parents")
        .trim(),
        "1:a:0,2:b:7"
    );
    assert_eq!(
        pg.psql(
            DB,
            "SELECT string_agg(id || ':' || qty, ',' ORDER BY id) FROM child"
        )
        .expect("children")
        .trim(),
        "11:1"
    );
    // Stored with the rest, with what an operator needs to act on them.
    assert_eq!(
        pg.psql(
            DB,
            "SELECT string_agg(seq || '|' || table_name || '|' || sqlstate || '|' || \
                    array_to_string(parameters, ';', 'NULL'), ',' ORDER BY seq) \
             FROM spillway.dead_letters WHERE journal_id = 'j2'"
        )
        .expect("dead letters")
        .trim(),
        "2|public.parent|23505|1;again,4|public.child|23503|10;99;1,\
         6|public.child|23514|11;-5,7|public.parent|02000|42;1"
    );
    assert_eq!(
        pg.psql(
            DB,
            "SELECT last_seq FROM spillway.flush_ledger WHERE journal_id = 'j2'"
        )
        .expect("ledger")
        .trim(),
        "8"
    );
}

#[tokio::test]
async fn deferred_tables_without_a_key_or_with_row_security_are_refused() {
    let pg = tokio::task::spawn_blocking(|| ThrowawayPostgres::builder().start())
        .await
        .expect("pg start task")
        .expect("throwaway PostgreSQL starts");
    pg.psql(
        DB,
        "CREATE TABLE nokey (id int, v text); \
         CREATE TABLE secured (id int PRIMARY KEY); \
         ALTER TABLE secured ENABLE ROW LEVEL SECURITY; \
         CREATE VIEW aview AS SELECT 1 AS id; \
         CREATE TABLE base (id int PRIMARY KEY); \
         CREATE TABLE derived (extra int) INHERITS (base);",
    )
    .expect("tables");
    let mut conn = PgConnection::connect(&pg.url(USER, DB))
        .await
        .expect("connect");
    for (table, expect) in [
        ("public.nokey", "needs a primary key"),
        ("public.secured", "row-level security"),
        ("public.aview", "not an ordinary table"),
        ("public.base", "inheritance children"),
        ("public.missing", "no such table"),
    ] {
        let configured: std::collections::BTreeMap<_, _> = [(
            table.parse().expect("name"),
            spillway_policies::TableConfig {
                policy: spillway_policies::Policy::WriteBehind,
                ..Default::default()
            },
        )]
        .into_iter()
        .collect();
        let err = spillway::write::tables::load(&mut conn, &configured)
            .await
            .expect_err(table)
            .to_string();
        assert!(
            err.contains(expect) && err.contains(table),
            "{table}: {err}"
        );
    }
}
