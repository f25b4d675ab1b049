//! INSERTs that leave a `serial` or identity key out, deferred with a key value
//! spillway reserved from the table's sequence (issue 13, point 5): `RETURNING id`
//! answered, the values unique across concurrent sessions and a restart of spillway,
//! the stored rows exactly what the clients were told, identity `GENERATED ALWAYS`
//! keys flushed with `OVERRIDING SYSTEM VALUE`, and the same SQLSTATE as directly for
//! what PostgreSQL refuses (a value for a `GENERATED ALWAYS` column, a bad value next
//! to a reserved key, a sequence at its end).

use std::collections::BTreeMap;

use crate::context::Context;
use crate::metrics::{deferred, sample, scrape};

const SCHEMA: &str = "CREATE TABLE public.ser (id serial PRIMARY KEY, v text NOT NULL); \
    CREATE TABLE public.alw (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
        v int, at timestamptz NOT NULL DEFAULT now()); \
    CREATE TABLE public.small_p (id smallserial PRIMARY KEY, v int); \
    CREATE TABLE public.small_d (id smallserial PRIMARY KEY, v int); \
    ALTER SEQUENCE public.small_p_id_seq RESTART 32766; \
    ALTER SEQUENCE public.small_d_id_seq RESTART 32766;";

async fn start() -> Context {
    let mut config = String::from("[flush]\ninterval = \"1h\"\n");
    // `small_d` is the direct run's copy: not deferred, so its sequence is PostgreSQL's
    // alone.
    for t in ["ser", "alw", "small_p"] {
        config.push_str(&format!(
            "[tables.\"public.{t}\"]\npolicy = \"write-behind\"\n"
        ));
    }
    Context::builder()
        .before_proxy(SCHEMA)
        .section(&config)
        .start()
        .await
}

/// `n` INSERTs through spillway, each `RETURNING id`: id → v.
async fn insert_many(ctx: &Context, session: usize, n: usize) -> Vec<(i32, String)> {
    let client = ctx.proxy_client().await;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let v = format!("s{session}-{i}");
        let row = client
            .query_one("INSERT INTO ser (v) VALUES ($1) RETURNING id", &[&v])
            .await
            .expect("insert");
        out.push((row.get::<_, i32>(0), v));
    }
    out
}

#[tokio::test]
async fn serial_keys_are_reserved_unique_across_sessions_and_restarts() {
    let mut ctx = start().await;
    let mut told: BTreeMap<i32, String> = BTreeMap::new();
    let mut add = |rows: Vec<(i32, String)>| {
        for (id, v) in rows {
            if let Some(old) = told.insert(id, v.clone()) {
                panic!("id {id} handed out twice: {old} and {v}");
            }
        }
    };
    let sessions: Vec<_> = (0..4).map(|s| insert_many(&ctx, s, 60)).collect();
    for rows in futures_util::future::join_all(sessions).await {
        add(rows);
    }
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    let first = deferred(&metrics, "ser");
    println!(
        "deferred {first} of 240; key_reservation fallbacks {}",
        sample(
            &metrics,
            "spillway_fallbacks_total",
            "table=\"public.ser\",reason=\"key_reservation\""
        )
    );
    assert!(first >= 200.0, "most INSERTs deferred:\n{metrics}");
    // Deferred: not in PostgreSQL before the flush.
    let direct = ctx.direct_client().await;
    let stored: i64 = direct
        .query_one("SELECT count(*) FROM ser", &[])
        .await
        .expect("count")
        .get(0);
    assert!(stored < 240, "{stored}");

    // A restart (the journal is replayed; reserved values left unused are gaps).
    ctx.restart_proxy();
    add(insert_many(&ctx, 9, 40).await);
    let client = ctx.proxy_client().await;
    client.batch_execute("SPILLWAY FLUSH").await.expect("flush");
    let rows = direct
        .query("SELECT id, v FROM ser ORDER BY id", &[])
        .await
        .expect("rows");
    let stored: BTreeMap<i32, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        stored, told,
        "the stored rows are what the clients were told"
    );
    // Rows PostgreSQL numbers itself do not collide with reserved ones.
    direct
        .batch_execute("INSERT INTO ser (v) SELECT 'direct' FROM generate_series(1, 50)")
        .await
        .expect("PostgreSQL's own nextval never repeats a reserved value");
}

#[tokio::test]
async fn identity_always_keys_are_flushed_overriding_the_system_value() {
    let ctx = start().await;
    let client = ctx.proxy_client().await;
    let mut told = Vec::new();
    for v in 0..5 {
        let row = client
            .query_one("INSERT INTO alw (v) VALUES ($1) RETURNING id, v", &[&v])
            .await
            .expect("insert");
        told.push((row.get::<_, i64>(0), row.get::<_, Option<i32>>(1)));
    }
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(deferred(&metrics, "alw"), 5.0, "{metrics}");
    client.batch_execute("SPILLWAY FLUSH").await.expect("flush");
    let direct = ctx.direct_client().await;
    let stored: Vec<(i64, Option<i32>)> = direct
        .query("SELECT id, v FROM alw ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    told.sort_unstable();
    assert_eq!(stored, told);
    let dead: i64 = direct
        .query_one("SELECT count(*) FROM spillway.dead_letters", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    assert_eq!(dead, 0);
}

fn sqlstate(r: Result<(), tokio_postgres::Error>) -> String {
    match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => e
            .code()
            .map_or_else(|| format!("no sqlstate: {e}"), |c| c.code().to_owned()),
    }
}

/// The bad values of reserved keys (the 48 of `bad_values.rs` and these 4 make the
/// issue's table of 52): the same SQLSTATE through spillway as directly, nothing
/// journaled.
#[tokio::test]
async fn refused_inserts_with_reserved_keys_get_postgres_sqlstate() {
    let ctx = start().await;
    let proxy = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;
    let bad = [
        ("INSERT INTO alw (id, v) VALUES (1, 1)", "428C9"),
        ("INSERT INTO alw (v) VALUES ('x')", "22P02"),
        ("INSERT INTO alw (v) VALUES (2147483648)", "22003"),
        ("INSERT INTO ser (v) VALUES (NULL)", "23502"),
    ];
    for (sql, code) in bad {
        assert_eq!(sqlstate(direct.batch_execute(sql).await), code, "{sql}");
        assert_eq!(sqlstate(proxy.batch_execute(sql).await), code, "{sql}");
    }
    let metrics = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(deferred(&metrics, "alw") + deferred(&metrics, "ser"), 0.0);
    // A sequence at its end: the values PostgreSQL would still hand out are handed
    // out (not used up by a reservation past the end), then 2200H.
    let mut through = Vec::new();
    let mut directly = Vec::new();
    for _ in 0..3 {
        through.push(sqlstate(
            proxy
                .batch_execute("INSERT INTO small_p (v) VALUES (1)")
                .await,
        ));
        directly.push(sqlstate(
            direct
                .batch_execute("INSERT INTO small_d (v) VALUES (1)")
                .await,
        ));
    }
    assert_eq!(directly, ["ok", "ok", "2200H"]);
    assert_eq!(through, directly);
    proxy.batch_execute("SPILLWAY FLUSH").await.expect("flush");
    let ids: Vec<i16> = direct
        .query("SELECT id FROM small_p ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [32_766, 32_767]);
}
