//! Write-behind while PostgreSQL cannot take the writes (SPEC §6, issue 4):
//! - PostgreSQL stopped for 30 s under write-behind load, with writes pending and a
//!   flush batch in flight when it goes: once it is back, every acknowledged write is
//!   applied exactly once, none twice, none of the refused ones; the flush worker
//!   recovers on its own and clients write again.
//! - The SPEC's "writes keep being acknowledged during the outage": the load's
//!   sessions, idle between writes when PostgreSQL stops, are detached rather than
//!   ended (`session/handler/detached.rs`) and keep writing through the outage on the
//!   sessions they had (no new session can be opened meanwhile: authentication is
//!   PostgreSQL's). With exact row counts, what the key overlay knows is acknowledged
//!   (the counters, keys with pending writes); a key it would have to read upstream is
//!   refused with a retryable ERROR 08006, counted as unknown by the load.
//! - Back-pressure when the flush worker cannot apply (a lock stalls it):
//!   `max_pending` reached with `when_full = "reject"` refuses with 53000 at once; with
//!   `"block"` a write waits `block_timeout`, then 53000, or goes through as soon as
//!   room appears. Nothing refused is applied, everything acknowledged is.
//! - An UPDATE that waited for room while its row's pending write was applied still
//!   finds the row.
//! - A batch whose COMMIT answer is lost while PostgreSQL is unreachable for a moment
//!   is found in the ledger when the flush worker gets back: applied once, flushing
//!   goes on.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

use crate::context::{Context, connect};
use crate::write_load::{self, Load, SCHEMA, Tally, Verdict};

const SEED: u64 = 0x07a6e;
const OUTAGE: Duration = Duration::from_secs(30);

/// Phases of the load.
const BEFORE: usize = 0;
const DURING: usize = 1;
const AFTER: usize = 2;

/// Runs load, stops PostgreSQL for [`OUTAGE`] while writes are pending and a batch
/// is in flight, starts it again, flushes, and compares.
async fn outage_under_load() -> (Tally, Verdict, Duration) {
    let started = Instant::now();
    let mut ctx = Context::builder()
        .before_proxy(SCHEMA)
        .section(&format!(
            "[flush]\ninterval = \"50ms\"\n{}",
            write_load::tables_toml("max_pending = 1000000")
        ))
        .start()
        .await;
    let load = Load::start(4, SEED, ctx.proxy.addr.port());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Stall the flush worker (its batch waits for this lock inside its transaction), so
    // that when PostgreSQL stops, acknowledged writes are pending and a batch is open.
    let locker = ctx.direct_client().await;
    stall_flusher(&locker).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    tokio::task::block_in_place(|| ctx.pg.stop()).expect("stop PostgreSQL");
    load.set_phase(DURING);
    drop(locker);
    let outage_started = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    tokio::task::block_in_place(|| ctx.pg.start()).expect("start PostgreSQL again");
    let outage = outage_started.elapsed();
    load.set_phase(AFTER);
    // Clients reconnect and write again for a while.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let tally = load.stop().await;
    // The flush worker backs off up to 5 s between attempts: a generous bound.
    write_load::flush(&ctx, Duration::from_secs(60)).await;
    let verdict = write_load::verify(&ctx, &tally);
    eprintln!(
        "outage test: PostgreSQL down {outage:?}; acknowledged before={} during={} after={}; \
         sessions opened before/during/after={:?}, refused during the outage={}; \
         unknown={} (by error {:?}), refused={} {:?}, lost={}, \
         duplicated={}, phantom={}, dead_letters={}, stalls={}, ledger last_seq={}, elapsed={:?}",
        tally.acked_by_phase[BEFORE],
        tally.acked_by_phase[DURING],
        tally.acked_by_phase[AFTER],
        &tally.sessions_by_phase[..3],
        tally.connect_failures_by_phase[DURING],
        tally.unknown(),
        tally.unknown_by_error,
        tally.refused_total(),
        tally.refused,
        verdict.lost,
        verdict.duplicated,
        verdict.phantom,
        verdict.dead_letters.len(),
        tally.stalls,
        verdict.last_seq,
        started.elapsed(),
    );
    for d in verdict.details.iter().take(20) {
        eprintln!("  {d}");
    }
    let logs = ctx.proxy.logs();
    eprintln!(
        "  sessions detached: {}; sessions ended with an error: {}",
        logs.matches("session detached").count(),
        logs.matches("session ended with an error").count()
    );
    for line in logs
        .lines()
        .filter(|l| {
            l.contains("upstream connection ended while the session was busy")
                || l.contains("session ended with an error")
        })
        .take(6)
    {
        eprintln!("  {line}");
    }
    (tally, verdict, outage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_outage_under_write_behind_load_applies_every_acknowledged_write_once() {
    let (tally, verdict, _) = outage_under_load().await;
    assert!(tally.acked_by_phase[BEFORE] > 100, "{tally:?}");
    assert!(
        tally.acked_by_phase[AFTER] > 0,
        "no write acknowledged after PostgreSQL came back"
    );
    assert!(tally.anomalies.is_empty(), "{:?}", tally.anomalies);
    assert_eq!(verdict.lost, 0, "lost writes: {:?}", verdict.details);
    assert_eq!(
        verdict.duplicated, 0,
        "duplicated writes: {:?}",
        verdict.details
    );
    assert_eq!(verdict.phantom, 0, "phantom rows: {:?}", verdict.details);
    assert!(
        verdict.dead_letters.is_empty(),
        "{:?}",
        verdict.dead_letters
    );
    assert!(
        verdict.last_seq >= tally.acked_records
            && verdict.last_seq <= tally.acked_records + tally.unknown(),
        "ledger last_seq {} outside [{}, {}]",
        verdict.last_seq,
        tally.acked_records,
        tally.acked_records + tally.unknown()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_keep_being_acknowledged_while_upstream_is_down() {
    let (tally, verdict, _) = outage_under_load().await;
    assert_eq!(
        verdict.lost + verdict.duplicated + verdict.phantom,
        0,
        "{:?}",
        verdict.details
    );
    assert!(tally.anomalies.is_empty(), "{:?}", tally.anomalies);
    assert!(
        verdict.dead_letters.is_empty(),
        "{:?}",
        verdict.dead_letters
    );
    assert!(
        tally.acked_by_phase[DURING] > 0,
        "no write acknowledged during the outage ({} sessions refused)",
        tally.connect_failures_by_phase[DURING]
    );
    assert!(
        tally.acked_by_phase[AFTER] > 0,
        "no write acknowledged after PostgreSQL came back"
    );
}

/// Counts rows of `load_rows` directly.
fn rows(ctx: &Context) -> i64 {
    ctx.psql_direct("SELECT count(*) FROM load_rows")
        .trim()
        .parse()
        .expect("count")
}

async fn insert(client: &Client, id: i64) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO load_rows (id, worker, v) VALUES ($1, 0, 'bp')",
            &[&id],
        )
        .await
}

/// Awaits `f`, failing the test if it takes over 30 s (a hang, not a slow machine).
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 30 s"))
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

/// A context whose tables have `max_pending = 20` (`load_rows` with `when_full` as
/// given), and a direct session that holds a lock stalling the flush worker.
async fn stalled(when_full: &str) -> (Context, Client) {
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .section(&format!(
            "[flush]\ninterval = \"20ms\"\n\
             [tables.\"public.load_rows\"]\npolicy = \"write-behind\"\nmax_pending = 20\n\
             when_full = \"{when_full}\"\nblock_timeout = \"2s\"\n\
             [tables.\"public.load_counters\"]\npolicy = \"write-behind\"\nmax_pending = 20\n"
        ))
        .start()
        .await;
    let locker = connect(&ctx.direct_config()).await;
    stall_flusher(&locker).await;
    (ctx, locker)
}

/// Locks the flush ledger's row in a transaction of `locker`: the flush worker's next
/// batch waits for it (its ledger advance comes first), while sessions, which never
/// touch the ledger, go on. `COMMIT` on `locker` lets the worker go.
async fn stall_flusher(locker: &Client) {
    locker
        .batch_execute("BEGIN; SELECT 1 FROM spillway.flush_ledger FOR UPDATE")
        .await
        .expect("lock the ledger row");
}

#[tokio::test]
async fn max_pending_reached_with_reject_refuses_with_53000() {
    let (ctx, locker) = stalled("reject").await;
    let client = ctx.proxy_client().await;
    // The simple protocol first: behind tokio-postgres's extended calls comes the
    // Close of the statement they prepared, and a write right behind that is not
    // deferred (see `a_write_pipelined_behind_a_statement_close_is_still_deferred`).
    for id in 1..=20 {
        within(
            "insert",
            client.simple_query(&format!(
                "INSERT INTO load_rows (id, worker, v) VALUES ({id}, 0, 'bp')"
            )),
        )
        .await
        .expect("room left");
    }
    let err = within(
        "simple insert 22",
        client.simple_query("INSERT INTO load_rows (id, worker, v) VALUES (22, 0, 'bp')"),
    )
    .await
    .expect_err("max_pending reached (simple protocol)");
    assert_eq!(sqlstate(&err), Some("53000"), "{err:?}");
    let err = within("insert 21", insert(&client, 21))
        .await
        .expect_err("max_pending reached");
    assert_eq!(sqlstate(&err), Some("53000"), "{err:?}");
    // The bound is per table: the other one still takes writes.
    assert_eq!(
        within(
            "update",
            client.execute("UPDATE load_counters SET n = n + 1 WHERE id = 1", &[])
        )
        .await
        .expect("other table"),
        1
    );
    // The session is still usable, and once the flusher can apply, there is room.
    within("unlock", locker.batch_execute("COMMIT"))
        .await
        .expect("unlock");
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    assert_eq!(
        within("insert 23", insert(&client, 23))
            .await
            .expect("room again"),
        1
    );
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    assert_eq!(rows(&ctx), 21);
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM load_rows WHERE id IN (21, 22)")
            .trim(),
        "0",
        "refused writes were applied"
    );
    assert_eq!(
        ctx.psql_direct("SELECT n FROM load_counters WHERE id = 1")
            .trim(),
        "1"
    );
}

#[tokio::test]
async fn max_pending_reached_with_block_waits_block_timeout_then_53000() {
    let (ctx, locker) = stalled("block").await;
    let client = ctx.proxy_client().await;
    for id in 1..=20 {
        assert_eq!(
            within("insert", insert(&client, id))
                .await
                .expect("room left"),
            1
        );
    }
    let waiting = Instant::now();
    let err = within("insert 21", insert(&client, 21))
        .await
        .expect_err("max_pending reached");
    assert_eq!(sqlstate(&err), Some("53000"), "{err:?}");
    assert!(
        waiting.elapsed() >= Duration::from_secs(2),
        "refused before block_timeout: {:?}",
        waiting.elapsed()
    );
    // A blocked write goes through once room appears within its block_timeout.
    let blocked = tokio::spawn({
        let client = ctx.proxy_client().await;
        async move { insert(&client, 22).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    within("unlock", locker.batch_execute("COMMIT"))
        .await
        .expect("unlock");
    assert_eq!(
        blocked
            .await
            .expect("task")
            .expect("acknowledged once room appeared"),
        1
    );
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    assert_eq!(rows(&ctx), 21);
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM load_rows WHERE id = 21")
            .trim(),
        "0",
        "the refused write was applied"
    );
}

/// An UPDATE of a row whose earlier write is pending waits for room (`block`); while
/// it waits, the flush worker applies that earlier write, so the row's key leaves the
/// pending overlay. The UPDATE must still find the row (PostgreSQL has it now) and be
/// applied, not be answered `UPDATE 0` and dropped.
#[tokio::test]
async fn an_update_that_waited_for_room_still_finds_its_row() {
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .section(
            "[flush]\ninterval = \"20ms\"\n\
             [tables.\"public.load_rows\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.load_counters\"]\npolicy = \"write-behind\"\nmax_pending = 1\n\
             when_full = \"block\"\nblock_timeout = \"20s\"\n",
        )
        .start()
        .await;
    let locker = connect(&ctx.direct_config()).await;
    stall_flusher(&locker).await;
    let client = ctx.proxy_client().await;
    let increment = "UPDATE load_counters SET n = n + 1 WHERE id = 1";
    within("first increment", client.simple_query(increment))
        .await
        .expect("acknowledged");
    // The table is full: the second increment waits for room.
    let waiting = tokio::spawn({
        let client = ctx.proxy_client().await;
        async move { client.simple_query(increment).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    within("unlock", locker.batch_execute("COMMIT"))
        .await
        .expect("unlock");
    let answer = within("second increment", waiting)
        .await
        .expect("task")
        .expect("acknowledged once room appeared");
    let rows = answer.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert_eq!(rows, Some(1), "the row exists: UPDATE 1");
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    assert_eq!(
        ctx.psql_direct("SELECT n FROM load_counters WHERE id = 1")
            .trim(),
        "2"
    );
}

#[tokio::test]
async fn a_write_pipelined_behind_a_statement_close_is_still_deferred() {
    let (ctx, _locker) = stalled("reject").await;
    let client = ctx.proxy_client().await;
    assert_eq!(
        within("insert 1", insert(&client, 1))
            .await
            .expect("acknowledged"),
        1
    );
    // Deferrable and in autocommit: acknowledged from the journal at once, though the
    // flush worker cannot apply anything now.
    within(
        "simple insert right behind a Close",
        client.simple_query("INSERT INTO load_rows (id, worker, v) VALUES (2, 0, 'x')"),
    )
    .await
    .expect("acknowledged");
}

/// A TCP forwarder in front of PostgreSQL that can lose the answer to a COMMIT. Armed,
/// it forwards the next simple-protocol `COMMIT` of the flush worker's connection (the
/// one that mentions `flush_ledger`), relays nothing PostgreSQL answers, closes that
/// connection, and then refuses every new connection for `refuse_for`: PostgreSQL
/// committed, but the flush worker cannot know, nor reconnect at once to ask.
struct LossyLink {
    port: u16,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
}

impl LossyLink {
    fn start(pg_port: u16, refuse_for: Duration) -> LossyLink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind link");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("link address").port();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let refusing_until = Arc::new(Mutex::new(Instant::now()));
        let (a, c) = (armed.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if Instant::now() < *refusing_until.lock().expect("lock") {
                    drop(client);
                    continue;
                }
                let link = Link {
                    pg_port,
                    armed: a.clone(),
                    cuts: c.clone(),
                    refusing_until: refusing_until.clone(),
                    refuse_for,
                };
                tokio::spawn(link.run(client));
            }
        });
        LossyLink { port, armed, cuts }
    }
}

struct Link {
    pg_port: u16,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
    refusing_until: Arc<Mutex<Instant>>,
    refuse_for: Duration,
}

impl Link {
    async fn run(self, client: tokio::net::TcpStream) -> std::io::Result<()> {
        let server = tokio::net::TcpStream::connect(("127.0.0.1", self.pg_port)).await?;
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        let down = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        });
        let mut buf = Vec::new();
        let mut started = false;
        let mut flusher = false;
        loop {
            let mut chunk = [0u8; 8192];
            let n = from_client.read(&mut chunk).await?;
            if n == 0 {
                down.abort();
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            // Whole frames: untagged until the startup message, tagged after it.
            loop {
                let (header, len_at) = if started { (5, 1) } else { (4, 0) };
                if buf.len() < header {
                    break;
                }
                let len = u32::from_be_bytes(buf[len_at..len_at + 4].try_into().expect("4"));
                let total = len_at + len as usize;
                if buf.len() < total {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..total).collect();
                if !started {
                    // Protocol 3.0 startup (not an SSL or GSS request).
                    started = frame.get(4..8) == Some(&[0, 3, 0, 0][..]);
                } else if frame
                    .windows(28)
                    .any(|w| w == b"UPDATE spillway.flush_ledger")
                {
                    flusher = true;
                } else if flusher
                    && frame[0] == b'Q'
                    && frame[5..] == *b"COMMIT\0"
                    && self.armed.swap(false, Ordering::SeqCst)
                {
                    // Unreachable from now on; the flush worker's side closes at once.
                    *self.refusing_until.lock().expect("lock") = Instant::now() + self.refuse_for;
                    self.cuts.fetch_add(1, Ordering::SeqCst);
                    down.abort();
                    to_server.write_all(&frame).await?;
                    // PostgreSQL commits; its answer is never relayed.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return Ok(());
                }
                to_server.write_all(&frame).await?;
            }
        }
    }
}

/// The flush worker loses the answer to a batch's COMMIT (PostgreSQL committed it),
/// and cannot reconnect for a while. Once it can, the ledger must tell it the batch
/// is in: nothing applied twice, nothing refused, and flushing goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_while_upstream_is_unreachable_applies_once() {
    let mut link = None;
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .section(&format!(
            "[flush]\ninterval = \"1h\"\n{}",
            write_load::tables_toml("")
        ))
        .start_via(|pg_port| {
            let l = LossyLink::start(pg_port, Duration::from_millis(1500));
            let port = l.port;
            link = Some(l);
            port
        })
        .await;
    let link = link.expect("link started");
    let client = ctx.proxy_client().await;
    let flusher = ctx.proxy_client().await;
    for id in 1..=10 {
        assert_eq!(insert(&client, id).await.expect("acknowledged"), 1);
    }
    client
        .execute("UPDATE load_counters SET n = n + 1 WHERE id = 1", &[])
        .await
        .expect("acknowledged");
    link.armed.store(true, Ordering::SeqCst);
    let flushed = tokio::time::timeout(
        Duration::from_secs(30),
        flusher.simple_query("SPILLWAY FLUSH"),
    )
    .await
    .expect("SPILLWAY FLUSH returned in time");
    assert_eq!(
        link.cuts.load(Ordering::SeqCst),
        1,
        "the COMMIT answer was lost"
    );
    flushed.expect("SPILLWAY FLUSH after a lost COMMIT answer");
    assert_eq!(rows(&ctx), 10);
    assert_eq!(
        ctx.psql_direct("SELECT n FROM load_counters WHERE id = 1")
            .trim(),
        "1"
    );
    assert_eq!(
        ctx.psql_direct("SELECT last_seq FROM spillway.flush_ledger")
            .trim(),
        "11"
    );
    // And the worker goes on.
    assert_eq!(insert(&client, 11).await.expect("acknowledged"), 1);
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    assert_eq!(rows(&ctx), 11);
    assert_eq!(
        ctx.psql_direct("SELECT count(*) FROM spillway.dead_letters")
            .trim(),
        "0"
    );
}

/// PostgreSQL crashes (an immediate stop: no shutdown checkpoint, like a crash) right
/// after a batch committed, on a server with `synchronous_commit = off` (a common
/// tuning) and a WAL writer slow enough to leave that commit unflushed. The journal
/// has been told the batch is applied, so PostgreSQL must not lose it: the flush
/// worker's commits must be durable whatever the server's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_crash_right_after_a_flush_loses_nothing_with_asynchronous_commit() {
    let mut ctx = Context::builder()
        .pg(|pg| {
            pg.conf("synchronous_commit = off")
                .conf("wal_writer_delay = '10s'")
        })
        .before_proxy(SCHEMA)
        .section(&format!(
            "[flush]\ninterval = \"1h\"\n{}",
            write_load::tables_toml("")
        ))
        .start()
        .await;
    // Whatever startup wrote is on disk before the writes under test.
    ctx.psql_direct("CHECKPOINT");
    let client = ctx.proxy_client().await;
    for id in 1..=10 {
        assert_eq!(insert(&client, id).await.expect("acknowledged"), 1);
    }
    write_load::flush(&ctx, Duration::from_secs(30)).await;
    assert_eq!(rows(&ctx), 10);
    tokio::task::block_in_place(|| ctx.pg.stop()).expect("crash PostgreSQL");
    tokio::task::block_in_place(|| ctx.pg.start()).expect("start PostgreSQL again");
    assert_eq!(
        ctx.psql_direct("SELECT last_seq FROM spillway.flush_ledger")
            .trim(),
        "10",
        "the ledger lost a committed batch"
    );
    assert_eq!(rows(&ctx), 10, "PostgreSQL lost an applied batch");
}
