//! Read-your-writes point reads answered with the row's pending writes overlaid
//! (ADR 0039), through the real binary against PostgreSQL: a session that wrote a
//! `consistency = "session"` table reads its rows at once, in the simple and the
//! extended protocol, text and binary formats, as PostgreSQL will have them once the
//! flush applies the writes; a pending INSERT, DELETE or arithmetic write of the row
//! still waits; a flush landing while the read is on its way changes nothing.
//!
//! The flush interval is an hour: a read that waited would have made the flusher
//! apply the writes, so "still pending upstream after the read" shows it did not wait.

use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::context::{Context, ContextBuilder};
use crate::metrics::{sample, scrape};
use crate::write_behind::{direct_rows, tag};

const TABLES: &str = "\
    CREATE TABLE public.ov (id int PRIMARY KEY, token text, n bigint NOT NULL DEFAULT 0, \
        flag bool, u uuid, code varchar(8), small int2, note numeric); \
    INSERT INTO public.ov (id, token) SELECT g, 'base' || g FROM generate_series(1, 20) g; \
    CREATE TABLE public.lt (id bigint PRIMARY KEY, data text NOT NULL, version bigint NOT NULL); \
    INSERT INTO public.lt SELECT g, 'new', 0 FROM generate_series(1, 20) g;";

fn builder() -> ContextBuilder {
    Context::builder().before_proxy(TABLES).section(
        "[flush]\ninterval = \"1h\"\n\
         [tables.\"public.ov\"]\npolicy = \"write-back\"\nconsistency = \"session\"\n\
         [tables.\"public.lt\"]\npolicy = \"write-back\"\nconsistency = \"session\"\n",
    )
}

/// The rows of `sql` in the simple protocol, each as its fields' texts joined by `|`
/// (NULL as `∅`).
async fn text_rows(client: &Client, sql: &str) -> Vec<String> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("∅").to_owned())
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect()
}

async fn reads(ctx: &Context, outcome: &str) -> f64 {
    sample(
        &scrape(ctx.proxy.metrics_addr()).await,
        "spillway_session_reads_total",
        &format!("outcome=\"{outcome}\""),
    )
}

fn pending_upstream(ctx: &Context, id: i32) -> String {
    direct_rows(ctx, &format!("SELECT token FROM ov WHERE id = {id}"))
}

#[tokio::test]
async fn own_writes_are_read_at_once_in_every_protocol_and_format() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    tag(
        &proxy,
        "UPDATE ov SET token = 'mine', n = 42, flag = 'yes', \
         u = 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', code = 'ab', small = '-7' WHERE id = 1",
    )
    .await;
    let columns = "id, token, n, flag, u, code, small, note";
    let simple = text_rows(&proxy, &format!("SELECT {columns} FROM ov WHERE id = 1")).await;
    assert_eq!(
        pending_upstream(&ctx, 1),
        "base1",
        "answered without the flush"
    );
    assert_eq!(reads(&ctx, "overlay").await, 1.0);

    // Extended protocol, binary results (tokio-postgres), with a parameter.
    let stmt = proxy
        .prepare("SELECT id, token, n, flag, code, small FROM ov WHERE id = $1")
        .await
        .expect("prepare");
    let row = proxy.query_one(&stmt, &[&1i32]).await.expect("extended");
    let binary: (i32, String, i64, bool, String, i16) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    assert_eq!(binary, (1, "mine".into(), 42, true, "ab".into(), -7));
    assert_eq!(
        pending_upstream(&ctx, 1),
        "base1",
        "prepared: without the flush"
    );
    // Extended protocol, text results (a typed query describes the portal).
    let typed = proxy
        .query_typed(
            "SELECT token, n FROM ov WHERE id = $1",
            &[(&1i32, tokio_postgres::types::Type::INT4)],
        )
        .await
        .expect("typed");
    assert_eq!(typed[0].get::<_, String>(0), "mine");
    assert_eq!(typed[0].get::<_, i64>(1), 42);
    assert_eq!(
        pending_upstream(&ctx, 1),
        "base1",
        "still without the flush"
    );
    assert_eq!(reads(&ctx, "overlay").await, 3.0);

    // What PostgreSQL answers once the writes are applied is what the overlay said,
    // byte for byte in text.
    assert_eq!(tag(&proxy, "SPILLWAY FLUSH").await, 0);
    let direct = ctx.direct_client().await;
    let applied = text_rows(&direct, &format!("SELECT {columns} FROM ov WHERE id = 1")).await;
    assert_eq!(simple, applied);
    assert_eq!(
        simple,
        vec!["1|mine|42|t|a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11|ab|-7|∅".to_owned()]
    );
    // A NULL assigned is a NULL read.
    tag(&proxy, "UPDATE ov SET token = NULL WHERE id = 2").await;
    assert_eq!(
        text_rows(&proxy, "SELECT token, n FROM ov WHERE id = 2").await,
        vec!["∅|0".to_owned()]
    );
    assert_eq!(pending_upstream(&ctx, 2), "base2");
}

#[tokio::test]
async fn every_sessions_writes_of_the_row_are_overlaid_in_log_order() {
    let ctx = builder().start().await;
    let one = ctx.proxy_client().await;
    let two = ctx.proxy_client().await;
    tag(&one, "UPDATE ov SET token = 'one', n = 1 WHERE id = 3").await;
    tag(&two, "UPDATE ov SET token = 'two' WHERE id = 3").await;
    tag(&two, "UPDATE ov SET n = 2 WHERE id = 3").await;
    // A write of another row changes nothing here.
    tag(&two, "UPDATE ov SET token = 'other' WHERE id = 4").await;
    assert_eq!(
        text_rows(&one, "SELECT token, n FROM ov WHERE id = 3").await,
        vec!["two|2".to_owned()]
    );
    assert_eq!(pending_upstream(&ctx, 3), "base3");
    tag(&one, "UPDATE ov SET token = 'one again' WHERE id = 3").await;
    assert_eq!(
        text_rows(&one, "SELECT id, token, n FROM public.ov o WHERE o.id = 3").await,
        vec!["3|one again|2".to_owned()]
    );
    assert_eq!(reads(&ctx, "overlay").await, 2.0);
    // The load test's shape: a constant and a counter in one UPDATE. A read of the
    // constant alone is overlaid; one of the counter waits.
    tag(&two, "UPDATE ov SET token = 'v13', n = n + 1 WHERE id = 13").await;
    assert_eq!(
        text_rows(&one, "SELECT token FROM ov WHERE id = 13").await,
        vec!["v13".to_owned()]
    );
    assert_eq!(pending_upstream(&ctx, 13), "base13");
    assert_eq!(reads(&ctx, "overlay").await, 3.0);
    assert_eq!(
        text_rows(&one, "SELECT token, n FROM ov WHERE id = 13").await,
        vec!["v13|1".to_owned()]
    );
    assert_eq!(pending_upstream(&ctx, 13), "v13", "waited");
    assert_eq!(tag(&one, "SPILLWAY FLUSH").await, 0);
    assert_eq!(
        direct_rows(&ctx, "SELECT token || '|' || n FROM ov WHERE id = 3"),
        "one again|2"
    );
}

#[tokio::test]
async fn inserts_deletes_arithmetic_and_other_reads_still_wait() {
    let ctx = builder().start().await;
    let me = ctx.proxy_client().await;
    let other = ctx.proxy_client().await;

    // Arithmetic: the result depends on the base image.
    tag(&me, "UPDATE ov SET token = 'x' WHERE id = 5").await;
    tag(&other, "UPDATE ov SET n = n + 5 WHERE id = 5").await;
    assert_eq!(
        text_rows(&me, "SELECT token, n FROM ov WHERE id = 5").await,
        vec!["x|5".to_owned()]
    );
    assert_eq!(
        pending_upstream(&ctx, 5),
        "x",
        "the read waited for the flush"
    );

    // A DELETE of the row by another session.
    tag(&me, "UPDATE ov SET token = 'y' WHERE id = 6").await;
    tag(&other, "DELETE FROM ov WHERE id = 6").await;
    assert!(
        text_rows(&me, "SELECT token FROM ov WHERE id = 6")
            .await
            .is_empty()
    );
    assert_eq!(
        direct_rows(&ctx, "SELECT count(*) FROM ov WHERE id = 6"),
        "0"
    );

    // An INSERT of the row.
    tag(&me, "UPDATE ov SET token = 'z' WHERE id = 7").await;
    tag(&other, "INSERT INTO ov (id, token) VALUES (100, 'new')").await;
    assert_eq!(
        text_rows(&me, "SELECT token FROM ov WHERE id = 100").await,
        vec!["new".to_owned()]
    );
    assert_eq!(pending_upstream(&ctx, 100), "new");

    // Reads the overlay cannot map or decide: an expression, a condition on an
    // assigned column, a column of a type spillway does not write.
    for (write, read, want) in [
        (
            "UPDATE ov SET token = 'e' WHERE id = 8",
            "SELECT upper(token) FROM ov WHERE id = 8",
            "E",
        ),
        (
            "UPDATE ov SET token = 'f' WHERE id = 9",
            "SELECT token FROM ov WHERE id = 9 AND token = 'f'",
            "f",
        ),
        (
            "UPDATE ov SET note = 1.50 WHERE id = 10",
            "SELECT note FROM ov WHERE id = 10",
            "1.50",
        ),
    ] {
        tag(&me, write).await;
        assert_eq!(text_rows(&me, read).await, vec![want.to_owned()], "{read}");
    }
    // Each of them waited: their writes are applied.
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(coalesce(token, '') || ':' || coalesce(note::text, ''), ',' ORDER BY id) FROM ov WHERE id BETWEEN 8 AND 10"
        ),
        "e:,f:,base10:1.50"
    );
    assert_eq!(reads(&ctx, "overlay").await, 0.0, "none was overlaid");
    assert!(reads(&ctx, "waited").await >= 6.0);
}

#[tokio::test]
async fn a_flush_landing_while_the_read_is_upstream_changes_nothing() {
    let ctx = builder().start().await;
    let me = ctx.proxy_client().await;
    let other = ctx.proxy_client().await;
    let flusher = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;
    tag(&me, "UPDATE ov SET token = 'f1' WHERE id = 11").await;

    // The read and the flush both wait for the lock; the flush of `f1` commits before
    // or after the read's snapshot, and the answer is the same either way.
    direct
        .batch_execute("BEGIN; LOCK TABLE ov IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let read = tokio::spawn(async move {
        let rows = text_rows(&me, "SELECT token, n FROM ov WHERE id = 11").await;
        (me, rows)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let flush = tokio::spawn(async move { tag(&flusher, "SPILLWAY FLUSH").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A write that no overlay can include, acknowledged while the read is upstream:
    // the flusher holds it until the read is answered.
    tag(&other, "UPDATE ov SET n = n + 5 WHERE id = 11").await;
    direct.batch_execute("COMMIT").await.expect("unlock");
    let (me, rows) = read.await.expect("read");
    assert_eq!(rows, vec!["f1|0".to_owned()]);
    assert_eq!(flush.await.expect("flush"), 0);
    assert_eq!(tag(&me, "SPILLWAY FLUSH").await, 0);
    assert_eq!(
        direct_rows(&ctx, "SELECT token || '|' || n FROM ov WHERE id = 11"),
        "f1|5"
    );
    assert_eq!(reads(&ctx, "overlay").await, 1.0);

    // Held past the hold's limit: the read is answered with 40001, never with a guess.
    tag(&me, "UPDATE ov SET token = 'f2' WHERE id = 12").await;
    direct
        .batch_execute("BEGIN; LOCK TABLE ov IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let read = tokio::spawn(async move {
        me.simple_query("SELECT token, n FROM ov WHERE id = 12")
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tag(&other, "UPDATE ov SET n = n + 1 WHERE id = 12").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    direct.batch_execute("COMMIT").await.expect("unlock");
    let err = read.await.expect("read").expect_err("40001");
    assert_eq!(err.code().map(|c| c.code()), Some("40001"), "{err:?}");
    assert_eq!(reads(&ctx, "overlay_failed").await, 1.0);
}

/// The load test's `mixed-session` (prepared statements, bigint keys, a counter beside
/// the constant): every read of the session's own row is overlaid, none waits.
#[tokio::test]
async fn the_load_tests_session_writes_are_read_back_overlaid() {
    let ctx = builder().start().await;
    let client = ctx.proxy_client().await;
    let write = client
        .prepare("UPDATE lt SET data = $1, version = version + 1 WHERE id = $2")
        .await
        .expect("prepare write");
    let read = client
        .prepare("SELECT data FROM lt WHERE id = $1")
        .await
        .expect("prepare read");
    for i in 0..5i64 {
        let id = 7 + i % 2;
        let token = format!("c0-{i}");
        assert_eq!(
            client.execute(&write, &[&token, &id]).await.expect("write"),
            1
        );
        let row = client.query_one(&read, &[&id]).await.expect("read");
        assert_eq!(row.get::<_, String>(0), token);
    }
    assert_eq!(reads(&ctx, "overlay").await, 5.0);
    assert_eq!(reads(&ctx, "waited").await, 0.0);
    assert_eq!(direct_rows(&ctx, "SELECT data FROM lt WHERE id = 7"), "new");
    assert_eq!(tag(&client, "SPILLWAY FLUSH").await, 0);
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(data || ':' || version, ',' ORDER BY id) FROM lt WHERE id IN (7, 8)"
        ),
        "c0-4:3,c0-3:2"
    );
}

/// One extended cycle with two reads of the same shape: only the overlaid one's row is
/// rewritten; the second (a row the session did not write) waits for the flush, since
/// the first is still upstream, and comes back as PostgreSQL has it.
#[tokio::test]
async fn in_a_pipelined_cycle_only_the_overlaid_reads_row_is_rewritten() {
    use crate::context::{DB, USER};
    use crate::wire::{Raw, bind, execute, parse, query, sync};
    let ctx = builder().start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&query("UPDATE ov SET token = 'mine14' WHERE id = 14"))
        .await;
    raw.until(b'Z').await;
    let mut cycle = parse("", "SELECT token FROM ov WHERE id = $1");
    cycle.extend(bind("", "", &[Some("14")]));
    cycle.extend(execute("", 0));
    cycle.extend(bind("", "", &[Some("15")]));
    cycle.extend(execute("", 0));
    cycle.extend(sync());
    raw.send(&cycle).await;
    let msgs = raw.until(b'Z').await;
    let rows: Vec<String> = msgs
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| String::from_utf8_lossy(m.body.get(6..).unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(rows, ["mine14", "base15"], "{msgs:?}");
    assert_eq!(reads(&ctx, "overlay").await, 1.0);
}

/// A read after another Execute of the same cycle is not overlaid: were its row
/// answered with an error, the client would take that earlier statement as rolled
/// back with the implicit transaction, which PostgreSQL commits at the Sync (review
/// of ADR 0039). It waits for the flush instead, and reads the row as PostgreSQL has
/// it then.
#[tokio::test]
async fn a_read_after_another_execute_of_its_cycle_waits() {
    use crate::context::{DB, USER};
    use crate::wire::{Raw, bind, execute, flush, parse, query, sync};
    let ctx = builder().start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&query("UPDATE ov SET token = 'mine16' WHERE id = 16"))
        .await;
    raw.until(b'Z').await;
    // The first statement answered (Flush) before the read is sent: nothing of the
    // cycle is outstanding upstream when the read arrives.
    let mut first = parse("", "SELECT now()");
    first.extend(bind("", "", &[]));
    first.extend(execute("", 0));
    first.extend(flush());
    raw.send(&first).await;
    let mut msgs = raw.until(b'C').await;
    let mut cycle = parse("", "SELECT token FROM ov WHERE id = $1");
    cycle.extend(bind("", "", &[Some("16")]));
    cycle.extend(execute("", 0));
    cycle.extend(sync());
    raw.send(&cycle).await;
    msgs.extend(raw.until(b'Z').await);
    let rows: Vec<String> = msgs
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| String::from_utf8_lossy(m.body.get(6..).unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(rows.len(), 2, "{msgs:?}");
    assert_eq!(rows[1], "mine16", "{msgs:?}");
    assert_eq!(reads(&ctx, "overlay").await, 0.0);
    assert_eq!(
        pending_upstream(&ctx, 16),
        "mine16",
        "it waited for the flush"
    );
}
