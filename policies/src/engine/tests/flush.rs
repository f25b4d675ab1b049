//! The flush loop: ledger conflicts, epoch fencing, unknown outcomes, back-off, batch
//! boundaries (whole records, contiguous prefix, durable only), replay at start.

use std::time::Duration;

use super::*;
use crate::engine::{DeferError, StartError, check_ledger};
use crate::writes::Record;

fn slow() -> FlushConfig {
    FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    }
}

/// Defers `c` on `public.t` in a task of its own (its answer awaited later).
fn spawn_defer(
    h: &Harness,
    c: Converted,
) -> tokio::task::JoinHandle<Result<crate::engine::Outcome, DeferError>> {
    let engine = h.engine.clone();
    tokio::spawn(async move { engine.defer(USER, "public.t", c).await })
}

fn one() -> Vec<DeferredTable> {
    vec![table("t", Policy::WriteBehind, |_| {})]
}

/// Gaps between consecutive `apply` calls.
fn gaps(h: &Harness) -> Vec<Duration> {
    let at = h.db().attempts.clone();
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

/// A ledger claimed by a newer epoch (another spillway on this journal) stops the
/// flusher for good: barriers and new writes fail with the cause, health says so.
/// Mutation: `ApplyError::Fenced` handled like a transient error (retried forever).
#[tokio::test(start_paused = true)]
async fn a_fenced_ledger_poisons_the_engine() {
    let h = Harness::new(one(), slow());
    h.db().ledger = Some((2, 0));
    h.defer("t", insert("t", 1)).await;
    let waited = tokio::time::timeout(Duration::from_secs(1), h.engine.wait_applied(1)).await;
    assert!(
        matches!(waited, Ok(Err(DeferError::Stopped(_)))),
        "{waited:?}"
    );
    assert!(h.engine.health().is_err());
    let later = h.engine.defer(USER, "public.t", insert("t", 2)).await;
    assert!(matches!(later, Err(DeferError::Stopped(_))), "{later:?}");
    assert!(h.batches().is_empty());
}

/// A batch committed whose answer was lost: the ledger is read again and the batch
/// counts as applied, once.
/// Mutation: `retry.unsure` never set (the batch is applied again: the ledger's
/// compare-and-set then fences the engine).
#[tokio::test(start_paused = true)]
async fn an_unknown_outcome_reads_the_ledger_and_applies_nothing_twice() {
    let h = Harness::new(one(), slow());
    h.db().faults.push_back(Fault::LostCommit);
    h.defer("t", insert("t", 1)).await;
    let waited = tokio::time::timeout(Duration::from_secs(1), h.engine.wait_applied(1)).await;
    assert!(matches!(waited, Ok(Ok(()))), "{waited:?}");
    assert_eq!(h.batches(), vec![vec![1]]);
    assert_eq!(h.db().claims, 1);
    assert_eq!(h.db().connects, 2, "a new connection after the failure");
    h.defer("t", insert("t", 2)).await;
    let _ = h.engine.wait_applied(2).await;
    assert_eq!(h.batches(), vec![vec![1], vec![2]]);
    assert_eq!(h.log().confirmed.load(Ordering::SeqCst), 2);
}

/// Transient failures are retried after 50 ms, doubling.
/// Mutation: the back-off not doubled (`backoff * 2` → `backoff`).
#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_doubling_backoff() {
    let h = Harness::new(one(), slow());
    h.db().faults.extend([Fault::Transient; 3]);
    h.defer("t", insert("t", 1)).await;
    let _ = h.engine.wait_applied(1).await;
    let ms = |m| Duration::from_millis(m);
    assert_eq!(gaps(&h), vec![ms(50), ms(100), ms(200)]);
    assert_eq!(h.batches(), vec![vec![1]]);
}

/// The back-off stops growing at 5 s.
/// Mutation: the cap removed (`.min(MAX_BACKOFF)`).
#[tokio::test(start_paused = true)]
async fn backoff_is_capped_at_five_seconds() {
    let h = Harness::new(one(), slow());
    h.db().faults.extend([Fault::Transient; 9]);
    h.defer("t", insert("t", 1)).await;
    let _ = h.engine.wait_applied(1).await;
    let gaps = gaps(&h);
    assert_eq!(gaps.len(), 9);
    assert_eq!(gaps.iter().max(), Some(&Duration::from_secs(5)));
    assert_eq!(gaps[8], Duration::from_secs(5));
}

/// A success resets the back-off.
/// Mutation: the back-off not reset after a batch is applied.
#[tokio::test(start_paused = true)]
async fn backoff_starts_over_after_a_success() {
    let h = Harness::new(one(), slow());
    h.db().faults.extend([Fault::Transient; 2]);
    h.defer("t", insert("t", 1)).await;
    let _ = h.engine.wait_applied(1).await;
    h.db().faults.push_back(Fault::Transient);
    h.defer("t", insert("t", 2)).await;
    let _ = h.engine.wait_applied(2).await;
    let last = gaps(&h).last().copied();
    assert_eq!(last, Some(Duration::from_millis(50)));
}

/// A client transaction (one record) is never split, even when it alone is larger
/// than `batch_size`; the batch before it stops short of it.
/// Mutation: dropping `!out.is_empty() &&` in `next_batch` (a record larger than a
/// batch is never taken: the flusher stalls).
#[tokio::test(start_paused = true)]
async fn a_client_transaction_is_never_split() {
    let flush = FlushConfig {
        batch_size: 2,
        ..slow()
    };
    let h = Harness::new(one(), flush);
    h.defer("t", insert("t", 1)).await;
    let tx = vec![
        stmt("t", insert("t", 2)),
        stmt("t", insert("t", 3)),
        stmt("t", insert("t", 4)),
    ];
    let out = h.engine.defer_tx(USER, tx, None, Default::default()).await;
    assert!(matches!(out, Ok(ref o) if o.seq == Some(2)), "{out:?}");
    let waited = tokio::time::timeout(Duration::from_secs(1), h.engine.wait_applied(2)).await;
    assert!(matches!(waited, Ok(Ok(()))), "{waited:?}");
    assert_eq!(h.batches(), vec![vec![1], vec![2]]);
    assert_eq!(h.db().rows.len(), 4);
}

/// Batches hold at most `batch_size` operations.
/// Mutation: `ops + weight > batch_size` → `ops > batch_size`.
#[tokio::test(start_paused = true)]
async fn a_batch_holds_at_most_batch_size_operations() {
    let flush = FlushConfig {
        batch_size: 2,
        ..slow()
    };
    let h = Harness::new(one(), flush);
    h.set_open(false);
    for id in 1..=5 {
        h.defer("t", insert("t", id)).await;
    }
    h.set_open(true);
    let _ = h.engine.wait_applied(5).await;
    assert_eq!(h.batches(), vec![vec![1, 2], vec![3, 4], vec![5]]);
}

/// Only a contiguous prefix is applied: a record whose append completed is not
/// applied while an earlier one is still completing.
/// Mutation: the `*seq != expected` check dropped from `next_batch`.
#[tokio::test(start_paused = true)]
async fn never_past_a_gap() {
    let h = Harness::new(one(), slow());
    h.log().hold(1);
    let first = spawn_defer(&h, insert("t", 1));
    after(1).await;
    h.defer("t", insert("t", 2)).await;
    let engine = h.engine.clone();
    let waiter = tokio::spawn(async move { engine.wait_applied(2).await });
    after(500).await;
    assert!(
        h.batches().is_empty(),
        "applied past a gap: {:?}",
        h.batches()
    );
    h.log().release(1);
    let _ = first.await;
    let _ = waiter.await;
    assert_eq!(h.batches(), vec![vec![1, 2]]);
}

/// A write decided against another's reservation of its key (an UPDATE of a key an
/// INSERT in flight made exist) is journaled after it, even when its own append would
/// finish first: the flusher applies journal order, and UPDATE 1 was the answer.
/// Mutation: `order.earlier_journaled()` not awaited before the append (the UPDATE
/// overtakes the INSERT, gets sequence number 1 and finds no row).
#[tokio::test(start_paused = true)]
async fn a_write_on_a_key_in_flight_is_journaled_after_it() {
    let h = Harness::new(one(), slow());
    h.log().stall_next();
    let inserting = spawn_defer(&h, insert("t", 7));
    after(1).await;
    // A write of another key is not held up by the stalled one.
    let other = h.defer("t", insert("t", 8)).await;
    assert_eq!(other.seq, Some(1), "another key waits for nothing");
    let updating = spawn_defer(&h, update("t", 7));
    after(1).await;
    h.log().unstall();
    let (insert, update) = match (inserting.await, updating.await) {
        (Ok(Ok(i)), Ok(Ok(u))) => (i, u),
        other => panic!("deferrals: {other:?}"),
    };
    assert_eq!(update.rows, 1, "the INSERT in flight made the key exist");
    assert!(
        insert.seq < update.seq,
        "journal order {:?} then {:?}: the UPDATE would be applied before its row exists",
        insert.seq,
        update.seq
    );
    let _ = h.engine.wait_applied(3).await;
    assert!(h.db().dead.is_empty(), "dead letters: {:?}", h.db().dead);
}

/// An earlier deferral of the key that gives up (its append refused) makes the later
/// one decide again without it: an UPDATE decided against an INSERT that never got
/// journaled finds no row, and says so (UPDATE 0), instead of journaling an UPDATE
/// of a key that does not exist.
/// Mutation: `Order::finish` settles without undoing the reservations first.
#[tokio::test(start_paused = true)]
async fn a_write_on_a_key_whose_earlier_write_failed_is_decided_again() {
    let h = Harness::new(one(), slow());
    h.log().stall_next();
    let inserting = spawn_defer(&h, insert("t", 7));
    after(1).await;
    let updating = spawn_defer(&h, update("t", 7));
    after(1).await;
    // The INSERT's append is refused (journal full) once it goes on.
    h.log().full.store(true, Ordering::SeqCst);
    h.log().unstall();
    after(1).await;
    h.log().full.store(false, Ordering::SeqCst);
    let (insert, update) = match (inserting.await, updating.await) {
        (Ok(i), Ok(u)) => (i, u),
        other => panic!("tasks: {other:?}"),
    };
    assert!(
        insert.is_err(),
        "the INSERT's append was refused: {insert:?}"
    );
    match update {
        Ok(u) => assert_eq!(u.rows, 0, "decided again, the key does not exist: {u:?}"),
        Err(e) => panic!("the UPDATE should be decided again, not fail: {e}"),
    }
}

/// An answer that journals nothing but rests on another deferral's reservation (23505
/// for an INSERT of a key an INSERT in flight reserved) waits for that one: when it
/// gives up, the second INSERT is decided again and goes in, as it would have in
/// PostgreSQL, where the first never committed.
/// Mutation: `unsettled` keys not waited for (the 23505 is answered at once).
#[tokio::test(start_paused = true)]
async fn a_refusal_resting_on_a_write_that_failed_is_decided_again() {
    let h = Harness::new(one(), slow());
    h.log().stall_next();
    let first = spawn_defer(&h, insert("t", 7));
    after(1).await;
    let second = spawn_defer(&h, insert("t", 7));
    after(1).await;
    assert!(
        !second.is_finished(),
        "answered before the first INSERT settled"
    );
    h.log().refuse_next.store(true, Ordering::SeqCst);
    h.log().unstall();
    let (first, second) = match (first.await, second.await) {
        (Ok(f), Ok(s)) => (f, s),
        other => panic!("tasks: {other:?}"),
    };
    assert!(
        first.is_err(),
        "the first INSERT's append was refused: {first:?}"
    );
    match second {
        Ok(o) => assert_eq!((o.rows, o.seq), (1, Some(1)), "{o:?}"),
        Err(e) => panic!("the second INSERT should go in once the first gave up: {e}"),
    }
}

/// Nothing beyond the journal's durable sequence number is applied.
/// Mutation: the `*seq > durable` check dropped from `next_batch`.
#[tokio::test(start_paused = true)]
async fn never_beyond_durable() {
    let h = Harness::new(one(), slow());
    h.log().lag.store(true, Ordering::SeqCst);
    h.defer("t", insert("t", 1)).await;
    let engine = h.engine.clone();
    let waiter = tokio::spawn(async move { engine.wait_applied(1).await });
    after(500).await;
    assert!(h.batches().is_empty());
    h.log().sync();
    let _ = waiter.await;
    assert_eq!(h.batches(), vec![vec![1]]);
}

/// Records the ledger does not hold are pending at start, applied first and in
/// order, never folded (their row counts were decided under another config).
/// Mutation: `replayed_through` not set at start (`may_fold` then folds them).
#[tokio::test(start_paused = true)]
async fn replayed_records_go_first_and_are_never_folded() {
    let recovered = vec![
        Record {
            ops: insert("t", 1).ops,
        },
        Record {
            ops: delete("t", 1).ops,
        },
    ];
    let tables = vec![table("t", Policy::WriteBack, |_| {})];
    let h = Harness::with_recovered(tables, slow(), recovered);
    assert_eq!(h.engine.highest(), 2);
    let _ = h.engine.wait_applied(2).await;
    assert_eq!(h.batches(), vec![vec![1, 2]]);
    h.defer("t", insert("t", 5)).await;
    let _ = h.engine.wait_applied(3).await;
    assert_eq!(h.db().folded, vec![false, true]);
}

/// Records acknowledged with `row_counts = "assumed"` are never folded.
/// Mutation: `may_fold` ignoring `assumed_through`.
#[tokio::test(start_paused = true)]
async fn assumed_records_are_never_folded() {
    let t = table("t", Policy::WriteBack, |c| {
        c.row_counts = crate::RowCounts::Assumed
    });
    let h = Harness::new(vec![t], slow());
    h.defer("t", insert("t", 1)).await;
    let _ = h.engine.wait_applied(1).await;
    assert_eq!(h.db().folded, vec![false]);
}

/// The ledger and the journal must agree at start.
/// Mutation: `check_ledger` accepting a journal that ends before the ledger.
#[test]
fn the_ledger_and_the_journal_must_agree() {
    // Fresh journal; caught up; records pending right after the ledger.
    assert!(check_ledger("j", 0, 0, None).is_ok());
    assert!(check_ledger("j", 7, 7, None).is_ok());
    assert!(check_ledger("j", 7, 9, Some(8)).is_ok());
    // The journal ends before what the ledger says was applied.
    assert!(matches!(
        check_ledger("j", 9, 7, None),
        Err(StartError::JournalBehindLedger {
            applied: 9,
            durable: 7,
            ..
        })
    ));
    // Records after the ledger were truncated away: all of them, or a prefix.
    assert!(matches!(
        check_ledger("j", 3, 9, None),
        Err(StartError::LedgerBehindJournal { from: 4, to: 9, .. })
    ));
    assert!(matches!(
        check_ledger("j", 3, 9, Some(7)),
        Err(StartError::LedgerBehindJournal { from: 4, to: 6, .. })
    ));
}

/// At shutdown the flusher applies what is pending, then ends.
/// Mutation: `next_due` returning `None` at once on shutdown (nothing drained).
#[tokio::test(start_paused = true)]
async fn shutdown_drains_what_is_pending() {
    let mut h = Harness::new(one(), slow());
    h.defer("t", insert("t", 1)).await;
    h.stop_flusher().await;
    assert_eq!(h.batches(), vec![vec![1]]);
    assert_eq!(h.engine.applied(), 1);
}
