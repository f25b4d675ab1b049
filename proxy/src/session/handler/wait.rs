//! What the message being handled waits for, and how it goes on.
//!
//! A message that cannot be answered or forwarded yet is *blocked*: it stays with the
//! relay, which reads nothing behind it (so order holds), and the session waits for
//! one of five things: another session's fill of the same cache key (a coalesced
//! miss), the answers still owed by PostgreSQL (a quiet upstream), the journal's
//! acknowledgement of a deferred write, a barrier (pending writes applied upstream),
//! or a step of a held transaction. Each wait is a future whose output, a [`Resume`],
//! says how the message offered again goes on; nothing else is remembered across the
//! wait.
//!
//! Invariants:
//! - At most one wait per session, for the message at the head of the client's input.
//! - A [`Resume`] belongs to the message that waited: it is spent when that message is
//!   taken (answered, forwarded or held), and never seen by the next one.
//! - A message waits for another session's fill at most once, and passes a barrier at
//!   most once per routing: after it, it goes on even if newer writes arrived
//!   meanwhile (they are concurrent with it), so a busy table cannot starve a reader.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

use super::answer::Answer;
use super::statements::Stmt;
use crate::write::convert::Verb;
use crate::write::service::{
    Applied, DeferError, Known, Outcome, StoredValues, TxOutcome, TxStatement,
};

/// How long a miss waits for another session filling the same key before it goes
/// upstream itself.
const COALESCE_WAIT: Duration = Duration::from_secs(5);

type Pending = Pin<Box<dyn Future<Output = Resume> + Send>>;

#[derive(Default)]
pub enum Wait {
    /// The message is offered for the first time.
    #[default]
    Fresh,
    /// It waits.
    Pending(Pending),
    /// Its wait finished: offered again, it goes on as this says.
    Resumed(Resume),
}

/// How a message goes on after its wait.
pub enum Resume {
    /// Decide again (PostgreSQL's answers owed before it are in, or another session's
    /// fill landed); `filled`: it waited for a fill once, and will not again.
    Again { filled: bool },
    /// Its barrier passed: it goes upstream without another; `write_through`: it is
    /// not deferred either.
    Passed { filled: bool, write_through: bool },
    /// The barrier failed (the flusher stopped): answered with the error.
    BarrierFailed(DeferError),
    /// It may not be deferred after all (the role may not write the table, a reload
    /// took it off deferral): it runs write-through, after its barrier.
    WriteThrough,
    /// The journal's answer to a deferred write.
    Ack(Box<Ack>),
    /// A held transaction's step (`held/`).
    Held(Box<Held>),
    /// The journal's answer to a pipelined cycle (`pipeline.rs`).
    Pipeline(Box<PipelineAck>),
}

/// A deferred write waiting for its journal acknowledgement, and its answer.
pub struct Ack {
    pub outcome: Result<Outcome, DeferError>,
    pub verb: Verb,
    /// The table's OID (its cache entries are invalidated at the ack).
    pub table: u32,
    /// The canonical keys of the rows it writes: only those are invalidated (none:
    /// the table).
    pub keys: Vec<Vec<String>>,
    pub table_name: String,
    pub policy: &'static str,
    pub answer: Answer,
    /// For the `deferred` latency histogram.
    pub started: Instant,
}

/// The journal's answer to a pipelined cycle, and what each Execute is answered with.
pub struct PipelineAck {
    pub outcome: Result<TxOutcome, DeferError>,
    pub answers: Vec<(Verb, Answer)>,
    /// Per Execute: its table and policy label.
    pub tables: Vec<(String, &'static str)>,
    pub after: BytesMut,
    pub parsed: Option<Arc<Stmt>>,
    pub started: Instant,
}

/// A pipelined cycle inside a held transaction, decided with the transaction's
/// earlier statements.
pub struct HeldPipeline {
    pub outcome: Result<(Applied, Known), DeferError>,
    /// The cycle's statements, each with its replay SQL and answer.
    pub stmts: Vec<(TxStatement, Vec<String>, Answer)>,
    pub after: BytesMut,
    pub parsed: Option<Arc<Stmt>>,
}

/// A held transaction's step and its outcome.
pub enum Held {
    /// A deferrable statement decided ([`crate::write::service::WriteService::preview`]),
    /// with the stored values an upsert's RETURNING takes (ADR 0038).
    Statement {
        outcome: Result<(Applied, StoredValues, Known), DeferError>,
        stmt: Box<TxStatement>,
        /// Its operations as SQL, for a replay upstream.
        replay: Vec<String>,
        answer: Answer,
    },
    /// COMMIT's journal append.
    Commit {
        outcome: Result<TxOutcome, DeferError>,
        answer: Answer,
    },
    /// The held tables' pending writes, before the replay.
    Barrier(Result<(), DeferError>),
    /// A pipelined cycle's statements decided together (`pipeline.rs`).
    Pipeline(Box<HeldPipeline>),
    /// The internal replay query answered.
    Replayed,
    /// The internal ROLLBACK after a failed replay answered; the client gets `error`.
    RolledBack { error: String },
}

impl Wait {
    /// Waits for `future`; the message is offered again with its output.
    pub fn on(future: impl Future<Output = Resume> + Send + 'static) -> Self {
        Wait::Pending(Box::pin(future))
    }

    /// Waits for another session's fill of the same key (at most [`COALESCE_WAIT`]).
    pub fn fill(notified: OwnedNotified) -> Self {
        Self::on(async move {
            let _ = tokio::time::timeout(COALESCE_WAIT, notified).await;
            Resume::Again { filled: true }
        })
    }

    /// Waits until nothing is owed by upstream; what the message went through before
    /// stays with it.
    pub fn quiet(quiet: &Arc<Notify>, carried: Resume) -> Self {
        let quiet = quiet.clone();
        Self::on(async move {
            quiet.notified().await;
            carried
        })
    }

    pub fn is_pending(&self) -> bool {
        matches!(self, Wait::Pending(_))
    }

    /// Polls a pending wait; once it finished, the message may be offered again.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Wait::Pending(future) = self else {
            return Poll::Pending;
        };
        match future.as_mut().poll(cx) {
            Poll::Ready(resume) => {
                *self = Wait::Resumed(resume);
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// The message waited for another session's fill already.
    pub fn filled(&self) -> bool {
        matches!(
            self,
            Wait::Resumed(Resume::Again { filled: true } | Resume::Passed { filled: true, .. })
        )
    }

    /// The message passed its barrier.
    pub fn passed_barrier(&self) -> bool {
        matches!(self, Wait::Resumed(Resume::Passed { .. }))
    }

    /// The message must not be deferred (it runs write-through).
    pub fn write_through(&self) -> bool {
        matches!(
            self,
            Wait::Resumed(
                Resume::WriteThrough
                    | Resume::Passed {
                        write_through: true,
                        ..
                    }
            )
        )
    }

    /// What a quiet-upstream wait carries over: the same message goes on as it was.
    pub fn carry(&self) -> Resume {
        match self {
            Wait::Resumed(Resume::Passed {
                filled,
                write_through,
            }) => Resume::Passed {
                filled: *filled,
                write_through: *write_through,
            },
            Wait::Resumed(Resume::WriteThrough) => Resume::WriteThrough,
            _ => Resume::Again {
                filled: self.filled(),
            },
        }
    }

    /// Takes an outcome the message is to be answered with (an ack, a failed barrier,
    /// a held transaction's step), leaving what only steers its routing.
    pub fn take_outcome(&mut self) -> Option<Resume> {
        match self {
            Wait::Resumed(
                Resume::Ack(_) | Resume::BarrierFailed(_) | Resume::Held(_) | Resume::Pipeline(_),
            ) => match std::mem::take(self) {
                Wait::Resumed(r) => Some(r),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_finished_wait_says_how_the_message_goes_on() {
        let mut w = Wait::on(async {
            Resume::Passed {
                filled: true,
                write_through: false,
            }
        });
        assert!(w.is_pending());
        std::future::poll_fn(|cx| w.poll(cx)).await;
        assert!(!w.is_pending());
        assert!(w.passed_barrier() && w.filled() && !w.write_through());
        // It only steers the routing: nothing to answer with.
        assert!(w.take_outcome().is_none());
        assert!(matches!(
            w.carry(),
            Resume::Passed {
                filled: true,
                write_through: false
            }
        ));
        // An outcome is taken once, and the message is fresh again.
        let mut w = Wait::Resumed(Resume::BarrierFailed(DeferError::Stopped("x".into())));
        assert!(matches!(w.take_outcome(), Some(Resume::BarrierFailed(_))));
        assert!(matches!(w, Wait::Fresh));
        assert!(w.take_outcome().is_none());
    }

    #[tokio::test]
    async fn a_quiet_wait_carries_what_the_message_went_through() {
        let quiet = Arc::new(Notify::new());
        let w = Wait::Resumed(Resume::WriteThrough);
        let mut next = Wait::quiet(&quiet, w.carry());
        quiet.notify_one();
        std::future::poll_fn(|cx| next.poll(cx)).await;
        assert!(next.write_through() && !next.passed_barrier());
        // A fresh message waited for nothing.
        assert!(matches!(
            Wait::Fresh.carry(),
            Resume::Again { filled: false }
        ));
    }
}
