//! Moving a held transaction upstream: a barrier on the held tables, then `BEGIN` and
//! the held statements as one internal simple Query ([`Expect::Internal`]: its answers
//! are swallowed and compared with what the client was told), then the message that
//! caused it goes on in PostgreSQL's transaction. A replay whose row counts differ, or
//! that fails, is rolled back upstream (another internal query) and the client gets
//! 40001 with its transaction failed.
//!
//! Invariant: the internal query is sent only when nothing else is outstanding
//! upstream (a held transaction sends nothing else), so its answers are the next ones.

use super::super::answer::{Answer, Reply};
use super::super::tracker::Expect;
use super::super::tx::ReplayLog;
use super::super::wait::{Held, Resume, Wait};
use super::super::{Caching, Disposition};
use super::ended;
use crate::error::ClientError;
use crate::protocol::backend;
use crate::protocol::frontend;
use crate::protocol::sqlstate::SqlState;
use crate::read::cache::Effects;
use crate::session::state::Outbox;

impl Caching {
    /// Moves the held transaction upstream before the current message goes on: a
    /// barrier on the held tables, then the replay (the message is offered again
    /// after each step; see [`Caching::resume_held`]).
    pub(in super::super) fn leave_held(&mut self, out: &mut Outbox) -> Disposition {
        if self.link.detached {
            return Disposition::NeedsUpstream;
        }
        let (Some(held), Some(d)) = (self.tx.held.as_ref(), self.writes.as_ref()) else {
            return Disposition::Consumed;
        };
        let w = d.service.clone();
        let tables: Vec<&str> = held.stmts.iter().map(|s| s.table.as_str()).collect();
        if let Some(target) = w.barrier_target(tables).filter(|t| *t > w.applied()) {
            self.wait = Wait::on(async move {
                Resume::Held(Box::new(Held::Barrier(w.wait_applied(target).await)))
            });
            return Disposition::Blocked;
        }
        self.start_replay(out)
    }

    /// Sends `BEGIN` and the held statements upstream as one internal Query.
    pub(super) fn start_replay(&mut self, out: &mut Outbox) -> Disposition {
        let Some(held) = self.tx.held.as_ref() else {
            return Disposition::Consumed;
        };
        let mut sql = String::from(held.begin);
        let mut expected = vec!["BEGIN".to_owned()];
        for ((statements, verb), flags) in held.replay.iter().zip(&held.applied) {
            for (s, wrote) in statements.iter().zip(flags) {
                sql.push_str(";\n");
                sql.push_str(s);
                expected.push(verb.tag(usize::from(*wrote)));
            }
        }
        tracing::info!(
            statements = held.stmts.len(),
            "held transaction moves upstream"
        );
        self.tx.replay = Some(ReplayLog {
            expected,
            ..ReplayLog::default()
        });
        self.send_internal(&sql, Held::Replayed, out)
    }

    fn send_internal(&mut self, sql: &str, then: Held, out: &mut Outbox) -> Disposition {
        // A simple Query drops PostgreSQL's unnamed statement and portal: the client's
        // unnamed statement is parsed there again before its next use.
        self.stmts.internal_query();
        out.internal_query(&frontend::query_message(sql));
        self.tracker.push(Expect::Internal);
        self.timing.metrics.upstream_statements.increment(1);
        let done = self.internal_done.clone();
        self.wait = Wait::on(async move {
            done.notified().await;
            Resume::Held(Box::new(then))
        });
        Disposition::Blocked
    }

    /// A backend message answering the internal query.
    pub(in super::super) fn on_internal(&mut self, tag: u8, msg: Option<&[u8]>) {
        let log = self.tx.replay.get_or_insert_with(ReplayLog::default);
        match (tag, msg) {
            (b'C', Some(m)) => {
                let body = frontend::body(m);
                let text = body.strip_suffix(b"\0").unwrap_or(body);
                log.tags.push(String::from_utf8_lossy(text).into_owned());
            }
            (b'E', Some(m)) => {
                log.error = Some(match backend::parse_error_fields(frontend::body(m)) {
                    Ok(f) => format!("{} ({})", f.message, f.code),
                    Err(_) => "an error".to_owned(),
                });
            }
            (b'E', None) => log.error = Some("an error".to_owned()),
            (b'Z', _) => self.internal_done.notify_one(),
            _ => {}
        }
    }

    /// The replay succeeded: the transaction is PostgreSQL's now, with its writes.
    fn now_upstream(&mut self) {
        let Some(held) = self.tx.held.take() else {
            return;
        };
        ended("upstream");
        let Some(d) = &self.writes else {
            return;
        };
        let tables: Vec<u32> = {
            let set = d.service.tables();
            held.stmts
                .iter()
                .filter_map(|s| set.oid_of(&s.table))
                .collect()
        };
        // The held writes are now the client's own upstream writes.
        for s in &held.stmts {
            metrics::counter!(
                crate::metrics::CLIENT_WRITES,
                "table" => s.table.clone(),
                "policy" => "write-through"
            )
            .increment(1);
        }
        if !tables.is_empty() {
            let effects = Effects {
                tables,
                ..Effects::default()
            };
            self.record_effects(&effects, false);
        }
    }

    /// The internal replay query answered: the transaction goes on upstream (`None`:
    /// the message is processed as in any upstream transaction), or it diverged and is
    /// rolled back there first.
    pub(super) fn replayed(&mut self, out: &mut Outbox) -> Option<Disposition> {
        let log = self.tx.replay.take().unwrap_or_default();
        let problem = match (&log.error, log.tags == log.expected) {
            (Some(e), _) => Some(format!("replayed upstream, it failed: {e}")),
            (None, false) => Some(format!(
                "replayed upstream, its statements answered {:?} where the client \
                 was told {:?}",
                log.tags, log.expected
            )),
            (None, true) => None,
        };
        let Some(problem) = problem else {
            self.now_upstream();
            return None;
        };
        ended("diverged");
        tracing::warn!(%problem, "held transaction diverged; rolled back");
        let error = format!(
            "could not serialize access: the deferred transaction had to move to \
             PostgreSQL and {problem}; the transaction is rolled back"
        );
        Some(self.send_internal("ROLLBACK", Held::RolledBack { error }, out))
    }

    /// The diverged transaction is rolled back upstream: the client gets 40001 and the
    /// transaction is failed until it ends.
    pub(super) fn rolled_back(&mut self, tag: u8, error: &str, out: &mut Outbox) -> Disposition {
        self.tx.replay = None;
        if let Some(held) = self.tx.held.as_mut() {
            held.failed = true;
        }
        let error = ClientError::error(SqlState::SERIALIZATION_FAILURE, error);
        self.answer_held(tag, Answer::default(), Reply::Error(&error), b'E', out)
    }
}
