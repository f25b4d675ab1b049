//! An upsert's RETURNING of a column its DO UPDATE leaves as stored (ADR 0038): the
//! value is what spillway knows of the row — a pending write's, else PostgreSQL's
//! through a point read — handed back per operation; unknown or not in an exactly
//! answerable spelling, the statement goes upstream; never in a held transaction.

use std::time::Duration;

use super::*;
use crate::engine::{DeferError, IfExists, Known, TxStatement};

fn harness() -> Harness {
    Harness::new(
        vec![table("t", Policy::WriteBehind, |_| {})],
        FlushConfig {
            interval: Duration::from_secs(3600),
            ..flush_config()
        },
    )
}

/// `INSERT INTO t (id, v) VALUES (id, 1) ON CONFLICT (id) DO UPDATE SET … RETURNING
/// v`, its DO UPDATE not assigning `v`.
fn upsert_returning_v(id: u32) -> Converted {
    let update = RowOp::Update {
        table: "public.t".to_owned(),
        key: vec![Val::plain(Some(&id.to_string()))],
        set: Vec::new(),
        guard: Vec::new(),
    };
    Converted {
        if_exists: Some(vec![IfExists::Update(update)]),
        stored: vec!["v".to_owned()],
        ..insert("t", id)
    }
}

fn in_postgres(h: &Harness, id: u32, v: &str) {
    let mut db = h.db();
    db.rows
        .insert(("public.t".to_owned(), vec![id.to_string()]));
    db.cells.insert(
        ("public.t".to_owned(), vec![id.to_string()], "v".to_owned()),
        v.to_owned(),
    );
}

/// An absent key inserts (nothing stored to return); a pending one returns the pending
/// write's value; a key only PostgreSQL has, its read value.
/// Mutation: `decide` not filling `stored` for the DO UPDATE branch.
#[tokio::test(start_paused = true)]
async fn stored_values_come_from_pending_writes_then_a_read() {
    let h = harness();
    let out = h.defer("t", upsert_returning_v(1)).await;
    assert_eq!((out.rows, out.stored.clone()), (1, Vec::new()));
    let out = h.defer("t", upsert_returning_v(1)).await;
    assert_eq!(out.stored, vec![(0, vec![Some("1".to_owned())])]);
    // `v = 2` pending over it.
    assert_eq!(h.defer("t", update("t", 1)).await.rows, 1);
    let out = h.defer("t", upsert_returning_v(1)).await;
    assert_eq!(out.stored, vec![(0, vec![Some("2".to_owned())])]);
    in_postgres(&h, 5, "42");
    let out = h.defer("t", upsert_returning_v(5)).await;
    assert_eq!(
        (out.rows, out.stored),
        (1, vec![(0, vec![Some("42".to_owned())])])
    );
}

/// A stored value not in a spelling RETURNING encodes exactly moves the statement
/// upstream.
/// Mutation: `guards::stored` skipping `exact_spelling`.
#[tokio::test(start_paused = true)]
async fn what_is_not_known_exactly_goes_upstream() {
    let h = harness();
    in_postgres(&h, 7, "7.0");
    let err = h
        .engine
        .defer(USER, "public.t", upsert_returning_v(7))
        .await
        .err();
    assert!(matches!(err, Some(DeferError::RowUnknown(_))), "{err:?}");
}

/// In a held transaction the values are given at the statement and decided again at
/// COMMIT: another session's write of the row in between changes them, and COMMIT
/// answers 40001 with nothing written.
/// Mutation: `decide` not comparing `told`.
#[tokio::test(start_paused = true)]
async fn a_held_answer_that_changed_by_commit_diverges() {
    let h = harness();
    in_postgres(&h, 8, "8");
    let mut stmts = vec![TxStatement {
        table: "public.t".to_owned(),
        converted: upsert_returning_v(8),
    }];
    let mut known = Known::new();
    let (applied, stored) = h
        .engine
        .preview(USER, &stmts, &mut known)
        .await
        .expect("preview");
    assert_eq!(stored, vec![(0, 0, vec![Some("8".to_owned())])]);
    stmts[0].converted.told = Some(vec![(0, vec![Some("8".to_owned())])]);
    // Unchanged: COMMIT journals it.
    let ok = h
        .engine
        .defer_tx(USER, stmts.clone(), Some(applied.clone()), known.clone())
        .await
        .expect("commit");
    assert!(ok.seq.is_some());
    // Changed by another session (`v = 2`) before a second such COMMIT.
    assert_eq!(h.defer("t", update("t", 8)).await.rows, 1);
    let err = h
        .engine
        .defer_tx(USER, stmts, Some(applied), known)
        .await
        .err();
    assert!(matches!(err, Some(DeferError::Diverged(_))), "{err:?}");
}
