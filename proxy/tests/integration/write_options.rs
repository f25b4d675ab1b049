//! Per-table write-behind options through the real binary (SPEC §6): `row_counts =
//! "assumed"`, back-pressure (`max_pending` with `when_full = reject | block |
//! write-through`), consistency `session` and `bounded`, a constraint violation found
//! at flush time landing in `spillway.dead_letters` with the rest applied, and SIGTERM
//! draining pending writes before exit.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::context::{Context, ContextBuilder};
use crate::write_behind::{direct_rows as direct, tag as rows_of};

const TABLES: &str = "CREATE TABLE public.wb (id int PRIMARY KEY, v text, n bigint NOT NULL DEFAULT 0); \
                      CREATE TABLE public.wb_child (id int PRIMARY KEY, \
                          parent int NOT NULL REFERENCES public.wb (id));";

fn builder(table_options: &str) -> ContextBuilder {
    Context::builder().before_proxy(TABLES).section(&format!(
        "[flush]\ninterval = \"1h\"\n\
         [tables.\"public.wb\"]\npolicy = \"write-behind\"\n{table_options}\n\
         [tables.\"public.wb_child\"]\npolicy = \"write-behind\"\n"
    ))
}

#[tokio::test]
async fn assumed_row_counts_report_one_row_per_key_and_mismatches_become_dead_letters() {
    let ctx = builder("row_counts = \"assumed\"").start().await;
    let proxy = ctx.proxy_client().await;
    assert_eq!(
        rows_of(&proxy, "INSERT INTO wb (id, v) VALUES (1, 'a')").await,
        1
    );
    // No point read: a missing key still reports one row...
    assert_eq!(
        rows_of(&proxy, "UPDATE wb SET v = 'z' WHERE id = 999").await,
        1
    );
    assert_eq!(rows_of(&proxy, "DELETE FROM wb WHERE id = 998").await, 1);
    rows_of(&proxy, "SPILLWAY FLUSH").await;
    // ...and the mismatch is found at apply time, never silently.
    assert_eq!(
        direct(
            &ctx,
            "SELECT string_agg(sqlstate || ':' || parameters[1], ',' ORDER BY seq) \
             FROM spillway.dead_letters"
        ),
        "02000:999,02000:998"
    );
    assert_eq!(direct(&ctx, "SELECT count(*) FROM wb"), "1");
}

#[tokio::test]
async fn a_constraint_violation_found_at_flush_is_a_dead_letter_and_the_rest_applies() {
    let ctx = builder("").start().await;
    let proxy = ctx.proxy_client().await;
    rows_of(&proxy, "INSERT INTO wb (id, v) VALUES (1, 'a')").await;
    // Acknowledged (spillway does not check foreign keys), refused upstream.
    rows_of(&proxy, "INSERT INTO wb_child (id, parent) VALUES (10, 42)").await;
    rows_of(&proxy, "INSERT INTO wb_child (id, parent) VALUES (11, 1)").await;
    rows_of(&proxy, "UPDATE wb SET n = n + 2 WHERE id = 1").await;
    rows_of(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct(
            &ctx,
            "SELECT table_name || '|' || sqlstate || '|' || array_to_string(parameters, ';') \
             FROM spillway.dead_letters"
        ),
        "public.wb_child|23503|10;42"
    );
    assert_eq!(
        direct(&ctx, "SELECT string_agg(id::text, ',') FROM wb_child"),
        "11"
    );
    assert_eq!(direct(&ctx, "SELECT n FROM wb WHERE id = 1"), "2");
    assert!(
        ctx.proxy.logs().contains("stored in spillway.dead_letters"),
        "a log line for the dead letter"
    );
}

#[tokio::test]
async fn when_full_reject_refuses_with_53000_and_block_waits_for_room() {
    let ctx = builder("max_pending = 3\nwhen_full = \"reject\"")
        .start()
        .await;
    let proxy = ctx.proxy_client().await;
    for i in 1..=3 {
        rows_of(&proxy, &format!("INSERT INTO wb (id) VALUES ({i})")).await;
    }
    let err = proxy
        .simple_query("INSERT INTO wb (id) VALUES (4)")
        .await
        .expect_err("full");
    assert_eq!(err.code().map(|c| c.code()), Some("53000"), "{err:?}");
    assert_eq!(
        direct(&ctx, "SELECT count(*) FROM wb"),
        "0",
        "nothing flushed yet"
    );
    rows_of(&proxy, "SPILLWAY FLUSH").await;
    rows_of(&proxy, "INSERT INTO wb (id) VALUES (4)").await;
    drop(ctx);

    // block: the write waits while the flusher makes room, then is acknowledged.
    let ctx = builder("max_pending = 3\nwhen_full = \"block\"\nblock_timeout = \"10s\"")
        .start()
        .await;
    let proxy = ctx.proxy_client().await;
    for i in 1..=3 {
        rows_of(&proxy, &format!("INSERT INTO wb (id) VALUES ({i})")).await;
    }
    assert_eq!(direct(&ctx, "SELECT count(*) FROM wb"), "0");
    rows_of(&proxy, "INSERT INTO wb (id) VALUES (4)").await;
    // Room was made by applying the pending writes.
    assert_eq!(direct(&ctx, "SELECT count(*) >= 3 FROM wb"), "t");
}

#[tokio::test]
async fn when_full_write_through_applies_the_write_upstream_after_a_barrier() {
    let ctx = builder("max_pending = 2\nwhen_full = \"write-through\"")
        .start()
        .await;
    let proxy = ctx.proxy_client().await;
    rows_of(&proxy, "INSERT INTO wb (id) VALUES (1)").await;
    rows_of(&proxy, "INSERT INTO wb (id) VALUES (2)").await;
    assert_eq!(direct(&ctx, "SELECT count(*) FROM wb"), "0");
    // Full: this one runs write-through, after the pending ones (order kept).
    rows_of(&proxy, "INSERT INTO wb (id) VALUES (3)").await;
    assert_eq!(
        direct(&ctx, "SELECT string_agg(id::text, ',' ORDER BY id) FROM wb"),
        "1,2,3"
    );
}

/// `SELECT count(*) FROM wb` in the simple protocol (whose cache hits skip routing).
async fn count(client: &Client) -> i64 {
    let msgs = client
        .simple_query("SELECT count(*) FROM wb")
        .await
        .expect("count");
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test]
async fn session_consistency_waits_only_for_the_sessions_own_writes() {
    let ctx = builder("consistency = \"session\"").start().await;
    let writer = ctx.proxy_client().await;
    let reader = ctx.proxy_client().await;
    rows_of(&writer, "INSERT INTO wb (id, v) VALUES (1, 'mine')").await;
    // Another session does not wait: it reads PostgreSQL, which has not got it yet
    // (and caches that answer).
    assert_eq!(count(&reader).await, 0);
    assert_eq!(count(&reader).await, 0);
    assert_eq!(direct(&ctx, "SELECT count(*) FROM wb"), "0");
    // The writing session reads its own write (a barrier for its pending writes),
    // also with the very text the other session just cached without it.
    assert_eq!(
        count(&writer).await,
        1,
        "read-your-writes through a cached entry"
    );
    let own = writer
        .query("SELECT v FROM wb WHERE id = 1", &[])
        .await
        .expect("read own");
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].get::<_, String>(0), "mine");
}

#[tokio::test]
async fn bounded_consistency_applies_pending_writes_within_max_staleness() {
    let ctx = builder("consistency = \"bounded\"\nmax_staleness = \"300ms\"")
        .start()
        .await;
    let proxy = ctx.proxy_client().await;
    rows_of(&proxy, "INSERT INTO wb (id) VALUES (1)").await;
    let acked = Instant::now();
    // No barrier for reads; the flusher brings it upstream within max_staleness even
    // though flush.interval is an hour.
    loop {
        if direct(&ctx, "SELECT count(*) FROM wb") == "1" {
            break;
        }
        assert!(
            acked.elapsed() < Duration::from_secs(5),
            "not applied within max_staleness (plus slack for a loaded machine)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_pending_writes_before_exit() {
    let mut ctx = builder("").start().await;
    {
        let proxy = ctx.proxy_client().await;
        for i in 1..=20 {
            rows_of(&proxy, &format!("INSERT INTO wb (id) VALUES ({i})")).await;
        }
    }
    assert_eq!(direct(&ctx, "SELECT count(*) FROM wb"), "0");
    ctx.proxy.signal("TERM");
    let status = ctx
        .proxy
        .wait_exit(Duration::from_secs(20))
        .expect("spillway exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(direct(&ctx, "SELECT count(*) FROM wb"), "20");
}

#[tokio::test]
async fn values_postgresql_would_refuse_get_postgresqls_error_not_an_ack() {
    let ctx = Context::builder()
        .before_proxy(
            "CREATE TABLE public.typed (id int PRIMARY KEY, small int2, code varchar(3), \
                                        flag bool, must text NOT NULL, n numeric)",
        )
        .section(
            "[flush]\ninterval = \"1h\"\n[tables.\"public.typed\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await;
    let proxy = ctx.proxy_client().await;
    for (sql, code) in [
        (
            "INSERT INTO typed (id, must, small) VALUES (1, 'm', 70000)",
            "22003",
        ),
        (
            "INSERT INTO typed (id, must, code) VALUES (1, 'm', 'abcd')",
            "22001",
        ),
        (
            "INSERT INTO typed (id, must, flag) VALUES (1, 'm', 'maybe')",
            "22P02",
        ),
        (
            "INSERT INTO typed (id, must, n) VALUES (1, 'm', '1,5')",
            "22P02",
        ),
        ("INSERT INTO typed (id) VALUES (1)", "23502"),
        ("INSERT INTO typed (id, must) VALUES (1, NULL)", "23502"),
    ] {
        let err = proxy.simple_query(sql).await.expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some(code), "{sql}: {err:?}");
    }
    // Valid ones are deferred as usual.
    rows_of(
        &proxy,
        "INSERT INTO typed (id, must, small, code, flag, n) VALUES (1, 'm', 7, 'abc', 'yes', '1e3')",
    )
    .await;
    assert_eq!(direct(&ctx, "SELECT count(*) FROM typed"), "0");
    rows_of(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct(
            &ctx,
            "SELECT small || ' ' || code || ' ' || flag || ' ' || n FROM typed"
        ),
        "7 abc true 1000"
    );
    assert_eq!(
        direct(&ctx, "SELECT count(*) FROM spillway.dead_letters"),
        "0"
    );
}

/// Review findings: an explicit cast or a date/time value is not deferred (PostgreSQL
/// answers as it would directly), and a deferred table whose name needs quoting has
/// its privileges checked by OID.
#[tokio::test]
async fn casts_datetimes_and_quoted_table_names() {
    let ctx = Context::builder()
        .before_proxy(
            "CREATE TABLE public.\"Events\" (id int PRIMARY KEY, code varchar(3), at timestamptz)",
        )
        .section(
            "[flush]\ninterval = \"1h\"\n[tables.\"public.Events\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await;
    let proxy = ctx.proxy_client().await;
    // Deferred (nothing upstream yet) although the name needs quoting.
    rows_of(
        &proxy,
        "INSERT INTO \"Events\" (id, code) VALUES (1, 'abc')",
    )
    .await;
    assert_eq!(direct(&ctx, "SELECT count(*) FROM \"Events\""), "0");
    // An explicit cast truncates where assignment refuses: PostgreSQL's answer, at once.
    let err = proxy
        .simple_query("INSERT INTO \"Events\" (id, code) VALUES (2, 'abcdef'::text)")
        .await
        .expect_err("too long for varchar(3)");
    assert_eq!(err.code().map(|c| c.code()), Some("22001"), "{err:?}");
    // A timestamp's text depends on the session's TimeZone: written through, so it is
    // in PostgreSQL as soon as it is acknowledged (after a barrier for row 1).
    proxy
        .batch_execute("SET TimeZone = 'America/New_York'")
        .await
        .expect("set");
    rows_of(
        &proxy,
        "INSERT INTO \"Events\" (id, at) VALUES (3, '2024-01-01 12:00')",
    )
    .await;
    assert_eq!(
        direct(
            &ctx,
            "SELECT count(*) || ' ' || (SELECT at AT TIME ZONE 'UTC' FROM \"Events\" WHERE id = 3) \
             FROM \"Events\""
        ),
        "2 2024-01-01 17:00:00"
    );
}
