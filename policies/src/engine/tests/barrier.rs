//! Barriers per consistency mode: what a request waits for before it goes upstream.

use std::time::Duration;

use super::*;
use crate::Consistency;

fn with(consistency: Consistency) -> Harness {
    let t = table("t", Policy::WriteBehind, |c| c.consistency = consistency);
    let flush = FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    };
    Harness::new(vec![t, table("u", Policy::WriteBehind, |_| {})], flush)
}

const T: [&str; 1] = ["public.t"];

/// `strong`: every read of a table with pending writes waits for them, and no longer
/// once they are applied.
/// Mutation: reads of a strong table skipping the barrier (its arm matched like
/// `bounded`).
#[tokio::test(start_paused = true)]
async fn strong_reads_wait_for_pending_writes() {
    let h = with(Consistency::Strong);
    assert_eq!(h.engine.barrier(T, true, 0), None, "nothing pending");
    h.defer("t", insert("t", 1)).await;
    assert_eq!(h.engine.barrier(T, true, 0), Some(1));
    let _ = h.engine.wait_applied(1).await;
    assert_eq!(h.engine.barrier(T, true, 0), None, "applied already");
}

/// `bounded`: reads never wait; writes (and DDL, unknowns) always do.
/// Mutation: the `(true, Bounded)` arm removed (bounded reads wait), or the
/// consistency applied to writes too (`reads_only` ignored).
#[tokio::test(start_paused = true)]
async fn bounded_reads_never_wait_but_writes_do() {
    let h = with(Consistency::Bounded);
    h.defer("t", insert("t", 1)).await;
    assert_eq!(h.engine.barrier(T, true, 1), None);
    assert_eq!(h.engine.barrier(T, false, 0), Some(1));
}

/// `session`: a session's reads wait for its own writes only, up to its own latest.
/// Mutation: `session` treated as `strong` (waits for everyone's writes), or
/// `own_seq` ignored.
#[tokio::test(start_paused = true)]
async fn session_reads_wait_for_their_own_writes_only() {
    let h = with(Consistency::Session);
    let mine = h.defer("t", insert("t", 1)).await.seq.unwrap_or(0);
    h.defer("t", insert("t", 2)).await;
    assert_eq!(
        h.engine.barrier(T, true, 0),
        None,
        "another session's writes"
    );
    assert_eq!(h.engine.barrier(T, true, mine), Some(mine));
    assert_eq!(h.engine.barrier(T, false, 0), Some(2), "writes are strong");
    let _ = h.engine.wait_applied(mine).await;
    assert_eq!(h.engine.barrier(T, true, mine), None, "own writes applied");
}

/// A barrier covers the tables the request touches, not others with pending writes;
/// its target is everything acknowledged before it.
/// Mutation: `barrier_target` ignoring which tables have pending writes.
#[tokio::test(start_paused = true)]
async fn a_barrier_covers_only_the_tables_touched() {
    let h = with(Consistency::Strong);
    h.defer("u", insert("u", 1)).await;
    assert_eq!(h.engine.barrier(T, true, 0), None);
    h.defer("t", insert("t", 1)).await;
    h.defer("u", insert("u", 2)).await;
    assert_eq!(
        h.engine.barrier(T, true, 0),
        Some(3),
        "the highest acknowledged"
    );
    assert_eq!(h.engine.barrier_target(["public.u"]), Some(3));
}

/// A barrier returns once its target is applied, and forces the flush at once.
/// Mutation: `wait_applied` not calling `want` (it waits for the interval: here 1 h).
#[tokio::test(start_paused = true)]
async fn a_barrier_forces_the_flush() {
    let h = with(Consistency::Strong);
    h.defer("t", insert("t", 1)).await;
    let started = Instant::now();
    let done = tokio::time::timeout(Duration::from_secs(1), h.engine.wait_applied(1)).await;
    assert!(matches!(done, Ok(Ok(()))), "{done:?}");
    assert!(started.elapsed() < Duration::from_millis(10));
    assert_eq!(
        h.invalidated.lock().map(|v| v.clone()).unwrap_or_default(),
        vec![vec!["public.t".to_owned()]]
    );
}
