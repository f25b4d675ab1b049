//! A reload taking a table off deferral: no new deferrals, strong barriers, drained
//! before it is dropped.

use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::Consistency;
use crate::engine::{DeferError, TablesChange};

fn slow() -> FlushConfig {
    FlushConfig {
        interval: Duration::from_secs(3600),
        ..flush_config()
    }
}

fn leave_all() -> TablesChange {
    TablesChange {
        configs: HashMap::new(),
        entering: HashMap::new(),
    }
}

/// A table leaving deferral takes no new deferred write and is drained before it is
/// dropped; its facts stay for records still to plan.
/// Mutation: `TableSet::deferring` ignoring `leaving`.
#[tokio::test(start_paused = true)]
async fn a_leaving_table_refuses_deferrals_and_is_drained() {
    let h = Harness::new(vec![table("t", Policy::WriteBehind, |_| {})], slow());
    h.defer("t", insert("t", 1)).await;
    let (leaving, _old) = h.engine.begin_reload(leave_all());
    assert_eq!(leaving, vec!["public.t".to_owned()]);
    let refused = h.engine.defer(USER, "public.t", insert("t", 2)).await;
    assert!(
        matches!(refused, Err(DeferError::NotDeferred(_))),
        "{refused:?}"
    );
    let drained =
        tokio::time::timeout(Duration::from_secs(1), h.engine.drain_leaving(&leaving)).await;
    assert!(matches!(drained, Ok(Ok(()))), "{drained:?}");
    assert_eq!(h.batches(), vec![vec![1]]);
    h.engine.finish_reload();
    assert_eq!(h.engine.tables().names().count(), 0);
    assert!(h.engine.tables().oid_of("public.t").is_some());
}

/// A table leaving deferral gets strong barriers, whatever its consistency was.
/// Mutation: `TableSet::consistency` ignoring `leaving`.
#[tokio::test(start_paused = true)]
async fn a_leaving_table_gets_strong_barriers() {
    let t = table("t", Policy::WriteBehind, |c| {
        c.consistency = Consistency::Bounded
    });
    let h = Harness::new(vec![t], slow());
    h.defer("t", insert("t", 1)).await;
    assert_eq!(h.engine.barrier(["public.t"], true, 0), None);
    h.engine.begin_reload(leave_all());
    assert_eq!(h.engine.barrier(["public.t"], true, 0), Some(1));
}

/// The drain waits for deferrals decided but still being journaled.
/// Mutation: `drain_leaving` not waiting for in-flight deferrals.
#[tokio::test(start_paused = true)]
async fn the_drain_waits_for_deferrals_in_flight() {
    let h = Harness::new(vec![table("t", Policy::WriteBehind, |_| {})], slow());
    h.log().hold(1);
    let engine = h.engine.clone();
    let write = tokio::spawn(async move { engine.defer(USER, "public.t", insert("t", 1)).await });
    after(1).await;
    let (leaving, _old) = h.engine.begin_reload(leave_all());
    let engine = h.engine.clone();
    let drain = tokio::spawn(async move { engine.drain_leaving(&leaving).await });
    after(50).await;
    assert!(!drain.is_finished(), "drained with a deferral in flight");
    h.log().release(1);
    assert!(matches!(write.await, Ok(Ok(_))));
    assert!(matches!(drain.await, Ok(Ok(()))));
    assert_eq!(h.batches(), vec![vec![1]]);
}
