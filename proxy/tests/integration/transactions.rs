//! Held transactions (SPEC §6, issue 5): `BEGIN … COMMIT` made only of deferrable
//! statements is answered by spillway and journaled as one record; ROLLBACK costs no
//! upstream round trip; anything else moves the transaction upstream (replayed), and a
//! replay whose row counts differ from what the client was told is an error, never a
//! silent divergence.

use std::time::Duration;

use tokio_postgres::Client;

use crate::context::{Context, ContextBuilder};
use crate::metrics::{sample, scrape};
use crate::write_behind::{direct_rows, tag};

const TABLES: &str = "\
    CREATE TABLE public.tx_orders (id bigint PRIMARY KEY, customer bigint NOT NULL, \
        status text NOT NULL); \
    CREATE TABLE public.tx_items (order_id bigint NOT NULL REFERENCES public.tx_orders (id), \
        line int NOT NULL, qty int NOT NULL, PRIMARY KEY (order_id, line)); \
    CREATE TABLE public.tx_counters (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0); \
    CREATE TABLE public.tx_loose (id int PRIMARY KEY, v text); \
    INSERT INTO public.tx_counters SELECT g, 0 FROM generate_series(1, 20) g;";

/// Orders and items write-behind, counters write-back; nothing is flushed unless a
/// barrier or `SPILLWAY FLUSH` asks.
pub fn builder() -> ContextBuilder {
    Context::builder().before_proxy(TABLES).section(
        "[flush]\ninterval = \"1h\"\n\
         [tables.\"public.tx_orders\"]\npolicy = \"write-behind\"\n\
         [tables.\"public.tx_items\"]\npolicy = \"write-behind\"\n\
         [tables.\"public.tx_counters\"]\npolicy = \"write-back\"\n\
         [tables.\"public.tx_loose\"]\npolicy = \"write-behind\"\nrow_counts = \"assumed\"\n",
    )
}

async fn upstream_statements(ctx: &Context) -> f64 {
    sample(
        &scrape(ctx.proxy.metrics_addr()).await,
        "spillway_upstream_statements_total",
        "",
    )
}

async fn error_code(client: &Client, sql: &str) -> String {
    match client.simple_query(sql).await {
        Ok(m) => panic!("{sql}: expected an error, got {m:?}"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_owned())
            .unwrap_or_else(|| panic!("{sql}: {e:?}")),
    }
}

#[tokio::test]
async fn a_held_transaction_is_answered_locally_and_applied_whole_at_commit() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    // The first statements of a session may go upstream (catalog, settings); measure
    // from a settled session.
    tag(&proxy, "SPILLWAY FLUSH").await;
    let before = upstream_statements(&ctx).await;

    tag(&proxy, "BEGIN").await;
    assert_eq!(
        tag(
            &proxy,
            "INSERT INTO tx_orders (id, customer, status) VALUES (1, 7, 'new')"
        )
        .await,
        1
    );
    assert_eq!(
        tag(
            &proxy,
            "INSERT INTO tx_items (order_id, line, qty) VALUES (1, 1, 2), (1, 2, 5)"
        )
        .await,
        2
    );
    assert_eq!(
        tag(&proxy, "UPDATE tx_counters SET n = n + 3 WHERE id = 1").await,
        1
    );
    // A key that does not exist: exact row counts, also inside the transaction.
    assert_eq!(
        tag(&proxy, "UPDATE tx_counters SET n = n + 1 WHERE id = 999").await,
        0
    );
    // The transaction's own earlier INSERT makes its UPDATE count.
    assert_eq!(
        tag(&proxy, "UPDATE tx_orders SET status = 'paid' WHERE id = 1").await,
        1
    );
    tag(&proxy, "COMMIT").await;
    assert_eq!(
        upstream_statements(&ctx).await,
        before,
        "the whole transaction was answered by spillway"
    );
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM tx_orders"), "0");

    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT id, customer, status FROM tx_orders"),
        "1|7|paid"
    );
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(line || ':' || qty, ',' ORDER BY line) FROM tx_items"
        ),
        "1:2,2:5"
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT n FROM tx_counters WHERE id = 1"),
        "3"
    );
}

#[tokio::test]
async fn rollback_of_a_held_transaction_writes_nothing_without_a_round_trip() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    let before = upstream_statements(&ctx).await;
    tag(&proxy, "BEGIN").await;
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (2, 1, 'x')",
    )
    .await;
    tag(&proxy, "UPDATE tx_counters SET n = n + 1 WHERE id = 2").await;
    tag(&proxy, "ROLLBACK").await;
    assert_eq!(upstream_statements(&ctx).await, before);
    // The session is idle again: a plain autocommit write is deferred as ever.
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (3, 1, 'kept')",
    )
    .await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(direct_rows(&ctx, "SELECT id FROM tx_orders"), "3");
    assert_eq!(
        direct_rows(&ctx, "SELECT n FROM tx_counters WHERE id = 2"),
        "0"
    );
    // tokio-postgres's own transaction API, dropped without commit (ROLLBACK).
    let mut proxy = proxy;
    {
        let tx = proxy.transaction().await.expect("begin");
        tx.execute(
            "INSERT INTO tx_orders (id, customer, status) VALUES ($1, $2, $3)",
            &[&4i64, &1i64, &"dropped"],
        )
        .await
        .expect("insert");
    }
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(direct_rows(&ctx, "SELECT id FROM tx_orders"), "3");
}

#[tokio::test]
async fn prepared_transactions_of_an_orm_are_held_too() {
    let ctx = builder().start().await;
    let mut proxy = ctx.proxy_client().await;
    let order = proxy
        .prepare("INSERT INTO tx_orders (id, customer, status) VALUES ($1, $2, $3)")
        .await
        .expect("prepare");
    let item = proxy
        .prepare("INSERT INTO tx_items (order_id, line, qty) VALUES ($1, $2, $3)")
        .await
        .expect("prepare");
    let begin = proxy.prepare("BEGIN").await.expect("prepare");
    let commit = proxy.prepare("COMMIT").await.expect("prepare");
    tag(&proxy, "SPILLWAY FLUSH").await;
    let before = upstream_statements(&ctx).await;
    for id in 10..20i64 {
        proxy.execute(&begin, &[]).await.expect("begin");
        proxy
            .execute(&order, &[&id, &1i64, &"new"])
            .await
            .expect("order");
        proxy
            .execute(&item, &[&id, &1i32, &3i32])
            .await
            .expect("item");
        proxy.execute(&commit, &[]).await.expect("commit");
    }
    assert_eq!(upstream_statements(&ctx).await, before);
    // The transaction API (simple BEGIN/COMMIT, prepared INSERTs).
    let tx = proxy.transaction().await.expect("begin");
    tx.execute(&order, &[&20i64, &2i64, &"api"])
        .await
        .expect("order");
    tx.commit().await.expect("commit");
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*), min(id), max(id) FROM tx_orders"),
        "11|10|20"
    );
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM tx_items"), "10");
}

#[tokio::test]
async fn a_statement_that_cannot_be_held_moves_the_transaction_upstream() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    tag(&proxy, "BEGIN").await;
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (30, 1, 'a')",
    )
    .await;
    tag(&proxy, "UPDATE tx_counters SET n = n + 5 WHERE id = 3").await;
    // A read: the transaction is replayed upstream and the read sees its writes.
    let rows = proxy
        .simple_query("SELECT status FROM tx_orders WHERE id = 30")
        .await
        .expect("select");
    assert!(
        rows.iter().any(|m| matches!(m,
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("a"))),
        "{rows:?}"
    );
    // Not committed yet, so not visible directly.
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM tx_orders WHERE id = 30"),
        "0"
    );
    // The rest runs upstream in the transaction, and COMMIT commits it there.
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (31, 1, 'b')",
    )
    .await;
    tag(&proxy, "COMMIT").await;
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM tx_orders"
        ),
        "30,31"
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT n FROM tx_counters WHERE id = 3"),
        "5"
    );

    // Savepoints force the upstream path and then work as in PostgreSQL.
    tag(&proxy, "BEGIN").await;
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (32, 1, 'c')",
    )
    .await;
    tag(&proxy, "SAVEPOINT s").await;
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (33, 1, 'd')",
    )
    .await;
    tag(&proxy, "ROLLBACK TO SAVEPOINT s").await;
    tag(&proxy, "COMMIT").await;
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM tx_orders"
        ),
        "30,31,32"
    );
}

#[tokio::test]
async fn a_replay_that_differs_from_what_was_acknowledged_is_an_error() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;
    tag(&proxy, "BEGIN").await;
    // Exact row counts: key 4 exists, so the client is told UPDATE 1.
    assert_eq!(
        tag(&proxy, "UPDATE tx_counters SET n = n + 1 WHERE id = 4").await,
        1
    );
    // Meanwhile another application deletes the row directly.
    direct
        .simple_query("DELETE FROM tx_counters WHERE id = 4")
        .await
        .expect("delete");
    // A read of the row it wrote moves the transaction upstream (a point read of
    // another key would be answered outside it, ADR 0038): the replayed UPDATE finds
    // no row.
    assert_eq!(
        error_code(&proxy, "SELECT n FROM tx_counters WHERE id = 4").await,
        "40001"
    );
    // The transaction failed, as in PostgreSQL after an error.
    assert_eq!(
        error_code(&proxy, "UPDATE tx_counters SET n = n + 1 WHERE id = 5").await,
        "25P02"
    );
    let msgs = proxy.simple_query("COMMIT").await.expect("commit");
    assert!(
        msgs.iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(_))),
        "{msgs:?}"
    );
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*), sum(n) FROM tx_counters"),
        "19|0"
    );
    // The session works normally afterwards.
    assert_eq!(
        tag(&proxy, "UPDATE tx_counters SET n = n + 1 WHERE id = 5").await,
        1
    );
}

#[tokio::test]
async fn a_commit_whose_answers_no_longer_hold_is_refused_whole() {
    let ctx = builder().start().await;
    let a = ctx.proxy_client().await;
    let b = ctx.proxy_client().await;
    tag(&a, "BEGIN").await;
    tag(
        &a,
        "INSERT INTO tx_orders (id, customer, status) VALUES (40, 1, 'a')",
    )
    .await;
    tag(
        &a,
        "INSERT INTO tx_orders (id, customer, status) VALUES (41, 1, 'a')",
    )
    .await;
    // Another session inserts key 41 first (deferred, acknowledged).
    tag(
        &b,
        "INSERT INTO tx_orders (id, customer, status) VALUES (41, 2, 'b')",
    )
    .await;
    assert_eq!(error_code(&a, "COMMIT").await, "40001");
    // The transaction is over; nothing of it was written.
    tag(&a, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id || ':' || status, ',' ORDER BY id) FROM tx_orders"
        ),
        "41:b"
    );
}

#[tokio::test]
async fn a_failed_statement_fails_the_held_transaction_until_rollback() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    tag(&proxy, "BEGIN").await;
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (50, 1, 'a')",
    )
    .await;
    // The key exists in the transaction already: 23505, as PostgreSQL would say.
    assert_eq!(
        error_code(
            &proxy,
            "INSERT INTO tx_orders (id, customer, status) VALUES (50, 1, 'b')"
        )
        .await,
        "23505"
    );
    assert_eq!(error_code(&proxy, "SELECT 1").await, "25P02");
    tag(&proxy, "ROLLBACK").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM tx_orders"), "0");
}

async fn held_outcome(ctx: &Context, outcome: &str) -> f64 {
    sample(
        &scrape(ctx.proxy.metrics_addr()).await,
        "spillway_held_transactions_total",
        &format!("outcome=\"{outcome}\""),
    )
}

#[tokio::test]
async fn sqlx_writes_and_transactions_are_deferred_and_held() {
    use sqlx::Connection;
    let ctx = builder().start().await;
    let mut conn = sqlx::PgConnection::connect(&ctx.proxy_url())
        .await
        .expect("connect");
    // sqlx closes the unnamed portal after each Execute (Bind, Execute, Close, Sync):
    // still one deferrable statement.
    let insert = "INSERT INTO tx_orders (id, customer, status) VALUES ($1, $2, $3)";
    sqlx::query(insert)
        .bind(59i64)
        .bind(1i64)
        .bind("autocommit")
        .execute(&mut conn)
        .await
        .expect("insert");
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM tx_orders"), "0");
    let before = upstream_statements(&ctx).await;
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query(insert)
        .bind(60i64)
        .bind(1i64)
        .bind("sqlx")
        .execute(&mut *tx)
        .await
        .expect("insert");
    let done = sqlx::query("UPDATE tx_counters SET n = n + $1 WHERE id = $2")
        .bind(4i64)
        .bind(6i32)
        .execute(&mut *tx)
        .await
        .expect("update");
    assert_eq!(done.rows_affected(), 1);
    tx.commit().await.expect("commit");
    assert_eq!(held_outcome(&ctx, "committed").await, 1.0);
    assert_eq!(upstream_statements(&ctx).await, before);
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM tx_orders"), "0");
    let proxy = ctx.proxy_client().await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id || ':' || status, ',' ORDER BY id) FROM tx_orders"
        ),
        "59:autocommit,60:sqlx"
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT n FROM tx_counters WHERE id = 6"),
        "4"
    );
}

#[tokio::test]
async fn returning_of_supplied_values_is_answered_inside_a_held_transaction() {
    let ctx = builder().start().await;
    let mut proxy = ctx.proxy_client().await;
    let tx = proxy.transaction().await.expect("begin");
    let row = tx
        .query_one(
            "INSERT INTO tx_orders (id, customer, status) VALUES ($1, $2, $3) RETURNING id, status",
            &[&70i64, &3i64, &"ret"],
        )
        .await
        .expect("insert returning");
    assert_eq!(row.get::<_, i64>(0), 70);
    assert_eq!(row.get::<_, String>(1), "ret");
    let rows = tx
        .query(
            "UPDATE tx_orders SET status = $2 WHERE id = $1 RETURNING id, status",
            &[&70i64, &"changed"],
        )
        .await
        .expect("update returning");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(1), "changed");
    // A key that does not exist: no row, as PostgreSQL would return.
    let none = tx
        .query(
            "UPDATE tx_orders SET status = $2 WHERE id = $1 RETURNING id",
            &[&71i64, &"x"],
        )
        .await
        .expect("update returning");
    assert!(none.is_empty());
    tx.commit().await.expect("commit");
    assert_eq!(held_outcome(&ctx, "committed").await, 1.0);
    assert_eq!(held_outcome(&ctx, "upstream").await, 0.0);
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT id, status FROM tx_orders"),
        "70|changed"
    );
}

#[tokio::test]
async fn a_transaction_refused_in_part_at_apply_time_is_dead_lettered_whole() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    // Assumed row counts: the UPDATE of a key that does not exist is acknowledged,
    // and found missing only when applied.
    tag(&proxy, "BEGIN").await;
    tag(&proxy, "INSERT INTO tx_loose (id, v) VALUES (1, 'a')").await;
    assert_eq!(
        tag(&proxy, "UPDATE tx_loose SET v = 'b' WHERE id = 2").await,
        1
    );
    tag(&proxy, "INSERT INTO tx_loose (id, v) VALUES (3, 'c')").await;
    tag(&proxy, "COMMIT").await;
    // An autocommit write after it is applied as ever.
    tag(&proxy, "INSERT INTO tx_loose (id, v) VALUES (4, 'd')").await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM tx_loose"
        ),
        "4",
        "none of the refused transaction was applied"
    );
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(sqlstate || ' ' || statement, '; ' ORDER BY id) \
             FROM spillway.dead_letters"
        ),
        "02000 INSERT INTO public.tx_loose (id, v); \
         02000 UPDATE public.tx_loose SET v = ? WHERE <key> = ?; \
         02000 INSERT INTO public.tx_loose (id, v)"
    );
}

#[tokio::test]
async fn interleaved_transactions_are_applied_table_by_table_without_changing_the_outcome() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    for id in 100..150 {
        tag(&proxy, "BEGIN").await;
        tag(
            &proxy,
            &format!("INSERT INTO tx_orders (id, customer, status) VALUES ({id}, 1, 'o')"),
        )
        .await;
        tag(
            &proxy,
            &format!("INSERT INTO tx_items (order_id, line, qty) VALUES ({id}, 1, 1)"),
        )
        .await;
        tag(&proxy, "COMMIT").await;
    }
    let before = upstream_statements(&ctx).await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    let flushed = upstream_statements(&ctx).await - before;
    // One set-based INSERT per table (plus the FLUSH itself), not one per row.
    assert!(flushed <= 4.0, "{flushed} upstream statements for 100 rows");
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT count(*) FROM tx_orders o JOIN tx_items i ON i.order_id = o.id"
        ),
        "50"
    );
    // A line whose order is journaled after it: refused in journal order (23503),
    // so the batch is not reordered and the line is a dead letter.
    tag(
        &proxy,
        "INSERT INTO tx_items (order_id, line, qty) VALUES (200, 1, 1)",
    )
    .await;
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (200, 1, 'late')",
    )
    .await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM tx_items WHERE order_id = 200"),
        "0"
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT sqlstate FROM spillway.dead_letters"),
        "23503"
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT status FROM tx_orders WHERE id = 200"),
        "late"
    );
}

#[tokio::test]
async fn a_write_through_write_of_another_session_makes_commit_read_again() {
    let ctx = builder().start().await;
    let a = ctx.proxy_client().await;
    let b = ctx.proxy_client().await;
    tag(&a, "BEGIN").await;
    // Key 5 exists (a point read): UPDATE 1.
    assert_eq!(
        tag(&a, "UPDATE tx_counters SET n = n + 1 WHERE id = 5").await,
        1
    );
    // Another session deletes it through spillway, write-through (a predicate beyond
    // the key): the key overlay never sees it.
    assert_eq!(
        tag(&b, "DELETE FROM tx_counters WHERE id = 5 AND n >= 0").await,
        1
    );
    // COMMIT reads key 5 again: the answer the client got no longer holds.
    assert_eq!(error_code(&a, "COMMIT").await, "40001");
    tag(&a, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM spillway.dead_letters"),
        "0"
    );
    // Without such a write, COMMIT trusts the transaction's reads (no read again).
    tag(&a, "BEGIN").await;
    tag(&a, "UPDATE tx_counters SET n = n + 1 WHERE id = 6").await;
    tag(&a, "COMMIT").await;
    tag(&a, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT n FROM tx_counters WHERE id = 6"),
        "1"
    );
}
