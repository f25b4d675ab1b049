//! A held transaction's steps finishing: a statement decided (answered here, or the
//! transaction moves upstream), COMMIT journaled (or refused: 40001 when an answer no
//! longer holds), the barrier before a replay, the replay and its rollback.
//!
//! Invariants: a step's outcome answers only the message that waited for it; a
//! statement joins the held transaction only with the answer its client gets; after
//! a COMMIT that failed, nothing is held and nothing was journaled.

use super::super::answer::{Answer, Reply, Single, refusal};
use super::super::wait::{Held, Resume, Wait};
use super::super::{Caching, Disposition};
use super::ended;
use crate::session::state::Outbox;
use crate::write::service::DeferError;
use spillway_policies::journal::JournalError;

impl Caching {
    /// Starts COMMIT of the held transaction: its statements as one record.
    pub(super) fn commit_held(&mut self, single: Single<'_>) -> Disposition {
        let (Some(held), Some(d)) = (self.tx.held.as_ref(), self.writes.as_ref()) else {
            return Disposition::Consumed;
        };
        let w = d.service.clone();
        let user = d.user.clone();
        let stmts = held.stmts.clone();
        let expected = held.applied.clone();
        // Keys are read again if a write that does not pass through the key overlay
        // (another session's write-through write, DDL, unknown side effects) was sent
        // since the transaction read them. Writes of other applications are not seen:
        // the same window an autocommit deferred write has after its point read.
        let now = w.outside_writes();
        let mut known = held.known.clone();
        known.retain(|_, (_, _, outside)| *outside == now);
        let answer = single.answer;
        self.wait = Wait::on(async move {
            let outcome = w.defer_tx(&user, stmts, Some(expected), known).await;
            Resume::Held(Box::new(Held::Commit { outcome, answer }))
        });
        Disposition::Blocked
    }

    /// The message offered again after a held transaction's step: `Some` when it is
    /// answered here, `None` to route it on (in the transaction now upstream).
    pub(in super::super) fn resume_held(
        &mut self,
        step: Held,
        tag: u8,
        out: &mut Outbox,
    ) -> Option<Disposition> {
        match step {
            Held::Statement {
                outcome,
                stmt,
                replay,
                answer,
            } => match outcome {
                Ok((applied, stored, known)) => {
                    let mut stmt = stmt;
                    let mut answer = answer;
                    let mut replay = replay;
                    // An upsert's RETURNING of columns it leaves as stored: the values
                    // it was decided with, given now and checked again later (ADR 0038).
                    if !stmt.converted.stored.is_empty() {
                        let last = applied.len().saturating_sub(1);
                        let mine: Vec<(usize, Vec<Option<String>>)> = stored
                            .into_iter()
                            .filter(|(s, _, _)| *s == last)
                            .map(|(_, op, v)| (op, v))
                            .collect();
                        let filled = answer
                            .returning
                            .as_mut()
                            .map_or(Ok(()), |r| r.fill_stored(&mine));
                        // Replayed upstream, if it moves there, only over the values
                        // given (ADR 0038).
                        let checked = self.writes.as_ref().and_then(|d| {
                            let set = d.service.tables();
                            let t = set.deferring(&stmt.table)?;
                            crate::write::convert::replay_told(&stmt.converted, &mine, &t.meta)
                        });
                        let Some(checked) = checked.filter(|_| filled.is_ok()) else {
                            if let Err(e) = filled {
                                tracing::error!(error = %e, "RETURNING of stored values");
                            }
                            return Some(self.leave_held(out));
                        };
                        replay = checked;
                        stmt.converted.told = Some(mine);
                    }
                    let flags = applied.last().cloned().unwrap_or_default();
                    let rows = flags.iter().filter(|a| **a).count();
                    let verb = stmt.converted.verb;
                    if let Some(held) = self.tx.held.as_mut() {
                        held.ops += replay.len();
                        held.bytes += replay.iter().map(String::len).sum::<usize>();
                        held.stmts.push(*stmt);
                        held.replay.push((replay, verb));
                        held.applied.push(flags);
                        held.known = known;
                    }
                    let tag_text = verb.tag(rows);
                    let reply = Reply::Done {
                        tag: &tag_text,
                        rows,
                    };
                    Some(self.answer_held(tag, answer, reply, b'T', out))
                }
                // The role may not write it, or a reload took its table off deferral:
                // the statement runs upstream, where PostgreSQL answers it.
                Err(DeferError::NotPermitted { .. } | DeferError::NotDeferred(_)) => {
                    Some(self.leave_held(out))
                }
                // A guarded write whose row spillway does not know exactly (ADR
                // 0035): the transaction moves upstream, where PostgreSQL decides it
                // (replayed with its guard, checked against the answers given).
                Err(DeferError::RowUnknown(table)) => {
                    super::super::deferred::note_row_unknown(&table);
                    Some(self.leave_held(out))
                }
                Err(e) => {
                    if let Some(held) = self.tx.held.as_mut() {
                        held.failed = true;
                    }
                    Some(self.answer_held(tag, answer, Reply::Error(&refusal(&e)), b'E', out))
                }
            },
            Held::Commit { outcome, answer } => match outcome {
                Ok(outcome) => {
                    ended("committed");
                    let held = self.tx.held.take();
                    if let (Some(held), Some(seq)) = (&held, outcome.seq) {
                        self.note_committed(held, seq);
                    }
                    let reply = Reply::Done {
                        tag: "COMMIT",
                        rows: 0,
                    };
                    Some(self.answer_held(tag, answer, reply, b'I', out))
                }
                Err(DeferError::NotPermitted { .. } | DeferError::NotDeferred(_)) => {
                    Some(self.leave_held(out))
                }
                // A guarded write whose row spillway does not know exactly (ADR
                // 0035): the transaction moves upstream, where PostgreSQL decides it
                // (replayed with its guard, checked against the answers given).
                Err(DeferError::RowUnknown(table)) => {
                    super::super::deferred::note_row_unknown(&table);
                    Some(self.leave_held(out))
                }
                // A table full with `when_full = "write-through"`: the transaction is
                // committed upstream instead.
                Err(DeferError::Full { table, .. }) if self.overflows_upstream(&table) => {
                    Some(self.leave_held(out))
                }
                // The journal or its disk is full and every table the transaction
                // writes says `write-through`.
                Err(e) if e.journal_out_of_room() && self.held_overflows_upstream() => {
                    Some(self.leave_held(out))
                }
                Err(e) => {
                    // COMMIT failed: the transaction is over, nothing was written; or,
                    // when a replicated journal's answer was lost, it may have been.
                    self.tx.held = None;
                    ended(match &e {
                        DeferError::Diverged(_) => "diverged",
                        DeferError::Journal(JournalError::Indeterminate(_)) => "unknown",
                        _ => "rolled_back",
                    });
                    Some(self.answer_held(tag, answer, Reply::Error(&refusal(&e)), b'I', out))
                }
            },
            Held::Barrier(Ok(())) => Some(self.start_replay(out)),
            Held::Barrier(Err(e)) => {
                if let Some(held) = self.tx.held.as_mut() {
                    held.failed = true;
                }
                let reply = Reply::Error(&refusal(&e));
                Some(self.answer_held(tag, Answer::default(), reply, b'E', out))
            }
            Held::Pipeline(step) => Some(self.held_pipeline_decided(*step, out)),
            Held::Replayed => self.replayed(out),
            Held::RolledBack { error } => Some(self.rolled_back(tag, &error, out)),
        }
    }

    /// Whether every table the held transaction writes runs its writes write-through
    /// when full.
    fn held_overflows_upstream(&self) -> bool {
        self.tx
            .held
            .as_ref()
            .is_some_and(|h| h.stmts.iter().all(|s| self.overflows_upstream(&s.table)))
    }

    /// Bookkeeping for a held transaction journaled as record `seq`.
    fn note_committed(&mut self, held: &super::super::tx::HeldTx, seq: u64) {
        self.timing.metrics.deferred.record(held.started.elapsed());
        let Some(d) = self.writes.as_mut() else {
            return;
        };
        d.own_seq = d.own_seq.max(seq);
        let set = d.service.tables();
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
}
