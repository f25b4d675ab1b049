//! LISTEN/NOTIFY in transaction mode (ADR 0031): listening clients hold no pooled
//! server connection; one listener connection per database LISTENs for all of them and
//! its notifications reach exactly the clients that listen on the channel, between
//! transactions, with the sending client's spillway pid. UNLISTEN and a disconnect
//! stop delivery; the listener comes back after its backend is terminated; a client
//! that does not read loses what exceeds `pool.notify_queue` and is warned. LISTEN
//! inside a transaction pins the client instead (and still works). Clients: tokio-postgres,
//! psql and asyncpg.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::context::DB;
use crate::pooling::{PASSWORD, Pooled, ROLE, plain_line, start};

/// What a listening client's connection delivered outside any query's answer.
#[derive(Debug)]
enum Event {
    Note {
        pid: i32,
        channel: String,
        payload: String,
    },
    Notice(String),
}

/// A pooled client whose connection is driven here, so its notifications and notices
/// can be collected.
async fn listening_client(p: &Pooled) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<Event>) {
    let (client, mut conn) = tokio_postgres::connect(&p.conninfo(ROLE, PASSWORD), NoTls)
        .await
        .expect("connect listener");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = futures_util::future::poll_fn(|cx| conn.poll_message(cx)).await {
            let event = match msg {
                AsyncMessage::Notification(n) => Event::Note {
                    pid: n.process_id(),
                    channel: n.channel().to_owned(),
                    payload: n.payload().to_owned(),
                },
                AsyncMessage::Notice(e) => Event::Notice(e.message().to_owned()),
                _ => continue,
            };
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    (client, rx)
}

/// The next notification (notices skipped), within 5 s: (pid, channel, payload).
async fn next_note(rx: &mut mpsc::UnboundedReceiver<Event>) -> (i32, String, String) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a notification within 5 s")
            .expect("the connection is open");
        if let Event::Note {
            pid,
            channel,
            payload,
        } = event
        {
            return (pid, channel, payload);
        }
    }
}

/// Nothing arrives within `wait`.
async fn nothing_within(rx: &mut mpsc::UnboundedReceiver<Event>, wait: Duration, what: &str) {
    if let Ok(Some(event)) = tokio::time::timeout(wait, rx.recv()).await {
        panic!("{what}: got {event:?}");
    }
}

/// Backends in `pg_stat_activity` with `application_name` `app`.
async fn backends(p: &Pooled, app: &str) -> i64 {
    p.ctx
        .direct_client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .expect("count backends")
        .get(0)
}

/// Waits up to 10 s for `backends(app)` to be `want`.
async fn await_backends(p: &Pooled, app: &str, want: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = backends(p, app).await;
        if n == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{app}: {n} backends, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// spillway's pooled pids start at 2^30 (PostgreSQL's are below 2^22).
const SPILLWAY_PID_FLOOR: i32 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_hold_no_server_connection_and_get_what_they_listen_to() {
    // A pool of two with a short queue, one connection held by an open transaction:
    // a listening client that kept a connection would make the sender fail (53300).
    let p = start(2, "queue_timeout = \"500ms\"", &plain_line()).await;
    let (a, mut a_rx) = listening_client(&p).await;
    let (b, mut b_rx) = listening_client(&p).await;
    let sender = p.client().await;
    let blocker = p.client().await;
    a.batch_execute("LISTEN jobs").await.expect("a listens");
    a.batch_execute("LISTEN \"Mixed Case\";")
        .await
        .expect("a listens, quoted");
    b.batch_execute("listen JOBS").await.expect("b listens");
    await_backends(&p, "spillway listener", 1).await;
    blocker
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("blocker holds a connection");

    sender
        .batch_execute("NOTIFY jobs, 'first'")
        .await
        .expect("notify with listeners idle and one connection held");
    let (pid_a, chan, payload) = next_note(&mut a_rx).await;
    assert_eq!((chan.as_str(), payload.as_str()), ("jobs", "first"));
    let (pid_b, _, payload) = next_note(&mut b_rx).await;
    assert_eq!(payload, "first");
    assert!(
        pid_a >= SPILLWAY_PID_FLOOR,
        "the sender's spillway pid, not its backend's: {pid_a}"
    );
    assert_eq!(pid_a, pid_b, "both see the same sender");

    // Only the client listening on a channel gets it; payloads pass as sent.
    sender
        .batch_execute("SELECT pg_notify('Mixed Case', 'é ✓ ' || repeat('x', 5000))")
        .await
        .expect("pg_notify");
    let (_, chan, payload) = next_note(&mut a_rx).await;
    assert_eq!(chan, "Mixed Case");
    assert_eq!(payload, format!("é ✓ {}", "x".repeat(5000)));
    nothing_within(
        &mut b_rx,
        Duration::from_millis(300),
        "b does not listen on Mixed Case",
    )
    .await;
    blocker.batch_execute("COMMIT").await.expect("blocker ends");

    // Inside a transaction nothing is delivered; at its end it is (as PostgreSQL).
    b.batch_execute("BEGIN; SELECT 1").await.expect("b begins");
    sender
        .batch_execute("NOTIFY jobs, 'during'")
        .await
        .expect("notify");
    assert_eq!(next_note(&mut a_rx).await.2, "during");
    nothing_within(
        &mut b_rx,
        Duration::from_millis(300),
        "b is in a transaction",
    )
    .await;
    b.batch_execute("COMMIT").await.expect("b commits");
    assert_eq!(
        next_note(&mut b_rx).await.2,
        "during",
        "delivered after COMMIT"
    );

    // UNLISTEN * stops b's; a's go on.
    b.batch_execute("UNLISTEN *").await.expect("unlisten");
    sender
        .batch_execute("NOTIFY jobs, 'after'")
        .await
        .expect("notify");
    assert_eq!(next_note(&mut a_rx).await.2, "after");
    nothing_within(&mut b_rx, Duration::from_millis(300), "b unlistened").await;
    assert_eq!(
        p.pool_backends().await,
        2,
        "the pool's two connections, nothing more"
    );

    // a leaves: nobody listens, and the listener connection is closed.
    drop(a);
    await_backends(&p, "spillway listener", 0).await;
    b.batch_execute("LISTEN jobs")
        .await
        .expect("b listens again");
    await_backends(&p, "spillway listener", 1).await;
    sender
        .batch_execute("NOTIFY jobs, 'again'")
        .await
        .expect("notify");
    assert_eq!(next_note(&mut b_rx).await.2, "again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_listens_again_after_its_backend_is_terminated() {
    let p = start(2, "", &plain_line()).await;
    let (a, mut a_rx) = listening_client(&p).await;
    let sender = p.client().await;
    a.batch_execute("LISTEN one; LISTEN two")
        .await
        .expect("two channels in one Query: pinned, served by its own connection");
    a.batch_execute("UNLISTEN *").await.expect("unlisten");
    let (c, mut c_rx) = listening_client(&p).await;
    c.batch_execute("LISTEN one").await.expect("listen");
    c.batch_execute("LISTEN two").await.expect("listen");
    await_backends(&p, "spillway listener", 1).await;
    let direct = p.ctx.direct_client().await;
    direct
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'spillway listener'",
        )
        .await
        .expect("terminate the listener");
    // Back within the backoff; then both channels are listened again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        sender
            .batch_execute("NOTIFY two, 'probe'")
            .await
            .expect("notify");
        if let Ok(Some(Event::Note { payload, .. })) =
            tokio::time::timeout(Duration::from_millis(200), c_rx.recv()).await
        {
            assert_eq!(payload, "probe");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener did not come back"
        );
    }
    sender
        .batch_execute("NOTIFY one, 'back'")
        .await
        .expect("notify");
    loop {
        let (_, chan, payload) = next_note(&mut c_rx).await;
        if payload != "probe" {
            assert_eq!((chan.as_str(), payload.as_str()), ("one", "back"));
            break;
        }
    }
    nothing_within(&mut a_rx, Duration::from_millis(200), "a unlistened").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_loses_what_exceeds_its_queue_and_is_warned() {
    let p = start(3, "notify_queue = 3", &plain_line()).await;
    let (a, mut a_rx) = listening_client(&p).await;
    let (b, mut b_rx) = listening_client(&p).await;
    let sender = p.client().await;
    a.batch_execute("LISTEN q").await.expect("listen");
    b.batch_execute("LISTEN q").await.expect("listen");
    // a stays in a transaction: its notifications wait in its queue meanwhile.
    a.batch_execute("BEGIN").await.expect("begin");
    a.batch_execute("SELECT 1").await.expect("select");
    // b reads each one before the next is sent (its queue holds three too): it gets
    // all ten while a's queue overflows.
    for i in 0..10 {
        sender
            .batch_execute(&format!("NOTIFY q, 'n{i}'"))
            .await
            .expect("notify");
        assert_eq!(next_note(&mut b_rx).await.2, format!("n{i}"));
    }
    nothing_within(
        &mut a_rx,
        Duration::from_millis(200),
        "a is in a transaction",
    )
    .await;
    a.batch_execute("COMMIT").await.expect("commit");
    let mut events = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), a_rx.recv()).await {
        events.push(e);
    }
    let notes: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Note { payload, .. } => Some(payload.as_str()),
            Event::Notice(_) => None,
        })
        .collect();
    assert_eq!(
        notes,
        ["n0", "n1", "n2"],
        "the first three, in order: {events:?}"
    );
    match events.first() {
        Some(Event::Notice(m)) => assert!(m.contains("dropped 7 notification"), "{m}"),
        other => panic!("a WARNING before the notifications: {other:?}"),
    }
    // a is usable and listening still.
    sender
        .batch_execute("NOTIFY q, 'later'")
        .await
        .expect("notify");
    assert_eq!(next_note(&mut a_rx).await.2, "later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_inside_a_transaction_pins_the_client_and_still_works() {
    let p = start(2, "queue_timeout = \"500ms\"", &plain_line()).await;
    let (a, mut a_rx) = listening_client(&p).await;
    let sender = p.client().await;
    a.batch_execute("BEGIN; LISTEN inside; COMMIT")
        .await
        .expect("listen in a transaction");
    // Pinned: a keeps one server connection; the sender has the other.
    sender
        .batch_execute("NOTIFY inside, 'pinned'")
        .await
        .expect("notify");
    let (pid, _, payload) = next_note(&mut a_rx).await;
    assert_eq!(payload, "pinned");
    assert!(
        pid >= SPILLWAY_PID_FLOOR,
        "the pinned connection's notification shows the sender's spillway pid: {pid}"
    );
    assert_eq!(
        backends(&p, "spillway listener").await,
        0,
        "no listener used"
    );
    let other = p.client().await;
    other
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("the other connection");
    let err = sender
        .batch_execute("SELECT 1")
        .await
        .expect_err("both connections taken: one pinned, one in a transaction");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_sees_a_notification_it_sent_itself_with_a_spillway_pid() {
    let p = start(1, "", &plain_line()).await;
    let port = p.ctx.proxy.addr.port().to_string();
    let out = tokio::process::Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", &port, "-U", ROLE, "-d", DB])
        .args(["-v", "ON_ERROR_STOP=1"])
        .args(["-c", "LISTEN psql_chan"])
        .args(["-c", "NOTIFY psql_chan, 'from psql'"])
        .args(["-c", "SELECT pg_sleep(1)"])
        .args(["-c", "SELECT 1"])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .await
        .expect("run psql");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Asynchronous notification \"psql_chan\""))
        .unwrap_or_else(|| panic!("no notification in:\n{stdout}"));
    assert!(line.contains("with payload \"from psql\""), "{line}");
    let pid: i32 = line
        .rsplit(' ')
        .next()
        .and_then(|w| w.trim_end_matches('.').parse().ok())
        .unwrap_or_else(|| panic!("pid in {line}"));
    assert!(pid >= SPILLWAY_PID_FLOOR, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_listener_gets_its_own_notification_with_its_own_pid() {
    let p = start(2, "queue_timeout = \"30s\"", &plain_line()).await;
    let url = format!(
        "postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{}/{DB}?sslmode=disable",
        p.ctx.proxy.addr.port()
    );
    let out = crate::drivers::run(crate::drivers::Lang::Python, "asyncpg_notify.py", &[&url]).await;
    assert_eq!(out["notification_pid_is_own"], true, "{out:#}");
    assert_eq!(out["channel"], "spillway_chan", "{out:#}");
    assert_eq!(out["payload"], "hello", "{out:#}");
    // pg_backend_pid() names the pooled server connection, not the client's pid
    // (documented): asyncpg's get_server_pid() is spillway's.
    assert_eq!(out["notification_pid_is_pg_backend_pid"], false, "{out:#}");
    assert_eq!(out["timeout"], "TimeoutError", "{out:#}");
    assert_eq!(out["usable_after_cancel"], 1, "{out:#}");
    // asyncpg LISTENs through the extended protocol (Parse, Describe, Flush; then
    // Bind, Execute, Sync): served by the listener connection, not a pinned one.
    let text = crate::metrics::scrape(p.ctx.proxy.metrics_addr()).await;
    assert_eq!(
        crate::metrics::sample(&text, "spillway_pool_listener_connects_total", ""),
        1.0
    );
    assert_eq!(
        crate::metrics::sample(&text, "spillway_pool_notifications_total", ""),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_and_node_postgres_listen_and_notify() {
    // A pool of two: psycopg's transaction LISTEN pins one connection; had its
    // autocommit LISTEN (extended protocol) pinned the other, the sender would wait
    // for a connection until the script timed out.
    let p = start(2, "queue_timeout = \"30s\"", &plain_line()).await;
    let url = format!(
        "postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{}/{DB}?sslmode=disable",
        p.ctx.proxy.addr.port()
    );
    let out = crate::drivers::run(
        crate::drivers::Lang::Python,
        "psycopg_pooled_notify.py",
        &[&url],
    )
    .await;
    assert_eq!(
        out["autocommit"],
        serde_json::json!([["psy_chan", "hello psycopg", true]]),
        "{out:#}"
    );
    assert_eq!(out["after"], serde_json::json!([]), "{out:#}");
    assert_eq!(
        out["in_transaction"],
        serde_json::json!(["in a transaction"]),
        "{out:#}"
    );
    let out = crate::drivers::run(crate::drivers::Lang::Node, "pg_pooled_notify.js", &[&url]).await;
    let got = out["got"].as_array().expect("got");
    let payloads: Vec<&str> = got.iter().filter_map(|n| n["payload"].as_str()).collect();
    assert_eq!(payloads, ["first", "second"], "{out:#}");
    assert!(got.iter().all(|n| n["channel"] == "node_chan"));
    assert!(
        got.iter().all(|n| n["pid"]
            .as_i64()
            .is_some_and(|pid| pid >= i64::from(SPILLWAY_PID_FLOOR))),
        "{out:#}"
    );
    assert!(p.pool_backends().await <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_comes_back_after_a_postgresql_restart() {
    let mut p = start(2, "", &plain_line()).await;
    let (a, mut a_rx) = listening_client(&p).await;
    a.batch_execute("LISTEN restart").await.expect("listen");
    await_backends(&p, "spillway listener", 1).await;
    tokio::task::block_in_place(|| p.ctx.pg.stop_fast()).expect("stop PostgreSQL");

    // A new channel cannot be listened while PostgreSQL is down: 08006, and the
    // session goes on.
    let (b, _b_rx) = tokio::time::timeout(Duration::from_secs(20), listening_client(&p))
        .await
        .expect("a new client is authenticated by spillway during the outage");
    let err = b
        .batch_execute("LISTEN other")
        .await
        .expect_err("no listener connection");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CONNECTION_FAILURE),
        "{err}"
    );

    tokio::task::block_in_place(|| p.ctx.pg.start()).expect("start PostgreSQL");
    let sender = p.client().await;
    // The listener reconnects on its own (backoff up to 5 s) and listens again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        sender
            .batch_execute("NOTIFY restart, 'back'")
            .await
            .expect("notify");
        if let Ok(Some(Event::Note { payload, .. })) =
            tokio::time::timeout(Duration::from_millis(300), a_rx.recv()).await
        {
            assert_eq!(payload, "back");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener did not come back after the restart"
        );
    }
    b.batch_execute("LISTEN other")
        .await
        .expect("listening works again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_listens_on_its_pinned_connection_when_statements_are_not_carried() {
    // pool.max_prepared_statements = 0: asyncpg's named LISTEN statement pins the
    // session, and LISTEN runs on that connection; the pid is still the client's.
    let p = start(
        2,
        "queue_timeout = \"30s\"\nmax_prepared_statements = 0",
        &plain_line(),
    )
    .await;
    let url = format!(
        "postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{}/{DB}?sslmode=disable",
        p.ctx.proxy.addr.port()
    );
    let out = crate::drivers::run(crate::drivers::Lang::Python, "asyncpg_notify.py", &[&url]).await;
    assert_eq!(out["notification_pid_is_own"], true, "{out:#}");
    assert_eq!(out["payload"], "hello", "{out:#}");
    let text = crate::metrics::scrape(p.ctx.proxy.metrics_addr()).await;
    assert_eq!(
        crate::metrics::sample(&text, "spillway_pool_listener_connects_total", ""),
        0.0,
        "the listener connection was not used"
    );
}

/// `sql` as a simple Query, which must succeed.
async fn run(client: &tokio_postgres::Client, sql: &str) {
    client.batch_execute(sql).await.expect(sql);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_in_a_transaction_block_takes_effect_at_commit_through_the_listener() {
    let p = start(2, "queue_timeout = \"1s\"", &plain_line()).await;
    let (a, mut a_rx) = listening_client(&p).await;
    let sender = p.client().await;
    // Rolled back: never listened (the listener not even asked).
    for sql in ["BEGIN", "LISTEN rolled", "ROLLBACK"] {
        run(&a, sql).await;
    }
    assert_eq!(
        backends(&p, "spillway listener").await,
        0,
        "nothing committed"
    );
    // Committed: listened from the COMMIT on, not before.
    run(&a, "BEGIN").await;
    run(&a, "LISTEN kept").await;
    run(&sender, "NOTIFY kept, 'before the commit'").await;
    run(&a, "COMMIT").await;
    run(&sender, "NOTIFY kept, 'after'; NOTIFY rolled, 'never'").await;
    let (_, channel, payload) = next_note(&mut a_rx).await;
    assert_eq!((channel.as_str(), payload.as_str()), ("kept", "after"));
    nothing_within(
        &mut a_rx,
        Duration::from_millis(300),
        "only what was committed",
    )
    .await;
    assert_eq!(backends(&p, "spillway listener").await, 1);
    // Not pinned: another client's transaction holds one connection, the sender the
    // other (a pinned client would hold one, and the sender would wait out the queue).
    let other =
        both_connections_free(&p, &sender, "a's transaction left no connection pinned").await;
    run(&other, "COMMIT").await;
    // UNLISTEN in a block: rolled back it changes nothing, committed it stops delivery.
    for sql in ["BEGIN", "UNLISTEN kept", "ROLLBACK"] {
        run(&a, sql).await;
    }
    run(&sender, "NOTIFY kept, 'still'").await;
    assert_eq!(next_note(&mut a_rx).await.2, "still");
    for sql in ["BEGIN", "UNLISTEN kept", "COMMIT"] {
        run(&a, sql).await;
    }
    run(&sender, "NOTIFY kept, 'gone'").await;
    nothing_within(
        &mut a_rx,
        Duration::from_millis(300),
        "unlistened at commit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_ended_in_another_form_settles_its_listen_by_postgresqls_answer() {
    let p = start(2, "queue_timeout = \"1s\"", &plain_line()).await;
    let (a, mut a_rx) = listening_client(&p).await;
    let sender = p.client().await;
    // A ROLLBACK TO SAVEPOINT leaves the block (and the LISTEN before it) alone; the
    // block ends with an extended-protocol COMMIT, read from PostgreSQL's answer.
    for sql in [
        "BEGIN",
        "LISTEN ext",
        "SAVEPOINT s",
        "ROLLBACK TO SAVEPOINT s",
    ] {
        run(&a, sql).await;
    }
    a.execute("COMMIT", &[]).await.expect("extended COMMIT");
    // Handed to the listener without waiting: give it a moment, as a client would.
    await_backends(&p, "spillway listener", 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    run(&sender, "NOTIFY ext, 'committed'").await;
    let (_, channel, payload) = next_note(&mut a_rx).await;
    assert_eq!((channel.as_str(), payload.as_str()), ("ext", "committed"));
    // Rolled back among other statements: dropped.
    run(&a, "BEGIN").await;
    run(&a, "LISTEN dropped").await;
    run(&a, "ROLLBACK; SELECT 1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    run(&sender, "NOTIFY dropped, 'never'").await;
    nothing_within(&mut a_rx, Duration::from_millis(300), "rolled back").await;
    // Not pinned all along: both connections usable by others at once.
    both_connections_free(&p, &sender, "no connection pinned").await;
}

/// Nothing is pinned on the pool of two: another client's open transaction holds
/// one connection and `sender` still gets the other (a pinned client would hold one,
/// and `sender` would wait out the queue). Returns that other client, in its block.
async fn both_connections_free(
    p: &Pooled,
    sender: &tokio_postgres::Client,
    what: &str,
) -> tokio_postgres::Client {
    let other = p.client().await;
    run(&other, "BEGIN").await;
    other
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("other's lease");
    sender
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect(what);
    other
}
