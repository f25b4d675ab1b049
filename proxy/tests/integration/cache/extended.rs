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
