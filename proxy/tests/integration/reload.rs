//! Hot reload through the real binary (SPEC §7): SIGHUP and the console's `RELOAD`
//! move a table from write-behind to write-through after flushing its pending writes
//! (none lost, none reordered, later writes applied at once); an invalid config is
//! rejected whole and the old one keeps serving; cache on/off and TTL changes take
//! effect; fallback log lines are rate-limited; `log.format = "json"` writes JSON lines
//! with a span per flush batch.

use std::time::Duration;

use crate::admin::{ADMIN, hash_password, psql, rows};
use crate::cache::wait_for_cached;
use crate::context::{Context, ContextBuilder, eventually};
use crate::write_behind::{direct_rows, tag};

const TABLES: &str = "CREATE TABLE public.rl (id int PRIMARY KEY, v text); \
                      CREATE TABLE public.nopk (id int, v text); \
                      CREATE TABLE public.c (id int PRIMARY KEY, v text); \
                      INSERT INTO public.c VALUES (1, 'old');";

/// `public.rl` write-behind, flushed only every hour (pending writes stay pending),
/// and the admin console on.
fn builder() -> ContextBuilder {
    let verifier = hash_password(crate::admin::PASSWORD);
    Context::builder().before_proxy(TABLES).section(&format!(
        "[admin]\nusers = [\"{ADMIN}\"]\npassword = \"{verifier}\"\n\
         [flush]\ninterval = \"1h\"\n\
         [tables.\"public.rl\"]\npolicy = \"write-behind\"\n"
    ))
}

/// The running config with `from` replaced by `to` (exactly once).
fn edited(ctx: &Context, from: &str, to: &str) -> String {
    let config = ctx.config_text();
    assert_eq!(config.matches(from).count(), 1, "{from:?} in {config}");
    config.replacen(from, to, 1)
}

/// Acknowledged deferred writes to `public.rl` that PostgreSQL does not have yet.
async fn pending_writes(ctx: &Context, client: &tokio_postgres::Client) {
    for i in 1..=5 {
        assert_eq!(
            tag(
                client,
                &format!("INSERT INTO rl (id, v) VALUES ({i}, 'v{i}')")
            )
            .await,
            1
        );
    }
    // An update of a key whose insert is still pending: applied in the wrong order it
    // would find no row.
    assert_eq!(tag(client, "UPDATE rl SET v = 'u2' WHERE id = 2").await, 1);
    assert_eq!(tag(client, "DELETE FROM rl WHERE id = 5").await, 1);
    assert_eq!(
        direct_rows(ctx, "SELECT count(*) FROM rl"),
        "0",
        "still pending"
    );
}

/// Every acknowledged write is in, exactly once: `expected` is `id|v` per row.
fn assert_final(ctx: &Context, expected: &[&str]) {
    let got = direct_rows(ctx, "SELECT id, v FROM rl ORDER BY id");
    assert_eq!(got.lines().collect::<Vec<_>>(), expected, "table rl");
}

#[tokio::test]
async fn sighup_moves_a_table_off_write_behind_after_flushing_it() {
    let ctx = builder().start().await;
    let client = ctx.proxy_client().await;
    pending_writes(&ctx, &client).await;

    ctx.write_config(&edited(
        &ctx,
        "policy = \"write-behind\"",
        "policy = \"write-through\"",
    ));
    ctx.proxy.signal("HUP");
    // Sent while the reload may be running: before it, deferred and then flushed;
    // during it, after the table's barrier; after it, write-through. In order anyway.
    assert_eq!(tag(&client, "UPDATE rl SET v = 'u1' WHERE id = 1").await, 1);
    assert!(
        eventually(Duration::from_secs(20), || ctx
            .proxy
            .logs()
            .contains("configuration reloaded"))
        .await,
        "no reload logged:\n{}",
        ctx.proxy.logs()
    );
    // The pending writes are upstream (the flush interval is an hour).
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM rl"), "4");
    // A new write runs write-through: PostgreSQL has it when it is acknowledged.
    assert_eq!(
        tag(&client, "INSERT INTO rl (id, v) VALUES (6, 'v6')").await,
        1
    );
    assert_eq!(direct_rows(&ctx, "SELECT v FROM rl WHERE id = 6"), "v6");
    assert_eq!(tag(&client, "UPDATE rl SET v = 'u3' WHERE id = 3").await, 1);
    assert_eq!(direct_rows(&ctx, "SELECT v FROM rl WHERE id = 3"), "u3");
    assert_final(&ctx, &["1|u1", "2|u2", "3|u3", "4|v4", "6|v6"]);
    let logs = ctx.proxy.logs();
    assert!(logs.contains("tables left their deferred policy"), "{logs}");
}

#[tokio::test]
async fn console_reload_answers_after_the_flush_of_tables_leaving_deferral() {
    let ctx = builder().start().await;
    let client = ctx.proxy_client().await;
    pending_writes(&ctx, &client).await;

    // Plus a key that needs a restart: reported and logged, the rest applied.
    let config = edited(
        &ctx,
        "policy = \"write-behind\"",
        "policy = \"write-through\"\nttl = \"5m\"",
    )
    .replacen("shutdown_timeout = \"5s\"", "shutdown_timeout = \"6s\"", 1);
    ctx.write_config(&config);
    let out = psql(&ctx, "RELOAD");
    let changed = rows(&out);
    assert_eq!(
        changed,
        [
            ["server.shutdown_timeout", "at restart"],
            ["tables.\"public.rl\".policy", "now"],
            ["tables.\"public.rl\".ttl", "now"]
        ],
        "RELOAD rows"
    );
    assert!(
        ctx.proxy
            .logs()
            .contains("server.shutdown_timeout changed; it takes effect at restart"),
        "{}",
        ctx.proxy.logs()
    );
    // RELOAD answered only once the pending writes were applied: no waiting here.
    assert_final(&ctx, &["1|v1", "2|u2", "3|v3", "4|v4"]);
    assert_eq!(
        tag(&client, "INSERT INTO rl (id, v) VALUES (7, 'v7')").await,
        1
    );
    assert_eq!(direct_rows(&ctx, "SELECT v FROM rl WHERE id = 7"), "v7");
    // SHOW TABLES shows the config in force.
    let tables = rows(&psql(&ctx, "SHOW TABLES"));
    let rl = tables
        .iter()
        .find(|r| r[0] == "public.rl")
        .expect("public.rl in SHOW TABLES");
    assert_eq!(rl[1], "write-through");
    assert_eq!(rl[4], "5m");

    // And back onto write-behind: the catalog checks pass, writes are deferred again.
    ctx.write_config(&edited(
        &ctx,
        "policy = \"write-behind\"",
        "policy = \"write-behind\"\nttl = \"5m\"",
    ));
    let out = psql(&ctx, "RELOAD");
    assert_eq!(rows(&out), [["tables.\"public.rl\".policy", "now"]]);
    assert_eq!(
        tag(&client, "INSERT INTO rl (id, v) VALUES (8, 'v8')").await,
        1
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM rl WHERE id = 8"),
        "0",
        "deferred again"
    );
}

#[tokio::test]
async fn an_invalid_reload_is_rejected_whole_and_the_old_config_keeps_serving() {
    let ctx = builder().start().await;
    let client = ctx.proxy_client().await;
    assert_eq!(
        tag(&client, "INSERT INTO rl (id, v) VALUES (1, 'a')").await,
        1
    );

    // An unknown key, next to a valid change that must not be applied either.
    ctx.write_config(&edited(
        &ctx,
        "policy = \"write-behind\"",
        "policy = \"write-through\"\nbogus = 1",
    ));
    let out = psql(&ctx, "RELOAD");
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reload rejected") && stderr.contains("bogus"),
        "{stderr}"
    );

    // A deferred policy on a table without a primary key fails the catalog checks.
    ctx.write_config(&format!(
        "{}[tables.\"public.nopk\"]\npolicy = \"write-behind\"\n",
        ctx.config_text()
    ));
    let console = crate::context::connect(&format!(
        "host=127.0.0.1 port={} user={ADMIN} dbname=spillway password='{}' sslmode=disable",
        ctx.proxy.addr.port(),
        crate::admin::PASSWORD
    ))
    .await;
    let err = console.simple_query("RELOAD").await.expect_err("refused");
    assert_eq!(err.code().map(|c| c.code()), Some("F0000"));
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("public.nopk") && m.contains("primary key")),
        "{message:?}"
    );

    // The same over SIGHUP: logged, and spillway goes on.
    ctx.proxy.signal("HUP");
    assert!(
        eventually(Duration::from_secs(20), || ctx
            .proxy
            .logs()
            .matches("configuration reload rejected")
            .count()
            >= 3)
        .await,
        "{}",
        ctx.proxy.logs()
    );

    // The old config serves: rl is still write-behind, its writes still deferred.
    assert_eq!(
        tag(&client, "INSERT INTO rl (id, v) VALUES (2, 'b')").await,
        1
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM rl"),
        "0",
        "still deferred"
    );
    assert!(!ctx.proxy.logs().contains("configuration reloaded"));
    // And they are applied as before (a barrier).
    let read = client
        .simple_query("SELECT count(*) FROM rl")
        .await
        .expect("read");
    let count = read.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(count.as_deref(), Some("2"));
}

/// Reads `v` of `public.c` id 1 through spillway.
async fn read_c(client: &tokio_postgres::Client) -> String {
    let msgs = client
        .simple_query("SELECT v FROM c WHERE id = 1")
        .await
        .expect("read c");
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test]
async fn cache_on_off_and_ttl_changes_take_effect_at_reload() {
    let ctx = builder()
        .section("[cache]\nttl = \"1h\"\n[tables.\"public.c\"]\ncache = true\n")
        .start()
        .await;
    let client = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;
    // Changed behind spillway's back (invalidation = "ttl"): only PostgreSQL sees it.
    let change = "UPDATE c SET v = v || '+' WHERE id = 1";
    wait_for_cached(
        async || read_c(&client).await,
        async || read_c(&direct).await,
        &direct,
        change,
    )
    .await;

    ctx.write_config(&edited(&ctx, "cache = true", "cache = false"));
    assert_eq!(
        rows(&psql(&ctx, "RELOAD")),
        [["tables.\"public.c\".cache", "now"]]
    );
    assert_eq!(
        read_c(&client).await,
        read_c(&direct).await,
        "cache off for c"
    );
    direct.batch_execute(change).await.expect("change");
    assert_eq!(read_c(&client).await, read_c(&direct).await, "still off");

    // On again, with a 1 s TTL instead of the hour: cached, then expired.
    ctx.write_config(&edited(&ctx, "cache = true", "cache = true\nttl = \"1s\""));
    rows(&psql(&ctx, "RELOAD"));
    let stale = wait_for_cached(
        async || read_c(&client).await,
        async || read_c(&direct).await,
        &direct,
        change,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fresh = read_c(&client).await;
    assert_ne!(fresh, stale, "expired after the new TTL");
    assert_eq!(fresh, read_c(&direct).await);
}

#[tokio::test]
async fn a_burst_of_fallbacks_logs_a_bounded_number_of_lines() {
    let ctx = builder().start().await;
    let client = ctx.proxy_client().await;
    // A write with other statements in its Query is never deferred: a fallback each.
    for i in 0..40 {
        client
            .simple_query(&format!(
                "BEGIN; INSERT INTO rl (id, v) VALUES ({i}, 'x'); COMMIT"
            ))
            .await
            .expect("transaction");
    }
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM rl"), "40");
    let logs = ctx.proxy.logs();
    let lines = logs
        .lines()
        .filter(|l| l.contains("ran write-through (fallback)") && l.contains("public.rl"))
        .count();
    assert_eq!(lines, 1, "one line for the burst:\n{logs}");
    let metrics = crate::metrics::scrape(ctx.proxy.metrics_addr()).await;
    let counted = crate::metrics::sample(
        &metrics,
        spillway::metrics::FALLBACKS,
        "table=\"public.rl\",reason=\"multiple_statements\"",
    );
    assert_eq!(counted, 40.0, "each fallback is still counted");
}

#[tokio::test]
async fn json_logs_are_json_lines_with_a_span_per_flush_batch() {
    let ctx = Context::builder()
        .before_proxy(TABLES)
        .section(
            "[log]\nformat = \"json\"\n[flush]\ninterval = \"1h\"\n\
             [tables.\"public.rl\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await;
    let client = ctx.proxy_client().await;
    for i in 1..=3 {
        assert_eq!(
            tag(
                &client,
                &format!("INSERT INTO rl (id, v) VALUES ({i}, 'x')")
            )
            .await,
            1
        );
    }
    client.simple_query("SPILLWAY FLUSH").await.expect("flush");
    let found = eventually(Duration::from_secs(10), || {
        ctx.proxy.logs().contains("flush batch applied")
    })
    .await;
    assert!(found, "{}", ctx.proxy.logs());
    let mut batch = None;
    for line in ctx.proxy.logs().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "flush batch applied" {
            batch = Some(v);
        }
    }
    let batch = batch.expect("a flush batch line");
    let span = &batch["span"];
    assert_eq!(span["name"], "flush_batch", "{batch}");
    assert_eq!(span["records"], 3, "{batch}");
    assert_eq!(span["rows"], 3, "{batch}");
    assert!(span["through"].as_u64().is_some() && span["statements"].as_u64().is_some());
}

#[tokio::test]
async fn writes_racing_a_reload_off_write_behind_are_all_applied_in_order() {
    let ctx = Context::builder()
        .before_proxy(
            "CREATE TABLE public.rc (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0, \
             v int NOT NULL DEFAULT 0); \
             INSERT INTO public.rc (id) SELECT generate_series(1, 4);",
        )
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.rc\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await;
    let reloaded = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for k in 1..=4 {
        let client = ctx.proxy_client().await;
        let reloaded = reloaded.clone();
        // Each writer owns a key: an increment, then the iteration number, until 20
        // iterations after the reload finished. Applied out of order, `v` would not end
        // at the last iteration; lost, `n` would fall short.
        writers.push(tokio::spawn(async move {
            let (mut i, mut after) = (0u32, 0);
            while after < 20 {
                i += 1;
                let inc = format!("UPDATE rc SET n = n + 1 WHERE id = {k}");
                assert_eq!(tag(&client, &inc).await, 1);
                let set = format!("UPDATE rc SET v = {i} WHERE id = {k}");
                assert_eq!(tag(&client, &set).await, 1);
                if reloaded.load(std::sync::atomic::Ordering::SeqCst) {
                    after += 1;
                }
                assert!(i < 100_000, "the reload never finished");
            }
            i
        }));
    }
    // Let the writers get going on write-behind first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ctx.write_config(&edited(
        &ctx,
        "policy = \"write-behind\"",
        "policy = \"write-through\"",
    ));
    ctx.proxy.signal("HUP");
    assert!(
        eventually(Duration::from_secs(30), || ctx
            .proxy
            .logs()
            .contains("configuration reloaded"))
        .await,
        "{}",
        ctx.proxy.logs()
    );
    reloaded.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut expected = Vec::new();
    for (k, w) in (1..=4).zip(writers) {
        let n = w.await.expect("writer");
        expected.push(format!("{k}|{n}|{n}"));
    }
    let logs = ctx.proxy.logs();
    assert!(
        logs.contains("flushing the pending writes of tables leaving a deferred policy"),
        "writes were pending at the reload:\n{logs}"
    );
    // Write-through now: everything acknowledged is in PostgreSQL, exactly once.
    let got = direct_rows(&ctx, "SELECT id, n, v FROM rc ORDER BY id");
    assert_eq!(got.lines().collect::<Vec<_>>(), expected);
}

#[tokio::test]
async fn log_level_changes_at_reload() {
    // An empty RUST_LOG leaves the filter to log.level.
    let ctx = Context::builder()
        .env("RUST_LOG", "")
        .section("[log]\nlevel = \"info\"\n")
        .start()
        .await;
    drop(ctx.proxy_client().await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!ctx.proxy.logs().contains("DEBUG"), "{}", ctx.proxy.logs());

    ctx.write_config(&edited(
        &ctx,
        "level = \"info\"",
        "level = \"spillway=debug,info\"",
    ));
    ctx.proxy.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || ctx
            .proxy
            .logs()
            .contains("configuration reloaded"))
        .await
    );
    // A session's clean close is logged at debug.
    drop(ctx.proxy_client().await);
    assert!(
        eventually(Duration::from_secs(10), || ctx
            .proxy
            .logs()
            .contains("session closed"))
        .await,
        "{}",
        ctx.proxy.logs()
    );
}

#[tokio::test]
async fn a_reload_moves_a_table_between_write_behind_and_write_back() {
    let ctx = builder().start().await;
    let client = ctx.proxy_client().await;
    pending_writes(&ctx, &client).await;

    // Write-back takes over the pending writes (acknowledged with exact counts) and
    // folds them with the ones that follow.
    let back = edited(&ctx, "policy = \"write-behind\"", "policy = \"write-back\"");
    ctx.write_config(&back);
    let out = psql(&ctx, "RELOAD");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(tag(&client, "UPDATE rl SET v = 'u1' WHERE id = 1").await, 1);
    assert_eq!(tag(&client, "DELETE FROM rl WHERE id = 3").await, 1);
    tag(&client, "SPILLWAY FLUSH").await;
    assert_final(&ctx, &["1|u1", "2|u2", "4|v4"]);

    // Assumed row counts do not tell write-back which keys exist: refused.
    let assumed = edited(
        &ctx,
        "policy = \"write-behind\"",
        "policy = \"write-behind\"\nrow_counts = \"assumed\"",
    );
    ctx.write_config(&assumed);
    assert!(psql(&ctx, "RELOAD").status.success());
    assert_eq!(
        tag(&client, "INSERT INTO rl (id, v) VALUES (7, 'x')").await,
        1
    );
    ctx.write_config(&back);
    let out = psql(&ctx, "RELOAD");
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("write-back cannot take over"), "{stderr}");
    tag(&client, "SPILLWAY FLUSH").await;
    assert_final(&ctx, &["1|u1", "2|u2", "4|v4", "7|x"]);
}

#[tokio::test]
async fn write_back_is_refused_on_tables_linked_by_foreign_keys() {
    let ctx = builder().start().await;
    ctx.psql_direct(
        "CREATE TABLE public.parent (id int PRIMARY KEY); \
         CREATE TABLE public.kid (id int PRIMARY KEY, \
             parent int REFERENCES public.parent (id) ON DELETE CASCADE);",
    );
    // Either side of the foreign key: folding per key would let the cascade (or the
    // check) see rows in another order than the client wrote them.
    for table in ["parent", "kid"] {
        ctx.write_config(&format!(
            "{}[tables.\"public.{table}\"]\npolicy = \"write-back\"\n",
            ctx.config_text()
        ));
        let out = psql(&ctx, "RELOAD");
        assert!(!out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("public.{table}")) && stderr.contains("foreign key"),
            "{stderr}"
        );
    }
    // Write-behind keeps the order, so it is fine.
    ctx.write_config(&format!(
        "{}[tables.\"public.kid\"]\npolicy = \"write-behind\"\n",
        ctx.config_text()
    ));
    let out = psql(&ctx, "RELOAD");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn write_back_never_folds_writes_acknowledged_with_assumed_counts() {
    let ctx = builder().start().await;
    ctx.psql_direct("INSERT INTO rl (id, v) VALUES (50, 'upstream')");
    let assumed = edited(
        &ctx,
        "policy = \"write-behind\"",
        "policy = \"write-behind\"\nrow_counts = \"assumed\"",
    );
    ctx.write_config(&assumed);
    assert!(psql(&ctx, "RELOAD").status.success());
    let client = ctx.proxy_client().await;
    // Acknowledged without a point read: in order, the INSERT is refused (the key
    // exists) and becomes a dead letter, then the DELETE removes the row. Folded, the
    // two would cancel and the row would stay.
    tag(&client, "INSERT INTO rl (id, v) VALUES (50, 'again')").await;
    tag(&client, "DELETE FROM rl WHERE id = 50").await;
    // Two reloads: exact counts first (allowed), then write-back, which takes over the
    // pending writes.
    ctx.write_config(&ctx.config_text().replace(
        "policy = \"write-behind\"",
        "policy = \"write-behind\"\nrow_counts = \"exact\"",
    ));
    assert!(psql(&ctx, "RELOAD").status.success());
    ctx.write_config(&edited(
        &ctx,
        "policy = \"write-behind\"",
        "policy = \"write-back\"",
    ));
    assert!(psql(&ctx, "RELOAD").status.success());
    tag(&client, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM rl WHERE id = 50"),
        "0"
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT sqlstate FROM spillway.dead_letters"),
        "23505"
    );
}
