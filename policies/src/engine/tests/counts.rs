//! Exact row counts (the key overlay, point reads) and privilege answers.

use std::time::Duration;

use super::*;
use crate::RowCounts;
use crate::engine::{DeferError, Known};

fn slow() -> FlushConfig {
    FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    }
}

fn exact() -> Harness {
    Harness::new(vec![table("t", Policy::WriteBehind, |_| {})], slow())
}

fn row(id: u32) -> (String, Vec<String>) {
    ("public.t".to_owned(), vec![id.to_string()])
}

/// An UPDATE of a key PostgreSQL does not have writes nothing and counts 0 rows.
/// Mutation: the `(Update | Delete, true, Some(false) | None)` arm of `decide`
/// removed (the UPDATE counts 1 and is journaled).
#[tokio::test(start_paused = true)]
async fn an_update_of_a_missing_key_counts_zero_and_writes_nothing() {
    let h = exact();
    let out = h.defer("t", update("t", 7)).await;
    assert_eq!((out.seq, out.rows), (None, 0));
    assert_eq!(h.engine.highest(), 0);
    assert_eq!(h.db().point_reads, 1);
}

/// An INSERT of a key PostgreSQL has is 23505, worded as PostgreSQL words it.
/// Mutation: the `(Insert, true, Some(true))` arm of `decide` removed.
#[tokio::test(start_paused = true)]
async fn an_insert_of_an_existing_key_is_23505() {
    let h = exact();
    h.db().rows.insert(row(7));
    let out = h.engine.defer(USER, "public.t", insert("t", 7)).await;
    let Err(e) = out else {
        panic!("duplicate accepted");
    };
    assert_eq!(e.sqlstate(), "23505");
    assert!(
        matches!(&e, DeferError::Duplicate { constraint, detail }
            if constraint == "t_pkey" && detail == "Key (id)=(7) already exists."),
        "{e:?}"
    );
}

/// A key with pending writes is answered by the overlay, never by PostgreSQL (which
/// does not have them yet).
/// Mutation: `State::answered` and `decide` ignoring the overlay (`state.keys`).
#[tokio::test(start_paused = true)]
async fn the_overlay_answers_keys_with_pending_writes() {
    let h = exact();
    assert_eq!(h.defer("t", insert("t", 1)).await.rows, 1);
    assert_eq!(h.defer("t", update("t", 1)).await.rows, 1);
    assert_eq!(h.defer("t", delete("t", 1)).await.rows, 1);
    assert_eq!(h.defer("t", update("t", 1)).await.rows, 0);
    assert_eq!(
        h.db().point_reads,
        1,
        "only the first statement read the key"
    );
    assert!(h.db().rows.is_empty(), "nothing applied yet");
}

/// Once a key's writes are applied it leaves the overlay, and PostgreSQL answers
/// again (another application may have changed it since).
/// Mutation: `State::finish` keeping applied keys in the overlay.
#[tokio::test(start_paused = true)]
async fn an_applied_key_is_read_again() {
    let h = exact();
    h.defer("t", insert("t", 1)).await;
    let _ = h.engine.wait_applied(1).await;
    h.db().rows.remove(&row(1));
    assert_eq!(h.defer("t", update("t", 1)).await.rows, 0);
    assert_eq!(h.db().point_reads, 2);
}

/// A point read that began before the key's pending writes were applied no longer
/// answers for it: it is read again.
/// Mutation: `State::answered` ignoring `forgotten` (a stale point read stands).
#[tokio::test(start_paused = true)]
async fn a_point_read_overtaken_by_an_applied_write_is_read_again() {
    let h = exact();
    let mut known = Known::new();
    let tx = vec![stmt("t", update("t", 1))];
    let first = h
        .engine
        .preview(USER, &tx, &mut known)
        .await
        .map(|(a, _)| a);
    assert!(
        matches!(first, Ok(ref a) if a == &vec![vec![false]]),
        "{first:?}"
    );
    // Another session inserts the key, and it is applied.
    h.defer("t", insert("t", 1)).await;
    let _ = h.engine.wait_applied(1).await;
    let again = h
        .engine
        .preview(USER, &tx, &mut known)
        .await
        .map(|(a, _)| a);
    assert!(
        matches!(again, Ok(ref a) if a == &vec![vec![true]]),
        "{again:?}"
    );
    assert_eq!(h.db().point_reads, 3);
}

/// `row_counts = "assumed"`: every operation counts, PostgreSQL is never asked.
/// Mutation: `decide::exact` returning true for every table.
#[tokio::test(start_paused = true)]
async fn assumed_row_counts_never_read_upstream() {
    let t = table("t", Policy::WriteBehind, |c| {
        c.row_counts = RowCounts::Assumed
    });
    let h = Harness::new(vec![t], slow());
    let out = h.defer("t", update("t", 7)).await;
    assert_eq!((out.seq, out.rows), (Some(1), 1));
    assert_eq!(h.db().point_reads, 0);
}

/// A privilege answer is reused for five seconds, then asked again.
/// Mutation: the TTL check dropped (`at.elapsed() < PRIVILEGE_TTL` → `true`).
#[tokio::test(start_paused = true)]
async fn privilege_answers_are_reused_for_the_ttl() {
    let t = table("t", Policy::WriteBehind, |c| {
        c.row_counts = RowCounts::Assumed
    });
    let h = Harness::new(vec![t], slow());
    h.defer("t", update("t", 1)).await;
    after(4_900).await;
    h.defer("t", update("t", 1)).await;
    assert_eq!(h.db().privilege_checks, 1);
    after(200).await;
    h.defer("t", update("t", 1)).await;
    assert_eq!(h.db().privilege_checks, 2);
}

/// A role PostgreSQL refuses is not permitted (the statement then runs write-through
/// and PostgreSQL reports the refusal).
/// Mutation: `check_privileges` ignoring a `false` answer.
#[tokio::test(start_paused = true)]
async fn a_role_without_the_privilege_is_not_permitted() {
    let h = exact();
    h.db().grants.insert(
        (USER.to_owned(), "public.t".to_owned(), Verb::Delete),
        false,
    );
    let out = h.engine.defer(USER, "public.t", delete("t", 1)).await;
    assert!(
        matches!(
            out,
            Err(DeferError::NotPermitted {
                verb: Verb::Delete,
                ..
            })
        ),
        "{out:?}"
    );
    assert!(
        h.defer("t", insert("t", 1)).await.seq.is_some(),
        "INSERT is granted"
    );
}

/// While PostgreSQL is unreachable the last privilege answer stands past its TTL; a
/// role never answered for, or a key never read, is 08006 (retryable).
/// Mutation: the `Unreachable` fallback of `permitted` removed.
#[tokio::test(start_paused = true)]
async fn while_postgresql_is_unreachable_the_last_answer_stands() {
    let assumed = table("a", Policy::WriteBehind, |c| {
        c.row_counts = RowCounts::Assumed
    });
    let h = Harness::new(
        vec![assumed, table("t", Policy::WriteBehind, |_| {})],
        slow(),
    );
    h.defer("a", update("a", 1)).await;
    after(10_000).await;
    h.db().unreachable = true;
    let out = h.engine.defer(USER, "public.a", update("a", 1)).await;
    assert!(out.is_ok(), "{out:?}");
    let stranger = h.engine.defer("other", "public.a", update("a", 1)).await;
    assert!(
        matches!(&stranger, Err(e) if e.sqlstate() == "08006"),
        "{stranger:?}"
    );
    let unread = h.engine.defer(USER, "public.t", insert("t", 1)).await;
    assert!(
        matches!(&unread, Err(DeferError::Unreachable(_))),
        "{unread:?}"
    );
}

/// A write to a table that is not deferred is refused (it runs write-through).
/// Mutation: `deferring` not checking the table set.
#[tokio::test(start_paused = true)]
async fn a_table_not_deferred_is_refused() {
    let h = exact();
    let out = h.engine.defer(USER, "public.nope", insert("nope", 1)).await;
    assert!(matches!(out, Err(DeferError::NotDeferred(_))), "{out:?}");
}
