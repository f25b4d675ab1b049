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
use crate::read::cache::echo::Claim;
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
    /// Whether the change stream's echo of what it wrote is accounted for.
    pub echo: EchoClaim,
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
        self.echo = EchoClaim::None;
        self.wrote = false;
        self.snapshot = false;
    }
}

/// A write-through statement whose echo in the change stream spillway may account
/// for (`read/cache/echo.rs`, ADR 0036).
#[derive(Default, Debug)]
pub enum EchoClaim {
    /// Nothing written yet.
    #[default]
    None,
    /// The only write so far: one statement alone in autocommit, one row of a known
    /// key; `rows` from its CommandComplete.
    One { claim: Claim, rows: Option<u64> },
    /// Anything else: its echo invalidates as any change does.
    Spoiled,
}

impl EchoClaim {
    /// A CommandComplete (the whole message; `None`: not held).
    pub fn completed(&mut self, msg: Option<&[u8]>) {
        *self = match std::mem::take(self) {
            EchoClaim::One { claim, rows: None } => match msg.and_then(written_rows) {
                Some(n) => EchoClaim::One {
                    claim,
                    rows: Some(n),
                },
                None => EchoClaim::Spoiled,
            },
            EchoClaim::None => EchoClaim::None,
            _ => EchoClaim::Spoiled,
        };
    }

    /// The claim, when its statement changed exactly one row.
    pub fn one_row(&self) -> Option<&Claim> {
        match self {
            EchoClaim::One {
                claim,
                rows: Some(1),
            } => Some(claim),
            _ => None,
        }
    }
}

/// The rows an INSERT, UPDATE or DELETE's CommandComplete (`C`, length, tag) reports.
fn written_rows(msg: &[u8]) -> Option<u64> {
    let tag = msg.get(5..)?.split(|b| *b == 0).next()?;
    let tag = std::str::from_utf8(tag).ok()?;
    let mut words = tag.split(' ');
    let verb = words.next()?;
    let n = words.next_back()?;
    matches!(verb, "INSERT" | "UPDATE" | "DELETE")
        .then(|| n.parse().ok())
        .flatten()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(tag: &str) -> Vec<u8> {
        let mut m = vec![b'C', 0, 0, 0, 0];
        m.extend_from_slice(tag.as_bytes());
        m.push(0);
        m
    }

    #[test]
    fn written_rows_reads_the_writes_tags_only() {
        assert_eq!(written_rows(&complete("UPDATE 1")), Some(1));
        assert_eq!(written_rows(&complete("INSERT 0 1")), Some(1));
        assert_eq!(written_rows(&complete("DELETE 0")), Some(0));
        assert_eq!(written_rows(&complete("SELECT 1")), None);
        assert_eq!(written_rows(&complete("COMMIT")), None);
        assert_eq!(written_rows(b"C"), None);
    }

    #[test]
    fn a_second_answer_spoils_the_claim() {
        let echoes = crate::read::cache::echo::Echoes::default();
        let mut c = EchoClaim::One {
            claim: echoes.claim(1, &["1".to_owned()]),
            rows: None,
        };
        c.completed(Some(&complete("UPDATE 1")));
        assert!(c.one_row().is_some());
        c.completed(Some(&complete("SELECT 1")));
        assert!(c.one_row().is_none());
        let mut c = EchoClaim::One {
            claim: echoes.claim(1, &["1".to_owned()]),
            rows: None,
        };
        c.completed(Some(&complete("UPDATE 0")));
        assert!(c.one_row().is_none(), "no row changed: no echo");
        c.completed(None);
        assert!(matches!(c, EchoClaim::Spoiled));
    }
}
