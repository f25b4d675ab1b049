//! LISTEN and UNLISTEN inside a transaction block in transaction mode (ADR 0033):
//! answered by spillway and kept by the session, handed to the database's listener
//! connection before the block's COMMIT goes upstream, dropped at ROLLBACK. The
//! leased connection never runs them: it would listen for whichever client leases it
//! next.

use std::future::Future;
use std::task::{Context, Poll};

use bytes::BytesMut;

use super::listen::{ListenCommand, Listening, listen_command};
use crate::protocol::frame::peek_header;
use crate::protocol::frontend;

/// What the relay's protocol state says of the client's transaction, for the lease.
#[derive(Debug, Clone, Copy)]
pub struct TxView {
    /// ReadyForQuery status last given to the client (`I`, `T`, `E`).
    pub status: u8,
    /// Requests awaiting their ReadyForQuery (those queued included).
    pub awaiting: u32,
}

impl Listening {
    /// Something was kept for the end of the transaction block, or a COMMIT waits.
    pub(super) fn in_transaction(&self) -> bool {
        !self.in_tx.is_empty() || !self.committing.is_empty()
    }

    /// LISTENs of the block are kept (not handed to the hub yet).
    pub(super) fn keeps(&self) -> bool {
        !self.in_tx.is_empty()
    }

    /// A backend message while LISTENs are kept and the block's end was not read from
    /// the client's text (an extended-protocol COMMIT, one among other statements):
    /// PostgreSQL's CommandComplete `COMMIT` or `ROLLBACK`, then a ReadyForQuery `I`
    /// (a `ROLLBACK TO SAVEPOINT` leaves the block open), settles them: handed to the
    /// listener without waiting (the client may see its COMMIT a moment before the
    /// listener listens), or dropped.
    pub(super) fn on_block_answer(&mut self, tag: u8, msg: &[u8]) {
        match tag {
            b'C' => {
                let body = frontend::body(msg);
                let word = body.split(|&b| b == 0).next().unwrap_or_default();
                if word == b"COMMIT" {
                    self.answered_end = Some(true);
                } else if word == b"ROLLBACK" {
                    self.answered_end = Some(false);
                }
            }
            b'Z' => {
                let Some(committed) = self.answered_end.take() else {
                    return;
                };
                if frontend::body(msg).first() != Some(&b'I') {
                    return;
                }
                let kept = std::mem::take(&mut self.in_tx);
                if committed {
                    for cmd in kept {
                        drop(match cmd {
                            ListenCommand::Listen(channel) => self.sub.listen(channel),
                            ListenCommand::Unlisten(channel) => self.sub.unlisten(channel),
                        });
                    }
                }
            }
            _ => {}
        }
    }

    /// A COMMIT waits for the listener: nothing may be written upstream meanwhile.
    pub(super) fn holds_commit(&self) -> bool {
        !self.committing.is_empty()
    }

    /// Outside any transaction block: what one kept and whose end was not seen as a
    /// COMMIT or ROLLBACK of its own is dropped (as at a rollback).
    pub(super) fn end_transaction(&mut self) {
        if !self.in_tx.is_empty() && self.committing.is_empty() {
            tracing::debug!(
                kept = self.in_tx.len(),
                "a transaction block ended unseen; its LISTENs are dropped"
            );
            self.in_tx.clear();
        }
    }

    /// Inside a transaction block (`status` `T` or `E`) with a connection leased, a
    /// simple Query alone in `queue` and the only request outstanding (`alone`):
    /// - a LISTEN/UNLISTEN (status `T`) is answered here (CommandComplete,
    ///   ReadyForQuery `T`) and kept for the block's end, the connection never
    ///   running it (it would listen for whichever client leases it next);
    /// - with something kept, a COMMIT/END (status `T`) first has the listener take
    ///   it (`Pending` until it answered, nothing written upstream meanwhile), then
    ///   goes upstream as usual (`None`), as PostgreSQL applies LISTEN at commit;
    /// - a ROLLBACK/ABORT, or a COMMIT of a failed block (PostgreSQL rolls it back),
    ///   drops it.
    ///
    /// `None`: nothing of this, the queue goes on as usual.
    pub(super) fn poll_in_tx(
        &mut self,
        queue: &mut BytesMut,
        answers: &mut BytesMut,
        status: u8,
        alone: bool,
        cx: &mut Context<'_>,
    ) -> Option<Poll<()>> {
        if !self.committing.is_empty() {
            let mut waiting = false;
            for answer in &mut self.committing {
                if let Poll::Ready(r) = std::pin::Pin::new(&mut *answer).poll(cx) {
                    if let Ok(Err(e)) | Err(e) = r.map_err(|_| "the listener stopped".to_owned()) {
                        tracing::warn!(error = %e, "a LISTEN committed in a transaction block could not be served by the listener connection");
                    }
                } else {
                    waiting = true;
                }
            }
            if waiting {
                return Some(Poll::Pending);
            }
            self.committing.clear();
            return None;
        }
        let h = peek_header(queue, usize::MAX).ok()??;
        if h.tag != frontend::QUERY || h.total_len != queue.len() || !alone {
            return None;
        }
        let sql = frontend::query(frontend::body(&queue[..]))?;
        if status == b'T'
            && let Some(cmd) = listen_command(sql)
        {
            queue.clear();
            answers.extend_from_slice(&frontend::command_complete(cmd.tag()));
            answers.extend_from_slice(&frontend::ready_for_query(b'T'));
            self.in_tx.push(cmd);
            self.unanswered = self.unanswered.saturating_sub(1);
            return Some(Poll::Ready(()));
        }
        if self.in_tx.is_empty() {
            return None;
        }
        match block_end(sql) {
            Some(BlockEnd::Commit) if status == b'T' => {
                for cmd in std::mem::take(&mut self.in_tx) {
                    let answer = match cmd {
                        ListenCommand::Listen(channel) => self.sub.listen(channel),
                        ListenCommand::Unlisten(channel) => self.sub.unlisten(channel),
                    };
                    self.committing.push(answer);
                }
                self.poll_in_tx(queue, answers, status, alone, cx)
            }
            Some(_) => {
                self.in_tx.clear();
                None
            }
            None => None,
        }
    }
}

/// How a simple Query ends a transaction block, if it is exactly one such statement.
#[derive(Debug, PartialEq, Eq)]
enum BlockEnd {
    Commit,
    Rollback,
}

/// `COMMIT`/`END` or `ROLLBACK`/`ABORT`, each with an optional `WORK` or
/// `TRANSACTION` and `;` (not `ROLLBACK TO`, `COMMIT AND CHAIN`, `COMMIT PREPARED`).
fn block_end(sql: &str) -> Option<BlockEnd> {
    let sql = sql.trim();
    let sql = sql.strip_suffix(';').unwrap_or(sql).trim_end();
    let mut words = sql.split_ascii_whitespace();
    let end = match words.next()?.to_ascii_lowercase().as_str() {
        "commit" | "end" => BlockEnd::Commit,
        "rollback" | "abort" => BlockEnd::Rollback,
        _ => return None,
    };
    match (
        words.next().map(str::to_ascii_lowercase).as_deref(),
        words.next(),
    ) {
        (None | Some("work" | "transaction"), None) => Some(end),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_commit_or_rollback_ends_a_block() {
        for sql in ["COMMIT", "end;", " commit work ", "END TRANSACTION;"] {
            assert_eq!(block_end(sql), Some(BlockEnd::Commit), "{sql}");
        }
        for sql in ["ROLLBACK", "abort", "rollback transaction;"] {
            assert_eq!(block_end(sql), Some(BlockEnd::Rollback), "{sql}");
        }
        for sql in [
            "ROLLBACK TO s1",
            "ROLLBACK TO SAVEPOINT s1",
            "COMMIT AND CHAIN",
            "COMMIT PREPARED 'x'",
            "COMMIT; SELECT 1",
            "ENDX",
            "",
        ] {
            assert_eq!(block_end(sql), None, "{sql}");
        }
    }
}
