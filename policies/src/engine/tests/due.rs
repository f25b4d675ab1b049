//! When a flush is due: the interval from the oldest pending write, a full batch,
//! write-back's dirty keys, a waiter, bounded staleness.

use std::time::Duration;

use super::*;

fn one(policy: Policy) -> Vec<DeferredTable> {
    vec![table("t", policy, |_| {})]
}

/// A pending write waits for `flush.interval` before it is applied.
/// Mutation: `until_due` returning zero whenever something is pending (flush at once).
#[tokio::test(start_paused = true)]
async fn a_pending_write_waits_for_the_interval() {
    let h = Harness::new(one(Policy::WriteBehind), flush_config());
    h.defer("t", insert("t", 1)).await;
    after(99).await;
    assert!(h.batches().is_empty(), "applied before the interval");
    after(2).await;
    assert_eq!(h.batches(), vec![vec![1]]);
}

/// The interval counts from the oldest pending write, also while newer ones arrive.
/// Mutation: the age taken from the newest pending write (`acked_at.last_key_value`).
#[tokio::test(start_paused = true)]
async fn the_interval_counts_from_the_oldest_pending_write() {
    let h = Harness::new(one(Policy::WriteBehind), flush_config());
    h.defer("t", insert("t", 1)).await;
    after(60).await;
    h.defer("t", insert("t", 2)).await;
    after(39).await;
    assert!(h.batches().is_empty());
    after(2).await;
    assert_eq!(h.batches(), vec![vec![1, 2]]);
}

/// `batch_size` pending write-behind records make a flush due at once.
/// Mutation: `records >= flush.batch_size` → `records > flush.batch_size`.
#[tokio::test(start_paused = true)]
async fn a_full_batch_is_due_at_once() {
    let flush = FlushConfig {
        interval: Duration::from_secs(3600),
        batch_size: 3,
        ..flush_config()
    };
    let h = Harness::new(one(Policy::WriteBehind), flush);
    for id in 1..=2 {
        h.defer("t", insert("t", id)).await;
    }
    after(1).await;
    assert!(h.batches().is_empty(), "two of three are not a batch");
    h.defer("t", insert("t", 3)).await;
    after(1).await;
    assert_eq!(h.batches(), vec![vec![1, 2, 3]]);
}

/// Write-back's dirty keys reaching `max_dirty_keys` make a flush due at once.
/// Mutation: `dirty >= flush.max_dirty_keys` → `dirty > flush.max_dirty_keys`.
#[tokio::test(start_paused = true)]
async fn write_back_is_due_when_dirty_keys_reach_max_dirty_keys() {
    let flush = FlushConfig {
        interval: Duration::from_secs(3600),
        max_dirty_keys: 2,
        ..flush_config()
    };
    let h = Harness::new(one(Policy::WriteBack), flush);
    h.defer("t", insert("t", 1)).await;
    after(1).await;
    assert!(h.batches().is_empty());
    h.defer("t", insert("t", 2)).await;
    after(1).await;
    assert_eq!(h.batches(), vec![vec![1, 2]]);
}

/// Writes to a key already dirty do not count again toward `max_dirty_keys`.
/// Mutation: `State::reserve` counting a dirty key per write (dropping `if
/// old.is_none()`).
#[tokio::test(start_paused = true)]
async fn a_dirty_key_counts_once_toward_max_dirty_keys() {
    let flush = FlushConfig {
        interval: Duration::from_secs(3600),
        max_dirty_keys: 2,
        ..flush_config()
    };
    let h = Harness::new(one(Policy::WriteBack), flush);
    h.defer("t", insert("t", 1)).await;
    for _ in 0..3 {
        assert_eq!(h.defer("t", update("t", 1)).await.rows, 1);
    }
    after(1).await;
    assert!(h.batches().is_empty(), "one dirty key flushed early");
}

/// Someone waiting for a sequence number makes a flush due at once.
/// Mutation: `until_due` ignoring `wanted`.
#[tokio::test(start_paused = true)]
async fn a_waiter_makes_a_flush_due_at_once() {
    let flush = FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    };
    let h = Harness::new(one(Policy::WriteBehind), flush);
    let seq = h.defer("t", insert("t", 1)).await.seq.unwrap_or(0);
    let waited = tokio::time::timeout(Duration::from_millis(10), h.engine.wait_applied(seq)).await;
    assert!(matches!(waited, Ok(Ok(()))), "{waited:?}");
    assert_eq!(h.batches(), vec![vec![1]]);
}

/// A waiter already satisfied does not make later writes due (a stale wake).
/// Mutation: `wanted > applied` → `wanted >= applied` in `until_due`.
#[tokio::test(start_paused = true)]
async fn a_satisfied_waiter_does_not_flush_later_writes_early() {
    let h = Harness::new(one(Policy::WriteBehind), flush_config());
    // The flush worker is held up until the waiter is waiting, so the waiter really
    // asks for sequence number 1 (and is then satisfied).
    h.set_open(false);
    h.defer("t", insert("t", 1)).await;
    let engine = h.engine.clone();
    let waiter = tokio::spawn(async move { engine.wait_applied(1).await });
    after(1).await;
    h.set_open(true);
    assert!(matches!(waiter.await, Ok(Ok(()))));
    h.defer("t", insert("t", 2)).await;
    after(50).await;
    assert_eq!(h.batches(), vec![vec![1]], "the later write went early");
    after(60).await;
    assert_eq!(h.batches(), vec![vec![1], vec![2]]);
}

/// A `consistency = "bounded"` table flushes every `max_staleness / 2`, below the
/// interval.
/// Mutation: `TableSet::tick` ignoring bounded tables (always `flush.interval`).
#[tokio::test(start_paused = true)]
async fn bounded_consistency_shortens_the_interval() {
    let t = table("t", Policy::WriteBehind, |c| {
        c.consistency = crate::Consistency::Bounded;
        c.max_staleness = Duration::from_millis(40);
    });
    let flush = FlushConfig {
        interval: Duration::from_secs(1),
        ..flush_config()
    };
    let h = Harness::new(vec![t], flush);
    h.defer("t", insert("t", 1)).await;
    after(19).await;
    assert!(h.batches().is_empty());
    after(2).await;
    assert_eq!(h.batches(), vec![vec![1]]);
}

/// New `[flush]` settings apply from the flusher's next round.
/// Mutation: `set_flush` not waking the flusher (it sleeps the old interval out).
#[tokio::test(start_paused = true)]
async fn a_reloaded_interval_applies_at_once() {
    let flush = FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    };
    let h = Harness::new(one(Policy::WriteBehind), flush);
    h.defer("t", insert("t", 1)).await;
    after(10).await;
    h.engine.set_flush(flush_config());
    after(100).await;
    assert_eq!(h.batches(), vec![vec![1]]);
}
