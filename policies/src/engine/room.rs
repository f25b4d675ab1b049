//! Room and back-pressure (SPEC §6, `max_pending` / `when_full`): a table with
//! `max_pending` records pending takes no new deferred write until the flusher makes
//! room. `block` waits up to `block_timeout` (asking for a flush meanwhile), then
//! refuses with 53000; `reject` refuses at once; `write-through` is the proxy's
//! decision before it asks the engine ([`Engine::is_full`]): the statement then runs
//! upstream, after its barrier.

use std::time::Duration;

use tokio::time::Instant;

use super::table::DeferredTable;
use super::{Checks, DeferError, Engine, Log};
use crate::WhenFull;

/// How often a blocked writer looks again when nothing was applied meanwhile.
const ROOM_POLL: Duration = Duration::from_millis(20);

impl<C: Checks, L: Log> Engine<C, L> {
    /// Applies `max_pending`/`when_full = "block" | "reject"` of `t`.
    pub(super) async fn wait_for_room(&self, t: &DeferredTable) -> Result<(), DeferError> {
        let started = Instant::now();
        let table = t.meta.name.as_str();
        loop {
            let pending = self.state().pending_of(table);
            if pending < t.config.max_pending {
                return Ok(());
            }
            if t.config.when_full != WhenFull::Block || started.elapsed() >= t.config.block_timeout
            {
                return Err(DeferError::Full {
                    table: table.to_owned(),
                    pending,
                });
            }
            self.want(self.highest());
            let mut applied = self.applied.subscribe();
            let _ = tokio::time::timeout(ROOM_POLL, applied.changed()).await;
        }
    }

    /// Whether `table` is at its `max_pending` (for `when_full = "write-through"`).
    pub fn is_full(&self, table: &str) -> bool {
        let pending = self.state().pending_of(table);
        self.tables
            .load()
            .deferring(table)
            .is_some_and(|t| pending >= t.config.max_pending)
    }
}
