//! Differential test of per-row invalidation with the change stream
//! (`cache.invalidation = "replication"`): the seeded mix of `differential.rs`
//! (point, range, aggregate and join reads; keyed and unkeyed writes) where half the
//! writes go through spillway and half straight to PostgreSQL, behind its back.
//!
//! A stale read is one that started after a write was acknowledged and returned what
//! PostgreSQL held before it. A write through spillway is acknowledged when its
//! answer arrives. A direct write is acknowledged, as far as spillway can know of it,
//! when the replication slot's confirmed position passes it: the stream confirms a
//! position only after the cache applied every commit before it (the follower's
//! invariant), so the test waits for that before the next step. Every read through
//! spillway is repeated at once on a direct connection in the same mode; any
//! difference is a stale read.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use crate::cache::simple;
use crate::context::Context;
use crate::differential::{
    CLIENTS, MODES, Mode, OPS, READS, SEED, SETUP, Session, WRITES, read_params, write_params,
};
use crate::metrics::scrape;

const SLOT: &str = "spillway_postgres";

/// Waits until the slot's confirmed position passes everything committed so far on
/// `direct`. The position after the last commit may lie past the last commit's end
/// (other WAL): an insert into `warm` every 100 ms moves the slot past it then.
pub(super) async fn stream_caught_up(direct: &Client) {
    let lsn: String = direct
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let since = Instant::now();
    let mut nudged = Instant::now();
    loop {
        let done: bool = direct
            .query_one(
                "SELECT coalesce(bool_or(confirmed_flush_lsn >= $1::text::pg_lsn), false) \
                 FROM pg_replication_slots WHERE slot_name = $2",
                &[&lsn, &SLOT],
            )
            .await
            .expect("slot position")
            .get(0);
        if done {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the stream did not pass {lsn} within 10 s"
        );
        if nudged.elapsed() > Duration::from_millis(100) {
            direct
                .batch_execute("INSERT INTO warm VALUES (0)")
                .await
                .expect("nudge");
            nudged = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn writers_through_spillway_and_behind_it_never_cause_a_stale_read() {
    let ctx = Context::builder()
        .pg(|b| {
            b.conf("wal_level = logical")
                .conf("synchronous_commit = on")
        })
        .section("[cache]\ninvalidation = \"replication\"\nttl = \"1h\"")
        .before_proxy(SETUP)
        .start()
        .await;
    let direct_client = ctx.direct_client().await;
    let mut sessions = Vec::new();
    for _ in 0..CLIENTS {
        sessions.push(Session::new(ctx.proxy_client().await));
    }
    // Caching is on (the catalog is loaded, the stream follows) before the run.
    let since = Instant::now();
    loop {
        let before = hits(&ctx).await;
        simple(&sessions[0].client, "SELECT v FROM warm").await;
        simple(&sessions[0].client, "SELECT v FROM warm").await;
        if hits(&ctx).await > before {
            break;
        }
        assert!(since.elapsed() < Duration::from_secs(10), "never cached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut direct = Session::new(direct_client);

    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(SEED ^ 0x57_2ea3);
    let mut stale = Vec::new();
    let mut reads: HashMap<Mode, usize> = HashMap::new();
    let (mut through, mut behind) = (0, 0);
    let hits_before = hits(&ctx).await;
    for step in 0..OPS {
        let client = rng.random_range(0..CLIENTS);
        let mode = MODES[rng.random_range(0..MODES.len())];
        if rng.random_bool(0.8) {
            let index = rng.random_range(0..READS.len());
            let (sql, _) = READS[index];
            let params = read_params(&mut rng, index);
            let proxy = sessions[client].run(mode, sql, &params).await;
            let want = direct.run(mode, sql, &params).await;
            *reads.entry(mode).or_default() += 1;
            if proxy != want {
                stale.push(format!(
                    "step {step} client {client} {mode:?}: {sql} {params:?}\n  \
                     spillway: {proxy:?}\n  postgres: {want:?}"
                ));
            }
        } else {
            let index = rng.random_range(0..WRITES.len());
            let (sql, _) = WRITES[index];
            let params = write_params(&mut rng, index);
            if rng.random_bool(0.5) {
                sessions[client].run(mode, sql, &params).await;
                through += 1;
            } else {
                direct.run(mode, sql, &params).await;
                stream_caught_up(&direct.client).await;
                behind += 1;
            }
        }
    }
    let hit_count = hits(&ctx).await - hits_before;
    println!(
        "{OPS} operations in {:?}: reads {reads:?}, writes through spillway {through}, \
         behind it {behind}, hits {hit_count}, stale {}",
        started.elapsed(),
        stale.len()
    );
    for s in stale.iter().take(5) {
        println!("{s}");
    }
    assert!(
        stale.is_empty(),
        "{} of {} reads were stale (first ones printed above)",
        stale.len(),
        reads.values().sum::<usize>()
    );
    assert!(
        hit_count > 1000.0,
        "reads were served from the cache ({hit_count} hits)"
    );
}

async fn hits(ctx: &Context) -> f64 {
    scrape(ctx.proxy.metrics_addr())
        .await
        .lines()
        .filter(|l| l.starts_with("spillway_cache_hits_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
