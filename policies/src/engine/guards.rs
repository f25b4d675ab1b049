//! Writes whose outcome depends on columns beyond the key (ADR 0035): `UPDATE … WHERE
//! id = $1 AND version = $2` and the like ([`Guard`]). Such a write is decided from what
//! spillway knows of the row's guarded columns: the pending writes of the key (the
//! overlay's records, in sequence order) and the transaction's own earlier writes,
//! over the row as PostgreSQL has it (a point read of those columns, [`Rows`]).
//!
//! Invariants:
//! - A value is known only where it is exact: set by a pending or own write (or an
//!   INSERT's constant default), or read from PostgreSQL where no pending write could
//!   be in the read already or not (a delta pending on a column whose base is the read
//!   is unknown: the flusher may have applied it before the read). On a table with
//!   BEFORE ROW triggers or rules only a read is known. An unknown value is never guessed: the write moves
//!   upstream ([`super::DeferError::RowUnknown`]).
//! - A comparison is true only where PostgreSQL's would be (NULL on either side is not
//!   true); guarded columns are integers (the proxy accepts no others) and compare as
//!   numbers; a value that does not read as an integer is unknown.
//! - A read is used only while no write of its key was applied and forgotten since it
//!   began (the same generation rule as the existence reads, `State::answered`).

use std::collections::HashMap;

use super::state::{Slot, State};
use super::table::DeferredTable;
use crate::writes::{AssignOp, Cmp, Guard, RowOp, arith};

/// A point read of a row's guarded columns: `None` when the row does not exist, and
/// the overlay generation when the read began.
#[derive(Debug, Clone)]
pub struct RowRead {
    pub columns: Vec<String>,
    pub values: Option<Vec<Option<String>>>,
    /// The flush ledger's last applied sequence number in the read's snapshot, when
    /// known: the pending records after it are not in `values`.
    pub through: Option<u64>,
    pub since: u64,
}

impl RowRead {
    fn value(&self, column: &str) -> Option<Option<String>> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.values.as_ref()?.get(i).cloned()
    }
}

/// The row reads of one decision, by key.
pub type Rows = HashMap<Slot, RowRead>;

/// What spillway knows of one column of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    /// Exactly this value (`None`: NULL).
    Known(Option<String>),
    /// Untouched by the pending writes: PostgreSQL's value (a read).
    Base,
    /// Not known exactly.
    Unknown,
}

/// `cell` after `op` (a write of the same key).
fn step(cell: Cell, op: &RowOp, column: &str, t: &DeferredTable) -> Cell {
    // A BEFORE ROW trigger or a rule may store something else than the write says.
    if t.row_changes.rewritten {
        return Cell::Unknown;
    }
    match op {
        RowOp::Insert {
            columns, values, ..
        } => match columns.iter().position(|c| c == column) {
            Some(i) => values
                .get(i)
                .map_or(Cell::Unknown, |v| Cell::Known(v.text.clone())),
            // The column's default: known when it is a constant (ADR 0030's
            // `Defaults::constant`), else not.
            None => t
                .defaults
                .constant
                .iter()
                .find(|(c, _)| c == column)
                .map_or(Cell::Unknown, |(_, v)| Cell::Known(v.clone())),
        },
        RowOp::Update { set, .. } => {
            let Some(a) = set.iter().find(|a| a.column == column) else {
                return cell;
            };
            match (a.op, cell) {
                (AssignOp::Set, _) => Cell::Known(a.value.text.clone()),
                (_, Cell::Known(None)) => Cell::Known(None),
                (_, Cell::Known(Some(old))) => {
                    let Some(by) = a.value.text.as_deref() else {
                        return Cell::Known(None);
                    };
                    let Ok(ty) = t.meta.type_of(column) else {
                        return Cell::Unknown;
                    };
                    arith::add(ty, &old, by, a.op == AssignOp::Sub)
                        .map_or(Cell::Unknown, |v| Cell::Known(Some(v)))
                }
                (_, Cell::Base | Cell::Unknown) => Cell::Unknown,
            }
        }
        RowOp::Delete { .. } => Cell::Unknown,
    }
}

/// Whether `op` writes `slot` of table `t`: its key as the overlay spells it (the
/// record's canonical texts, in the table's key order; never NULL).
fn writes(op: &RowOp, slot: &Slot, t: &DeferredTable) -> bool {
    op.table() == slot.0
        && crate::writes::plan::key_of(op, &t.meta)
            .ok()
            .and_then(|key| key.into_iter().collect::<Option<Vec<String>>>())
            .is_some_and(|key| key == slot.1)
}

/// Each guarded column of `slot` after the pending (and decided) writes of the key: known, still
/// PostgreSQL's (`Base`), or unknown.
fn after_pending(state: &State, slot: &Slot, columns: &[&str], t: &DeferredTable) -> Vec<Cell> {
    // Pending records in sequence order, then the deferrals decided and not yet
    // pending, in the order they were decided: the order the flusher applies them.
    let ops: Vec<&RowOp> = if state.keys.contains_key(slot) {
        state
            .pending
            .values()
            .flat_map(|r| r.ops.iter())
            .chain(state.deciding.iter().flat_map(|(_, ops)| ops.iter()))
            .filter(|op| writes(op, slot, t))
            .collect()
    } else {
        Vec::new()
    };
    columns
        .iter()
        .map(|c| ops.iter().fold(Cell::Base, |cell, op| step(cell, op, c, t)))
        .collect()
}

/// Whether `read` of `slot` may still be used under `state`: no write of the key was
/// applied and forgotten since it began, and, for a read that knows the ledger's
/// position, no record beyond that position was applied since (records are applied
/// in contiguous batches and leave `pending` under the state lock).
fn fresh(state: &State, slot: &Slot, read: &RowRead) -> bool {
    read.since >= state.forgotten_floor
        && state.forgotten.get(slot).is_none_or(|g| *g <= read.since)
        && read.through.is_none_or(|t| state.applied_through <= t)
}

/// Each guarded column of `slot` from a read that knows the ledger's position
/// (`through`): the read's value, then the pending records after `through` and the
/// deferrals decided and not yet pending: exactly the writes the read does not have.
fn after_read(
    state: &State,
    slot: &Slot,
    columns: &[&str],
    t: &DeferredTable,
    read: &RowRead,
    through: u64,
) -> Vec<Cell> {
    let ops: Vec<&RowOp> = state
        .pending
        .range(through.saturating_add(1)..)
        .flat_map(|(_, r)| r.ops.iter())
        .chain(state.deciding.iter().flat_map(|(_, ops)| ops.iter()))
        .filter(|op| writes(op, slot, t))
        .collect();
    columns
        .iter()
        .map(|c| {
            let start = match (&read.values, read.value(c)) {
                (Some(_), Some(v)) => Cell::Known(v),
                // No row in the read: only a pending INSERT gives values.
                _ => Cell::Unknown,
            };
            ops.iter().fold(start, |cell, op| step(cell, op, c, t))
        })
        .collect()
}

/// What a decision needs to know of one guarded operation's row.
pub(super) enum Verdict {
    /// The guard holds (true) or not (false).
    Holds(bool),
    /// A column's value is PostgreSQL's and no fresh read of it is in `rows`.
    Unread(Vec<String>),
    /// Not known exactly: the statement moves upstream.
    Unknown,
}

/// What spillway knows of some columns of one row.
enum Row {
    /// Exactly these values (`None`: NULL), in the columns' order.
    Values(Vec<Option<String>>),
    /// These columns are PostgreSQL's and no fresh read of them is in `rows`.
    Unread(Vec<String>),
    /// Not known exactly.
    Unknown,
}

/// `columns` of `slot` of `t`, given the state's pending writes, the transaction's own
/// earlier writes of the key (`own`, applied ones, in order) and the reads in `rows`.
fn row(
    state: &State,
    rows: &Rows,
    slot: &Slot,
    t: &DeferredTable,
    columns: &[&str],
    own: &[&RowOp],
) -> Row {
    // A referenced table's pending write may change or delete the row through a
    // foreign key's action when it is applied, which the row's own writes do not show.
    if t.row_changes.by_parents {
        return Row::Unknown;
    }
    let read = rows.get(slot).filter(|r| fresh(state, slot, r));
    // A read that knows the ledger's position decides every column; without one,
    // the pending writes may decide them alone, else a read is asked for (a delta
    // pending over PostgreSQL's value, a default: the positioned read resolves them).
    let cells = match read.and_then(|r| r.through.map(|t| (r, t))) {
        Some((r, through)) => after_read(state, slot, columns, t, r, through),
        None => {
            let cells = after_pending(state, slot, columns, t);
            if read.is_none() && cells.contains(&Cell::Unknown) {
                return Row::Unread(columns.iter().map(|c| (*c).to_owned()).collect());
            }
            cells
        }
    };
    let mut unread = Vec::new();
    let mut values = Vec::with_capacity(cells.len());
    for (cell, column) in cells.into_iter().zip(columns) {
        let cell = match cell {
            Cell::Base => match read.map(|r| (r.values.is_some(), r.value(column))) {
                Some((true, Some(v))) => Cell::Known(v),
                // The read found no row where the overlay or the key's answer says
                // one exists: they disagree (a writer bypassing spillway), so the
                // value is not known.
                Some((false, _)) | Some((true, None)) => Cell::Unknown,
                None => {
                    unread.push((*column).to_owned());
                    continue;
                }
            },
            other => other,
        };
        values.push(own.iter().fold(cell, |c, op| step(c, op, column, t)));
    }
    if !unread.is_empty() {
        return Row::Unread(unread);
    }
    let mut known = Vec::with_capacity(values.len());
    for cell in values {
        let Cell::Known(v) = cell else {
            return Row::Unknown;
        };
        known.push(v);
    }
    Row::Values(known)
}

/// Whether the guard of `op` holds on `slot` of `t`, given the state's pending writes,
/// the transaction's own earlier writes of the key (`own`, applied ones, in order) and
/// the reads in `rows`. The row exists (the caller decided its existence first).
pub(super) fn verdict(
    state: &State,
    rows: &Rows,
    slot: &Slot,
    t: &DeferredTable,
    guard: &[Guard],
    own: &[&RowOp],
) -> Verdict {
    let columns: Vec<&str> = guard.iter().map(|g| g.column.as_str()).collect();
    let values = match row(state, rows, slot, t, &columns, own) {
        Row::Values(v) => v,
        Row::Unread(columns) => return Verdict::Unread(columns),
        Row::Unknown => return Verdict::Unknown,
    };
    let mut holds = true;
    for (g, v) in guard.iter().zip(values) {
        match compare(v.as_deref(), g.cmp, g.value.text.as_deref()) {
            Some(h) => holds &= h,
            None => return Verdict::Unknown,
        }
    }
    Verdict::Holds(holds)
}

/// What an upsert's conflicting row returns of the columns its DO UPDATE leaves as
/// stored (ADR 0038).
pub(super) enum Stored {
    Values(Vec<Option<String>>),
    Unread(Vec<String>),
    Unknown,
}

/// `columns` of `slot` as stored, as [`verdict`] knows them, each in the one spelling
/// the proxy answers exactly ([`exact_spelling`]); any other is unknown.
pub(super) fn stored(
    state: &State,
    rows: &Rows,
    slot: &Slot,
    t: &DeferredTable,
    columns: &[&str],
    own: &[&RowOp],
) -> Stored {
    match row(state, rows, slot, t, columns, own) {
        Row::Values(values) => {
            let exact = columns.iter().zip(&values).all(|(c, v)| match v {
                None => true,
                Some(text) => t
                    .meta
                    .types
                    .get(*c)
                    .is_some_and(|ty| exact_spelling(ty, text)),
            });
            if exact {
                Stored::Values(values)
            } else {
                Stored::Unknown
            }
        }
        Row::Unread(columns) => Stored::Unread(columns),
        Row::Unknown => Stored::Unknown,
    }
}

/// Whether `text` is a value of the column type `ty` (`format_type`'s name) in a
/// spelling the proxy's RETURNING encodes exactly: an integer, a uuid, a timestamptz
/// as `YYYY-MM-DD HH:MM:SS[.ffffff]+00` (the journal's canonical text, or the point
/// read's UTC text, `Checks::row_values`). Anything else (another type, `infinity`, a
/// BC or five-digit year, another DateStyle) is not answered.
pub fn exact_spelling(ty: &str, text: &str) -> bool {
    match ty {
        "smallint" | "integer" | "bigint" => {
            let t = text.strip_prefix('-').unwrap_or(text);
            !t.is_empty() && t.len() <= 19 && t.bytes().all(|b| b.is_ascii_digit())
        }
        "uuid" => crate::changes::canonical_key(text, crate::changes::key_types::UUID)
            .is_ok_and(|c| c == text),
        "timestamp with time zone" => {
            // `YYYY-MM-DD HH:MM:SS`: `0` stands for any digit, the rest for itself.
            const SHAPE: &[u8] = b"0000-00-00 00:00:00";
            let b = text.as_bytes();
            let fits = b.len() >= SHAPE.len()
                && SHAPE.iter().zip(b).all(|(&p, &c)| {
                    if p == b'0' {
                        c.is_ascii_digit()
                    } else {
                        c == p
                    }
                });
            if !fits {
                return false;
            }
            let Some(rest) = text.get(19..).and_then(|r| r.strip_suffix("+00")) else {
                return false;
            };
            match rest.strip_prefix('.') {
                None => rest.is_empty(),
                Some(f) => (1..=6).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()),
            }
        }
        _ => false,
    }
}

/// `row cmp value` as PostgreSQL's WHERE takes it (true only when true), for integer
/// columns, the only ones the proxy guards on; `None` for text that is not an integer
/// as PostgreSQL's input function reads it (`1.5` cast to an integer rounds: not
/// known here).
fn compare(row: Option<&str>, cmp: Cmp, value: Option<&str>) -> Option<bool> {
    let (Some(a), Some(b)) = (row, value) else {
        return Some(false);
    };
    let a = a.trim().parse::<i128>().ok()?;
    let b = b.trim().parse::<i128>().ok()?;
    Some(match cmp {
        Cmp::Eq => a == b,
        Cmp::Ne => a != b,
        Cmp::Lt => a < b,
        Cmp::Le => a <= b,
        Cmp::Gt => a > b,
        Cmp::Ge => a >= b,
    })
}

/// Whether `stmts`' operations carry guards at all.
pub(super) fn any_guard<'a>(mut ops: impl Iterator<Item = &'a RowOp>) -> bool {
    ops.any(|op| !op.guard().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_in_the_spelling_returning_encodes() {
        let tz = "timestamp with time zone";
        assert!(exact_spelling(tz, "2024-03-30 23:15:00.25+00"));
        assert!(exact_spelling(tz, "2024-03-30 23:15:00+00"));
        assert!(exact_spelling(tz, "2024-03-30 23:15:00.250001+00"));
        for bad in [
            "infinity",
            "2024-03-30 23:15:00.25",
            "2024-03-30 23:15:00.25+01",
            "2024-03-30 23:15:00.1234567+00",
            "0044-03-15 00:00:00 BC+00",
            "12024-03-30 23:15:00+00",
            "03/30/2024 23:15:00+00",
            "2024-03-30T23:15:00+00",
        ] {
            assert!(!exact_spelling(tz, bad), "{bad}");
        }
        assert!(exact_spelling("bigint", "-42"));
        assert!(!exact_spelling("bigint", "+42"));
        assert!(!exact_spelling("integer", "4.0"));
        assert!(exact_spelling(
            "uuid",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        ));
        assert!(!exact_spelling(
            "uuid",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"
        ));
        assert!(!exact_spelling("text", "x"));
        assert!(!exact_spelling("numeric(10,2)", "1.50"));
    }

    #[test]
    fn comparisons_are_postgres_where_semantics() {
        assert_eq!(compare(Some("3"), Cmp::Eq, Some("3")), Some(true));
        assert_eq!(compare(Some("3"), Cmp::Eq, Some(" +03")), Some(true));
        assert_eq!(compare(Some("3"), Cmp::Eq, Some("4")), Some(false));
        assert_eq!(compare(None, Cmp::Eq, None), Some(false));
        assert_eq!(compare(Some("3"), Cmp::Eq, None), Some(false));
        assert_eq!(compare(Some("3"), Cmp::Eq, Some("3.0")), None);
        assert_eq!(compare(Some("0"), Cmp::Gt, Some("0")), Some(false));
        assert_eq!(compare(Some("1"), Cmp::Gt, Some("0")), Some(true));
        assert_eq!(compare(Some("-1"), Cmp::Ge, Some("0")), Some(false));
        assert_eq!(compare(Some("5"), Cmp::Lt, Some("10")), Some(true));
        assert_eq!(compare(Some("10"), Cmp::Le, Some("10")), Some(true));
        assert_eq!(compare(Some("10"), Cmp::Ne, Some("10")), Some(false));
        assert_eq!(compare(None, Cmp::Ne, Some("10")), Some(false));
    }
}
