//! Journaling deferred statements: an autocommit statement alone, or a held client
//! transaction (its statements in order) as one record (SPEC §6); and deciding a held
//! transaction's statement without journaling it ([`Engine::preview`]).
//!
//! Invariants:
//! - The decision and the overlay update happen under one lock, so two sessions
//!   cannot both insert one key; the overlay is undone on the live entries if the
//!   append fails.
//! - Records of one key are journaled in the order they were decided: a deferral
//!   decided against another's reservation (an UPDATE of a key an INSERT in flight
//!   made exist) is appended only once that one is journaled, so its sequence number
//!   is higher and the flusher applies them in that order; if that one gives up (its
//!   reservations undone first), this one is decided again. Deferrals of other keys
//!   are not held up. An answer that journals nothing (23505, or no row changed) but
//!   read such a key waits the same way before it is given.
//! - A transaction is journaled as one record, so the flusher applies it whole, in
//!   one upstream transaction, or not at all.
//! - A held transaction is journaled only if every statement still has the row counts
//!   its client was given ([`DeferError::Diverged`] otherwise): never a silent
//!   divergence.
//! - [`Engine::preview`] decides without reserving or journaling anything.
//! - On a shared log, a record of one key is appended with a compare-and-set on that
//!   key (`Log::append_keyed`); when another instance wrote the key first, the
//!   statement is decided again once its write is in the overlay (so it answers as
//!   PostgreSQL would, 23505 for the second INSERT), and stays in flight meanwhile.
//!
//! The keys and rows a decision reads first, and the lock they are checked under, are
//! `answered.rs`'s.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use super::answered::{indexed, unanswered};
use super::decide::{
    self, Applied, Converted, Decision, Outcome, StoredValues, Tables, TxOutcome, TxStatement,
    exact,
};
use super::guards::{self, Rows};
use super::state::{Known, Reserved, Settlement, Slot, State};
use super::table::Verb;
use super::table_set::InFlight;
use super::{Checks, DeferError, Engine, Log};
use crate::journal::JournalError;
use crate::writes::Record;

/// Appends refused for a conflict before the last one's refusal reaches the client.
const CONFLICT_ATTEMPTS: usize = 200;

/// A deferral's place among the deferrals of its keys (see the module invariants).
struct Order {
    /// Its reservations in the overlay, undone if it fails.
    reserved: Reserved,
    slots: Vec<Slot>,
    /// Deferrals of its keys decided before it and not settled when it was decided.
    earlier: Vec<watch::Receiver<Settlement>>,
    settle: watch::Sender<Settlement>,
    mine: watch::Receiver<Settlement>,
    /// Its operations in `State::deciding` while it is not pending (ADR 0035).
    ticket: Option<u64>,
}

/// Waits for the deferrals `earlier` to settle; false if one of them gave up.
async fn journaled(earlier: &[watch::Receiver<Settlement>]) -> bool {
    for rx in earlier {
        let mut rx = rx.clone();
        match rx.wait_for(|s| *s != Settlement::Appending).await {
            Ok(s) if *s == Settlement::Journaled => {}
            _ => return false,
        }
    }
    true
}

/// The answer a decision gives a client, given what it was told before COMMIT
/// (`expected`, for a held transaction): a changed answer is a divergence, never a
/// silent one.
fn answer(
    decided: Result<Decision, DeferError>,
    expected: Option<&Applied>,
) -> Result<Decision, DeferError> {
    let decision = match decided {
        // The client was told its INSERT succeeded: that no longer holds.
        Err(DeferError::Duplicate { detail, .. }) if expected.is_some() => {
            return Err(DeferError::Diverged(format!(
                "another session wrote the same key before COMMIT ({detail}); \
                 nothing of the transaction was written"
            )));
        }
        other => other?,
    };
    if let Some(expected) = expected
        && *expected != decision.applied
    {
        return Err(DeferError::Diverged(
            "the row counts of the deferred transaction changed before COMMIT \
             (another session wrote the same keys); nothing was written"
                .to_owned(),
        ));
    }
    Ok(decision)
}

impl Order {
    /// Waits for the earlier deferrals of its keys; false if one of them gave up.
    async fn earlier_journaled(&self) -> bool {
        journaled(&self.earlier).await
    }

    /// Settles it, under the state lock: if it failed its reservations are undone
    /// first, so a later deferral that waited for it decides against the overlay
    /// without them.
    fn finish(self, state: &mut State, journaled: bool) {
        if let Some(ticket) = self.ticket {
            state.decided(ticket);
        }
        if !journaled {
            state.unreserve(self.reserved);
        }
        state.settled(self.slots.iter(), &self.mine);
        self.settle.send_replace(if journaled {
            Settlement::Journaled
        } else {
            Settlement::Failed
        });
    }
}

impl<C: Checks, L: Log> Engine<C, L> {
    /// Decides and journals a deferrable statement of role `user` on `table`; returns
    /// once its record is durable and pending (or at once when it writes nothing).
    pub async fn defer<R: Send + Sync>(
        self: &Arc<Self>,
        user: &str,
        table: &str,
        converted: Converted<R>,
    ) -> Result<Outcome, DeferError> {
        let stmt = TxStatement {
            table: table.to_owned(),
            converted,
        };
        let out = self.defer_tx(user, vec![stmt], None, Known::new()).await?;
        let applied = out.applied.into_iter().next().unwrap_or_default();
        Ok(Outcome {
            seq: out.seq,
            rows: applied.iter().filter(|a| **a).count(),
            applied,
            stored: out
                .stored
                .into_iter()
                .filter(|(s, _, _)| *s == 0)
                .map(|(_, op, values)| (op, values))
                .collect(),
        })
    }

    /// The row operations `stmts` would write now, per statement and operation,
    /// without reserving or journaling anything (a held transaction's statement).
    /// `known` keeps the point reads for the next call and for COMMIT.
    pub async fn preview<R: Send + Sync>(
        self: &Arc<Self>,
        user: &str,
        stmts: &[TxStatement<R>],
        known: &mut Known,
    ) -> Result<(Applied, StoredValues), DeferError> {
        if let Some(cause) = self.poisoned.get() {
            return Err(DeferError::Stopped(cause.clone()));
        }
        let tables = self.deferring(stmts)?;
        self.check_privileges(user, stmts, &tables).await?;
        let mut rows = Rows::new();
        let (state, indexed) = self.lock_answered(stmts, &tables, known, &mut rows).await?;
        decide::decide_preview(&state, &indexed, stmts, &tables, known, &rows)
    }

    /// [`Self::preview`] without waiting: `None` when it would need PostgreSQL (a
    /// privilege or a key it has no answer for), so the caller awaits `preview`.
    pub fn preview_now<R>(
        &self,
        user: &str,
        stmts: &[TxStatement<R>],
        known: &Known,
    ) -> Option<Result<(Applied, StoredValues), DeferError>> {
        if let Some(cause) = self.poisoned.get() {
            return Some(Err(DeferError::Stopped(cause.clone())));
        }
        let tables = match self.deferring(stmts) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        for s in stmts {
            let t = tables.get(&s.table)?;
            for verb in s.converted.verbs() {
                if !self.permitted_now(user, t, verb)? {
                    return None;
                }
            }
        }
        // A guarded write reads its row first (ADR 0035).
        if guards::any_guard(stmts.iter().flat_map(|s| s.converted.ops.iter()))
            || stmts.iter().any(|s| !s.converted.stored.is_empty())
        {
            return None;
        }
        let state = self.state();
        let indexed = indexed(&state, &self.keys, stmts, &tables);
        if !unanswered(&state, &indexed, stmts, &tables, known).is_empty() {
            return None;
        }
        Some(decide::decide_preview(
            &state,
            &indexed,
            stmts,
            &tables,
            known,
            &Rows::new(),
        ))
    }

    /// Decides and journals `stmts` as one record (a held transaction at COMMIT, or
    /// one autocommit statement). `expected`: the answers the client was given; the
    /// record is journaled only if the decision now is the same.
    pub async fn defer_tx<R: Send + Sync>(
        self: &Arc<Self>,
        user: &str,
        stmts: Vec<TxStatement<R>>,
        expected: Option<Applied>,
        mut known: Known,
    ) -> Result<TxOutcome, DeferError> {
        if let Some(cause) = self.poisoned.get() {
            return Err(DeferError::Stopped(cause.clone()));
        }
        // Counted in flight until its record is pending: a reload that moves a table
        // off deferral waits for it before it flushes the table.
        let mut inflight: Vec<InFlight<C, L>> = Vec::new();
        let mut tables: Tables = HashMap::new();
        for s in &stmts {
            if !tables.contains_key(&s.table) {
                let (t, guard) = self.enter(&s.table)?;
                tables.insert(s.table.clone(), t);
                inflight.push(guard);
            }
        }
        self.check_privileges(user, &stmts, &tables).await?;
        for t in tables.values() {
            self.wait_for_room(t).await?;
        }
        // A shared log refuses an append whose key another instance wrote meanwhile
        // (`JournalError::Conflict`, after the log caught up with that write): decided
        // again, with the other write in the overlay now.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let step = {
                // Guarded writes' rows are read again for each decision: COMMIT
                // re-checks against what they are now.
                let mut rows = Rows::new();
                let (mut state, indexed) = self
                    .lock_answered(&stmts, &tables, &mut known, &mut rows)
                    .await?;
                let decided = decide::decide(&state, &indexed, &stmts, &tables, &known, &rows)
                    .and_then(decide::final_decision);
                // An answer that journals nothing (an error, or no row changed) may rest
                // on a key another deferral reserved and has not journaled: it is given
                // once that one is durable, or decided again if it gave up.
                let read = match &decided {
                    Ok(d) if !d.ops.is_empty() => Vec::new(),
                    _ => state.unsettled(stmts.iter().flat_map(|s| {
                        s.converted
                            .keys
                            .iter()
                            .map(|k| (s.table.clone(), k.clone()))
                    })),
                };
                if !read.is_empty() {
                    Err((read, decided))
                } else {
                    let decision = answer(decided, expected.as_ref())?;
                    let (settle, mine) = watch::channel(Settlement::Appending);
                    let (reserved, earlier) = if decision.ops.is_empty() {
                        (Vec::new(), Vec::new())
                    } else {
                        let reserved = state.reserve(&decision.after);
                        (reserved, state.order_after(&decision.after, &mine))
                    };
                    let ticket =
                        (!decision.ops.is_empty()).then(|| state.deciding(decision.ops.clone()));
                    let order = Order {
                        reserved,
                        slots: decision.after.keys().cloned().collect(),
                        earlier,
                        settle,
                        mine,
                        ticket,
                    };
                    // One key: the log may compare-and-set on it (`Log::append_keyed`),
                    // against what it had of the key when the decision was taken.
                    let key = match decision.after.keys().collect::<Vec<_>>().as_slice() {
                        [(table, key)] => {
                            let key = format!("{table}\u{0}{}", key.join("\u{0}"));
                            let mark = self.log.key_mark(&key);
                            Some((key, mark))
                        }
                        _ => None,
                    };
                    drop(state);
                    Ok((decision, order, key))
                }
            };
            let (decision, order, key) = match step {
                Ok(go) => go,
                Err((read, decided)) => {
                    if !journaled(&read).await {
                        if attempt < CONFLICT_ATTEMPTS {
                            continue;
                        }
                        return Err(DeferError::Journal(JournalError::Conflict(
                            "earlier writes of the same key were not journaled".to_owned(),
                        )));
                    }
                    let decision = answer(decided, expected.as_ref())?;
                    return Ok(TxOutcome {
                        seq: None,
                        applied: decision.applied,
                        stored: decision.stored,
                    });
                }
            };
            if decision.ops.is_empty() {
                return Ok(TxOutcome {
                    seq: None,
                    applied: decision.applied,
                    stored: decision.stored,
                });
            }
            let mut assumed: Vec<String> = tables
                .values()
                .filter(|t| !exact(t))
                .map(|t| t.meta.name.clone())
                .collect();
            assumed.sort_unstable();
            let stored_values = decision.stored;
            let record = Record { ops: decision.ops };
            let (result, back) = self.append(record, inflight, assumed, key, order).await;
            match (result, back) {
                (Err(DeferError::Journal(JournalError::Conflict(_))), Some(back))
                    if attempt < CONFLICT_ATTEMPTS =>
                {
                    inflight = back;
                }
                (result, _) => {
                    return Ok(TxOutcome {
                        seq: Some(result?),
                        applied: decision.applied,
                        stored: stored_values,
                    });
                }
            }
        }
    }

    /// Journals `record` after the deferrals of its keys decided before it (`order`);
    /// returns once it is durable and pending. A refused append (a conflict, or an
    /// earlier deferral of its keys that gave up) hands `inflight` back for the next
    /// attempt. Its reservations are undone, if it fails, before it settles.
    async fn append(
        self: &Arc<Self>,
        record: Record,
        inflight: Vec<InFlight<C, L>>,
        assumed: Vec<String>,
        key: Option<(String, u64)>,
        order: Order,
    ) -> (Result<u64, DeferError>, Option<Vec<InFlight<C, L>>>) {
        let payload = match record.encode() {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                order.finish(&mut self.state(), false);
                return (Err(DeferError::Encode(e.to_string())), None);
            }
        };
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        let record = Arc::new(record);
        // Spawned: see the module invariants of `engine`.
        tokio::spawn(async move {
            let result = if order.earlier_journaled().await {
                this.log.append_keyed(payload, key).await
            } else {
                Err(JournalError::Conflict(
                    "an earlier write of the same key was not journaled".to_owned(),
                ))
            };
            let mut state = this.state();
            if let Ok(seq) = result {
                // Under the lock that makes the record pending: the flusher never sees
                // it without knowing how it was acknowledged.
                for table in assumed {
                    let at = state.assumed_through.entry(table).or_default();
                    *at = (*at).max(seq);
                }
                // A shared log's follower may have made it pending already.
                if !state.pending.contains_key(&seq) {
                    state.note_pending(seq, record.clone());
                    state.watches.note(seq, &record, |op| this.key_of(op));
                }
            }
            order.finish(&mut state, result.is_ok());
            drop(state);
            if result.is_ok() && this.until_due().is_zero() {
                this.wake.notify_one();
            }
            // Pending (or failed) now, whether or not the client still waits; a
            // conflict's caller decides again, still in flight.
            let back = matches!(result, Err(JournalError::Conflict(_))).then_some(inflight);
            let _ = tx.send((result, back));
        });
        match rx.await {
            Ok((result, back)) => (result.map_err(DeferError::from), back),
            Err(_) => (
                Err(DeferError::Stopped("journal task ended".to_owned())),
                None,
            ),
        }
    }

    /// The deferred tables of `stmts` now, or the first that is not deferred.
    fn deferring<R>(&self, stmts: &[TxStatement<R>]) -> Result<Tables, DeferError> {
        let set = self.tables.load();
        let mut tables = HashMap::new();
        for s in stmts {
            let t = set
                .deferring(&s.table)
                .ok_or_else(|| DeferError::NotDeferred(s.table.clone()))?;
            tables.insert(s.table.clone(), t.clone());
        }
        Ok(tables)
    }

    async fn check_privileges<R>(
        &self,
        user: &str,
        stmts: &[TxStatement<R>],
        tables: &Tables,
    ) -> Result<(), DeferError> {
        let mut checked: Vec<(&str, Verb)> = Vec::new();
        for s in stmts {
            for verb in s.converted.verbs() {
                if checked.contains(&(s.table.as_str(), verb)) {
                    continue;
                }
                let t = tables
                    .get(&s.table)
                    .ok_or_else(|| DeferError::NotDeferred(s.table.clone()))?;
                if !self.permitted(user, t, verb).await? {
                    return Err(DeferError::NotPermitted {
                        user: user.to_owned(),
                        table: s.table.clone(),
                        verb,
                    });
                }
                checked.push((s.table.as_str(), verb));
            }
        }
        Ok(())
    }
}
