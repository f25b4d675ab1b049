//! Per-row invalidation: a cached read that fixes a table's whole primary key depends
//! on its row only. A write to another key (through spillway, in the simple and the
//! extended protocol, or with psql behind spillway's back and the change stream)
//! leaves it a hit; a write to its own key makes it a miss that returns the new value.

use std::time::{Duration, Instant};

use spillway_policies::cache::{Registry, row_stripes_for};

use crate::context::{Context, DB};
use crate::metrics::scrape;

const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL); \
     INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g";

/// Two keys of `items` whose row stripes differ (a shared stripe only invalidates
/// more), computed as spillway computes them: from the database, the table's OID and
/// the number of stripes the default `cache.max_bytes` (256 MiB) gives.
async fn two_keys(ctx: &Context) -> (i32, i32) {
    let oid: u32 = ctx
        .direct_client()
        .await
        .query_one("SELECT 'items'::regclass::oid", &[])
        .await
        .expect("oid of items")
        .get(0);
    let registry = Registry::with_row_stripes(row_stripes_for(256 << 20));
    let table = registry.database(DB).table_versions(oid);
    let first = 1;
    let other = (2..)
        .find(|k: &i32| table.stripe_of(&[k.to_string()]) != table.stripe_of(&[first.to_string()]))
        .expect("another stripe");
    (first, other)
}

/// Hits so far. A session counts a hit just after it answered, so the count is read
/// after a pause.
async fn hits(ctx: &Context) -> f64 {
    tokio::time::sleep(Duration::from_millis(50)).await;
    scrape(ctx.proxy.metrics_addr())
        .await
        .lines()
        .filter(|l| l.starts_with("spillway_cache_hits_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn extended(client: &tokio_postgres::Client, id: i32) -> Option<String> {
    client
        .query_opt("SELECT v FROM items WHERE id = $1", &[&id])
        .await
        .expect("point read")
        .map(|r| r.get(0))
}

async fn simple(client: &tokio_postgres::Client, id: i32) -> Option<String> {
    let rows = client
        .simple_query(&format!("SELECT v FROM items WHERE id = {id}"))
        .await
        .expect("point read");
    rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    })
}

/// Reads key `id` both ways until each read is a hit (the catalog loads after
/// spillway starts: until then nothing is cached).
async fn cache_both(ctx: &Context, client: &tokio_postgres::Client, id: i32) {
    let since = Instant::now();
    loop {
        let e = extended(client, id).await;
        let s = simple(client, id).await;
        let (e_hit, e_again) = hit(ctx, extended(client, id)).await;
        let (s_hit, s_again) = hit(ctx, simple(client, id)).await;
        assert_eq!((e_again, s_again), (e, s));
        if e_hit && s_hit {
            return;
        }
        assert!(since.elapsed() < Duration::from_secs(10), "never cached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `read` was answered from the cache, and its value.
async fn hit<F: std::future::Future<Output = Option<String>>>(
    ctx: &Context,
    read: F,
) -> (bool, Option<String>) {
    let before = hits(ctx).await;
    let value = read.await;
    (hits(ctx).await - before == 1.0, value)
}

/// A write to `written` is visible at once; the cached reads of `other` stay hits.
async fn check(
    ctx: &Context,
    client: &tokio_postgres::Client,
    written: i32,
    other: i32,
    new: &str,
) {
    let old = Some(format!("v{other}"));
    assert_eq!(
        hit(ctx, extended(client, other)).await,
        (true, old.clone()),
        "the extended read of another key stayed cached"
    );
    assert_eq!(
        hit(ctx, simple(client, other)).await,
        (true, old),
        "the simple read of another key stayed cached"
    );
    let new = Some(new.to_owned());
    assert_eq!(
        hit(ctx, extended(client, written)).await,
        (false, new.clone()),
        "the extended read of the written key was a miss"
    );
    assert_eq!(
        hit(ctx, simple(client, written)).await,
        (false, new),
        "the simple read of the written key was a miss"
    );
}

#[tokio::test]
async fn writes_through_spillway_invalidate_only_their_rows() {
    let ctx = Context::builder()
        .section("[cache]\nttl = \"1h\"")
        .before_proxy(SCHEMA)
        .start()
        .await;
    let client = ctx.proxy_client().await;
    let (k1, k2) = two_keys(&ctx).await;
    for k in [k1, k2] {
        cache_both(&ctx, &client, k).await;
    }
    // Simple protocol, a literal key.
    client
        .simple_query(&format!("UPDATE items SET v = 'a' WHERE id = {k1}"))
        .await
        .expect("update");
    check(&ctx, &client, k1, k2, "a").await;
    // Extended protocol, the key a (binary) parameter.
    cache_both(&ctx, &client, k1).await;
    client
        .execute("UPDATE items SET v = 'b' WHERE id = $1", &[&k1])
        .await
        .expect("update");
    check(&ctx, &client, k1, k2, "b").await;
    // A write whose keys are not known invalidates the table: the other key too.
    cache_both(&ctx, &client, k2).await;
    client
        .simple_query(&format!(
            "UPDATE items SET v = 'c' WHERE id = {k1} OR v = 'zz'"
        ))
        .await
        .expect("update");
    let before = hits(&ctx).await;
    assert_eq!(extended(&client, k2).await, Some(format!("v{k2}")));
    assert_eq!(
        hits(&ctx).await - before,
        0.0,
        "a table-wide write is a miss"
    );
    assert_eq!(extended(&client, k1).await.as_deref(), Some("c"));
    // A read of the whole table is invalidated by a keyed write.
    let before = whole(&client).await;
    assert_eq!(whole(&client).await, before);
    client
        .execute("UPDATE items SET v = 'd' WHERE id = $1", &[&k2])
        .await
        .expect("update");
    let after = whole(&client).await;
    assert_ne!(
        after, before,
        "a keyed write invalidates reads of the whole table"
    );
    assert!(after.contains(",d,") || after.starts_with("d,"), "{after}");
}

#[tokio::test]
async fn psql_writes_with_the_change_stream_invalidate_only_their_rows() {
    let ctx = Context::builder()
        .pg(|b| {
            b.conf("wal_level = logical")
                .conf("synchronous_commit = on")
        })
        .section("[cache]\ninvalidation = \"replication\"\nttl = \"1h\"")
        .before_proxy(SCHEMA)
        .start()
        .await;
    let client = ctx.proxy_client().await;
    let (k1, k2) = two_keys(&ctx).await;
    for round in 0..5 {
        for k in [k1, k2] {
            cache_both(&ctx, &client, k).await;
        }
        let new = format!("r{round}");
        ctx.pg
            .psql(DB, &format!("UPDATE items SET v = '{new}' WHERE id = {k1}"))
            .expect("psql update");
        // Waited for with another statement (its own cache entry, a point read too).
        let since = Instant::now();
        while client
            .query_one(
                "SELECT v FROM items WHERE id = $1 AND v IS NOT NULL",
                &[&k1],
            )
            .await
            .expect("read")
            .get::<_, String>(0)
            != new
        {
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "change not seen within 5s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        check(&ctx, &client, k1, k2, &new).await;
    }
    // A row inserted behind spillway's back is seen by a cached read of its
    // (then missing) key.
    assert_eq!(extended(&client, 1000).await, None);
    assert_eq!(extended(&client, 1000).await, None);
    ctx.pg
        .psql(DB, "INSERT INTO items VALUES (1000, 'new')")
        .expect("psql insert");
    let since = Instant::now();
    while extended(&client, 1000).await.is_none() {
        assert!(since.elapsed() < Duration::from_secs(5), "insert not seen");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn whole(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT string_agg(v, ',' ORDER BY id) FROM items", &[])
        .await
        .expect("whole-table read")
        .get(0)
}

#[tokio::test]
async fn deferred_writes_invalidate_only_their_rows_at_ack_and_apply() {
    let ctx = Context::builder()
        .section(
            "[cache]\nttl = \"1h\"\n[flush]\ninterval = \"1h\"\n\
             [tables.\"public.items\"]\npolicy = \"write-behind\"\n",
        )
        .before_proxy(SCHEMA)
        .start()
        .await;
    let client = ctx.proxy_client().await;
    let (k1, k2) = two_keys(&ctx).await;
    for (round, new) in ["a", "b"].into_iter().enumerate() {
        for k in [k1, k2] {
            cache_both(&ctx, &client, k).await;
        }
        if round == 0 {
            client
                .simple_query(&format!("UPDATE items SET v = '{new}' WHERE id = {k1}"))
                .await
                .expect("deferred update");
        } else {
            client
                .execute("UPDATE items SET v = $2 WHERE id = $1", &[&k1, &new])
                .await
                .expect("deferred update");
        }
        client.simple_query("SPILLWAY FLUSH").await.expect("flush");
        assert_eq!(
            ctx.psql_direct(&format!("SELECT v FROM items WHERE id = {k1}"))
                .trim(),
            new,
            "applied"
        );
        check(&ctx, &client, k1, k2, new).await;
    }
}
