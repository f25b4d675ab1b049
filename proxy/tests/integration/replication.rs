//! `cache.invalidation = "replication"` against a real PostgreSQL with `wal_level =
//! logical` and no triggers: writes made with psql, behind spillway's back, are seen
//! through spillway within a change-stream round; the lifecycle (spillway stopped,
//! PostgreSQL restarted, the slot dropped, the retained-WAL bound) and the start-up
//! errors.

use std::time::{Duration, Instant};

use crate::context::{Context, DB, eventually};
use crate::metrics::scrape;

pub(super) const REPLICATION: &str = "[cache]\ninvalidation = \"replication\"\nttl = \"1h\"";
const SLOT: &str = "spillway_postgres";

pub(super) async fn start(extra: &str) -> Context {
    Context::builder()
        // Logical decoding reads flushed WAL only: with the throwaway's
        // synchronous_commit = off a commit waits for the WAL writer (up to 600 ms).
        .pg(|b| {
            b.conf("wal_level = logical")
                .conf("synchronous_commit = on")
        })
        .section(REPLICATION)
        .section(extra)
        .before_proxy(
            "CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL); \
             INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g",
        )
        .start()
        .await
}

pub(super) async fn value(client: &tokio_postgres::Client, id: i32) -> Option<String> {
    client
        .query_opt("SELECT v FROM items WHERE id = $1", &[&id])
        .await
        .expect("point read")
        .map(|r| r.get(0))
}

async fn count(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .expect("count")
        .get(0)
}

pub(super) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads through spillway until `done` holds; the time from `since`.
pub(super) async fn until<F, Fut>(since: Instant, mut read: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if read().await {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "change not seen within 5s"
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::test]
async fn psql_writes_are_seen_through_the_cache() {
    let ctx = start("").await;
    let client = ctx.proxy_client().await;
    let mut lags = Vec::new();
    for round in 0..40 {
        let id = round % 20 + 1;
        // Cached (twice: the second is a hit).
        let before = value(&client, id).await;
        assert_eq!(value(&client, id).await, before);
        let next = format!("r{round}");
        let t = Instant::now();
        ctx.pg
            .psql(
                DB,
                &format!("UPDATE items SET v = '{next}' WHERE id = {id}"),
            )
            .expect("psql update");
        let after = t.elapsed();
        let _ = after;
        lags.push(
            until(Instant::now(), || async {
                value(&client, id).await.as_deref() == Some(next.as_str())
            })
            .await,
        );
    }
    let hits = metric(
        &scrape(ctx.proxy.metrics_addr()).await,
        "spillway_cache_hits_total",
    );
    assert!(
        hits >= 40.0,
        "reads were served from the cache ({hits} hits)"
    );
    // INSERT, DELETE, TRUNCATE, each after the count was cached.
    assert_eq!(count(&client).await, 100);
    assert_eq!(count(&client).await, 100);
    ctx.pg
        .psql(DB, "INSERT INTO items VALUES (101, 'new')")
        .expect("insert");
    lags.push(until(Instant::now(), || async { count(&client).await == 101 }).await);
    assert_eq!(value(&client, 101).await.as_deref(), Some("new"));
    ctx.pg
        .psql(DB, "DELETE FROM items WHERE id = 101")
        .expect("delete");
    lags.push(
        until(Instant::now(), || async {
            value(&client, 101).await.is_none()
        })
        .await,
    );
    assert_eq!(value(&client, 5).await.as_deref(), Some("r24"));
    ctx.pg.psql(DB, "TRUNCATE items").expect("truncate");
    lags.push(
        until(Instant::now(), || async {
            value(&client, 5).await.is_none()
        })
        .await,
    );
    assert_eq!(count(&client).await, 0);
    lags.sort();
    println!(
        "replication lag seen by a reader after psql returned: p50 {:?}, p99 {:?}, max {:?} over {} changes",
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags[lags.len() - 1],
        lags.len()
    );
    // The counters are bumped after the versions a reader sees: a scrape right after
    // the last change was seen may come just before its count (seen under load).
    let mut text = scrape(ctx.proxy.metrics_addr()).await;
    let counted = |text: &str| {
        metric(text, "spillway_replication_commits_total") >= 43.0
            && metric(text, "spillway_invalidations_total{scope=\"row\"}") >= 42.0
    };
    let since = Instant::now();
    while !counted(&text) && since.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = scrape(ctx.proxy.metrics_addr()).await;
    }
    assert!(
        metric(&text, "spillway_replication_commits_total") >= 43.0,
        "{text}"
    );
    assert!(
        metric(&text, "spillway_invalidations_total{scope=\"row\"}") >= 42.0,
        "{text}"
    );
    assert!(
        metric(&text, "spillway_invalidations_total{scope=\"table\"}") >= 1.0,
        "{text}"
    );
    // The slot is confirmed up to the last change.
    let confirmed = ctx
        .pg
        .psql(
            DB,
            &format!(
                "SELECT pg_current_wal_lsn() - confirmed_flush_lsn < 100000 FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
            ),
        )
        .expect("slot");
    assert_eq!(confirmed.trim(), "t");
}

#[tokio::test]
async fn changes_while_stopped_are_applied_before_any_cached_read() {
    let mut ctx = start("").await;
    {
        let client = ctx.proxy_client().await;
        assert_eq!(value(&client, 1).await.as_deref(), Some("v1"));
    }
    ctx.proxy.kill();
    ctx.pg
        .psql(
            DB,
            "UPDATE items SET v = 'while stopped' WHERE id = 1; DELETE FROM items WHERE id = 2",
        )
        .expect("update while stopped");
    ctx.restart_proxy();
    let client = ctx.proxy_client().await;
    assert_eq!(value(&client, 1).await.as_deref(), Some("while stopped"));
    assert_eq!(value(&client, 1).await.as_deref(), Some("while stopped"));
    assert_eq!(value(&client, 2).await, None);
    // The slot was drained (its position moved past the changes).
    let ok = eventually(Duration::from_secs(5), || {
        ctx.pg
            .psql(DB, &format!("SELECT pg_current_wal_lsn() - confirmed_flush_lsn < 100000 FROM pg_replication_slots WHERE slot_name = '{SLOT}'"))
            .is_ok_and(|s| s.trim() == "t")
    })
    .await;
    assert!(ok, "slot confirmed past the changes made while stopped");
}

#[tokio::test]
async fn a_dropped_slot_and_a_postgresql_restart_are_survived() {
    let mut ctx = start("").await;
    let client = ctx.proxy_client().await;
    assert_eq!(value(&client, 3).await.as_deref(), Some("v3"));
    // The slot is active only during a poll: retry until the drop wins.
    let dropped = eventually(Duration::from_secs(5), || {
        ctx.pg
            .psql(DB, &format!("SELECT pg_drop_replication_slot('{SLOT}')"))
            .is_ok()
    })
    .await;
    assert!(dropped, "slot dropped");
    ctx.pg
        .psql(DB, "UPDATE items SET v = 'after drop' WHERE id = 3")
        .expect("update");
    until(Instant::now(), || async {
        value(&client, 3).await.as_deref() == Some("after drop")
    })
    .await;
    let recreated = eventually(Duration::from_secs(5), || {
        ctx.pg
            .psql(
                DB,
                &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{SLOT}'"),
            )
            .is_ok_and(|s| s.trim() == "1")
    })
    .await;
    assert!(recreated, "slot recreated");
    assert!(
        ctx.proxy.logs().contains("change stream reset"),
        "{}",
        ctx.proxy.logs()
    );
    // Cached again, then PostgreSQL restarts.
    assert_eq!(value(&client, 3).await.as_deref(), Some("after drop"));
    drop(client);
    ctx.pg.stop().expect("pg stop");
    ctx.pg.start().expect("pg start");
    ctx.pg
        .psql(DB, "UPDATE items SET v = 'after restart' WHERE id = 3")
        .expect("update");
    let mut seen = false;
    for _ in 0..100 {
        if let Ok((client, conn)) =
            tokio_postgres::connect(&ctx.proxy_config(), tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            if let Ok(Some(row)) = client
                .query_opt("SELECT v FROM items WHERE id = $1", &[&3i32])
                .await
            {
                let v: String = row.get(0);
                assert_ne!(
                    v, "after drop",
                    "a stale entry was served after the restart"
                );
                if v == "after restart" {
                    seen = true;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "reads after PostgreSQL's restart see the new value");
}

#[tokio::test]
async fn the_retained_wal_bound_recreates_the_slot() {
    let mut ctx = start("[replication]\nmax_retained_wal = \"1MiB\"").await;
    ctx.proxy.kill();
    ctx.pg
        .psql(
            DB,
            "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 30000) g",
        )
        .expect("WAL filler");
    let retained_before = ctx
        .pg
        .psql(DB, &format!("SELECT pg_current_wal_lsn() - restart_lsn > 1048576 FROM pg_replication_slots WHERE slot_name = '{SLOT}'"))
        .expect("slot");
    assert_eq!(
        retained_before.trim(),
        "t",
        "the filler went past the bound"
    );
    ctx.restart_proxy();
    let client = ctx.proxy_client().await;
    assert_eq!(value(&client, 1).await.as_deref(), Some("v1"));
    let ok = eventually(Duration::from_secs(5), || {
        ctx.proxy
            .logs()
            .contains("over replication.max_retained_wal")
    })
    .await;
    assert!(ok, "{}", ctx.proxy.logs());
    let retained = ctx
        .pg
        .psql(DB, &format!("SELECT pg_current_wal_lsn() - restart_lsn < 1048576 FROM pg_replication_slots WHERE slot_name = '{SLOT}'"))
        .expect("slot");
    assert_eq!(retained.trim(), "t", "the slot's position was recreated");
}

#[tokio::test]
async fn start_errors_name_the_fix() {
    // wal_level = replica (the default).
    let ctx = Context::builder().start().await;
    let log = ctx
        .try_another_proxy(REPLICATION, &[])
        .expect_err("refused without wal_level = logical");
    assert!(log.contains("wal_level = logical"), "{log}");
    drop(ctx);
    let ctx = Context::builder()
        .pg(|b| b.conf("wal_level = logical"))
        .before_proxy("CREATE ROLE plain LOGIN; CREATE TABLE t (id int PRIMARY KEY)")
        .start()
        .await;
    let url = format!(
        "postgres://plain@127.0.0.1:{}/{DB}?sslmode=disable",
        ctx.pg.port()
    );
    // A role without REPLICATION.
    let log = ctx
        .try_another_proxy(REPLICATION, &[("SPILLWAY_BACKEND__URL", &url)])
        .expect_err("refused without REPLICATION");
    assert!(log.contains("ALTER ROLE plain REPLICATION"), "{log}");
    // A publication that leaves a table out, with creation off.
    ctx.pg
        .psql(
            DB,
            "CREATE TABLE other (id int PRIMARY KEY); CREATE PUBLICATION spillway FOR TABLE t",
        )
        .expect("partial publication");
    let log = ctx
        .try_another_proxy(
            &format!("{REPLICATION}\n[replication]\ncreate = false"),
            &[],
        )
        .expect_err("refused with a partial publication");
    assert!(
        log.contains("does not cover cached tables public.other"),
        "{log}"
    );
    assert!(
        log.contains("ALTER PUBLICATION spillway ADD TABLE"),
        "{log}"
    );
}
