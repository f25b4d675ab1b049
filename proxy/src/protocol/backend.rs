//! Backend messages spillway builds itself (errors, key data, SASL offers, the result
//! sets of the admin console and of RETURNING answered for deferred writes) and the few
//! it inspects on the way through (errors, ReadyForQuery, BackendKeyData,
//! Authentication, ParameterStatus).
//!
//! Encoding goes through pgwire's message types. Inspection uses small readers over
//! the body slice that return `None`/`Err` on malformed input instead of panicking, so
//! a misbehaving upstream cannot crash a session task.

use bytes::{Bytes, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::data::{DataRow, FORMAT_CODE_TEXT, FieldDescription, RowDescription};
use pgwire::messages::response::{EmptyQueryResponse, ErrorResponse};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};

use super::frame::{ProtocolError, get_cstr};
use super::sqlstate::SqlState;

pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const ERROR_RESPONSE: u8 = b'E';
pub const PARAMETER_STATUS: u8 = b'S';
pub const READY_FOR_QUERY: u8 = b'Z';

/// Authentication request codes (the `i32` after the length of an 'R' message).
pub const AUTH_OK: i32 = 0;
pub const AUTH_SASL: i32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Encodes an ErrorResponse originated by spillway.
pub fn error_response(severity: Severity, code: SqlState, message: &str) -> Bytes {
    let fields = vec![
        (b'S', severity.as_str().to_owned()),
        (b'V', severity.as_str().to_owned()),
        (b'C', code.code().to_owned()),
        (b'M', message.to_owned()),
    ];
    encode(&ErrorResponse::new(fields))
}

/// Encodes an ErrorResponse with a DETAIL field.
pub fn error_response_with_detail(
    severity: Severity,
    code: SqlState,
    message: &str,
    detail: &str,
) -> Bytes {
    let fields = vec![
        (b'S', severity.as_str().to_owned()),
        (b'V', severity.as_str().to_owned()),
        (b'C', code.code().to_owned()),
        (b'M', message.to_owned()),
        (b'D', detail.to_owned()),
    ];
    encode(&ErrorResponse::new(fields))
}

/// Encodes BackendKeyData with a secret of any length from 4 to 256 bytes.
pub fn backend_key_data(pid: i32, secret: &[u8]) -> Bytes {
    let key = if secret.len() == 4 {
        SecretKey::I32(i32::from_be_bytes([
            secret[0], secret[1], secret[2], secret[3],
        ]))
    } else {
        SecretKey::Bytes(Bytes::copy_from_slice(secret))
    };
    encode(&BackendKeyData::new(pid, key))
}

/// Encodes AuthenticationSASL offering `mechanisms`.
pub fn authentication_sasl(mechanisms: Vec<String>) -> Bytes {
    encode(&Authentication::SASL(mechanisms))
}

/// AuthenticationOk.
pub fn authentication_ok() -> Bytes {
    encode(&Authentication::Ok)
}

/// AuthenticationSASLContinue carrying the server's SCRAM message.
pub fn authentication_sasl_continue(data: Vec<u8>) -> Bytes {
    encode(&Authentication::SASLContinue(Bytes::from(data)))
}

/// AuthenticationSASLFinal carrying the server's signature.
pub fn authentication_sasl_final(data: Vec<u8>) -> Bytes {
    encode(&Authentication::SASLFinal(Bytes::from(data)))
}

pub fn parameter_status(name: &str, value: &str) -> Bytes {
    encode(&ParameterStatus::new(name.to_owned(), value.to_owned()))
}

pub fn empty_query_response() -> Bytes {
    encode(&EmptyQueryResponse::new())
}

/// The column types of result sets spillway answers itself (the admin console); values
/// are always sent in text format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Text,
    Int8,
    Float8,
    Bool,
}

impl ColumnType {
    /// Type OID and size as in `pg_type`.
    fn pg_type(self) -> (u32, i16) {
        match self {
            ColumnType::Text => (25, -1),
            ColumnType::Int8 => (20, 8),
            ColumnType::Float8 => (701, 8),
            ColumnType::Bool => (16, 1),
        }
    }
}

/// RowDescription of text-format columns.
pub fn row_description(columns: &[(&str, ColumnType)]) -> Bytes {
    let fields = columns
        .iter()
        .map(|(name, ty)| {
            let (oid, size) = ty.pg_type();
            FieldDescription::new((*name).to_owned(), 0, 0, oid, size, -1, FORMAT_CODE_TEXT)
        })
        .collect();
    encode(&RowDescription::new(fields))
}

/// One RowDescription field as PostgreSQL describes a table column: its table's OID
/// and attribute number, type OID, `typlen`, `atttypmod`, and format code (0 text,
/// 1 binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a str,
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub typlen: i16,
    pub typmod: i32,
    pub format: i16,
}

/// RowDescription of table columns.
pub fn row_description_of(fields: &[Field<'_>]) -> Bytes {
    let fields = fields
        .iter()
        .map(|f| {
            // An OID is unsigned on the wire; pgwire's field is i32 (same four bytes).
            FieldDescription::new(
                f.name.to_owned(),
                i32::from_be_bytes(f.table_oid.to_be_bytes()),
                f.attnum,
                f.type_oid,
                f.typlen,
                f.typmod,
                f.format,
            )
        })
        .collect();
    encode(&RowDescription::new(fields))
}

/// DataRow of values already in their wire format (text or binary); `None` is NULL.
pub fn data_row_raw(values: &[Option<&[u8]>]) -> Bytes {
    use bytes::BufMut;
    let mut data = BytesMut::new();
    for value in values {
        match value {
            Some(v) => {
                data.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                data.put_slice(v);
            }
            None => data.put_i32(-1),
        }
    }
    encode(&DataRow::new(
        data,
        i16::try_from(values.len()).unwrap_or(i16::MAX),
    ))
}

/// DataRow of text values; `None` is SQL NULL.
pub fn data_row(values: &[Option<String>]) -> Bytes {
    use bytes::BufMut;
    let mut data = BytesMut::new();
    for value in values {
        match value {
            Some(v) => {
                data.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                data.put_slice(v.as_bytes());
            }
            None => data.put_i32(-1),
        }
    }
    encode(&DataRow::new(
        data,
        i16::try_from(values.len()).unwrap_or(i16::MAX),
    ))
}

fn encode<M: Message>(msg: &M) -> Bytes {
    let mut buf = BytesMut::with_capacity(msg.message_length() + 1);
    // Only fails when a message exceeds pgwire's own size limits, which the short
    // messages spillway builds never do; an empty buffer then fails loudly downstream.
    if let Err(err) = msg.encode(&mut buf) {
        tracing::error!(%err, "could not encode a backend message");
        buf.clear();
    }
    buf.freeze()
}

/// The fields of an ErrorResponse/NoticeResponse that spillway acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }
}

/// Reads an ErrorResponse or NoticeResponse body (the bytes after the header).
pub fn parse_error_fields(mut body: &[u8]) -> Result<ErrorFields, ProtocolError> {
    let mut out = ErrorFields::default();
    let mut localized = None;
    loop {
        let Some((&kind, rest)) = body.split_first() else {
            return Err(ProtocolError::Malformed {
                what: "ErrorResponse",
            });
        };
        body = rest;
        if kind == 0 {
            break;
        }
        let value = get_cstr(&mut body, "ErrorResponse")?;
        match kind {
            b'V' => out.severity = value.to_owned(),
            b'S' => localized = Some(value.to_owned()),
            b'C' => out.code = value.to_owned(),
            b'M' => out.message = value.to_owned(),
            _ => {}
        }
    }
    if out.severity.is_empty() {
        out.severity = localized.unwrap_or_default();
    }
    Ok(out)
}

/// Whether the start of an ErrorResponse body (possibly cut short) says FATAL or PANIC.
/// PostgreSQL sends the severity fields first, so a short prefix is enough; a prefix
/// that does not reach them counts as not fatal.
pub fn prefix_is_fatal(mut body: &[u8]) -> bool {
    while let Some((&kind, rest)) = body.split_first() {
        if kind == 0 {
            return false;
        }
        let Some(end) = rest.iter().position(|b| *b == 0) else {
            return false;
        };
        if kind == b'S' || kind == b'V' {
            return matches!(&rest[..end], b"FATAL" | b"PANIC");
        }
        body = &rest[end + 1..];
    }
    false
}

/// The transaction status byte of a ReadyForQuery body: b'I', b'T' or b'E'.
pub fn ready_for_query_status(body: &[u8]) -> Option<u8> {
    match body {
        [s @ (b'I' | b'T' | b'E')] => Some(*s),
        _ => None,
    }
}

/// Splits a BackendKeyData body into the process id and the secret key bytes.
pub fn parse_backend_key_data(body: &[u8]) -> Result<(i32, Bytes), ProtocolError> {
    if body.len() < 8 || body.len() > 4 + 256 {
        return Err(ProtocolError::Malformed {
            what: "BackendKeyData",
        });
    }
    let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    Ok((pid, Bytes::copy_from_slice(&body[4..])))
}

/// The request code of an Authentication body.
pub fn authentication_code(body: &[u8]) -> Option<i32> {
    let code: [u8; 4] = body.get(..4)?.try_into().ok()?;
    Some(i32::from_be_bytes(code))
}

/// The mechanism names in an AuthenticationSASL body.
pub fn sasl_mechanisms(body: &[u8]) -> Result<Vec<String>, ProtocolError> {
    let mut rest = body.get(4..).ok_or(ProtocolError::Malformed {
        what: "AuthenticationSASL",
    })?;
    let mut out = Vec::new();
    while rest.first().is_some_and(|b| *b != 0) {
        out.push(get_cstr(&mut rest, "AuthenticationSASL")?.to_owned());
    }
    Ok(out)
}

/// A ParameterStatus body as (name, value).
pub fn parse_parameter_status(mut body: &[u8]) -> Result<(String, String), ProtocolError> {
    let name = get_cstr(&mut body, "ParameterStatus")?.to_owned();
    let value = get_cstr(&mut body, "ParameterStatus")?.to_owned();
    Ok((name, value))
}

/// For a FATAL that says the server or the connection is going away (57P01 admin
/// shutdown, 57P02 crash shutdown, 57P03 cannot connect now, class 08), the cause a
/// detached session reports later; `None` for any other FATAL (relayed as ever).
pub fn detaching_fatal(body: &[u8]) -> Option<String> {
    let fields = parse_error_fields(body).ok()?;
    crate::protocol::sqlstate::SqlState::ends_connection(&fields.code)
        .then(|| format!("PostgreSQL: {} ({})", fields.message, fields.code))
}

/// "message (SQLSTATE)" of an ErrorResponse body, for the log.
pub fn describe_error(body: &[u8]) -> String {
    match parse_error_fields(body) {
        Ok(f) => format!("{} ({})", f.message, f.code),
        Err(_) => "a FATAL error".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame;

    fn body_of(msg: &Bytes) -> &[u8] {
        &msg[5..]
    }

    #[test]
    fn result_set_messages_round_trip() {
        use pgwire::messages::DecodeContext;
        let ctx = DecodeContext::default();
        let desc = row_description(&[("n", ColumnType::Int8), ("name", ColumnType::Text)]);
        let decoded =
            RowDescription::decode(&mut BytesMut::from(&desc[..]), &ctx).expect("decodes");
        let fields = decoded.expect("whole").fields;
        assert_eq!(fields.len(), 2);
        assert_eq!((fields[0].name.as_str(), fields[0].type_id), ("n", 20));
        assert_eq!((fields[1].name.as_str(), fields[1].type_size), ("name", -1));

        let row = data_row(&[Some("42".to_owned()), None]);
        let decoded = DataRow::decode(&mut BytesMut::from(&row[..]), &ctx)
            .expect("decodes")
            .expect("whole");
        assert_eq!(decoded.field_count, 2);
        assert_eq!(&decoded.data[..], b"\0\0\0\x0242\xff\xff\xff\xff");

        let status = super::parameter_status("server_encoding", "UTF8");
        assert_eq!(
            parse_parameter_status(body_of(&status)).expect("parses"),
            ("server_encoding".to_owned(), "UTF8".to_owned())
        );
        assert_eq!(
            authentication_code(body_of(&authentication_ok())),
            Some(AUTH_OK)
        );
        assert_eq!(
            authentication_code(body_of(&authentication_sasl_final(b"v=x".to_vec()))),
            Some(12)
        );
        assert_eq!(&empty_query_response()[..], b"I\0\0\0\x04");
    }

    #[test]
    fn table_column_messages_round_trip() {
        use pgwire::messages::DecodeContext;
        let ctx = DecodeContext::default();
        let desc = row_description_of(&[
            Field {
                name: "id",
                table_oid: 16384,
                attnum: 1,
                type_oid: 23,
                typlen: 4,
                typmod: -1,
                format: 1,
            },
            Field {
                name: "v",
                table_oid: 16384,
                attnum: 3,
                type_oid: 1043,
                typlen: -1,
                typmod: 14,
                format: 0,
            },
        ]);
        let fields = RowDescription::decode(&mut BytesMut::from(&desc[..]), &ctx)
            .expect("decodes")
            .expect("whole")
            .fields;
        let got: Vec<_> = fields
            .iter()
            .map(|f| {
                (
                    f.name.as_str(),
                    f.table_id,
                    f.column_id,
                    f.type_id,
                    f.type_size,
                    f.type_modifier,
                    f.format_code,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("id", 16384, 1, 23, 4, -1, 1),
                ("v", 16384, 3, 1043, -1, 14, 0)
            ]
        );

        let row = data_row_raw(&[Some(&7i32.to_be_bytes()), None, Some(b"")]);
        let decoded = DataRow::decode(&mut BytesMut::from(&row[..]), &ctx)
            .expect("decodes")
            .expect("whole");
        assert_eq!(decoded.field_count, 3);
        assert_eq!(
            &decoded.data[..],
            b"\0\0\0\x04\0\0\0\x07\xff\xff\xff\xff\0\0\0\0"
        );
    }

    #[test]
    fn error_response_round_trip() {
        let msg = error_response(Severity::Fatal, SqlState::ADMIN_SHUTDOWN, "bye");
        let h = frame::peek_header(&msg, 1024)
            .expect("valid")
            .expect("whole");
        assert_eq!(h.tag, ERROR_RESPONSE);
        assert_eq!(h.total_len, msg.len());
        let f = parse_error_fields(body_of(&msg)).expect("parses");
        assert_eq!(f.code, "57P01");
        assert_eq!(f.message, "bye");
        assert!(f.is_fatal());
    }

    #[test]
    fn truncated_error_is_malformed_not_a_panic() {
        assert!(parse_error_fields(b"SERROR").is_err());
        assert!(parse_error_fields(b"").is_err());
    }

    #[test]
    fn backend_key_data_round_trip() {
        let msg = backend_key_data(42, &[1, 2, 3, 4]);
        let (pid, secret) = parse_backend_key_data(body_of(&msg)).expect("parses");
        assert_eq!(pid, 42);
        assert_eq!(&secret[..], &[1, 2, 3, 4]);
        let long = backend_key_data(7, &[9; 32]);
        let (_, secret) = parse_backend_key_data(body_of(&long)).expect("parses");
        assert_eq!(secret.len(), 32);
    }

    #[test]
    fn sasl_round_trip() {
        let msg = authentication_sasl(vec!["SCRAM-SHA-256".into(), "SCRAM-SHA-256-PLUS".into()]);
        assert_eq!(authentication_code(body_of(&msg)), Some(AUTH_SASL));
        assert_eq!(
            sasl_mechanisms(body_of(&msg)).expect("parses"),
            vec!["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]
        );
    }

    #[test]
    fn fatal_from_a_cut_prefix() {
        let msg = error_response(Severity::Fatal, SqlState::ADMIN_SHUTDOWN, "bye");
        assert!(prefix_is_fatal(&body_of(&msg)[..8]));
        let msg = error_response(Severity::Error, SqlState::ADMIN_SHUTDOWN, "bye");
        assert!(!prefix_is_fatal(body_of(&msg)));
        assert!(!prefix_is_fatal(b"SFAT"));
    }

    #[test]
    fn ready_for_query() {
        assert_eq!(ready_for_query_status(b"T"), Some(b'T'));
        assert_eq!(ready_for_query_status(b"Q"), None);
        assert_eq!(ready_for_query_status(b""), None);
    }

    #[test]
    fn parameter_status() {
        assert_eq!(
            parse_parameter_status(b"TimeZone\0UTC\0").expect("parses"),
            ("TimeZone".to_owned(), "UTC".to_owned())
        );
    }
}
