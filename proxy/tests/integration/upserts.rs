//! `INSERT … ON CONFLICT (primary key)` on deferred tables (issue 13 item 5): every
//! statement is run through spillway and, the same, directly on a copy of the tables
//! (database `direct`); the answers (row counts, RETURNING rows, errors) must be the
//! same, the upserts must be deferred (PostgreSQL has not seen them before
//! `SPILLWAY FLUSH`), and after the flush both databases must hold the same rows. The
//! keys cover: absent, in PostgreSQL only (nothing pending), pending-inserted and
//! pending-deleted. Arbiters other than the primary key run write-through, counted
//! with their reason.

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::context::{Context, DB, USER, connect};
use crate::metrics::{sample, scrape};

const SCHEMA: &str = "CREATE TABLE public.up_wb (id int PRIMARY KEY, v int NOT NULL DEFAULT 0, \
                        n bigint NOT NULL DEFAULT 0, t text, code text UNIQUE); \
                      CREATE TABLE public.up_wk (id int PRIMARY KEY, v int NOT NULL DEFAULT 0, \
                        n bigint NOT NULL DEFAULT 0, t text, code text UNIQUE); \
                      INSERT INTO public.up_wb (id, v, n, t, code) VALUES \
                        (1, 10, 100, 'one', 'a'), (2, 20, 200, 'two', 'b'), (3, 30, 300, 'three', 'c'); \
                      INSERT INTO public.up_wk SELECT * FROM public.up_wb;";

async fn start() -> Context {
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .before_proxy("CREATE DATABASE direct")
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.up_wb\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.up_wk\"]\npolicy = \"write-back\"\n",
        )
        .start()
        .await;
    ctx.pg
        .psql("direct", SCHEMA)
        .expect("schema of the direct copy");
    ctx
}

/// A statement's answer as the client sees it: rows (as text) and the row count, or
/// the error's SQLSTATE.
#[derive(Debug, PartialEq)]
enum Answer {
    Done(Vec<Vec<Option<String>>>, u64),
    Error(String),
}

async fn answer(client: &Client, sql: &str) -> Answer {
    match client.simple_query(sql).await {
        Ok(msgs) => {
            let mut rows = Vec::new();
            let mut count = None;
            for m in msgs {
                match m {
                    SimpleQueryMessage::Row(r) => {
                        rows.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                    }
                    SimpleQueryMessage::CommandComplete(n) => count = Some(n),
                    _ => {}
                }
            }
            Answer::Done(rows, count.unwrap_or_else(|| panic!("{sql}: no tag")))
        }
        Err(e) => Answer::Error(
            e.code()
                .map_or_else(|| format!("{e:?}"), |c| c.code().to_owned()),
        ),
    }
}

/// Runs `sql` through spillway and directly; asserts the same answer; returns it.
async fn both(proxy: &Client, direct: &Client, sql: &str) -> Answer {
    let ours = answer(proxy, sql).await;
    let theirs = answer(direct, sql).await;
    assert_eq!(ours, theirs, "{sql}: spillway vs PostgreSQL");
    ours
}

/// The same with bind parameters (the extended protocol), returning the row count.
async fn both_params(proxy: &Client, direct: &Client, sql: &str, id: i32, v: i32, n: i64) -> u64 {
    let ours = proxy.execute(sql, &[&id, &v, &n]).await;
    let theirs = direct.execute(sql, &[&id, &v, &n]).await;
    match (ours, theirs) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "{sql} ({id}, {v}, {n}): row counts");
            a
        }
        (a, b) => panic!("{sql}: spillway {a:?}, PostgreSQL {b:?}"),
    }
}

fn contents(ctx: &Context, db: &str, table: &str) -> String {
    ctx.pg
        .psql(
            db,
            &format!("SELECT id, v, n, t, code FROM public.{table} ORDER BY id"),
        )
        .expect("contents")
}

async fn counter(ctx: &Context, name: &str, labels: &str) -> f64 {
    sample(&scrape(ctx.proxy.metrics_addr()).await, name, labels)
}

/// Every fallback of `table`, whatever its reason.
async fn all_fallbacks(ctx: &Context, table: &str) -> f64 {
    let prefix = format!("spillway_fallbacks_total{{table=\"public.{table}\"");
    scrape(ctx.proxy.metrics_addr())
        .await
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn run(table: &str) {
    let ctx = start().await;
    let proxy = ctx.proxy_client().await;
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user={USER} dbname=direct sslmode=disable",
        ctx.pg.port()
    ))
    .await;
    let before = contents(&ctx, DB, table);
    let done = |n: u64| Answer::Done(Vec::new(), n);
    let t = table;
    // A pending DELETE, then an upsert of that key: the key is absent, so it inserts.
    assert_eq!(
        both(&proxy, &direct, &format!("DELETE FROM {t} WHERE id = 3")).await,
        done(1)
    );
    let sql = format!(
        "INSERT INTO {t} (id, v, n) VALUES (3, 33, 1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v"
    );
    assert_eq!(both(&proxy, &direct, &sql).await, done(1));
    // A key only PostgreSQL has: DO NOTHING writes nothing, DO UPDATE updates it.
    let sql = format!("INSERT INTO {t} (id, v, n) VALUES (1, 9, 9) ON CONFLICT (id) DO NOTHING");
    assert_eq!(both(&proxy, &direct, &sql).await, done(0));
    let sql = format!(
        "INSERT INTO {t} (id, v, n, t) VALUES (2, 5, 7, 'x') ON CONFLICT (id) \
         DO UPDATE SET v = EXCLUDED.v, n = {t}.n + EXCLUDED.n"
    );
    assert_eq!(both(&proxy, &direct, &sql).await, done(1));
    // An absent key, then the same key pending-inserted.
    let sql = |v: i32| {
        format!(
            "INSERT INTO {t} (id, v, n, code) VALUES (4, {v}, 1, 'd') ON CONFLICT (id) DO NOTHING"
        )
    };
    assert_eq!(both(&proxy, &direct, &sql(1)).await, done(1));
    assert_eq!(both(&proxy, &direct, &sql(2)).await, done(0));
    // Bind parameters, ON CONSTRAINT, an alias and a subtracted delta.
    let sql = format!(
        "INSERT INTO {t} AS x (id, v, n) VALUES ($1, $2, $3) ON CONFLICT ON CONSTRAINT {t}_pkey \
         DO UPDATE SET n = x.n - EXCLUDED.n, v = $2"
    );
    assert_eq!(both_params(&proxy, &direct, &sql, 4, 40, 5).await, 1);
    assert_eq!(both_params(&proxy, &direct, &sql, 7, 70, 5).await, 1);
    // Several rows: one absent, one in PostgreSQL, one pending.
    let sql = format!(
        "INSERT INTO {t} (id, v, n) VALUES (5, 1, 1), (1, 2, 3), (7, 0, 2) ON CONFLICT (id) \
         DO UPDATE SET n = {t}.n + EXCLUDED.n"
    );
    assert_eq!(both(&proxy, &direct, &sql).await, done(3));
    // `DEFAULT` for a column with a constant default: the same as leaving it out.
    let sql = format!(
        "INSERT INTO {t} (id, v, n) VALUES (10, DEFAULT, 5), (11, DEFAULT, 6) \
         ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n"
    );
    assert_eq!(both(&proxy, &direct, &sql).await, done(2));
    // RETURNING: the inserted row; none when DO NOTHING skips; the updated row's key
    // and `c = EXCLUDED.c` columns.
    let sql = |v: i32, action: &str, returning: &str| {
        format!(
            "INSERT INTO {t} (id, v, n) VALUES (6, {v}, 1) ON CONFLICT (id) {action} RETURNING {returning}"
        )
    };
    let row = |cells: &[&str]| {
        cells
            .iter()
            .map(|c| Some((*c).to_owned()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        both(&proxy, &direct, &sql(1, "DO NOTHING", "id, v")).await,
        Answer::Done(vec![row(&["6", "1"])], 1)
    );
    assert_eq!(
        both(&proxy, &direct, &sql(2, "DO NOTHING", "id")).await,
        Answer::Done(Vec::new(), 0)
    );
    assert_eq!(
        both(
            &proxy,
            &direct,
            &sql(3, "DO UPDATE SET v = EXCLUDED.v", "id, v")
        )
        .await,
        Answer::Done(vec![row(&["6", "3"])], 1)
    );
    assert_eq!(
        all_fallbacks(&ctx, table).await,
        0.0,
        "every statement so far was deferred"
    );
    assert_eq!(
        contents(&ctx, DB, table),
        before,
        "nothing reached PostgreSQL before the flush"
    );
    // Arbiters other than the primary key, and DO UPDATE … WHERE, run write-through
    // (after the pending writes, which they may depend on), with PostgreSQL's answers.
    let fallbacks = [
        (
            format!(
                "INSERT INTO {t} (id, v, code) VALUES (8, 1, 'a') ON CONFLICT (code) DO NOTHING"
            ),
            "on_conflict_not_primary_key",
        ),
        (
            format!("INSERT INTO {t} (id, v) VALUES (1, 1) ON CONFLICT DO NOTHING"),
            "on_conflict_target",
        ),
        (
            format!(
                "INSERT INTO {t} (id, v) VALUES (2, 99) ON CONFLICT (id) \
                 DO UPDATE SET v = EXCLUDED.v WHERE {t}.v < 0"
            ),
            "on_conflict_where",
        ),
    ];
    for (sql, reason) in &fallbacks {
        both(&proxy, &direct, sql).await;
        let labels = format!("table=\"public.{table}\",reason=\"{reason}\"");
        assert_eq!(
            counter(&ctx, "spillway_fallbacks_total", &labels).await,
            1.0,
            "{sql}"
        );
    }
    assert!(matches!(
        answer(&proxy, "SPILLWAY FLUSH").await,
        Answer::Done(..)
    ));
    assert_eq!(
        contents(&ctx, DB, table),
        contents(&ctx, "direct", table),
        "after the flush, spillway's database holds what the direct run wrote"
    );
    let dead = ctx.psql_direct("SELECT count(*) FROM spillway.dead_letters");
    assert_eq!(dead.trim(), "0", "no dead letters");
}

#[tokio::test]
async fn upserts_on_the_primary_key_write_behind() {
    run("up_wb").await;
}

#[tokio::test]
async fn upserts_on_the_primary_key_write_back() {
    run("up_wk").await;
}
