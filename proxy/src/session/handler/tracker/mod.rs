//! Which request each backend message answers.
//!
//! Every request forwarded upstream pushes what PostgreSQL will answer it with
//! ([`Expect`]); every backend message is stepped through the queue. This is what lets
//! spillway capture the rows of one Execute among pipelined requests, swallow the
//! ParseComplete of a Parse it injected itself, and know when a statement was really
//! prepared.
//!
//! Rules (PostgreSQL's protocol, §55.2): a simple Query, FunctionCall and Sync end with
//! exactly one ReadyForQuery; an error during an extended-protocol message makes the
//! server discard every message up to the next Sync (so their expectations are dropped,
//! and ones pushed later are not pushed until that Sync); NoticeResponse,
//! ParameterStatus and NotificationResponse can arrive at any time and answer nothing.
//!
//! A FATAL from PostgreSQL with nothing outstanding (an idle-in-transaction timeout,
//! an operator ending the backend, a shutdown) answers no request either: PostgreSQL
//! closes the connection right after it, and the relay reports it.
//!
//! Invariants:
//! - If a message does not fit the queue, the tracker is *desynced*: it drops every
//!   expectation and fill, and stays desynced (the session then passes everything
//!   through uncached) — a wrong guess about which rows belong to which key must never
//!   reach the cache.
//! - [`Tracker::quiet`] is kept equal to "nothing queued and nothing skipped" by every
//!   change; the hit path reads it (and [`Tracker::desynced`]) as a field.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::fill::{Described, Fill};
use super::statements::Prepared;
use crate::protocol::backend;

pub enum Expect {
    /// Query, FunctionCall or Sync: everything up to and including ReadyForQuery.
    /// A simple query being cached carries its fill.
    Ready {
        sync: bool,
        fill: Option<Box<Fill>>,
        /// Assigned by [`Tracker::push`]: the order in which requests were sent.
        id: u64,
    },
    Parse {
        swallow: bool,
        prepared: Option<Prepared>,
    },
    Bind,
    /// `capture`: keep ParameterDescription and RowDescription for the fill of the
    /// Execute that follows (the statement described is the one its portal runs).
    DescribeStatement {
        capture: bool,
    },
    /// `capture`: keep the RowDescription for the fill of the Execute that follows.
    DescribePortal {
        capture: bool,
    },
    Execute {
        fill: Option<Box<Fill>>,
    },
    Close,
    /// The client ended a COPY FROM STDIN (CopyDone/CopyFail) before PostgreSQL's
    /// CopyInResponse was seen: Syncs after this marker count again.
    CopyEnd,
    /// A simple Query spillway sent itself (a held transaction's replay, or its
    /// ROLLBACK): every answer up to and including its ReadyForQuery is swallowed.
    Internal,
    /// A Sync spillway sent itself to end the implicit transaction of Parses it
    /// forwarded ahead of their cycle (`extended/`): its ReadyForQuery is swallowed.
    OwnSync,
}

impl Expect {
    fn is_sync(&self) -> bool {
        matches!(self, Expect::Ready { sync: true, .. } | Expect::OwnSync)
    }
}

/// What the handler must do with one backend message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Do not pass it to the client (answer to an injected request).
    pub swallow: bool,
    /// A ReadyForQuery completed a request.
    pub ready: bool,
    /// An ErrorResponse for a request.
    pub error: bool,
    /// The id of the request that ReadyForQuery ended.
    pub ready_id: Option<u64>,
    /// The message answers an [`Expect::Internal`] request.
    pub internal: bool,
}

pub struct Tracker {
    /// Nothing is outstanding upstream: a local answer cannot overtake anything.
    /// Read-only outside this file.
    pub quiet: bool,
    /// A backend message did not fit: nothing is tracked any more. Read-only outside
    /// this file.
    pub desynced: bool,
    queue: VecDeque<Expect>,
    /// An extended-protocol error happened and no Sync was queued yet: PostgreSQL
    /// ignores everything until the next Sync.
    skipping: bool,
    /// Descriptions captured by a Describe, for the next Execute's fill.
    described: Described,
    /// An extended-protocol COPY FROM STDIN is open: forwarded Syncs are ignored by
    /// PostgreSQL until the client's CopyDone/CopyFail.
    copy_in: bool,
    /// Ids given to requests that end in ReadyForQuery so far (the next one gets this).
    /// A Sync PostgreSQL ignores (inside COPY FROM STDIN) is removed from the queue
    /// with its id, so ids, not counts, say which request a ReadyForQuery ends.
    readies_pushed: u64,
    /// Statements whose Parse PostgreSQL confirmed, for the handler to record.
    pub confirmed: Vec<Prepared>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            quiet: true,
            desynced: false,
            queue: VecDeque::new(),
            skipping: false,
            described: Described::default(),
            copy_in: false,
            readies_pushed: 0,
            confirmed: Vec::new(),
        }
    }
}

impl Tracker {
    /// Keeps [`Tracker::quiet`] true to the queue after a change.
    fn settle(&mut self) {
        self.quiet = self.queue.is_empty() && !self.skipping;
    }

    /// Answers are still to come from upstream (unlike [`Tracker::quiet`], false
    /// while PostgreSQL discards messages until a Sync: no answer will come then).
    pub fn awaits_answers(&self) -> bool {
        !self.queue.is_empty()
    }

    /// A Query, FunctionCall, Execute or Sync is still outstanding: something sent
    /// before may still change the transaction state.
    pub fn has_outstanding_statements(&self) -> bool {
        self.queue
            .iter()
            .any(|e| matches!(e, Expect::Ready { .. } | Expect::Execute { .. }))
    }

    /// Whether a Query, FunctionCall or Sync awaits its ReadyForQuery: the extended
    /// cycles before it were closed by the client.
    pub fn ready_queued(&self) -> bool {
        self.queue.iter().any(|e| matches!(e, Expect::Ready { .. }))
    }

    /// Executes whose answers are still to come.
    pub fn executes_queued(&self) -> usize {
        self.queue
            .iter()
            .filter(|e| matches!(e, Expect::Execute { .. }))
            .count()
    }

    /// A Close of statement `name` was forwarded: a Parse of it still awaiting its
    /// ParseComplete must not register it afterwards.
    pub fn forget_pending(&mut self, name: &str) {
        for e in &mut self.queue {
            if let Expect::Parse { prepared, .. } = e
                && matches!(prepared, Some(Prepared::Named(n, _)) if n == name)
            {
                *prepared = None;
            }
        }
    }

    /// PostgreSQL will discard the messages forwarded now (until a Sync).
    pub fn is_skipping(&self) -> bool {
        self.skipping
    }

    pub fn push(&mut self, expect: Expect) {
        if self.desynced {
            return;
        }
        if self.copy_in && expect.is_sync() {
            return;
        }
        if self.skipping {
            if !expect.is_sync() {
                return;
            }
            self.skipping = false;
        }
        let mut expect = expect;
        if let Expect::Ready { id, .. } = &mut expect {
            *id = self.readies_pushed;
            self.readies_pushed += 1;
        }
        self.queue.push_back(expect);
        self.settle();
    }

    /// The id the next enqueued request ending in ReadyForQuery will have.
    pub fn next_ready_index(&self) -> u64 {
        self.readies_pushed
    }

    /// The client sent CopyDone or CopyFail.
    pub fn copy_end(&mut self) {
        if self.copy_in {
            self.copy_in = false;
        } else if self
            .queue
            .iter()
            .any(|e| matches!(e, Expect::Execute { .. }))
        {
            // CopyInResponse not seen yet (or this is no extended COPY at all).
            self.queue.push_back(Expect::CopyEnd);
        }
        self.settle();
    }

    /// Steps one whole backend message (`msg` includes tag and length).
    pub fn on_message(&mut self, tag: u8, msg: &[u8]) -> Step {
        let step = self.step(tag, Some(msg));
        self.settle();
        step
    }

    /// Steps a message too large to hold; any fill it belongs to is abandoned.
    pub fn on_streamed(&mut self, tag: u8) -> Step {
        let step = self.step(tag, None);
        self.settle();
        step
    }

    fn step(&mut self, tag: u8, msg: Option<&[u8]>) -> Step {
        let mut step = Step::default();
        // Asynchronous messages answer no request.
        if matches!(tag, b'N' | b'S' | b'A') || self.desynced {
            return step;
        }
        while matches!(self.queue.front(), Some(Expect::CopyEnd)) {
            self.queue.pop_front();
        }
        let Some(head) = self.queue.front_mut() else {
            // PostgreSQL ends the session on its own (a timeout, an operator, a
            // shutdown): expected, and the connection closes right after.
            let fatal = tag == b'E'
                && msg.is_some_and(|m| backend::prefix_is_fatal(m.get(5..).unwrap_or_default()));
            if !fatal {
                self.desync(tag);
            }
            return step;
        };
        match (head, tag) {
            (Expect::Internal, _) => {
                step.swallow = true;
                step.internal = true;
                if tag == b'Z' {
                    self.queue.pop_front();
                }
            }
            (Expect::OwnSync, b'Z') => {
                step.swallow = true;
                self.queue.pop_front();
            }
            (Expect::Ready { fill, id, .. }, b'Z') => {
                if let Some(f) = fill.take() {
                    drop(f); // completed at CommandComplete, or abandoned
                }
                step.ready_id = Some(*id);
                self.queue.pop_front();
                self.described = Described::default();
                step.ready = true;
            }
            (Expect::Ready { fill, .. }, b'E') => {
                *fill = None;
                step.error = true;
            }
            (Expect::Ready { fill, .. }, b'T') => {
                if let Some(f) = fill.as_mut() {
                    match msg {
                        Some(m) if f.row_description.is_none() => {
                            f.row_description = Some(Bytes::copy_from_slice(m));
                        }
                        // A second result set: not one statement's result.
                        _ => *fill = None,
                    }
                }
            }
            (Expect::Ready { fill, .. }, b'D') => Self::capture_row(fill, msg),
            (Expect::Ready { fill, .. }, b'C') => {
                if let Some(f) = fill.take() {
                    (*f).finish(msg);
                }
            }
            (Expect::Ready { fill, .. }, _) => *fill = None,
            (Expect::Parse { swallow, prepared }, b'1') => {
                step.swallow = *swallow;
                if let Some(p) = prepared.take() {
                    self.confirmed.push(p);
                }
                self.queue.pop_front();
            }
            (Expect::Bind, b'2') => {
                // A new portal: any earlier portal's description is not this one's.
                self.described = Described::default();
                self.queue.pop_front();
            }
            (Expect::Close, b'3') => {
                self.queue.pop_front();
            }
            (Expect::DescribeStatement { capture }, b't') => {
                self.described.parameters = match (*capture, msg) {
                    (true, Some(m)) => Some(Bytes::copy_from_slice(m)),
                    _ => None,
                };
            }
            (Expect::DescribeStatement { capture }, b'T' | b'n') => {
                self.described.statement = match (*capture, self.described.parameters.take(), msg) {
                    (true, Some(t), Some(m)) => {
                        let mut both = BytesMut::with_capacity(t.len() + m.len());
                        both.extend_from_slice(&t);
                        both.extend_from_slice(m);
                        Some(both.freeze())
                    }
                    _ => None,
                };
                self.queue.pop_front();
            }
            (Expect::DescribePortal { capture }, b'T' | b'n') => {
                self.described.portal = match (*capture, tag, msg) {
                    (true, b'T', Some(m)) => Some(Bytes::copy_from_slice(m)),
                    _ => None,
                };
                self.queue.pop_front();
            }
            (Expect::Execute { fill }, b'D') => {
                if let Some(f) = fill.as_mut() {
                    self.described.hand_to(f);
                }
                Self::capture_row(fill, msg);
            }
            (Expect::Execute { fill }, b'C') => {
                if let Some(mut f) = fill.take() {
                    self.described.hand_to(&mut f);
                    (*f).finish(msg);
                }
                self.described = Described::default();
                self.queue.pop_front();
            }
            (Expect::Execute { .. }, b'I' | b's') => {
                self.described = Described::default();
                self.queue.pop_front();
            }
            // COPY FROM STDIN inside an Execute: PostgreSQL ignores every Sync it
            // receives until CopyDone/CopyFail, so Syncs forwarded since the Execute
            // (and until then) get no ReadyForQuery.
            (Expect::Execute { fill }, b'G') => {
                *fill = None;
                let mut i = 1;
                let mut ended = false;
                while i < self.queue.len() {
                    match self.queue.get(i) {
                        Some(Expect::CopyEnd) => {
                            ended = true;
                            break;
                        }
                        Some(e) if e.is_sync() => {
                            self.queue.remove(i);
                        }
                        _ => i += 1,
                    }
                }
                self.copy_in = !ended;
            }
            // COPY TO STDOUT (or both): its data flows until CommandComplete.
            (Expect::Execute { fill }, b'H' | b'W' | b'd' | b'c') => *fill = None,
            (_, b'E') => {
                // Extended-protocol error: everything up to the next Sync is skipped.
                step.error = true;
                while let Some(front) = self.queue.front() {
                    if front.is_sync() {
                        break;
                    }
                    self.queue.pop_front();
                }
                self.skipping = self.queue.is_empty();
                self.described = Described::default();
            }
            _ => self.desync(tag),
        }
        step
    }

    fn capture_row(fill: &mut Option<Box<Fill>>, msg: Option<&[u8]>) {
        let keep = match (fill.as_mut(), msg) {
            (Some(f), Some(m)) => f.push(m),
            (Some(_), None) => false,
            (None, _) => return,
        };
        if !keep && let Some(f) = fill.take() {
            f.ticket.abandon_too_large();
        }
    }

    fn desync(&mut self, tag: u8) {
        tracing::error!(
            tag = %char::from(tag),
            "backend message does not match any outstanding request; caching disabled for this session"
        );
        self.desynced = true;
        self.queue.clear();
        self.described = Described::default();
        self.skipping = false;
    }
}

#[cfg(test)]
mod tests;
