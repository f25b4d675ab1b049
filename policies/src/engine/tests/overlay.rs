//! Overlaid reads (ADR 0039) against the engine: which rows a watch accepts, the
//! writes it overlays, and its hold of the flusher before a write it cannot overlay.

use std::time::Duration;

use super::*;
use crate::Consistency;
use crate::engine::overlay::{HOLD_LIMIT, Needs, Refusal};

fn session() -> Harness {
    let flush = FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    };
    let t = table("t", Policy::WriteBehind, |c| {
        c.consistency = Consistency::Session;
    });
    Harness::new(vec![t], flush)
}

fn key(id: u32) -> Vec<String> {
    vec![id.to_string()]
}

/// A read of `v`.
fn v() -> Needs {
    Needs {
        outputs: vec!["v".to_owned()],
        filtered: Vec::new(),
    }
}

/// Applies everything pending now, waiting for it.
async fn flushed(h: &Harness) {
    let through = h.engine.highest();
    let _ = h.engine.wait_applied(through).await;
}

/// A constant UPDATE pending: the watch overlays it; a DELETE of the row arriving
/// while it lives is not flushed until the watch ends, the UPDATE before it is.
/// Mutation: `Watches::holds` always false (the delete is applied under the read), or
/// `overlay` including the held delete's row state.
#[tokio::test(start_paused = true)]
async fn a_watch_overlays_constant_updates_and_holds_the_flush_before_a_delete() {
    let h = session();
    h.defer("t", insert("t", 1)).await;
    flushed(&h).await;
    let update = h.defer("t", update("t", 1)).await.seq.unwrap_or(0);
    let id = h
        .engine
        .watch_row("public.t", &key(1), v())
        .expect("overlayable");
    let v2 = vec![("v".to_owned(), Some("2".to_owned()))];
    assert_eq!(h.engine.overlay(id), Ok(v2.clone()));
    let delete = h.defer("t", delete("t", 1)).await.seq.unwrap_or(0);
    let engine = h.engine.clone();
    let waiter = tokio::spawn(async move { engine.wait_applied(delete).await });
    after(500).await;
    assert_eq!(
        h.engine.applied(),
        update,
        "the update flushed, the delete held"
    );
    assert!(!waiter.is_finished());
    assert_eq!(h.engine.overlay(id), Ok(v2), "the delete is not overlaid");
    h.engine.unwatch(id);
    after(50).await;
    assert_eq!(h.engine.applied(), delete);
    assert!(waiter.is_finished());
    assert_eq!(h.engine.overlay(id), Err(Refusal::Expired), "watch gone");
}

/// Rows with a pending INSERT or DELETE get no watch; a row with nothing pending gets
/// one that overlays nothing; a hold ends at `HOLD_LIMIT` and the watch then answers
/// nothing.
/// Mutation: `watch_row` skipping the rule, or `Watch::live` ignored in `holds`.
#[tokio::test(start_paused = true)]
async fn a_watch_refuses_inserts_and_deletes_and_lets_go_after_its_limit() {
    let h = session();
    h.defer("t", insert("t", 1)).await;
    flushed(&h).await;
    h.defer("t", insert("t", 5)).await;
    assert_eq!(
        h.engine.watch_row("public.t", &key(5), v()),
        Err(Refusal::Insert)
    );
    let id = h
        .engine
        .watch_row("public.t", &key(1), v())
        .expect("nothing pending");
    assert_eq!(h.engine.overlay(id), Ok(Vec::new()));
    let delete = h.defer("t", delete("t", 1)).await.seq.unwrap_or(0);
    assert_eq!(
        h.engine.watch_row("public.t", &key(1), v()),
        Err(Refusal::Delete)
    );
    let engine = h.engine.clone();
    let waiter = tokio::spawn(async move { engine.wait_applied(delete).await });
    after(500).await;
    assert!(h.engine.applied() < delete, "held");
    after(u64::try_from(HOLD_LIMIT.as_millis()).unwrap_or(0)).await;
    assert_eq!(h.engine.applied(), delete, "the hold ran out");
    assert!(waiter.is_finished());
    assert_eq!(h.engine.overlay(id), Err(Refusal::Expired));
}
