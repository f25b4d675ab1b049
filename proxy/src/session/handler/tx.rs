//! The transaction the client believes it is in, as far as spillway answers for it:
//! what it wrote and at which isolation (the cache keeps out of both), the
//! invalidations to repeat when it ends, and a transaction spillway holds itself
//! (`held/`).
//!
//! Invariants:
//! - A transaction that wrote, or runs at REPEATABLE READ or SERIALIZABLE, neither hits
//!   nor fills until it ends; nor does a held one (the handler's `reads_allowed` reads
//!   these fields on every request).
//! - Everything here but the held transaction ends with the transaction: when nothing
//!   is outstanding upstream and PostgreSQL reports status `I` ([`Tx::ended`]).

use std::collections::VecDeque;
use std::time::Instant;

use crate::read::cache::Effects;
use crate::write::convert::Verb;
use crate::write::service::{Applied, Known, TxStatement};

#[derive(Default)]
pub struct Tx {
    /// The transaction wrote (or may have, or something was taken as autocommit that
    /// ran in a transaction block).
    pub wrote: bool,
    /// It runs at REPEATABLE READ or SERIALIZABLE.
    pub snapshot: bool,
    /// Invalidations to repeat at acknowledgement and at the end of the transaction.
    pub effects: Effects,
    /// A write forwarded in this request or transaction may touch deferred tables
    /// outside the key overlay (noted again at its CommandComplete/ReadyForQuery).
    pub outside: bool,
    /// A transaction spillway answers itself so far.
    pub held: Option<HeldTx>,
    /// Ready ids of cycles sent upstream while a transaction is held (Parse, Describe,
    /// Close only): their ReadyForQuery carries the held transaction's status.
    pub held_cycles: VecDeque<u64>,
    /// One of them failed (the held transaction fails with it).
    pub held_cycle_failed: bool,
    /// Answers to the internal query in flight (a held transaction's replay).
    pub replay: Option<ReplayLog>,
    /// While a pipelined cycle's writes are decided: the start of the implicit
    /// transaction PostgreSQL would run them in, their `now()` (ADR 0030).
    pub cycle_began: Option<std::time::SystemTime>,
}

impl Tx {
    /// The transaction is over (status `I` with nothing outstanding).
    pub fn ended(&mut self) {
        self.outside = false;
        self.effects = Effects::default();
        self.wrote = false;
        self.snapshot = false;
    }
}

/// A transaction spillway answers itself so far (SPEC §6, `held/`).
pub struct HeldTx {
    /// `BEGIN …` as replayed upstream.
    pub begin: &'static str,
    pub stmts: Vec<TxStatement>,
    /// Per statement, the SQL of each operation (replayed when the transaction moves
    /// upstream) and its verb.
    pub replay: Vec<(Vec<String>, Verb)>,
    /// What each statement's client was told: per operation, whether it wrote a row.
    pub applied: Applied,
    pub known: Known,
    /// Row operations and replay SQL bytes held (bounded).
    pub ops: usize,
    pub bytes: usize,
    /// A statement failed: only ROLLBACK or COMMIT end it.
    pub failed: bool,
    /// An error ended the extended cycle before its Sync: its messages are discarded
    /// until the Sync.
    pub discarding: bool,
    pub started: Instant,
    /// When its BEGIN was answered, on spillway's clock: `now()` of its statements
    /// (ADR 0030).
    pub began: std::time::SystemTime,
}

impl HeldTx {
    pub fn new(begin: &'static str) -> Self {
        Self {
            begin,
            stmts: Vec::new(),
            replay: Vec::new(),
            applied: Vec::new(),
            known: Known::new(),
            ops: 0,
            bytes: 0,
            failed: false,
            discarding: false,
            started: Instant::now(),
            began: std::time::SystemTime::now(),
        }
    }

    /// The status its ReadyForQuery reports.
    pub fn status(&self) -> u8 {
        if self.failed { b'E' } else { b'T' }
    }
}

/// The answers to the internal query in flight: the command tags expected and those
/// that came, and the error if one did.
#[derive(Default)]
pub struct ReplayLog {
    pub expected: Vec<String>,
    pub tags: Vec<String>,
    pub error: Option<String>,
}
