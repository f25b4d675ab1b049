//! spillway's metrics: every name is a constant here (`spillway_<subsystem>_<name>_<unit>`
//! with `_total` for counters), labels are bounded (a table name, a path, a fallback
//! reason from a fixed list; never statement text or a role), and the Prometheus
//! endpoint (`http`) serves them with `/healthz` and `/readyz` on `metrics.listen`.
//!
//! Counters and histograms are recorded where things happen through the `metrics`
//! facade; gauges that describe state (cache bytes, pending writes, journal bytes) are
//! set when a scrape arrives, from the owners of that state, so no background task
//! keeps them up to date.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

// Cache.
pub const CACHE_HITS: &str = "spillway_cache_hits_total";
pub const CACHE_MISSES: &str = "spillway_cache_misses_total";
pub const CACHE_EVICTIONS: &str = "spillway_cache_evictions_total";
pub const CACHE_BYTES: &str = "spillway_cache_bytes";
pub const CACHE_ENTRIES: &str = "spillway_cache_entries";
// Latency per path: hit, miss, passthrough, deferred.
pub const QUERY_DURATION: &str = "spillway_query_duration_seconds";
// Writes.
pub const CLIENT_WRITES: &str = "spillway_client_writes_total";
pub const FALLBACKS: &str = "spillway_fallbacks_total";
pub const TRANSACTIONS: &str = "spillway_held_transactions_total";
pub const HELD_READS: &str = "spillway_held_reads_total";
pub const SESSION_READS: &str = "spillway_session_reads_total";
pub const GUARDED_WRITES: &str = "spillway_guarded_writes_total";
pub const UPSTREAM_STATEMENTS: &str = "spillway_upstream_statements_total";
pub const PENDING_WRITES: &str = "spillway_pending_writes";
pub const PENDING_OLDEST_AGE: &str = "spillway_pending_oldest_age_seconds";
pub const FLUSH_BATCHES: &str = "spillway_flush_batches_total";
pub const FLUSH_ROWS: &str = "spillway_flush_rows_total";
pub const FLUSH_RETRIES: &str = "spillway_flush_retries_total";
pub const FLUSH_DURATION: &str = "spillway_flush_batch_duration_seconds";
pub const DEAD_LETTERS: &str = "spillway_dead_letters_total";
pub const JOURNAL_BYTES: &str = "spillway_journal_bytes";
pub const JOURNAL_FSYNCS: &str = "spillway_journal_fsyncs_total";
pub const JOURNAL_FSYNC_MICROS: &str = "spillway_journal_fsync_microseconds_total";
pub const JOURNAL_REFUSALS: &str = "spillway_journal_refusals_total";
// The key index and point reads of `row_counts = "exact"`.
pub const POINT_READS: &str = "spillway_point_reads_total";
pub const POINT_READ_QUERIES: &str = "spillway_point_read_queries_total";
pub const KEY_INDEX_KEYS: &str = "spillway_key_index_keys";
pub const KEY_INDEX_BYTES: &str = "spillway_key_index_bytes";
pub const KEY_INDEX_STATE: &str = "spillway_key_index_state";
// Connections.
pub const CLIENT_CONNECTIONS: &str = "spillway_client_connections";
pub const UPSTREAM_CONNECTIONS: &str = "spillway_upstream_connections";
pub const DETACHED_SESSIONS: &str = "spillway_detached_sessions";
pub const RUNTIME_TASKS: &str = "spillway_runtime_tasks";

pub const INVALIDATIONS: &str = "spillway_invalidations_total";
pub const REPLICATION_FOLLOWING: &str = "spillway_replication_following";
pub const REPLICATION_COMMITS: &str = "spillway_replication_commits_total";
pub const REPLICATION_ECHOES: &str = "spillway_replication_echoes_total";
pub const REPLICATION_LAG_BYTES: &str = "spillway_replication_lag_bytes";
pub const REPLICATION_LAG_SECONDS: &str = "spillway_replication_lag_seconds";
pub const REPLICATION_RETAINED_WAL: &str = "spillway_replication_retained_wal_bytes";
pub const REPLICATION_RESETS: &str = "spillway_replication_resets_total";
// Transaction pooling.
pub const POOL_SERVER_CONNECTIONS: &str = "spillway_pool_server_connections";
pub const POOL_LEASES: &str = "spillway_pool_leases_total";
pub const POOL_WAIT_SECONDS: &str = "spillway_pool_wait_seconds";
pub const POOL_WAIT_TIMEOUTS: &str = "spillway_pool_wait_timeouts_total";
pub const POOL_STATEMENTS_PREPARED: &str = "spillway_pool_statements_prepared_total";
pub const POOL_NOTIFICATIONS: &str = "spillway_pool_notifications_total";
pub const POOL_NOTIFICATIONS_DROPPED: &str = "spillway_pool_notifications_dropped_total";
pub const POOL_LISTENER_CONNECTS: &str = "spillway_pool_listener_connects_total";
pub const POOL_IDLE_CONNECTIONS: &str = "spillway_pool_idle_connections";
pub const POOL_WAITING: &str = "spillway_pool_waiting_sessions";

/// Every metric name above, for the documentation and packaging checks (the operations
/// guide and the Grafana dashboard may only name these); a unit test keeps it complete.
pub const ALL: [&str; 51] = [
    CACHE_HITS,
    CACHE_MISSES,
    CACHE_EVICTIONS,
    CACHE_BYTES,
    CACHE_ENTRIES,
    QUERY_DURATION,
    CLIENT_WRITES,
    FALLBACKS,
    TRANSACTIONS,
    HELD_READS,
    SESSION_READS,
    GUARDED_WRITES,
    UPSTREAM_STATEMENTS,
    PENDING_WRITES,
    PENDING_OLDEST_AGE,
    FLUSH_BATCHES,
    FLUSH_ROWS,
    FLUSH_RETRIES,
    FLUSH_DURATION,
    DEAD_LETTERS,
    JOURNAL_BYTES,
    JOURNAL_FSYNCS,
    JOURNAL_FSYNC_MICROS,
    JOURNAL_REFUSALS,
    POINT_READS,
    POINT_READ_QUERIES,
    KEY_INDEX_KEYS,
    KEY_INDEX_BYTES,
    KEY_INDEX_STATE,
    CLIENT_CONNECTIONS,
    UPSTREAM_CONNECTIONS,
    DETACHED_SESSIONS,
    RUNTIME_TASKS,
    INVALIDATIONS,
    REPLICATION_FOLLOWING,
    REPLICATION_COMMITS,
    REPLICATION_ECHOES,
    REPLICATION_LAG_BYTES,
    REPLICATION_LAG_SECONDS,
    REPLICATION_RETAINED_WAL,
    REPLICATION_RESETS,
    POOL_SERVER_CONNECTIONS,
    POOL_LEASES,
    POOL_WAIT_SECONDS,
    POOL_WAIT_TIMEOUTS,
    POOL_STATEMENTS_PREPARED,
    POOL_NOTIFICATIONS,
    POOL_NOTIFICATIONS_DROPPED,
    POOL_LISTENER_CONNECTS,
    POOL_IDLE_CONNECTIONS,
    POOL_WAITING,
];

/// The histograms among [`ALL`]: Prometheus exports them as `<name>_bucket`,
/// `<name>_sum` and `<name>_count`.
pub const HISTOGRAMS: [&str; 3] = [QUERY_DURATION, FLUSH_DURATION, POOL_WAIT_SECONDS];

/// Histogram buckets in seconds: 10 µs to 10 s, real buckets (not summaries).
const BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.5, 1.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle; `None` if another
/// recorder was installed first (a library embedding spillway).
pub fn install() -> Option<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Some(h.clone());
    }
    let builder = PrometheusBuilder::new().set_buckets(&BUCKETS).ok()?;
    let handle = builder.install_recorder().ok()?;
    describe();
    Some(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    describe_counter!(
        INVALIDATIONS,
        "Cache invalidations by scope: row (a write with known keys) or table"
    );
    describe_gauge!(
        REPLICATION_FOLLOWING,
        "1 while the database's change stream follows its slot (replication mode)"
    );
    describe_counter!(
        REPLICATION_COMMITS,
        "Committed transactions applied from the change stream"
    );
    describe_counter!(
        REPLICATION_ECHOES,
        "Changes from the change stream spillway had already invalidated (its own writes)"
    );
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "WAL between the server's position and the slot's confirmed position"
    );
    describe_gauge!(
        REPLICATION_LAG_SECONDS,
        Unit::Seconds,
        "Age of the last applied commit when it was applied (0 when caught up)"
    );
    describe_gauge!(
        REPLICATION_RETAINED_WAL,
        Unit::Bytes,
        "WAL the database's slot holds back"
    );
    describe_counter!(
        REPLICATION_RESETS,
        "Slot positions recreated (dropped slot, retained-WAL bound, undecodable message)"
    );
    describe_counter!(CACHE_HITS, "Requests answered from the read cache");
    describe_counter!(CACHE_MISSES, "Cacheable requests that went upstream");
    describe_counter!(
        CACHE_EVICTIONS,
        "Cache entries evicted for space or expired"
    );
    describe_gauge!(CACHE_BYTES, Unit::Bytes, "Bytes held by cached results");
    describe_gauge!(CACHE_ENTRIES, "Cached results");
    describe_histogram!(
        QUERY_DURATION,
        Unit::Seconds,
        "Time from a request to its answer, by path (hit, miss, passthrough, deferred)"
    );
    describe_counter!(
        CLIENT_WRITES,
        "Client writes to tables, by table and how they were applied (policy)"
    );
    describe_counter!(
        FALLBACKS,
        "Statements on deferred tables that ran write-through, by table and reason"
    );
    describe_counter!(
        TRANSACTIONS,
        "Transactions spillway held (BEGIN not sent upstream), by how they ended: \
         committed (journaled), rolled_back, upstream (replayed there), diverged (40001)"
    );
    describe_counter!(
        HELD_READS,
        "Plain reads inside held transactions, by outcome: outside (answered outside \
         the transaction, which stays held) or why the read moved it upstream"
    );
    describe_counter!(
        SESSION_READS,
        "Reads of consistency = \"session\" tables while the session's own deferred \
         writes are pending, by outcome: overlay (answered with the row's pending \
         writes overlaid), overlay_failed (40001), waited (waited for the flush)"
    );
    describe_counter!(
        GUARDED_WRITES,
        "Writes with a condition beyond the key (WHERE … AND version = $n) that moved \
         upstream, by table and outcome: row_unknown (spillway did not know the row \
         exactly)"
    );
    describe_counter!(
        UPSTREAM_STATEMENTS,
        "Statements spillway sent to PostgreSQL (relayed and flushed)"
    );
    describe_gauge!(
        PENDING_WRITES,
        "Acknowledged deferred records not yet applied, by table"
    );
    describe_gauge!(
        PENDING_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest pending deferred record, by table"
    );
    describe_counter!(FLUSH_BATCHES, "Batches applied upstream");
    describe_counter!(FLUSH_ROWS, "Rows written upstream by flushed batches");
    describe_counter!(
        FLUSH_RETRIES,
        "Batch attempts that failed transiently and were retried"
    );
    describe_histogram!(
        FLUSH_DURATION,
        Unit::Seconds,
        "Time to apply one batch upstream"
    );
    describe_counter!(DEAD_LETTERS, "Deferred writes refused upstream, by table");
    describe_gauge!(JOURNAL_BYTES, Unit::Bytes, "Bytes of the journal on disk");
    describe_counter!(JOURNAL_FSYNCS, "Journal fsync calls");
    describe_counter!(
        JOURNAL_REFUSALS,
        "Appends the journal refused for lack of room: reason full (journal.max_bytes) or no_space (its disk)"
    );
    describe_counter!(
        JOURNAL_FSYNC_MICROS,
        Unit::Microseconds,
        "Time spent in journal fsyncs"
    );
    describe_counter!(
        POINT_READS,
        "Keys of exact-count deferred tables read from PostgreSQL (point reads), by table"
    );
    describe_counter!(
        POINT_READ_QUERIES,
        "Queries that made those point reads (one per batch of waiting keys), by table"
    );
    describe_gauge!(KEY_INDEX_KEYS, "Keys held by the key index, by table");
    describe_gauge!(
        KEY_INDEX_BYTES,
        Unit::Bytes,
        "Estimated memory of the key index, by table"
    );
    describe_gauge!(
        KEY_INDEX_STATE,
        "1 for the key index's state of a table (off, untrusted, loading, ready, \
         over_bound), 0 for the others"
    );
    describe_gauge!(CLIENT_CONNECTIONS, "Client sessions open");
    describe_gauge!(
        UPSTREAM_CONNECTIONS,
        "Upstream connections open for client sessions"
    );
    describe_gauge!(
        DETACHED_SESSIONS,
        "Client sessions open without their upstream connection (detached)"
    );
    describe_gauge!(
        RUNTIME_TASKS,
        "Tasks alive on spillway's runtimes (the listener's and the session workers')"
    );
}

/// Handles a session records into, created once per session (a registry lookup per
/// metric then, none per message).
pub struct SessionMetrics {
    pub upstream_statements: metrics::Counter,
    pub hit: metrics::Histogram,
    pub miss: metrics::Histogram,
    pub passthrough: metrics::Histogram,
    pub deferred: metrics::Histogram,
}

impl SessionMetrics {
    pub fn new() -> Self {
        Self {
            upstream_statements: metrics::counter!(UPSTREAM_STATEMENTS),
            hit: metrics::histogram!(QUERY_DURATION, "path" => "hit"),
            miss: metrics::histogram!(QUERY_DURATION, "path" => "miss"),
            passthrough: metrics::histogram!(QUERY_DURATION, "path" => "passthrough"),
            deferred: metrics::histogram!(QUERY_DURATION, "path" => "deferred"),
        }
    }
}

impl Default for SessionMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::{ALL, HISTOGRAMS};

    /// Every `"spillway_…"` name declared in this file is in [`ALL`], once.
    #[test]
    fn all_lists_every_name() {
        let source = include_str!("metrics.rs");
        let declared: Vec<&str> = source
            .lines()
            .filter(|l| l.starts_with("pub const ") && l.contains(": &str = \"spillway_"))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert_eq!(declared.len(), ALL.len(), "{declared:?}");
        for name in &declared {
            assert_eq!(ALL.iter().filter(|a| *a == name).count(), 1, "{name}");
        }
        assert!(HISTOGRAMS.iter().all(|h| ALL.contains(h)));
        assert!(HISTOGRAMS.iter().all(|h| h.ends_with("_seconds")));
    }
}
