//! A session's life through spillway and spillway's own: query cancel, LISTEN/NOTIFY,
//! COPY both ways, a large result streamed with bounded proxy memory, graceful
//! shutdown on SIGTERM/SIGINT, and `check-config` / `run` refusing bad configuration
//! with exit code 64.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, pin_mut};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, Notification};

use crate::context::{Context, DB, USER, eventually};
use crate::wire::{self, Msg, Raw};

#[tokio::test]
async fn cancel_interrupts_pg_sleep_and_session_survives() {
    let ctx = Context::start().await;
    let client = ctx.proxy_client().await;
    // Simple and extended protocol: both are interrupted by the same CancelRequest path.
    for extended in [false, true] {
        let token = client.cancel_token();
        let running = {
            let client = &client;
            async move {
                if extended {
                    client.query("SELECT pg_sleep(30)", &[]).await.map(drop)
                } else {
                    client.simple_query("SELECT pg_sleep(30)").await.map(drop)
                }
            }
        };
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let sent = Instant::now();
            token.cancel_query(NoTls).await.expect("cancel request");
            sent
        };
        let (result, sent) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(running, cancel)
        })
        .await
        .expect("pg_sleep(30) was not cancelled");
        let waited = sent.elapsed();
        let err = result.expect_err("the query was cancelled");
        assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
        assert!(
            waited < Duration::from_secs(2),
            "cancel took {waited:?} (extended: {extended})"
        );
        let one: i32 = client
            .query_one("SELECT 1", &[])
            .await
            .expect("session usable after cancel")
            .get(0);
        assert_eq!(one, 1);
    }
}

/// A client whose connection is driven here so its notifications can be collected.
async fn listening_client(
    config: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::Receiver<Notification>,
) {
    let (client, mut conn) = tokio_postgres::connect(config, NoTls)
        .await
        .expect("connect listener");
    // Bounded: the test reads every notification it provokes, a handful at most.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(Ok(msg)) = futures_util::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = msg
                && tx.send(n).await.is_err()
            {
                break;
            }
        }
    });
    (client, rx)
}

async fn next_notification(rx: &mut tokio::sync::mpsc::Receiver<Notification>) -> Notification {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification within 5 s")
        .expect("listener connection still open")
}

#[tokio::test]
async fn notify_reaches_a_listener_through_spillway() {
    let ctx = Context::start().await;
    let (listener, mut rx) = listening_client(&ctx.proxy_config()).await;
    listener
        .batch_execute("LISTEN jobs; LISTEN \"Other Channel\"")
        .await
        .expect("listen");

    // From a direct session.
    let direct = ctx.direct_client().await;
    direct
        .batch_execute("NOTIFY jobs, 'direct payload: é ✓'")
        .await
        .expect("notify");
    let n = next_notification(&mut rx).await;
    assert_eq!(n.channel(), "jobs");
    assert_eq!(n.payload(), "direct payload: é ✓");

    // From another session through spillway, inside a transaction: delivered at commit.
    let sender = ctx.proxy_client().await;
    sender
        .batch_execute("BEGIN; SELECT pg_notify('Other Channel', 'via proxy'); COMMIT")
        .await
        .expect("notify via proxy");
    let n = next_notification(&mut rx).await;
    assert_eq!(n.channel(), "Other Channel");
    assert_eq!(n.payload(), "via proxy");

    // A large payload (close to PostgreSQL's 8000-byte limit) and several in a row,
    // delivered in order while the listener is idle.
    let big = "p".repeat(7900);
    sender
        .execute("SELECT pg_notify('jobs', $1)", &[&big])
        .await
        .expect("big notify");
    for i in 0..3 {
        sender
            .batch_execute(&format!("NOTIFY jobs, 'n{i}'"))
            .await
            .expect("notify");
    }
    assert_eq!(next_notification(&mut rx).await.payload(), big);
    for i in 0..3 {
        assert_eq!(next_notification(&mut rx).await.payload(), format!("n{i}"));
    }

    // After UNLISTEN nothing more arrives.
    listener
        .batch_execute("UNLISTEN *")
        .await
        .expect("unlisten");
    direct
        .batch_execute("NOTIFY jobs, 'late'")
        .await
        .expect("notify");
    listener
        .batch_execute("SELECT 1")
        .await
        .expect("round trip");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "notification after UNLISTEN"
    );
}

#[tokio::test]
async fn copy_in_and_out_100k_rows() {
    const ROWS: i64 = 100_000;
    let ctx = Context::start().await;
    let client = ctx.proxy_client().await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
        .await
        .expect("create");
    let data: String = (1..=ROWS).map(|i| format!("{i}\tname {i}\n")).collect();

    let sink = client
        .copy_in::<_, Bytes>("COPY t FROM STDIN")
        .await
        .expect("copy in");
    pin_mut!(sink);
    // Chunks deliberately cut rows in half: CopyData boundaries carry no meaning.
    for chunk in data.as_bytes().chunks(50_000) {
        sink.send(Bytes::copy_from_slice(chunk))
            .await
            .expect("copy data");
    }
    let copied = sink.finish().await.expect("copy done");
    assert_eq!(copied, ROWS as u64);
    assert_eq!(
        ctx.psql_direct("SELECT count(*), sum(id), sum(length(name)) FROM t")
            .trim(),
        format!(
            "{ROWS}|{}|{}",
            ROWS * (ROWS + 1) / 2,
            (1..=ROWS).map(|i| 5 + i.to_string().len()).sum::<usize>()
        )
    );

    let stream = client
        .copy_out("COPY (SELECT id, name FROM t ORDER BY id) TO STDOUT")
        .await
        .expect("copy out");
    pin_mut!(stream);
    let mut out = Vec::with_capacity(data.len());
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("copy out data"));
    }
    assert_eq!(out.len(), data.len());
    assert!(out == data.as_bytes(), "COPY OUT differs from what went in");

    // A COPY that fails upstream ends with PostgreSQL's error; the session goes on.
    let sink = client
        .copy_in::<_, Bytes>("COPY t FROM STDIN")
        .await
        .expect("copy in");
    pin_mut!(sink);
    sink.send(Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .expect("send");
    let err = sink.finish().await.expect_err("bad input");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION),
        "{err}"
    );
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("session usable after failed COPY")
        .get(0);
    assert_eq!(n, ROWS);
}

#[tokio::test]
async fn large_result_streams_with_bounded_proxy_memory() {
    const ROWS: usize = 200_000;
    const LIMIT: u64 = 64 * 1024 * 1024;
    let ctx = Context::start().await;
    let client = ctx.proxy_client().await;
    let (rss_before, _) = ctx.proxy.memory();

    let rows = client
        .query_raw(
            "SELECT repeat('x', 1000) FROM generate_series(1, 200000)",
            Vec::<String>::new(),
        )
        .await
        .expect("query");
    pin_mut!(rows);
    let mut count = 0usize;
    let mut bytes = 0usize;
    let mut max_rss = 0u64;
    let started = Instant::now();
    while let Some(row) = rows.next().await {
        let row = row.expect("row");
        bytes += row.get::<_, &str>(0).len();
        count += 1;
        // A slow consumer: spillway must stop reading upstream instead of buffering.
        if count.is_multiple_of(2_000) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if count == ROWS / 4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if count.is_multiple_of(10_000) {
            max_rss = max_rss.max(ctx.proxy.memory().0);
        }
    }
    let elapsed = started.elapsed();
    let (rss_after, peak) = ctx.proxy.memory();
    println!(
        "200 MB result through spillway: {count} rows, {bytes} bytes in {elapsed:?}; \
         proxy RSS before {:.1} MiB, max sampled {:.1} MiB, after {:.1} MiB, \
         peak (VmHWM) {:.1} MiB",
        mib(rss_before),
        mib(max_rss),
        mib(rss_after),
        mib(peak)
    );
    assert_eq!(count, ROWS);
    assert!(bytes >= 200_000_000, "{bytes} bytes");
    assert!(
        peak < LIMIT,
        "proxy peak RSS {:.1} MiB exceeds {} MiB",
        mib(peak),
        LIMIT >> 20
    );
    let one: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("session usable after the stream")
        .get(0);
    assert_eq!(one, 1);
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Asserts `msg` is a FATAL 57P01 (admin shutdown) ErrorResponse.
fn assert_admin_shutdown(msg: &Msg, who: &str) {
    assert_eq!(msg.tag, b'E', "{who}: expected ErrorResponse, got {msg:?}");
    assert_eq!(msg.code().as_deref(), Some("57P01"), "{who}: {msg:?}");
    assert_eq!(msg.severity().as_deref(), Some("FATAL"), "{who}: {msg:?}");
}

/// Reads the next message within `within`; panics on timeout or EOF.
async fn recv_in(raw: &mut Raw, within: Duration, who: &str) -> Msg {
    raw.recv_within(within)
        .await
        .unwrap_or_else(|()| panic!("{who}: nothing within {within:?}"))
        .unwrap_or_else(|| panic!("{who}: EOF instead of a message"))
}

/// Client backends PostgreSQL still serves, other than the one asking.
fn upstream_sessions(ctx: &Context) -> u32 {
    ctx.psql_direct(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    .trim()
    .parse()
    .expect("count")
}

#[tokio::test]
async fn sigterm_drains_sessions_then_exits() {
    let mut ctx = Context::builder()
        .env("SPILLWAY_SERVER__SHUTDOWN_TIMEOUT", "3s")
        .start()
        .await;
    let addr = ctx.proxy.addr;
    let mut idle = Raw::startup(addr, USER, DB).await;
    let mut in_tx = Raw::startup(addr, USER, DB).await;
    in_tx.send(&wire::query("BEGIN")).await;
    let msgs = in_tx.until(b'Z').await;
    assert_eq!(msgs.last().map(|m| m.body.as_slice()), Some(&b"T"[..]));
    let mut busy = Raw::startup(addr, USER, DB).await;
    busy.send(&wire::query("SELECT pg_sleep(1), 'done'")).await;
    tokio::time::sleep(Duration::from_millis(150)).await;

    let t0 = Instant::now();
    ctx.proxy.signal("TERM");

    let idle_task = tokio::spawn(async move {
        let msg = recv_in(&mut idle, Duration::from_secs(1), "idle").await;
        let at = t0.elapsed();
        assert_admin_shutdown(&msg, "idle");
        assert_eq!(idle.recv().await, None, "idle: closed after 57P01");
        at
    });
    let busy_task = tokio::spawn(async move {
        // The running statement completes normally...
        let msgs = busy.until(b'Z').await;
        let result_at = t0.elapsed();
        assert_eq!(wire::tags(&msgs), "TDCZ", "busy: {msgs:?}");
        assert!(
            String::from_utf8_lossy(&msgs[1].body).contains("done"),
            "{msgs:?}"
        );
        // ...and then, idle, the session is closed.
        let msg = recv_in(&mut busy, Duration::from_secs(5), "busy").await;
        let closed_at = t0.elapsed();
        assert_admin_shutdown(&msg, "busy");
        assert_eq!(busy.recv().await, None, "busy: closed after 57P01");
        (result_at, closed_at)
    });
    let tx_task = tokio::spawn(async move {
        let msg = recv_in(&mut in_tx, Duration::from_secs(6), "in transaction").await;
        let at = t0.elapsed();
        assert_admin_shutdown(&msg, "in transaction");
        assert_eq!(
            in_tx.recv().await,
            None,
            "in transaction: closed after 57P01"
        );
        at
    });

    // New connections are refused while the others drain.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = tokio::net::TcpStream::connect(addr).await;
    assert!(late.is_err(), "a connection was accepted after SIGTERM");

    let idle_at = idle_task.await.expect("idle task");
    let (busy_result_at, busy_closed_at) = busy_task.await.expect("busy task");
    let tx_at = tx_task.await.expect("transaction task");
    println!(
        "SIGTERM: idle closed at {idle_at:?}; busy result at {busy_result_at:?}, closed at \
         {busy_closed_at:?}; in-transaction closed at {tx_at:?}"
    );
    assert!(idle_at < Duration::from_secs(1), "idle: {idle_at:?}");
    assert!(
        tx_at >= Duration::from_millis(2_700) && tx_at < Duration::from_millis(4_500),
        "in-transaction session closed at {tx_at:?}, expected at the 3 s deadline"
    );

    let status = ctx
        .proxy
        .wait_exit(Duration::from_secs(5).saturating_sub(t0.elapsed()))
        .expect("spillway exits within 5 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(
        eventually(Duration::from_secs(5), || upstream_sessions(&ctx) == 0).await,
        "upstream sessions left behind"
    );
    let logs = ctx.proxy.logs();
    assert!(logs.contains("all sessions closed"), "{logs}");
    // Checked last so the rest of the sequence is verified even when this fails.
    assert!(
        busy_closed_at < busy_result_at + Duration::from_millis(500),
        "busy session closed {:?} after its result instead of as soon as it was idle",
        busy_closed_at - busy_result_at
    );
}

#[tokio::test]
async fn sigint_shuts_down_like_sigterm() {
    let mut ctx = Context::builder()
        .env("SPILLWAY_SERVER__SHUTDOWN_TIMEOUT", "3s")
        .start()
        .await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let (client, conn) = tokio_postgres::connect(&ctx.proxy_config(), NoTls)
        .await
        .expect("connect");
    let conn = tokio::spawn(conn);
    let one: i32 = client.query_one("SELECT 1", &[]).await.expect("q").get(0);
    assert_eq!(one, 1);

    let t0 = Instant::now();
    ctx.proxy.signal("INT");
    assert_admin_shutdown(
        &recv_in(&mut raw, Duration::from_secs(1), "raw").await,
        "raw",
    );
    // tokio-postgres sees its connection end (it reports an unsolicited FATAL as a
    // plain close, also straight from PostgreSQL, so the raw client checks the code).
    let end = tokio::time::timeout(Duration::from_secs(2), conn)
        .await
        .expect("tokio-postgres connection ends")
        .expect("task");
    assert!(end.is_err(), "{end:?}");
    assert!(client.is_closed());
    assert!(client.simple_query("SELECT 1").await.is_err());

    let status = ctx
        .proxy
        .wait_exit(Duration::from_secs(3))
        .expect("spillway exits after SIGINT");
    assert!(status.success(), "exit status {status}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

/// Runs the spillway binary with `args` in `dir`, free of inherited `SPILLWAY_*`
/// settings, plus `env`. Kills it if it has not exited within 10 s.
fn spillway(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spillway"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("SPILLWAY_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn spillway");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "spillway {args:?} still running after 10 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

const VALID: &str = "[server]\nlisten = \"127.0.0.1:6543\"\n\
                     [backend]\nurl = \"postgres://app@127.0.0.1:5432/app\"\n\
                     [flush]\nbatch_size = 500\n";

/// Writes `toml` to a file in `dir`, runs `check-config` on it, and returns
/// (exit code, stderr, config path).
fn check(
    dir: &Path,
    name: &str,
    toml: &str,
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let path = dir.join(name);
    std::fs::write(&path, toml).expect("write config");
    let path = path.to_str().expect("utf-8 path").to_owned();
    let out = spillway(dir, &["check-config", "--config", &path], env);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path,
    )
}

/// figment names a file relative to the working directory when it can.
fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name")
        .to_owned()
}

#[test]
fn check_config_accepts_valid_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();

    let path = dir.join("valid.toml");
    std::fs::write(&path, VALID).expect("write");
    let out = spillway(
        dir,
        &["check-config", "--config", path.to_str().expect("utf-8")],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("127.0.0.1:6543"),
        "{out:?}"
    );

    // Unknown key: named, with the file it came from.
    let (code, err, path) = check(
        dir,
        "unknown.toml",
        "[server]\nlisten = \"127.0.0.1:6543\"\nlisten_adress = \"x\"\n",
        &[],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("listen_adress"), "{err}");
    assert!(err.contains(&file_name(&path)), "names the file: {err}");

    // Wrong type: the dotted key.
    let (code, err, path) = check(dir, "type.toml", "[flush]\nbatch_size = \"lots\"\n", &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("flush.batch_size"), "{err}");
    assert!(err.contains(&file_name(&path)), "names the file: {err}");

    // A deferred policy without the cache's classifier.
    let (code, err, _) = check(
        dir,
        "deferred.toml",
        &format!(
            "{VALID}[cache]\nenabled = false\n\
             [tables.\"public.events\"]\npolicy = \"write-behind\"\n"
        ),
        &[],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("tables.\"public.events\".policy")
            && err.contains("write-behind")
            && err.contains("cache.enabled"),
        "{err}"
    );

    // Write-back coalesces per key, which needs exact row counts.
    let (code, err, _) = check(
        dir,
        "writeback.toml",
        &format!(
            "{VALID}[tables.\"public.events\"]\npolicy = \"write-back\"\n\
             row_counts = \"assumed\"\n"
        ),
        &[],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("tables.\"public.events\".row_counts") && err.contains("write-back"),
        "{err}"
    );

    // A table written through is fine.
    let (code, err, _) = check(
        dir,
        "through.toml",
        &format!("{VALID}[tables.\"public.events\"]\npolicy = \"write-through\"\n"),
        &[],
    );
    assert_eq!(code, Some(0), "{err}");

    // A config file that does not exist.
    let missing = dir.join("nope.toml");
    let out = spillway(
        dir,
        &["check-config", "--config", missing.to_str().expect("utf-8")],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("nope.toml"), "{err}");

    // An environment override that does not parse names the variable or the key
    // (checked last so the checks above run even when this one fails).
    let (code, err, _) = check(
        dir,
        "env.toml",
        VALID,
        &[("SPILLWAY_SERVER__LISTEN", "notanaddr")],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("SPILLWAY_SERVER__LISTEN") || err.contains("server.listen"),
        "{err}"
    );
}

#[test]
fn run_refuses_invalid_config_with_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\nbogus = 1\n").expect("write");
    let out = spillway(
        dir,
        &["run", "--config", path.to_str().expect("utf-8")],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("bogus"), "{err}");

    // Also when the bad value comes only from the environment.
    let path = dir.join("ok.toml");
    std::fs::write(&path, VALID).expect("write");
    let out = spillway(
        dir,
        &["run", "--config", path.to_str().expect("utf-8")],
        &[("SPILLWAY_SERVER__MAX_CLIENT_CONN", "0")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("server.max_client_conn"), "{err}");
}
