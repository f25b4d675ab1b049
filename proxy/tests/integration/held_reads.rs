//! Plain reads inside held transactions (issue 13, part 2; ADR 0034): a read that
//! cannot observe the transaction's held writes is answered outside it, as READ
//! COMMITTED answers it at that moment (after the pending writes it depends on), and
//! the transaction stays held; a read that could observe them (its table written, a
//! table a foreign key action reaches), a locking read, a read calling a function
//! moves it upstream as before. Each checked against PostgreSQL: the rows the client
//! reads, what ends up stored, and the metrics saying which way the read went.

use crate::context::{Context, DB, USER};
use crate::metrics::{sample, scrape};
use crate::wire::{self, Msg, Raw, tags};

const SCHEMA: &str = "\
    CREATE TABLE public.hr_products (id int PRIMARY KEY, price int NOT NULL); \
    CREATE TABLE public.hr_orders (id int PRIMARY KEY, product int NOT NULL); \
    CREATE TABLE public.hr_lines (id int PRIMARY KEY, \
        order_id int NOT NULL REFERENCES public.hr_orders (id), qty int); \
    CREATE TABLE public.hr_groups (id int PRIMARY KEY); \
    CREATE TABLE public.hr_members (id int PRIMARY KEY, \
        group_id int REFERENCES public.hr_groups (id) ON DELETE CASCADE); \
    CREATE TABLE public.hr_plain (id int PRIMARY KEY, v text); \
    CREATE TABLE public.hr_part (id int PRIMARY KEY) PARTITION BY RANGE (id); \
    CREATE TABLE public.hr_part_a PARTITION OF public.hr_part FOR VALUES FROM (0) TO (100); \
    INSERT INTO public.hr_products SELECT g, 10 * g FROM generate_series(1, 5) g; \
    INSERT INTO public.hr_plain VALUES (1, 'one');";

async fn start() -> Context {
    Context::builder()
        .before_proxy(SCHEMA)
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.hr_products\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.hr_orders\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.hr_lines\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.hr_groups\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.hr_part_a\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await
}

fn status(msgs: &[Msg]) -> u8 {
    msgs.last()
        .filter(|m| m.tag == b'Z')
        .and_then(|m| m.body.first().copied())
        .unwrap_or(0)
}

/// The text of each DataRow's first column.
fn values(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let len = i32::from_be_bytes([m.body[2], m.body[3], m.body[4], m.body[5]]);
            match usize::try_from(len) {
                Ok(n) => String::from_utf8_lossy(&m.body[6..6 + n]).into_owned(),
                Err(_) => "NULL".to_owned(),
            }
        })
        .collect()
}

/// Sends `sql` as a simple Query; its answers.
async fn q(raw: &mut Raw, sql: &str) -> Vec<Msg> {
    raw.send(&wire::query(sql)).await;
    raw.until(b'Z').await
}

async fn reads(ctx: &Context, outcome: &str) -> f64 {
    sample(
        &scrape(ctx.proxy.metrics_addr()).await,
        "spillway_held_reads_total",
        &format!("outcome=\"{outcome}\""),
    )
}

async fn held(ctx: &Context, outcome: &str) -> f64 {
    sample(
        &scrape(ctx.proxy.metrics_addr()).await,
        "spillway_held_transactions_total",
        &format!("outcome=\"{outcome}\""),
    )
}

fn direct(ctx: &Context, sql: &str) -> String {
    ctx.psql_direct(sql).trim().to_owned()
}

#[tokio::test]
async fn a_read_of_tables_the_transaction_did_not_write_keeps_it_held() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    assert_eq!(status(&q(&mut raw, "BEGIN").await), b'T');
    let msgs = q(
        &mut raw,
        "INSERT INTO hr_orders (id, product) VALUES (1, 2)",
    )
    .await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'T'));
    // The ORM loads the product (simple protocol), then a plain table.
    let msgs = q(&mut raw, "SELECT price FROM hr_products WHERE id = 2").await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("TDCZ", b'T'));
    assert_eq!(values(&msgs), ["20"]);
    let msgs = q(&mut raw, "SELECT v FROM hr_plain ORDER BY id").await;
    assert_eq!(values(&msgs), ["one"]);
    assert_eq!(status(&msgs), b'T');
    // The same read in the extended protocol, as drivers send it.
    let mut cycle = wire::parse("", "SELECT price FROM hr_products WHERE id = $1");
    cycle.extend(wire::bind("", "", &[Some("3")]));
    cycle.extend(wire::describe_portal(""));
    cycle.extend(wire::execute("", 0));
    cycle.extend(wire::sync());
    raw.send(&cycle).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("12TDCZ", b'T'));
    assert_eq!(values(&msgs), ["30"]);
    let msgs = q(
        &mut raw,
        "INSERT INTO hr_orders (id, product) VALUES (2, 3)",
    )
    .await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'T'));
    let msgs = q(&mut raw, "COMMIT").await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'I'));
    assert_eq!(reads(&ctx, "outside").await, 3.0);
    assert_eq!(held(&ctx, "committed").await, 1.0);
    assert_eq!(held(&ctx, "upstream").await, 0.0);
    // Journaled as one record: not upstream until flushed.
    assert_eq!(direct(&ctx, "SELECT count(*) FROM hr_orders"), "0");
    q(&mut raw, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct(
            &ctx,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM hr_orders"
        ),
        "1,2"
    );
}

/// READ COMMITTED: each read sees what is committed when it starts — another session's
/// deferred write acknowledged before it (the barrier), and a change committed
/// directly between two reads of the same transaction.
#[tokio::test]
async fn a_read_outside_sees_what_is_committed_when_it_starts() {
    let ctx = start().await;
    let other = ctx.proxy_client().await;
    other
        .batch_execute("UPDATE hr_products SET price = 11 WHERE id = 1")
        .await
        .expect("deferred update");
    assert_eq!(
        direct(&ctx, "SELECT price FROM hr_products WHERE id = 1"),
        "10"
    );
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    q(&mut raw, "BEGIN").await;
    q(
        &mut raw,
        "INSERT INTO hr_orders (id, product) VALUES (5, 1)",
    )
    .await;
    let msgs = q(&mut raw, "SELECT price FROM hr_products WHERE id = 1").await;
    assert_eq!(
        values(&msgs),
        ["11"],
        "the acknowledged write, applied first"
    );
    assert_eq!(status(&msgs), b'T');
    ctx.direct_client()
        .await
        .batch_execute("UPDATE hr_products SET price = 12 WHERE id = 1")
        .await
        .expect("direct update");
    let msgs = q(&mut raw, "SELECT price FROM hr_products WHERE id = 1").await;
    assert_eq!(values(&msgs), ["12"], "a new snapshot per statement");
    // The same sequence directly, for PostgreSQL's own answers.
    let d = ctx.direct_client().await;
    d.batch_execute("BEGIN").await.expect("begin");
    d.batch_execute("INSERT INTO hr_orders (id, product) VALUES (6, 1)")
        .await
        .expect("insert");
    let first: i32 = d
        .query_one("SELECT price FROM hr_products WHERE id = 1", &[])
        .await
        .expect("read")
        .get(0);
    ctx.direct_client()
        .await
        .batch_execute("UPDATE hr_products SET price = 13 WHERE id = 1")
        .await
        .expect("direct update");
    let second: i32 = d
        .query_one("SELECT price FROM hr_products WHERE id = 1", &[])
        .await
        .expect("read")
        .get(0);
    d.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!((first, second), (12, 13), "PostgreSQL's READ COMMITTED");
    // Another spillway session's write acknowledged while the transaction is open:
    // committed from every session's view, so the next read sees it.
    other
        .batch_execute("UPDATE hr_products SET price = 15 WHERE id = 1")
        .await
        .expect("deferred update");
    let msgs = q(&mut raw, "SELECT price FROM hr_products WHERE id = 1").await;
    assert_eq!(values(&msgs), ["15"]);
    assert_eq!(status(&msgs), b'T');
    let msgs = q(&mut raw, "COMMIT").await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'I'));
    assert_eq!(held(&ctx, "committed").await, 1.0);
    assert_eq!(reads(&ctx, "outside").await, 3.0);
    q(&mut raw, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct(&ctx, "SELECT price FROM hr_products WHERE id = 1"),
        "15"
    );
    assert_eq!(
        direct(&ctx, "SELECT product FROM hr_orders WHERE id = 5"),
        "1"
    );
}

/// Reads that could see the held writes, lock, or call functions move the transaction
/// upstream as before, each with its reason; the replay makes its writes visible there.
#[tokio::test]
async fn reads_that_may_observe_held_writes_move_the_transaction_upstream() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let cases: [(&str, &str, &str, Vec<&str>); 6] = [
        (
            "INSERT INTO hr_orders (id, product) VALUES (10, 1)",
            "SELECT id FROM hr_orders ORDER BY id",
            "reads_held_writes",
            vec!["10"],
        ),
        (
            "DELETE FROM hr_orders WHERE id = 10",
            "SELECT count(*) FROM hr_products",
            "function",
            vec!["5"],
        ),
        (
            "INSERT INTO hr_orders (id, product) VALUES (11, 1)",
            "SELECT price FROM hr_products WHERE id = 1 FOR UPDATE",
            "locking",
            vec!["10"],
        ),
        (
            // A foreign key links hr_lines to the table written.
            "INSERT INTO hr_orders (id, product) VALUES (12, 1)",
            "SELECT id FROM hr_lines",
            "reads_held_writes",
            vec![],
        ),
        (
            // A partition written, its partitioned parent read.
            "INSERT INTO hr_part_a (id) VALUES (7)",
            "SELECT id FROM hr_part",
            "reads_held_writes",
            vec!["7"],
        ),
        (
            // Its ON DELETE CASCADE may write elsewhere: nothing is read outside.
            "INSERT INTO hr_groups (id) VALUES (1)",
            "SELECT price FROM hr_products WHERE id = 2",
            "side_effects",
            vec!["20"],
        ),
    ];
    for (i, (write, read, reason, rows)) in cases.iter().enumerate() {
        q(&mut raw, "BEGIN").await;
        let msgs = q(&mut raw, write).await;
        assert_eq!(status(&msgs), b'T', "{write}");
        let before = reads(&ctx, reason).await;
        let msgs = q(&mut raw, read).await;
        assert_eq!(
            status(&msgs),
            b'T',
            "{read}: {:?}",
            msgs.iter().find_map(Msg::message)
        );
        assert_eq!(values(&msgs), *rows, "{read}");
        assert_eq!(reads(&ctx, reason).await, before + 1.0, "{read}");
        assert_eq!(held(&ctx, "upstream").await, (i + 1) as f64, "{read}");
        let msgs = q(&mut raw, "COMMIT").await;
        assert_eq!(status(&msgs), b'I');
    }
    assert_eq!(reads(&ctx, "outside").await, 0.0);
    assert_eq!(
        direct(
            &ctx,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM hr_orders"
        ),
        "11,12"
    );
}

/// A held transaction that read outside and then moves upstream: its writes are
/// replayed there and the rest of it runs in PostgreSQL's transaction; an error in a
/// read answered outside fails the held transaction, as PostgreSQL fails its own.
#[tokio::test]
async fn a_transaction_that_read_outside_moves_upstream_or_fails_whole() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    q(&mut raw, "BEGIN").await;
    q(
        &mut raw,
        "INSERT INTO hr_orders (id, product) VALUES (20, 4)",
    )
    .await;
    let msgs = q(&mut raw, "SELECT price FROM hr_products WHERE id = 4").await;
    assert_eq!(values(&msgs), ["40"]);
    let msgs = q(&mut raw, "SELECT id FROM hr_orders").await;
    assert_eq!(
        values(&msgs),
        ["20"],
        "replayed upstream, its write visible"
    );
    assert_eq!(status(&msgs), b'T');
    q(
        &mut raw,
        "INSERT INTO hr_orders (id, product) VALUES (21, 4)",
    )
    .await;
    let msgs = q(&mut raw, "COMMIT").await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'I'));
    assert_eq!(held(&ctx, "upstream").await, 1.0);
    assert_eq!(
        direct(
            &ctx,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM hr_orders"
        ),
        "20,21"
    );

    q(&mut raw, "BEGIN").await;
    q(
        &mut raw,
        "INSERT INTO hr_orders (id, product) VALUES (22, 4)",
    )
    .await;
    let msgs = q(&mut raw, "SELECT price / 0 FROM hr_products WHERE id = 4").await;
    let err = msgs.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(err.code().as_deref(), Some("22012"));
    assert_eq!(status(&msgs), b'E', "the transaction failed with it");
    let msgs = q(
        &mut raw,
        "INSERT INTO hr_orders (id, product) VALUES (23, 4)",
    )
    .await;
    let err = msgs.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(err.code().as_deref(), Some("25P02"));
    let msgs = q(&mut raw, "COMMIT").await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'I'));
    q(&mut raw, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct(
            &ctx,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM hr_orders"
        ),
        "20,21",
        "nothing of the failed transaction"
    );
}

/// The ORM's second load in a read-modify-write transaction (ADR 0038): a point read of
/// a key the transaction did not write, on a table it wrote, is answered outside and
/// the transaction stays held; the key it wrote, or a read of more than one key, still
/// moves it upstream, where the replay shows the held write.
#[tokio::test]
async fn a_point_read_of_a_key_the_transaction_did_not_write_keeps_it_held() {
    let ctx = start().await;
    let mut raw = Raw::startup(ctx.proxy.addr, USER, DB).await;
    q(&mut raw, "BEGIN").await;
    let msgs = q(&mut raw, "SELECT price FROM hr_products WHERE id = 1").await;
    assert_eq!(values(&msgs), ["10"]);
    let msgs = q(&mut raw, "UPDATE hr_products SET price = 11 WHERE id = 1").await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'T'));
    // Another key, extended protocol (as psycopg sends it) and simple.
    let mut cycle = wire::parse(
        "",
        "SELECT price FROM hr_products WHERE hr_products.id = $1",
    );
    cycle.extend(wire::bind("", "", &[Some("2")]));
    cycle.extend(wire::describe_portal(""));
    cycle.extend(wire::execute("", 0));
    cycle.extend(wire::sync());
    raw.send(&cycle).await;
    let msgs = raw.until(b'Z').await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("12TDCZ", b'T'));
    assert_eq!(values(&msgs), ["20"]);
    let msgs = q(&mut raw, "SELECT price FROM hr_products WHERE id = '03'").await;
    assert_eq!(
        (values(&msgs), status(&msgs)),
        (vec!["30".to_owned()], b'T')
    );
    let msgs = q(&mut raw, "UPDATE hr_products SET price = 31 WHERE id = 3").await;
    assert_eq!(status(&msgs), b'T');
    assert_eq!(reads(&ctx, "outside").await, 3.0);
    assert_eq!(reads(&ctx, "reads_held_writes").await, 0.0);
    assert_eq!(held(&ctx, "upstream").await, 0.0);
    let msgs = q(&mut raw, "COMMIT").await;
    assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'I'));
    assert_eq!(held(&ctx, "committed").await, 1.0);
    assert_eq!(
        direct(&ctx, "SELECT price FROM hr_products WHERE id = 1"),
        "10"
    );
    q(&mut raw, "SPILLWAY FLUSH").await;
    assert_eq!(
        direct(
            &ctx,
            "SELECT string_agg(price::text, ',' ORDER BY id) FROM hr_products"
        ),
        "11,20,31,40,50"
    );

    // The key it wrote; the whole table; a table a written table's foreign key
    // reaches: upstream, each seeing the held write there.
    let cases: [(&[&str], &str, Vec<&str>); 3] = [
        (
            &["UPDATE hr_products SET price = 12 WHERE id = 1"],
            "SELECT price FROM hr_products WHERE id = 1",
            vec!["12"],
        ),
        (
            &["UPDATE hr_products SET price = 21 WHERE id = 2"],
            "SELECT price FROM hr_products WHERE price > 20 AND price < 30",
            vec!["21"],
        ),
        (
            &[
                "INSERT INTO hr_orders (id, product) VALUES (30, 1)",
                "INSERT INTO hr_lines (id, order_id, qty) VALUES (1, 30, 2)",
            ],
            "SELECT product FROM hr_orders WHERE id = 31",
            vec![],
        ),
    ];
    for (i, (writes, read, rows)) in cases.iter().enumerate() {
        q(&mut raw, "BEGIN").await;
        for write in *writes {
            assert_eq!(status(&q(&mut raw, write).await), b'T', "{write}");
        }
        let msgs = q(&mut raw, read).await;
        assert_eq!(
            (values(&msgs), status(&msgs)),
            (rows.iter().map(|r| (*r).to_owned()).collect(), b'T'),
            "{read}"
        );
        assert_eq!(
            reads(&ctx, "reads_held_writes").await,
            (i + 1) as f64,
            "{read}"
        );
        assert_eq!(held(&ctx, "upstream").await, (i + 1) as f64, "{read}");
        assert_eq!(status(&q(&mut raw, "COMMIT").await), b'I');
    }
    assert_eq!(
        direct(
            &ctx,
            "SELECT string_agg(price::text, ',' ORDER BY id) FROM hr_products"
        ),
        "12,21,31,40,50"
    );
}
