//! The login of a pooled server connection (ADR 0025): the exchange up to
//! ReadyForQuery with what the pool holds (`PoolSecret`): cleartext, md5 and
//! SCRAM-SHA-256 with a password, md5 with a stored hash, SCRAM-SHA-256 with the keys
//! a client's proof revealed (passthrough). Also the md5 answer clients' logins check.
//!
//! Invariant: a password or key is only ever sent to the server that asked for it, in
//! the form its method asks for; nothing of it is logged.

use bytes::BytesMut;

use super::PoolSecret;
use crate::error::SessionError;
use crate::net::cancel::UpstreamKey;
use crate::net::conn::{Conn, read_upstream_frame};
use crate::protocol::backend;
use crate::protocol::scram::ClientExchange;

/// PostgreSQL's md5 answer from the stored hash: `md5` + hex(md5(hash hex || salt)).
pub fn md5_answer(hash: &str, salt: &[u8]) -> String {
    use md5::{Digest, Md5};
    let mut md5 = Md5::new();
    md5.update(hash.as_bytes());
    md5.update(salt);
    format!("md5{:x}", md5.finalize())
}

/// SCRAM with the password (postgres-protocol's client) or with a client's keys.
enum ScramClient {
    Password(postgres_protocol::authentication::sasl::ScramSha256),
    Keys(ClientExchange),
}

/// The login exchange on a new server connection, up to ReadyForQuery: cleartext,
/// md5 and SCRAM-SHA-256 with a password, SCRAM-SHA-256 with a client's keys.
/// Returns the backend's key and parameters.
pub(super) async fn login(
    conn: &mut Conn,
    user: &str,
    secret: Option<&PoolSecret>,
) -> Result<(UpstreamKey, Vec<(String, String)>), SessionError> {
    let password = match secret {
        Some(PoolSecret::Password(p)) => Some(p.as_str()),
        _ => None,
    };
    use postgres_protocol::authentication::sasl;
    use postgres_protocol::message::frontend;
    let refused = |message: String| SessionError::PoolLogin { message };
    let need_password = || {
        password.ok_or_else(|| {
            refused(format!(
                "PostgreSQL asks role \"{user}\" for a password method other than SCRAM and \
                 spillway holds no plain-text password for it (auth.file)"
            ))
        })
    };
    let mut scram: Option<ScramClient> = None;
    let mut key = None;
    let mut params = Vec::new();
    loop {
        let (tag, msg) = read_upstream_frame(conn).await?;
        let body = &msg[5..];
        let mut out = BytesMut::new();
        match tag {
            backend::AUTHENTICATION => {
                let code =
                    backend::authentication_code(body).ok_or(SessionError::UpstreamProtocol {
                        tag: 'R',
                        phase: "pool login",
                    })?;
                let data = &body[4..];
                match code {
                    0 => continue,
                    3 => frontend::password_message(need_password()?.as_bytes(), &mut out)
                        .map_err(SessionError::UpstreamIo)?,
                    5 if matches!(secret, Some(PoolSecret::Md5(_))) => {
                        let (Some(PoolSecret::Md5(hash)), Some(salt)) = (secret, data.get(..4))
                        else {
                            return Err(SessionError::UpstreamProtocol {
                                tag: 'R',
                                phase: "pool login (md5 salt)",
                            });
                        };
                        let answer = md5_answer(hash, salt);
                        frontend::password_message(answer.as_bytes(), &mut out)
                            .map_err(SessionError::UpstreamIo)?;
                    }
                    5 => {
                        let salt: [u8; 4] = data.get(..4).and_then(|s| s.try_into().ok()).ok_or(
                            SessionError::UpstreamProtocol {
                                tag: 'R',
                                phase: "pool login (md5 salt)",
                            },
                        )?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            need_password()?.as_bytes(),
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut out)
                            .map_err(SessionError::UpstreamIo)?;
                    }
                    10 => {
                        let (client, first) = match secret {
                            Some(PoolSecret::Scram(keys)) => {
                                let (x, first) = ClientExchange::start(keys.clone());
                                (ScramClient::Keys(x), first.into_bytes())
                            }
                            _ => {
                                let s = sasl::ScramSha256::new(
                                    need_password()?.as_bytes(),
                                    sasl::ChannelBinding::unsupported(),
                                );
                                let first = s.message().to_vec();
                                (ScramClient::Password(s), first)
                            }
                        };
                        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, &first, &mut out)
                            .map_err(SessionError::UpstreamIo)?;
                        scram = Some(client);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or(SessionError::UpstreamProtocol {
                            tag: 'R',
                            phase: "pool login (SASL continue)",
                        })?;
                        let answer = match s {
                            ScramClient::Password(s) => {
                                s.update(data).map_err(|e| refused(e.to_string()))?;
                                s.message().to_vec()
                            }
                            ScramClient::Keys(x) => x
                                .update(data)
                                .map_err(|e| refused(e.to_string()))?
                                .into_bytes(),
                        };
                        frontend::sasl_response(&answer, &mut out)
                            .map_err(SessionError::UpstreamIo)?;
                    }
                    12 => {
                        let s = scram.as_mut().ok_or(SessionError::UpstreamProtocol {
                            tag: 'R',
                            phase: "pool login (SASL final)",
                        })?;
                        match s {
                            ScramClient::Password(s) => {
                                s.finish(data).map_err(|e| refused(e.to_string()))?;
                            }
                            ScramClient::Keys(x) => {
                                x.finish(data).map_err(|e| refused(e.to_string()))?;
                            }
                        }
                        continue;
                    }
                    other => {
                        return Err(refused(format!(
                            "PostgreSQL asks for authentication method {other}, which pooled \
                             connections do not support"
                        )));
                    }
                }
                conn.send(&out).await.map_err(SessionError::UpstreamIo)?;
            }
            backend::BACKEND_KEY_DATA => {
                let (pid, secret) = backend::parse_backend_key_data(body)
                    .map_err(SessionError::UpstreamMalformed)?;
                key = Some(UpstreamKey { pid, secret });
            }
            backend::PARAMETER_STATUS => {
                if let Ok(p) = backend::parse_parameter_status(body) {
                    params.push(p);
                }
            }
            backend::ERROR_RESPONSE => {
                let f = backend::parse_error_fields(body).unwrap_or_default();
                return Err(refused(format!("{} ({})", f.message, f.code)));
            }
            backend::READY_FOR_QUERY => {
                let key = key.ok_or(SessionError::UpstreamProtocol {
                    tag: 'Z',
                    phase: "pool login without BackendKeyData",
                })?;
                return Ok((key, params));
            }
            _ => {}
        }
    }
}
