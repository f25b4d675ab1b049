//! Held transactions: statements previewed as they come, committed as one record
//! after a re-check, or rolled back without a trace.

use std::time::Duration;

use super::*;
use crate::engine::{Applied, DeferError, Known};

fn exact() -> Harness {
    let flush = FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    };
    Harness::new(vec![table("t", Policy::WriteBehind, |_| {})], flush)
}

async fn preview(h: &Harness, tx: &[super::super::TxStatement], known: &mut Known) -> Applied {
    match h.engine.preview(USER, tx, known).await.map(|(a, _)| a) {
        Ok(a) => a,
        Err(e) => panic!("preview: {e}"),
    }
}

/// A committed transaction is one record, applied whole in one batch.
/// Mutation: `defer_tx` journaling only the last statement's operations.
#[tokio::test(start_paused = true)]
async fn a_committed_transaction_is_one_record() {
    let h = exact();
    let mut known = Known::new();
    let tx = vec![
        stmt("t", insert("t", 1)),
        stmt("t", insert("t", 2)),
        stmt("t", update("t", 1)),
    ];
    let answers = preview(&h, &tx, &mut known).await;
    assert_eq!(answers, vec![vec![true]; 3]);
    let out = h.engine.defer_tx(USER, tx, Some(answers), known).await;
    assert!(matches!(out, Ok(ref o) if o.seq == Some(1)), "{out:?}");
    assert_eq!(h.engine.highest(), 1);
    let _ = h.engine.wait_applied(1).await;
    assert_eq!(h.batches(), vec![vec![1]]);
    assert_eq!(h.db().rows.len(), 2);
}

/// A statement sees the transaction's own earlier writes, not PostgreSQL's rows.
/// Mutation: `decide` not consulting `after` (the transaction's own writes).
#[tokio::test(start_paused = true)]
async fn a_transaction_sees_its_own_writes() {
    let h = exact();
    let mut known = Known::new();
    let tx = vec![
        stmt("t", insert("t", 1)),
        stmt("t", delete("t", 1)),
        stmt("t", update("t", 1)),
    ];
    let answers = preview(&h, &tx, &mut known).await;
    assert_eq!(answers, vec![vec![true], vec![true], vec![false]]);
}

/// COMMIT re-checks: a key the transaction inserted that another session inserted
/// meanwhile is 40001, and nothing of the transaction is journaled.
/// Mutation: the `Duplicate if expected.is_some()` mapping in `defer_tx` removed
/// (the client would get 23505 at COMMIT).
#[tokio::test(start_paused = true)]
async fn commit_after_another_session_inserted_the_key_is_40001() {
    let h = exact();
    let mut known = Known::new();
    let tx = vec![stmt("t", insert("t", 1))];
    let answers = preview(&h, &tx, &mut known).await;
    h.defer("t", insert("t", 1)).await;
    let out = h.engine.defer_tx(USER, tx, Some(answers), known).await;
    let Err(e) = out else {
        panic!("committed over another session's key");
    };
    assert_eq!(e.sqlstate(), "40001", "{e}");
    assert_eq!(h.engine.highest(), 1, "only the other session's record");
}

/// COMMIT re-checks: row counts that changed since the client was answered are
/// 40001.
/// Mutation: the `expected != decision.applied` check in `defer_tx` removed.
#[tokio::test(start_paused = true)]
async fn commit_with_changed_row_counts_is_40001() {
    let h = exact();
    h.db()
        .rows
        .insert(("public.t".to_owned(), vec!["1".to_owned()]));
    let mut known = Known::new();
    let tx = vec![stmt("t", update("t", 1))];
    let answers = preview(&h, &tx, &mut known).await;
    assert_eq!(answers, vec![vec![true]]);
    h.defer("t", delete("t", 1)).await;
    let out = h.engine.defer_tx(USER, tx, Some(answers), known).await;
    assert!(matches!(out, Err(DeferError::Diverged(_))), "{out:?}");
    assert_eq!(h.engine.highest(), 1);
}

/// A rolled-back transaction (never committed) leaves nothing: no record, no key in
/// the overlay.
/// Mutation: `preview` reserving its keys in the overlay (the later INSERT is then a
/// duplicate).
#[tokio::test(start_paused = true)]
async fn a_rolled_back_transaction_leaves_nothing() {
    let h = exact();
    let mut known = Known::new();
    let tx = vec![stmt("t", insert("t", 1)), stmt("t", insert("t", 2))];
    preview(&h, &tx, &mut known).await;
    drop(known);
    assert_eq!(h.engine.highest(), 0);
    assert_eq!(h.defer("t", insert("t", 1)).await.rows, 1);
}

/// Without waiting, a statement is decided only when nothing needs PostgreSQL.
/// Mutation: `preview_now` skipping its `unanswered` check (an unread key taken as
/// absent).
#[tokio::test(start_paused = true)]
async fn preview_now_needs_every_answer_at_hand() {
    let h = exact();
    h.db()
        .rows
        .insert(("public.t".to_owned(), vec!["1".to_owned()]));
    let mut known = Known::new();
    // The privilege is known from another key's statement; key 1 is not read yet.
    preview(&h, &[stmt("t", update("t", 2))], &mut known).await;
    let tx = vec![stmt("t", update("t", 1))];
    assert!(
        h.engine.preview_now(USER, &tx, &known).is_none(),
        "key 1 not read yet"
    );
    preview(&h, &tx, &mut known).await;
    let now = h
        .engine
        .preview_now(USER, &tx, &known)
        .map(|r| r.map(|(a, _)| a));
    assert!(
        matches!(now, Some(Ok(ref a)) if a == &vec![vec![true]]),
        "{now:?}"
    );
}

/// A key an earlier statement of the transaction inserted, written by another session
/// since, makes the next statement 40001 (not a duplicate of the next statement).
/// Mutation: the earlier-statements check of `decide_preview` removed.
#[tokio::test(start_paused = true)]
async fn an_overtaken_earlier_insert_is_a_divergence() {
    let h = exact();
    let mut known = Known::new();
    let first = vec![stmt("t", insert("t", 1))];
    preview(&h, &first, &mut known).await;
    h.defer("t", insert("t", 1)).await;
    let tx = vec![stmt("t", insert("t", 1)), stmt("t", update("t", 2))];
    let out = h
        .engine
        .preview(USER, &tx, &mut known)
        .await
        .map(|(a, _)| a);
    assert!(matches!(out, Err(DeferError::Diverged(_))), "{out:?}");
}
