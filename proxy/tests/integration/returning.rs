//! RETURNING of deferred writes answered by spillway (SPEC §6): for every statement
//! here, spillway's answer is compared message for message (bytes included) with what
//! PostgreSQL answers for the same statement on the same table, run directly inside a
//! transaction that is rolled back; and the write is shown to be deferred (it reaches
//! PostgreSQL only at `SPILLWAY FLUSH`). RETURNING of values the statement does not
//! supply runs write-through with PostgreSQL's own answer, counted as a fallback.

use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

use crate::context::{Context, DB, USER};
use crate::metrics::{sample, scrape};
use crate::wire::{self, Msg, Raw, tags};

const TABLE: &str = "CREATE TABLE public.rt (id int PRIMARY KEY, u uuid, t text, b bool, \
                     s smallint, big bigint, vc varchar(10), n int NOT NULL DEFAULT 0, \
                     amount numeric); \
                     CREATE TABLE public.rt_trig (id int PRIMARY KEY, t text); \
                     CREATE FUNCTION public.shout() RETURNS trigger LANGUAGE plpgsql AS \
                       $$BEGIN NEW.t := upper(NEW.t); RETURN NEW; END$$; \
                     CREATE TRIGGER shout BEFORE INSERT OR UPDATE ON public.rt_trig \
                       FOR EACH ROW EXECUTE FUNCTION public.shout();";

async fn start() -> Context {
    Context::builder()
        .before_proxy(TABLE)
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.rt\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.rt_trig\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await
}

/// Sends `request` to spillway and, inside BEGIN … ROLLBACK, to PostgreSQL; returns
/// both answers without their final ReadyForQuery (its status differs: 'I' / 'T').
async fn both(proxy: &mut Raw, direct: &mut Raw, request: &[Vec<u8>]) -> (Vec<Msg>, Vec<Msg>) {
    let bytes: Vec<u8> = request.concat();
    proxy.send(&bytes).await;
    let mut ours = proxy.until(b'Z').await;
    direct.send(&wire::query("BEGIN")).await;
    direct.until(b'Z').await;
    direct.send(&bytes).await;
    let mut theirs = direct.until(b'Z').await;
    direct.send(&wire::query("ROLLBACK")).await;
    direct.until(b'Z').await;
    assert_eq!(ours.pop().map(|m| m.body), Some(b"I".to_vec()));
    theirs.pop();
    (ours, theirs)
}

/// Asserts spillway answered exactly as PostgreSQL, with rows.
async fn same(proxy: &mut Raw, direct: &mut Raw, request: &[Vec<u8>]) -> Vec<Msg> {
    let (ours, theirs) = both(proxy, direct, request).await;
    assert_eq!(ours, theirs, "spillway vs PostgreSQL");
    assert!(
        ours.iter().all(|m| m.tag != b'E'),
        "an error answer proves nothing here: {ours:?}"
    );
    ours
}

fn upstream(ctx: &Context, sql: &str) -> String {
    ctx.psql_direct(sql).trim().to_owned()
}

async fn fallbacks(ctx: &Context, reason: &str) -> f64 {
    fallbacks_of(ctx, "public.rt", reason).await
}

async fn fallbacks_of(ctx: &Context, table: &str, reason: &str) -> f64 {
    let text = scrape(ctx.proxy.metrics_addr()).await;
    sample(
        &text,
        "spillway_fallbacks_total",
        &format!("table=\"{table}\",reason=\"{reason}\""),
    )
}

#[tokio::test]
async fn returning_of_supplied_values_is_answered_like_postgres_without_upstream() {
    let ctx = start().await;
    let mut proxy = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut direct = Raw::startup(
        format!("127.0.0.1:{}", ctx.pg.port())
            .parse()
            .expect("addr"),
        USER,
        DB,
    )
    .await;

    // Simple protocol: RETURNING * with every column given, odd spellings of values
    // (uuid in braces and capitals, bool words, padded integers), NULLs.
    // A NULL is answered whatever the column's type (numeric here).
    let insert_all = "INSERT INTO rt (id, u, t, b, s, big, vc, n, amount) VALUES \
         (1, '{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}', 'hé llo', 'yes', ' 7', -9000000000, 'abc', 3, NULL), \
         (2, NULL, '', false, -1, 2, NULL, 0, NULL) RETURNING *";
    let msgs = same(&mut proxy, &mut direct, &[wire::query(insert_all)]).await;
    assert_eq!(tags(&msgs), "TDDC");
    // Plain columns, renamed and qualified, in the extended protocol with a Describe
    // of the portal, text and binary result formats mixed.
    let insert_some = "INSERT INTO rt (id, t, b, u, s) VALUES ($1, $2, $3, $4, $5) \
                       RETURNING id AS key, rt.t, b, u, s, id";
    let msgs = same(
        &mut proxy,
        &mut direct,
        &[
            wire::parse("", insert_some),
            wire::bind_formats(
                "",
                "",
                &[
                    Some("3"),
                    Some("x"),
                    Some("on"),
                    Some("12121212-1212-1212-1212-121212121212"),
                    Some("5"),
                ],
                &[1, 0, 1, 1, 1, 0],
            ),
            wire::describe_portal(""),
            wire::execute("", 0),
            wire::sync(),
        ],
    )
    .await;
    assert_eq!(tags(&msgs), "12TDC");
    // Describe of the statement: ParameterDescription and a RowDescription with text
    // formats; all results binary.
    let msgs = same(
        &mut proxy,
        &mut direct,
        &[
            wire::parse_typed(
                "",
                "INSERT INTO rt (id, vc) VALUES ($1, $2) RETURNING vc, id",
                &[23, 1043],
            ),
            wire::describe_statement(""),
            wire::bind_formats("", "", &[Some("4"), Some("ab  ")], &[1]),
            wire::execute("", 0),
            wire::sync(),
        ],
    )
    .await;
    assert_eq!(tags(&msgs), "1tT2DC");

    // Deferred: not upstream until flushed.
    assert_eq!(upstream(&ctx, "SELECT count(*) FROM rt"), "0");
    proxy.send(&wire::query("SPILLWAY FLUSH")).await;
    proxy.until(b'Z').await;
    assert_eq!(
        upstream(
            &ctx,
            "SELECT string_agg(id || ':' || coalesce(t, '-'), ',' ORDER BY id) FROM rt"
        ),
        "1:hé llo,2:,3:x,4:-"
    );

    // A duplicate key (answered from spillway's key knowledge): the Describe of the
    // portal is answered before the error, as PostgreSQL does; a simple Query gets
    // the error alone.
    let duplicate = "INSERT INTO rt (id) VALUES ($1) RETURNING id";
    let (ours, theirs) = both(
        &mut proxy,
        &mut direct,
        &[
            wire::parse("", duplicate),
            wire::bind_formats("", "", &[Some("3")], &[]),
            wire::describe_portal(""),
            wire::execute("", 0),
            wire::sync(),
        ],
    )
    .await;
    assert_eq!((tags(&ours), tags(&theirs)), ("12TE".into(), "12TE".into()));
    assert_eq!(ours[2], theirs[2], "RowDescription");
    assert_eq!(ours[3].code().as_deref(), Some("23505"));
    let (ours, theirs) = both(
        &mut proxy,
        &mut direct,
        &[wire::query("INSERT INTO rt (id) VALUES (3) RETURNING id")],
    )
    .await;
    assert_eq!((tags(&ours), tags(&theirs)), ("E".into(), "E".into()));

    // UPDATE: the key and `c = v` columns; DELETE: the key. Each compared with
    // PostgreSQL running it on the rows as they are upstream now.
    let update =
        "UPDATE rt SET t = 'new', b = 'off', big = NULL WHERE id = 1 RETURNING b, id, t, big";
    let msgs = same(&mut proxy, &mut direct, &[wire::query(update)]).await;
    assert_eq!(tags(&msgs), "TDC");
    let delete = "DELETE FROM rt WHERE id = 2 RETURNING id";
    same(&mut proxy, &mut direct, &[wire::query(delete)]).await;
    // A key that does not exist: no row, but the RowDescription (exact row counts).
    let missing = "UPDATE rt SET t = 'q' WHERE id = 99 RETURNING id, t";
    let msgs = same(&mut proxy, &mut direct, &[wire::query(missing)]).await;
    assert_eq!(tags(&msgs), "TC");
    let msgs = same(
        &mut proxy,
        &mut direct,
        &[
            wire::parse("", "DELETE FROM rt WHERE id = $1 RETURNING id AS gone"),
            wire::bind_formats("", "", &[Some("98")], &[]),
            wire::describe_portal(""),
            wire::execute("", 0),
            wire::sync(),
        ],
    )
    .await;
    assert_eq!(tags(&msgs), "12TC");

    // Still deferred; applied by FLUSH.
    assert_eq!(
        upstream(&ctx, "SELECT t || ':' || b FROM rt WHERE id = 1"),
        "hé llo:true"
    );
    assert_eq!(upstream(&ctx, "SELECT count(*) FROM rt WHERE id = 2"), "1");
    proxy.send(&wire::query("SPILLWAY FLUSH")).await;
    proxy.until(b'Z').await;
    assert_eq!(
        upstream(
            &ctx,
            "SELECT t || ':' || b || ':' || coalesce(big::text, 'null') FROM rt WHERE id = 1"
        ),
        "new:false:null"
    );
    assert_eq!(upstream(&ctx, "SELECT count(*) FROM rt WHERE id = 2"), "0");
    assert_eq!(fallbacks(&ctx, "returning_unknown").await, 0.0);
    assert_eq!(fallbacks(&ctx, "returning").await, 0.0);

    // Execute asking for fewer rows than the write returns: PostgreSQL suspends the
    // portal, so the write runs upstream, which answers.
    proxy
        .send(
            &[
                wire::parse("", "INSERT INTO rt (id) VALUES (20), (21) RETURNING id"),
                wire::bind_formats("", "", &[], &[]),
                wire::execute("", 1),
                wire::sync(),
            ]
            .concat(),
        )
        .await;
    assert_eq!(tags(&proxy.until(b'Z').await), "12DsZ");
    assert_eq!(fallbacks(&ctx, "returning_row_limit").await, 1.0);
    assert_eq!(
        upstream(&ctx, "SELECT count(*) FROM rt WHERE id >= 20"),
        "2"
    );
}

#[tokio::test]
async fn drivers_get_the_rows_postgres_would_give() {
    let ctx = start().await;
    let proxy = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;

    // tokio-postgres: prepared statements with binary results.
    let sql = "INSERT INTO rt (id, t, b, s, big) VALUES ($1, $2, $3, $4, $5) RETURNING *";
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&10i32, &"ten", &true, &-3i16, &i64::MAX];
    // Not every column is given (n has a default): falls back, PostgreSQL answers.
    let row = proxy.query_one(sql, &params).await.expect("insert");
    assert_eq!(row.get::<_, i32>("n"), 0);
    assert_eq!(upstream(&ctx, "SELECT count(*) FROM rt WHERE id = 10"), "1");

    let sql = "INSERT INTO rt (id, t, b, s, big) VALUES ($1, $2, $3, $4, $5) \
               RETURNING id, t, b, s, big";
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&11i32, &"eleven", &false, &i16::MIN, &-1i64];
    let ours = proxy
        .query(sql, &params)
        .await
        .expect("insert via spillway");
    direct.batch_execute("BEGIN").await.expect("begin");
    let theirs = direct.query(sql, &params).await.expect("insert direct");
    direct.batch_execute("ROLLBACK").await.expect("rollback");
    let values = |rows: &[tokio_postgres::Row]| -> Vec<(i32, String, bool, i16, i64)> {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect()
    };
    assert_eq!(values(&ours), values(&theirs));
    assert_eq!(
        values(&ours),
        vec![(11, "eleven".into(), false, i16::MIN, -1)]
    );
    let types = |rows: &[tokio_postgres::Row]| -> Vec<Type> {
        rows[0]
            .columns()
            .iter()
            .map(|c| c.type_().clone())
            .collect()
    };
    assert_eq!(types(&ours), types(&theirs));
    assert_eq!(upstream(&ctx, "SELECT count(*) FROM rt WHERE id = 11"), "0");

    // Simple protocol through tokio-postgres: values as text.
    let sql = "UPDATE rt SET t = 'X', s = 0 WHERE id = 10 RETURNING t, s, id";
    let text = |msgs: Vec<SimpleQueryMessage>| -> Vec<Vec<Option<String>>> {
        msgs.iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                _ => None,
            })
            .collect()
    };
    direct.batch_execute("BEGIN").await.expect("begin");
    let theirs = text(direct.simple_query(sql).await.expect("direct"));
    direct.batch_execute("ROLLBACK").await.expect("rollback");
    let ours = text(proxy.simple_query(sql).await.expect("spillway"));
    assert_eq!(ours, theirs);
    assert_eq!(
        ours,
        vec![vec![Some("X".into()), Some("0".into()), Some("10".into())]]
    );
    assert_eq!(upstream(&ctx, "SELECT t FROM rt WHERE id = 10"), "ten");

    // sqlx (named prepared statements, binary results): the rows PostgreSQL gives.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&ctx.proxy_url())
        .await
        .expect("sqlx connects");
    let (id,): (i32,) = sqlx::query_as("DELETE FROM rt WHERE id = $1 RETURNING id")
        .bind(10i32)
        .fetch_one(&mut conn)
        .await
        .expect("sqlx delete");
    assert_eq!(id, 10);
    let none: Option<(i32,)> = sqlx::query_as("DELETE FROM rt WHERE id = $1 RETURNING id")
        .bind(10i32)
        .fetch_optional(&mut conn)
        .await
        .expect("sqlx delete of a deleted key");
    assert_eq!(none, None);
    // sqlx closes the portal inside the cycle (Bind, Execute, Close, Sync): still one
    // deferrable statement, so the DELETE is not upstream until the flush.
    assert_eq!(upstream(&ctx, "SELECT count(*) FROM rt WHERE id = 10"), "1");
    assert_eq!(fallbacks(&ctx, "returning_unknown").await, 1.0);
    proxy.batch_execute("SPILLWAY FLUSH").await.expect("flush");
    assert_eq!(
        upstream(&ctx, "SELECT string_agg(id::text, ',' ORDER BY id) FROM rt"),
        "11"
    );
}

#[tokio::test]
async fn returning_of_unknown_values_runs_write_through() {
    let ctx = start().await;
    let proxy = ctx.proxy_client().await;
    ctx.psql_direct("INSERT INTO rt (id, n) VALUES (1, 5)");

    let one = |msgs: Vec<SimpleQueryMessage>| -> Vec<Option<String>> {
        msgs.iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                _ => None,
            })
            .expect("a row")
    };
    // An expression: not a deferrable shape.
    let row = one(proxy
        .simple_query("INSERT INTO rt (id) VALUES (2) RETURNING now() IS NOT NULL")
        .await
        .expect("returning now()"));
    assert_eq!(row, vec![Some("t".into())]);
    assert_eq!(fallbacks(&ctx, "returning").await, 1.0);
    // A column filled by its constant default is known (ADR 0030), not counted here;
    // a delta is a value the statement does not give.
    let row = one(proxy
        .simple_query("INSERT INTO rt (id) VALUES (3) RETURNING id, n")
        .await
        .expect("returning a default"));
    assert_eq!(row, vec![Some("3".into()), Some("0".into())]);
    assert_eq!(fallbacks(&ctx, "returning_unknown").await, 0.0);
    let row = one(proxy
        .simple_query("UPDATE rt SET n = n + 1 WHERE id = 1 RETURNING n")
        .await
        .expect("returning a delta"));
    assert_eq!(row, vec![Some("6".into())]);
    // A value whose output spillway does not reproduce (a numeric with an exponent;
    // plain decimals keep the scale written, and are answered).
    let row = one(proxy
        .simple_query("INSERT INTO rt (id, amount) VALUES (4, 15e-1) RETURNING amount")
        .await
        .expect("returning numeric"));
    assert_eq!(row, vec![Some("1.5".into())]);
    // A number constant into a text column: PostgreSQL stores it canonically.
    let row = one(proxy
        .simple_query("INSERT INTO rt (id, t) VALUES (5, 1e3) RETURNING t")
        .await
        .expect("returning a number as text"));
    assert_eq!(row, vec![Some("1000".into())]);
    // DELETE knows only the key.
    let row = one(proxy
        .simple_query("DELETE FROM rt WHERE id = 2 RETURNING id, t")
        .await
        .expect("delete returning a non-key column"));
    assert_eq!(row, vec![Some("2".into()), None]);
    assert_eq!(fallbacks(&ctx, "returning_unknown").await, 4.0);
    assert_eq!(fallbacks(&ctx, "returning").await, 1.0);
    // A BEFORE ROW trigger may change what is stored: never answered locally.
    let row = one(proxy
        .simple_query("INSERT INTO rt_trig (id, t) VALUES (1, 'quiet') RETURNING t")
        .await
        .expect("returning through a trigger"));
    assert_eq!(row, vec![Some("QUIET".into())]);
    assert_eq!(
        fallbacks_of(&ctx, "public.rt_trig", "returning_unknown").await,
        1.0
    );
    // Write-through: PostgreSQL has them at once.
    assert_eq!(
        upstream(
            &ctx,
            "SELECT string_agg(id || ':' || n, ',' ORDER BY id) FROM rt"
        ),
        "1:6,3:0,4:0,5:0"
    );
}

/// RETURNING of a timestamptz in a session whose TimeZone is not UTC (the shops'
/// SQLAlchemy runs in Europe/Berlin): its text needs the zone's rules, which spillway
/// asks PostgreSQL for before it answers (`WriteService::resolve_zoned`); the write is
/// still deferred. Checked against PostgreSQL's answer for the same statement on a copy
/// of the table (database `direct`), in summer and winter time and in zones with
/// half-hour offsets, and for a `DEFAULT now()` against the stored value afterwards.
#[tokio::test]
async fn returning_of_a_timestamptz_in_a_zone_other_than_utc_is_answered_and_deferred() {
    const ZONED: &str = "CREATE TABLE public.rz (id int PRIMARY KEY, \
                         at timestamptz NOT NULL DEFAULT now(), v text);";
    let ctx = Context::builder()
        .before_proxy(ZONED)
        .before_proxy("CREATE DATABASE direct")
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.rz\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await;
    ctx.pg.psql("direct", ZONED).expect("direct copy");
    let url = |port: u16, db: &str, zone: &str| {
        format!(
            "host=127.0.0.1 port={port} user={USER} dbname={db} sslmode=disable options='-c timezone={zone}'"
        )
    };
    let rows = |msgs: Vec<SimpleQueryMessage>| -> Vec<Vec<Option<String>>> {
        msgs.into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                _ => None,
            })
            .collect()
    };
    let mut id = 0;
    let mut now_rows: Vec<(String, i32, String)> = Vec::new();
    for zone in ["Europe/Berlin", "Asia/Kolkata", "America/St_Johns"] {
        let proxy = crate::context::connect(&url(ctx.proxy.addr.port(), DB, zone)).await;
        let direct = crate::context::connect(&url(ctx.pg.port(), "direct", zone)).await;
        for at in [
            "2026-07-01 12:00:00.5+00",
            "2026-01-15 23:59:59+00",
            "1999-12-31 23:30:00-01",
        ] {
            id += 1;
            let sql = format!("INSERT INTO rz (id, at) VALUES ({id}, '{at}') RETURNING id, at");
            let ours = rows(proxy.simple_query(&sql).await.expect("through spillway"));
            let theirs = rows(direct.simple_query(&sql).await.expect("directly"));
            assert_eq!(ours, theirs, "{zone}: {sql}");
        }
        // `DEFAULT now()`, autocommit and in a held transaction: the answer is the
        // stored value as this zone prints it (checked after the flush).
        for held in [false, true] {
            id += 1;
            if held {
                proxy.simple_query("BEGIN").await.expect("BEGIN");
            }
            let sql = format!("INSERT INTO rz (id, v) VALUES ({id}, 'x') RETURNING at");
            let got = rows(proxy.simple_query(&sql).await.expect("through spillway"));
            if held {
                proxy.simple_query("COMMIT").await.expect("COMMIT");
            }
            let [row] = got.as_slice() else {
                panic!("{zone}: {got:?}");
            };
            now_rows.push((zone.to_owned(), id, row[0].clone().expect("a value")));
        }
    }
    // Deferred: PostgreSQL has none of them yet, and none fell back.
    assert_eq!(ctx.psql_direct("SELECT count(*) FROM rz").trim(), "0");
    let fallbacks: f64 = scrape(ctx.proxy.metrics_addr())
        .await
        .lines()
        .filter(|l| l.starts_with("spillway_fallbacks_total{") && l.contains("public.rz"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    assert_eq!(fallbacks, 0.0);
    let proxy = ctx.proxy_client().await;
    proxy.simple_query("SPILLWAY FLUSH").await.expect("flush");
    for (zone, id, answered) in now_rows {
        let stored = ctx
            .pg
            .psql(
                DB,
                &format!("SET TimeZone = '{zone}'; SELECT at::text FROM rz WHERE id = {id}"),
            )
            .expect("stored");
        assert_eq!(
            stored.lines().last().map(str::trim),
            Some(answered.as_str()),
            "{zone}"
        );
    }
}
