//! The load generator's own PostgreSQL wire client: one TCP stream, a read and a write
//! buffer, and the few messages a scenario needs (startup and authentication, Query,
//! Parse/Bind/Describe/Execute/Sync), encoded and authenticated with
//! `postgres-protocol` (the crate tokio-postgres is built on).
//!
//! Why not tokio-postgres on the measured path: on two shared cores the generator's
//! CPU per operation caps every ratio it reports, and tokio-postgres' request and
//! response channels, its connection task and its per-row decoding cost about twice
//! what pgbench spends per request (`loadtest/instructions.sh`). Here a request is one
//! write of bytes encoded into a reused buffer, and its answer is read in place up to
//! ReadyForQuery.
//!
//! Invariants:
//! - Every request is read to its ReadyForQuery before the next is sent, also when it
//!   failed (PostgreSQL skips to Sync after an error), so the stream never desyncs.
//! - Any I/O or protocol error marks the connection broken; it is never used again.
//! - Plain TCP only, as before: `sslmode=require` is refused, `prefer` goes plain.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::{Host, SslMode};

/// Why a request or the connection failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Fail {
    /// PostgreSQL's ErrorResponse: SQLSTATE and message.
    Db { code: String, message: String },
    /// The connection broke (I/O error, closed, or a message that makes no sense).
    Broken(String),
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Db { code, message } => write!(f, "{message} ({code})"),
            Fail::Broken(why) => f.write_str(why),
        }
    }
}

fn broken(e: impl std::fmt::Display) -> Fail {
    Fail::Broken(e.to_string())
}

/// One connection after a successful login.
pub struct Wire {
    stream: TcpStream,
    rbuf: BytesMut,
    /// Requests are encoded here, then written at once.
    pub wbuf: BytesMut,
    broken: bool,
}

impl Wire {
    /// Connects and logs in (trust, password, md5 or SCRAM-SHA-256).
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Wire, Fail> {
        if config.get_ssl_mode() == SslMode::Require {
            return Err(Fail::Broken(
                "sslmode=require: the load generator connects without TLS".to_owned(),
            ));
        }
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => {
                return Err(Fail::Broken(format!(
                    "unix socket {}: use a TCP host",
                    p.display()
                )));
            }
            None => "localhost".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let stream = tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| Fail::Broken(format!("connecting to {host}:{port} timed out")))?
            .map_err(|e| Fail::Broken(format!("connecting to {host}:{port}: {e}")))?;
        stream.set_nodelay(true).map_err(broken)?;
        let mut wire = Wire {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            broken: false,
        };
        wire.login(config).await?;
        Ok(wire)
    }

    async fn login(&mut self, config: &tokio_postgres::Config) -> Result<(), Fail> {
        let user = config.get_user().unwrap_or("postgres");
        let mut params = vec![("user", user), ("client_encoding", "UTF8")];
        if let Some(db) = config.get_dbname() {
            params.push(("database", db));
        }
        if let Some(app) = config.get_application_name() {
            params.push(("application_name", app));
        }
        if let Some(options) = config.get_options() {
            params.push(("options", options));
        }
        frontend::startup_message(params, &mut self.wbuf).map_err(broken)?;
        self.flush().await?;
        let password = config.get_password().unwrap_or_default().to_vec();
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, mut body) = self.message().await?;
            match tag {
                b'R' => {
                    if body.len() < 4 {
                        return Err(broken("short authentication message"));
                    }
                    match body.get_i32() {
                        0 => {}
                        3 => {
                            frontend::password_message(&password, &mut self.wbuf)
                                .map_err(broken)?;
                            self.flush().await?;
                        }
                        5 => {
                            let mut salt = [0u8; 4];
                            if body.len() < 4 {
                                return Err(broken("short md5 salt"));
                            }
                            body.copy_to_slice(&mut salt);
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                &password,
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                                .map_err(broken)?;
                            self.flush().await?;
                        }
                        10 => {
                            let offered = body[..]
                                .split(|b| *b == 0)
                                .any(|m| m == SCRAM_SHA_256.as_bytes());
                            if !offered {
                                return Err(broken("the server offers no SCRAM-SHA-256"));
                            }
                            let s = ScramSha256::new(&password, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                SCRAM_SHA_256,
                                s.message(),
                                &mut self.wbuf,
                            )
                            .map_err(broken)?;
                            scram = Some(s);
                            self.flush().await?;
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| broken("SASL out of order"))?;
                            s.update(&body).map_err(broken)?;
                            frontend::sasl_response(s.message(), &mut self.wbuf).map_err(broken)?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| broken("SASL out of order"))?;
                            s.finish(&body).map_err(broken)?;
                        }
                        other => {
                            return Err(Fail::Broken(format!(
                                "authentication method {other} is not supported"
                            )));
                        }
                    }
                }
                b'E' => return Err(db_error(&body)),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, NoticeResponse.
                _ => {}
            }
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Writes what was encoded into `wbuf`.
    pub async fn flush(&mut self) -> Result<(), Fail> {
        let r = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        r.map_err(|e| self.fail(e))
    }

    fn fail(&mut self, e: impl std::fmt::Display) -> Fail {
        self.broken = true;
        Fail::Broken(e.to_string())
    }

    /// The next whole message: its tag and body.
    async fn message(&mut self) -> Result<(u8, BytesMut), Fail> {
        loop {
            if self.rbuf.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                if len < 4 {
                    return Err(self.fail("a message with a negative length"));
                }
                if self.rbuf.len() > len {
                    let tag = self.rbuf[0];
                    let mut msg = self.rbuf.split_to(len + 1);
                    msg.advance(5);
                    return Ok((tag, msg));
                }
                self.rbuf.reserve(len + 1 - self.rbuf.len());
            } else {
                self.rbuf.reserve(8 * 1024);
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err(self.fail("the server closed the connection")),
                Ok(_) => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    /// Reads the answers of one request up to its ReadyForQuery, handing each DataRow
    /// and CommandComplete body to `on`; returns the request's error, if it had one.
    pub async fn until_ready(&mut self, mut on: impl FnMut(u8, &[u8])) -> Result<(), Fail> {
        let mut error = None;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'Z' => return error.map_or(Ok(()), Err),
                b'E' if error.is_none() => error = Some(db_error(&body)),
                b'D' | b'C' => on(tag, &body),
                _ => {}
            }
        }
    }
}

/// SQLSTATE and message of an ErrorResponse body.
fn db_error(body: &[u8]) -> Fail {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|b| *b == 0) {
        match field.split_first() {
            Some((b'C', v)) => code = String::from_utf8_lossy(v).into_owned(),
            Some((b'M', v)) => message = String::from_utf8_lossy(v).into_owned(),
            _ => {}
        }
    }
    Fail::Db { code, message }
}

/// The values of a DataRow body (`None` for NULL).
pub fn columns(body: &[u8]) -> Vec<Option<&[u8]>> {
    let mut out = Vec::new();
    if body.len() < 2 {
        return out;
    }
    let n = u16::from_be_bytes([body[0], body[1]]);
    let mut rest = &body[2..];
    for _ in 0..n {
        if rest.len() < 4 {
            break;
        }
        let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        rest = &rest[4..];
        match usize::try_from(len) {
            Ok(l) if l <= rest.len() => {
                out.push(Some(&rest[..l]));
                rest = &rest[l..];
            }
            _ => out.push(None),
        }
    }
    out
}

/// The first value of a DataRow body, without collecting the others.
pub fn first_column(body: &[u8]) -> Option<&[u8]> {
    if body.len() < 6 || u16::from_be_bytes([body[0], body[1]]) == 0 {
        return None;
    }
    let len = usize::try_from(i32::from_be_bytes([body[2], body[3], body[4], body[5]])).ok()?;
    body.get(6..6 + len)
}

/// Rows a CommandComplete tag reports (`INSERT 0 1`, `UPDATE 3`, `SELECT 1`).
pub fn tag_rows(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body.strip_suffix(&[0]).unwrap_or(body)).ok()?;
    text.rsplit(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rows_tags_and_errors() {
        let row = [0, 2, 0, 0, 0, 2, b'h', b'i', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(columns(&row), vec![Some(&b"hi"[..]), None]);
        assert_eq!(first_column(&row), Some(&b"hi"[..]));
        assert_eq!(first_column(&[0, 0]), None);
        assert_eq!(tag_rows(b"INSERT 0 1\0"), Some(1));
        assert_eq!(tag_rows(b"UPDATE 12\0"), Some(12));
        assert_eq!(tag_rows(b"BEGIN\0"), None);
        let e = db_error(b"SERROR\0C42P01\0Mrelation \"x\" does not exist\0\0");
        assert_eq!(
            e,
            Fail::Db {
                code: "42P01".to_owned(),
                message: "relation \"x\" does not exist".to_owned()
            }
        );
    }
}
