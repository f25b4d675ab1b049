//! A seeded write load for the write-behind fault tests (`crash`, `outage`): several
//! tokio-postgres clients send deferrable writes through spillway — inserts of fresh
//! keys (some two rows in one statement), `n = n + 1` on a few counter rows, deletes of
//! rows they inserted — alternating the simple and the extended protocol, and record
//! for each write whether spillway acknowledged it (CommandComplete), refused it (an
//! error that leaves the session usable) or left it unknown (the connection died
//! before an answer, or the answer was a FATAL or connection-failure error).
//! [`verify`] then checks PostgreSQL against that record: every acknowledged write
//! applied exactly once, an unknown one at most once, a refused one never.
//!
//! With transactions on ([`Load::start_with_transactions`]), some writes are a client
//! transaction instead — `BEGIN`, two inserts, an increment, `COMMIT` — whose rows
//! carry its group name (`v = 'g…'`): [`verify`] checks each group is there whole or
//! not at all, and [`partial_groups`] can check that while the load runs.
//!
//! A client keeps its session for as long as the session is open — an error that
//! leaves it open (a refusal, or a retryable ERROR 08006 from a detached session
//! while PostgreSQL is down) is followed by the next write on the same session — and
//! reconnects when it ends or a request stalls, to whatever port [`Load::port`] holds
//! then (a restarted spillway listens on a new one). Sessions matter: while
//! PostgreSQL is down no new one can be opened (spillway relays authentication).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage, Statement};

use crate::context::{Context, DB, USER};

/// Counter rows `1..=COUNTERS`, present upstream before spillway starts.
pub const COUNTERS: i32 = 8;

/// Both tables, and the counter rows.
pub const SCHEMA: &str = "CREATE TABLE public.load_rows (id bigint PRIMARY KEY, \
                              worker int NOT NULL, v text NOT NULL); \
                          CREATE TABLE public.load_counters (id int PRIMARY KEY, \
                              n bigint NOT NULL DEFAULT 0); \
                          INSERT INTO public.load_counters (id) SELECT generate_series(1, 8);";

/// The `[tables]` sections that make both tables write-behind.
pub fn tables_toml(extra: &str) -> String {
    policy_toml("write-behind", extra)
}

/// The `[tables]` sections that give both tables `policy`.
pub fn policy_toml(policy: &str, extra: &str) -> String {
    format!(
        "[tables.\"public.load_rows\"]\npolicy = \"{policy}\"\n{extra}\n\
         [tables.\"public.load_counters\"]\npolicy = \"{policy}\"\n{extra}\n"
    )
}

/// How long one request may take before the client gives up on it (counted as a
/// stall, and its write as unknown). Generous: this is a liveness bound, not a
/// performance expectation.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Phases a test may mark (for example before / during / after an outage); every
/// acknowledgement is counted under the phase current when it arrived.
pub const PHASES: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Acked(u64),
    Refused,
    Unknown,
}

/// What the clients sent and what spillway answered.
#[derive(Debug, Default)]
pub struct Tally {
    pub acked_inserts: HashSet<i64>,
    pub unknown_inserts: HashSet<i64>,
    pub refused_inserts: HashSet<i64>,
    pub acked_deletes: HashSet<i64>,
    pub unknown_deletes: HashSet<i64>,
    /// Per counter id: increments acknowledged, and increments unknown.
    pub acked_increments: BTreeMap<i32, u64>,
    pub unknown_increments: BTreeMap<i32, u64>,
    /// Statements acknowledged that wrote something (one journal record each).
    pub acked_records: u64,
    /// Statements whose answer never came (each at most one journal record).
    pub unknown_statements: u64,
    /// Refusals by SQLSTATE: errors that leave the session usable, so the write was
    /// not done.
    pub refused: BTreeMap<String, u64>,
    /// Errors that ended the session (FATAL, class 08), by SQLSTATE: those writes are
    /// among the unknown ones.
    pub unknown_by_error: BTreeMap<String, u64>,
    /// Acknowledgements per phase.
    pub acked_by_phase: [u64; PHASES],
    /// Sessions that could not be opened (spillway down, or refusing), per phase.
    pub connect_failures_by_phase: [u64; PHASES],
    /// Requests that got no answer within [`REQUEST_TIMEOUT`].
    pub stalls: u64,
    /// Sessions opened, per phase.
    pub sessions_by_phase: [u64; PHASES],
    /// Answers that are wrong in themselves (a row count other than the rows written).
    pub anomalies: Vec<String>,
    /// The keys of each transaction acknowledged or left unknown.
    pub groups: Vec<Vec<i64>>,
}

impl Tally {
    pub fn acked(&self) -> u64 {
        self.acked_by_phase.iter().sum()
    }

    pub fn unknown(&self) -> u64 {
        self.unknown_statements
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    pub fn merge(&mut self, other: Tally) {
        self.acked_inserts.extend(other.acked_inserts);
        self.unknown_inserts.extend(other.unknown_inserts);
        self.refused_inserts.extend(other.refused_inserts);
        self.acked_deletes.extend(other.acked_deletes);
        self.unknown_deletes.extend(other.unknown_deletes);
        for (k, v) in other.acked_increments {
            *self.acked_increments.entry(k).or_default() += v;
        }
        for (k, v) in other.unknown_increments {
            *self.unknown_increments.entry(k).or_default() += v;
        }
        self.acked_records += other.acked_records;
        self.unknown_statements += other.unknown_statements;
        for (k, v) in other.refused {
            *self.refused.entry(k).or_default() += v;
        }
        for (k, v) in other.unknown_by_error {
            *self.unknown_by_error.entry(k).or_default() += v;
        }
        for i in 0..PHASES {
            self.acked_by_phase[i] += other.acked_by_phase[i];
            self.connect_failures_by_phase[i] += other.connect_failures_by_phase[i];
            self.sessions_by_phase[i] += other.sessions_by_phase[i];
        }
        self.stalls += other.stalls;
        self.anomalies.extend(other.anomalies);
        self.groups.extend(other.groups);
    }
}

/// The running load.
pub struct Load {
    /// The port spillway listens on now; clients read it at every (re)connect.
    pub port: Arc<AtomicU16>,
    /// The phase acknowledgements are counted under.
    pub phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Tally>>,
}

impl Load {
    /// Starts `workers` clients against spillway on `port`, seeded by `seed`.
    pub fn start(workers: usize, seed: u64, port: u16) -> Load {
        Self::start_inner(workers, seed, port, false)
    }

    /// Like [`Load::start`], with client transactions among the writes.
    pub fn start_with_transactions(workers: usize, seed: u64, port: u16) -> Load {
        Self::start_inner(workers, seed, port, true)
    }

    /// Like [`Load::start_with_transactions`], with worker ids (and so keys) from
    /// `first_id` on: two loads with different ranges never write the same row.
    pub fn start_from(workers: usize, first_id: i32, seed: u64, port: u16) -> Load {
        Self::start_ids(workers, first_id, seed, port, true)
    }

    fn start_inner(workers: usize, seed: u64, port: u16, transactions: bool) -> Load {
        Self::start_ids(workers, 0, seed, port, transactions)
    }

    fn start_ids(workers: usize, first_id: i32, seed: u64, port: u16, transactions: bool) -> Load {
        let port = Arc::new(AtomicU16::new(port));
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|w| {
                let worker = Worker {
                    id: first_id + i32::try_from(w).expect("worker id"),
                    rng: StdRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(w as u64)),
                    port: port.clone(),
                    phase: phase.clone(),
                    stop: stop.clone(),
                    next_key: 0,
                    live: Vec::new(),
                    tally: Tally::default(),
                    transactions,
                };
                tokio::spawn(worker.run())
            })
            .collect();
        Load {
            port,
            phase,
            stop,
            workers,
        }
    }

    pub fn set_phase(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Stops the clients (each finishes the request it is in) and merges their tallies.
    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let mut tally = Tally::default();
        for w in self.workers {
            tally.merge(w.await.expect("load worker"));
        }
        tally
    }
}

struct Worker {
    id: i32,
    rng: StdRng,
    port: Arc<AtomicU16>,
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    next_key: i64,
    /// Keys this worker inserted (acknowledged) and has not tried to delete.
    live: Vec<i64>,
    tally: Tally,
    transactions: bool,
}

enum Op {
    Insert(Vec<i64>),
    Increment(i32),
    Delete(i64),
    /// BEGIN; two inserts; an increment; COMMIT.
    Tx([i64; 2], i32),
}

impl Worker {
    async fn run(mut self) -> Tally {
        while !self.stop.load(Ordering::SeqCst) {
            let Some((client, prepared)) = self.connect().await else {
                let phase = self.phase();
                self.tally.connect_failures_by_phase[phase] += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let phase = self.phase();
            self.tally.sessions_by_phase[phase] += 1;
            while !self.stop.load(Ordering::SeqCst) {
                if !self.one_write(&client, &prepared).await || client.is_closed() {
                    break;
                }
            }
        }
        self.tally
    }

    fn phase(&self) -> usize {
        self.phase.load(Ordering::SeqCst).min(PHASES - 1)
    }

    /// A session and its prepared statements (prepared once: a statement prepared per
    /// call is closed behind the write, and a write pipelined behind that Close runs
    /// write-through rather than deferred).
    async fn connect(&self) -> Option<(Client, Prepared)> {
        let config = format!(
            "host=127.0.0.1 port={} user={USER} dbname={DB} sslmode=disable connect_timeout=3",
            self.port.load(Ordering::SeqCst)
        );
        let connecting = async {
            let (client, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let prepared = Prepared {
                insert1: client
                    .prepare("INSERT INTO load_rows (id, worker, v) VALUES ($1, $2, $3)")
                    .await?,
                insert2: client
                    .prepare(
                        "INSERT INTO load_rows (id, worker, v) VALUES ($1, $2, $3), ($4, $2, $5)",
                    )
                    .await?,
                increment: client
                    .prepare("UPDATE load_counters SET n = n + $1 WHERE id = $2")
                    .await?,
                delete: client
                    .prepare("DELETE FROM load_rows WHERE id = $1")
                    .await?,
            };
            Ok::<_, tokio_postgres::Error>((client, prepared))
        };
        tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .ok()?
            .ok()
    }

    fn fresh_key(&mut self) -> i64 {
        self.next_key += 1;
        i64::from(self.id) * 10_000_000 + self.next_key
    }

    /// Sends one write and records its answer; false when the request stalled (the
    /// session is then given up even if it looks open).
    async fn one_write(&mut self, client: &Client, prepared: &Prepared) -> bool {
        let roll = self.rng.random_range(0..100);
        let op = if self.transactions && roll >= 90 {
            let keys = [self.fresh_key(), self.fresh_key()];
            Op::Tx(keys, self.rng.random_range(1..=COUNTERS))
        } else if roll < 10 && !self.live.is_empty() {
            let i = self.rng.random_range(0..self.live.len());
            Op::Delete(self.live.swap_remove(i))
        } else if roll < 55 {
            let rows = if self.rng.random_range(0..5) == 0 {
                2
            } else {
                1
            };
            Op::Insert((0..rows).map(|_| self.fresh_key()).collect())
        } else {
            Op::Increment(self.rng.random_range(1..=COUNTERS))
        };
        let simple = self.rng.random_bool(0.5);
        let request = send(client, prepared, &op, self.id, simple);
        let mut stalled = false;
        let answer = match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(Ok(rows)) => Answer::Acked(rows),
            Ok(Err(e)) => match e.as_db_error() {
                // The session ends with this error (a connection failure): like a
                // connection that dies mid-request, it does not say whether the write
                // took effect.
                Some(db) if ends_session(db) => {
                    *self
                        .tally
                        .unknown_by_error
                        .entry(db.code().code().to_owned())
                        .or_default() += 1;
                    Answer::Unknown
                }
                Some(db) => {
                    *self
                        .tally
                        .refused
                        .entry(db.code().code().to_owned())
                        .or_default() += 1;
                    Answer::Refused
                }
                None => Answer::Unknown,
            },
            Err(_) => {
                self.tally.stalls += 1;
                stalled = true;
                Answer::Unknown
            }
        };
        self.record(&op, answer, simple);
        !stalled
    }

    fn record(&mut self, op: &Op, answer: Answer, simple: bool) {
        let t = &mut self.tally;
        match answer {
            Answer::Acked(rows) => {
                let phase = self.phase.load(Ordering::SeqCst).min(PHASES - 1);
                t.acked_by_phase[phase] += 1;
                t.acked_records += 1;
                let expected = match op {
                    Op::Insert(keys) => keys.len() as u64,
                    // The COMMIT's tag (send checks each statement's).
                    Op::Tx(..) => 0,
                    Op::Increment(_) | Op::Delete(_) => 1,
                };
                if rows != expected {
                    t.anomalies.push(format!(
                        "{} ({}) answered {rows} rows, expected {expected}",
                        describe(op),
                        if simple { "simple" } else { "extended" }
                    ));
                }
                match op {
                    Op::Insert(keys) => {
                        t.acked_inserts.extend(keys);
                        self.live.extend(keys);
                    }
                    // Never deleted later: the group stays whole or absent.
                    Op::Tx(keys, c) => {
                        t.acked_inserts.extend(keys);
                        *t.acked_increments.entry(*c).or_default() += 1;
                        t.groups.push(keys.to_vec());
                    }
                    Op::Increment(c) => *t.acked_increments.entry(*c).or_default() += 1,
                    Op::Delete(k) => {
                        t.acked_deletes.insert(*k);
                    }
                }
            }
            Answer::Unknown => {
                t.unknown_statements += 1;
                match op {
                    Op::Insert(keys) => t.unknown_inserts.extend(keys),
                    Op::Tx(keys, c) => {
                        t.unknown_inserts.extend(keys);
                        *t.unknown_increments.entry(*c).or_default() += 1;
                        t.groups.push(keys.to_vec());
                    }
                    Op::Increment(c) => *t.unknown_increments.entry(*c).or_default() += 1,
                    Op::Delete(k) => {
                        t.unknown_deletes.insert(*k);
                    }
                }
            }
            Answer::Refused => match op {
                Op::Insert(keys) => t.refused_inserts.extend(keys),
                Op::Tx(keys, _) => t.refused_inserts.extend(keys),
                Op::Increment(_) => {}
                // Refused: the row is still there, and may be deleted later.
                Op::Delete(k) => self.live.push(*k),
            },
        }
    }
}

/// A FATAL error, or a connection exception (class 08): the session is over, and the
/// request it answers has an unknown outcome (PostgreSQL's own convention).
fn ends_session(db: &tokio_postgres::error::DbError) -> bool {
    matches!(db.severity(), "FATAL" | "PANIC") || db.code().code().starts_with("08")
}

fn describe(op: &Op) -> String {
    match op {
        Op::Insert(keys) => format!("INSERT of {keys:?}"),
        Op::Increment(c) => format!("increment of counter {c}"),
        Op::Delete(k) => format!("DELETE of {k}"),
        Op::Tx(keys, c) => format!("transaction of {keys:?} and counter {c}"),
    }
}

/// Statements prepared once per session.
struct Prepared {
    insert1: Statement,
    insert2: Statement,
    increment: Statement,
    delete: Statement,
}

/// Sends `op` in the simple or the extended protocol; the command tag's row count.
async fn send(
    client: &Client,
    prepared: &Prepared,
    op: &Op,
    worker: i32,
    simple: bool,
) -> Result<u64, tokio_postgres::Error> {
    if let Op::Tx(keys, c) = op {
        return send_tx(client, prepared, *keys, *c, worker, simple).await;
    }
    if simple {
        let sql = match op {
            Op::Insert(keys) => {
                let values: Vec<String> = keys
                    .iter()
                    .map(|k| format!("({k}, {worker}, 'r{k}')"))
                    .collect();
                format!(
                    "INSERT INTO load_rows (id, worker, v) VALUES {}",
                    values.join(", ")
                )
            }
            Op::Increment(c) => format!("UPDATE load_counters SET n = n + 1 WHERE id = {c}"),
            Op::Delete(k) => format!("DELETE FROM load_rows WHERE id = {k}"),
            Op::Tx(..) => unreachable!("sent by send_tx"),
        };
        let msgs = client.simple_query(&sql).await?;
        Ok(msgs
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::CommandComplete(n) => Some(*n),
                _ => None,
            })
            .unwrap_or(u64::MAX))
    } else {
        match op {
            Op::Insert(keys) => match keys.as_slice() {
                [k] => {
                    client
                        .execute(&prepared.insert1, &[k, &worker, &format!("r{k}")])
                        .await
                }
                [a, b] => {
                    client
                        .execute(
                            &prepared.insert2,
                            &[a, &worker, &format!("r{a}"), b, &format!("r{b}")],
                        )
                        .await
                }
                _ => unreachable!("one or two rows per insert"),
            },
            Op::Increment(c) => client.execute(&prepared.increment, &[&1i64, c]).await,
            Op::Delete(k) => client.execute(&prepared.delete, &[k]).await,
            Op::Tx(..) => unreachable!("sent by send_tx"),
        }
    }
}

/// A client transaction: BEGIN, two inserts of group `g<first key>`, an increment,
/// COMMIT; each statement's row count checked. After an error that leaves the session
/// open, ROLLBACK ends the transaction so the session goes on.
async fn send_tx(
    client: &Client,
    prepared: &Prepared,
    keys: [i64; 2],
    counter: i32,
    worker: i32,
    simple: bool,
) -> Result<u64, tokio_postgres::Error> {
    let group = format!("g{}", keys[0]);
    let body = async {
        client.simple_query("BEGIN").await?;
        for k in keys {
            let rows = if simple {
                let sql = format!(
                    "INSERT INTO load_rows (id, worker, v) VALUES ({k}, {worker}, '{group}')"
                );
                simple_rows(&client.simple_query(&sql).await?)
            } else {
                client
                    .execute(&prepared.insert1, &[&k, &worker, &group])
                    .await?
            };
            assert_eq!(rows, 1, "insert of {k} in a transaction");
        }
        let rows = if simple {
            let sql = format!("UPDATE load_counters SET n = n + 1 WHERE id = {counter}");
            simple_rows(&client.simple_query(&sql).await?)
        } else {
            client
                .execute(&prepared.increment, &[&1i64, &counter])
                .await?
        };
        assert_eq!(rows, 1, "increment of {counter} in a transaction");
        client.simple_query("COMMIT").await?;
        Ok(0)
    };
    let result: Result<u64, tokio_postgres::Error> = body.await;
    if let Err(e) = &result
        && e.as_db_error().is_some_and(|db| !ends_session(db))
    {
        let _ = client.simple_query("ROLLBACK").await;
    }
    result
}

fn simple_rows(msgs: &[SimpleQueryMessage]) -> u64 {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(u64::MAX)
}

/// Groups present in part (some of their rows, not all), read directly: never
/// anything but empty, whenever it is read.
pub async fn partial_groups(direct: &Client) -> Vec<String> {
    direct
        .query(
            "SELECT v FROM load_rows WHERE v LIKE 'g%' GROUP BY v HAVING count(*) <> 2",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
        .unwrap_or_default()
}

/// What PostgreSQL holds compared with what the clients were told.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Acknowledged writes missing: inserted rows absent, deleted rows present,
    /// counters below their acknowledged increments, updates/deletes that found no
    /// row when applied.
    pub lost: u64,
    /// Writes applied more than once: counters above acknowledged + unknown
    /// increments, inserts that hit their own key when applied.
    pub duplicated: u64,
    /// Rows present that no client was told were written or left unknown (refused
    /// inserts applied after all).
    pub phantom: u64,
    pub dead_letters: Vec<String>,
    pub last_seq: u64,
    pub epoch: u64,
    pub ledger_rows: usize,
    /// Transactions present in part.
    pub partial: u64,
    pub details: Vec<String>,
}

/// Compares PostgreSQL (read directly) with `tally`. Call after `SPILLWAY FLUSH`.
pub fn verify(ctx: &Context, tally: &Tally) -> Verdict {
    let mut v = Verdict::default();
    let present: HashSet<i64> = ctx
        .psql_direct("SELECT id FROM load_rows")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse().expect("id"))
        .collect();
    for k in &tally.acked_inserts {
        let deleted = tally.acked_deletes.contains(k) || tally.unknown_deletes.contains(k);
        if !present.contains(k) && !deleted {
            v.lost += 1;
            v.details
                .push(format!("acknowledged insert of {k} missing"));
        }
    }
    for k in &tally.acked_deletes {
        if present.contains(k) {
            v.lost += 1;
            v.details
                .push(format!("acknowledged delete of {k}: row still there"));
        }
    }
    for k in &present {
        if !tally.acked_inserts.contains(k) && !tally.unknown_inserts.contains(k) {
            v.phantom += 1;
            v.details.push(format!(
                "row {k} present but never acknowledged nor unknown (refused: {})",
                tally.refused_inserts.contains(k)
            ));
        }
    }
    for g in &tally.groups {
        let n = g.iter().filter(|k| present.contains(k)).count();
        if n != 0 && n != g.len() {
            v.partial += 1;
            v.details.push(format!(
                "transaction {g:?}: {n} of {} rows present",
                g.len()
            ));
        }
    }
    let counters: HashMap<i32, u64> = ctx
        .psql_direct("SELECT id, n FROM load_counters")
        .lines()
        .filter_map(|l| {
            let (id, n) = l.trim().split_once('|')?;
            Some((id.parse().ok()?, n.parse().ok()?))
        })
        .collect();
    for c in 1..=COUNTERS {
        let n = counters.get(&c).copied().unwrap_or(0);
        let acked = tally.acked_increments.get(&c).copied().unwrap_or(0);
        let unknown = tally.unknown_increments.get(&c).copied().unwrap_or(0);
        if n < acked {
            v.lost += acked - n;
            v.details
                .push(format!("counter {c} = {n} < {acked} acknowledged"));
        }
        if n > acked + unknown {
            v.duplicated += n - acked - unknown;
            v.details.push(format!(
                "counter {c} = {n} > {acked} acknowledged + {unknown} unknown"
            ));
        }
    }
    for line in ctx
        .psql_direct(
            "SELECT seq, sqlstate, statement, message FROM spillway.dead_letters ORDER BY seq",
        )
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        match line.split('|').nth(1) {
            Some("23505") => v.duplicated += 1,
            Some("02000") => v.lost += 1,
            _ => {}
        }
        v.dead_letters.push(line.to_owned());
    }
    let ledger = ctx.psql_direct("SELECT epoch, last_seq FROM spillway.flush_ledger");
    let rows: Vec<&str> = ledger.lines().filter(|l| !l.trim().is_empty()).collect();
    v.ledger_rows = rows.len();
    if let Some((epoch, last)) = rows.first().and_then(|r| r.trim().split_once('|')) {
        v.epoch = epoch.parse().expect("epoch");
        v.last_seq = last.parse().expect("last_seq");
    }
    v
}

/// `SPILLWAY FLUSH` through a fresh session; panics if it fails or takes over `within`.
pub async fn flush(ctx: &Context, within: Duration) {
    let client = ctx.proxy_client().await;
    tokio::time::timeout(within, client.simple_query("SPILLWAY FLUSH"))
        .await
        .expect("SPILLWAY FLUSH returned in time")
        .expect("SPILLWAY FLUSH succeeded");
}
