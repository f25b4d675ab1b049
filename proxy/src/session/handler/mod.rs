//! The handler seam of a session: decides, per frontend message, whether the answer
//! comes from the read cache or from PostgreSQL, and keeps what the cache needs to
//! know about the session (statements, portals, settings, what it wrote).
//!
//! The relay loop hands it whole messages and queues whatever it produces; the
//! protocol state ([`ProtocolState`]) is fed every message either way, so it cannot
//! tell a cached answer from a relayed one.
//!
//! Invariants:
//! - A local answer is produced only when nothing is outstanding upstream (the
//!   tracker is quiet), so answers reach the client in request order.
//! - Results are shared only under the same key (database, role, settings, statement,
//!   parameters, formats), never after a role or setting change spillway could not
//!   follow, never inside a transaction that wrote or that runs at REPEATABLE READ or
//!   SERIALIZABLE.
//! - Every statement that may write invalidates what it touches when it is forwarded,
//!   again at each CommandComplete and ReadyForQuery while it is unacknowledged, and
//!   again when its transaction ends.

mod deferred;
mod detached;
mod extended;
mod flush;
mod held;
mod returning;
mod settings;
mod tracker;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use spillway_policies::cache::{Deps, Lookup, Version};
use tokio::sync::futures::OwnedNotified;

use super::state::ProtocolState;
use crate::metrics::SessionMetrics;
use crate::protocol::frontend;
use crate::read::cache::{Cacheable, DbLease, Decision, Effects, ReadCache, decide};
use crate::read::classify::{Analysis, DiscardTarget, Isolation, Kind, SessionCommand, TxCommand};
use crate::write::convert::Bound;
use crate::write::service::WriteService;
use settings::KeyContext;
use tracker::{Expect, Fill, Tracker};

/// How long a miss waits for another session filling the same key before it goes
/// upstream itself.
const COALESCE_WAIT: Duration = Duration::from_secs(5);

/// A statement the session prepared (or asked spillway to prepare lazily).
pub struct Stmt {
    pub sql: Box<str>,
    pub param_types: Box<[u8]>,
    pub analysis: Arc<Analysis>,
    /// The client's Parse message, replayed upstream when the statement is first
    /// needed there.
    pub parse_msg: Bytes,
}

impl Stmt {
    fn same_as(&self, other: &Stmt) -> bool {
        self.sql == other.sql && self.param_types == other.param_types
    }
}

/// Where the relay queues output, and the protocol state every message updates.
pub struct Out<'a> {
    pub upstream: &'a mut BytesMut,
    pub client: &'a mut BytesMut,
    pub state: &'a mut ProtocolState,
}

/// What becomes of one backend message.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Pass,
    /// Not for the client (the answer to a request spillway sent itself).
    Swallow,
    /// A ReadyForQuery delivered with this transaction status instead of PostgreSQL's
    /// (a request sent while spillway holds the client's transaction: `held.rs`).
    Status(u8),
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

struct Caching {
    cache: Arc<ReadCache>,
    db: DbLease,
    key: KeyContext,
    tracker: Tracker,
    /// Named statements PostgreSQL confirmed.
    named: HashMap<String, Arc<Stmt>>,
    /// PostgreSQL's unnamed statement, when known.
    unnamed_upstream: Option<Arc<Stmt>>,
    /// The client's unnamed statement, when known.
    unnamed_client: Option<Arc<Stmt>>,
    /// The client's unnamed statement was answered locally and not yet parsed upstream.
    unnamed_pending: bool,
    /// Statements behind portals forwarded upstream in the current transaction.
    portals: HashMap<String, Arc<Stmt>>,
    /// Extended-protocol messages held until their Sync decides where they go.
    held: Vec<Bytes>,
    held_bytes: usize,
    /// The current extended cycle (until Sync) already went upstream.
    cycle_upstream: bool,
    /// Fill prepared at a Bind for the Execute of that portal.
    next_fill: Option<Box<Fill>>,
    /// Invalidations to repeat at acknowledgement and at the end of the transaction.
    pending: Effects,
    tx_wrote: bool,
    tx_snapshot: bool,
    /// A request containing SET/RESET is outstanding.
    settings_in_flight: bool,
    /// One of them was applied as certain (autocommit, alone).
    certain_settings: bool,
    /// Session commands forwarded behind outstanding requests, in order: whether they
    /// ran in autocommit is known only at their own ReadyForQuery.
    deferred: VecDeque<Deferred>,
    /// What a Blocked message waits for: another session's fill, a barrier, an ack.
    wait: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The current request already waited once for another session's fill.
    waited: bool,
    /// Deferred tables of this database (`None`: none, or another database).
    writes: Option<Arc<WriteService>>,
    /// The Blocked message's deferred ack or barrier, for [`Caching::resume`].
    waiting: Option<deferred::Waiting>,
    /// The re-offered message already waited for its barrier.
    barrier_passed: bool,
    /// The re-offered message must run write-through (its role may not defer).
    no_defer: bool,
    /// Sequence number of this session's latest deferred write (`consistency =
    /// "session"`).
    own_seq: u64,
    /// The session's role, for privilege checks of deferred writes.
    user: String,
    metrics: SessionMetrics,
    /// Requests sent upstream whose answer is being timed: (ready id, sent, path).
    timings: VecDeque<(u64, Instant, Path)>,
    /// Signalled when the last answer outstanding upstream arrived: a message held
    /// back until then (`SPILLWAY FLUSH`, a deferrable write) is offered again.
    quiet: Arc<tokio::sync::Notify>,
    /// The upstream connection is gone; only local answers remain (`detached.rs`).
    detached: bool,
    /// The session ran LISTEN: it must not outlive its upstream connection.
    listened: bool,
    /// A transaction spillway answers itself so far (`held.rs`).
    held_tx: Option<held::HeldTx>,
    /// Answers to the internal query in flight (a held transaction's replay).
    replay_log: Option<held::ReplayLog>,
    /// Signalled at the internal query's ReadyForQuery.
    internal_done: Arc<tokio::sync::Notify>,
    /// Ready ids of cycles sent upstream while a transaction is held (Parse, Describe,
    /// Close only): their ReadyForQuery carries the held transaction's status.
    held_cycles: VecDeque<u64>,
    /// One of them failed (the held transaction fails with it).
    held_cycle_failed: bool,
    /// A write forwarded in this request or transaction may touch deferred tables
    /// outside the key overlay (noted again at its CommandComplete/ReadyForQuery).
    outside_pending: bool,
}

/// How a request sent upstream is counted in the latency histogram.
#[derive(Clone, Copy)]
enum Path {
    Miss,
    Passthrough,
}

impl Handler {
    pub fn passthrough() -> Self {
        Self {
            caching: None,
            upstream_statements: metrics::counter!(crate::metrics::UPSTREAM_STATEMENTS),
        }
    }

    pub fn caching(
        cache: Arc<ReadCache>,
        writes: Option<Arc<WriteService>>,
        database: &str,
        user: &str,
        startup: &[(String, String)],
    ) -> Self {
        let db = cache.lease(database);
        Self {
            upstream_statements: metrics::Counter::noop(),
            caching: Some(Box::new(Caching {
                cache,
                db,
                key: KeyContext::new(database, user, startup),
                tracker: Tracker::default(),
                named: HashMap::new(),
                unnamed_upstream: None,
                unnamed_client: None,
                unnamed_pending: false,
                portals: HashMap::new(),
                held: Vec::new(),
                held_bytes: 0,
                cycle_upstream: false,
                next_fill: None,
                pending: Effects::default(),
                tx_wrote: false,
                tx_snapshot: false,
                settings_in_flight: false,
                certain_settings: false,
                deferred: VecDeque::new(),
                wait: None,
                waited: false,
                writes,
                waiting: None,
                barrier_passed: false,
                no_defer: false,
                own_seq: 0,
                user: user.to_owned(),
                metrics: SessionMetrics::new(),
                timings: VecDeque::new(),
                quiet: Arc::new(tokio::sync::Notify::new()),
                detached: false,
                listened: false,
                held_tx: None,
                replay_log: None,
                internal_done: Arc::new(tokio::sync::Notify::new()),
                held_cycles: VecDeque::new(),
                held_cycle_failed: false,
                outside_pending: false,
            })),
        }
    }

    /// One whole frontend message (tag and length included).
    pub fn on_frontend(&mut self, msg: &[u8], out: &mut Out<'_>) -> Disposition {
        let tag = msg[0];
        match self.caching.as_deref_mut() {
            None => {
                if matches!(
                    tag,
                    frontend::QUERY | frontend::EXECUTE | frontend::FUNCTION_CALL
                ) {
                    self.upstream_statements.increment(1);
                }
                out.state.on_frontend(tag);
                out.upstream.extend_from_slice(msg);
                Disposition::Consumed
            }
            Some(c) if c.detached => c.on_frontend_detached(tag, msg, out),
            Some(c) => {
                let before = out.upstream.len();
                let d = c.on_frontend(tag, msg, out);
                if d == Disposition::Consumed
                    && out.upstream.len() > before
                    && matches!(tag, frontend::QUERY | frontend::FUNCTION_CALL)
                {
                    c.metrics.upstream_statements.increment(1);
                }
                d
            }
        }
    }

    /// One whole backend message, and what becomes of it.
    pub fn on_backend(&mut self, tag: u8, msg: &[u8]) -> Delivery {
        match self.caching.as_deref_mut() {
            None => Delivery::Pass,
            Some(c) => c.on_backend(tag, Some(msg)),
        }
    }

    /// A backend message too large to hold, passing through as it arrives.
    pub fn on_backend_streamed(&mut self, tag: u8) {
        if let Some(c) = self.caching.as_deref_mut() {
            c.on_backend(tag, None);
        }
    }

    pub fn is_blocked(&self) -> bool {
        self.caching.as_ref().is_some_and(|c| c.wait.is_some())
    }

    /// Ready when a blocked message may be offered again.
    pub fn poll_unblocked(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(c) = self.caching.as_deref_mut() else {
            return Poll::Pending;
        };
        let Some(wait) = c.wait.as_mut() else {
            return Poll::Pending;
        };
        match wait.as_mut().poll(cx) {
            Poll::Ready(_) => {
                c.wait = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future;

impl Caching {
    fn on_frontend(&mut self, tag: u8, msg: &[u8], out: &mut Out<'_>) -> Disposition {
        if let Some(done) = self.resume(tag, out) {
            return done;
        }
        if let Some(done) = self.on_held_frontend(tag, msg, out) {
            return done;
        }
        if self.tracker.is_desynced() {
            // Nothing is classified any more: anything may write.
            if matches!(
                tag,
                frontend::QUERY | frontend::EXECUTE | frontend::FUNCTION_CALL
            ) {
                self.db.versions.bump_all();
            }
            out.state.on_frontend(tag);
            out.upstream.extend_from_slice(msg);
            return Disposition::Consumed;
        }
        match tag {
            t if frontend::is_extended(t) => self.on_extended(tag, msg, out),
            frontend::QUERY => {
                self.forward_held(out);
                self.on_query(msg, out)
            }
            frontend::FUNCTION_CALL => {
                self.forward_held(out);
                out.state.on_frontend(tag);
                // A function call can do anything.
                let effects = Effects::unknown(self.cache.settings().invalidate_on_unknown);
                let certain = self.certain(out.state, 1);
                self.record_effects(&effects, certain);
                out.upstream.extend_from_slice(msg);
                self.tracker.push(Expect::Ready {
                    sync: false,
                    fill: None,
                    id: 0,
                });
                Disposition::Consumed
            }
            _ => {
                // COPY data, Terminate, and anything spillway does not interpret.
                if matches!(tag, b'c' | b'f') {
                    self.tracker.copy_end();
                }
                self.forward_held(out);
                out.state.on_frontend(tag);
                out.upstream.extend_from_slice(msg);
                Disposition::Consumed
            }
        }
    }

    /// A simple Query: answered from the cache, or forwarded (and maybe captured).
    fn on_query(&mut self, msg: &[u8], out: &mut Out<'_>) -> Disposition {
        let started = Instant::now();
        let Some(sql) = frontend::query(frontend::body(msg)) else {
            out.state.on_frontend(frontend::QUERY);
            out.upstream.extend_from_slice(msg);
            self.forget_unnamed();
            self.tracker.push(Expect::Ready {
                sync: false,
                fill: None,
                id: 0,
            });
            return Disposition::Consumed;
        };
        // Fast path: an entry under this key was cacheable when it was stored, and
        // anything that changed that since (DDL, a write) made it stale; so a hit needs
        // neither the classifier nor the catalog.
        let key = (self.reads_allowed(out.state) && self.tracker.is_quiet())
            .then(|| self.simple_key(sql, out.state));
        if let Some(key) = &key
            && let Some(hit) = self.cache.results.get(key)
            && let Some(rd) = &hit.row_description
        {
            out.state.on_frontend(frontend::QUERY);
            out.client.extend_from_slice(rd);
            out.client.extend_from_slice(&hit.body);
            self.answer_ready(out);
            self.cache.results.record_hit();
            self.metrics.hit.record(started.elapsed());
            self.waited = false;
            // A barrier this message waited for is spent with it.
            self.barrier_passed = false;
            self.no_defer = false;
            // As on PostgreSQL, a simple Query replaces the unnamed statement.
            self.forget_unnamed();
            return Disposition::Consumed;
        }
        if let Some(table) = flush::spillway_flush(sql) {
            return self.flush_command(table.as_deref(), None, out);
        }
        // DROP DATABASE and the like: spillway's own connection must not be in the way.
        if let Some(closed) = self.cache.release_databases([sql]) {
            self.wait = Some(Box::pin(closed));
            return Disposition::Blocked;
        }
        let analysis = self.cache.classifier.classify(sql);
        if self.writes.is_some() {
            let single = deferred::Single {
                bound: &Bound::default(),
                before: BytesMut::new(),
                after: BytesMut::new(),
                extended: false,
                unnamed: None,
            };
            if let Some(d) = self.route_writes(&[&analysis], Some(single), out) {
                return d;
            }
        }
        let decision = self.decide(&analysis);
        let mut fill = None;
        if let (Ok(cacheable), Some(key)) = (&decision.cacheable, &key) {
            match self.cache.results.lookup(key) {
                // Another session's fill landed since the fast path looked: go upstream.
                Lookup::Hit(_) => {}
                Lookup::Lead(ticket) => {
                    fill = Some(Fill::new(ticket, self.capture(cacheable), cacheable.ttl));
                }
                Lookup::Wait(notified) => {
                    if !self.waited && out.state.tx_status == b'I' {
                        self.block(notified);
                        return Disposition::Blocked;
                    }
                }
            }
        }
        self.waited = false;
        out.state.on_frontend(frontend::QUERY);
        let certain = self.certain(out.state, analysis.statements.len());
        self.statement_effects(&analysis, &decision, certain);
        // The simple protocol runs through the unnamed statement and portal.
        self.forget_unnamed();
        out.upstream.extend_from_slice(msg);
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

    /// Times the request about to be pushed until its ReadyForQuery.
    fn time_request(&mut self, started: Instant, path: Path) {
        // Bounded by the requests outstanding; a desynced tracker stops answering, so
        // stop timing there too.
        if self.timings.len() < 1024 && !self.tracker.is_desynced() {
            self.timings
                .push_back((self.tracker.next_ready_index(), started, path));
        }
    }

    fn on_backend(&mut self, tag: u8, msg: Option<&[u8]>) -> Delivery {
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
            match prepared {
                tracker::Prepared::Named(name, stmt) => {
                    self.named.insert(name, stmt);
                }
                tracker::Prepared::Unnamed(stmt) => self.unnamed_upstream = Some(stmt),
            }
        }
        if tag == b'S' {
            self.key.parameters_changed();
        }
        if step.error && self.settings_in_flight {
            self.key
                .lose_track("a request that changed settings failed");
            for d in &mut self.deferred {
                d.spoiled = true;
            }
        }
        if (tag == b'C' || step.ready) && !self.pending.is_empty() {
            self.db.invalidate(&self.pending, &self.cache.versions);
        }
        if (tag == b'C' || step.ready)
            && self.outside_pending
            && let Some(w) = &self.writes
        {
            w.note_outside_write();
        }
        if step.ready {
            let status = held_status.or_else(|| msg.and_then(|m| m.get(5).copied()));
            if let Some(id) = step.ready_id {
                self.settle_deferred(id, status);
                while let Some(&(t, started, path)) = self.timings.front() {
                    if t > id {
                        break;
                    }
                    self.timings.pop_front();
                    if t == id {
                        let h = match path {
                            Path::Miss => &self.metrics.miss,
                            Path::Passthrough => &self.metrics.passthrough,
                        };
                        h.record(started.elapsed());
                    }
                }
            }
            if status != Some(b'I') {
                // Backstops for what was taken as autocommit but ran in a transaction
                // block (a BEGIN pipelined in the same cycle): its writes are the
                // transaction's, its settings may yet be rolled back.
                if !self.pending.is_empty() {
                    self.tx_wrote = true;
                }
                if self.certain_settings {
                    self.key
                        .lose_track("a setting changed in what became a transaction");
                }
            }
            let idle = self.tracker.is_quiet() && self.held.is_empty() && !self.cycle_upstream;
            if idle {
                self.settings_in_flight = false;
                self.certain_settings = false;
                self.next_fill = None;
                // An injected Parse that PostgreSQL skipped (error earlier in its
                // cycle) was never confirmed: parse again before the next use.
                self.unnamed_pending = match (&self.unnamed_client, &self.unnamed_upstream) {
                    (Some(c), Some(u)) => !u.same_as(c),
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if status == Some(b'I') {
                    self.outside_pending = false;
                    self.pending = Effects::default();
                    self.tx_wrote = false;
                    self.tx_snapshot = false;
                    self.key.transaction_ended();
                    self.portals.clear();
                }
            }
        }
        match held_status {
            _ if step.swallow => Delivery::Swallow,
            Some(status) => Delivery::Status(status),
            None => Delivery::Pass,
        }
    }

    fn decide(&self, analysis: &Analysis) -> Decision {
        let catalog = self.db.catalog();
        let decision = decide::decide(analysis, catalog.as_deref(), &self.cache.settings());
        if decision.unknown_name {
            self.db.catalog_behind();
        }
        decision
    }

    /// Reads may be served from or stored into the cache in the current state.
    fn reads_allowed(&self, state: &ProtocolState) -> bool {
        // A session whose own deferred writes are not applied yet must read them
        // (read-your-writes, also under `consistency = "session"`, where other
        // sessions may fill entries without them): no hits, no fills, until they are.
        let own_pending = self
            .writes
            .as_ref()
            .is_some_and(|w| self.own_seq > w.applied());
        self.key.usable()
            && !own_pending
            && self.held_tx.is_none()
            && match state.tx_status {
                b'I' => true,
                b'T' => !self.tx_wrote && !self.tx_snapshot,
                _ => false,
            }
    }

    /// A statement forwarded now takes effect exactly when acknowledged: it runs
    /// alone, in autocommit, with nothing before it outstanding.
    ///
    /// Called once per statement-carrying message forwarded (Query, Execute,
    /// FunctionCall): a deferred session command whose request has not ended yet now
    /// shares it with another statement, so its ReadyForQuery can no longer tell
    /// whether it ran in autocommit.
    fn certain(&mut self, state: &ProtocolState, statements: usize) -> bool {
        let open = self.tracker.next_ready_index();
        for d in self.deferred.iter_mut().filter(|d| d.ready == open) {
            d.spoiled = true;
        }
        statements == 1 && state.tx_status == b'I' && !self.tracker.has_outstanding_statements()
    }

    /// Session commands whose requests ended with the request `done` (ids grow in
    /// send order), with `status` (None: unknown).
    fn settle_deferred(&mut self, done: u64, status: Option<u8>) {
        while self.deferred.front().is_some_and(|d| d.ready <= done) {
            let Some(d) = self.deferred.pop_front() else {
                break;
            };
            // Alone in a request that left the session idle, without error: it ran
            // in autocommit (a session command cannot end a transaction block). Its
            // own request's ReadyForQuery only: a later one says nothing about it.
            let certain = !d.spoiled && d.ready == done && status == Some(b'I');
            self.key.apply(&d.command, certain);
        }
    }

    /// Applies what forwarding `analysis` means for settings, transactions and the
    /// cache, before it goes upstream.
    fn statement_effects(&mut self, analysis: &Analysis, decision: &Decision, certain: bool) {
        if analysis.unanalysed {
            self.key.lose_track("statement not analysed");
        }
        for stmt in &analysis.statements {
            match &stmt.kind {
                Kind::Transaction(TxCommand::Begin { isolation, .. }) => {
                    self.tx_snapshot |= match isolation {
                        Some(i) => snapshot(*i),
                        None => self.key.default_snapshot_isolation,
                    };
                }
                Kind::Transaction(TxCommand::SetTransaction { isolation }) => {
                    self.tx_snapshot |= isolation.is_some_and(snapshot);
                }
                Kind::Transaction(TxCommand::SetSessionCharacteristics { isolation: Some(i) }) => {
                    if certain {
                        self.key.default_snapshot_isolation = snapshot(*i);
                    } else {
                        self.key
                            .lose_track("isolation changed inside a transaction");
                    }
                }
                Kind::Session(cmd) => {
                    self.settings_in_flight = true;
                    self.listened |= matches!(cmd, SessionCommand::Listen);
                    self.certain_settings |= certain;
                    if !certain
                        && analysis.statements.len() == 1
                        && self.tracker.has_outstanding_statements()
                    {
                        // Decided at this request's own ReadyForQuery; until then the
                        // session is not quiet, so nothing is served or filled.
                        self.deferred.push_back(Deferred {
                            command: cmd.clone(),
                            ready: self.tracker.next_ready_index(),
                            spoiled: false,
                        });
                    } else {
                        self.key.apply(cmd, certain);
                    }
                    match cmd {
                        // SQL-level statements share the protocol's namespace.
                        SessionCommand::Deallocate { name: Some(name) }
                        | SessionCommand::Prepare { name } => {
                            self.named.remove(name);
                        }
                        SessionCommand::Deallocate { name: None }
                        | SessionCommand::Discard(DiscardTarget::All) => {
                            self.named.clear();
                            self.forget_unnamed();
                            self.portals.clear();
                        }
                        _ => {}
                    }
                }
                // A temporary object shadows names for this session only.
                Kind::Ddl { temp: true, .. } => {
                    self.key.lose_track("temporary objects created");
                }
                _ => {}
            }
            if stmt.functions.iter().any(|f| f.name == "set_config") {
                self.key.lose_track("set_config() called");
            }
        }
        self.record_effects(&decision.effects, certain);
    }

    fn record_effects(&mut self, effects: &Effects, certain: bool) {
        if effects.hidden_session_changes {
            // DO, CALL, EXECUTE, FunctionCall, user-defined volatile functions: may
            // SET, SET ROLE or create temporary objects out of sight.
            self.key.lose_track("statement with unknown side effects");
        }
        if let Some(w) = &self.writes
            && (effects.hidden_session_changes || effects.database || effects.everything || {
                // The tables written, and those their foreign keys' actions reach.
                let set = w.tables();
                let catalog = self.routing_catalog();
                effects.tables.iter().any(|o| {
                    set.name_of(*o).is_some()
                        || catalog.as_ref().is_some_and(|c| {
                            c.foreign_key_links(*o)
                                .iter()
                                .any(|l| set.name_of(*l).is_some())
                        })
                })
            })
        {
            // Held transactions read such keys again at COMMIT; noted again when the
            // write completes (`on_backend`), so a read that overlapped it is too.
            w.note_outside_write();
            self.outside_pending = true;
        }
        if effects.is_empty() {
            return;
        }
        self.db.invalidate(effects, &self.cache.versions);
        self.pending.merge(effects);
        if !certain {
            self.tx_wrote = true;
        }
    }

    /// The version counters a fill of `cacheable` depends on, read now.
    fn capture(&self, cacheable: &Cacheable) -> Deps {
        let tables: Vec<Arc<Version>> = cacheable
            .tables
            .iter()
            .map(|oid| self.db.versions.table(*oid))
            .collect();
        Deps::capture(std::iter::once(self.db.versions.epoch()).chain(tables.iter()))
    }

    fn simple_key(&mut self, sql: &str, state: &ProtocolState) -> Vec<u8> {
        let prefix = self.key.prefix(&state.params);
        let mut key = Vec::with_capacity(prefix.len() + sql.len() + 8);
        key.extend_from_slice(prefix);
        key.push(b'Q');
        key.extend_from_slice(sql.as_bytes());
        key
    }

    fn answer_ready(&mut self, out: &mut Out<'_>) {
        let rfq = frontend::ready_for_query(out.state.tx_status);
        out.client.extend_from_slice(&rfq);
        out.state.on_backend(rfq[0], &rfq[5..]);
    }

    fn block(&mut self, notified: OwnedNotified) {
        self.waited = true;
        self.wait = Some(Box::pin(async move {
            let _ = tokio::time::timeout(COALESCE_WAIT, notified).await;
        }));
    }

    /// The unnamed statement and portal are replaced by a simple Query.
    fn forget_unnamed(&mut self) {
        self.unnamed_upstream = None;
        self.unnamed_client = None;
        self.unnamed_pending = false;
        self.portals.remove("");
    }
}

/// A session command waiting for its request's ReadyForQuery.
struct Deferred {
    command: SessionCommand,
    /// Tracker index of the ReadyForQuery that ends its request.
    ready: u64,
    /// Another statement joined its request, or a request failed: not certain.
    spoiled: bool,
}

fn snapshot(isolation: Isolation) -> bool {
    matches!(
        isolation,
        Isolation::RepeatableRead | Isolation::Serializable
    )
}
