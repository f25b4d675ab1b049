//! Write-back through the real binary (SPEC §6, issue 5): deferrable writes are
//! acknowledged from the journal like write-behind's, and the flusher applies each
//! key's coalesced state. A row-level audit trigger upstream records every row
//! operation PostgreSQL actually performed, so each coalescing rule is checked by what
//! reached PostgreSQL, not only by the end state.

use crate::context::{Context, ContextBuilder, connect};
use crate::metrics::{sample, scrape};
use crate::write_behind::{direct_rows, tag};

const TABLES: &str = "\
    CREATE TABLE public.wbk (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0 CHECK (n >= 0), \
        v text, amount numeric(12,2), f double precision); \
    CREATE TABLE public.audit (at serial PRIMARY KEY, op text, id int, n bigint, v text, \
        amount numeric(12,2), f double precision); \
    CREATE FUNCTION public.audit_row() RETURNS trigger LANGUAGE plpgsql AS $$ \
    BEGIN \
        IF TG_OP = 'DELETE' THEN \
            INSERT INTO public.audit (op, id) VALUES (TG_OP, OLD.id); \
        ELSE \
            INSERT INTO public.audit (op, id, n, v, amount, f) \
            VALUES (TG_OP, NEW.id, NEW.n, NEW.v, NEW.amount, NEW.f); \
        END IF; \
        RETURN NULL; \
    END $$; \
    CREATE TRIGGER wbk_audit AFTER INSERT OR UPDATE OR DELETE ON public.wbk \
        FOR EACH ROW EXECUTE FUNCTION public.audit_row(); \
    INSERT INTO public.wbk (id, n) SELECT g, 0 FROM generate_series(1000, 1099) g; \
    TRUNCATE public.audit;";

/// Write-back on `wbk`; a flush interval long enough that only barriers and `SPILLWAY
/// FLUSH` apply anything during a test.
fn builder() -> ContextBuilder {
    Context::builder().before_proxy(TABLES).section(
        "[flush]\ninterval = \"1h\"\n\
         [tables.\"public.wbk\"]\npolicy = \"write-back\"\n",
    )
}

/// The audit trail since `after`, one `op|id|n|v|amount|f` line per row operation.
fn audit(ctx: &Context, ids: &str) -> Vec<String> {
    direct_rows(
        ctx,
        &format!(
            "SELECT op, id, n, v, amount, f FROM public.audit WHERE id IN ({ids}) ORDER BY at"
        ),
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

#[tokio::test]
async fn each_coalescing_rule_reaches_postgresql_as_one_row_operation_per_key() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    let ok = |sql: &'static str| {
        let proxy = &proxy;
        async move { tag(proxy, sql).await }
    };
    // INSERT then UPDATEs: one INSERT with the merged image.
    ok("INSERT INTO wbk (id, n, v) VALUES (1, 1, 'x')").await;
    ok("UPDATE wbk SET n = n + 2 WHERE id = 1").await;
    ok("UPDATE wbk SET v = 'y', amount = 3.50 WHERE id = 1").await;
    // INSERT then DELETE: nothing at all.
    ok("INSERT INTO wbk (id, v) VALUES (2, 'gone')").await;
    ok("UPDATE wbk SET v = 'still gone' WHERE id = 2").await;
    assert_eq!(ok("DELETE FROM wbk WHERE id = 2").await, 1);
    // UPDATE then DELETE of an existing row: the DELETE.
    ok("UPDATE wbk SET n = n + 1 WHERE id = 1000").await;
    ok("DELETE FROM wbk WHERE id = 1000").await;
    // Deltas summed exactly; an assignment absorbs the deltas after it.
    ok("UPDATE wbk SET amount = 0 WHERE id = 1001").await;
    ok("UPDATE wbk SET amount = amount + 0.10, n = n + 5 WHERE id = 1001").await;
    ok("UPDATE wbk SET amount = amount + 0.20, n = n - 2 WHERE id = 1001").await;
    ok("UPDATE wbk SET n = 7 WHERE id = 1002").await;
    ok("UPDATE wbk SET n = n + 1 WHERE id = 1002").await;
    // Floats are not summed: two UPDATEs reach PostgreSQL.
    ok("UPDATE wbk SET f = 0 WHERE id = 1003").await;
    ok("UPDATE wbk SET f = f + 0.1 WHERE id = 1003").await;
    // DELETE then INSERT stay two operations, in order.
    ok("DELETE FROM wbk WHERE id = 1004").await;
    ok("INSERT INTO wbk (id, n, v) VALUES (1004, 4, 'again')").await;
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM public.audit"), "0");

    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(audit(&ctx, "1"), vec!["INSERT|1|3|y|3.50|"]);
    assert_eq!(audit(&ctx, "2"), Vec::<String>::new());
    assert_eq!(audit(&ctx, "1000"), vec!["DELETE|1000||||"]);
    assert_eq!(audit(&ctx, "1001"), vec!["UPDATE|1001|3||0.30|"]);
    assert_eq!(audit(&ctx, "1002"), vec!["UPDATE|1002|8|||"]);
    assert_eq!(
        audit(&ctx, "1003"),
        vec!["UPDATE|1003|0|||0", "UPDATE|1003|0|||0.1"]
    );
    assert_eq!(
        audit(&ctx, "1004"),
        vec!["DELETE|1004||||", "INSERT|1004|4|again||"]
    );
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT id, n, v, amount FROM wbk WHERE id IN (1, 2, 1000, 1001) ORDER BY id"
        ),
        "1|3|y|3.50\n1001|3||0.30"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_counter_workload_ends_exact_with_one_upstream_update_per_key() {
    const CLIENTS: i32 = 8;
    const PER_CLIENT: i32 = 1250;
    let ctx = builder().start().await;
    let metrics = ctx.proxy.metrics_addr();
    let before = scrape(metrics).await;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let config = ctx.proxy_config();
        tasks.push(tokio::spawn(async move {
            let client = connect(&config).await;
            let bump = client
                .prepare("UPDATE wbk SET n = n + 1 WHERE id = $1")
                .await
                .expect("prepare");
            for i in 0..PER_CLIENT {
                let id = 1000 + (c * PER_CLIENT + i) % 100;
                let n = client.execute(&bump, &[&id]).await.expect("increment");
                assert_eq!(n, 1);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let proxy = ctx.proxy_client().await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    let after = scrape(metrics).await;

    // Exact: 10,000 increments over 100 keys, 100 each.
    assert_eq!(
        direct_rows(&ctx, "SELECT sum(n), min(n), max(n) FROM wbk"),
        "10000|100|100"
    );
    // What PostgreSQL did: one UPDATE per key, each adding the key's 100.
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*), min(n), max(n) FROM public.audit"),
        "100|100|100"
    );
    let delta = |name: &str| sample(&after, name, "") - sample(&before, name, "");
    let labels = "table=\"public.wbk\",policy=\"write-back\"";
    let writes = sample(&after, "spillway_client_writes_total", labels)
        - sample(&before, "spillway_client_writes_total", labels);
    let statements = delta("spillway_upstream_statements_total");
    eprintln!("hot counters: client writes {writes}, upstream statements {statements}");
    assert!(writes >= 10_000.0, "writes counted: {writes}");
    assert!(
        statements <= 0.02 * writes,
        "{statements} upstream statements for {writes} client writes"
    );
}

#[tokio::test]
async fn a_coalesced_state_postgresql_refuses_is_judged_write_by_write() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    // Row 1000 goes below its CHECK only through the second write: that write is a
    // dead letter, the first and third are applied, and the other key's too.
    tag(&proxy, "UPDATE wbk SET n = n + 1 WHERE id = 1000").await;
    tag(&proxy, "UPDATE wbk SET n = n - 3 WHERE id = 1000").await;
    tag(&proxy, "UPDATE wbk SET n = n - 1 WHERE id = 1000").await;
    tag(&proxy, "UPDATE wbk SET n = n + 5 WHERE id = 1001").await;
    tag(&proxy, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT id, n FROM wbk WHERE id IN (1000, 1001) ORDER BY id"
        ),
        "1000|0\n1001|5"
    );
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT sqlstate, parameters FROM spillway.dead_letters"
        ),
        "23514|{1000,3}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_continuous_writes_the_flusher_runs_once_per_interval() {
    // Before the interval was timed by the oldest pending write, a table that never
    // ran empty was flushed back to back, folding next to nothing.
    let ctx = Context::builder()
        .before_proxy(TABLES)
        .section(
            "[flush]\ninterval = \"300ms\"\n\
             [tables.\"public.wbk\"]\npolicy = \"write-back\"\n",
        )
        .start()
        .await;
    let metrics = ctx.proxy.metrics_addr();
    let client = ctx.proxy_client().await;
    let bump = client
        .prepare("UPDATE wbk SET n = n + 1 WHERE id = $1")
        .await
        .expect("prepare");
    let before = scrape(metrics).await;
    let started = std::time::Instant::now();
    let mut writes = 0u64;
    while started.elapsed() < std::time::Duration::from_millis(1500) {
        let id = 1000 + i32::try_from(writes % 10).expect("small");
        client.execute(&bump, &[&id]).await.expect("increment");
        writes += 1;
    }
    let elapsed = started.elapsed();
    let after = scrape(metrics).await;
    let batches = sample(&after, "spillway_flush_batches_total", "")
        - sample(&before, "spillway_flush_batches_total", "");
    let rows = sample(&after, "spillway_flush_rows_total", "")
        - sample(&before, "spillway_flush_rows_total", "");
    eprintln!("{writes} writes in {elapsed:?}: {batches} batches, {rows} rows");
    let bound = elapsed.as_secs_f64() / 0.3 + 2.0;
    assert!(writes > 100, "too few writes to mean anything: {writes}");
    assert!(
        batches >= 1.0 && batches <= bound,
        "{batches} batches in {elapsed:?}"
    );
    // Ten keys: a batch folds into at most ten rows.
    assert!(rows <= 10.0 * batches, "{rows} rows in {batches} batches");
    tag(&client, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct_rows(&ctx, "SELECT sum(n) FROM wbk"),
        writes.to_string()
    );
}
