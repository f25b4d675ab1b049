//! The overlay's rule and its watches, without the engine (ADR 0039; `overlay/`
//! says how they answer a read): which pending writes of a row make an overlay
//! ([`overlay_of`]), and the rows being read with the writes that became pending
//! since ([`Watches`]).
//!
//! Invariants:
//! - A watch holds the flusher only from the first write of its row that no overlay
//!   can include, and only while it is younger than [`HOLD_LIMIT`]; past it, the first
//!   write of its row ends its keeping of records (bounded memory for a read that
//!   never ends), and it overlays nothing any more.
//! - The row index holds exactly the pending records noted and not applied since
//!   start (records replayed at start are not in it: `Engine::watch_row` refuses
//!   while they are pending).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::writes::{AssignOp, Record, RowOp};

/// How long a watch may hold the flusher before a write of its row (a read's round
/// trip is far shorter; past it the read is answered with an error, never a guess).
pub const HOLD_LIMIT: Duration = Duration::from_secs(2);

/// The columns the read outputs, after the row's pending writes: (column, text;
/// `None` is NULL), each column once, its last assignment.
pub type Assigned = Vec<(String, Option<String>)>;

/// What a read of the row depends on besides the row's existence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// The columns it outputs.
    pub outputs: Vec<String>,
    /// Columns no assignment of which it can take: those its WHERE compares (beyond
    /// the key, which no UPDATE assigns), and outputs the caller cannot write.
    pub filtered: Vec<String>,
}

/// Why a row's pending writes do not make an overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An INSERT of the row (or of a key spillway does not know).
    Insert,
    Delete,
    /// `col = col + v` on a column the read outputs: depends on the base image.
    Arithmetic,
    /// A condition beyond the key: decided against the base image.
    Guarded,
    /// A value with a client's cast, applied at the flush, for a column it outputs.
    Cast,
    /// An assignment to a column the read's WHERE compares (the row may move into or
    /// out of the result), or to an output the caller cannot write.
    Filtered,
    /// A write of the table whose key spillway does not know: it may be the row's.
    UnknownKey,
    /// A write of the row decided and not journaled yet: its sequence number may come
    /// before the writes pending now, and the flusher could not pass it.
    Deciding,
    /// Records replayed at start are still pending (they are not indexed by row).
    Replaying,
    /// The watch is gone, held the flusher past [`HOLD_LIMIT`], or saw a write of its
    /// row after it (and stopped keeping them).
    Expired,
}

/// Folds one operation of the row into `into` for a read that `needs` these columns,
/// or why it makes no overlay. Columns the read neither outputs nor compares may be
/// assigned anything: they are not in the answer.
pub fn fold(op: &RowOp, needs: &Needs, into: &mut Assigned) -> Result<(), Refusal> {
    let set = match op {
        RowOp::Insert { .. } => return Err(Refusal::Insert),
        RowOp::Delete { .. } => return Err(Refusal::Delete),
        RowOp::Update { guard, .. } if !guard.is_empty() => return Err(Refusal::Guarded),
        RowOp::Update { set, .. } => set,
    };
    for a in set {
        if needs.filtered.contains(&a.column) {
            return Err(Refusal::Filtered);
        }
        if !needs.outputs.contains(&a.column) {
            continue;
        }
        if a.op != AssignOp::Set {
            return Err(Refusal::Arithmetic);
        }
        if a.value.cast.is_some() {
            return Err(Refusal::Cast);
        }
    }
    for a in set.iter().filter(|a| needs.outputs.contains(&a.column)) {
        match into.iter_mut().find(|(c, _)| *c == a.column) {
            Some((_, v)) => v.clone_from(&a.value.text),
            None => into.push((a.column.clone(), a.value.text.clone())),
        }
    }
    Ok(())
}

/// The overlay of row `key` of `table` from `records` in log order for a read that
/// `needs` these columns (`key_of`: an operation's canonical key, `None` when
/// spillway does not know it).
pub fn overlay_of<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    table: &str,
    key: &[String],
    needs: &Needs,
    key_of: impl Fn(&RowOp) -> Option<Vec<String>>,
) -> Result<Assigned, Refusal> {
    let mut out = Assigned::new();
    for record in records {
        for op in record.ops.iter().filter(|op| op.table() == table) {
            match key_of(op) {
                None => return Err(Refusal::UnknownKey),
                Some(k) if k != key => {}
                Some(_) => fold(op, needs, &mut out)?,
            }
        }
    }
    Ok(out)
}

/// One row being read with its pending writes overlaid.
pub(super) struct Watch {
    pub(super) id: u64,
    pub(super) table: String,
    pub(super) key: Vec<String>,
    pub(super) needs: Needs,
    pub(super) started: Instant,
    /// The row's pending writes when the watch began, then those that became pending
    /// while it lives, each with its sequence number.
    pub(super) records: Vec<(u64, Arc<Record>)>,
    /// The lowest sequence number of a write of the row, pending since the watch
    /// began, that no overlay can include: the flusher stops before it.
    pub(super) blocking: Option<u64>,
    /// A write of the row became pending after [`HOLD_LIMIT`]: the watch no longer
    /// keeps records (a read that never ends must not grow it), so it overlays nothing.
    pub(super) lapsed: bool,
}

impl Watch {
    pub(super) fn live(&self) -> bool {
        self.started.elapsed() < HOLD_LIMIT
    }
}

/// The watches of the engine's state (under its lock), and the index a watch starts
/// from: the pending records of each row, and per table how many pending operations
/// have a key spillway does not know (records replayed at start are not indexed).
#[derive(Default)]
pub struct Watches {
    pub(super) list: Vec<Watch>,
    pub(super) next_id: u64,
    pub(super) rows: HashMap<(String, Vec<String>), Vec<u64>>,
    unkeyed: HashMap<String, usize>,
}

impl Watches {
    /// A record became pending: indexed by the rows it writes, and each watch of a row
    /// it writes keeps it.
    pub fn note(
        &mut self,
        seq: u64,
        record: &Arc<Record>,
        key_of: impl Fn(&RowOp) -> Option<Vec<String>>,
    ) {
        for op in &record.ops {
            match key_of(op) {
                Some(k) => {
                    let seqs = self.rows.entry((op.table().to_owned(), k)).or_default();
                    if seqs.last() != Some(&seq) {
                        seqs.push(seq);
                    }
                }
                None => *self.unkeyed.entry(op.table().to_owned()).or_default() += 1,
            }
        }
        for w in self.list.iter_mut().filter(|w| !w.lapsed) {
            let mut writes = false;
            let mut blocks = false;
            for op in record.ops.iter().filter(|op| op.table() == w.table) {
                match key_of(op) {
                    Some(k) if k != w.key => continue,
                    Some(_) => blocks |= fold(op, &w.needs, &mut Assigned::new()).is_err(),
                    None => blocks = true,
                }
                writes = true;
            }
            if writes && !w.live() {
                w.lapsed = true;
                w.records = Vec::new();
                continue;
            }
            if writes {
                w.records.push((seq, record.clone()));
            }
            if blocks {
                w.blocking = Some(w.blocking.map_or(seq, |b| b.min(seq)));
            }
        }
    }

    /// A pending record was applied: out of the index.
    pub fn applied(
        &mut self,
        seq: u64,
        record: &Record,
        key_of: impl Fn(&RowOp) -> Option<Vec<String>>,
    ) {
        for op in &record.ops {
            match key_of(op) {
                Some(k) => {
                    let slot = (op.table().to_owned(), k);
                    if let Some(seqs) = self.rows.get_mut(&slot) {
                        seqs.retain(|s| *s != seq);
                        if seqs.is_empty() {
                            self.rows.remove(&slot);
                        }
                    }
                }
                None => {
                    if let Some(n) = self.unkeyed.get_mut(op.table()) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// The sequence numbers of the pending records that write row `key` of `table`,
    /// or `None` when a pending operation of the table has a key spillway does not
    /// know.
    pub fn row(&self, table: &str, key: &[String]) -> Option<Vec<u64>> {
        if self.unkeyed.get(table).is_some_and(|n| *n > 0) {
            return None;
        }
        Some(
            self.rows
                .get(&(table.to_owned(), key.to_vec()))
                .cloned()
                .unwrap_or_default(),
        )
    }

    /// Whether the flusher must stop before record `seq`.
    pub fn holds(&self, seq: u64) -> bool {
        self.hold_from().is_some_and(|b| b <= seq)
    }

    /// The first record the flusher must not take, if a live watch holds one.
    pub fn hold_from(&self) -> Option<u64> {
        self.list
            .iter()
            .filter(|w| w.live())
            .filter_map(|w| w.blocking)
            .min()
    }
}
