//! Write-behind through the real binary (SPEC §6): deferrable statements are
//! acknowledged from the journal with PostgreSQL's command tags and applied later,
//! exactly once; reads of a table with pending writes wait for them (strong
//! consistency); `SPILLWAY FLUSH`; fallbacks run write-through; row counts and 23505
//! come from key knowledge; journaled writes survive SIGKILL and are replayed at start.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::context::{Context, ContextBuilder};

const TABLES: &str = "CREATE TABLE public.wb (id int PRIMARY KEY, v text, n bigint NOT NULL DEFAULT 0); \
                      CREATE TABLE public.wb_child (id int PRIMARY KEY, \
                          parent int NOT NULL REFERENCES public.wb (id), q int NOT NULL);";

/// Write-behind on both tables; a long flush interval so that pending writes stay
/// pending long enough to observe (barriers and FLUSH still apply them at once).
fn builder(interval: &str) -> ContextBuilder {
    Context::builder().before_proxy(TABLES).section(&format!(
        "[flush]\ninterval = \"{interval}\"\n\
         [tables.\"public.wb\"]\npolicy = \"write-behind\"\n\
         [tables.\"public.wb_child\"]\npolicy = \"write-behind\"\n"
    ))
}

/// Runs `sql` in the simple protocol; the row count of its command tag.
pub async fn tag(client: &Client, sql: &str) -> u64 {
    let msgs = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no CommandComplete in {msgs:?}"))
}

pub fn direct_rows(ctx: &Context, sql: &str) -> String {
    ctx.psql_direct(sql).trim().to_owned()
}

#[tokio::test]
async fn writes_are_acknowledged_then_applied_once_and_reads_see_them() {
    let ctx = builder("1h").start().await;
    let proxy = ctx.proxy_client().await;

    // Acknowledged by spillway: PostgreSQL does not have them yet (no flush for 1 h).
    assert_eq!(
        tag(&proxy, "INSERT INTO wb (id, v) VALUES (1, 'a')").await,
        1
    );
    let inserted = proxy
        .execute(
            "INSERT INTO wb (id, v) VALUES ($1, $2), ($3, $4)",
            &[&2i32, &"b", &3i32, &"c"],
        )
        .await
        .expect("extended insert");
    assert_eq!(inserted, 2);
    assert_eq!(
        proxy
            .execute("UPDATE wb SET n = n + $1 WHERE id = $2", &[&5i64, &1i32])
            .await
            .expect("update"),
        1
    );
    assert_eq!(
        proxy
            .execute("DELETE FROM wb WHERE id = $1", &[&3i32])
            .await
            .expect("delete"),
        1
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM wb"),
        "0",
        "not applied yet"
    );

    // A read through spillway waits for them (strong consistency).
    let rows = proxy
        .query("SELECT id, v, n FROM wb ORDER BY id", &[])
        .await
        .expect("read");
    let seen: Vec<(i32, String, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(seen, vec![(1, "a".into(), 5), (2, "b".into(), 0)]);
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id || ':' || n, ',' ORDER BY id) FROM wb"
        ),
        "1:5,2:0"
    );

    // Exactly once: the ledger is at the last record, nothing applied twice.
    assert_eq!(
        direct_rows(&ctx, "SELECT last_seq FROM spillway.flush_ledger"),
        "4"
    );

    // SPILLWAY FLUSH returns once everything acknowledged before it is applied.
    for i in 10..20 {
        tag(&proxy, &format!("INSERT INTO wb (id, v) VALUES ({i}, 'x')")).await;
    }
    let other = ctx.proxy_client().await;
    assert_eq!(tag(&other, "SPILLWAY FLUSH").await, 0);
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM wb"), "12");
}

#[tokio::test]
async fn exact_row_counts_and_duplicate_keys_come_from_key_knowledge() {
    let ctx = builder("1h").start().await;
    ctx.psql_direct("INSERT INTO wb (id, v) VALUES (100, 'existing')");
    let proxy = ctx.proxy_client().await;

    // A key PostgreSQL has: 23505 at once, like PostgreSQL.
    let err = proxy
        .execute("INSERT INTO wb (id, v) VALUES ($1, 'dup')", &[&100i32])
        .await
        .expect_err("duplicate key");
    assert_eq!(err.code().map(|c| c.code()), Some("23505"), "{err:?}");
    // A key only pending in the journal: also 23505.
    tag(&proxy, "INSERT INTO wb (id, v) VALUES (7, 'new')").await;
    let err = proxy
        .simple_query("INSERT INTO wb (id, v) VALUES (7, 'again')")
        .await
        .expect_err("duplicate pending key");
    assert_eq!(err.code().map(|c| c.code()), Some("23505"), "{err:?}");
    // Counts: a missing key updates and deletes nothing, and is not journaled.
    assert_eq!(tag(&proxy, "UPDATE wb SET v = 'z' WHERE id = 999").await, 0);
    assert_eq!(tag(&proxy, "DELETE FROM wb WHERE id = 999").await, 0);
    assert_eq!(tag(&proxy, "UPDATE wb SET v = 'y' WHERE id = 7").await, 1);
    assert_eq!(tag(&proxy, "DELETE FROM wb WHERE id = 7").await, 1);
    assert_eq!(tag(&proxy, "DELETE FROM wb WHERE id = 7").await, 0);
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM wb"
        ),
        "100:existing"
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM spillway.dead_letters"),
        "0"
    );
}

#[tokio::test]
async fn non_deferrable_statements_run_write_through_after_a_barrier() {
    let ctx = builder("1h").start().await;
    let proxy = ctx.proxy_client().await;
    tag(&proxy, "INSERT INTO wb (id, v) VALUES (1, 'a')").await;
    // Not deferrable (predicate beyond the key): barrier, then PostgreSQL runs it and
    // sees the pending insert.
    assert_eq!(tag(&proxy, "UPDATE wb SET n = 9 WHERE v = 'a'").await, 1);
    // RETURNING of unknown values: write-through with PostgreSQL's answer.
    let row = proxy
        .query_one("INSERT INTO wb (id, v) VALUES (2, 'b') RETURNING n", &[])
        .await
        .expect("returning");
    assert_eq!(row.get::<_, i64>(0), 0);
    // Parent then child, in order, through the journal (the foreign key needs it).
    tag(&proxy, "INSERT INTO wb (id, v) VALUES (3, 'p')").await;
    tag(
        &proxy,
        "INSERT INTO wb_child (id, parent, q) VALUES (30, 3, 1)",
    )
    .await;
    // In a transaction block: write-through (deferred transactions are not built).
    proxy.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(
        tag(&proxy, "INSERT INTO wb (id, v) VALUES (4, 'tx')").await,
        1
    );
    proxy.batch_execute("ROLLBACK").await.expect("rollback");
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id || ':' || n, ',' ORDER BY id) FROM wb"
        ),
        "1:9,2:0,3:0"
    );
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM wb_child"), "1");
}

#[tokio::test]
async fn journaled_writes_survive_sigkill_and_are_replayed_once() {
    let mut ctx = builder("1h").start().await;
    {
        let proxy = ctx.proxy_client().await;
        for i in 1..=50 {
            tag(&proxy, &format!("INSERT INTO wb (id, v) VALUES ({i}, 'k')")).await;
        }
        tag(&proxy, "UPDATE wb SET n = n + 1 WHERE id = 1").await;
    }
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM wb"), "0");
    ctx.proxy.signal("KILL");
    ctx.restart_proxy();
    // Replayed before the restarted spillway serves anything.
    assert_eq!(direct_rows(&ctx, "SELECT count(*), sum(n) FROM wb"), "50|1");
    // Killed and started again: nothing applied twice.
    ctx.restart_proxy();
    let proxy = ctx.proxy_client().await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(direct_rows(&ctx, "SELECT count(*), sum(n) FROM wb"), "50|1");
    assert_eq!(tag(&proxy, "UPDATE wb SET n = n + 1 WHERE id = 1").await, 1);
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(direct_rows(&ctx, "SELECT sum(n) FROM wb"), "2");
}

#[tokio::test]
async fn spillway_flush_is_answered_after_earlier_requests() {
    let ctx = builder("1h").start().await;
    let proxy = ctx.proxy_client().await;
    tag(&proxy, "INSERT INTO wb (id, v) VALUES (1, 'a')").await;
    for _ in 0..20 {
        // The statement tokio-postgres prepared for this call is closed when it is
        // dropped: Close and Sync go upstream right before the FLUSH, and their answers
        // must reach the client before FLUSH's own.
        proxy
            .query("SELECT id FROM wb WHERE id = $1", &[&1i32])
            .await
            .expect("read");
        tag(&proxy, "SPILLWAY FLUSH").await;
        tag(&proxy, "UPDATE wb SET n = n + 1 WHERE id = 1").await;
    }
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(direct_rows(&ctx, "SELECT n FROM wb WHERE id = 1"), "20");
}

#[tokio::test]
async fn a_write_pipelined_behind_a_close_is_still_deferred() {
    let ctx = builder("1h").start().await;
    let proxy = ctx.proxy_client().await;
    tag(&proxy, "INSERT INTO wb (id, v) VALUES (1, 'a')").await;
    for i in 0..20 {
        // The read is a barrier: PostgreSQL has every earlier write (n = i). Its
        // statement's Close + Sync are still unanswered when the UPDATE arrives; the
        // UPDATE must wait for them and be deferred, not run write-through.
        proxy
            .query("SELECT id FROM wb WHERE id = $1", &[&1i32])
            .await
            .expect("read");
        assert_eq!(tag(&proxy, "UPDATE wb SET n = n + 1 WHERE id = 1").await, 1);
        assert_eq!(
            direct_rows(&ctx, "SELECT n FROM wb WHERE id = 1"),
            i.to_string(),
            "iteration {i}: the UPDATE was applied at once (write-through)"
        );
    }
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(direct_rows(&ctx, "SELECT n FROM wb WHERE id = 1"), "20");
}

/// Polls `sql` (a count) on `client` until it is positive; panics after 10 s.
async fn wait_positive(client: &Client, sql: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        if n > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "never true: {sql}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn exact_counts_hold_when_a_pending_key_is_applied_during_a_point_read() {
    let ctx = builder("1h").start().await;
    // A statement trigger that waits for advisory lock 7: holding it parks the flush
    // worker inside its batch.
    ctx.psql_direct(
        "CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         PERFORM pg_advisory_lock_shared(7); PERFORM pg_advisory_unlock_shared(7); \
         RETURN NULL; END $$; \
         CREATE TRIGGER gate BEFORE INSERT ON wb FOR EACH STATEMENT EXECUTE FUNCTION gate();",
    );
    let direct = ctx.direct_client().await;
    let gate = ctx.direct_client().await;
    gate.batch_execute("SELECT pg_advisory_lock(7)")
        .await
        .expect("close the gate");
    let proxy = ctx.proxy_client().await;
    let other = ctx.proxy_client().await;
    tag(&proxy, "INSERT INTO wb (id, v) VALUES (1, 'a')").await;
    let flush = tokio::spawn(async move { other.simple_query("SPILLWAY FLUSH").await.map(|_| ()) });
    wait_positive(
        &direct,
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'spillway flush' AND wait_event = 'advisory'",
    )
    .await;
    // An ACCESS EXCLUSIVE request queued behind the worker's lock on wb: point reads
    // of wb now wait too.
    let locker = ctx.direct_client().await;
    locker.batch_execute("BEGIN").await.expect("begin");
    let lock = tokio::spawn(async move {
        locker
            .batch_execute("LOCK TABLE wb IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock");
        locker
    });
    wait_positive(
        &direct,
        "SELECT count(*) FROM pg_locks WHERE relation = 'wb'::regclass \
         AND mode = 'AccessExclusiveLock' AND NOT granted",
    )
    .await;
    // Key 1 has a pending write (the overlay answers); key 2 needs a point read, which
    // waits for the table.
    let insert = tokio::spawn(async move {
        proxy
            .simple_query("INSERT INTO wb (id, v) VALUES (1, 'again'), (2, 'b')")
            .await
            .map(|_| ())
    });
    wait_positive(
        &direct,
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'spillway checks' AND wait_event_type = 'Lock'",
    )
    .await;
    // The worker applies key 1 and forgets it (FLUSH returns after that), then the
    // point read of key 2 gets its answer.
    gate.batch_execute("SELECT pg_advisory_unlock(7)")
        .await
        .expect("open the gate");
    flush.await.expect("flush task").expect("SPILLWAY FLUSH");
    let locker = lock.await.expect("lock task");
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    let err = insert
        .await
        .expect("insert task")
        .expect_err("key 1 exists: the whole INSERT fails");
    assert_eq!(err.code().map(|c| c.code()), Some("23505"), "{err:?}");
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM wb"
        ),
        "1:a"
    );
}

#[tokio::test]
async fn exact_counts_hold_when_back_pressure_lets_the_key_be_applied_first() {
    let ctx = Context::builder()
        .before_proxy(TABLES)
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.wb\"]\npolicy = \"write-behind\"\nmax_pending = 1\n",
        )
        .start()
        .await;
    let proxy = ctx.proxy_client().await;
    for id in 1..=10 {
        tag(
            &proxy,
            &format!("INSERT INTO wb (id, v) VALUES ({id}, 'k')"),
        )
        .await;
        // wb is full (the INSERT pending): the UPDATE first waits for room, that is for
        // the INSERT to be applied; key `id` exists all the same.
        assert_eq!(
            tag(&proxy, &format!("UPDATE wb SET n = n + 1 WHERE id = {id}")).await,
            1,
            "UPDATE of key {id}"
        );
    }
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*), sum(n) FROM wb"),
        "10|10"
    );
}

#[tokio::test]
async fn a_ledger_ahead_of_the_journal_stops_the_start_with_the_reason() {
    let mut ctx = builder("1h").start().await;
    let proxy = ctx.proxy_client().await;
    for i in 1..=3 {
        tag(&proxy, &format!("INSERT INTO wb (id, v) VALUES ({i}, 'x')")).await;
    }
    tag(&proxy, "SPILLWAY FLUSH").await;
    drop(proxy);
    // As if the database came from elsewhere: its ledger has records this journal never
    // wrote. Serving would number new writes as already applied (and never apply them).
    ctx.psql_direct("UPDATE spillway.flush_ledger SET last_seq = last_seq + 5");
    let log = ctx.try_restart_proxy().expect_err("start refused");
    assert!(
        log.contains("applied through record 8") && log.contains("journal ends at record 3"),
        "{log}"
    );
    // Put right, it starts and writes go on being numbered after the ledger.
    ctx.psql_direct("UPDATE spillway.flush_ledger SET last_seq = last_seq - 5");
    ctx.restart_proxy();
    let proxy = ctx.proxy_client().await;
    tag(&proxy, "INSERT INTO wb (id, v) VALUES (4, 'y')").await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM wb"), "4");
    assert_eq!(
        direct_rows(&ctx, "SELECT last_seq FROM spillway.flush_ledger"),
        "4"
    );
}

#[tokio::test]
async fn a_write_through_table_linked_by_a_foreign_key_waits_for_the_deferred_one() {
    // `wt_child` is not deferred; its foreign key reads `wb`, whose insert is pending.
    // Run at once, the child's INSERT would fail with 23503 although the parent was
    // acknowledged before it; the DELETE of the parent must likewise come after.
    let ctx = builder("1h")
        .before_proxy(
            "CREATE TABLE public.wt_child (id int PRIMARY KEY, \
                 parent int NOT NULL REFERENCES public.wb (id) ON DELETE CASCADE);",
        )
        .start()
        .await;
    let proxy = ctx.proxy_client().await;
    tag(&proxy, "INSERT INTO wb (id, v) VALUES (1, 'p')").await;
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM wb"), "0", "pending");
    assert_eq!(
        tag(&proxy, "INSERT INTO wt_child (id, parent) VALUES (10, 1)").await,
        1
    );
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM wb"), "1");
    // The other way: a pending deferred DELETE of the parent, then a write-through
    // insert of a child that would only fail once that DELETE is applied.
    tag(&proxy, "INSERT INTO wb (id, v) VALUES (2, 'q')").await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    tag(&proxy, "DELETE FROM wb WHERE id = 2").await;
    let err = proxy
        .simple_query("INSERT INTO wt_child (id, parent) VALUES (20, 2)")
        .await
        .expect_err("the parent is deleted before it");
    assert_eq!(err.code().map(|c| c.code()), Some("23503"), "{err:?}");
    // A read of the child: a pending DELETE of its parent cascades to it when applied,
    // so the read waits for it (strong consistency) and sees the child gone.
    tag(&proxy, "DELETE FROM wb WHERE id = 1").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM wt_child"),
        "1",
        "pending"
    );
    let rows = proxy
        .simple_query("SELECT count(*) FROM wt_child")
        .await
        .expect("select");
    let count = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(count.as_deref(), Some("0"));
}

#[tokio::test]
async fn a_key_in_a_one_element_in_list_is_deferred_like_an_equality() {
    // Django's `instance.delete()` and `filter(pk__in=[one]).update(…)`.
    let ctx = builder("1h").start().await;
    ctx.psql_direct("INSERT INTO wb (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c')");
    let proxy = ctx.proxy_client().await;
    assert_eq!(
        proxy
            .execute("DELETE FROM \"wb\" WHERE \"wb\".\"id\" IN ($1)", &[&1i32])
            .await
            .expect("delete"),
        1
    );
    assert_eq!(
        tag(&proxy, "UPDATE wb SET v = 'z' WHERE id IN (2)").await,
        1
    );
    assert_eq!(
        tag(&proxy, "UPDATE wb SET v = 'y' WHERE id IN (9)").await,
        0
    );
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM wb"
        ),
        "1:a,2:b,3:c",
        "journaled, not run: PostgreSQL does not have them before the flush"
    );
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM wb"
        ),
        "2:z,3:c"
    );
}

/// `WHERE id IN (…)` with several keys (ORMs' bulk updates and deletes, ADR 0038): one
/// deferred operation per key, a key given twice written once, the row count
/// PostgreSQL's; each answer checked against the same statement run directly on a
/// copy of the table.
#[tokio::test]
async fn a_key_in_list_is_deferred_as_one_operation_per_key() {
    let ctx = builder("1h")
        .before_proxy("CREATE TABLE public.wb_copy (LIKE public.wb INCLUDING ALL)")
        .start()
        .await;
    let seed = "INSERT INTO {t} (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')";
    ctx.psql_direct(&seed.replace("{t}", "wb"));
    ctx.psql_direct(&seed.replace("{t}", "wb_copy"));
    let proxy = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;
    let simple = [
        "UPDATE {t} SET v = 'p', n = n + 1 WHERE id IN (1, 3, 9, '03')",
        "INSERT INTO {t} (id, v) VALUES (5, 'e')",
        "DELETE FROM {t} WHERE {t}.id IN (5, 6)",
        "BEGIN",
        "UPDATE {t} SET n = n + 10 WHERE id IN (3, 4) AND n > 0",
        "DELETE FROM {t} WHERE id IN (4, 8)",
        "COMMIT",
    ];
    for sql in simple {
        let through = tag(&proxy, &sql.replace("{t}", "wb")).await;
        let copy = tag(&direct, &sql.replace("{t}", "wb_copy")).await;
        assert_eq!(through, copy, "{sql}");
    }
    let extended = "DELETE FROM {t} WHERE id IN ($1, $2, $3)";
    let through = proxy
        .execute(&extended.replace("{t}", "wb"), &[&2i32, &7i32, &2i32])
        .await
        .expect("extended delete");
    let copy = direct
        .execute(&extended.replace("{t}", "wb_copy"), &[&2i32, &7i32, &2i32])
        .await
        .expect("extended delete");
    assert_eq!((through, copy), (1, 1));
    let contents = "SELECT string_agg(id || ':' || v || ':' || n, ',' ORDER BY id) FROM {t}";
    assert_eq!(
        direct_rows(&ctx, &contents.replace("{t}", "wb")),
        "1:a:0,2:b:0,3:c:0,4:d:0",
        "journaled, not run: PostgreSQL does not have them before the flush"
    );
    let deferred = crate::metrics::sample(
        &crate::metrics::scrape(ctx.proxy.metrics_addr()).await,
        "spillway_fallbacks_total",
        "reason=\"where_not_key_equality\"",
    );
    assert_eq!(deferred, 0.0);
    // A RETURNING is not answered: PostgreSQL runs it, after the barrier.
    let rows = proxy
        .query("DELETE FROM wb WHERE id IN (1, 3) RETURNING id", &[])
        .await
        .expect("returning");
    let copy = direct
        .query("DELETE FROM wb_copy WHERE id IN (1, 3) RETURNING id", &[])
        .await
        .expect("returning");
    let ids = |rows: &[tokio_postgres::Row]| {
        let mut ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!((ids(&rows), ids(&copy)), (vec![1, 3], vec![1, 3]));
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, &contents.replace("{t}", "wb")),
        direct_rows(&ctx, &contents.replace("{t}", "wb_copy")),
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM spillway.dead_letters"),
        "0"
    );
}
