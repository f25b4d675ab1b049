//! The metrics endpoint (SPEC §7) after a mixed workload through the real binary:
//! `/healthz`, `/readyz`, `/metrics` with every family present, counters equal to what
//! the test produced (cache hits, deferred writes, fallbacks, flushed rows, dead
//! letters, retries), and latency histograms with real buckets.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cache::{ALL, EXTERNAL, SETUP, Via, cached};
use crate::context::Context;

/// `GET path` over HTTP/1.1; (status code, body).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: spillway\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// The value of the sample `name{labels}` (labels as rendered, e.g.
/// `table="public.wb",policy="write-behind"`; empty for none), 0 when absent.
/// Writes to `public.{table}` deferred under write-behind, from a scrape.
pub fn deferred(metrics: &str, table: &str) -> f64 {
    sample(
        metrics,
        "spillway_client_writes_total",
        &format!("table=\"public.{table}\",policy=\"write-behind\""),
    )
}

pub fn sample(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted: Vec<&str> = labels.split(',').filter(|x| !x.is_empty()).collect();
            (n == name && wanted.iter().all(|w| rest.split(',').any(|r| r == *w)))
                .then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

pub async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn metrics_count_what_the_workload_did() {
    let ctx = Context::builder()
        .before_proxy(&format!(
            "{SETUP} CREATE TABLE public.wb (id int PRIMARY KEY, v text); \
             CREATE TABLE public.wb_child (id int PRIMARY KEY, parent int REFERENCES public.wb (id));"
        ))
        .section(
            "[flush]\ninterval = \"1h\"\n\
             [tables.\"public.wb\"]\npolicy = \"write-behind\"\n\
             [tables.\"public.wb_child\"]\npolicy = \"write-behind\"\n",
        )
        .start()
        .await;
    let addr = ctx.proxy.metrics_addr();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    assert_eq!(get(addr, "/nope").await.0, 404);

    let proxy = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;

    // Cache hits: exactly as many as the test makes once the entry is in place.
    cached(&proxy, &direct, Via::Simple, ALL, EXTERNAL).await;
    let before = scrape(addr).await;
    for _ in 0..25 {
        proxy.simple_query(ALL).await.expect("hit");
    }
    let after = scrape(addr).await;
    assert_eq!(
        sample(&after, "spillway_cache_hits_total", "")
            - sample(&before, "spillway_cache_hits_total", ""),
        25.0
    );
    assert!(sample(&after, "spillway_cache_misses_total", "") >= 1.0);
    assert!(sample(&after, "spillway_cache_entries", "") >= 1.0);
    assert!(sample(&after, "spillway_cache_bytes", "") > 0.0);

    // Deferred writes, flushed once (the flusher connects).
    let insert = async |i: i32| {
        proxy
            .simple_query(&format!("INSERT INTO wb (id, v) VALUES ({i}, 'x')"))
            .await
            .expect("deferred insert");
    };
    for i in 1..=5 {
        insert(i).await;
    }
    proxy.simple_query("SPILLWAY FLUSH").await.expect("flush");
    // The flusher's connection dies: the next batch fails once, is retried, applied
    // once.
    ctx.psql_direct(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'spillway flush'",
    );
    for i in 6..=10 {
        insert(i).await;
    }
    proxy
        .simple_query("INSERT INTO wb_child (id, parent) VALUES (1, 999)")
        .await
        .expect("acknowledged, refused at flush");
    let pending = scrape(addr).await;
    assert_eq!(
        sample(
            &pending,
            "spillway_client_writes_total",
            "table=\"public.wb\",policy=\"write-behind\""
        ),
        10.0
    );
    assert_eq!(
        sample(&pending, "spillway_pending_writes", "table=\"public.wb\""),
        5.0
    );
    assert!(
        sample(
            &pending,
            "spillway_pending_oldest_age_seconds",
            "table=\"public.wb\""
        ) > 0.0
    );
    assert!(sample(&pending, "spillway_journal_bytes", "") > 0.0);
    // Not deferrable: runs write-through after a barrier (which flushes).
    proxy
        .simple_query("UPDATE wb SET v = 'y' WHERE v = 'x'")
        .await
        .expect("fallback after a barrier");
    proxy.simple_query("SPILLWAY FLUSH").await.expect("flush");
    let flushed = scrape(addr).await;
    assert_eq!(
        sample(
            &flushed,
            "spillway_fallbacks_total",
            "table=\"public.wb\",reason=\"where_not_primary_key\""
        ),
        1.0
    );
    assert_eq!(sample(&flushed, "spillway_flush_rows_total", ""), 10.0);
    assert!(sample(&flushed, "spillway_flush_batches_total", "") >= 1.0);
    assert_eq!(
        sample(
            &flushed,
            "spillway_dead_letters_total",
            "table=\"public.wb_child\""
        ),
        1.0
    );
    assert_eq!(
        sample(&flushed, "spillway_pending_writes", "table=\"public.wb\""),
        0.0
    );
    assert!(sample(&flushed, "spillway_upstream_statements_total", "") >= 3.0);
    assert!(sample(&flushed, "spillway_client_connections", "") >= 1.0);
    assert!(sample(&flushed, "spillway_journal_fsyncs_total", "") >= 1.0);
    assert_eq!(ctx.psql_direct("SELECT count(*) FROM wb").trim(), "10");

    // Histograms are real buckets, per path.
    for path in ["hit", "miss", "passthrough", "deferred"] {
        assert!(
            flushed.contains(&format!(
                "spillway_query_duration_seconds_bucket{{path=\"{path}\",le=\"0.001\"}}"
            )),
            "no {path} histogram buckets in:\n{flushed}"
        );
    }
    assert!(flushed.contains("spillway_flush_batch_duration_seconds_bucket{le="));

    // Every family is there after this workload (retries only once one happened).
    let families = [
        "spillway_cache_hits_total",
        "spillway_cache_misses_total",
        "spillway_cache_evictions_total",
        "spillway_cache_bytes",
        "spillway_cache_entries",
        "spillway_query_duration_seconds",
        "spillway_client_writes_total",
        "spillway_fallbacks_total",
        "spillway_upstream_statements_total",
        "spillway_pending_writes",
        "spillway_pending_oldest_age_seconds",
        "spillway_flush_batches_total",
        "spillway_flush_rows_total",
        "spillway_flush_batch_duration_seconds",
        "spillway_dead_letters_total",
        "spillway_journal_bytes",
        "spillway_journal_fsyncs_total",
        "spillway_journal_fsync_microseconds_total",
        "spillway_client_connections",
        "spillway_upstream_connections",
    ];
    for f in families {
        assert!(
            flushed.contains(&format!("# TYPE {f} ")),
            "{f} missing:\n{flushed}"
        );
    }
    assert!(
        sample(&flushed, "spillway_flush_retries_total", "") >= 1.0,
        "no retry counted after the flusher's connection was terminated"
    );
}
