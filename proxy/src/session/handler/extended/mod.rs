//! The extended query protocol through the cache.
//!
//! Parse/Bind/Describe/Execute/Close are held only while spillway may answer their
//! cycle itself: every Execute a cache hit on the unnamed portal (`local.rs`), or the
//! cycle one statement spillway answers (a deferrable write, `BEGIN` of a held
//! transaction, `SPILLWAY FLUSH`: `route.rs`). The message that makes both impossible
//! sends the cycle upstream at once, itself included, and the rest follows message by
//! message: PostgreSQL answers (and, failing, flushes its error) as it would directly,
//! also to a pipelining client that sends no Sync. A Flush or too much held does the
//! same. At the Sync of a cycle still held, the cycle is answered locally, or goes
//! upstream in order, with the client's unnamed statement parsed there first if it was
//! only ever answered locally, and misses captured.
//!
//! Inside a held transaction (`held/`) every message waits for its Sync: nothing goes
//! upstream while the transaction is spillway's (but a named Parse, below: prepared
//! statements are not transactional).
//!
//! Named statements are always prepared upstream (their names share PostgreSQL's
//! namespace with SQL PREPARE); only the unnamed one is answered locally, and it is
//! re-parsed upstream before any forwarded message uses it. A named statement's Parse
//! that opens a cycle and prepares a deferrable write goes upstream alone (and a
//! Describe of it after), ahead of the rest of the cycle, which is still held for its
//! Sync (`route::forwarded_parses`).
//!
//! Invariants:
//! - A held message is one spillway may still answer; an error PostgreSQL would raise
//!   is never held back behind a message spillway could not answer.
//! - Held messages are bounded by [`MAX_HELD_BYTES`] and [`MAX_HELD`].

mod local;
mod messages;
mod route;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use spillway_policies::cache::{CachedResult, FillTicket, Lookup};

use super::fill::Fill;
use super::statements::Stmt;
use super::tracker::Expect;
use super::{Caching, Disposition};
use crate::protocol::frontend;
use crate::read::cache::Released;
use crate::read::cache::{Effects, Params};
use crate::session::state::Outbox;
use local::Local;
pub use messages::HeldMessages;
use route::Shape;

/// Held messages beyond these bounds go upstream without waiting for their Sync.
const MAX_HELD_BYTES: usize = 256 * 1024;
const MAX_HELD: usize = 64;

/// The extended-protocol cycle being received, until its Sync.
#[derive(Default)]
pub struct Cycle {
    /// Messages held until their Sync decides where they go. Read-only outside
    /// `extended/` (the hit path checks it is empty).
    pub held: HeldMessages,
    /// The cycle already goes upstream: the rest of it follows message by message.
    pub upstream: bool,
    /// Misses in the rest of the upstream cycle may be captured (decided when it
    /// started going upstream, as at a Sync).
    fills: bool,
    /// Fill prepared at a Bind for the Execute of that portal.
    pub next_fill: Option<Box<Fill>>,
    /// That Bind bound the unnamed statement, not parsed again since: a Describe of it
    /// describes what the fill's Execute runs.
    fill_unnamed: bool,
    /// Named statements the cycle parsed upstream, maybe not confirmed yet: what a
    /// later Bind in the cycle executes, for its barrier (and, for Parses forwarded
    /// ahead of a cycle still held, for its decision at the Sync).
    named: Vec<(String, Arc<Stmt>)>,
    /// What the held messages get from the cache, while every one of them may.
    local: Option<Box<Local>>,
    /// Whether the held messages may still be one statement spillway answers itself.
    shape: Shape,
    /// The last plan done with, emptied, reused by the next one.
    spare: Option<Box<Local>>,
    /// Parameters (formats and values) of the last Bind of the unnamed portal that
    /// went upstream, when its statement writes: the keys its Execute changes.
    bound: Option<Bytes>,
    /// The held cycle's writes were counted as fallbacks (not again when it is offered
    /// again, after a held transaction moved upstream).
    pub counted: bool,
}

impl Cycle {
    /// The held messages are done with (answered, or sent upstream).
    pub fn clear(&mut self) {
        self.held.clear();
        self.drop_local();
        self.shape = Shape::default();
        self.counted = false;
    }

    /// The cycle's Sync went upstream: the next cycle starts.
    fn synced(&mut self) {
        self.upstream = false;
        self.fills = false;
        self.named.clear();
    }

    /// No plan from the cache for the cycle (its box kept for the next one).
    fn drop_local(&mut self) {
        if let Some(plan) = self.local.take() {
            self.recycle(plan);
        }
    }

    fn recycle(&mut self, mut plan: Box<Local>) {
        plan.reset();
        self.spare = Some(plan);
    }

    fn hold(&mut self, msg: &[u8]) {
        self.held.push(msg);
    }
}

impl Caching {
    pub(super) fn on_extended(&mut self, tag: u8, msg: &[u8], out: &mut Outbox) -> Disposition {
        if self.cycle.upstream {
            if let Some(closed) = self.release_before(std::iter::once(msg)) {
                return self.wait_released(closed);
            }
            // A Bind or Execute in a cycle already upstream first gets its barrier.
            if matches!(tag, frontend::BIND | frontend::EXECUTE)
                && let Some(d) = self.route_forwarding(tag, msg, out)
            {
                return d;
            }
            let fills = self.cycle.fills;
            self.send_extended(msg, true, out, fills, &mut None);
            if tag == frontend::SYNC {
                self.cycle.synced();
            }
            return Disposition::Consumed;
        }
        if tag == frontend::SYNC {
            return self.on_sync(msg, out);
        }
        if self.would_forward(tag, msg.len()) {
            if let Some(closed) = self.release_before(self.held_and(msg)) {
                return self.wait_released(closed);
            }
            // A client waiting on a Flush must get its answers.
            if let Some(d) = self.route_forwarding(tag, msg, out) {
                return d;
            }
            self.cycle.hold(msg);
            self.forward_held(out);
            return Disposition::Consumed;
        }
        // A Parse of a named statement that opens its cycle and prepares a deferrable
        // write goes upstream alone (its name is PostgreSQL's), the rest of the cycle
        // held for its Sync: an executemany that prepares its statement in the same
        // pipelined cycle (psycopg) may still be deferred (`route::forwarded_parses`).
        if self.cycle.held.is_empty() && self.ahead_of_cycle(tag, msg) {
            self.send_extended(msg, true, out, false, &mut None);
            // PostgreSQL sends its answer at a Flush (or Sync): the cycle's decision
            // waits for it.
            out.release(frontend::FLUSH_MESSAGE);
            return Disposition::Consumed;
        }
        if self.tx.held.is_some() {
            // A held transaction's cycle is decided at its Sync (`held/`).
            self.cycle.hold(msg);
            return Disposition::Consumed;
        }
        let status = out.tx_status();
        let parsed = self.parsed(msg);
        let lead = self.step_local(msg, parsed.as_ref(), status);
        let local = self.cycle.local.as_ref();
        let shape = if local.is_some_and(|l| l.binds_a_read()) {
            // A cacheable read is bound: never one statement spillway answers itself.
            Shape::impossible()
        } else {
            self.step_shape(msg, parsed.as_ref())
        };
        if self.cycle.local.is_some() || shape.possible(self) {
            self.cycle.shape = shape;
            self.cycle.hold(msg);
            return Disposition::Consumed;
        }
        // Nothing here can answer this cycle: it goes upstream now, this message too.
        if let Some(closed) = self.release_before(self.held_and(msg)) {
            return self.wait_released(closed);
        }
        self.cycle.drop_local();
        self.cycle.shape = Shape::impossible();
        if let Some(d) = self.route_forwarding(tag, msg, out) {
            return d;
        }
        let fills = self.tracker.quiet && self.reads_allowed(status);
        let mut ticket = lead;
        let held = std::mem::take(&mut self.cycle.held);
        for m in &held {
            self.send_extended(m, false, out, fills, &mut ticket);
        }
        self.cycle.held = held;
        self.cycle.clear();
        self.send_extended(msg, true, out, fills, &mut ticket);
        self.cycle.upstream = true;
        self.cycle.fills = fills;
        Disposition::Consumed
    }

    /// Whether message `tag` of `len` bytes would go upstream at once instead of being
    /// held for its Sync (a Flush, or too much held).
    pub(super) fn would_forward(&self, tag: u8, len: usize) -> bool {
        tag == frontend::FLUSH
            || self.cycle.held.bytes() + len > MAX_HELD_BYTES
            || self.cycle.held.len() >= MAX_HELD
    }

    /// Sends every held message upstream; the rest of the cycle follows directly.
    pub(super) fn forward_held(&mut self, out: &mut Outbox) {
        if self.cycle.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.cycle.held);
        for m in &held {
            self.send_extended(m, false, out, false, &mut None);
        }
        self.cycle.held = held;
        self.cycle.clear();
        self.cycle.upstream = true;
        self.cycle.fills = false;
    }

    /// The held messages, then `msg`.
    fn held_and<'a>(&'a self, msg: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.cycle.held.iter().chain(std::iter::once(msg))
    }

    /// Before `msgs` go upstream: a Parse of a statement that needs a database to
    /// itself (DROP DATABASE, a CREATE DATABASE's template) waits until spillway's
    /// service connection to that database is closed (`ReadCache::release_databases`).
    fn release_before<'a>(&self, msgs: impl Iterator<Item = &'a [u8]>) -> Option<Released> {
        let sqls = msgs
            .filter(|m| m[0] == frontend::PARSE)
            .filter_map(|m| frontend::parse(frontend::body(m)).map(|p| p.sql));
        self.cache.release_databases(sqls)
    }

    fn on_sync(&mut self, msg: &[u8], out: &mut Outbox) -> Disposition {
        if let Some(closed) = self.release_before(self.cycle.held.iter()) {
            return self.wait_released(closed);
        }
        // Parses that went upstream ahead of the cycle first (a local answer must not
        // leave PostgreSQL's implicit transaction open behind it).
        let refused = match self.forwarded_parses(out) {
            Some(Some(d)) => return d,
            Some(None) => true,
            None => false,
        };
        if !refused && self.answer_planned(out) {
            return Disposition::Consumed;
        }
        if !refused && let Some(d) = self.route_cycle(out) {
            return d;
        }
        let status = out.tx_status();
        let fills = self.tracker.quiet && self.reads_allowed(status);
        let mut ticket = None;
        if fills {
            match self.plan_at_sync(out) {
                local::AtSync::Answered => return Disposition::Consumed,
                local::AtSync::Wait(notified) => {
                    self.wait = super::wait::Wait::fill(notified);
                    return Disposition::Blocked;
                }
                local::AtSync::Forward(t) => ticket = t,
            }
        }
        let path = if ticket.is_some() {
            super::upstream::Path::Miss
        } else {
            super::upstream::Path::Passthrough
        };
        self.time_request(std::time::Instant::now(), path);
        let held = std::mem::take(&mut self.cycle.held);
        for m in &held {
            self.send_extended(m, false, out, fills, &mut ticket);
        }
        self.cycle.held = held;
        self.cycle.clear();
        self.send_extended(msg, true, out, false, &mut None);
        self.cycle.synced();
        Disposition::Consumed
    }

    /// Sends one extended-protocol message upstream, keeping statements, portals and
    /// the tracker in step. `current`: the message being handled (else one held
    /// earlier); `fills`: misses may be captured (with `ticket`, a lead already taken).
    fn send_extended(
        &mut self,
        msg: &[u8],
        current: bool,
        out: &mut Outbox,
        fills: bool,
        ticket: &mut Option<(Vec<u8>, FillTicket)>,
    ) {
        let body = frontend::body(msg);
        let expect = match msg[0] {
            frontend::PARSE => match frontend::parse(body) {
                Some(p) => {
                    let stmt = self.statement(&p, msg, self.stmts.client_unnamed());
                    if p.name.is_empty() {
                        self.cycle.fill_unnamed = false;
                    } else {
                        self.cycle.named.push((p.name.to_owned(), stmt.clone()));
                    }
                    Expect::Parse {
                        swallow: false,
                        prepared: Some(self.stmts.parse_forwarded(p.name, stmt)),
                    }
                }
                None => Expect::Parse {
                    swallow: false,
                    prepared: None,
                },
            },
            frontend::BIND => {
                self.cycle.next_fill = None;
                self.cycle.fill_unnamed = false;
                if let Some(b) = frontend::bind(body) {
                    if b.statement.is_empty() {
                        self.inject_unnamed(out);
                    }
                    let stmt = self.stmts.statement(b.statement).cloned();
                    self.stmts.bind_forwarded(b.portal, stmt.clone());
                    self.cycle.bound = (b.portal.is_empty()
                        && stmt.as_ref().is_some_and(|s| s.analysis.writes_anything()))
                    .then(|| Bytes::copy_from_slice(b.params_and_formats));
                    if fills
                        && b.portal.is_empty()
                        && let Some(stmt) = stmt
                    {
                        self.cycle.next_fill =
                            self.prepare_fill(&stmt, b.params_and_formats, ticket);
                        self.cycle.fill_unnamed = b.statement.is_empty();
                    }
                }
                Expect::Bind
            }
            frontend::DESCRIBE => match frontend::target(body) {
                Some(t) if t.kind == b'S' => {
                    if t.name.is_empty() {
                        self.inject_unnamed(out);
                    }
                    Expect::DescribeStatement {
                        capture: t.name.is_empty()
                            && self.cycle.fill_unnamed
                            && self.cycle.next_fill.is_some(),
                    }
                }
                Some(t) => Expect::DescribePortal {
                    capture: t.name.is_empty() && self.cycle.next_fill.is_some(),
                },
                None => Expect::DescribeStatement { capture: false },
            },
            frontend::EXECUTE => self.execute_forwarded(body, out),
            frontend::CLOSE => {
                if let Some(t) = frontend::target(body) {
                    self.stmts.closed(t.kind, t.name);
                    if t.kind == b'S' && !t.name.is_empty() {
                        self.tracker.forget_pending(t.name);
                    }
                }
                Expect::Close
            }
            frontend::SYNC => {
                // A Bind whose Execute never came: release its fill now.
                self.cycle.next_fill = None;
                Expect::Ready {
                    sync: true,
                    fill: None,
                    id: 0,
                }
            }
            // Flush: nothing to expect.
            _ => {
                send(msg, current, out);
                return;
            }
        };
        send(msg, current, out);
        self.tracker.push(expect);
    }

    /// An Execute goes upstream: its statement's effects, and the fill of its result.
    fn execute_forwarded(&mut self, body: &[u8], out: &mut Outbox) -> Expect {
        self.timing.metrics.upstream_statements.increment(1);
        let exec = frontend::execute(body);
        let stmt = exec
            .as_ref()
            .and_then(|e| self.stmts.portal(e.portal).cloned());
        let certain = self.certain(out.tx_status(), 1);
        match &stmt {
            // PostgreSQL skips it (an error earlier in this cycle): no effects.
            _ if self.tracker.is_skipping() => {}
            Some(s) => {
                let decision = self.decide(&s.analysis);
                let bound = match &exec {
                    Some(e) if e.portal.is_empty() => self.cycle.bound.clone(),
                    _ => None,
                };
                let values = bound
                    .as_deref()
                    .and_then(frontend::bind_params)
                    .unwrap_or_default();
                let declared = frontend::param_type_oids(&s.param_types);
                let params = Params {
                    declared: &declared,
                    values: &values,
                };
                self.statement_effects(&s.analysis.clone(), &decision, &params, certain);
            }
            None => {
                let effects = Effects::unknown(self.cache.settings().invalidate_on_unknown);
                self.record_effects(&effects, certain);
            }
        }
        let fill = match exec {
            Some(e) if e.portal.is_empty() && e.max_rows == 0 => self.cycle.next_fill.take(),
            _ => None,
        };
        self.cycle.next_fill = None;
        Expect::Execute { fill }
    }

    /// Before a forwarded message uses the unnamed statement, make PostgreSQL's match
    /// the client's (its ParseComplete is not passed on: the client had it already).
    fn inject_unnamed(&mut self, out: &mut Outbox) {
        if let Some(stmt) = self.stmts.take_pending_parse() {
            out.release(&stmt.parse_msg);
            self.tracker.push(Expect::Parse {
                swallow: true,
                prepared: Some(super::statements::Prepared::Unnamed(stmt)),
            });
        }
    }

    /// A fill for the Execute of the unnamed portal bound to `stmt`, if cacheable.
    fn prepare_fill(
        &mut self,
        stmt: &Stmt,
        params: &[u8],
        ticket: &mut Option<(Vec<u8>, FillTicket)>,
    ) -> Option<Box<Fill>> {
        let decision = self.decide(&stmt.analysis);
        let cacheable = decision.cacheable.clone().ok()?;
        let key = self.extended_key(stmt, params)?;
        // The plan may already hold the ticket for this key.
        let ticket = match ticket.take_if(|(k, _)| *k == key) {
            Some((_, t)) => t,
            None => match self.cache.results.lookup(&key) {
                Lookup::Lead(t) => t,
                Lookup::Hit(_) | Lookup::Wait(_) => return None,
            },
        };
        let values = frontend::bind_params(params).unwrap_or_default();
        let declared = frontend::param_type_oids(&stmt.param_types);
        let params = Params {
            declared: &declared,
            values: &values,
        };
        let deps = self.capture(&cacheable, &decision, &params);
        Some(Fill::new(ticket, deps, cacheable.ttl))
    }

    /// The cache key of an Execute, or `None` if the statement is not cacheable.
    fn extended_key(&mut self, stmt: &Stmt, params: &[u8]) -> Option<Vec<u8>> {
        if !stmt.analysis.is_cacheable_shape() {
            return None;
        }
        Some(self.key.key(b'X', &[&stmt.key_part, params]).to_vec())
    }

    /// The entry under the key [`Caching::extended_key`] builds, looked up without
    /// building it (`None` too when the statement is not cacheable); `now`: when the
    /// cycle arrived.
    fn extended_get(&self, stmt: &Stmt, params: &[u8], now: Instant) -> Option<Arc<CachedResult>> {
        if !stmt.analysis.is_cacheable_shape() {
            return None;
        }
        self.key.get_memo(
            &self.cache.results,
            &stmt.key_hash,
            b'X',
            &[&stmt.key_part],
            &[params],
            now,
        )
    }

    /// Whether `msg` (the cycle holding nothing yet) goes upstream ahead of its cycle:
    /// a Parse of a named statement that is a deferrable write on a deferred table, or
    /// a Describe of a statement such a Parse prepared in this cycle (psycopg
    /// describes what it prepares). Not in a held transaction that failed.
    fn ahead_of_cycle(&self, tag: u8, msg: &[u8]) -> bool {
        if self.writes.is_none()
            || self.tracker.desynced
            || self.tx.held.as_ref().is_some_and(|h| h.failed)
        {
            return false;
        }
        match tag {
            frontend::PARSE => match frontend::parse(frontend::body(msg)) {
                Some(p) if !p.name.is_empty() => {
                    let stmt = self.statement(&p, msg, None);
                    self.may_defer(&stmt.analysis)
                }
                _ => false,
            },
            frontend::DESCRIBE => frontend::target(frontend::body(msg)).is_some_and(|t| {
                t.kind == b'S'
                    && !t.name.is_empty()
                    && self.cycle.named.iter().any(|(n, _)| n == t.name)
            }),
            _ => false,
        }
    }

    /// The statement a Parse message defines (`None`: not a Parse, or malformed).
    fn parsed(&self, msg: &[u8]) -> Option<(String, Arc<Stmt>)> {
        if msg[0] != frontend::PARSE {
            return None;
        }
        let p = frontend::parse(frontend::body(msg))?;
        let previous = if p.name.is_empty() {
            self.cycle
                .local
                .as_ref()
                .and_then(|l| l.unnamed())
                .or(self.stmts.client_unnamed())
        } else {
            None
        };
        Some((p.name.to_owned(), self.statement(&p, msg, previous)))
    }

    /// The statement a Parse defines, reusing `previous` when it is the same text.
    pub(super) fn statement(
        &self,
        p: &frontend::Parse<'_>,
        msg: &[u8],
        previous: Option<&Arc<Stmt>>,
    ) -> Arc<Stmt> {
        if let Some(prev) = previous
            && prev.parse_msg[..] == *msg
        {
            return prev.clone();
        }
        Arc::new(Stmt::new(
            p.sql,
            p.param_types,
            self.cache.classifier.classify(p.sql),
            Bytes::copy_from_slice(msg),
        ))
    }
}

/// Queues `msg` upstream: the message being handled is seen by the state machine now,
/// one held earlier was seen when it was held.
fn send(msg: &[u8], current: bool, out: &mut Outbox) {
    if current {
        out.forward(msg);
    } else {
        out.release(msg);
    }
}
