//! Opening connections to PostgreSQL: TCP with a timeout, `TCP_NODELAY`, keepalive, and
//! TLS per the backend URL's `sslmode`. Also forwards CancelRequests, and probes
//! whether PostgreSQL accepts sessions at all (a session whose backend ended asks).

use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{BackendTarget, SslMode};
use crate::error::SessionError;
use crate::net::cancel::UpstreamKey;
use crate::net::conn::{Conn, read_upstream_frame};
use crate::net::stream::Stream;
use crate::protocol::backend;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::{CANCEL_REQUEST_CODE, SSL_REQUEST_CODE};

/// Cancels whatever one upstream session is running, as a client's CancelRequest
/// would. Used when nobody is left to receive the answer.
#[derive(Clone)]
pub struct Canceller {
    pub connector: Connector,
    pub key: UpstreamKey,
}

impl Canceller {
    /// Fires the cancel on a task of its own (bounded by the connect timeout) so the
    /// session can close without waiting for it.
    pub fn spawn(self) {
        tokio::spawn(async move {
            if let Err(err) = self.connector.cancel(&self.key).await {
                tracing::warn!(pid = self.key.pid, error = %err, "could not cancel an abandoned query");
            }
        });
    }
}

/// What an upstream connection needs: where, how, and how long to try.
#[derive(Clone)]
pub struct Connector {
    pub target: BackendTarget,
    pub tls: TlsConnector,
    pub connect_timeout: Duration,
}

impl Connector {
    fn addr(&self) -> String {
        if self.target.host.contains(':') {
            format!("[{}]:{}", self.target.host, self.target.port)
        } else {
            format!("{}:{}", self.target.host, self.target.port)
        }
    }

    fn connect_error(&self, reason: impl ToString) -> SessionError {
        SessionError::UpstreamConnect {
            addr: self.addr(),
            reason: reason.to_string(),
        }
    }

    async fn tcp(&self) -> Result<TcpStream, SessionError> {
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.target.host.as_str(), self.target.port)),
        )
        .await
        .map_err(|_| self.connect_error(format!("timed out after {:?}", self.connect_timeout)))?
        .map_err(|e| self.connect_error(e))?;
        tcp.set_nodelay(true).map_err(|e| self.connect_error(e))?;
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        socket2::SockRef::from(&tcp)
            .set_tcp_keepalive(&keepalive)
            .map_err(|e| self.connect_error(e))?;
        Ok(tcp)
    }

    /// A connection ready for the StartupMessage.
    pub async fn connect(&self) -> Result<Stream, SessionError> {
        let mut tcp = self.tcp().await?;
        if self.target.sslmode == SslMode::Disable {
            return Ok(Stream::Plain(tcp));
        }
        let mut req = Vec::with_capacity(8);
        req.put_i32(8);
        req.put_i32(SSL_REQUEST_CODE);
        tcp.write_all(&req)
            .await
            .map_err(|e| self.connect_error(e))?;
        let answer = tcp.read_u8().await.map_err(|e| self.connect_error(e))?;
        match (answer, self.target.sslmode) {
            (b'S', _) => {
                let name = rustls::pki_types::ServerName::try_from(self.target.host.clone())
                    .map_err(|e| self.connect_error(e))?;
                let tls = tokio::time::timeout(self.connect_timeout, self.tls.connect(name, tcp))
                    .await
                    .map_err(|_| self.connect_error("TLS handshake timed out"))?
                    .map_err(|e| self.connect_error(format!("TLS handshake: {e}")))?;
                Ok(Stream::ClientTls(Box::new(tls)))
            }
            (b'N', SslMode::Prefer) => Ok(Stream::Plain(tcp)),
            (b'N', _) => {
                Err(self.connect_error("server does not support SSL, but sslmode=require"))
            }
            (other, _) => Err(self.connect_error(format!(
                "unexpected answer {:?} to SSLRequest",
                other as char
            ))),
        }
    }

    /// Forwards a cancel to PostgreSQL. Like libpq, it waits for the server to close
    /// the connection so the cancel has been processed when this returns.
    pub async fn cancel(&self, key: &UpstreamKey) -> Result<(), SessionError> {
        let mut stream = self.connect().await?;
        let mut msg = Vec::with_capacity(12 + key.secret.len());
        msg.put_i32((12 + key.secret.len()) as i32);
        msg.put_i32(CANCEL_REQUEST_CODE);
        msg.put_i32(key.pid);
        msg.extend_from_slice(&key.secret);
        stream
            .write_all(&msg)
            .await
            .map_err(SessionError::UpstreamIo)?;
        stream.flush().await.map_err(SessionError::UpstreamIo)?;
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(self.connect_timeout, stream.read(&mut sink)).await;
        Ok(())
    }

    /// Whether PostgreSQL accepts sessions now: connects, sends `startup` and reads
    /// the first answer. Unreachable, silent for the connect timeout, or refusing with
    /// 57P03 (starting up, shutting down, in recovery): `false`. Anything else, an
    /// authentication request or another refusal (too many clients, say), means a
    /// postmaster is there to answer: `true`. The probe connection is dropped unused.
    pub async fn accepts_sessions(&self, startup: &[u8]) -> bool {
        let probe = async {
            let mut conn = Conn::new(self.connect().await.ok()?);
            conn.send(startup).await.ok()?;
            let (tag, msg) = read_upstream_frame(&mut conn).await.ok()?;
            if tag != backend::ERROR_RESPONSE {
                return Some(true);
            }
            let fields = backend::parse_error_fields(&msg[5..]).ok()?;
            Some(SqlState::of(&fields.code) != Some(SqlState::CANNOT_CONNECT_NOW))
        };
        // The connect has its own timeout; the answer gets as long again.
        tokio::time::timeout(self.connect_timeout * 2, probe)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }
}
