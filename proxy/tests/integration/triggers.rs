//! `spillway migrate` and `spillway install-triggers` (SPEC §5 "Writes that bypass
//! spillway", §7): the real binary against a real throwaway PostgreSQL, no proxy. The
//! notifications are observed the way spillway's cache will: a LISTEN connection that
//! receives the changed table's OID after writes made by a direct client.

use std::process::Output;
use std::time::Duration;

use futures_util::StreamExt;
use spillway::ops::throwaway::ThrowawayPostgres;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use crate::context::{DB, USER, connect};

const CHANNEL: &str = "spillway_invalidate";
/// Ends a batch of expected notifications, so a test never waits out a timeout to prove
/// that nothing else arrived.
const SENTINEL: &str = "sentinel";

async fn start_pg() -> ThrowawayPostgres {
    tokio::task::spawn_blocking(|| ThrowawayPostgres::builder().start())
        .await
        .expect("pg start task")
        .expect("throwaway PostgreSQL starts")
}

/// Runs the real binary with `backend.url` from the environment and no config file.
async fn spillway(url: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(args)
        .env("SPILLWAY_BACKEND__URL", url)
        .env("RUST_LOG", "warn")
        .env_remove("SPILLWAY_CONFIG")
        // No ./spillway.toml may be picked up from wherever the tests run.
        .current_dir(dir.path())
        .output()
        .await
        .expect("run spillway")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn assert_success(out: &Output) -> String {
    let (stdout, stderr) = text(out);
    assert!(
        out.status.success(),
        "exit {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

fn direct_config(pg: &ThrowawayPostgres) -> String {
    format!(
        "host=127.0.0.1 port={} user={USER} dbname={DB} sslmode=disable",
        pg.port()
    )
}

/// A connection that LISTENs on `spillway_invalidate` and forwards every payload.
async fn listen(pg: &ThrowawayPostgres) -> (tokio_postgres::Client, mpsc::Receiver<String>) {
    let (client, mut conn) = tokio_postgres::connect(&direct_config(pg), tokio_postgres::NoTls)
        .await
        .expect("listener connects");
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message
                && n.channel() == CHANNEL
                && tx.send(n.payload().to_owned()).await.is_err()
            {
                break;
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .expect("LISTEN");
    (client, rx)
}

/// Sends the sentinel and returns every payload received before it, in order.
async fn drain(writer: &tokio_postgres::Client, rx: &mut mpsc::Receiver<String>) -> Vec<String> {
    writer
        .batch_execute(&format!("NOTIFY {CHANNEL}, '{SENTINEL}'"))
        .await
        .expect("NOTIFY sentinel");
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(p)) if p == SENTINEL => return got,
            Ok(Some(p)) => got.push(p),
            Ok(None) => panic!("listener connection ended; got {got:?}"),
            Err(_) => panic!("no sentinel notification within 10s; got {got:?}"),
        }
    }
}

async fn oid(client: &tokio_postgres::Client, regclass: &str) -> String {
    client
        .query_one(&format!("SELECT '{regclass}'::regclass::oid::text"), &[])
        .await
        .expect("table oid")
        .get(0)
}

fn trigger_count(pg: &ThrowawayPostgres) -> String {
    pg.psql(
        DB,
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'spillway_invalidate'",
    )
    .expect("count triggers")
    .trim()
    .to_owned()
}

#[tokio::test]
async fn migrate_twice_applies_the_schema_once() {
    let pg = start_pg().await;
    let url = pg.url(USER, DB);

    let first = assert_success(&spillway(&url, &["migrate"]).await);
    assert!(
        first.contains("applied migration 1 (spillway schema)"),
        "{first}"
    );
    assert!(
        first.contains("applied migration 2 (flush ledger and dead letters)"),
        "{first}"
    );
    assert!(first.contains("2 migrations applied"), "{first}");

    let second = assert_success(&spillway(&url, &["migrate"]).await);
    assert!(!second.contains("applied migration"), "{second}");
    assert!(
        second.contains("0 migrations applied; schema spillway is at version 2"),
        "{second}"
    );

    let state = pg
        .psql(
            DB,
            "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'spillway'), \
                    to_regprocedure('spillway.notify_invalidate()') IS NOT NULL, \
                    (SELECT string_agg(version || ':' || description, ',' ORDER BY version) \
                       FROM spillway._sqlx_migrations WHERE success), \
                    to_regclass('public._sqlx_migrations') IS NULL, \
                    to_regclass('spillway.flush_ledger') IS NOT NULL, \
                    to_regclass('spillway.dead_letters') IS NOT NULL",
        )
        .expect("inspect schema");
    // One schema, the function, the recorded migrations, no record in `public` where
    // an application's own sqlx migrations would live, and the write-policy tables.
    assert_eq!(
        state.trim(),
        "1|t|1:spillway schema,2:flush ledger and dead letters|t|t|t"
    );
}

#[tokio::test]
async fn installed_triggers_notify_the_table_oid_once_per_statement() {
    let pg = start_pg().await;
    pg.psql(
        DB,
        "CREATE TABLE public.accounts (id int PRIMARY KEY, balance int NOT NULL); \
         CREATE SCHEMA \"Sales\"; \
         CREATE TABLE \"Sales\".\"LineItems\" (id int, qty int);",
    )
    .expect("create tables");

    let out = assert_success(&spillway(&pg.url(USER, DB), &["install-triggers"]).await);
    assert!(
        out.contains("installed trigger spillway_invalidate on Sales.LineItems\n"),
        "{out}"
    );
    assert!(
        out.contains("installed trigger spillway_invalidate on public.accounts\n"),
        "{out}"
    );
    assert!(out.contains("done: trigger spillway_invalidate installed on 2 tables"));
    // Statement-level (bit 0 of tgtype clear), so a multi-row statement fires once.
    // NOTIFY folds identical payloads within one transaction, so the count of
    // notifications alone could not tell row-level triggers apart.
    let levels = pg
        .psql(
            DB,
            "SELECT string_agg(DISTINCT (tgtype & 1)::text, ',') FROM pg_trigger \
             WHERE tgname = 'spillway_invalidate'",
        )
        .expect("trigger levels");
    assert_eq!(levels.trim(), "0");
    assert_eq!(trigger_count(&pg), "2");

    let writer = connect(&direct_config(&pg)).await;
    let (_listener, mut rx) = listen(&pg).await;
    for (regclass, columns) in [
        ("public.accounts", "id, balance"),
        ("\"Sales\".\"LineItems\"", "id, qty"),
    ] {
        let oid = oid(&writer, regclass).await;
        writer
            .batch_execute(&format!(
                "INSERT INTO {regclass} ({columns}) VALUES (1, 10), (2, 20), (3, 30)"
            ))
            .await
            .expect("insert three rows");
        assert_eq!(
            drain(&writer, &mut rx).await,
            std::slice::from_ref(&oid),
            "{regclass}"
        );
        for sql in [
            format!("UPDATE {regclass} SET id = id + 100"),
            format!("DELETE FROM {regclass} WHERE id > 101"),
            format!("TRUNCATE {regclass}"),
        ] {
            writer.batch_execute(&sql).await.expect(&sql);
            assert_eq!(
                drain(&writer, &mut rx).await,
                std::slice::from_ref(&oid),
                "{sql}"
            );
        }
        // A rolled-back write notifies nobody.
        writer
            .batch_execute(&format!(
                "BEGIN; INSERT INTO {regclass} ({columns}) VALUES (7, 70); ROLLBACK"
            ))
            .await
            .expect("rolled-back insert");
        assert_eq!(drain(&writer, &mut rx).await, Vec::<String>::new());
    }

    // Installing again replaces the triggers rather than failing or doubling them.
    assert_success(&spillway(&pg.url(USER, DB), &["install-triggers"]).await);
    assert_eq!(trigger_count(&pg), "2");
}

#[tokio::test]
async fn a_missing_table_fails_and_installs_nothing() {
    let pg = start_pg().await;
    pg.psql(DB, "CREATE TABLE public.accounts (id int PRIMARY KEY)")
        .expect("create table");
    let url = pg.url(USER, DB);

    let out = spillway(
        &url,
        &[
            "install-triggers",
            "--table",
            "public.accounts",
            "--table",
            "public.missing",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("no such table: public.missing; no trigger was changed"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(trigger_count(&pg), "0");

    // Names are taken as stored: a listed table is found only by its exact case.
    let out = spillway(&url, &["install-triggers", "--table", "public.Accounts"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("no such table: public.Accounts"));

    let out =
        assert_success(&spillway(&url, &["install-triggers", "--table", "public.accounts"]).await);
    assert!(
        out.contains("installed trigger spillway_invalidate on public.accounts\n"),
        "{out}"
    );
    assert!(out.contains("on 1 table ("), "{out}");
    assert_eq!(trigger_count(&pg), "1");
}

#[tokio::test]
async fn drop_removes_the_triggers() {
    let pg = start_pg().await;
    pg.psql(
        DB,
        "CREATE TABLE public.accounts (id int PRIMARY KEY); \
         CREATE TABLE public.events (id int PRIMARY KEY);",
    )
    .expect("create tables");
    let url = pg.url(USER, DB);
    assert_success(&spillway(&url, &["install-triggers"]).await);
    assert_eq!(trigger_count(&pg), "2");

    let writer = connect(&direct_config(&pg)).await;
    let (_listener, mut rx) = listen(&pg).await;
    let accounts = oid(&writer, "public.accounts").await;
    writer
        .batch_execute("INSERT INTO public.accounts VALUES (1)")
        .await
        .expect("insert");
    assert_eq!(drain(&writer, &mut rx).await, [accounts]);

    let out = assert_success(&spillway(&url, &["install-triggers", "--drop"]).await);
    assert!(
        out.contains("dropped trigger spillway_invalidate from public.accounts\n"),
        "{out}"
    );
    assert!(
        out.contains("done: trigger spillway_invalidate dropped from 2 tables"),
        "{out}"
    );
    assert_eq!(trigger_count(&pg), "0");
    writer
        .batch_execute(
            "INSERT INTO public.accounts VALUES (2); INSERT INTO public.events VALUES (1); \
             TRUNCATE public.accounts, public.events",
        )
        .await
        .expect("writes after drop");
    assert_eq!(drain(&writer, &mut rx).await, Vec::<String>::new());

    // Dropping again, or from a table that never had it, is not an error.
    assert_success(&spillway(&url, &["install-triggers", "--drop"]).await);
}

#[tokio::test]
async fn unreachable_backend_fails_with_a_clear_message() {
    // A port nobody listens on: bound, noted, released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("postgres://{USER}:secret@127.0.0.1:{port}/{DB}?sslmode=disable");
    for args in [
        &["migrate"][..],
        &["install-triggers", "--table", "public.a"],
    ] {
        let out = spillway(&url, args).await;
        let (stdout, stderr) = text(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "spillway: connecting to PostgreSQL at postgres://{USER}:****@127.0.0.1:{port}/{DB}"
            )),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("refused"), "{args:?}: {stderr}");
        assert!(!stderr.contains("secret"), "password leaked: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    // A configuration error is still exit 64, as for `run` and `check-config`.
    let out = spillway(&url, &["migrate", "--config", "/nonexistent/spillway.toml"]).await;
    assert_eq!(out.status.code(), Some(64), "{:?}", text(&out));
}
