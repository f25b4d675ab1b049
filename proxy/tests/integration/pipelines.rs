//! Pipelined cycles of deferrable writes (issue 13, point 4): one Parse, Bind/Execute
//! per row, one Sync, as psycopg's `executemany` sends them. Deferred as one record
//! with every Execute answered as PostgreSQL answers it (tags, RETURNING rows); a
//! cycle with a write that cannot be deferred, or that PostgreSQL would refuse (a
//! duplicate key), goes upstream whole and gets PostgreSQL's answers; the session
//! keeps deferring afterwards. A named statement prepared in the cycle itself (psycopg
//! prepares its executemany statement so) is prepared upstream ahead of the cycle and
//! the cycle decided as usual; the writes of one cycle share one `now()`.

use crate::context::{Context, DB, USER};
use crate::metrics::{deferred, sample, scrape};
use crate::wire::{Msg, Raw, bind, describe_portal, execute, parse, query, sync, tags};

const SCHEMA: &str = "CREATE TABLE public.pl (id int PRIMARY KEY, v text); \
    CREATE TABLE public.pls (id bigserial PRIMARY KEY, v text NOT NULL); \
    CREATE TABLE public.plt (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());";

async fn start() -> Context {
    Context::builder()
        .before_proxy(SCHEMA)
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.pl\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.pls\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.plt\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await
}

fn fallbacks(metrics: &str, table: &str, reason: &str) -> f64 {
    sample(
        metrics,
        "spillway_fallbacks_total",
        &format!("table=\"public.{table}\",reason=\"{reason}\""),
    )
}

/// `INSERT INTO pl` of each (id, v) in one cycle: Parse once, Bind/Describe/Execute
/// per row, one Sync.
fn executemany(rows: &[(&str, &str)]) -> Vec<u8> {
    let mut script = parse("", "INSERT INTO pl (id, v) VALUES ($1, $2)");
    for (id, v) in rows {
        script.extend(bind("", "", &[Some(id), Some(v)]));
        script.extend(describe_portal(""));
        script.extend(execute("", 0));
    }
    script.extend(sync());
    script
}

fn values(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            // One column: count (2), length (4), text.
            String::from_utf8_lossy(&m.body[6..]).into_owned()
        })
        .collect()
}

async fn count(ctx: &Context, sql: &str) -> i64 {
    ctx.direct_client()
        .await
        .query_one(sql, &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn a_pipelined_cycle_of_writes_is_deferred_as_one_record() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&executemany(&[("1", "a"), ("2", "b"), ("3", "c")]))
        .await;
    let msgs = raw.until(b'Z').await;
    // As PostgreSQL answers it.
    let mut direct = Raw::startup(crate::cache::direct_addr(&ctx), USER, DB).await;
    direct.send(&query("BEGIN")).await;
    direct.until(b'Z').await;
    direct
        .send(&executemany(&[("1", "a"), ("2", "b"), ("3", "c")]))
        .await;
    let theirs = direct.until(b'Z').await;
    direct.send(&query("ROLLBACK")).await;
    direct.until(b'Z').await;
    assert_eq!(tags(&msgs), "12nC2nC2nCZ");
    let strip = |m: &[Msg]| -> Vec<(u8, Vec<u8>)> {
        m.iter()
            .take(m.len() - 1)
            .map(|m| (m.tag, m.body.clone()))
            .collect()
    };
    assert_eq!(strip(&msgs), strip(&theirs));
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(deferred(&metrics, "pl"), 3.0, "{metrics}");
    assert_eq!(fallbacks(&metrics, "pl", "pipelined"), 0.0);
    assert_eq!(count(&ctx, "SELECT count(*) FROM pl").await, 0, "deferred");

    // A duplicate key in the middle: the whole cycle goes upstream (after the pending
    // writes), PostgreSQL answers the first Execute, refuses the second, skips the
    // third, and rolls the first back.
    raw.send(&executemany(&[("10", "x"), ("2", "dup"), ("11", "y")]))
        .await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "12nC2nEZ");
    let err = msgs.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(err.code().as_deref(), Some("23505"));
    assert_eq!(
        count(&ctx, "SELECT count(*) FROM pl WHERE id IN (10, 11)").await,
        0
    );
    // The session keeps deferring (no permanent fallback).
    raw.send(&executemany(&[("20", "p"), ("21", "q")])).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "12nC2nCZ");
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(deferred(&metrics, "pl"), 5.0, "{metrics}");
    assert_eq!(fallbacks(&metrics, "pl", "pipelined"), 3.0, "{metrics}");
    raw.send(&query("SPILLWAY FLUSH")).await;
    raw.until(b'Z').await;
    let stored: Vec<(i32, String)> = ctx
        .direct_client()
        .await
        .query("SELECT id, v FROM pl ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: Vec<(i32, String)> = [(1, "a"), (2, "b"), (3, "c"), (20, "p"), (21, "q")]
        .iter()
        .map(|(i, v)| (*i, (*v).to_owned()))
        .collect();
    assert_eq!(stored, want);
}

#[tokio::test]
async fn pipelined_inserts_returning_reserved_keys_match_the_stored_rows() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut script = parse("", "INSERT INTO pls (v) VALUES ($1) RETURNING id");
    for v in ["a", "b", "c", "d"] {
        script.extend(bind("", "", &[Some(v)]));
        script.extend(describe_portal(""));
        script.extend(execute("", 0));
    }
    script.extend(sync());
    raw.send(&script).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "12TDC2TDC2TDC2TDCZ");
    let ids = values(&msgs);
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(deferred(&metrics, "pls"), 4.0, "{metrics}");
    raw.send(&query("SPILLWAY FLUSH")).await;
    raw.until(b'Z').await;
    let stored: Vec<(String, String)> = ctx
        .direct_client()
        .await
        .query("SELECT id::text, v FROM pls ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let told: Vec<(String, String)> = ids
        .into_iter()
        .zip(["a", "b", "c", "d"].map(str::to_owned))
        .collect();
    assert_eq!(stored, told);
}

#[tokio::test]
async fn a_pipelined_cycle_inside_a_held_transaction_joins_it() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&query("BEGIN")).await;
    assert_eq!(tags(&raw.until(b'Z').await), "CZ");
    raw.send(&executemany(&[("1", "a"), ("2", "b")])).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "12nC2nCZ");
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"T".to_vec()));
    raw.send(&query("COMMIT")).await;
    assert_eq!(tags(&raw.until(b'Z').await), "CZ");
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(deferred(&metrics, "pl"), 2.0, "{metrics}");
    assert_eq!(count(&ctx, "SELECT count(*) FROM pl").await, 0, "deferred");

    // A duplicate key: the transaction moves upstream and PostgreSQL answers the cycle
    // (the first Execute, then 23505); the transaction is failed, as directly.
    raw.send(&query("BEGIN")).await;
    raw.until(b'Z').await;
    raw.send(&executemany(&[("3", "c"), ("1", "dup"), ("4", "d")]))
        .await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "12nC2nEZ");
    let err = msgs.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(err.code().as_deref(), Some("23505"));
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"E".to_vec()));
    raw.send(&query("ROLLBACK")).await;
    raw.until(b'Z').await;
    raw.send(&query("SPILLWAY FLUSH")).await;
    raw.until(b'Z').await;
    let ids: Vec<i32> = ctx
        .direct_client()
        .await
        .query("SELECT id FROM pl ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2]);
}

/// `INSERT INTO plt (id)` of each id through named statement `name`, parsed in the
/// same cycle when `parse`.
fn named_executemany(name: &str, parse_it: bool, ids: &[&str]) -> Vec<u8> {
    let mut script = if parse_it {
        parse(name, "INSERT INTO plt (id) VALUES ($1)")
    } else {
        Vec::new()
    };
    for id in ids {
        script.extend(bind("", name, &[Some(id)]));
        script.extend(describe_portal(""));
        script.extend(execute("", 0));
    }
    script.extend(sync());
    script
}

#[tokio::test]
async fn a_named_statement_prepared_in_its_pipelined_cycle_is_deferred() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut direct = Raw::startup(crate::cache::direct_addr(&ctx), USER, DB).await;
    let strip =
        |m: &[Msg]| -> Vec<(u8, Vec<u8>)> { m.iter().map(|m| (m.tag, m.body.clone())).collect() };
    raw.send(&named_executemany("s_ins", true, &["1", "2", "3"]))
        .await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "12nC2nC2nCZ");
    direct.send(&query("BEGIN")).await;
    direct.until(b'Z').await;
    direct
        .send(&named_executemany("s_ins", true, &["1", "2", "3"]))
        .await;
    let theirs = direct.until(b'Z').await;
    let n = theirs.len() - 1;
    assert_eq!(strip(&msgs[..n]), strip(&theirs[..n]));
    direct.send(&query("ROLLBACK")).await;
    direct.until(b'Z').await;
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"I".to_vec()));
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(deferred(&metrics, "plt"), 3.0, "{metrics}");
    assert_eq!(fallbacks(&metrics, "plt", "pipelined"), 0.0, "{metrics}");
    assert_eq!(count(&ctx, "SELECT count(*) FROM plt").await, 0, "deferred");

    // The statement exists upstream: a cycle that goes there (a duplicate key, after
    // the pending rows) runs it, and PostgreSQL refuses the second row.
    raw.send(&named_executemany("s_ins", false, &["4", "1"]))
        .await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "2nC2nEZ");
    let err = msgs.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(err.code().as_deref(), Some("23505"));

    // Preparing the name again: PostgreSQL refuses the Parse (42P05) and skips the
    // rest of the cycle, as directly; nothing is deferred, the session goes on.
    raw.send(&named_executemany("s_ins", true, &["7"])).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "EZ");
    let err = msgs.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(err.code().as_deref(), Some("42P05"));
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"I".to_vec()));
    raw.send(&named_executemany("s_two", true, &["8", "9"]))
        .await;
    assert_eq!(tags(&raw.until(b'Z').await), "12nC2nCZ");
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(deferred(&metrics, "plt"), 5.0, "{metrics}");

    raw.send(&query("SPILLWAY FLUSH")).await;
    raw.until(b'Z').await;
    let c = ctx.direct_client().await;
    let ids: Vec<i32> = c
        .query("SELECT id FROM plt ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2, 3, 8, 9]);
    // One implicit transaction, one now(): per cycle.
    let distinct: i64 = c
        .query_one(
            "SELECT count(DISTINCT at) FROM plt WHERE id IN (1, 2, 3)",
            &[],
        )
        .await
        .expect("distinct")
        .get(0);
    assert_eq!(distinct, 1, "the cycle's rows share now()");
    let two: i64 = c
        .query_one("SELECT count(DISTINCT at) FROM plt", &[])
        .await
        .expect("distinct")
        .get(0);
    assert_eq!(two, 2, "two cycles, two now()");
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM spillway.dead_letters")
            .trim(),
        "0"
    );
}

#[tokio::test]
async fn a_named_statement_prepared_in_a_held_transactions_cycle_joins_it() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&query("BEGIN")).await;
    assert_eq!(tags(&raw.until(b'Z').await), "CZ");
    raw.send(&named_executemany("h_ins", true, &["1", "2"]))
        .await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "12nC2nCZ");
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"T".to_vec()));
    raw.send(&query("COMMIT")).await;
    assert_eq!(tags(&raw.until(b'Z').await), "CZ");
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(deferred(&metrics, "plt"), 2.0, "{metrics}");
    assert_eq!(count(&ctx, "SELECT count(*) FROM plt").await, 0, "deferred");

    // A Parse PostgreSQL refuses (the name exists) fails the transaction, as it would
    // have: 42P05, status E, and ROLLBACK ends it.
    raw.send(&query("BEGIN")).await;
    raw.until(b'Z').await;
    raw.send(&named_executemany("h_ins", true, &["3"])).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "EZ");
    let err = msgs.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(err.code().as_deref(), Some("42P05"));
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"E".to_vec()));
    raw.send(&named_executemany("h_ins", false, &["4"])).await;
    let msgs = raw.until(b'Z').await;
    let err = msgs.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(err.code().as_deref(), Some("25P02"));
    raw.send(&query("ROLLBACK")).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "CZ");
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"I".to_vec()));
    raw.send(&query("SPILLWAY FLUSH")).await;
    raw.until(b'Z').await;
    let ids: Vec<i32> = ctx
        .direct_client()
        .await
        .query("SELECT id FROM plt ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2]);
}

#[tokio::test]
async fn a_held_named_cycle_that_cannot_be_deferred_counts_each_write_once() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&query("BEGIN")).await;
    assert_eq!(tags(&raw.until(b'Z').await), "CZ");
    // Deferrable shape, but a value it cannot carry (a clock word): the transaction
    // moves upstream and PostgreSQL runs the cycle.
    let mut script = parse("h_bad", "INSERT INTO plt (id, at) VALUES ($1, $2)");
    for id in ["1", "2"] {
        script.extend(bind("", "h_bad", &[Some(id), Some("now")]));
        script.extend(describe_portal(""));
        script.extend(execute("", 0));
    }
    script.extend(sync());
    raw.send(&script).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "12nC2nCZ");
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"T".to_vec()));
    raw.send(&query("COMMIT")).await;
    assert_eq!(tags(&raw.until(b'Z').await), "CZ");
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    let writes: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("spillway_client_writes_total{table=\"public.plt\""))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    assert_eq!(writes, 2.0, "{metrics}");
    assert_eq!(count(&ctx, "SELECT count(*) FROM plt").await, 2);
}

#[tokio::test]
async fn a_named_statement_described_in_its_pipelined_cycle_is_deferred() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut direct = Raw::startup(crate::cache::direct_addr(&ctx), USER, DB).await;
    // As psycopg prepares: Parse, Describe of the statement, then the rows.
    let script = |ids: &[&str]| {
        let mut s = parse("s_desc", "INSERT INTO plt (id) VALUES ($1)");
        s.extend(crate::wire::describe_statement("s_desc"));
        s.extend(named_executemany("s_desc", false, ids));
        s
    };
    raw.send(&script(&["1", "2"])).await;
    let msgs = raw.until(b'Z').await;
    direct.send(&query("BEGIN")).await;
    direct.until(b'Z').await;
    direct.send(&script(&["1", "2"])).await;
    let theirs = direct.until(b'Z').await;
    direct.send(&query("ROLLBACK")).await;
    direct.until(b'Z').await;
    assert_eq!(tags(&msgs), "1tn2nC2nCZ");
    let strip = |m: &[Msg]| -> Vec<(u8, Vec<u8>)> {
        m.iter()
            .take(m.len() - 1)
            .map(|m| (m.tag, m.body.clone()))
            .collect()
    };
    assert_eq!(strip(&msgs), strip(&theirs));
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(deferred(&metrics, "plt"), 2.0, "{metrics}");
    assert_eq!(count(&ctx, "SELECT count(*) FROM plt").await, 0, "deferred");
}

/// psycopg's executemany in a transaction as SQLAlchemy's ORM flushes rows of two
/// parameter-type sets (the SQLAlchemy shop's sessions): BEGIN in a cycle of its own,
/// a held write, then one cycle preparing a named statement per set. The first Parse
/// goes ahead of the cycle, the second is held in it, so the cycle moves the
/// transaction upstream (behind the barrier on a pending write, held up here by a
/// lock) and PostgreSQL answers it, once: psycopg's Flush after the Sync arrives while
/// the Sync waits (when it is read decides whether the relay's turn that ends a wait
/// also reads it; `held_wire::a_message_is_not_offered_again_while_it_waits_for_the_replay`
/// pins that case down).
#[tokio::test]
async fn a_held_cycle_with_a_parse_sent_ahead_moves_the_transaction_upstream_once() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&executemany(&[("1", "a"), ("2", "b")])).await;
    raw.until(b'Z').await;
    assert_eq!(count(&ctx, "SELECT count(*) FROM pl").await, 0, "pending");
    let lock = ctx.direct_client().await;
    lock.batch_execute("BEGIN; LOCK TABLE pl IN SHARE MODE")
        .await
        .expect("lock");
    let mut begin = parse("", "BEGIN ISOLATION LEVEL READ COMMITTED");
    begin.extend(bind("", "", &[]));
    begin.extend(describe_portal(""));
    begin.extend(execute("", 0));
    begin.extend(sync());
    raw.send(&begin).await;
    assert_eq!(tags(&raw.until(b'Z').await), "12nCZ");
    raw.send(&query("INSERT INTO pl (id, v) VALUES (7, 'held')"))
        .await;
    assert_eq!(tags(&raw.until(b'Z').await), "CZ");
    let mut cycle = parse("ma", "INSERT INTO pl (id, v) VALUES ($1, $2)");
    for id in ["3", "4"] {
        cycle.extend(bind("", "ma", &[Some(id), Some("x")]));
        cycle.extend(describe_portal(""));
        cycle.extend(execute("", 0));
    }
    cycle.extend(parse("mb", "INSERT INTO pl (id) VALUES ($1)"));
    for id in ["5", "6"] {
        cycle.extend(bind("", "mb", &[Some(id)]));
        cycle.extend(describe_portal(""));
        cycle.extend(execute("", 0));
    }
    cycle.extend(sync());
    raw.send(&cycle).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    raw.send(&crate::wire::flush()).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    lock.batch_execute("COMMIT").await.expect("unlock");
    let msgs = raw.until(b'Z').await;
    assert_eq!(
        tags(&msgs),
        "12nC2nC12nC2nCZ",
        "{:?}",
        msgs.iter().find_map(Msg::message)
    );
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"T".to_vec()));
    raw.send(&query("COMMIT")).await;
    assert_eq!(tags(&raw.until(b'Z').await), "CZ");
    let ids: Vec<i32> = ctx
        .direct_client()
        .await
        .query("SELECT id FROM pl ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 7]);
}
