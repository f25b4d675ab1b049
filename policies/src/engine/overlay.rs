//! Read-your-writes reads answered without waiting for the flush (ADR 0039): a point
//! read of a `consistency = "session"` table goes upstream at once, and the pending
//! writes of its row are overlaid on the row image PostgreSQL returns.
//!
//! The rule ([`overlay_of`]): the row's pending writes, every session's, in log order,
//! must all be UPDATEs by key that assign constants ([`AssignOp::Set`], no guard, no
//! cast), and no pending write of the table may have a key spillway does not know.
//! Then the row after all of them is the base image with each assigned column set to
//! its last assignment, whichever of them the base image already includes (setting a
//! column to a constant again changes nothing; a later one overwrites an earlier
//! one). An INSERT, a DELETE, an arithmetic or guarded write depends on, or decides,
//! what the base has: no overlay (the read waits, as before).
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
use std::time::Duration;

use tokio::time::Instant;

use super::state::Settlement;
use super::{Checks, Engine, Log};
use crate::writes::{AssignOp, Record, RowOp};

/// How long a watch may hold the flusher before a write of its row (a read's round
/// trip is far shorter; past it the read is answered with an error, never a guess).
pub const HOLD_LIMIT: Duration = Duration::from_secs(2);

/// The row's assigned columns after its pending writes: (column, text; `None` is
/// NULL), each column once, its last assignment.
pub type Assigned = Vec<(String, Option<String>)>;

/// Why a row's pending writes do not make an overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An INSERT of the row (or of a key spillway does not know).
    Insert,
    Delete,
    /// `col = col + v`: depends on the base image.
    Arithmetic,
    /// A condition beyond the key: decided against the base image.
    Guarded,
    /// A value with a client's cast, applied at the flush.
    Cast,
    /// A write of the table whose key spillway does not know: it may be the row's.
    UnknownKey,
    /// A write of the row decided and not journaled yet: its sequence number may come
    /// before the writes pending now, and the flusher could not pass it.
    Deciding,
    /// The watch is gone, or held the flusher past [`HOLD_LIMIT`].
    Expired,
}

/// Folds one operation of the row into `into`, or why it makes no overlay.
pub fn fold(op: &RowOp, into: &mut Assigned) -> Result<(), Refusal> {
    let set = match op {
        RowOp::Insert { .. } => return Err(Refusal::Insert),
        RowOp::Delete { .. } => return Err(Refusal::Delete),
        RowOp::Update { guard, .. } if !guard.is_empty() => return Err(Refusal::Guarded),
        RowOp::Update { set, .. } => set,
    };
    for a in set {
        if a.op != AssignOp::Set {
            return Err(Refusal::Arithmetic);
        }
        if a.value.cast.is_some() {
            return Err(Refusal::Cast);
        }
    }
    for a in set {
        match into.iter_mut().find(|(c, _)| *c == a.column) {
            Some((_, v)) => v.clone_from(&a.value.text),
            None => into.push((a.column.clone(), a.value.text.clone())),
        }
    }
    Ok(())
}

/// The overlay of row `key` of `table` from `records` in log order (`key_of`: an
/// operation's canonical key, `None` when spillway does not know it).
pub fn overlay_of<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    table: &str,
    key: &[String],
    key_of: impl Fn(&RowOp) -> Option<Vec<String>>,
) -> Result<Assigned, Refusal> {
    let mut out = Assigned::new();
    for record in records {
        for op in record.ops.iter().filter(|op| op.table() == table) {
            match key_of(op) {
                None => return Err(Refusal::UnknownKey),
                Some(k) if k != key => {}
                Some(_) => fold(op, &mut out)?,
            }
        }
    }
    Ok(out)
}

/// One row being read with its pending writes overlaid.
struct Watch {
    id: u64,
    table: String,
    key: Vec<String>,
    started: Instant,
    /// The row's pending writes when the watch began, then those that became pending
    /// while it lives, each with its sequence number.
    records: Vec<(u64, Arc<Record>)>,
    /// The lowest sequence number of a write of the row, pending since the watch
    /// began, that no overlay can include: the flusher stops before it.
    blocking: Option<u64>,
}

impl Watch {
    fn live(&self) -> bool {
        self.started.elapsed() < HOLD_LIMIT
    }
}

/// The watches of the engine's state (under its lock).
#[derive(Default)]
pub struct Watches {
    list: Vec<Watch>,
    next_id: u64,
}

impl Watches {
    /// A record became pending: each watch of a row it writes keeps it.
    pub fn note(
        &mut self,
        seq: u64,
        record: &Arc<Record>,
        key_of: impl Fn(&RowOp) -> Option<Vec<String>>,
    ) {
        for w in &mut self.list {
            let mut writes = false;
            let mut blocks = false;
            for op in record.ops.iter().filter(|op| op.table() == w.table) {
                match key_of(op) {
                    Some(k) if k != w.key => continue,
                    Some(_) => blocks |= fold(op, &mut Assigned::new()).is_err(),
                    None => blocks = true,
                }
                writes = true;
            }
            if writes {
                w.records.push((seq, record.clone()));
            }
            if blocks {
                w.blocking = Some(w.blocking.map_or(seq, |b| b.min(seq)));
            }
        }
    }

    /// Whether the flusher must stop before record `seq`.
    pub fn holds(&self, seq: u64) -> bool {
        self.list
            .iter()
            .any(|w| w.blocking.is_some_and(|b| b <= seq) && w.live())
    }
}

impl<C: Checks, L: Log> Engine<C, L> {
    /// Starts watching row `key` of `table` for a read answered with an overlay: its
    /// id, or why its pending writes make none (the read then waits as before).
    pub fn watch_row(&self, table: &str, key: &[String]) -> Result<u64, Refusal> {
        let key_of = |op: &RowOp| self.key_of(op);
        let mut state = self.state();
        let records: Vec<(u64, Arc<Record>)> = state
            .pending
            .iter()
            .filter(|(_, r)| r.ops.iter().any(|op| op.table() == table))
            .map(|(s, r)| (*s, r.clone()))
            .collect();
        overlay_of(records.iter().map(|(_, r)| r.as_ref()), table, key, key_of)?;
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
            started: Instant::now(),
            records,
            blocking: None,
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
        if w.blocking.is_some() && !w.live() {
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
            key_of,
        )
    }

    /// Watch `id` ended (its read was answered, failed, or the session ended); a flush
    /// it held may go on.
    pub fn unwatch(&self, id: u64) {
        let mut state = self.state();
        let before = state.watches.list.len();
        state.watches.list.retain(|w| w.id != id);
        let released = state.watches.list.len() != before;
        drop(state);
        if released {
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
