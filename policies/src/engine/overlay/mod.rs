//! Read-your-writes reads answered without waiting for the flush (ADR 0039): a point
//! read of a `consistency = "session"` table goes upstream at once, and the pending
//! writes of its row are overlaid on the row image PostgreSQL returns.
//!
//! The rule ([`overlay_of`]): the row's pending writes, every session's, in log order,
//! must all be UPDATEs by key, without a guard, that assign the columns the read
//! outputs only constants (`AssignOp::Set`, no cast) and the columns its WHERE
//! compares nothing ([`Needs`]); no pending write of the table may have a key spillway
//! does not know. Then the answer after all of them is the base image with each output
//! column set to its last assignment, whichever of them the base image already
//! includes (setting a column to a constant again changes nothing; a later one
//! overwrites an earlier one; columns the read does not use may become anything). An
//! INSERT, a DELETE, a guarded write, an arithmetic write of an output column depends
//! on, or decides, what the base has: no overlay (the read waits, as before).
//!
//! A watch ([`Engine::watch_row`]) covers the read's round trip: it starts with the
//! row's pending writes (all overlayable, else there is none; and no write of the row
//! decided but not journaled yet, whose sequence number could come before them), keeps each write of
//! the row that becomes pending while it lives, and holds the flusher before the
//! first of those that is not overlayable ([`Watches::holds`]). So when the row
//! arrives, PostgreSQL's snapshot holds at most the writes before that one, and the
//! overlay of the writes before it ([`Engine::overlay`]) is the row after a prefix of
//! the log that contains every write acknowledged before the read.
//!
//! Invariants:
//! - An overlay is only given from writes all of which are overlayable; a watch whose
//!   hold ran out ([`HOLD_LIMIT`]) while a write it holds was pending gives none.
//! - The hold delays the flush at most [`HOLD_LIMIT`] per watch, and only from the
//!   first write of a watched row that no overlay can include.

use std::sync::Arc;

use tokio::time::Instant;

use super::watches::Watch;
pub use super::watches::{Assigned, HOLD_LIMIT, Needs, Refusal, Watches, fold, overlay_of};

use super::state::Settlement;
use super::{Checks, Engine, Log};
use crate::writes::{Record, RowOp};

impl<C: Checks, L: Log> Engine<C, L> {
    /// Starts watching row `key` of `table` for a read answered with an overlay: its
    /// id, or why its pending writes make none (the read then waits as before).
    pub fn watch_row(&self, table: &str, key: &[String], needs: Needs) -> Result<u64, Refusal> {
        let key_of = |op: &RowOp| self.key_of(op);
        let mut state = self.state();
        if state
            .pending
            .first_key_value()
            .is_some_and(|(s, _)| *s <= state.replayed_through)
        {
            return Err(Refusal::Replaying);
        }
        let seqs = state.watches.row(table, key).ok_or(Refusal::UnknownKey)?;
        let records: Vec<(u64, Arc<Record>)> = seqs
            .into_iter()
            .filter_map(|s| state.pending.get(&s).map(|r| (s, r.clone())))
            .collect();
        overlay_of(
            records.iter().map(|(_, r)| r.as_ref()),
            table,
            key,
            &needs,
            key_of,
        )?;
        let slot = (table.to_owned(), key.to_vec());
        let deciding = state
            .deciding
            .iter()
            .flat_map(|(_, ops)| ops.iter())
            .any(|op| op.table() == table && key_of(op).is_none_or(|k| k == key));
        let appending = state
            .appending
            .get(&slot)
            .is_some_and(|rx| *rx.borrow() == Settlement::Appending);
        if deciding || appending {
            return Err(Refusal::Deciding);
        }
        let watches = &mut state.watches;
        watches.next_id += 1;
        let id = watches.next_id;
        watches.list.push(Watch {
            id,
            table: table.to_owned(),
            key: key.to_vec(),
            needs,
            started: Instant::now(),
            records,
            blocking: None,
            lapsed: false,
        });
        Ok(id)
    }

    /// The overlay of watch `id`'s row now that PostgreSQL's image of it arrived: the
    /// writes up to the first one it holds, in log order.
    pub fn overlay(&self, id: u64) -> Result<Assigned, Refusal> {
        let state = self.state();
        let w = state
            .watches
            .list
            .iter()
            .find(|w| w.id == id)
            .ok_or(Refusal::Expired)?;
        if w.lapsed || (w.blocking.is_some() && !w.live()) {
            return Err(Refusal::Expired);
        }
        let mut records: Vec<&(u64, Arc<Record>)> = w
            .records
            .iter()
            .filter(|(s, _)| w.blocking.is_none_or(|b| *s < b))
            .collect();
        records.sort_by_key(|(s, _)| *s);
        let key_of = |op: &RowOp| self.key_of(op);
        overlay_of(
            records.iter().map(|(_, r)| r.as_ref()),
            &w.table,
            &w.key,
            &w.needs,
            key_of,
        )
    }

    /// Watch `id` ended (its read was answered, failed, or the session ended); a flush
    /// it held may go on.
    pub fn unwatch(&self, id: u64) {
        let mut state = self.state();
        let mut held = false;
        state.watches.list.retain(|w| {
            held |= w.id == id && w.blocking.is_some();
            w.id != id
        });
        drop(state);
        // Only a watch that held a write may have stopped a flush.
        if held {
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
