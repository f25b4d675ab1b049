//! Every write path spillway can see invalidates what it touches (SPEC §5
//! "Invalidation"), and the stale-fill guard keeps a fill that raced a write out of
//! the cache.
//!
//! Each test first makes the cache stale on purpose (an external write after a fill,
//! see [`super::wait_for_cached`]), then runs the operation through spillway: from
//! then on spillway must answer like PostgreSQL, which only happens if the operation
//! dropped the stale entries.

use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Client;

use super::{
    ALL, BOTH, EXTERNAL, GATE, Rows, Via, assert_fresh_for, cached, read, start, wait_count,
};
use crate::context::Context;

/// How long after an operation spillway must keep answering freshly; outlasts the
/// catalog reload that DDL triggers.
const WINDOW: Duration = Duration::from_millis(600);

/// Makes both protocols' entries for `sql` stale, runs each of `ops` through a second
/// spillway session (the first in the simple protocol, the second in the extended
/// one), and checks that both sessions then read what PostgreSQL has.
async fn check(extra: &str, sql: &str, ops: [&str; 2]) {
    let (ctx, direct) = start(Context::builder(), extra).await;
    let reader = ctx.proxy_client().await;
    let writer = ctx.proxy_client().await;
    for (op, via) in ops.into_iter().zip(BOTH) {
        for v in BOTH {
            cached(&reader, &direct, v, sql, EXTERNAL).await;
        }
        match via {
            Via::Simple => writer.batch_execute(op).await.map(|_| ()),
            Via::Extended => writer.execute(op, &[]).await.map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("{op}: {e:?}"));
        let what = format!("after `{op}` ({via:?}) through spillway");
        assert_fresh_for(&reader, &direct, sql, WINDOW, &what).await;
        assert_fresh_for(&writer, &direct, sql, Duration::ZERO, &what).await;
    }
}

#[tokio::test]
async fn insert_invalidates() {
    check(
        "",
        ALL,
        [
            "INSERT INTO t VALUES (-1, 'new', 0)",
            "INSERT INTO t VALUES (-2, 'new', 0)",
        ],
    )
    .await;
}

#[tokio::test]
async fn update_invalidates() {
    check(
        "",
        ALL,
        [
            "UPDATE t SET v = 'updated 1' WHERE id = 2",
            "UPDATE t SET v = 'updated 2' WHERE id = 2",
        ],
    )
    .await;
}

#[tokio::test]
async fn delete_invalidates() {
    check(
        "",
        ALL,
        ["DELETE FROM t WHERE id = 2", "DELETE FROM t WHERE id = 3"],
    )
    .await;
}

#[tokio::test]
async fn truncate_invalidates() {
    check("", ALL, ["TRUNCATE t", "TRUNCATE TABLE t"]).await;
}

#[tokio::test]
async fn ddl_invalidates() {
    // `SELECT *`: the new column must show up too.
    check(
        "",
        "SELECT * FROM t ORDER BY id",
        [
            "ALTER TABLE t ADD COLUMN extra1 int",
            "ALTER TABLE t ADD COLUMN extra2 int DEFAULT 7",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_write_inside_a_cte_invalidates() {
    check(
        "",
        ALL,
        [
            "WITH x AS (UPDATE t SET v = 'cte 1' WHERE id = 2 RETURNING 1) SELECT count(*) FROM x",
            "WITH x AS (UPDATE t SET v = 'cte 2' WHERE id = 2 RETURNING 1) SELECT count(*) FROM x",
        ],
    )
    .await;
}

#[tokio::test]
async fn an_unknown_side_effect_invalidates() {
    check(
        "",
        ALL,
        [
            "DO $$ BEGIN UPDATE t SET v = 'do 1' WHERE id = 2; END $$",
            "DO $$ BEGIN UPDATE t SET v = 'do 2' WHERE id = 2; END $$",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_volatile_function_call_invalidates() {
    check(
        "CREATE FUNCTION bump(int) RETURNS int LANGUAGE sql
         AS $$ UPDATE t SET n = n + 1 WHERE id = $1 RETURNING n $$;",
        ALL,
        ["SELECT bump(2)", "SELECT bump(3)"],
    )
    .await;
}

#[tokio::test]
async fn copy_from_invalidates() {
    let (ctx, direct) = start(Context::builder(), "").await;
    let reader = ctx.proxy_client().await;
    let writer = ctx.proxy_client().await;
    for round in 0..2 {
        for via in BOTH {
            cached(&reader, &direct, via, ALL, EXTERNAL).await;
        }
        let sink = writer
            .copy_in("COPY t (id, v, n) FROM STDIN")
            .await
            .expect("COPY FROM through spillway");
        futures_util::pin_mut!(sink);
        sink.send(Bytes::from(format!("-{}\tcopied\t0\n", round + 1)))
            .await
            .expect("copy data");
        assert_eq!(sink.finish().await.expect("copy done"), 1);
        assert_fresh_for(&reader, &direct, ALL, WINDOW, "after COPY FROM").await;
    }
}

fn value_of(rows: &Rows, id: &str) -> Option<String> {
    rows.iter()
        .skip(1)
        .find(|r| r[0].as_deref() == Some(id))
        .and_then(|r| r[1].clone())
}

/// Every read of `reader` equals PostgreSQL's committed state (twice: the second may
/// be a hit on the first's fill).
async fn sees_committed(reader: &Client, direct: &Client, what: &str) {
    for _ in 0..2 {
        for via in BOTH {
            assert_eq!(
                read(reader, via, ALL).await,
                read(direct, via, ALL).await,
                "{what} ({via:?})"
            );
        }
    }
}

#[tokio::test]
async fn a_write_in_a_transaction_is_seen_by_others_at_commit() {
    let (ctx, direct) = start(Context::builder(), "").await;
    let reader = ctx.proxy_client().await;
    let writer = ctx.proxy_client().await;

    for (round, end) in ["COMMIT", "ROLLBACK"].into_iter().enumerate() {
        let mine = format!("{end} {round}");
        cached(&reader, &direct, Via::Simple, ALL, EXTERNAL).await;
        writer.batch_execute("BEGIN").await.expect("BEGIN");
        // An in-transaction read before the write may be served from the cache.
        read(&writer, Via::Simple, ALL).await;
        writer
            .execute("UPDATE t SET v = $1 WHERE id = 1", &[&mine])
            .await
            .expect("UPDATE in transaction");
        for via in [Via::Simple, Via::Extended, Via::Simple] {
            let own = read(&writer, via, ALL).await;
            assert_eq!(
                value_of(&own, "1").as_deref(),
                Some(mine.as_str()),
                "{via:?}: the writing transaction does not see its own write: {own:?}"
            );
        }
        // Others see the committed state while the transaction is open: the stale
        // entry is gone (invalidated when the UPDATE was forwarded), and fills made now
        // hold the committed state.
        sees_committed(&reader, &direct, "while the writer's transaction is open").await;
        writer.batch_execute(end).await.expect(end);
        // Fills made during the transaction must not outlive its end.
        sees_committed(&reader, &direct, &format!("right after {end}")).await;
        sees_committed(&writer, &direct, &format!("the writer after {end}")).await;
        let after = read(&direct, Via::Simple, ALL).await;
        assert_eq!(
            value_of(&after, "1").as_deref() == Some(mine.as_str()),
            end == "COMMIT",
            "{end}: {after:?}"
        );
    }
}

/// The stale-fill guard, made deterministic with [`GATE`]:
///
/// 1. session R reads `SELECT v, gate(id) FROM t WHERE id = 1` through spillway: a
///    miss, so spillway leads a fill, recording the table versions. PostgreSQL takes
///    the statement's snapshot and parks inside `gate()` on the advisory lock;
/// 2. session W updates the row through spillway; it is acknowledged, so spillway has
///    bumped the version of `t`;
/// 3. the lock is released: R gets the row from its snapshot, the OLD value, and
///    spillway completes the fill;
/// 4. the next read must return the NEW value.
///
/// Without the guard the fill of step 3 would be stored after the invalidation of step
/// 2 and step 4 would be a hit on the old value. (`gate(id)`, not `gate(1)`: with a
/// constant argument PostgreSQL folds the immutable call while planning, before the
/// executor takes its snapshot, and R would read the new value.)
#[tokio::test]
async fn a_fill_that_raced_a_write_is_not_stored() {
    let (ctx, direct) = start(Context::builder(), GATE).await;
    let writer = ctx.proxy_client().await;
    let checker = ctx.proxy_client().await;
    // The catalog knows gate() and queries using it are cached.
    cached(
        &checker,
        &direct,
        Via::Simple,
        "SELECT v, gate(id) FROM t WHERE id = 5",
        "UPDATE t SET v = v || '+' WHERE id = 5",
    )
    .await;
    let parked = "SELECT count(*)::int FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                  AND wait_event = 'advisory' AND query LIKE '%gate(%'";

    for (via, id) in [(Via::Simple, 1), (Via::Extended, 2)] {
        let sql = format!("SELECT v, gate(id) FROM t WHERE id = {id}");
        let old = read(&direct, via, &sql).await;
        let reader = ctx.proxy_client().await;
        direct
            .batch_execute("SELECT pg_advisory_lock(42)")
            .await
            .expect("lock");
        let task = {
            let sql = sql.clone();
            tokio::spawn(async move { read(&reader, via, &sql).await })
        };
        wait_count(&direct, parked, 1, "the read parked in gate()").await;
        writer
            .execute("UPDATE t SET v = 'new' WHERE id = $1", &[&id])
            .await
            .expect("UPDATE through spillway");
        direct
            .batch_execute("SELECT pg_advisory_unlock(42)")
            .await
            .expect("unlock");
        let raced = task.await.expect("parked read");
        assert_eq!(
            raced, old,
            "{via:?}: the parked read should see its snapshot (the scenario is broken)"
        );
        for _ in 0..3 {
            let got = read(&checker, via, &sql).await;
            assert_eq!(
                got,
                read(&direct, via, &sql).await,
                "{via:?}: the fill that raced the UPDATE was stored (stale-fill guard)"
            );
        }
    }
}
