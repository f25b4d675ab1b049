//! What a deferral's decision reads before it is taken, gathered outside the state
//! lock and then checked under it: the keys of exact-count tables (and of upserts)
//! answered by the overlay, the key index ([`indexed`]) or a batched point read, and
//! the columns of guarded rows (ADR 0035) read with `Checks::row_values`.
//!
//! Invariants:
//! - [`Engine::lock_answered`] returns the state locked only when every key it needs
//!   is answered under that lock ([`unanswered`] is empty) and, for guarded writes,
//!   no row column is still wanted: a key whose pending writes were applied while the
//!   reads ran has left the overlay, so it is read again (or answered by the key
//!   index, which takes applied writes before the overlay lets go of them).
//! - Every point read is stamped with the overlay generation taken before it began
//!   (`since`), so a read older than a key's applied writes is never trusted.
//! - Reads of different tables run side by side, a table's keys in one batched read.

use std::sync::{Arc, MutexGuard};

use super::decide::{self, Indexed, Tables, TxStatement, exact};
use super::guards::{self, RowRead, Rows};
use super::keys::KeyIndex;
use super::state::{Known, Slot, State};
use super::{Checks, DeferError, Engine, Log};

impl<C: Checks, L: Log> Engine<C, L> {
    /// Point reads for the keys nothing answers yet, then the state locked with an
    /// answer for every key. A key whose pending writes are applied meanwhile leaves
    /// the overlay: then neither answer holds (no point read, or one older than those
    /// writes), and it is read again (or answered by the key index, which took the
    /// applied writes before the overlay let go of them).
    pub(super) async fn lock_answered<R>(
        self: &Arc<Self>,
        stmts: &[TxStatement<R>],
        tables: &Tables,
        known: &mut Known,
        rows: &mut Rows,
    ) -> Result<(MutexGuard<'_, State>, Indexed), DeferError> {
        // Guarded writes (ADR 0035) and upserts returning stored columns (ADR 0038)
        // read their rows.
        let guarded = guards::any_guard(stmts.iter().flat_map(|s| s.converted.ops.iter()))
            || stmts.iter().any(|s| !s.converted.stored.is_empty());
        loop {
            let outside = self.outside_writes();
            let (since, missing) = {
                let state = self.state();
                let indexed = indexed(&state, &self.keys, stmts, tables);
                (
                    state.generation,
                    unanswered(&state, &indexed, stmts, tables, known),
                )
            };
            if missing.is_empty() {
                let (wanted, since) = {
                    let state = self.state();
                    let indexed = indexed(&state, &self.keys, stmts, tables);
                    if !unanswered(&state, &indexed, stmts, tables, known).is_empty() {
                        continue;
                    }
                    // Guarded writes (ADR 0035): the columns of their rows that neither
                    // pending nor own writes give are read, and the decision taken
                    // again.
                    let wanted = if guarded {
                        decide::decide(&state, &indexed, stmts, tables, known, rows)
                            .map(|d| d.unread)
                            .unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    if wanted.is_empty() {
                        return Ok((state, indexed));
                    }
                    (wanted, state.generation)
                };
                self.read_rows(tables, wanted, since, rows).await?;
                continue;
            }
            // Per table, every missing key in one batched read; tables side by side
            // (a transaction's COMMIT reads every key it wrote outside the overlay).
            let mut by_table: Vec<(&String, Vec<Vec<String>>)> = Vec::new();
            for (table, key) in &missing {
                match by_table.iter_mut().find(|(t, _)| *t == table) {
                    Some((_, keys)) => keys.push(key.clone()),
                    None => by_table.push((table, vec![key.clone()])),
                }
            }
            let reads = by_table.iter().map(|(table, keys)| async move {
                let t = tables
                    .get(*table)
                    .ok_or_else(|| DeferError::NotDeferred((*table).clone()))?;
                Ok::<_, DeferError>(self.read_keys(t, keys).await)
            });
            let answers = futures_util::future::join_all(reads).await;
            for ((table, keys), answers) in by_table.iter().zip(answers) {
                for (key, exists) in keys.iter().zip(answers?) {
                    known.insert(((*table).clone(), key.clone()), (exists?, since, outside));
                }
            }
        }
    }

    /// Point reads of guarded rows' columns (`wanted`), into `rows`, stamped with the
    /// overlay generation `since` taken before they began.
    async fn read_rows(
        &self,
        tables: &Tables,
        wanted: Vec<(Slot, Vec<String>)>,
        since: u64,
        rows: &mut Rows,
    ) -> Result<(), DeferError> {
        let reads = wanted.iter().map(|((table, key), columns)| async move {
            let t = tables
                .get(table)
                .ok_or_else(|| DeferError::NotDeferred(table.clone()))?;
            Ok::<_, DeferError>(self.checks.row_values(t, key, columns).await?)
        });
        let answers = futures_util::future::join_all(reads).await;
        for ((slot, columns), read) in wanted.into_iter().zip(answers) {
            let read = read?;
            rows.insert(
                slot,
                RowRead {
                    columns,
                    values: read.values,
                    through: read.through,
                    since,
                },
            );
        }
        Ok(())
    }
}

/// What the key index answers now for the keys of exact-count tables (and of upserts)
/// in `stmts` that
/// the overlay does not (under the state lock: a key's applied writes reach the index
/// before they leave the overlay).
pub(super) fn indexed<R>(
    state: &State,
    keys: &KeyIndex,
    stmts: &[TxStatement<R>],
    tables: &Tables,
) -> Indexed {
    let mut wanted: Vec<Slot> = Vec::new();
    for s in stmts {
        if !s.converted.needs_keys() && !tables.get(&s.table).is_some_and(|t| exact(t)) {
            continue;
        }
        for key in &s.converted.keys {
            let slot = (s.table.clone(), key.clone());
            if !state.keys.contains_key(&slot) && !wanted.contains(&slot) {
                wanted.push(slot);
            }
        }
    }
    keys.lookup_many(wanted)
}

/// The keys of exact-count tables (and of upserts) in `stmts` that neither the
/// overlay, the key index
/// (`indexed`) nor `known` answers in `state`.
pub(super) fn unanswered<R>(
    state: &State,
    indexed: &Indexed,
    stmts: &[TxStatement<R>],
    tables: &Tables,
    known: &Known,
) -> Vec<Slot> {
    let mut missing: Vec<Slot> = Vec::new();
    for s in stmts {
        if !s.converted.needs_keys() && !tables.get(&s.table).is_some_and(|t| exact(t)) {
            continue;
        }
        for key in &s.converted.keys {
            if !state.answered(&s.table, key, known)
                && !indexed.contains_key(&(s.table.clone(), key.clone()))
                && !missing.iter().any(|(t, k)| *t == s.table && k == key)
            {
                missing.push((s.table.clone(), key.clone()));
            }
        }
    }
    missing
}
