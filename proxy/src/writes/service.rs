//! The deferred-write service of the backend database: the journal, the records
//! acknowledged but not yet applied (pending), and the flush worker that applies them
//! upstream in order, in batches, exactly once (SPEC §6).
//!
//! Invariants:
//! - A record is acknowledged only after the journal made it durable and it is in
//!   `pending`; the insertion runs in a spawned task, so a client that disconnects
//!   while waiting cannot leave a durable record out of `pending` (the flusher would
//!   otherwise wait for its sequence number forever).
//! - The flusher applies a contiguous prefix of sequence numbers only: record n + 1 is
//!   never applied before record n, even when their appends completed out of order.
//! - `applied` (a watch) only grows, and only after the batch's transaction committed
//!   with the ledger advance; barriers wait on it.
//! - After a transient failure nothing is applied until the ledger was read again on
//!   a new connection: a batch whose COMMIT answer was lost may be in already.
//! - A fenced ledger or an unplannable record stops the flusher for good (poison): the
//!   service refuses new deferred writes and barriers fail with the cause, instead of
//!   acknowledging writes that would never be applied.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use spillway_policies::journal::{Journal, JournalError};
use spillway_policies::writes::{Record, TableMeta};
use spillway_policies::{FlushConfig, WhenFull};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::apply::{self, ApplyError, LedgerKey};
use super::convert::{Converted, Verb};
use super::tables::DeferredTable;

/// Privilege answers by (role, table, verb), with when they were asked.
type Privileges = HashMap<(String, String, Verb), (bool, Instant)>;

/// How long a privilege answer is reused before it is asked again.
const PRIVILEGE_TTL: Duration = Duration::from_secs(5);

/// How long opening the check connection may take.
const CHECK_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest pause between retries of a batch that failed transiently.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `application_name` of the flush worker's and the check connection's backends, so
/// that an operator (or a test) can tell them apart in `pg_stat_activity`.
pub const FLUSH_APP: &str = "spillway flush";
pub const CHECKS_APP: &str = "spillway checks";

/// A check connection's failure: PostgreSQL unreachable for now (connection loss,
/// shutting down, starting up), or an answer that says something else went wrong.
fn unreachable_or_upstream(e: &sqlx::Error) -> DeferError {
    if apply::is_transient(e) {
        DeferError::Unreachable(e.to_string())
    } else {
        DeferError::Upstream(e.to_string())
    }
}

/// Connects to `url` with `application_name` set to `name`.
async fn connect_as(url: &str, name: &str) -> Result<PgConnection, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    PgConnection::connect_with(&options.application_name(name)).await
}

#[derive(Debug, thiserror::Error)]
pub enum DeferError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("table {table} has {pending} pending writes (max_pending); write rejected")]
    Full { table: String, pending: usize },
    #[error("deferred writes stopped: {0}")]
    Stopped(String),
    #[error("journal record does not encode: {0}")]
    Encode(String),
    /// The client's role may not write this table: the statement runs write-through
    /// instead, so PostgreSQL reports the refusal itself.
    #[error("role {user} may not {verb:?} table {table}")]
    NotPermitted {
        user: String,
        table: String,
        verb: Verb,
    },
    #[error("duplicate key value violates unique constraint \"{constraint}\"")]
    Duplicate { constraint: String, detail: String },
    #[error("checking the deferred table upstream: {0}")]
    Upstream(String),
    /// The check connection cannot reach PostgreSQL (down, restarting): retryable.
    #[error("PostgreSQL is unreachable, the deferred write cannot be checked: {0}")]
    Unreachable(String),
}

impl DeferError {
    /// 53000 (insufficient resources) for back-pressure, XX000 otherwise.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            DeferError::Full { .. } | DeferError::Journal(JournalError::Full { .. }) => "53000",
            DeferError::Duplicate { .. } => "23505",
            DeferError::Upstream(_) | DeferError::Unreachable(_) => "08006",
            _ => "XX000",
        }
    }
}

#[derive(Default)]
struct State {
    /// Durable records not yet applied, by sequence number.
    pending: BTreeMap<u64, Arc<Record>>,
    /// Pending record count and the oldest pending acknowledgement, per table.
    tables: HashMap<String, TableState>,
    /// Highest sequence number in `pending` so far.
    highest: u64,
    /// Keys with pending writes: whether the row exists once they are applied. The
    /// existence answer for such a key comes from here, never from PostgreSQL (which
    /// does not have those writes yet).
    keys: HashMap<(String, Vec<String>), KeyState>,
    /// Counts the keys the overlay forgot (their pending writes all applied).
    generation: u64,
    /// When each key was last forgotten (a `generation`), up to [`FORGOTTEN_LIMIT`]
    /// keys; forgettings before `forgotten_floor` are no longer known one by one.
    forgotten: HashMap<(String, Vec<String>), u64>,
    forgotten_floor: u64,
}

/// How many forgotten keys [`State::forgotten`] remembers before it starts over.
const FORGOTTEN_LIMIT: usize = 4096;

impl State {
    /// Whether a decision taken now has an answer for `key` of `table`: its pending
    /// writes (the overlay), or a point read in `upstream` that began at `since` and was
    /// not overtaken by writes to the key applied (and forgotten) in the meantime.
    fn answered(
        &self,
        table: &str,
        key: &[String],
        since: u64,
        upstream: &HashMap<Vec<String>, bool>,
    ) -> bool {
        let slot = (table.to_owned(), key.to_vec());
        self.keys.contains_key(&slot)
            || (upstream.contains_key(key)
                && since >= self.forgotten_floor
                && self.forgotten.get(&slot).is_none_or(|g| *g <= since))
    }
}

#[derive(Clone, Copy)]
struct KeyState {
    pending: u32,
    exists: bool,
}

#[derive(Default, Clone, Copy)]
struct TableState {
    pending: usize,
    oldest: Option<Instant>,
}

pub struct WriteService {
    pub tables: HashMap<String, DeferredTable>,
    by_oid: HashMap<u32, String>,
    metas: HashMap<String, TableMeta>,
    journal: Journal,
    state: Mutex<State>,
    applied: watch::Sender<u64>,
    /// Asks the flusher to look again (a barrier, a full batch, a writer waiting for
    /// room). A wake alone does not make a flush due: see [`Self::until_due`].
    wake: Notify,
    /// The sequence number someone is waiting to see applied (barriers, `SPILLWAY
    /// FLUSH`, writers blocked on `max_pending`); the flusher applies at once while it
    /// is ahead of `applied`.
    wanted: AtomicU64,
    /// Set once when the flusher stops for good.
    poisoned: OnceLock<String>,
    flush: FlushConfig,
    url: String,
    /// Privilege answers per (role, table, verb); and the connection that asks them
    /// and does the point reads of `row_counts = "exact"`.
    privileges: Mutex<Privileges>,
    checks: tokio::sync::Mutex<Option<PgConnection>>,
}

/// A deferred statement's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The journal record, or `None` when nothing was written (an UPDATE/DELETE of a
    /// key that does not exist, with exact row counts).
    pub seq: Option<u64>,
    /// The row count for the command tag.
    pub rows: usize,
}

impl WriteService {
    /// Opens the journal and claims its ledger row; the recovered records the ledger
    /// does not hold become pending (the flusher replays them first).
    pub async fn start(
        journal: Journal,
        recovered: Vec<spillway_policies::journal::Record>,
        tables: HashMap<String, DeferredTable>,
        flush: FlushConfig,
        url: String,
        conn: &mut PgConnection,
    ) -> Result<Arc<Self>, StartError> {
        let key = LedgerKey {
            journal_id: journal.id().to_string(),
            epoch: journal.epoch(),
        };
        let applied = apply::claim_ledger(conn, &key).await?;
        let mut state = State::default();
        for r in recovered.into_iter().filter(|r| r.seq > applied) {
            let record = Record::decode(&r.payload).map_err(|e| StartError::Decode {
                seq: r.seq,
                error: e.to_string(),
            })?;
            note_pending(&mut state, r.seq, Arc::new(record));
        }
        if !state.pending.is_empty() {
            tracing::info!(
                records = state.pending.len(),
                from = applied + 1,
                "replaying journal records the ledger does not hold"
            );
        }
        let metas = tables
            .iter()
            .map(|(k, t)| (k.clone(), t.meta.clone()))
            .collect();
        let (applied_tx, _) = watch::channel(applied);
        let by_oid = tables.iter().map(|(k, t)| (t.oid, k.clone())).collect();
        Ok(Arc::new(Self {
            tables,
            by_oid,
            metas,
            journal,
            state: Mutex::new(state),
            applied: applied_tx,
            wake: Notify::new(),
            wanted: AtomicU64::new(0),
            poisoned: OnceLock::new(),
            flush,
            url,
            privileges: Mutex::new(HashMap::new()),
            checks: tokio::sync::Mutex::new(None),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Decides and journals a deferrable statement of role `user` on `table`; returns
    /// once its record is durable and pending (or at once when it writes nothing).
    ///
    /// With `row_counts = "exact"` the answer comes from which keys exist: pending
    /// writes first (the key overlay), PostgreSQL otherwise (a point read). The
    /// decision and the overlay update happen under one lock, so two sessions cannot
    /// both insert one key; the overlay is reverted if the append fails.
    pub async fn defer(
        self: &Arc<Self>,
        user: &str,
        table: &str,
        converted: Converted,
    ) -> Result<Outcome, DeferError> {
        if let Some(cause) = self.poisoned.get() {
            return Err(DeferError::Stopped(cause.clone()));
        }
        let Some(t) = self.tables.get(table) else {
            return Err(DeferError::Stopped(format!("{table} is not deferred")));
        };
        if !self.permitted(user, table, converted.verb).await? {
            return Err(DeferError::NotPermitted {
                user: user.to_owned(),
                table: table.to_owned(),
                verb: converted.verb,
            });
        }
        let exact = t.config.row_counts == spillway_policies::RowCounts::Exact;
        self.wait_for_room(table).await?;
        // Decide, and reserve the keys, atomically.
        let mut ops = Vec::with_capacity(converted.ops.len());
        let mut reserved: Vec<(Vec<String>, Option<KeyState>)> = Vec::new();
        let rows;
        {
            // Point reads for keys without pending writes, before taking the lock. A
            // key whose pending writes are applied meanwhile leaves the overlay: then
            // neither answer holds (no point read, or one older than those writes), and
            // the keys are looked at again.
            let mut upstream = HashMap::new();
            let mut state = loop {
                let since = self.state().generation;
                upstream.clear();
                if exact {
                    for key in &converted.keys {
                        let pending = self
                            .state()
                            .keys
                            .contains_key(&(table.to_owned(), key.clone()));
                        if !pending && !upstream.contains_key(key) {
                            let exists = self.exists_upstream(t, key).await?;
                            upstream.insert(key.clone(), exists);
                        }
                    }
                }
                let state = self.state();
                if !exact
                    || converted
                        .keys
                        .iter()
                        .all(|key| state.answered(table, key, since, &upstream))
                {
                    break state;
                }
            };
            let mut seen: HashMap<&Vec<String>, bool> = HashMap::new();
            let mut count = 0;
            for (op, key) in converted.ops.iter().zip(&converted.keys) {
                let slot = (table.to_owned(), key.clone());
                let before = seen.get(key).copied().or_else(|| {
                    state
                        .keys
                        .get(&slot)
                        .map(|k| k.exists)
                        .or_else(|| upstream.get(key).copied())
                });
                let exists_now = match (converted.verb, exact, before) {
                    (Verb::Insert, true, Some(true)) => {
                        // Nothing reserved yet for this statement's earlier rows is
                        // kept: the whole statement fails, like in PostgreSQL.
                        drop(state);
                        return Err(DeferError::Duplicate {
                            constraint: t.pkey_name.clone(),
                            detail: format!(
                                "Key ({})=({}) already exists.",
                                t.meta.key.join(", "),
                                key.join(", ")
                            ),
                        });
                    }
                    (Verb::Insert, _, _) => true,
                    (Verb::Update, true, Some(false) | None) => continue,
                    (Verb::Delete, true, Some(false) | None) => continue,
                    (Verb::Update, _, _) => true,
                    (Verb::Delete, _, _) => false,
                };
                seen.insert(key, exists_now);
                count += 1;
                ops.push(op.clone());
            }
            rows = count;
            if !ops.is_empty() {
                for key in seen.keys() {
                    let slot = (table.to_owned(), (*key).clone());
                    let old = state.keys.get(&slot).copied();
                    let exists = seen.get(key).copied().unwrap_or(true);
                    let entry = state
                        .keys
                        .entry(slot)
                        .or_insert(KeyState { pending: 0, exists });
                    entry.pending += 1;
                    entry.exists = exists;
                    reserved.push(((*key).clone(), old));
                }
            }
        }
        if ops.is_empty() {
            return Ok(Outcome { seq: None, rows });
        }
        let record = Record { ops };
        let result = self.append(record).await;
        if result.is_err() {
            let mut state = self.state();
            for (key, old) in reserved {
                let slot = (table.to_owned(), key);
                match old {
                    Some(k) => {
                        state.keys.insert(slot, k);
                    }
                    None => {
                        state.keys.remove(&slot);
                    }
                }
            }
        }
        Ok(Outcome {
            seq: Some(result?),
            rows,
        })
    }

    /// Journals `record`; returns once it is durable and pending.
    async fn append(self: &Arc<Self>, record: Record) -> Result<u64, DeferError> {
        let payload = Bytes::from(
            record
                .encode()
                .map_err(|e| DeferError::Encode(e.to_string()))?,
        );
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        let record = Arc::new(record);
        // Spawned: see the module invariants.
        tokio::spawn(async move {
            let result = this.journal.append(payload).await;
            if let Ok(seq) = result {
                let full = {
                    let mut state = this.state();
                    note_pending(&mut state, seq, record);
                    state.pending.len() >= this.flush.batch_size
                };
                if full {
                    this.wake.notify_one();
                }
            }
            let _ = tx.send(result);
        });
        match rx.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(DeferError::Stopped("journal task ended".to_owned())),
        }
    }

    /// Whether `user` holds the privilege `verb` needs on `table`. An answer is
    /// reused for [`PRIVILEGE_TTL`], so a REVOKE takes effect within it; past it, and
    /// only while PostgreSQL cannot be reached, the last answer is reused.
    async fn permitted(&self, user: &str, table: &str, verb: Verb) -> Result<bool, DeferError> {
        let k = (user.to_owned(), table.to_owned(), verb);
        let known = self.privileges_map().get(&k).copied();
        if let Some((ok, at)) = known
            && at.elapsed() < PRIVILEGE_TTL
        {
            return Ok(ok);
        }
        let oid = i64::from(self.tables.get(table).map_or(0, |t| t.oid));
        let privilege = match verb {
            Verb::Insert => "INSERT",
            Verb::Update => "UPDATE",
            Verb::Delete => "DELETE",
        };
        let asked = self
            .check(|conn| {
                let user = user.to_owned();
                Box::pin(async move {
                    // By OID: a name would need quoting, and could match another table.
                    sqlx::query_scalar(
                        "SELECT pg_catalog.has_table_privilege($1, $2::int8::oid, $3) \
                         AND (NOT $4 OR pg_catalog.has_table_privilege($1, $2::int8::oid, 'SELECT'))",
                    )
                    .bind(user)
                    .bind(oid)
                    .bind(privilege)
                    // UPDATE/DELETE … WHERE key = … also needs SELECT in PostgreSQL.
                    .bind(verb != Verb::Insert)
                    .fetch_one(conn)
                    .await
                })
            })
            .await;
        let ok: bool = match (asked, known) {
            (Ok(ok), _) => ok,
            // PostgreSQL cannot be asked (it is down: detached sessions keep writing):
            // the last answer it gave stands until it can be asked again. Nothing can
            // be revoked while it is down, so the answer is at most PRIVILEGE_TTL
            // older than the outage, as it would be anyway.
            (Err(DeferError::Unreachable(e)), Some((ok, _))) => {
                tracing::debug!(user, table, error = %e, "privilege check unreachable; last answer stands");
                return Ok(ok);
            }
            (Err(e), _) => return Err(e),
        };
        self.privileges_map().insert(k, (ok, Instant::now()));
        Ok(ok)
    }

    fn privileges_map(&self) -> std::sync::MutexGuard<'_, Privileges> {
        match self.privileges.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether the row with `key` exists upstream now.
    async fn exists_upstream(&self, t: &DeferredTable, key: &[String]) -> Result<bool, DeferError> {
        let sql = t.exists_sql.clone();
        let key = key.to_vec();
        self.check(|conn| {
            let sql = sql.clone();
            let key = key.clone();
            Box::pin(async move {
                let mut q = sqlx::query_scalar::<_, bool>(&sql);
                for k in key {
                    q = q.bind(k);
                }
                q.fetch_one(conn).await
            })
        })
        .await
    }

    /// Runs `f` on the check connection, connecting (once more after a failure).
    async fn check<T>(
        &self,
        f: impl for<'c> Fn(
            &'c mut PgConnection,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, sqlx::Error>> + Send + 'c>,
        >,
    ) -> Result<T, DeferError> {
        let mut guard = self.checks.lock().await;
        for attempt in 0..2 {
            if guard.is_none() {
                // Bounded: while PostgreSQL is unreachable, a write that needs a
                // check is refused (retryable) rather than held for a TCP timeout.
                let connected =
                    tokio::time::timeout(CHECK_CONNECT_TIMEOUT, connect_as(&self.url, CHECKS_APP))
                        .await
                        .map_err(|_| {
                            DeferError::Unreachable(format!(
                                "no connection within {CHECK_CONNECT_TIMEOUT:?}"
                            ))
                        })?;
                *guard = Some(connected.map_err(|e| unreachable_or_upstream(&e))?);
            }
            let Some(conn) = guard.as_mut() else { continue };
            match f(conn).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 && apply::is_transient(&e) => *guard = None,
                Err(e) => return Err(unreachable_or_upstream(&e)),
            }
        }
        Err(DeferError::Unreachable(
            "check connection failed twice".to_owned(),
        ))
    }

    /// Applies `max_pending`/`when_full = "block" | "reject"` of `table`.
    async fn wait_for_room(&self, table: &str) -> Result<(), DeferError> {
        let started = Instant::now();
        let Some(t) = self.tables.get(table) else {
            return Ok(());
        };
        loop {
            let pending = self.state().tables.get(table).map_or(0, |s| s.pending);
            if pending < t.config.max_pending {
                return Ok(());
            }
            if t.config.when_full != WhenFull::Block || started.elapsed() >= t.config.block_timeout
            {
                return Err(DeferError::Full {
                    table: table.to_owned(),
                    pending,
                });
            }
            self.want(self.highest());
            let mut applied = self.applied.subscribe();
            let _ = tokio::time::timeout(Duration::from_millis(20), applied.changed()).await;
        }
    }

    /// The deferred table with this OID.
    pub fn name_of(&self, oid: u32) -> Option<&str> {
        self.by_oid.get(&oid).map(String::as_str)
    }

    /// Deferred tables a name may denote when no catalog is at hand.
    pub fn names_like(&self, schema: Option<&str>, name: &str) -> Vec<String> {
        self.tables
            .values()
            .filter(|t| t.meta.table == name && schema.is_none_or(|s| s == t.meta.schema))
            .map(|t| t.meta.name.clone())
            .collect()
    }

    /// The highest sequence number applied upstream.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Whether `table` is at its `max_pending` (for `when_full = "write-through"`).
    pub fn is_full(&self, table: &str) -> bool {
        let pending = self.state().tables.get(table).map_or(0, |s| s.pending);
        self.tables
            .get(table)
            .is_some_and(|t| pending >= t.config.max_pending)
    }

    /// The sequence number a barrier on `tables` must wait for, if any of them has
    /// pending writes.
    pub fn barrier_target<'a>(&self, tables: impl IntoIterator<Item = &'a str>) -> Option<u64> {
        let state = self.state();
        tables
            .into_iter()
            .any(|t| state.tables.get(t).is_some_and(|s| s.pending > 0))
            .then_some(state.highest)
    }

    /// The highest sequence number acknowledged so far (`SPILLWAY FLUSH`).
    pub fn highest(&self) -> u64 {
        self.state().highest
    }

    /// Returns once everything up to `seq` is applied upstream.
    pub async fn wait_applied(&self, seq: u64) -> Result<(), DeferError> {
        let mut applied = self.applied.subscribe();
        loop {
            if *applied.borrow_and_update() >= seq {
                return Ok(());
            }
            if let Some(cause) = self.poisoned.get() {
                return Err(DeferError::Stopped(cause.clone()));
            }
            self.want(seq);
            // Poison is noticed within this period even without a change.
            let _ = tokio::time::timeout(Duration::from_millis(200), applied.changed()).await;
        }
    }

    /// Asks the flusher to apply everything up to `seq` now.
    fn want(&self, seq: u64) {
        self.wanted.fetch_max(seq, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// How long the pending records may still wait; zero when a flush is due: someone
    /// waits for them, a batch is full, or the oldest is `tick` old. A stale wake (a
    /// barrier already satisfied) therefore never flushes a record early.
    fn until_due(&self) -> Duration {
        let applied = *self.applied.borrow();
        if self.wanted.load(Ordering::Acquire) > applied {
            return Duration::ZERO;
        }
        let tick = self.tick();
        let state = self.state();
        if state.pending.len() >= self.flush.batch_size {
            return Duration::ZERO;
        }
        state
            .tables
            .values()
            .filter_map(|s| s.oldest)
            .min()
            .map_or(tick, |oldest| tick.saturating_sub(oldest.elapsed()))
    }

    /// Sets the pending-write and journal gauges (called when a scrape arrives).
    #[allow(clippy::cast_precision_loss)]
    pub fn export_gauges(&self) {
        use crate::metrics as m;
        for (table, pending, age) in self.pending_by_table() {
            metrics::gauge!(m::PENDING_WRITES, "table" => table.clone()).set(pending as f64);
            metrics::gauge!(m::PENDING_OLDEST_AGE, "table" => table)
                .set(age.map_or(0.0, |a| a.as_secs_f64()));
        }
        metrics::gauge!(m::JOURNAL_BYTES).set(self.journal.bytes() as f64);
        let stats = self.journal.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        metrics::counter!(m::JOURNAL_FSYNCS).absolute(load(&stats.fsyncs));
        metrics::counter!(m::JOURNAL_FSYNC_MICROS).absolute(load(&stats.fsync_micros));
    }

    /// Why deferred writes cannot be served, if they cannot.
    pub fn health(&self) -> Result<(), String> {
        if let Some(cause) = self.poisoned.get() {
            return Err(format!("flush worker stopped: {cause}"));
        }
        if self.journal.is_poisoned() {
            return Err("journal stopped after an I/O error".to_owned());
        }
        Ok(())
    }

    /// Pending record count and age of the oldest, per table (metrics, console).
    pub fn pending_by_table(&self) -> Vec<(String, usize, Option<Duration>)> {
        self.state()
            .tables
            .iter()
            .map(|(t, s)| (t.clone(), s.pending, s.oldest.map(|o| o.elapsed())))
            .collect()
    }

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
                // Due but nothing contiguous and durable yet: an append is completing.
                let wait = if wait.is_zero() {
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
            let started = Instant::now();
            match apply::apply_batch(c, &key, applied_through, &batch, &self.metas).await {
                Ok(done) => {
                    backoff = Duration::from_millis(50);
                    let last = batch.last().map_or(applied_through, |(s, _)| *s);
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
                    if let Err(err) = self.journal.confirm(last).await {
                        tracing::warn!(%err, "journal truncation after a flush failed");
                    }
                }
                Err(ApplyError::Transient(err)) => {
                    metrics::counter!(crate::metrics::FLUSH_RETRIES).increment(1);
                    tracing::warn!(%err, retry_in = ?backoff, "flush batch failed; retrying");
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
    fn tick(&self) -> Duration {
        self.tables
            .values()
            .filter(|t| t.config.consistency == spillway_policies::Consistency::Bounded)
            .map(|t| t.config.max_staleness / 2)
            .fold(self.flush.interval, Duration::min)
            .max(Duration::from_millis(1))
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
    /// `flush.batch_size` row operations (at least one record).
    fn next_batch(&self) -> Vec<(u64, Arc<Record>)> {
        let first = *self.applied.borrow() + 1;
        let durable = self.journal.durable_seq();
        let state = self.state();
        let mut out = Vec::new();
        let mut ops = 0;
        // Stops at the first gap: a record still completing its append.
        for (expected, (seq, record)) in (first..).zip(state.pending.range(first..)) {
            if *seq != expected || *seq > durable {
                break;
            }
            if !out.is_empty() && ops + record.ops.len() > self.flush.batch_size {
                break;
            }
            ops += record.ops.len();
            out.push((*seq, record.clone()));
        }
        out
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
        // The oldest acknowledgement of a table that still has pending records is no
        // longer known exactly; now is a lower bound that keeps the age honest enough
        // for max_staleness (it can only make a flush happen sooner).
        for s in state.tables.values_mut() {
            if s.pending > 0 && s.oldest.is_none() {
                s.oldest = Some(Instant::now());
            }
        }
        tables
    }
}

impl WriteService {
    /// The canonical key of an operation, as the overlay stores it.
    fn key_of(&self, op: &spillway_policies::writes::RowOp) -> Option<Vec<String>> {
        let meta = self.metas.get(op.table())?;
        // Keys are never NULL in a record (the write path refuses that).
        spillway_policies::writes::plan::key_of(op, meta)
            .ok()?
            .into_iter()
            .collect()
    }
}

fn note_pending(state: &mut State, seq: u64, record: Arc<Record>) {
    for t in record.tables() {
        let s = state.tables.entry(t.to_owned()).or_default();
        s.pending += 1;
        s.oldest.get_or_insert_with(Instant::now);
    }
    state.highest = state.highest.max(seq);
    state.pending.insert(seq, record);
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Ledger(#[from] ApplyError),
    #[error("journal record {seq} does not decode: {error}")]
    Decode { seq: u64, error: String },
}
