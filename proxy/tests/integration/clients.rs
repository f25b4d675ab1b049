//! Real clients through spillway: tokio-postgres (simple and extended, text and
//! binary), sqlx, psql and pgbench as subprocesses. Each compares with what the same
//! client gets from PostgreSQL directly.

use std::process::Command;

use crate::context::{Context, DB, USER};

#[tokio::test]
async fn tokio_postgres_simple_and_extended_text_and_binary() {
    let ctx = Context::start().await;
    let proxy = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;

    // Simple protocol, multi-statement, text format.
    let sql = "CREATE TABLE t (id int PRIMARY KEY, name text, score float8, at timestamptz);
               INSERT INTO t VALUES (1, 'a', 1.5, '2020-01-01Z'), (2, NULL, -0.25, now());
               SELECT id, name FROM t ORDER BY id;";
    let msgs = proxy.simple_query(sql).await.expect("simple query");
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((r.get(0).map(str::to_owned), r.get(1).map(str::to_owned)))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (Some("1".into()), Some("a".into())),
            (Some("2".into()), None)
        ]
    );

    // Extended protocol, binary results and parameters, named statement reuse.
    let stmt = proxy
        .prepare("SELECT id, name, score FROM t WHERE id = $1")
        .await
        .expect("prepare");
    for id in [1i32, 2] {
        let via_proxy = proxy.query_one(&stmt, &[&id]).await.expect("query");
        let via_direct = direct
            .query_one("SELECT id, name, score FROM t WHERE id = $1", &[&id])
            .await
            .expect("direct query");
        assert_eq!(via_proxy.get::<_, i32>(0), via_direct.get::<_, i32>(0));
        assert_eq!(
            via_proxy.get::<_, Option<String>>(1),
            via_direct.get::<_, Option<String>>(1)
        );
        assert_eq!(via_proxy.get::<_, f64>(2), via_direct.get::<_, f64>(2));
    }

    // Errors arrive with PostgreSQL's SQLSTATE and the session stays usable.
    let err = proxy
        .execute("INSERT INTO t VALUES (1, 'dup', 0, now())", &[])
        .await
        .expect_err("duplicate key");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    assert_eq!(
        proxy
            .query_one("SELECT 1", &[])
            .await
            .expect("after error")
            .get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn transactions_commit_rollback_and_error_state() {
    let ctx = Context::start().await;
    let mut proxy = ctx.proxy_client().await;
    proxy
        .batch_execute("CREATE TABLE acct (id int PRIMARY KEY, n int)")
        .await
        .expect("create");

    let tx = proxy.transaction().await.expect("begin");
    tx.execute("INSERT INTO acct VALUES (1, 10)", &[])
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");

    let tx = proxy.transaction().await.expect("begin");
    tx.execute("INSERT INTO acct VALUES (2, 20)", &[])
        .await
        .expect("insert");
    // An error puts the transaction in the failed state until it ends.
    assert!(tx.execute("SELECT 1/0", &[]).await.is_err());
    let err = tx.execute("SELECT 1", &[]).await.expect_err("aborted tx");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
    );
    tx.rollback().await.expect("rollback");

    let tx = proxy.transaction().await.expect("begin");
    tx.execute("INSERT INTO acct VALUES (3, 30)", &[])
        .await
        .expect("insert");
    tx.commit().await.expect("commit");

    let direct = ctx.direct_client().await;
    let ids: Vec<i32> = direct
        .query("SELECT id FROM acct ORDER BY id", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![3]);
}

#[tokio::test]
async fn sqlx_pool_queries_and_transactions() {
    use sqlx::Row;
    let ctx = Context::start().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&ctx.proxy_url())
        .await
        .expect("sqlx connects through spillway");
    sqlx::query("CREATE TABLE s (id bigint PRIMARY KEY, v text)")
        .execute(&pool)
        .await
        .expect("create");
    let mut tx = pool.begin().await.expect("begin");
    for i in 0..50i64 {
        sqlx::query("INSERT INTO s VALUES ($1, $2)")
            .bind(i)
            .bind(format!("v{i}"))
            .execute(&mut *tx)
            .await
            .expect("insert");
    }
    tx.commit().await.expect("commit");
    let row = sqlx::query("SELECT count(*) AS n, max(v) AS m FROM s WHERE id >= $1")
        .bind(10i64)
        .fetch_one(&pool)
        .await
        .expect("select");
    assert_eq!(row.get::<i64, _>("n"), 40);
    assert_eq!(row.get::<String, _>("m"), "v49");
    // Concurrent use of the pool: every connection is its own session.
    let futs = (0..8).map(|i| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT $1::bigint * 2")
                .bind(i as i64)
                .fetch_one(&pool)
                .await
                .expect("concurrent select")
        }
    });
    let got = futures_util::future::join_all(futs).await;
    assert_eq!(got, (0..8).map(|i| i * 2).collect::<Vec<i64>>());
    pool.close().await;
}

fn psql(ctx: &Context, args: &[&str]) -> std::process::Output {
    Command::new("psql")
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", &ctx.proxy_url()])
        .args(args)
        .output()
        .expect("run psql")
}

#[tokio::test]
async fn psql_command_and_copy() {
    let ctx = Context::start().await;
    let out = psql(&ctx, &["-A", "-t", "-c", "SELECT 40 + 2"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("in.csv");
    let rows: String = (1..=1000).map(|i| format!("{i},name {i}\n")).collect();
    std::fs::write(&csv, rows).expect("write csv");
    let out_csv = dir.path().join("out.csv");
    let script = format!(
        "CREATE TABLE c (id int PRIMARY KEY, name text);\n\
         \\copy c FROM '{}' WITH (FORMAT csv)\n\
         \\copy (SELECT * FROM c ORDER BY id) TO '{}' WITH (FORMAT csv)\n",
        csv.display(),
        out_csv.display()
    );
    // psql runs backslash commands mixed with SQL only from a file or stdin.
    let script_path = dir.path().join("s.sql");
    std::fs::write(&script_path, script).expect("write script");
    let out = psql(&ctx, &["-f", script_path.to_str().expect("utf8 path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&csv).expect("in"),
        std::fs::read_to_string(&out_csv).expect("out")
    );
    assert_eq!(ctx.psql_direct("SELECT count(*) FROM c").trim(), "1000");
}

fn pgbench(ctx: &Context, args: &[&str]) -> String {
    let port = ctx.proxy.addr.port().to_string();
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port, "-U", USER])
        .args(args)
        .arg(DB)
        .output()
        .expect("run pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

#[tokio::test]
async fn pgbench_init_and_every_protocol_mode() {
    let ctx = Context::start().await;
    pgbench(&ctx, &["-i", "-s", "1", "-q"]);
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM pgbench_accounts")
            .trim(),
        "100000"
    );
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(&ctx, &["-M", mode, "-c", "4", "-j", "2", "-t", "200"]);
        assert!(
            out.contains("number of failed transactions: 0"),
            "mode {mode}:\n{out}"
        );
        assert!(
            out.contains("number of transactions actually processed: 800/800"),
            "mode {mode}:\n{out}"
        );
    }
    // The TPC-B-like writes really landed upstream (pgbench truncates the history
    // table before each run, so it holds the last run's 800).
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM pgbench_history")
            .trim(),
        "800"
    );
}
