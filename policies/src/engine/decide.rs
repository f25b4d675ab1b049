//! Deciding what deferred statements write, without journaling anything: per
//! operation whether it writes a row (exact row counts, SPEC §6) and the key overlay's
//! state afterwards. With `row_counts = "exact"` a key's existence comes from the
//! transaction's own earlier statements first, then pending writes (the overlay), then
//! PostgreSQL (a point read, in [`Known`]); with `"assumed"` every operation counts.
//!
//! Invariants:
//! - An INSERT of a key that exists is a duplicate (23505) for the whole decision, as a
//!   statement error aborts a transaction in PostgreSQL.
//! - In a held transaction, a key an earlier statement inserted that another session
//!   wrote since is a divergence (40001), not this statement's duplicate.

use std::collections::HashMap;
use std::sync::Arc;

use super::DeferError;
use super::guards::{self, Rows, Stored, Verdict};
use super::state::{Known, Slot, State};
use super::table::{DeferredTable, Verb};
use crate::RowCounts;
use crate::writes::RowOp;

/// A deferrable statement: its operations and, per operation, its canonical key. `R`
/// is what the proxy answers RETURNING with; the engine never reads it.
#[derive(Debug, Clone)]
pub struct Converted<R = ()> {
    pub verb: Verb,
    pub ops: Vec<RowOp>,
    pub keys: Vec<Vec<String>>,
    /// `INSERT … ON CONFLICT (primary key)`: per operation (an INSERT of one row), what
    /// it does instead when its key exists. `None` for every other statement.
    pub if_exists: Option<Vec<IfExists>>,
    pub returning: Option<R>,
    /// `INSERT … ON CONFLICT (primary key) DO UPDATE … RETURNING` of columns the DO
    /// UPDATE does not assign (ADR 0038): a row that takes DO UPDATE returns them as
    /// stored, decided from what spillway knows of the row (`guards::stored`) and
    /// handed back in [`Outcome::stored`]. Empty for every other statement.
    pub stored: Vec<String>,
    /// In a held transaction, the stored values its client was given for this
    /// statement (per operation that took DO UPDATE): decided again later (the next
    /// statements, COMMIT), they must be the same, else the answer changed
    /// ([`DeferError::Diverged`], 40001), as for row counts.
    pub told: Option<Vec<(usize, Vec<Option<String>>)>>,
}

/// What an `INSERT … ON CONFLICT (primary key)` row does when its key exists: nothing
/// (DO NOTHING: no row written, not counted) or this UPDATE of the key (DO UPDATE,
/// counted). The key's existence is decided as for any write (`decide`), always
/// exactly, whatever the table's `row_counts`: the journal gets the operation it
/// resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfExists {
    Nothing,
    Update(RowOp),
}

impl<R> Converted<R> {
    /// Whether its outcome needs every key's existence, even with assumed row counts:
    /// an upsert's, and a guarded write's (ADR 0035).
    pub fn needs_keys(&self) -> bool {
        self.if_exists.is_some() || guards::any_guard(self.ops.iter())
    }

    /// The verbs PostgreSQL checks privileges for: DO UPDATE needs UPDATE as well.
    pub fn verbs(&self) -> Vec<Verb> {
        let mut verbs = vec![self.verb];
        if self
            .if_exists
            .as_ref()
            .is_some_and(|alts| alts.iter().any(|a| matches!(a, IfExists::Update(_))))
        {
            verbs.push(Verb::Update);
        }
        verbs
    }
}

/// One statement of a held transaction (or an autocommit statement alone).
#[derive(Debug, Clone)]
pub struct TxStatement<R = ()> {
    /// `schema.name` of its deferred table.
    pub table: String,
    pub converted: Converted<R>,
}

/// Per statement, per operation: whether it writes a row.
pub type Applied = Vec<Vec<bool>>;

/// A deferred statement's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The journal record, or `None` when nothing was written (an UPDATE/DELETE of a
    /// key that does not exist, with exact row counts).
    pub seq: Option<u64>,
    /// The row count for the command tag.
    pub rows: usize,
    /// Per operation of the statement, in order: whether it writes a row.
    pub applied: Vec<bool>,
    /// Per operation that took DO UPDATE ([`Converted::stored`]): the stored values of
    /// those columns, in their order (`None`: NULL).
    pub stored: Vec<(usize, Vec<Option<String>>)>,
}

/// A held transaction's answer at COMMIT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxOutcome {
    /// The journal record, or `None` when nothing was written.
    pub seq: Option<u64>,
    pub applied: Applied,
    /// Per (statement, operation): [`Outcome::stored`].
    pub stored: StoredValues,
}

/// Per (statement, operation) that took DO UPDATE with [`Converted::stored`] columns:
/// their stored values.
pub type StoredValues = Vec<(usize, usize, Vec<Option<String>>)>;

/// What a run of statements writes.
pub(super) struct Decision {
    pub applied: Applied,
    pub ops: Vec<RowOp>,
    /// Whether each key written exists once the operations are applied.
    pub after: HashMap<Slot, bool>,
    /// Guarded operations' keys whose columns need a point read first (ADR 0035): the
    /// decision is not final while this is not empty.
    pub unread: Vec<(Slot, Vec<String>)>,
    /// [`TxOutcome::stored`].
    pub stored: StoredValues,
}

pub(super) type Tables = HashMap<String, Arc<DeferredTable>>;

/// The key index's answers for a decision's keys, taken once under the state lock
/// (`defer.rs::indexed`), so that the keys found answered are decided with the same
/// answers even if the index stops answering meanwhile (the stream is lost).
pub(super) type Indexed = HashMap<Slot, bool>;

pub(super) fn exact(t: &DeferredTable) -> bool {
    t.config.row_counts == RowCounts::Exact
}

/// A held transaction's decision for its last statement (and those before it).
pub(super) fn decide_preview<R>(
    state: &State,
    indexed: &Indexed,
    stmts: &[TxStatement<R>],
    tables: &Tables,
    known: &Known,
    rows: &Rows,
) -> Result<(Applied, StoredValues), DeferError> {
    // A key an earlier statement inserted was written by another session since: the
    // earlier answer no longer holds (not this statement's duplicate key).
    if let [earlier @ .., _] = stmts
        && !earlier.is_empty()
        && let Err(DeferError::Duplicate { detail, .. }) =
            decide(state, indexed, earlier, tables, known, rows)
    {
        return Err(DeferError::Diverged(format!(
            "another session wrote a key this transaction inserted ({detail})"
        )));
    }
    final_decision(decide(state, indexed, stmts, tables, known, rows)?)
        .map(|d| (d.applied, d.stored))
}

/// `d`, which must not need reads any more (the callers read under the lock that
/// decides: a defect otherwise, reported rather than guessed).
pub(super) fn final_decision(d: Decision) -> Result<Decision, DeferError> {
    if let Some((slot, _)) = d.unread.first() {
        return Err(DeferError::Stopped(format!(
            "a guarded write on {} was decided without a read of its row",
            slot.0
        )));
    }
    Ok(d)
}

/// What `stmts` write given `state` and `known` (every exact key answered): per
/// operation whether it writes, the operations that do, and each written key's
/// existence afterwards.
pub(super) fn decide<R>(
    state: &State,
    indexed: &Indexed,
    stmts: &[TxStatement<R>],
    tables: &Tables,
    known: &Known,
    rows: &Rows,
) -> Result<Decision, DeferError> {
    let mut after: HashMap<Slot, bool> = HashMap::new();
    let mut unread: Vec<(Slot, Vec<String>)> = Vec::new();
    // Per key, the operations of this decision that write it, in order: what a later
    // guarded operation of the key sees of its own transaction.
    let mut own: HashMap<Slot, Vec<&RowOp>> = HashMap::new();
    let mut applied = Vec::with_capacity(stmts.len());
    let mut ops = Vec::new();
    let mut stored: StoredValues = Vec::new();
    for (si, s) in stmts.iter().enumerate() {
        let t = tables
            .get(&s.table)
            .ok_or_else(|| DeferError::NotDeferred(s.table.clone()))?;
        let exact = exact(t);
        let verb = s.converted.verb;
        let mut flags = Vec::with_capacity(s.converted.ops.len());
        for (i, (op, key)) in s.converted.ops.iter().zip(&s.converted.keys).enumerate() {
            let slot = (s.table.clone(), key.clone());
            let before = after
                .get(&slot)
                .copied()
                .or_else(|| state.keys.get(&slot).map(|k| k.exists))
                .or_else(|| indexed.get(&slot).copied())
                .or_else(|| known.get(&slot).map(|(e, _, _)| *e));
            if let Some(alts) = &s.converted.if_exists {
                // ON CONFLICT (primary key): the row's key decides which operation
                // it is; every key was answered (`needs_keys`).
                let alt = alts.get(i).ok_or_else(|| unanswered(&s.table))?;
                match (before.ok_or_else(|| unanswered(&s.table))?, alt) {
                    (false, _) => {
                        ops.push(op.clone());
                        own.entry(slot.clone()).or_default().push(op);
                        after.insert(slot, true);
                        flags.push(true);
                    }
                    (true, IfExists::Nothing) => flags.push(false),
                    (true, IfExists::Update(update)) => {
                        // RETURNING of columns DO UPDATE leaves as stored (ADR 0038).
                        if !s.converted.stored.is_empty() {
                            let mine = own.get(&slot).map_or(&[][..], Vec::as_slice);
                            let columns: Vec<&str> =
                                s.converted.stored.iter().map(String::as_str).collect();
                            match guards::stored(state, rows, &slot, t, &columns, mine) {
                                Stored::Values(v) => stored.push((si, i, v)),
                                Stored::Unread(columns) => unread.push((slot.clone(), columns)),
                                Stored::Unknown => {
                                    return Err(DeferError::RowUnknown(s.table.clone()));
                                }
                            }
                        }
                        ops.push(update.clone());
                        own.entry(slot.clone()).or_default().push(update);
                        after.insert(slot, true);
                        flags.push(true);
                    }
                }
                continue;
            }
            let guard = op.guard();
            if !guard.is_empty() {
                // A guarded write (ADR 0035): its row exists, always answered
                // (`needs_keys`), and its guard holds on what spillway knows of it.
                if !before.ok_or_else(|| unanswered(&s.table))? {
                    flags.push(false);
                    continue;
                }
                let mine = own.get(&slot).map_or(&[][..], Vec::as_slice);
                match guards::verdict(state, rows, &slot, t, guard, mine) {
                    Verdict::Holds(true) => {}
                    Verdict::Holds(false) => {
                        flags.push(false);
                        continue;
                    }
                    // Decided as if it held; the caller reads and decides again.
                    Verdict::Unread(columns) => unread.push((slot.clone(), columns)),
                    Verdict::Unknown => return Err(DeferError::RowUnknown(s.table.clone())),
                }
            }
            let exists_now = match (verb, exact, before) {
                (Verb::Insert, true, Some(true)) => {
                    return Err(duplicate(t, key));
                }
                (Verb::Insert, _, _) => true,
                (Verb::Update | Verb::Delete, true, Some(false) | None) => {
                    flags.push(false);
                    continue;
                }
                (Verb::Update, _, _) => true,
                (Verb::Delete, _, _) => false,
            };
            own.entry(slot.clone()).or_default().push(op);
            after.insert(slot, exists_now);
            flags.push(true);
            ops.push(op.clone());
        }
        applied.push(flags);
        if let Some(told) = &s.converted.told {
            let now: Vec<(usize, Vec<Option<String>>)> = stored
                .iter()
                .filter(|(i, _, _)| *i == si)
                .map(|(_, op, v)| (*op, v.clone()))
                .collect();
            if *told != now && unread.is_empty() {
                return Err(DeferError::Diverged(
                    "a row an INSERT … ON CONFLICT DO UPDATE returned changed before COMMIT \
                     (another session wrote it); nothing was written"
                        .to_owned(),
                ));
            }
        }
    }
    Ok(Decision {
        applied,
        ops,
        after,
        unread,
        stored,
    })
}

/// An upsert's key without an answer: a defect of `needs_keys`' callers, reported
/// rather than guessed.
fn unanswered(table: &str) -> DeferError {
    DeferError::Stopped(format!(
        "an INSERT … ON CONFLICT on {table} was decided without its key's existence"
    ))
}

/// 23505 as PostgreSQL words it for `key` of `t`.
fn duplicate(t: &DeferredTable, key: &[String]) -> DeferError {
    DeferError::Duplicate {
        constraint: t.pkey_name.clone(),
        detail: format!(
            "Key ({})=({}) already exists.",
            t.meta.key.join(", "),
            key.join(", ")
        ),
    }
}
