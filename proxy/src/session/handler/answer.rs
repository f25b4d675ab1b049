//! The answers spillway gives a request itself, in one place: a deferred write's
//! acknowledgement or refusal, a held transaction's statements, `BEGIN`, `COMMIT` and
//! `ROLLBACK`, `SPILLWAY FLUSH`.
//!
//! An [`Answer`] is built while the request is routed (the answers an extended cycle
//! gives before its command tag: ParseComplete, BindComplete, ParameterDescription,
//! NoData; and after it: CloseComplete) and sent once the outcome is known, with the
//! command tag or the error and the ReadyForQuery that ends the request
//! ([`Answer::send`]). RETURNING rows take PostgreSQL's places among them
//! (`returning.rs`). Errors are [`ClientError`]s, encoded by `error.rs`.
//!
//! Invariant: an answer goes out only for the message that completes its request (a
//! Query, or the Sync of an extended cycle), so every request gets exactly one
//! ReadyForQuery; a message that ends an extended cycle early (a Flush or Close that
//! would have gone upstream) gets the error alone.

use std::sync::Arc;

use bytes::BytesMut;

use super::returning;
use super::statements::Stmt;
use crate::error::ClientError;
use crate::protocol::frontend;
use crate::protocol::sqlstate::SqlState;
use crate::session::state::Outbox;
use crate::write::convert::Bound;
use crate::write::returning::Returning;
use crate::write::service::DeferError;

/// What spillway answers one request with, but its outcome.
#[derive(Default)]
pub struct Answer {
    /// Answers that precede the command tag (or the error).
    pub before: BytesMut,
    /// Answers that follow the command tag (not an error).
    pub after: BytesMut,
    /// It answers an extended cycle (at its Sync), else a simple Query.
    pub extended: bool,
    /// The unnamed statement the cycle parsed (answered locally: the client's now).
    pub unnamed: Option<Arc<Stmt>>,
    /// Rows a deferred write's RETURNING answers.
    pub returning: Option<Returning>,
}

/// The outcome an answer reports.
pub enum Reply<'a> {
    /// CommandComplete with `tag`, after `rows` RETURNING rows (if any are answered).
    Done {
        tag: &'a str,
        rows: usize,
    },
    Error(&'a ClientError),
}

/// A request's only statement, as far as answering it here goes: its parameters, and
/// its answer so far.
pub struct Single<'a> {
    pub bound: &'a Bound,
    pub answer: Answer,
}

impl Answer {
    /// The answer to a simple Query.
    pub fn query() -> Self {
        Self::default()
    }

    /// The message type this answer completes: Sync for an extended cycle, else Query.
    pub fn tag(&self) -> u8 {
        if self.extended {
            frontend::SYNC
        } else {
            frontend::QUERY
        }
    }

    /// Writes the answer and the ReadyForQuery(`status`) that ends the request.
    /// Returns the unnamed statement the cycle parsed, for the session's books.
    pub fn send(self, reply: Reply<'_>, status: u8, out: &mut Outbox) -> Option<Arc<Stmt>> {
        self.write(reply, out);
        out.ready(status);
        self.unnamed_parsed()
    }

    /// Writes the answer without a ReadyForQuery: an error that ends an extended
    /// cycle before its Sync (PostgreSQL then discards the rest until the Sync).
    pub fn send_unsynced(self, reply: Reply<'_>, out: &mut Outbox) {
        self.write(reply, out);
    }

    fn write(&self, reply: Reply<'_>, out: &mut Outbox) {
        let written = match reply {
            Reply::Done { rows, .. } => Some(rows),
            Reply::Error(_) => None,
        };
        match &self.returning {
            Some(r) => out.answer(&returning::answers(r, &self.before, self.extended, written)),
            None => out.answer(&self.before),
        }
        match reply {
            Reply::Done { tag, .. } => {
                out.answer(&frontend::command_complete(tag));
                out.answer(&self.after);
            }
            Reply::Error(err) => out.error(err),
        }
    }

    fn unnamed_parsed(self) -> Option<Arc<Stmt>> {
        self.unnamed
    }
}

/// The ERROR a refused deferred write or held transaction is answered with: the write
/// service's SQLSTATE (53000 full, 23505 duplicate key, 08006 unreachable, 40001
/// diverged, XX000 stopped), PostgreSQL's DETAIL for a duplicate key.
pub fn refusal(err: &DeferError) -> ClientError {
    let code = SqlState::of(err.sqlstate()).unwrap_or(SqlState::INTERNAL_ERROR);
    let error = ClientError::error(code, err.to_string());
    match err {
        DeferError::Duplicate { detail, .. } => error.with_detail(detail.clone()),
        _ => error,
    }
}
