//! Room and back-pressure: `max_pending` with `when_full` = block, reject,
//! write-through.

use std::time::Duration;

use super::*;
use crate::WhenFull;
use crate::engine::DeferError;

fn limited(when_full: WhenFull) -> DeferredTable {
    table("t", Policy::WriteBehind, |c| {
        c.max_pending = 1;
        c.when_full = when_full;
        c.block_timeout = Duration::from_millis(300);
    })
}

fn slow() -> FlushConfig {
    FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    }
}

/// A blocked writer asks for a flush, and goes on as soon as there is room.
/// Mutation: `wait_for_room` not calling `want` (it waits out `block_timeout`).
#[tokio::test(start_paused = true)]
async fn block_asks_for_a_flush_and_goes_on_when_there_is_room() {
    let h = Harness::new(vec![limited(WhenFull::Block)], slow());
    h.defer("t", insert("t", 1)).await;
    let started = Instant::now();
    let second = h.engine.defer(USER, "public.t", insert("t", 2)).await;
    assert!(
        matches!(second, Ok(ref o) if o.seq == Some(2)),
        "{second:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(h.batches(), vec![vec![1]]);
}

/// A blocked writer gives up after `block_timeout` with 53000.
/// Mutation: the `block_timeout` check never true (`started.elapsed() >=
/// block_timeout` → `false`): the writer blocks until the test's own timeout.
#[tokio::test(start_paused = true)]
async fn block_gives_up_after_block_timeout_with_53000() {
    let h = Harness::new(vec![limited(WhenFull::Block)], slow());
    h.defer("t", insert("t", 1)).await;
    h.set_open(false);
    let started = Instant::now();
    let second = tokio::time::timeout(
        Duration::from_secs(2),
        h.engine.defer(USER, "public.t", insert("t", 2)),
    )
    .await;
    let Ok(Err(e)) = second else {
        panic!("not refused in time: {second:?}");
    };
    assert!(matches!(e, DeferError::Full { pending: 1, .. }), "{e}");
    assert_eq!(e.sqlstate(), "53000");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(330),
        "{waited:?}"
    );
}

/// `when_full = "reject"` refuses at once.
/// Mutation: `when_full != Block` → `when_full == WriteThrough` (reject blocks).
#[tokio::test(start_paused = true)]
async fn reject_refuses_at_once() {
    let h = Harness::new(vec![limited(WhenFull::Reject)], slow());
    h.set_open(false);
    h.defer("t", insert("t", 1)).await;
    let started = Instant::now();
    let second = h.engine.defer(USER, "public.t", insert("t", 2)).await;
    assert!(matches!(second, Err(DeferError::Full { .. })), "{second:?}");
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// `when_full = "write-through"`: the proxy asks `is_full` first, which is true from
/// `max_pending` on (and the engine refuses rather than exceed it).
/// Mutation: `pending >= max_pending` → `pending > max_pending` in `is_full`.
#[tokio::test(start_paused = true)]
async fn write_through_sees_the_table_full_at_max_pending() {
    let t = table("t", Policy::WriteBehind, |c| {
        c.max_pending = 2;
        c.when_full = WhenFull::WriteThrough;
    });
    let h = Harness::new(vec![t], slow());
    h.defer("t", insert("t", 1)).await;
    assert!(!h.engine.is_full("public.t"));
    h.defer("t", insert("t", 2)).await;
    assert!(h.engine.is_full("public.t"));
    let third = h.engine.defer(USER, "public.t", insert("t", 3)).await;
    assert!(
        matches!(third, Err(DeferError::Full { pending: 2, .. })),
        "{third:?}"
    );
}

/// Room is counted per table: a full table does not hold up another.
/// Mutation: `State::pending_of` counting every table's pending records.
#[tokio::test(start_paused = true)]
async fn room_is_counted_per_table() {
    let a = table("a", Policy::WriteBehind, |c| {
        c.max_pending = 1;
        c.when_full = WhenFull::Reject;
    });
    let b = table("b", Policy::WriteBehind, |c| {
        c.max_pending = 1;
        c.when_full = WhenFull::Reject;
    });
    let h = Harness::new(vec![a, b], slow());
    h.defer("a", insert("a", 1)).await;
    let other = h.engine.defer(USER, "public.b", insert("b", 1)).await;
    assert!(other.is_ok(), "{other:?}");
    assert!(h.engine.is_full("public.a") && h.engine.is_full("public.b"));
}

/// A full journal (`journal.max_bytes`) is 53000, and the key the write reserved is
/// released: the same INSERT later goes through.
/// Mutation: `defer_tx` not calling `unreserve` after a failed append (the retry is
/// then a duplicate key).
#[tokio::test(start_paused = true)]
async fn a_full_journal_is_53000_and_leaves_no_reservation() {
    let h = Harness::new(vec![table("t", Policy::WriteBehind, |_| {})], slow());
    h.log().full.store(true, Ordering::SeqCst);
    let refused = h.engine.defer(USER, "public.t", insert("t", 1)).await;
    let Err(e) = refused else {
        panic!("accepted into a full journal");
    };
    assert_eq!(e.sqlstate(), "53000");
    h.log().full.store(false, Ordering::SeqCst);
    let again = h.engine.defer(USER, "public.t", insert("t", 1)).await;
    assert!(matches!(again, Ok(ref o) if o.rows == 1), "{again:?}");
}
