//! `INSERT … ON CONFLICT (primary key)`: the outcome decided from what spillway knows
//! of the key (pending writes, else PostgreSQL), journaled as the operation it
//! resolves to, with PostgreSQL's row count.

use std::time::Duration;

use super::*;
use crate::RowCounts;
use crate::engine::{DeferError, IfExists, Known};

fn slow() -> FlushConfig {
    FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    }
}

fn harness(row_counts: RowCounts) -> Harness {
    Harness::new(
        vec![table("t", Policy::WriteBehind, |c| {
            c.row_counts = row_counts
        })],
        slow(),
    )
}

fn row(id: u32) -> (String, Vec<String>) {
    ("public.t".to_owned(), vec![id.to_string()])
}

/// `INSERT INTO t (id, v) VALUES (id, 1) ON CONFLICT (id) DO NOTHING`.
fn do_nothing(id: u32) -> Converted {
    Converted {
        if_exists: Some(vec![IfExists::Nothing]),
        ..insert("t", id)
    }
}

/// `… ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v` (the UPDATE of `update`).
fn do_update(id: u32) -> Converted {
    let Some(update) = update("t", id).ops.pop() else {
        panic!("an update has its operation");
    };
    Converted {
        if_exists: Some(vec![IfExists::Update(update)]),
        ..insert("t", id)
    }
}

/// The kinds of the operations journaled and pending, in order.
fn pending(h: &Harness) -> Vec<&'static str> {
    h.engine
        .state()
        .pending
        .values()
        .flat_map(|r| r.ops.iter())
        .map(|op| match op {
            RowOp::Insert { .. } => "insert",
            RowOp::Update { .. } => "update",
            RowOp::Delete { .. } => "delete",
        })
        .collect()
}

/// A key PostgreSQL lacks: both forms insert and count 1.
/// Mutation: the `(false, _)` arm of `decide`'s upsert branch writing nothing.
#[tokio::test(start_paused = true)]
async fn an_absent_key_is_inserted() {
    let h = harness(RowCounts::Exact);
    let out = h.defer("t", do_nothing(1)).await;
    assert_eq!((out.rows, out.applied.clone()), (1, vec![true]));
    let out = h.defer("t", do_update(2)).await;
    assert_eq!(out.rows, 1);
    assert_eq!(pending(&h), ["insert", "insert"]);
    assert_eq!(h.db().point_reads, 2);
}

/// A key only PostgreSQL has (nothing pending): DO NOTHING writes nothing and counts
/// 0; DO UPDATE journals the UPDATE and counts 1; neither is a duplicate.
/// Mutation: the upsert branch removed (23505 from the plain INSERT rule).
#[tokio::test(start_paused = true)]
async fn a_key_postgres_has_resolves_to_nothing_or_update() {
    let h = harness(RowCounts::Exact);
    h.db().rows.insert(row(7));
    let out = h.defer("t", do_nothing(7)).await;
    assert_eq!((out.seq, out.rows, out.applied), (None, 0, vec![false]));
    let out = h.defer("t", do_update(7)).await;
    assert_eq!((out.seq.is_some(), out.rows), (true, 1));
    assert_eq!(pending(&h), ["update"]);
}

/// Pending writes answer before PostgreSQL: a key deleted but not yet applied is
/// absent (the upsert inserts), one inserted but not yet applied exists.
/// Mutation: `decide`'s upsert branch reading `known` before the overlay.
#[tokio::test(start_paused = true)]
async fn pending_writes_decide_before_postgres() {
    let h = harness(RowCounts::Exact);
    h.db().rows.insert(row(3));
    assert_eq!(h.defer("t", delete("t", 3)).await.rows, 1);
    assert_eq!(h.defer("t", do_update(3)).await.rows, 1);
    assert_eq!(h.defer("t", insert("t", 4)).await.rows, 1);
    assert_eq!(h.defer("t", do_nothing(4)).await.rows, 0);
    assert_eq!(h.defer("t", do_update(4)).await.rows, 1);
    assert_eq!(pending(&h), ["delete", "insert", "insert", "update"]);
}

/// The resolved operations apply without a dead letter: the INSERT after a pending
/// DELETE, the UPDATE of a key PostgreSQL has.
#[tokio::test(start_paused = true)]
async fn resolved_operations_apply_cleanly() {
    let mut h = harness(RowCounts::Exact);
    h.db().rows.insert(row(3));
    h.db().rows.insert(row(5));
    h.defer("t", delete("t", 3)).await;
    h.defer("t", do_update(3)).await;
    h.defer("t", do_update(5)).await;
    h.defer("t", do_nothing(5)).await;
    h.defer("t", do_nothing(6)).await;
    h.start_flusher();
    let _ = h.engine.wait_applied(4).await;
    assert!(h.db().dead.is_empty(), "{:?}", h.db().dead);
    assert!(h.db().rows.contains(&row(3)) && h.db().rows.contains(&row(6)));
    h.stop_flusher().await;
}

/// With `row_counts = "assumed"` an upsert still reads its key: its operation
/// depends on it (an UPDATE counted blindly could be an INSERT).
/// Mutation: `needs_keys` false for upserts (the decision reports the unanswered key).
#[tokio::test(start_paused = true)]
async fn assumed_row_counts_still_read_an_upserts_key() {
    let h = harness(RowCounts::Assumed);
    h.db().rows.insert(row(7));
    let out = h.defer("t", do_nothing(7)).await;
    assert_eq!((out.seq, out.rows), (None, 0));
    assert_eq!(h.db().point_reads, 1);
    assert_eq!(h.defer("t", do_update(8)).await.rows, 1);
    assert_eq!(pending(&h), ["insert"]);
}

/// Several rows in one statement: each decided after the rows before it.
#[tokio::test(start_paused = true)]
async fn rows_of_one_statement_are_decided_in_order() {
    let h = harness(RowCounts::Exact);
    h.db().rows.insert(row(2));
    let mut c = insert("t", 1);
    let second = insert("t", 2);
    c.ops.extend(second.ops);
    c.keys.extend(second.keys);
    c.if_exists = Some(vec![IfExists::Nothing, IfExists::Nothing]);
    let out = h.defer("t", c).await;
    assert_eq!((out.rows, out.applied), (1, vec![true, false]));
    assert_eq!(pending(&h), ["insert"]);
}

/// DO UPDATE needs the UPDATE privilege too (PostgreSQL checks both).
/// Mutation: `Converted::verbs` without UPDATE.
#[tokio::test(start_paused = true)]
async fn do_update_needs_the_update_privilege() {
    let h = harness(RowCounts::Exact);
    h.db().grants.insert(
        (USER.to_owned(), "public.t".to_owned(), Verb::Update),
        false,
    );
    assert_eq!(h.defer("t", do_nothing(1)).await.rows, 1);
    let out = h.engine.defer(USER, "public.t", do_update(2)).await;
    assert!(
        matches!(
            out,
            Err(DeferError::NotPermitted {
                verb: Verb::Update,
                ..
            })
        ),
        "{out:?}"
    );
}

/// In a held transaction, a DO NOTHING previewed as an insert whose key another
/// session inserted before COMMIT diverges (40001), never a silent change of count.
#[tokio::test(start_paused = true)]
async fn a_held_do_nothing_whose_key_appears_diverges() {
    let h = harness(RowCounts::Exact);
    let stmts = vec![stmt("t", do_nothing(9))];
    let mut known = Known::new();
    let preview = h
        .engine
        .preview(USER, &stmts, &mut known)
        .await
        .map(|(a, _)| a);
    let Ok(applied) = preview else {
        panic!("preview: {preview:?}");
    };
    assert_eq!(applied, vec![vec![true]]);
    h.defer("t", insert("t", 9)).await;
    let out = h.engine.defer_tx(USER, stmts, Some(applied), known).await;
    assert!(matches!(out, Err(DeferError::Diverged(_))), "{out:?}");
}
