//! An upsert's RETURNING of columns its DO UPDATE leaves as stored (ADR 0038), as
//! Django's `bulk_create(update_conflicts=True)` sends it: `… ON CONFLICT (name) DO
//! UPDATE SET value = EXCLUDED.value RETURNING updated_at`. Answered from what
//! spillway knows of the row — PostgreSQL's value through a point read, or a pending
//! write's — and checked against the same statement run directly on a copy (database
//! `direct`); in a held transaction the values are checked again at COMMIT (40001 if
//! another session changed them).

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::context::{Context, USER, connect};
use crate::metrics::{sample, scrape};

const SCHEMA: &str = "CREATE TABLE public.ur (name varchar(64) PRIMARY KEY, \
        value bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now(), \
        n int DEFAULT 5); \
    INSERT INTO public.ur VALUES ('fixed', 1, '2024-03-30 23:15:00.25+00', 7);";

const UPSERT: &str = "INSERT INTO ur (name, value, updated_at) VALUES ('{k}', {v}, DEFAULT) \
    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value RETURNING ur.updated_at, n, name";

fn upsert(k: &str, v: i64) -> String {
    UPSERT.replace("{k}", k).replace("{v}", &v.to_string())
}

/// The rows of `sql` as text, or its SQLSTATE.
async fn rows(client: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    match client.simple_query(sql).await {
        Ok(msgs) => Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                _ => None,
            })
            .collect()),
        Err(e) => Err(e
            .code()
            .map_or_else(|| format!("{e:?}"), |c| c.code().to_owned())),
    }
}

/// spillway with `ur` under write-back (flushed only when asked), a client through it,
/// and a client of the direct copy (database `direct`).
async fn through_and_direct() -> (Context, Client, Client) {
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .before_proxy("CREATE DATABASE direct")
        .section("[flush]\ninterval = \"1h\"\n[tables.\"public.ur\"]\npolicy = \"write-back\"\n")
        .start()
        .await;
    ctx.pg
        .psql("direct", SCHEMA)
        .expect("schema of the direct copy");
    let proxy = ctx.proxy_client().await;
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user={USER} dbname=direct sslmode=disable",
        ctx.pg.port()
    ))
    .await;
    (ctx, proxy, direct)
}

#[tokio::test]
async fn stored_columns_are_returned_as_postgres_returns_them() {
    let (ctx, proxy, direct) = through_and_direct().await;
    for c in [&proxy, &direct] {
        c.batch_execute("SET TimeZone = 'UTC'").await.expect("zone");
    }
    // A key only PostgreSQL has (its value read), twice (the second over a pending
    // DO UPDATE that leaves the column as stored).
    for v in [2, 3] {
        let sql = upsert("fixed", v);
        let ours = rows(&proxy, &sql).await;
        assert_eq!(ours, rows(&direct, &sql).await, "{sql}");
        assert_eq!(
            ours,
            Ok(vec![vec![
                Some("2024-03-30 23:15:00.25+00".to_owned()),
                Some("7".to_owned()),
                Some("fixed".to_owned()),
            ]])
        );
    }
    // The extended protocol, binary results.
    let sql = "INSERT INTO ur (name, value) VALUES ($1, $2) ON CONFLICT (name) \
               DO UPDATE SET value = EXCLUDED.value RETURNING n";
    let n = |rows: Vec<tokio_postgres::Row>| {
        rows.iter().map(|r| r.get(0)).collect::<Vec<Option<i32>>>()
    };
    let ours = n(proxy
        .query(sql, &[&"fixed", &4i64])
        .await
        .expect("extended"));
    let theirs = n(direct
        .query(sql, &[&"fixed", &4i64])
        .await
        .expect("extended"));
    assert_eq!((ours, theirs), (vec![Some(7)], vec![Some(7)]));
    // A new key: inserted (the clock's value), then returned as stored from the
    // pending INSERT.
    let first = rows(&proxy, &upsert("fresh", 1)).await.expect("insert");
    let second = rows(&proxy, &upsert("fresh", 2)).await.expect("update");
    assert_eq!(first, second);
    assert_eq!(first[0][1].as_deref(), Some("5"));
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM ur").trim(),
        "1",
        "journaled, not run"
    );
    // In a held transaction (Django wraps bulk_create in one): answered, COMMIT
    // journals it.
    proxy.batch_execute("BEGIN").await.expect("begin");
    let held = rows(&proxy, &upsert("fixed", 5)).await;
    assert_eq!(held, rows(&direct, &upsert("fixed", 5)).await);
    proxy.batch_execute("COMMIT").await.expect("commit");
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(
        sample(
            &metrics,
            "spillway_fallbacks_total",
            "reason=\"returning_unknown\""
        ),
        0.0
    );
    assert_eq!(
        sample(
            &metrics,
            "spillway_held_transactions_total",
            "outcome=\"upstream\""
        ),
        0.0,
        "{metrics}"
    );
    // Another session changes the returned column before COMMIT: 40001, nothing
    // written (PostgreSQL would have made that UPDATE wait for the row lock).
    proxy.batch_execute("BEGIN").await.expect("begin");
    assert!(rows(&proxy, &upsert("fixed", 6)).await.is_ok());
    let other = ctx.proxy_client().await;
    other
        .batch_execute("UPDATE ur SET n = 8 WHERE name = 'fixed'")
        .await
        .expect("other session");
    assert_eq!(rows(&proxy, "COMMIT").await.err().as_deref(), Some("40001"));
    let _ = proxy.batch_execute("ROLLBACK").await;
    proxy.batch_execute("SPILLWAY FLUSH").await.expect("flush");
    assert_eq!(
        ctx.psql_direct(
            "SELECT value, n, updated_at = '2024-03-30 23:15:00.25+00' FROM ur WHERE name = 'fixed'"
        )
        .trim(),
        "5|8|t"
    );
    assert_eq!(
        ctx.pg
            .psql("direct", "SELECT value, n FROM ur WHERE name = 'fixed'")
            .expect("direct")
            .trim(),
        "5|7"
    );
}

/// A held transaction that answered stored values and then moves upstream (a read
/// that calls a function): its upsert is replayed only over the values given — the
/// same row goes on upstream; a row another session changed meanwhile makes the
/// replay update nothing, and the client gets 40001 with nothing written.
#[tokio::test]
async fn a_replay_checks_the_stored_values_it_gave() {
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .section("[flush]\ninterval = \"1h\"\n[tables.\"public.ur\"]\npolicy = \"write-back\"\n")
        .start()
        .await;
    let proxy = ctx.proxy_client().await;
    proxy
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("zone");
    proxy.batch_execute("BEGIN").await.expect("begin");
    let told = rows(&proxy, &upsert("fixed", 2)).await.expect("upsert");
    assert_eq!(told[0][1].as_deref(), Some("7"));
    // Upstream now: the replay's DO UPDATE finds the values given.
    let now = rows(
        &proxy,
        "SELECT value, n FROM ur WHERE name = 'fixed' AND now() > '2000-01-01'",
    )
    .await
    .expect("moved upstream");
    assert_eq!(now, vec![vec![Some("2".to_owned()), Some("7".to_owned())]]);
    proxy.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(
        ctx.psql_direct("SELECT value FROM ur WHERE name = 'fixed'")
            .trim(),
        "2"
    );

    proxy.batch_execute("BEGIN").await.expect("begin");
    let told = rows(&proxy, &upsert("fixed", 3)).await.expect("upsert");
    assert_eq!(told[0][1].as_deref(), Some("7"));
    let other = ctx.proxy_client().await;
    other
        .batch_execute("UPDATE ur SET n = 9 WHERE name = 'fixed'")
        .await
        .expect("other session");
    let moved = rows(
        &proxy,
        "SELECT value FROM ur WHERE name = 'fixed' AND now() > '2000-01-01'",
    )
    .await;
    assert_eq!(moved.err().as_deref(), Some("40001"));
    let _ = proxy.batch_execute("ROLLBACK").await;
    proxy.batch_execute("SPILLWAY FLUSH").await.expect("flush");
    assert_eq!(
        ctx.psql_direct("SELECT value, n FROM ur WHERE name = 'fixed'")
            .trim(),
        "2|9"
    );
}

/// A DO UPDATE that assigns the returned column from the row itself (`n = ur.n +
/// EXCLUDED.n`, a counter) does not leave it as stored: PostgreSQL returns the sum,
/// never the value before the update (review of ADR 0038: the sum was answered as the
/// old value). Answered as PostgreSQL answers it, in autocommit and in a held
/// transaction, over a stored row and over a pending write.
#[tokio::test]
async fn a_returned_column_the_update_adds_to_is_the_sum() {
    let (ctx, proxy, direct) = through_and_direct().await;
    let counter = "INSERT INTO ur (name, n) VALUES ('fixed', 2) ON CONFLICT (name) \
                   DO UPDATE SET n = ur.n + EXCLUDED.n RETURNING n, name";
    for step in ["autocommit", "again over the pending write"] {
        let ours = rows(&proxy, counter).await;
        assert_eq!(ours, rows(&direct, counter).await, "{step}");
    }
    proxy.batch_execute("BEGIN").await.expect("begin");
    let held = rows(&proxy, counter).await;
    direct.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(held, rows(&direct, counter).await, "held");
    proxy.batch_execute("COMMIT").await.expect("commit");
    direct.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(
        held,
        Ok(vec![vec![Some("13".to_owned()), Some("fixed".to_owned())]])
    );
    proxy.batch_execute("SPILLWAY FLUSH").await.expect("flush");
    assert_eq!(
        ctx.psql_direct("SELECT n FROM ur WHERE name = 'fixed'")
            .trim(),
        "13"
    );
}
