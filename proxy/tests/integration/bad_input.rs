//! Hostile and broken input, and a broken upstream: each case must end with the right
//! FATAL ErrorResponse (or a clean close), and never take the process or another
//! session down.
//!
//! Every test opens a bystander session before the bad input and checks afterwards
//! that it still answers and that a fresh connection works ([`assert_healthy`]). The
//! exceptions are the cases where PostgreSQL itself ends every session (stopped
//! server, backend crash): there the bystander must fail cleanly instead of hanging.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::context::{Context, DB, USER, eventually};
use crate::wire::{Msg, Raw, query, startup_packet, terminate};

/// The bystander still answers, a fresh session works, and the process is alive.
async fn assert_healthy(ctx: &mut Context, bystander: &tokio_postgres::Client) {
    let row = bystander
        .query_one("SELECT 1::int4", &[])
        .await
        .expect("bystander still answers");
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_fresh_session_works(ctx).await;
}

async fn assert_fresh_session_works(ctx: &mut Context) {
    assert!(
        ctx.proxy.wait_exit(Duration::ZERO).is_none(),
        "spillway exited"
    );
    let fresh = ctx.proxy_client().await;
    let row = fresh
        .query_one("SELECT 2::int4", &[])
        .await
        .expect("fresh session answers");
    assert_eq!(row.get::<_, i32>(0), 2);
}

/// Everything the server sends until it closes; panics if it does not close in time.
async fn until_closed(raw: &mut Raw, within: Duration) -> Vec<Msg> {
    tokio::time::timeout(within, raw.until_eof())
        .await
        .expect("server did not close the connection in time")
}

/// Asserts the connection gets exactly one FATAL ErrorResponse with `code`, then EOF.
async fn expect_fatal_then_close(raw: &mut Raw, code: &str) -> Msg {
    let msgs = until_closed(raw, Duration::from_secs(5)).await;
    assert_eq!(msgs.len(), 1, "expected one ErrorResponse, got {msgs:?}");
    let err = msgs.into_iter().next().expect("one message");
    assert_eq!(err.tag, b'E', "{err:?}");
    assert_eq!(err.code().as_deref(), Some(code), "{err:?}");
    assert_eq!(err.severity().as_deref(), Some("FATAL"), "{err:?}");
    err
}

/// Lines of spillway's log about the session from `peer` that mention `needle`.
fn log_lines(ctx: &Context, peer: SocketAddr, needle: &str) -> usize {
    let peer = format!("peer={peer}");
    ctx.proxy
        .logs()
        .lines()
        .filter(|l| l.contains(&peer) && l.contains(needle))
        .count()
}

fn ssl_request() -> Vec<u8> {
    let mut out = 8i32.to_be_bytes().to_vec();
    out.extend_from_slice(&80_877_103i32.to_be_bytes());
    out
}

#[tokio::test]
async fn http_request_instead_of_startup() {
    let mut ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    let mut raw = Raw::connect(ctx.proxy.addr).await;
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // "GET " read as a length word is far over 10 000 bytes: PostgreSQL logs "invalid
    // length of startup packet" and closes without a word, and so does spillway
    // (issue 18; it used to answer FATAL 08P01). drivers::startup compares more cases.
    assert_eq!(until_closed(&mut raw, Duration::from_secs(5)).await, vec![]);
    assert_healthy(&mut ctx, &bystander).await;
}

#[tokio::test]
async fn protocol_2_startup_is_unsupported() {
    let mut ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    let mut raw = Raw::connect(ctx.proxy.addr).await;
    raw.send(b"\0\0\0\x08\0\x02\0\0").await;
    expect_fatal_then_close(&mut raw, "0A000").await;
    assert_healthy(&mut ctx, &bystander).await;
}

#[tokio::test]
async fn truncated_message_then_close() {
    let mut ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let peer = raw.stream.local_addr().expect("local addr");
    let q = query("SELECT 'never completed'");
    raw.send(&q[..q.len() / 2]).await;
    drop(raw);
    assert!(
        eventually(Duration::from_secs(5), || log_lines(
            &ctx,
            peer,
            "disconnected"
        ) > 0)
        .await,
        "spillway did not notice the disconnect:\n{}",
        ctx.proxy.logs()
    );
    assert_healthy(&mut ctx, &bystander).await;
}

#[tokio::test]
async fn oversized_message_refused_without_reading_the_body() {
    let mut ctx = Context::builder()
        .server("max_message_bytes = \"1MiB\"")
        .start()
        .await;
    let bystander = ctx.proxy_client().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    // Only the header of a 2 MiB Query: the answer must not wait for the body.
    let mut header = vec![b'Q'];
    header.extend_from_slice(&(2 * 1024 * 1024 + 4i32).to_be_bytes());
    raw.send(&header).await;
    let msgs = until_closed(&mut raw, Duration::from_secs(2)).await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].tag, b'E');
    assert_eq!(msgs[0].code().as_deref(), Some("54000"));
    assert_eq!(msgs[0].severity().as_deref(), Some("FATAL"));
    assert_healthy(&mut ctx, &bystander).await;
}

#[tokio::test]
async fn negative_and_too_short_lengths() {
    let mut ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    for bad in [&b"Q\xff\xff\xff\xff"[..], b"Q\0\0\0\x02", b"Q\0\0\0\x03"] {
        let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
        raw.send(bad).await;
        let err = expect_fatal_then_close(&mut raw, "08P01").await;
        assert!(
            err.message().is_some_and(|m| m.contains("length")),
            "{bad:?}: {err:?}"
        );
    }
    assert_healthy(&mut ctx, &bystander).await;
}

#[tokio::test]
async fn client_disconnects_mid_query() {
    let mut ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let peer = raw.stream.local_addr().expect("local addr");
    raw.send(&query("SELECT pg_sleep(30)")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(raw);

    assert!(
        eventually(Duration::from_secs(5), || log_lines(
            &ctx,
            peer,
            "disconnect"
        ) > 0)
        .await,
        "spillway did not log the disconnect:\n{}",
        ctx.proxy.logs()
    );
    // Logged exactly once, also after a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        log_lines(&ctx, peer, "disconnect"),
        1,
        "{}",
        ctx.proxy.logs()
    );
    // Nobody is left to receive the answer, so spillway cancels the query instead of
    // letting PostgreSQL sleep out its 30 seconds.
    let direct = ctx.direct_client().await;
    let mut running = i64::MAX;
    for _ in 0..60 {
        running = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running, 0, "the abandoned pg_sleep(30) is still running");
    assert_healthy(&mut ctx, &bystander).await;
}

#[tokio::test]
async fn startup_never_completed_is_timed_out() {
    let mut ctx = Context::builder()
        .server("startup_timeout = \"1s\"")
        .start()
        .await;
    let bystander = ctx.proxy_client().await;

    // Silent client, and a client that stops after 3 bytes of its startup packet.
    let silent = Raw::connect(ctx.proxy.addr).await;
    let mut partial = Raw::connect(ctx.proxy.addr).await;
    partial.send(&startup_packet(USER, DB)[..3]).await;

    let started = Instant::now();
    let check = |mut raw: Raw| async move {
        let msgs = until_closed(&mut raw, Duration::from_secs(3)).await;
        // PostgreSQL closes silently on a startup timeout; spillway may say why first,
        // but only as a FATAL protocol violation.
        for m in &msgs {
            assert_eq!(m.tag, b'E', "{msgs:?}");
            assert_eq!(m.code().as_deref(), Some("08P01"), "{msgs:?}");
            assert_eq!(m.severity().as_deref(), Some("FATAL"), "{msgs:?}");
        }
        assert!(msgs.len() <= 1, "{msgs:?}");
    };
    tokio::join!(check(silent), check(partial));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "closed before the timeout: {waited:?}"
    );
    assert_healthy(&mut ctx, &bystander).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_at_connect() {
    let mut ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    tokio::task::block_in_place(|| ctx.pg.stop()).expect("stop PostgreSQL");

    // Stopping PostgreSQL ends every session, the bystander's too: it must get an
    // error, not hang.
    let gone = tokio::time::timeout(Duration::from_secs(5), bystander.simple_query("SELECT 1"))
        .await
        .expect("bystander answered (with an error) in time");
    assert!(gone.is_err(), "bystander session survived a stopped server");

    let mut raw = Raw::connect(ctx.proxy.addr).await;
    raw.send(&startup_packet(USER, DB)).await;
    expect_fatal_then_close(&mut raw, "08006").await;

    tokio::task::block_in_place(|| ctx.pg.start()).expect("restart PostgreSQL");
    assert_fresh_session_works(&mut ctx).await;
}

/// Connects through spillway until it works (PostgreSQL may be in crash recovery).
async fn connect_eventually(ctx: &Context, within: Duration) -> tokio_postgres::Client {
    let deadline = Instant::now() + within;
    loop {
        let attempt = async {
            let (client, conn) =
                tokio_postgres::connect(&ctx.proxy_config(), tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client.simple_query("SELECT 1").await?;
            Ok::<_, tokio_postgres::Error>(client)
        };
        match attempt.await {
            Ok(client) => return client,
            Err(e) if Instant::now() > deadline => panic!("no session through spillway: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn backend_pid(msgs: &[Msg]) -> i32 {
    let row = msgs.iter().find(|m| m.tag == b'D').expect("DataRow");
    let len = i32::from_be_bytes([row.body[2], row.body[3], row.body[4], row.body[5]]) as usize;
    String::from_utf8_lossy(&row.body[6..6 + len])
        .parse()
        .expect("pid")
}

#[tokio::test]
async fn upstream_backend_killed_mid_session() {
    let mut ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&query("SELECT pg_backend_pid()")).await;
    let pid = backend_pid(&raw.until(b'Z').await);

    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL {pid}");

    // The killed backend says nothing. The session was idle, so it is detached rather
    // than ended; its next request that needs PostgreSQL gets FATAL 08006, and it closes.
    let peer = raw.local_addr();
    assert!(
        eventually(Duration::from_secs(5), || log_lines(
            &ctx,
            peer,
            "session detached"
        ) == 1)
        .await,
        "the idle session was not detached"
    );
    raw.send(&query("SELECT pg_backend_pid()")).await;
    let err = expect_fatal_then_close(&mut raw, "08006").await;
    let message = err.message().unwrap_or_default();
    assert!(message.contains("reconnect"), "{message}");

    // A backend crash makes the postmaster end every session (crash recovery), so the
    // bystander fails too, but cleanly and without hanging. The postmaster's SIGQUIT
    // to the other backends comes a moment after the crash, so a query may still be
    // answered in between: keep asking until the bystander's session has ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Not cacheable: a detached bystander must need PostgreSQL for it.
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            bystander.simple_query("SELECT pg_backend_pid()"),
        )
        .await
        .expect("bystander answered (with an error) in time");
        if answer.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bystander survived PostgreSQL crash recovery"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert!(
        ctx.proxy.wait_exit(Duration::ZERO).is_none(),
        "spillway exited"
    );
    let client = connect_eventually(&ctx, Duration::from_secs(10)).await;
    let row = client
        .query_one("SELECT 3::int4", &[])
        .await
        .expect("query after recovery");
    assert_eq!(row.get::<_, i32>(0), 3);
}

#[tokio::test]
async fn upstream_backend_terminated_mid_session() {
    let mut ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&query("SELECT pg_backend_pid()")).await;
    let pid = backend_pid(&raw.until(b'Z').await);

    let direct = ctx.direct_client().await;
    let row = direct
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("pg_terminate_backend");
    assert!(row.get::<_, bool>(0));

    // The session was idle and PostgreSQL still accepts sessions: this backend alone
    // was ended, so the client gets PostgreSQL's FATAL at once, unasked, and the close,
    // as on a direct connection (issue 18: spillway used to detach it and answer its
    // next request with FATAL 08006). Nothing is detached.
    let peer = raw.local_addr();
    let err = expect_fatal_then_close(&mut raw, "57P01").await;
    let message = err.message().unwrap_or_default();
    assert!(
        message.contains("terminating connection due to administrator command"),
        "{message}"
    );
    assert_eq!(log_lines(&ctx, peer, "session detached"), 0);
    assert_healthy(&mut ctx, &bystander).await;
}

/// Startup through spillway; `Err` with what came instead of ReadyForQuery.
async fn try_startup(addr: SocketAddr) -> Result<Raw, Vec<Msg>> {
    let mut raw = Raw::connect(addr).await;
    if raw.try_send(&startup_packet(USER, DB)).await.is_err() {
        return Err(raw.until_eof().await);
    }
    let mut msgs = Vec::new();
    while let Some(m) = raw.recv().await {
        match m.tag {
            b'Z' => return Ok(raw),
            b'E' => {
                msgs.push(m);
                msgs.extend(raw.until_eof().await);
                return Err(msgs);
            }
            _ => msgs.push(m),
        }
    }
    Err(msgs)
}

async fn close(mut raw: Raw) {
    raw.send(&terminate()).await;
    assert_eq!(until_closed(&mut raw, Duration::from_secs(5)).await, vec![]);
}

#[tokio::test]
async fn max_client_conn_refuses_with_53300() {
    let ctx = Context::builder()
        .server("max_client_conn = 2")
        .start()
        .await;
    let bystander = ctx.proxy_client().await;
    let second = Raw::startup(ctx.proxy.addr, USER, DB).await;

    // The third is refused as PostgreSQL refuses: in answer to its startup packet
    // (issue 18; it used to be answered straight after accept, so an SSLRequest got
    // an ErrorResponse instead of 'N'). drivers::refusal checks that with drivers.
    let mut third = Raw::connect(ctx.proxy.addr).await;
    third.send(&startup_packet(USER, DB)).await;
    expect_fatal_then_close(&mut third, "53300").await;

    close(second).await;
    // The slot is released when the session task ends, just after the close.
    let deadline = Instant::now() + Duration::from_secs(2);
    let fourth = loop {
        match try_startup(ctx.proxy.addr).await {
            Ok(raw) => break raw,
            Err(msgs) if Instant::now() > deadline => panic!("slot never released: {msgs:?}"),
            Err(msgs) => {
                assert_eq!(msgs[0].code().as_deref(), Some("53300"), "{msgs:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    close(fourth).await;

    let row = bystander
        .query_one("SELECT 1::int4", &[])
        .await
        .expect("bystander still answers");
    assert_eq!(row.get::<_, i32>(0), 1);
    // A fresh session, once the fourth's slot is free again.
    let fresh = connect_eventually(&ctx, Duration::from_secs(2)).await;
    fresh.simple_query("SELECT 1").await.expect("fresh session");
}

#[tokio::test]
async fn data_pipelined_after_ssl_request_is_refused() {
    let mut ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    let mut raw = Raw::connect(ctx.proxy.addr).await;
    raw.send(&[ssl_request(), startup_packet(USER, DB)].concat())
        .await;

    // Bytes sent after SSLRequest but before its answer would, had TLS been agreed,
    // be treated as if they came over the encrypted channel although anyone on the
    // path could have injected them (CVE-2021-23214). spillway checks before it
    // answers, so it refuses outright: no 'N', a FATAL 08P01, and the close (PostgreSQL
    // sends its 'N' first, then the same FATAL 08P01; either way nothing pipelined is
    // ever executed). Read raw bytes: a lone 'N' would not parse as a message.
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.stream.read_to_end(&mut bytes))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(bytes.first(), Some(&b'E'), "{bytes:?}");
    let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    assert_eq!(
        bytes.len(),
        len + 1,
        "one ErrorResponse, then EOF: {bytes:?}"
    );
    let err = Msg {
        tag: bytes[0],
        body: bytes[5..].to_vec(),
    };
    assert_eq!(err.code().as_deref(), Some("08P01"), "{err:?}");
    assert_eq!(err.severity().as_deref(), Some("FATAL"), "{err:?}");
    assert_healthy(&mut ctx, &bystander).await;
}

#[tokio::test]
async fn oversized_authentication_answer_is_refused_before_login() {
    // Before login nobody may make spillway buffer more than PostgreSQL's own 64 KiB
    // authentication limit, whatever server.max_message_bytes says.
    let mut ctx = Context::builder()
        .pg(|b| b.hba("host all pwuser 127.0.0.1/32 md5"))
        .start()
        .await;
    ctx.psql_direct("SET password_encryption = 'md5'; CREATE ROLE pwuser LOGIN PASSWORD 'pw'");
    let bystander = ctx.proxy_client().await;
    let mut raw = Raw::connect(ctx.proxy.addr).await;
    raw.send(&startup_packet("pwuser", DB)).await;
    let first = raw.recv().await.expect("authentication request");
    assert_eq!(first.tag, b'R', "{first:?}");
    // A PasswordMessage header announcing 1 MiB; the body never comes.
    let mut header = vec![b'p'];
    header.extend_from_slice(&(1_048_576i32 + 4).to_be_bytes());
    raw.send(&header).await;
    expect_fatal_then_close(&mut raw, "54000").await;
    assert_healthy(&mut ctx, &bystander).await;
}
