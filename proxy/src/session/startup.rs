//! The startup phase: TLS/GSS negotiation, CancelRequest handling, and the relayed
//! authentication exchange.
//!
//! In session mode spillway never authenticates application users itself: the StartupMessage goes to
//! PostgreSQL verbatim and every authentication message is relayed, so whatever
//! PostgreSQL accepts (trust, password, md5, SCRAM-SHA-256) works and spillway stores
//! no application password. Two messages are rewritten on the way: BackendKeyData
//! (the pid stays PostgreSQL's, the secret becomes spillway's, see `net::cancel`) and
//! AuthenticationSASL (channel-binding mechanisms are withdrawn: the client's TLS
//! channel ends at spillway, so binding to it could never verify upstream). In
//! transaction mode (`pool.mode`) spillway authenticates the client itself (`auth.rs`)
//! and greets it without any server connection.

use bytes::Bytes;

use super::state::ProtocolState;
use super::{End, Shared};
use crate::error::SessionError;
use crate::net::cancel::{CancelKey, UpstreamKey};
use crate::net::conn::{Conn, read_client_frame, read_upstream_frame};
use crate::net::stream::Stream;
use crate::protocol::ProtocolError;
use crate::protocol::backend::{self, AUTH_SASL};
use crate::protocol::startup::{self, StartupMessage, StartupPacket};

pub enum Established {
    Done(End),
    /// A login to the admin console succeeded: the session is spillway's own.
    Admin(std::sync::Arc<dyn super::Console>, Box<StartupMessage>),
    Session {
        upstream: Conn,
        state: ProtocolState,
        cancel_key: CancelKey,
        startup: Box<StartupMessage>,
    },
    /// Transaction mode: spillway authenticated the client; server connections are
    /// leased from `pool` as needed.
    Pooled {
        pool: std::sync::Arc<crate::net::pool::Pool>,
        /// The database's LISTEN/NOTIFY hub.
        hub: std::sync::Arc<crate::net::notify::Hub>,
        state: ProtocolState,
        cancel_key: CancelKey,
        startup: Box<StartupMessage>,
    },
}

/// Runs the startup phase on `client` (which may be upgraded to TLS on the way).
pub async fn establish(client: &mut Conn, shared: &Shared) -> Result<Established, SessionError> {
    let Some(startup) = negotiate(client, shared).await? else {
        return Ok(Established::Done(End::Cancel));
    };
    let span = tracing::Span::current();
    span.record("user", startup.user());
    span.record("database", startup.database());
    if let Some(console) = shared.console.as_ref().filter(|c| c.is_console(&startup)) {
        console.login(client, startup.user()).await?;
        return Ok(Established::Admin(console.clone(), Box::new(startup)));
    }
    if let Some(pooling) = shared
        .pooling
        .as_ref()
        .filter(|p| p.is_pooled(startup.database(), startup.user()))
    {
        return greet_pooled(client, shared, pooling, startup).await;
    }

    let mut upstream = Conn::new(shared.connector.connect().await?);
    upstream
        .send(&startup.raw)
        .await
        .map_err(SessionError::UpstreamIo)?;
    authenticate(client, upstream, shared, startup).await
}

/// Transaction mode: spillway authenticates the client (`auth.rs`) and greets it with
/// the pool's server parameters and a cancel key of its own; no server connection is
/// the session's.
async fn greet_pooled(
    client: &mut Conn,
    shared: &Shared,
    pooling: &super::auth::Pooling,
    startup: StartupMessage,
) -> Result<Established, SessionError> {
    let (pool, params) = pooling
        .login(client, startup.database(), startup.user())
        .await?;
    let cancel_key = shared.cancel.register_pooled();
    let mut state = ProtocolState::default();
    let mut out = bytes::BytesMut::new();
    for (name, value) in &params {
        let msg = backend::parameter_status(name, value);
        state.on_backend(backend::PARAMETER_STATUS, &msg[5..]);
        out.extend_from_slice(&msg);
    }
    out.extend_from_slice(&backend::backend_key_data(
        cancel_key.pid,
        &cancel_key.secret,
    ));
    out.extend_from_slice(&crate::protocol::frontend::ready_for_query(b'I'));
    client.send(&out).await.map_err(SessionError::ClientIo)?;
    Ok(Established::Pooled {
        pool,
        hub: pooling.listeners.hub(startup.database()),
        state,
        cancel_key,
        startup: Box::new(startup),
    })
}

/// Handles SSLRequest/GSSENCRequest/CancelRequest until a StartupMessage arrives.
/// Returns `None` when the connection was a CancelRequest.
///
/// Also run for a client refused over `server.max_client_conn`, which, as with
/// PostgreSQL, gets its SSLRequest answered and its cancel forwarded before the
/// refusal.
pub(super) async fn negotiate(
    client: &mut Conn,
    shared: &Shared,
) -> Result<Option<StartupMessage>, SessionError> {
    // As in PostgreSQL: one SSLRequest and one GSSENCRequest, SSL after a refused GSS,
    // GSS only after a refused SSL; a request that may not come any more is read as
    // a startup packet of an unsupported protocol version.
    let mut ssl_done = false;
    let mut gss_done = false;
    loop {
        let packet = match startup::parse(&mut client.inbuf)? {
            Some(p) => p,
            None => {
                if !client.fill().await.map_err(SessionError::ClientIo)? {
                    return Err(SessionError::ClientIo(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                continue;
            }
        };
        match packet {
            StartupPacket::SslRequest if ssl_done => {
                let (major, minor) = startup::version(startup::SSL_REQUEST_CODE);
                return Err(ProtocolError::UnsupportedVersion { major, minor }.into());
            }
            StartupPacket::GssEncRequest if gss_done => {
                let (major, minor) = startup::version(startup::GSSENC_REQUEST_CODE);
                return Err(ProtocolError::UnsupportedVersion { major, minor }.into());
            }
            StartupPacket::SslRequest => {
                ssl_done = true;
                // Bytes pipelined after SSLRequest would bypass encryption
                // (CVE-2021-23214 in PostgreSQL); refuse them.
                if !client.inbuf.is_empty() {
                    return Err(
                        ProtocolError::BadStartup("unencrypted data after SSLRequest").into(),
                    );
                }
                match &shared.tls {
                    Some(acceptor) => {
                        client.send(b"S").await.map_err(SessionError::ClientIo)?;
                        let Stream::Plain(tcp) =
                            std::mem::replace(&mut client.stream, Stream::Detached)
                        else {
                            return Err(ProtocolError::BadStartup("nested TLS").into());
                        };
                        let tls = acceptor
                            .accept(tcp)
                            .await
                            .map_err(SessionError::ClientTls)?;
                        client.stream = Stream::ServerTls(Box::new(tls));
                        gss_done = true;
                    }
                    None => client.send(b"N").await.map_err(SessionError::ClientIo)?,
                }
            }
            StartupPacket::GssEncRequest => {
                gss_done = true;
                client.send(b"N").await.map_err(SessionError::ClientIo)?;
            }
            StartupPacket::CancelRequest { pid, secret } => {
                match shared.cancel.lookup(pid, &secret) {
                    Some(key) => {
                        tracing::debug!(pid, "forwarding cancel request");
                        // A cancel connection never gets an answer (PostgreSQL sends
                        // none either), so a failure is only logged.
                        if let Err(err) = shared.connector.cancel(&key).await {
                            tracing::warn!(pid, error = %err, "could not forward cancel request");
                        }
                    }
                    // PostgreSQL ignores unknown keys silently; so does spillway.
                    None => tracing::info!(pid, "cancel request with unknown key ignored"),
                }
                return Ok(None);
            }
            StartupPacket::Startup(msg) => return Ok(Some(msg)),
        }
    }
}

/// Largest client message accepted before authentication completes (header included).
pub const MAX_AUTH_MESSAGE: usize = 65_535 + 5;

/// Authentication request codes after which the client must answer.
fn expects_client_answer(code: i32) -> bool {
    // 3 cleartext, 5 md5, 7 GSS, 8 GSS continue, 9 SSPI, 10 SASL, 11 SASL continue.
    matches!(code, 3 | 5 | 7 | 8 | 9 | 10 | 11)
}

async fn authenticate(
    client: &mut Conn,
    mut upstream: Conn,
    shared: &Shared,
    startup: StartupMessage,
) -> Result<Established, SessionError> {
    // PostgreSQL caps authentication messages at PG_MAX_AUTH_TOKEN_LENGTH (65535);
    // before login nobody may make spillway buffer more than that.
    let limit = MAX_AUTH_MESSAGE;
    let mut state = ProtocolState::default();
    let mut cancel_key = None;
    loop {
        let (tag, msg) = read_upstream_frame(&mut upstream).await?;
        let body = &msg[5..];
        match tag {
            backend::AUTHENTICATION => {
                let code =
                    backend::authentication_code(body).ok_or(SessionError::UpstreamProtocol {
                        tag: 'R',
                        phase: "authentication",
                    })?;
                let out = if code == AUTH_SASL {
                    without_channel_binding(body)?
                } else {
                    msg.clone()
                };
                client.send(&out).await.map_err(SessionError::ClientIo)?;
                if expects_client_answer(code) {
                    let answer = read_client_frame(client, limit).await?;
                    upstream
                        .send(&answer)
                        .await
                        .map_err(SessionError::UpstreamIo)?;
                }
            }
            backend::BACKEND_KEY_DATA => {
                let (pid, secret) = backend::parse_backend_key_data(body)
                    .map_err(SessionError::UpstreamMalformed)?;
                let key = shared.cancel.register(UpstreamKey { pid, secret });
                client
                    .send(&backend::backend_key_data(key.pid, &key.secret))
                    .await
                    .map_err(SessionError::ClientIo)?;
                cancel_key = Some(key);
            }
            backend::ERROR_RESPONSE => {
                // Authentication failed or the server refused us (too many clients,
                // database does not exist, shutting down...): PostgreSQL's own error is
                // what the client should see.
                let fields = backend::parse_error_fields(body).unwrap_or_default();
                client.send(&msg).await.map_err(SessionError::ClientIo)?;
                tracing::info!(sqlstate = %fields.code, message = %fields.message, "upstream refused the session");
                return Ok(Established::Done(End::AuthRefused));
            }
            backend::READY_FOR_QUERY => {
                state.on_backend(tag, body);
                client.send(&msg).await.map_err(SessionError::ClientIo)?;
                let cancel_key = cancel_key.ok_or(SessionError::UpstreamProtocol {
                    tag: 'Z',
                    phase: "startup without BackendKeyData",
                })?;
                return Ok(Established::Session {
                    upstream,
                    state,
                    cancel_key,
                    startup: Box::new(startup),
                });
            }
            _ => {
                state.on_backend(tag, body);
                client.send(&msg).await.map_err(SessionError::ClientIo)?;
            }
        }
    }
}

/// Re-encodes an AuthenticationSASL offer without `-PLUS` (channel binding) mechanisms.
fn without_channel_binding(body: &[u8]) -> Result<Bytes, SessionError> {
    let mechanisms: Vec<String> = backend::sasl_mechanisms(body)
        .map_err(SessionError::UpstreamMalformed)?
        .into_iter()
        .filter(|m| !m.ends_with("-PLUS"))
        .collect();
    Ok(backend::authentication_sasl(mechanisms))
}
