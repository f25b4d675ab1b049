//! PostgreSQL across a faulty network link (issue 18, hardening 5), with the load
//! tests' link emulator (`spillway_loadtest::link`) between spillway and PostgreSQL —
//! sessions, the flush worker, the check and service connections all cross it:
//! - a 200 ms round trip under write-behind load: writes are acknowledged and applied;
//! - the link stalls for 10 s (every byte held, nothing lost): acknowledgements that
//!   need PostgreSQL wait, a flush batch in flight waits, nothing errs that would not
//!   have erred anyway; the load goes on when the link does;
//! - the link is cut at the end of the stall, while a flush batch is in flight (every
//!   connection through it closed at once): the flush worker's outcome is unknown, it
//!   reconnects and reads the ledger, sessions whose answer was lost count as unknown.
//!
//! Afterwards every acknowledged write is applied exactly once, none that was refused,
//! and an unknown one at most once (`write_load::verify`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use spillway_loadtest::link::{self, Clock, Faults, LinkConfig, Stats};

use crate::context::Context;
use crate::write_load::{self, Load, SCHEMA};

const SEED: u64 = 0x11e4;
const RTT: Duration = Duration::from_millis(200);
const STALL: Duration = Duration::from_secs(10);

const BEFORE: usize = 0;
const STALLED: usize = 1;
const AFTER: usize = 2;

/// A link in this process to PostgreSQL's port; its port and its fault switches.
fn start_link(pg_port: u16, faults: &Faults) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind link");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let config = LinkConfig {
        to: std::net::SocketAddr::from(([127, 0, 0, 1], pg_port)),
        rtt: RTT,
        jitter: Duration::ZERO,
        buffer: 1 << 20,
    };
    let faults = faults.clone();
    tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        link::serve_with_faults(
            listener,
            config,
            Clock::start().expect("link clock"),
            Arc::new(Stats::default()),
            faults,
            std::future::pending(),
        )
        .await;
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_slow_link_that_stalls_and_is_cut_mid_flush_nothing_is_lost_or_doubled() {
    let started = Instant::now();
    let faults = Faults::default();
    let ctx = Context::builder()
        .before_proxy(SCHEMA)
        .section(&format!(
            "[flush]\ninterval = \"50ms\"\n{}",
            write_load::tables_toml("max_pending = 1000000")
        ))
        .start_via(|pg_port| start_link(pg_port, &faults))
        .await;
    let load = Load::start(4, SEED, ctx.proxy.addr.port());
    tokio::time::sleep(Duration::from_secs(4)).await;

    faults.stall();
    load.set_phase(STALLED);
    tokio::time::sleep(STALL).await;
    // The cut ends the stall: what the link held is dropped with its connections.
    faults.cut();
    faults.resume();
    load.set_phase(AFTER);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let tally = load.stop().await;
    write_load::flush(&ctx, Duration::from_secs(90)).await;
    let verdict = write_load::verify(&ctx, &tally);
    let logs = ctx.proxy.logs();
    eprintln!(
        "link faults: {RTT:?} link, stalled {STALL:?}, cut; acknowledged before={} \
         stalled={} after={}; unknown={} (by error {:?}), refused={} {:?}, stalls={}; \
         lost={}, duplicated={}, phantom={}, dead_letters={}; flush retries logged={}; \
         elapsed {:?}",
        tally.acked_by_phase[BEFORE],
        tally.acked_by_phase[STALLED],
        tally.acked_by_phase[AFTER],
        tally.unknown(),
        tally.unknown_by_error,
        tally.refused_total(),
        tally.refused,
        tally.stalls,
        verdict.lost,
        verdict.duplicated,
        verdict.phantom,
        verdict.dead_letters.len(),
        logs.matches("flush batch failed").count(),
        started.elapsed(),
    );
    for d in verdict.details.iter().take(20) {
        eprintln!("  {d}");
    }
    assert!(
        logs.contains("flush batch failed") || logs.contains("flush worker cannot connect"),
        "the cut found no flush batch in flight: the test did not test it"
    );
    // Each insert pays a point read across the link; a loaded machine manages fewer.
    assert!(tally.acked_by_phase[BEFORE] >= 5, "{tally:?}");
    assert!(
        tally.acked_by_phase[AFTER] > 0,
        "no write acknowledged after the link came back"
    );
    assert!(tally.anomalies.is_empty(), "{:?}", tally.anomalies);
    assert_eq!(verdict.lost, 0, "lost writes: {:?}", verdict.details);
    assert_eq!(verdict.duplicated, 0, "duplicated: {:?}", verdict.details);
    assert_eq!(verdict.phantom, 0, "phantom: {:?}", verdict.details);
    assert!(
        verdict.dead_letters.is_empty(),
        "{:?}",
        verdict.dead_letters
    );
    // Only what a lost link explains: no refusal other than connection failures.
    for code in tally.refused.keys() {
        assert!(
            code.starts_with("08"),
            "refused with {code}: {:?}",
            tally.refused
        );
    }
}
