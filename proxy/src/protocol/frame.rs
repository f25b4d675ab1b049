//! Message framing for the regular (post-startup) phase: a one-byte tag followed by a
//! big-endian `i32` length that counts itself but not the tag.
//!
//! Invariant: `peek_header` never consumes bytes and never trusts a length it has not
//! checked: lengths below 4 are garbage (08P01), lengths above the caller's limit are
//! refused before any body byte is buffered (54000), so a hostile peer cannot make
//! spillway allocate more than `limit` bytes for one message.

use bytes::{Buf, BytesMut};

/// Why a byte stream could not be framed. Each variant maps to one SQLSTATE in
/// [`ProtocolError::sqlstate`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: i64 },
    #[error("message of type {tag:?} is {len} bytes, over the limit of {limit} bytes")]
    TooLarge { tag: char, len: usize, limit: usize },
    #[error("invalid startup packet: {0}")]
    BadStartup(&'static str),
    /// A startup packet whose length word is out of range (a cancel request included),
    /// or that is not PostgreSQL at all (an HTTP request reads as a huge length).
    /// PostgreSQL only logs it and closes without a word, so the client gets nothing.
    #[error("invalid length of startup packet")]
    BadStartupLength,
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.x")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
}

impl ProtocolError {
    pub fn sqlstate(&self) -> super::sqlstate::SqlState {
        use super::sqlstate::SqlState;
        match self {
            ProtocolError::TooLarge { .. } => SqlState::PROGRAM_LIMIT_EXCEEDED,
            ProtocolError::UnsupportedVersion { .. } => SqlState::FEATURE_NOT_SUPPORTED,
            ProtocolError::NoUser => SqlState::INVALID_AUTHORIZATION,
            _ => SqlState::PROTOCOL_VIOLATION,
        }
    }
}

/// The fixed part of a regular message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Whole message on the wire: tag + length field + body.
    pub total_len: usize,
}

impl Header {
    pub const SIZE: usize = 5;

    pub fn body_len(&self) -> usize {
        self.total_len - Self::SIZE
    }
}

/// Reads the header at the front of `buf` without consuming anything.
///
/// `limit` bounds `total_len`. Returns `Ok(None)` when fewer than five bytes are
/// buffered.
pub fn peek_header(buf: &[u8], limit: usize) -> Result<Option<Header>, ProtocolError> {
    if buf.len() < Header::SIZE {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength {
            tag: tag as char,
            len: i64::from(len),
        });
    }
    // len >= 4 was checked, so the cast cannot wrap.
    let total_len = len as usize + 1;
    if total_len > limit {
        return Err(ProtocolError::TooLarge {
            tag: tag as char,
            len: total_len,
            limit,
        });
    }
    Ok(Some(Header { tag, total_len }))
}

/// Splits one whole message off the front of `buf`, or returns `Ok(None)` if it has not
/// fully arrived.
pub fn parse(buf: &mut BytesMut, limit: usize) -> Result<Option<BytesMut>, ProtocolError> {
    match peek_header(buf, limit)? {
        Some(h) if buf.len() >= h.total_len => Ok(Some(buf.split_to(h.total_len))),
        _ => Ok(None),
    }
}

/// Reads a NUL-terminated string from the front of `body`, advancing past the NUL.
pub fn get_cstr<'a>(body: &mut &'a [u8], what: &'static str) -> Result<&'a str, ProtocolError> {
    let end = body
        .iter()
        .position(|b| *b == 0)
        .ok_or(ProtocolError::Malformed { what })?;
    let s = std::str::from_utf8(&body[..end]).map_err(|_| ProtocolError::Malformed { what })?;
    body.advance(end + 1);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_header_waits() {
        assert_eq!(peek_header(b"Q\0\0", 100), Ok(None));
    }

    #[test]
    fn round_trip_query_message() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
        buf.extend_from_slice(b"X\0\0\0\x04");
        let q = parse(&mut buf, 1024).expect("valid").expect("complete");
        assert_eq!(&q[..], b"Q\0\0\0\x0dselect 1\0");
        let x = parse(&mut buf, 1024).expect("valid").expect("complete");
        assert_eq!(&x[..], b"X\0\0\0\x04");
        assert!(buf.is_empty());
    }

    #[test]
    fn incomplete_body_is_left_in_place() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x0dsel"[..]);
        assert_eq!(parse(&mut buf, 1024), Ok(None));
        assert_eq!(buf.len(), 8);
    }

    #[test]
    fn negative_and_short_lengths_are_protocol_violations() {
        let err = peek_header(b"Q\xff\xff\xff\xff", 1024).expect_err("garbage");
        assert_eq!(err.sqlstate().code(), "08P01");
        let err = peek_header(b"Q\0\0\0\x03", 1024).expect_err("too short");
        assert_eq!(err.sqlstate().code(), "08P01");
    }

    #[test]
    fn oversized_message_refused_before_body_arrives() {
        let err = peek_header(b"d\x10\0\0\0", 1 << 20).expect_err("over limit");
        assert!(matches!(err, ProtocolError::TooLarge { tag: 'd', .. }));
        assert_eq!(err.sqlstate().code(), "54000");
    }

    #[test]
    fn cstr_requires_terminator() {
        let mut body: &[u8] = b"abc\0rest";
        assert_eq!(get_cstr(&mut body, "x"), Ok("abc"));
        assert_eq!(body, b"rest");
        let mut body: &[u8] = b"abc";
        assert!(get_cstr(&mut body, "x").is_err());
    }
}
