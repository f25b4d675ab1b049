//! Write-back's per-key coalescing: a run of journal records becomes, for each primary
//! key of a write-back table, the shortest list of row operations with the same end
//! state. Records of other tables pass through untouched and in order.
//!
//! Rules, applied as each operation arrives against the key's last operation:
//! - INSERT then UPDATE merges into the INSERT (a delta needs the column's value in the
//!   INSERT, and exact arithmetic);
//! - INSERT then DELETE cancels both;
//! - UPDATE then UPDATE merges: a later `c = v` replaces what came before for `c`,
//!   `c = v` then `c = c ± d` becomes `c = v ± d`, deltas are summed (integers and
//!   numerics only, exactly: see [`super::arith`]; floats are never combined);
//! - UPDATE then DELETE becomes the DELETE;
//! - anything else (DELETE then INSERT, an operation on a deleted key, a merge the
//!   arithmetic refuses) is kept as a further operation of the key.
//!
//! Invariants:
//! - Per key, applying the coalesced list equals applying the original operations in
//!   order when each of them would have succeeded. A check in between is not made: a
//!   write that PostgreSQL would have refused on its own (a CHECK or an overflow its
//!   key's later writes repair) is applied as part of the folded state instead of
//!   becoming a dead letter. ARCHITECTURE.md and the README state this.
//! - Only for valid sequences (exact row counts): the proxy never folds records
//!   acknowledged with assumed counts or replayed from before a start, and refuses
//!   write-back on tables with foreign keys or rules, whose effects depend on the
//!   order of different keys.
//! - Keys are independent (distinct primary keys), so coalesced operations are emitted
//!   in rounds (every key's first remaining operation, then every key's second…), each
//!   round sorted by shape so the planner can make one set-based statement of it; a
//!   round never holds one key twice.
//! - The coalesced operations follow the batch's other records; each carries the
//!   sequence number of the last record that touched its key (for dead letters).

use std::collections::HashMap;
use std::sync::Arc;

use super::arith;
use super::plan::{TableMeta, key_of};
use super::record::{Assign, AssignOp, Record, RowOp, Val};

/// A key of a table: (`schema.name`, primary-key values).
type Slot = (String, Vec<Option<String>>);

/// `batch` (records in sequence order) with the operations of tables whose metadata
/// says `coalesce` folded per key. Operations the planner could not key are kept
/// uncoalesced (the planner then reports them).
pub fn coalesce(
    batch: &[(u64, Arc<Record>)],
    tables: &HashMap<String, TableMeta>,
) -> Vec<(u64, Arc<Record>)> {
    let coalescing = |op: &RowOp| tables.get(op.table()).filter(|m| m.coalesce);
    if !batch
        .iter()
        .any(|(_, r)| r.ops.iter().any(|op| coalescing(op).is_some()))
    {
        return batch.to_vec();
    }
    let mut out = Vec::with_capacity(batch.len());
    let mut order: Vec<Slot> = Vec::new();
    // Per key: the last sequence number that touched it, and its folded operations.
    let mut keys: HashMap<Slot, (u64, Vec<RowOp>)> = HashMap::new();
    for (seq, record) in batch {
        let mut rest = Vec::new();
        for op in &record.ops {
            let Some(meta) = coalescing(op) else {
                rest.push(op.clone());
                continue;
            };
            let Ok(key) = key_of(op, meta) else {
                rest.push(op.clone());
                continue;
            };
            let slot = (op.table().to_owned(), key);
            let entry = keys.entry(slot.clone()).or_insert_with(|| {
                order.push(slot);
                (*seq, Vec::new())
            });
            entry.0 = *seq;
            push(&mut entry.1, op.clone(), meta);
        }
        if rest.len() == record.ops.len() {
            out.push((*seq, record.clone()));
        } else if !rest.is_empty() {
            out.push((*seq, Arc::new(Record { ops: rest })));
        }
    }
    let mut rounds: Vec<Vec<(u64, RowOp)>> = Vec::new();
    for slot in &order {
        if let Some((seq, ops)) = keys.remove(slot) {
            for (i, op) in ops.into_iter().enumerate() {
                if rounds.len() <= i {
                    rounds.push(Vec::new());
                }
                if let Some(round) = rounds.get_mut(i) {
                    round.push((seq, op));
                }
            }
        }
    }
    for mut round in rounds {
        round.sort_by_cached_key(|(_, op)| shape_key(op));
        out.extend(
            round
                .into_iter()
                .map(|(seq, op)| (seq, Arc::new(Record { ops: vec![op] }))),
        );
    }
    out
}

/// Orders a round so operations of one table and shape are adjacent.
fn shape_key(op: &RowOp) -> (String, u8, Vec<String>) {
    match op {
        RowOp::Insert { table, columns, .. } => (table.clone(), 0, columns.clone()),
        RowOp::Update { table, set, .. } => (
            table.clone(),
            1,
            set.iter()
                .map(|a| format!("{}{:?}{:?}", a.column, a.op, a.value.cast))
                .collect(),
        ),
        RowOp::Delete { table, .. } => (table.clone(), 2, Vec::new()),
    }
}

/// Adds `op` to a key's list, merging it into the last operation where the rules allow.
fn push(list: &mut Vec<RowOp>, op: RowOp, meta: &TableMeta) {
    // A guarded operation (ADR 0035) writes only if its condition holds when it is
    // applied: it is never folded, nor is anything folded into or over it.
    if !op.guard().is_empty() || list.last().is_some_and(|l| !l.guard().is_empty()) {
        list.push(op);
        return;
    }
    match (list.last_mut(), op) {
        (Some(RowOp::Insert { .. }), RowOp::Delete { .. }) => {
            list.pop();
        }
        (Some(last @ RowOp::Update { .. }), delete @ RowOp::Delete { .. }) => *last = delete,
        (
            Some(RowOp::Insert {
                columns, values, ..
            }),
            RowOp::Update {
                table,
                key,
                set,
                guard,
            },
        ) => {
            if let Some((c, v)) = into_insert(columns, values, &set, meta) {
                *columns = c;
                *values = v;
            } else {
                list.push(RowOp::Update {
                    table,
                    key,
                    set,
                    guard,
                });
            }
        }
        (
            Some(RowOp::Update { set: earlier, .. }),
            RowOp::Update {
                table,
                key,
                set,
                guard,
            },
        ) => {
            if let Some(merged) = updates(earlier, &set, meta) {
                *earlier = merged;
            } else {
                list.push(RowOp::Update {
                    table,
                    key,
                    set,
                    guard,
                });
            }
        }
        (_, op) => list.push(op),
    }
}

/// The INSERT's columns and values after `set` is applied to them; `None` when a delta
/// names a column the INSERT left to its default, or the arithmetic is not exact.
fn into_insert(
    columns: &[String],
    values: &[Val],
    set: &[Assign],
    meta: &TableMeta,
) -> Option<(Vec<String>, Vec<Val>)> {
    let (mut columns, mut values) = (columns.to_vec(), values.to_vec());
    for a in set {
        if a.value.cast.is_some() {
            return None;
        }
        let at = columns.iter().position(|c| *c == a.column);
        let value = match (a.op, at) {
            (AssignOp::Set, _) => a.value.clone(),
            (AssignOp::Add | AssignOp::Sub, Some(i)) => {
                combined(meta, &a.column, values.get(i)?, &a.value, a.op)?
            }
            (AssignOp::Add | AssignOp::Sub, None) => return None,
        };
        match at.and_then(|i| values.get_mut(i)) {
            Some(v) => *v = value,
            None => {
                columns.push(a.column.clone());
                values.push(value);
            }
        }
    }
    Some((columns, values))
}

/// One UPDATE's assignments equal to `earlier` followed by `later`, if exact.
fn updates(earlier: &[Assign], later: &[Assign], meta: &TableMeta) -> Option<Vec<Assign>> {
    let mut out = earlier.to_vec();
    if out.iter().any(|a| a.value.cast.is_some()) {
        return None;
    }
    for b in later {
        if b.value.cast.is_some() {
            return None;
        }
        let Some(a) = out.iter_mut().find(|a| a.column == b.column) else {
            out.push(b.clone());
            continue;
        };
        *a = match (a.op, b.op) {
            (_, AssignOp::Set) => b.clone(),
            (AssignOp::Set, delta) => Assign {
                column: a.column.clone(),
                op: AssignOp::Set,
                value: combined(meta, &a.column, &a.value, &b.value, delta)?,
            },
            (first, second) => {
                // Both deltas: fold the signs into one Add.
                let zero = Val::plain(Some("0"));
                let d1 = combined(meta, &a.column, &zero, &a.value, first)?;
                Assign {
                    column: a.column.clone(),
                    op: AssignOp::Add,
                    value: combined(meta, &a.column, &d1, &b.value, second)?,
                }
            }
        };
    }
    Some(out)
}

/// `base ± delta` for `column`; NULL stays NULL (as `NULL + d` does in PostgreSQL),
/// a NULL delta makes NULL.
fn combined(meta: &TableMeta, column: &str, base: &Val, delta: &Val, op: AssignOp) -> Option<Val> {
    let ty = meta.types.get(column)?;
    if !arith::combinable(ty) || base.cast.is_some() || delta.cast.is_some() {
        return None;
    }
    let (Some(b), Some(d)) = (&base.text, &delta.text) else {
        return Some(Val::plain(None));
    };
    let text = arith::add(ty, b, d, op == AssignOp::Sub)?;
    Some(Val::plain(Some(&text)))
}

#[cfg(test)]
mod tests;
