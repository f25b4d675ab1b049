//! Transaction pooling (ADR 0025): spillway authenticates clients itself with the
//! credentials of `auth.file` and leases pooled server connections per transaction.
//! Many clients share a pool of two; wrong passwords and unknown roles get 28P01; an
//! exhausted pool gets 53300 after `pool.queue_timeout`; a server connection that dies
//! mid-transaction fails only its own client. A new client connecting while
//! PostgreSQL is stopped is authenticated by spillway and gets its deferred writes
//! acknowledged, applied once when PostgreSQL is back. Named prepared statements
//! follow their client from server connection to server connection (ADR 0028):
//! tokio-postgres, asyncpg's statement cache and pgbench `-M prepared`.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::context::{Context, DB, connect};

/// The role the pooled clients use, its password, and PostgreSQL's hba for it.
pub(crate) const ROLE: &str = "app";
pub(crate) const PASSWORD: &str = "apppw";

pub(crate) struct Pooled {
    pub(crate) ctx: Context,
    _dir: tempfile::TempDir,
}

impl Pooled {
    pub(crate) fn conninfo(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={DB}",
            self.ctx.proxy.addr.port()
        )
    }

    pub(crate) async fn client(&self) -> tokio_postgres::Client {
        connect(&self.conninfo(ROLE, PASSWORD)).await
    }

    /// Server connections of the pool in `pg_stat_activity`.
    pub(crate) async fn pool_backends(&self) -> i64 {
        let direct = self.ctx.direct_client().await;
        direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 \
                 AND application_name = 'spillway pool'",
                &[&ROLE],
            )
            .await
            .expect("count backends")
            .get(0)
    }
}

/// spillway with role `app` in transaction mode (pool of `size`), its password in the
/// auth file, and PostgreSQL asking that role for SCRAM.
pub(crate) async fn start(size: u32, extra_pool: &str, auth_line: &str) -> Pooled {
    start_with(size, extra_pool, auth_line, "", PASSWORD).await
}

/// [`start`] with more config sections (`extra`, whole sections) and what PostgreSQL
/// stores as the role's password (a password, or a SCRAM verifier as is).
pub(crate) async fn start_with(
    size: u32,
    extra_pool: &str,
    auth_line: &str,
    extra: &str,
    role_password: &str,
) -> Pooled {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("userlist.txt");
    std::fs::write(&file, format!("; pooled roles\n{auth_line}\n")).expect("auth file");
    let ctx = Context::builder()
        // md5: PostgreSQL asks SCRAM where it stores a verifier, md5 where a hash.
        .pg(|b| b.hba(&format!("host all {ROLE} 127.0.0.1/32 md5")))
        .before_proxy(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE {ROLE} LOGIN PASSWORD '{role_password}';
             CREATE TABLE pooled_t (id int PRIMARY KEY, v int NOT NULL);
             GRANT ALL ON pooled_t TO {ROLE};"
        ))
        .section(&format!(
            "[pool]\n{extra_pool}\n[pool.users.{ROLE}]\nmode = \"transaction\"\nsize = {size}\n\
             [auth]\nfile = \"{}\"\n{extra}\n",
            file.display()
        ))
        .start()
        .await;
    Pooled { ctx, _dir: dir }
}

pub(crate) fn plain_line() -> String {
    format!("\"{ROLE}\" \"{PASSWORD}\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_a_pool_of_two_and_transactions_stay_whole() {
    let p = start(2, "", &plain_line()).await;
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(p.client().await);
    }
    assert!(
        p.pool_backends().await <= 2,
        "12 idle pooled clients hold at most the pool's 2 server connections"
    );
    let work = clients.iter().enumerate().map(|(i, c)| async move {
        for round in 0..5 {
            let id = (i * 100 + round) as i32;
            c.simple_query("BEGIN").await.expect("begin");
            c.simple_query(&format!("INSERT INTO pooled_t VALUES ({id}, 1)"))
                .await
                .expect("insert");
            c.simple_query(&format!("UPDATE pooled_t SET v = v + 1 WHERE id = {id}"))
                .await
                .expect("update");
            c.simple_query("COMMIT").await.expect("commit");
            // Outside a transaction: one statement per lease.
            let rows = c
                .simple_query(&format!("SELECT v FROM pooled_t WHERE id = {id}"))
                .await
                .expect("select");
            let v = rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            });
            assert_eq!(v.as_deref(), Some("2"), "client {i} round {round}");
        }
    });
    futures_util::future::join_all(work).await;
    let direct = p.ctx.direct_client().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM pooled_t WHERE v = 2", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 60, "every committed transaction applied once");
    let backends = p.pool_backends().await;
    assert!(
        (1..=2).contains(&backends),
        "the pool's connections: {backends}"
    );
    // A rolled-back transaction leaves nothing behind for the next lease.
    let c = &clients[0];
    c.simple_query("BEGIN").await.expect("begin");
    c.simple_query("INSERT INTO pooled_t VALUES (-1, 0)")
        .await
        .expect("insert");
    c.simple_query("ROLLBACK").await.expect("rollback");
    let rows = clients[1]
        .simple_query("SELECT count(*) FROM pooled_t WHERE id = -1")
        .await
        .expect("select");
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("0"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_role_both_get_28p01_and_a_verifier_passes_through() {
    // The auth file holds the SCRAM verifier PostgreSQL holds: spillway checks clients
    // against it and logs its pool in with the keys the client's proof revealed.
    let verifier = spillway::protocol::scram::Verifier::from_password(PASSWORD).to_string();
    // Every role in transaction mode, so that an unknown one is spillway's to refuse.
    let p = start_with(
        2,
        "mode = \"transaction\"",
        &format!("\"{ROLE}\" \"{verifier}\""),
        "",
        &verifier,
    )
    .await;
    for (user, password) in [(ROLE, "wrong"), ("nobody", "whatever")] {
        let err = tokio_postgres::connect(&p.conninfo(user, password), tokio_postgres::NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} logged in with a wrong password"));
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_PASSWORD),
            "{user}: {err}"
        );
        let db = err.as_db_error().expect("a server error");
        assert_eq!(
            db.message(),
            format!("password authentication failed for user \"{user}\""),
            "the same words whether the role exists or not"
        );
    }
    let client = p.client().await;
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("INSERT INTO pooled_t VALUES (1, 1)")
        .await
        .expect("through a pool logged in by SCRAM passthrough");
    client.simple_query("COMMIT").await.expect("commit");
    assert!(p.pool_backends().await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_gets_53300_after_the_queue_timeout() {
    let p = start(1, "queue_timeout = \"300ms\"", &plain_line()).await;
    let holder = p.client().await;
    let waiter = p.client().await;
    holder.simple_query("BEGIN").await.expect("begin");
    // A volatile function: never a cache hit, so both statements need the server
    // (a `SELECT 1` may be answered from the cache without a lease).
    holder
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("the transaction holds the only connection");
    let err = waiter
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect_err("no connection comes free");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("pool.queue_timeout")),
        "{message:?}"
    );
    // The holder's lease was never touched.
    holder.simple_query("COMMIT").await.expect("commit");
    let again = p.client().await;
    again
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("a free connection again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_dying_mid_transaction_fails_only_its_client() {
    let p = start(2, "", &plain_line()).await;
    let victim = p.client().await;
    let bystander = p.client().await;
    victim.simple_query("BEGIN").await.expect("begin");
    let rows = victim
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("pid");
    let pid = match &rows[1] {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).expect("pid").to_owned(),
        other => panic!("{other:?}"),
    };
    bystander
        .simple_query("BEGIN")
        .await
        .expect("bystander begin");
    bystander
        .simple_query("INSERT INTO pooled_t VALUES (7, 7)")
        .await
        .expect("bystander insert");
    p.ctx
        .direct_client()
        .await
        .simple_query(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .expect("terminate");
    let err = victim
        .simple_query("SELECT 1")
        .await
        .expect_err("its server connection is gone");
    assert!(err.code().is_some() || err.is_closed(), "{err}");
    bystander
        .simple_query("COMMIT")
        .await
        .expect("bystander commits");
    let direct = p.ctx.direct_client().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM pooled_t WHERE id = 7", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
    // A new client is served by the pool as before.
    tokio::time::timeout(Duration::from_secs(10), async {
        p.client()
            .await
            .simple_query("SELECT 1")
            .await
            .expect("served");
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_during_an_outage_gets_its_deferred_writes_applied_once() {
    let mut p = start_with(
        2,
        "",
        &plain_line(),
        "[flush]\ninterval = \"1h\"\n\
         [tables.\"public.pooled_t\"]\npolicy = \"write-behind\"\nrow_counts = \"assumed\"\n",
        PASSWORD,
    )
    .await;
    // Before the outage: the role's privileges are known (reused while PostgreSQL is
    // unreachable) and the pool has met its server.
    let before = p.client().await;
    crate::write_behind::tag(&before, "INSERT INTO pooled_t (id, v) VALUES (1, 1)").await;
    drop(before);
    tokio::task::block_in_place(|| p.ctx.pg.stop_fast()).expect("stop PostgreSQL");

    let during = tokio::time::timeout(Duration::from_secs(20), p.client())
        .await
        .expect("a new client is authenticated by spillway while PostgreSQL is down");
    for id in 2..=4 {
        let n = tokio::time::timeout(
            Duration::from_secs(20),
            during.simple_query(&format!("INSERT INTO pooled_t (id, v) VALUES ({id}, 1)")),
        )
        .await
        .expect("acknowledged in time")
        .expect("a deferred write is acknowledged during the outage");
        assert!(
            n.iter()
                .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(1))),
            "{id}"
        );
    }
    // Anything that needs PostgreSQL fails this session only.
    let err = during
        .simple_query("SELECT now()")
        .await
        .expect_err("PostgreSQL is down");
    assert_eq!(err.code(), Some(&SqlState::CONNECTION_FAILURE), "{err}");

    tokio::task::block_in_place(|| p.ctx.pg.start()).expect("start PostgreSQL");
    let after = p.client().await;
    crate::write_behind::tag(&after, "SPILLWAY FLUSH").await;
    let rows = crate::write_behind::direct_rows(
        &p.ctx,
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM pooled_t",
    );
    assert_eq!(rows, "1,2,3,4", "every acknowledged write applied once");
}

/// `(v, pid)` of a prepared `SELECT <expr> AS v, pg_backend_pid()` run with `arg`.
async fn run_prepared(
    client: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    arg: i32,
) -> (i32, i32) {
    let row = client.query_one(stmt, &[&arg]).await.expect("execute");
    (row.get(0), row.get(1))
}

/// Opens a transaction on `client` and returns the pid of the connection it holds.
async fn begin_holding(client: &tokio_postgres::Client) -> i32 {
    client.simple_query("BEGIN").await.expect("begin");
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

/// Statements spillway prepared on a pooled connection that lacked one (a scrape).
async fn injected(p: &Pooled) -> f64 {
    let text = crate::metrics::scrape(p.ctx.proxy.metrics_addr()).await;
    crate::metrics::sample(&text, "spillway_pool_statements_prepared_total", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_prepared_statements_follow_the_client_across_server_connections() {
    let p = start(2, "queue_timeout = \"2s\"", &plain_line()).await;
    let a = p.client().await;
    let b = p.client().await;
    // Two different statements of two clients on shared server connections
    // (asyncpg's test below gives different statements the same client-side name).
    let sa = a
        .prepare("SELECT $1::int + 1 AS v, pg_backend_pid()")
        .await
        .expect("prepare a");
    let sb = b
        .prepare("SELECT $1::int + 100 AS v, pg_backend_pid()")
        .await
        .expect("prepare b");
    for i in 0..4 {
        assert_eq!(run_prepared(&a, &sa, i).await.0, i + 1, "a, round {i}");
        assert_eq!(run_prepared(&b, &sb, i).await.0, i + 100, "b, round {i}");
    }
    // One connection is held by a transaction: the statements run on the other.
    // Neither client keeps a connection between its statements (with a pinned
    // session the other would wait out the queue timeout here).
    let c1 = p.client().await;
    let c2 = p.client().await;
    let first = begin_holding(&c1).await;
    let mut ran_on = std::collections::BTreeSet::new();
    for i in 10..13 {
        let (v, pid) = run_prepared(&a, &sa, i).await;
        assert_eq!(v, i + 1);
        assert_ne!(pid, first, "not on the connection the transaction holds");
        ran_on.insert(pid);
        let (v, pid) = run_prepared(&b, &sb, i).await;
        assert_eq!(v, i + 100);
        assert_ne!(pid, first);
    }
    c1.simple_query("COMMIT").await.expect("commit");
    // Now both connections are held, and the one the statements ran on is given
    // back last: they run on the other one, which may never have seen them.
    let x = begin_holding(&c1).await;
    let y = begin_holding(&c2).await;
    assert_ne!(x, y, "two connections");
    let (keep, free) = if ran_on.contains(&x) {
        (&c1, &c2)
    } else {
        (&c2, &c1)
    };
    free.simple_query("COMMIT").await.expect("commit");
    for i in 20..23 {
        let (v, pid) = run_prepared(&a, &sa, i).await;
        assert_eq!(v, i + 1);
        ran_on.insert(pid);
        let (v, _) = run_prepared(&b, &sb, i).await;
        assert_eq!(v, i + 100);
    }
    keep.simple_query("COMMIT").await.expect("commit");
    assert_eq!(
        ran_on.len(),
        2,
        "the statement ran on both connections: {ran_on:?}"
    );
    assert!(
        injected(&p).await >= 1.0,
        "a statement was prepared on a connection that lacked it"
    );
    // A statement that fails leaves the others intact.
    let fails = a.prepare("SELECT 1 / $1::int").await.expect("prepare");
    let err = a
        .query_one(&fails, &[&0i32])
        .await
        .expect_err("division by zero");
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err}");
    assert_eq!(run_prepared(&a, &sa, 7).await.0, 8);
    // Close forgets the client's name only: a's statement goes, b's stays, and a
    // new statement under a reused name is the new one.
    drop(sa);
    drop(fails);
    assert_eq!(run_prepared(&b, &sb, 1).await.0, 101);
    let again = a
        .prepare("SELECT $1::int * 3 AS v, pg_backend_pid()")
        .await
        .expect("prepare again");
    assert_eq!(run_prepared(&a, &again, 5).await.0, 15);
    // One-shot queries (prepared, used and closed by tokio-postgres each time).
    for i in 0..5i32 {
        let row = a
            .query_one("SELECT $1::int + 2", &[&i])
            .await
            .expect("one-shot");
        assert_eq!(row.get::<_, i32>(0), i + 2);
    }
    assert!(p.pool_backends().await <= 2);
}

/// `SHOW name` through `client`.
async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    let rows = client
        .simple_query(&format!("SHOW {name}"))
        .await
        .expect("show");
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_are_replayed_on_each_lease_and_reset_at_return() {
    let p = start(2, "queue_timeout = \"2s\"", &plain_line()).await;
    let a = p.client().await;
    let b = p.client().await;
    let holder = p.client().await;
    let default = show(&b, "statement_timeout").await;
    a.simple_query("SET statement_timeout = '4321ms'")
        .await
        .expect("set");
    a.simple_query("SET search_path TO pg_catalog, public")
        .await
        .expect("set");
    for round in 0..3 {
        // Each connection in turn held by a transaction: `a` runs on either.
        let held = (round % 2 == 1).then_some(());
        if held.is_some() {
            begin_holding(&holder).await;
        }
        assert_eq!(
            show(&a, "statement_timeout").await,
            "4321ms",
            "round {round}"
        );
        assert_eq!(show(&a, "search_path").await, "pg_catalog, public");
        assert_eq!(
            show(&b, "statement_timeout").await,
            default,
            "another client never sees a's setting (round {round})"
        );
        if held.is_some() {
            holder.simple_query("COMMIT").await.expect("commit");
        }
    }
    a.simple_query("RESET statement_timeout")
        .await
        .expect("reset");
    assert_eq!(show(&a, "statement_timeout").await, default);
    assert_eq!(show(&a, "search_path").await, "pg_catalog, public");
    // SET LOCAL stays in its transaction.
    a.simple_query("BEGIN").await.expect("begin");
    a.simple_query("SET LOCAL work_mem = '7MB'")
        .await
        .expect("set local");
    assert_eq!(show(&a, "work_mem").await, "7MB");
    a.simple_query("COMMIT").await.expect("commit");
    assert_ne!(show(&a, "work_mem").await, "7MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_max_prepared_statements_zero_named_statements_pin_the_session() {
    let p = start(
        1,
        "queue_timeout = \"300ms\"\nmax_prepared_statements = 0",
        &plain_line(),
    )
    .await;
    let preparer = p.client().await;
    let other = p.client().await;
    let stmt = preparer
        .prepare("SELECT $1::int + 1, pg_backend_pid()")
        .await
        .expect("prepare");
    for i in 0..3 {
        assert_eq!(run_prepared(&preparer, &stmt, i).await.0, i + 1);
    }
    let err = other
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect_err("the only connection is pinned");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    // Closing the statement (tokio-postgres sends Close when it is dropped) unpins.
    drop(stmt);
    preparer
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("after close");
    let third = p.client().await;
    tokio::time::timeout(
        Duration::from_secs(10),
        third.simple_query("SELECT pg_backend_pid()"),
    )
    .await
    .expect("in time")
    .expect("the connection is the pool's again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_and_its_statement_cache_through_a_pool_of_two() {
    let p = start(2, "queue_timeout = \"30s\"", &plain_line()).await;
    let url = format!(
        "postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{}/{DB}?sslmode=disable",
        p.ctx.proxy.addr.port()
    );
    let out = crate::drivers::run(crate::drivers::Lang::Python, "asyncpg_pooled.py", &[&url]).await;
    let workers = out["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 12, "{out:#}");
    for (i, w) in workers.iter().enumerate() {
        let i = i as i64;
        let mut want: Vec<serde_json::Value> = Vec::new();
        for r in 0..15i64 {
            want.push((r * 2 + i).into());
            want.push((r + 1000).into());
            want.push((r - i).into());
        }
        for r in 0..5 {
            want.push(format!("w{i}-{r}").into());
        }
        want.push(i.into());
        want.push(3.into());
        want.push((2 + i).into());
        want.push(format!("after-{i}").into());
        assert_eq!(w["seen"], serde_json::Value::Array(want), "worker {i}");
        assert_eq!(w["error"], "DivisionByZeroError", "worker {i}");
    }
    assert!(p.pool_backends().await <= 2);
    assert!(injected(&p).await >= 1.0);
}

/// md5 + md5("apppw" || "app"): the auth file's md5 form of the role's password.
const MD5_HASH: &str = "md5f44ca69ffd2494f6d3e571acf7a949aa";

/// pgbench through spillway as the pooled role; its output (stdout and stderr).
fn pgbench(p: &Pooled, args: &[&str]) -> String {
    let port = p.ctx.proxy.addr.port().to_string();
    let out = std::process::Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port, "-U", ROLE])
        .args(args)
        .arg(DB)
        .env("PGPASSWORD", PASSWORD)
        .env("PGPASSFILE", "/dev/null")
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

/// pgbench with many clients on a pool of 20, the TPC-B-like script and `-S`, in the
/// simple and the extended protocol, logging in with md5 against the auth file's md5
/// hash (and the pool by md5 passthrough, as PostgreSQL stores the same hash): no
/// failed transaction, never more than 20 server connections, every TPC-B
/// transaction applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_with_many_clients_on_a_pool_of_twenty() {
    pgbench_on_a_pool_of_twenty(&[
        ("simple", None, 500, 4),
        ("extended", None, 500, 4),
        ("extended", Some("-S"), 500, 4),
    ])
    .await;
}

/// The same with `-M prepared` (issue 16's acceptance run, with 200 clients where the
/// benchmark has 1,000): every client prepares its statements once, on whichever
/// connection it leases first, and binds them on every other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_with_many_clients_on_a_pool_of_twenty() {
    pgbench_on_a_pool_of_twenty(&[("prepared", Some("-S"), 200, 5), ("prepared", None, 200, 5)])
        .await;
}

/// Runs pgbench `(mode, script, clients, transactions per client)` in turn through a
/// pool of 20 and checks each run and, at the end, the pool's backends and the
/// TPC-B invariants (every transaction's history row, balances that agree).
async fn pgbench_on_a_pool_of_twenty(runs: &[(&str, Option<&str>, u32, u32)]) {
    let p = start_with(
        20,
        "queue_timeout = \"60s\"",
        &format!("\"{ROLE}\" \"{MD5_HASH}\""),
        "",
        MD5_HASH,
    )
    .await;
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1"])
        .args([
            "-p",
            &p.ctx.pg.port().to_string(),
            "-U",
            p.ctx.pg.superuser(),
            DB,
        ])
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "{init:?}");
    p.ctx.psql_direct(&format!(
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO {ROLE}"
    ));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let conninfo = p.ctx.direct_config();
        tokio::spawn(async move {
            let direct = connect(&conninfo).await;
            let mut most = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n: i64 = direct
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                        &[&ROLE],
                    )
                    .await
                    .expect("count")
                    .get(0);
                most = most.max(n);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        })
    };
    let mut tpcb = 0;
    let mut most_clients = 0;
    for &(mode, script, clients, per_client) in runs {
        let (c, t) = (clients.to_string(), per_client.to_string());
        let mut args = vec!["-M", mode, "-c", &c, "-j", "2", "-t", &t, "-n"];
        args.extend(script);
        let out = tokio::task::block_in_place(|| pgbench(&p, &args));
        let total = clients * per_client;
        assert!(
            out.contains("number of failed transactions: 0"),
            "{mode} {script:?}:\n{out}"
        );
        assert!(
            out.contains(&format!(
                "number of transactions actually processed: {total}/{total}"
            )),
            "{mode} {script:?}:\n{out}"
        );
        if script.is_none() {
            tpcb += total;
        }
        most_clients = most_clients.max(clients);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.await.expect("sampler");
    assert!(
        (1..=20).contains(&most),
        "at most the pool's 20 backends for {most_clients} clients: {most}"
    );
    let check = p.ctx.psql_direct(
        "SELECT (SELECT count(*) FROM pgbench_history) || ' ' || \
         ((SELECT sum(delta) FROM pgbench_history) = (SELECT sum(abalance) FROM pgbench_accounts) \
          AND (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(bbalance) FROM pgbench_branches) \
          AND (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT sum(tbalance) FROM pgbench_tellers))",
    );
    assert_eq!(
        check.trim(),
        format!("{tpcb} true"),
        "every TPC-B transaction applied once, balances agreeing"
    );
}

/// spillway with role `app` in transaction mode and no auth file: verifiers come from
/// `auth.query` run as `auth_user`.
async fn start_with_auth_query(auth_user: &str) -> Context {
    Context::builder()
        .pg(|b| b.hba(&format!("host all {ROLE} 127.0.0.1/32 scram-sha-256")))
        .before_proxy(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}';"
        ))
        .section(&format!(
            "[pool.users.{ROLE}]\nmode = \"transaction\"\n[auth]\nuser = \"{auth_user}\"\n"
        ))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_fetches_the_verifier_and_a_missing_auth_user_is_a_clear_fatal() {
    // auth.user is the backend URL's role: the verifier comes from pg_authid and the
    // pool logs in by SCRAM passthrough.
    let ctx = start_with_auth_query(crate::context::USER).await;
    let conninfo = |password: &str| {
        format!(
            "host=127.0.0.1 port={} user={ROLE} password={password} dbname={DB}",
            ctx.proxy.addr.port()
        )
    };
    let client = connect(&conninfo(PASSWORD)).await;
    let rows = client
        .simple_query("SELECT current_user")
        .await
        .expect("query");
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(ROLE))
    );
    let err = tokio_postgres::connect(&conninfo("wrong"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password is refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    drop(ctx);

    let ctx = start_with_auth_query("ghost").await;
    let err = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user={ROLE} password={PASSWORD} dbname={DB}",
            ctx.proxy.addr.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("nobody can be checked without the auth.user role");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("auth.query") && m.contains("\"ghost\"")),
        "{message:?}"
    );
}
