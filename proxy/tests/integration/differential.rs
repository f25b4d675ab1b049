//! Differential test of the read cache: a seeded random mix of cacheable reads
//! (point, range, aggregate, join) and writes (upsert, update, delete) on two small
//! tables, from four spillway sessions in three protocol modes. Steps run one at a
//! time; every read through spillway is repeated at once on a direct connection in the
//! same mode and must return identical rows.
//!
//! All writes go through spillway, so with the default TTL-based invalidation any
//! difference is a cache bug: a missed invalidation, a stale fill stored, or an entry
//! served under the wrong key. Few keys (≤ 50 ids, coarse ranges) keep hits frequent.

use std::collections::HashMap;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use crate::cache::{Rows, row_text, simple, typed, wait_for_cached};
use crate::context::Context;

pub const SEED: u64 = 0x5eed_5111_ba7e;
pub const OPS: usize = 10_000;
pub const CLIENTS: usize = 4;
pub const KEYS: i32 = 50;

pub const SETUP: &str = "
    CREATE TABLE a (id int PRIMARY KEY, n int NOT NULL, s text NOT NULL);
    CREATE TABLE b (id int PRIMARY KEY, g int NOT NULL, x int NOT NULL);
    INSERT INTO a SELECT i, i * 3, 's' || i FROM generate_series(1, 30) i;
    INSERT INTO b SELECT i, i % 4, i * 7 FROM generate_series(1, 30) i;
    CREATE TABLE warm (v int NOT NULL);
    INSERT INTO warm VALUES (0);";

/// (statement, number of int4 parameters `$1..`)
pub const READS: [(&str, usize); 7] = [
    ("SELECT id, n, s FROM a WHERE id = $1", 1),
    (
        "SELECT id, n FROM a WHERE id BETWEEN $1 AND $2 ORDER BY id",
        2,
    ),
    ("SELECT count(*), coalesce(sum(n), 0) FROM a", 0),
    ("SELECT id, g, x FROM b WHERE id = $1", 1),
    ("SELECT g, count(*), sum(x) FROM b GROUP BY g ORDER BY g", 0),
    (
        "SELECT a.id, a.n, b.x FROM a JOIN b ON b.id = a.id WHERE a.id <= $1 ORDER BY a.id",
        1,
    ),
    ("SELECT count(*) FROM b WHERE x > $1", 1),
];

pub const WRITES: [(&str, usize); 7] = [
    (
        "INSERT INTO a VALUES ($1, $2, 's' || ($2::int4)::text) \
         ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n, s = EXCLUDED.s",
        2,
    ),
    ("UPDATE a SET n = n + $2 WHERE id = $1", 2),
    ("DELETE FROM a WHERE id = $1", 1),
    (
        "INSERT INTO b VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        3,
    ),
    ("UPDATE b SET x = x + $2 WHERE id BETWEEN $1 AND $1 + 3", 2),
    ("DELETE FROM b WHERE id = $1", 1),
    (
        "UPDATE b SET x = x + 1 WHERE id IN (SELECT id FROM a WHERE n > $1)",
        1,
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Simple Query with the parameters inlined as literals.
    Simple,
    /// A named statement prepared once per session, Bind/Execute with binary results.
    Prepared,
    /// `query_typed`: the unnamed statement with declared int4 parameters.
    Typed,
}

pub const MODES: [Mode; 3] = [Mode::Simple, Mode::Prepared, Mode::Typed];

/// One connection and the statements it prepared.
pub struct Session {
    pub client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl Session {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            prepared: HashMap::new(),
        }
    }

    /// Runs `sql` with `params`; rows for a read, empty for a write.
    pub async fn run(&mut self, mode: Mode, sql: &'static str, params: &[i32]) -> Rows {
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        match mode {
            Mode::Simple => simple(&self.client, &inline(sql, params)).await,
            Mode::Typed => {
                let typed_params: Vec<(&(dyn ToSql + Sync), Type)> =
                    refs.iter().map(|p| (*p, Type::INT4)).collect();
                typed(&self.client, sql, &typed_params).await
            }
            Mode::Prepared => {
                if !self.prepared.contains_key(sql) {
                    let stmt = self
                        .client
                        .prepare(sql)
                        .await
                        .unwrap_or_else(|e| panic!("prepare {sql}: {e:?}"));
                    self.prepared.insert(sql, stmt);
                }
                let stmt = &self.prepared[sql];
                let rows = self
                    .client
                    .query(stmt, &refs)
                    .await
                    .unwrap_or_else(|e| panic!("{sql} {params:?}: {e:?}"));
                rows.iter().map(row_text).collect()
            }
        }
    }
}

/// `sql` with `$n` replaced by the literal values (highest first, so `$1` never
/// matches inside `$10`).
fn inline(sql: &str, params: &[i32]) -> String {
    let mut out = sql.to_owned();
    for (i, v) in params.iter().enumerate().rev() {
        out = out.replace(&format!("${}", i + 1), &v.to_string());
    }
    out
}

/// Parameters for statement `index` of `READS` or `WRITES`: few distinct values, so
/// the same keys come back often.
pub fn read_params(rng: &mut StdRng, index: usize) -> Vec<i32> {
    match index {
        0 | 3 => vec![rng.random_range(1..=KEYS)],
        1 => {
            let lo = rng.random_range(0..5) * 10;
            vec![lo, lo + 9]
        }
        5 => vec![rng.random_range(1..=5) * 10],
        6 => vec![rng.random_range(0..4) * 50],
        _ => Vec::new(),
    }
}

pub fn write_params(rng: &mut StdRng, index: usize) -> Vec<i32> {
    let id = rng.random_range(1..=KEYS);
    match index {
        0 => vec![id, rng.random_range(-100..100)],
        1 | 4 => vec![id, rng.random_range(-5..=5)],
        3 => vec![id, rng.random_range(0..4), rng.random_range(0..300)],
        6 => vec![rng.random_range(0..150)],
        _ => vec![id],
    }
}

struct Mismatch {
    step: usize,
    client: usize,
    mode: Mode,
    sql: &'static str,
    params: Vec<i32>,
    proxy: Rows,
    direct: Rows,
}

#[tokio::test]
async fn random_reads_and_writes_match_postgres() {
    let ctx = Context::start().await;
    let direct_client = ctx.direct_client().await;
    direct_client.batch_execute(SETUP).await.expect("setup");
    let mut sessions = Vec::new();
    for _ in 0..CLIENTS {
        sessions.push(Session::new(ctx.proxy_client().await));
    }
    // Caching is on (the catalog is loaded) before the run starts.
    wait_for_cached(
        async || simple(&sessions[0].client, "SELECT v FROM warm").await,
        async || simple(&direct_client, "SELECT v FROM warm").await,
        &direct_client,
        "UPDATE warm SET v = v + 1",
    )
    .await;
    let mut direct = Session::new(direct_client);

    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut mismatches = Vec::new();
    let mut reads: HashMap<Mode, usize> = HashMap::new();
    let mut writes = 0;
    for step in 0..OPS {
        let client = rng.random_range(0..CLIENTS);
        let mode = MODES[rng.random_range(0..MODES.len())];
        if rng.random_bool(0.8) {
            let index = rng.random_range(0..READS.len());
            let (sql, arity) = READS[index];
            let params = read_params(&mut rng, index);
            assert_eq!(params.len(), arity, "{sql}");
            let proxy = sessions[client].run(mode, sql, &params).await;
            let want = direct.run(mode, sql, &params).await;
            *reads.entry(mode).or_default() += 1;
            if proxy != want {
                mismatches.push(Mismatch {
                    step,
                    client,
                    mode,
                    sql,
                    params,
                    proxy,
                    direct: want,
                });
            }
        } else {
            let index = rng.random_range(0..WRITES.len());
            let (sql, arity) = WRITES[index];
            let params = write_params(&mut rng, index);
            assert_eq!(params.len(), arity, "{sql}");
            sessions[client].run(mode, sql, &params).await;
            writes += 1;
        }
    }
    println!(
        "{OPS} operations in {:?}: reads {reads:?}, writes {writes}, mismatches {}",
        started.elapsed(),
        mismatches.len()
    );
    for m in mismatches.iter().take(5) {
        println!(
            "step {} client {} {:?}: {} {:?}\n  spillway: {:?}\n  postgres: {:?}",
            m.step, m.client, m.mode, m.sql, m.params, m.proxy, m.direct
        );
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} reads differed from PostgreSQL (first ones printed above)",
        mismatches.len(),
        reads.values().sum::<usize>()
    );
}
