//! Tests of the engine on a paused clock (`start_paused`), against an in-memory
//! PostgreSQL ([`Db`]: rows by key, the ledger row, the batches applied, scripted
//! faults) reached through [`MemorySink`] and [`FakeChecks`], and an in-memory journal
//! ([`MemoryLog`]) whose appends can be held back (a gap) or left not yet durable.
//!
//! Every test's doc comment names the mutation of the rule it checks that makes it
//! fail ("Mutation: …").

mod barrier;
mod counts;
mod due;
mod flush;
mod guards;
mod held;
mod keys;
mod overlay;
mod reload;
mod room;
mod upsert;
mod upsert_returning;

pub use log::MemoryLog;

mod log;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keys::{Chunk, Cursor, KeyKind};
use super::upstream::{
    ApplyError, Batch, CheckError, Checks, DeadLetter, Flushed, LedgerKey, RowValues, Sink,
};
use super::{Converted, DeferredTable, Engine, Verb};
use crate::writes::{Assign, AssignOp, RowOp, TableMeta, Val};
use crate::{FlushConfig, Policy, TableConfig};

/// A fault the next `apply` meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails before anything is committed.
    Transient,
    /// Commits, then the answer is lost.
    LostCommit,
}

/// PostgreSQL as the engine's traits see it.
#[derive(Default)]
pub struct Db {
    /// Keys whose rows exist, per table.
    pub rows: HashSet<(String, Vec<String>)>,
    /// Column values of rows, for guarded writes' point reads (absent: NULL).
    pub cells: HashMap<(String, Vec<String>, String), String>,
    /// `spillway.flush_ledger`'s row: (epoch, last_seq).
    pub ledger: Option<(u64, u64)>,
    /// The sequence numbers of each committed batch, in order.
    pub batches: Vec<Vec<u64>>,
    /// When each `apply` was called.
    pub attempts: Vec<Instant>,
    pub faults: VecDeque<Fault>,
    pub claims: usize,
    pub connects: usize,
    /// Privilege answers by (role, table, verb); absent means granted.
    pub grants: HashMap<(String, String, Verb), bool>,
    pub privilege_checks: usize,
    /// Keys point-read, and the queries that read them.
    pub point_reads: usize,
    /// Point-read queries, chunks, the WAL position (`keys.rs`).
    pub keys: keys::KeyDb,
    /// Checks fail with `Unreachable` while set.
    pub unreachable: bool,
    /// Dead letters of every batch.
    pub dead: Vec<u64>,
    /// Per `apply`: whether any table was planned folded (write-back).
    pub folded: Vec<bool>,
}

pub type SharedDb = Arc<Mutex<Db>>;

pub fn lock(db: &SharedDb) -> MutexGuard<'_, Db> {
    match db.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The canonical key `op` writes (`id` is the only key column of the test tables).
fn key(op: &RowOp) -> (String, Vec<String>) {
    let text = |v: &Val| v.text.clone().unwrap_or_default();
    let k = match op {
        RowOp::Insert { values, .. } => values.first().map(text),
        RowOp::Update { key, .. } | RowOp::Delete { key, .. } => key.first().map(text),
    };
    (op.table().to_owned(), k.into_iter().collect())
}

/// The flush worker's PostgreSQL.
pub struct MemorySink {
    pub db: SharedDb,
    /// `apply` waits while this says `false` (a stalled flush worker).
    pub open: watch::Receiver<bool>,
    connected: bool,
}

impl Sink for MemorySink {
    async fn connect(&mut self) -> Result<(), ApplyError> {
        if !self.connected {
            lock(&self.db).connects += 1;
            self.connected = true;
        }
        Ok(())
    }

    fn disconnect(&mut self) {
        self.connected = false;
    }

    async fn claim(&mut self, ledger: &LedgerKey) -> Result<u64, ApplyError> {
        let mut db = lock(&self.db);
        db.claims += 1;
        match db.ledger {
            Some((epoch, _)) if epoch > ledger.epoch => Err(fenced(ledger, 0)),
            Some((_, last)) => {
                db.ledger = Some((ledger.epoch, last));
                Ok(last)
            }
            None => {
                db.ledger = Some((ledger.epoch, 0));
                Ok(0)
            }
        }
    }

    async fn apply(
        &mut self,
        ledger: &LedgerKey,
        applied_through: u64,
        batch: &Batch,
        tables: &HashMap<String, TableMeta>,
    ) -> Result<Flushed, ApplyError> {
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        let mut db = lock(&self.db);
        db.attempts.push(Instant::now());
        db.folded.push(tables.values().any(|m| m.coalesce));
        let fault = db.faults.pop_front();
        if fault == Some(Fault::Transient) {
            return Err(ApplyError::Transient("connection reset".to_owned()));
        }
        if db.ledger != Some((ledger.epoch, applied_through)) {
            return Err(fenced(ledger, applied_through));
        }
        let mut done = Flushed::default();
        for (seq, record) in batch {
            // A record whose UPDATE/DELETE finds no row is a dead letter, whole.
            let mut rows = db.rows.clone();
            let mut ok = true;
            for op in &record.ops {
                let k = key(op);
                ok &= match op {
                    RowOp::Insert { .. } => rows.insert(k),
                    RowOp::Update { .. } => rows.contains(&k),
                    RowOp::Delete { .. } => rows.remove(&k),
                };
            }
            if ok {
                db.rows = rows;
                done.rows += record.ops.len();
            } else {
                db.dead.push(*seq);
                if let Some(op) = record.ops.first() {
                    done.dead_letters
                        .push(DeadLetter::of(*seq, op, "02000", "no row for the key"));
                }
            }
            done.statements += 1;
        }
        let last = batch.last().map_or(applied_through, |(s, _)| *s);
        db.ledger = Some((ledger.epoch, last));
        db.keys.lsn += 10;
        db.batches.push(batch.iter().map(|(s, _)| *s).collect());
        if fault == Some(Fault::LostCommit) {
            return Err(ApplyError::Transient("answer to COMMIT lost".to_owned()));
        }
        Ok(done)
    }

    async fn wal_position(&mut self) -> Result<Option<u64>, ApplyError> {
        Ok(Some(lock(&self.db).keys.lsn))
    }
}

fn fenced(ledger: &LedgerKey, expected: u64) -> ApplyError {
    ApplyError::Fenced {
        journal_id: ledger.journal_id.clone(),
        epoch: ledger.epoch,
        expected,
    }
}

/// The session side's PostgreSQL.
pub struct FakeChecks {
    pub db: SharedDb,
}

impl Checks for FakeChecks {
    fn privilege(
        &self,
        user: &str,
        table: &DeferredTable,
        verb: Verb,
    ) -> impl Future<Output = Result<bool, CheckError>> + Send {
        let mut db = lock(&self.db);
        db.privilege_checks += 1;
        let answer = if db.unreachable {
            Err(CheckError::Unreachable("connection refused".to_owned()))
        } else {
            let k = (user.to_owned(), table.meta.name.clone(), verb);
            Ok(db.grants.get(&k).copied().unwrap_or(true))
        };
        std::future::ready(answer)
    }

    fn exists_many(
        &self,
        table: &DeferredTable,
        keys: &[Vec<String>],
    ) -> impl Future<Output = Result<Vec<bool>, CheckError>> + Send {
        let db = self.db.clone();
        let name = table.meta.name.clone();
        let keys = keys.to_vec();
        async move {
            let delay = lock(&db).keys.read_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut db = lock(&db);
            db.point_reads += keys.len();
            db.keys.point_read_queries += 1;
            if db.unreachable {
                return Err(CheckError::Unreachable("connection refused".to_owned()));
            }
            Ok(keys
                .into_iter()
                .map(|k| db.rows.contains(&(name.clone(), k)))
                .collect())
        }
    }

    fn row_values(
        &self,
        table: &DeferredTable,
        key: &[String],
        columns: &[String],
    ) -> impl Future<Output = Result<RowValues, CheckError>> + Send {
        let db = lock(&self.db);
        let slot = (table.meta.name.clone(), key.to_vec());
        let answer = if db.unreachable {
            Err(CheckError::Unreachable("connection refused".to_owned()))
        } else if db.rows.contains(&slot) {
            Ok(Some(
                columns
                    .iter()
                    .map(|c| {
                        db.cells
                            .get(&(slot.0.clone(), slot.1.clone(), c.clone()))
                            .cloned()
                    })
                    .collect(),
            ))
        } else {
            Ok(None)
        };
        // The fake has no ledger in the read's snapshot.
        std::future::ready(answer.map(|values| RowValues {
            values,
            through: None,
        }))
    }

    fn key_chunk(
        &self,
        table: &DeferredTable,
        _kind: KeyKind,
        after: Option<&Cursor>,
        limit: usize,
    ) -> impl Future<Output = Result<Chunk, CheckError>> + Send {
        let mut db = lock(&self.db);
        db.keys.chunks += 1;
        let answer = if db.unreachable {
            Err(CheckError::Unreachable("connection refused".to_owned()))
        } else {
            let after = match after {
                Some(Cursor::Int(v)) => Some(*v),
                _ => None,
            };
            let mut ids: Vec<i64> = db
                .rows
                .iter()
                .filter(|(t, _)| *t == table.meta.name)
                .filter_map(|(_, k)| k.first()?.parse().ok())
                .filter(|id| after.is_none_or(|a| *id > a))
                .collect();
            ids.sort_unstable();
            ids.truncate(limit);
            Ok(Chunk::Int(ids))
        };
        std::future::ready(answer)
    }

    fn wal_position(&self) -> impl Future<Output = Result<u64, CheckError>> + Send {
        std::future::ready(Ok(lock(&self.db).keys.lsn))
    }
}

pub type TestEngine = Engine<FakeChecks, MemoryLog>;

/// A table `public.<name>` keyed by `id`, with an integer column `v`.
pub fn table(
    name: &str,
    policy: Policy,
    configure: impl FnOnce(&mut TableConfig),
) -> DeferredTable {
    let mut config = TableConfig {
        policy,
        ..TableConfig::default()
    };
    configure(&mut config);
    let qualified = format!("public.{name}");
    DeferredTable {
        oid: 1000 + u32::try_from(name.len()).unwrap_or(0) * 7 + u32::from(name.as_bytes()[0]),
        meta: TableMeta {
            name: qualified,
            schema: "public".to_owned(),
            table: name.to_owned(),
            key: vec!["id".to_owned()],
            types: [("id", "integer"), ("v", "integer")]
                .into_iter()
                .map(|(c, t)| (c.to_owned(), t.to_owned()))
                .collect(),
            coalesce: policy == Policy::WriteBack,
            plain: true,
            parents: Vec::new(),
            overriding: false,
        },
        config,
        type_oids: [("id", 23), ("v", 23)]
            .into_iter()
            .map(|(c, t)| (c.to_owned(), t))
            .collect(),
        typmods: HashMap::new(),
        not_null: Vec::new(),
        required: Vec::new(),
        defaults: Default::default(),
        enum_types: HashMap::new(),
        pkey_name: format!("{name}_pkey"),
        exists_sql: String::new(),
        columns: Vec::new(),
        row_changes: Default::default(),
        key_sequence: None,
        generated_always: Vec::new(),
    }
}

/// One operation on key `id`.
fn one(verb: Verb, op: RowOp, id: u32) -> Converted {
    let (ops, keys) = (vec![op], vec![vec![id.to_string()]]);
    let (if_exists, returning) = (None, None);
    Converted {
        verb,
        ops,
        keys,
        if_exists,
        returning,
        stored: Vec::new(),
        told: None,
    }
}

pub fn insert(table: &str, id: u32) -> Converted {
    let table = format!("public.{table}");
    let columns = vec!["id".to_owned(), "v".to_owned()];
    let values = vec![Val::plain(Some(&id.to_string())), Val::plain(Some("1"))];
    let op = RowOp::Insert {
        table,
        columns,
        values,
    };
    one(Verb::Insert, op, id)
}

pub fn update(table: &str, id: u32) -> Converted {
    let set = vec![Assign {
        column: "v".to_owned(),
        op: AssignOp::Set,
        value: Val::plain(Some("2")),
    }];
    let key = vec![Val::plain(Some(&id.to_string()))];
    let table = format!("public.{table}");
    one(
        Verb::Update,
        RowOp::Update {
            table,
            key,
            set,
            guard: Vec::new(),
        },
        id,
    )
}

pub fn delete(table: &str, id: u32) -> Converted {
    let key = vec![Val::plain(Some(&id.to_string()))];
    let table = format!("public.{table}");
    one(
        Verb::Delete,
        RowOp::Delete {
            table,
            key,
            guard: Vec::new(),
        },
        id,
    )
}

/// An engine over tables, a database with `rows`, and its flush worker.
pub struct Harness {
    pub engine: Arc<TestEngine>,
    pub db: SharedDb,
    pub open: watch::Sender<bool>,
    pub stop: CancellationToken,
    pub flusher: Option<JoinHandle<()>>,
    /// Tables passed to `on_applied`, per batch.
    pub invalidated: Arc<Mutex<Vec<Vec<String>>>>,
}

pub const USER: &str = "app";
/// The database the engine's key index follows.
pub const DATABASE: &str = "app";

/// The default `[flush]` of the tests: a 100 ms interval, big batches.
pub fn flush_config() -> FlushConfig {
    FlushConfig {
        interval: Duration::from_millis(100),
        batch_size: 1000,
        max_dirty_keys: 1000,
    }
}

impl Harness {
    pub fn new(tables: Vec<DeferredTable>, flush: FlushConfig) -> Self {
        Self::with_recovered(tables, flush, Vec::new())
    }

    /// Starts with journal records `recovered` (sequence numbers from 1) not in the
    /// ledger.
    pub fn with_recovered(
        tables: Vec<DeferredTable>,
        flush: FlushConfig,
        recovered: Vec<crate::writes::Record>,
    ) -> Self {
        let db: SharedDb = Arc::new(Mutex::new(Db {
            ledger: Some((1, 0)),
            ..Db::default()
        }));
        let log = MemoryLog::default();
        let mut journal = Vec::new();
        for (i, r) in recovered.iter().enumerate() {
            let seq = u64::try_from(i).unwrap_or(0) + 1;
            let payload = Bytes::from(r.encode().unwrap_or_default());
            journal.push(crate::journal::Record { seq, payload });
        }
        log.start_at(journal.len() as u64);
        log.sync();
        let tables = tables
            .into_iter()
            .map(|t| (t.meta.name.clone(), t))
            .collect();
        let checks = FakeChecks { db: db.clone() };
        let engine = match Engine::start(log, journal, 0, tables, flush, checks) {
            Ok(e) => e,
            Err(e) => panic!("engine start: {e}"),
        };
        engine.configure_keys(DATABASE, &crate::KeyIndexConfig::default());
        let (open, _) = watch::channel(true);
        let mut h = Self {
            engine,
            db,
            open,
            stop: CancellationToken::new(),
            flusher: None,
            invalidated: Arc::default(),
        };
        h.start_flusher();
        h
    }

    /// Runs the flush worker (again, after [`Self::stop_flusher`]).
    pub fn start_flusher(&mut self) {
        let sink = MemorySink {
            db: self.db.clone(),
            open: self.open.subscribe(),
            connected: false,
        };
        self.stop = CancellationToken::new();
        let invalidated = self.invalidated.clone();
        let on_applied = move |applied: &crate::engine::state::Applied| {
            if let Ok(mut v) = invalidated.lock() {
                v.push(applied.tables.clone());
            }
        };
        let run = self
            .engine
            .clone()
            .run_flusher(sink, self.stop.clone(), on_applied);
        self.flusher = Some(tokio::spawn(run));
    }

    /// Stops the flush worker; returns once it ended.
    pub async fn stop_flusher(&mut self) {
        self.stop.cancel();
        if let Some(f) = self.flusher.take() {
            let _ = f.await;
        }
    }

    pub fn db(&self) -> MutexGuard<'_, Db> {
        lock(&self.db)
    }

    /// The batches committed so far.
    pub fn batches(&self) -> Vec<Vec<u64>> {
        self.db().batches.clone()
    }

    pub fn log(&self) -> &MemoryLog {
        self.engine.log()
    }

    /// Defers one statement as role [`USER`]; panics on an error.
    pub async fn defer(&self, table: &str, c: Converted) -> super::Outcome {
        match self.engine.defer(USER, &format!("public.{table}"), c).await {
            Ok(o) => o,
            Err(e) => panic!("defer on {table}: {e}"),
        }
    }

    /// Stalls (`false`) or lets go (`true`) the flush worker's next `apply`.
    pub fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

/// Sleeps `ms` of paused time (the runtime runs everything due meanwhile).
pub async fn after(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// A statement of a held transaction on `public.<table>`.
pub fn stmt(table: &str, c: Converted) -> super::TxStatement {
    super::TxStatement {
        table: format!("public.{table}"),
        converted: c,
    }
}
