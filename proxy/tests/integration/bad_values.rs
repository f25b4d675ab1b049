//! Values PostgreSQL refuses, written to a write-behind table through spillway and
//! directly (issue 13): through spillway the client gets the same SQLSTATE as
//! directly, and nothing is journaled. Literals plain and cast to the column's type,
//! and parameters with declared types, for every type spillway converts itself.

use tokio_postgres::types::Type;

use crate::context::Context;
use crate::metrics::{sample, scrape};

const SCHEMA: &str = "CREATE TYPE mood AS ENUM ('ok', 'sad'); \
    CREATE TABLE public.bad (id int PRIMARY KEY, i2 smallint, i4 int, i8 bigint, \
        n numeric(6, 2), f4 real, f8 double precision, b bool, u uuid, j json, jb jsonb, \
        v varchar(5), c char(3), d date, t time, ts timestamp, tz timestamptz, \
        iv interval, by bytea, m mood, nn text NOT NULL DEFAULT 'x');";

/// (column, value as SQL) pairs PostgreSQL refuses.
const BAD: [(&str, &str); 58] = [
    ("i2", "'40000'"),
    ("i2", "40000"),
    ("i2", "'-32769'"),
    ("i2", "'1.5'"),
    ("i2", "'abc'"),
    ("i2", "'40000'::int2"),
    ("i4", "'2147483648'"),
    ("i4", "2147483648"),
    ("i4", "'1e3'"),
    ("i4", "'12'::int8 * 0 + 'x'"),
    ("i8", "'9223372036854775808'"),
    ("i8", "'12x'"),
    ("n", "'12345.678'"),
    ("n", "'9999.995'"),
    ("n", "'1,5'"),
    ("n", "'Infinity'"),
    ("n", "'100000'::numeric"),
    ("f4", "'1e39'"),
    ("f4", "'1e-50'"),
    ("f8", "'1e309'"),
    ("f8", "'1e-400'"),
    ("f8", "'one'"),
    ("b", "'maybe'"),
    ("u", "'not-a-uuid'"),
    ("u", "'1234'::uuid"),
    ("j", "'{bad'"),
    ("j", "'{\"a\":}'::json"),
    ("jb", "'{\"a\":1'"),
    ("jb", "'\"\\u0000\"'"),
    ("v", "'toolong'"),
    ("v", "'toolong'::varchar"),
    ("v", "'toolong'::text"),
    ("c", "'abcd'"),
    ("d", "'2024-02-30'"),
    ("d", "'2023-02-29'::date"),
    ("d", "'not a date'"),
    ("d", "'2024-13-01'"),
    ("t", "'25:00'"),
    ("t", "'12:60'"),
    ("t", "'9:60'"),
    ("ts", "'2024-02-30 9:00'"),
    ("ts", "'2024-01-01 24:00:01'"),
    ("ts", "'2024-04-31 10:00'::timestamp"),
    ("tz", "'garbage'"),
    ("tz", "'2024-02-30 10:00:00+00'::timestamptz"),
    ("iv", "'1 fortnight'"),
    ("iv", "'1 day 2 days'"),
    ("iv", "'0:60:00'"),
    ("iv", "'1.5 secs 7 milliseconds'"),
    ("iv", "'0:01:01 250 microseconds'"),
    ("by", "'\\x1'"),
    ("by", "'\\q'"),
    ("m", "'happy'"),
    ("m", "'Ok'"),
    ("m", "'ok '"),
    ("m", "'ok'::text"),
    ("m", "'ok'::varchar"),
    ("nn", "NULL"),
];

fn sqlstate(r: Result<u64, tokio_postgres::Error>) -> String {
    match r {
        Ok(n) => format!("ok({n})"),
        Err(e) => e
            .code()
            .map_or_else(|| format!("no sqlstate: {e}"), |c| c.code().to_owned()),
    }
}

#[tokio::test]
async fn bad_values_get_postgres_sqlstate_and_are_not_journaled() {
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .section("[flush]\ninterval = \"1h\"\n[tables.\"public.bad\"]\npolicy = \"write-behind\"\n")
        .start()
        .await;
    let proxy = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;
    let mut differ = Vec::new();
    for (i, (column, value)) in BAD.iter().enumerate() {
        let sql = format!(
            "INSERT INTO bad (id, {column}) VALUES ({}, {value})",
            i + 10
        );
        let through = sqlstate(proxy.batch_execute(&sql).await.map(|()| 0));
        let direct = sqlstate(direct.batch_execute(&sql).await.map(|()| 0));
        assert!(!direct.starts_with("ok"), "{sql} is not bad: {direct}");
        if through != direct {
            differ.push(format!("{sql}: through {through}, direct {direct}"));
        }
    }
    // Parameters with declared types, extended protocol.
    let typed: [(&str, Type, &(dyn tokio_postgres::types::ToSql + Sync)); 5] = [
        ("i4", Type::INT8, &(1i64 << 40)),
        ("i2", Type::INT4, &40_000i32),
        ("v", Type::TEXT, &"toolong"),
        ("nn", Type::TEXT, &None::<&str>),
        ("m", Type::TEXT, &"ok"),
    ];
    for (i, (column, ty, value)) in typed.into_iter().enumerate() {
        let sql = format!("INSERT INTO bad (id, {column}) VALUES ({}, $1)", i + 100);
        let through = sqlstate(
            proxy
                .query_typed(&sql, &[(value, ty.clone())])
                .await
                .map(|r| r.len() as u64),
        );
        let direct = sqlstate(
            direct
                .query_typed(&sql, &[(value, ty)])
                .await
                .map(|r| r.len() as u64),
        );
        assert!(!direct.starts_with("ok"), "{sql} is not bad: {direct}");
        if through != direct {
            differ.push(format!(
                "{sql} ${column}: through {through}, direct {direct}"
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "SQLSTATEs differ:\n{}",
        differ.join("\n")
    );

    // A good row of every converted type is deferred (so the metric can tell).
    proxy
        .batch_execute(
            "INSERT INTO bad (id, i2, i4, i8, n, f4, f8, b, u, j, jb, v, c, d, t, ts, tz, by, m) \
             VALUES (1, '7'::int2, 7, 7::bigint, '1234.5', '1.5', '0.1', true, \
             'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '{\"a\": 1}', '[1, \"x\"]'::jsonb, \
             'abc'::varchar, 'ab', '2024-02-29', '24:00', '2024-03-30 23:15:00.25', \
             '2024-03-30 23:15:00.25-05:30'::timestamptz, '\\xdead', 'sad')",
        )
        .await
        .expect("good row");
    // An hour in one digit (knex passes `9:30` on as the application wrote it).
    proxy
        .batch_execute(
            "INSERT INTO bad (id, t, ts, iv) \
             VALUES (2, '9:30', '2024-03-30 9:05:01.5', '1 day 0:01:01.25'::interval)",
        )
        .await
        .expect("good row");
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    let deferred = sample(
        &metrics,
        "spillway_client_writes_total",
        "table=\"public.bad\",policy=\"write-behind\"",
    );
    assert_eq!(
        deferred, 2.0,
        "only the good rows are journaled:\n{metrics}"
    );
    let pending = proxy
        .query_one("SELECT count(*) FROM bad", &[])
        .await
        .expect("count");
    assert_eq!(pending.get::<_, i64>(0), 2);
    // The enum's label, applied with the column's type (ADR 0038).
    assert_eq!(
        ctx.psql_direct("SELECT m FROM bad WHERE id = 1").trim(),
        "sad"
    );
}
