//! The backend pid clients see is PostgreSQL's (issue 18): psycopg finds its
//! `backend_pid` in `pg_stat_activity` and can `pg_terminate_backend` it, asyncpg's
//! listener gets its own notifications with its own pid, and cancel, which needs the
//! secret spillway issued, still works; a wrong secret is still ignored.

use std::time::Duration;

use serde_json::json;

use super::{Lang, both};
use crate::context::{Context, DB, USER};
use crate::wire::{Msg, Raw, query, startup_packet};

#[tokio::test]
async fn psycopg_backend_pid_is_postgres_own() {
    let ctx = Context::start().await;
    let (through, direct) = both(&ctx, Lang::Python, "psycopg_backend_pid.py").await;
    assert_eq!(through["pid_is_pg_backend_pid"], json!(true), "{through}");
    assert_eq!(through["rows_in_pg_stat_activity"], json!(1), "{through}");
    assert_eq!(through["terminated"], json!(true), "{through}");
    assert_eq!(
        through["victim_after_terminate"],
        json!("OperationalError"),
        "{through}"
    );
    assert_eq!(through["victim_closed"], json!(true), "{through}");
    assert_eq!(through["cancel"], json!("QueryCanceled"), "{through}");
    assert_eq!(through, direct);
}

#[tokio::test]
async fn asyncpg_listener_gets_its_own_pid() {
    let ctx = Context::start().await;
    let (through, direct) = both(&ctx, Lang::Python, "asyncpg_notify.py").await;
    assert_eq!(through["notification_pid_is_own"], json!(true), "{through}");
    assert_eq!(
        through["notification_pid_is_pg_backend_pid"],
        json!(true),
        "{through}"
    );
    assert_eq!(through["timeout"], json!("TimeoutError"), "{through}");
    assert_eq!(through["sleeping_after_cancel"], json!(0), "{through}");
    assert_eq!(through, direct);
}

/// The pid and secret of BackendKeyData in a startup answer.
fn key_data(msgs: &[Msg]) -> (i32, Vec<u8>) {
    let k = msgs.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    let pid = i32::from_be_bytes([k.body[0], k.body[1], k.body[2], k.body[3]]);
    (pid, k.body[4..].to_vec())
}

async fn send_cancel(ctx: &Context, pid: i32, secret: &[u8]) {
    let mut packet = ((12 + secret.len()) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102i32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(secret);
    let mut raw = Raw::connect(ctx.proxy.addr).await;
    raw.send(&packet).await;
    // Nothing is ever answered to a CancelRequest; spillway just closes.
    assert_eq!(raw.until_eof().await, vec![]);
}

/// The SQLSTATE the running `pg_sleep` ended with, or "" when it ran to the end.
async fn outcome(raw: &mut Raw) -> String {
    let msgs = raw.until(b'Z').await;
    msgs.iter()
        .find(|m| m.tag == b'E')
        .and_then(Msg::code)
        .unwrap_or_default()
}

#[tokio::test]
async fn cancel_needs_spillways_secret_with_postgres_pid() {
    let ctx = Context::start().await;
    let mut raw = Raw::connect(ctx.proxy.addr).await;
    raw.send(&startup_packet(USER, DB)).await;
    let (pid, secret) = key_data(&raw.until(b'Z').await);

    raw.send(&query("SELECT pg_backend_pid()")).await;
    let rows = raw.until(b'Z').await;
    let row = rows.iter().find(|m| m.tag == b'D').expect("a row");
    let text = String::from_utf8_lossy(&row.body[6..]).into_owned();
    assert_eq!(
        text,
        pid.to_string(),
        "BackendKeyData carries PostgreSQL's pid"
    );

    // A wrong secret is ignored: the query runs to its end.
    raw.send(&query("SELECT pg_sleep(1.5)")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut wrong = secret.clone();
    wrong[0] ^= 0xff;
    send_cancel(&ctx, pid, &wrong).await;
    assert_eq!(
        outcome(&mut raw).await,
        "",
        "a wrong secret cancelled the query"
    );

    // The right one cancels it.
    raw.send(&query("SELECT pg_sleep(20)")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_cancel(&ctx, pid, &secret).await;
    let cancelled = tokio::time::timeout(Duration::from_secs(10), outcome(&mut raw))
        .await
        .expect("cancel took effect");
    assert_eq!(cancelled, "57014");
}
