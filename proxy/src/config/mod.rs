//! spillway's configuration: `spillway.toml` plus `SPILLWAY_` environment overrides.
//!
//! The proxy owns `[server]`, `[backend]`, `[metrics]`, `[log]`, `[admin]`,
//! `[replication]`, `[pool]` and `[auth]` (`pool.rs`); the data-side
//! sections come from `spillway_policies::config`. Config is plain data passed
//! explicitly to whoever needs it — there is no global.
//!
//! Invariants: unknown keys are rejected in every section; [`Config::validate`] runs on
//! every load, so a `Config` that exists is a valid one.

mod load;
pub mod pool;
pub mod reload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use spillway_policies::config::{
    CacheConfig, FlushConfig, JournalConfig, KeyIndexConfig, TableConfig, TableName,
    ValidationError, validate_tables,
};

pub use load::{ConfigError, DEFAULT_CONFIG_FILE, ENV_PREFIX};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub backend: BackendConfig,
    pub cache: CacheConfig,
    pub journal: JournalConfig,
    pub flush: FlushConfig,
    pub key_index: KeyIndexConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub replication: ReplicationConfig,
    pub pool: pool::PoolConfig,
    pub auth: pool::AuthConfig,
    pub tables: BTreeMap<String, TableConfig>,
}

/// `[replication]`: the change stream of `cache.invalidation = "replication"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Publication the stream reads (`FOR ALL TABLES` when spillway creates it).
    pub publication: String,
    /// Slot name prefix: database `d` is followed through slot `<slot>_<d>`
    /// (lower-cased, other characters than `[a-z0-9_]` as `_`).
    pub slot: String,
    /// Create the publication and the slot at start (and in each database served)
    /// when they are missing; otherwise `spillway migrate` creates them.
    pub create: bool,
    /// WAL a slot may hold back; past it the database's cache is dropped and the slot
    /// moved to the current position.
    pub max_retained_wal: ByteSize,
    /// How often the slot is asked for new changes.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            publication: "spillway".to_owned(),
            slot: "spillway".to_owned(),
            create: true,
            max_retained_wal: ByteSize::gib(1),
            poll_interval: Duration::from_millis(10),
        }
    }
}

impl ReplicationConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        let ident = |s: &str| {
            !s.is_empty()
                && s.len() <= 40
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !ident(&self.publication) {
            return Err(ValidationError::new(
                "replication.publication",
                "must be 1 to 40 characters of a-z, 0-9 and _",
            ));
        }
        if !ident(&self.slot) {
            return Err(ValidationError::new(
                "replication.slot",
                "must be 1 to 40 characters of a-z, 0-9 and _",
            ));
        }
        if self.poll_interval.is_zero() || self.poll_interval > Duration::from_secs(10) {
            return Err(ValidationError::new(
                "replication.poll_interval",
                "must be above zero and at most 10s",
            ));
        }
        if self.max_retained_wal.as_u64() < 1024 * 1024 {
            return Err(ValidationError::new(
                "replication.max_retained_wal",
                "must be at least 1MiB",
            ));
        }
        Ok(())
    }

    /// The slot that follows `database`.
    pub fn slot_for(&self, database: &str) -> String {
        let mut name = format!("{}_", self.slot);
        name.extend(database.chars().map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        }));
        name.truncate(63);
        name
    }
}

/// `[server]`: the client-facing listener and session limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to accept clients on; port 0 picks a free port (logged at start).
    pub listen: SocketAddr,
    /// Client connections beyond this are refused with 53300.
    pub max_client_conn: usize,
    /// Session worker threads (one event loop each); 0 = one per available core.
    pub workers: usize,
    /// Pin worker `i` to the `i`-th core this process may use.
    pub pin_workers: bool,
    /// PEM certificate chain; with `tls_key`, clients may negotiate TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// A client message longer than this gets 54000 and the connection closes.
    pub max_message_bytes: ByteSize,
    /// Statement texts longer than this are passed through unanalysed.
    pub max_parse_bytes: ByteSize,
    /// Time a client has to finish TLS negotiation, startup and authentication.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// On SIGTERM/SIGINT, busy sessions get this long to finish before 57P01.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            max_client_conn: 1000,
            workers: 0,
            pin_workers: true,
            tls_cert: None,
            tls_key: None,
            max_message_bytes: ByteSize::mib(64),
            max_parse_bytes: ByteSize::kib(64),
            startup_timeout: Duration::from_secs(15),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// `[backend]`: the PostgreSQL server behind spillway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// libpq-style URL. Its host and port also receive relayed client sessions; its
    /// user and password are only for spillway's own service connections; `sslmode`
    /// (disable | prefer | require) applies to every upstream connection.
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/postgres".to_owned(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9187))),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `spillway=debug,info`; `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// `[admin]`: the admin console, reached by connecting to database `spillway`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Roles that may log in to the console. Empty (the default): no console, and
    /// database `spillway` is relayed to PostgreSQL like any other.
    pub users: Vec<String>,
    /// The console's password: a SCRAM-SHA-256 verifier in PostgreSQL's format
    /// (`SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>`, from
    /// `spillway hash-password` or `pg_authid.rolpassword`), or the password itself.
    pub password: Option<Secret>,
}

impl AdminConfig {
    /// The verifier logins are checked against; `None` without a password. A
    /// plain password gets a fresh random salt each time.
    pub fn verifier(&self) -> Option<crate::protocol::scram::Verifier> {
        let secret = self.password.as_ref()?.expose();
        Some(
            crate::protocol::scram::Verifier::parse(secret)
                .unwrap_or_else(|| crate::protocol::scram::Verifier::from_password(secret)),
        )
    }
}

/// A string that `Debug` never prints (passwords in the config).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(****)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the backend is and how to reach it, parsed from `backend.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTarget {
    pub host: String,
    pub port: u16,
    pub sslmode: SslMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
}

impl Config {
    /// Semantic checks beyond what serde enforces. Called by every loader.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.backend_target()?;
        let s = &self.server;
        if s.max_client_conn == 0 {
            return Err(ValidationError::new(
                "server.max_client_conn",
                "must be at least 1",
            ));
        }
        if s.max_message_bytes.as_u64() < 1024 {
            return Err(ValidationError::new(
                "server.max_message_bytes",
                "must be at least 1KiB",
            ));
        }
        if s.max_message_bytes.as_u64() > 0x3fff_ffff {
            return Err(ValidationError::new(
                "server.max_message_bytes",
                "PostgreSQL messages cannot exceed 1GiB",
            ));
        }
        if s.startup_timeout.is_zero() {
            return Err(ValidationError::new(
                "server.startup_timeout",
                "must be above zero",
            ));
        }
        match (&s.tls_cert, &s.tls_key) {
            (Some(_), None) => {
                return Err(ValidationError::new(
                    "server.tls_key",
                    "required with server.tls_cert",
                ));
            }
            (None, Some(_)) => {
                return Err(ValidationError::new(
                    "server.tls_cert",
                    "required with server.tls_key",
                ));
            }
            _ => {}
        }
        if self.backend.connect_timeout.is_zero() {
            return Err(ValidationError::new(
                "backend.connect_timeout",
                "must be above zero",
            ));
        }
        self.cache.validate()?;
        self.journal.validate()?;
        self.flush.validate()?;
        self.key_index.validate()?;
        self.table_policies()?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ValidationError::new("log.level", e.to_string()))?;
        self.admin.validate()?;
        self.replication.validate()?;
        self.pool.validate(&self.auth)?;
        Ok(())
    }

    /// The `[tables]` map keyed by parsed name. Deferred policies need the read
    /// cache's classifier (`cache.enabled`); their tables are checked against the
    /// catalog at startup (`writes::tables`).
    pub fn table_policies(&self) -> Result<BTreeMap<TableName, TableConfig>, ValidationError> {
        let tables = validate_tables(&self.tables, true)?;
        if !self.cache.enabled
            && let Some((name, t)) = tables.iter().find(|(_, t)| t.policy.is_deferred())
        {
            return Err(ValidationError::new(
                format!("tables.\"{name}\".policy"),
                format!(
                    "policy \"{}\" needs cache.enabled = true (spillway recognises deferrable \
                     statements with the cache's classifier)",
                    t.policy
                ),
            ));
        }
        Ok(tables)
    }

    pub fn backend_target(&self) -> Result<BackendTarget, ValidationError> {
        let bad = |p: String| ValidationError::new("backend.url", p);
        let url = url::Url::parse(&self.backend.url).map_err(|e| bad(e.to_string()))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(bad(format!(
                "scheme must be postgres:// or postgresql://, not {}://",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("has no host".to_owned()))?;
        // IPv6 literals come back bracketed; the socket layer wants them bare.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let mut sslmode = SslMode::Prefer;
        for (k, v) in url.query_pairs() {
            if k == "sslmode" {
                sslmode = match v.as_ref() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    other => {
                        return Err(bad(format!(
                            "sslmode={other} is not supported (disable | allow | prefer | require)"
                        )));
                    }
                };
            }
        }
        Ok(BackendTarget {
            host,
            port: url.port().unwrap_or(5432),
            sslmode,
        })
    }
}

impl AdminConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.users.iter().any(|u| u.is_empty()) {
            return Err(ValidationError::new(
                "admin.users",
                "role names must not be empty",
            ));
        }
        match &self.password {
            None if !self.users.is_empty() => Err(ValidationError::new(
                "admin.password",
                "required with admin.users (a SCRAM-SHA-256 verifier or a password)",
            )),
            Some(p) if p.expose().is_empty() => {
                Err(ValidationError::new("admin.password", "must not be empty"))
            }
            Some(p)
                if p.expose().starts_with("SCRAM-SHA-256$")
                    && crate::protocol::scram::Verifier::parse(p.expose()).is_none() =>
            {
                Err(ValidationError::new(
                    "admin.password",
                    "looks like a SCRAM-SHA-256 verifier but is not a valid one \
                     (SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)",
                ))
            }
            _ => Ok(()),
        }
    }
}

impl BackendConfig {
    /// `backend.url` with any password replaced by `****`, for printing.
    pub fn redacted_url(&self) -> String {
        match url::Url::parse(&self.url) {
            Ok(mut u) if u.password().is_some() => {
                // Only fails for URLs that cannot have a password, which this one has.
                let _ = u.set_password(Some("****"));
                u.to_string()
            }
            _ => self.url.clone(),
        }
    }
}
