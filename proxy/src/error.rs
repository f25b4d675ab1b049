//! The session layer's error type, and the one function that turns an error into what
//! the client sees.
//!
//! Every error knows which side caused it (client, upstream, or spillway itself) and
//! whether retrying could help. [`ClientError::encode`] is the only place an error of
//! spillway's becomes an ErrorResponse, always with a typed [`SqlState`]: the FATAL that
//! ends a session ([`SessionError::to_client`]), the ERROR a deferred write or a held
//! transaction is answered with, and the admin console's errors all go through it, so
//! SQLSTATEs stay consistent. PostgreSQL's own errors are relayed untouched.

use std::io;

use bytes::Bytes;

use crate::protocol::ProtocolError;
use crate::protocol::backend::{Severity, error_response, error_response_with_detail};
use crate::protocol::sqlstate::SqlState;

/// An error spillway answers a client with itself: an ERROR the session survives (a
/// refused deferred write, a failed held transaction, a console command) or the FATAL
/// that ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub severity: Severity,
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
}

impl ClientError {
    /// An ERROR: the request fails, the session goes on.
    pub fn error(code: SqlState, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            code,
            message: message.into(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The ErrorResponse: the one place an error of spillway's becomes wire bytes.
    pub fn encode(&self) -> Bytes {
        match &self.detail {
            Some(d) => error_response_with_detail(self.severity, self.code, &self.message, d),
            None => error_response(self.severity, self.code, &self.message),
        }
    }
}

/// Which party a failure is attributed to (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Spillway,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Spillway => "spillway",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("client did not complete startup within {0:?}")]
    StartupTimeout(std::time::Duration),
    #[error("TLS handshake with client failed: {0}")]
    ClientTls(io::Error),
    #[error("client connection: {0}")]
    ClientIo(io::Error),
    #[error("cannot connect to upstream {addr}: {reason}")]
    UpstreamConnect { addr: String, reason: String },
    #[error("upstream connection lost: {0}")]
    UpstreamIo(io::Error),
    #[error("upstream closed the connection unexpectedly")]
    UpstreamClosed,
    /// A detached session (its upstream connection died while it was idle) was asked
    /// for something only PostgreSQL can answer; `cause` is how the connection ended.
    #[error("upstream connection lost ({cause}); reconnect")]
    UpstreamLost { cause: String },
    #[error("upstream sent a malformed message: {0}")]
    UpstreamMalformed(ProtocolError),
    #[error("upstream sent an unexpected message {tag:?} during {phase}")]
    UpstreamProtocol { tag: char, phase: &'static str },
    #[error("too many client connections (server.max_client_conn = {0})")]
    TooManyClients(usize),
    #[error("terminating connection due to administrator command")]
    Shutdown,
    /// Transaction mode: no server connection came free within `pool.queue_timeout`.
    #[error("no server connection free within pool.queue_timeout ({0:?}); the pool is exhausted")]
    PoolTimeout(std::time::Duration),
    /// Transaction mode: a pooled server connection could not log in.
    #[error("spillway could not log in to PostgreSQL for the pool: {message}")]
    PoolLogin { message: String },
    /// spillway authenticates the client itself (transaction mode) and refused it:
    /// 28P01 for a wrong password or unknown role (PostgreSQL does not tell them apart),
    /// 28000 when spillway cannot look the role up (`auth.query`).
    #[error("{message}")]
    AuthRefused { code: SqlState, message: String },
    /// The admin console refused a login (28000 role not allowed, 28P01 password).
    #[error("{message}")]
    AdminRefused { code: SqlState, message: String },
}

impl SessionError {
    pub fn side(&self) -> Side {
        match self {
            SessionError::Protocol(_)
            | SessionError::StartupTimeout(_)
            | SessionError::ClientTls(_)
            | SessionError::ClientIo(_)
            | SessionError::AdminRefused { .. }
            | SessionError::AuthRefused { .. } => Side::Client,
            SessionError::UpstreamConnect { .. }
            | SessionError::UpstreamIo(_)
            | SessionError::UpstreamClosed
            | SessionError::UpstreamLost { .. }
            | SessionError::UpstreamMalformed(_)
            | SessionError::UpstreamProtocol { .. }
            | SessionError::PoolLogin { .. } => Side::Upstream,
            SessionError::TooManyClients(_)
            | SessionError::Shutdown
            | SessionError::PoolTimeout(_) => Side::Spillway,
        }
    }

    pub fn sqlstate(&self) -> SqlState {
        match self {
            SessionError::Protocol(p) => p.sqlstate(),
            SessionError::StartupTimeout(_)
            | SessionError::ClientTls(_)
            | SessionError::ClientIo(_) => SqlState::PROTOCOL_VIOLATION,
            SessionError::UpstreamConnect { .. }
            | SessionError::UpstreamIo(_)
            | SessionError::UpstreamClosed
            | SessionError::UpstreamLost { .. } => SqlState::CONNECTION_FAILURE,
            SessionError::UpstreamProtocol { .. } | SessionError::UpstreamMalformed(_) => {
                SqlState::PROTOCOL_VIOLATION
            }
            SessionError::TooManyClients(_) => SqlState::TOO_MANY_CONNECTIONS,
            SessionError::Shutdown => SqlState::ADMIN_SHUTDOWN,
            SessionError::AdminRefused { code, .. } | SessionError::AuthRefused { code, .. } => {
                *code
            }
            SessionError::PoolTimeout(_) => SqlState::TOO_MANY_CONNECTIONS,
            SessionError::PoolLogin { .. } => SqlState::CONNECTION_FAILURE,
        }
    }

    /// Whether the client may usefully reconnect and try again.
    pub fn is_retryable(&self) -> bool {
        self.sqlstate().is_transient() && self.side() != Side::Client
    }

    /// The FATAL ErrorResponse to send before closing, or `None` when the client
    /// connection itself is broken and nothing can be delivered, or when PostgreSQL
    /// would close without a word.
    pub fn to_client(&self) -> Option<Bytes> {
        match self {
            SessionError::ClientIo(_) | SessionError::ClientTls(_) => None,
            // Answered with silence, as PostgreSQL does (it only logs it).
            SessionError::Protocol(ProtocolError::BadStartupLength) => None,
            other => Some(
                ClientError {
                    severity: Severity::Fatal,
                    code: other.sqlstate(),
                    message: other.to_string(),
                    detail: None,
                }
                .encode(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::parse_error_fields;

    #[test]
    fn shutdown_is_57p01_and_retryable() {
        let e = SessionError::Shutdown;
        let msg = e.to_client().expect("sent");
        let f = parse_error_fields(&msg[5..]).expect("parses");
        assert_eq!(f.code, "57P01");
        assert!(f.is_fatal());
        assert!(e.is_retryable());
    }

    #[test]
    fn broken_client_gets_nothing() {
        let e = SessionError::ClientIo(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(e.to_client().is_none());
        assert!(!e.is_retryable());
    }

    #[test]
    fn lost_upstream_is_a_retryable_08006_naming_the_cause() {
        let e = SessionError::UpstreamLost {
            cause: "PostgreSQL: terminating connection due to administrator command (57P01)"
                .to_owned(),
        };
        let msg = e.to_client().expect("sent");
        let f = parse_error_fields(&msg[5..]).expect("parses");
        assert_eq!(f.code, "08006");
        assert!(f.is_fatal());
        assert!(f.message.contains("administrator command"), "{}", f.message);
        assert!(f.message.ends_with("reconnect"), "{}", f.message);
        assert!(e.is_retryable());
    }

    #[test]
    fn oversized_message_is_54000() {
        let e = SessionError::Protocol(ProtocolError::TooLarge {
            tag: 'Q',
            len: 10,
            limit: 5,
        });
        assert_eq!(e.sqlstate().code(), "54000");
    }
}
