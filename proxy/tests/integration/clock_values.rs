//! Clock and random functions in deferred writes (issue 13 item 3, ADR 0030): `now()`,
//! `CURRENT_TIMESTAMP`, `statement_timestamp()`, `clock_timestamp()` as values and
//! `DEFAULT now()` / `DEFAULT gen_random_uuid()` columns, evaluated by spillway at
//! acknowledgement. The same statements run through spillway and directly on a copy
//! (database `direct`), both databases with `TimeZone = 'America/New_York'` (also the
//! flusher's sessions). Their clocks differ by when they ran, so the runs are compared
//! by what PostgreSQL guarantees of the values (one transaction start shared by its
//! statements, statement start before the clock's reading, each within the client's
//! own readings of the clock), and through spillway every RETURNING value must be what
//! the flush stored. Local values (`CURRENT_DATE` into a date) in a non-UTC session
//! fall back with their reason; a RETURNING timestamptz in text there is answered
//! with PostgreSQL's text for the zone (ADR 0035's addendum) and must be the stored
//! value as New York prints it.
//! RETURNING of columns left to a constant default (an enum label, an integer, a
//! numeric with its column's scale) is answered from the default.

use std::time::{Duration, SystemTime};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::context::{Context, DB, USER, connect};
use crate::metrics::{sample, scrape};

const SCHEMA: &str = "CREATE TYPE ck_status AS ENUM ('new', 'done'); \
                      CREATE TABLE public.ck (id int PRIMARY KEY, \
                        at timestamptz NOT NULL DEFAULT now(), tx timestamptz, st timestamptz, \
                        ck timestamptz, u uuid NOT NULL DEFAULT gen_random_uuid(), d date, note text, \
                        status ck_status NOT NULL DEFAULT 'new', n int NOT NULL DEFAULT 7, \
                        amt numeric(12, 2) NOT NULL DEFAULT 0);";

const ZONE: &str = "America/New_York";

async fn start() -> Context {
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .before_proxy(&format!("ALTER DATABASE {DB} SET timezone = '{ZONE}'"))
        .before_proxy("CREATE DATABASE direct")
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.ck\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await;
    ctx.pg
        .psql("direct", SCHEMA)
        .expect("schema of the direct copy");
    ctx.psql_direct(&format!("ALTER DATABASE direct SET timezone = '{ZONE}'"));
    ctx
}

/// What one run's client was told.
#[derive(Debug)]
struct Told {
    /// Row 1 (autocommit): at, tx, st, ck.
    one: [SystemTime; 4],
    /// Rows 2 and 3 (one held transaction): at of 2; at, tx, st of 3.
    two_at: SystemTime,
    three: [SystemTime; 3],
    /// Row 4's uuid (simple query, text).
    four_u: String,
    /// Row 6's `at` as returned in text in New York.
    six_at: String,
}

/// A little slack for the microsecond truncation of the values against the client's
/// own readings (nanoseconds).
const SLACK: Duration = Duration::from_millis(2);

fn within(t: SystemTime, from: SystemTime, to: SystemTime, what: &str) {
    assert!(
        t + SLACK >= from && t <= to + SLACK,
        "{what}: {t:?} not within {from:?} … {to:?}"
    );
}

async fn simple(c: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    msgs.into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

/// The statements, against `c` (through spillway or directly); checks what PostgreSQL
/// guarantees of the answers and returns them.
async fn script(c: &Client) -> Told {
    let zone = simple(c, "SHOW TimeZone").await;
    assert_eq!(zone[0][0].as_deref(), Some(ZONE));
    // Autocommit: now() is the statement's own start; the default too.
    let t0 = SystemTime::now();
    let r = c
        .query_one(
            "INSERT INTO ck (id, tx, st, ck, note) VALUES \
             (1, now(), statement_timestamp(), clock_timestamp(), 'a') RETURNING at, tx, st, ck",
            &[],
        )
        .await
        .expect("insert 1");
    let t1 = SystemTime::now();
    let one: [SystemTime; 4] = [r.get(0), r.get(1), r.get(2), r.get(3)];
    assert_eq!(one[0], one[1], "DEFAULT now() and now() in one statement");
    within(one[1], t0, t1, "now()");
    assert!(one[1] <= one[2] && one[2] <= one[3], "{one:?}");
    within(one[3], t0, t1, "clock_timestamp()");
    // A transaction: every now() is its BEGIN's time, however later the statement.
    let b0 = SystemTime::now();
    c.batch_execute("BEGIN").await.expect("begin");
    let b1 = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(40)).await;
    let r = c
        .query_one(
            "INSERT INTO ck (id, note) VALUES (2, 'b') RETURNING at",
            &[],
        )
        .await
        .expect("insert 2");
    let two_at: SystemTime = r.get(0);
    tokio::time::sleep(Duration::from_millis(40)).await;
    let s0 = SystemTime::now();
    let r = c
        .query_one(
            "INSERT INTO ck (id, tx, st) VALUES (3, CURRENT_TIMESTAMP, statement_timestamp()) \
             RETURNING at, tx, st",
            &[],
        )
        .await
        .expect("insert 3");
    let s1 = SystemTime::now();
    let three: [SystemTime; 3] = [r.get(0), r.get(1), r.get(2)];
    c.execute(
        "UPDATE ck SET ck = clock_timestamp(), note = 'c' WHERE id = 3",
        &[],
    )
    .await
    .expect("update 3");
    c.batch_execute("COMMIT").await.expect("commit");
    within(two_at, b0, b1, "now() in a transaction is its BEGIN's time");
    assert_eq!(three[0], two_at, "one transaction, one now()");
    assert_eq!(three[1], two_at, "CURRENT_TIMESTAMP is now()");
    within(three[2], s0, s1, "statement_timestamp() is the statement's");
    // A fresh v4 uuid from the default, answered in text.
    let rows = simple(
        c,
        "INSERT INTO ck (id, note) VALUES (4, 'd') RETURNING id, u, status, n, amt",
    )
    .await;
    let four_u = rows[0][1].clone().expect("uuid");
    assert_eq!(
        rows[0][2].as_deref(),
        Some("new"),
        "an enum's constant default"
    );
    assert_eq!(rows[0][3].as_deref(), Some("7"), "an integer's");
    assert_eq!(
        rows[0][4].as_deref(),
        Some("0.00"),
        "a numeric's, with its scale"
    );
    assert_eq!(four_u.len(), 36);
    assert_eq!(&four_u[14..15], "4", "version 4: {four_u}");
    assert!(matches!(&four_u[19..20], "8" | "9" | "a" | "b"), "{four_u}");
    // A local date in New York, and a timestamptz's text there.
    c.batch_execute("INSERT INTO ck (id, d) VALUES (5, CURRENT_DATE)")
        .await
        .expect("insert 5");
    let rows = simple(c, "INSERT INTO ck (id) VALUES (6) RETURNING at").await;
    assert!(
        rows[0][0]
            .as_deref()
            .is_some_and(|t| t.ends_with("-05") || t.ends_with("-04")),
        "{rows:?}"
    );
    let six_at = rows[0][0].clone().unwrap_or_default();
    Told {
        one,
        two_at,
        three,
        four_u,
        six_at,
    }
}

/// The rows as stored, read straight from PostgreSQL in database `db`.
async fn stored(ctx: &Context, db: &str) -> Vec<tokio_postgres::Row> {
    let c = connect(&format!(
        "host=127.0.0.1 port={} user={USER} dbname={db} sslmode=disable",
        ctx.pg.port()
    ))
    .await;
    c.query(
        "SELECT id, at, tx, st, ck, u::text, d, note, d = (at AT TIME ZONE 'America/New_York')::date \
         FROM ck ORDER BY id",
        &[],
    )
    .await
    .expect("stored rows")
}

/// What PostgreSQL guarantees of the stored rows, whoever wrote them.
fn check_stored(rows: &[tokio_postgres::Row], told: &Told, db: &str) {
    let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6], "{db}");
    let ts = |i: usize, col: usize| -> Option<SystemTime> { rows[i].get(col) };
    assert_eq!(
        [ts(0, 1), ts(0, 2), ts(0, 3), ts(0, 4)],
        told.one.map(Some),
        "{db}: row 1 as returned"
    );
    assert_eq!(ts(1, 1), Some(told.two_at), "{db}: row 2 as returned");
    assert_eq!(
        [ts(2, 1), ts(2, 2), ts(2, 3)],
        told.three.map(Some),
        "{db}: row 3 as returned"
    );
    let ck3 = ts(2, 4).expect("clock_timestamp() of the UPDATE");
    assert!(
        ck3 >= told.three[2],
        "{db}: clock after the statement's start"
    );
    let u4: String = rows[3].get(5);
    assert_eq!(u4, told.four_u, "{db}: row 4's uuid as returned");
    let u: std::collections::BTreeSet<String> = rows.iter().map(|r| r.get(5)).collect();
    assert_eq!(u.len(), 6, "{db}: every default uuid is fresh");
    assert_eq!(
        rows[4].get::<_, Option<bool>>(8),
        Some(true),
        "{db}: CURRENT_DATE in New York"
    );
}

#[tokio::test]
async fn clock_values_are_evaluated_at_acknowledgement() {
    let ctx = start().await;
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user={USER} dbname=direct sslmode=disable",
        ctx.pg.port()
    ))
    .await;
    let told_direct = script(&direct).await;
    check_stored(&stored(&ctx, "direct").await, &told_direct, "direct");

    let proxy = ctx.proxy_client().await;
    let told = script(&proxy).await;
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    let fallback = |reason: &str| {
        sample(
            &metrics,
            "spillway_fallbacks_total",
            &format!("table=\"public.ck\",reason=\"{reason}\""),
        )
    };
    assert_eq!(fallback("clock_time_zone"), 1.0, "CURRENT_DATE in New York");
    assert_eq!(
        fallback("returning_unknown"),
        0.0,
        "timestamptz text in New York: answered with PostgreSQL's text for the zone"
    );
    let all: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("spillway_fallbacks_total{table=\"public.ck\""))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    assert_eq!(all, 1.0, "every other write was deferred:\n{metrics}");
    // Rows 1–4, 6 and the UPDATE were deferred (5 ran through after a barrier).
    let deferred = sample(
        &metrics,
        "spillway_client_writes_total",
        "table=\"public.ck\",policy=\"write-behind\"",
    );
    assert_eq!(deferred, 6.0, "{metrics}");
    simple(&proxy, "SPILLWAY FLUSH").await;
    let six = simple(&proxy, "SELECT at::text FROM ck WHERE id = 6").await;
    assert_eq!(
        six[0][0].as_deref(),
        Some(told.six_at.as_str()),
        "row 6 as returned"
    );
    check_stored(&stored(&ctx, DB).await, &told, "through spillway");
    let dead = ctx.psql_direct("SELECT count(*) FROM spillway.dead_letters");
    assert_eq!(dead.trim(), "0", "no dead letters");
}
