//! Frontend messages the read cache must understand: Query, Parse, Bind, Describe,
//! Execute, Close — read as borrowed views over the message body (no copies), and the
//! few backend messages spillway answers with itself (ParseComplete, BindComplete,
//! ReadyForQuery).
//!
//! Invariant: a reader never panics on malformed input; it returns `None`, and the
//! caller then treats the message as one it does not understand (passes it through, so
//! PostgreSQL reports the problem exactly as it would without spillway).

use super::frame::Header;

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';

/// A message of the extended query protocol (held by the handler until its Sync).
pub fn is_extended(tag: u8) -> bool {
    matches!(
        tag,
        PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | FLUSH | SYNC
    )
}

/// Byte-level cursor over a message body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn cstr(&mut self) -> Option<&'a str> {
        // A statement or portal name is short: looked for in line before `memchr`,
        // whose set-up costs more than a few bytes' search (a Parse's text is long).
        // The empty name (the unnamed statement and portal, the commonest) costs
        // neither a search nor a UTF-8 check.
        if self.0.first() == Some(&0) {
            self.0 = &self.0[1..];
            return Some("");
        }
        let end = match self.0.iter().take(16).position(|&b| b == 0) {
            Some(end) => end,
            None => memchr::memchr(0, self.0)?,
        };
        let s = std::str::from_utf8(&self.0[..end]).ok()?;
        self.0 = &self.0[end + 1..];
        Some(s)
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }

    fn i16(&mut self) -> Option<i16> {
        let b = self.bytes(2)?;
        Some(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Option<i32> {
        let b = self.bytes(4)?;
        Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn count(&mut self) -> Option<usize> {
        usize::try_from(self.i16()?).ok()
    }

    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// The body of a whole message (tag and length stripped).
pub fn body(msg: &[u8]) -> &[u8] {
    msg.get(Header::SIZE..).unwrap_or_default()
}

/// Query: the SQL text.
pub fn query(body: &[u8]) -> Option<&str> {
    let mut r = Reader(body);
    let sql = r.cstr()?;
    r.done().then_some(sql)
}

/// SASLInitialResponse (a PasswordMessage during SASL): the mechanism and the initial
/// client response (empty when the client sent none, length -1).
pub fn sasl_initial_response(body: &[u8]) -> Option<(&str, &[u8])> {
    let mut r = Reader(body);
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    let data = if len < 0 {
        &[][..]
    } else {
        r.bytes(usize::try_from(len).ok()?)?
    };
    r.done().then_some((mechanism, data))
}

#[derive(Debug, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub sql: &'a str,
    /// Raw parameter type OIDs (4 bytes each, big-endian), 0 = unspecified.
    pub param_types: &'a [u8],
}

pub fn parse(body: &[u8]) -> Option<Parse<'_>> {
    let mut r = Reader(body);
    let name = r.cstr()?;
    let sql = r.cstr()?;
    let n = r.count()?;
    let param_types = r.bytes(n * 4)?;
    r.done().then_some(Parse {
        name,
        sql,
        param_types,
    })
}

/// Bind: the portal's and the statement's names, and the rest of the body (formats
/// and parameters) unread, for a caller that only renames the statement.
pub fn bind_names(body: &[u8]) -> Option<(&str, &str, &[u8])> {
    let mut r = Reader(body);
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    Some((portal, statement, r.0))
}

#[derive(Debug, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Parameter format codes, values and result format codes, as sent: the part of
    /// the message that determines the result (besides the statement).
    pub params_and_formats: &'a [u8],
    /// Result format codes (2 bytes each), as sent.
    pub result_formats: &'a [u8],
}

pub fn bind(body: &[u8]) -> Option<Bind<'_>> {
    let mut r = Reader(body);
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let rest = r.0;
    let nfmt = r.count()?;
    r.bytes(nfmt * 2)?;
    let nparams = r.count()?;
    for _ in 0..nparams {
        let len = r.i32()?;
        if len > 0 {
            r.bytes(usize::try_from(len).ok()?)?;
        } else if len < -1 {
            return None;
        }
    }
    let nres = r.count()?;
    let result_formats = r.bytes(nres * 2)?;
    r.done().then_some(Bind {
        portal,
        statement,
        params_and_formats: rest,
        result_formats,
    })
}

/// Parameter values of a Bind (from [`Bind::params_and_formats`]): per parameter,
/// whether it is in binary format, and its bytes (`None` for NULL).
pub type BindParams<'a> = Vec<(bool, Option<&'a [u8]>)>;

pub fn bind_params(params_and_formats: &[u8]) -> Option<BindParams<'_>> {
    let mut r = Reader(params_and_formats);
    let nfmt = r.count()?;
    let mut formats = Vec::with_capacity(nfmt);
    for _ in 0..nfmt {
        formats.push(r.i16()? == 1);
    }
    let nparams = r.count()?;
    let mut out = Vec::with_capacity(nparams);
    for i in 0..nparams {
        // No codes: all text; one code: all parameters; else one per parameter.
        let binary = match formats.len() {
            0 => false,
            1 => formats[0],
            _ => *formats.get(i)?,
        };
        let len = r.i32()?;
        let value = if len < 0 {
            None
        } else {
            Some(r.bytes(usize::try_from(len).ok()?)?)
        };
        out.push((binary, value));
    }
    Some(out)
}

/// Parameter type OIDs as a Parse message declares them (0 = unspecified).
pub fn param_type_oids(raw: &[u8]) -> Vec<u32> {
    raw.chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Describe or Close: 'S' (statement) or 'P' (portal) and the name.
#[derive(Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub kind: u8,
    pub name: &'a str,
}

pub fn target(body: &[u8]) -> Option<Target<'_>> {
    let mut r = Reader(body);
    let kind = r.u8()?;
    let name = r.cstr()?;
    (r.done() && matches!(kind, b'S' | b'P')).then_some(Target { kind, name })
}

#[derive(Debug, PartialEq, Eq)]
pub struct Execute<'a> {
    pub portal: &'a str,
    pub max_rows: i32,
}

pub fn execute(body: &[u8]) -> Option<Execute<'_>> {
    let mut r = Reader(body);
    let portal = r.cstr()?;
    let max_rows = r.i32()?;
    r.done().then_some(Execute { portal, max_rows })
}

pub const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
/// Sync and Flush messages, as spillway sends them itself.
pub const SYNC_MESSAGE: &[u8] = b"S\0\0\0\x04";
pub const FLUSH_MESSAGE: &[u8] = b"H\0\0\0\x04";
pub const BIND_COMPLETE: &[u8] = b"2\0\0\0\x04";
pub const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// A simple Query carrying `sql`, for requests spillway sends upstream itself (a held
/// transaction's replay). `sql` has no NUL byte (it is built from checked parts).
pub fn query_message(sql: &str) -> Vec<u8> {
    let len = u32::try_from(4 + sql.len() + 1).unwrap_or(u32::MAX);
    let mut m = Vec::with_capacity(1 + 4 + sql.len() + 1);
    m.push(QUERY);
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// CommandComplete with `tag`, for answers spillway gives itself.
pub fn command_complete(tag: &str) -> Vec<u8> {
    let len = u32::try_from(4 + tag.len() + 1).unwrap_or(u32::MAX);
    let mut m = Vec::with_capacity(1 + 4 + tag.len() + 1);
    m.push(b'C');
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(tag.as_bytes());
    m.push(0);
    m
}

/// NoData: the answer to Describe of a portal that returns no rows.
pub const NO_DATA: &[u8] = b"n\0\0\0\x04";

/// ParameterDescription for a statement whose parameter types the client declared
/// (`raw`: 4-byte OIDs, as in Parse), or `None` if any is unspecified (0: only
/// PostgreSQL can infer it) or there are too many.
pub fn parameter_description(raw: &[u8]) -> Option<Vec<u8>> {
    let oids = param_type_oids(raw);
    if oids.contains(&0) {
        return None;
    }
    let count = u16::try_from(oids.len()).ok()?;
    let len = u32::try_from(4 + 2 + raw.len()).ok()?;
    let mut m = Vec::with_capacity(1 + 4 + 2 + raw.len());
    m.push(b't');
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(&count.to_be_bytes());
    m.extend_from_slice(raw);
    Some(m)
}

/// ReadyForQuery with transaction status `status` (b'I', b'T' or b'E').
pub fn ready_for_query(status: u8) -> [u8; 6] {
    [b'Z', 0, 0, 0, 5, status]
}

#[cfg(test)]
pub mod build {
    //! Encoders for tests: the client side of the messages read above.
    use bytes::{BufMut, BytesMut};

    fn finish(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8(tag);
        out.put_i32(i32::try_from(body.len() + 4).expect("small"));
        out.put_slice(body);
        out.to_vec()
    }

    pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_i16(i16::try_from(types.len()).expect("few"));
        for t in types {
            b.put_u32(*t);
        }
        finish(b'P', &b)
    }

    pub fn bind(portal: &str, stmt: &str, params: &[Option<&[u8]>], results: &[i16]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_slice(portal.as_bytes());
        b.put_u8(0);
        b.put_slice(stmt.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
        b.put_i16(i16::try_from(params.len()).expect("few"));
        for p in params {
            match p {
                Some(v) => {
                    b.put_i32(i32::try_from(v.len()).expect("small"));
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(i16::try_from(results.len()).expect("few"));
        for r in results {
            b.put_i16(*r);
        }
        finish(b'B', &b)
    }

    pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_slice(portal.as_bytes());
        b.put_u8(0);
        b.put_i32(max_rows);
        finish(b'E', &b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trip() {
        let msg = build::parse("s1", "SELECT $1", &[23]);
        let p = parse(body(&msg)).expect("parses");
        assert_eq!(p.name, "s1");
        assert_eq!(p.sql, "SELECT $1");
        assert_eq!(p.param_types, &23u32.to_be_bytes());
    }

    #[test]
    fn parameter_description_of_declared_types_only() {
        let msg = build::parse("", "INSERT INTO t VALUES ($1, $2)", &[20, 25]);
        let p = parse(body(&msg)).expect("parses");
        let d = parameter_description(p.param_types).expect("all declared");
        assert_eq!(d[0], b't');
        assert_eq!(
            u32::from_be_bytes([d[1], d[2], d[3], d[4]]) as usize,
            d.len() - 1
        );
        assert_eq!(&d[5..7], &2u16.to_be_bytes());
        assert_eq!(param_type_oids(&d[7..]), vec![20, 25]);
        let unspecified = build::parse("", "SELECT $1", &[0]);
        let p = parse(body(&unspecified)).expect("parses");
        assert_eq!(parameter_description(p.param_types), None);
    }

    #[test]
    fn bind_round_trip() {
        let msg = build::bind("", "s1", &[Some(b"42"), None], &[1]);
        let b = bind(body(&msg)).expect("parses");
        assert_eq!(b.portal, "");
        assert_eq!(b.statement, "s1");
        assert_eq!(b.result_formats, &[0, 1]);
        assert!(b.params_and_formats.ends_with(&[0, 1, 0, 1]));
    }

    #[test]
    fn execute_and_target() {
        let msg = build::execute("p", 10);
        assert_eq!(
            execute(body(&msg)),
            Some(Execute {
                portal: "p",
                max_rows: 10
            })
        );
        assert_eq!(
            target(b"Sname\0"),
            Some(Target {
                kind: b'S',
                name: "name"
            })
        );
        assert_eq!(target(b"Xname\0"), None);
    }

    #[test]
    fn malformed_is_none_not_panic() {
        assert!(parse(b"s1\0SELECT").is_none());
        assert!(bind(b"\0s\0\0\x01\0").is_none());
        assert!(bind(b"\0s\0\0\0\0\x01\xff\xff\xff\xf0").is_none());
        assert!(execute(b"p\0\0").is_none());
        assert!(query(b"SELECT 1").is_none());
        assert!(query(b"SELECT 1\0extra").is_none());
        let mut full = build::parse("a", "b", &[]);
        full.push(0);
        assert!(parse(body(&full)).is_none());
    }
}
