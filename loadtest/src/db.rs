//! One client session and how it sends a statement in each protocol mode, plus the
//! classification of errors by SQLSTATE.
//!
//! - `simple`: one Query message with the parameters written as literals;
//! - `extended`: Parse/Bind/Describe(statement)/Execute/Sync on the unnamed statement,
//!   one round trip, as tokio-postgres' `query_typed` and most drivers do;
//! - `prepared`: each statement prepared once per session (named), then Bind/Execute.
//!
//! Parameters and results travel in binary, as tokio-postgres sends them. A
//! [`Session`] owns its connection ([`crate::wire`]); dropping it closes it.

use std::fmt::Write as _;

use bytes::{BufMut, BytesMut};
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;
use tokio_postgres::Config;
use tokio_postgres::types::Type;

use crate::wire::{Fail, Wire, columns, first_column, tag_rows};

use crate::cli::Mode;

/// A statement of a scenario, with `$n` placeholders and their types.
#[derive(Debug)]
pub struct Stmt {
    pub sql: &'static str,
    pub types: &'static [Type],
    /// Whether the caller wants the first column of the first row as text.
    pub text_result: bool,
}

/// A parameter value; what the generators produce.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// `int8` (bigint).
    Int(i64),
    /// `int4` (integer): a typed parameter must match its declared type exactly.
    Int4(i32),
    Text(String),
}

impl Param {
    fn write_literal(&self, out: &mut String) {
        match self {
            Param::Int(v) => {
                let _ = write!(out, "{v}");
            }
            Param::Int4(v) => {
                let _ = write!(out, "{v}");
            }
            Param::Text(v) => {
                out.push('\'');
                out.push_str(&v.replace('\'', "''"));
                out.push('\'');
            }
        }
    }
}

/// What a statement returned: rows returned or affected, and the first value as text
/// when the statement asked for it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    pub rows: u64,
    pub text: Option<String>,
}

/// An error from a statement, reduced to what the report counts.
#[derive(Debug, Clone, PartialEq)]
pub struct OpError {
    /// The SQLSTATE, or a name for failures without one (`connection`, `timeout`,
    /// `wrong-row-count`, `stale-read`, `client`).
    pub code: String,
    pub message: String,
    /// The statement may or may not have taken effect (connection lost, timeout).
    pub ambiguous: bool,
}

impl OpError {
    pub fn check(code: &str, message: String) -> OpError {
        OpError {
            code: code.to_owned(),
            message,
            ambiguous: false,
        }
    }
}

impl From<Fail> for OpError {
    fn from(e: Fail) -> OpError {
        match e {
            Fail::Db { code, message } => OpError {
                code,
                message,
                ambiguous: false,
            },
            Fail::Broken(message) => OpError {
                code: "connection".to_owned(),
                message,
                ambiguous: true,
            },
        }
    }
}

/// One connection in one protocol mode.
pub struct Session {
    wire: Wire,
    mode: Mode,
    /// Named statements of this session, keyed by the address of their text
    /// (`Stmt::sql` is `'static`): no hashing per operation.
    prepared: Vec<(&'static str, String)>,
}

impl Session {
    /// Connects without TLS (`sslmode=prefer` goes plain; `require` fails).
    pub async fn connect(config: &Config, mode: Mode) -> Result<Session, Fail> {
        Ok(Session {
            wire: Wire::connect(config).await?,
            mode,
            prepared: Vec::new(),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.wire.is_broken()
    }

    /// Runs one statement of a scenario in this session's mode.
    pub async fn run(&mut self, stmt: &Stmt, params: &[Param]) -> Result<Outcome, OpError> {
        let buf = &mut self.wire.wbuf;
        match self.mode {
            Mode::Simple => frontend::query(&inline_params(stmt.sql, params), buf)
                .map_err(|e| OpError::check("client", e.to_string()))?,
            Mode::Extended => {
                // What tokio-postgres' query_typed sends: Parse, Bind, Describe of the
                // statement, Execute, Sync.
                encode_parse("", stmt, buf)?;
                encode_bind("", params, buf)?;
                encode(frontend::describe(b'S', "", buf))?;
                encode_execute(buf)?;
            }
            Mode::Prepared => {
                let name = match self
                    .prepared
                    .iter()
                    .find(|(sql, _)| std::ptr::eq(*sql, stmt.sql))
                {
                    Some((_, name)) => name.clone(),
                    None => self.prepare(stmt).await?,
                };
                let buf = &mut self.wire.wbuf;
                encode_bind(&name, params, buf)?;
                encode_execute(buf)?;
            }
        }
        self.wire.flush().await?;
        let mut out = Outcome::default();
        let (mut returned, mut tagged) = (0u64, None);
        let want_text = stmt.text_result;
        self.wire
            .until_ready(|tag, body| {
                if tag == b'D' {
                    if returned == 0 && want_text {
                        out.text = first_column(body)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .map(str::to_owned);
                    }
                    returned += 1;
                } else {
                    tagged = tag_rows(body);
                }
            })
            .await?;
        out.rows = tagged.unwrap_or(returned);
        Ok(out)
    }

    /// Parses `stmt` as a named statement of this session (once).
    async fn prepare(&mut self, stmt: &Stmt) -> Result<String, OpError> {
        let name = format!("lt{}", self.prepared.len());
        let buf = &mut self.wire.wbuf;
        encode_parse(&name, stmt, buf)?;
        encode(frontend::describe(b'S', &name, buf))?;
        frontend::sync(buf);
        self.wire.flush().await?;
        self.wire.until_ready(|_, _| {}).await?;
        self.prepared.push((stmt.sql, name.clone()));
        Ok(name)
    }

    /// Plain SQL in the simple protocol, whatever the mode (setup, checks).
    pub async fn batch(&mut self, sql: &str) -> Result<(), Fail> {
        frontend::query(sql, &mut self.wire.wbuf).map_err(|e| Fail::Broken(e.to_string()))?;
        self.wire.flush().await?;
        self.wire.until_ready(|_, _| {}).await
    }

    /// The rows of a simple-protocol query as text, whatever the mode (setup, checks).
    pub async fn text_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, OpError> {
        frontend::query(sql, &mut self.wire.wbuf)
            .map_err(|e| OpError::check("client", e.to_string()))?;
        self.wire.flush().await?;
        let mut rows = Vec::new();
        self.wire
            .until_ready(|tag, body| {
                if tag == b'D' {
                    rows.push(
                        columns(body)
                            .into_iter()
                            .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                            .collect(),
                    );
                }
            })
            .await?;
        Ok(rows)
    }
}

fn encode(r: std::io::Result<()>) -> Result<(), OpError> {
    r.map_err(|e| OpError::check("client", e.to_string()))
}

fn encode_parse(name: &str, stmt: &Stmt, buf: &mut BytesMut) -> Result<(), OpError> {
    encode(frontend::parse(
        name,
        stmt.sql,
        stmt.types.iter().map(Type::oid),
        buf,
    ))
}

/// Bind of the unnamed portal: every parameter and every result column binary, as
/// tokio-postgres sends them.
fn encode_bind(statement: &str, params: &[Param], buf: &mut BytesMut) -> Result<(), OpError> {
    frontend::bind(
        "",
        statement,
        params.iter().map(|_| 1),
        params,
        |p, buf| {
            match p {
                Param::Int(v) => buf.put_i64(*v),
                Param::Int4(v) => buf.put_i32(*v),
                Param::Text(v) => buf.put_slice(v.as_bytes()),
            }
            Ok(IsNull::No)
        },
        Some(1),
        buf,
    )
    .map_err(|e| {
        OpError::check(
            "client",
            match e {
                frontend::BindError::Conversion(e) => e.to_string(),
                frontend::BindError::Serialization(e) => e.to_string(),
            },
        )
    })
}

fn encode_execute(buf: &mut BytesMut) -> Result<(), OpError> {
    encode(frontend::execute("", 0, buf))?;
    frontend::sync(buf);
    Ok(())
}

/// `sql` with each `$n` replaced by the literal of `params[n-1]` (simple protocol).
/// Placeholders beyond `params` are left as they are, so PostgreSQL reports them.
pub fn inline_params(sql: &str, params: &[Param]) -> String {
    let mut out = String::with_capacity(sql.len() + 16 * params.len());
    let mut chars = sql.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '$' {
            let start = i + 1;
            let mut end = start;
            while let Some(&(j, d)) = chars.peek() {
                if d.is_ascii_digit() {
                    end = j + 1;
                    chars.next();
                } else {
                    break;
                }
            }
            let index: Option<usize> = sql[start..end].parse().ok();
            match index
                .and_then(|n| n.checked_sub(1))
                .and_then(|n| params.get(n))
            {
                Some(p) => p.write_literal(&mut out),
                None => out.push_str(&sql[i..end]),
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_params_writes_literals() {
        let sql = "UPDATE t SET a = $2, b = $10 WHERE id = $1 AND s = $3";
        let mut params: Vec<Param> = (1..=10).map(Param::Int).collect();
        params[2] = Param::Text("it's".to_owned());
        assert_eq!(
            inline_params(sql, &params),
            "UPDATE t SET a = 2, b = 10 WHERE id = 1 AND s = 'it''s'"
        );
    }

    #[test]
    fn inline_params_leaves_unknown_placeholders() {
        assert_eq!(
            inline_params("SELECT $1, $2, $, x$", &[Param::Int(-5)]),
            "SELECT -5, $2, $, x$"
        );
    }
}
