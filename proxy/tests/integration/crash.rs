//! The crash test of both deferred policies (SPEC §6, issues 4 and 5): under a seeded
//! load of deferrable writes from several clients, spillway is killed with SIGKILL at
//! random moments — at least 20 times, some of them while a flush batch transaction is open upstream —
//! and restarted on the same journal each time. Afterwards PostgreSQL holds every
//! acknowledged write exactly once: every acknowledged insert is there (or its
//! acknowledged delete took it away), every counter lies between its acknowledged
//! increments and those plus the unknown ones, nothing is dead-lettered, and the
//! ledger is at a sequence number the acknowledged and unknown writes account for.
//! Some writes are client transactions (held by spillway, journaled as one record):
//! none is ever present in part, neither after the last restart nor whenever a direct
//! reader looks during the run.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::context::Context;
use crate::write_load::{self, Load, SCHEMA};

const SEED: u64 = 0x5eed_c2a5;
const KILLS: usize = 24;
const CLIENTS: usize = 6;

/// Whether PostgreSQL has a write transaction open right now: only the flush worker
/// writes in this test (every client write is deferred), so that is a batch between
/// its ledger advance and its COMMIT.
async fn batch_open(direct: &tokio_postgres::Client) -> bool {
    direct
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity \
             WHERE backend_xid IS NOT NULL AND pid <> pg_catalog.pg_backend_pid()",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) > 0)
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_write_behind_load_loses_and_doubles_nothing() {
    crash_under_load("write-behind").await;
}

/// Write-back folds each batch's writes per key: a kill mid-batch must still leave
/// every counter exact and every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_write_back_load_loses_and_doubles_nothing() {
    crash_under_load("write-back").await;
}

async fn crash_under_load(policy: &str) {
    let started = Instant::now();
    // A short flush interval and small batches: kills land before, between and
    // inside batches.
    let mut ctx = Context::builder()
        .before_proxy(SCHEMA)
        .section(&format!(
            "[flush]\ninterval = \"30ms\"\nbatch_size = 64\n{}",
            write_load::policy_toml(policy, "")
        ))
        .start()
        .await;
    let direct = ctx.direct_client().await;
    let load = Load::start_with_transactions(CLIENTS, SEED, ctx.proxy.addr.port());
    let mut partial_seen: Vec<String> = Vec::new();
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut aimed = 0;
    let mut in_batch = 0;
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..600))).await;
        // Every other kill waits (briefly) for a flush batch to be open upstream.
        if kill % 2 == 1 {
            aimed += 1;
            let until = Instant::now() + Duration::from_millis(400);
            while Instant::now() < until {
                if batch_open(&direct).await {
                    in_batch += 1;
                    break;
                }
            }
        }
        // A direct reader never sees part of a transaction.
        partial_seen.extend(write_load::partial_groups(&direct).await);
        // SIGKILL, then a new process on the same config and journal; it replays
        // what the ledger lacks before it listens.
        tokio::task::block_in_place(|| ctx.restart_proxy());
        load.port
            .store(ctx.proxy.addr.port(), std::sync::atomic::Ordering::SeqCst);
    }
    // The last process serves a while before the load stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = load.stop().await;
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    let verdict = write_load::verify(&ctx, &tally);

    eprintln!(
        "crash test ({policy}): kills={KILLS} (aimed at an open batch {aimed}, batch seen open {in_batch}), \
         acknowledged={} (inserted rows {}, deletes {}, increments {}), unknown={} (by error {:?}), \
         refused={} {:?}, \
         lost={}, duplicated={}, phantom={}, dead_letters={}, stalls={}, ledger epoch={} last_seq={}, \
         transactions={} (partial at the end {}, partial seen during the run {}), elapsed={:?}",
        tally.acked(),
        tally.acked_inserts.len(),
        tally.acked_deletes.len(),
        tally.acked_increments.values().sum::<u64>(),
        tally.unknown(),
        tally.unknown_by_error,
        tally.refused_total(),
        tally.refused,
        verdict.lost,
        verdict.duplicated,
        verdict.phantom,
        verdict.dead_letters.len(),
        tally.stalls,
        verdict.epoch,
        verdict.last_seq,
        tally.groups.len(),
        verdict.partial,
        partial_seen.len(),
        started.elapsed(),
    );
    for d in verdict.details.iter().take(20) {
        eprintln!("  {d}");
    }
    for d in verdict.dead_letters.iter().take(20) {
        eprintln!("  dead letter: {d}");
    }
    assert!(
        tally.acked() > 10 * KILLS as u64,
        "too little load to mean anything: {tally:?}"
    );
    assert!(tally.anomalies.is_empty(), "{:?}", tally.anomalies);
    assert_eq!(verdict.lost, 0, "lost writes: {:?}", verdict.details);
    assert_eq!(
        verdict.duplicated, 0,
        "duplicated writes: {:?}",
        verdict.details
    );
    assert_eq!(verdict.phantom, 0, "phantom rows: {:?}", verdict.details);
    assert!(
        tally.groups.len() > KILLS,
        "too few transactions: {}",
        tally.groups.len()
    );
    assert_eq!(
        verdict.partial, 0,
        "partial transactions: {:?}",
        verdict.details
    );
    assert!(
        partial_seen.is_empty(),
        "partial transactions seen: {partial_seen:?}"
    );
    assert!(
        verdict.dead_letters.is_empty(),
        "{:?}",
        verdict.dead_letters
    );
    // One ledger row (one journal), claimed by every start: epoch = starts.
    assert_eq!(verdict.ledger_rows, 1);
    assert_eq!(verdict.epoch, KILLS as u64 + 1);
    // Every acknowledged write is one record; an unknown one may be one.
    assert!(
        verdict.last_seq >= tally.acked_records
            && verdict.last_seq <= tally.acked_records + tally.unknown(),
        "ledger last_seq {} outside [{}, {}]",
        verdict.last_seq,
        tally.acked_records,
        tally.acked_records + tally.unknown()
    );
    assert!(
        tally.refused.is_empty(),
        "refused writes: {:?}",
        tally.refused
    );
}
