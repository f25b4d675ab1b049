//! The deferred-write log on NATS JetStream (issue 17): a three-node `nats-server`
//! cluster started by the test (`nats_cluster.rs`), spillway with
//! `journal.backend = "nats"` and R3 in front of a throwaway PostgreSQL. Deferred
//! writes are applied; spillway SIGKILLed at random moments under load, **its local
//! data directory deleted** each time, then started again: every acknowledged write is
//! applied exactly once, nothing unacknowledged in part (the crash test's per-row
//! verification), because the records live in the stream and the ledger says which
//! were applied.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::context::Context;
use crate::nats_cluster::NatsCluster;
use crate::nats_link::NatsLink;
use crate::write_load::{self, Load, SCHEMA};

const SEED: u64 = 0x5eed_0017;
const KILLS: usize = 12;
const CLIENTS: usize = 4;

async fn start(cluster: &NatsCluster, journal_dir: &std::path::Path, extra: &str) -> Context {
    Context::builder()
        .before_proxy(SCHEMA)
        .section(&format!(
            "[flush]\ninterval = \"30ms\"\nbatch_size = 64\n{}\n{}\n{extra}",
            write_load::policy_toml("write-behind", ""),
            cluster.journal_toml(3, journal_dir),
        ))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_writes_through_the_nats_journal_are_applied() {
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .expect("cluster task");
    let local = tempfile::tempdir().expect("temp dir");
    let ctx = start(&cluster, &local.path().join("journal"), "").await;
    let client = ctx.proxy_client().await;
    for id in 1..=20 {
        let tag = client
            .simple_query(&format!(
                "INSERT INTO load_rows (id, worker, v) VALUES ({id}, 0, 'v{id}')"
            ))
            .await
            .expect("deferred insert acknowledged");
        assert!(!tag.is_empty());
    }
    client
        .simple_query("UPDATE load_counters SET n = n + 5 WHERE id = 1")
        .await
        .expect("deferred update acknowledged");
    write_load::flush(&ctx, Duration::from_secs(20)).await;
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM load_rows").trim(),
        "20"
    );
    assert_eq!(
        ctx.psql_direct("SELECT n FROM load_counters WHERE id = 1")
            .trim(),
        "5"
    );
    // The ledger row of the stream: 21 records applied, claimed once.
    assert_eq!(
        ctx.psql_direct("SELECT journal_id, epoch, last_seq FROM spillway.flush_ledger")
            .trim(),
        "nats:spillway|1|21"
    );
    // The local journal directory was never used.
    assert!(!local.path().join("journal").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_the_data_dir_deleted_loses_and_doubles_nothing() {
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .expect("cluster task");
    let local = tempfile::tempdir().expect("temp dir");
    let data_dir = local.path().join("journal");
    let mut ctx = start(&cluster, &data_dir, "").await;
    let load = Load::start_with_transactions(CLIENTS, SEED, ctx.proxy.addr.port());
    let mut rng = StdRng::seed_from_u64(SEED);
    let direct = ctx.direct_client().await;
    let mut partial_seen = Vec::new();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..600))).await;
        partial_seen.extend(write_load::partial_groups(&direct).await);
        // The machine is gone: process and disk. A new one starts with nothing local.
        ctx.proxy.kill();
        let _ = std::fs::remove_dir_all(&data_dir);
        tokio::task::block_in_place(|| ctx.restart_proxy());
        load.port
            .store(ctx.proxy.addr.port(), std::sync::atomic::Ordering::SeqCst);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = load.stop().await;
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    let verdict = write_load::verify(&ctx, &tally);
    eprintln!(
        "nats crash test: kills={KILLS}, acknowledged={} (records {}), unknown={} ({:?}), \
         refused={:?}, lost={}, duplicated={}, phantom={}, partial={}, partial seen={}, \
         dead_letters={}, ledger epoch={} last_seq={}, elapsed={:?}",
        tally.acked(),
        tally.acked_records,
        tally.unknown(),
        tally.unknown_by_error,
        tally.refused,
        verdict.lost,
        verdict.duplicated,
        verdict.phantom,
        verdict.partial,
        partial_seen.len(),
        verdict.dead_letters.len(),
        verdict.epoch,
        verdict.last_seq,
        started.elapsed(),
    );
    for d in verdict.details.iter().take(20) {
        eprintln!("  {d}");
    }
    assert!(
        tally.acked() > 10 * KILLS as u64,
        "too little load to mean anything: {tally:?}"
    );
    assert!(tally.anomalies.is_empty(), "{:?}", tally.anomalies);
    assert_eq!(verdict.lost, 0, "lost writes: {:?}", verdict.details);
    assert_eq!(verdict.duplicated, 0, "duplicated: {:?}", verdict.details);
    assert_eq!(verdict.phantom, 0, "phantom rows: {:?}", verdict.details);
    assert_eq!(verdict.partial, 0, "partial: {:?}", verdict.details);
    assert!(partial_seen.is_empty(), "{partial_seen:?}");
    assert!(
        verdict.dead_letters.is_empty(),
        "{:?}",
        verdict.dead_letters
    );
    // One ledger row (the stream), taken over by every start: epoch = starts.
    assert_eq!(verdict.ledger_rows, 1);
    assert_eq!(verdict.epoch, KILLS as u64 + 1);
    // The stream's sequence numbers are the records': every acknowledged write is one,
    // an unknown one may be one.
    assert!(
        verdict.last_seq >= tally.acked_records
            && verdict.last_seq <= tally.acked_records + tally.unknown(),
        "ledger last_seq {} outside [{}, {}]",
        verdict.last_seq,
        tally.acked_records,
        tally.acked_records + tally.unknown()
    );
    assert!(tally.refused.is_empty(), "refused: {:?}", tally.refused);
}

/// Two instances on one stream, load through both; the flush owner is the newest
/// start (it took the ledger over with a new epoch, fencing the other, which then
/// follows the ledger). Twelve times: even rounds SIGKILL the owner, odd rounds the
/// follower, with the data directory deleted; the killed one starts again and owns
/// the flushing. Every acknowledged write through either is applied exactly once;
/// refusals are only 40001 (a hot key's compare-and-set retries exhausted), under 1%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_one_fenced_owner_lose_and_double_nothing() {
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .expect("cluster task");
    let local = tempfile::tempdir().expect("temp dir");
    let data_dir = local.path().join("journal");
    let ctx = start(&cluster, &data_dir, "").await;
    // Slot 0 is the context's process, slot 1 the second instance (started later: the
    // owner).
    let mut second = Some(ctx.spawn_another().expect("second spillway starts"));
    let mut owner = 1;
    let loads = [
        Load::start_from(CLIENTS, 0, SEED, ctx.proxy.addr.port()),
        Load::start_from(
            CLIENTS,
            100,
            SEED + 1,
            second.as_ref().expect("second").addr.port(),
        ),
    ];
    let mut ctx = ctx;
    let mut rng = StdRng::seed_from_u64(SEED);
    let direct = ctx.direct_client().await;
    let mut partial_seen = Vec::new();
    for round in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..600))).await;
        partial_seen.extend(write_load::partial_groups(&direct).await);
        let victim = if round % 2 == 0 { owner } else { 1 - owner };
        let port = if victim == 0 {
            ctx.proxy.kill();
            let _ = std::fs::remove_dir_all(&data_dir);
            tokio::task::block_in_place(|| ctx.restart_proxy());
            ctx.proxy.addr.port()
        } else {
            if let Some(mut p) = second.take() {
                p.kill();
            }
            let _ = std::fs::remove_dir_all(&data_dir);
            let fresh = tokio::task::block_in_place(|| ctx.spawn_another())
                .unwrap_or_else(|log| panic!("second spillway restarts; log:\n{log}"));
            let port = fresh.addr.port();
            second = Some(fresh);
            port
        };
        owner = victim;
        loads[victim]
            .port
            .store(port, std::sync::atomic::Ordering::SeqCst);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let [a, b] = loads;
    let mut tally = a.stop().await;
    tally.merge(b.stop().await);
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    let verdict = write_load::verify(&ctx, &tally);
    eprintln!(
        "nats two-instance test: kills={KILLS}, acknowledged={} (records {}), unknown={} \
         ({:?}), refused={:?}, lost={}, duplicated={}, phantom={}, partial={}, partial seen={}, \
         dead_letters={}, ledger epoch={} last_seq={}, elapsed={:?}",
        tally.acked(),
        tally.acked_records,
        tally.unknown(),
        tally.unknown_by_error,
        tally.refused,
        verdict.lost,
        verdict.duplicated,
        verdict.phantom,
        verdict.partial,
        partial_seen.len(),
        verdict.dead_letters.len(),
        verdict.epoch,
        verdict.last_seq,
        started.elapsed(),
    );
    for d in verdict.details.iter().take(20) {
        eprintln!("  {d}");
    }
    assert!(
        tally.acked() > 10 * KILLS as u64,
        "too little load to mean anything: {tally:?}"
    );
    assert!(tally.anomalies.is_empty(), "{:?}", tally.anomalies);
    assert_eq!(verdict.lost, 0, "lost writes: {:?}", verdict.details);
    assert_eq!(verdict.duplicated, 0, "duplicated: {:?}", verdict.details);
    assert_eq!(verdict.phantom, 0, "phantom rows: {:?}", verdict.details);
    assert_eq!(verdict.partial, 0, "partial: {:?}", verdict.details);
    assert!(partial_seen.is_empty(), "{partial_seen:?}");
    assert!(
        verdict.dead_letters.is_empty(),
        "{:?}",
        verdict.dead_letters
    );
    // Two first starts and one per kill, each a takeover.
    assert_eq!(verdict.ledger_rows, 1);
    assert_eq!(verdict.epoch, KILLS as u64 + 2);
    assert!(
        verdict.last_seq >= tally.acked_records
            && verdict.last_seq <= tally.acked_records + tally.unknown(),
        "ledger last_seq {} outside [{}, {}]",
        verdict.last_seq,
        tally.acked_records,
        tally.acked_records + tally.unknown()
    );
    // A hot key written through both instances (the eight counters) may exhaust its
    // compare-and-set retries: 40001, nothing acknowledged, a client retries it. Rare.
    let serialization = tally.refused.get("40001").copied().unwrap_or(0);
    assert_eq!(
        tally.refused_total(),
        serialization,
        "refused: {:?}",
        tally.refused
    );
    assert!(
        serialization * 100 <= tally.acked(),
        "too many 40001: {serialization} of {}",
        tally.acked()
    );
}

/// Two instances on one stream: the same key INSERTed through both at once, many
/// times. Exactly one is acknowledged, the other gets PostgreSQL's 23505: JetStream's
/// expected last subject sequence refuses the later append, whose instance decides
/// again with the other's insert in its overlay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_inserts_of_one_key_through_two_instances_one_wins() {
    const ROUNDS: i64 = 1000;
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .expect("cluster task");
    let local = tempfile::tempdir().expect("temp dir");
    let ctx = start(&cluster, &local.path().join("journal"), "").await;
    let second = ctx.spawn_another().expect("second spillway starts");
    let a = ctx.proxy_client().await;
    let b = crate::context::connect(&format!(
        "host=127.0.0.1 port={} user={} dbname={} sslmode=disable",
        second.addr.port(),
        crate::context::USER,
        crate::context::DB
    ))
    .await;
    let (mut a_won, mut b_won) = (0, 0);
    for id in 1..=ROUNDS {
        let sql =
            |who: &str| format!("INSERT INTO load_rows (id, worker, v) VALUES ({id}, 0, '{who}')");
        let (sa, sb) = (sql("a"), sql("b"));
        let (ra, rb) = tokio::join!(a.simple_query(&sa), b.simple_query(&sb));
        let code = |r: &Result<_, tokio_postgres::Error>| {
            r.as_ref()
                .err()
                .and_then(|e| e.code().map(|c| c.code().to_owned()))
        };
        match (ra.is_ok(), rb.is_ok()) {
            (true, false) => {
                a_won += 1;
                assert_eq!(code(&rb).as_deref(), Some("23505"), "round {id}: {rb:?}");
            }
            (false, true) => {
                b_won += 1;
                assert_eq!(code(&ra).as_deref(), Some("23505"), "round {id}: {ra:?}");
            }
            _ => panic!("round {id}: both or neither acknowledged: {ra:?} {rb:?}"),
        }
    }
    eprintln!("concurrent inserts: {ROUNDS} rounds, a won {a_won}, b won {b_won}");
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM load_rows").trim(),
        ROUNDS.to_string()
    );
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM spillway.dead_letters")
            .trim(),
        "0"
    );
}

/// Each NATS node of three SIGKILLed in turn under write load and started again: writes
/// refused meanwhile get 53000 and are never acknowledged (one whose PubAck was lost
/// with the node gets 08006, outcome unknown), writes go on once it is back, and every
/// acknowledged write is applied exactly once, an unknown one at most once.
/// (It hung in SPILLWAY FLUSH once in a few runs until ADR 0037: a publish stored by a
/// stream leader that died before its PubAck arrived was given up, and the flusher
/// waited forever for its sequence number behind the later acknowledged records.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_down_and_back_under_load_loses_and_doubles_nothing() {
    let mut cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .expect("cluster task");
    let local = tempfile::tempdir().expect("temp dir");
    let ctx = start(&cluster, &local.path().join("journal"), "").await;
    let load = Load::start_with_transactions(CLIENTS, SEED, ctx.proxy.addr.port());
    for node in [0, 1, 2] {
        tokio::time::sleep(Duration::from_millis(800)).await;
        tokio::task::block_in_place(|| cluster.stop_node(node));
        load.set_phase(1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::block_in_place(|| cluster.start_node(node));
        load.set_phase(2);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = load.stop().await;
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    let verdict = write_load::verify(&ctx, &tally);
    eprintln!(
        "nats node restarts: acknowledged={} (by phase {:?}), unknown={}, refused={:?}, \
         stalls={}, lost={}, duplicated={}, phantom={}, dead_letters={}",
        tally.acked(),
        tally.acked_by_phase,
        tally.unknown(),
        tally.refused,
        tally.stalls,
        verdict.lost,
        verdict.duplicated,
        verdict.phantom,
        verdict.dead_letters.len()
    );
    assert!(tally.acked() > 100, "too little load: {tally:?}");
    assert_eq!(verdict.lost, 0, "lost writes: {:?}", verdict.details);
    assert_eq!(verdict.duplicated, 0, "duplicated: {:?}", verdict.details);
    assert_eq!(verdict.phantom, 0, "phantom rows: {:?}", verdict.details);
    assert_eq!(verdict.partial, 0, "partial: {:?}", verdict.details);
    assert!(
        verdict.dead_letters.is_empty(),
        "{:?}",
        verdict.dead_letters
    );
    // Writes refused while a node is down are refused with 53000, never acknowledged.
    // Under load a node's loss can stop every publish for seconds: when it led the
    // stream, JetStream elects a new leader only after its Raft election timeout (4 to
    // 9 s in nats-server 2.9), longer than a node stays down here, so issue 17's
    // "writes continue" is not met yet and the phases after the first stop may
    // acknowledge nothing.
    let unavailable = tally.refused.get("53000").copied().unwrap_or(0);
    assert_eq!(tally.refused_total(), unavailable, "{:?}", tally.refused);
    // Writes go on once every node is back: a write outside the load's keys is
    // acknowledged within 30 s (refused meanwhile with 53000 only) and applied.
    let client = ctx.proxy_client().await;
    let back = Instant::now();
    loop {
        match client
            .simple_query("INSERT INTO load_rows (id, worker, v) VALUES (-1, 0, 'back')")
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(
                    e.code().map(|c| c.code().to_owned()).as_deref(),
                    Some("53000"),
                    "{e:?}"
                );
                assert!(
                    back.elapsed() < Duration::from_secs(30),
                    "writes did not resume: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    eprintln!(
        "nats node restarts: a write acknowledged {:?} after the end",
        back.elapsed()
    );
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    assert_eq!(
        ctx.psql_direct("SELECT v FROM load_rows WHERE id = -1")
            .trim(),
        "back"
    );
}

/// Two of three NATS nodes down: no quorum, so a deferred write is never acknowledged:
/// refused (53000) when no stream leader takes it, or answered 08006 (outcome unknown)
/// when the leader that stayed up took it but cannot commit it (its proposal may still
/// be committed once the quorum is back); `/readyz` says the journal is the reason.
/// Once the nodes are back, writes are acknowledged again, and afterwards no refused
/// write is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_nats_quorum_nothing_is_acknowledged() {
    let mut cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .expect("cluster task");
    let local = tempfile::tempdir().expect("temp dir");
    let ctx = start(
        &cluster,
        &local.path().join("journal"),
        "ack_timeout = \"1s\"",
    )
    .await;
    let client = ctx.proxy_client().await;
    client
        .simple_query("INSERT INTO load_rows (id, worker, v) VALUES (1, 0, 'before')")
        .await
        .expect("acknowledged with a quorum");
    let metrics = ctx.proxy.metrics_addr();
    assert_eq!(crate::metrics::get(metrics, "/readyz").await.0, 200);
    tokio::task::block_in_place(|| {
        cluster.stop_node(1);
        cluster.stop_node(2);
    });
    let insert = |id: i64| {
        let client = &client;
        async move {
            let sql = format!("INSERT INTO load_rows (id, worker, v) VALUES ({id}, 0, 'w')");
            tokio::time::timeout(Duration::from_secs(30), client.simple_query(&sql))
                .await
                .expect("answered in time")
                .map(|_| ())
                .map_err(|e| e.code().map(|c| c.code().to_owned()).unwrap_or_default())
        }
    };
    let (mut refused, mut unknown) = (Vec::new(), Vec::new());
    for id in 2..=4 {
        match insert(id).await {
            Ok(()) => panic!("write {id} acknowledged without a quorum"),
            Err(code) if code == "53000" => refused.push(id),
            Err(code) if code == "08006" => unknown.push(id),
            Err(code) => panic!("write {id}: {code}"),
        }
    }
    let (status, body) = crate::metrics::get(metrics, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("journal"), "{body}");

    tokio::task::block_in_place(|| {
        cluster.start_node(1);
        cluster.start_node(2);
    });
    let back = Instant::now();
    let mut acked = None;
    for id in 5.. {
        match insert(id).await {
            Ok(()) => {
                acked = Some(id);
                break;
            }
            Err(code) if code == "53000" => refused.push(id),
            Err(code) if code == "08006" => unknown.push(id),
            Err(code) => panic!("write {id}: {code}"),
        }
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "writes did not resume"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    let present = |id: i64| {
        ctx.psql_direct(&format!("SELECT count(*) FROM load_rows WHERE id = {id}"))
            .trim()
            .to_owned()
    };
    eprintln!(
        "no quorum: refused {refused:?}, unknown {unknown:?} (applied: {:?}), then {:?} \
         acknowledged {:?} after the nodes came back",
        unknown.iter().map(|id| present(*id)).collect::<Vec<_>>(),
        acked,
        back.elapsed()
    );
    for id in &refused {
        assert_eq!(present(*id), "0", "refused write {id} applied");
    }
    assert_eq!(present(1), "1");
    assert_eq!(present(acked.expect("acknowledged")), "1");
}

/// A publish JetStream stored whose PubAck never reached spillway (the connection to
/// the only NATS server it knows is lost while the answer is on its way, and stays
/// lost past every retry): the write's outcome is unknown to spillway, so the client
/// gets 08006, never a refusal; the stored record is applied once the follower reads
/// it, exactly once, also after a restart; and writes go on once NATS is reachable
/// again. Before ADR 0037 the client got 53000 for a write that was then applied, the
/// log stopped every later write, and a later acknowledged record behind it left a gap
/// the flusher (and `SPILLWAY FLUSH`) waited on forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stored_whose_ack_is_lost_is_applied_once_and_writes_go_on() {
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .expect("cluster task");
    let link = NatsLink::start(cluster.client_port(0)).await;
    let local = tempfile::tempdir().expect("temp dir");
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .section(&format!(
            "[flush]\ninterval = \"30ms\"\nbatch_size = 64\n{}\n{}ack_timeout = \"1s\"\n",
            write_load::policy_toml("write-behind", ""),
            crate::nats_cluster::journal_toml(
                &link.servers_toml(),
                3,
                &local.path().join("journal")
            ),
        ))
        .start()
        .await;
    let client = ctx.proxy_client().await;
    client
        .simple_query("INSERT INTO load_rows (id, worker, v) VALUES (1, 0, 'before')")
        .await
        .expect("acknowledged while the link passes");

    link.hold_answers();
    let held = tokio::spawn(async move {
        let answer = client
            .simple_query("UPDATE load_counters SET n = n + 1 WHERE id = 1")
            .await;
        (client, answer)
    });
    assert!(
        link.held_an_ack(Duration::from_secs(10)).await,
        "JetStream answered the publish (held back)"
    );
    // Past the first attempt's timeout, then nothing gets through for the retries.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    link.cut();
    let (client, answer) = tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .expect("answered while NATS is unreachable")
        .expect("update task");
    let err = answer.expect_err("not acknowledged: its PubAck never arrived");
    assert_eq!(
        err.code().map(|c| c.code().to_owned()).as_deref(),
        Some("08006"),
        "an unknown outcome, not a refusal: {err:?}"
    );
    let metrics = ctx.proxy.metrics_addr();
    let (status, body) = crate::metrics::get(metrics, "/readyz").await;
    assert_eq!(status, 503, "{body}");

    link.pass();
    // Writes go on once the client reconnected (refused meanwhile: 53000 only).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match client
            .simple_query("INSERT INTO load_rows (id, worker, v) VALUES (2, 0, 'after')")
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(
                    e.code().map(|c| c.code().to_owned()).as_deref(),
                    Some("53000"),
                    "{e:?}"
                );
                assert!(Instant::now() < until, "writes did not resume: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    // The update was stored (its PubAck was seen): applied, once, as stream record 2.
    let expected = (
        "1,2".to_owned(),
        "1".to_owned(),
        "nats:spillway|3".to_owned(),
    );
    assert_eq!(applied_state(&ctx), expected);
    assert_eq!(crate::metrics::get(metrics, "/readyz").await.0, 200);

    // A restart replays nothing the ledger holds.
    let mut ctx = ctx;
    ctx.proxy.kill();
    tokio::task::block_in_place(|| ctx.restart_proxy());
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    assert_eq!(applied_state(&ctx), expected);
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM spillway.dead_letters")
            .trim(),
        "0"
    );
}

/// The rows of `load_rows`, counter 1, and the ledger's journal and last sequence.
fn applied_state(ctx: &Context) -> (String, String, String) {
    (
        ctx.psql_direct("SELECT string_agg(id::text, ',' ORDER BY id) FROM load_rows")
            .trim()
            .to_owned(),
        ctx.psql_direct("SELECT n FROM load_counters WHERE id = 1")
            .trim()
            .to_owned(),
        ctx.psql_direct("SELECT journal_id, last_seq FROM spillway.flush_ledger")
            .trim()
            .to_owned(),
    )
}

/// Two instances on one stream, `strong` consistency, cached reads, flushes only every
/// 10 s: a row read (and cached) through instance B, updated through instance A, then
/// read through B until it shows the update, 100 times. B's cached read is invalidated
/// once B's follower noted A's record (before, it stayed cached until the flush applied
/// the record: up to 10 s here). Reports the lag from A's acknowledgement to B's first
/// read that shows it (p50/p99) and how many first reads right after the
/// acknowledgement were stale: `strong` across instances still has that window (the
/// follower's delivery), so a first read may miss the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_reaches_b_cached_reads_once_b_follows_it() {
    const ROUNDS: usize = 100;
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .expect("cluster task");
    let local = tempfile::tempdir().expect("temp dir");
    let ctx = Context::builder()
        .before_proxy(&format!(
            "{SCHEMA}; INSERT INTO public.load_rows (id, worker, v) VALUES (1, 0, 'v0')"
        ))
        .section(&format!(
            "[flush]\ninterval = \"10s\"\nbatch_size = 64\n{}\n{}",
            write_load::policy_toml("write-behind", "consistency = \"strong\"\ncache = true"),
            cluster.journal_toml(3, &local.path().join("journal")),
        ))
        .start()
        .await;
    let second = ctx.spawn_another().expect("second spillway starts");
    let a = ctx.proxy_client().await;
    let b = crate::context::connect(&format!(
        "host=127.0.0.1 port={} user={} dbname={} sslmode=disable",
        second.addr.port(),
        crate::context::USER,
        crate::context::DB
    ))
    .await;
    let read = || async {
        b.simple_query("SELECT v FROM load_rows WHERE id = 1")
            .await
            .expect("read through B")
            .into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .expect("one row")
    };
    let mut lags = Vec::with_capacity(ROUNDS);
    let mut stale_first = 0;
    for round in 1..=ROUNDS {
        // Twice: the second is answered from B's cache.
        let before = format!("v{}", round - 1);
        assert_eq!(read().await, before, "round {round}: B before the update");
        assert_eq!(read().await, before, "round {round}: B before the update");
        a.simple_query(&format!("UPDATE load_rows SET v = 'v{round}' WHERE id = 1"))
            .await
            .expect("update through A acknowledged");
        let acked = Instant::now();
        let mut first = true;
        loop {
            let seen = read().await;
            if seen == format!("v{round}") {
                break;
            }
            assert_eq!(seen, before, "round {round}");
            stale_first += usize::from(first);
            first = false;
            assert!(
                acked.elapsed() < Duration::from_secs(5),
                "round {round}: B still answers {seen:?} {:?} after A's acknowledgement",
                acked.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lags.push(acked.elapsed());
    }
    lags.sort();
    eprintln!(
        "cross-instance reads: {ROUNDS} rounds, lag from A's ack to B's read showing it \
         p50 {:?} p99 {:?} max {:?}; first read after the ack stale in {stale_first}",
        lags[ROUNDS / 2],
        lags[ROUNDS * 99 / 100 - 1],
        lags[ROUNDS - 1]
    );
}
