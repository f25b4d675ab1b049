//! Regressions from the review of the read cache: partitions, SQL-level statement
//! names, transactions opened inside a pipelined extended cycle, extended-protocol
//! COPY FROM STDIN, and the transaction status of a cycle answered from memory.
//!
//! Every test first proves that the cache is in play (a hit observed with an external
//! write, see [`super::wait_for_cached`]), so the freshness checks that follow fail
//! when spillway answers from a stale or wrongly keyed entry.

use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Client;

use super::{
    ALL, BOTH, EXTERNAL, Via, answer, assert_fresh_for, cached, cycle, direct_addr, raw_rows, read,
    start, wait_for_cached,
};
use crate::context::{Context, DB, USER};
use crate::wire::{self, Msg, Raw, tags};

/// How long after a write spillway must keep answering freshly; outlasts a catalog
/// reload.
const WINDOW: Duration = Duration::from_millis(600);

fn status(msgs: &[Msg]) -> u8 {
    let z = msgs.last().expect("an answer");
    assert_eq!(z.tag, b'Z', "{msgs:?}");
    z.body[0]
}

fn no_error(msgs: &[Msg], what: &str) {
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{what}: {msgs:?}");
}

/// Makes both protocols' entries for `sql` stale with `change` (run directly), runs
/// each of `ops` through `writer` (the first in the simple protocol, the second in the
/// extended one), and checks that both sessions then read what PostgreSQL has.
async fn stale_then_write(
    reader: &Client,
    writer: &Client,
    direct: &Client,
    sql: &str,
    change: &str,
    ops: [&str; 2],
) {
    for (op, via) in ops.into_iter().zip(BOTH) {
        for v in BOTH {
            cached(reader, direct, v, sql, change).await;
        }
        match via {
            Via::Simple => writer.batch_execute(op).await.map(|_| ()),
            Via::Extended => writer.execute(op, &[]).await.map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("{op}: {e:?}"));
        let what = format!("`{sql}` after `{op}` ({via:?}) through spillway");
        assert_fresh_for(reader, direct, sql, WINDOW, &what).await;
        assert_fresh_for(writer, direct, sql, Duration::ZERO, &what).await;
    }
}

const PARTITIONS: &str = "CREATE TABLE m (id int, v text) PARTITION BY RANGE (id);
     CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (100);
     CREATE TABLE m2 PARTITION OF m FOR VALUES FROM (100) TO (200);
     INSERT INTO m SELECT g, 'm' || g FROM generate_series(1, 3) g;
     INSERT INTO m SELECT g, 'm' || g FROM generate_series(101, 103) g;";

/// Guards: a read of a partitioned table depends on its partitions, and a write to a
/// partition (by name) or through the parent bumps both. Before the fix a read of `m`
/// depended on `m` alone, so an UPDATE of `m2` left it stale; and an UPDATE through
/// `m` bumped only `m`, so a cached read of `m1` kept its old rows.
#[tokio::test]
async fn writes_to_a_partition_invalidate_reads_of_the_parent() {
    let (ctx, direct) = start(Context::builder(), PARTITIONS).await;
    let reader = ctx.proxy_client().await;
    let writer = ctx.proxy_client().await;
    let bump_m1 = "UPDATE m1 SET v = v || '+'";

    // A partition written by name: the parent's reads are dropped.
    stale_then_write(
        &reader,
        &writer,
        &direct,
        "SELECT id, v FROM m ORDER BY id",
        bump_m1,
        [
            "UPDATE m2 SET v = 'by name' WHERE id = 101",
            "INSERT INTO m2 VALUES (150, 'inserted by name')",
        ],
    )
    .await;

    // The parent written: the partition's reads are dropped.
    stale_then_write(
        &reader,
        &writer,
        &direct,
        "SELECT id, v FROM m1 ORDER BY id",
        bump_m1,
        [
            "UPDATE m SET v = 'via parent' WHERE id = 1",
            "DELETE FROM m WHERE id = 2",
        ],
    )
    .await;
}

/// Guards: SQL `DEALLOCATE`/`PREPARE`/`DISCARD ALL` share the protocol's statement
/// namespace. Before the fix spillway still mapped `s1` to the statement it had seen
/// parsed, so a Bind of the redefined `s1` was answered from the cache entry of the
/// old text (column `v`) instead of running the new statement (column `n`).
#[tokio::test]
async fn sql_deallocate_and_prepare_keep_statement_names_true() {
    let (ctx, direct) = start(Context::builder(), "").await;
    // Bind of `s1` to the unnamed portal, Describe, Execute: what a hit answers.
    let run = [
        wire::bind("", "s1", &[]),
        wire::describe_portal(""),
        wire::execute("", 0),
        wire::sync(),
    ]
    .concat();
    let rounds: [(&str, &[&str]); 4] = [
        (
            "SELECT v FROM t WHERE id = 1",
            &["DEALLOCATE s1; PREPARE s1 AS SELECT n FROM t WHERE id = 1"],
        ),
        (
            "SELECT v FROM t WHERE id = 2",
            &[
                "DEALLOCATE PREPARE s1",
                "PREPARE s1 AS SELECT n FROM t WHERE id = 2",
            ],
        ),
        (
            "SELECT v FROM t WHERE id = 3",
            &["DEALLOCATE ALL; PREPARE s1 AS SELECT n FROM t WHERE id = 3"],
        ),
        (
            "SELECT v FROM t WHERE id = 4",
            // DISCARD ALL cannot run in the implicit block of a multi-statement query.
            &["DISCARD ALL", "PREPARE s1 AS SELECT n FROM t WHERE id = 4"],
        ),
    ];
    for (round, (parsed, redefine)) in rounds.into_iter().enumerate() {
        let mut proxy = Raw::startup(ctx.proxy.addr, USER, DB).await;
        let mut pg = Raw::startup(direct_addr(&ctx), USER, DB).await;
        let prepare = [wire::parse("s1", parsed), wire::sync()].concat();
        for raw in [&mut proxy, &mut pg] {
            let got = answer(raw, &prepare).await;
            assert_eq!(tags(&got), "1Z", "round {round}: Parse s1: {got:?}");
        }
        let first = answer(&mut proxy, &run).await;
        assert_eq!(tags(&first), "2TDCZ", "round {round}: {first:?}");
        assert_eq!(first, answer(&mut pg, &run).await, "round {round}");

        // `s1` as parsed is answered from the cache.
        wait_for_cached(
            async || answer(&mut proxy, &run).await,
            async || answer(&mut pg, &run).await,
            &direct,
            "UPDATE t SET v = v || '+'",
        )
        .await;

        for sql in redefine {
            let script = wire::query(sql);
            let got = answer(&mut proxy, &script).await;
            no_error(&got, &format!("round {round}: {sql}"));
            assert_eq!(got, answer(&mut pg, &script).await, "round {round}: {sql}");
        }
        for i in 0..2 {
            let got = answer(&mut proxy, &run).await;
            let want = answer(&mut pg, &run).await;
            no_error(&want, &format!("round {round}: PostgreSQL runs the new s1"));
            assert_eq!(
                got, want,
                "round {round}, run {i}: after {redefine:?} spillway answered s1 as \
                 `{parsed}` (a stale statement name)"
            );
        }
        // Nothing the new `s1` returned was stored under the old text.
        let old = raw_rows(&mut proxy, parsed).await;
        assert_eq!(old[0], vec![Some("v".to_owned())], "round {round}: {old:?}");
        assert!(
            old[1][0].as_deref().is_some_and(|v| v.starts_with('v')),
            "round {round}: `{parsed}` returned another statement's rows: {old:?}"
        );
    }
}

/// Guards: a write whose cycle starts a transaction block is the transaction's own,
/// not an autocommit write. Before the fix BEGIN and UPDATE pipelined in one cycle
/// were judged "certain" (autocommit, alone) when the UPDATE was forwarded, so the
/// session did not count as having written in its transaction: its next read inside
/// the block was answered from an entry another session had filled meanwhile with the
/// committed row, instead of showing its own uncommitted write. Afterwards nothing the
/// transaction saw may survive its ROLLBACK in the cache.
#[tokio::test]
async fn begin_and_update_pipelined_in_one_extended_cycle_see_own_write() {
    let (ctx, direct) = start(Context::builder(), "").await;
    let sql = "SELECT v FROM t WHERE id = 1";
    let other = ctx.proxy_client().await;
    let mut warm = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut pg = Raw::startup(direct_addr(&ctx), USER, DB).await;
    let change = "UPDATE t SET v = v || '+' WHERE id = 1";
    // Hits for this read in every form used below: tokio-postgres in both protocols
    // and the raw text cycle the transaction runs.
    for via in BOTH {
        cached(&other, &direct, via, sql, change).await;
    }
    wait_for_cached(
        async || raw_rows(&mut warm, sql).await,
        async || raw_rows(&mut pg, sql).await,
        &direct,
        change,
    )
    .await;

    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let pipelined = [
        wire::parse("", "BEGIN"),
        wire::bind("", "", &[]),
        wire::execute("", 0),
        wire::parse("", "UPDATE t SET v = 'mine' WHERE id = 1"),
        wire::bind("", "", &[]),
        wire::execute("", 0),
        wire::sync(),
    ]
    .concat();
    let got = answer(&mut raw, &pipelined).await;
    no_error(&got, "BEGIN and UPDATE in one cycle");
    assert_eq!(tags(&got), "12C12CZ", "{got:?}");
    assert_eq!(status(&got), b'T', "{got:?}");

    // While the transaction is open, other sessions read (and fill) the committed row.
    for i in 0..2 {
        for via in BOTH {
            assert_eq!(
                read(&other, via, sql).await,
                read(&direct, via, sql).await,
                "read {i} ({via:?}) by another session while the transaction is open"
            );
        }
        assert_eq!(
            raw_rows(&mut warm, sql).await,
            raw_rows(&mut pg, sql).await,
            "read {i} (raw cycle) by another session while the transaction is open"
        );
    }
    for i in 0..3 {
        let own = raw_rows(&mut raw, sql).await;
        assert_eq!(
            own,
            vec![vec![Some("v".to_owned())], vec![Some("mine".to_owned())]],
            "read {i} in the transaction does not see its own uncommitted write"
        );
    }
    let end = answer(&mut raw, &wire::query("ROLLBACK")).await;
    no_error(&end, "ROLLBACK");
    assert_eq!(status(&end), b'I', "{end:?}");

    let committed = raw_rows(&mut pg, sql).await;
    assert_ne!(committed[1][0].as_deref(), Some("mine"), "{committed:?}");
    for i in 0..2 {
        for via in BOTH {
            assert_eq!(
                read(&other, via, sql).await,
                read(&direct, via, sql).await,
                "read {i} ({via:?}) after the ROLLBACK: not PostgreSQL's committed state"
            );
        }
        for (who, session) in [("another session", &mut warm), ("the session", &mut raw)] {
            assert_eq!(
                raw_rows(session, sql).await,
                committed,
                "read {i} by {who} after the ROLLBACK (raw cycle): the rolled-back \
                 write was cached"
            );
        }
    }
}

/// Guards: an extended-protocol COPY FROM STDIN (Bind/Execute/Sync, then
/// CopyData/CopyDone/Sync, PostgreSQL ignoring the first Sync) keeps the session in
/// step. Before the fix spillway expected a ReadyForQuery for the ignored Sync, lost
/// track of the session and never cached for it again.
#[tokio::test]
async fn extended_copy_in_keeps_caching_working() {
    let (ctx, direct) = start(Context::builder(), "").await;
    let proxy = ctx.proxy_client().await;
    for via in BOTH {
        cached(&proxy, &direct, via, ALL, EXTERNAL).await;
    }
    for round in 0..2 {
        let sink = proxy
            .copy_in("COPY t (id, v, n) FROM STDIN")
            .await
            .expect("COPY FROM through spillway");
        futures_util::pin_mut!(sink);
        for k in 0..2 {
            let id = -(round * 2 + k + 1);
            sink.send(Bytes::from(format!("{id}\tcopied {id}\t0\n")))
                .await
                .expect("copy data");
        }
        assert_eq!(sink.finish().await.expect("copy done"), 2);

        // The COPY invalidated, and the session still answers like PostgreSQL.
        assert_fresh_for(
            &proxy,
            &direct,
            ALL,
            Duration::ZERO,
            &format!("round {round}: the copying session after COPY FROM STDIN"),
        )
        .await;
        // The same session still gets hits.
        for via in BOTH {
            cached(&proxy, &direct, via, ALL, EXTERNAL).await;
        }
    }

    proxy
        .batch_execute("SET search_path = public")
        .await
        .expect("SET search_path");
    for via in BOTH {
        for i in 0..2 {
            assert_eq!(
                read(&proxy, via, ALL).await,
                read(&direct, via, ALL).await,
                "read {i} ({via:?}) after SET search_path"
            );
        }
        cached(&proxy, &direct, via, ALL, EXTERNAL).await;
    }
}

fn without_ready(msgs: &[Msg]) -> &[Msg] {
    &msgs[..msgs.len() - 1]
}

/// Guards: an answer served from memory ends with the session's current transaction
/// status. A hit that replayed the status stored with (or assumed for) the cached
/// answer, 'I', inside a transaction block would make the client believe its
/// transaction had ended; a hit served in a failed block would hide 25P02.
#[tokio::test]
async fn a_cached_cycle_inside_a_transaction_reports_status_t() {
    let (ctx, direct) = start(Context::builder(), "").await;
    let mut proxy = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut pg = Raw::startup(direct_addr(&ctx), USER, DB).await;
    let sql = "SELECT id, v, n FROM t WHERE id <= 2 ORDER BY id";
    // The extended cycle, and the same read as a simple Query.
    let scripts = [(cycle(sql), "12TDDCZ"), (wire::query(sql), "TDDCZ")];

    let mut hits = Vec::new();
    for (script, shape) in &scripts {
        let hit = wait_for_cached(
            async || answer(&mut proxy, script).await,
            async || answer(&mut pg, script).await,
            &direct,
            "UPDATE t SET n = n + 1 WHERE id = 1",
        )
        .await;
        assert_eq!(tags(&hit), *shape, "{hit:?}");
        assert_eq!(status(&hit), b'I');
        hits.push(hit);
    }

    for raw in [&mut proxy, &mut pg] {
        assert_eq!(status(&answer(raw, &wire::query("BEGIN")).await), b'T');
    }
    for i in 0..3 {
        for ((script, shape), hit) in scripts.iter().zip(&hits) {
            let got = answer(&mut proxy, script).await;
            let want = answer(&mut pg, script).await;
            assert_eq!(tags(&got), tags(&want), "in BEGIN, {shape} {i}: {got:?}");
            assert_eq!(status(&got), b'T', "in BEGIN, {shape} {i}: {got:?}");
            assert_eq!(
                without_ready(&got),
                without_ready(hit),
                "in BEGIN, {shape} {i}: not answered from the cache (the scenario is broken)"
            );
        }
    }
    for raw in [&mut proxy, &mut pg] {
        assert_eq!(status(&answer(raw, &wire::query("COMMIT")).await), b'I');
    }
    for (script, shape) in &scripts {
        let after = answer(&mut proxy, script).await;
        assert_eq!(status(&after), b'I', "{shape} after COMMIT: {after:?}");
    }

    // BEGIN pipelined with the read in one write: the read still reports 'T'.
    for (script, shape) in &scripts {
        let pipelined = [wire::query("BEGIN"), script.clone()].concat();
        for (who, raw) in [("spillway", &mut proxy), ("PostgreSQL", &mut pg)] {
            raw.send(&pipelined).await;
            let begin = raw.until(b'Z').await;
            assert_eq!(status(&begin), b'T', "{who}: BEGIN: {begin:?}");
            let got = raw.until(b'Z').await;
            no_error(&got, who);
            assert_eq!(
                status(&got),
                b'T',
                "{who}: {shape} pipelined after BEGIN: {got:?}"
            );
            assert_eq!(status(&answer(raw, &wire::query("COMMIT")).await), b'I');
        }
    }

    // In a failed transaction block the read is refused like PostgreSQL does, with
    // status 'E', never answered from the cache.
    for raw in [&mut proxy, &mut pg] {
        assert_eq!(status(&answer(raw, &wire::query("BEGIN")).await), b'T');
        let failed = answer(raw, &wire::query("SELECT 1/0")).await;
        assert_eq!(status(&failed), b'E', "{failed:?}");
    }
    for (script, shape) in &scripts {
        let got = answer(&mut proxy, script).await;
        let want = answer(&mut pg, script).await;
        assert_eq!(
            got.iter()
                .find(|m| m.tag == b'E')
                .and_then(Msg::code)
                .as_deref(),
            Some("25P02"),
            "{shape} in a failed transaction: {got:?}"
        );
        assert_eq!(got, want, "{shape} in a failed transaction");
    }
    for raw in [&mut proxy, &mut pg] {
        assert_eq!(status(&answer(raw, &wire::query("ROLLBACK")).await), b'I');
    }
}

/// Shows the session's `extra_float_digits` in every row.
const THIRDS: &str = "SELECT id, n / 3.0::float8 AS third FROM t ORDER BY id";
const SEVENTHS: &str = "SELECT id, n / 7.0::float8 AS seventh FROM t ORDER BY id";

/// Sends `queries` as simple Queries in one write and returns each one's answer.
async fn pipelined(raw: &mut Raw, queries: &[&str]) -> Vec<Vec<Msg>> {
    let script: Vec<u8> = queries.iter().flat_map(|q| wire::query(q)).collect();
    raw.send(&script).await;
    let mut answers = Vec::new();
    for _ in queries {
        answers.push(raw.until(b'Z').await);
    }
    answers
}

/// Guards: a SET sent while an earlier request is still unanswered upstream (drivers
/// send the next query once they have the rows, before the ReadyForQuery) is decided
/// at its own ReadyForQuery. Before the fix spillway could not tell at forwarding time
/// whether it ran in autocommit and stopped caching for the session for good; CI saw
/// it as a flaky `extended_copy_in_keeps_caching_working`. The pipelined SET must also
/// key the session's entries (its results differ from other sessions'), and a SET
/// pipelined inside a transaction that is rolled back must not.
#[tokio::test]
async fn a_set_pipelined_behind_a_request_keeps_caching_and_keying() {
    let (ctx, direct) = start(Context::builder(), "").await;
    let mut proxy = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut pg = Raw::startup(direct_addr(&ctx), USER, DB).await;
    let mut other = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut other_pg = Raw::startup(direct_addr(&ctx), USER, DB).await;
    wait_for_cached(
        async || raw_rows(&mut proxy, THIRDS).await,
        async || raw_rows(&mut pg, THIRDS).await,
        &direct,
        EXTERNAL,
    )
    .await;

    // In one write: the SET reaches spillway before the first query's ReadyForQuery.
    let queries = [ALL, "SET extra_float_digits = 0"];
    for raw in [&mut proxy, &mut pg] {
        for (q, a) in queries.iter().zip(pipelined(raw, &queries).await) {
            no_error(&a, q);
            assert_eq!(status(&a), b'I', "{q}: {a:?}");
        }
    }
    // Still caching, under the new setting: the first read of a text nobody ran yet
    // fills its entry.
    let short = wait_for_cached(
        async || raw_rows(&mut proxy, SEVENTHS).await,
        async || raw_rows(&mut pg, SEVENTHS).await,
        &direct,
        EXTERNAL,
    )
    .await;
    assert!(
        short[1..].iter().all(|r| r[1].as_deref().is_some_and(|f| f
            .chars()
            .filter(char::is_ascii_digit)
            .count()
            <= 16)),
        "extra_float_digits = 0 gives at most 15 significant digits: {short:?}"
    );
    // Another session (default setting) never gets that entry.
    for i in 0..2 {
        assert_eq!(
            raw_rows(&mut other, SEVENTHS).await,
            raw_rows(&mut other_pg, SEVENTHS).await,
            "read {i} by a session without the SET"
        );
    }

    // Pipelined inside a transaction that is rolled back: the setting reverts.
    let queries = ["BEGIN", "SET extra_float_digits = 3", "ROLLBACK"];
    for raw in [&mut proxy, &mut pg] {
        for (q, a) in queries.iter().zip(pipelined(raw, &queries).await) {
            no_error(&a, q);
        }
    }
    for i in 0..3 {
        assert_eq!(
            raw_rows(&mut proxy, THIRDS).await,
            raw_rows(&mut pg, THIRDS).await,
            "read {i} after a SET pipelined into a rolled-back transaction"
        );
    }
}

/// Guards: after an extended-protocol COPY FROM STDIN (whose first Sync PostgreSQL
/// ignores, so that request never gets a ReadyForQuery), a SET pipelined behind a
/// request is still decided at its own ReadyForQuery. Before the fix spillway counted
/// ReadyForQuery messages and, one short after the COPY, applied the SET one request
/// late: the read right after it was answered under the old settings (CI saw stale
/// rows after `SET search_path`).
#[tokio::test]
async fn a_pipelined_set_after_an_extended_copy_takes_effect_at_once() {
    // The reads are of `u`, which the COPY into `t` does not invalidate: their entry
    // under the old settings stays valid, so reading it would show.
    let (ctx, direct) = start(
        Context::builder(),
        "CREATE TABLE u (id int PRIMARY KEY, n int NOT NULL); \
         INSERT INTO u SELECT g, g * 10 FROM generate_series(1, 5) g;",
    )
    .await;
    let thirds_u = "SELECT id, n / 3.0::float8 AS third FROM u ORDER BY id";
    let mut proxy = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let mut pg = Raw::startup(direct_addr(&ctx), USER, DB).await;
    wait_for_cached(
        async || raw_rows(&mut proxy, thirds_u).await,
        async || raw_rows(&mut pg, thirds_u).await,
        &direct,
        "INSERT INTO u SELECT max(id) + 1, 1 FROM u",
    )
    .await;
    // That entry is stale now (spillway cannot see the direct insert): a read under
    // the old settings would return it, one under the new settings misses.

    // Extended COPY FROM STDIN: Parse/Bind/Execute/Sync, then the data, CopyDone and
    // a second Sync (the first one is ignored by PostgreSQL).
    for (raw, id) in [(&mut proxy, -1), (&mut pg, -2)] {
        raw.send(
            &[
                wire::parse("", "COPY t (id, v, n) FROM STDIN"),
                wire::bind("", "", &[]),
                wire::execute("", 0),
                wire::sync(),
            ]
            .concat(),
        )
        .await;
        let started = raw.until(b'G').await;
        assert!(started.iter().all(|m| m.tag != b'E'), "{started:?}");
        raw.send(
            &[
                wire::msg(b'd', format!("{id}\tcopied\t3\n").as_bytes()),
                wire::msg(b'c', b""),
                wire::sync(),
            ]
            .concat(),
        )
        .await;
        let done = raw.until(b'Z').await;
        no_error(&done, "COPY");
    }

    // Pipelined: the SET reaches spillway before the first query's ReadyForQuery.
    let queries = [ALL, "SET extra_float_digits = 0"];
    for raw in [&mut proxy, &mut pg] {
        for (q, a) in queries.iter().zip(pipelined(raw, &queries).await) {
            no_error(&a, q);
        }
    }
    for i in 0..3 {
        assert_eq!(
            raw_rows(&mut proxy, thirds_u).await,
            raw_rows(&mut pg, thirds_u).await,
            "read {i} right after the pipelined SET: answered under the old settings"
        );
    }
}
