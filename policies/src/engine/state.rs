//! The engine's mutable state, behind one lock: pending records by sequence number,
//! per-table counts, and the key overlay (whether each key with pending writes exists
//! once they are applied), with the bookkeeping that tells a point read taken before a
//! key's writes were applied from one taken after.
//!
//! Invariants:
//! - A key is in the overlay exactly while some pending record writes it (`pending`
//!   counts them); when its last one is applied it is forgotten, and the forgetting
//!   gets a new `generation`.
//! - `acked_at` and `pending` hold the same sequence numbers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use super::watches::Watches;
use crate::writes::{Record, RowOp};

/// (table, canonical key): a key of the overlay.
pub type Slot = (String, Vec<String>);

/// Point-read answers already known: (table, key) → (the row exists, the overlay
/// generation when the read began, the count of outside writes then: see
/// [`super::Engine::note_outside_write`]).
pub type Known = HashMap<Slot, (bool, u64, u64)>;

/// How many forgotten keys [`State::forgotten`] remembers before it starts over.
pub const FORGOTTEN_LIMIT: usize = 4096;

/// What a flushed batch wrote, for the read cache: the rows with known keys, and
/// the tables written where some row's key is not known (invalidated whole).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Every table written, each once.
    pub tables: Vec<String>,
    /// (table, canonical key) of each row written to a table not in `unkeyed`.
    pub keys: Vec<(String, Vec<String>)>,
    /// Tables some of whose rows' keys are not known.
    pub unkeyed: Vec<String>,
    /// The transaction that applied them, when known (`Flushed::xid`).
    pub xid: Option<u64>,
}

#[derive(Default)]
pub struct State {
    /// Durable records not yet applied, by sequence number.
    pub pending: BTreeMap<u64, Arc<Record>>,
    /// When each pending record became pending: the lowest sequence number's is the
    /// age that makes a flush due (`flush.interval`), also while more keep arriving.
    pub acked_at: BTreeMap<u64, Instant>,
    /// Per table, the highest sequence number acknowledged with `row_counts =
    /// "assumed"`, and the highest replayed at start (acknowledged under a config no
    /// longer known): write-back never folds those records (see `may_fold`), because
    /// folding relies on every operation having been valid when acknowledged.
    pub assumed_through: HashMap<String, u64>,
    pub replayed_through: u64,
    /// Pending record count and the oldest pending acknowledgement, per table.
    pub tables: HashMap<String, TableState>,
    /// Highest sequence number in `pending` so far.
    pub highest: u64,
    /// Keys with pending writes: whether the row exists once they are applied. The
    /// existence answer for such a key comes from here, never from PostgreSQL (which
    /// does not have those writes yet).
    pub keys: HashMap<Slot, KeyState>,
    /// Counts the keys the overlay forgot (their pending writes all applied).
    pub generation: u64,
    /// When each key was last forgotten (a `generation`), up to [`FORGOTTEN_LIMIT`]
    /// keys; forgettings before `forgotten_floor` are no longer known one by one.
    pub forgotten: HashMap<Slot, u64>,
    pub forgotten_floor: u64,
    /// Deferrals per table decided but not yet pending or given up (`InFlight`).
    pub inflight: HashMap<String, usize>,
    /// Per key, the last deferral that reserved it and whose record is not journaled
    /// yet (or given up): a later deferral of the key was decided against that
    /// reservation, so it is appended only after it settles (`order_after`).
    pub appending: HashMap<Slot, watch::Receiver<Settlement>>,
    /// The operations of deferrals decided and reserved but not yet pending (by a
    /// ticket, in the order they were decided): what a guarded write of their keys
    /// decides against after the pending records (ADR 0035; records of one key are
    /// journaled in the order they were decided).
    /// Tickets grow while any is live (each one past the last still deciding), so a
    /// live ticket is never given twice.
    pub deciding: Vec<(u64, Vec<RowOp>)>,
    /// The highest sequence number applied and removed from `pending` (batches are
    /// contiguous prefixes): a guarded write's read that saw the ledger at or beyond
    /// it has every applied record in it (ADR 0035).
    pub applied_through: u64,
    /// Rows being read with their pending writes overlaid (ADR 0039, `overlay.rs`).
    pub watches: Watches,
}

/// Where a deferral's record is, for the deferrals of its keys decided after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Decided and reserved; the append has not answered.
    Appending,
    /// Durable and pending: a later record of its keys gets a higher sequence number.
    Journaled,
    /// Given up (refused, or an earlier deferral of its keys gave up): its
    /// reservations were undone first, so a deferral decided after it decides again.
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyState {
    pub pending: u32,
    pub exists: bool,
}

#[derive(Default, Clone, Copy)]
pub struct TableState {
    pub pending: usize,
    pub oldest: Option<Instant>,
    /// Keys in the overlay (write-back's dirty keys, bounded by `flush.max_dirty_keys`).
    pub dirty_keys: usize,
}

/// Keys a deferral reserved in the overlay, with their state before it.
pub type Reserved = Vec<(Slot, Option<KeyState>)>;

impl State {
    /// Whether a decision taken now has an answer for `key` of `table`: its pending
    /// writes (the overlay), or a point read in `known` that was not overtaken by
    /// writes to the key applied (and forgotten) since it began.
    pub fn answered(&self, table: &str, key: &[String], known: &Known) -> bool {
        let slot = (table.to_owned(), key.to_vec());
        if self.keys.contains_key(&slot) {
            return true;
        }
        known.get(&slot).is_some_and(|(_, since, _)| {
            *since >= self.forgotten_floor && self.forgotten.get(&slot).is_none_or(|g| *g <= *since)
        })
    }

    /// A decided deferral's operations, until it settles ([`Self::decided`]); its
    /// ticket.
    pub fn deciding(&mut self, ops: Vec<RowOp>) -> u64 {
        let ticket = self.deciding.last().map_or(0, |(t, _)| *t) + 1;
        self.deciding.push((ticket, ops));
        ticket
    }

    /// The deferral of `ticket` settled: pending now, or given up.
    pub fn decided(&mut self, ticket: u64) {
        self.deciding.retain(|(t, _)| *t != ticket);
    }

    /// A durable record becomes pending.
    pub fn note_pending(&mut self, seq: u64, record: Arc<Record>) {
        // A shared log's follower may have put it in already: counted once.
        if self.pending.contains_key(&seq) {
            return;
        }
        let now = Instant::now();
        for t in record.tables() {
            let s = self.tables.entry(t.to_owned()).or_default();
            s.pending += 1;
            s.oldest.get_or_insert(now);
        }
        self.highest = self.highest.max(seq);
        self.pending.insert(seq, record);
        self.acked_at.insert(seq, now);
    }

    /// Records that each key of `after` has one more pending write, existing or not
    /// once it is applied; returns what to undo if the record never becomes pending.
    pub fn reserve(&mut self, after: &HashMap<Slot, bool>) -> Reserved {
        let mut reserved = Vec::with_capacity(after.len());
        for (slot, exists) in after {
            let old = self.keys.get(slot).copied();
            if old.is_none() {
                self.tables.entry(slot.0.clone()).or_default().dirty_keys += 1;
            }
            let entry = self.keys.entry(slot.clone()).or_insert(KeyState {
                pending: 0,
                exists: *exists,
            });
            entry.pending += 1;
            entry.exists = *exists;
            reserved.push((slot.clone(), old));
        }
        reserved
    }

    /// Registers the deferral `mine` of the keys of `after`, decided and reserved under
    /// this lock; returns the deferrals of those keys decided before it and not settled
    /// yet, whose records must be journaled before its own: its row counts assumed
    /// them (the journal's order is the order the flusher applies).
    pub fn order_after(
        &mut self,
        after: &HashMap<Slot, bool>,
        mine: &watch::Receiver<Settlement>,
    ) -> Vec<watch::Receiver<Settlement>> {
        let mut earlier: Vec<watch::Receiver<Settlement>> = Vec::new();
        for slot in after.keys() {
            if let Some(prev) = self.appending.get(slot)
                && *prev.borrow() == Settlement::Appending
                && !earlier.iter().any(|e| e.same_channel(prev))
            {
                earlier.push(prev.clone());
            }
            self.appending.insert(slot.clone(), mine.clone());
        }
        earlier
    }

    /// The deferrals not settled yet that reserved any of `slots` last: what an answer
    /// read of those keys rests on.
    pub fn unsettled(&self, slots: impl Iterator<Item = Slot>) -> Vec<watch::Receiver<Settlement>> {
        let mut out: Vec<watch::Receiver<Settlement>> = Vec::new();
        for slot in slots {
            if let Some(rx) = self.appending.get(&slot)
                && *rx.borrow() == Settlement::Appending
                && !out.iter().any(|o| o.same_channel(rx))
            {
                out.push(rx.clone());
            }
        }
        out
    }

    /// The deferral `mine` settled: its keys no longer order later deferrals (unless a
    /// later one took them over).
    pub fn settled<'a>(
        &mut self,
        slots: impl Iterator<Item = &'a Slot>,
        mine: &watch::Receiver<Settlement>,
    ) {
        for slot in slots {
            if self
                .appending
                .get(slot)
                .is_some_and(|r| r.same_channel(mine))
            {
                self.appending.remove(slot);
            }
        }
    }

    /// Undoes reservations of an append that failed, on the live entries, not by
    /// restoring a snapshot: the flusher may have applied the key's earlier writes
    /// meanwhile (or another session reserved it too). A key left with nothing
    /// pending is forgotten, so the next decision reads it again.
    pub fn unreserve(&mut self, reserved: Reserved) {
        for (slot, old) in reserved {
            let Some(entry) = self.keys.get_mut(&slot) else {
                continue;
            };
            entry.pending = entry.pending.saturating_sub(1);
            if entry.pending > 0 {
                if let Some(k) = old.filter(|k| k.pending == entry.pending) {
                    // Nothing else touched the key: its answer is the one before.
                    entry.exists = k.exists;
                }
                continue;
            }
            self.forget(slot);
        }
    }

    /// The key's last pending write is gone: out of the overlay, with a generation.
    fn forget(&mut self, slot: Slot) {
        self.keys.remove(&slot);
        if let Some(s) = self.tables.get_mut(&slot.0) {
            s.dirty_keys = s.dirty_keys.saturating_sub(1);
        }
        self.generation += 1;
        let generation = self.generation;
        self.forgotten.insert(slot, generation);
    }

    /// Removes applied records from `pending` (`key_of` gives an operation's
    /// canonical key); returns the tables they wrote.
    pub fn finish(
        &mut self,
        batch: &[(u64, Arc<Record>)],
        key_of: impl Fn(&crate::writes::RowOp) -> Option<Vec<String>>,
    ) -> Applied {
        let mut tables = Vec::new();
        let mut applied = Applied::default();
        for (seq, record) in batch {
            self.applied_through = self.applied_through.max(*seq);
            self.acked_at.remove(seq);
            if self.pending.remove(seq).is_none() {
                continue;
            }
            self.watches.applied(*seq, record, &key_of);
            for op in &record.ops {
                let key = key_of(op);
                match &key {
                    Some(k) => applied.keys.push((op.table().to_owned(), k.clone())),
                    None if !applied.unkeyed.iter().any(|t| t == op.table()) => {
                        applied.unkeyed.push(op.table().to_owned());
                    }
                    None => {}
                }
                if let Some(key) = key {
                    let slot = (op.table().to_owned(), key);
                    if let Some(k) = self.keys.get_mut(&slot) {
                        k.pending = k.pending.saturating_sub(1);
                        if k.pending == 0 {
                            self.forget(slot);
                        }
                    }
                }
            }
            for t in record.tables() {
                if let Some(s) = self.tables.get_mut(t) {
                    s.pending = s.pending.saturating_sub(1);
                    if s.pending == 0 {
                        s.oldest = None;
                    }
                }
                if !tables.iter().any(|x: &String| x == t) {
                    tables.push(t.to_owned());
                }
            }
        }
        if self.forgotten.len() > FORGOTTEN_LIMIT {
            self.forgotten.clear();
            self.forgotten_floor = self.generation;
        }
        // A table that still has pending records: its oldest is not known exactly
        // without a scan, but no older than the oldest pending record of all, which
        // keeps its reported age an upper bound (the flush itself is timed by
        // `acked_at`).
        let oldest_left = self.acked_at.first_key_value().map(|(_, at)| *at);
        for s in self.tables.values_mut() {
            if s.pending > 0 {
                s.oldest = oldest_left.or(s.oldest).or_else(|| Some(Instant::now()));
            }
        }
        applied.tables = tables;
        let unkeyed = std::mem::take(&mut applied.unkeyed);
        applied.keys.retain(|(t, _)| !unkeyed.contains(t));
        applied.unkeyed = unkeyed;
        applied
    }

    /// Pending records of `table`.
    pub fn pending_of(&self, table: &str) -> usize {
        self.tables.get(table).map_or(0, |s| s.pending)
    }
}
