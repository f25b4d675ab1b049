//! The flush worker's loop: waits until a flush is due (`due.rs`), takes the next
//! contiguous run of durable pending records, applies it through the [`Sink`] in one
//! upstream transaction with the ledger compare-and-set, and only then advances
//! `applied` and lets the journal go of the records. Each batch runs in a
//! `flush_batch` tracing span whose fields (records, rows, statements, through) say
//! what it applied.
//!
//! Invariants (see the parent module): a contiguous prefix only, never past a gap,
//! `durable_seq` or a write an overlaid read holds (`overlay.rs`), whole records (a client transaction is never split), up to
//! `flush.batch_size` operations unless one record alone is larger; transient
//! failures are retried with back-off (doubling from [`MIN_BACKOFF`] up to
//! [`MAX_BACKOFF`]), and after one the ledger is read again before anything else is
//! applied; a fenced ledger or an unplannable record poisons the engine.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::state::Applied;
use super::upstream::{ApplyError, Batch, LedgerKey, Sink};
use super::{Checks, Engine, Log};
use crate::writes::{Record, TableMeta};

/// First pause after a transient failure.
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between retries of a batch that failed transiently.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a due flush looks again when its next record is still completing its
/// append (a gap), and when the journal is poisoned (the gap never closes).
const GAP_POLL: Duration = Duration::from_millis(5);
const POISONED_POLL: Duration = Duration::from_millis(200);

/// The retry state of the loop.
struct Retry {
    backoff: Duration,
    /// After a transient failure the batch may have committed unseen (the answer to
    /// its COMMIT lost): the next connection, whenever it comes, asks the ledger
    /// before anything is applied again.
    unsure: bool,
}

impl Retry {
    /// Sleeps the back-off (doubling it up to [`MAX_BACKOFF`]); true when shutting
    /// down.
    async fn pause(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = tokio::time::sleep(self.backoff) => {}
            () = shutdown.cancelled() => return true,
        }
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        false
    }
}

impl<C: Checks, L: Log> Engine<C, L> {
    /// The flush worker: runs until `shutdown`, then drains what it can (the caller
    /// bounds that; the rest stays journaled for the next start). `on_applied` gets
    /// the tables of every applied batch before its barrier opens.
    pub async fn run_flusher<S: Sink>(
        self: Arc<Self>,
        mut sink: S,
        shutdown: CancellationToken,
        on_applied: impl Fn(&Applied),
    ) {
        let ledger = self.ledger_key();
        let mut retry = Retry {
            backoff: MIN_BACKOFF,
            unsure: false,
        };
        loop {
            let Some(batch) = self.next_due(&shutdown).await else {
                return;
            };
            if let Err(err) = sink.connect().await {
                tracing::warn!(%err, retry_in = ?retry.backoff, "flush worker cannot connect upstream");
                if retry.pause(&shutdown).await {
                    return;
                }
                continue;
            }
            let result = if retry.unsure {
                // The batch is taken again from what is applied afterwards.
                self.reread_ledger(&mut sink, &ledger, &on_applied)
                    .await
                    .map(|()| retry.unsure = false)
            } else {
                self.flush(&mut sink, &ledger, &batch, &on_applied, retry.backoff)
                    .await
                    .map(|()| retry.backoff = MIN_BACKOFF)
            };
            match result {
                Ok(()) => {}
                Err(ApplyError::Transient(_)) => {
                    sink.disconnect();
                    retry.unsure = true;
                    if retry.pause(&shutdown).await {
                        return;
                    }
                }
                Err(err) => {
                    tracing::error!(%err, "flush worker stopped");
                    let _ = self.poisoned.set(err.to_string());
                    return;
                }
            }
        }
    }

    /// Waits until a flush is due and a batch is ready; `None` once shutting down with
    /// nothing left that can be applied.
    async fn next_due(&self, shutdown: &CancellationToken) -> Option<Vec<(u64, Arc<Record>)>> {
        loop {
            let wait = if shutdown.is_cancelled() {
                Duration::ZERO
            } else {
                self.until_due()
            };
            if wait.is_zero() {
                let batch = self.next_batch();
                if !batch.is_empty() {
                    return Some(batch);
                }
            }
            if shutdown.is_cancelled() {
                return None;
            }
            // Due but nothing contiguous and durable yet: an append is completing (or
            // never will: a poisoned journal leaves a gap, polled slowly).
            let wait = match (wait.is_zero(), self.log.is_poisoned()) {
                (true, true) => POISONED_POLL,
                (true, false) => GAP_POLL,
                (false, _) => wait,
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
                () = shutdown.cancelled() => {}
            }
        }
    }

    /// After an unknown outcome: reads the ledger on a new connection, and counts as
    /// applied what it says was.
    async fn reread_ledger<S: Sink>(
        &self,
        sink: &mut S,
        ledger: &LedgerKey,
        on_applied: &impl Fn(&Applied),
    ) -> Result<(), ApplyError> {
        let at = match sink.claim(ledger).await {
            Ok(at) => at,
            Err(ApplyError::Transient(err)) => {
                tracing::warn!(%err, "flush worker cannot read the ledger");
                return Err(ApplyError::Transient(err));
            }
            Err(err) => return Err(err),
        };
        if at > self.applied() {
            let batch = self.take_through(at);
            // Which of its records PostgreSQL refused is not known: their keys are
            // unknown to the key index until something settles them.
            self.keys.applied(&batch, None, |op| self.key_of(op));
            self.applied_through(&batch, at, None, on_applied).await;
        }
        Ok(())
    }

    /// Applies `batch` in its `flush_batch` span.
    async fn flush<S: Sink>(
        &self,
        sink: &mut S,
        ledger: &LedgerKey,
        batch: &Batch,
        on_applied: &impl Fn(&Applied),
        retry_in: Duration,
    ) -> Result<(), ApplyError> {
        let applied_through = self.applied();
        let last = batch.last().map_or(applied_through, |(s, _)| *s);
        let started = Instant::now();
        // One span per batch: every line logged while applying it (retries, dead
        // letters, the summary) carries what the batch is.
        let span = tracing::info_span!(
            "flush_batch",
            records = batch.len(),
            from = applied_through + 1,
            through = last,
            rows = tracing::field::Empty,
            statements = tracing::field::Empty,
        );
        // Records of a table that left deferral are planned with the metadata they
        // were journaled under (the set keeps it).
        let tables = self.tables.load_full();
        let metas = self.plan_metas(batch, &tables.metas);
        let result = sink
            .apply(ledger, applied_through, batch, &metas)
            .instrument(span.clone())
            .await;
        drop(tables);
        let done = match result {
            Ok(done) => done,
            Err(ApplyError::Transient(err)) => {
                let _entered = span.enter();
                tracing::warn!(%err, ?retry_in, "flush batch failed; retrying");
                return Err(ApplyError::Transient(err));
            }
            Err(err) => return Err(err),
        };
        {
            let _entered = span.enter();
            span.record("rows", done.rows);
            span.record("statements", done.statements);
            tracing::debug!(
                records = batch.len(), statements = done.statements, rows = done.rows,
                through = last, elapsed = ?started.elapsed(), "flush batch applied"
            );
        }
        // The key index takes the batch's writes before the overlay lets go of them.
        let dead: HashSet<u64> = done.dead_letters.iter().map(|d| d.seq).collect();
        let pinned = self.keys.applied(batch, Some(&dead), |op| self.key_of(op));
        self.applied_through(batch, last, done.xid, on_applied)
            .instrument(span)
            .await;
        if let Some(id) = pinned {
            // After the barrier opened: nobody waits for this round trip.
            match sink.wal_position().await {
                Ok(Some(lsn)) => self.keys.positioned(id, lsn),
                Ok(None) => {}
                Err(err) => {
                    tracing::debug!(%err, "reading the WAL position after a batch");
                    sink.disconnect();
                }
            }
        }
        Ok(())
    }

    /// `batch` is in PostgreSQL through `last`: out of pending, cached reads
    /// invalidated (before the barrier opens: a reader released by `applied` must not
    /// find an entry from before it), `applied` advanced, the journal told. `xid`: the
    /// transaction that applied it, when known.
    async fn applied_through(
        &self,
        batch: &Batch,
        last: u64,
        xid: Option<u64>,
        on_applied: &impl Fn(&Applied),
    ) {
        let mut applied = self.finish(batch);
        applied.xid = xid;
        on_applied(&applied);
        self.applied.send_replace(last);
        if let Err(err) = self.log.confirm(last).await {
            tracing::warn!(%err, "journal truncation after a flush failed");
        }
    }

    /// The planner's table facts for `batch`: write-back folding switched off unless
    /// [`Self::may_fold`] allows it.
    fn plan_metas<'a>(
        &self,
        batch: &Batch,
        metas: &'a HashMap<String, TableMeta>,
    ) -> Cow<'a, HashMap<String, TableMeta>> {
        if self.may_fold(batch) {
            return Cow::Borrowed(metas);
        }
        Cow::Owned(
            metas
                .iter()
                .map(|(n, m)| {
                    let mut m = m.clone();
                    m.coalesce = false;
                    (n.clone(), m)
                })
                .collect(),
        )
    }

    /// The next contiguous run of pending records, whole records, up to
    /// `flush.batch_size` row operations (at least one record). A write-back table's
    /// operations count once per key: they fold into one at flush.
    pub(super) fn next_batch(&self) -> Vec<(u64, Arc<Record>)> {
        let first = self.applied() + 1;
        let durable = self.log.durable_seq();
        let batch_size = self.flush.load().batch_size;
        let tables = self.tables.load();
        let state = self.state();
        let mut out = Vec::new();
        let mut ops = 0;
        let mut folded = HashSet::new();
        // A read with an overlay holds the flush before a write of its row that no
        // overlay can include (`overlay/`).
        let hold_from = state.watches.hold_from().unwrap_or(u64::MAX);
        // Stops at the first gap: a record still completing its append.
        for (expected, (seq, record)) in (first..).zip(state.pending.range(first..)) {
            if *seq != expected || *seq > durable || *seq >= hold_from {
                break;
            }
            let weight = record
                .ops
                .iter()
                .filter(|op| {
                    !tables.coalesces(op.table())
                        || self
                            .key_of(op)
                            .is_none_or(|k| !folded.contains(&(op.table(), k)))
                })
                .count();
            if !out.is_empty() && ops + weight > batch_size {
                break;
            }
            ops += weight;
            for op in record.ops.iter().filter(|op| tables.coalesces(op.table())) {
                if let Some(k) = self.key_of(op) {
                    folded.insert((op.table(), k));
                }
            }
            out.push((*seq, record.clone()));
        }
        out
    }

    /// Whether write-back may fold `batch`: none of its records was replayed at start
    /// or acknowledged with assumed row counts (an INSERT of a key that existed, then a
    /// DELETE, must not cancel out: in order the INSERT is a dead letter).
    fn may_fold(&self, batch: &Batch) -> bool {
        let state = self.state();
        batch.iter().all(|(seq, record)| {
            *seq > state.replayed_through
                && record
                    .tables()
                    .iter()
                    .all(|t| state.assumed_through.get(*t).is_none_or(|at| seq > at))
        })
    }

    /// Pending records up to `seq` (applied by a batch whose commit we did not see).
    fn take_through(&self, seq: u64) -> Vec<(u64, Arc<Record>)> {
        let state = self.state();
        state
            .pending
            .range(..=seq)
            .map(|(s, r)| (*s, r.clone()))
            .collect()
    }

    /// Removes applied records from `pending`; returns the tables and rows they wrote.
    fn finish(&self, batch: &Batch) -> Applied {
        let key_of = |op: &crate::writes::RowOp| self.key_of(op);
        self.state().finish(batch, key_of)
    }
}
