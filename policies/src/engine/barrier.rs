//! What a request must wait for before it goes upstream (a barrier): the pending
//! writes of the deferred tables it touches, as their `consistency` says (SPEC §6).
//! `strong`: every read of a table with pending writes waits for them; `session`:
//! only the writing session's reads wait, for its own writes; `bounded`: reads never
//! wait (the flusher's tick bounds their staleness). Writes, DDL and anything unknown
//! always wait, whatever the consistency; a table leaving deferral is `strong`.
//!
//! Invariant: a barrier's target is a sequence number acknowledged before the request
//! arrived; the request goes on once it is applied, even if newer writes arrived
//! meanwhile (they are concurrent with it), so a busy table cannot starve a reader.

use std::time::Duration;

use super::{Checks, DeferError, Engine, Log};
use crate::Consistency;

/// How often a barrier looks at the poison flag when nothing is applied.
const POISON_POLL: Duration = Duration::from_millis(200);

impl<C: Checks, L: Log> Engine<C, L> {
    /// The sequence number a barrier on `tables` must wait for, if any of them has
    /// pending writes.
    pub fn barrier_target<'a>(&self, tables: impl IntoIterator<Item = &'a str>) -> Option<u64> {
        let state = self.state();
        tables
            .into_iter()
            .any(|t| state.tables.get(t).is_some_and(|s| s.pending > 0))
            .then_some(state.highest)
    }

    /// The sequence number a request touching `tables` must see applied before it goes
    /// upstream, or `None` when it may go now. `reads_only`: the request only reads
    /// (its tables' consistency applies); `own_seq`: the session's latest deferred
    /// write.
    pub fn barrier<'a>(
        &self,
        tables: impl IntoIterator<Item = &'a str>,
        reads_only: bool,
        own_seq: u64,
    ) -> Option<u64> {
        let set = self.tables.load();
        let applied = self.applied();
        let mut target = None::<u64>;
        let mut strong = Vec::new();
        for name in tables {
            match (reads_only, set.consistency(name)) {
                (true, Consistency::Bounded) => {}
                (true, Consistency::Session) => {
                    if own_seq > applied {
                        target = Some(target.unwrap_or(0).max(own_seq));
                    }
                }
                _ => strong.push(name),
            }
        }
        if let Some(t) = self.barrier_target(strong) {
            target = Some(target.unwrap_or(0).max(t));
        }
        target.filter(|t| *t > applied)
    }

    /// Returns once everything up to `seq` is applied upstream.
    pub async fn wait_applied(&self, seq: u64) -> Result<(), DeferError> {
        let mut applied = self.applied.subscribe();
        loop {
            if *applied.borrow_and_update() >= seq {
                return Ok(());
            }
            if let Some(cause) = self.poisoned.get() {
                return Err(DeferError::Stopped(cause.clone()));
            }
            self.want(seq);
            // Poison is noticed within this period even without a change.
            let _ = tokio::time::timeout(POISON_POLL, applied.changed()).await;
        }
    }
}
