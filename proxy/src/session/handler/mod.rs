//! The handler of a session: decides, per frontend message, whether the answer comes
//! from spillway (the read cache, a deferred write, a held transaction) or from
//! PostgreSQL, and keeps what that needs to know about the session.
//!
//! The relay hands it whole messages and an [`Outbox`]; whatever it answers or
//! forwards goes there, and the outbox feeds the protocol state machine, so it cannot
//! tell a cached answer from a relayed one.
//!
//! This file holds the session's state, the dispatch of each message, and the whole
//! hit path of a simple Query ([`Caching::hit`]): a cached SELECT is answered here,
//! reading the other parts' state as fields, with one cache lookup under a key hashed
//! from the session's prefix hash and the Query's bytes, never built. Everything else is routed to its concern:
//!
//! | concern | file |
//! |---|---|
//! | a simple Query that misses, FunctionCall, COPY data | `query.rs` |
//! | the extended protocol: holding, answering from the cache, forwarding, routing a cycle | `extended/` |
//! | what a forwarded statement means for settings, transaction, cache | `effects.rs` |
//! | what each backend message means (fills, confirmations, invalidation) | `upstream.rs` |
//! | deferred writes and barriers | `deferred.rs` |
//! | held transactions | `held/` |
//! | pipelined cycles of deferrable writes (executemany) | `pipeline.rs` |
//! | read-your-writes point reads answered with pending writes overlaid | `overlay.rs` |
//! | `SPILLWAY FLUSH` | `flush.rs` |
//! | a detached session | `detached.rs` |
//! | what a message waits for | `wait.rs` |
//! | answers spillway writes itself | `answer.rs`, `returning.rs` |
//! | statements and portals; the transaction; the key and settings; the request tracker | `statements.rs`, `tx.rs`, `settings.rs`, `tracker.rs` |
//!
//! Invariants:
//! - A local answer is produced only when nothing is outstanding upstream (the
//!   tracker is quiet) and nothing is held before it, so answers reach the client in
//!   request order.
//! - Results are shared only under the same key (database, role, settings, statement,
//!   parameters, formats), never after a role or setting change spillway could not
//!   follow, never inside a transaction that wrote or that runs at REPEATABLE READ or
//!   SERIALIZABLE, never while the session's own deferred writes are not applied.
//! - Every statement that may write invalidates what it touches when it is forwarded,
//!   again at each CommandComplete and ReadyForQuery while it is unacknowledged, and
//!   again when its transaction ends.

mod answer;
mod deferred;
mod detached;
mod effects;
mod extended;
mod fill;
mod flush;
mod held;
mod overlay;
mod pipeline;
mod query;
mod returning;
mod settings;
mod statements;
mod touch;
mod tracker;
mod tx;
mod upstream;
mod wait;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use spillway_policies::cache::{Deps, Version};
use tokio::sync::Notify;

use crate::protocol::frontend;
use crate::protocol::startup::StartupMessage;
use crate::read::cache::{Cacheable, DbLease, Decision, Params, ReadCache, Released, decide};
use crate::read::catalog::Catalog;
use crate::read::classify::Analysis;
use crate::session::state::Outbox;
use crate::write::service::WriteService;
use deferred::Deferral;
use detached::Link;
use extended::Cycle;
use settings::KeyContext;
use statements::{Statements, Unnamed};
use tracker::Tracker;
use tx::Tx;
use upstream::Timing;
use wait::Wait;

/// What becomes of one backend message.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Pass,
    /// Not for the client (the answer to a request spillway sent itself).
    Swallow,
    /// A ReadyForQuery delivered with this transaction status instead of PostgreSQL's
    /// (a request sent while spillway holds the client's transaction: `held/`).
    Status(u8),
    /// These bytes instead (a DataRow with the row's pending writes overlaid:
    /// `overlay.rs`).
    Replace(bytes::Bytes),
    /// The session ends here (an overlaid read that cannot be answered in a pipelined
    /// cycle: `overlay.rs`).
    End,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    Consumed,
    /// Not consumed: the same message is to be offered again once
    /// [`Handler::poll_unblocked`] is ready.
    Blocked,
    /// The session is detached and this message needs PostgreSQL: nothing was
    /// queued for it; the session is to end with FATAL 08006.
    NeedsUpstream,
}

/// The handler of one session; pass-through when the cache is off.
pub struct Handler {
    caching: Option<Box<Caching>>,
    /// Pass-through sessions count the statements they relay here.
    upstream_statements: metrics::Counter,
}

/// A session with the read cache on.
struct Caching {
    cache: Arc<ReadCache>,
    /// A lease on the database's shared state: its service connection lives while
    /// some session holds one (`read/cache/lease.rs`).
    db: DbLease,
    key: KeyContext,
    tracker: Tracker,
    stmts: Statements,
    /// The extended-protocol cycle being received.
    cycle: Cycle,
    tx: Tx,
    /// Deferred tables of this database (`None`: none, or another database).
    writes: Option<Deferral>,
    /// What the message being handled waits for, or how it goes on after waiting.
    wait: Wait,
    timing: Timing,
    /// Signalled when the last answer outstanding upstream arrived: a message held
    /// back until then (`SPILLWAY FLUSH`, a deferrable write) is offered again.
    quiet: Arc<Notify>,
    /// Signalled at the internal query's ReadyForQuery (a held transaction's replay).
    internal_done: Arc<Notify>,
    /// Whether the session still has its upstream connection, and may lose it.
    link: Link,
    /// A read answered with its row's pending writes overlaid, on its way.
    overlay: Option<Box<overlay::Armed>>,
}

impl Handler {
    pub fn passthrough() -> Self {
        Self {
            caching: None,
            upstream_statements: metrics::counter!(crate::metrics::UPSTREAM_STATEMENTS),
        }
    }

    /// `reported`: the settings PostgreSQL reported during startup.
    pub fn caching(
        cache: Arc<ReadCache>,
        writes: Option<Arc<WriteService>>,
        startup: &StartupMessage,
        state: &crate::session::state::ProtocolState,
    ) -> Self {
        let db = cache.lease(startup.database());
        let seed = cache.results.stream();
        let reported: &BTreeMap<String, String> = &state.params;
        Self {
            upstream_statements: metrics::Counter::noop(),
            caching: Some(Box::new(Caching {
                cache,
                db,
                key: KeyContext::new(
                    startup.database(),
                    startup.user(),
                    &startup.params,
                    reported,
                    seed,
                ),
                tracker: Tracker::default(),
                stmts: Statements::new(),
                cycle: Cycle::default(),
                tx: Tx::default(),
                writes: writes.map(|service| Deferral::new(service, startup.user())),
                wait: Wait::Fresh,
                timing: Timing::default(),
                quiet: Arc::new(Notify::new()),
                internal_done: Arc::new(Notify::new()),
                link: Link::default(),
                overlay: None,
            })),
        }
    }

    /// One whole frontend message (tag and length included).
    pub fn on_frontend(&mut self, msg: &[u8], out: &mut Outbox) -> Disposition {
        match self.caching.as_deref_mut() {
            None => {
                if matches!(
                    msg[0],
                    frontend::QUERY | frontend::EXECUTE | frontend::FUNCTION_CALL
                ) {
                    self.upstream_statements.increment(1);
                }
                out.forward(msg);
                Disposition::Consumed
            }
            Some(c) => c.on_frontend(msg, out),
        }
    }

    /// A whole extended cycle (its last message a Sync), answered from the cache in one
    /// go (`extended/local.rs`); false when not, with nothing changed.
    pub fn answer_cycle(&mut self, msgs: &[&[u8]], out: &mut Outbox) -> bool {
        self.caching
            .as_deref_mut()
            .is_some_and(|c| c.answer_cycle(msgs, out))
    }

    /// One whole backend message, and what becomes of it.
    pub fn on_backend(&mut self, tag: u8, msg: &[u8]) -> Delivery {
        match self.caching.as_deref_mut() {
            None => Delivery::Pass,
            Some(c) => c.on_backend(tag, Some(msg)),
        }
    }

    /// Whether a backend message too large to hold may pass through as it arrives: not
    /// a row an overlaid read must rewrite (the session then ends instead).
    pub fn may_stream(&self, tag: u8) -> bool {
        tag != b'D'
            || self
                .caching
                .as_ref()
                .is_none_or(|c| c.overlay.as_ref().is_none_or(|o| o.is_done()))
    }

    /// A backend message too large to hold, passing through as it arrives.
    pub fn on_backend_streamed(&mut self, tag: u8) {
        if let Some(c) = self.caching.as_deref_mut() {
            c.on_backend(tag, None);
        }
    }

    pub fn is_blocked(&self) -> bool {
        self.caching.as_ref().is_some_and(|c| c.wait.is_pending())
    }

    /// Ready when a blocked message may be offered again.
    pub fn poll_unblocked(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.caching.as_deref_mut() {
            Some(c) => c.wait.poll(cx),
            None => Poll::Pending,
        }
    }

    /// Whether the session may outlive its upstream connection now (`detached.rs`).
    pub fn can_detach(&self) -> bool {
        self.caching.as_deref().is_some_and(Caching::can_detach)
    }

    /// Transaction mode: whether the server connection may go back to the pool now,
    /// as far as the handler knows (nothing it sent awaits an answer, no extended
    /// cycle half forwarded). `unsynced`: the protocol state's, which is all a
    /// pass-through session has to go by.
    pub fn can_release(&self, unsynced: bool) -> bool {
        match self.caching.as_deref() {
            None => !unsynced,
            Some(c) => c.tracker.quiet && !c.tracker.desynced && !c.cycle.upstream,
        }
    }

    /// From now on nothing goes upstream (`detached.rs`).
    pub fn detach(&mut self) {
        if let Some(c) = self.caching.as_deref_mut() {
            c.link.detached = true;
        }
    }
}

impl Caching {
    fn on_frontend(&mut self, msg: &[u8], out: &mut Outbox) -> Disposition {
        let fresh = matches!(self.wait, Wait::Fresh);
        let disposition = if fresh && let Some(d) = self.hit(msg, out) {
            d
        } else if self.link.detached {
            self.on_frontend_detached(msg, out)
        } else {
            self.route(msg, out)
        };
        if disposition != Disposition::Blocked {
            // What the message waited for is spent with it.
            self.wait = Wait::Fresh;
        }
        disposition
    }

    /// A simple Query answered from the cache, or `None` to route it. The whole hit
    /// path: every condition is read from the session's parts directly, the key is
    /// the prefix and the Query's bytes as sent, looked up without being built.
    fn hit(&mut self, msg: &[u8], out: &mut Outbox) -> Option<Disposition> {
        if msg[0] != frontend::QUERY {
            return None;
        }
        let started = Instant::now();
        // The text as sent, without its NUL: an entry is stored under the text of a
        // well-formed Query, so equal bytes are that Query.
        let sql = msg.get(5..)?.strip_suffix(&[0])?;
        let status = out.tx_status();
        if !(self.tracker.quiet
            && !self.tracker.desynced
            && self.cycle.held.is_empty()
            && self.reads_allowed(status))
        {
            return None;
        }
        let hit = self.key.get(&self.cache.results, b'Q', &[sql], started)?;
        let rd = hit.row_description.as_ref()?;
        out.answer(rd);
        out.answer(&hit.body);
        out.ready(status);
        self.cache.results.record_hit();
        self.timing.metrics.hit.record(started.elapsed());
        // As on PostgreSQL, a simple Query replaces the unnamed statement and portal.
        self.stmts.unnamed = Unnamed::NONE;
        Some(Disposition::Consumed)
    }

    /// Every message that is not a fresh hit: a finished wait's outcome first, then a
    /// held transaction, then by type.
    fn route(&mut self, msg: &[u8], out: &mut Outbox) -> Disposition {
        let tag = msg[0];
        if matches!(self.wait, Wait::Resumed(_))
            && let Some(resume) = self.wait.take_outcome()
            && let Some(done) = self.resume(resume, tag, out)
        {
            return done;
        }
        if self.tx.held.is_some()
            && let Some(done) = self.on_held_frontend(tag, msg, out)
        {
            return done;
        }
        if self.tracker.desynced {
            return self.forward_desynced(msg, out);
        }
        if frontend::is_extended(tag) {
            return self.on_extended(tag, msg, out);
        }
        if !self.cycle.held.is_empty() {
            // A message outside the extended protocol ends what was held: it goes
            // upstream first, in order.
            self.forward_held(out);
        }
        match tag {
            frontend::QUERY => self.on_query(msg, out),
            frontend::FUNCTION_CALL => self.on_function_call(msg, out),
            _ => self.forward_other(msg, out),
        }
    }

    /// A finished wait's outcome for the message offered again: `Some` when it is
    /// answered with it, `None` to route the message on.
    fn resume(&mut self, resume: wait::Resume, tag: u8, out: &mut Outbox) -> Option<Disposition> {
        match resume {
            wait::Resume::Ack(ack) => self.acknowledged(*ack, out),
            wait::Resume::BarrierFailed(err) => Some(self.barrier_failed(tag, &err, out)),
            wait::Resume::Held(step) => self.resume_held(*step, tag, out),
            wait::Resume::Pipeline(ack) => self.pipeline_acknowledged(*ack, out),
            other => {
                self.wait = Wait::Resumed(other);
                None
            }
        }
    }

    /// Reads may be served from or stored into the cache at transaction status
    /// `status`: the settings are followed, the transaction allows it (see `tx.rs`),
    /// and the session's own deferred writes are applied (read-your-writes).
    fn reads_allowed(&self, status: u8) -> bool {
        let tx = &self.tx;
        self.key.bypass.is_none()
            && !self.key.local_override
            && tx.held.is_none()
            && match status {
                b'I' => true,
                b'T' => !tx.wrote && !tx.snapshot,
                _ => false,
            }
            && self
                .writes
                .as_ref()
                .is_none_or(|w| w.own_seq == 0 || w.own_seq <= w.service.applied())
    }

    /// Blocks the message until spillway's service connections it would be in the
    /// way of are closed; offered again, it finds none open and goes on.
    fn wait_released(&mut self, closed: Released) -> Disposition {
        self.wait = Wait::on(async move {
            closed.await;
            wait::Resume::Again { filled: false }
        });
        Disposition::Blocked
    }

    fn decide(&self, analysis: &Analysis) -> Decision {
        let catalog = self.db.catalog();
        let decision = decide::decide(analysis, catalog.as_deref(), &self.cache.settings());
        if decision.catalog_behind {
            self.db.catalog_behind();
        }
        decision
    }

    /// The version counters a fill of `cacheable` depends on, read now: a point read
    /// whose key resolves depends on its row (the epoch, writes of unknown keys to the
    /// table, its key's stripe), anything else on its tables.
    fn capture(&self, cacheable: &Cacheable, decision: &Decision, params: &Params<'_>) -> Deps {
        if let Some(point) = &decision.point
            && let Some(key) = point.resolve(params)
        {
            let mut deps = Deps::capture([self.db.versions.epoch()]);
            deps.add_key(&self.db.versions.table_versions(point.table), &key);
            return deps;
        }
        let tables: Vec<Arc<Version>> = cacheable
            .tables
            .iter()
            .map(|oid| self.db.versions.table(*oid))
            .collect();
        Deps::capture(std::iter::once(self.db.versions.epoch()).chain(tables.iter()))
    }

    /// The catalog deferred-write routing uses: the live snapshot, or while the
    /// cache's service connection is down the last one trusted before it was lost.
    /// Not only for detached sessions: PostgreSQL's backends die at about the same
    /// moment, and a write that arrives between the service connection's end and its
    /// own session's would otherwise run write-through into a dying connection.
    fn routing_catalog(&self) -> Option<Arc<Catalog>> {
        self.db.catalog().or_else(|| self.db.last_trusted_catalog())
    }

    /// An extended cycle answered here ends: its held messages are done, the unnamed
    /// portal is the client's alone, and a Parse of the unnamed statement in it is the
    /// client's now (parsed upstream lazily).
    fn finish_cycle(&mut self, unnamed: Option<Arc<statements::Stmt>>) {
        self.cycle.clear();
        self.stmts.portal_answered_locally();
        if let Some(stmt) = unnamed {
            self.stmts.parsed_locally(stmt);
        }
    }
}

/// The cache key of a simple Query of `sql`, built in the key's reused buffer (a miss
/// leads its fill under it; [`Caching::hit`] looks the same bytes up unbuilt).
fn query_key<'k>(key: &'k mut KeyContext, sql: &[u8]) -> &'k [u8] {
    key.scratch.clear();
    key.scratch.extend_from_slice(&key.prefix);
    key.scratch.push(b'Q');
    key.scratch.extend_from_slice(sql);
    &key.scratch
}
