//! Detached sessions (SPEC §6, issue 4: write-behind keeps acknowledging writes while
//! PostgreSQL is down). PostgreSQL is stopped as an operator would (`pg_ctl stop -m
//! fast`: FATAL 57P01 to every backend) under sessions that are idle at that moment:
//! - they are not ended but detached: deferred writes in the simple protocol, with a
//!   statement prepared before the outage, with an unnamed Parse + Bind + Describe +
//!   Execute cycle (parameter types declared, or not), are acknowledged; exact row counts are answered from the key
//!   overlay where it knows the key, and refused with a retryable ERROR 08006 (the
//!   session lives on) where it would have to read PostgreSQL; a cache hit is served;
//!   a Close of a prepared statement is answered; a cancel request does no harm;
//!   `SPILLWAY FLUSH` waits for PostgreSQL; a cache miss gets FATAL 08006 and the
//!   connection closes; a new session is refused;
//! - once PostgreSQL is back, every acknowledged write is applied exactly once, the
//!   refused one never (checked directly, and in the ledger).
//! - A session with a request outstanding when PostgreSQL stops gets PostgreSQL's
//!   FATAL, not a hang, and is closed; an idle one beside it is detached.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls};

use crate::context::{Context, DB, USER, eventually};
use crate::metrics::{sample, scrape};
use crate::wire::{Raw, bind, describe_portal, execute, parse, sync, tags, terminate};
use crate::write_behind::{direct_rows, tag};

const SCHEMA: &str = "CREATE TABLE public.d_rows (id bigint PRIMARY KEY, v text NOT NULL); \
                      CREATE TABLE public.d_counters (id int PRIMARY KEY, n bigint NOT NULL); \
                      INSERT INTO public.d_counters VALUES (1, 0), (2, 0); \
                      CREATE TABLE public.d_plain (id int PRIMARY KEY, v text NOT NULL); \
                      INSERT INTO public.d_plain VALUES (1, 'one'), (2, 'two');";

/// `d_rows` with assumed row counts (never reads), `d_counters` with exact ones; a
/// flush interval long enough that what is pending stays pending until a barrier.
async fn context() -> Context {
    Context::builder()
        .before_proxy(SCHEMA)
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.d_rows\"]\npolicy = \"write-behind\"\nrow_counts = \"assumed\"\n\
             [tables.\"public.d_counters\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await
}

/// Awaits `f`, failing the test after 30 s (a hang).
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 30 s"))
}

fn detached_sessions(ctx: &Context) -> usize {
    ctx.proxy.logs().matches("session detached").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_session_keeps_acknowledging_deferred_writes_until_it_needs_postgresql() {
    let mut ctx = context().await;
    let client = ctx.proxy_client().await;
    let flusher = ctx.proxy_client().await;
    let insert = client
        .prepare("INSERT INTO d_rows (id, v) VALUES ($1, $2)")
        .await
        .expect("prepare insert");
    let increment = client
        .prepare("UPDATE d_counters SET n = n + $1 WHERE id = $2")
        .await
        .expect("prepare increment");
    let closed_later = client
        .prepare("DELETE FROM d_rows WHERE id = $1")
        .await
        .expect("prepare delete");
    // A cached read (its second run is a hit), and pending writes from the other
    // session (a session with its own writes pending reads upstream, never the cache):
    // counter 1's makes the key overlay know that counter 1 exists.
    for _ in 0..2 {
        assert_eq!(cached_value(&client).await.as_deref(), Some("one"));
    }
    assert_eq!(
        tag(&flusher, "UPDATE d_counters SET n = n + 1 WHERE id = 1").await,
        1
    );
    assert_eq!(
        tag(&flusher, "INSERT INTO d_rows (id, v) VALUES (1, 'a')").await,
        1
    );
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let before = detached_sessions(&ctx);

    tokio::task::block_in_place(|| ctx.pg.stop_fast()).expect("stop PostgreSQL");
    assert!(
        eventually(Duration::from_secs(5), || detached_sessions(&ctx)
            >= before + 3)
        .await,
        "the three idle sessions were not detached; log:\n{}",
        ctx.proxy.logs()
    );

    let gauges = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(sample(&gauges, "spillway_detached_sessions", ""), 3.0);
    assert_eq!(sample(&gauges, "spillway_upstream_connections", ""), 0.0);
    // A cache hit needs no PostgreSQL.
    assert_eq!(cached_value(&client).await.as_deref(), Some("one"));
    // Deferred writes: simple protocol, a statement prepared before the outage, and an
    // unnamed Parse + Bind + Describe + Execute cycle.
    assert_eq!(
        tag(&client, "INSERT INTO d_rows (id, v) VALUES (2, 'b')").await,
        1
    );
    assert_eq!(
        within("prepared insert", client.execute(&insert, &[&3i64, &"c"]))
            .await
            .expect("prepared insert while detached"),
        1
    );
    let rows = within(
        "unnamed insert",
        client.query_typed(
            "INSERT INTO d_rows (id, v) VALUES ($1, $2)",
            &[(&4i64, Type::INT8), (&"d", Type::TEXT)],
        ),
    )
    .await
    .expect("unnamed Parse/Bind/Describe/Execute while detached");
    assert!(rows.is_empty());
    // The same without declared parameter types (libpq's PQexecParams), then a
    // Terminate, which ends the detached session at once.
    let mut cycle = parse("", "INSERT INTO d_rows (id, v) VALUES ($1, $2)");
    cycle.extend(bind("", "", &[Some("6"), Some("f")]));
    cycle.extend(describe_portal(""));
    cycle.extend(execute("", 0));
    cycle.extend(sync());
    raw.send(&cycle).await;
    let answers = within("raw cycle", raw.until(b'Z')).await;
    assert_eq!(tags(&answers), "12nCZ", "{answers:?}");
    raw.send(&terminate()).await;
    assert!(
        within("close after Terminate", raw.until_eof())
            .await
            .is_empty()
    );
    // Exact row counts: counter 1 has a pending write (the overlay knows it exists).
    for _ in 0..2 {
        assert_eq!(
            within("increment 1", client.execute(&increment, &[&1i64, &1i32]))
                .await
                .expect("increment of a key the overlay knows"),
            1
        );
    }
    // Counter 2 would need a point read: refused, retryable, the session lives on.
    let err = within(
        "increment 2",
        client.simple_query("UPDATE d_counters SET n = n + 1 WHERE id = 2"),
    )
    .await
    .expect_err("a key only PostgreSQL knows cannot be counted exactly");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE, "{db:?}");
    assert_eq!(db.severity(), "ERROR", "{db:?}");
    assert!(!client.is_closed());
    // A Close of a prepared statement is answered locally (tokio-postgres sends it
    // when the statement is dropped); a cancel request has nothing to cancel.
    drop(closed_later);
    client
        .cancel_token()
        .cancel_query(NoTls)
        .await
        .expect("cancel request accepted");
    assert_eq!(
        tag(&client, "INSERT INTO d_rows (id, v) VALUES (5, 'e')").await,
        1
    );
    // No new session while PostgreSQL is down: spillway cannot authenticate it.
    let refused = tokio_postgres::connect(&ctx.proxy_config(), NoTls).await;
    assert!(refused.is_err(), "a session opened with PostgreSQL down");
    // SPILLWAY FLUSH waits for PostgreSQL.
    let flushing = tokio::spawn(async move {
        let r = flusher.simple_query("SPILLWAY FLUSH").await.map(|_| ());
        (flusher, r)
    });
    // A miss needs PostgreSQL: FATAL 08006, and the connection closes.
    let err = within(
        "miss",
        client.simple_query("SELECT v FROM d_plain WHERE id = 2"),
    )
    .await
    .expect_err("a miss cannot be answered while detached");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE, "{db:?}");
    assert_eq!(db.severity(), "FATAL", "{db:?}");
    assert!(db.message().contains("reconnect"), "{db:?}");
    assert!(
        db.message().contains("57P01"),
        "names PostgreSQL's reason: {db:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || client.is_closed()).await,
        "the session stayed open after its FATAL"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !flushing.is_finished(),
        "SPILLWAY FLUSH returned with PostgreSQL down"
    );

    tokio::task::block_in_place(|| ctx.pg.start()).expect("start PostgreSQL again");
    let (flusher, flushed) = within("SPILLWAY FLUSH", flushing).await.expect("task");
    flushed.expect("SPILLWAY FLUSH once PostgreSQL is back");
    drop(flusher);
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id || v, ',' ORDER BY id) FROM d_rows"
        ),
        "1a,2b,3c,4d,5e,6f"
    );
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id || ':' || n, ',' ORDER BY id) FROM d_counters"
        ),
        "1:3,2:0"
    );
    // One journal record per acknowledged write: 2 before the outage, 7 during.
    assert_eq!(
        direct_rows(&ctx, "SELECT last_seq FROM spillway.flush_ledger"),
        "9"
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM spillway.dead_letters"),
        "0"
    );
}

async fn cached_value(client: &Client) -> Option<String> {
    let msgs = within(
        "cached read",
        client.simple_query("SELECT v FROM d_plain WHERE id = 1"),
    )
    .await
    .expect("cached read");
    msgs.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_outstanding_when_postgresql_stops_gets_an_error() {
    let mut ctx = context().await;
    let idle = ctx.proxy_client().await;
    // Its privilege on the table is known from now on (asked of PostgreSQL once).
    assert_eq!(
        tag(&idle, "INSERT INTO d_rows (id, v) VALUES (1, 'a')").await,
        1
    );
    let busy = ctx.proxy_client().await;
    let running = tokio::spawn(async move {
        let r = busy.simple_query("SELECT pg_sleep(60)").await;
        (busy, r)
    });
    // The query is running upstream.
    let direct = ctx.direct_client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if n == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the query never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(direct);
    tokio::task::block_in_place(|| ctx.pg.stop_fast()).expect("stop PostgreSQL");
    let (busy, answer) = within("the running query", running).await.expect("task");
    let err = answer.expect_err("the query cannot have completed");
    // PostgreSQL's own FATAL, relayed as before: nothing was detached.
    let db = err.as_db_error().expect("PostgreSQL's FATAL");
    assert_eq!(db.code(), &SqlState::ADMIN_SHUTDOWN, "{db:?}");
    assert!(
        eventually(Duration::from_secs(5), || busy.is_closed()).await,
        "the session stayed open"
    );
    // The idle session alongside it was detached, and only that one.
    assert!(
        eventually(Duration::from_secs(5), || detached_sessions(&ctx) == 1).await,
        "detached sessions: {}",
        detached_sessions(&ctx)
    );
    assert_eq!(
        tag(&idle, "INSERT INTO d_rows (id, v) VALUES (1, 'a')").await,
        1
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(detached_sessions(&ctx), 1, "the busy session was detached");
}
