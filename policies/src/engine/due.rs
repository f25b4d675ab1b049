//! When a flush is due (SPEC §6, `[flush]`): someone waits for a sequence number
//! (a barrier, `SPILLWAY FLUSH`, a writer blocked on `max_pending`), a write-behind
//! batch is full (`batch_size` records), write-back's dirty keys reach
//! `max_dirty_keys`, or the oldest pending write is `flush.interval` old (less when a
//! `consistency = "bounded"` table promises a shorter `max_staleness`).
//!
//! Invariant: a wake alone never makes a flush due; the flusher asks [`Engine::until_due`]
//! after every wake, so a stale wake (a barrier already satisfied) never flushes a
//! record early.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Checks, Engine, Log};

impl<C: Checks, L: Log> Engine<C, L> {
    /// How long the pending records may still wait; zero when a flush is due.
    pub fn until_due(&self) -> Duration {
        let applied = *self.applied.borrow();
        if self.wanted.load(Ordering::Acquire) > applied {
            return Duration::ZERO;
        }
        let tables = self.tables.load();
        let tick = tables.tick(&self.flush.load());
        let state = self.state();
        // Write-behind: a full batch of records; write-back: too many dirty keys (its
        // records fold into those, however many there are).
        let (mut records, mut dirty) = (0, 0);
        for (table, s) in &state.tables {
            if tables.coalesces(table) {
                dirty += s.dirty_keys;
            } else {
                records += s.pending;
            }
        }
        let flush = self.flush.load();
        if records >= flush.batch_size || dirty >= flush.max_dirty_keys {
            return Duration::ZERO;
        }
        state
            .acked_at
            .first_key_value()
            .map_or(tick, |(_, oldest)| tick.saturating_sub(oldest.elapsed()))
    }

    /// How long the flusher sleeps while idle: `flush.interval`, or less when a table
    /// with `consistency = "bounded"` promises a shorter `max_staleness`.
    pub fn tick(&self) -> Duration {
        self.tables.load().tick(&self.flush.load())
    }

    /// Asks the flusher to apply everything up to `seq` now.
    pub(super) fn want(&self, seq: u64) {
        self.wanted.fetch_max(seq, Ordering::AcqRel);
        self.wake.notify_one();
    }
}
