//! `[pool]` (how client sessions share PostgreSQL server connections) and `[auth]`
//! (the credentials spillway holds to authenticate clients itself), and the auth file.
//!
//! Names follow PgBouncer where it has one (`pool_mode` → `pool.mode`, `default_pool_size`
//! → `pool.size`, `max_db_connections`, `server_idle_timeout` → `pool.idle_timeout`,
//! `server_lifetime` → `pool.lifetime`, `server_reset_query` → `pool.reset_query`,
//! `auth_file`, `auth_query`, `auth_user`); per-database and per-user overrides are
//! `[pool.databases."db"]` and `[pool.users."role"]` (PgBouncer's `[databases]` and
//! `[users]` sections).
//!
//! Invariants: session mode (the default) needs nothing of `[auth]`; transaction mode
//! anywhere needs `auth.file` or `auth.user`, checked at load. An override's absent key
//! falls back to the database's, then to `[pool]`'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spillway_policies::config::ValidationError;

/// How sessions use server connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// One server connection per client session, authentication relayed (the default).
    #[default]
    Session,
    /// A server connection is leased per transaction, or per extended-protocol cycle
    /// outside one; spillway authenticates the client itself.
    Transaction,
}

/// `[pool]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Server connections per (database, user) pool in transaction mode.
    pub size: u32,
    /// Server connections per database over all its pools; 0: no cap. Not enforced
    /// yet (issue 16): only each pool's `size` caps today.
    pub max_db_connections: u32,
    /// How long a request waits for a server connection before 53300.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// An idle pooled server connection is closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A pooled server connection is closed once this old, when it is next returned.
    #[serde(with = "humantime_serde")]
    pub lifetime: Duration,
    /// Run on a server connection when a lease returns it (e.g. `DISCARD ALL`); unset:
    /// nothing between transactions (the pool is per user).
    pub reset_query: Option<String>,
    /// Named protocol-level prepared statements one pooled server connection holds
    /// for its clients (PgBouncer's `max_prepared_statements`); the least recently
    /// used is closed to make room. 0: a session that prepares a named statement
    /// keeps its server connection until it closed them all.
    pub max_prepared_statements: u32,
    /// Notifications held for one listening session in transaction mode (LISTEN
    /// through the database's listener connection) until its client is idle to take
    /// them; past it, new ones for that session are dropped and its client is warned.
    pub notify_queue: u32,
    /// Overrides per database (PgBouncer's `[databases]` `pool_mode`, `pool_size`).
    pub databases: BTreeMap<String, PoolOverride>,
    /// Overrides per user (PgBouncer's `[users]` `pool_mode`); a user's win over a
    /// database's.
    pub users: BTreeMap<String, PoolOverride>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            mode: PoolMode::Session,
            size: 20,
            max_db_connections: 0,
            queue_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            lifetime: Duration::from_secs(3600),
            reset_query: None,
            max_prepared_statements: 200,
            notify_queue: 1000,
            databases: BTreeMap::new(),
            users: BTreeMap::new(),
        }
    }
}

/// `[pool.databases."db"]`, `[pool.users."role"]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolOverride {
    pub mode: Option<PoolMode>,
    pub size: Option<u32>,
}

impl PoolConfig {
    /// The mode for `database` and `user`: the user's override, the database's, then
    /// `pool.mode`.
    pub fn mode_for(&self, database: &str, user: &str) -> PoolMode {
        self.users
            .get(user)
            .and_then(|o| o.mode)
            .or_else(|| self.databases.get(database).and_then(|o| o.mode))
            .unwrap_or(self.mode)
    }

    /// The pool size for `database` and `user`, resolved like [`PoolConfig::mode_for`].
    pub fn size_for(&self, database: &str, user: &str) -> u32 {
        self.users
            .get(user)
            .and_then(|o| o.size)
            .or_else(|| self.databases.get(database).and_then(|o| o.size))
            .unwrap_or(self.size)
    }

    /// Whether any database or user may be in transaction mode.
    pub fn any_transaction(&self) -> bool {
        self.mode == PoolMode::Transaction
            || self
                .databases
                .values()
                .chain(self.users.values())
                .any(|o| o.mode == Some(PoolMode::Transaction))
    }

    pub fn validate(&self, auth: &AuthConfig) -> Result<(), ValidationError> {
        let sizes = std::iter::once(("pool.size".to_owned(), Some(self.size)))
            .chain(
                self.databases
                    .iter()
                    .map(|(d, o)| (format!("pool.databases.\"{d}\".size"), o.size)),
            )
            .chain(
                self.users
                    .iter()
                    .map(|(u, o)| (format!("pool.users.\"{u}\".size"), o.size)),
            );
        for (key, size) in sizes {
            if size == Some(0) {
                return Err(ValidationError::new(key, "must be at least 1"));
            }
        }
        if self.queue_timeout.is_zero() {
            return Err(ValidationError::new(
                "pool.queue_timeout",
                "must be above zero",
            ));
        }
        if self
            .reset_query
            .as_deref()
            .is_some_and(|q| q.trim().is_empty())
        {
            return Err(ValidationError::new(
                "pool.reset_query",
                "must not be empty (leave it unset for none)",
            ));
        }
        if self.any_transaction() && auth.file.is_none() && auth.user.is_none() {
            return Err(ValidationError::new(
                "pool.mode",
                "transaction mode needs credentials spillway holds: auth.file or auth.user",
            ));
        }
        auth.validate()
    }
}

/// `[auth]`: client authentication by spillway, for pooled sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// PgBouncer's auth file: lines `"user" "password"`, the password in plain text, a
    /// SCRAM-SHA-256 verifier or `md5…`. Read at start.
    pub file: Option<PathBuf>,
    /// The role that runs `auth.query` (its password from the auth file, else from
    /// `backend.url` when it is that URL's user).
    pub user: Option<String>,
    /// Returns (name, verifier) for the role in `$1`; run in the client's database.
    pub query: String,
}

/// `pg_authid` rather than the `pg_shadow` view PgBouncer uses: the same columns without
/// the view, and roles that cannot log in yield nothing.
pub const DEFAULT_AUTH_QUERY: &str =
    "SELECT rolname::text, rolpassword::text FROM pg_authid WHERE rolname = $1 AND rolcanlogin";

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            file: None,
            user: None,
            query: DEFAULT_AUTH_QUERY.to_owned(),
        }
    }
}

impl AuthConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.user.as_deref().is_some_and(str::is_empty) {
            return Err(ValidationError::new("auth.user", "must not be empty"));
        }
        if self.query.trim().is_empty() {
            return Err(ValidationError::new("auth.query", "must not be empty"));
        }
        Ok(())
    }
}

/// What the auth file (or `auth.query`) holds for one role.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// The password itself: spillway can log in upstream with it.
    Plain(String),
    /// `SCRAM-SHA-256$…` as in `pg_authid`.
    Scram(crate::protocol::scram::Verifier),
    /// `md5` + md5(password || user), 32 hex digits.
    Md5(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Plain(_) => "Plain(****)",
            Credential::Scram(_) => "Scram(****)",
            Credential::Md5(_) => "Md5(****)",
        })
    }
}

impl Credential {
    /// Reads a password column: a SCRAM verifier, an md5 hash, or plain text.
    pub fn parse(secret: &str) -> Self {
        if let Some(v) = crate::protocol::scram::Verifier::parse(secret) {
            return Credential::Scram(v);
        }
        let is_md5 = secret.len() == 35
            && secret.starts_with("md5")
            && secret[3..].bytes().all(|b| b.is_ascii_hexdigit());
        if is_md5 {
            Credential::Md5(secret[3..].to_ascii_lowercase())
        } else {
            Credential::Plain(secret.to_owned())
        }
    }
}

/// The auth file's content: role → credential.
pub type AuthFile = BTreeMap<String, Credential>;

/// Reads an auth file (PgBouncer's format: `"user" "password"` per line, `""` for a
/// quote inside, blank lines and lines starting with `;` or `#` ignored).
pub fn read_auth_file(path: &Path) -> Result<AuthFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_auth_file(&text).map_err(|(line, e)| format!("{}:{line}: {e}", path.display()))
}

/// [`read_auth_file`] on text; errors carry the 1-based line.
pub fn parse_auth_file(text: &str) -> Result<AuthFile, (usize, &'static str)> {
    let mut out = AuthFile::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let (user, rest) = quoted(line).ok_or((i + 1, "expected \"user\" \"password\""))?;
        let (password, _) =
            quoted(rest.trim_start()).ok_or((i + 1, "expected \"user\" \"password\""))?;
        if user.is_empty() {
            return Err((i + 1, "empty user name"));
        }
        out.insert(user, Credential::parse(&password));
    }
    Ok(out)
}

/// One `"…"` field at the start of `s` (`""` is a quote), and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut rest = s.strip_prefix('"')?;
    let mut value = String::new();
    loop {
        let end = rest.find('"')?;
        value.push_str(&rest[..end]);
        rest = &rest[end + 1..];
        match rest.strip_prefix('"') {
            Some(after) => {
                value.push('"');
                rest = after;
            }
            None => return Some((value, rest)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_file_reads_pgbouncer_lines() {
        let f = parse_auth_file(
            "; comment\n\"alice\" \"pa\"\"ss\"\n\"bob\" \"md5AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"\n\n\"carol\" \"\" extra\n",
        )
        .expect("works");
        assert_eq!(f["alice"], Credential::Plain("pa\"ss".into()));
        assert_eq!(f["bob"], Credential::Md5("a".repeat(32)));
        assert_eq!(f["carol"], Credential::Plain(String::new()));
        assert_eq!(parse_auth_file("alice pw").expect_err("refused").0, 1);
        assert_eq!(parse_auth_file("\n\"a\" \"b").expect_err("refused").0, 2);
    }

    #[test]
    fn scram_verifiers_are_recognised() {
        let v = crate::protocol::scram::Verifier::from_password("pw").to_string();
        assert!(matches!(Credential::parse(&v), Credential::Scram(_)));
        assert!(matches!(Credential::parse("md5xyz"), Credential::Plain(_)));
    }

    #[test]
    fn overrides_resolve_user_then_database_then_pool() {
        let mut p = PoolConfig::default();
        p.databases.insert(
            "app".into(),
            PoolOverride {
                mode: Some(PoolMode::Transaction),
                size: Some(5),
            },
        );
        p.users.insert(
            "admin".into(),
            PoolOverride {
                mode: Some(PoolMode::Session),
                size: None,
            },
        );
        assert_eq!(p.mode_for("app", "u"), PoolMode::Transaction);
        assert_eq!(p.mode_for("app", "admin"), PoolMode::Session);
        assert_eq!(p.mode_for("other", "u"), PoolMode::Session);
        assert_eq!(p.size_for("app", "admin"), 5);
        assert_eq!(p.size_for("other", "admin"), 20);
        assert!(p.validate(&AuthConfig::default()).is_err());
        let auth = AuthConfig {
            file: Some("users.txt".into()),
            ..AuthConfig::default()
        };
        assert!(p.validate(&auth).is_ok());
    }
}
