//! Held transactions (SPEC §6, ADR 0016): a `BEGIN` in a session with deferred tables
//! is answered by spillway and not sent upstream. While the transaction holds only
//! deferrable statements, each is answered locally (its row count decided like an
//! autocommit deferred write's, with the transaction's own earlier statements
//! counted); COMMIT journals them as one record, ROLLBACK just forgets them, neither
//! with an upstream round trip (`resume.rs`).
//!
//! Anything else inside the transaction (a read, a statement that is not deferrable,
//! a savepoint, a prepare, a FunctionCall) makes spillway leave the held state: a
//! barrier on the held tables, then `BEGIN` and the held statements replayed upstream
//! as one internal simple Query whose answers are swallowed, then the message goes on
//! as in any upstream transaction (`replay.rs`). If the replay's row counts differ from
//! those the client was given (or it fails), the upstream transaction is rolled back
//! and the client gets 40001 with the transaction failed (it must ROLLBACK, and may
//! retry).
//!
//! The transaction's state is `tx.rs`'s [`HeldTx`]; its waits are `wait.rs`'s
//! [`Held`](super::wait::Held) steps.
//!
//! Invariants:
//! - Nothing goes upstream while a transaction is held (every path that would send a
//!   message first leaves the held state), except cycles that only Parse, Describe or
//!   Close, whose ReadyForQuery is given the held status; so every ReadyForQuery the
//!   client sees carries the status of the transaction it believes in.
//! - Local answers are produced only when nothing is outstanding upstream.
//! - A held transaction is journaled whole at COMMIT, or not at all; the answers the
//!   client got are re-checked then ([`crate::write::service::DeferError::Diverged`]).
//! - A failed held transaction answers 25P02 to everything until ROLLBACK or COMMIT
//!   (which both answer ROLLBACK), as PostgreSQL does.
//! - Held statements are bounded ([`MAX_HELD_STATEMENTS`], and operations and replay
//!   bytes); beyond that the transaction is replayed upstream.

mod reads;
mod replay;
mod resume;

use super::answer::{Answer, Reply, Single};
use super::statements::Unnamed;
use super::tracker::Step;
use super::tx::HeldTx;
use super::wait::{Held, Wait};
use super::{Caching, Disposition};
use crate::error::ClientError;
use crate::protocol::frontend;
use crate::protocol::sqlstate::SqlState;
use crate::read::classify::{Analysis, Isolation, Kind, TxCommand};
use crate::session::state::Outbox;
use crate::write::service::{Known, TxStatement};

/// More statements, row operations or replay bytes than these in one held transaction:
/// it is replayed upstream (the decision at each statement re-decides every earlier
/// one under the write service's lock, and memory stays bounded).
pub(super) const MAX_HELD_STATEMENTS: usize = 256;
pub(super) const MAX_HELD_OPS: usize = 4096;
pub(super) const MAX_HELD_BYTES: usize = 1024 * 1024;

/// Counts a held transaction's end (`committed`, `rolled_back`, `upstream`,
/// `diverged`).
fn ended(outcome: &'static str) {
    metrics::counter!(crate::metrics::TRANSACTIONS, "outcome" => outcome).increment(1);
}

/// `BEGIN …` for a transaction spillway may hold: READ COMMITTED (or below, which
/// PostgreSQL runs as READ COMMITTED), read-write.
pub(super) fn holdable(analysis: &Analysis) -> Option<&'static str> {
    let [stmt] = analysis.statements.as_slice() else {
        return None;
    };
    match &stmt.kind {
        Kind::Transaction(TxCommand::Begin {
            isolation,
            read_only: false,
        }) => match isolation {
            None => Some("BEGIN"),
            Some(Isolation::ReadCommitted) => Some("BEGIN ISOLATION LEVEL READ COMMITTED"),
            Some(Isolation::ReadUncommitted) => Some("BEGIN ISOLATION LEVEL READ UNCOMMITTED"),
            Some(_) => None,
        },
        _ => None,
    }
}

fn tx_command(analyses: &[&Analysis]) -> Option<TxCommand> {
    let [analysis] = analyses else {
        return None;
    };
    match analysis.statements.as_slice() {
        [s] => match &s.kind {
            Kind::Transaction(c) => Some(c.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn aborted_error() -> ClientError {
    ClientError::error(
        SqlState::IN_FAILED_SQL_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

impl Caching {
    /// A BEGIN this session may hold: answered here, nothing sent upstream.
    pub(super) fn try_hold(
        &mut self,
        analyses: &[&Analysis],
        single: &mut Option<Single<'_>>,
        out: &mut Outbox,
    ) -> Option<Disposition> {
        let [analysis] = analyses else {
            return None;
        };
        let begin = holdable(analysis)?;
        let w = &self.writes.as_ref()?.service;
        let detached = self.link.detached;
        if self.tracker.awaits_answers() && out.tx_status() == b'I' && !detached {
            // Pipelined behind requests still unanswered (a driver's Close and Sync of
            // a statement it dropped): whether it may be held is known once they are.
            self.wait = Wait::quiet(&self.quiet, self.wait.carry());
            return Some(Disposition::Blocked);
        }
        let params = &out.state().params;
        let param = |name: &str| params.get(name).map(String::as_str);
        if detached
            || out.tx_status() != b'I'
            || !self.tracker.quiet
            || self.tracker.desynced
            || !self.key.usable()
            || self.key.default_snapshot_isolation
            || w.health().is_err()
            || param("client_encoding") != Some("UTF8")
            || param("standard_conforming_strings") != Some("on")
            || param("default_transaction_read_only") == Some("on")
        {
            return None;
        }
        let single = single.take()?;
        self.tx.held = Some(HeldTx::new(begin));
        let tag = single.answer.tag();
        let reply = Reply::Done {
            tag: "BEGIN",
            rows: 0,
        };
        Some(self.answer_held(tag, single.answer, reply, b'T', out))
    }

    /// A Query or extended cycle while a transaction is held: answered here (a
    /// deferrable statement, COMMIT, ROLLBACK), or the transaction moves upstream
    /// first. `None`: the cycle goes upstream as it is (Parse, Describe, Close only;
    /// its ReadyForQuery gets the held transaction's status, see
    /// [`Self::held_cycle_answer`]).
    pub(super) fn route_held(
        &mut self,
        analyses: &[&Analysis],
        single: Option<Single<'_>>,
        out: &mut Outbox,
    ) -> Option<Disposition> {
        let held = self.tx.held.as_ref()?;
        if self.tracker.awaits_answers() {
            // A local answer must not overtake the answers still to come.
            self.wait = Wait::quiet(&self.quiet, self.wait.carry());
            return Some(Disposition::Blocked);
        }
        let failed = held.failed;
        let Some(single) = single else {
            return self.route_held_cycle(failed, out);
        };
        let tag = single.answer.tag();
        let done = |tag| Reply::Done { tag, rows: 0 };
        match tx_command(analyses) {
            Some(TxCommand::Rollback { chain: false }) => {
                self.tx.held = None;
                ended("rolled_back");
                return Some(self.answer_held(tag, single.answer, done("ROLLBACK"), b'I', out));
            }
            Some(TxCommand::Commit { chain: false })
                if failed || self.tx.held.as_ref().is_some_and(|h| h.stmts.is_empty()) =>
            {
                self.tx.held = None;
                ended(if failed { "rolled_back" } else { "committed" });
                let reply = done(if failed { "ROLLBACK" } else { "COMMIT" });
                return Some(self.answer_held(tag, single.answer, reply, b'I', out));
            }
            Some(TxCommand::Commit { chain: false }) => return Some(self.commit_held(single)),
            _ if failed => {
                // PostgreSQL answers nothing before the error.
                let answer = Answer {
                    unnamed: single.answer.unnamed,
                    ..Answer::default()
                };
                let reply = Reply::Error(&aborted_error());
                return Some(self.answer_held(tag, answer, reply, b'E', out));
            }
            _ => {}
        }
        let [analysis] = analyses else {
            return Some(self.leave_held(out));
        };
        // A plain read that cannot observe the held writes: answered outside the
        // transaction, which stays held (`reads.rs`).
        if let Some(routed) = self.held_read(analysis, single.bound) {
            return routed;
        }
        Some(self.hold_statement(analysis, single, out))
    }

    /// A held cycle that is not one statement: a lone Sync, a cycle that only
    /// prepares (upstream as it is), or anything else (the transaction moves
    /// upstream, or a failed one answers 25P02).
    fn route_held_cycle(&mut self, failed: bool, out: &mut Outbox) -> Option<Disposition> {
        let status = if failed { b'E' } else { b'T' };
        if self.cycle.held.is_empty() {
            // A Sync alone: ReadyForQuery with the held status.
            out.ready(status);
            self.finish_cycle(None);
            return Some(Disposition::Consumed);
        }
        // In a failed transaction PostgreSQL still prepares the statements that
        // end it.
        if self.neutral_cycle() && (!failed || self.prepares_only_exits()) {
            self.tx
                .held_cycles
                .push_back(self.tracker.next_ready_index());
            return None;
        }
        Some(if failed {
            let reply = Reply::Error(&aborted_error());
            self.answer_held(frontend::SYNC, Answer::default(), reply, b'E', out)
        } else {
            self.leave_held(out)
        })
    }

    /// A deferrable statement inside the held transaction: decided with the
    /// transaction's earlier statements (at once when nothing needs PostgreSQL), or
    /// the transaction moves upstream.
    fn hold_statement(
        &mut self,
        analysis: &Analysis,
        single: Single<'_>,
        out: &mut Outbox,
    ) -> Disposition {
        let Some(held) = self.tx.held.as_ref() else {
            return Disposition::Consumed;
        };
        let full = held.stmts.len() >= MAX_HELD_STATEMENTS
            || held.ops >= MAX_HELD_OPS
            || held.bytes >= MAX_HELD_BYTES;
        if full {
            return self.leave_held(out);
        }
        let Ok((table, mut converted)) = self.deferrable(analysis, single.bound, out) else {
            return self.leave_held(out);
        };
        let Some(w) = self.writes.as_ref().map(|d| d.service.clone()) else {
            return self.leave_held(out);
        };
        let replay: Option<Vec<String>> = {
            let set = w.tables();
            set.deferring(&table)
                .and_then(|t| crate::write::convert::replay(&converted, &t.meta))
        };
        let Some(replay) = replay else {
            return self.leave_held(out);
        };
        let Some(held) = self.tx.held.as_ref() else {
            return Disposition::Consumed;
        };
        let mut answer = single.answer;
        answer.returning = converted.returning.take();
        let tag = answer.tag();
        let stmt = TxStatement { table, converted };
        let mut stmts = held.stmts.clone();
        stmts.push(stmt.clone());
        let mut known = held.known.clone();
        let user = self
            .writes
            .as_ref()
            .map(|d| d.user.clone())
            .unwrap_or_default();
        // Answered at once when nothing needs PostgreSQL (the usual case: privileges
        // known, keys in the overlay or read before, or row_counts = "assumed").
        let zoned = answer.returning.as_ref().is_some_and(|r| r.needs_zone());
        if !zoned && let Some(r) = w.preview_now(&user, &stmts, &known) {
            let step = Held::Statement {
                outcome: r.map(|(a, s)| (a, s, known)),
                stmt: Box::new(stmt),
                replay,
                answer,
            };
            return self
                .resume_held(step, tag, out)
                .unwrap_or(Disposition::Consumed);
        }
        self.wait = Wait::on(async move {
            let mut answer = answer;
            // RETURNING's timestamptz texts in the session's zone, from PostgreSQL
            // (ADR 0035's addendum).
            let resolved = match answer.returning.as_mut() {
                Some(r) => w.resolve_zoned(r).await,
                None => Ok(()),
            };
            let outcome = match resolved {
                Ok(()) => w
                    .preview(&user, &stmts, &mut known)
                    .await
                    .map(|(a, s)| (a, s, known as Known)),
                Err(e) => Err(e),
            };
            super::wait::Resume::Held(Box::new(Held::Statement {
                outcome,
                stmt: Box::new(stmt),
                replay,
                answer,
            }))
        });
        Disposition::Blocked
    }

    /// The held cycle only prepares, describes or closes statements: PostgreSQL answers
    /// it the same outside the transaction, so it may go upstream as it is.
    fn neutral_cycle(&self) -> bool {
        !self.cycle.held.is_empty()
            && self.cycle.held.iter().all(|m| match m[0] {
                frontend::PARSE | frontend::CLOSE => true,
                frontend::DESCRIBE => {
                    frontend::target(frontend::body(m)).is_some_and(|t| t.kind == b'S')
                }
                _ => false,
            })
    }

    /// Every Parse held parses COMMIT or ROLLBACK (allowed in a failed transaction).
    fn prepares_only_exits(&self) -> bool {
        self.cycle
            .held
            .iter()
            .filter(|m| m[0] == frontend::PARSE)
            .all(|m| {
                frontend::parse(frontend::body(m)).is_some_and(|p| {
                    let analysis = self.cache.classifier.classify(p.sql);
                    matches!(
                        analysis.statements.as_slice(),
                        [s] if matches!(
                            s.kind,
                            Kind::Transaction(
                                TxCommand::Commit { .. }
                                    | TxCommand::Rollback { .. }
                                    | TxCommand::RollbackTo
                            )
                        )
                    )
                })
            })
    }

    /// For a backend message: the transaction status its ReadyForQuery must carry if
    /// it ends a cycle sent while the transaction is held (`T`, or `E` when the cycle
    /// failed: PostgreSQL would have failed the transaction, and so does spillway).
    pub(super) fn held_cycle_answer(&mut self, step: &Step) -> Option<u8> {
        if self.tx.held_cycles.is_empty() {
            return None;
        }
        if step.error {
            self.tx.held_cycle_failed = true;
        }
        let id = step.ready_id?;
        if self.tx.held_cycles.front() != Some(&id) {
            return None;
        }
        self.tx.held_cycles.pop_front();
        let failed = std::mem::take(&mut self.tx.held_cycle_failed);
        let held = self.tx.held.as_mut()?;
        held.failed |= failed;
        Some(held.status())
    }

    /// Answers the message `tag` with `answer` and `reply`: a Query or the Sync ending
    /// an extended cycle (or a FunctionCall) also with ReadyForQuery(`status`); any
    /// other message (a Flush or Close that would have gone upstream) only with an
    /// error, after which the cycle's messages are discarded until its Sync, as
    /// PostgreSQL does.
    fn answer_held(
        &mut self,
        tag: u8,
        answer: Answer,
        reply: Reply<'_>,
        status: u8,
        out: &mut Outbox,
    ) -> Disposition {
        match tag {
            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL => {
                let unnamed = answer.send(reply, status, out);
                match tag {
                    frontend::SYNC => self.finish_cycle(unnamed),
                    frontend::QUERY => self.stmts.unnamed = Unnamed::NONE,
                    _ => {}
                }
            }
            _ => {
                answer.send_unsynced(reply, out);
                self.cycle.clear();
                if let Some(h) = self.tx.held.as_mut() {
                    h.discarding = true;
                }
            }
        }
        Disposition::Consumed
    }

    /// Called first for every frontend message while a transaction is held: `Some`
    /// when the message is answered (or discarded) here, or must wait for the
    /// transaction to move upstream.
    pub(super) fn on_held_frontend(
        &mut self,
        tag: u8,
        msg: &[u8],
        out: &mut Outbox,
    ) -> Option<Disposition> {
        let held = self.tx.held.as_ref()?;
        let extended = frontend::is_extended(tag);
        let failed = held.failed;
        let discarding = held.discarding;
        let malformed = tag == frontend::QUERY && frontend::query(frontend::body(msg)).is_none();
        // Held until their Sync decides (`route_held`), unless they would go upstream
        // now; a Query or Sync is decided by `route_held` too.
        let goes_on = match tag {
            _ if extended && discarding => false,
            frontend::PARSE
            | frontend::BIND
            | frontend::DESCRIBE
            | frontend::EXECUTE
            | frontend::CLOSE => !self.would_forward(tag, msg.len()),
            frontend::QUERY => self.cycle.held.is_empty() && !malformed,
            frontend::SYNC => true,
            // A Flush with nothing held asks for nothing.
            frontend::FLUSH => self.cycle.held.is_empty(),
            // PostgreSQL would roll the transaction back: nothing to do.
            b'X' => {
                self.tx.held = None;
                return None;
            }
            _ => false,
        };
        if goes_on {
            if tag == frontend::FLUSH {
                return Some(Disposition::Consumed);
            }
            return None;
        }
        if self.tracker.awaits_answers() {
            // Answered here below: not before the answers still to come.
            self.wait = Wait::quiet(&self.quiet, self.wait.carry());
            return Some(Disposition::Blocked);
        }
        if extended && discarding {
            if tag == frontend::SYNC {
                if let Some(h) = self.tx.held.as_mut() {
                    h.discarding = false;
                }
                out.ready(b'E');
            }
            return Some(Disposition::Consumed);
        }
        Some(if failed {
            self.answer_held(
                tag,
                Answer::default(),
                Reply::Error(&aborted_error()),
                b'E',
                out,
            )
        } else {
            self.leave_held(out)
        })
    }
}
