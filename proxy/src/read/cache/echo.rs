//! The change stream's echo of spillway's own writes (ADR 0036): which changes the
//! stream reports that spillway has already accounted for, so that they do not
//! invalidate their rows a second time.
//!
//! A row's entries are invalidated by spillway's own invalidation of a write (a
//! write-through statement's at its ReadyForQuery, a flush's once it committed). An
//! entry still current afterwards captured its version counters after that, so its
//! query ran on a snapshot taken after the write committed: it cannot hold a value
//! older than the write. The echo of that write (or of any earlier change of the row)
//! may therefore leave it alone; a change committed after it may not. Two kinds of
//! accounted changes are recognised, each only when that is certain:
//!
//! - **A flush's batch**: its transaction's xid, learned in the batch itself, is
//!   registered with the rows the flush invalidated after its commit
//!   ([`Echoes::flushed`]); a streamed change of that xid to one of those rows (or to a
//!   table it invalidated whole) is accounted for. Any other row the transaction
//!   changed (a trigger's, a cascade's) is not.
//! - **A write-through statement in autocommit** that changed exactly one row, with
//!   a key spillway knew: the *first* change of that row the stream delivers after the
//!   statement's ReadyForQuery is accounted for ([`Echoes::written`]), provided no
//!   change of the row (or of another row sharing its slot) was delivered between the
//!   statement going upstream ([`Echoes::claim`]) and that ReadyForQuery. Changes of
//!   one row reach the stream in the order they were made (row locks and the unique
//!   index order them, and the stream follows commit order), so that first change is
//!   the statement's own echo or one committed before it, visible before the
//!   statement's own invalidation; a change committed later comes after the echo and
//!   finds no credit.
//!
//! Invariants: an accounted change is one of the two above; everything else
//! invalidates as before. Whatever may have lost changes (the stream lost, restarted,
//! a change of unknown rows of a table, a commit seen without a catalog) drops the
//! credits it could make wrong. Credits and registered flushes live until the end of
//! the first complete stream round that started after they were made (by then the
//! change they wait for was delivered, or they only cost an invalidation), and at
//! most [`MAX_CREDITS`] / [`MAX_FLUSHES`] of them are kept: dropping one is always
//! safe (the change then invalidates, as before).

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Slots of the delivered-changes counters (a power of two).
const SLOTS: usize = 1 << 16;
/// Slots of the counters of changes of unknown rows, by table (a power of two).
const TABLE_SLOTS: usize = 1 << 10;
/// Write-through credits kept at most; past it they are all dropped.
pub const MAX_CREDITS: usize = 1 << 16;
/// Flushes registered at most; past it they are all dropped.
pub const MAX_FLUSHES: usize = 1024;

type RowKey = (u32, Vec<String>);

/// What a write-through statement saw before it went upstream ([`Echoes::claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub table: u32,
    pub key: Vec<String>,
    slot: usize,
    delivered: u64,
    table_changes: u64,
    generation: u64,
}

/// The rows a flush invalidated after its commit.
struct Flush {
    rows: HashSet<RowKey>,
    tables: HashSet<u32>,
    round: u64,
}

#[derive(Default)]
struct Inner {
    /// Per row, the changes still accounted for, and the round they were made in.
    credits: HashMap<RowKey, (u32, u64)>,
    /// By the low 32 bits of the flush's xid (as pgoutput's Begin carries it).
    flushes: HashMap<u32, Flush>,
    /// Stream rounds started so far.
    round: u64,
}

/// One database's accounted changes (see the module docs).
pub struct Echoes {
    /// Per slot (a hash of table and key), changes the stream delivered. Bumped only
    /// under `inner`'s lock; read without it when a statement goes upstream.
    delivered: Box<[AtomicU64]>,
    /// Per slot (a hash of the table), changes of unknown rows delivered; likewise.
    table_changes: Box<[AtomicU64]>,
    /// Bumped whenever credits are dropped for a possible loss of changes.
    generation: AtomicU64,
    /// Changes found accounted for so far (`spillway_replication_echoes_total`).
    accounted: AtomicU64,
    inner: Mutex<Inner>,
}

impl Default for Echoes {
    fn default() -> Self {
        Self {
            delivered: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            table_changes: (0..TABLE_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            generation: AtomicU64::new(0),
            accounted: AtomicU64::new(0),
            inner: Mutex::default(),
        }
    }
}

fn table_slot(table: u32) -> usize {
    usize::try_from(table).unwrap_or(0) & (TABLE_SLOTS - 1)
}

fn load(counters: &[AtomicU64], i: usize) -> u64 {
    counters
        .get(i)
        .map_or(u64::MAX, |c| c.load(Ordering::SeqCst))
}

fn slot_of(table: u32, key: &[String]) -> usize {
    let mut h = DefaultHasher::new();
    table.hash(&mut h);
    key.hash(&mut h);
    usize::try_from(h.finish() & (SLOTS as u64 - 1)).unwrap_or(0)
}

impl Echoes {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A write-through statement that changes the row (`table`, `key`) goes upstream
    /// now.
    pub fn claim(&self, table: u32, key: &[String]) -> Claim {
        let slot = slot_of(table, key);
        Claim {
            table,
            key: key.to_vec(),
            slot,
            generation: self.generation.load(Ordering::SeqCst),
            delivered: load(&self.delivered, slot),
            table_changes: load(&self.table_changes, table_slot(table)),
        }
    }

    /// The claimed statement committed, changed exactly its row, and spillway has
    /// invalidated the row since: the row's next change from the stream is accounted
    /// for, unless one was delivered since the claim (it may have been the echo).
    /// True when a credit was made.
    pub fn written(&self, claim: &Claim) -> bool {
        let mut inner = self.lock();
        let unchanged = self.generation.load(Ordering::SeqCst) == claim.generation
            && load(&self.delivered, claim.slot) == claim.delivered
            && load(&self.table_changes, table_slot(claim.table)) == claim.table_changes;
        if !unchanged {
            return false;
        }
        if inner.credits.len() >= MAX_CREDITS {
            inner.credits.clear();
        }
        let round = inner.round;
        let credit = inner
            .credits
            .entry((claim.table, claim.key.clone()))
            .or_insert((0, round));
        credit.0 += 1;
        credit.1 = round;
        true
    }

    /// spillway's flush with transaction id `xid` committed, and these rows and
    /// tables were invalidated since.
    pub fn flushed(
        &self,
        xid: u64,
        rows: impl IntoIterator<Item = RowKey>,
        tables: impl IntoIterator<Item = u32>,
    ) {
        let mut inner = self.lock();
        if inner.flushes.len() >= MAX_FLUSHES {
            inner.flushes.clear();
        }
        let round = inner.round;
        // pgoutput's Begin carries the low 32 bits.
        let xid = u32::try_from(xid & u64::from(u32::MAX)).unwrap_or(0);
        inner.flushes.insert(
            xid,
            Flush {
                rows: rows.into_iter().collect(),
                tables: tables.into_iter().collect(),
                round,
            },
        );
    }

    /// The stream delivers a change of row (`table`, `key`) in transaction `xid`:
    /// true when spillway already accounted for it (it must not invalidate again).
    pub fn echo(&self, xid: u32, table: u32, key: &[String]) -> bool {
        let mut inner = self.lock();
        if let Some(d) = self.delivered.get(slot_of(table, key)) {
            d.fetch_add(1, Ordering::SeqCst);
        }
        let row = (table, key.to_vec());
        let accounted = if let Some(f) = inner.flushes.get(&xid)
            && (f.tables.contains(&table) || f.rows.contains(&row))
        {
            true
        } else if let Some(credit) = inner.credits.get_mut(&row) {
            credit.0 -= 1;
            if credit.0 == 0 {
                inner.credits.remove(&row);
            }
            true
        } else {
            false
        };
        if accounted {
            self.accounted.fetch_add(1, Ordering::Relaxed);
        }
        accounted
    }

    /// Changes found accounted for so far.
    pub fn accounted(&self) -> u64 {
        self.accounted.load(Ordering::Relaxed)
    }

    /// The stream delivers a change of unknown rows of `table` in transaction `xid`:
    /// true when spillway's flush invalidated the whole table since. The table's
    /// credits are dropped either way (a statement's echo may be this change).
    pub fn table_echo(&self, xid: u32, table: u32) -> bool {
        let mut inner = self.lock();
        if let Some(c) = self.table_changes.get(table_slot(table)) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        inner.credits.retain(|(t, _), _| *t != table);
        let accounted = inner
            .flushes
            .get(&xid)
            .is_some_and(|f| f.tables.contains(&table));
        if accounted {
            self.accounted.fetch_add(1, Ordering::Relaxed);
        }
        accounted
    }

    /// Changes may have been lost (the stream lost or restarted, a commit applied
    /// without a catalog): nothing is accounted for any more.
    pub fn reset(&self) {
        let mut inner = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        inner.credits.clear();
        inner.flushes.clear();
    }

    /// A stream round starts (before it reads how far the WAL is flushed); returns
    /// its number.
    pub fn round_started(&self) -> u64 {
        let mut inner = self.lock();
        inner.round += 1;
        inner.round
    }

    /// Round `round` delivered every transaction committed before it started: what
    /// was made before it waited for a change already delivered.
    pub fn round_complete(&self, round: u64) {
        let mut inner = self.lock();
        inner.credits.retain(|_, (_, made)| *made >= round);
        inner.flushes.retain(|_, f| f.round >= round);
    }

    /// Credits and flushes held (tests, metrics).
    pub fn held(&self) -> (usize, usize) {
        let inner = self.lock();
        (
            inner.credits.values().map(|(n, _)| *n as usize).sum(),
            inner.flushes.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Vec<String> {
        vec![s.to_owned()]
    }

    #[test]
    fn a_statements_echo_is_accounted_for_once() {
        let e = Echoes::default();
        let c = e.claim(7, &k("1"));
        assert!(e.written(&c));
        assert!(e.echo(100, 7, &k("1")), "the echo");
        assert!(!e.echo(101, 7, &k("1")), "a later writer's change");
        assert!(!e.echo(100, 7, &k("2")), "another row");
    }

    #[test]
    fn no_credit_when_a_change_of_the_row_was_delivered_in_between() {
        let e = Echoes::default();
        let c = e.claim(7, &k("1"));
        // The echo came before the ReadyForQuery was handled.
        assert!(!e.echo(100, 7, &k("1")));
        assert!(!e.written(&c));
        assert!(!e.echo(101, 7, &k("1")), "a later change invalidates");
    }

    #[test]
    fn losses_and_table_changes_drop_credits() {
        let e = Echoes::default();
        let c = e.claim(7, &k("1"));
        e.reset();
        assert!(!e.written(&c), "claimed before the reset");
        let c = e.claim(7, &k("1"));
        assert!(e.written(&c));
        assert!(!e.table_echo(100, 7));
        assert!(
            !e.echo(101, 7, &k("1")),
            "the credit went with the table change"
        );
        let c = e.claim(7, &k("1"));
        assert!(e.written(&c));
        e.reset();
        assert!(!e.echo(102, 7, &k("1")));
        // Unknown rows of the table changed while the statement was upstream (its
        // echo may have been that change).
        let c = e.claim(7, &k("1"));
        assert!(!e.table_echo(103, 7));
        assert!(!e.written(&c));
        let c = e.claim(7, &k("1"));
        assert!(!e.table_echo(104, 8), "another table");
        assert!(e.written(&c));
    }

    #[test]
    fn a_flush_accounts_for_its_own_rows_only() {
        let e = Echoes::default();
        e.flushed((5u64 << 32) | 900, [(7, k("1"))], [9]);
        assert!(e.echo(900, 7, &k("1")));
        assert!(!e.echo(900, 8, &k("1")), "a trigger's row");
        assert!(e.echo(900, 9, &k("3")), "a table it invalidated whole");
        assert!(e.table_echo(900, 9));
        assert!(!e.echo(901, 7, &k("1")), "another transaction");
    }

    #[test]
    fn what_a_complete_round_passed_is_dropped() {
        let e = Echoes::default();
        let c = e.claim(7, &k("1"));
        assert!(e.written(&c));
        e.flushed(900, [(7, k("2"))], []);
        let r = e.round_started();
        let c = e.claim(7, &k("3"));
        assert!(e.written(&c), "made during the round");
        e.round_complete(r);
        assert_eq!(e.held(), (1, 0));
        assert!(!e.echo(100, 7, &k("1")));
        assert!(e.echo(100, 7, &k("3")));
        assert_eq!(e.accounted(), 1);
    }
}
