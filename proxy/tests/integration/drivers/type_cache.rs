//! DDL on a type a table uses must reach cached results of that table (issue 18):
//! asyncpg's type-cache scenarios (ALTER TYPE … ADD/DROP ATTRIBUTE in and out of
//! transactions, from another session, in two databases, a prepared statement kept
//! across the change) and the same with tokio-postgres, through spillway and direct.

use tokio_postgres::SimpleQueryMessage;

use super::{Lang, both};
use crate::context::Context;

#[tokio::test]
async fn asyncpg_sees_type_changes_as_postgres_reports_them() {
    let ctx = Context::start().await;
    let (through, direct) = both(&ctx, Lang::Python, "asyncpg_type_cache.py").await;
    // The first read after ADD ATTRIBUTE is asyncpg's own complaint about the row
    // shape, then the new shape.
    assert_eq!(
        through["autocommit"][2], "err OutdatedSchemaCacheError",
        "{through:#}"
    );
    assert_eq!(
        through["autocommit"][3], "ok (1, <Record x=2 y=3 c=None>)",
        "{through:#}"
    );
    assert_eq!(through, direct);
}

/// The text of column `b` in every row of a simple query's answer.
fn column_b(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get("b").map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// What a client sees of `tab1` before and after each change to `typ1`, read twice
/// each time (so the second read may come from the cache), in the simple protocol
/// and with one prepared statement; `other` makes the changes.
async fn observe(client: &tokio_postgres::Client, other: &tokio_postgres::Client) -> Vec<String> {
    client
        .batch_execute(
            "DROP TABLE IF EXISTS tab1; DROP DOMAIN IF EXISTS dom1; DROP TYPE IF EXISTS typ1;
             CREATE TYPE typ1 AS (x int, y int);
             CREATE DOMAIN dom1 AS int;
             CREATE TABLE tab1(a dom1, b typ1);
             INSERT INTO tab1 VALUES (1, (2, 3))",
        )
        .await
        .expect("schema");
    let prepared = client
        .prepare("SELECT b::text AS b FROM tab1")
        .await
        .expect("prepare");
    let mut seen = Vec::new();
    let changes: [(&str, &tokio_postgres::Client); 5] = [
        ("", client),
        ("ALTER TYPE typ1 ADD ATTRIBUTE c text", client),
        ("ALTER TYPE typ1 DROP ATTRIBUTE x", other),
        ("ALTER TYPE typ1 RENAME ATTRIBUTE y TO z", client),
        (
            "ALTER DOMAIN dom1 ADD CONSTRAINT positive CHECK (VALUE > 0)",
            other,
        ),
    ];
    for (ddl, by) in changes {
        if !ddl.is_empty() {
            by.batch_execute(ddl).await.expect("ddl");
        }
        for _ in 0..2 {
            let simple = client
                .simple_query("SELECT * FROM tab1")
                .await
                .map(|m| column_b(&m).join(","));
            let star = client
                .simple_query("SELECT row_to_json(t)::text AS b FROM tab1 t")
                .await
                .map(|m| column_b(&m).join(","));
            let prep = client.query(&prepared, &[]).await.map(|rows| {
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
                    .join(",")
            });
            seen.push(format!(
                "after {ddl:?}: {:?} {:?} {:?}",
                simple.map_err(|e| e.to_string()),
                star.map_err(|e| e.to_string()),
                prep.map_err(|e| e.to_string())
            ));
        }
    }
    seen
}

#[tokio::test]
async fn tokio_postgres_sees_type_and_domain_changes() {
    let ctx = Context::start().await;
    let through = observe(&ctx.proxy_client().await, &ctx.proxy_client().await).await;
    let direct = observe(&ctx.direct_client().await, &ctx.direct_client().await).await;
    assert!(
        through[2].contains("(2,3,)"),
        "the added attribute shows: {through:#?}"
    );
    assert_eq!(through, direct);
}
