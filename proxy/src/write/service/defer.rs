//! Deciding and journaling deferred statements: an autocommit statement alone, or a
//! held client transaction (its statements in order) as one record (SPEC §6).
//!
//! With `row_counts = "exact"` a statement's row count comes from which keys exist:
//! the transaction's own earlier statements first, then pending writes (the key
//! overlay), then PostgreSQL (a point read, remembered in [`Known`] with the overlay
//! generation it began at).
//!
//! Invariants:
//! - The decision and the overlay update happen under one lock, so two sessions
//!   cannot both insert one key; the overlay is undone on the live entries if the
//!   append fails.
//! - A transaction is journaled as one record, so the flusher applies it whole, in
//!   one upstream transaction, or not at all.
//! - A held transaction is journaled only if every statement still has the row counts
//!   its client was given ([`DeferError::Diverged`] otherwise): never a silent
//!   divergence.
//! - [`WriteService::preview`] decides without reserving or journaling anything.

use std::collections::HashMap;
use std::sync::Arc;

use spillway_policies::RowCounts;
use spillway_policies::writes::{Record, RowOp};

use super::table_set::InFlight;
use super::{DeferError, KeyState, Outcome, State, WriteService};
use crate::write::convert::{Converted, Verb};
use crate::write::tables::DeferredTable;

/// One statement of a held transaction (or an autocommit statement alone).
#[derive(Debug, Clone)]
pub struct TxStatement {
    /// `schema.name` of its deferred table.
    pub table: String,
    pub converted: Converted,
}

/// Point-read answers already known: (table, key) → (the row exists, the overlay
/// generation when the read began, the count of outside writes then: see
/// [`WriteService::note_outside_write`]).
pub type Known = HashMap<(String, Vec<String>), (bool, u64, u64)>;

/// (table, canonical key): a key of the overlay.
type Slot = (String, Vec<String>);

/// Keys a deferral reserved in the overlay, with their state before it.
type Reserved = Vec<(Slot, Option<KeyState>)>;

/// Per statement, per operation: whether it writes a row.
pub type Applied = Vec<Vec<bool>>;

/// A held transaction's answer at COMMIT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxOutcome {
    /// The journal record, or `None` when nothing was written.
    pub seq: Option<u64>,
    pub applied: Applied,
}

struct Decision {
    applied: Applied,
    ops: Vec<RowOp>,
    /// Whether each key written exists once the operations are applied.
    after: HashMap<(String, Vec<String>), bool>,
}

fn exact(t: &DeferredTable) -> bool {
    t.config.row_counts == RowCounts::Exact
}

impl WriteService {
    /// Decides and journals a deferrable statement of role `user` on `table`; returns
    /// once its record is durable and pending (or at once when it writes nothing).
    pub async fn defer(
        self: &Arc<Self>,
        user: &str,
        table: &str,
        converted: Converted,
    ) -> Result<Outcome, DeferError> {
        let stmt = TxStatement {
            table: table.to_owned(),
            converted,
        };
        let out = self.defer_tx(user, vec![stmt], None, Known::new()).await?;
        let applied = out.applied.into_iter().next().unwrap_or_default();
        Ok(Outcome {
            seq: out.seq,
            rows: applied.iter().filter(|a| **a).count(),
            applied,
        })
    }

    /// The row operations `stmts` would write now, per statement and operation,
    /// without reserving or journaling anything (a held transaction's statement).
    /// `known` keeps the point reads for the next call and for COMMIT.
    pub async fn preview(
        self: &Arc<Self>,
        user: &str,
        stmts: &[TxStatement],
        known: &mut Known,
    ) -> Result<Applied, DeferError> {
        if let Some(cause) = self.poisoned.get() {
            return Err(DeferError::Stopped(cause.clone()));
        }
        let tables = self.deferring(stmts)?;
        self.check_privileges(user, stmts, &tables).await?;
        let state = self.lock_answered(stmts, &tables, known).await?;
        decide_preview(&state, stmts, &tables, known)
    }

    /// [`Self::preview`] without waiting: `None` when it would need PostgreSQL (a
    /// privilege or a key it has no answer for), so the caller awaits `preview`.
    pub fn preview_now(
        &self,
        user: &str,
        stmts: &[TxStatement],
        known: &Known,
    ) -> Option<Result<Applied, DeferError>> {
        if let Some(cause) = self.poisoned.get() {
            return Some(Err(DeferError::Stopped(cause.clone())));
        }
        let tables = match self.deferring(stmts) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        for s in stmts {
            let t = tables.get(&s.table)?;
            if !self.permitted_now(user, t, s.converted.verb)? {
                return None;
            }
        }
        let state = self.state();
        if !Self::unanswered(&state, stmts, &tables, known).is_empty() {
            return None;
        }
        Some(decide_preview(&state, stmts, &tables, known))
    }

    /// Decides and journals `stmts` as one record (a held transaction at COMMIT, or
    /// one autocommit statement). `expected`: the answers the client was given; the
    /// record is journaled only if the decision now is the same.
    pub async fn defer_tx(
        self: &Arc<Self>,
        user: &str,
        stmts: Vec<TxStatement>,
        expected: Option<Applied>,
        mut known: Known,
    ) -> Result<TxOutcome, DeferError> {
        if let Some(cause) = self.poisoned.get() {
            return Err(DeferError::Stopped(cause.clone()));
        }
        // Counted in flight until its record is pending: a reload that moves a table
        // off deferral waits for it before it flushes the table.
        let mut inflight: Vec<InFlight> = Vec::new();
        let mut tables: HashMap<String, Arc<DeferredTable>> = HashMap::new();
        for s in &stmts {
            if !tables.contains_key(&s.table) {
                let (t, guard) = self.enter(&s.table)?;
                tables.insert(s.table.clone(), t);
                inflight.push(guard);
            }
        }
        self.check_privileges(user, &stmts, &tables).await?;
        for t in tables.values() {
            self.wait_for_room(t).await?;
        }
        let mut reserved: Reserved = Vec::new();
        let decision = {
            let mut state = self.lock_answered(&stmts, &tables, &mut known).await?;
            let decision = match decide(&state, &stmts, &tables, &known) {
                // The client was told its INSERT succeeded: that no longer holds.
                Err(DeferError::Duplicate { detail, .. }) if expected.is_some() => {
                    return Err(DeferError::Diverged(format!(
                        "another session wrote the same key before COMMIT ({detail}); \
                         nothing of the transaction was written"
                    )));
                }
                other => other?,
            };
            if let Some(expected) = expected
                && expected != decision.applied
            {
                return Err(DeferError::Diverged(
                    "the row counts of the deferred transaction changed before COMMIT \
                     (another session wrote the same keys); nothing was written"
                        .to_owned(),
                ));
            }
            if !decision.ops.is_empty() {
                for (slot, exists) in &decision.after {
                    let old = state.keys.get(slot).copied();
                    if old.is_none() {
                        state.tables.entry(slot.0.clone()).or_default().dirty_keys += 1;
                    }
                    let entry = state.keys.entry(slot.clone()).or_insert(KeyState {
                        pending: 0,
                        exists: *exists,
                    });
                    entry.pending += 1;
                    entry.exists = *exists;
                    reserved.push((slot.clone(), old));
                }
            }
            decision
        };
        if decision.ops.is_empty() {
            return Ok(TxOutcome {
                seq: None,
                applied: decision.applied,
            });
        }
        let mut assumed: Vec<String> = tables
            .values()
            .filter(|t| !exact(t))
            .map(|t| t.meta.name.clone())
            .collect();
        assumed.sort_unstable();
        let record = Record { ops: decision.ops };
        let result = self.append(record, inflight, assumed).await;
        if result.is_err() {
            self.unreserve(reserved);
        }
        Ok(TxOutcome {
            seq: Some(result?),
            applied: decision.applied,
        })
    }

    /// The deferred tables of `stmts` now, or the first that is not deferred.
    fn deferring(
        &self,
        stmts: &[TxStatement],
    ) -> Result<HashMap<String, Arc<DeferredTable>>, DeferError> {
        let set = self.tables.load();
        let mut tables = HashMap::new();
        for s in stmts {
            let t = set
                .deferring(&s.table)
                .ok_or_else(|| DeferError::NotDeferred(s.table.clone()))?;
            tables.insert(s.table.clone(), t.clone());
        }
        Ok(tables)
    }

    async fn check_privileges(
        &self,
        user: &str,
        stmts: &[TxStatement],
        tables: &HashMap<String, Arc<DeferredTable>>,
    ) -> Result<(), DeferError> {
        let mut checked: Vec<(&str, Verb)> = Vec::new();
        for s in stmts {
            let verb = s.converted.verb;
            if checked.contains(&(s.table.as_str(), verb)) {
                continue;
            }
            let t = tables
                .get(&s.table)
                .ok_or_else(|| DeferError::NotDeferred(s.table.clone()))?;
            if !self.permitted(user, t, verb).await? {
                return Err(DeferError::NotPermitted {
                    user: user.to_owned(),
                    table: s.table.clone(),
                    verb,
                });
            }
            checked.push((s.table.as_str(), verb));
        }
        Ok(())
    }

    /// The keys of exact-count tables in `stmts` that neither the overlay nor `known`
    /// answers in `state`.
    fn unanswered(
        state: &State,
        stmts: &[TxStatement],
        tables: &HashMap<String, Arc<DeferredTable>>,
        known: &Known,
    ) -> Vec<(String, Vec<String>)> {
        let mut missing: Vec<(String, Vec<String>)> = Vec::new();
        for s in stmts {
            if !tables.get(&s.table).is_some_and(|t| exact(t)) {
                continue;
            }
            for key in &s.converted.keys {
                if !state.answered(&s.table, key, known)
                    && !missing.iter().any(|(t, k)| *t == s.table && k == key)
                {
                    missing.push((s.table.clone(), key.clone()));
                }
            }
        }
        missing
    }

    /// Point reads for the keys nothing answers yet, then the state locked with an
    /// answer for every key. A key whose pending writes are applied meanwhile leaves
    /// the overlay: then neither answer holds (no point read, or one older than those
    /// writes), and it is read again.
    async fn lock_answered(
        &self,
        stmts: &[TxStatement],
        tables: &HashMap<String, Arc<DeferredTable>>,
        known: &mut Known,
    ) -> Result<std::sync::MutexGuard<'_, State>, DeferError> {
        loop {
            let outside = self.outside_writes();
            let (since, missing) = {
                let state = self.state();
                (
                    state.generation,
                    Self::unanswered(&state, stmts, tables, known),
                )
            };
            if missing.is_empty() {
                let state = self.state();
                if Self::unanswered(&state, stmts, tables, known).is_empty() {
                    return Ok(state);
                }
                continue;
            }
            // Side by side, on as many check connections as are free: a transaction's
            // COMMIT reads every key it wrote outside the overlay.
            let reads = missing.iter().map(|(table, key)| async move {
                let t = tables
                    .get(table)
                    .ok_or_else(|| DeferError::NotDeferred(table.clone()))?;
                self.exists_upstream(t, key).await
            });
            let answers = futures_util::future::join_all(reads).await;
            for (slot, exists) in missing.into_iter().zip(answers) {
                known.insert(slot, (exists?, since, outside));
            }
        }
    }

    /// Undoes reservations of an append that failed, on the live entries, not by
    /// restoring a snapshot: the flusher may have applied the key's earlier writes
    /// meanwhile (or another session reserved it too). A key left with nothing
    /// pending is forgotten, so the next decision reads it again.
    fn unreserve(&self, reserved: Reserved) {
        let mut state = self.state();
        for (slot, old) in reserved {
            let Some(entry) = state.keys.get_mut(&slot) else {
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
            let table = slot.0.clone();
            state.keys.remove(&slot);
            state.generation += 1;
            let generation = state.generation;
            state.forgotten.insert(slot, generation);
            if let Some(s) = state.tables.get_mut(&table) {
                s.dirty_keys = s.dirty_keys.saturating_sub(1);
            }
        }
    }
}

/// A held transaction's decision for its last statement (and those before it).
fn decide_preview(
    state: &State,
    stmts: &[TxStatement],
    tables: &HashMap<String, Arc<DeferredTable>>,
    known: &Known,
) -> Result<Applied, DeferError> {
    // A key an earlier statement inserted was written by another session since: the
    // earlier answer no longer holds (not this statement's duplicate key).
    if let [earlier @ .., _] = stmts
        && !earlier.is_empty()
        && let Err(DeferError::Duplicate { detail, .. }) = decide(state, earlier, tables, known)
    {
        return Err(DeferError::Diverged(format!(
            "another session wrote a key this transaction inserted ({detail})"
        )));
    }
    Ok(decide(state, stmts, tables, known)?.applied)
}

/// What `stmts` write given `state` and `known` (every exact key answered): per
/// operation whether it writes, the operations that do, and each written key's
/// existence afterwards. A duplicate key fails the whole decision, like in
/// PostgreSQL (a transaction's statement error aborts the transaction).
fn decide(
    state: &State,
    stmts: &[TxStatement],
    tables: &HashMap<String, Arc<DeferredTable>>,
    known: &Known,
) -> Result<Decision, DeferError> {
    let mut after: HashMap<(String, Vec<String>), bool> = HashMap::new();
    let mut applied = Vec::with_capacity(stmts.len());
    let mut ops = Vec::new();
    for s in stmts {
        let t = tables
            .get(&s.table)
            .ok_or_else(|| DeferError::NotDeferred(s.table.clone()))?;
        let exact = exact(t);
        let verb = s.converted.verb;
        let mut flags = Vec::with_capacity(s.converted.ops.len());
        for (op, key) in s.converted.ops.iter().zip(&s.converted.keys) {
            let slot = (s.table.clone(), key.clone());
            let before = after
                .get(&slot)
                .copied()
                .or_else(|| state.keys.get(&slot).map(|k| k.exists))
                .or_else(|| known.get(&slot).map(|(e, _, _)| *e));
            let exists_now = match (verb, exact, before) {
                (Verb::Insert, true, Some(true)) => {
                    return Err(DeferError::Duplicate {
                        constraint: t.pkey_name.clone(),
                        detail: format!(
                            "Key ({})=({}) already exists.",
                            t.meta.key.join(", "),
                            key.join(", ")
                        ),
                    });
                }
                (Verb::Insert, _, _) => true,
                (Verb::Update | Verb::Delete, true, Some(false) | None) => {
                    flags.push(false);
                    continue;
                }
                (Verb::Update, _, _) => true,
                (Verb::Delete, _, _) => false,
            };
            after.insert(slot, exists_now);
            flags.push(true);
            ops.push(op.clone());
        }
        applied.push(flags);
    }
    Ok(Decision {
        applied,
        ops,
        after,
    })
}
