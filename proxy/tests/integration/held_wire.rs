//! Held transactions at the wire level (sequences drivers produce in pieces): a Sync
//! alone, a cycle that only prepares and describes, an unnamed statement executed
//! after the transaction moved upstream, and a named statement prepared and executed
//! in one cycle (pgjdbc), which must still wait for the pending writes it may touch;
//! `SPILLWAY FLUSH` sent as one unnamed extended cycle; and a message that waits
//! twice (the barrier, then the replay) while the client's next one arrives.

use crate::context::{DB, USER};
use crate::metrics::{sample, scrape};
use crate::transactions::builder;
use crate::wire::{self, Msg, Raw, tags};
use crate::write_behind::{direct_rows, tag};

fn status(msgs: &[Msg]) -> u8 {
    msgs.last()
        .filter(|m| m.tag == b'Z')
        .and_then(|m| m.body.first().copied())
        .unwrap_or(0)
}

#[tokio::test]
async fn wire_sequences_inside_a_held_transaction() {
    let ctx = builder().start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&wire::query("BEGIN")).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'T'));
    // A Sync alone: the held status, nothing else.
    raw.send(&wire::sync()).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("Z", b'T'));
    // Prepare and describe only: PostgreSQL answers, with the held status. (A
    // function call: the read cannot be answered outside the transaction, ADR 0034.)
    let mut cycle = wire::parse("", "SELECT abs(-42)");
    cycle.extend_from_slice(&wire::describe_statement(""));
    cycle.extend_from_slice(&wire::sync());
    raw.send(&cycle).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("1tTZ", b'T'));
    // Executing it moves the transaction upstream; the replay's simple Query dropped
    // PostgreSQL's unnamed statement, so spillway parses it there again.
    let mut cycle = wire::bind("", "", &[]);
    cycle.extend_from_slice(&wire::execute("", 0));
    cycle.extend_from_slice(&wire::sync());
    raw.send(&cycle).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(
        (tags(&msgs).as_str(), status(&msgs)),
        ("2DCZ", b'T'),
        "{msgs:?}"
    );
    raw.send(&wire::query("COMMIT")).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'I'));
    let text = scrape(ctx.proxy.metrics_addr()).await;
    assert_eq!(
        sample(
            &text,
            "spillway_held_transactions_total",
            "outcome=\"upstream\""
        ),
        1.0
    );
}

#[tokio::test]
async fn a_named_statement_prepared_and_run_in_one_cycle_waits_for_pending_writes() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (80, 1, 'new')",
    )
    .await;
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM tx_orders"), "0");
    // Not deferrable (a predicate beyond the key): it runs upstream, after the
    // pending INSERT it would otherwise miss.
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut cycle = wire::parse(
        "S_1",
        "UPDATE tx_orders SET status = 'seen' WHERE id = 80 AND customer IS NOT NULL",
    );
    cycle.extend_from_slice(&wire::bind("", "S_1", &[]));
    cycle.extend_from_slice(&wire::execute("", 0));
    cycle.extend_from_slice(&wire::sync());
    raw.send(&cycle).await;
    let msgs = raw.until(b'Z').await;
    let complete = msgs.iter().find(|m| m.tag == b'C').map(|m| {
        String::from_utf8_lossy(&m.body)
            .trim_end_matches('\0')
            .to_owned()
    });
    assert_eq!(complete.as_deref(), Some("UPDATE 1"), "{msgs:?}");
    assert_eq!(
        direct_rows(&ctx, "SELECT status FROM tx_orders WHERE id = 80"),
        "seen"
    );
}

#[tokio::test]
async fn spillway_flush_in_one_unnamed_extended_cycle() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (90, 1, 'x')",
    )
    .await;
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM tx_orders"), "0");
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut cycle = wire::parse("", "SPILLWAY FLUSH");
    cycle.extend_from_slice(&wire::bind("", "", &[]));
    cycle.extend_from_slice(&wire::execute("", 0));
    cycle.extend_from_slice(&wire::sync());
    raw.send(&cycle).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!(tags(&msgs), "12CZ", "{msgs:?}");
    assert_eq!(direct_rows(&ctx, "SELECT count(*) FROM tx_orders"), "1");
}

/// A message that waited (here: a read moving a held transaction upstream, behind the
/// barrier on a pending write) and then waits again (the replay) must not be offered
/// again while its new wait runs, even when the client's next bytes are read in the
/// same turn that ended the first wait: offered again, it replaced the replay's wait,
/// the transaction was replayed twice, and the client got 40001 with the replay's
/// answers "missing" (the SQLAlchemy shop, once the named Parse went ahead of its
/// cycle inside held transactions).
#[tokio::test]
async fn a_message_is_not_offered_again_while_it_waits_for_the_replay() {
    let ctx = builder().start().await;
    let proxy = ctx.proxy_client().await;
    tag(
        &proxy,
        "INSERT INTO tx_orders (id, customer, status) VALUES (90, 1, 'new')",
    )
    .await;
    // The flusher cannot apply it while this lock is held: the barrier waits.
    let lock = ctx.direct_client().await;
    lock.batch_execute("BEGIN; LOCK TABLE tx_orders IN SHARE MODE")
        .await
        .expect("lock");
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    raw.send(&wire::query("BEGIN")).await;
    raw.until(b'Z').await;
    raw.send(&wire::query(
        "INSERT INTO tx_orders (id, customer, status) VALUES (91, 1, 'held')",
    ))
    .await;
    let msgs = raw.until(b'Z').await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'T'));
    // The read moves the transaction upstream: first the barrier on tx_orders.
    raw.send(&wire::query("SELECT id FROM tx_orders ORDER BY id"))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The next query arrives while the read waits; it is read when the wait ends.
    raw.send(&wire::query("SELECT 2")).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    lock.batch_execute("COMMIT").await.expect("unlock");
    let msgs = raw.until(b'Z').await;
    assert_eq!(
        (tags(&msgs).as_str(), status(&msgs)),
        ("TDDCZ", b'T'),
        "{:?}",
        msgs.iter().find_map(Msg::message)
    );
    let msgs = raw.until(b'Z').await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("TDCZ", b'T'));
    raw.send(&wire::query("COMMIT")).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'I'));
    assert_eq!(
        direct_rows(
            &ctx,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM tx_orders"
        ),
        "90,91"
    );
}
