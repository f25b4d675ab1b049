//! The change stream under faults (issue 14, bad input and faults), with psql writing
//! behind spillway's back and no triggers: none of these may leave a stale entry
//! served, and each is logged once with its reason.
//! - The publication altered under spillway (`publish` narrowed to inserts): the
//!   UPDATE it no longer publishes is not missed — the first stream round after the
//!   ALTER notices it, drops the database's cache and serves it uncached — and the
//!   stream follows again once the publication is restored.
//! - The service connection that follows the slot terminated again and again while
//!   rows change: every change is seen through spillway.
//!
//! (An undecodable message cannot be produced by a real PostgreSQL on demand; the
//! decoder's refusal and the reset it leads to are covered by the fuzz target and
//! `stream/` unit tests.)

use std::time::{Duration, Instant};

use crate::context::{Context, DB};
use crate::metrics::scrape;
use crate::replication::{metric, start, until, value};

/// Whether the stream follows the database now (the metric, refreshed per scrape).
async fn following(ctx: &Context) -> bool {
    metric(
        &scrape(ctx.proxy.metrics_addr()).await,
        "spillway_replication_following",
    ) > 0.0
}

/// Waits (up to 20 s) until the stream follows the database.
async fn wait_following(ctx: &Context) {
    let since = Instant::now();
    while !following(ctx).await {
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "the stream never followed:\n{}",
            ctx.proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_publication_altered_under_spillway_never_leaves_a_stale_entry() {
    let ctx = start("").await;
    let client = ctx.proxy_client().await;
    // The row must be a cache hit before the ALTER: read while the catalog is still
    // loading, it is served uncached and the UPDATE below would be seen by a miss.
    wait_following(&ctx).await;
    let hits = || async {
        metric(
            &scrape(ctx.proxy.metrics_addr()).await,
            "spillway_cache_hits_total",
        )
    };
    let since = Instant::now();
    loop {
        assert_eq!(value(&client, 1).await.as_deref(), Some("v1"));
        let before = hits().await;
        assert_eq!(value(&client, 1).await.as_deref(), Some("v1"));
        if hits().await > before {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "the row was never served from the cache:\n{}",
            ctx.proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ctx.pg
        .psql(DB, "ALTER PUBLICATION spillway SET (publish = 'insert')")
        .expect("narrow the publication");
    ctx.pg
        .psql(DB, "UPDATE items SET v = 'unpublished' WHERE id = 1")
        .expect("update");
    let seen = until(Instant::now(), || async {
        value(&client, 1).await.as_deref() == Some("unpublished")
    })
    .await;
    eprintln!("an update the publication no longer publishes seen after {seen:?}");
    assert!(!following(&ctx).await, "served uncached meanwhile");
    let logs = ctx.proxy.logs();
    let reason = "does not publish update, delete, truncate";
    let warned = logs
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains(reason))
        .count();
    assert_eq!(warned, 1, "logged once (repeats at debug level):\n{logs}");

    // Restored: the stream follows again, and psql's changes are seen.
    ctx.pg
        .psql(
            DB,
            "ALTER PUBLICATION spillway SET (publish = 'insert, update, delete, truncate')",
        )
        .expect("restore the publication");
    wait_following(&ctx).await;
    assert_eq!(value(&client, 2).await.as_deref(), Some("v2"));
    ctx.pg
        .psql(DB, "UPDATE items SET v = 'after' WHERE id = 2")
        .expect("update");
    until(Instant::now(), || async {
        value(&client, 2).await.as_deref() == Some("after")
    })
    .await;
}

#[tokio::test]
async fn the_stream_connection_terminated_mid_stream_never_leaves_a_stale_entry() {
    let ctx = start("").await;
    let client = ctx.proxy_client().await;
    for round in 0..5 {
        let id = 10 + round;
        assert_eq!(value(&client, id).await, Some(format!("v{id}")));
        // Changes committed, then the follower's backend terminated, in one go.
        ctx.pg
            .psql(
                DB,
                &format!(
                    "UPDATE items SET v = 'r{round}' WHERE id = {id}; \
                     SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'spillway cache service'"
                ),
            )
            .expect("update and terminate");
        let want = format!("r{round}");
        let seen = until(Instant::now(), || async {
            value(&client, id).await.as_deref() == Some(want.as_str())
        })
        .await;
        eprintln!("round {round}: seen after {seen:?}");
    }
    let logs = ctx.proxy.logs();
    assert!(
        logs.matches("cache service connection lost").count() >= 1,
        "the terminations were noticed:\n{logs}"
    );
}
