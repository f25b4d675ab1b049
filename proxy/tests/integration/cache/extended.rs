//! The extended protocol answered from memory, on a raw connection (SPEC §5 "Value"):
//! a hit replays exactly the messages PostgreSQL sent, with the right transaction
//! status, and errors are relayed every time, never cached.

use crate::context::{Context, DB, USER};
use crate::wire::{self, Msg, Raw, tags};

use super::{ALL, EXTERNAL, Via, answer, cached, cycle, direct_addr, start, wait_for_cached};

fn status(msgs: &[Msg]) -> u8 {
    let z = msgs.last().expect("an answer");
    assert_eq!(z.tag, b'Z', "{msgs:?}");
    z.body[0]
}

#[tokio::test]
async fn an_extended_hit_replays_postgres_answer() {
    let (ctx, direct) = start(Context::builder(), "").await;
    let mut proxy = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut pg = Raw::startup(direct_addr(&ctx), USER, DB).await;
    let sql = "SELECT id, v, n FROM t WHERE id <= 2 ORDER BY id";

    // A miss relays PostgreSQL's answer verbatim.
    let first = answer(&mut proxy, &cycle(sql)).await;
    assert_eq!(tags(&first), "12TDDCZ", "{first:?}");
    assert_eq!(first, answer(&mut pg, &cycle(sql)).await);

    let hit = wait_for_cached(
        async || answer(&mut proxy, &cycle(sql)).await,
        async || answer(&mut pg, &cycle(sql)).await,
        &direct,
        "UPDATE t SET n = n + 1 WHERE id = 1",
    )
    .await;
    // Everything but the (now stale) DataRows is what PostgreSQL sends for it now.
    let now = answer(&mut pg, &cycle(sql)).await;
    assert_eq!(tags(&hit), tags(&now), "hit {hit:?}\npostgres {now:?}");
    for (i, (h, p)) in hit.iter().zip(&now).enumerate() {
        if h.tag != b'D' {
            assert_eq!(h, p, "message {i} of a hit differs from PostgreSQL's");
        }
    }
    assert_eq!(status(&hit), b'I');
    for i in 0..3 {
        let again = answer(&mut proxy, &cycle(sql)).await;
        assert_eq!(again, hit, "hit {i} is not byte-identical to the first hit");
    }

    // Inside a transaction block: same messages, status 'T' (hit or not).
    for raw in [&mut proxy, &mut pg] {
        assert_eq!(status(&answer(raw, &wire::query("BEGIN")).await), b'T');
    }
    for i in 0..3 {
        let got = answer(&mut proxy, &cycle(sql)).await;
        let want = answer(&mut pg, &cycle(sql)).await;
        assert_eq!(tags(&got), tags(&want), "in BEGIN, cycle {i}: {got:?}");
        assert_eq!(status(&got), b'T', "in BEGIN, cycle {i}: {got:?}");
    }
    for raw in [&mut proxy, &mut pg] {
        assert_eq!(status(&answer(raw, &wire::query("COMMIT")).await), b'I');
    }
    let after = answer(&mut proxy, &cycle(sql)).await;
    assert_eq!(status(&after), b'I', "{after:?}");
}

#[tokio::test]
async fn errors_are_relayed_every_time_and_never_cached() {
    let (ctx, direct) = start(Context::builder(), "").await;
    // Caching is on, so the division statements below are cacheable reads.
    let client = ctx.proxy_client().await;
    cached(&client, &direct, Via::Simple, ALL, EXTERNAL).await;
    let mut proxy = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut pg = Raw::startup(direct_addr(&ctx), USER, DB).await;
    // Planning folds the first (error at Bind); the second fails while executing.
    let failing = ["SELECT 1/0", "SELECT n / (n - n) FROM t WHERE id = 1"];
    for round in 0..3 {
        for sql in failing {
            for script in [cycle(sql), wire::query(sql)] {
                let got = answer(&mut proxy, &script).await;
                let want = answer(&mut pg, &script).await;
                let error = got.iter().find(|m| m.tag == b'E');
                assert_eq!(
                    error.and_then(Msg::code).as_deref(),
                    Some("22012"),
                    "round {round}, {sql}: {got:?}"
                );
                assert_eq!(got, want, "round {round}, {sql}: differs from PostgreSQL");
            }
        }
        let ok = answer(&mut proxy, &cycle("SELECT 1")).await;
        assert_eq!(tags(&ok), "12TDCZ", "the session is usable after errors");
    }
}

/// tokio-postgres's `query_typed`: Parse of the unnamed statement with its parameter
/// types, Bind with binary results, Describe of the *statement*, Execute, Sync.
fn typed_cycle(sql: &str, param: &str) -> Vec<u8> {
    [
        wire::parse_typed("", sql, &[23]),
        wire::bind_formats("", "", &[Some(param)], &[1]),
        wire::describe_statement(""),
        wire::execute("", 0),
        wire::sync(),
    ]
    .concat()
}

#[tokio::test]
async fn a_described_statement_cycle_hits_with_postgres_answer() {
    let (ctx, direct) = start(Context::builder(), "").await;
    let mut proxy = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut pg = Raw::startup(direct_addr(&ctx), USER, DB).await;
    let sql = "SELECT id, v, n FROM t WHERE id <= $1 ORDER BY id";

    let first = answer(&mut proxy, &typed_cycle(sql, "2")).await;
    assert_eq!(tags(&first), "12tTDDCZ", "{first:?}");
    assert_eq!(first, answer(&mut pg, &typed_cycle(sql, "2")).await);

    let hit = wait_for_cached(
        async || answer(&mut proxy, &typed_cycle(sql, "2")).await,
        async || answer(&mut pg, &typed_cycle(sql, "2")).await,
        &direct,
        "UPDATE t SET n = n + 1 WHERE id = 1",
    )
    .await;
    // ParseComplete, BindComplete, ParameterDescription, RowDescription (text
    // formats), the command tag and ReadyForQuery are PostgreSQL's, byte for byte.
    let now = answer(&mut pg, &typed_cycle(sql, "2")).await;
    assert_eq!(tags(&hit), tags(&now), "hit {hit:?}\npostgres {now:?}");
    for (i, (h, p)) in hit.iter().zip(&now).enumerate() {
        if h.tag != b'D' {
            assert_eq!(h, p, "message {i} of a hit differs from PostgreSQL's");
        }
    }
    for i in 0..3 {
        let again = answer(&mut proxy, &typed_cycle(sql, "2")).await;
        assert_eq!(again, hit, "hit {i} is not byte-identical to the first hit");
    }

    // The statement described is not the one the portal runs (parsed again after the
    // Bind): PostgreSQL describes the new one, and so does spillway.
    let other = "SELECT v FROM t WHERE id = $1";
    let reparsed = [
        wire::parse_typed("", sql, &[23]),
        wire::bind_formats("", "", &[Some("2")], &[1]),
        wire::parse_typed("", other, &[23]),
        wire::describe_statement(""),
        wire::execute("", 0),
        wire::sync(),
    ]
    .concat();
    let got = answer(&mut proxy, &reparsed).await;
    let want = answer(&mut pg, &reparsed).await;
    assert_eq!(tags(&got), "121tTDDCZ", "{got:?}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if g.tag != b'D' {
            assert_eq!(g, w, "message {i} differs from PostgreSQL's: {got:?}");
        }
    }
}

/// libpq's and pgbench's prepared cycle: Bind of a named statement, Describe of the
/// portal, Execute, Sync.
fn prepared_cycle(stmt: &str, param: &str) -> Vec<Vec<u8>> {
    vec![
        wire::bind("", stmt, &[Some(param)]),
        wire::describe_portal(""),
        wire::execute("", 0),
        wire::sync(),
    ]
}

/// A cycle that arrives whole is answered from the cache at once (`relay/client.rs`,
/// `Caching::answer_cycle`); one that arrives a message at a time is held message by
/// message and answered at its Sync. Both must give the same bytes, in and out of a
/// transaction block, pipelined, and a miss sent whole must still lead its fill.
#[tokio::test]
async fn a_prepared_cycle_sent_whole_or_message_by_message_gets_one_answer() {
    let (ctx, direct) = start(Context::builder(), "").await;
    let mut proxy = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut pg = Raw::startup(direct_addr(&ctx), USER, DB).await;
    let sql = "SELECT id, v, n FROM t WHERE id <= $1 ORDER BY id";
    let prepare = [wire::parse("s1", sql), wire::sync()].concat();
    for raw in [&mut proxy, &mut pg] {
        assert_eq!(tags(&answer(raw, &prepare).await), "1Z");
    }
    let whole = |param: &str| prepared_cycle("s1", param).concat();

    let hit = wait_for_cached(
        async || answer(&mut proxy, &whole("2")).await,
        async || answer(&mut pg, &whole("2")).await,
        &direct,
        "UPDATE t SET n = n + 1 WHERE id = 1",
    )
    .await;
    assert_eq!(tags(&hit), "2TDDCZ", "{hit:?}");

    // Message by message: the same answer, from the cache.
    for m in prepared_cycle("s1", "2") {
        proxy.send(&m).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.until(b'Z').await, hit, "held message by message");
    assert_eq!(answer(&mut proxy, &whole("2")).await, hit, "whole again");

    // Two cycles in one write.
    proxy.send(&[whole("2"), whole("2")].concat()).await;
    for i in 0..2 {
        assert_eq!(proxy.until(b'Z').await, hit, "pipelined cycle {i}");
    }

    // Inside a transaction block: the same rows, the block's status.
    assert_eq!(
        status(&answer(&mut proxy, &wire::query("BEGIN")).await),
        b'T'
    );
    let in_block = answer(&mut proxy, &whole("2")).await;
    assert_eq!(in_block[..in_block.len() - 1], hit[..hit.len() - 1]);
    assert_eq!(status(&in_block), b'T', "{in_block:?}");
    assert_eq!(
        status(&answer(&mut proxy, &wire::query("COMMIT")).await),
        b'I'
    );

    // A key not cached yet, sent whole: PostgreSQL's answer now, and then cached.
    let fresh = answer(&mut pg, &whole("1")).await;
    assert_eq!(
        answer(&mut proxy, &whole("1")).await,
        fresh,
        "a miss sent whole"
    );
    let filled = wait_for_cached(
        async || answer(&mut proxy, &whole("1")).await,
        async || answer(&mut pg, &whole("1")).await,
        &direct,
        "UPDATE t SET n = n + 1 WHERE id = 1",
    )
    .await;
    assert_eq!(tags(&filled), "2TDCZ", "{filled:?}");

    // A Describe of the statement is not answered from the cache: PostgreSQL's answer.
    let described = [
        wire::bind("", "s1", &[Some("2")]),
        wire::describe_statement("s1"),
        wire::execute("", 0),
        wire::sync(),
    ]
    .concat();
    let got = answer(&mut proxy, &described).await;
    assert_eq!(
        tags(&got),
        tags(&answer(&mut pg, &described).await),
        "{got:?}"
    );
}
