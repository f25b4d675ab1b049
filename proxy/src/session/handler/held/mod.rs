//! Held transactions (SPEC §6): a `BEGIN` in a session with deferred tables is
//! answered by spillway and not sent upstream. While the transaction holds only
//! deferrable statements, each is answered locally (its row count decided like an
//! autocommit deferred write's, with the transaction's own earlier statements
//! counted); COMMIT journals them as one record, ROLLBACK just forgets them, neither
//! with an upstream round trip.
//!
//! Anything else inside the transaction (a read, a statement that is not deferrable,
//! a savepoint, a prepare, a FunctionCall) makes spillway leave the held state: a
//! barrier on the held tables, then `BEGIN` and the held statements replayed upstream
//! as one internal simple Query whose answers are swallowed, then the message goes on
//! as in any upstream transaction. If the replay's row counts differ from those the
//! client was given (or it fails), the upstream transaction is rolled back and the
//! client gets 40001 with the transaction failed (it must ROLLBACK, and may retry).
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

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;

mod replay;

pub(in crate::session::handler) use replay::ReplayLog;

use super::deferred::{Slot, Waiting, put, take};
use super::{Caching, Disposition, Out, Stmt, returning};
use crate::protocol::backend::{self, Severity};
use crate::protocol::frontend;
use crate::protocol::sqlstate::SqlState;
use crate::read::classify::{Analysis, Isolation, Kind, TxCommand};
use crate::write::convert::Verb;
use crate::write::returning::Returning;
use crate::write::service::{Applied, DeferError, Known, TxOutcome, TxStatement};

/// More statements, row operations or replay bytes than these in one held transaction:
/// it is replayed upstream (the decision at each statement re-decides every earlier
/// one under the write service's lock, and memory stays bounded).
const MAX_HELD_STATEMENTS: usize = 256;
const MAX_HELD_OPS: usize = 4096;
const MAX_HELD_BYTES: usize = 1024 * 1024;

/// A transaction spillway answers itself so far.
pub(super) struct HeldTx {
    /// `BEGIN …` as replayed upstream.
    begin: &'static str,
    stmts: Vec<TxStatement>,
    /// Per statement, the SQL of each operation (replayed when the transaction moves
    /// upstream) and its verb.
    replay: Vec<(Vec<String>, Verb)>,
    /// What each statement's client was told: per operation, whether it wrote a row.
    applied: Applied,
    known: Known,
    /// Row operations and replay SQL bytes held (bounded, see [`MAX_HELD_OPS`]).
    ops: usize,
    bytes: usize,
    /// A statement failed: only ROLLBACK or COMMIT end it.
    failed: bool,
    /// An error ended the extended cycle before its Sync: its messages are discarded
    /// until the Sync.
    discarding: bool,
    started: Instant,
}

/// What a Blocked message in a held transaction waits for.
pub(super) enum Wait {
    /// A deferrable statement's decision ([`crate::write::service::WriteService::preview`]).
    Statement {
        slot: Slot<(Applied, Known)>,
        stmt: Box<TxStatement>,
        replay: Vec<String>,
        before: BytesMut,
        /// Answers after the command tag (CloseComplete).
        after: BytesMut,
        unnamed: Option<Arc<Stmt>>,
        /// Rows answered for RETURNING (`returning.rs`).
        returning: Option<Returning>,
    },
    /// COMMIT's journal append.
    Commit {
        slot: Slot<TxOutcome>,
        before: BytesMut,
        after: BytesMut,
        unnamed: Option<Arc<Stmt>>,
    },
    /// The held tables' pending writes, before the replay.
    Barrier { slot: Slot<()> },
    /// The internal replay query's answers.
    Replaying,
    /// The internal ROLLBACK after a failed replay; then the client gets `error`.
    RollingBack { error: String },
}

/// Counts a held transaction's end (`committed`, `rolled_back`, `upstream`,
/// `diverged`).
fn ended(outcome: &'static str) {
    metrics::counter!(crate::metrics::TRANSACTIONS, "outcome" => outcome).increment(1);
}

/// `BEGIN …` for a transaction spillway may hold: READ COMMITTED (or below, which
/// PostgreSQL runs as READ COMMITTED), read-write.
fn holdable(analysis: &Analysis) -> Option<&'static str> {
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

/// A command tag followed by the cycle's answers after it.
fn with_after(complete: &[u8], after: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(complete.len() + after.len());
    m.extend_from_slice(complete);
    m.extend_from_slice(after);
    m
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

impl Caching {
    /// A BEGIN this session may hold: answered here, nothing sent upstream. `tag` is
    /// the message being answered (Query, or the Sync of an extended cycle).
    pub(super) fn try_hold(
        &mut self,
        analyses: &[&Analysis],
        single: &mut Option<super::deferred::Single<'_>>,
        out: &mut Out<'_>,
    ) -> Option<Disposition> {
        let [analysis] = analyses else {
            return None;
        };
        let begin = holdable(analysis)?;
        let w = self.writes.as_ref()?;
        if self.tracker.awaits_answers() && out.state.tx_status == b'I' && !self.detached {
            // Pipelined behind requests still unanswered (a driver's Close and Sync of
            // a statement it dropped): whether it may be held is known once they are.
            let quiet = self.quiet.clone();
            self.wait = Some(Box::pin(async move { quiet.notified().await }));
            return Some(Disposition::Blocked);
        }
        let param = |name: &str| out.state.params.get(name).map(String::as_str);
        if self.detached
            || out.state.tx_status != b'I'
            || !self.tracker.is_quiet()
            || self.tracker.is_desynced()
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
        self.held_tx = Some(HeldTx {
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
        });
        let tag = if single.extended {
            frontend::SYNC
        } else {
            frontend::QUERY
        };
        Some(self.answer_held(
            tag,
            single.before,
            &with_after(&frontend::command_complete("BEGIN"), &single.after),
            b'T',
            single.unnamed,
            out,
        ))
    }

    /// A Query or extended cycle while a transaction is held: answered here (a
    /// deferrable statement, COMMIT, ROLLBACK), or the transaction moves upstream
    /// first.
    /// `None`: the cycle goes upstream as it is (Parse, Describe, Close only; its
    /// ReadyForQuery gets the held transaction's status, see [`Self::held_cycle_answer`]).
    pub(super) fn route_held(
        &mut self,
        analyses: &[&Analysis],
        single: Option<super::deferred::Single<'_>>,
        out: &mut Out<'_>,
    ) -> Option<Disposition> {
        let held = self.held_tx.as_ref()?;
        if self.tracker.awaits_answers() {
            // A local answer must not overtake the answers still to come.
            let quiet = self.quiet.clone();
            self.wait = Some(Box::pin(async move { quiet.notified().await }));
            return Some(Disposition::Blocked);
        }
        let failed = held.failed;
        self.route_held_quiet(analyses, single, failed, out)
    }

    fn route_held_quiet(
        &mut self,
        analyses: &[&Analysis],
        single: Option<super::deferred::Single<'_>>,
        failed: bool,
        out: &mut Out<'_>,
    ) -> Option<Disposition> {
        let held = self.held_tx.as_ref()?;
        let empty = held.stmts.is_empty();
        let full = held.stmts.len() >= MAX_HELD_STATEMENTS
            || held.ops >= MAX_HELD_OPS
            || held.bytes >= MAX_HELD_BYTES;
        let command = single.as_ref().and_then(|_| tx_command(analyses));
        let Some(single) = single else {
            if self.held.is_empty() {
                // A Sync alone: ReadyForQuery with the held status.
                let status = if failed { b'E' } else { b'T' };
                return Some(self.answer_held(
                    frontend::SYNC,
                    BytesMut::new(),
                    &[],
                    status,
                    None,
                    out,
                ));
            }
            // In a failed transaction PostgreSQL still prepares the statements that
            // end it.
            if self.neutral_cycle() && (!failed || self.prepares_only_exits()) {
                self.held_cycles.push_back(self.tracker.next_ready_index());
                return None;
            }
            return Some(if failed {
                self.aborted(frontend::SYNC, None, out)
            } else {
                self.leave_held(out)
            });
        };
        let tag = if single.extended {
            frontend::SYNC
        } else {
            frontend::QUERY
        };
        match command {
            Some(TxCommand::Rollback { chain: false }) => {
                self.held_tx = None;
                ended("rolled_back");
                return Some(self.answer_held(
                    tag,
                    single.before,
                    &with_after(&frontend::command_complete("ROLLBACK"), &single.after),
                    b'I',
                    single.unnamed,
                    out,
                ));
            }
            Some(TxCommand::Commit { chain: false }) if failed || empty => {
                self.held_tx = None;
                ended(if failed { "rolled_back" } else { "committed" });
                let done = if failed { "ROLLBACK" } else { "COMMIT" };
                return Some(self.answer_held(
                    tag,
                    single.before,
                    &with_after(&frontend::command_complete(done), &single.after),
                    b'I',
                    single.unnamed,
                    out,
                ));
            }
            Some(TxCommand::Commit { chain: false }) => return Some(self.commit_held(single)),
            _ if failed => {
                return Some(self.aborted(tag, single.unnamed, out));
            }
            _ => {}
        }
        let [analysis] = analyses else {
            return Some(self.leave_held(out));
        };
        if full {
            return Some(self.leave_held(out));
        }
        let Ok((table, mut converted)) = self.deferrable(analysis, single.bound, out) else {
            return Some(self.leave_held(out));
        };
        let returning = converted.returning.take();
        let Some(w) = self.writes.clone() else {
            return Some(self.leave_held(out));
        };
        let replay: Option<Vec<String>> = {
            let set = w.tables();
            set.deferring(&table).and_then(|t| {
                let meta = &t.meta;
                converted
                    .ops
                    .iter()
                    .map(|op| spillway_policies::writes::replay::statement(op, meta).ok())
                    .collect()
            })
        };
        let Some(replay) = replay else {
            return Some(self.leave_held(out));
        };
        let stmt = TxStatement { table, converted };
        let mut stmts = held.stmts.clone();
        stmts.push(stmt.clone());
        let mut known = held.known.clone();
        let slot: Slot<(Applied, Known)> = Arc::new(Mutex::new(None));
        let wait = Wait::Statement {
            slot: slot.clone(),
            stmt: Box::new(stmt),
            replay,
            before: single.before,
            after: single.after,
            unnamed: single.unnamed,
            returning,
        };
        // Answered at once when nothing needs PostgreSQL (the usual case: privileges
        // known, keys in the overlay or read before, or row_counts = "assumed").
        if let Some(r) = w.preview_now(&self.user, &stmts, &known) {
            put(&slot, r.map(|a| (a, known)));
            return self.resume_held(wait, tag, out);
        }
        let user = self.user.clone();
        self.wait = Some(Box::pin(async move {
            let r = w.preview(&user, &stmts, &mut known).await;
            put(&slot, r.map(|a| (a, known)));
        }));
        self.waiting = Some(Waiting::Held(wait));
        Some(Disposition::Blocked)
    }

    /// The held cycle only prepares, describes or closes statements: PostgreSQL answers
    /// it the same outside the transaction, so it may go upstream as it is.
    fn neutral_cycle(&self) -> bool {
        !self.held.is_empty()
            && self.held.iter().all(|m| match m[0] {
                frontend::PARSE | frontend::CLOSE => true,
                frontend::DESCRIBE => {
                    frontend::target(frontend::body(m)).is_some_and(|t| t.kind == b'S')
                }
                _ => false,
            })
    }

    /// Every Parse held parses COMMIT or ROLLBACK (allowed in a failed transaction).
    fn prepares_only_exits(&self) -> bool {
        self.held
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
    pub(super) fn held_cycle_answer(&mut self, step: &super::tracker::Step) -> Option<u8> {
        if self.held_cycles.is_empty() {
            return None;
        }
        if step.error {
            self.held_cycle_failed = true;
        }
        let id = step.ready_id?;
        if self.held_cycles.front() != Some(&id) {
            return None;
        }
        self.held_cycles.pop_front();
        let failed = std::mem::take(&mut self.held_cycle_failed);
        match self.held_tx.as_mut() {
            Some(h) => {
                h.failed |= failed;
                Some(if h.failed { b'E' } else { b'T' })
            }
            None => None,
        }
    }

    /// Starts COMMIT of the held transaction: its statements as one record.
    fn commit_held(&mut self, single: super::deferred::Single<'_>) -> Disposition {
        let (Some(held), Some(w)) = (self.held_tx.as_ref(), self.writes.clone()) else {
            return Disposition::Consumed;
        };
        let stmts = held.stmts.clone();
        let expected = held.applied.clone();
        // Keys are read again if a write that does not pass through the key overlay
        // (another session's write-through write, DDL, unknown side effects) was sent
        // since the transaction read them. Writes of other applications are not seen:
        // the same window an autocommit deferred write has after its point read.
        let now = w.outside_writes();
        let mut known = held.known.clone();
        known.retain(|_, (_, _, outside)| *outside == now);
        let slot: Slot<TxOutcome> = Arc::new(Mutex::new(None));
        let fut_slot = slot.clone();
        let user = self.user.clone();
        self.wait = Some(Box::pin(async move {
            let r = w.defer_tx(&user, stmts, Some(expected), known).await;
            put(&fut_slot, r);
        }));
        self.waiting = Some(Waiting::Held(Wait::Commit {
            slot,
            before: single.before,
            after: single.after,
            unnamed: single.unnamed,
        }));
        Disposition::Blocked
    }

    /// A re-offered message after a held transaction's wait.
    pub(super) fn resume_held(
        &mut self,
        wait: Wait,
        tag: u8,
        out: &mut Out<'_>,
    ) -> Option<Disposition> {
        match wait {
            Wait::Statement {
                slot,
                stmt,
                replay,
                before,
                after,
                unnamed,
                returning,
            } => match take(&slot) {
                Some(Ok((applied, known))) => {
                    let flags = applied.last().cloned().unwrap_or_default();
                    let rows = flags.iter().filter(|a| **a).count();
                    let verb = stmt.converted.verb;
                    if let Some(held) = self.held_tx.as_mut() {
                        held.ops += replay.len();
                        held.bytes += replay.iter().map(String::len).sum::<usize>();
                        held.stmts.push(*stmt);
                        held.replay.push((replay, verb));
                        held.applied.push(flags);
                        held.known = known;
                    }
                    let before = returning::answers(
                        returning.as_ref(),
                        before,
                        tag == frontend::SYNC,
                        Some(rows),
                    );
                    Some(self.answer_held(
                        tag,
                        before,
                        &with_after(&frontend::command_complete(&verb.tag(rows)), &after),
                        b'T',
                        unnamed,
                        out,
                    ))
                }
                // The role may not write it, or a reload took its table off deferral:
                // the statement runs upstream, where PostgreSQL answers it.
                Some(Err(DeferError::NotPermitted { .. } | DeferError::NotDeferred(_))) | None => {
                    Some(self.leave_held(out))
                }
                Some(Err(e)) => {
                    if let Some(held) = self.held_tx.as_mut() {
                        held.failed = true;
                    }
                    let before =
                        returning::answers(returning.as_ref(), before, tag == frontend::SYNC, None);
                    Some(self.held_error(tag, &e, before, unnamed, b'E', out))
                }
            },
            Wait::Commit {
                slot,
                before,
                after,
                unnamed,
            } => match take(&slot) {
                Some(Ok(outcome)) => {
                    ended("committed");
                    let held = self.held_tx.take();
                    if let (Some(held), Some(seq)) = (&held, outcome.seq) {
                        self.note_committed(held, seq);
                    }
                    Some(self.answer_held(
                        tag,
                        before,
                        &with_after(&frontend::command_complete("COMMIT"), &after),
                        b'I',
                        unnamed,
                        out,
                    ))
                }
                Some(Err(DeferError::NotPermitted { .. } | DeferError::NotDeferred(_))) | None => {
                    Some(self.leave_held(out))
                }
                // A table full with `when_full = "write-through"`: the transaction is
                // committed upstream instead.
                Some(Err(DeferError::Full { table, .. })) if self.overflows_upstream(&table) => {
                    Some(self.leave_held(out))
                }
                Some(Err(e)) => {
                    // COMMIT failed: the transaction is over, nothing was written.
                    self.held_tx = None;
                    ended(if matches!(e, DeferError::Diverged(_)) {
                        "diverged"
                    } else {
                        "rolled_back"
                    });
                    Some(self.held_error(tag, &e, before, unnamed, b'I', out))
                }
            },
            Wait::Barrier { slot } => match take(&slot) {
                Some(Ok(())) | None => Some(self.start_replay(out)),
                Some(Err(e)) => {
                    if let Some(held) = self.held_tx.as_mut() {
                        held.failed = true;
                    }
                    Some(self.held_error(tag, &e, BytesMut::new(), None, b'E', out))
                }
            },
            Wait::Replaying => self.replayed(out),
            Wait::RollingBack { error } => Some(self.rolled_back(tag, &error, out)),
        }
    }

    /// Whether `table` runs its writes write-through when full.
    fn overflows_upstream(&self, table: &str) -> bool {
        self.writes.as_ref().is_some_and(|w| {
            w.tables()
                .deferring(table)
                .is_some_and(|t| t.config.when_full == spillway_policies::WhenFull::WriteThrough)
        })
    }

    /// Bookkeeping for a held transaction journaled as record `seq`.
    fn note_committed(&mut self, held: &HeldTx, seq: u64) {
        self.own_seq = self.own_seq.max(seq);
        self.metrics.deferred.record(held.started.elapsed());
        let Some(w) = &self.writes else {
            return;
        };
        let set = w.tables();
        let mut oids = Vec::new();
        for s in &held.stmts {
            if let Some(oid) = set.oid_of(&s.table) {
                oids.push(oid);
            }
            let policy = set
                .deferring(&s.table)
                .map_or("write-behind", |t| t.config.policy.as_str());
            metrics::counter!(
                crate::metrics::CLIENT_WRITES,
                "table" => s.table.clone(),
                "policy" => policy
            )
            .increment(1);
        }
        drop(set);
        self.db.versions.bump_tables(oids);
    }

    /// 25P02 for a statement in a failed held transaction.
    fn aborted(&mut self, tag: u8, unnamed: Option<Arc<Stmt>>, out: &mut Out<'_>) -> Disposition {
        self.held_answer_error(
            tag,
            SqlState::IN_FAILED_SQL_TRANSACTION,
            "current transaction is aborted, commands ignored until end of transaction block",
            None,
            BytesMut::new(),
            unnamed,
            b'E',
            out,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn held_error(
        &mut self,
        tag: u8,
        err: &DeferError,
        before: BytesMut,
        unnamed: Option<Arc<Stmt>>,
        status: u8,
        out: &mut Out<'_>,
    ) -> Disposition {
        let code = match err.sqlstate() {
            "53000" => SqlState::INSUFFICIENT_RESOURCES,
            "23505" => SqlState::UNIQUE_VIOLATION,
            "08006" => SqlState::CONNECTION_FAILURE,
            "40001" => SqlState::SERIALIZATION_FAILURE,
            _ => SqlState::INTERNAL_ERROR,
        };
        let detail = match err {
            DeferError::Duplicate { detail, .. } => Some(detail.as_str()),
            _ => None,
        };
        self.held_answer_error(
            tag,
            code,
            &err.to_string(),
            detail,
            before,
            unnamed,
            status,
            out,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn held_answer_error(
        &mut self,
        tag: u8,
        code: SqlState,
        message: &str,
        detail: Option<&str>,
        before: BytesMut,
        unnamed: Option<Arc<Stmt>>,
        status: u8,
        out: &mut Out<'_>,
    ) -> Disposition {
        let msg = match detail {
            Some(d) => backend::error_response_with_detail(Severity::Error, code, message, d),
            None => backend::error_response(Severity::Error, code, message),
        };
        self.answer_held(tag, before, &msg, status, unnamed, out)
    }

    /// Answers the message `tag` with `before` and `body`: a Query or the Sync ending
    /// an extended cycle also with ReadyForQuery(`status`); any other message (a Flush
    /// or Close that would have gone upstream) only with an error, after which the
    /// cycle's messages are discarded until its Sync, as PostgreSQL does.
    #[allow(clippy::too_many_arguments)]
    fn answer_held(
        &mut self,
        tag: u8,
        before: BytesMut,
        body: &[u8],
        status: u8,
        unnamed: Option<Arc<Stmt>>,
        out: &mut Out<'_>,
    ) -> Disposition {
        out.state.on_frontend(tag);
        out.client.extend_from_slice(&before);
        out.client.extend_from_slice(body);
        match tag {
            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL => {
                let rfq = frontend::ready_for_query(status);
                out.client.extend_from_slice(&rfq);
                out.state.on_backend(rfq[0], &rfq[5..]);
                match tag {
                    frontend::SYNC => self.finish_local_cycle(unnamed),
                    frontend::QUERY => self.forget_unnamed(),
                    _ => {}
                }
            }
            _ => {
                self.held.clear();
                self.held_bytes = 0;
                if let Some(h) = self.held_tx.as_mut() {
                    h.discarding = true;
                }
            }
        }
        self.barrier_passed = false;
        self.no_defer = false;
        Disposition::Consumed
    }

    /// Called first for every frontend message while a transaction is held: `Some`
    /// when the message is answered (or discarded) here, or must wait for the
    /// transaction to move upstream.
    pub(super) fn on_held_frontend(
        &mut self,
        tag: u8,
        msg: &[u8],
        out: &mut Out<'_>,
    ) -> Option<Disposition> {
        let held = self.held_tx.as_ref()?;
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
            frontend::QUERY => self.held.is_empty() && !malformed,
            frontend::SYNC => true,
            // A Flush with nothing held asks for nothing.
            frontend::FLUSH => self.held.is_empty(),
            // PostgreSQL would roll the transaction back: nothing to do.
            b'X' => {
                self.held_tx = None;
                return None;
            }
            _ => false,
        };
        if goes_on {
            if tag == frontend::FLUSH {
                out.state.on_frontend(tag);
                return Some(Disposition::Consumed);
            }
            return None;
        }
        if self.tracker.awaits_answers() {
            // Answered here below: not before the answers still to come.
            let quiet = self.quiet.clone();
            self.wait = Some(Box::pin(async move { quiet.notified().await }));
            return Some(Disposition::Blocked);
        }
        if extended && discarding {
            out.state.on_frontend(tag);
            if tag == frontend::SYNC {
                if let Some(h) = self.held_tx.as_mut() {
                    h.discarding = false;
                }
                let rfq = frontend::ready_for_query(b'E');
                out.client.extend_from_slice(&rfq);
                out.state.on_backend(rfq[0], &rfq[5..]);
            }
            return Some(Disposition::Consumed);
        }
        Some(if failed {
            self.aborted(tag, None, out)
        } else {
            self.leave_held(out)
        })
    }
}
