//! A simple Query that is not a fresh hit: `SPILLWAY FLUSH`, a deferred write or a
//! barrier (`deferred.rs`, `held/`), a coalesced miss, or forwarded upstream with a
//! fill when its result may be cached; and the other messages that go upstream as
//! they are (FunctionCall, COPY data, Terminate, and what spillway does not read).
//!
//! Invariant: a miss is filled only when its key was built with nothing outstanding
//! upstream and reads allowed, and its dependencies are captured before it is sent.

use std::time::Instant;

use spillway_policies::cache::Lookup;

use super::answer::{Answer, Single};
use super::fill::Fill;
use super::flush::spillway_flush;
use super::statements::Unnamed;
use super::tracker::Expect;
use super::upstream::Path;
use super::wait::Wait;
use super::{Caching, Disposition};
use crate::protocol::frontend;
use crate::read::cache::{Effects, Params};
use crate::session::state::Outbox;
use crate::write::convert::Bound;

impl Caching {
    /// A simple Query not answered by the hit path.
    pub(super) fn on_query(&mut self, msg: &[u8], out: &mut Outbox) -> Disposition {
        let started = Instant::now();
        // Offered again after a wait: the entry may be there now.
        if !matches!(self.wait, Wait::Fresh)
            && let Some(done) = self.hit(msg, out)
        {
            return done;
        }
        let Some(sql) = frontend::query(frontend::body(msg)) else {
            // PostgreSQL reports what is wrong with it.
            return self.forward_query(msg, None, started, out);
        };
        let key = (self.reads_allowed(out.tx_status()) && self.tracker.quiet)
            .then(|| super::query_key(&mut self.key, sql.as_bytes()).to_vec());
        // DROP DATABASE and the like: spillway's own connection must not be in the way.
        if let Some(closed) = self.cache.release_databases([sql]) {
            return self.wait_released(closed);
        }
        let analysis = self.cache.classifier.classify(sql);
        // Not SQL, so PostgreSQL's parser (and the classifier) refuse it.
        if analysis.unanalysed
            && let Some(table) = spillway_flush(sql)
        {
            return self.flush_command(table.as_deref(), Answer::query(), out);
        }
        if self.writes.is_some() {
            let bound = Bound::default();
            let single = Single {
                bound: &bound,
                answer: Answer::query(),
            };
            if let Some(done) = self.route_writes(&[&analysis], Some(single), None, out) {
                return done;
            }
        }
        let decision = self.decide(&analysis);
        let mut fill = None;
        if let (Ok(cacheable), Some(key)) = (&decision.cacheable, &key) {
            match self.cache.results.lookup(key) {
                // Another session's fill landed since the hit path looked: go upstream.
                Lookup::Hit(_) => {}
                Lookup::Lead(ticket) => {
                    let deps = self.capture(cacheable, &decision, &Params::NONE);
                    fill = Some(Fill::new(ticket, deps, cacheable.ttl));
                }
                Lookup::Wait(notified) => {
                    if !self.wait.filled() && out.tx_status() == b'I' {
                        self.wait = Wait::fill(notified);
                        return Disposition::Blocked;
                    }
                }
            }
        }
        let certain = self.certain(out.tx_status(), analysis.statements.len());
        self.statement_effects(&analysis, &decision, &Params::NONE, certain);
        self.forward_query(msg, fill, started, out)
    }

    /// Sends a simple Query upstream, with the fill of its result if it has one.
    fn forward_query(
        &mut self,
        msg: &[u8],
        fill: Option<Box<Fill>>,
        started: Instant,
        out: &mut Outbox,
    ) -> Disposition {
        // The simple protocol runs through the unnamed statement and portal.
        self.stmts.unnamed = Unnamed::NONE;
        out.forward(msg);
        self.timing.metrics.upstream_statements.increment(1);
        let path = if fill.is_some() {
            Path::Miss
        } else {
            Path::Passthrough
        };
        self.time_request(started, path);
        self.tracker.push(Expect::Ready {
            sync: false,
            fill,
            id: 0,
        });
        Disposition::Consumed
    }

    /// A FunctionCall: forwarded; it can do anything.
    pub(super) fn on_function_call(&mut self, msg: &[u8], out: &mut Outbox) -> Disposition {
        let effects = Effects::unknown(self.cache.settings().invalidate_on_unknown);
        let certain = self.certain(out.tx_status(), 1);
        self.record_effects(&effects, certain);
        out.forward(msg);
        self.timing.metrics.upstream_statements.increment(1);
        self.tracker.push(Expect::Ready {
            sync: false,
            fill: None,
            id: 0,
        });
        Disposition::Consumed
    }

    /// COPY data, Terminate, and anything spillway does not interpret.
    pub(super) fn forward_other(&mut self, msg: &[u8], out: &mut Outbox) -> Disposition {
        if matches!(msg[0], b'c' | b'f') {
            self.tracker.copy_end();
        }
        self.forward_held(out);
        out.forward(msg);
        Disposition::Consumed
    }

    /// Once the tracker lost track, nothing is classified any more: anything may
    /// write, and everything goes upstream.
    pub(super) fn forward_desynced(&mut self, msg: &[u8], out: &mut Outbox) -> Disposition {
        let tag = msg[0];
        if matches!(
            tag,
            frontend::QUERY | frontend::EXECUTE | frontend::FUNCTION_CALL
        ) {
            self.db.versions.bump_all();
        }
        if matches!(tag, frontend::QUERY | frontend::FUNCTION_CALL) {
            self.timing.metrics.upstream_statements.increment(1);
        }
        out.forward(msg);
        Disposition::Consumed
    }
}
