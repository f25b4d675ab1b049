//! One client session and how it sends a statement in each protocol mode, plus the
//! classification of errors by SQLSTATE.
//!
//! - `simple`: one Query message with the parameters written as literals;
//! - `extended`: Parse/Bind/Describe/Execute/Sync on the unnamed statement, one round
//!   trip (`query_typed_raw`), as most drivers do by default;
//! - `prepared`: each statement prepared once per session (named), then Bind/Execute.
//!
//! A [`Session`] owns its connection task; dropping the session ends the connection.
//!
//! The load generator's own CPU per operation caps every ratio it reports on shared
//! cores: prepared statements are found by the address of their `&'static str` text,
//! not by hashing it. (Polling the connection inside the session's task instead of
//! its own was measured: more instructions per operation, not fewer.)

use std::fmt::Write as _;

use futures_util::{TryStreamExt, pin_mut};
use tokio::task::JoinHandle;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage, Statement};

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
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Int(v) => v,
            Param::Int4(v) => v,
            Param::Text(v) => v,
        }
    }

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

impl From<tokio_postgres::Error> for OpError {
    fn from(e: tokio_postgres::Error) -> OpError {
        match e.as_db_error() {
            Some(db) => OpError {
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
                ambiguous: false,
            },
            None => OpError {
                code: if e.is_closed() {
                    "connection".to_owned()
                } else {
                    "client".to_owned()
                },
                message: e.to_string(),
                ambiguous: true,
            },
        }
    }
}

/// One connection in one protocol mode.
pub struct Session {
    client: Client,
    mode: Mode,
    /// Keyed by the address of the statement's text (`Stmt::sql` is `'static`).
    prepared: Vec<(&'static str, Statement)>,
    conn: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Session {
    /// Connects without TLS (`sslmode=prefer` falls back to plain; `require` fails).
    pub async fn connect(config: &Config, mode: Mode) -> Result<Session, tokio_postgres::Error> {
        let (client, connection) = config.connect(NoTls).await?;
        let conn = tokio::spawn(async move {
            // Its error surfaces as `is_closed` on the next statement.
            let _ = connection.await;
        });
        Ok(Session {
            client,
            mode,
            prepared: Vec::new(),
            conn,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Runs one statement of a scenario in this session's mode.
    pub async fn run(&mut self, stmt: &Stmt, params: &[Param]) -> Result<Outcome, OpError> {
        run_on(&self.client, self.mode, &mut self.prepared, stmt, params).await
    }

    /// Plain SQL in the simple protocol, whatever the mode (setup, checks).
    pub async fn batch(&mut self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute(sql).await
    }

    /// The rows of a simple-protocol query as text, whatever the mode (setup, checks).
    pub async fn text_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, OpError> {
        let messages = self.client.simple_query(sql).await?;
        let mut rows = Vec::new();
        for m in messages {
            if let SimpleQueryMessage::Row(row) = m {
                rows.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                );
            }
        }
        Ok(rows)
    }
}

async fn run_on(
    client: &Client,
    mode: Mode,
    prepared: &mut Vec<(&'static str, Statement)>,
    stmt: &Stmt,
    params: &[Param],
) -> Result<Outcome, OpError> {
    {
        match mode {
            Mode::Simple => run_simple(client, stmt, params).await,
            Mode::Extended => {
                let typed = params
                    .iter()
                    .zip(stmt.types.iter())
                    .map(|(p, t)| (p.as_sql(), t.clone()));
                let stream = client.query_typed_raw(stmt.sql, typed).await?;
                collect(stream, stmt.text_result).await
            }
            Mode::Prepared => {
                let found = prepared
                    .iter()
                    .find(|(sql, _)| std::ptr::eq(*sql, stmt.sql))
                    .map(|(_, s)| s.clone());
                let statement = match found {
                    Some(s) => s,
                    None => {
                        let s = client.prepare_typed(stmt.sql, stmt.types).await?;
                        prepared.push((stmt.sql, s.clone()));
                        s
                    }
                };
                let stream = client
                    .query_raw(&statement, params.iter().map(Param::as_sql))
                    .await?;
                collect(stream, stmt.text_result).await
            }
        }
    }
}

async fn run_simple(client: &Client, stmt: &Stmt, params: &[Param]) -> Result<Outcome, OpError> {
    let sql = inline_params(stmt.sql, params);
    let mut out = Outcome::default();
    for m in client.simple_query(&sql).await? {
        match m {
            SimpleQueryMessage::Row(row) if out.text.is_none() && stmt.text_result => {
                out.text = row.get(0).map(str::to_owned);
            }
            SimpleQueryMessage::CommandComplete(n) => out.rows = n,
            _ => {}
        }
    }
    Ok(out)
}

async fn collect(stream: tokio_postgres::RowStream, want_text: bool) -> Result<Outcome, OpError> {
    pin_mut!(stream);
    let mut out = Outcome::default();
    let mut returned = 0u64;
    while let Some(row) = stream.try_next().await? {
        if returned == 0 && want_text {
            out.text = row.try_get::<_, Option<String>>(0).ok().flatten();
        }
        returned += 1;
    }
    out.rows = stream.rows_affected().unwrap_or(returned);
    Ok(out)
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
