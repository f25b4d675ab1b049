//! The key index (`keys/`) and batched point reads (`reads.rs`): which answers need a
//! point read, and how the change stream, spillway's own batches, the bound and the
//! stream's loss move them.

use std::time::Duration;

use super::*;
use crate::KeyIndexConfig;
use crate::changes::{Change, ChangeSink, Commit, TableRef};
use crate::engine::{DeferError, Known, Phase};

/// The in-memory PostgreSQL's side of the key index and point reads.
#[derive(Debug, Default)]
pub struct KeyDb {
    /// Queries that made point reads.
    pub point_read_queries: usize,
    /// How long a point-read query takes (a round trip).
    pub read_delay: Duration,
    /// Key-index chunks read.
    pub chunks: usize,
    /// The WAL position: grows by 10 with every committed batch.
    pub lsn: u64,
}

fn slow() -> FlushConfig {
    FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    }
}

fn harness() -> Harness {
    let h = Harness::new(vec![table("t", Policy::WriteBehind, |_| {})], slow());
    for id in 1..=50 {
        h.db().rows.insert(row(id));
    }
    h
}

fn row(id: u32) -> (String, Vec<String>) {
    ("public.t".to_owned(), vec![id.to_string()])
}

fn tref() -> TableRef {
    TableRef {
        oid: 1,
        name: "public.t".to_owned(),
    }
}

fn key(id: u32) -> Vec<String> {
    vec![id.to_string()]
}

fn ins(id: u32) -> Change {
    Change::Insert {
        table: tref(),
        key: key(id),
    }
}

fn del(id: u32) -> Change {
    Change::Delete {
        table: tref(),
        key: key(id),
    }
}

/// A commit of another writer (`own` false) at `lsn`.
fn commit(lsn: u64, own: bool, changes: Vec<Change>) -> Commit {
    Commit {
        database: DATABASE.to_owned(),
        lsn,
        xid: 0,
        own,
        changes,
    }
}

fn phase(h: &Harness) -> Phase {
    h.engine
        .key_stats()
        .into_iter()
        .find(|s| s.table == "public.t")
        .map_or(Phase::Off, |s| s.phase)
}

fn reads(h: &Harness) -> usize {
    h.db().point_reads
}

/// Runs the key loader until the test ends.
fn start_loader(h: &Harness) -> CancellationToken {
    let stop = CancellationToken::new();
    tokio::spawn(h.engine.clone().run_key_loader(stop.clone()));
    stop
}

/// The stream follows, the table is loaded and the stream passed the load's start.
async fn ready(h: &Harness) -> CancellationToken {
    h.engine.key_index().resumed(DATABASE);
    let stop = start_loader(h);
    after(1).await;
    let lsn = h.db().keys.lsn;
    h.engine
        .key_index()
        .committed(&commit(lsn, false, Vec::new()));
    assert_eq!(phase(h), Phase::Ready);
    stop
}

async fn rows(h: &Harness, c: Converted) -> usize {
    h.defer("t", c).await.rows
}

/// Once the index is ready, keys with nothing pending are answered from it: exact
/// counts and 23505 without a point read.
/// Mutation: `decide` not consulting `indexed` (or `lookup_many` answering nothing).
#[tokio::test(start_paused = true)]
async fn the_index_answers_instead_of_point_reads() {
    let h = harness();
    let _loader = ready(&h).await;
    assert_eq!(rows(&h, update("t", 7)).await, 1);
    assert_eq!(rows(&h, update("t", 99)).await, 0);
    assert_eq!(rows(&h, delete("t", 8)).await, 1);
    let dup = h.engine.defer(USER, "public.t", insert("t", 9)).await;
    assert!(matches!(dup, Err(DeferError::Duplicate { .. })), "{dup:?}");
    assert_eq!(rows(&h, insert("t", 100)).await, 1);
    assert_eq!(reads(&h), 0);
    let stats = h.engine.key_stats();
    assert_eq!(stats.first().map(|s| s.keys), Some(50));
}

/// Without the change stream the index is never loaded: point reads, as before.
/// Mutation: tables starting `Loading` (or `Ready`) before `resumed`.
#[tokio::test(start_paused = true)]
async fn without_the_stream_every_key_is_a_point_read() {
    let h = harness();
    let _loader = start_loader(&h);
    after(1).await;
    assert_eq!(phase(&h), Phase::Untrusted);
    assert_eq!(rows(&h, update("t", 7)).await, 1);
    assert_eq!(reads(&h), 1);
    assert_eq!(h.db().keys.chunks, 0, "nothing loaded");
}

/// A table whose index is loading, or loaded but not yet passed by the stream (a
/// chunk may be newer than what the stream delivered), uses point reads.
/// Mutation: `settle` making a table ready once its chunks are read, without the
/// stream at or past the load's start.
#[tokio::test(start_paused = true)]
async fn a_loading_table_uses_point_reads() {
    let h = harness();
    h.db().keys.lsn = 100;
    h.engine.key_index().resumed(DATABASE);
    assert_eq!(phase(&h), Phase::Loading);
    assert_eq!(rows(&h, update("t", 1)).await, 1);
    assert_eq!(reads(&h), 1);
    let _loader = start_loader(&h);
    after(1).await;
    assert_eq!(h.db().keys.chunks, 1);
    assert_eq!(phase(&h), Phase::Loading, "the stream has not passed 100");
    h.engine
        .key_index()
        .committed(&commit(90, false, Vec::new()));
    assert_eq!(rows(&h, update("t", 2)).await, 1);
    assert_eq!(reads(&h), 2);
    h.engine
        .key_index()
        .committed(&commit(100, false, Vec::new()));
    assert_eq!(phase(&h), Phase::Ready);
    assert_eq!(rows(&h, update("t", 3)).await, 1);
    assert_eq!(reads(&h), 2);
}

/// Keys are read in chunks of `chunk_rows`, each after the last key of the one before.
/// Mutation: the loader not passing the cursor (the same first chunk forever).
#[tokio::test(start_paused = true)]
async fn the_load_reads_chunks_after_the_cursor() {
    let h = harness();
    let config = KeyIndexConfig {
        chunk_rows: 7,
        ..KeyIndexConfig::default()
    };
    h.engine.configure_keys(DATABASE, &config);
    let _loader = ready(&h).await;
    assert_eq!(
        h.db().keys.chunks,
        8,
        "50 keys, 7 a chunk: 8 chunks, the last short"
    );
    assert_eq!(h.engine.key_stats().first().map(|s| s.keys), Some(50));
}

/// Changes other writers committed move the answer once the stream delivers them:
/// inserts, deletes, and an update that changed the key.
/// Mutation: `committed` ignoring `old_key` (the old key still counts 1).
#[tokio::test(start_paused = true)]
async fn changes_from_the_stream_move_the_answer() {
    let h = harness();
    let _loader = ready(&h).await;
    let sink = h.engine.key_index();
    sink.committed(&commit(110, false, vec![ins(500), del(7)]));
    assert_eq!(rows(&h, update("t", 500)).await, 1);
    assert_eq!(rows(&h, update("t", 7)).await, 0);
    let moved = Change::Update {
        table: tref(),
        key: key(600),
        old_key: Some(key(10)),
    };
    sink.committed(&commit(120, false, vec![moved]));
    assert_eq!(rows(&h, update("t", 10)).await, 0);
    assert_eq!(rows(&h, update("t", 600)).await, 1);
    // Inside one transaction the last change to a key counts.
    sink.committed(&commit(130, false, vec![ins(700), del(700)]));
    assert_eq!(rows(&h, update("t", 700)).await, 0);
    assert_eq!(reads(&h), 0);
}

/// A change to the whole table (TRUNCATE, keys unknown) loads the table again, with
/// point reads meanwhile; `lost` drops every index (point reads) and `resumed` loads
/// them again.
/// Mutation: `lost` leaving the tables ready (answers from a stale index).
#[tokio::test(start_paused = true)]
async fn table_changes_and_a_lost_stream_fall_back_to_point_reads() {
    let h = harness();
    let _loader = ready(&h).await;
    let sink = h.engine.key_index();
    h.db().rows.remove(&row(1));
    sink.committed(&commit(110, false, vec![Change::Table { table: tref() }]));
    assert_eq!(phase(&h), Phase::Loading);
    assert_eq!(rows(&h, update("t", 2)).await, 1);
    assert_eq!(reads(&h), 1);
    after(1).await;
    sink.committed(&commit(120, false, Vec::new()));
    assert_eq!(phase(&h), Phase::Ready);
    assert_eq!(rows(&h, update("t", 1)).await, 0, "reloaded: key 1 is gone");
    assert_eq!(reads(&h), 1);

    sink.lost(DATABASE);
    assert_eq!(phase(&h), Phase::Untrusted);
    assert_eq!(h.engine.key_stats().first().map(|s| s.keys), Some(0));
    assert_eq!(rows(&h, update("t", 3)).await, 1);
    assert_eq!(reads(&h), 2);
    // Commits of another database, and before `resumed`, change nothing.
    sink.committed(&Commit {
        database: "other".to_owned(),
        ..commit(130, false, vec![del(4)])
    });
    sink.resumed(DATABASE);
    after(1).await;
    sink.committed(&commit(140, false, Vec::new()));
    assert_eq!(phase(&h), Phase::Ready);
    assert_eq!(rows(&h, update("t", 4)).await, 1);
    assert_eq!(reads(&h), 2);
}

/// A table whose index would pass `key_index.max_bytes` drops it and keeps point
/// reads.
/// Mutation: `settle` not checking the bound.
#[tokio::test(start_paused = true)]
async fn over_the_bound_falls_back_to_point_reads() {
    let h = harness();
    let config = KeyIndexConfig {
        max_bytes: bytesize::ByteSize::b(16),
        ..KeyIndexConfig::default()
    };
    h.engine.configure_keys(DATABASE, &config);
    h.engine.key_index().resumed(DATABASE);
    let _loader = start_loader(&h);
    after(1).await;
    assert_eq!(phase(&h), Phase::OverBound);
    assert_eq!(h.engine.key_stats().first().map(|s| s.bytes), Some(0));
    assert_eq!(rows(&h, update("t", 7)).await, 1);
    assert_eq!(reads(&h), 1);
}

/// spillway's own applied writes are in the index before their keys leave the
/// overlay, so the next write to the key needs no point read.
/// Mutation: the flusher not calling `KeyIndex::applied` (a point read after apply).
#[tokio::test(start_paused = true)]
async fn own_writes_keep_the_index_exact() {
    let h = harness();
    let _loader = ready(&h).await;
    assert_eq!(rows(&h, insert("t", 500)).await, 1);
    assert_eq!(rows(&h, delete("t", 1)).await, 1);
    let _ = h.engine.wait_applied(2).await;
    assert!(h.db().rows.contains(&row(500)));
    assert_eq!(rows(&h, update("t", 500)).await, 1);
    assert_eq!(rows(&h, update("t", 1)).await, 0);
    assert_eq!(reads(&h), 0);
}

/// A change of another writer that the stream delivers before it passed spillway's
/// own batch may be older than the batch: it does not undo the batch's write, the
/// key is read instead. spillway's own commit changes nothing while a later batch of
/// its own holds the key; a change after the batches' positions counts.
/// Mutation: `deliver` ignoring pins (the older delete is taken: UPDATE 0 while the
/// row exists, silently).
#[tokio::test(start_paused = true)]
async fn an_older_change_does_not_undo_an_own_write() {
    let h = harness();
    let _loader = ready(&h).await;
    let sink = h.engine.key_index();
    assert_eq!(rows(&h, insert("t", 500)).await, 1);
    let _ = h.engine.wait_applied(1).await;
    after(1).await;
    let first = h.db().keys.lsn;
    // Committed before spillway's batch, delivered after it was applied.
    sink.committed(&commit(first - 5, false, vec![del(500)]));
    assert_eq!(rows(&h, update("t", 500)).await, 1);
    assert_eq!(reads(&h), 1, "the key was unknown: read");
    let _ = h.engine.wait_applied(2).await;
    after(1).await;
    let second = h.db().keys.lsn;
    sink.committed(&commit(first, true, vec![ins(500)]));
    assert_eq!(rows(&h, delete("t", 500)).await, 1);
    let _ = h.engine.wait_applied(3).await;
    after(1).await;
    // An own commit older than the last batch: the key stays as that batch left it.
    sink.committed(&commit(second, true, vec![ins(500)]));
    assert_eq!(rows(&h, update("t", 500)).await, 0);
    // Past the batches' positions: another writer's insert is newer, and counts.
    let later = h.db().keys.lsn + 10;
    sink.committed(&commit(later, false, vec![ins(500)]));
    h.db().rows.insert(row(500));
    assert_eq!(rows(&h, update("t", 500)).await, 1);
    assert_eq!(reads(&h), 1);
}

/// A write answered from a stale index (another writer's delete not yet streamed)
/// ends in a dead letter when applied, and the key is read from then on.
/// Mutation: `applied` taking refused records as written (the key counts 1 again).
#[tokio::test(start_paused = true)]
async fn a_dead_letter_leaves_the_key_unknown() {
    let h = harness();
    let _loader = ready(&h).await;
    h.db().rows.remove(&row(7));
    assert_eq!(rows(&h, update("t", 7)).await, 1, "the stream has not said");
    let _ = h.engine.wait_applied(1).await;
    assert_eq!(h.db().dead, vec![1]);
    assert_eq!(rows(&h, update("t", 7)).await, 0);
    assert_eq!(reads(&h), 1);
}

/// A held transaction's statements are answered from the index without waiting.
/// Mutation: `preview_now` not consulting the index (it returns `None`).
#[tokio::test(start_paused = true)]
async fn a_held_transaction_needs_no_point_read() {
    let h = harness();
    let _loader = ready(&h).await;
    // The role's privilege is asked once (previews without waiting need it known).
    let mut known = Known::new();
    let first = h
        .engine
        .preview(USER, &[stmt("t", update("t", 5))], &mut known)
        .await;
    assert!(first.is_ok(), "{first:?}");
    let stmts = vec![stmt("t", update("t", 7)), stmt("t", update("t", 77))];
    let answer = h
        .engine
        .preview_now(USER, &stmts, &Known::new())
        .map(|r| r.map(|(a, _)| a));
    assert!(
        matches!(&answer, Some(Ok(a)) if *a == vec![vec![true], vec![false]]),
        "{answer:?}"
    );
    assert_eq!(reads(&h), 0);
}

/// Concurrent point reads of one table go to PostgreSQL together: one query while
/// the first is on its way, all the others in the next.
/// Mutation: `read_keys` reading each key with its own query.
#[tokio::test(start_paused = true)]
async fn concurrent_point_reads_are_batched() {
    let h = harness();
    h.db().keys.read_delay = Duration::from_millis(1);
    let writes: Vec<_> = (1..=10)
        .map(|id| {
            let engine = h.engine.clone();
            tokio::spawn(async move { engine.defer(USER, "public.t", update("t", id)).await })
        })
        .collect();
    for w in writes {
        assert!(matches!(w.await, Ok(Ok(o)) if o.rows == 1));
    }
    assert_eq!(reads(&h), 10);
    assert!(
        h.db().keys.point_read_queries <= 2,
        "{}",
        h.db().keys.point_read_queries
    );
    let counts = h.engine.point_read_counts();
    assert_eq!(counts.first().map(|c| (c.1, c.2 <= 2)), Some((10, true)));
}

/// A lost connection fails a batched read for every waiter (retryable), and the next
/// read starts a new round.
/// Mutation: `read_rounds` leaving `reading` set after a failed round (the next
/// waiter hangs).
#[tokio::test(start_paused = true)]
async fn a_failed_batch_read_is_retryable() {
    let h = harness();
    h.db().unreachable = true;
    let out = h.engine.defer(USER, "public.t", update("t", 7)).await;
    assert!(matches!(out, Err(DeferError::Unreachable(_))), "{out:?}");
    h.db().unreachable = false;
    assert_eq!(rows(&h, update("t", 7)).await, 1);
}

/// A chunk whose query ran before a change committed may arrive after the stream
/// delivered the change: the stream's answer stands for the keys it touched while
/// the table loads.
/// Mutation: `KeyIndex::chunk` inserting touched keys.
#[tokio::test(start_paused = true)]
async fn a_chunk_does_not_undo_a_change_delivered_during_the_load() {
    let h = harness();
    let ix = h.engine.key_index();
    ix.resumed(DATABASE);
    let Some(job) = ix.next_job() else {
        panic!("no load wanted");
    };
    // The chunk was read with keys 1..=50; meanwhile 7 was deleted and 60 inserted.
    ix.committed(&commit(5, false, vec![del(7), ins(60)]));
    ix.chunk(&job, crate::engine::Chunk::Int((1..=50).collect()));
    let Some(job) = ix.next_job().filter(|j| j.finish) else {
        panic!("no end position wanted");
    };
    ix.finished(&job, 5);
    assert_eq!(phase(&h), Phase::Ready);
    assert_eq!(rows(&h, update("t", 7)).await, 0);
    assert_eq!(rows(&h, update("t", 60)).await, 1);
    assert_eq!(rows(&h, update("t", 8)).await, 1);
    assert_eq!(reads(&h), 0);
}
