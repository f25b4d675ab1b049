//! What each backend message means for the session: the tracker steps it (capturing
//! fills, confirming prepared statements, swallowing answers to spillway's own
//! requests); the settings learn of ParameterStatus and failed SETs; a write's
//! invalidations are repeated at its CommandComplete and ReadyForQuery; a request's
//! ReadyForQuery ends its latency measurement; and once nothing is outstanding, what
//! lasted only as long as the request or the transaction is let go.
//!
//! Invariant: waiters for a quiet upstream ([`super::wait::Wait::quiet`]) are woken
//! exactly when the last answer owed arrives.

use std::collections::VecDeque;
use std::time::Instant;

use super::{Caching, Delivery};
use crate::metrics::SessionMetrics;
use crate::protocol::backend;

/// How a request sent upstream is counted in the latency histogram.
#[derive(Clone, Copy)]
pub enum Path {
    Miss,
    Passthrough,
}

/// Latency of requests: the histograms, and the requests sent upstream whose answer
/// is being timed.
#[derive(Default)]
pub struct Timing {
    pub metrics: SessionMetrics,
    /// (ready id, sent, path), in send order.
    pending: VecDeque<(u64, Instant, Path)>,
}

/// Requests timed at once at most (a desynced tracker stops answering ids).
const MAX_TIMED: usize = 1024;

impl Timing {
    /// The request with ready id `id` ended: its latency is recorded.
    fn finish(&mut self, id: u64) {
        while let Some(&(t, started, path)) = self.pending.front() {
            if t > id {
                break;
            }
            self.pending.pop_front();
            if t == id {
                let h = match path {
                    Path::Miss => &self.metrics.miss,
                    Path::Passthrough => &self.metrics.passthrough,
                };
                h.record(started.elapsed());
            }
        }
    }
}

impl Caching {
    /// Times the request about to be pushed until its ReadyForQuery.
    pub(super) fn time_request(&mut self, started: Instant, path: Path) {
        if self.timing.pending.len() < MAX_TIMED && !self.tracker.desynced {
            self.timing
                .pending
                .push_back((self.tracker.next_ready_index(), started, path));
        }
    }

    /// One backend message (`None`: too large to hold, passing through).
    pub(super) fn on_backend(&mut self, tag: u8, msg: Option<&[u8]>) -> Delivery {
        let was_waiting = self.tracker.awaits_answers();
        let step = match msg {
            Some(m) => self.tracker.on_message(tag, m),
            None => self.tracker.on_streamed(tag),
        };
        if was_waiting && !self.tracker.awaits_answers() {
            self.quiet.notify_one();
        }
        if step.internal {
            self.on_internal(tag, msg);
            return Delivery::Swallow;
        }
        let held_status = self.held_cycle_answer(&step);
        for prepared in self.tracker.confirmed.drain(..) {
            self.stmts.confirmed(prepared);
        }
        if tag == backend::PARAMETER_STATUS
            && let Some(m) = msg
            && let Ok((name, value)) = backend::parse_parameter_status(&m[5..])
        {
            self.key.report(&name, &value);
        }
        if step.error {
            self.key.request_failed();
            self.tx.echo.completed(None);
        }
        if tag == b'C' {
            self.tx.echo.completed(msg);
        }
        if tag == b'C' || step.ready {
            if !self.tx.effects.is_empty() {
                self.db.invalidate(&self.tx.effects, &self.cache.versions);
            }
            if self.tx.outside
                && let Some(w) = &self.writes
            {
                w.service.note_outside_write();
            }
        }
        if step.ready {
            let status = held_status.or_else(|| msg.and_then(|m| m.get(5).copied()));
            self.request_ended(step.ready_id, status);
        }
        let delivery = match held_status {
            _ if step.swallow => Delivery::Swallow,
            Some(status) => Delivery::Status(status),
            None => Delivery::Pass,
        };
        if self.overlay.is_some() {
            return self.overlaid(tag, msg, step.ready_id, delivery);
        }
        delivery
    }

    /// A ReadyForQuery ended the request `id` with transaction status `status`.
    fn request_ended(&mut self, id: Option<u64>, status: Option<u8>) {
        if let Some(id) = id {
            self.key.settle(id, status);
            self.timing.finish(id);
        }
        if status != Some(b'I') {
            // Backstops for what was taken as autocommit but ran in a transaction
            // block (a BEGIN pipelined in the same cycle): its writes are the
            // transaction's, its settings may yet be rolled back.
            if !self.tx.effects.is_empty() {
                self.tx.wrote = true;
            }
            self.tx.echo.completed(None);
            self.key.in_transaction_after_all();
        }
        if self.tracker.quiet && self.cycle.held.is_empty() && !self.cycle.upstream {
            self.key.quiet();
            self.cycle.next_fill = None;
            self.stmts.settle();
            if status == Some(b'I') {
                // Committed, and invalidated again at this ReadyForQuery (above).
                if let Some(claim) = self.tx.echo.one_row() {
                    self.db.echoes.written(claim);
                }
                self.tx.ended();
                self.key.transaction_ended();
                self.stmts.transaction_ended();
            }
        }
    }
}
