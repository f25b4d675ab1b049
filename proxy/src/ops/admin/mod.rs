//! The admin console: a client that connects to database `spillway` talks to spillway
//! itself, not to PostgreSQL, and gets `SHOW STATS | CACHE | TABLES | PENDING | CLIENTS |
//! KEYS | REPLICATION`,
//! `FLUSH [table]`, `INVALIDATE table` and `RELOAD` answered as ordinary result sets
//! (SPEC §7).
//!
//! Access: only roles listed in `admin.users`, authenticated with SCRAM-SHA-256
//! against the verifier of `admin.password` ([`scram`]). Another role gets FATAL
//! 28000, a wrong password 28P01. Without `admin.users` there is no console and
//! database `spillway` is relayed to PostgreSQL like any other.
//!
//! Protocol: the simple query protocol (several statements separated by `;` run in
//! turn, stopping at the first error). Extended-protocol messages get one 0A000 per
//! cycle and are skipped to Sync. Not a PostgreSQL: no transactions, no catalog
//! queries, so psql's backslash commands fail.
//!
//! Invariant: a console session never opens an upstream connection; it reads shared
//! state (cache, write service, client list, metrics) and, for FLUSH and INVALIDATE,
//! calls the same operations sessions use.

pub mod commands;
mod keys;
mod pools;
mod replication;

use bytes::{Bytes, BytesMut};

use std::sync::Arc;

use crate::config::{AdminConfig, Config};
use crate::error::{ClientError, SessionError};
use crate::net::conn::Conn;
use crate::net::signal::Phase;
use crate::net::signal::ShutdownSignals;
use crate::net::stream::Stream;
use crate::ops::reload::Reloader;
use crate::protocol::backend;
use crate::protocol::frame;
use crate::protocol::frontend;
use crate::protocol::scram;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::StartupMessage;
use crate::read::cache::ReadCache;
use crate::session::ConsoleFuture;
use crate::session::End;
pub use crate::session::clients::{ClientInfo, Clients, Registration};
use crate::write::service::WriteService;
use commands::Reply;

/// The database name that reaches the console.
pub const DATABASE: &str = "spillway";

/// Whether this startup is for the console (database `spillway` with a console
/// configured).
pub fn is_console(admin: &AdminConfig, startup: &StartupMessage) -> bool {
    !admin.users.is_empty() && startup.database() == DATABASE
}

/// What the console reads and acts on: the state sessions share, and the reloader.
pub struct Console {
    pub config: Arc<Config>,
    pub cache: Option<Arc<ReadCache>>,
    /// The write service and its database, as sessions have it.
    pub writes: Option<(Arc<WriteService>, String)>,
    pub clients: Arc<Clients>,
    pub signals: Arc<ShutdownSignals>,
    /// The config in force and hot reload (`RELOAD`, `SHOW TABLES`).
    pub reload: Arc<Reloader>,
    /// Transaction mode's pools (`SHOW POOLS`).
    pub pooling: Option<Arc<crate::session::auth::Pooling>>,
}

impl Console {
    fn max_message_bytes(&self) -> usize {
        usize::try_from(self.config.server.max_message_bytes.as_u64()).unwrap_or(usize::MAX)
    }
}

impl crate::session::Console for Console {
    fn is_console(&self, startup: &StartupMessage) -> bool {
        is_console(&self.config.admin, startup)
    }

    fn login<'a>(&'a self, client: &'a mut Conn, user: &'a str) -> ConsoleFuture<'a, ()> {
        Box::pin(login(client, &self.config.admin, user))
    }

    fn serve<'a>(
        &'a self,
        client: Conn,
        startup: &'a StartupMessage,
        peer: std::net::SocketAddr,
    ) -> ConsoleFuture<'a, End> {
        Box::pin(serve(client, self, startup, peer))
    }
}

/// Authenticates a console login on `client`: FATAL 28000 for a role not in
/// `admin.users`, 28P01 for a wrong password. Sends AuthenticationOk on success; the
/// rest of the greeting is [`serve`]'s.
pub async fn login(
    client: &mut crate::net::conn::Conn,
    admin: &AdminConfig,
    user: &str,
) -> Result<(), SessionError> {
    if !admin.users.iter().any(|u| u == user) {
        return Err(SessionError::AdminRefused {
            code: SqlState::INVALID_AUTHORIZATION,
            message: format!(
                "role \"{user}\" may not use the spillway admin console (admin.users)"
            ),
        });
    }
    let wrong_password = || SessionError::AdminRefused {
        code: SqlState::INVALID_PASSWORD,
        message: format!("password authentication failed for user \"{user}\""),
    };
    let Some(verifier) = admin.verifier() else {
        return Err(wrong_password());
    };
    client
        .send(&backend::authentication_sasl(vec![
            scram::MECHANISM.to_owned(),
        ]))
        .await
        .map_err(SessionError::ClientIo)?;
    let limit = crate::session::startup::MAX_AUTH_MESSAGE;
    let initial = read_password_message(client, limit).await?;
    let (mechanism, data) =
        frontend::sasl_initial_response(&initial).ok_or(malformed("SASLInitialResponse"))?;
    if mechanism != scram::MECHANISM {
        return Err(malformed("SASL mechanism not offered"));
    }
    let (exchange, server_first) =
        scram::Exchange::start(&verifier, data).map_err(|e| scram_error(e, &wrong_password))?;
    client
        .send(&backend::authentication_sasl_continue(
            server_first.into_bytes(),
        ))
        .await
        .map_err(SessionError::ClientIo)?;
    let response = read_password_message(client, limit).await?;
    let server_final = exchange
        .finish(&response)
        .map_err(|e| scram_error(e, &wrong_password))?;
    let mut out = BytesMut::new();
    out.extend_from_slice(&backend::authentication_sasl_final(
        server_final.into_bytes(),
    ));
    out.extend_from_slice(&backend::authentication_ok());
    client.send(&out).await.map_err(SessionError::ClientIo)?;
    Ok(())
}

fn malformed(what: &'static str) -> SessionError {
    SessionError::Protocol(crate::protocol::ProtocolError::Malformed { what })
}

fn scram_error(err: scram::ScramError, wrong: &dyn Fn() -> SessionError) -> SessionError {
    match err {
        scram::ScramError::WrongPassword => wrong(),
        scram::ScramError::Malformed(what) => malformed(what),
    }
}

/// The body of the client's next message, which must be a PasswordMessage ('p').
async fn read_password_message(
    client: &mut crate::net::conn::Conn,
    limit: usize,
) -> Result<Bytes, SessionError> {
    let msg = crate::net::conn::read_client_frame(client, limit).await?;
    if msg.first() != Some(&b'p') {
        return Err(malformed("expected a SASL response"));
    }
    Ok(msg.slice(5..))
}

/// Runs a logged-in console session until the client leaves or spillway shuts down.
pub async fn serve(
    mut client: crate::net::conn::Conn,
    shared: &Console,
    startup: &StartupMessage,
    peer: std::net::SocketAddr,
) -> Result<End, SessionError> {
    let mut out = BytesMut::new();
    let version = format!("{}/spillway", env!("CARGO_PKG_VERSION"));
    for (name, value) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        (
            "application_name",
            startup.param("application_name").unwrap_or(""),
        ),
    ] {
        out.extend_from_slice(&backend::parameter_status(name, value));
    }
    // Cancel requests for this key are ignored: nothing of the console is cancellable.
    out.extend_from_slice(&backend::backend_key_data(0, &rand::random::<[u8; 4]>()));
    out.extend_from_slice(&frontend::ready_for_query(b'I'));
    client.send(&out).await.map_err(SessionError::ClientIo)?;

    let tls = matches!(client.stream, Stream::ServerTls(_));
    let _listed = shared.clients.register(
        peer,
        startup.user(),
        DATABASE,
        startup.param("application_name").unwrap_or(""),
        tls,
    );
    let signals = shared.signals.subscribe();
    let limit = shared.max_message_bytes();
    // After an extended-protocol message was refused, the rest of its cycle is
    // skipped up to Sync (as PostgreSQL does after an error).
    let mut skipping = false;
    loop {
        let msg = tokio::select! {
            m = next_message(&mut client, limit) => match m? {
                Some(m) => m,
                None => return Ok(End::ClientClosed),
            },
            _ = phase_at_least(&signals, Phase::Draining) => return Err(SessionError::Shutdown),
        };
        let mut out = BytesMut::new();
        match msg[0] {
            b'Q' => {
                let Some(text) = frontend::query(frontend::body(&msg)) else {
                    return Err(malformed("Query"));
                };
                let run = run_query(text, shared, &mut out);
                tokio::select! {
                    () = run => {}
                    _ = phase_at_least(&signals, Phase::Terminating) => return Err(SessionError::Shutdown),
                }
                out.extend_from_slice(&frontend::ready_for_query(b'I'));
            }
            b'X' => return Ok(End::ClientClosed),
            b'S' => {
                skipping = false;
                out.extend_from_slice(&frontend::ready_for_query(b'I'));
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                if !skipping {
                    skipping = true;
                    out.extend_from_slice(&error(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "the spillway admin console speaks the simple query protocol only \
                         (psql, or simple_query)",
                    ));
                }
            }
            b'F' => {
                out.extend_from_slice(&error(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "the spillway admin console has no functions to call",
                ));
                out.extend_from_slice(&frontend::ready_for_query(b'I'));
            }
            // Copy messages outside COPY are ignored, as PostgreSQL does.
            b'd' | b'c' | b'f' => {}
            _ => return Err(malformed("frontend message for the admin console")),
        }
        if !out.is_empty() {
            client.send(&out).await.map_err(SessionError::ClientIo)?;
        }
    }
}

/// Runs each `;`-separated statement of a simple Query, stopping at the first error.
async fn run_query(text: &str, shared: &Console, out: &mut BytesMut) {
    let statements: Vec<&str> = text
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if statements.is_empty() {
        out.extend_from_slice(&backend::empty_query_response());
        return;
    }
    for statement in statements {
        let reply = match commands::parse(statement) {
            Ok(command) => commands::execute(command, shared).await,
            Err(message) => Reply::Error(SqlState::SYNTAX_ERROR, message),
        };
        match reply {
            Reply::Rows { columns, rows, tag } => {
                out.extend_from_slice(&backend::row_description(&columns));
                for row in &rows {
                    out.extend_from_slice(&backend::data_row(row));
                }
                let tag = if tag == "SHOW" {
                    tag.to_owned()
                } else {
                    format!("{tag} {}", rows.len())
                };
                out.extend_from_slice(&frontend::command_complete(&tag));
            }
            Reply::Done(tag) => out.extend_from_slice(&frontend::command_complete(tag)),
            Reply::Error(code, message) => {
                out.extend_from_slice(&error(code, &message));
                return;
            }
        }
    }
}

fn error(code: SqlState, message: &str) -> Bytes {
    ClientError::error(code, message).encode()
}

/// The next whole client message, or `None` at a clean end of the connection.
async fn next_message(
    client: &mut crate::net::conn::Conn,
    limit: usize,
) -> Result<Option<Bytes>, SessionError> {
    loop {
        if let Some(msg) = frame::parse(&mut client.inbuf, limit)? {
            return Ok(Some(msg.freeze()));
        }
        if !client.fill().await.map_err(SessionError::ClientIo)? {
            return if client.inbuf.is_empty() {
                Ok(None)
            } else {
                Err(SessionError::ClientIo(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ))
            };
        }
    }
}

async fn phase_at_least(signals: &crate::net::signal::Subscription, min: Phase) -> Phase {
    std::future::poll_fn(|cx| {
        let phase = signals.poll_phase(cx);
        if phase >= min {
            std::task::Poll::Ready(phase)
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}
