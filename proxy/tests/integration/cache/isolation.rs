//! What a cache key keeps apart (SPEC §5 "Key", "Isolation"): roles, databases,
//! sessions after SET ROLE, result formats and protocols, and the settings that change
//! how values print.
//!
//! Each test makes one side's entry stale on purpose (an external write after a hit)
//! and checks that the other side still reads what PostgreSQL has: sharing the entry
//! would hand it the stale answer.

use tokio_postgres::Client;

use super::{
    ALL, BOTH, EXTERNAL, Via, cached, direct_addr, direct_as, extended, proxy_as, raw_rows, read,
    simple, start, wait_for_cached,
};
use crate::context::{Context, DB, USER};
use crate::wire::Raw;

const ROLES: &str = "CREATE ROLE ra LOGIN; CREATE ROLE rb LOGIN; GRANT SELECT ON t TO ra, rb;";

/// Reads `sql` twice in `via` and compares each answer with PostgreSQL's.
async fn reads_fresh(proxy: &Client, direct: &Client, via: Via, sql: &str, what: &str) {
    for i in 0..2 {
        assert_eq!(
            read(proxy, via, sql).await,
            read(direct, via, sql).await,
            "{what} ({via:?}, read {i}): served another key's entry"
        );
    }
}

#[tokio::test]
async fn entries_are_not_shared_between_roles() {
    let (ctx, direct) = start(Context::builder(), ROLES).await;
    let a = proxy_as(&ctx, "ra", DB).await;
    let b = proxy_as(&ctx, "rb", DB).await;
    for via in BOTH {
        let stale = cached(&a, &direct, via, ALL, EXTERNAL).await;
        reads_fresh(
            &b,
            &direct,
            via,
            ALL,
            &format!("role rb after ra's hit on {stale:?}"),
        )
        .await;
    }
}

#[tokio::test]
async fn entries_are_not_shared_between_databases() {
    let (ctx, direct) = start(Context::builder(), "").await;
    direct
        .batch_execute("CREATE DATABASE other")
        .await
        .expect("create database");
    let direct_other = direct_as(&ctx, USER, "other").await;
    direct_other
        .batch_execute(super::SETUP)
        .await
        .expect("setup other");
    direct_other
        .batch_execute("UPDATE t SET v = 'other ' || v")
        .await
        .expect("other content");
    let proxy = ctx.proxy_client().await;
    let proxy_other = proxy_as(&ctx, USER, "other").await;
    // `other` has its own catalog; until it is loaded its reads pass through uncached
    // and would prove nothing.
    cached(
        &proxy_other,
        &direct_other,
        Via::Simple,
        "SELECT v FROM t WHERE id = 2",
        "UPDATE t SET v = v || '+' WHERE id = 2",
    )
    .await;
    for via in BOTH {
        let stale = cached(&proxy, &direct, via, ALL, EXTERNAL).await;
        let what = format!("database other after postgres' hit on {stale:?}");
        reads_fresh(&proxy_other, &direct_other, via, ALL, &what).await;
    }
}

#[tokio::test]
async fn nothing_is_served_from_the_cache_after_set_role() {
    let (ctx, direct) = start(Context::builder(), ROLES).await;
    for set in ["SET ROLE ra", "SET SESSION AUTHORIZATION rb"] {
        let session = ctx.proxy_client().await;
        for via in BOTH {
            cached(&session, &direct, via, ALL, EXTERNAL).await;
        }
        session.batch_execute(set).await.expect(set);
        for round in 0..5 {
            for via in BOTH {
                assert_eq!(
                    read(&session, via, ALL).await,
                    read(&direct, via, ALL).await,
                    "after `{set}`, round {round} ({via:?}): served from the cache"
                );
            }
            // Whatever that read may have stored is now stale.
            direct
                .batch_execute(EXTERNAL)
                .await
                .expect("external write");
        }
    }
}

#[tokio::test]
async fn protocols_and_result_formats_are_cached_separately() {
    let (ctx, direct) = start(Context::builder(), "").await;
    let proxy = ctx.proxy_client().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut raw_direct = Raw::startup(direct_addr(&ctx), USER, DB).await;
    // An int column: its text and binary encodings differ.
    let bump = "UPDATE t SET n = n + 1 WHERE id = 1";
    let query = |k: i32| format!("SELECT id, n FROM t WHERE id <= {k} ORDER BY id");

    // Simple (text) cached, then the same text in the extended protocol, binary results.
    let sql = query(1);
    cached(&proxy, &direct, Via::Simple, &sql, bump).await;
    assert_eq!(
        extended(&proxy, &sql, &[]).await,
        extended(&direct, &sql, &[]).await,
        "extended/binary served the simple/text entry"
    );

    // Extended (binary) cached, then simple.
    let sql = query(2);
    cached(&proxy, &direct, Via::Extended, &sql, bump).await;
    assert_eq!(
        simple(&proxy, &sql).await,
        simple(&direct, &sql).await,
        "simple/text served the extended/binary entry"
    );

    // Extended with text results cached, then extended with binary results.
    let sql = query(3);
    wait_for_cached(
        async || raw_rows(&mut raw, &sql).await,
        async || raw_rows(&mut raw_direct, &sql).await,
        &direct,
        bump,
    )
    .await;
    assert_eq!(
        extended(&proxy, &sql, &[]).await,
        extended(&direct, &sql, &[]).await,
        "binary results served the text-result entry"
    );

    // Extended with binary results cached, then with text results.
    let sql = query(4);
    cached(&proxy, &direct, Via::Extended, &sql, bump).await;
    assert_eq!(
        raw_rows(&mut raw, &sql).await,
        raw_rows(&mut raw_direct, &sql).await,
        "text results served the binary-result entry"
    );
}

#[tokio::test]
async fn sessions_with_different_time_settings_get_their_own_results() {
    let (ctx, _) = start(
        Context::builder(),
        "CREATE TABLE tz (id int PRIMARY KEY, ts timestamptz NOT NULL);
         INSERT INTO tz VALUES (1, '2024-03-05 21:30:00+00'), (2, '1999-12-31 23:59:59.5+00');",
    )
    .await;
    let sql = "SELECT id, ts::text FROM tz ORDER BY id";
    let settings = [
        "SET TimeZone = 'UTC'",
        "SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'SQL, DMY'",
        // Differs from the first only in DateStyle.
        "SET TimeZone = 'UTC'; SET DateStyle = 'German'",
        // The server's defaults.
        "",
    ];
    let mut sessions = Vec::new();
    for set in settings {
        let proxy = ctx.proxy_client().await;
        let direct = ctx.direct_client().await;
        for c in [&proxy, &direct] {
            c.batch_execute(set).await.expect(set);
        }
        sessions.push((set, proxy, direct));
    }

    // The first session's entry, stale on purpose; no other session may get it.
    let (_, proxy0, direct0) = &sessions[0];
    cached(
        proxy0,
        direct0,
        Via::Simple,
        sql,
        "UPDATE tz SET ts = ts + interval '1 hour' WHERE id = 1",
    )
    .await;
    for (set, proxy, direct) in &sessions[1..] {
        reads_fresh(proxy, direct, Via::Simple, sql, &format!("`{set}`")).await;
    }

    // A write through spillway drops everything; then each session fills and hits its
    // own entries, each equal to a direct session with the same settings.
    proxy0
        .batch_execute("UPDATE tz SET ts = ts WHERE id = 2")
        .await
        .expect("update through spillway");
    for round in 0..2 {
        for (set, proxy, direct) in &sessions {
            for via in BOTH {
                reads_fresh(proxy, direct, via, sql, &format!("round {round}, `{set}`")).await;
            }
        }
    }
}
