//! Pipelined cycles with several Executes (issue 13, point 4): psycopg's `executemany`
//! sends one Parse, then Bind/Execute per row, then one Sync, which PostgreSQL runs as
//! one implicit transaction. When every Execute is a deferrable write on a deferred
//! table, in autocommit, the cycle is decided and journaled as one record (the engine's
//! `defer_tx`, as a held transaction's COMMIT), and each Execute is answered with its
//! own row count and RETURNING rows, in PostgreSQL's order; else the whole cycle goes
//! upstream (after its barrier), each write counted with its own fallback reason.
//!
//! Invariants:
//! - All or nothing, as PostgreSQL's implicit transaction: one record for the cycle;
//!   any refusal (a duplicate key, a full table, PostgreSQL unreachable for a check)
//!   journals nothing and sends the whole cycle upstream, where PostgreSQL answers it
//!   as it would have directly.
//! - Each write of a cycle is counted once: deferred, or a fallback with its reason
//!   (`pipelined` for those that were deferrable but went upstream with the others).
//! - Nothing here changes the session's state beyond the cycle: no permanent fallback.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use super::answer::{Answer, Reply};
use super::deferred::{note_fallback, written_tables};
use super::statements::Stmt;
use super::wait::{Held, HeldPipeline, PipelineAck, Resume, Wait};
use super::{Caching, Disposition};
use crate::session::state::Outbox;
use crate::write::convert::Bound;
use crate::write::fallbacks::Fallback;
use crate::write::service::TxStatement;

/// One Execute of a pipelined cycle: its statement, its parameters, and the answers
/// that precede its command tag (BindComplete, NoData…, a CloseComplete of the
/// previous portal).
pub struct Exec {
    pub stmt: Arc<Stmt>,
    pub bound: Bound,
    pub before: BytesMut,
}

/// A pipelined cycle held to its Sync.
pub struct Pipeline {
    pub execs: Vec<Exec>,
    /// Answers after the last command tag (a CloseComplete).
    pub after: BytesMut,
    /// The unnamed statement the cycle parsed.
    pub parsed: Option<Arc<Stmt>>,
}

/// What became of a pipelined cycle at its Sync.
pub enum Routed {
    /// Journaled (the Sync waits for the acknowledgement), or waiting for answers
    /// owed before it.
    Here(Disposition),
    /// It goes upstream; its writes are counted.
    Counted,
    /// Not one spillway decides: the usual routing (and counting) goes on.
    Elsewhere,
}

impl Caching {
    /// Decides a pipelined cycle of deferrable writes at its Sync.
    pub(super) fn route_pipeline(&mut self, pipeline: Pipeline, out: &mut Outbox) -> Routed {
        let Some(w) = self.writes.as_ref().map(|d| d.service.clone()) else {
            return Routed::Elsewhere;
        };
        if self.tx.held.is_some() || self.wait.write_through() || self.wait.passed_barrier() {
            return Routed::Elsewhere;
        }
        // Behind requests still unanswered, whether it runs in autocommit is not known
        // yet: wait for their answers.
        if self.tracker.awaits_answers() {
            self.wait = Wait::quiet(&self.quiet, self.wait.carry());
            return Routed::Here(Disposition::Blocked);
        }
        let mut stmts = Vec::with_capacity(pipeline.execs.len());
        let mut answers = Vec::with_capacity(pipeline.execs.len());
        let mut reasons: Vec<Option<Fallback>> = Vec::with_capacity(pipeline.execs.len());
        // One implicit transaction, one now() for all its writes.
        self.tx.cycle_began = Some(std::time::SystemTime::now());
        for e in &pipeline.execs {
            match self.deferrable(&e.stmt.analysis, &e.bound, out) {
                // A RETURNING that needs the zone's rules is not answered in a
                // pipeline (its answers are sent without waiting for PostgreSQL).
                Ok((_, converted))
                    if converted
                        .returning
                        .as_ref()
                        .is_some_and(|r| r.needs_zone() || r.needs_row()) =>
                {
                    reasons.push(Some(crate::write::returning::UNKNOWN));
                }
                Ok((table, mut converted)) => {
                    let answer = Answer {
                        before: e.before.clone(),
                        after: BytesMut::new(),
                        extended: true,
                        unnamed: None,
                        returning: converted.returning.take(),
                    };
                    answers.push((converted.verb, answer));
                    stmts.push(TxStatement { table, converted });
                    reasons.push(None);
                }
                Err(reason) => reasons.push(Some(reason)),
            }
        }
        self.tx.cycle_began = None;
        if reasons.iter().any(Option::is_some) {
            for (e, reason) in pipeline.execs.iter().zip(&reasons) {
                let reason = reason.unwrap_or(Fallback::Pipelined);
                for table in written_tables(self, &w, &e.stmt.analysis) {
                    note_fallback(&w, &table, reason);
                }
            }
            return Routed::Counted;
        }
        let set = w.tables();
        let tables: Vec<(String, &'static str)> = stmts
            .iter()
            .map(|s| {
                let policy = set
                    .deferring(&s.table)
                    .map_or("write-behind", |t| t.config.policy.as_str());
                (s.table.clone(), policy)
            })
            .collect();
        drop(set);
        let user = self
            .writes
            .as_ref()
            .map(|d| d.user.clone())
            .unwrap_or_default();
        let started = Instant::now();
        let (after, parsed) = (pipeline.after, pipeline.parsed);
        self.wait = Wait::on(async move {
            let outcome = w.defer_tx(&user, stmts, None, Default::default()).await;
            Resume::Pipeline(Box::new(PipelineAck {
                outcome,
                answers,
                tables,
                after,
                parsed,
                started,
            }))
        });
        Routed::Here(Disposition::Blocked)
    }

    /// A pipelined cycle inside a held transaction: its statements join the
    /// transaction (decided with its earlier ones, as `hold_statement` decides one), or
    /// the transaction moves upstream and PostgreSQL answers the cycle.
    pub(super) fn hold_pipeline(&mut self, pipeline: Pipeline, out: &mut Outbox) -> Disposition {
        use super::held::{MAX_HELD_BYTES, MAX_HELD_OPS, MAX_HELD_STATEMENTS};
        if self.tracker.awaits_answers() {
            self.wait = Wait::quiet(&self.quiet, self.wait.carry());
            return Disposition::Blocked;
        }
        let (Some(held), Some(d)) = (self.tx.held.as_ref(), self.writes.as_ref()) else {
            return Disposition::Consumed;
        };
        let (w, user) = (d.service.clone(), d.user.clone());
        if held.stmts.len() + pipeline.execs.len() > MAX_HELD_STATEMENTS
            || held.ops >= MAX_HELD_OPS
            || held.bytes >= MAX_HELD_BYTES
        {
            return self.leave_held(out);
        }
        let mut added = Vec::with_capacity(pipeline.execs.len());
        for e in &pipeline.execs {
            let Ok((table, mut converted)) = self.deferrable(&e.stmt.analysis, &e.bound, out)
            else {
                return self.leave_held(out);
            };
            if converted
                .returning
                .as_ref()
                .is_some_and(|r| r.needs_zone() || r.needs_row())
            {
                return self.leave_held(out);
            }
            let replay: Option<Vec<String>> = w
                .tables()
                .deferring(&table)
                .and_then(|t| crate::write::convert::replay(&converted, &t.meta));
            let Some(replay) = replay else {
                return self.leave_held(out);
            };
            let answer = Answer {
                before: e.before.clone(),
                after: BytesMut::new(),
                extended: true,
                unnamed: None,
                returning: converted.returning.take(),
            };
            added.push((TxStatement { table, converted }, replay, answer));
        }
        let Some(held) = self.tx.held.as_ref() else {
            return Disposition::Consumed;
        };
        let mut stmts = held.stmts.clone();
        stmts.extend(added.iter().map(|(s, _, _)| s.clone()));
        let mut known = held.known.clone();
        let (after, parsed) = (pipeline.after, pipeline.parsed);
        if let Some(r) = w.preview_now(&user, &stmts, &known) {
            let step = HeldPipeline {
                outcome: r.map(|(a, _)| (a, known)),
                stmts: added,
                after,
                parsed,
            };
            return self.held_pipeline_decided(step, out);
        }
        self.wait = Wait::on(async move {
            let outcome = w
                .preview(&user, &stmts, &mut known)
                .await
                .map(|(a, _)| (a, known));
            Resume::Held(Box::new(Held::Pipeline(Box::new(HeldPipeline {
                outcome,
                stmts: added,
                after,
                parsed,
            }))))
        });
        Disposition::Blocked
    }

    /// A held pipelined cycle decided: every Execute answered and joined to the
    /// transaction; a refusal moves the transaction upstream, where PostgreSQL
    /// answers the cycle (the Executes before a duplicate key, then its error).
    pub(super) fn held_pipeline_decided(
        &mut self,
        step: HeldPipeline,
        out: &mut Outbox,
    ) -> Disposition {
        let (applied, known) = match step.outcome {
            Ok(decided) => decided,
            Err(_) => return self.leave_held(out),
        };
        let Some(held) = self.tx.held.as_mut() else {
            return Disposition::Consumed;
        };
        let base = held.stmts.len();
        let mut answers = Vec::with_capacity(step.stmts.len());
        for (i, (stmt, replay, answer)) in step.stmts.into_iter().enumerate() {
            let flags = applied.get(base + i).cloned().unwrap_or_default();
            let verb = stmt.converted.verb;
            answers.push((verb, flags.iter().filter(|a| **a).count(), answer));
            held.ops += replay.len();
            held.bytes += replay.iter().map(String::len).sum::<usize>();
            held.stmts.push(stmt);
            held.replay.push((replay, verb));
            held.applied.push(flags);
        }
        held.known = known;
        for (verb, rows, answer) in answers {
            let tag = verb.tag(rows);
            answer.send_unsynced(Reply::Done { tag: &tag, rows }, out);
        }
        out.answer(&step.after);
        out.ready(b'T');
        self.finish_cycle(step.parsed);
        Disposition::Consumed
    }

    /// The journal's answer to a pipelined cycle: every Execute answered, or (`None`)
    /// the whole cycle runs upstream after all.
    pub(super) fn pipeline_acknowledged(
        &mut self,
        ack: PipelineAck,
        out: &mut Outbox,
    ) -> Option<Disposition> {
        let outcome = match ack.outcome {
            Ok(outcome) => outcome,
            // Nothing was journaled: PostgreSQL answers the cycle (a duplicate key's
            // error after the Executes before it, as it would directly).
            Err(_) => {
                self.wait = Wait::Resumed(Resume::WriteThrough);
                return None;
            }
        };
        self.timing.metrics.deferred.record(ack.started.elapsed());
        let mut oids = Vec::new();
        if let Some(d) = self.writes.as_mut() {
            if let Some(seq) = outcome.seq {
                d.own_seq = d.own_seq.max(seq);
            }
            let set = d.service.tables();
            for (table, policy) in &ack.tables {
                oids.extend(set.oid_of(table));
                metrics::counter!(
                    crate::metrics::CLIENT_WRITES,
                    "table" => table.clone(),
                    "policy" => *policy
                )
                .increment(1);
            }
        }
        if outcome.seq.is_some() {
            self.db.versions.bump_tables(oids);
        }
        for (i, (verb, answer)) in ack.answers.into_iter().enumerate() {
            let rows = outcome
                .applied
                .get(i)
                .map_or(0, |ops| ops.iter().filter(|a| **a).count());
            let tag = verb.tag(rows);
            answer.send_unsynced(Reply::Done { tag: &tag, rows }, out);
        }
        out.answer(&ack.after);
        out.ready(out.tx_status());
        self.finish_cycle(ack.parsed);
        Some(Disposition::Consumed)
    }
}

/// A pipelined cycle as `route_cycle` reads its held messages: every Bind on the
/// unnamed portal with its parameters, each followed by an Execute; anything else
/// breaks it.
#[derive(Default)]
pub struct Builder {
    broken: bool,
    execs: Vec<Exec>,
    /// Answers since the last Execute.
    acc: BytesMut,
    /// The portal bound and not yet executed.
    cur: Option<(Arc<Stmt>, Bound)>,
}

impl Builder {
    /// A message it cannot be part of.
    pub fn break_off(&mut self) {
        self.broken = true;
    }

    /// An answer spillway gives before the next command tag (ParseComplete…).
    pub fn answer(&mut self, bytes: &[u8]) {
        self.acc.extend_from_slice(bytes);
    }

    /// A Bind of the unnamed portal, answered with `complete` (BindComplete).
    pub fn bind(&mut self, stmt: Arc<Stmt>, bound: Bound, complete: &[u8]) {
        if self.cur.is_some() {
            self.broken = true;
        }
        self.cur = Some((stmt, bound));
        self.acc.extend_from_slice(complete);
    }

    /// A Describe of the bound portal, answered with `no_data`.
    pub fn describe_portal(&mut self, no_data: &[u8]) {
        if self.cur.is_none() {
            self.broken = true;
        }
        self.acc.extend_from_slice(no_data);
    }

    /// An Execute of the bound portal.
    pub fn execute(&mut self, max_rows: i32) {
        match self.cur.take() {
            Some((stmt, mut bound)) => {
                bound.max_rows = max_rows;
                self.execs.push(Exec {
                    stmt,
                    bound,
                    before: std::mem::take(&mut self.acc),
                });
            }
            None => self.broken = true,
        }
    }

    /// The cycle, if it is a pipeline of at least two Executes.
    pub fn finish(self, parsed: Option<Arc<Stmt>>) -> Option<Pipeline> {
        (!self.broken && self.cur.is_none() && self.execs.len() >= 2).then(|| Pipeline {
            execs: self.execs,
            after: self.acc,
            parsed,
        })
    }
}
