//! Writes with a condition beyond the key (ADR 0035): decided from the key's pending
//! writes over a point read of the guarded columns, journaled with the guard, and
//! never guessed (a value spillway does not know exactly moves the statement
//! upstream).

use std::time::Duration;

use super::*;
use crate::engine::DeferError;
use crate::writes::{Cmp, Guard};

fn harness() -> Harness {
    Harness::new(
        vec![table("t", Policy::WriteBehind, |_| {})],
        FlushConfig {
            interval: Duration::from_secs(3600),
            ..flush_config()
        },
    )
}

/// `UPDATE t SET v = $new WHERE id = $id AND v = $expected`.
fn checked(id: u32, expected: i64, new: i64) -> Converted {
    let key = vec![Val::plain(Some(&id.to_string()))];
    one(
        Verb::Update,
        RowOp::Update {
            table: "public.t".to_owned(),
            key,
            set: vec![Assign {
                column: "v".to_owned(),
                op: AssignOp::Set,
                value: Val::plain(Some(&new.to_string())),
            }],
            guard: vec![Guard {
                column: "v".to_owned(),
                cmp: Cmp::Eq,
                value: Val::plain(Some(&expected.to_string())),
            }],
        },
        id,
    )
}

/// `UPDATE t SET v = v + $by WHERE id = $id`.
fn bump(id: u32, by: i64) -> Converted {
    let key = vec![Val::plain(Some(&id.to_string()))];
    one(
        Verb::Update,
        RowOp::Update {
            table: "public.t".to_owned(),
            key,
            set: vec![Assign {
                column: "v".to_owned(),
                op: AssignOp::Add,
                value: Val::plain(Some(&by.to_string())),
            }],
            guard: Vec::new(),
        },
        id,
    )
}

fn stored(h: &Harness, id: u32, v: &str) {
    let mut db = h.db();
    db.rows
        .insert(("public.t".to_owned(), vec![id.to_string()]));
    db.cells.insert(
        ("public.t".to_owned(), vec![id.to_string()], "v".to_owned()),
        v.to_owned(),
    );
}

/// The first check reads the row; the next ones are decided from the pending write
/// that set the column, without reading again; nothing is journaled for a check
/// that does not hold.
/// Mutation: `verdict` answering `Holds(true)` always (the stale check counts 1).
#[tokio::test(start_paused = true)]
async fn a_version_check_is_decided_from_the_read_then_from_pending_writes() {
    let h = harness();
    stored(&h, 1, "1");
    assert_eq!(h.defer("t", checked(1, 1, 2)).await.rows, 1);
    let reads = h.db().point_reads;
    assert_eq!(h.defer("t", checked(1, 1, 3)).await.rows, 0);
    assert_eq!(h.defer("t", checked(1, 2, 3)).await.rows, 1);
    assert_eq!(
        h.engine.state().pending.len(),
        2,
        "the check that failed journaled nothing"
    );
    assert_eq!(h.db().point_reads, reads, "no further existence reads");
    // A row PostgreSQL does not have: 0, whatever the guard.
    assert_eq!(h.defer("t", checked(9, 1, 2)).await.rows, 0);
}

/// A delta pending on the guarded column over PostgreSQL's value, with a read that
/// does not say which pending records it has (the fake has no ledger): not known
/// exactly, so the statement goes upstream instead of being guessed.
/// Mutation: `step` treating a delta over `Base` as the read's value.
#[tokio::test(start_paused = true)]
async fn a_delta_over_an_unpositioned_read_is_not_guessed() {
    let h = harness();
    stored(&h, 1, "5");
    assert_eq!(h.defer("t", bump(1, 1)).await.rows, 1);
    let err = h
        .engine
        .defer(USER, "public.t", checked(1, 6, 7))
        .await
        .err();
    assert!(matches!(err, Some(DeferError::RowUnknown(_))), "{err:?}");
    // A value set since (`v = 2`) makes it known again.
    assert_eq!(h.defer("t", update("t", 1)).await.rows, 1);
    assert_eq!(h.defer("t", checked(1, 2, 3)).await.rows, 1);
}
