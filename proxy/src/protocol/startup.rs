//! The startup phase: packets with a length but no tag (StartupMessage, SSLRequest,
//! GSSENCRequest, CancelRequest), distinguished by the 32-bit code after the length.
//!
//! Invariant: a startup packet is at most [`MAX_STARTUP_PACKET`] bytes (PostgreSQL uses
//! the same 10 000-byte bound), so a client that never completes one cannot make
//! spillway buffer more than that.

use bytes::{Bytes, BytesMut};

use super::frame::{ProtocolError, get_cstr};

pub const MAX_STARTUP_PACKET: usize = 10_000;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// The first packet(s) a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    /// `secret` is 4 bytes for protocol 3.0 and up to 256 bytes for 3.2.
    CancelRequest {
        pid: i32,
        secret: Bytes,
    },
    Startup(StartupMessage),
}

/// A StartupMessage, kept verbatim in `raw` so it can be relayed upstream unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
    pub raw: Bytes,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> &str {
        self.param("user").unwrap_or("")
    }

    /// PostgreSQL defaults the database name to the user name.
    pub fn database(&self) -> &str {
        // An empty value counts as absent, as in PostgreSQL.
        self.param("database")
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| self.user())
    }

    /// Builds a StartupMessage for protocol 3.0 (used by spillway's own connections
    /// and by tests).
    pub fn build(params: &[(&str, &str)]) -> Bytes {
        let mut body = Vec::with_capacity(64);
        body.extend_from_slice(&196_608_i32.to_be_bytes());
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(&body);
        Bytes::from(out)
    }
}

/// Parses one startup-phase packet off the front of `buf`.
///
/// Errors are PostgreSQL's for the same bytes (`ProcessStartupPacket`): a length out of
/// range is [`ProtocolError::BadStartupLength`] (closed without a word), a version other
/// than 3.x is 0A000, a bad layout 08P01, no user 28000.
pub fn parse(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 8 {
        // A packet that cannot even hold its length and code is incomplete, unless its
        // length word is already out of range.
        if buf.len() >= 4 {
            let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if len < 8 || len as usize > MAX_STARTUP_PACKET {
                return Err(ProtocolError::BadStartupLength);
            }
        }
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(ProtocolError::BadStartupLength);
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let raw = buf.split_to(len).freeze();
    let code = i32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    let body = &raw[8..];
    match code {
        // PostgreSQL does not look at the length of these two.
        SSL_REQUEST_CODE => Ok(Some(StartupPacket::SslRequest)),
        GSSENC_REQUEST_CODE => Ok(Some(StartupPacket::GssEncRequest)),
        CANCEL_REQUEST_CODE => {
            if body.len() < 8 || body.len() > 4 + 256 {
                return Err(ProtocolError::BadStartupLength);
            }
            let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            Ok(Some(StartupPacket::CancelRequest {
                pid,
                secret: raw.slice(12..),
            }))
        }
        _ => {
            let (major, minor) = version(code);
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let params = parse_params(body)?;
            Ok(Some(StartupPacket::Startup(StartupMessage {
                major,
                minor,
                params,
                raw,
            })))
        }
    }
}

/// A protocol code as (major, minor); also how PostgreSQL names an SSLRequest or
/// GSSENCRequest it no longer expects ("unsupported frontend protocol 1234.5679").
pub fn version(code: i32) -> (u16, u16) {
    ((code >> 16) as u16, (code & 0xffff) as u16)
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        match body.first() {
            None => return Err(ProtocolError::BadStartup("parameters not terminated")),
            // PostgreSQL wants the terminator to be the packet's last byte.
            Some(0) if body.len() == 1 => break,
            Some(0) => return Err(ProtocolError::BadStartup("bytes after the terminator")),
            Some(_) => {
                let k = get_cstr(&mut body, "startup parameter")?;
                let v = get_cstr(&mut body, "startup parameter")?;
                params.push((k.to_owned(), v.to_owned()));
            }
        }
    }
    if !params.iter().any(|(k, v)| k == "user" && !v.is_empty()) {
        return Err(ProtocolError::NoUser);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_round_trip() {
        let raw = StartupMessage::build(&[("user", "alice"), ("database", "app")]);
        let mut buf = BytesMut::from(&raw[..]);
        let Some(StartupPacket::Startup(m)) = parse(&mut buf).expect("valid") else {
            panic!("expected a startup message");
        };
        assert_eq!((m.major, m.minor), (3, 0));
        assert_eq!(m.user(), "alice");
        assert_eq!(m.database(), "app");
        assert_eq!(m.raw, raw);
        assert!(buf.is_empty());
    }

    #[test]
    fn database_defaults_to_user() {
        let raw = StartupMessage::build(&[("user", "bob")]);
        let mut buf = BytesMut::from(&raw[..]);
        let Some(StartupPacket::Startup(m)) = parse(&mut buf).expect("valid") else {
            panic!("expected a startup message");
        };
        assert_eq!(m.database(), "bob");
    }

    #[test]
    fn ssl_gss_cancel() {
        let mut buf = BytesMut::from(&b"\0\0\0\x08\x04\xd2\x16\x2f"[..]);
        assert_eq!(parse(&mut buf), Ok(Some(StartupPacket::SslRequest)));
        let mut buf = BytesMut::from(&b"\0\0\0\x08\x04\xd2\x16\x30"[..]);
        assert_eq!(parse(&mut buf), Ok(Some(StartupPacket::GssEncRequest)));
        let mut buf = BytesMut::from(&b"\0\0\0\x10\x04\xd2\x16\x2e\0\0\0\x07\xde\xad\xbe\xef"[..]);
        assert_eq!(
            parse(&mut buf),
            Ok(Some(StartupPacket::CancelRequest {
                pid: 7,
                secret: Bytes::from_static(b"\xde\xad\xbe\xef"),
            }))
        );
    }

    #[test]
    fn http_request_is_not_postgres() {
        // "GET " read as a length is far over the limit: closed without a word.
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
        assert_eq!(parse(&mut buf), Err(ProtocolError::BadStartupLength));
    }

    #[test]
    fn lengths_out_of_range_are_unanswered() {
        for bytes in [
            &b"X\0\0\0\x04"[..],
            &b"\0\0\0\x04"[..],
            &b"\0\0\0\x07\0\x03\0"[..],
            &b"\0\0\x27\x11\0\x03\0\0"[..],
            &b"\0\0\0\x0c\x04\xd2\x16\x2e\0\0\0\x07"[..],
        ] {
            let mut buf = BytesMut::from(bytes);
            assert_eq!(
                parse(&mut buf),
                Err(ProtocolError::BadStartupLength),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn other_major_versions_are_unsupported() {
        let mut buf = BytesMut::from(&b"\0\0\0\x08\0\x04\0\0"[..]);
        assert_eq!(
            parse(&mut buf),
            Err(ProtocolError::UnsupportedVersion { major: 4, minor: 0 })
        );
    }

    #[test]
    fn bytes_after_the_terminator_are_refused() {
        let mut raw = StartupMessage::build(&[("user", "alice")]).to_vec();
        raw.push(b'x');
        let len = raw.len() as i32;
        raw[..4].copy_from_slice(&len.to_be_bytes());
        let mut buf = BytesMut::from(&raw[..]);
        let err = parse(&mut buf).expect_err("trailing byte");
        assert_eq!(err.sqlstate().code(), "08P01");
    }

    #[test]
    fn protocol_2_is_unsupported() {
        let mut buf = BytesMut::from(&b"\0\0\0\x08\0\x02\0\0"[..]);
        let err = parse(&mut buf).expect_err("protocol 2");
        assert_eq!(err.sqlstate().code(), "0A000");
    }

    #[test]
    fn partial_packet_waits() {
        let raw = StartupMessage::build(&[("user", "alice")]);
        let mut buf = BytesMut::from(&raw[..raw.len() - 1]);
        assert_eq!(parse(&mut buf), Ok(None));
    }

    #[test]
    fn missing_user_is_rejected() {
        for params in [&[("database", "x")][..], &[("user", ""), ("database", "x")]] {
            let raw = StartupMessage::build(params);
            let mut buf = BytesMut::from(&raw[..]);
            let err = parse(&mut buf).expect_err("no user");
            assert_eq!(err.sqlstate().code(), "28000", "{params:?}");
        }
    }
}
