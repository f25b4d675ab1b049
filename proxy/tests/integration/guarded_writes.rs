//! Writes whose outcome depends on a column beyond the key (issue 13 item 8, ADR 0035):
//! the version-checked `UPDATE … WHERE id = $1 AND version = $2` of ORMs (and its
//! DELETE). Each statement runs through spillway and, the same, directly on a copy of
//! the table (database `direct`); the answers must be PostgreSQL's, the writes deferred
//! (PostgreSQL has not seen them before `SPILLWAY FLUSH`), and both databases must hold
//! the same rows after the flush. Also: two sessions contending for one row, a writer
//! bypassing spillway before the decision and between COMMIT and the flush, and a row
//! spillway does not know exactly (a delta pending on the version), which runs upstream
//! with its own reason.

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::context::{Context, DB, USER, connect};
use crate::metrics::{sample, scrape};

const SCHEMA: &str = "CREATE TABLE public.gw (id int PRIMARY KEY, stock int NOT NULL, \
                        version int NOT NULL, name text); \
                      INSERT INTO public.gw SELECT g, 100, 1, 'p' || g FROM generate_series(1, 6) g; \
                      CREATE TABLE public.gwt (id int PRIMARY KEY, stock int NOT NULL, \
                        version int NOT NULL); \
                      CREATE FUNCTION public.gwt_touch() RETURNS trigger LANGUAGE plpgsql AS \
                        $$BEGIN RETURN NEW; END$$; \
                      CREATE TRIGGER touch BEFORE UPDATE ON public.gwt \
                        FOR EACH ROW EXECUTE FUNCTION public.gwt_touch(); \
                      INSERT INTO public.gwt SELECT g, 100, 1 FROM generate_series(1, 6) g;";

async fn start() -> Context {
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .before_proxy("CREATE DATABASE direct")
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.gw\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.gwt\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await;
    ctx.pg
        .psql("direct", SCHEMA)
        .expect("schema of the direct copy");
    ctx
}

async fn direct_client(ctx: &Context) -> Client {
    connect(&format!(
        "host=127.0.0.1 port={} user={USER} dbname=direct sslmode=disable",
        ctx.pg.port()
    ))
    .await
}

/// A statement's row count, or its error's SQLSTATE.
async fn answer(client: &Client, sql: &str) -> Result<u64, String> {
    match client.simple_query(sql).await {
        Ok(msgs) => Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::CommandComplete(n) => Some(n),
                _ => None,
            })
            .next_back()
            .unwrap_or(0)),
        Err(e) => Err(e
            .code()
            .map_or_else(|| format!("{e:?}"), |c| c.code().to_owned())),
    }
}

/// Runs `sql` through spillway and directly; asserts the same answer; returns it.
async fn both(proxy: &Client, direct: &Client, sql: &str) -> Result<u64, String> {
    let ours = answer(proxy, sql).await;
    let theirs = answer(direct, sql).await;
    assert_eq!(ours, theirs, "{sql}: spillway vs PostgreSQL");
    ours
}

/// The version-checked UPDATE as ORMs send it, with bind parameters, both ways.
async fn both_checked(proxy: &Client, direct: &Client, id: i32, stock: i32, version: i32) -> u64 {
    let sql = "UPDATE gw SET stock = $1, version = $2 WHERE id = $3 AND version = $4";
    let args: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&stock, &(version + 1), &id, &version];
    let ours = proxy.execute(sql, &args).await.expect("through spillway");
    let theirs = direct.execute(sql, &args).await.expect("directly");
    assert_eq!(ours, theirs, "{sql} ({id}, {stock}, {version}): row counts");
    ours
}

fn contents(ctx: &Context, db: &str) -> String {
    ctx.pg
        .psql(
            db,
            "SELECT id, stock, version, name FROM public.gw ORDER BY id",
        )
        .expect("contents")
}

async fn counter(ctx: &Context, name: &str, labels: &str) -> f64 {
    sample(&scrape(ctx.proxy.metrics_addr()).await, name, labels)
}

async fn deferred(ctx: &Context) -> f64 {
    counter(
        ctx,
        "spillway_client_writes_total",
        "policy=\"write-behind\",table=\"public.gw\"",
    )
    .await
}

/// Every fallback of the table, whatever its reason.
async fn all_fallbacks(ctx: &Context) -> f64 {
    let prefix = "spillway_fallbacks_total{";
    scrape(ctx.proxy.metrics_addr())
        .await
        .lines()
        .filter(|l| l.starts_with(prefix) && l.contains("table=\"public.gw\""))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test]
async fn version_checked_writes_are_deferred_and_answered_as_postgres_answers_them() {
    let ctx = start().await;
    let proxy = ctx.proxy_client().await;
    let direct = direct_client(&ctx).await;
    let seeded = contents(&ctx, DB);

    // Read-modify-write in a transaction, as an ORM does: the read is answered
    // outside the held transaction, the checked UPDATE decided from the row.
    for c in [&proxy, &direct] {
        answer(c, "BEGIN").await.expect("BEGIN");
        let rows = c
            .query("SELECT stock, version FROM gw WHERE id = $1", &[&1i32])
            .await
            .expect("read");
        assert_eq!(rows.len(), 1);
    }
    assert_eq!(both_checked(&proxy, &direct, 1, 99, 1).await, 1);
    // Its own write now decides the next check: version 2.
    assert_eq!(both_checked(&proxy, &direct, 1, 98, 1).await, 0);
    assert_eq!(both_checked(&proxy, &direct, 1, 98, 2).await, 1);
    both(&proxy, &direct, "COMMIT").await.expect("COMMIT");
    assert_eq!(
        counter(
            &ctx,
            "spillway_held_transactions_total",
            "outcome=\"committed\""
        )
        .await,
        1.0,
        "the transaction stayed held and was journaled"
    );

    // Autocommit, against the pending write (version 3 now) and against PostgreSQL's
    // row (id 2, nothing pending), in the simple protocol too.
    assert_eq!(both_checked(&proxy, &direct, 1, 50, 2).await, 0);
    assert_eq!(both_checked(&proxy, &direct, 1, 50, 3).await, 1);
    assert_eq!(both_checked(&proxy, &direct, 2, 70, 2).await, 0);
    assert_eq!(
        both(
            &proxy,
            &direct,
            "UPDATE gw SET stock = 70, version = 2 WHERE id = 2 AND version = 1"
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        both(
            &proxy,
            &direct,
            "UPDATE gw SET stock = stock - 1 WHERE version = 2 AND id = 2"
        )
        .await,
        Ok(1)
    );
    // A NULL version never matches; a missing row neither.
    let null: Option<i32> = None;
    let sql = "UPDATE gw SET stock = 1 WHERE id = $1 AND version = $2";
    for c in [&proxy, &direct] {
        assert_eq!(c.execute(sql, &[&3i32, &null]).await.ok(), Some(0), "{sql}");
    }
    assert_eq!(
        both(
            &proxy,
            &direct,
            "UPDATE gw SET stock = 1 WHERE id = 99 AND version = 1"
        )
        .await,
        Ok(0)
    );
    // Version-checked DELETEs.
    assert_eq!(
        both(
            &proxy,
            &direct,
            "DELETE FROM gw WHERE id = 4 AND version = 2"
        )
        .await,
        Ok(0)
    );
    assert_eq!(
        both(
            &proxy,
            &direct,
            "DELETE FROM gw WHERE id = 4 AND version = 1"
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        both(
            &proxy,
            &direct,
            "UPDATE gw SET stock = 1 WHERE id = 4 AND version = 1"
        )
        .await,
        Ok(0)
    );

    // Nothing reached PostgreSQL yet: every one of them was deferred.
    assert_eq!(contents(&ctx, DB), seeded);
    assert_eq!(all_fallbacks(&ctx).await, 0.0);
    assert!(deferred(&ctx).await >= 12.0);
    assert_eq!(answer(&proxy, "SPILLWAY FLUSH").await, Ok(0));
    assert_eq!(contents(&ctx, DB), contents(&ctx, "direct"));
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM spillway.dead_letters")
            .trim(),
        "0"
    );
}

#[tokio::test]
async fn sessions_contending_for_one_row_one_gets_the_version_conflict() {
    let ctx = start().await;
    let a = ctx.proxy_client().await;
    let b = ctx.proxy_client().await;
    let checked = "UPDATE gw SET stock = $1, version = $2 WHERE id = $3 AND version = $4";

    // Both held, both read version 1, both checked UPDATEs answered 1 (neither saw
    // the other's uncommitted write, as PostgreSQL's READ COMMITTED would not). The
    // first COMMIT wins; the second is re-checked at COMMIT, where its answer no
    // longer holds: 40001, nothing of it written. (PostgreSQL would have made the
    // second UPDATE wait for the first's row lock and answered it 0; an ORM raises
    // its stale-data error for either, and retrying the transaction through spillway
    // gets the 0.)
    for c in [&a, &b] {
        answer(c, "BEGIN").await.expect("BEGIN");
        c.query("SELECT version FROM gw WHERE id = 1", &[])
            .await
            .expect("read");
    }
    assert_eq!(
        a.execute(checked, &[&90i32, &2i32, &1i32, &1i32])
            .await
            .ok(),
        Some(1)
    );
    assert_eq!(
        b.execute(checked, &[&80i32, &2i32, &1i32, &1i32])
            .await
            .ok(),
        Some(1)
    );
    assert_eq!(answer(&a, "COMMIT").await, Ok(0));
    assert_eq!(answer(&b, "COMMIT").await, Err("40001".to_owned()));
    // The retry, as PostgreSQL answers it after the first committed.
    answer(&b, "BEGIN").await.expect("BEGIN");
    assert_eq!(
        b.execute(checked, &[&80i32, &2i32, &1i32, &1i32])
            .await
            .ok(),
        Some(0)
    );
    assert_eq!(answer(&b, "COMMIT").await, Ok(0));

    // A committed before B decides: B's check sees A's pending write at once, in a
    // transaction and in autocommit.
    assert_eq!(
        a.execute(checked, &[&70i32, &2i32, &2i32, &1i32])
            .await
            .ok(),
        Some(1)
    );
    answer(&b, "BEGIN").await.expect("BEGIN");
    assert_eq!(
        b.execute(checked, &[&60i32, &2i32, &2i32, &1i32])
            .await
            .ok(),
        Some(0)
    );
    assert_eq!(
        b.execute(checked, &[&60i32, &3i32, &2i32, &2i32])
            .await
            .ok(),
        Some(1)
    );
    assert_eq!(answer(&b, "COMMIT").await, Ok(0));
    assert_eq!(
        a.execute(checked, &[&50i32, &3i32, &2i32, &2i32])
            .await
            .ok(),
        Some(0)
    );

    // Many sessions at once on one row, each once: exactly one wins each version.
    let mut tasks = Vec::new();
    for i in 0..8i32 {
        let c = ctx.proxy_client().await;
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            for version in 1..=4i32 {
                if answer(&c, "BEGIN").await.is_err() {
                    continue;
                }
                let n = c
                    .execute(checked, &[&i, &(version + 1), &3i32, &version])
                    .await
                    .unwrap_or(0);
                match answer(&c, "COMMIT").await {
                    Ok(_) if n == 1 => won += 1,
                    _ => {}
                }
            }
            won
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.expect("task");
    }
    assert_eq!(wins, 4, "one winner per version");
    assert_eq!(answer(&a, "SPILLWAY FLUSH").await, Ok(0));
    assert_eq!(
        ctx.psql_direct("SELECT stock >= 0 AND stock < 8, version FROM gw WHERE id = 3")
            .trim(),
        "t|5"
    );
    assert_eq!(
        ctx.psql_direct("SELECT stock, version FROM gw WHERE id IN (1, 2) ORDER BY id")
            .trim(),
        "90|2\n60|3"
    );
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM spillway.dead_letters")
            .trim(),
        "0"
    );
}

#[tokio::test]
async fn a_writer_bypassing_spillway_is_seen_before_the_decision_and_never_overwritten_after() {
    let ctx = start().await;
    let proxy = ctx.proxy_client().await;
    let checked = "UPDATE gw SET stock = $1, version = $2 WHERE id = $3 AND version = $4";

    // Before the decision: the point read sees the bypassing writer's version.
    ctx.psql_direct("UPDATE gw SET version = 5 WHERE id = 1");
    assert_eq!(
        proxy
            .execute(checked, &[&1i32, &2i32, &1i32, &1i32])
            .await
            .ok(),
        Some(0)
    );
    assert_eq!(
        proxy
            .execute(checked, &[&1i32, &6i32, &1i32, &5i32])
            .await
            .ok(),
        Some(1)
    );

    // Between the acknowledgement and the flush: the flusher applies the write with
    // its condition, which no longer holds: not applied, a dead letter (02000) that
    // says so, the bypassing writer's row kept.
    assert_eq!(
        proxy
            .execute(checked, &[&7i32, &2i32, &2i32, &1i32])
            .await
            .ok(),
        Some(1)
    );
    ctx.psql_direct("UPDATE gw SET stock = 33, version = 9 WHERE id = 2");
    assert_eq!(answer(&proxy, "SPILLWAY FLUSH").await, Ok(0));
    assert_eq!(
        ctx.psql_direct("SELECT id, stock, version FROM gw WHERE id IN (1, 2) ORDER BY id")
            .trim(),
        "1|1|6\n2|33|9"
    );
    let dead = ctx.psql_direct("SELECT sqlstate, statement, message FROM spillway.dead_letters");
    assert!(
        dead.trim().starts_with("02000|UPDATE public.gw SET stock = ?, version = ? WHERE <key> = ? AND version = ?|no row with this key met the write's condition"),
        "{dead}"
    );
}

#[tokio::test]
async fn a_row_spillway_does_not_know_exactly_runs_upstream_with_its_reason() {
    let ctx = start().await;
    let proxy = ctx.proxy_client().await;
    let direct = direct_client(&ctx).await;

    // A write pending on a table with a BEFORE ROW trigger, which may store something
    // else than the write says: the row's values are known only from a read, and the
    // read does not have the pending write yet.
    assert_eq!(
        both(
            &proxy,
            &direct,
            "UPDATE gwt SET version = version + 1 WHERE id = 1"
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        both(
            &proxy,
            &direct,
            "UPDATE gwt SET stock = 5 WHERE id = 1 AND version = 2"
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        counter(
            &ctx,
            "spillway_fallbacks_total",
            "reason=\"row_unknown\",table=\"public.gwt\""
        )
        .await,
        1.0
    );
    // In a held transaction it moves the transaction upstream, where PostgreSQL
    // decides it (the held statements replayed with their conditions).
    answer(&proxy, "UPDATE gwt SET version = version + 1 WHERE id = 2")
        .await
        .expect("delta");
    answer(&direct, "UPDATE gwt SET version = version + 1 WHERE id = 2")
        .await
        .expect("delta");
    for c in [&proxy, &direct] {
        answer(c, "BEGIN").await.expect("BEGIN");
    }
    assert_eq!(
        both(
            &proxy,
            &direct,
            "UPDATE gwt SET stock = 9 WHERE id = 3 AND version = 1"
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        both(
            &proxy,
            &direct,
            "UPDATE gwt SET stock = 8 WHERE id = 2 AND version = 1"
        )
        .await,
        Ok(0)
    );
    both(&proxy, &direct, "COMMIT").await.expect("COMMIT");
    assert_eq!(
        counter(
            &ctx,
            "spillway_guarded_writes_total",
            "outcome=\"row_unknown\",table=\"public.gwt\""
        )
        .await,
        2.0
    );
    // A column spillway does not compare (text): write-through, its own reason.
    assert_eq!(
        both(
            &proxy,
            &direct,
            "UPDATE gw SET stock = 4 WHERE id = 5 AND name = 'p5'"
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        counter(
            &ctx,
            "spillway_fallbacks_total",
            "reason=\"guard_column\",table=\"public.gw\""
        )
        .await,
        1.0
    );
    assert_eq!(answer(&proxy, "SPILLWAY FLUSH").await, Ok(0));
    assert_eq!(contents(&ctx, DB), contents(&ctx, "direct"));
    let gwt = |db: &str| {
        ctx.pg
            .psql(db, "SELECT id, stock, version FROM public.gwt ORDER BY id")
            .expect("gwt")
    };
    assert_eq!(gwt(DB), gwt("direct"));
}

#[tokio::test]
async fn comparisons_beyond_equality_are_decided_like_postgres() {
    let ctx = start().await;
    let proxy = ctx.proxy_client().await;
    let direct = direct_client(&ctx).await;
    let seeded = contents(&ctx, DB);

    // A floor on the stock, decided from PostgreSQL's row (a point read that also
    // says which pending records it has: none) with the earlier decrements still
    // pending on top: 100 - 1 > 98, 100 - 2 > 98 does not hold.
    let floor = "UPDATE gw SET stock = stock - 1 WHERE id = 6 AND stock > 98";
    assert_eq!(both(&proxy, &direct, floor).await, Ok(1));
    assert_eq!(both(&proxy, &direct, floor).await, Ok(1));
    assert_eq!(both(&proxy, &direct, floor).await, Ok(0));
    // Over values spillway set: every comparison, autocommit and in a transaction.
    let steps = [
        ("UPDATE gw SET stock = 50 WHERE id = 5 AND stock >= 100", 1),
        ("UPDATE gw SET stock = 40 WHERE id = 5 AND stock < 50", 0),
        ("UPDATE gw SET stock = 40 WHERE id = 5 AND stock <= 50", 1),
        ("DELETE FROM gw WHERE id = 5 AND stock <> 40", 0),
        ("BEGIN", 0),
        (
            "UPDATE gw SET stock = stock + 5 WHERE id = 5 AND stock > 39",
            1,
        ),
        ("DELETE FROM gw WHERE stock <> 44 AND id = 5", 1),
        ("COMMIT", 0),
        ("UPDATE gw SET stock = 1 WHERE id = 5 AND stock > 0", 0),
    ];
    for (sql, rows) in steps {
        assert_eq!(both(&proxy, &direct, sql).await, Ok(rows), "{sql}");
    }
    // A comparison on the key is not a write of one key: write-through.
    assert_eq!(
        both(&proxy, &direct, "DELETE FROM gw WHERE id > 5 AND stock > 0").await,
        Ok(1)
    );
    assert_eq!(
        counter(
            &ctx,
            "spillway_fallbacks_total",
            "reason=\"where_not_primary_key\",table=\"public.gw\""
        )
        .await,
        1.0
    );
    assert_eq!(
        counter(
            &ctx,
            "spillway_fallbacks_total",
            "reason=\"row_unknown\",table=\"public.gw\""
        )
        .await,
        0.0
    );
    assert_ne!(
        contents(&ctx, DB),
        seeded,
        "the barrier applied what was pending"
    );
    assert_eq!(answer(&proxy, "SPILLWAY FLUSH").await, Ok(0));
    assert_eq!(contents(&ctx, DB), contents(&ctx, "direct"));
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM spillway.dead_letters")
            .trim(),
        "0"
    );
}

#[tokio::test]
async fn a_row_a_referenced_tables_write_may_change_is_never_guessed() {
    // The child's foreign key sets its column NULL when the parent row goes: a parent
    // DELETE pending changes the child's row at the flush, which the child's own
    // writes do not show. PostgreSQL answers the guarded UPDATE after the DELETE: 0.
    const FK_SCHEMA: &str = "CREATE TABLE public.gwp (id int PRIMARY KEY); \
        INSERT INTO public.gwp SELECT generate_series(1, 6); \
        CREATE TABLE public.gwc (id int PRIMARY KEY, \
          p_id int REFERENCES public.gwp ON DELETE SET NULL, stock int NOT NULL); \
        INSERT INTO public.gwc SELECT g, g, 100 FROM generate_series(1, 6) g;";
    let ctx = Context::builder()
        .before_proxy(FK_SCHEMA)
        .before_proxy("CREATE DATABASE direct")
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.gwp\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.gwc\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await;
    ctx.pg
        .psql("direct", FK_SCHEMA)
        .expect("schema of the direct copy");
    let proxy = ctx.proxy_client().await;
    let direct = direct_client(&ctx).await;
    assert_eq!(
        both(&proxy, &direct, "DELETE FROM gwp WHERE id = 5").await,
        Ok(1)
    );
    assert_eq!(
        both(
            &proxy,
            &direct,
            "UPDATE gwc SET stock = 1 WHERE id = 5 AND p_id = 5"
        )
        .await,
        Ok(0)
    );
    assert_eq!(
        counter(
            &ctx,
            "spillway_fallbacks_total",
            "reason=\"row_unknown\",table=\"public.gwc\""
        )
        .await,
        1.0
    );
    assert_eq!(answer(&proxy, "SPILLWAY FLUSH").await, Ok(0));
    let rows = |db: &str| {
        ctx.pg
            .psql(db, "SELECT id, p_id, stock FROM public.gwc ORDER BY id")
            .expect("gwc")
    };
    assert_eq!(rows(DB), rows("direct"));
}
