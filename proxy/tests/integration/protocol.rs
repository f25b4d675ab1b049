//! Raw wire scripts for sequences drivers rarely produce: pipelined Execute, Flush
//! before Sync, errors inside a pipeline, FunctionCall, multi-statement simple queries,
//! portal suspension, NoticeResponse and a result row too large to buffer.
//!
//! Each script runs through spillway and, where the answer does not depend on which
//! session ran it, straight against PostgreSQL too: the backend message sequences must
//! be identical, because spillway in session mode is supposed to be invisible.

use std::net::SocketAddr;
use std::time::Duration;

use crate::context::{Context, DB, USER};
use crate::wire::{
    Msg, Raw, bind, describe_portal, execute, flush, function_call, parse, query, startup_packet,
    sync, tags, terminate,
};

fn direct_addr(ctx: &Context) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ctx.pg.port()))
}

/// The first column of a DataRow as text (`None` for NULL).
fn first_value(row: &Msg) -> Option<String> {
    assert_eq!(row.tag, b'D', "not a DataRow: {row:?}");
    let b = &row.body;
    let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
    (len >= 0).then(|| String::from_utf8_lossy(&b[6..6 + len as usize]).into_owned())
}

fn values(msgs: &[Msg]) -> Vec<Option<String>> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(first_value)
        .collect()
}

/// Sends `script` in one write on a fresh session and collects the answer up to the
/// `readies`-th ReadyForQuery.
async fn run_script(addr: SocketAddr, script: &[u8], readies: usize) -> Vec<Msg> {
    let mut raw = Raw::startup(addr, USER, DB).await;
    raw.send(script).await;
    let mut out = Vec::new();
    for _ in 0..readies {
        out.extend(raw.until(b'Z').await);
    }
    // Nothing beyond what was asked for.
    assert_eq!(
        raw.recv_within(Duration::from_millis(100)).await,
        Err(()),
        "unexpected extra message"
    );
    out
}

/// Runs `script` through spillway and directly; asserts identical tag sequences and
/// returns spillway's messages.
async fn same_as_direct(ctx: &Context, script: &[u8], readies: usize) -> Vec<Msg> {
    let via_proxy = run_script(ctx.proxy.addr, script, readies).await;
    let direct = run_script(direct_addr(ctx), script, readies).await;
    assert_eq!(
        tags(&via_proxy),
        tags(&direct),
        "spillway and PostgreSQL disagree:\nproxy:  {via_proxy:?}\ndirect: {direct:?}"
    );
    via_proxy
}

#[tokio::test]
async fn pipelined_execute_in_one_write() {
    let ctx = Context::start().await;
    let script = [
        parse("", "SELECT 1"),
        bind("", "", &[]),
        execute("", 0),
        parse("s2", "SELECT $1::int * 2"),
        bind("", "s2", &[Some("21")]),
        execute("", 0),
        parse("", "SELECT generate_series(1, 3)"),
        bind("p3", "", &[]),
        execute("p3", 0),
        sync(),
    ]
    .concat();
    let msgs = same_as_direct(&ctx, &script, 1).await;
    assert_eq!(tags(&msgs), "12DC12DC12DDDCZ");
    let got = values(&msgs);
    let want: Vec<Option<String>> = ["1", "42", "1", "2", "3"]
        .iter()
        .map(|s| Some((*s).to_owned()))
        .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn flush_before_sync_delivers_results() {
    let ctx = Context::start().await;
    for addr in [ctx.proxy.addr, direct_addr(&ctx)] {
        let mut raw = Raw::startup(addr, USER, DB).await;
        let script = [
            parse("", "SELECT 'flushed'::text"),
            bind("", "", &[]),
            describe_portal(""),
            execute("", 0),
            flush(),
        ]
        .concat();
        raw.send(&script).await;
        // Everything up to CommandComplete must arrive without a Sync.
        let mut msgs = Vec::new();
        for _ in 0..5 {
            msgs.push(raw.recv().await.expect("message before Sync"));
        }
        assert_eq!(tags(&msgs), "12TDC", "{addr}: {msgs:?}");
        assert_eq!(first_value(&msgs[3]).as_deref(), Some("flushed"));
        // No ReadyForQuery until the Sync.
        assert_eq!(
            raw.recv_within(Duration::from_millis(200)).await,
            Err(()),
            "{addr}: nothing more before Sync"
        );
        raw.send(&sync()).await;
        let msgs = raw.until(b'Z').await;
        assert_eq!(tags(&msgs), "Z", "{addr}");
        assert_eq!(msgs[0].body, b"I");
    }
}

#[tokio::test]
async fn error_inside_a_pipeline_skips_to_sync() {
    let ctx = Context::start().await;

    // One Sync: the batch after the failing one is skipped; the next request works.
    // `1/0` fails already in Bind (the planner folds constants), so there is no
    // BindComplete for it.
    let script = [
        parse("", "SELECT 1"),
        bind("", "", &[]),
        execute("", 0),
        parse("", "SELECT 1/0"),
        bind("", "", &[]),
        execute("", 0),
        parse("", "SELECT 3"),
        bind("", "", &[]),
        execute("", 0),
        sync(),
        query("SELECT 4"),
    ]
    .concat();
    let msgs = same_as_direct(&ctx, &script, 2).await;
    assert_eq!(tags(&msgs), "12DC1EZTDCZ");
    let err = msgs.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(err.code().as_deref(), Some("22012"));
    assert_eq!(err.severity().as_deref(), Some("ERROR"));
    assert_eq!(
        values(&msgs),
        vec![Some("1".to_owned()), Some("4".to_owned())]
    );

    // A Sync per batch: each Sync gets its own ReadyForQuery, and the batches after a
    // failing one run normally. `floor(random())` is always 0 but is not folded, so
    // that division fails in Execute, after BindComplete.
    let batch = |sql: &str| [parse("", sql), bind("", "", &[]), execute("", 0), sync()].concat();
    let script = [
        batch("SELECT 1"),
        batch("SELECT 1/0"),
        batch("SELECT 1/floor(random())::int"),
        batch("SELECT 3"),
    ]
    .concat();
    let msgs = same_as_direct(&ctx, &script, 4).await;
    assert_eq!(tags(&msgs), "12DCZ1EZ12EZ12DCZ");
    let codes: Vec<_> = msgs.iter().filter_map(Msg::code).collect();
    assert_eq!(codes, vec!["22012", "22012"]);
    assert_eq!(
        values(&msgs),
        vec![Some("1".to_owned()), Some("3".to_owned())]
    );
}

#[tokio::test]
async fn function_call_passes_through() {
    let ctx = Context::start().await;
    for addr in [ctx.proxy.addr, direct_addr(&ctx)] {
        let mut raw = Raw::startup(addr, USER, DB).await;
        raw.send(&query("SELECT 'int4pl'::regproc::oid")).await;
        let msgs = raw.until(b'Z').await;
        assert_eq!(tags(&msgs), "TDCZ");
        let oid: i32 = first_value(&msgs[1])
            .expect("oid")
            .parse()
            .expect("numeric oid");

        raw.send(&function_call(oid, &[2, 40])).await;
        let msgs = raw.until(b'Z').await;
        assert_eq!(tags(&msgs), "VZ", "{addr}: {msgs:?}");
        // FunctionCallResponse: length of the result, then the binary int4.
        let mut want = 4i32.to_be_bytes().to_vec();
        want.extend_from_slice(&42i32.to_be_bytes());
        assert_eq!(msgs[0].body, want, "{addr}");
    }
}

#[tokio::test]
async fn multi_statement_query_stops_at_the_error() {
    let ctx = Context::start().await;
    let script = query("SELECT 1; SELECT 1/0; SELECT 3");
    let msgs = same_as_direct(&ctx, &script, 1).await;
    assert_eq!(tags(&msgs), "TDCEZ");
    let err = &msgs[3];
    assert_eq!(err.code().as_deref(), Some("22012"));
    assert_eq!(values(&msgs), vec![Some("1".to_owned())]);
    // The implicit transaction was rolled back: the session is idle, not failed.
    assert_eq!(msgs[4].body, b"I");
}

#[tokio::test]
async fn portal_suspension_and_resume() {
    let ctx = Context::start().await;
    for addr in [ctx.proxy.addr, direct_addr(&ctx)] {
        let mut raw = Raw::startup(addr, USER, DB).await;
        // Flush, not Sync: a Sync would end the implicit transaction and with it the
        // unnamed portal.
        let script = [
            parse("", "SELECT generate_series(1, 5)"),
            bind("", "", &[]),
            execute("", 2),
            flush(),
        ]
        .concat();
        raw.send(&script).await;
        let msgs = raw.until(b's').await;
        assert_eq!(tags(&msgs), "12DDs", "{addr}");
        raw.send(&[execute("", 2), flush()].concat()).await;
        let msgs2 = raw.until(b's').await;
        assert_eq!(tags(&msgs2), "DDs", "{addr}");
        raw.send(&[execute("", 0), sync()].concat()).await;
        let msgs3 = raw.until(b'Z').await;
        assert_eq!(tags(&msgs3), "DCZ", "{addr}");
        let all: Vec<Msg> = [msgs, msgs2, msgs3].concat();
        let want: Vec<Option<String>> = (1..=5).map(|i| Some(i.to_string())).collect();
        assert_eq!(values(&all), want, "{addr}");
        let complete = all.iter().find(|m| m.tag == b'C').expect("CommandComplete");
        assert_eq!(
            complete.body, b"SELECT 1\0",
            "{addr}: rows in the last Execute"
        );
    }
}

#[tokio::test]
async fn notice_response_is_relayed() {
    let ctx = Context::start().await;
    let script = query("DO $$ BEGIN RAISE NOTICE 'hi'; END $$");
    let msgs = same_as_direct(&ctx, &script, 1).await;
    assert_eq!(tags(&msgs), "NCZ");
    assert_eq!(msgs[0].message().as_deref(), Some("hi"));
    assert_eq!(msgs[0].severity().as_deref(), Some("NOTICE"));
    assert_eq!(msgs[0].code().as_deref(), Some("00000"));
}

#[tokio::test]
async fn sixty_megabyte_value_is_streamed_intact() {
    const LEN: usize = 60_000_000;
    let ctx = Context::start().await;
    let bystander = ctx.proxy_client().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    // What spillway holds before the row (its caches' fixed parts, such as the 8 MiB
    // of row stripes a default cache allocates at start).
    let (before, _) = ctx.proxy.memory();
    raw.send(&query(&format!("SELECT repeat('x', {LEN})")))
        .await;

    let big = tokio::spawn(async move { raw.until(b'Z').await });
    // While the large row is in flight, another session is served normally.
    loop {
        let row = bystander
            .query_one("SELECT 1::int4", &[])
            .await
            .expect("bystander during the large result");
        assert_eq!(row.get::<_, i32>(0), 1);
        if big.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let msgs = big.await.expect("reader task");
    assert_eq!(tags(&msgs), "TDCZ");
    let row = &msgs[1];
    // DataRow: i16 column count, i32 value length, value.
    assert_eq!(row.body.len(), 2 + 4 + LEN);
    assert_eq!(&row.body[..2], &1i16.to_be_bytes());
    assert_eq!(&row.body[2..6], &(LEN as i32).to_be_bytes());
    assert!(row.body[6..].iter().all(|b| *b == b'x'), "value corrupted");
    assert_eq!(msgs[2].body, b"SELECT 1\0");

    // Streamed, not buffered whole: spillway's peak memory grows well below the size
    // of the one message.
    let (_, peak) = ctx.proxy.memory();
    assert!(
        peak.saturating_sub(before) < (LEN as u64) / 2,
        "spillway peak RSS {peak} bytes ({before} before the query) suggests the \
         {LEN}-byte row was buffered"
    );
    bystander
        .simple_query("SELECT 1")
        .await
        .expect("bystander after the large result");
}

#[tokio::test]
async fn startup_query_and_terminate_in_one_write() {
    // A client that pipelines its first query and Terminate behind the startup packet
    // (trust auth needs no answer) gets its result, and the session ends cleanly.
    let ctx = Context::start().await;
    let mut raw = Raw::connect(ctx.proxy.addr).await;
    let mut bytes = startup_packet(USER, DB);
    bytes.extend_from_slice(&query("SELECT 41 + 1"));
    bytes.extend_from_slice(&terminate());
    raw.send(&bytes).await;
    let msgs = raw.until_eof().await;
    let after_startup: String = tags(&msgs).chars().skip_while(|c| *c != 'Z').collect();
    assert_eq!(after_startup, "ZTDCZ", "{msgs:?}");
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a data row");
    assert!(row.body.ends_with(b"42"), "{row:?}");
    assert!(
        !ctx.proxy.logs().contains("session ended with an error"),
        "{}",
        ctx.proxy.logs()
    );
}

#[tokio::test]
async fn huge_error_message_is_streamed_not_buffered() {
    // A client can make PostgreSQL raise an error of any size; spillway must stream it
    // like a large row instead of holding it (and copies of it) in memory.
    let ctx = Context::start().await;
    let client = ctx.proxy_client().await;
    let (_, before) = ctx.proxy.memory();
    let err = client
        .batch_execute("DO $$ BEGIN RAISE EXCEPTION '%', repeat('x', 40000000); END $$")
        .await
        .expect_err("the DO block raises");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "P0001");
    assert_eq!(db.message().len(), 40_000_000);
    let (_, peak) = ctx.proxy.memory();
    println!(
        "40 MB ErrorResponse: proxy peak RSS {:.1} MiB (before {:.1} MiB)",
        peak as f64 / 1048576.0,
        before as f64 / 1048576.0
    );
    assert!(
        peak < before + 24 * 1024 * 1024,
        "peak RSS {peak} grew by more than 24 MiB from {before}"
    );
    // The session is still usable.
    let row = client
        .query_one("SELECT 7::int4", &[])
        .await
        .expect("after");
    assert_eq!(row.get::<_, i32>(0), 7);
}
