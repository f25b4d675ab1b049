//! Seeded model-based property test of the deferred-write state machine (SPEC §6,
//! issues 4 and 5). A seeded generator drives the real spillway binary, in front of a
//! real PostgreSQL, through a few hundred operations on two deferred tables, `m_exact`
//! (`row_counts = "exact"`; write-behind for even seeds, write-back, whose flusher
//! coalesces per key, for odd ones) and `m_assumed` (write-behind, `"assumed"`); an
//! in-memory model (a
//! `BTreeMap` per table, the number of journal records and the dead letters it
//! expects) predicts every answer:
//!
//! - writes (INSERT of one or two rows, UPDATE `c = v` / `n = n ± d`, DELETE, all by
//!   key) from three sessions in three protocol modes (simple Query with literals, a
//!   statement prepared once per session, a statement prepared per call) get the
//!   command tag or SQLSTATE PostgreSQL would give: with exact row counts 23505 for a
//!   key that exists and 0 rows for UPDATE/DELETE of a missing key; with assumed row
//!   counts one row per key, and what PostgreSQL refuses when the write is applied
//!   becomes a dead letter; `ON CONFLICT (id) DO NOTHING` is decided from the key
//!   overlay with either row counts (its key is always read); a version-checked
//!   UPDATE of the exact table (`… WHERE id = $1 AND ver = $4`, ADR 0035) is deferred
//!   and answered from what spillway knows of the row's `ver` (alone and inside
//!   transactions, replayed with its check when the transaction moves upstream), and
//!   so is a decrement with a floor (`SET n = n - $2 … AND n > $3`), decided from a
//!   read of `n` that knows the flush ledger's position plus the deltas pending;
//!   writes spillway cannot defer (a predicate it does not guard, `n IS NOT NULL`) run
//!   write-through after a barrier, in order with the deferred ones;
//! - two sessions writing one key of the exact table at the same moment get the
//!   answers of one of the two serial orders;
//! - client transactions on the exact table (`BEGIN`, one to four writes, then COMMIT,
//!   ROLLBACK, a read that moves the transaction upstream before COMMIT, a read of the
//!   other table before COMMIT (upstream too: the tables' gate trigger may reach any
//!   table, ADR 0034), or SIGKILL before COMMIT) get the answers of the writes applied in order
//!   to the state the transaction sees; a failed statement fails the rest (25P02); a
//!   committed held transaction is one journal record, a rolled-back or killed one
//!   none, and one moved upstream commits there without a record;
//! - back-pressure: with `max_pending = 1` (`when_full = "block"`) a write to a full
//!   table waits for the flush worker and still gets the model's answer;
//! - reads through spillway (whole table, point, aggregate) from any session equal the
//!   model: strong consistency makes every acknowledged write visible to every session;
//! - `SPILLWAY FLUSH [table]`: afterwards PostgreSQL itself holds the model's rows;
//! - crash: SIGKILL between operations, then a restart; the new process replays the
//!   journal before it serves, so PostgreSQL holds every acknowledged write at once;
//! - upstream failure: the backends of the flush worker (and of the connection that
//!   checks keys for exact row counts, and of the client sessions) are terminated,
//!   idle or in the middle of a batch (held there by a statement trigger that waits for
//!   an advisory lock the test holds); the worker retries, nothing is lost or applied
//!   twice; sessions that lost their backend while idle get PostgreSQL's FATAL (it
//!   still accepts sessions, so spillway does not detach them) and are replaced.
//!
//! At the end PostgreSQL's rows, `spillway.dead_letters` (row for row, with journal
//! sequence numbers) and the ledger's last sequence number (one record per
//! acknowledged deferrable write that changes something: none ran write-through, none
//! was journaled or applied twice) equal the model's.
//!
//! The seed is printed; `MODEL_SEED=n` replays one seed (its configuration derives from
//! it: [`Config::of`]) and `MODEL_OPS` changes the length (not `SPILLWAY_…`: the
//! spawned binary would read those as configuration). There is no shrinking: a failure
//! prints the seed and the log of operations and answers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Display;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, SimpleQueryMessage, Statement};

use crate::context::{Context, connect};

/// CI's seeds, covering the configurations of [`Config::of`]: (flush.interval,
/// flush.batch_size, max_pending, m_exact's policy) = (2ms, 1000, 1, write-behind),
/// (30ms, 1, 1, write-behind), (1h, 1000, 1, write-back), (2ms, 3, unbounded,
/// write-back).
const DEFAULT_SEEDS: [u64; 4] = [1_000_000, 1_000_004, 1_000_017, 1_000_015];
const OPS: usize = 300;
const SESSIONS: usize = 3;
/// Keys 1..=KEYS: few, so that inserts collide and updates find rows.
const KEYS: i32 = 12;
/// Rows 1..=PRELOADED exist in both tables before spillway starts.
const PRELOADED: i32 = 4;
/// No single step may take longer (a lost wake-up, a barrier that never passes).
const STEP_LIMIT: Duration = Duration::from_secs(30);
/// How long the flush worker may take to reach a closed gate (see `Op::Stall`).
const BLOCK_LIMIT: Duration = Duration::from_secs(10);
const CLIENT_APP: &str = "model_client";
const FLUSH_APP: &str = "spillway flush";
/// spillway's own connections that write-behind uses. Not the cache service's: while
/// it reconnects spillway has no catalog and writes run write-through, which answers
/// differently for `row_counts = "assumed"` (PostgreSQL's 23505 instead of an
/// acknowledgement and a dead letter).
const INTERNAL_APPS: &str = "'spillway flush', 'spillway checks'";

const SETUP: &str = "
    CREATE TABLE m_exact (id int PRIMARY KEY, v text, n bigint NOT NULL DEFAULT 0,
        ver int NOT NULL DEFAULT 0);
    CREATE TABLE m_assumed (id int PRIMARY KEY, v text, n bigint NOT NULL DEFAULT 0);
    INSERT INTO m_exact SELECT g, 'pre' || g, g FROM generate_series(1, 4) g;
    INSERT INTO m_assumed SELECT g, 'pre' || g, g FROM generate_series(1, 4) g;
    CREATE FUNCTION model_gate() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_lock_shared(TG_ARGV[0]::bigint);
        PERFORM pg_advisory_unlock_shared(TG_ARGV[0]::bigint);
        RETURN NULL;
    END $$;
    CREATE TRIGGER gate BEFORE INSERT OR UPDATE OR DELETE ON m_exact
        FOR EACH STATEMENT EXECUTE FUNCTION model_gate('1');
    CREATE TRIGGER gate BEFORE INSERT OR UPDATE OR DELETE ON m_assumed
        FOR EACH STATEMENT EXECUTE FUNCTION model_gate('2');";

/// Text values, NULL and the empty string included; one needs quoting.
const TEXTS: [Option<&str>; 7] = [
    None,
    Some(""),
    Some("a"),
    Some("b"),
    Some("o'k"),
    Some("x y"),
    Some("ü"),
];

/// The spillway configuration a seed runs with.
struct Config {
    /// `flush.interval`: pending writes that wait for a barrier (1h), a flusher that
    /// runs all the time (2ms), one in between.
    interval: &'static str,
    /// `flush.batch_size`, in row operations.
    batch: usize,
    /// `max_pending` of both tables (`when_full = "block"`, the default): a write to a
    /// full table first waits for the flusher.
    max_pending: Option<usize>,
    /// `m_exact`'s policy: the model is the same for both deferred policies.
    policy: &'static str,
}

impl Config {
    fn of(seed: u64) -> Self {
        const INTERVALS: [&str; 3] = ["1h", "2ms", "30ms"];
        const BATCHES: [usize; 3] = [1000, 1, 3];
        let digit = |d: u64, n: u64| usize::try_from(seed / d % n).expect("small");
        Self {
            interval: INTERVALS[digit(1, 3)],
            batch: BATCHES[digit(3, 3)],
            max_pending: (digit(9, 2) == 1).then_some(1),
            policy: if seed % 2 == 1 {
                "write-back"
            } else {
                "write-behind"
            },
        }
    }

    fn toml(&self) -> String {
        let max = self
            .max_pending
            .map(|m| format!("max_pending = {m}\n"))
            .unwrap_or_default();
        format!(
            "[flush]\ninterval = \"{}\"\nbatch_size = {}\n\
             [tables.\"public.m_exact\"]\npolicy = \"{}\"\nrow_counts = \"exact\"\n{max}\
             [tables.\"public.m_assumed\"]\npolicy = \"write-behind\"\nrow_counts = \"assumed\"\n{max}",
            self.interval, self.batch, self.policy
        )
    }
}

#[tokio::test]
async fn deferred_writes_match_the_model() {
    let seeds: Vec<u64> = match std::env::var("MODEL_SEED") {
        Ok(s) => vec![s.trim().parse().expect("MODEL_SEED is a u64")],
        Err(_) => DEFAULT_SEEDS.to_vec(),
    };
    let ops = std::env::var("MODEL_OPS")
        .map(|s| s.trim().parse().expect("MODEL_OPS is a number"))
        .unwrap_or(OPS);
    for seed in seeds {
        run_seed(seed, ops).await;
    }
}

async fn run_seed(seed: u64, ops: usize) {
    let config = Config::of(seed);
    println!(
        "model seed {seed} (MODEL_SEED={seed} replays it): {ops} operations, \
         flush.interval = {}, flush.batch_size = {}, max_pending = {:?}, m_exact {}",
        config.interval, config.batch, config.max_pending, config.policy
    );
    let started = Instant::now();
    let ctx = Context::builder()
        .before_proxy(SETUP)
        .section(&config.toml())
        .start()
        .await;
    let direct = connect(&format!(
        "{} application_name=model_direct",
        ctx.direct_config()
    ))
    .await;
    let mut run = Run {
        seed,
        sessions: Vec::new(),
        direct,
        ctx,
        model: Model::new(),
        max_pending: config.max_pending,
        log: Vec::new(),
        step: 0,
        stats: Stats::default(),
    };
    run.connect_sessions().await;
    let mut generator = Gen::new(seed);
    for step in 0..ops {
        run.step = step;
        let op = generate(&mut generator);
        run.execute(op).await;
    }
    run.finish().await;
    println!(
        "model seed {seed}: {:?} in {:?}",
        run.stats,
        started.elapsed()
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Exact,
    Assumed,
}

const TABLES: [Table; 2] = [Table::Exact, Table::Assumed];

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Exact => "m_exact",
            Table::Assumed => "m_assumed",
        }
    }

    fn qualified(self) -> String {
        format!("public.{}", self.name())
    }

    fn index(self) -> usize {
        match self {
            Table::Exact => 0,
            Table::Assumed => 1,
        }
    }
}

/// A statement parameter, typed like its column.
#[derive(Debug, Clone, PartialEq)]
enum Param {
    Int(i32),
    Big(i64),
    Text(Option<String>),
}

impl Param {
    /// The value as an SQL literal (simple Query).
    fn literal(&self) -> String {
        match self {
            Param::Int(v) => v.to_string(),
            Param::Big(v) => v.to_string(),
            Param::Text(None) => "NULL".to_owned(),
            Param::Text(Some(s)) => format!("'{}'", s.replace('\'', "''")),
        }
    }

    /// The value as PostgreSQL text (as a dead letter records it).
    fn as_text(&self) -> Option<String> {
        match self {
            Param::Int(v) => Some(v.to_string()),
            Param::Big(v) => Some(v.to_string()),
            Param::Text(t) => t.clone(),
        }
    }

    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Int(v) => v,
            Param::Big(v) => v,
            Param::Text(v) => v,
        }
    }
}

/// A row: id, v, n.
type RowVal = (i32, Option<String>, i64);

#[derive(Debug, Clone)]
enum Write {
    /// One or two rows; without `with_n` the column is not listed (its default, 0).
    Insert {
        with_n: bool,
        rows: Vec<RowVal>,
    },
    SetV {
        id: i32,
        v: Option<String>,
    },
    SetN {
        id: i32,
        n: i64,
    },
    Add {
        id: i32,
        by: i64,
        minus: bool,
    },
    SetVAdd {
        id: i32,
        v: Option<String>,
        by: i64,
    },
    Delete {
        id: i32,
    },
    /// Not deferrable (a predicate beyond the key): runs write-through after a barrier,
    /// PostgreSQL answers.
    AddIfNotNull {
        id: i32,
        by: i64,
    },
    /// `ON CONFLICT (id) DO NOTHING`: deferred, decided from the key overlay (the key is
    /// read even with assumed row counts); an absent key is journaled as its INSERT.
    InsertOrNothing {
        id: i32,
        v: Option<String>,
    },
    /// A version-checked UPDATE (m_exact only, ADR 0035): `SET v = $2, ver = $3
    /// WHERE id = $1 AND ver = $4`, deferred and decided from what spillway knows of
    /// the row's `ver` (only ever set, or the INSERT's constant default).
    Checked {
        id: i32,
        v: Option<String>,
        expected: i32,
    },
    /// A decrement with a floor (m_exact only, ADR 0035): `SET n = n - $2 WHERE id =
    /// $1 AND n > $3`, decided from the row's `n` as PostgreSQL has it (a read that
    /// knows the flush ledger's position) plus the deltas still pending.
    Floor {
        id: i32,
        by: i64,
        floor: i64,
    },
}

impl Write {
    /// The statement with `$n` placeholders, and its parameters.
    fn statement(&self, t: Table) -> (String, Vec<Param>) {
        let name = t.name();
        match self {
            Write::Insert { with_n, rows } => {
                let width = if *with_n { 3 } else { 2 };
                let mut params = Vec::new();
                let mut tuples = Vec::new();
                for (id, v, n) in rows {
                    let base = params.len();
                    let places: Vec<String> =
                        (1..=width).map(|i| format!("${}", base + i)).collect();
                    tuples.push(format!("({})", places.join(", ")));
                    params.push(Param::Int(*id));
                    params.push(Param::Text(v.clone()));
                    if *with_n {
                        params.push(Param::Big(*n));
                    }
                }
                let cols = if *with_n { "id, v, n" } else { "id, v" };
                (
                    format!("INSERT INTO {name} ({cols}) VALUES {}", tuples.join(", ")),
                    params,
                )
            }
            Write::SetV { id, v } => (
                format!("UPDATE {name} SET v = $1 WHERE id = $2"),
                vec![Param::Text(v.clone()), Param::Int(*id)],
            ),
            Write::SetN { id, n } => (
                format!("UPDATE {name} SET n = $2 WHERE id = $1"),
                vec![Param::Int(*id), Param::Big(*n)],
            ),
            Write::Add { id, by, minus } => (
                format!(
                    "UPDATE {name} SET n = n {} $2 WHERE id = $1",
                    if *minus { '-' } else { '+' }
                ),
                vec![Param::Int(*id), Param::Big(*by)],
            ),
            Write::SetVAdd { id, v, by } => (
                format!("UPDATE {name} SET v = $2, n = n + $3 WHERE id = $1"),
                vec![Param::Int(*id), Param::Text(v.clone()), Param::Big(*by)],
            ),
            Write::Delete { id } => (
                format!("DELETE FROM {name} WHERE id = $1"),
                vec![Param::Int(*id)],
            ),
            Write::AddIfNotNull { id, by } => (
                format!("UPDATE {name} SET n = n + $2 WHERE id = $1 AND n IS NOT NULL"),
                vec![Param::Int(*id), Param::Big(*by)],
            ),
            Write::InsertOrNothing { id, v } => (
                format!("INSERT INTO {name} (id, v) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING"),
                vec![Param::Int(*id), Param::Text(v.clone())],
            ),
            Write::Floor { id, by, floor } => (
                format!("UPDATE {name} SET n = n - $2 WHERE id = $1 AND n > $3"),
                vec![Param::Int(*id), Param::Big(*by), Param::Big(*floor)],
            ),
            Write::Checked { id, v, expected } => (
                format!("UPDATE {name} SET v = $2, ver = $3 WHERE id = $1 AND ver = $4"),
                vec![
                    Param::Int(*id),
                    Param::Text(v.clone()),
                    Param::Int(expected + 1),
                    Param::Int(*expected),
                ],
            ),
        }
    }

    /// The row operations of the journal record, as a dead letter describes each:
    /// (statement shape, parameters key first).
    fn dead_letter_ops(&self, t: Table) -> Vec<(String, Vec<Option<String>>)> {
        let q = t.qualified();
        let text = |p: &Param| p.as_text();
        match self {
            Write::Insert { with_n, rows } => {
                let cols = if *with_n { "id, v, n" } else { "id, v" };
                rows.iter()
                    .map(|(id, v, n)| {
                        let mut params = vec![Some(id.to_string()), v.clone()];
                        if *with_n {
                            params.push(Some(n.to_string()));
                        }
                        (format!("INSERT INTO {q} ({cols})"), params)
                    })
                    .collect()
            }
            Write::SetV { id, v } => vec![(
                format!("UPDATE {q} SET v = ? WHERE <key> = ?"),
                vec![Some(id.to_string()), v.clone()],
            )],
            Write::SetN { id, n } => vec![(
                format!("UPDATE {q} SET n = ? WHERE <key> = ?"),
                vec![Some(id.to_string()), text(&Param::Big(*n))],
            )],
            Write::Add { id, by, minus } => vec![(
                format!(
                    "UPDATE {q} SET n = n {} ? WHERE <key> = ?",
                    if *minus { '-' } else { '+' }
                ),
                vec![Some(id.to_string()), Some(by.to_string())],
            )],
            Write::SetVAdd { id, v, by } => vec![(
                format!("UPDATE {q} SET v = ?, n = n + ? WHERE <key> = ?"),
                vec![Some(id.to_string()), v.clone(), Some(by.to_string())],
            )],
            Write::Delete { id } => vec![(
                format!("DELETE FROM {q} WHERE <key> = ?"),
                vec![Some(id.to_string())],
            )],
            Write::AddIfNotNull { .. }
            | Write::InsertOrNothing { .. }
            | Write::Checked { .. }
            | Write::Floor { .. } => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Read {
    All,
    One(i32),
    Aggregate,
}

impl Read {
    fn statement(self, t: Table) -> (String, Vec<Param>) {
        let name = t.name();
        match self {
            Read::All => (format!("SELECT id, v, n FROM {name} ORDER BY id"), vec![]),
            Read::One(id) => (
                format!("SELECT id, v, n FROM {name} WHERE id = $1"),
                vec![Param::Int(id)],
            ),
            Read::Aggregate => (
                format!("SELECT count(*), coalesce(sum(n), 0)::bigint FROM {name}"),
                vec![],
            ),
        }
    }
}

/// How a session sends a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Simple Query, parameters inlined as literals.
    Simple,
    /// A named statement prepared once per session, then Bind/Execute (binary).
    Prepared,
    /// Prepared for this call only (Parse/Describe, Bind/Execute, Close).
    OneShot,
}

const MODES: [Mode; 3] = [Mode::Simple, Mode::Prepared, Mode::OneShot];

#[derive(Debug, Clone)]
enum Op {
    Write {
        session: usize,
        mode: Mode,
        table: Table,
        write: Write,
    },
    /// Two sessions write one key of the exact table at the same moment.
    Pair {
        sessions: (usize, usize),
        modes: (Mode, Mode),
        writes: (Write, Write),
    },
    Read {
        session: usize,
        mode: Mode,
        table: Table,
        read: Read,
    },
    Flush {
        session: usize,
        table: Option<Table>,
    },
    /// A client transaction on the exact table; see [`TxEnd`].
    Tx {
        session: usize,
        mode: Mode,
        writes: Vec<Write>,
        end: TxEnd,
    },
    /// SIGKILL spillway and start it again.
    Crash,
    /// Terminate backends: see [`Kill`].
    KillUpstream(Kill),
    /// Close `table`'s gate (an advisory lock its statement trigger waits for) while
    /// `writes` are acknowledged; once the flush worker waits there, in the middle of
    /// its batch, terminate its backend, then open the gate. With `crash`, SIGKILL
    /// spillway there instead: its backend, still parked at the gate, holds the ledger
    /// row the new process claims, until the gate opens and it finds its client gone.
    Stall {
        table: Table,
        writes: Vec<(usize, Mode, Table, Write)>,
        crash: bool,
    },
}

/// How a generated transaction ends.
#[derive(Debug, Clone, Copy)]
enum TxEnd {
    Commit,
    Rollback,
    /// A read of the table inside the transaction (spillway replays it upstream),
    /// then COMMIT (upstream).
    ReadThenCommit,
    /// A read of the other table, which the transaction did not write, then COMMIT.
    /// A table without triggers would let it be answered outside the still held
    /// transaction (ADR 0034); the gate trigger on `m_exact` moves the transaction
    /// upstream instead, so it commits there without a record.
    ReadOtherThenCommit,
    /// SIGKILL spillway before COMMIT: nothing of the transaction may survive.
    Crash,
}

/// Whose PostgreSQL backends an upstream failure terminates.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// The flush worker's.
    Flusher,
    /// The flush worker's and the check connection's (exact row counts).
    Internal,
    /// Those and the client sessions': spillway closes each such session (its
    /// PostgreSQL went away), the test waits for that and connects again.
    Sessions,
}

/// What a write was answered: its row count, or the SQLSTATE of its error.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Rows(u64),
    Error(String),
}

/// Result rows as text, NULL as `None`.
type Rows = Vec<Vec<Option<String>>>;

/// The generator: a seeded RNG, and the keys it chose last, which it picks again
/// often (an insert then an update of the same key, a write to a key still pending).
struct Gen {
    rng: StdRng,
    recent: VecDeque<i32>,
}

impl Gen {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            recent: VecDeque::new(),
        }
    }

    fn key(&mut self) -> i32 {
        let key = if !self.recent.is_empty() && self.rng.random_bool(0.4) {
            self.recent[self.rng.random_range(0..self.recent.len())]
        } else {
            self.rng.random_range(1..=KEYS)
        };
        self.recent.push_back(key);
        if self.recent.len() > 4 {
            self.recent.pop_front();
        }
        key
    }
}

fn pick_text(g: &mut Gen) -> Option<String> {
    TEXTS[g.rng.random_range(0..TEXTS.len())].map(str::to_owned)
}

fn generate_write(g: &mut Gen) -> Write {
    let id = g.key();
    match g.rng.random_range(0..100) {
        0..25 => {
            let count = if g.rng.random_bool(0.2) { 2 } else { 1 };
            let with_n = g.rng.random_bool(0.5);
            let mut rows = Vec::new();
            for i in 0..count {
                // A second row mostly has another key; sometimes the same (PostgreSQL
                // refuses the whole statement).
                let id = if i == 0 || g.rng.random_bool(0.15) {
                    id
                } else {
                    g.key()
                };
                let n = if with_n {
                    g.rng.random_range(-50..=50)
                } else {
                    0
                };
                rows.push((id, pick_text(g), n));
            }
            Write::Insert { with_n, rows }
        }
        25..40 => Write::SetV {
            id,
            v: pick_text(g),
        },
        40..48 => Write::SetN {
            id,
            n: g.rng.random_range(-50..=50),
        },
        48..63 => Write::Add {
            id,
            by: g.rng.random_range(0..=9),
            minus: g.rng.random_bool(0.3),
        },
        63..73 => Write::SetVAdd {
            id,
            v: pick_text(g),
            by: g.rng.random_range(0..=9),
        },
        _ => Write::Delete { id },
    }
}

/// A version-checked UPDATE expecting version 0 or 1 (rows start at 0 and each
/// check that holds adds one, so the checks often hold).
fn generate_checked(g: &mut Gen) -> Write {
    if g.rng.random_bool(0.4) {
        return Write::Floor {
            id: g.key(),
            by: g.rng.random_range(1..=5),
            floor: g.rng.random_range(-10..=10),
        };
    }
    Write::Checked {
        id: g.key(),
        v: pick_text(g),
        expected: g.rng.random_range(0..=1),
    }
}

/// A write for a step of its own: sometimes one spillway cannot defer (never in a
/// stall: its barrier would wait for the stuck flush worker), sometimes an upsert.
fn generate_any_write(g: &mut Gen) -> Write {
    match g.rng.random_range(0..100) {
        0..5 => Write::AddIfNotNull {
            id: g.key(),
            by: g.rng.random_range(1..=9),
        },
        5..10 => Write::InsertOrNothing {
            id: g.key(),
            v: pick_text(g),
        },
        _ => generate_write(g),
    }
}

fn generate_pair_write(g: &mut Gen, id: i32) -> Write {
    // Same-key combinations whose two serial orders either give different answers or
    // leave the same state: insert (one row, always the same values), delete, add.
    match g.rng.random_range(0..3) {
        0 => Write::Insert {
            with_n: false,
            rows: vec![(id, Some("pair".to_owned()), 0)],
        },
        1 => Write::Delete { id },
        _ => Write::Add {
            id,
            by: g.rng.random_range(1..=9),
            minus: false,
        },
    }
}

fn pick_table(g: &mut Gen) -> Table {
    TABLES[g.rng.random_range(0..TABLES.len())]
}

fn pick_mode(g: &mut Gen) -> Mode {
    MODES[g.rng.random_range(0..MODES.len())]
}

/// The next operation; depends on the generator alone, so a seed always produces
/// the same sequence.
fn generate(g: &mut Gen) -> Op {
    match g.rng.random_range(0..100) {
        0..6 => Op::Tx {
            session: g.rng.random_range(0..SESSIONS),
            mode: pick_mode(g),
            writes: (0..g.rng.random_range(1..=4))
                .map(|_| {
                    if g.rng.random_bool(0.25) {
                        generate_checked(g)
                    } else {
                        generate_write(g)
                    }
                })
                .collect(),
            end: match g.rng.random_range(0..10) {
                0..4 => TxEnd::Commit,
                4..5 => TxEnd::ReadOtherThenCommit,
                5..7 => TxEnd::Rollback,
                7..9 => TxEnd::ReadThenCommit,
                _ => TxEnd::Crash,
            },
        },
        6..52 => {
            let session = g.rng.random_range(0..SESSIONS);
            let mode = pick_mode(g);
            let table = pick_table(g);
            let write = if table == Table::Exact && g.rng.random_bool(0.15) {
                generate_checked(g)
            } else {
                generate_any_write(g)
            };
            Op::Write {
                session,
                mode,
                table,
                write,
            }
        }
        52..56 => {
            let a = g.rng.random_range(0..SESSIONS);
            let b = (a + g.rng.random_range(1..SESSIONS)) % SESSIONS;
            let id = g.key();
            Op::Pair {
                sessions: (a, b),
                modes: (pick_mode(g), pick_mode(g)),
                writes: (generate_pair_write(g, id), generate_pair_write(g, id)),
            }
        }
        56..80 => Op::Read {
            session: g.rng.random_range(0..SESSIONS),
            mode: pick_mode(g),
            table: pick_table(g),
            read: match g.rng.random_range(0..5) {
                0 | 1 => Read::All,
                2 | 3 => Read::One(g.key()),
                _ => Read::Aggregate,
            },
        },
        80..86 => Op::Flush {
            session: g.rng.random_range(0..SESSIONS),
            table: g.rng.random_bool(0.5).then(|| pick_table(g)),
        },
        86..89 => Op::Crash,
        89..95 => Op::KillUpstream(match g.rng.random_range(0..5) {
            0 | 1 => Kill::Flusher,
            2 | 3 => Kill::Internal,
            _ => Kill::Sessions,
        }),
        _ => {
            let table = pick_table(g);
            let count = g.rng.random_range(1..=5);
            let writes = (0..count)
                .map(|_| {
                    // Mostly the gated table, so the flush worker has to wait there.
                    let t = if g.rng.random_bool(0.75) {
                        table
                    } else {
                        pick_table(g)
                    };
                    (
                        g.rng.random_range(0..SESSIONS),
                        pick_mode(g),
                        t,
                        generate_write(g),
                    )
                })
                .collect();
            Op::Stall {
                table,
                writes,
                crash: g.rng.random_bool(0.3),
            }
        }
    }
}

/// A dead letter as `spillway.dead_letters` stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DeadLetter {
    seq: i64,
    table: String,
    statement: String,
    parameters: Vec<Option<String>>,
    sqlstate: String,
}

/// What PostgreSQL and spillway should hold: applying the acknowledged writes one by
/// one in acknowledgement order (which is journal order, since steps run one at a time).
#[derive(Debug, Clone, PartialEq)]
struct Model {
    tables: [BTreeMap<i32, (Option<String>, i64)>; 2],
    /// Journal records so far; sequence numbers are 1, 2, … across restarts.
    records: u64,
    /// Records per table (a stall waits for the flush worker only if it has one).
    records_by_table: [u64; 2],
    dead: Vec<DeadLetter>,
    /// m_exact's `ver` per row, where it is not 0 (its default).
    ver: BTreeMap<i32, i32>,
}

impl Model {
    fn new() -> Self {
        let pre: BTreeMap<i32, (Option<String>, i64)> = (1..=PRELOADED)
            .map(|g| (g, (Some(format!("pre{g}")), i64::from(g))))
            .collect();
        Self {
            tables: [pre.clone(), pre],
            records: 0,
            records_by_table: [0; 2],
            dead: Vec::new(),
            ver: BTreeMap::new(),
        }
    }

    fn journal(&mut self, t: Table) -> i64 {
        self.records += 1;
        self.records_by_table[t.index()] += 1;
        i64::try_from(self.records).expect("small")
    }

    fn dead_letters(&mut self, t: Table, w: &Write, seq: i64, sqlstate: &str) {
        for (statement, parameters) in w.dead_letter_ops(t) {
            self.dead.push(DeadLetter {
                seq,
                table: t.qualified(),
                statement,
                parameters,
                sqlstate: sqlstate.to_owned(),
            });
        }
    }

    /// Applies `w` to `t` and returns the answer spillway must give.
    fn write(&mut self, t: Table, w: &Write) -> Answer {
        let exact = t == Table::Exact;
        if exact {
            // A row inserted or deleted starts again at the default version.
            match w {
                Write::Insert { rows, .. }
                    if !rows
                        .iter()
                        .any(|r| self.tables[t.index()].contains_key(&r.0)) =>
                {
                    for r in rows {
                        self.ver.remove(&r.0);
                    }
                }
                Write::InsertOrNothing { id, .. } if !self.tables[t.index()].contains_key(id) => {
                    self.ver.remove(id);
                }
                Write::Delete { id } => {
                    self.ver.remove(id);
                }
                _ => {}
            }
        }
        match w {
            Write::Floor { id, by, floor } => {
                let holds = self.tables[t.index()]
                    .get(id)
                    .is_some_and(|row| row.1 > *floor);
                if !holds {
                    return Answer::Rows(0);
                }
                self.journal(t);
                if let Some(row) = self.tables[t.index()].get_mut(id) {
                    row.1 -= by;
                }
                Answer::Rows(1)
            }
            Write::Checked { id, v, expected } => {
                let holds = self.tables[t.index()].contains_key(id)
                    && self.ver.get(id).copied().unwrap_or(0) == *expected;
                if !holds {
                    // Decided from the row: no row written, nothing journaled.
                    return Answer::Rows(0);
                }
                self.journal(t);
                if let Some(row) = self.tables[t.index()].get_mut(id) {
                    row.0.clone_from(v);
                }
                self.ver.insert(*id, expected + 1);
                Answer::Rows(1)
            }
            Write::Insert { rows, .. } => {
                let existing = &self.tables[t.index()];
                let mut ids: Vec<i32> = rows.iter().map(|r| r.0).collect();
                let conflict = ids.iter().any(|id| existing.contains_key(id)) || {
                    ids.sort_unstable();
                    ids.windows(2).any(|p| p[0] == p[1])
                };
                if exact && conflict {
                    return Answer::Error("23505".to_owned());
                }
                let seq = self.journal(t);
                if conflict {
                    // Applied as one record: PostgreSQL refuses it whole.
                    self.dead_letters(t, w, seq, "23505");
                } else {
                    let table = &mut self.tables[t.index()];
                    for (id, v, n) in rows {
                        table.insert(*id, (v.clone(), *n));
                    }
                }
                Answer::Rows(rows.len() as u64)
            }
            Write::InsertOrNothing { id, v } => {
                if self.tables[t.index()].contains_key(id) {
                    // Decided from the key overlay: nothing to do, nothing journaled.
                    Answer::Rows(0)
                } else {
                    // Journaled as the INSERT it resolves to (its key was read, so
                    // never a dead letter, whatever the table's row counts).
                    self.journal(t);
                    self.tables[t.index()].insert(*id, (v.clone(), 0));
                    Answer::Rows(1)
                }
            }
            Write::SetV { id, .. }
            | Write::AddIfNotNull { id, .. }
            | Write::SetN { id, .. }
            | Write::Add { id, .. }
            | Write::SetVAdd { id, .. }
            | Write::Delete { id } => {
                let exists = self.tables[t.index()].contains_key(id);
                if let Write::AddIfNotNull { by, .. } = w {
                    // Write-through: PostgreSQL's answer, nothing journaled.
                    return match self.tables[t.index()].get_mut(id) {
                        Some(row) => {
                            row.1 += by;
                            Answer::Rows(1)
                        }
                        None => Answer::Rows(0),
                    };
                }
                if exact && !exists {
                    return Answer::Rows(0);
                }
                let seq = self.journal(t);
                if !exists {
                    self.dead_letters(t, w, seq, "02000");
                    return Answer::Rows(1);
                }
                let table = &mut self.tables[t.index()];
                let row = table.get_mut(id).expect("exists");
                match w {
                    Write::SetV { v, .. } => row.0.clone_from(v),
                    Write::SetN { n, .. } => row.1 = *n,
                    Write::Add { by, minus, .. } => row.1 += if *minus { -by } else { *by },
                    Write::SetVAdd { v, by, .. } => {
                        row.0.clone_from(v);
                        row.1 += by;
                    }
                    Write::Delete { .. } => {
                        table.remove(id);
                    }
                    Write::Insert { .. }
                    | Write::InsertOrNothing { .. }
                    | Write::AddIfNotNull { .. }
                    | Write::Checked { .. }
                    | Write::Floor { .. } => unreachable!("handled above"),
                }
                Answer::Rows(1)
            }
        }
    }

    fn rows(&self, t: Table) -> Rows {
        self.tables[t.index()]
            .iter()
            .map(|(id, (v, n))| vec![Some(id.to_string()), v.clone(), Some(n.to_string())])
            .collect()
    }

    fn read(&self, t: Table, r: Read) -> Rows {
        match r {
            Read::All => self.rows(t),
            Read::One(id) => self
                .rows(t)
                .into_iter()
                .filter(|row| row[0].as_deref() == Some(id.to_string().as_str()))
                .collect(),
            Read::Aggregate => {
                let table = &self.tables[t.index()];
                let sum: i64 = table.values().map(|(_, n)| n).sum();
                vec![vec![Some(table.len().to_string()), Some(sum.to_string())]]
            }
        }
    }
}

/// `sql` with `$n` replaced by literals (highest first: `$1` never matches in `$10`).
fn inline(sql: &str, params: &[Param]) -> String {
    let mut out = sql.to_owned();
    for (i, p) in params.iter().enumerate().rev() {
        out = out.replace(&format!("${}", i + 1), &p.literal());
    }
    out
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(STEP_LIMIT, f)
        .await
        .map_err(|_| format!("{what}: no answer within {STEP_LIMIT:?}"))
}

fn simple_rows(msgs: &[SimpleQueryMessage]) -> Rows {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

fn typed_rows(rows: &[Row]) -> Result<Rows, String> {
    rows.iter()
        .map(|row| {
            row.columns()
                .iter()
                .enumerate()
                .map(|(i, c)| match *c.type_() {
                    Type::INT4 => Ok(row.get::<_, Option<i32>>(i).map(|v| v.to_string())),
                    Type::INT8 => Ok(row.get::<_, Option<i64>>(i).map(|v| v.to_string())),
                    Type::TEXT => Ok(row.get::<_, Option<String>>(i)),
                    ref other => Err(format!("unexpected column type {other}")),
                })
                .collect()
        })
        .collect()
}

/// One client connection through spillway.
struct Session {
    client: Client,
    prepared: HashMap<String, Statement>,
}

impl Session {
    async fn statement(&mut self, sql: &str) -> Result<Statement, String> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let stmt = within("prepare", self.client.prepare(sql))
            .await?
            .map_err(|e| format!("prepare {sql}: {e:?}"))?;
        self.prepared.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }

    /// Runs a write; its answer, or why there is none.
    async fn write(&mut self, mode: Mode, sql: &str, params: &[Param]) -> Result<Answer, String> {
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(Param::as_sql).collect();
        let result = match mode {
            Mode::Simple => within(sql, self.client.simple_query(&inline(sql, params)))
                .await?
                .map(|msgs| {
                    msgs.iter()
                        .find_map(|m| match m {
                            SimpleQueryMessage::CommandComplete(n) => Some(*n),
                            _ => None,
                        })
                        .unwrap_or(u64::MAX)
                }),
            Mode::Prepared => {
                let stmt = match self.prepared.get(sql) {
                    Some(s) => s.clone(),
                    None => match within("prepare", self.client.prepare(sql)).await? {
                        Ok(s) => {
                            self.prepared.insert(sql.to_owned(), s.clone());
                            s
                        }
                        // Refused at prepare (in a failed transaction: 25P02).
                        Err(e) => match e.code() {
                            Some(code) => return Ok(Answer::Error(code.code().to_owned())),
                            None => return Err(format!("prepare {sql}: {e:?}")),
                        },
                    },
                };
                within(sql, self.client.execute(&stmt, &refs)).await?
            }
            Mode::OneShot => within(sql, self.client.execute(sql, &refs)).await?,
        };
        match result {
            Ok(n) => Ok(Answer::Rows(n)),
            Err(e) => match e.code() {
                Some(code) => Ok(Answer::Error(code.code().to_owned())),
                None => Err(format!("{sql}: {e:?}")),
            },
        }
    }

    async fn read(&mut self, mode: Mode, sql: &str, params: &[Param]) -> Result<Rows, String> {
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(Param::as_sql).collect();
        match mode {
            Mode::Simple => within(sql, self.client.simple_query(&inline(sql, params)))
                .await?
                .map(|m| simple_rows(&m))
                .map_err(|e| format!("{sql}: {e:?}")),
            Mode::Prepared => {
                let stmt = self.statement(sql).await?;
                let rows = within(sql, self.client.query(&stmt, &refs))
                    .await?
                    .map_err(|e| format!("{sql}: {e:?}"))?;
                typed_rows(&rows)
            }
            Mode::OneShot => {
                let rows = within(sql, self.client.query(sql, &refs))
                    .await?
                    .map_err(|e| format!("{sql}: {e:?}"))?;
                typed_rows(&rows)
            }
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    acknowledged: usize,
    /// Writes spillway could not defer (answered by PostgreSQL).
    write_through: usize,
    refused_23505: usize,
    zero_rows: usize,
    pairs: usize,
    transactions: usize,
    /// Transactions spillway held to the end (answered and journaled by spillway).
    held_commits: usize,
    /// Reads of the other table inside held transactions.
    reads_of_other_table: usize,
    reads: usize,
    flushes: usize,
    crashes: usize,
    upstream_kills: usize,
    parked_mid_batch: usize,
    dead_letters: usize,
    records: u64,
    /// Version-checked writes whose check held (one row) and failed (none).
    checked_held: usize,
    checked_failed: usize,
}

struct Run {
    seed: u64,
    // Field order: sessions and the direct client close before the context stops
    // spillway and PostgreSQL.
    sessions: Vec<Session>,
    direct: Client,
    ctx: Context,
    model: Model,
    max_pending: Option<usize>,
    log: Vec<String>,
    step: usize,
    stats: Stats,
}

impl Run {
    /// Prints the log of operations and fails the test with the seed.
    fn fail(&self, msg: impl Display) -> ! {
        // Why a write may have gone upstream: the log's lines about it, and the
        // fallback and held-transaction counters of the current process.
        for l in self
            .ctx
            .proxy
            .logs()
            .lines()
            .filter(|l| l.contains("upstream"))
        {
            eprintln!("PROXY {l}");
        }
        let addr = self.ctx.proxy.metrics_addr();
        let text = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .expect("rt")
                .block_on(crate::metrics::scrape(addr))
        })
        .join()
        .unwrap_or_default();
        for l in text
            .lines()
            .filter(|l| l.contains("held_trans") || l.contains("fallbacks"))
        {
            eprintln!("METRIC {l}");
        }
        eprintln!("--- model log, seed {} ---", self.seed);
        for line in &self.log {
            eprintln!("{line}");
        }
        panic!(
            "model seed {} (replay: MODEL_SEED={}), step {}: {msg}",
            self.seed, self.seed, self.step
        );
    }

    fn note(&mut self, line: String) {
        // With the model's journal position, to line the log up with sequence numbers.
        self.log
            .push(format!("{:4} r{} {line}", self.step, self.model.records));
    }

    async fn connect_sessions(&mut self) {
        self.sessions.clear();
        for _ in 0..SESSIONS {
            let config = format!("{} application_name={CLIENT_APP}", self.ctx.proxy_config());
            self.sessions.push(Session {
                client: connect(&config).await,
                prepared: HashMap::new(),
            });
        }
    }

    async fn execute(&mut self, op: Op) {
        match op {
            Op::Write {
                session,
                mode,
                table,
                write,
            } => self.write(session, mode, table, &write).await,
            Op::Pair {
                sessions,
                modes,
                writes,
            } => self.pair(sessions, modes, writes).await,
            Op::Read {
                session,
                mode,
                table,
                read,
            } => {
                let (sql, params) = read.statement(table);
                let got = self.sessions[session].read(mode, &sql, &params).await;
                let want = self.model.read(table, read);
                self.note(format!("s{session} {mode:?} {sql} {params:?} -> {got:?}"));
                self.stats.reads += 1;
                match got {
                    Ok(rows) if rows == want => {}
                    Ok(rows) => self.fail(format!(
                        "read {sql} {params:?} through spillway\n  got:  {rows:?}\n  want: {want:?}"
                    )),
                    Err(e) => self.fail(e),
                }
            }
            Op::Flush { session, table } => self.flush(session, table).await,
            Op::Tx {
                session,
                mode,
                writes,
                end,
            } => self.transaction(session, mode, &writes, end).await,
            Op::Crash => {
                self.note("crash: SIGKILL, restart".to_owned());
                self.crash().await;
            }
            Op::KillUpstream(kill) => {
                let apps = match kill {
                    Kill::Flusher => format!("'{FLUSH_APP}'"),
                    Kill::Internal => INTERNAL_APPS.to_owned(),
                    Kill::Sessions => format!("{INTERNAL_APPS}, '{CLIENT_APP}'"),
                };
                let killed = self.terminate(&apps).await;
                self.note(format!("terminate backends of {apps}: {killed}"));
                self.stats.upstream_kills += 1;
                if let Kill::Sessions = kill {
                    // The sessions were idle and PostgreSQL still accepts sessions,
                    // so spillway relays their 57P01 and ends them, as PostgreSQL
                    // would. Every operation from here on goes to a new session.
                    self.connect_sessions().await;
                }
            }
            Op::Stall {
                table,
                writes,
                crash,
            } => self.stall(table, writes, crash).await,
        }
    }

    fn count_checked(&mut self, w: &Write, want: &Answer) {
        match (w, want) {
            (Write::Checked { .. } | Write::Floor { .. }, Answer::Rows(1)) => {
                self.stats.checked_held += 1;
            }
            (Write::Checked { .. } | Write::Floor { .. }, _) => self.stats.checked_failed += 1,
            _ => {}
        }
    }

    async fn flush(&mut self, session: usize, table: Option<Table>) {
        let sql = match table {
            Some(t) => format!("SPILLWAY FLUSH {}", t.qualified()),
            None => "SPILLWAY FLUSH".to_owned(),
        };
        let got = within(&sql, self.sessions[session].client.simple_query(&sql)).await;
        self.note(format!(
            "s{session} {sql} -> {:?}",
            got.as_ref().map(|r| r.is_ok())
        ));
        match got {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.fail(format!("{sql}: {e:?}")),
            Err(e) => self.fail(e),
        }
        self.stats.flushes += 1;
        // Everything acknowledged before it is in PostgreSQL now.
        let tables = match table {
            Some(t) => vec![t],
            None => TABLES.to_vec(),
        };
        self.check_postgres(&tables, "after SPILLWAY FLUSH").await;
        if table.is_none() {
            self.check_ledger("after SPILLWAY FLUSH").await;
        }
    }

    /// After a flush of everything: the ledger is at the model's last record (one per
    /// acknowledged deferrable write or held transaction that changes something).
    async fn check_ledger(&mut self, when: &str) {
        let sql = "SELECT last_seq FROM spillway.flush_ledger";
        let ledger: Vec<i64> = match self.direct.query(sql, &[]).await {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            Err(e) => self.fail(format!("{sql}: {e:?}")),
        };
        let want = i64::try_from(self.model.records).expect("small");
        if ledger != [want] {
            self.fail(format!(
                "{when}: flush ledger at {ledger:?}, the model journaled {want} records \
                 (a write ran write-through, or a record was journaled twice)"
            ));
        }
    }

    async fn write(&mut self, session: usize, mode: Mode, table: Table, write: &Write) {
        let (sql, params) = write.statement(table);
        let got = self.sessions[session].write(mode, &sql, &params).await;
        let before = self.model.dead.len();
        let want = self.model.write(table, write);
        self.count_checked(write, &want);
        self.note(format!(
            "s{session} {mode:?} {sql} {params:?} -> {got:?} (model {want:?}{})",
            if self.model.dead.len() > before {
                ", dead letter"
            } else {
                ""
            }
        ));
        if matches!(write, Write::AddIfNotNull { .. }) {
            self.stats.write_through += 1;
        }
        match got {
            Ok(answer) if answer == want => self.count(&answer),
            Ok(answer) => self.fail(format!(
                "write {sql} {params:?}: spillway answered {answer:?}, the model {want:?}"
            )),
            Err(e) => self.fail(e),
        }
    }

    /// Runs `sql` (BEGIN, COMMIT, ROLLBACK) in `session`; any answer but success fails.
    async fn control(&mut self, session: usize, mode: Mode, sql: &str) {
        let got = self.sessions[session].write(mode, sql, &[]).await;
        self.note(format!("s{session} {mode:?} {sql} -> {got:?}"));
        match got {
            Ok(Answer::Rows(_)) => {}
            Ok(other) => self.fail(format!("{sql} answered {other:?}")),
            Err(e) => self.fail(e),
        }
    }

    async fn transaction(&mut self, session: usize, mode: Mode, writes: &[Write], end: TxEnd) {
        let table = Table::Exact;
        self.stats.transactions += 1;
        self.control(session, mode, "BEGIN").await;
        // The transaction's view: the model with its own writes applied in order.
        let mut inside = self.model.clone();
        let mut failed = false;
        let mut wrote = false;
        for w in writes {
            let (sql, params) = w.statement(table);
            let got = self.sessions[session].write(mode, &sql, &params).await;
            let want = if failed {
                Answer::Error("25P02".to_owned())
            } else {
                inside.write(table, w)
            };
            self.count_checked(w, &want);
            self.note(format!(
                "s{session} {mode:?} (in transaction) {sql} {params:?} -> {got:?} (model {want:?})"
            ));
            match (&want, &got) {
                (Answer::Error(_), _) => failed = true,
                (Answer::Rows(n), _) if *n > 0 => wrote = true,
                _ => {}
            }
            match got {
                Ok(answer) if answer == want => {}
                Ok(answer) => self.fail(format!(
                    "write {sql} {params:?} in a transaction: spillway answered {answer:?}, \
                     the model {want:?}"
                )),
                Err(e) => self.fail(e),
            }
        }
        match end {
            TxEnd::Crash => {
                self.note("crash before COMMIT: SIGKILL, restart".to_owned());
                self.crash().await;
            }
            TxEnd::Rollback => self.control(session, mode, "ROLLBACK").await,
            _ if failed => self.control(session, mode, "COMMIT").await,
            TxEnd::Commit => {
                self.control(session, mode, "COMMIT").await;
                // One record for the whole transaction, if it wrote anything.
                let records = self.model.records + u64::from(wrote);
                let by_table = self.model.records_by_table[table.index()] + u64::from(wrote);
                self.model.tables = inside.tables;
                self.model.ver = inside.ver;
                self.model.records = records;
                self.model.records_by_table[table.index()] = by_table;
                self.stats.held_commits += 1;
            }
            TxEnd::ReadThenCommit => {
                let (sql, params) = Read::All.statement(table);
                let got = self.sessions[session].read(mode, &sql, &params).await;
                let want = inside.read(table, Read::All);
                self.note(format!(
                    "s{session} {mode:?} (in transaction) {sql} -> {got:?}"
                ));
                match got {
                    Ok(rows) if rows == want => {}
                    Ok(rows) => self.fail(format!(
                        "read inside a transaction\n  got:  {rows:?}\n  want: {want:?}"
                    )),
                    Err(e) => self.fail(e),
                }
                self.control(session, mode, "COMMIT").await;
                // Committed upstream, as a direct transaction: no journal record.
                self.model.tables = inside.tables;
                self.model.ver = inside.ver;
            }
            TxEnd::ReadOtherThenCommit => {
                let other = Table::Assumed;
                let (sql, params) = Read::All.statement(other);
                let got = self.sessions[session].read(mode, &sql, &params).await;
                let want = inside.read(other, Read::All);
                self.note(format!(
                    "s{session} {mode:?} (in transaction) {sql} -> {got:?}"
                ));
                match got {
                    Ok(rows) if rows == want => {}
                    Ok(rows) => self.fail(format!(
                        "read of another table inside a transaction\n  got:  {rows:?}\n  \
                         want: {want:?}"
                    )),
                    Err(e) => self.fail(e),
                }
                self.stats.reads_of_other_table += 1;
                self.control(session, mode, "COMMIT").await;
                // m_exact has a trigger (the gate): its writes may reach any table,
                // so the read moved the transaction upstream (ADR 0034), and it
                // committed there without a journal record.
                self.model.tables = inside.tables;
                self.model.ver = inside.ver;
            }
        }
    }

    fn count(&mut self, answer: &Answer) {
        match answer {
            Answer::Rows(0) => self.stats.zero_rows += 1,
            Answer::Rows(_) => self.stats.acknowledged += 1,
            Answer::Error(_) => self.stats.refused_23505 += 1,
        }
    }

    async fn pair(
        &mut self,
        sessions: (usize, usize),
        modes: (Mode, Mode),
        writes: (Write, Write),
    ) {
        let table = Table::Exact;
        let (a_sql, a_params) = writes.0.statement(table);
        let (b_sql, b_params) = writes.1.statement(table);
        let (low, high) = (sessions.0.min(sessions.1), sessions.0.max(sessions.1));
        let (left, right) = self.sessions.split_at_mut(high);
        let (sa, sb) = if sessions.0 < sessions.1 {
            (&mut left[low], &mut right[0])
        } else {
            (&mut right[0], &mut left[low])
        };
        let (got_a, got_b) = tokio::join!(
            sa.write(modes.0, &a_sql, &a_params),
            sb.write(modes.1, &b_sql, &b_params)
        );
        self.stats.pairs += 1;
        self.note(format!(
            "pair: s{} {:?} {a_sql} {a_params:?} -> {got_a:?} | s{} {:?} {b_sql} {b_params:?} -> {got_b:?}",
            sessions.0, modes.0, sessions.1, modes.1
        ));
        let (got_a, got_b) = match (got_a, got_b) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => self.fail(e),
        };
        // The answers must be those of one serial order.
        let mut orders = Vec::new();
        for a_first in [true, false] {
            let mut m = self.model.clone();
            let (want_a, want_b) = if a_first {
                let a = m.write(table, &writes.0);
                (a, m.write(table, &writes.1))
            } else {
                let b = m.write(table, &writes.1);
                (m.write(table, &writes.0), b)
            };
            if want_a == got_a && want_b == got_b {
                orders.push(m);
            }
        }
        match orders.as_slice() {
            [] => self.fail(format!(
                "concurrent writes answered {got_a:?} and {got_b:?}: no serial order gives that"
            )),
            [m] => self.model = m.clone(),
            [m1, m2] if m1 == m2 => self.model = m1.clone(),
            _ => self.fail("generator: both serial orders fit but leave different states"),
        }
        self.count(&got_a);
        self.count(&got_b);
    }

    /// PostgreSQL's rows of `tables` must be the model's (m_exact's versions too).
    async fn check_postgres(&mut self, tables: &[Table], when: &str) {
        if tables.contains(&Table::Exact) {
            let sql = "SELECT id, ver FROM m_exact WHERE ver <> 0 ORDER BY id";
            let rows = match within(sql, self.direct.simple_query(sql)).await {
                Ok(Ok(msgs)) => simple_rows(&msgs),
                Ok(Err(e)) => self.fail(format!("direct {sql}: {e:?}")),
                Err(e) => self.fail(e),
            };
            let want: Rows = self
                .model
                .ver
                .iter()
                .map(|(id, v)| vec![Some(id.to_string()), Some(v.to_string())])
                .collect();
            if rows != want {
                self.fail(format!(
                    "{when}: PostgreSQL's versions of m_exact differ from the model\n  \
                     postgres: {rows:?}\n  model:    {want:?}"
                ));
            }
        }
        for t in tables {
            let sql = format!("SELECT id, v, n FROM {} ORDER BY id", t.name());
            let rows = match within(&sql, self.direct.simple_query(&sql)).await {
                Ok(Ok(msgs)) => simple_rows(&msgs),
                Ok(Err(e)) => self.fail(format!("direct {sql}: {e:?}")),
                Err(e) => self.fail(e),
            };
            let want = self.model.rows(*t);
            if rows != want {
                self.fail(format!(
                    "{when}: PostgreSQL's {} differs from the model\n  postgres: {rows:?}\n  model:    {want:?}",
                    t.name()
                ));
            }
        }
    }

    /// Terminates the backends whose application_name is in `apps` (an SQL list).
    async fn terminate(&mut self, apps: &str) -> i64 {
        let sql = format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name IN ({apps}) AND pid <> pg_backend_pid()"
        );
        match within(&sql, self.direct.query_one(&sql, &[])).await {
            Ok(Ok(row)) => row.get(0),
            Ok(Err(e)) => self.fail(format!("{sql}: {e:?}")),
            Err(e) => self.fail(e),
        }
    }

    async fn crash(&mut self) {
        self.sessions.clear();
        self.ctx.proxy.signal("KILL");
        self.ctx.restart_proxy();
        self.stats.crashes += 1;
        // The journal is replayed before the new process serves anything.
        self.check_postgres(&TABLES, "after a crash and restart")
            .await;
        self.connect_sessions().await;
    }

    async fn stall(&mut self, table: Table, writes: Vec<(usize, Mode, Table, Write)>, crash: bool) {
        // Nothing pending: with max_pending, the model then knows which writes would
        // find their table full while the worker is stuck (those are not sent).
        self.flush(0, None).await;
        let lock = connect(&format!(
            "{} application_name=model_lock",
            self.ctx.direct_config()
        ))
        .await;
        let gate = table.index() + 1;
        let sql = format!("SELECT pg_advisory_lock({gate})");
        if let Err(e) = lock.batch_execute(&sql).await {
            self.fail(format!("{sql}: {e:?}"));
        }
        self.note(format!("stall: gate of {} closed", table.name()));
        let start = self.model.records_by_table;
        let before = start[table.index()];
        for (session, mode, t, write) in &writes {
            let journaled = self.model.records_by_table[t.index()] - start[t.index()];
            if self.max_pending.is_some_and(|max| journaled >= max as u64) {
                self.note(format!("stall: {} may be full, write skipped", t.name()));
                continue;
            }
            self.write(*session, *mode, *t, write).await;
        }
        // A FLUSH from another connection makes the worker run now (its interval may
        // be an hour); it returns once the gate is open again.
        let trigger = connect(&format!(
            "{} application_name=model_trigger",
            self.ctx.proxy_config()
        ))
        .await;
        let flush = tokio::spawn(async move {
            let r = trigger.simple_query("SPILLWAY FLUSH").await;
            drop(trigger);
            r.map(|_| ()).map_err(|e| format!("{e:?}"))
        });
        if self.model.records_by_table[table.index()] > before {
            // The worker must reach the gate in the middle of its batch.
            let sql = format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = '{FLUSH_APP}' AND wait_event = 'advisory'"
            );
            let deadline = Instant::now() + BLOCK_LIMIT;
            // Write-back folds a key's writes: an INSERT and a DELETE of one key in the
            // batch cancel, and the batch may never touch the gated table. Then the
            // FLUSH returns without the worker parking (PostgreSQL's rows are still
            // checked below).
            let folds =
                Config::of(self.seed).policy == "write-back" && matches!(table, Table::Exact);
            let mut parked = true;
            loop {
                let waiting: i64 = match self.direct.query_one(&sql, &[]).await {
                    Ok(row) => row.get(0),
                    Err(e) => self.fail(format!("{sql}: {e:?}")),
                };
                if waiting > 0 {
                    break;
                }
                if folds && flush.is_finished() {
                    self.note(format!(
                        "stall: the batch folded {}'s writes away (write-back); no gate reached",
                        table.name()
                    ));
                    parked = false;
                    break;
                }
                if Instant::now() > deadline {
                    self.fail(format!(
                        "the flush worker did not reach the gate of {} within {BLOCK_LIMIT:?}",
                        table.name()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if parked {
                self.stats.parked_mid_batch += 1;
            }
        }
        if crash {
            self.sessions.clear();
            self.ctx.proxy.signal("KILL");
            self.ctx.proxy.kill();
            let sql = format!("SELECT pg_advisory_unlock({gate})");
            if let Err(e) = lock.batch_execute(&sql).await {
                self.fail(format!("{sql}: {e:?}"));
            }
            drop(lock);
            self.note(format!(
                "stall: SIGKILL, gate of {} open, restart",
                table.name()
            ));
            // Its connection died with the process: whatever the FLUSH answered.
            if let Err(e) = within("SPILLWAY FLUSH of a killed process", flush).await {
                self.fail(e);
            }
            self.ctx.restart_proxy();
            self.stats.crashes += 1;
            self.check_postgres(&TABLES, "after a crash in the middle of a batch")
                .await;
            self.connect_sessions().await;
            return;
        }
        let killed = self.terminate(&format!("'{FLUSH_APP}'")).await;
        let sql = format!("SELECT pg_advisory_unlock({gate})");
        if let Err(e) = lock.batch_execute(&sql).await {
            self.fail(format!("{sql}: {e:?}"));
        }
        drop(lock);
        self.note(format!(
            "stall: flush worker terminated ({killed}), gate of {} open",
            table.name()
        ));
        match within("SPILLWAY FLUSH after a stall", flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => self.fail(format!("SPILLWAY FLUSH after a stall: {e}")),
            Ok(Err(e)) => self.fail(format!("flush task: {e}")),
            Err(e) => self.fail(e),
        }
        self.stats.upstream_kills += 1;
        self.check_postgres(&TABLES, "after a stalled batch was killed and retried")
            .await;
    }

    /// Flushes, then compares everything PostgreSQL holds with the model.
    async fn finish(&mut self) {
        self.step += 1;
        match within(
            "final flush",
            self.sessions[0].client.simple_query("SPILLWAY FLUSH"),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.fail(format!("final SPILLWAY FLUSH: {e:?}")),
            Err(e) => self.fail(e),
        }
        self.check_postgres(&TABLES, "at the end").await;
        let sql = "SELECT seq, table_name, statement, parameters, sqlstate \
                   FROM spillway.dead_letters ORDER BY seq, id";
        let dead: Vec<DeadLetter> = match self.direct.query(sql, &[]).await {
            Ok(rows) => rows
                .iter()
                .map(|r| DeadLetter {
                    seq: r.get(0),
                    table: r.get(1),
                    statement: r.get(2),
                    parameters: r.get(3),
                    sqlstate: r.get(4),
                })
                .collect(),
            Err(e) => self.fail(format!("{sql}: {e:?}")),
        };
        if dead != self.model.dead {
            let mut msg = String::from("spillway.dead_letters differs from the model");
            msg.push_str("\n  postgres:");
            for d in &dead {
                msg.push_str(&format!("\n    {d:?}"));
            }
            msg.push_str("\n  model:");
            for d in &self.model.dead {
                msg.push_str(&format!("\n    {d:?}"));
            }
            self.fail(msg);
        }
        self.check_ledger("at the end").await;
        self.stats.dead_letters = dead.len();
        self.stats.records = self.model.records;
    }
}
