//! The cache's bounds and its other invalidation source: memory stays near
//! `cache.max_bytes`, results over `cache.max_entry_bytes` stream through uncached,
//! external writes are seen through NOTIFY triggers long before the TTL, and
//! concurrent misses on one key make one upstream query.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{
    ALL, BOTH, EXTERNAL, GATE, Rows, Via, cached, extended, read, simple, start, summarize,
    wait_count, wait_for_cached,
};
use crate::context::{Context, DB, USER};

const MIB: u64 = 1024 * 1024;
const BOUNDS: &str = "[cache]\nmax_bytes = \"8MiB\"\nmax_entry_bytes = \"1MiB\"";

#[tokio::test]
async fn memory_stays_bounded_by_max_bytes() {
    let (ctx, direct) = start(
        Context::builder().section(BOUNDS),
        // 800 distinct results of 100,000 bytes each: 80 MB in all, ten times the bound.
        "CREATE TABLE big (id int PRIMARY KEY, body text NOT NULL);
         INSERT INTO big SELECT g, repeat(md5(g::text), 3125) FROM generate_series(1, 800) g;",
    )
    .await;
    let proxy = ctx.proxy_client().await;
    cached(&proxy, &direct, Via::Simple, ALL, EXTERNAL).await;
    let (baseline, _) = ctx.proxy.memory();

    let sql = "SELECT body FROM big WHERE id = $1";
    let stmt = proxy.prepare(sql).await.expect("prepare");
    for _round in 0..2 {
        for id in 1..=800i32 {
            let body: String = proxy
                .query_one(&stmt, &[&id])
                .await
                .expect("big read")
                .get(0);
            assert_eq!(body.len(), 100_000, "id {id}");
        }
    }
    let (rss, peak) = ctx.proxy.memory();
    println!(
        "spillway RSS: baseline {:.1} MiB, after 1600 reads of 100 KB {:.1} MiB, peak {:.1} MiB",
        baseline as f64 / MIB as f64,
        rss as f64 / MIB as f64,
        peak as f64 / MIB as f64
    );

    // Results of this size are cached at all (else the bound proves nothing).
    let id = 7i32;
    wait_for_cached(
        async || summarize(extended(&proxy, sql, &[&id]).await),
        async || summarize(extended(&direct, sql, &[&id]).await),
        &direct,
        "UPDATE big SET body = md5(body) || substr(body, 33) WHERE id = 7",
    )
    .await;

    let limit = baseline + 8 * MIB + 48 * MIB;
    assert!(
        rss < limit,
        "RSS {} MiB exceeds baseline {} MiB + max_bytes 8 MiB + 48 MiB slack",
        rss / MIB,
        baseline / MIB
    );
}

#[tokio::test]
async fn a_result_over_max_entry_bytes_streams_through_and_is_never_cached() {
    let (ctx, direct) = start(
        Context::builder().section(BOUNDS),
        // One 2 MB row, and 20 rows of 100 KB that together exceed 1 MiB.
        "CREATE TABLE big (id int PRIMARY KEY, body text NOT NULL);
         INSERT INTO big VALUES (1, repeat('y', 2000000));
         INSERT INTO big SELECT g, repeat(md5(g::text), 3125) FROM generate_series(2, 21) g;",
    )
    .await;
    let proxy = ctx.proxy_client().await;
    cached(&proxy, &direct, Via::Simple, ALL, EXTERNAL).await;
    for sql in [
        "SELECT id, body FROM big WHERE id = 1",
        "SELECT id, body FROM big WHERE id > 1 ORDER BY id",
    ] {
        for round in 0..4 {
            for via in BOTH {
                // A fill attempt, equal to PostgreSQL's answer...
                let got = summarize(read(&proxy, via, sql).await);
                assert_eq!(got, summarize(read(&direct, via, sql).await), "{sql}");
                // ...then a change it cannot see, which the next read must show.
                direct
                    .batch_execute("UPDATE big SET body = md5(body) || substr(body, 33)")
                    .await
                    .expect("external write");
                assert_eq!(
                    summarize(read(&proxy, via, sql).await),
                    summarize(read(&direct, via, sql).await),
                    "round {round}, {via:?}, {sql}: an oversized result was served from memory"
                );
            }
        }
    }
}

/// Runs `spillway install-triggers` against the test's PostgreSQL.
async fn install_triggers(ctx: &Context) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .arg("install-triggers")
        .env("SPILLWAY_BACKEND__URL", ctx.pg.url(USER, DB))
        .env("RUST_LOG", "warn")
        .env_remove("SPILLWAY_CONFIG")
        .current_dir(dir.path())
        .output()
        .await
        .expect("run spillway install-triggers");
    assert!(
        out.status.success(),
        "install-triggers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Notify mode with triggers installed: the context, a direct client whose writes are
/// announced, one whose writes are not, and a spillway client.
async fn notify_setup() -> (Context, Client, Client, Client) {
    let ctx = Context::builder()
        .section("[cache]\nttl = \"1h\"\ninvalidation = \"notify\"")
        .start()
        .await;
    let direct = ctx.direct_client().await;
    direct.batch_execute(super::SETUP).await.expect("setup");
    install_triggers(&ctx).await;
    // session_replication_role = replica skips ordinary triggers: this session's
    // writes are not announced, which is the only way to observe a hit here.
    let quiet = ctx.direct_client().await;
    quiet
        .batch_execute("SET session_replication_role = replica")
        .await
        .expect("replica role");
    let proxy = ctx.proxy_client().await;
    (ctx, direct, quiet, proxy)
}

#[tokio::test]
async fn notify_makes_external_writes_visible_long_before_the_ttl() {
    let (_ctx, direct, quiet, proxy) = notify_setup().await;
    for round in 0..3 {
        let stale = cached(&proxy, &quiet, Via::Simple, ALL, EXTERNAL).await;
        let at = Instant::now();
        direct
            .batch_execute(&format!("UPDATE t SET v = 'notified {round}' WHERE id = 1"))
            .await
            .expect("announced external write");
        let want = simple(&direct, ALL).await;
        loop {
            let got = simple(&proxy, ALL).await;
            if got == want {
                break;
            }
            assert!(
                at.elapsed() < Duration::from_secs(1),
                "round {round}: external write unseen after 1 s (TTL 1h): {got:?}, was {stale:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "round {round}: external write seen after {:?}",
            at.elapsed()
        );
    }
}

#[tokio::test]
async fn losing_the_listen_connection_drops_entries_until_it_is_back() {
    let (_ctx, direct, quiet, proxy) = notify_setup().await;
    // A stale entry exists: the quiet write was not announced.
    let stale = cached(&proxy, &quiet, Via::Simple, ALL, EXTERNAL).await;
    let service = "SELECT count(*)::int FROM pg_stat_activity \
                   WHERE application_name = 'spillway cache service'";
    let killed: bool = direct
        .query_one(
            "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'spillway cache service'",
            &[],
        )
        .await
        .expect("terminate the service connection")
        .get(0);
    assert!(killed, "the LISTEN connection was found and terminated");
    // Notifications sent while it is down are lost, so nothing cached before may be
    // served: the next read is PostgreSQL's answer.
    let want = simple(&direct, ALL).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let got = simple(&proxy, ALL).await;
        if got == want {
            break;
        }
        assert_eq!(got, stale);
        assert!(
            Instant::now() < deadline,
            "the stale entry survived the loss of the LISTEN connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It reconnects, and caching resumes.
    wait_count(&direct, service, 1, "the service connection is back").await;
    cached(&proxy, &quiet, Via::Simple, ALL, EXTERNAL).await;
}

#[tokio::test]
async fn concurrent_misses_are_coalesced_into_one_upstream_query() {
    let (ctx, direct) = start(Context::builder(), GATE).await;
    let warm = ctx.proxy_client().await;
    // The catalog knows gate() and queries using it are cached.
    cached(
        &warm,
        &direct,
        Via::Simple,
        "SELECT v, gate(id) FROM t WHERE id = 5",
        "UPDATE t SET v = v || '+' WHERE id = 5",
    )
    .await;
    let sql = "SELECT v, gate(id) FROM t WHERE id = 1";
    let want = simple(&direct, sql).await;
    let mut readers: Vec<Client> = Vec::new();
    for _ in 0..4 {
        readers.push(ctx.proxy_client().await);
    }

    direct
        .batch_execute("SELECT pg_advisory_lock(42)")
        .await
        .expect("lock");
    let tasks: Vec<tokio::task::JoinHandle<Rows>> = readers
        .into_iter()
        .map(|c| tokio::spawn(async move { simple(&c, sql).await }))
        .collect();
    let running = "SELECT count(*)::int FROM pg_stat_activity \
                   WHERE query LIKE '%gate(%' AND state = 'active' AND pid <> pg_backend_pid()";
    wait_count(&direct, running, 1, "a read running upstream").await;
    // Time for the other three to go upstream too, if they were going to (well below
    // the 5 s a coalesced miss waits before going upstream itself).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let upstream: i32 = direct.query_one(running, &[]).await.expect("count").get(0);
    direct
        .batch_execute("SELECT pg_advisory_unlock(42)")
        .await
        .expect("unlock");
    for task in tasks {
        assert_eq!(task.await.expect("reader"), want);
    }
    assert_eq!(
        upstream, 1,
        "4 concurrent identical cacheable reads ran {upstream} times upstream"
    );
}
