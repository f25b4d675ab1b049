//! Client authentication by spillway, for sessions in transaction mode (ADR 0025): the
//! credentials spillway holds (`auth.file`, else `auth.query` run as `auth.user`), the
//! SCRAM-SHA-256 and md5 exchanges with the client, and the greeting that follows
//! (ParameterStatus of the pool's server, spillway's own BackendKeyData, ReadyForQuery).
//!
//! Invariants:
//! - A wrong password and an unknown role get the same FATAL 28P01 after the same
//!   exchange (an unknown role runs SCRAM against a verifier nothing matches), as
//!   PostgreSQL does: the answer never tells which roles exist.
//! - A session in session mode never comes here: its authentication is relayed.
//! - No password is logged or kept beyond the pool that logs in with it.
//! - A login derives no key from a password more than once per role and password: the
//!   SCRAM verifier of a plain password (4,096 PBKDF2 rounds, about 70 million
//!   instructions) is made at the role's first login and kept with the password it was
//!   made from ([`Verifiers`]); an unknown role gets a mock verifier that costs nothing
//!   to make. So no client, authenticated or not, makes spillway derive keys at will.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rand::Rng;

use crate::config::Config;
use crate::config::pool::{AuthConfig, AuthFile, Credential, PoolConfig, PoolMode};
use crate::error::SessionError;
use crate::net::conn::{Conn, read_client_frame};
use crate::net::notify::Listeners;
use crate::net::pool::{Pool, PoolSecret, Pools};
use crate::net::upstream::Connector;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::{backend, frontend, scram};

/// Largest PasswordMessage accepted (PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH, 65535,
/// plus the header), as for relayed authentication.
const MAX_PASSWORD_MESSAGE: usize = 65_535 + 5;

/// Everything transaction mode needs: the pools and the credentials.
pub struct Pooling {
    pub pools: Pools,
    /// The listener connections of LISTEN/NOTIFY, one per database (ADR 0031).
    pub listeners: Listeners,
    config: PoolConfig,
    file: AuthFile,
    auth: AuthConfig,
    /// `backend.url`, for `auth.user`'s connection (host, port, TLS, maybe password).
    backend_url: String,
    verifiers: Verifiers,
}

/// Roles at most kept in [`Verifiers`]; past it the map starts again (each role then
/// derives its verifier once more).
const MAX_VERIFIERS: usize = 10_000;

/// SCRAM verifiers made from plain passwords (the auth file's, or `auth.query`'s
/// answer), by role, each with the password it was made from: a changed password
/// makes a new one. Also the secret the mock verifiers of unknown roles derive their
/// salts from.
struct Verifiers {
    plain: Mutex<HashMap<String, (String, scram::Verifier)>>,
    mock_secret: [u8; 32],
}

impl Verifiers {
    fn new() -> Self {
        let mut mock_secret = [0u8; 32];
        rand::rng().fill(&mut mock_secret[..]);
        Self {
            plain: Mutex::new(HashMap::new()),
            mock_secret,
        }
    }

    /// The verifier for `user` with the plain `password`, derived only when none was
    /// made from that password yet.
    fn plain(&self, user: &str, password: &str) -> scram::Verifier {
        if let Ok(map) = self.plain.lock()
            && let Some((p, v)) = map.get(user)
            && p == password
        {
            return v.clone();
        }
        let verifier = scram::Verifier::from_password(password);
        if let Ok(mut map) = self.plain.lock() {
            if map.len() >= MAX_VERIFIERS && !map.contains_key(user) {
                map.clear();
            }
            map.insert(user.to_owned(), (password.to_owned(), verifier.clone()));
        }
        verifier
    }

    fn mock(&self, user: &str) -> scram::Verifier {
        scram::Verifier::mock(user, &self.mock_secret)
    }
}

impl Pooling {
    /// `None` when no database or user is in transaction mode; an error names an
    /// unreadable auth file.
    pub fn new(config: &Config, connector: Connector) -> Result<Option<Arc<Self>>, String> {
        if !config.pool.any_transaction() {
            return Ok(None);
        }
        let file = match &config.auth.file {
            Some(path) => crate::config::pool::read_auth_file(path)?,
            None => AuthFile::new(),
        };
        Ok(Some(Arc::new(Self {
            pools: Pools::new(config.pool.clone(), connector),
            listeners: Listeners::new(config.pool.notify_queue as usize),
            config: config.pool.clone(),
            file,
            auth: config.auth.clone(),
            backend_url: config.backend.url.clone(),
            verifiers: Verifiers::new(),
        })))
    }

    pub fn is_pooled(&self, database: &str, user: &str) -> bool {
        self.config.mode_for(database, user) == PoolMode::Transaction
    }

    /// What spillway holds for `user`: the auth file's entry, else `auth.query`'s answer
    /// (`None`: no such role, or one without a password).
    async fn credential(
        &self,
        database: &str,
        user: &str,
    ) -> Result<Option<Credential>, SessionError> {
        if let Some(c) = self.file.get(user) {
            return Ok(Some(c.clone()));
        }
        let Some(auth_user) = &self.auth.user else {
            return Ok(None);
        };
        self.query(database, auth_user, user).await
    }

    /// Runs `auth.query` as `auth_user` in `database`.
    async fn query(
        &self,
        database: &str,
        auth_user: &str,
        user: &str,
    ) -> Result<Option<Credential>, SessionError> {
        use sqlx::ConnectOptions;
        let refused = |message: String| SessionError::AuthRefused {
            code: SqlState::INVALID_AUTHORIZATION,
            message,
        };
        let url =
            url::Url::parse(&self.backend_url).map_err(|e| refused(format!("backend.url: {e}")))?;
        let same_user = url.username() == auth_user;
        let mut options: sqlx::postgres::PgConnectOptions = self
            .backend_url
            .parse()
            .map_err(|e| refused(format!("backend.url: {e}")))?;
        options = options
            .username(auth_user)
            .database(database)
            .application_name("spillway auth_query");
        options = match self.file.get(auth_user) {
            Some(Credential::Plain(p)) => options.password(p),
            _ if same_user => options,
            _ => options.password(""),
        };
        let mut conn = options.connect().await.map_err(|e| {
            refused(format!(
                "spillway could not run auth.query as role \"{auth_user}\" (auth.user): {e}"
            ))
        })?;
        let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(&self.auth.query)
            .bind(user)
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| refused(format!("auth.query failed as role \"{auth_user}\": {e}")))?;
        let _ = sqlx::Connection::close(conn).await;
        Ok(row.and_then(|(_, p)| p).map(|p| Credential::parse(&p)))
    }

    /// Authenticates `user` on `client` and greets it up to ReadyForQuery. Returns the
    /// pool the session leases from and the parameters it was greeted with.
    pub async fn login(
        &self,
        client: &mut Conn,
        database: &str,
        user: &str,
    ) -> Result<(Arc<Pool>, Vec<(String, String)>), SessionError> {
        let credential = self.credential(database, user).await?;
        let keys = authenticate(client, user, credential.as_ref(), &self.verifiers).await?;
        let secret = match (&credential, keys) {
            (Some(Credential::Plain(p)), _) => Some(PoolSecret::Password(p.clone())),
            (Some(Credential::Md5(h)), _) => Some(PoolSecret::Md5(h.clone())),
            (_, Some(keys)) => Some(PoolSecret::Scram(keys)),
            _ => None,
        };
        let pool = self.pools.get(database, user, secret);
        // The greeting carries the server's parameters; while PostgreSQL cannot be
        // reached the session still starts (deferred writes and cache hits).
        if let Err(err) = pool.warm().await {
            match err {
                SessionError::PoolLogin { .. } => return Err(err),
                other => {
                    tracing::info!(error = %other, "pooled session starts without a server connection")
                }
            }
        }
        let params = pool
            .params()
            .unwrap_or_else(crate::net::pool::fallback_params);
        Ok((pool, params))
    }
}

/// The exchange with the client: SCRAM-SHA-256 against a verifier (a plain password
/// becomes one), md5 against an md5 hash. `None`: unknown role. Returns the keys a
/// SCRAM proof against a stored verifier revealed (for SCRAM passthrough).
async fn authenticate(
    client: &mut Conn,
    user: &str,
    credential: Option<&Credential>,
    verifiers: &Verifiers,
) -> Result<Option<scram::ScramKeys>, SessionError> {
    let wrong = || SessionError::AuthRefused {
        code: SqlState::INVALID_PASSWORD,
        message: format!("password authentication failed for user \"{user}\""),
    };
    match credential {
        Some(Credential::Md5(hash)) => md5_exchange(client, hash)
            .await?
            .then_some(None)
            .ok_or_else(wrong),
        other => {
            let verifier = match other {
                Some(Credential::Scram(v)) => v.clone(),
                Some(Credential::Plain(p)) => verifiers.plain(user, p),
                // Unknown role: an exchange nothing can pass, then the same 28P01.
                _ => verifiers.mock(user),
            };
            match scram_exchange(client, &verifier).await? {
                Some(keys) if other.is_some() => Ok(Some(keys)),
                _ => Err(wrong()),
            }
        }
    }
}

/// SCRAM-SHA-256 as PostgreSQL runs it; the keys the proof revealed, `None` for a
/// wrong proof.
async fn scram_exchange(
    client: &mut Conn,
    verifier: &scram::Verifier,
) -> Result<Option<scram::ScramKeys>, SessionError> {
    client
        .send(&backend::authentication_sasl(vec![
            scram::MECHANISM.to_owned(),
        ]))
        .await
        .map_err(SessionError::ClientIo)?;
    let initial = password_message(client).await?;
    let (mechanism, data) =
        frontend::sasl_initial_response(&initial).ok_or(malformed("SASLInitialResponse"))?;
    if mechanism != scram::MECHANISM {
        return Err(malformed("SASL mechanism not offered"));
    }
    let (exchange, server_first) = match scram::Exchange::start(verifier, data) {
        Ok(x) => x,
        Err(scram::ScramError::Malformed(what)) => return Err(malformed(what)),
        Err(scram::ScramError::WrongPassword) => return Ok(None),
    };
    client
        .send(&backend::authentication_sasl_continue(
            server_first.into_bytes(),
        ))
        .await
        .map_err(SessionError::ClientIo)?;
    let response = password_message(client).await?;
    match exchange.finish_with_keys(&response) {
        Ok((server_final, keys)) => {
            let mut out = BytesMut::new();
            out.extend_from_slice(&backend::authentication_sasl_final(
                server_final.into_bytes(),
            ));
            out.extend_from_slice(&backend::authentication_ok());
            client.send(&out).await.map_err(SessionError::ClientIo)?;
            Ok(Some(keys))
        }
        Err(scram::ScramError::WrongPassword) => Ok(None),
        Err(scram::ScramError::Malformed(what)) => Err(malformed(what)),
    }
}

/// md5 against `hash` (hex of md5(password || user)); `false` for a wrong answer.
async fn md5_exchange(client: &mut Conn, hash: &str) -> Result<bool, SessionError> {
    let mut salt = [0u8; 4];
    rand::rng().fill(&mut salt[..]);
    let mut msg = BytesMut::new();
    msg.extend_from_slice(&[b'R', 0, 0, 0, 12, 0, 0, 0, 5]);
    msg.extend_from_slice(&salt);
    client.send(&msg).await.map_err(SessionError::ClientIo)?;
    let answer = password_message(client).await?;
    let answer = answer.strip_suffix(&[0]).unwrap_or(&answer);
    let ok = answer == crate::net::pool::md5_answer(hash, &salt).as_bytes();
    if ok {
        client
            .send(&backend::authentication_ok())
            .await
            .map_err(SessionError::ClientIo)?;
    }
    Ok(ok)
}

fn malformed(what: &'static str) -> SessionError {
    SessionError::Protocol(crate::protocol::ProtocolError::Malformed { what })
}

/// The body of the client's next message, which must be a PasswordMessage ('p').
async fn password_message(client: &mut Conn) -> Result<bytes::Bytes, SessionError> {
    let msg = read_client_frame(client, MAX_PASSWORD_MESSAGE).await?;
    if msg[0] != b'p' {
        return Err(malformed("expected a password message"));
    }
    Ok(msg.slice(5..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_password_is_derived_once_per_role_and_password() {
        let v = Verifiers::new();
        let first = v.plain("alice", "one");
        // The same salt and keys: the kept verifier, not a new derivation.
        assert_eq!(first, v.plain("alice", "one"));
        // Another password (or another role) gets its own.
        let changed = v.plain("alice", "two");
        assert_ne!(first, changed);
        assert_eq!(changed, v.plain("alice", "two"));
        assert_ne!(v.plain("bob", "two"), changed);
    }
}
