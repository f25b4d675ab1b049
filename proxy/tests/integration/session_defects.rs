//! Driver-compatibility defects of the session layer (issue 18), each reproduced the
//! way a driver's own test suite met it, with the read cache on (the default):
//! - libpq's pipeline mode sends Bind/Execute after Bind/Execute without a Sync and
//!   waits for the results: PostgreSQL sends them, and at once when one fails (an
//!   error flushes its output). spillway must not hold what it cannot answer itself,
//!   nor an error's way back;
//! - a backend ended by an operator (`pg_terminate_backend`) while PostgreSQL stays
//!   up: the client gets PostgreSQL's FATAL 57P01 and the connection closes, as on a
//!   direct connection (node-postgres' pool waits for that error);
//! - a FATAL PostgreSQL sends on its own (idle_in_transaction_session_timeout) is
//!   relayed and logged as PostgreSQL's, not as a spillway error.

use std::net::SocketAddr;
use std::time::Duration;

use crate::context::{Context, DB, USER, eventually};
use crate::wire::{Msg, Raw, bind, describe_portal, execute, parse, query, sync, tags};

fn direct_addr(ctx: &Context) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ctx.pg.port()))
}

/// Messages that arrive within `wait`, without asking for more (no Sync, no Flush).
async fn arriving(raw: &mut Raw, wait: Duration) -> Vec<Msg> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = raw.recv_within(wait).await {
        let error = m.tag == b'E';
        out.push(m);
        if error {
            break;
        }
    }
    out
}

/// The pipeline of a prepared INSERT, the third row a duplicate key, with no Sync:
/// what arrives at `addr` before the client asks for anything more.
async fn pipeline_without_sync(addr: SocketAddr, table: &str) -> (String, Option<String>) {
    let mut raw = Raw::startup(addr, USER, DB).await;
    let mut script = parse("ins", &format!("INSERT INTO {table} (id) VALUES ($1)"));
    script.extend(sync());
    raw.send(&script).await;
    raw.until(b'Z').await;
    let mut pipeline = Vec::new();
    for id in ["1", "2", "1"] {
        pipeline.extend(bind("", "ins", &[Some(id)]));
        pipeline.extend(execute("", 0));
    }
    raw.send(&pipeline).await;
    let got = arriving(&mut raw, Duration::from_secs(3)).await;
    let code = got.last().and_then(Msg::code);
    // The pipeline ends as any does.
    raw.send(&sync()).await;
    raw.until(b'Z').await;
    (tags(&got), code)
}

#[tokio::test]
async fn a_pipeline_without_sync_gets_its_results_and_error_at_once() {
    let ctx = Context::builder()
        .before_proxy("CREATE TABLE p_direct (id int PRIMARY KEY); CREATE TABLE p_proxy (id int PRIMARY KEY);")
        .start()
        .await;
    let direct = pipeline_without_sync(direct_addr(&ctx), "p_direct").await;
    assert_eq!(direct, ("2C2C2E".to_owned(), Some("23505".to_owned())));
    let proxied = pipeline_without_sync(ctx.proxy.addr, "p_proxy").await;
    assert_eq!(proxied, direct, "through spillway");
}

/// The same with deferred tables in the database: a cycle of more than one Execute
/// is never deferred, so it may not wait for its Sync either.
#[tokio::test]
async fn a_pipeline_without_sync_is_not_held_beside_deferred_tables() {
    let ctx = Context::builder()
        .before_proxy(
            "CREATE TABLE p_direct (id int PRIMARY KEY); CREATE TABLE p_proxy (id int PRIMARY KEY); \
             CREATE TABLE p_deferred (id int PRIMARY KEY);",
        )
        .section("[tables.\"public.p_deferred\"]\npolicy = \"write-behind\"\n")
        .start()
        .await;
    let direct = pipeline_without_sync(direct_addr(&ctx), "p_direct").await;
    let proxied = pipeline_without_sync(ctx.proxy.addr, "p_proxy").await;
    assert_eq!(proxied, direct, "through spillway");
}

/// A statement that could be cached but fails: its error comes at once, as directly.
#[tokio::test]
async fn a_failing_read_without_sync_gets_its_error_at_once() {
    let ctx = Context::start().await;
    let mut answers = Vec::new();
    for addr in [direct_addr(&ctx), ctx.proxy.addr] {
        let mut raw = Raw::startup(addr, USER, DB).await;
        let mut script = parse("", "SELECT 1 / (0 * $1::int)");
        script.extend(bind("", "", &[Some("1")]));
        script.extend(describe_portal(""));
        script.extend(execute("", 0));
        raw.send(&script).await;
        let got = arriving(&mut raw, Duration::from_secs(3)).await;
        answers.push((tags(&got), got.last().and_then(Msg::code)));
        raw.send(&sync()).await;
        raw.until(b'Z').await;
    }
    assert_eq!(answers[0].1.as_deref(), Some("22012"), "{answers:?}");
    assert_eq!(answers[1], answers[0], "through spillway");
}

#[tokio::test]
async fn a_backend_terminated_by_an_operator_ends_the_session_with_its_error() {
    let ctx = Context::start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&query("SELECT pg_backend_pid()")).await;
    let msgs = raw.until(b'Z').await;
    let row = msgs.iter().find(|m| m.tag == b'D').expect("DataRow");
    let len = i32::from_be_bytes([row.body[2], row.body[3], row.body[4], row.body[5]]) as usize;
    let pid: i32 = String::from_utf8_lossy(&row.body[6..6 + len])
        .parse()
        .expect("pid");
    let direct = ctx.direct_client().await;
    let terminated: bool = direct
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("pg_terminate_backend")
        .get(0);
    assert!(terminated);
    // Unasked, as from PostgreSQL directly: its FATAL, then the close.
    let got = tokio::time::timeout(Duration::from_secs(5), raw.until_eof())
        .await
        .expect("the session was neither told nor closed");
    assert_eq!(tags(&got), "E", "{got:?}");
    assert_eq!(got[0].code().as_deref(), Some("57P01"), "{got:?}");
    assert_eq!(got[0].severity().as_deref(), Some("FATAL"));
    // A tokio-postgres client learns it too.
    let client = ctx.proxy_client().await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    direct
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("pg_terminate_backend");
    assert!(
        eventually(Duration::from_secs(5), || client.is_closed()).await,
        "the client never learned that its session ended"
    );
    assert!(!ctx.proxy.logs().contains("session detached"));
}

#[tokio::test]
async fn a_server_fatal_on_its_own_is_postgres_not_a_spillway_error() {
    let ctx = Context::start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&query("SET idle_in_transaction_session_timeout = '100ms'"))
        .await;
    raw.until(b'Z').await;
    raw.send(&query("BEGIN")).await;
    raw.until(b'Z').await;
    let got = tokio::time::timeout(Duration::from_secs(5), raw.until_eof())
        .await
        .expect("PostgreSQL's timeout never came");
    assert_eq!(tags(&got), "E", "{got:?}");
    assert_eq!(got[0].code().as_deref(), Some("25P03"), "{got:?}");
    let peer = format!("peer={}", raw.local_addr());
    assert!(
        eventually(Duration::from_secs(2), || ctx
            .proxy
            .logs()
            .lines()
            .any(|l| l.contains(&peer) && l.contains("25P03")))
        .await,
        "the session's end was not logged"
    );
    let logs = ctx.proxy.logs();
    let about: Vec<&str> = logs.lines().filter(|l| l.contains(&peer)).collect();
    assert!(
        about
            .iter()
            .all(|l| !l.contains("ERROR") && !l.contains("WARN")),
        "logged as spillway's error:\n{}",
        about.join("\n")
    );
    assert!(
        about
            .iter()
            .any(|l| l.contains(" INFO ") && l.contains("25P03")),
        "PostgreSQL's FATAL is not logged at INFO:\n{}",
        about.join("\n")
    );
}
