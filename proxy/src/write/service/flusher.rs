//! The flush worker of the [`WriteService`]: picks the next contiguous run of durable
//! pending records, applies it upstream in one transaction with the ledger
//! compare-and-set ([`super::super::apply`]), and only then advances `applied` and
//! truncates the journal. Each batch runs in a `flush_batch` tracing span whose fields
//! (records, rows, statements, through) say what it applied.
//!
//! Invariants (see the parent module): a contiguous prefix only, never past a gap or
//! `durable_seq`; after a transient failure the ledger is read again on a new
//! connection before anything else is applied; a fenced ledger or an unplannable
//! record poisons the service.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spillway_policies::writes::Record;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{FLUSH_APP, FORGOTTEN_LIMIT, MAX_BACKOFF, WriteService, connect_as};
use crate::write::apply::{self, ApplyError, LedgerKey};

impl WriteService {
    /// The flush worker: runs until `shutdown`, then drains what it can within
    /// `deadline` (the rest stays journaled for the next start).
    pub async fn run_flusher(
        self: Arc<Self>,
        shutdown: CancellationToken,
        on_applied: impl Fn(&[String]) + Send + Sync + 'static,
    ) {
        let key = LedgerKey {
            journal_id: self.journal.id().to_string(),
            epoch: self.journal.epoch(),
        };
        let mut conn: Option<PgConnection> = None;
        // After a transient failure the batch may have committed unseen (the answer to
        // its COMMIT lost): the next connection, whenever it comes, asks the ledger
        // before anything is applied again.
        let mut unsure = false;
        let mut backoff = Duration::from_millis(50);
        loop {
            let wait = if shutdown.is_cancelled() {
                Duration::ZERO
            } else {
                self.until_due()
            };
            let batch = if wait.is_zero() {
                self.next_batch()
            } else {
                Vec::new()
            };
            if batch.is_empty() {
                if shutdown.is_cancelled() {
                    return;
                }
                // Due but nothing contiguous and durable yet: an append is completing
                // (or never will: a poisoned journal leaves a gap, polled slowly).
                let wait = if wait.is_zero() && self.journal.is_poisoned() {
                    Duration::from_millis(200)
                } else if wait.is_zero() {
                    Duration::from_millis(5)
                } else {
                    wait
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = self.wake.notified() => {}
                    () = shutdown.cancelled() => {}
                }
                continue;
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match connect_as(&self.url, FLUSH_APP).await {
                    Ok(c) => conn.insert(c),
                    Err(err) => {
                        tracing::warn!(%err, retry_in = ?backoff, "flush worker cannot connect upstream");
                        if self.pause(&mut backoff, &shutdown).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            if unsure {
                match apply::claim_ledger(c, &key).await {
                    Ok(at) => {
                        unsure = false;
                        if at > *self.applied.borrow() {
                            let batch = self.take_through(at);
                            let tables = self.finish(&batch);
                            on_applied(&tables);
                            self.applied.send_replace(at);
                            if let Err(err) = self.journal.confirm(at).await {
                                tracing::warn!(%err, "journal truncation after a flush failed");
                            }
                        }
                        // The batch is taken again from what is applied now.
                        continue;
                    }
                    Err(ApplyError::Transient(err)) => {
                        tracing::warn!(%err, retry_in = ?backoff, "flush worker cannot read the ledger");
                        conn = None;
                        if self.pause(&mut backoff, &shutdown).await {
                            return;
                        }
                        continue;
                    }
                    Err(err) => {
                        tracing::error!(%err, "flush worker stopped");
                        let _ = self.poisoned.set(err.to_string());
                        return;
                    }
                }
            }
            let applied_through = *self.applied.borrow();
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
            // Records of a table that left deferral are planned with the metadata
            // they were journaled under (the set keeps it).
            let tables = self.tables.load_full();
            let unfolded;
            let metas = if self.may_fold(&batch) {
                &tables.metas
            } else {
                unfolded = tables
                    .metas
                    .iter()
                    .map(|(n, m)| {
                        let mut m = m.clone();
                        m.coalesce = false;
                        (n.clone(), m)
                    })
                    .collect();
                &unfolded
            };
            let result = apply::apply_batch(c, &key, applied_through, &batch, metas)
                .instrument(span.clone())
                .await;
            drop(tables);
            let entered = span.enter();
            match result {
                Ok(done) => {
                    backoff = Duration::from_millis(50);
                    span.record("rows", done.rows);
                    span.record("statements", done.statements);
                    let tables = self.finish(&batch);
                    {
                        use crate::metrics as m;
                        metrics::counter!(m::FLUSH_BATCHES).increment(1);
                        metrics::counter!(m::FLUSH_ROWS)
                            .increment(u64::try_from(done.rows).unwrap_or(u64::MAX));
                        metrics::counter!(m::UPSTREAM_STATEMENTS)
                            .increment(u64::try_from(done.statements).unwrap_or(u64::MAX));
                        metrics::histogram!(m::FLUSH_DURATION).record(started.elapsed());
                    }
                    for d in &done.dead_letters {
                        metrics::counter!(crate::metrics::DEAD_LETTERS, "table" => d.table.clone())
                            .increment(1);
                        tracing::error!(
                            seq = d.seq, table = %d.table, sqlstate = %d.sqlstate,
                            message = %d.message, statement = %d.statement,
                            "deferred write refused upstream; stored in spillway.dead_letters"
                        );
                    }
                    tracing::debug!(
                        records = batch.len(), statements = done.statements, rows = done.rows,
                        through = last, elapsed = ?started.elapsed(), "flush batch applied"
                    );
                    // Cached reads are invalidated before the barrier opens: a reader
                    // released by `applied` must not find an entry from before it.
                    on_applied(&tables);
                    self.applied.send_replace(last);
                    drop(entered);
                    if let Err(err) = self.journal.confirm(last).instrument(span).await {
                        tracing::warn!(%err, "journal truncation after a flush failed");
                    }
                }
                Err(ApplyError::Transient(err)) => {
                    metrics::counter!(crate::metrics::FLUSH_RETRIES).increment(1);
                    tracing::warn!(%err, retry_in = ?backoff, "flush batch failed; retrying");
                    drop(entered);
                    // The outcome may be unknown (lost during COMMIT): the ledger says
                    // where we are once a connection is back, however long that takes.
                    conn = None;
                    unsure = true;
                    if self.pause(&mut backoff, &shutdown).await {
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

    /// How long the flusher sleeps while idle: `flush.interval`, or less when a table
    /// with `consistency = "bounded"` promises a shorter `max_staleness` (its readers
    /// skip barriers, so the flusher is what bounds how old their view can be).
    pub(super) fn tick(&self) -> Duration {
        self.tables.load().tick(&self.flush.load())
    }

    /// Sleeps `backoff` (doubling it up to [`MAX_BACKOFF`]); true when shutting down.
    async fn pause(&self, backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = tokio::time::sleep(*backoff) => {}
            () = shutdown.cancelled() => return true,
        }
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        false
    }

    /// The next contiguous run of pending records, whole records, up to
    /// `flush.batch_size` row operations (at least one record). A write-back table's
    /// operations count once per key: they fold into one at flush.
    fn next_batch(&self) -> Vec<(u64, Arc<Record>)> {
        let first = *self.applied.borrow() + 1;
        let durable = self.journal.durable_seq();
        let batch_size = self.flush.load().batch_size;
        let tables = self.tables.load();
        let coalesces = |t: &str| tables.metas.get(t).is_some_and(|m| m.coalesce);
        let state = self.state();
        let mut out = Vec::new();
        let mut ops = 0;
        let mut folded = HashSet::new();
        // Stops at the first gap: a record still completing its append.
        for (expected, (seq, record)) in (first..).zip(state.pending.range(first..)) {
            if *seq != expected || *seq > durable {
                break;
            }
            let weight = record
                .ops
                .iter()
                .filter(|op| {
                    !coalesces(op.table())
                        || self
                            .key_of(op)
                            .is_none_or(|k| !folded.contains(&(op.table(), k)))
                })
                .count();
            if !out.is_empty() && ops + weight > batch_size {
                break;
            }
            ops += weight;
            for op in record.ops.iter().filter(|op| coalesces(op.table())) {
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
    fn may_fold(&self, batch: &[(u64, Arc<Record>)]) -> bool {
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

    /// Removes applied records from `pending`; returns the tables they wrote.
    fn finish(&self, batch: &[(u64, Arc<Record>)]) -> Vec<String> {
        let mut state = self.state();
        let mut tables = Vec::new();
        for (seq, record) in batch {
            state.acked_at.remove(seq);
            if state.pending.remove(seq).is_none() {
                continue;
            }
            for op in &record.ops {
                if let Some(key) = self.key_of(op) {
                    let slot = (op.table().to_owned(), key);
                    if let Some(k) = state.keys.get_mut(&slot) {
                        k.pending = k.pending.saturating_sub(1);
                        if k.pending == 0 {
                            state.keys.remove(&slot);
                            if let Some(s) = state.tables.get_mut(op.table()) {
                                s.dirty_keys = s.dirty_keys.saturating_sub(1);
                            }
                            state.generation += 1;
                            let generation = state.generation;
                            state.forgotten.insert(slot, generation);
                        }
                    }
                }
            }
            for t in record.tables() {
                if let Some(s) = state.tables.get_mut(t) {
                    s.pending = s.pending.saturating_sub(1);
                    if s.pending == 0 {
                        s.oldest = None;
                    }
                }
                if !tables.iter().any(|x: &String| x == t) {
                    tables.push(t.to_owned());
                }
            }
        }
        if state.forgotten.len() > FORGOTTEN_LIMIT {
            state.forgotten.clear();
            state.forgotten_floor = state.generation;
        }
        // A table that still has pending records: its oldest is not known exactly
        // without a scan, but no older than the oldest pending record of all, which
        // keeps its reported age an upper bound (the flush itself is timed by
        // `acked_at`).
        let oldest_left = state.acked_at.first_key_value().map(|(_, at)| *at);
        for s in state.tables.values_mut() {
            if s.pending > 0 {
                s.oldest = oldest_left.or(s.oldest).or_else(|| Some(Instant::now()));
            }
        }
        tables
    }
}
