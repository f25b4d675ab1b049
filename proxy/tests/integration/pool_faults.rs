//! Transaction mode under bad input and over time (issue 16's acceptance): a wrong
//! password, an unknown role that `auth.query` cannot be run for (its `auth.user`
//! missing), an exhausted pool and a server connection that dies mid-transaction each
//! get their SQLSTATE while another client's transaction in flight completes untouched.
//! Idle connections past `pool.idle_timeout` and `pool.lifetime` leave
//! `pg_stat_activity` without the pool being used again; `pool.reset_query` runs when
//! a connection goes back.

use std::time::Duration;

use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;

use crate::pooling::{PASSWORD, Pooled, ROLE, plain_line, start, start_with};

/// The first column of the first row of `sql`'s answer.
async fn one(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    let rows = client.simple_query(sql).await.expect(sql);
    rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
        _ => None,
    })?
}

/// Pool backends (`application_name` `spillway pool`) of the pooled role.
async fn pool_pids(p: &Pooled) -> Vec<i32> {
    p.ctx
        .direct_client()
        .await
        .query(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 \
             AND application_name = 'spillway pool' ORDER BY pid",
            &[&ROLE],
        )
        .await
        .expect("pool backends")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits up to `within` for the pool's backends to be `want`.
async fn await_pool_pids(p: &Pooled, want: &[i32], within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let pids = pool_pids(p).await;
        if pids == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool backends {pids:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_sqlstate_and_a_transaction_in_flight_completes() {
    // Every role in transaction mode; the auth file knows `app`; any other role is
    // looked up with auth.query as `ghost`, a role that does not exist.
    let p = start_with(
        2,
        "mode = \"transaction\"\nqueue_timeout = \"300ms\"",
        &plain_line(),
        "user = \"ghost\"",
        PASSWORD,
    )
    .await;
    let bystander = p.client().await;
    let victim = p.client().await;
    bystander.simple_query("BEGIN").await.expect("begin");
    bystander
        .simple_query("INSERT INTO pooled_t VALUES (21, 1)")
        .await
        .expect("insert");
    victim.simple_query("BEGIN").await.expect("begin");
    let victim_pid = one(&victim, "SELECT pg_backend_pid()")
        .await
        .expect("victim's backend");

    // A wrong password: 28P01.
    let err = tokio_postgres::connect(&p.conninfo(ROLE, "wrong"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password is refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    // A role only auth.query could know, with auth.user missing: 28000 naming it.
    let err = tokio_postgres::connect(&p.conninfo("nobody", "x"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("nobody can be checked without the auth.user role");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    // Both connections are in transactions: 53300 after the queue timeout.
    let waiter = p.client().await;
    let err = waiter
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect_err("the pool is exhausted");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");

    // The victim's server connection dies mid-transaction: it gets PostgreSQL's
    // 57P01, nobody else notices.
    p.ctx
        .direct_client()
        .await
        .simple_query(&format!("SELECT pg_terminate_backend({victim_pid})"))
        .await
        .expect("terminate");
    let err = victim
        .simple_query("SELECT 1")
        .await
        .expect_err("its server connection is gone");
    // PostgreSQL's FATAL reaches the client as it comes: as the answer to the query
    // if the query was sent first, else unsolicited, after which tokio-postgres
    // reports its connection closed (as on a direct connection).
    assert!(
        err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
        "{err}"
    );

    bystander
        .simple_query("INSERT INTO pooled_t VALUES (22, 1)")
        .await
        .expect("the bystander's transaction goes on");
    bystander.simple_query("COMMIT").await.expect("commit");
    let direct = p.ctx.direct_client().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM pooled_t WHERE id IN (21, 22)", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2, "the bystander's transaction committed whole");
    // The dead connection's slot is free again.
    let after = p.client().await;
    after.simple_query("BEGIN").await.expect("begin");
    after
        .simple_query("INSERT INTO pooled_t VALUES (23, 1)")
        .await
        .expect("a new client's transaction");
    after.simple_query("COMMIT").await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_idle_server_connections_without_further_use() {
    let p = start(2, "idle_timeout = \"1s\"", &plain_line()).await;
    let client = p.client().await;
    let pid: i32 = one(&client, "SELECT pg_backend_pid()")
        .await
        .and_then(|s| s.parse().ok())
        .expect("pid");
    assert_eq!(
        pool_pids(&p).await,
        [pid],
        "one connection, idle in the pool"
    );
    // Nothing uses the pool: the backend still goes after the idle timeout.
    await_pool_pids(&p, &[], Duration::from_secs(5)).await;
    let again: i32 = one(&client, "SELECT pg_backend_pid()")
        .await
        .and_then(|s| s.parse().ok())
        .expect("pid");
    assert_ne!(again, pid, "a new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_closes_connections_at_return_and_while_idle() {
    let p = start(2, "lifetime = \"1500ms\"", &plain_line()).await;
    let client = p.client().await;
    client.simple_query("BEGIN").await.expect("begin");
    let pid: i32 = one(&client, "SELECT pg_backend_pid()")
        .await
        .and_then(|s| s.parse().ok())
        .expect("pid");
    tokio::time::sleep(Duration::from_millis(1700)).await;
    // Past its lifetime in a transaction: it finishes it, then is closed at return.
    client.simple_query("COMMIT").await.expect("commit");
    await_pool_pids(&p, &[], Duration::from_secs(3)).await;
    let next: i32 = one(&client, "SELECT pg_backend_pid()")
        .await
        .and_then(|s| s.parse().ok())
        .expect("pid");
    assert_ne!(next, pid);
    // Idle, it is closed once past its lifetime, without further use.
    assert_eq!(pool_pids(&p).await, [next]);
    await_pool_pids(&p, &[], Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_query_runs_when_a_connection_goes_back() {
    // set_config(…, false) is session state spillway neither replays nor resets
    // (docs/configuration.md): only pool.reset_query clears it between clients.
    let p = start(1, "reset_query = \"DISCARD ALL\"", &plain_line()).await;
    let a = p.client().await;
    let b = p.client().await;
    one(&a, "SELECT set_config('myapp.leak', 'from a', false)").await;
    let seen = one(&b, "SELECT current_setting('myapp.leak', true)").await;
    assert_ne!(
        seen.as_deref(),
        Some("from a"),
        "b leased the same connection after the reset"
    );
    drop(p);

    // Without it the setting leaks: the check above can fail.
    let p = start(1, "", &plain_line()).await;
    let a = p.client().await;
    let b = p.client().await;
    one(&a, "SELECT set_config('myapp.leak', 'from a', false)").await;
    let seen = one(&b, "SELECT current_setting('myapp.leak', true)").await;
    assert_eq!(seen.as_deref(), Some("from a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_among_other_statements_pins_instead_of_leaking() {
    // The classifier says what a SET is (ADR 0028): alone it is replayed per lease;
    // among other statements it cannot be, so the session keeps its connection rather
    // than hand it back with the setting on it.
    let p = start(2, "", &plain_line()).await;
    let a = p.client().await;
    let b = p.client().await;
    a.simple_query("SET myapp.x = 'from a'; SELECT 1")
        .await
        .expect("set among others");
    assert_eq!(
        one(&a, "SELECT current_setting('myapp.x', true)")
            .await
            .as_deref(),
        Some("from a"),
        "a keeps its setting"
    );
    let seen = one(&b, "SELECT current_setting('myapp.x', true)").await;
    assert_ne!(seen.as_deref(), Some("from a"), "b never sees a's setting");
    // Alone, a SET is replayed on each lease and reset at return.
    b.simple_query("/* tagged */ SET myapp.y = 'from b'")
        .await
        .expect("set alone");
    assert_eq!(
        one(&b, "SELECT current_setting('myapp.y', true)")
            .await
            .as_deref(),
        Some("from b")
    );
    let c = p.client().await;
    let seen = one(&c, "SELECT current_setting('myapp.y', true)").await;
    assert_ne!(seen.as_deref(), Some("from b"), "reset at return");
}

/// A console query's rows (text), through tokio-postgres' simple protocol.
async fn console_rows(console: &tokio_postgres::Client, command: &str) -> Vec<Vec<String>> {
    console
        .simple_query(command)
        .await
        .expect(command)
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or_default().to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_and_metrics_show_pools_servers_and_waits() {
    let verifier = crate::admin::hash_password(crate::admin::PASSWORD);
    let p = start_with(
        2,
        "queue_timeout = \"5s\"",
        &plain_line(),
        &format!(
            "[admin]\nusers = [\"{}\"]\npassword = \"{verifier}\"\n",
            crate::admin::ADMIN
        ),
        PASSWORD,
    )
    .await;
    let console = crate::context::connect(&format!(
        "host=127.0.0.1 port={} user={} dbname=spillway password='{}' sslmode=disable",
        p.ctx.proxy.addr.port(),
        crate::admin::ADMIN,
        crate::admin::PASSWORD
    ))
    .await;
    let metric = |name: &'static str| {
        let addr = p.ctx.proxy.metrics_addr();
        async move {
            let text = crate::metrics::scrape(addr).await;
            crate::metrics::sample(&text, name, "")
        }
    };
    let a = p.client().await;
    let b = p.client().await;
    a.simple_query("BEGIN").await.expect("begin");
    let pid_a = one(&a, "SELECT pg_backend_pid()").await.expect("pid");
    let pid_b = one(&b, "SELECT pg_backend_pid()").await.expect("pid");
    let (db, user) = (crate::context::DB.to_owned(), ROLE.to_owned());
    let servers: Vec<(String, String, String, String)> = console_rows(&console, "SHOW SERVERS")
        .await
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[2].clone(), r[3].clone()))
        .collect();
    let mut want = vec![
        (db.clone(), user.clone(), pid_a.clone(), "leased".to_owned()),
        (db.clone(), user.clone(), pid_b.clone(), "idle".to_owned()),
    ];
    want.sort_by_key(|x| x.2.parse::<i32>().ok());
    assert_eq!(servers, want);
    let mut stat: Vec<String> = pool_pids(&p).await.iter().map(i32::to_string).collect();
    stat.sort_by_key(|s| s.parse::<i32>().ok());
    let listed: Vec<String> = servers.iter().map(|s| s.2.clone()).collect();
    assert_eq!(
        listed, stat,
        "SHOW SERVERS lists what pg_stat_activity shows"
    );
    let pools = console_rows(&console, "SHOW POOLS").await;
    assert_eq!(
        pools,
        [[db.as_str(), user.as_str(), "2", "2", "1", "1", "0"]],
        "size, open, idle, leased, waiting"
    );
    assert_eq!(metric("spillway_pool_server_connections").await, 2.0);
    assert_eq!(metric("spillway_pool_idle_connections").await, 1.0);
    assert_eq!(metric("spillway_pool_waiting_sessions").await, 0.0);

    // Both leased: a third client waits, and is seen waiting.
    b.simple_query("BEGIN").await.expect("begin");
    one(&b, "SELECT pg_backend_pid()").await;
    let c = p.client().await;
    let waiting = tokio::spawn(async move { one(&c, "SELECT pg_backend_pid()").await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while metric("spillway_pool_waiting_sessions").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no session seen waiting"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(console_rows(&console, "SHOW POOLS").await[0][6], "1");
    assert_eq!(metric("spillway_pool_idle_connections").await, 0.0);
    a.simple_query("COMMIT").await.expect("commit");
    let got = waiting.await.expect("join").expect("pid");
    assert_eq!(got, pid_a, "the waiter got a's connection when a committed");
    assert_eq!(metric("spillway_pool_waiting_sessions").await, 0.0);
    b.simple_query("COMMIT").await.expect("commit");
}

/// The console as `admin`, on `p`'s spillway.
async fn console(p: &Pooled) -> tokio_postgres::Client {
    crate::context::connect(&format!(
        "host=127.0.0.1 port={} user={} dbname=spillway password='{}' sslmode=disable",
        p.ctx.proxy.addr.port(),
        crate::admin::ADMIN,
        crate::admin::PASSWORD
    ))
    .await
}

/// A pool of 2 with `pool_extra` and the admin console on.
async fn start_with_console(pool_extra: &str) -> Pooled {
    let verifier = crate::admin::hash_password(crate::admin::PASSWORD);
    start_with(
        2,
        pool_extra,
        &plain_line(),
        &format!(
            "[admin]\nusers = [\"{}\"]\npassword = \"{verifier}\"\n",
            crate::admin::ADMIN
        ),
        PASSWORD,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_lets_transactions_in_flight_finish_and_resume_lets_the_waiting_go_on() {
    let p = start_with_console("queue_timeout = \"2s\"").await;
    let pid = "SELECT pg_backend_pid()";
    let a = p.client().await;
    let b = p.client().await;
    a.simple_query("BEGIN").await.expect("begin");
    one(&a, pid).await.expect("a leases");
    assert_eq!(pool_pids(&p).await.len(), 1);

    // PAUSE is answered only once a's transaction is over.
    let admin = console(&p).await;
    let pause = tokio::spawn(async move {
        admin
            .simple_query(&format!("PAUSE {}", crate::context::DB))
            .await
            .map(|_| admin)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pause.is_finished(),
        "PAUSE waits for the transaction in flight"
    );
    // The transaction in flight goes on; a new one waits.
    one(&a, pid)
        .await
        .expect("a's transaction goes on while paused");
    let waiting = tokio::spawn(async move { one(&b, pid).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a new transaction waits while paused"
    );
    a.simple_query("COMMIT").await.expect("commit");
    let admin = tokio::time::timeout(Duration::from_secs(5), pause)
        .await
        .expect("PAUSE answered once the transaction ended")
        .expect("join")
        .expect("PAUSE");
    // Its server connections are closed; the waiting client still waits.
    await_pool_pids(&p, &[], Duration::from_secs(3)).await;
    assert!(!waiting.is_finished(), "still paused");
    admin.simple_query("RESUME").await.expect("RESUME");
    let got = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("the waiting transaction runs after RESUME")
        .expect("join");
    assert!(got.is_some(), "a pid from a new server connection");
    assert_eq!(pool_pids(&p).await.len(), 1);

    // Paused past `pool.queue_timeout`: 53300, as in the pool's queue.
    admin
        .simple_query("PAUSE")
        .await
        .expect("PAUSE with nothing leased");
    let late = p.client().await;
    let err = late
        .simple_query(pid)
        .await
        .expect_err("paused past the timeout");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    // A database alone cannot be resumed while everything is paused.
    let err = admin
        .simple_query(&format!("RESUME {}", crate::context::DB))
        .await
        .expect_err("RESUME db under a PAUSE of everything");
    assert_eq!(
        err.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
        "{err}"
    );
    admin.simple_query("RESUME").await.expect("RESUME");
    let again = p.client().await;
    one(&again, pid).await.expect("a transaction after RESUME");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_closes_connections_as_their_transactions_end_and_wait_close_waits_for_it() {
    let p = start_with_console("").await;
    let pid = "SELECT pg_backend_pid()";
    let a = p.client().await;
    let b = p.client().await;
    a.simple_query("BEGIN").await.expect("begin");
    let pid_a: i32 = one(&a, pid).await.expect("pid").parse().expect("int");
    let pid_b: i32 = one(&b, pid).await.expect("pid").parse().expect("int");
    assert_ne!(pid_a, pid_b);
    let admin = console(&p).await;
    admin.simple_query("RECONNECT").await.expect("RECONNECT");
    // The idle connection is closed at once; the leased one is marked.
    await_pool_pids(&p, &[pid_a], Duration::from_secs(3)).await;
    let rows = console_rows(&admin, "SHOW SERVERS").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0][2].as_str(), rows[0][6].as_str()),
        (pid_a.to_string().as_str(), "1")
    );
    let wait = tokio::spawn(async move { admin.simple_query("WAIT_CLOSE").await.map(|_| admin) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !wait.is_finished(),
        "WAIT_CLOSE waits for the leased connection"
    );
    let same: i32 = one(&a, pid).await.expect("pid").parse().expect("int");
    assert_eq!(
        same, pid_a,
        "the transaction in flight keeps its connection"
    );
    a.simple_query("COMMIT").await.expect("commit");
    let admin = tokio::time::timeout(Duration::from_secs(3), wait)
        .await
        .expect("WAIT_CLOSE answered once the transaction ended")
        .expect("join")
        .expect("WAIT_CLOSE");
    await_pool_pids(&p, &[], Duration::from_secs(3)).await;
    // New transactions get new connections, not marked.
    let fresh: i32 = one(&a, pid).await.expect("pid").parse().expect("int");
    assert!(fresh != pid_a && fresh != pid_b, "a new connection");
    let rows = console_rows(&admin, "SHOW SERVERS").await;
    assert_eq!(rows[0][6], "0", "{rows:?}");
}
