//! Configuration owned by the data side: `[cache]`, `[journal]`, `[flush]` and
//! `[tables."schema.name"]`. Plain serde structs with documented defaults; loading and
//! merging (file, environment) is the proxy's job, validation is here.
//!
//! Invariant: every struct rejects unknown keys, so a typo is an error, not a silently
//! ignored setting.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// `[cache]`: the read cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Serve repeatable reads from memory. Off: every statement passes through.
    pub enabled: bool,
    /// Upper bound on the bytes of all cached results together.
    pub max_bytes: ByteSize,
    /// A result larger than this streams through uncached.
    pub max_entry_bytes: ByteSize,
    /// Default time to live of an entry; tables may override it.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How writes that bypass spillway are noticed.
    pub invalidation: Invalidation,
    /// Whether statements with unknown side effects (DO, CALL, volatile functions)
    /// drop every cached entry of their database.
    pub invalidate_on_unknown: bool,
    /// Distinct statement texts whose analysis is remembered (parsed once each).
    pub memo_entries: u64,
    /// Upper bound on the bytes of remembered statement analyses.
    pub memo_bytes: ByteSize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: ByteSize::mib(256),
            max_entry_bytes: ByteSize::mib(4),
            ttl: Duration::from_secs(60),
            invalidation: Invalidation::Ttl,
            invalidate_on_unknown: true,
            memo_entries: 200_000,
            memo_bytes: ByteSize::mib(64),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invalidation {
    /// Only spillway's own writes invalidate; TTL bounds staleness from other writers.
    Ttl,
    /// Triggers NOTIFY `spillway_invalidate` on writes by anyone.
    Notify,
    /// PostgreSQL's logical replication (pgoutput) reports every committed change;
    /// settings in `[replication]`.
    Replication,
}

/// `[journal]`: the durable log of deferred writes: the local write-ahead journal, or
/// a NATS JetStream stream shared by several instances (`journal.nats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Where acknowledged deferred writes live until applied.
    pub backend: JournalBackend,
    /// `[journal.nats]`: with `backend = "nats"`.
    pub nats: NatsJournalConfig,
    pub dir: PathBuf,
    pub fsync: FsyncMode,
    /// With `fsync = "interval"`: the loss window after a power failure.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// Journal size at which back-pressure starts.
    pub max_bytes: ByteSize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            backend: JournalBackend::Local,
            nats: NatsJournalConfig::default(),
            dir: PathBuf::from("spillway-data"),
            fsync: FsyncMode::Always,
            fsync_interval: Duration::from_millis(10),
            max_bytes: ByteSize::gib(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalBackend {
    /// The journal in `journal.dir` on this machine's disk.
    Local,
    /// A JetStream stream on a NATS cluster: acknowledged once a quorum stored it.
    Nats,
}

/// `[journal.nats]`: the JetStream stream of `journal.backend = "nats"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsJournalConfig {
    /// Server URLs (`nats://host:port`); the client fails over between them.
    pub servers: Vec<String>,
    /// Copies JetStream keeps of each record; a record is acknowledged once a majority
    /// stored it.
    pub replicas: usize,
    /// The stream's name: one per spillway cluster (its instances share it). Also the
    /// journal id in `spillway.flush_ledger` (`nats:<stream>`).
    pub stream: String,
    /// How long one append waits for JetStream's acknowledgement before it gives up
    /// (the record was then possibly stored: it is retried under the same message id).
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
}

impl Default for NatsJournalConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".to_owned()],
            replicas: 3,
            stream: "spillway".to_owned(),
            ack_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncMode {
    /// Durable before acknowledgement (group-committed).
    Always,
    /// Synced every `fsync_interval`; a power failure can lose that window.
    Interval,
    /// Never synced: tests only.
    Never,
}

/// `[flush]`: the flush worker that applies deferred writes upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub batch_size: usize,
    /// Write-back: checkpoint early once this many keys are dirty.
    pub max_dirty_keys: usize,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            batch_size: 1000,
            max_dirty_keys: 100_000,
        }
    }
}

/// `[key_index]`: which primary keys exist in each deferred table, so that exact row
/// counts (`row_counts = "exact"`) need no point read. It is loaded and trusted only
/// while the change stream follows the database (`engine::keys`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyIndexConfig {
    /// Off: every key that has no pending write is a point read.
    pub enabled: bool,
    /// Bound on the memory of every table's index together; a table whose index would
    /// pass it keeps point reads.
    pub max_bytes: ByteSize,
    /// Keys read per query while loading a table's index (keyset pagination).
    pub chunk_rows: usize,
}

impl Default for KeyIndexConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: ByteSize::mib(256),
            chunk_rows: 20_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    #[default]
    WriteThrough,
    WriteBack,
    WriteBehind,
}

impl Policy {
    pub fn is_deferred(self) -> bool {
        !matches!(self, Policy::WriteThrough)
    }
}

impl Policy {
    /// The name as written in the config (also a metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::WriteThrough => "write-through",
            Policy::WriteBack => "write-back",
            Policy::WriteBehind => "write-behind",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    #[default]
    Strong,
    Session,
    Bounded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    #[default]
    Block,
    Reject,
    WriteThrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RowCounts {
    #[default]
    Exact,
    Assumed,
}

/// `[tables."schema.name"]`: per-table policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableConfig {
    pub policy: Policy,
    pub consistency: Consistency,
    /// Whether reads of this table may be cached.
    pub cache: bool,
    /// Overrides `cache.ttl`.
    #[serde(
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    pub max_pending: usize,
    pub when_full: WhenFull,
    #[serde(with = "humantime_serde")]
    pub block_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    pub row_counts: RowCounts,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            policy: Policy::WriteThrough,
            consistency: Consistency::Strong,
            cache: true,
            ttl: None,
            max_pending: 100_000,
            when_full: WhenFull::Block,
            block_timeout: Duration::from_secs(5),
            max_staleness: Duration::from_secs(1),
            row_counts: RowCounts::Exact,
        }
    }
}

/// A schema-qualified table name, as written in `[tables."schema.name"]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl std::str::FromStr for TableName {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('.') {
            Some((schema, name))
                if !schema.is_empty() && !name.is_empty() && !name.contains('.') =>
            {
                Ok(TableName {
                    schema: schema.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(ValidationError {
                key: format!("tables.\"{s}\""),
                problem: "table names are written \"schema.name\"".to_owned(),
            }),
        }
    }
}

/// A semantic error in an otherwise well-formed config: names the key and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ValidationError {
    pub key: String,
    pub problem: String,
}

impl ValidationError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.max_entry_bytes > self.max_bytes {
            return Err(ValidationError::new(
                "cache.max_entry_bytes",
                format!(
                    "{} is larger than cache.max_bytes ({})",
                    self.max_entry_bytes, self.max_bytes
                ),
            ));
        }
        Ok(())
    }
}

impl JournalConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.dir.as_os_str().is_empty() {
            return Err(ValidationError::new("journal.dir", "must not be empty"));
        }
        if self.max_bytes.as_u64() < 1024 * 1024 {
            return Err(ValidationError::new(
                "journal.max_bytes",
                "must be at least 1MiB",
            ));
        }
        if self.fsync == FsyncMode::Interval && self.fsync_interval.is_zero() {
            return Err(ValidationError::new(
                "journal.fsync_interval",
                "must be above zero with fsync = \"interval\"",
            ));
        }
        if self.backend == JournalBackend::Nats {
            self.nats.validate()?;
        }
        Ok(())
    }
}

impl NatsJournalConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.servers.is_empty() || self.servers.iter().any(String::is_empty) {
            return Err(ValidationError::new(
                "journal.nats.servers",
                "must list at least one server URL",
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(ValidationError::new(
                "journal.nats.replicas",
                "must be between 1 and 5 (JetStream's limit)",
            ));
        }
        // A stream name is also a subject token here: no dots, wildcards or spaces.
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if self.stream.is_empty() || !self.stream.chars().all(valid) {
            return Err(ValidationError::new(
                "journal.nats.stream",
                "must be letters, digits, '-' or '_'",
            ));
        }
        if self.ack_timeout.is_zero() {
            return Err(ValidationError::new(
                "journal.nats.ack_timeout",
                "must be above zero",
            ));
        }
        Ok(())
    }
}

impl FlushConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.interval.is_zero() {
            return Err(ValidationError::new("flush.interval", "must be above zero"));
        }
        if self.batch_size == 0 {
            return Err(ValidationError::new(
                "flush.batch_size",
                "must be at least 1",
            ));
        }
        if self.max_dirty_keys == 0 {
            return Err(ValidationError::new(
                "flush.max_dirty_keys",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl KeyIndexConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !(1..=1_000_000).contains(&self.chunk_rows) {
            return Err(ValidationError::new(
                "key_index.chunk_rows",
                "must be between 1 and 1000000",
            ));
        }
        Ok(())
    }
}

/// Validates the `[tables]` map and returns it keyed by parsed name.
///
/// `deferred_supported` is false while this build cannot apply deferred policies: a
/// config asking for one is then refused rather than silently run write-through.
pub fn validate_tables(
    tables: &BTreeMap<String, TableConfig>,
    deferred_supported: bool,
) -> Result<BTreeMap<TableName, TableConfig>, ValidationError> {
    let mut out = BTreeMap::new();
    for (key, table) in tables {
        let name: TableName = key.parse()?;
        let at = |field: &str| format!("tables.\"{key}\".{field}");
        if table.policy.is_deferred() && !deferred_supported {
            return Err(ValidationError::new(
                at("policy"),
                format!(
                    "policy \"{}\" is not available in this build of spillway; \
                     use \"write-through\"",
                    table.policy
                ),
            ));
        }
        if table.max_pending == 0 {
            return Err(ValidationError::new(
                at("max_pending"),
                "must be at least 1",
            ));
        }
        if table.policy == Policy::WriteBack && table.row_counts == RowCounts::Assumed {
            // Coalescing folds operations assuming each was valid when acknowledged
            // (an INSERT then a DELETE cancel out), which only exact counts ensure.
            return Err(ValidationError::new(
                at("row_counts"),
                "policy \"write-back\" needs row_counts = \"exact\": coalescing relies on \
                 knowing which keys exist",
            ));
        }
        if table.consistency == Consistency::Bounded && table.max_staleness.is_zero() {
            return Err(ValidationError::new(
                at("max_staleness"),
                "must be above zero with consistency = \"bounded\"",
            ));
        }
        if out.insert(name, table.clone()).is_some() {
            return Err(ValidationError::new(at("policy"), "table configured twice"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_need_a_schema() {
        assert!("events".parse::<TableName>().is_err());
        assert!("public.".parse::<TableName>().is_err());
        assert!("a.b.c".parse::<TableName>().is_err());
        let t: TableName = "public.events".parse().expect("valid");
        assert_eq!(t.to_string(), "public.events");
    }

    #[test]
    fn deferred_policy_refused_when_unsupported() {
        let mut tables = BTreeMap::new();
        tables.insert(
            "public.events".to_owned(),
            TableConfig {
                policy: Policy::WriteBehind,
                ..TableConfig::default()
            },
        );
        let err = validate_tables(&tables, false).expect_err("refused");
        assert_eq!(err.key, "tables.\"public.events\".policy");
        assert!(validate_tables(&tables, true).is_ok());
    }

    #[test]
    fn entry_bigger_than_cache_refused() {
        let c = CacheConfig {
            max_bytes: ByteSize::mib(1),
            max_entry_bytes: ByteSize::mib(2),
            ..CacheConfig::default()
        };
        assert_eq!(
            c.validate().expect_err("refused").key,
            "cache.max_entry_bytes"
        );
    }
}
